"""Voxel-size transfer geometry: any block, any grid, the whole volume's values."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lightsheet.resample import AxisMap, apply_taps, taps


@st.composite
def axis_and_blocks(draw):
    n = draw(st.integers(2, 160))
    source_um = draw(st.floats(0.3, 8.0))
    model_um = draw(st.sampled_from([1.62, 2.0, 6.0, draw(st.floats(0.3, 8.0))]))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=6))))
    halo = draw(st.integers(0, 25))
    align = draw(st.sampled_from([1, 2, 4, 8]))
    return AxisMap(n, source_um=source_um, model_um=model_um), [0, *cuts, n], halo, align


@settings(max_examples=300, deadline=None)
@given(axis_and_blocks(), st.integers(0, 2**31))
def test_blocks_read_what_their_taps_need_and_match_the_whole_axis(case, seed):
    amap, edges, halo, align = case
    x = np.random.default_rng(seed).random(amap.n_source)
    whole = amap.plan(0, amap.n_source, halo=0, align=1)
    # there and back on the whole axis (the network stands in as the identity)
    ref = apply_taps(apply_taps(x, whole.to_model, 0)[whole.crop], whole.to_source, 0)
    assert ref.shape == x.shape
    for c0, c1 in zip(edges[:-1], edges[1:], strict=True):
        p = amap.plan(c0, c1, halo=halo, align=align)
        assert 0 <= p.read[0] < p.read[1] <= amap.n_source
        assert 0 <= p.model[0] and p.model[1] <= amap.n_model
        assert p.model[0] % align == 0 or p.model[0] == 0
        # the network's halo fits in the model region, except at the volume's ends
        assert p.crop.start >= min(halo, p.model[0] + p.crop.start)
        read = x[p.read[0] : p.read[1]]
        on_model = apply_taps(read, p.to_model, 0)
        assert on_model.shape == (p.model[1] - p.model[0],)
        got = apply_taps(on_model[p.crop], p.to_source, 0)
        np.testing.assert_allclose(got, ref[c0:c1], rtol=0, atol=1e-6)


def test_filter_edges_are_exact_zeros():
    # a tap on the edge of the triangle (|index - position| = half-width up to rounding)
    # is dropped, so a block never reads past its support
    t = taps(11, 20, 1.2, 30)
    assert (t.weight > 0).all(axis=0).any()
    assert t.index[t.weight > 0].max() < 24
