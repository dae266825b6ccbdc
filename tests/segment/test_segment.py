"""Segmentation: exact at any chunking, against SciPy on the whole array and phantoms."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightsheet import segment as seg
from lightsheet.config import SegmentConfig
from lightsheet.errors import SegmentError, UndersampledCellWarning

VOXEL_UM = (2.0, 1.0, 1.0)
DIAMETER_UM = 9.0
#: relative tolerance of float centroids/means between chunked and whole-array sums
SUM_RTOL = 1e-9


# ----------------------------------------------------------------------------- helpers


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to renumbering (background must match)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    fg = a != 0
    pairs = np.unique(np.stack([a[fg].astype(np.int64), b[fg].astype(np.int64)]), axis=1)
    return pairs.shape[1] == np.unique(a[fg]).size == np.unique(b[fg]).size


def spheres(shape, centres_um, radius_um, voxel_um=VOXEL_UM) -> np.ndarray:
    """Ids 1..k of balls (later balls over earlier ones), on the anisotropic voxel grid."""
    grid = [np.arange(n) * v for n, v in zip(shape, voxel_um, strict=True)]
    out = np.zeros(shape, np.int32)
    for i, c in enumerate(centres_um, start=1):
        d2 = (
            (grid[0][:, None, None] - c[0]) ** 2
            + (grid[1][None, :, None] - c[1]) ** 2
            + (grid[2][None, None, :] - c[2]) ** 2
        )
        out[d2 <= radius_um**2] = i
    return out


def split_points(n: int, k: int, rng) -> tuple[int, ...]:
    """Uneven chunk sizes: ``k`` random cuts of ``n``."""
    k = min(k, n - 1)
    cuts = np.sort(rng.choice(np.arange(1, n), size=k, replace=False)) if k else []
    return tuple(np.diff(np.r_[0, cuts, n]).astype(int).tolist())


@st.composite
def chunked_volumes(draw):
    shape = tuple(draw(st.integers(2, 14)) for _ in range(3))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.floats(0.05, 0.7))
    rng = np.random.default_rng(seed)
    volume = rng.random(shape) < density
    chunks = tuple(split_points(n, draw(st.integers(0, 4)), rng) for n in shape)
    return volume, chunks


# ----------------------------------------------------------------------------- label


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=chunked_volumes(), connectivity=st.sampled_from([1, 2, 3]))
def test_label_equals_scipy_whole_array(data, connectivity):
    volume, chunks = data
    labels, n = seg.label(da.from_array(volume, chunks=chunks), connectivity=connectivity)
    got = labels.compute()
    ref, n_ref = ndi.label(volume, structure=seg.structure(connectivity))
    assert n == n_ref
    assert same_partition(got, ref)
    # ids are exactly 1..n
    assert set(np.unique(got).tolist()) == set(range(n + 1))
    assert labels.chunks == da.from_array(volume, chunks=chunks).chunks


def test_label_object_spanning_many_chunks():
    # a snake through 3 x 3 x 3 chunks of 4 voxels: one object, 27 blocks
    volume = np.zeros((12, 12, 12), bool)
    volume[1, 1, :] = True
    volume[1, :, 10] = True
    volume[:, 10, 10] = True
    volume[10, 10, 2:11] = True
    labels, n = seg.label(da.from_array(volume, chunks=4))
    assert n == 1
    assert np.array_equal(labels.compute() == 1, volume)


@pytest.mark.parametrize(
    ("connectivity", "expected"), [(1, 2), (2, 2), (3, 1)], ids=["faces", "edges", "corners"]
)
def test_label_objects_touching_only_at_a_chunk_corner(connectivity, expected):
    # two cubes meeting at one point, the point where 8 chunks meet
    volume = np.zeros((8, 8, 8), bool)
    volume[2:4, 2:4, 2:4] = True
    volume[4:6, 4:6, 4:6] = True
    labels, n = seg.label(da.from_array(volume, chunks=4), connectivity=connectivity)
    ref, n_ref = ndi.label(volume, structure=seg.structure(connectivity))
    assert n == n_ref == expected
    assert same_partition(labels.compute(), ref)


@pytest.mark.parametrize(("connectivity", "expected"), [(1, 2), (2, 1), (3, 1)])
def test_label_objects_touching_only_at_a_chunk_edge(connectivity, expected):
    volume = np.zeros((8, 8, 8), bool)
    volume[2:4, 2:4, 1:7] = True
    volume[4:6, 4:6, 1:7] = True
    labels, n = seg.label(da.from_array(volume, chunks=(4, 4, 3)), connectivity=connectivity)
    assert n == expected
    assert same_partition(labels.compute(), ndi.label(volume, seg.structure(connectivity))[0])


def test_label_empty_and_full_volumes():
    empty = da.zeros((9, 10, 11), dtype=bool, chunks=4)
    labels, n = seg.label(empty)
    assert n == 0
    assert labels.dtype == np.uint32
    assert not labels.any().compute()
    full = da.ones((9, 10, 11), dtype=bool, chunks=4)
    labels, n = seg.label(full, connectivity=1)
    assert n == 1
    assert (labels == 1).all().compute()


def test_label_wider_type_instead_of_wrapping():
    volume = np.zeros((4, 4, 12), bool)
    volume[1, 1, ::2] = True  # 6 separate voxels in 3 chunks
    offset = 2**32 - 4  # ids up to 2**32 + 2: past uint32, and far past int32
    labels, n = seg.label(da.from_array(volume, chunks=(4, 4, 4)), offset=offset)
    got = labels.compute()
    assert n == 6
    assert got.dtype == np.uint64
    assert sorted(np.unique(got[volume]).tolist()) == [offset + i for i in range(1, 7)]
    assert seg.label_dtype(2**31) == np.uint32  # more than int32 holds: still uint32
    assert seg.label_dtype(2**32) == np.uint64


def test_label_rejects_bad_input():
    with pytest.raises(SegmentError, match="3-D"):
        seg.label(da.zeros((4, 4), dtype=bool))
    with pytest.raises(SegmentError, match="boolean"):
        seg.label(da.zeros((4, 4, 4), dtype=np.float32))
    with pytest.raises(SegmentError, match="connectivity"):
        seg.label(da.zeros((4, 4, 4), dtype=bool), connectivity=4)
    with pytest.raises(SegmentError, match="offset"):
        seg.label(da.zeros((4, 4, 4), dtype=bool), offset=-1)


# ----------------------------------------------------------------------------- threshold


def _blob_image(dtype, seed=0, shape=(16, 40, 40)):
    rng = np.random.default_rng(seed)
    base = ndi.gaussian_filter(rng.random(shape), 2.0)
    base = (base - base.min()) / (base.max() - base.min())
    img = 200 + 3000 * (base > 0.6) * base + rng.normal(0, 30, shape)
    if np.issubdtype(dtype, np.integer):
        img = np.clip(img * (np.iinfo(dtype).max / 4000), 0, np.iinfo(dtype).max)
    return img.astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_otsu_equals_skimage_on_integers(dtype):
    from skimage.filters import threshold_otsu

    img = _blob_image(dtype)
    t = seg.otsu_threshold(da.from_array(img, chunks=(5, 13, 17)))
    assert t == float(threshold_otsu(img))


def test_otsu_on_floats_matches_skimage_split():
    from skimage.filters import threshold_otsu

    img = _blob_image(np.float32, seed=3)
    t = seg.otsu_threshold(da.from_array(img, chunks=(5, 13, 17)))
    t_ref = threshold_otsu(img, nbins=4096)
    # 128 bins per octave: the chosen split differs from a fine linear histogram's by
    # under one bin, and almost no voxels fall between the two
    assert abs(t - t_ref) <= 0.01 * abs(t_ref)
    assert np.mean((img > t) != (img > t_ref)) < 1e-3


def test_otsu_constant_and_nonfinite():
    const = da.full((4, 5, 6), 7.5, dtype=np.float32, chunks=2)
    t = seg.otsu_threshold(const)
    assert not (const > t).any().compute()
    bad = np.ones((4, 5, 6), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(SegmentError, match="NaN"):
        seg.otsu_threshold(da.from_array(bad, chunks=2))


def test_threshold_methods_and_errors():
    img = da.from_array(np.arange(64, dtype=np.float32).reshape(4, 4, 4), chunks=2)
    assert int(seg.threshold(img, method="absolute", value=59.5).sum()) == 4
    otsu = seg.threshold(img)
    assert otsu.dtype == bool
    assert int(otsu.sum()) == int((img > seg.otsu_threshold(img)).sum())
    with pytest.raises(SegmentError, match="value"):
        seg.threshold(img, method="absolute")
    with pytest.raises(SegmentError, match="method"):
        seg.threshold(img, method="median")


def test_subtract_background_exact_at_any_chunking():
    rng = np.random.default_rng(5)
    shape = (20, 48, 48)
    ramp = np.linspace(100, 400, shape[2])[None, None, :] * np.ones(shape)
    cells = spheres(shape, rng.uniform(4, 40, (8, 3)) * [1, 1, 1], 4.0) > 0
    img = (ramp + 1000 * cells).astype(np.float32)
    whole = seg.subtract_background(
        da.from_array(img, chunks=shape), voxel_size_um=VOXEL_UM, radius_um=DIAMETER_UM
    ).compute()
    chunked = seg.subtract_background(
        da.from_array(img, chunks=(7, 11, 30)), voxel_size_um=VOXEL_UM, radius_um=DIAMETER_UM
    )
    assert chunked.chunks == da.from_array(img, chunks=(7, 11, 30)).chunks
    np.testing.assert_array_equal(chunked.compute(), whole)
    # the ramp is gone away from the x faces (where the filters reflect it), the nuclei stay
    inner = np.zeros(shape, bool)
    inner[:, :, 10:-10] = True
    assert np.abs(whole[~cells & inner]).max() < 1e-3
    assert np.median(whole[cells]) > 900


# ----------------------------------------------------------------------------- watershed


def test_watershed_splits_touching_nuclei_that_labelling_merges():
    shape = (16, 40, 40)
    # two balls of 9 µm diameter, centres 7 µm apart along a tilted line: they touch
    truth = spheres(shape, [(15.0, 16.0, 16.0), (15.0, 21.0, 20.9)], 4.5)
    mask = da.from_array(truth > 0, chunks=(8, 20, 20))
    _, n_cc = seg.label(mask)
    assert n_cc == 1
    labels, n = seg.watershed(mask, voxel_size_um=VOXEL_UM, nucleus_diameter_um=DIAMETER_UM)
    got = labels.compute()
    assert n == 2
    for i in (1, 2):
        ids, counts = np.unique(got[truth == i], return_counts=True)
        assert counts.max() / counts.sum() > 0.9  # each ball is (almost) one label


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_watershed_exact_at_any_chunking(connectivity):
    rng = np.random.default_rng(11)
    shape = (24, 64, 64)
    # touching pairs (centres 7 µm apart, random directions) among loose nuclei
    first = rng.uniform([8, 8, 8], [40, 56, 56], size=(8, 3))
    step = rng.normal(size=(8, 3))
    step *= 7.0 / np.linalg.norm(step, axis=1, keepdims=True)
    centres = np.vstack([first, first + step, rng.uniform([6, 6, 6], [42, 58, 58], (6, 3))])
    mask = spheres(shape, centres, 4.6) > 0
    whole, n_whole = seg.watershed(
        da.from_array(mask, chunks=shape),
        voxel_size_um=VOXEL_UM,
        nucleus_diameter_um=9.0,
        connectivity=connectivity,
    )
    whole = whole.compute()
    assert n_whole > ndi.label(mask)[1]  # something was split
    # small blocks: ascent paths cross several blocks, and edges and corners (2, 3)
    for chunks in [(9, 17, 23), (24, 10, 64), (6, 13, 11)]:
        labels, n = seg.watershed(
            da.from_array(mask, chunks=chunks),
            voxel_size_um=VOXEL_UM,
            nucleus_diameter_um=9.0,
            connectivity=connectivity,
        )
        assert n == n_whole
        assert same_partition(labels.compute(), whole)


def test_watershed_empty_and_full():
    labels, n = seg.watershed(
        da.zeros((6, 8, 8), dtype=bool, chunks=4), voxel_size_um=VOXEL_UM, nucleus_diameter_um=9
    )
    assert n == 0 and not labels.any().compute()
    labels, n = seg.watershed(
        da.ones((6, 8, 8), dtype=bool, chunks=4), voxel_size_um=VOXEL_UM, nucleus_diameter_um=9
    )
    assert n == 1 and (labels == 1).all().compute()


@pytest.mark.parametrize(
    ("voxel_um", "clip_um"),
    [((2.0, 1.0, 1.0), 9.25), ((3.3, 0.4, 0.9), 4.0), ((0.5, 0.5, 0.5), 100.0)],
)
def test_clipped_distance_equals_scipy_edt(voxel_um, clip_um):
    rng = np.random.default_rng(5)
    mask = ndi.gaussian_filter(rng.random((30, 41, 37)), 2) > 0.48
    ref = np.minimum(ndi.distance_transform_edt(mask, sampling=voxel_um), clip_um)
    got = seg.clipped_distance(mask, voxel_um, clip_um)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert (seg.clipped_distance(np.ones((4, 5, 6), bool), voxel_um, clip_um) == clip_um).all()


def test_distance_elevation_equals_whole_array_edt():
    rng = np.random.default_rng(2)
    mask = ndi.gaussian_filter(rng.random((20, 40, 40)), 2) > 0.5
    got = seg.distance_elevation(
        da.from_array(mask, chunks=(6, 15, 11)), voxel_size_um=VOXEL_UM, clip_um=6.0
    ).compute()
    ref = np.minimum(ndi.distance_transform_edt(mask, sampling=VOXEL_UM), 6.0) * mask
    np.testing.assert_allclose(got, ref, rtol=1e-6)


# ----------------------------------------------------------------------------- measure


def _reference_table(truth: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    ids = np.unique(truth[truth > 0])
    com = np.array(ndi.center_of_mass(np.ones_like(truth), truth, ids))
    boxes = ndi.find_objects(truth)
    rows = []
    for k, i in enumerate(ids):
        sl = boxes[i - 1]
        rows.append(
            {
                "z_um": com[k, 0] * VOXEL_UM[0],
                "y_um": com[k, 1] * VOXEL_UM[1],
                "x_um": com[k, 2] * VOXEL_UM[2],
                "volume_um3": (truth == i).sum() * np.prod(VOXEL_UM),
                "mean_intensity": image[truth == i].astype(np.float64).mean(),
                "max_intensity": image[truth == i].max(),
                "bbox_z_min": sl[0].start,
                "bbox_y_min": sl[1].start,
                "bbox_x_min": sl[2].start,
                "bbox_z_max": sl[0].stop,
                "bbox_y_max": sl[1].stop,
                "bbox_x_max": sl[2].stop,
            }
        )
    return pd.DataFrame(rows)


def test_measure_one_row_per_cell_across_chunk_borders():
    rng = np.random.default_rng(7)
    shape = (20, 48, 48)
    # cells centred on chunk borders (chunks of 5 x 12 x 12 voxels) and in between
    borders = np.array([[10.0, 12.0, 12.0], [20.0, 24.0, 36.0], [30.0, 36.0, 24.0]])
    centres = np.vstack([borders, rng.uniform([6, 6, 6], [34, 42, 42], (6, 3))])
    truth = spheres(shape, centres, 3.5)
    image = rng.uniform(50, 1000, shape).astype(np.float32)
    table = seg.measure(
        da.from_array(truth.astype(np.uint32), chunks=(5, 12, 12)),
        da.from_array(image, chunks=(7, 9, 48)),  # other chunks: rechunked to the labels'
        voxel_size_um=VOXEL_UM,
    )
    assert list(table.columns) == list(seg.TABLE_COLUMNS)
    assert table["label"].tolist() == sorted(np.unique(truth[truth > 0]).tolist())
    ref = _reference_table(truth, image)
    for col in ref.columns:
        np.testing.assert_allclose(table[col].to_numpy(), ref[col].to_numpy(), rtol=SUM_RTOL)
    # more arrays in the same pass: their mean and max per cell, as SciPy's on the whole
    other = rng.normal(size=shape)
    more = seg.measure(
        da.from_array(truth.astype(np.uint32), chunks=(5, 12, 12)),
        da.from_array(image, chunks=(7, 9, 48)),
        voxel_size_um=VOXEL_UM,
        extra={"other": da.from_array(other, chunks=(4, 20, 13))},
    )
    index = table["label"].to_numpy()
    np.testing.assert_allclose(more["other_mean"], ndi.mean(other, truth, index), rtol=1e-9)
    np.testing.assert_allclose(more["other_max"], ndi.maximum(other, truth, index), rtol=1e-12)
    pd.testing.assert_frame_equal(more[list(seg.TABLE_COLUMNS)], table)


def test_measure_empty_labels():
    table = seg.measure(
        da.zeros((4, 5, 6), dtype=np.uint32, chunks=2),
        da.ones((4, 5, 6), chunks=2),
        voxel_size_um=VOXEL_UM,
    )
    assert len(table) == 0 and list(table.columns) == list(seg.TABLE_COLUMNS)
    more = seg.measure(
        da.zeros((4, 5, 6), dtype=np.uint32, chunks=2),
        da.ones((4, 5, 6), chunks=2),
        voxel_size_um=VOXEL_UM,
        extra={"other": da.ones((4, 5, 6), chunks=3)},
    )
    assert len(more) == 0 and list(more.columns)[-2:] == ["other_mean", "other_max"]


def test_count_map_counts_each_cell_in_its_centroid_block():
    table = pd.DataFrame(
        {"z_um": [0.0, 7.9, 8.1, 30.0], "y_um": [0.0, 0.0, 0.0, 20.0], "x_um": [0, 0, 0, 9.4]}
    )
    chunks = ((4, 4, 8), (10, 11), (5, 5))  # voxel 4 in z starts the second block
    cmap = seg.count_map(table, chunks=chunks, voxel_size_um=VOXEL_UM)
    assert cmap.shape == (3, 2, 2)
    assert cmap.sum() == len(table)
    assert cmap[0, 0, 0] == 1  # z 0 µm → voxel 0
    assert cmap[1, 0, 0] == 2  # 7.9 and 8.1 µm → voxel 4
    assert cmap[2, 1, 1] == 1  # voxel (15, 20, 9)


# ----------------------------------------------------------------------------- pipeline


def _nuclei_image(shape, centres_um, *, sigma_um=2.6, peak=1000.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = [np.arange(n) * v for n, v in zip(shape, VOXEL_UM, strict=True)]
    img = np.zeros(shape, np.float32)
    for c in centres_um:
        d2 = (
            (grid[0][:, None, None] - c[0]) ** 2
            + (grid[1][None, :, None] - c[1]) ** 2
            + (grid[2][None, None, :] - c[2]) ** 2
        )
        img += peak * np.exp(-d2 / (2 * sigma_um**2))
    return img + rng.normal(100, 10, shape).astype(np.float32)


@pytest.mark.parametrize("watershed", [True, False], ids=["watershed", "components"])
def test_segment_volume_counts_each_cell_once(watershed):
    rng = np.random.default_rng(4)
    shape = (24, 64, 64)
    chunks = (8, 16, 24)
    # half the nuclei sit exactly on chunk borders (z 16 µm, y 16/32 µm, x 24/48 µm)
    on_borders = [(16.0, 16.0, 24.0), (16.0, 32.0, 48.0), (32.0, 48.0, 24.0), (16.0, 48.0, 40.0)]
    inside = [(8.0, 8.0, 8.0), (38.0, 56.0, 56.0), (8.0, 40.0, 12.0), (38.0, 10.0, 40.0)]
    centres = np.array(on_borders + inside)
    image = _nuclei_image(shape, centres, seed=int(rng.integers(1000)))
    config = SegmentConfig(method="otsu", watershed=watershed)
    res = seg.segment_volume(
        da.from_array(image, chunks=chunks), voxel_size_um=VOXEL_UM, config=config
    )
    assert res.n == len(res.table) == len(centres)
    assert res.count_map.sum() == res.n
    assert res.count_map.shape == da.from_array(image, chunks=chunks).numblocks
    found = res.table[["z_um", "y_um", "x_um"]].to_numpy()
    dist = np.linalg.norm(found[:, None, :] - centres[None, :, :], axis=2)
    assert sorted(dist.argmin(axis=1).tolist()) == list(range(len(centres)))
    assert dist.min(axis=1).max() < 1.0
    # the lazy labels agree with the table
    again = seg.measure(res.labels, da.from_array(image, chunks=chunks), voxel_size_um=VOXEL_UM)
    pd.testing.assert_frame_equal(again, res.table)
    # and with a single-chunk run, up to renumbering
    whole = seg.segment_volume(
        da.from_array(image, chunks=shape), voxel_size_um=VOXEL_UM, config=config
    )
    assert same_partition(res.labels.compute(), whole.labels.compute())


@pytest.mark.parametrize(
    "config",
    [
        SegmentConfig(),
        SegmentConfig(subtract_background=True, connectivity=3),
        SegmentConfig(watershed=False),
    ],
    ids=["watershed", "top-hat", "components"],
)
def test_stored_image_equals_dask_chunks(config):
    # blocks that read their halos from the store give the same labels and table as halos
    # taken from neighbouring dask chunks, with uneven blocks and stored chunks of their own
    shape = (30, 70, 64)
    rng = np.random.default_rng(8)
    centres = rng.uniform((4, 5, 5), (56, 65, 59), size=(14, 3))
    image = _nuclei_image(shape, centres, seed=3)
    store = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(7, 32, 20))
    blocks = ((9, 12, 9), (25, 25, 20), (30, 34))
    from_store = seg.segment_volume(store, voxel_size_um=VOXEL_UM, config=config, chunks=blocks)
    from_dask = seg.segment_volume(
        da.from_array(image, chunks=blocks), voxel_size_um=VOXEL_UM, config=config
    )
    assert from_store.n > 8 and from_store.labels.chunks == from_dask.labels.chunks
    pd.testing.assert_frame_equal(from_store.table, from_dask.table)
    np.testing.assert_array_equal(from_store.labels.compute(), from_dask.labels.compute())
    # a segment block task depends on nothing but the store and the kernel (held once)
    graph = dict(seg._stored_watershed(store, blocks, 150.0, VOXEL_UM, config, None)[0].dask)
    assert sum(isinstance(k, tuple) for k in graph) == 3 * 3 * 2 and len(graph) == 20


@pytest.mark.parametrize(
    "blocks",
    [(10, 32, 32), ((9, 12, 9), (25, 25, 20), (30, 34)), (10, 18, 18)],
    ids=["regular", "uneven", "whole-bins"],
)
def test_local_scratch_changes_nothing(blocks, tmp_path):
    # method local keeping its statistics (and, on a regular grid, its cell bodies) on disk
    # between passes gives the labels and table of recomputing them, bit for bit, from a
    # store and from dask chunks; the labels then read the bodies, not the image. Blocks of
    # whole 9-voxel bins are the statistics' grid: the smoothed image and its opening are
    # then stored by block, each with its one-voxel shell (`Kept.step`)
    shape = (30, 70, 64)
    rng = np.random.default_rng(8)
    centres = rng.uniform((4, 5, 5), (56, 65, 59), size=(14, 3))
    image = _nuclei_image(shape, centres, seed=3)
    store = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(7, 32, 20))
    config = SegmentConfig(nucleus_diameter_um=DIAMETER_UM)
    ref = seg.segment_volume(
        da.from_array(image, chunks=blocks), voxel_size_um=VOXEL_UM, config=config
    )
    assert ref.n > 8
    for i, source in enumerate([store, da.from_array(image, chunks=blocks)]):
        scratch = tmp_path / str(i)
        kept = seg.segment_volume(
            source, voxel_size_um=VOXEL_UM, config=config, chunks=blocks, scratch=scratch
        )
        regular = blocks[0] == 10
        assert sorted(p.name for p in scratch.iterdir()) == [
            *(["bodies.zarr"] if regular else []),
            "image-bins.zarr",
            "image-noise.zarr",
            "image-offset.zarr",
            "image-opening.zarr",
            "image-smoothed.zarr",
            "watershed",
        ]
        by_block = zarr.open_array(str(scratch / "image-smoothed.zarr")).shape != shape
        assert by_block == (blocks == (10, 18, 18))
        recomputes = any("contrast_parts" in str(k) for k in kept.labels.__dask_graph__())
        assert recomputes != regular
        pd.testing.assert_frame_equal(kept.table, ref.table, check_exact=True)
        labels = kept.labels.compute()
        assert labels.dtype == ref.labels.dtype
        np.testing.assert_array_equal(labels, ref.labels.compute())


def test_local_scratch_reads_the_image_with_a_halo_once(tmp_path, monkeypatch):
    # with a scratch folder only the statistics pass reads the image over a halo, in its own
    # blocks (2 x 2 of the analysis's in y and x); the analysis reads none of it (I_s and O
    # come from the scratch folder), the measurement each block's core once, the labels none
    from lightsheet.regions import read_region
    from lightsheet.segment import background as bg

    reads = []

    def recording(source, region, boundary="none"):
        reads.append(region)
        return read_region(source, region, boundary)

    monkeypatch.setattr(bg, "read_region", recording)
    shape, blocks = (30, 70, 64), (10, 16, 16)
    rng = np.random.default_rng(8)
    image = _nuclei_image(shape, rng.uniform((4, 5, 5), (56, 65, 59), size=(14, 3)), seed=3)
    store = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(7, 32, 20))
    result = seg.segment_volume(
        store,
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(nucleus_diameter_um=DIAMETER_UM),
        chunks=blocks,
        scratch=tmp_path,
    )
    result.labels.compute()
    assert result.n > 8
    padded = [r for r in reads if any(r.lo) or any(r.hi)]
    cores = sorted(r.start for r in reads if not (any(r.lo) or any(r.hi)))
    geometry = bg.LocalGeometry.of(VOXEL_UM, DIAMETER_UM)
    grid = da.core.normalize_chunks(blocks, shape)
    stat_blocks = bg._statistics_blocks(bg.statistics_grid(grid, geometry))
    assert stat_blocks[1:] == ((36, 34), (36, 28))  # blocks of 2 bins of 9, 2 x 2 joined
    assert len(padded) == 3 * 2 * 2
    assert cores == sorted(
        (z, y, x) for z in (0, 10, 20) for y in range(0, 70, 16) for x in range(0, 64, 16)
    )  # each of the 3 x 5 x 4 blocks once


def test_local_without_scratch_computes_each_statistics_block_once_a_pass(monkeypatch):
    # without a scratch folder the statistics are lazy: each pass (analysis, measurement,
    # labels) computes each statistics block once, shared by every block that reads it, not
    # once per reader (the plane gains were sliced per block: 138 times each here)
    from lightsheet.segment import background as bg

    computed = []

    def recording(padded, **kwargs):
        computed.append(kwargs["region"].start)
        return bin_stats(padded, **kwargs)

    bin_stats = bg._bin_stats_block
    monkeypatch.setattr(bg, "_bin_stats_block", recording)
    shape = (30, 70, 64)
    rng = np.random.default_rng(8)
    image = _nuclei_image(shape, rng.uniform((4, 5, 5), (56, 65, 59), size=(14, 3)), seed=3)
    result = seg.segment_volume(
        da.from_array(image, chunks=(10, 16, 16)),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(nucleus_diameter_um=DIAMETER_UM),
    )
    result.labels.compute()
    assert result.n > 8
    counts = np.unique(computed, axis=0, return_counts=True)[1]
    assert len(counts) == 3 * 2 * 2 and counts.max() == 3, counts


def test_merge_by_dynamics_depth_fraction_and_peak_distance():
    from lightsheet.segment.watershed import _merge_by_dynamics

    # basins 0-1-2 in a row (peaks 100, 90, 50; saddles 80 and 44), basin 3 apart
    heights = np.array([100.0, 90.0, 50.0, 70.0])
    edges = np.array([[0, 1], [1, 2], [2, 3]])
    saddles = np.array([80.0, 44.0, 10.0])
    positions = np.array([[0.0, 0, 0], [4.0, 0, 0], [20.0, 0, 0], [40.0, 0, 0]])
    # dips of 10, 6 and 40: with a depth of 2 every basin stays
    assert list(_merge_by_dynamics(heights, edges, saddles, 2.0)) == [0, 1, 2, 3]
    # a tenth of the lower peak: 90's dip of 10 is 11 %, 50's dip of 6 is 12 %: both stay
    assert list(_merge_by_dynamics(heights, edges, saddles, 2.0, 0.1)) == [0, 1, 2, 3]
    # a fifth: both merge into the highest
    assert list(_merge_by_dynamics(heights, edges, saddles, 2.0, 0.2)) == [0, 0, 0, 3]
    # peaks 4 apart are one at a minimum distance of 4.5; 50 is 20 from the top: it stays
    merged = _merge_by_dynamics(heights, edges, saddles, 2.0, 0.1, positions, 4.5)
    assert list(merged) == [0, 0, 2, 3]


def _elongated_cells(shape, cells, *, seed=0) -> np.ndarray:
    """Cells stretched along z as an undeconvolved light-sheet images them (σz = 4 σxy).

    ``cells``: (z, y, x, bumps) in µm; a cell with bumps has two narrow maxima ±6 µm along z
    on its top (texture inside one cell), with a dip between them deeper than a tenth.
    """
    grid = [np.arange(n) * v for n, v in zip(shape, VOXEL_UM, strict=True)]
    img = np.zeros(shape, np.float32)

    def blob(c, sz, amp):
        return amp * np.exp(
            -((grid[0][:, None, None] - c[0]) ** 2) / (2 * sz**2)
            - ((grid[1][None, :, None] - c[1]) ** 2 + (grid[2][None, None, :] - c[2]) ** 2)
            / (2 * 3.0**2)
        )

    for z, y, x, bumps in cells:
        img += blob((z, y, x), 12.0, 1000.0)
        if bumps:
            img += blob((z - 6.0, y, x), 2.5, 400.0) + blob((z + 6.0, y, x), 2.5, 400.0)
    return img + np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def test_local_joins_the_maxima_of_one_elongated_cell(monkeypatch):
    """Two maxima of one cell, closer along z than half the cells' measured z extent.

    The cells' extent at half maximum is ≈ 28 µm along z and ≈ 7 µm across: maxima 12 µm
    apart along z are one cell, while cells 24 µm apart across stay two. Exact at any
    chunking (the stretch is measured on whole-cell rows).
    """
    shape = (48, 96, 200)
    cells = [(48.0, 48.0, 16.0 + 24.0 * i, i in (1, 4)) for i in range(8)]
    image = _elongated_cells(shape, cells)
    config = SegmentConfig(nucleus_diameter_um=8.0)
    tables = []
    for chunks in [(48, 96, 200), (16, 40, 48)]:
        res = seg.segment_volume(
            da.from_array(image, chunks=chunks), voxel_size_um=VOXEL_UM, config=config
        )
        assert res.n == len(cells), res.table[["z_um", "y_um", "x_um", "peak_sd"]]
        found = res.table.sort_values("x_um")[["z_um", "y_um", "x_um"]].to_numpy()
        np.testing.assert_allclose(found, np.array(cells)[:, :3], atol=1.5)
        labels = res.labels.compute()
        assert len(np.unique(labels[labels > 0])) == len(cells)
        tables.append(res.table.drop(columns="label"))
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=False, rtol=1e-5)
    # without the join the bumpy cells are two each: the test has teeth
    from lightsheet.segment import local

    monkeypatch.setattr(local, "_same_cells", lambda *args: None)
    split = seg.segment_volume(
        da.from_array(image, chunks=(16, 40, 48)), voxel_size_um=VOXEL_UM, config=config
    )
    assert split.n == len(cells) + sum(c[3] for c in cells), split.n


def test_segment_volume_size_filter_and_absolute_threshold():
    shape = (16, 48, 48)
    image = _nuclei_image(shape, [(16.0, 24.0, 24.0)], seed=1)
    image[2, 5, 5] = 5000.0  # one hot voxel: far below the minimum volume
    config = SegmentConfig(method="absolute", threshold=500.0, watershed=False)
    res = seg.segment_volume(
        da.from_array(image, chunks=(8, 24, 24)), voxel_size_um=VOXEL_UM, config=config
    )
    assert res.threshold == 500.0
    assert res.n == 1
    assert res.labels.compute()[2, 5, 5] == 0
    assert seg.default_volume_range_um3(DIAMETER_UM)[0] < res.table["volume_um3"][0]


@pytest.mark.parametrize("method", ["local", "otsu"])
def test_segment_volume_empty_volume(method):
    res = seg.segment_volume(
        da.zeros((8, 16, 16), dtype=np.uint16, chunks=8),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(method=method),
    )
    assert res.n == 0 and len(res.table) == 0 and res.count_map.sum() == 0
    assert not res.labels.any().compute()


@pytest.mark.parametrize(
    ("voxel_um", "told"),
    [((2.0, 1.0, 1.0), ""), ((10.0, 1.0, 1.0), "planes deep"), ((2.0, 5.0, 5.0), "pixels across")],
)
def test_segment_volume_tells_when_cells_are_undersampled(voxel_um, told):
    """Cells under two pixels across or under one plane deep are named in a warning."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg.segment_volume(
            da.zeros((8, 16, 16), dtype=np.uint16, chunks=8),
            voxel_size_um=voxel_um,
            config=SegmentConfig(nucleus_diameter_um=9.0),
        )
    said = [str(w.message) for w in caught if issubclass(w.category, UndersampledCellWarning)]
    assert len(said) == bool(told) and all(told in m and "voxel_size_um" in m for m in said)


@pytest.mark.parametrize(("quantum", "kept"), [(None, True), (1.0, False)])
def test_a_level_under_one_recorded_step_counts_one_step(quantum, kept):
    """The artefact test's contrasts: a candidate 20 units above a nuclei-channel level of
    0.1 a voxel (10 voxels), and 75 above an autofluorescence level of 5. Over the levels as
    measured its contrasts are 20 and 1.5, and it is kept as a cell; a level above the dark
    one is known only to the step the values were recorded in, and with that floor the
    contrasts are 2 and 1.5: as bright in both channels, an artefact, dropped."""
    from lightsheet.segment.local import _finish_table

    raw = pd.DataFrame(
        {"label": [1], "volume_um3": [10.0], "sum_E": [20.0], "sum_B": [1.0],
         "sum_bg_raw": [600.0], "sum_bg_E": [75.0], "sum_bg_B": [50.0]}
    )  # fmt: skip
    t = _finish_table(raw, np.r_[-np.inf, 12.0], (1.0, 1.0, 1.0), (1.0, 100.0), True, 0.5, quantum)
    assert len(t) == kept
    if kept:
        np.testing.assert_allclose(t[["contrast", "background_contrast"]], [[20.0, 1.5]])


def test_segment_volume_config_errors():
    img = da.zeros((8, 16, 16), dtype=np.uint16, chunks=8)
    # the config refuses bad combinations when it is made (so the API refuses a run)
    with pytest.raises(ValueError, match="needs segment.threshold"):
        SegmentConfig(method="absolute")
    with pytest.raises(ValueError, match="min_volume_um3"):
        SegmentConfig(min_volume_um3=100.0, max_volume_um3=10.0)
    with pytest.raises(ValueError, match="min_volume_um3"):
        SegmentConfig(nucleus_diameter_um=4.0, min_volume_um3=1000.0)  # above 8 × the sphere
    with pytest.raises(ValueError, match="background_channel"):
        SegmentConfig(channel=1, background_channel=1)
    with pytest.raises(SegmentError, match="voxel_size_um"):
        seg.segment_volume(img, voxel_size_um=(1.0, 0.0, 1.0))
    for offset in (-1.0, float("nan"), float("inf"), "100", True):
        with pytest.raises(SegmentError, match=r"camera_offset: got .*reading with no light"):
            seg.segment_volume(img, voxel_size_um=(1.0, 1.0, 1.0), camera_offset=offset)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_label_on_cupy_blocks_equals_numpy():
    import cupy

    rng = np.random.default_rng(0)
    volume = rng.random((20, 30, 40)) < 0.3
    ref, n_ref = ndi.label(volume)
    labels, n = seg.label(da.from_array(cupy.asarray(volume), chunks=(7, 11, 13)))
    assert n == n_ref
    assert same_partition(cupy.asnumpy(labels.compute()), ref)


# ----------------------------------------------------------------------------- sample


def _match(found: np.ndarray, true: np.ndarray, radius_um: np.ndarray) -> int:
    """One-to-one matches of centroids within half a nucleus diameter (optimal assignment)."""
    from scipy.optimize import linear_sum_assignment

    dist = np.linalg.norm(found[:, None, :] - true[None, :, :], axis=2)
    cost = np.where(dist <= radius_um[None, :], dist, 1e9)
    rows, cols = linear_sum_assignment(cost)
    return int((cost[rows, cols] < 1e9).sum())


@pytest.mark.slow
def test_small_sample_detection_f1_and_count(small_sample):
    """The whole chain on the `small` sample: stitch → deconvolve → segment vs the truth."""
    import json

    from lightsheet.deconvolve import deconvolve
    from lightsheet.ingest import discover
    from lightsheet.psf import load_psf
    from lightsheet.stitch import stitch

    info = json.loads((small_sample / "sample.json").read_text())
    voxel_um = tuple(info["voxel_size_um"])
    manifest = discover(str(small_sample / info["input"]), info["pattern"])
    raw = stitch(manifest, voxel_size_um=voxel_um)[0, info["nuclei_channel"]]
    image = deconvolve(raw, load_psf(small_sample / "psf.tif"), iterations=10).persist()
    res = seg.segment_volume(image, voxel_size_um=voxel_um, config=SegmentConfig())

    truth = pd.read_csv(small_sample / "truth" / "cells.csv")
    truth = truth[truth["t"] == 0]
    true = truth[["z_um", "y_um", "x_um"]].to_numpy()
    found = res.table[["z_um", "y_um", "x_um"]].to_numpy()
    tp = _match(found, true, truth["diameter_um"].to_numpy() / 2)
    precision, recall = tp / len(found), tp / len(true)
    f1 = 2 * precision * recall / (precision + recall)
    # measured through the pipeline (seed 0): 1442 found of 1466, F1 0.989 (P 0.997, R 0.981)
    assert f1 >= 0.95, (f1, precision, recall)
    assert abs(len(found) - len(true)) <= 0.03 * len(true), (len(found), len(true))
    assert res.count_map.sum() == len(res.table)


# ----------------------------------------------------------------------------- model path


def _toy_features(image: np.ndarray) -> np.ndarray:
    """Three smoothings and a gradient magnitude: stand-ins for UNet features."""
    img = image.astype(np.float32)
    return np.stack(
        [
            img,
            ndi.gaussian_filter(img, (0.5, 1.0, 1.0)),
            ndi.gaussian_filter(img, (1.0, 2.0, 2.0)),
            ndi.gaussian_gradient_magnitude(img, (0.5, 1.0, 1.0)),
        ]
    )


def test_pixel_classifier_from_sparse_labels_segments_cells():
    shape = (24, 64, 64)
    centres = np.array([(16.0, 16.0, 24.0), (32.0, 48.0, 40.0), (12.0, 40.0, 50.0)])
    image = _nuclei_image(shape, centres, seed=2)
    truth = spheres(shape, centres, 4.0) > 0
    # sparse user labels: two z-slices only, nucleus (2) and background (1)
    sparse = np.zeros(shape, np.uint8)
    for z in (8, 16):
        sparse[z] = np.where(truth[z], 2, 1)
    feats = da.from_array(_toy_features(image), chunks=(2, 12, 32, 32))
    clf = seg.train_pixel_classifier(feats, sparse)
    prob = seg.classify(feats, clf)
    assert prob.shape == shape and prob.dtype == np.float32
    mask = prob.compute() > 0.5
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.6
    assert seg.PixelClassifier.from_dict(clf.to_dict()).predict(feats[:, :2].compute()).shape == (
        2,
        64,
        64,
    )
    res = seg.segment_volume(
        da.from_array(image, chunks=(12, 32, 32)),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(method="model"),
        features=feats,
        classifier=clf,
    )
    assert res.n == 3 and res.threshold == 0.5


def test_model_path_with_probability_and_errors():
    shape = (16, 32, 32)
    truth = spheres(shape, [(16.0, 16.0, 16.0)], 4.5) > 0
    prob = da.from_array(truth.astype(np.float32) * 0.9, chunks=8)
    image = da.from_array(truth.astype(np.float32), chunks=8)
    res = seg.segment_volume(
        image, voxel_size_um=VOXEL_UM, config=SegmentConfig(method="model"), features=prob
    )
    assert res.n == 1
    with pytest.raises(SegmentError, match="features"):
        seg.segment_volume(image, voxel_size_um=VOXEL_UM, config=SegmentConfig(method="model"))
    with pytest.raises(SegmentError, match="classifier"):
        seg.segment_volume(
            image,
            voxel_size_um=VOXEL_UM,
            config=SegmentConfig(method="model"),
            features=da.zeros((3, *shape), chunks=8),
        )
    with pytest.raises(SegmentError, match="both"):
        seg.train_pixel_classifier(da.zeros((2, *shape), chunks=8), np.ones(shape, np.uint8))
