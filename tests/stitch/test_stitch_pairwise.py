"""Pairwise registration and fusion kernels of overlapping tiles, against references.

Window choice against brute-force sums, peak finding against known shifts, the
distinctness rule on a repetitive pattern, and block-by-block fusion against a whole-array
reference (SciPy's linear interpolation and the blending weights computed on the volume).
"""

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.ingest import discover
from lightsheet.stitch import pairwise, stitch
from lightsheet.stitch.register import Link, judge_links, rescue_links
from tests.ingest.test_ingest import name


def nuclei(shape, *, seed, count=None, radius=2.5):
    """Blurred random blobs on a dim background, with camera-like noise: registrable."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    count = count or int(np.prod(shape) / 400)
    idx = tuple(rng.integers(0, n, count) for n in shape)
    image[idx] = 1000
    image = ndi.gaussian_filter(image, radius) * 40 + 100
    return image + rng.normal(0, 2, shape).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, 7),) * 3),
    data=st.data(),
)
def test_window_sums_equal_brute_force(shape, data):
    extent = tuple(data.draw(st.integers(1, n)) for n in shape)
    values = np.random.default_rng(sum(shape)).random(shape)
    sums = pairwise.window_sums(values, extent)
    want = np.empty(tuple(n - e + 1 for n, e in zip(shape, extent, strict=True)))
    for start in np.ndindex(*want.shape):
        box = tuple(slice(s, s + e) for s, e in zip(start, extent, strict=True))
        want[start] = values[box].sum()
    np.testing.assert_allclose(sums, want, rtol=1e-9, atol=1e-9)


def test_local_maxima_equal_scipys_maximum_filter():
    values = np.random.default_rng(3).random((9, 14, 11)).astype(np.float32)
    want = values >= ndi.maximum_filter(values, size=3, mode="nearest")
    np.testing.assert_array_equal(pairwise._local_maxima(values), want)


@pytest.mark.parametrize("survey_voxels", [pairwise.SURVEY_VOXELS, 2**14])
def test_window_is_placed_over_the_structure(survey_voxels):
    # an overlap box whose only structure sits in one part; elsewhere flat with noise;
    # a small survey budget samples every few planes of the box instead of reading it all
    rng = np.random.default_rng(1)
    box = rng.normal(100, 2, (24, 200, 40)).astype(np.float32)
    box[:, 128:192] = nuclei((24, 64, 40), seed=2)  # on the grid of cells the window moves on
    window, voxels = pairwise.choose_window(box, (slice(0, 24), slice(0, 200), slice(0, 40)),
                                            (24, 50, 40), survey_voxels=survey_voxels)  # fmt: skip
    assert window[0] == slice(0, 24) and window[2] == slice(0, 40)
    assert 128 <= window[1].start and window[1].stop <= 192
    if voxels is not None:  # the survey read the window's voxels: they are handed on
        np.testing.assert_array_equal(voxels, box[window])
    assert (voxels is None) == (survey_voxels < box.size)


def test_window_shape_keeps_the_budget():
    assert pairwise.window_shape((64, 512, 77), 2**18) == (64, 67, 61)
    assert np.prod(pairwise.window_shape((500, 2000, 300), 2**18)) <= 2**18
    assert pairwise.window_shape((10, 20, 30), 2**18) == (10, 20, 30)


@pytest.mark.parametrize("shift", [(0.0, 3.0, -5.0), (2.0, -7.0, 1.0), (-1.0, 0.0, 12.0)])
def test_peaks_find_an_integer_shift_and_other_peaks_elsewhere(shift):
    volume = nuclei((40, 90, 90), seed=7)
    a = volume[5:35, 20:70, 20:70]
    s = np.array(shift, dtype=int)
    b = volume[5 + s[0] : 35 + s[0], 20 + s[1] : 70 + s[1], 20 + s[2] : 70 + s[2]]
    fine_a, fine_b = pairwise.highpass(a), pairwise.highpass(b)
    start, runners = pairwise.peaks(fine_a, fine_b, (10, 15, 15))
    np.testing.assert_allclose(start, shift, atol=0.5)
    # a(x) = b(x - shift): the NCC at the shift is the best, far above any other peak
    best = pairwise.ncc_at(fine_a, fine_b, shift)
    assert best > 0.95
    assert runners and all(np.abs(r - shift).max() >= 2 for r in runners)
    assert max(pairwise.ncc_at(fine_a, fine_b, r) for r in runners) < best / 3


def test_refined_shift_is_sub_voxel_exact():
    # b is a sampled at a non-integer offset (linear interpolation of a smooth image)
    volume = ndi.gaussian_filter(nuclei((40, 80, 80), seed=4, count=200, radius=2.0), 1.0)
    true = np.array([0.3, -2.6, 1.45])
    b = ndi.shift(volume, -true, order=1, mode="nearest")[4:36, 10:70, 10:70]
    a = volume[4:36, 10:70, 10:70]
    found, ncc = pairwise.refine_shift(a, b, np.rint(true))
    np.testing.assert_allclose(found, true, atol=0.05)
    assert ncc > 0.99


def test_a_repeating_pattern_is_not_distinct_and_is_dropped():
    # stripes every 8 voxels: shifts 8 apart match equally well
    z, y, x = np.meshgrid(*(np.arange(n) for n in (16, 64, 64)), indexing="ij")
    rng = np.random.default_rng(0)
    stripes = 100 + 50 * np.sin(2 * np.pi * x / 8) + rng.normal(0, 5, x.shape)
    a, b = stripes[:, :, 8:56], stripes[:, :, 5:53]  # true shift: 3 along x
    result = pairwise.register_pair(a, b, (0.0, 0.0, 0.0), None, (4, 10, 20))
    assert result["ncc_second"] > result["ncc_after"] / 2
    link = Link(0, 1, (0.0, 0.0, 48.0), **{k: v for k, v in result.items() if k != "voxels"})
    judge_links([link], (4, 10, 20), threshold=0.0)
    assert not link.kept and "not distinct" in link.reason


def test_diagonal_links_only_rescue_tiles_the_sides_leave_apart():
    # 2 x 2 tiles: four sides, two diagonals; tile 3's sides both dropped
    nominal = {(0, 1): (0, 0, 90), (0, 2): (0, 90, 0), (1, 3): (0, 90, 0), (2, 3): (0, 0, 90),
               (0, 3): (0, 90, 90), (1, 2): (0, 90, -90)}  # fmt: skip
    links = [Link(a, b, d) for (a, b), d in nominal.items()]
    sides = links[:4]
    for lk in sides:
        lk.kept = True
    assert rescue_links(links, sides, 4) == []
    sides[2].kept = sides[3].kept = False
    assert [(lk.a, lk.b) for lk in rescue_links(links, sides, 4)] == [(0, 3)]


def write_tiles(folder, tiles):
    folder.mkdir()
    for k, idx in enumerate(np.ndindex(1, 2, 2)):
        path = folder / name(z=idx[0], y=idx[1], x=idx[2])
        tifffile.imwrite(path, tiles[k], photometric="minisblack")


def reference_fusion(tiles, positions, shape, blend):
    """Whole-volume fusion: each tile linearly interpolated at its position (SciPy), weighted
    by the product of its border ramps, weighted mean where tiles overlap; where no tile
    covers a voxel, the voxel of the nearest tile (boxes at rounded positions, squared
    distance, ties to the lower index) at the position mirrored into it."""
    acc = np.zeros(shape)
    weights = np.zeros(shape)
    grid = np.indices(shape, dtype=float)
    for tile, pos in zip(tiles, positions, strict=True):
        n = np.array(tile.shape)
        u = grid - np.asarray(pos).reshape(3, 1, 1, 1)  # position inside the tile
        inside = np.all((u >= 0) & (u <= (n - 1).reshape(3, 1, 1, 1)), axis=0)
        values = ndi.map_coordinates(tile.astype(float), u, order=1, mode="nearest")
        ramp = np.ones(shape)
        for axis in range(3):
            edge = np.minimum(u[axis], n[axis] - 1 - u[axis]) + 0.5
            ramp *= np.minimum(1.0, edge / max(1.0, blend[axis]))
        w = np.where(inside, ramp, 0.0)
        acc += w * values
        weights += w
    out = np.divide(acc, weights, out=np.zeros(shape), where=weights > 0)
    fill, _ = nearest_tile_values(tiles, [np.rint(p).astype(int) for p in positions], shape)
    return np.where(weights > 0, out, fill)


def nearest_tile_values(tiles, starts, shape):
    """Each voxel's nearest tile's voxel, and the squared distance to that tile (0 inside).

    Tiles are boxes at the integer ``starts``; the nearest is by squared distance to the box,
    ties to the lower index; its voxel is the position mirrored into the box about its edge
    voxel (a triangle wave of the offset; gaps here are narrower than a tile).
    """
    grid = np.indices(shape)
    dist = np.stack(
        [
            sum(
                np.maximum(0, np.maximum(s[a] - grid[a], grid[a] - (s[a] + t.shape[a] - 1))) ** 2
                for a in range(3)
            )
            for t, s in zip(tiles, starts, strict=True)
        ]
    )
    nearest = np.argmin(dist, axis=0)
    out = np.empty(shape, np.result_type(*tiles))
    for i, (tile, s) in enumerate(zip(tiles, starts, strict=True)):
        last = [n - 1 for n in tile.shape]
        j = [last[a] - np.abs(last[a] - np.abs(grid[a] - s[a])) for a in range(3)]
        mine = nearest == i
        out[mine] = tile[j[0][mine], j[1][mine], j[2][mine]]
    return out, dist.min(axis=0)


@pytest.mark.parametrize("chunks", [(5, 16, 16), (12, 23, 9), (3, 64, 64)])
def test_fusion_equals_the_whole_volume_reference(tmp_path, chunks):
    rng = np.random.default_rng(11)
    tile_shape = (10, 30, 34)
    tiles = [(rng.random(tile_shape) * 1000).astype(np.float32) for _ in range(4)]
    positions = np.array([[0.3, 0.0, 0.6], [0.0, 0.7, 26.2], [1.4, 24.5, 0.0], [0.8, 25.1, 27.9]])
    shape, blend = (12, 56, 62), (1.0, 5.5, 7.0)

    def fuse(folder, tiles):
        write_tiles(folder, tiles)
        m = discover(str(folder / "*.tif"), DEFAULT_PATTERN)
        return stitch(
            m, voxel_size_um=(2, 1, 1), chunks=chunks, positions_vox=positions, shape_zyx=shape,
            blend_vox=blend,
        ).compute()[0, 0]  # fmt: skip

    fused = fuse(tmp_path / "float", tiles)
    np.testing.assert_allclose(fused, reference_fusion(tiles, positions, shape, blend),
                               rtol=1e-4, atol=1e-2)  # fmt: skip
    # integer tiles: the same, rounded to the nearest integer
    ints = [t.astype(np.uint16) for t in tiles]
    fused = fuse(tmp_path / "ints", ints)
    assert fused.dtype == np.uint16
    want = reference_fusion(ints, positions, shape, blend)
    assert np.abs(fused.astype(float) - want).max() <= 0.5 + 1e-3
