"""The generated sample: layout, image content against the truth, truth tables, determinism."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from lightsheet.beads import distil_psf
from lightsheet.config import DEFAULT_PATTERN, load_config
from lightsheet.errors import OutputExistsError, SampleError
from lightsheet.io.tiff import inspect_tiff
from lightsheet.psf import FWHM_PER_SIGMA, load_psf, psf_from_optics, psf_sigma_um, write_psf
from lightsheet.sample import (
    BLEACH_PER_TIMEPOINT,
    CAMERA,
    CELL_COLUMNS,
    DENSITY_COLUMNS,
    OPTICS,
    REGIONS,
    SIZES,
    VOXEL_SIZE_UM,
    BrainGeometry,
    atlas_shape,
    build_phantom,
    camera,
    generate,
    sample_cells,
    structures_json,
    truth_region_table,
)

SEED = 3
# a nucleus centre must exceed the local background by this many shot-noise sigmas
CENTRE_SIGMAS = 5.0
# ... and by this factor (photons above the camera offset); nuclei reach 3.6–25×
CENTRE_CONTRAST = 2.5
# fraction of truth nuclei that must stand out (dim ones touching brighter ones may not)
MIN_FOUND = 0.9
# fraction of positions 25 µm off a nucleus that may still look like one (neighbours)
MAX_FOUND_OFF = 0.2
TILE_RE = re.compile(
    r"^ex6-2_CamA_ch(?P<c>\d)_CAM1_stack0000_(?P<wl>\d+)nm_(?P<ms>\d{7})msec_\d{10}msecAbs_"
    r"(?P<x>\d{3})x_(?P<y>\d{3})y_(?P<z>\d{3})z_(?P<t>\d{4})t\.tif$"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "tiny"
    calls = []
    info = generate(out, size="tiny", seed=SEED, progress=lambda *a: calls.append(a))
    return out, info, calls


def read_tiles(folder):
    """{(t, c, z, y, x): array} from the file names."""
    tiles = {}
    for p in sorted((folder / "tiles").iterdir()):
        m = TILE_RE.match(p.name)
        assert m, p.name
        key = tuple(int(m[k]) for k in ("t", "c", "z", "y", "x"))
        tiles[key] = tifffile.imread(p)
    return tiles


def stitched(tiles, t, c):
    nz, ny, nx = (max(k[i] for k in tiles) + 1 for i in (2, 3, 4))
    return np.block(
        [[[tiles[(t, c, z, y, x)] for x in range(nx)] for y in range(ny)] for z in range(nz)]
    )


def standing_out(volume, positions_um, voxel_size_um):
    """Per position: does the mean of its 1×3×3 centre stand out of the local median?"""
    vox = np.asarray(voxel_size_um)
    win = np.ceil(np.array([12.0, 12.0, 12.0]) / vox).astype(int)
    offset = CAMERA["offset_adu"]
    out = []
    for p in positions_um:
        i = np.clip(np.rint(p / vox).astype(int), 0, np.asarray(volume.shape) - 1)
        lo, hi = np.maximum(i - win, 0), np.minimum(i + win + 1, volume.shape)
        local = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(float)
        # the window is mostly background at these densities: its median is the background
        background = max(np.median(local) - offset, 1.0)
        centre = volume[i[0], i[1] - 1 : i[1] + 2, i[2] - 1 : i[2] + 2].astype(float).mean()
        sigma = np.sqrt(background / 9 + CAMERA["read_noise_e"] ** 2 / 9)
        signal = centre - offset
        out.append(
            signal > background + CENTRE_SIGMAS * sigma and signal > CENTRE_CONTRAST * background
        )
    return np.array(out)


# -- layout ---------------------------------------------------------------------------------


def test_layout_names_and_progress(tiny):
    out, info, calls = tiny
    assert sorted(p.name for p in out.iterdir()) == [
        "atlas",
        "beads.tif",
        "config.yaml",
        "psf.tif",
        "sample.json",
        "tiles",
        "truth",
    ]
    assert {p.name for p in (out / "atlas").iterdir()} >= {
        "metadata.json",
        "structures.json",
        "annotation.tiff",
        "hemispheres.tiff",
    }
    assert json.loads((out / "sample.json").read_text()) == info
    names = sorted(p.name for p in (out / "tiles").iterdir())
    t, c, *_ = info["shape"]
    assert len(names) == t * c * np.prod(info["tile_grid"]) == info["n_tiles"]
    rx = re.compile(DEFAULT_PATTERN)
    wavelengths = {ch["index"]: ch["wavelength_nm"] for ch in info["channels"]}
    seen = set()
    for name in names:
        m, d = TILE_RE.match(name), rx.search(name)
        assert m and d, name
        assert int(m["wl"]) == wavelengths[int(m["c"])]
        key = tuple(int(d[k]) for k in ("t", "c", "z", "y", "x"))
        assert key == tuple(int(m[k]) for k in ("t", "c", "z", "y", "x"))
        seen.add(key)
    assert len(seen) == len(names)
    assert [c[:2] for c in calls] == [(i + 1, len(names)) for i in range(len(names))]
    assert {c[2] for c in calls} == set(names)
    assert info["raw_bytes"] == 2 * np.prod(info["shape"])
    assert info["bytes_written"] == sum(p.stat().st_size for p in (out / "tiles").iterdir())
    assert info["raw_bytes"] < info["bytes_written"] < 1.01 * info["raw_bytes"]  # uncompressed


def test_tiles_uniform_and_ingest_accepts_them(tiny):
    out, info, _ = tiny
    tiles = read_tiles(out)
    assert {a.shape for a in tiles.values()} == {tuple(info["tile_shape"])}
    assert {a.dtype for a in tiles.values()} == {np.dtype(np.uint16)}
    from lightsheet.ingest import discover

    manifest = discover(str(out / "tiles" / "*.tif"), DEFAULT_PATTERN)
    assert manifest.grid_shape == (info["shape"][0], info["shape"][1], *info["tile_grid"])
    assert list(manifest.shape) == info["shape"]


def test_config_validates(tiny):
    out, info, _ = tiny
    cfg = load_config(out / "config.yaml")
    assert cfg.output == out.resolve() / "output"
    assert cfg.psf.is_file() and (cfg.atlas / "annotation.tiff").is_file()
    assert cfg.voxel_size_um == VOXEL_SIZE_UM
    assert cfg.pattern == DEFAULT_PATTERN
    import glob

    assert len(glob.glob(cfg.input)) == info["n_tiles"]
    assert cfg.segment.channel == info["nuclei_channel"] == 0
    # what the generated camera reads with no light: Richardson–Lucy's background
    assert cfg.camera_offset == info["camera"]["offset_adu"] == CAMERA["offset_adu"]


def test_psf_is_the_light_sheet_one(tiny):
    out, info, _ = tiny
    psf = load_psf(out / "psf.tif")
    expected = psf_from_optics(voxel_size_um=VOXEL_SIZE_UM, **OPTICS)
    np.testing.assert_allclose(psf, expected, rtol=1e-5, atol=1e-8)
    assert list(psf.shape) == info["psf"]["shape"]
    assert 0.15 <= OPTICS["na"] <= 0.25
    # axial blur wider than lateral (in µm), lateral blur at least a voxel wide
    sd = [
        np.sqrt(
            (
                psf.sum(axis=tuple(j for j in range(3) if j != i)) * (np.arange(n) - n // 2) ** 2
            ).sum()
        )
        * v
        for i, (n, v) in enumerate(zip(psf.shape, VOXEL_SIZE_UM, strict=True))
    ]
    assert sd[0] > 2.5 * sd[1]
    assert sd[1] * FWHM_PER_SIGMA > VOXEL_SIZE_UM[1]


def _measured_from_beads(out, info, tmp_path):
    """The sample's bead stack distilled (`lightsheet psf --beads`), at the image's voxels."""
    stack = inspect_tiff(out / "beads.tif")
    assert stack.voxel_size_um == pytest.approx(info["beads"]["voxel_size_um"])
    result = distil_psf(tifffile.imread(out / "beads.tif"))
    path = write_psf(tmp_path / "measured.tif", result.psf, stack.voxel_size_um)
    return result, load_psf(path, info["voxel_size_um"])


def test_the_bead_stack_gives_the_tiles_psf(tiny, tmp_path):
    """What a user with no PSF does: image beads, distil them, run with that. The stack is
    at half the tiles' z step; measured and resampled, its PSF is the tiles' within 4 %, and
    the clumps of two beads are the ones the measurement leaves out."""
    out, info, _ = tiny
    beads = info["beads"]
    assert beads["voxel_size_um"] == [VOXEL_SIZE_UM[0] / 2, *VOXEL_SIZE_UM[1:]]
    result, measured = _measured_from_beads(out, info, tmp_path)
    table = result.beads
    assert len(table) == beads["n_beads"] >= 30  # of N_BEADS = 40: as many as find room
    assert (table["reason"] == "clump").sum() == beads["n_clumps"] > 0
    assert table["used"].sum() == beads["n_beads"] - beads["n_clumps"]
    truth = load_psf(out / "psf.tif")
    np.testing.assert_allclose(
        psf_sigma_um(measured, VOXEL_SIZE_UM), psf_sigma_um(truth, VOXEL_SIZE_UM), rtol=0.04
    )
    np.testing.assert_allclose(
        np.array(psf_sigma_um(truth, VOXEL_SIZE_UM)) * FWHM_PER_SIGMA, beads["fwhm_um"], rtol=0.02
    )


# -- the image matches the truth ------------------------------------------------------------


def test_nuclei_at_truth_positions(tiny):
    out, info, _ = tiny
    tiles = read_tiles(out)
    cells = pd.read_csv(out / "truth" / "cells.csv")
    assert list(cells.columns) == list(CELL_COLUMNS)
    pos = cells[["z_um", "y_um", "x_um"]].to_numpy()
    ch0, ch1 = stitched(tiles, 0, 0), stitched(tiles, 0, 1)
    assert list(ch0.shape) == info["shape"][2:]
    assert len(cells) >= 40
    found = standing_out(ch0, pos, VOXEL_SIZE_UM)
    assert found.mean() >= MIN_FOUND, found.mean()
    # off the nuclei (25 µm along x) the same test rarely fires
    off = standing_out(ch0, pos + [0.0, 0.0, 25.0], VOXEL_SIZE_UM)
    assert off.mean() <= MAX_FOUND_OFF, off.mean()
    # the autofluorescence channel has no nuclei
    assert standing_out(ch1, pos, VOXEL_SIZE_UM).mean() <= MAX_FOUND_OFF
    # brighter inside the brain than outside, in both channels
    ann = tifffile.imread(out / "atlas" / "annotation.tiff")
    res = info["atlas"]["resolution_um"][0]
    idx = [
        np.clip(np.floor(np.arange(n) * v / res).astype(int), 0, a - 1)
        for n, v, a in zip(ch0.shape, VOXEL_SIZE_UM, ann.shape, strict=True)
    ]
    inside = ann[np.ix_(*idx)] > 0
    for vol in (ch0, ch1):
        assert np.median(vol[inside]) > np.median(vol[~inside]) + 10


def test_another_voxel_size_images_the_same_brain(tiny, tmp_path):
    """Coarser pixels and z steps: the brain, atlas and optics keep their size in µm, the
    nuclei stand out where the truth puts them, and a pixel collects its area's light."""
    vox = (4.0, 2.0, 2.0)
    out = tmp_path / "coarse"
    info = generate(out, size="tiny", seed=SEED, voxel_size_um=vox)
    default_out, default_info, _ = tiny
    assert info["voxel_size_um"] == list(vox)
    assert load_config(out / "config.yaml").voxel_size_um == vox
    assert info["shape"][2:] == [24, 96, 96]  # tiny's 96 × 192 × 192 µm
    assert info["atlas"] == default_info["atlas"]  # same resolution and shape
    np.testing.assert_allclose(
        load_psf(out / "psf.tif"), psf_from_optics(voxel_size_um=vox, **OPTICS), rtol=1e-5
    )
    brain = [
        pd.read_csv(o / "truth" / "density.csv").set_index("acronym").loc["root"]
        for o in (out, default_out)
    ]
    assert brain[0]["total_volume_mm3"] == pytest.approx(brain[1]["total_volume_mm3"], rel=0.02)
    cells = pd.read_csv(out / "truth" / "cells.csv")
    ch0, ch1 = (stitched(read_tiles(out), 0, c) for c in (0, 1))
    assert standing_out(ch0, cells[["z_um", "y_um", "x_um"]].to_numpy(), vox).mean() >= MIN_FOUND
    # autofluorescence photons per pixel: 4 × the default's (pixels of 2 × 2 against 1 × 1 µm)
    light = [
        np.median(stitched(read_tiles(o), 0, 1)) - CAMERA["offset_adu"] for o in (out, default_out)
    ]
    assert light[0] / light[1] == pytest.approx(4.0, rel=0.1)
    assert ch1.shape == ch0.shape


def test_a_thicker_sheet_blurs_the_nuclei_longer_along_z(tmp_path):
    """``sheet_fwhm_um``: the PSF is the optics' with that sheet, and what the tiles show."""
    out = tmp_path / "thick"
    info = generate(out, size="tiny", seed=SEED, channels=1, sheet_fwhm_um=20.0)
    optics = {**OPTICS, "sheet_fwhm_um": 20.0}
    assert info["psf"] == {"path": "psf.tif", "shape": info["psf"]["shape"], **optics}
    psf = load_psf(out / "psf.tif")
    np.testing.assert_allclose(psf, psf_from_optics(voxel_size_um=VOXEL_SIZE_UM, **optics))
    # its beads too: stepped more coarsely than half the tiles' z step (it would take more
    # than MAX_PLANES), they still give that PSF
    assert info["beads"]["voxel_size_um"][0] > VOXEL_SIZE_UM[0] / 2
    _, measured = _measured_from_beads(out, info, tmp_path)
    np.testing.assert_allclose(
        psf_sigma_um(measured, VOXEL_SIZE_UM), psf_sigma_um(psf, VOXEL_SIZE_UM), rtol=0.04
    )
    # the image is the phantom blurred by that PSF: its nuclei reach further along z
    thin = build_phantom("tiny", seed=SEED, channels=1)
    thick = build_phantom("tiny", seed=SEED, channels=1, sheet_fwhm_um=20.0)
    pd.testing.assert_frame_equal(thin.cells, thick.cells)
    z, y, x = np.rint(thin.cells[["z_um", "y_um", "x_um"]].to_numpy()[0] / VOXEL_SIZE_UM).astype(
        int
    )
    box = (z - 8, y, x), (z + 9, y + 1, x + 1)
    profiles = [ph.expected(*box, channel=0)[:, 0, 0] for ph in (thin, thick)]
    widths = [(p > p.min() + (p.max() - p.min()) / 2).sum() for p in profiles]
    assert widths[1] > widths[0], widths
    with pytest.raises(SampleError, match="sheet_fwhm_um: got -1"):
        build_phantom("tiny", sheet_fwhm_um=-1)


def test_tiles_join_seamlessly():
    ph = build_phantom("tiny", seed=SEED, channels=1)
    shape, tshape, grid = ph.preset.shape_zyx, ph.preset.tile_shape_zyx, ph.preset.tile_grid_zyx
    whole = ph.expected((0, 0, 0), shape, channel=0)
    blocks = {}
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                lo = (z * tshape[0], y * tshape[1], x * tshape[2])
                hi = tuple(a + b for a, b in zip(lo, tshape, strict=True))
                blocks[(z, y, x)] = ph.expected(lo, hi, channel=0)
    tiled = np.block(
        [
            [[blocks[(z, y, x)] for x in range(grid[2])] for y in range(grid[1])]
            for z in range(grid[0])
        ]
    )
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-2)
    assert whole.max() > 5 * np.median(whole)  # nuclei are there


def test_camera_noise_statistics():
    rng = np.random.default_rng(0)
    for lam in (3.0, 40.0, 400.0):
        adu = camera(np.full((4, 100, 100), lam, np.float32), rng=rng).astype(float)
        signal = adu - CAMERA["offset_adu"]
        var = lam + CAMERA["read_noise_e"] ** 2
        assert abs(signal.mean() - lam) < 4 * np.sqrt(var / signal.size)
        assert abs(signal.var() / var - 1) < 0.05
    assert camera(np.full((1, 2, 2), 1e6, np.float32), rng=rng).max() == 65535


# -- the truth ------------------------------------------------------------------------------


def test_truth_ids_equal_atlas_lookup(tiny):
    out, info, _ = tiny
    cells = pd.read_csv(out / "truth" / "cells.csv")
    ann = tifffile.imread(out / "atlas" / "annotation.tiff")
    hemi = tifffile.imread(out / "atlas" / "hemispheres.tiff")
    meta = json.loads((out / "atlas" / "metadata.json").read_text())
    assert ann.dtype == np.uint32 and hemi.dtype == np.uint8
    assert meta["orientation"] == "asr" and meta["shape"] == list(ann.shape)
    res = np.array(meta["resolution"])
    assert np.all(res >= 4 * min(VOXEL_SIZE_UM))
    # the atlas covers the image: the far image edge is in the last atlas voxel, which
    # spans [(A - 1) R, A R) (BrainGlobe)
    extent = (np.array(info["shape"][2:]) - 0.5) * VOXEL_SIZE_UM
    assert np.all(np.array(ann.shape) * res >= extent)
    assert np.all((np.array(ann.shape) - 1) * res < extent)
    # BrainGlobe's lookup: int(position / resolution)
    idx = (cells[["z_um", "y_um", "x_um"]].to_numpy() / res).astype(int)
    assert np.all(idx >= 0) and np.all(idx < ann.shape)
    np.testing.assert_array_equal(ann[tuple(idx.T)], cells["structure_id"])
    np.testing.assert_array_equal(hemi[tuple(idx.T)], cells["hemisphere"])
    assert set(cells["hemisphere"]) == {1, 2}
    # hemispheres: 0 exactly outside the brain, left (1) on the high-x side ("asr")
    np.testing.assert_array_equal(hemi == 0, ann == 0)
    x = (np.arange(ann.shape[2]) + 0.5) * res[2]  # atlas voxel centres
    centre_x = (info["shape"][4] - 1) / 2 * VOXEL_SIZE_UM[2]
    for value, side in ((1, x >= centre_x), (2, x < centre_x)):
        assert np.all(np.isin(hemi[..., side], (0, value)))
    # every structure in structures.json, leaves all present in the annotation
    ids = {s["id"] for s in json.loads((out / "atlas" / "structures.json").read_text())}
    assert set(np.unique(ann)) - {0} <= ids
    assert {r.id for r in REGIONS if r.density_cells_per_mm3} <= set(np.unique(ann))


def test_atlas_opens_with_the_atlas_loader(tiny):
    atlas_io = pytest.importorskip("lightsheet.io.atlas")
    out, info, _ = tiny
    atlas = atlas_io.load_atlas(out / "atlas")
    assert atlas.orientation == "asr"
    assert list(atlas.shape) == info["atlas"]["shape"]
    assert atlas.hemispheres_from_file


def test_truth_density_rolls_up(tiny):
    out, _, _ = tiny
    table = pd.read_csv(out / "truth" / "density.csv")
    cells = pd.read_csv(out / "truth" / "cells.csv")
    assert list(table.columns) == list(DENSITY_COLUMNS)
    rows = table.set_index("structure_id")
    structures = structures_json()
    by_parent = {}
    for s in structures:
        if len(s["structure_id_path"]) > 1:
            by_parent.setdefault(s["structure_id_path"][-2], []).append(s["id"])
    owners = set(cells["structure_id"])
    assert 343 in owners and 343 in by_parent  # a parent that owns voxels and cells itself
    for parent, children in by_parent.items():
        mine = cells[cells["structure_id"] == parent]
        own = {
            "total_cells": len(mine),
            "left_cell_count": int((mine["hemisphere"] == 1).sum()),
            "right_cell_count": int((mine["hemisphere"] == 2).sum()),
        }
        for col, n in own.items():
            assert rows.loc[parent, col] == rows.loc[children, col].sum() + n
    assert rows.loc[997, "total_cells"] == len(cells)
    np.testing.assert_allclose(
        rows["left_volume_mm3"].iloc[:-2] + rows["right_volume_mm3"].iloc[:-2],
        rows["total_volume_mm3"].iloc[:-2],
    )
    # leaf densities are what the phantom asked for, and differ clearly
    for r in REGIONS:
        if r.density_cells_per_mm3 and r.id not in by_parent:
            row = rows.loc[r.id]
            tolerance = 0.5 / row["total_volume_mm3"] + 1e-6
            assert abs(row["total_cells_per_mm3"] - r.density_cells_per_mm3) <= tolerance
    dens = [r.density_cells_per_mm3 for r in REGIONS if r.density_cells_per_mm3]
    assert max(dens) / min(dens) >= 3
    assert rows.loc[0, "total_cells"] == 0 and rows.loc[-1, "total_cells"] == 0


def test_truth_region_table_by_hand():
    # 1×2×4 atlas, 1 mm voxels: root 1 (own voxel) > A 2 > B 3
    structures = [
        {"id": 1, "acronym": "R", "name": "root", "structure_id_path": [1]},
        {"id": 2, "acronym": "A", "name": "a", "structure_id_path": [1, 2]},
        {"id": 3, "acronym": "B", "name": "b", "structure_id_path": [1, 2, 3]},
    ]
    ann = np.array([[[0, 1, 2, 3], [3, 3, 2, 0]]])
    hemi = np.array([[[0, 2, 2, 2], [1, 1, 1, 0]]], dtype=np.uint8)
    cells = pd.DataFrame(
        {"structure_id": [3, 3, 3, 2, 1, 0, -1], "hemisphere": [2, 1, 1, 1, 2, 0, 0]}
    )
    t = truth_region_table(cells, ann, hemi, structures, 1000.0).set_index("structure_id")
    assert t.loc[3, ["left_cell_count", "right_cell_count", "total_cells"]].tolist() == [2, 1, 3]
    assert t.loc[3, ["left_volume_mm3", "right_volume_mm3", "total_volume_mm3"]].tolist() == [
        2.0,
        1.0,
        3.0,
    ]
    assert t.loc[2, "total_cells"] == 4 and t.loc[2, "total_volume_mm3"] == 5.0
    assert t.loc[1, "total_cells"] == 5 and t.loc[1, "total_volume_mm3"] == 6.0
    assert t.loc[1, "right_cells_per_mm3"] == pytest.approx(2 / 3)
    assert t.loc[0, "total_cells"] == 1 and t.loc[0, "total_volume_mm3"] == 2.0
    assert t.loc[-1, "total_cells"] == 1 and np.isnan(t.loc[-1, "total_cells_per_mm3"])
    assert t.loc[2, "parent_structure_id"] == 1 and t.loc[3, "depth"] == 2
    assert pd.isna(t.loc[1, "parent_structure_id"])


def test_small_has_enough_cells_in_every_leaf():
    # the small preset's truth without imaging it: atlas and cell draw only
    preset = SIZES["small"]
    res = preset.atlas_resolution_um(VOXEL_SIZE_UM)
    geometry = BrainGeometry.for_volume(preset.shape_zyx, VOXEL_SIZE_UM)
    ann, hemi = geometry.atlas(atlas_shape(preset.shape_zyx, VOXEL_SIZE_UM, res), res)
    cells = sample_cells(ann, hemi, res, rng=np.random.default_rng(0))
    counts = cells["structure_id"].value_counts()
    for r in REGIONS:
        if r.density_cells_per_mm3:
            assert counts.get(r.id, 0) >= 100, (r.acronym, counts.get(r.id, 0))
    # no two centres nearly coincide
    from scipy.spatial import cKDTree

    assert not cKDTree(cells[["z_um", "y_um", "x_um"]].to_numpy()).query_pairs(2.9)
    d = cells["diameter_um"]
    assert d.min() >= 6 and d.max() <= 12 and d.std() > 0.5


# -- determinism, overwrite, arguments ------------------------------------------------------


def test_same_seed_same_files_and_overwrite(tiny, tmp_path):
    out, info, _ = tiny
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "output").mkdir()
    (again / "output" / "keep.txt").write_text("pipeline results")
    info2 = generate(again, size="tiny", seed=SEED)  # overwrites the previous sample
    assert info2 == info
    assert (again / "output" / "keep.txt").read_text() == "pipeline results"
    first, second = read_tiles(out), read_tiles(again)
    assert first.keys() == second.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    for rel in ("truth/cells.csv", "truth/density.csv", "config.yaml", "atlas/structures.json"):
        assert (out / rel).read_text() == (again / rel).read_text()
    for rel in ("atlas/annotation.tiff", "atlas/hemispheres.tiff", "psf.tif"):
        np.testing.assert_array_equal(tifffile.imread(out / rel), tifffile.imread(again / rel))
    other = build_phantom("tiny", seed=SEED + 1, channels=1).cells
    assert not other[["z_um", "y_um", "x_um"]].equals(
        pd.read_csv(out / "truth" / "cells.csv")[["z_um", "y_um", "x_um"]]
    )


def test_timepoints_same_cells_fresh_noise(tmp_path):
    info = generate(tmp_path / "s", size="tiny", seed=SEED, channels=1, timepoints=2)
    assert info["shape"][:2] == [2, 1]
    cells = pd.read_csv(tmp_path / "s" / "truth" / "cells.csv")
    t0, t1 = (cells[cells["t"] == t].reset_index(drop=True) for t in (0, 1))
    pd.testing.assert_frame_equal(
        t0.drop(columns=["t", "intensity"]), t1.drop(columns=["t", "intensity"])
    )
    np.testing.assert_allclose(t1["intensity"], t0["intensity"] * BLEACH_PER_TIMEPOINT, atol=0.1)
    tiles = read_tiles(tmp_path / "s")
    a, b = stitched(tiles, 0, 0).astype(float), stitched(tiles, 1, 0).astype(float)
    assert not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8  # same scene
    # the truth density counts each cell once
    density = pd.read_csv(tmp_path / "s" / "truth" / "density.csv").set_index("structure_id")
    assert density.loc[997, "total_cells"] == len(t0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": "huge"}, "size: unknown sample size 'huge'.*tiny"),
        ({"channels": 0}, "channels: got 0"),
        ({"channels": 5}, "channels: got 5; expected an integer from 1 to 4"),
        ({"timepoints": 0}, "timepoints"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"voxel_size_um": (0, 1, 1)}, r"voxel_size_um: got \(0, 1, 1\); expected three positive"),
        ({"voxel_size_um": (2, 1)}, "voxel_size_um: got"),
        ({"sheet_fwhm_um": 0}, "sheet_fwhm_um: got 0; expected a positive thickness"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(SampleError, match=match):
        generate(tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()  # refused before writing anything


def test_refuses_unrelated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty and holds no sample.json"):
        generate(tmp_path, size="tiny")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "notes.txt"
    with pytest.raises(OutputExistsError, match="not a folder"):
        generate(a_file, size="tiny")
    # a sample folder with a stranger inside is refused too
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sample.json").write_text(json.dumps({"format": "lightsheet-sample"}))
    (fake / "tiles").mkdir()
    (fake / "tiles" / "holiday.jpg").write_text("x")
    with pytest.raises(OutputExistsError, match="holiday.jpg"):
        generate(fake, size="tiny")
    assert (fake / "tiles" / "holiday.jpg").exists()


def test_preset_arithmetic():
    assert SIZES["medium"].raw_bytes(channels=2, timepoints=1) >= 1e9
    assert SIZES["large"].raw_bytes(channels=2, timepoints=1) >= 8e9
    assert np.prod(SIZES["tiny"].shape_zyx) <= 48 * 192 * 192
    assert np.prod(SIZES["small"].shape_zyx) <= 128 * 512 * 512
    n_tiles = []
    for preset in SIZES.values():
        assert preset.tile_grid_zyx[1] >= 2 and preset.tile_grid_zyx[2] >= 2
        assert (
            tuple(t * g for t, g in zip(preset.tile_shape_zyx, preset.tile_grid_zyx, strict=True))
            == preset.shape_zyx
        )
        assert 4 <= preset.atlas_resolution_um(VOXEL_SIZE_UM) / VOXEL_SIZE_UM[1] <= 10
        n_tiles.append(np.prod(preset.tile_grid_zyx))
    assert n_tiles == sorted(n_tiles) and n_tiles[-1] > n_tiles[0]
    with pytest.raises(ValueError, match="must divide"):
        type(SIZES["tiny"])((10, 10, 10), (3, 1, 1), 4, "bad")
