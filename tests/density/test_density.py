"""Density stage: image → atlas mapping, region lookup, counting, hierarchy roll-up, plots."""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

from lightsheet.config import DensityConfig
from lightsheet.density import (
    TABLE_COLUMNS,
    AtlasTransform,
    assign_regions,
    image_to_atlas,
    lookup_points,
    region_table,
    region_voxel_counts,
)
from lightsheet.errors import AtlasCoverageWarning, AtlasError, ConfigError
from lightsheet.io.atlas import Atlas, load_atlas, write_atlas
from lightsheet.plots import plot_density_slice, plot_top_regions

# root ─┬─ grey ─┬─ CTX ─┬─ CTX1
#       │        │       └─ CTX2
#       │        └─ TH
#       └─ fib
STRUCTURES = [
    {"id": 997, "acronym": "root", "name": "root", "structure_id_path": [997]},
    {"id": 8, "acronym": "grey", "name": "Grey matter", "structure_id_path": [997, 8]},
    {"id": 10, "acronym": "CTX", "name": "Cortex", "structure_id_path": [997, 8, 10]},
    {"id": 101, "acronym": "CTX1", "name": "Cortex 1", "structure_id_path": [997, 8, 10, 101]},
    {"id": 102, "acronym": "CTX2", "name": "Cortex 2", "structure_id_path": [997, 8, 10, 102]},
    {"id": 11, "acronym": "TH", "name": "Thalamus", "structure_id_path": [997, 8, 11]},
    {"id": 20, "acronym": "fib", "name": "Fibre tracts", "structure_id_path": [997, 20]},
    {"id": 30, "acronym": "EMPTY", "name": "Not in the annotation", "structure_id_path": [997, 30]},
]
LABELS = np.array([0, 997, 8, 10, 101, 102, 11, 20], np.uint32)
ALL_ORIENTATIONS = sorted(
    "".join(letters)
    for perm in itertools.permutations(("ap", "si", "lr"))
    for letters in itertools.product(*perm)
)


def make_atlas(
    shape=(12, 10, 8),
    res=(20.0, 15.0, 10.0),
    orientation="asr",
    seed=0,
    chunks=(5, 4, 3),
    hemispheres=None,
):
    rng = np.random.default_rng(seed)
    ann = rng.choice(LABELS, size=shape, p=[0.2, 0.05, 0.05, 0.1, 0.2, 0.15, 0.15, 0.1])
    atlas = Atlas.from_arrays(
        ann,
        STRUCTURES,
        resolution_um=res,
        orientation=orientation,
        hemispheres=hemispheres,
        chunks=chunks,
    )
    return atlas, ann


def positions_um(shape, voxel_size_um):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return grid.reshape(-1, 3) * np.asarray(voxel_size_um), grid.reshape(-1, 3)


# -- mapping ------------------------------------------------------------------------------


def _pair(letter):
    return next(p for p in ("ap", "si", "lr") if letter in p)


def reorient_volume(volume, volume_orientation, target_orientation):
    """Independent reference: the volume's array as seen with target axis letters."""
    perm, flips = [], []
    for letter in target_orientation:
        pair = next(p for p in ("ap", "si", "lr") if letter in p)
        j = next(i for i, c in enumerate(volume_orientation) if c in pair)
        perm.append(j)
        flips.append(volume_orientation[j] != letter)
    out = np.transpose(volume, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out


@pytest.mark.parametrize("atlas_orientation", ["asr", "lip"])
def test_all_48_orientations_match_brainglobe_space(atlas_orientation):
    from brainglobe_space import AnatomicalSpace

    atlas, _ = make_atlas(orientation=atlas_orientation, res=(20.0, 15.0, 10.0))
    rng = np.random.default_rng(3)
    shape, vox = (37, 52, 41), np.array([3.0, 1.5, 2.5])
    pts_vox = rng.uniform(-2, 1, size=(500, 3)) + rng.uniform(0, 1, (500, 3)) * shape
    target = AnatomicalSpace(atlas_orientation, resolution=atlas.resolution_um)
    for orientation in ALL_ORIENTATIONS:
        source = AnatomicalSpace(orientation, shape=shape, resolution=tuple(vox))
        expected = source.map_points_to(target, pts_vox)  # atlas voxel coordinates
        t = image_to_atlas(atlas, image_shape=shape, voxel_size_um=vox, orientation=orientation)
        got = t.to_atlas_index(pts_vox * vox)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9, err_msg=orientation)


def test_all_48_orientations_round_trip():
    atlas, ann = make_atlas(orientation="asr")
    res = np.asarray(atlas.resolution_um)
    hemi = atlas.hemispheres.compute()
    for orientation in ALL_ORIENTATIONS:
        # the atlas volume as an image acquired with `orientation`: every voxel must map back
        image = reorient_volume(ann, "asr", orientation)
        image_hemi = reorient_volume(hemi, "asr", orientation)
        # each image axis has the voxel size of the atlas axis it comes from
        voxel_size = [
            res[next(k for k, c in enumerate("asr") if c in _pair(o))] for o in orientation
        ]
        t = image_to_atlas(
            atlas, image_shape=image.shape, voxel_size_um=voxel_size, orientation=orientation
        )
        # brainglobe-space mirrors about voxel edges (N·v − p): a voxel's BrainGlobe centre,
        # half a voxel up from its index, maps to the mirrored voxel's centre
        pts, idx = positions_um(image.shape, voxel_size)
        sid, hem = lookup_points(atlas, t.to_atlas_voxel(pts + 0.5 * np.asarray(voxel_size)))
        np.testing.assert_array_equal(sid, image[tuple(idx.T)], err_msg=orientation)
        np.testing.assert_array_equal(hem, image_hemi[tuple(idx.T)], err_msg=orientation)


def test_worked_example_and_inverse():
    atlas = Atlas.from_arrays(
        np.ones((60, 20, 30), np.uint32),
        STRUCTURES[:1],
        resolution_um=(10, 10, 10),
        orientation="asr",
    )
    t = image_to_atlas(
        atlas,
        image_shape=(50, 80, 100),
        voxel_size_um=(4, 2, 2),
        orientation="psr",
        offset_um=(100, 0, 0),
    )
    p = np.array([[40.0, 60.0, 100.0], [0.0, 0.0, 0.0], [196.0, 158.0, 198.0]])
    # z mirrors about the image's edges: 50·4 − z, then + 100 µm
    np.testing.assert_allclose(
        t.to_atlas_index(p), [[26.0, 6.0, 10.0], [30.0, 0.0, 0.0], [10.4, 15.8, 19.8]]
    )
    # BrainGlobe: voxel a spans [a·res, (a+1)·res), so 15.8 is in voxel 15
    np.testing.assert_array_equal(t.to_atlas_voxel(p), [[26, 6, 10], [30, 0, 0], [10, 15, 19]])
    np.testing.assert_allclose(t.to_image_um(t.to_atlas_index(p)), p, atol=1e-9)


def test_offset_sub_volume():
    atlas, ann = make_atlas(shape=(20, 16, 12))
    res = np.asarray(atlas.resolution_um)
    start = np.array([7, 5, 3])
    sub = ann[7:15, 5:14, 3:10]
    t = image_to_atlas(atlas, image_shape=sub.shape, voxel_size_um=res, offset_um=start * res)
    pts, idx = positions_um(sub.shape, res)
    sid, _ = lookup_points(atlas, t.to_atlas_voxel(pts))
    np.testing.assert_array_equal(sid, sub[tuple(idx.T)])


def test_affine_rotation():
    # the image is the atlas rotated by 90° in the (1, 2) plane: I[i, j, k] = A[i, k, n2-1-j]
    atlas, ann = make_atlas(shape=(6, 9, 7), res=(10.0, 10.0, 10.0))
    image = np.rot90(ann, k=1, axes=(1, 2))
    n2 = ann.shape[2]
    # image y index j ↦ atlas axis 2 voxel n2 - 1 - j: any shift in [(n2 - 1)·10, n2·10)
    affine = [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, (n2 - 0.5) * 10.0], [0, 0, 0, 1]]
    cfg = DensityConfig(orientation="asr", affine=affine)
    t = AtlasTransform.from_config(cfg, atlas, image_shape=image.shape, voxel_size_um=(10, 10, 10))
    pts, idx = positions_um(image.shape, (10, 10, 10))
    sid, _ = lookup_points(atlas, t.to_atlas_voxel(pts))
    np.testing.assert_array_equal(sid, image[tuple(idx.T)])


def test_scaling_voxel_to_atlas_resolution():
    # image voxels 4x finer than the atlas: a centre at p µm is in atlas voxel int(p / 8)
    atlas, ann = make_atlas(shape=(5, 6, 7), res=(8.0, 8.0, 8.0))
    t = image_to_atlas(atlas, image_shape=(22, 26, 28), voxel_size_um=(2, 2, 2))
    pts, idx = positions_um((22, 26, 28), (2, 2, 2))
    expect_vox = (idx * 2) // 8
    inside = np.all(expect_vox < ann.shape, axis=1)
    sid, _ = lookup_points(atlas, t.to_atlas_voxel(pts))
    np.testing.assert_array_equal(sid[inside], ann[tuple(expect_vox[inside].T)])
    assert (sid[~inside] == -1).all() and (~inside).any()


def test_no_overlap_is_an_error():
    atlas, _ = make_atlas()
    with pytest.raises(AtlasError, match="do not overlap"):
        image_to_atlas(
            atlas, image_shape=(10, 10, 10), voxel_size_um=(1, 1, 1), offset_um=(0, 0, 5000)
        )
    with pytest.raises(AtlasError, match="do not overlap"):
        image_to_atlas(
            atlas, image_shape=(10, 10, 10), voxel_size_um=(1, 1, 1), offset_um=(-100, 0, 0)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orientation": "abc"}, "density.orientation"),
        ({"orientation": "aas"}, "one from each pair"),
        ({"voxel_size_um": (1, 0, 1)}, "voxel_size_um must be three positive"),
        ({"image_shape": (10, 10)}, "image_shape must be three positive integers"),
        ({"offset_um": (0, float("nan"), 0)}, "offset_um must be three finite"),
        ({"affine": np.eye(3)}, "4x4"),
        ({"affine": np.diag([1, 1, 0, 1])}, "singular"),
        ({"affine": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]}, "last row"),
    ],
)
def test_bad_mapping_arguments(kwargs, message):
    atlas, _ = make_atlas()
    args = {"image_shape": (10, 10, 10), "voxel_size_um": (1, 1, 1)} | kwargs
    with pytest.raises(ConfigError, match=message):
        image_to_atlas(atlas, **args)


def test_config_rejects_bad_orientation_and_affine():
    with pytest.raises(ValueError, match="orientation"):
        DensityConfig(orientation="xyz")
    with pytest.raises(ValueError, match="4x4"):
        DensityConfig(affine=[[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="extra"):
        DensityConfig(orientaton="asr")


# -- lookup -------------------------------------------------------------------------------


def test_assign_regions_matches_numpy_and_reads_only_needed_chunks():
    atlas, ann = make_atlas(shape=(12, 10, 8), chunks=(5, 4, 3))
    hemi = atlas.hemispheres.compute()
    rng = np.random.default_rng(1)
    # cells inside, on the boundary and outside the atlas
    pts = rng.uniform(-40, 260, size=(500, 3)) * [1, 0.6, 0.4]
    cells = pd.DataFrame(pts, columns=["z_um", "y_um", "x_um"]).assign(label=np.arange(500))
    t = image_to_atlas(atlas, image_shape=(13, 11, 9), voxel_size_um=atlas.resolution_um)
    out = assign_regions(cells, atlas, t)
    assert list(out.columns) == [*cells.columns, "structure_id", "hemisphere"]
    assert out["structure_id"].dtype == np.int64 and out["hemisphere"].dtype == np.uint8
    vox = np.floor(pts / np.asarray(atlas.resolution_um)).astype(int)
    inside = np.all((vox >= 0) & (vox < ann.shape), axis=1)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(out["structure_id"][inside], ann[tuple(vox[inside].T)])
    np.testing.assert_array_equal(out["hemisphere"][inside], hemi[tuple(vox[inside].T)])
    assert (out["structure_id"][~inside] == -1).all() and (out["hemisphere"][~inside] == 0).all()
    pd.testing.assert_frame_equal(out[cells.columns], cells)

    # laziness: cells in one chunk read that chunk only
    read = []

    def record(block, block_id=None):
        read.append(block_id)
        return block

    spy = Atlas.from_arrays(
        da.from_array(ann, chunks=(5, 4, 3)).map_blocks(record, dtype=ann.dtype),
        STRUCTURES,
        resolution_um=atlas.resolution_um,
        orientation="asr",
    )
    few = pd.DataFrame({"z_um": [20.0, 40.0], "y_um": [15.0, 30.0], "x_um": [0.0, 12.0]})
    with dask.config.set(scheduler="synchronous"):
        got = assign_regions(few, spy, t)
    assert {b for b in read if isinstance(b, tuple)} == {(0, 0, 0)}  # others: meta inference
    np.testing.assert_array_equal(got["structure_id"], [ann[1, 1, 0], ann[2, 2, 1]])


def test_assign_regions_errors():
    atlas, _ = make_atlas()
    t = image_to_atlas(atlas, image_shape=(5, 5, 5), voxel_size_um=(1, 1, 1))
    with pytest.raises(ValueError, match="missing centroid columns"):
        assign_regions(pd.DataFrame({"z_um": [1.0]}), atlas, t)
    bad = pd.DataFrame({"z_um": [1.0, np.nan], "y_um": [1.0, 1.0], "x_um": [1.0, 1.0]})
    with pytest.raises(ValueError, match="NaN or infinite"):
        assign_regions(bad, atlas, t)
    other, _ = make_atlas(shape=(4, 4, 4))
    with pytest.raises(AtlasError, match="made for an atlas of shape"):
        assign_regions(bad.iloc[:1], other, t)
    empty = assign_regions(bad.iloc[:0], atlas, t)
    assert len(empty) == 0 and "structure_id" in empty


# -- counting -----------------------------------------------------------------------------


def brute_force_table(sid, hemi, ann, hemis, voxel_mm3, mask=None):
    """Reference: descendants by path membership, counted on the whole arrays."""
    mask = np.ones(ann.shape, bool) if mask is None else mask
    rows = {}
    for s in STRUCTURES:
        members = [t["id"] for t in STRUCTURES if s["id"] in t["structure_id_path"]]
        c = np.isin(sid, members)
        v = np.isin(ann, members) & mask
        rows[s["id"]] = {
            "left_cell_count": int((c & (hemi == 1)).sum()),
            "right_cell_count": int((c & (hemi == 2)).sum()),
            "total_cells": int(c.sum()),
            "left_volume_mm3": (v & (hemis == 1)).sum() * voxel_mm3,
            "right_volume_mm3": (v & (hemis == 2)).sum() * voxel_mm3,
            "total_volume_mm3": v.sum() * voxel_mm3,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def random_cells(atlas, ann, n, seed):
    rng = np.random.default_rng(seed)
    ext = np.asarray(ann.shape) * np.asarray(atlas.resolution_um)
    pts = rng.uniform(-0.1 * ext, 1.1 * ext, size=(n, 3))
    return pd.DataFrame(pts, columns=["z_um", "y_um", "x_um"])


@pytest.mark.parametrize("chunks", [(12, 10, 8), (5, 4, 3), (7, 10, 2)])
def test_region_table_matches_brute_force(chunks):
    atlas, ann = make_atlas(chunks=chunks)
    hemis = atlas.hemispheres.compute()
    t = image_to_atlas(atlas, image_shape=ann.shape, voxel_size_um=atlas.resolution_um)
    cells = assign_regions(random_cells(atlas, ann, 3000, seed=2), atlas, t)
    table = region_table(cells, atlas, outside_warning_fraction=1.0)
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["structure_id"].tolist() == [s["id"] for s in STRUCTURES] + [0, -1]
    sid, hemi = cells["structure_id"].to_numpy(), cells["hemisphere"].to_numpy()
    ref = brute_force_table(sid, hemi, ann, hemis, atlas.voxel_volume_mm3)
    got = table.set_index("structure_id").loc[ref.index, ref.columns]
    pd.testing.assert_frame_equal(got, ref, check_dtype=False, check_names=False)
    t_ = table.set_index("structure_id")
    assert t_.loc[-1, "total_cells"] == (sid == -1).sum() > 0
    assert t_.loc[0, "total_cells"] == (sid == 0).sum() > 0
    assert t_["total_cells"].loc[[-1, 0, 997]].sum() == len(cells)  # nothing dropped
    # densities: counts over volumes, NaN (never inf) where there is no volume
    with np.errstate(divide="ignore", invalid="ignore"):
        expect = t_["total_cells"] / t_["total_volume_mm3"].where(t_["total_volume_mm3"] > 0)
    np.testing.assert_allclose(t_["total_cells_per_mm3"], expect, rtol=1e-12)
    assert t_.loc[[-1, 30], "total_cells_per_mm3"].isna().all()
    assert np.isnan(t_.loc[-1, "total_volume_mm3"])
    assert t_.loc[0, "total_volume_mm3"] == pytest.approx((ann == 0).sum() * atlas.voxel_volume_mm3)
    assert t_.loc[0, "left_volume_mm3"] == 0  # the split hemispheres are 0 off the brain
    numbers = table.select_dtypes("number").to_numpy(dtype=float, na_value=np.nan)
    assert not np.isinf(numbers).any()
    assert t_.loc[997, "parent_structure_id"] is pd.NA and t_.loc[101, "parent_structure_id"] == 10
    assert t_.loc[101, "depth"] == 3 and t_.loc[997, "depth"] == 0 and t_.loc[0, "depth"] is pd.NA


def test_parent_is_sum_of_children_plus_own():
    atlas, ann = make_atlas(shape=(14, 12, 10), seed=5)
    t = image_to_atlas(atlas, image_shape=ann.shape, voxel_size_um=atlas.resolution_um)
    cells = assign_regions(random_cells(atlas, ann, 4000, seed=6), atlas, t)
    table = region_table(cells, atlas, outside_warning_fraction=1.0).set_index("structure_id")
    own_cells = cells.groupby("structure_id").size()
    own_vox = pd.Series(*np.unique(ann, return_counts=True)[::-1])
    regions = table[table.index > 0]
    for sid, row in regions.iterrows():
        children = regions[regions["parent_structure_id"] == sid]
        assert row["total_cells"] == children["total_cells"].sum() + own_cells.get(sid, 0)
        assert row["left_cell_count"] + row["right_cell_count"] <= row["total_cells"]
        assert row["total_volume_mm3"] == pytest.approx(
            children["total_volume_mm3"].sum() + own_vox.get(sid, 0) * atlas.voxel_volume_mm3
        )


def test_voxel_counts_whole_array_and_sub_volume():
    atlas, ann = make_atlas(shape=(16, 12, 10), chunks=(5, 5, 4), seed=3)
    hemis = atlas.hemispheres.compute()
    counts = region_voxel_counts(atlas)
    ids, n = np.unique(ann, return_counts=True)
    assert counts.index.tolist() == ids.tolist()
    np.testing.assert_array_equal(counts["total"], n)
    for h, col in ((0, "none"), (1, "left"), (2, "right")):
        np.testing.assert_array_equal(
            counts[col], [np.count_nonzero((ann == i) & (hemis == h)) for i in ids]
        )
    # only the imaged sub-volume (a flipped, offset image) counts with a transform
    res = np.asarray(atlas.resolution_um)
    t = image_to_atlas(
        atlas,
        image_shape=(6, 12, 5),
        voxel_size_um=res,
        orientation="psr",
        offset_um=(4 * res[0], 0, 2 * res[2]),
    )
    mask = np.zeros(ann.shape, bool)
    # atlas voxel a (centre (a + 0.5)·v) counts when its centre is imaged. The imaged box
    # is [-0.5, N - 0.5)·v; the flipped z axis mirrors about voxel edges (brainglobe-space,
    # 6·v − p), so z covers (0.5, 6.5]·v + 4·v: centres 5..10; y [-0.5, 11.5): 0..10;
    # x [-0.5, 4.5) + 2: 1..5
    mask[5:11, 0:11, 1:6] = True
    sub = region_voxel_counts(atlas, t)
    ids_sub, n_sub = np.unique(ann[mask], return_counts=True)
    assert sub.index.tolist() == ids_sub.tolist()
    np.testing.assert_array_equal(sub["total"], n_sub)
    cells = assign_regions(random_cells(atlas, ann, 500, seed=0), atlas, t)
    with pytest.warns(AtlasCoverageWarning):
        table = region_table(cells, atlas, transform=t).set_index("structure_id")
    ref = brute_force_table(
        cells["structure_id"].to_numpy(),
        cells["hemisphere"].to_numpy(),
        ann,
        hemis,
        atlas.voxel_volume_mm3,
        mask,
    )
    np.testing.assert_allclose(table.loc[ref.index, "total_volume_mm3"], ref["total_volume_mm3"])


def test_outside_warning():
    atlas, ann = make_atlas()
    t = image_to_atlas(atlas, image_shape=ann.shape, voxel_size_um=atlas.resolution_um)
    cells = pd.DataFrame({"z_um": [10.0] * 7 + [-500.0] * 3, "y_um": 10.0, "x_um": 10.0})
    cells = assign_regions(cells, atlas, t)
    assert (cells["structure_id"] == -1).sum() == 3
    with pytest.warns(AtlasCoverageWarning, match=r"3 outside the atlas volume"):
        table = region_table(cells, atlas, outside_warning_fraction=0.2)
    assert table.set_index("structure_id").loc[-1, "total_cells"] == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region_table(cells, atlas, outside_warning_fraction=0.5)


def test_unlisted_ids_are_errors(tmp_path):
    ann = np.zeros((4, 4, 4), np.uint32)
    ann[1:3, 1:3, 1:3] = 10
    ann[0, 0, 0] = 555
    write_atlas(
        tmp_path, ann, STRUCTURES, resolution_um=(10, 10, 10), orientation="asr", symmetric=True
    )
    atlas = load_atlas(tmp_path)
    cells = pd.DataFrame({"structure_id": [10], "hemisphere": [1]})
    with pytest.raises(
        AtlasError, match=r"annotation ids not in structures.json: 555 \(1 voxels\)"
    ):
        region_table(cells, atlas)
    with pytest.raises(AtlasError, match=r"structure ids \[777\]"):
        region_table(pd.DataFrame({"structure_id": [777], "hemisphere": [1]}), atlas)
    with pytest.raises(ValueError, match="expected the output of assign_regions"):
        region_table(pd.DataFrame({"z_um": [1.0]}), atlas)


def test_empty_cells_table():
    atlas, _ = make_atlas()
    table = region_table(pd.DataFrame({"structure_id": [], "hemisphere": []}), atlas)
    assert (table["total_cells"] == 0).all()
    assert (table.loc[table["structure_id"] > 0, "total_cells_per_mm3"].fillna(0) == 0).all()


def test_csv_round_trip(tmp_path):
    atlas, ann = make_atlas()
    t = image_to_atlas(atlas, image_shape=ann.shape, voxel_size_um=atlas.resolution_um)
    cells = assign_regions(random_cells(atlas, ann, 300, seed=9), atlas, t)
    table = region_table(cells, atlas, outside_warning_fraction=1.0)
    table.to_csv(tmp_path / "density.csv", index=False)
    text = (tmp_path / "density.csv").read_text()
    assert "inf" not in text
    back = pd.read_csv(tmp_path / "density.csv")
    assert list(back.columns) == list(TABLE_COLUMNS)
    assert back["parent_structure_id"].isna().sum() == 3  # outside, background, root


# -- plots --------------------------------------------------------------------------------


def test_plots(tmp_path):
    atlas, ann = make_atlas(shape=(20, 16, 18), res=(25.0, 25.0, 25.0), chunks=(8, 8, 8))
    t = image_to_atlas(atlas, image_shape=ann.shape, voxel_size_um=atlas.resolution_um)
    cells = assign_regions(random_cells(atlas, ann, 2000, seed=4), atlas, t)
    table = region_table(cells, atlas, outside_warning_fraction=1.0)
    bar = plot_top_regions(table, tmp_path / "top.png", n=5)
    sl = plot_density_slice(table, atlas, tmp_path / "slice.png")
    for p in (bar, sl):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    with pytest.raises(ValueError, match="index must be in"):
        plot_density_slice(table, atlas, tmp_path / "x.png", index=99)


# -- the generated sample's truth ---------------------------------------------------------


def check_sample_truth(sample_dir, tmp_path):
    """Truth cells through the density stage reproduce truth/density.csv."""
    import json

    from lightsheet.config import load_config

    info = json.loads((sample_dir / "sample.json").read_text())
    config = load_config(sample_dir / "config.yaml")
    atlas = load_atlas(sample_dir / "atlas")
    truth = pd.read_csv(sample_dir / "truth" / "cells.csv")
    truth = truth[truth["t"] == truth["t"].min()]
    t = AtlasTransform.from_config(
        config.density, atlas, image_shape=info["shape"][2:], voxel_size_um=info["voxel_size_um"]
    )
    cells = assign_regions(truth.drop(columns=["structure_id", "hemisphere"]), atlas, t)
    np.testing.assert_array_equal(cells["structure_id"], truth["structure_id"])
    np.testing.assert_array_equal(cells["hemisphere"], truth["hemisphere"])

    expected = pd.read_csv(sample_dir / "truth" / "density.csv")
    region_table(cells, atlas).to_csv(tmp_path / "density.csv", index=False)
    got = pd.read_csv(tmp_path / "density.csv")
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)

    # volumes within the imaged box: every brain region is imaged whole
    within = region_table(cells, atlas, transform=t)
    regions = within["structure_id"] > 0
    pd.testing.assert_frame_equal(
        within[regions].reset_index(drop=True),
        region_table(cells, atlas)[regions].reset_index(drop=True),
    )
    return got


def test_tiny_sample_truth_reproduced(tiny_sample, tmp_path):
    table = check_sample_truth(tiny_sample, tmp_path)
    assert table.loc[table["structure_id"] == 997, "total_cells"].item() > 0


@pytest.mark.slow
def test_small_sample_truth_reproduced(small_sample, tmp_path):
    table = check_sample_truth(small_sample, tmp_path)
    leaves = table[
        (table["structure_id"] > 0)
        & ~table["structure_id"].isin(table["parent_structure_id"].dropna())
    ]
    assert (leaves["total_cells"] >= 100).all()


@pytest.mark.parametrize("angle_deg", [0.0, 30.0])
def test_voxel_counts_within_rotated_image(angle_deg):
    atlas, ann = make_atlas(shape=(10, 14, 12), res=(10.0, 10.0, 10.0), chunks=(4, 6, 5), seed=8)
    a = np.deg2rad(angle_deg)
    # rotate about atlas axis 0 around the atlas centre, then shift: a tilted sub-volume
    c = np.array([0.0, 65.0, 55.0])
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = c - rot @ c + [20.0, 10.0, 5.0]
    t = image_to_atlas(atlas, image_shape=(5, 9, 8), voxel_size_um=(10, 10, 10), affine=affine)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in ann.shape], indexing="ij"), -1)
    # atlas voxel a's centre is at a + 0.5 (BrainGlobe's voxel spans [a, a + 1))
    img = t.to_image_um(grid.reshape(-1, 3) + 0.5).reshape(*ann.shape, 3)
    lo, hi = t.image_bounds_um()
    inside = np.all((img >= lo) & (img < hi), axis=-1)
    assert 0 < inside.sum() < inside.size
    ids, n = np.unique(ann[inside], return_counts=True)
    got = region_voxel_counts(atlas, t)
    assert got.index.tolist() == ids.tolist()
    np.testing.assert_array_equal(got["total"], n)


def test_bad_volume_values_are_errors():
    ann = np.full((4, 4, 4), 10, np.int32)
    hemi = np.ones((4, 4, 4), np.uint8)
    hemi[2, 2, 2] = 3
    atlas = Atlas.from_arrays(
        ann, STRUCTURES, resolution_um=(10, 10, 10), orientation="asr", hemispheres=hemi
    )
    cells = pd.DataFrame({"structure_id": [10], "hemisphere": [1]})
    with pytest.raises(AtlasError, match="hemispheres: value 3"):
        region_table(cells, atlas)
    ann[0, 0, 0] = -5
    atlas = Atlas.from_arrays(ann, STRUCTURES, resolution_um=(10, 10, 10), orientation="asr")
    with pytest.raises(AtlasError, match="negative structure id -5"):
        region_table(cells, atlas)
