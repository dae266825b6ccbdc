"""The watershed's analysis: the client's tables, and what leaving closed low groups out keeps."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from lightsheet.segment._common import structure
from lightsheet.segment.plans import StoredPlan
from lightsheet.segment.watershed import _max_by_pair, _shells, _watershed_analysis

#: A basin's label is kept when its peak reaches this (noise SDs of the test's field).
DROP_BELOW = 4.0


def _field(shape=(24, 48, 48), seed=3) -> np.ndarray:
    """Smoothed noise in units of its own SD, with a few bright blobs: many low basins."""
    rng = np.random.default_rng(seed)
    z = ndi.gaussian_filter(rng.standard_normal(shape), (1.0, 1.5, 1.5))
    z /= z.std()
    for c in rng.uniform((4, 6, 6), np.array(shape) - (4, 6, 6), (6, 3)):
        d2 = sum(((np.arange(n) - x) ** 2).reshape([-1 if a == i else 1 for a in range(3)])
                 for i, (n, x) in enumerate(zip(shape, c, strict=True)))  # fmt: skip
        z += 6.0 * np.exp(-d2 / (2 * 2.5**2))
    return z.astype(np.float32)


def _analysis(z: np.ndarray, chunks, drop_below, tables_in=None):
    elev = np.where(z > 1.0, z, np.float32(np.nan))
    e, m = da.from_array(elev, chunks=chunks), da.from_array(~np.isnan(elev), chunks=chunks)
    return _watershed_analysis(
        *_shells(e, m), e.chunks, structure(1), 1.0, 0, drop_below=drop_below, tables_in=tables_in
    )


def _labels(z: np.ndarray, chunks, drop_below):
    labels, n, _, peaks, _, _ = _analysis(z, chunks, drop_below)
    return labels.compute().astype(np.int64), n, peaks


@pytest.mark.parametrize("chunks", [(24, 48, 48), (8, 16, 16), (7, 13, 11)])
def test_dropping_closed_low_groups_keeps_every_label_that_can_peak_high(chunks):
    z = _field()
    whole, n_whole, peaks_whole = _labels(z, (24, 48, 48), None)
    kept, n_kept, peaks_kept = _labels(z, chunks, DROP_BELOW)
    high = (whole > 0) & (peaks_whole[whole - 1] >= DROP_BELOW)
    # every label that peaks high is there, voxel for voxel, under its own number
    pairs = np.unique(np.stack([whole[high], kept[high]]), axis=1)
    assert pairs.shape[1] == np.unique(whole[high]).size == np.unique(kept[high]).size
    assert (kept[high] > 0).all()
    assert (peaks_kept[kept[high] - 1] == peaks_whole[whole[high] - 1]).all()
    # what went is low: voxels of labels that peak under the threshold, never a high one
    gone = (whole > 0) & (kept == 0)
    assert gone.any() and not high[gone].any()
    # and the client saw fewer basins
    assert n_kept < n_whole
    assert (peaks_kept[np.unique(kept[kept > 0]) - 1] >= DROP_BELOW).sum() == np.unique(
        whole[high]
    ).size


def test_a_low_group_on_a_block_border_is_kept():
    """A low group cut by a border may join a high basin in the next block: it stays."""
    z = np.zeros((1, 1, 12), np.float32)
    z[0, 0, 1:11] = [2, 3, 2.5, 2.8, 3.2, 3.5, 4, 6, 9, 5]  # one ridge, rising into block 2
    whole, _, peaks_whole = _labels(z, (1, 1, 12), None)
    split, _, peaks_split = _labels(z, (1, 1, 5), DROP_BELOW)
    assert np.array_equal(whole > 0, split > 0)
    assert peaks_split[split[split > 0] - 1].min() == peaks_whole[whole[whole > 0] - 1].min()


@pytest.mark.parametrize("index", [np.int32, np.int64])
def test_max_by_pair_keeps_the_highest_saddle_of_each_pair_in_its_own_types(index):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 30, (2, 2000)).astype(index)
    s = rng.normal(size=2000).astype(np.float32)
    best = {}
    for x, y, v in zip(a.tolist(), b.tolist(), s.tolist(), strict=True):
        if x != y:
            key = (min(x, y), max(x, y))
            best[key] = max(best.get(key, -np.inf), v)
    edges, saddles = _max_by_pair(a, b, s)
    assert edges.dtype == index and saddles.dtype == np.float32
    assert dict(zip(map(tuple, edges.tolist()), saddles.tolist(), strict=True)) == best
    empty = _max_by_pair(a[:0], b[:0], s[:0])
    assert empty[0].shape == (0, 2) and empty[0].dtype == index and empty[1].dtype == np.float32


def test_tables_stored_on_disk_read_back_as_given_and_label_alike(tmp_path):
    """Each block's stored plan is its in-memory plan, empty blocks too; the neighbour tasks
    read the blocks' shells from disk; labels and peaks are equal."""
    z = _field()
    z[:8, :16, :16] = 0  # a block without foreground: an empty plan and shell
    labels, n, _, peaks, plans, _ = _analysis(z, (8, 16, 16), DROP_BELOW)
    stored_labels, n_stored, _, stored_peaks, stored, _ = _analysis(
        z, (8, 16, 16), DROP_BELOW, tmp_path / "p"
    )
    faces = sorted(p.name for p in (tmp_path / "p").glob("faces-*"))
    assert len(faces) == len(plans) and "faces-0-0-0" in faces
    assert (tmp_path / "p" / "faces-0-0-0").stat().st_size == 0
    assert n_stored == n and np.array_equal(stored_peaks, peaks)
    assert stored.keys() == plans.keys()
    assert any(p[0].size == 0 for p in plans.values())
    for idx, (keys, values) in plans.items():
        assert isinstance(stored[idx], StoredPlan)
        got_keys, got_values = stored[idx].load()
        np.testing.assert_array_equal(got_keys, keys)
        np.testing.assert_array_equal(got_values, values)
    np.testing.assert_array_equal(stored_labels.compute(), labels.compute())
