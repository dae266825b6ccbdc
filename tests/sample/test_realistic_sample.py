"""The realistic sample (`lightsheet.sample.realistic`) and cells planted into a real
background (`lightsheet.sample.planted`): image content against the truth, and the default
detection scored against it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import tifffile
import yaml

from lightsheet.config import SegmentConfig, load_config
from lightsheet.errors import OutputExistsError, SampleError
from lightsheet.evaluate import match_points
from lightsheet.sample import CAMERA, CELL_COLUMNS, VOXEL_SIZE_UM, build_phantom, generate
from lightsheet.sample.realistic import (
    SHEET_FAR_SIDE,
    SOMA_DIAMETER_RANGE_UM,
    Structures,
    build_realistic_phantom,
    value_noise,
)
from tests.sample.test_sample import read_tiles, stitched

SEED = 5
CROP_CH1 = Path(__file__).parents[1] / "data" / "cellfinder-crop" / "ch1"
CROP_VOXEL_UM = (5.0, 2.0, 2.0)


@pytest.fixture(scope="module")
def somata(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic") / "somata"
    info = generate(out, size="tiny", seed=SEED, realistic=True, cells="somata")
    return out, info


@pytest.fixture(scope="module")
def slab():
    """Noise-free channels 0 (with and without somata) and 1 over a slab of the small
    size's middle planes: the whole brain's width, at the cost of a tile."""
    ph = build_realistic_phantom("small", seed=SEED, cells="somata")
    shape = ph.preset.shape_zyx
    lo, hi = (shape[0] // 2 - 2, 0, 0), (shape[0] // 2 + 2, *shape[1:])
    scene = ph._scene
    return ph, {
        "ch0": scene.expected(lo, hi, channel=0, nuclei=True),
        "ch0_tissue": scene.expected(lo, hi, channel=0, nuclei=False),
        "ch1": scene.expected(lo, hi, channel=1, nuclei=False),
        "inside": ph.geometry.brain_weight(
            *np.meshgrid(
                *(np.arange(a, b) * v for a, b, v in zip(lo, hi, VOXEL_SIZE_UM, strict=True)),
                indexing="ij",
            ),  # fmt: skip
            edge_um=1.0,
        ),
    }


def test_tissue_level_varies_several_fold_dark_outside(slab):
    _, im = slab
    inside, outside = im["inside"] > 0.99, im["inside"] < 0.01
    for ch in ("ch0_tissue", "ch1"):
        level = im[ch][inside]
        p5, p95 = np.percentile(level, [5, 95])
        assert p95 / p5 >= 3.0, (ch, p5, p95)  # several-fold across the brain
        # the outside is dark: a fraction of the dimmest tenth of the tissue
        assert np.median(im[ch][outside]) < 0.3 * np.percentile(level, 10), ch


def test_channels_share_the_anatomy(slab):
    """Texture, structures and illumination are the same in both channels: their logs
    correlate (the anatomy contrast differs per channel, the rest does not)."""
    _, im = slab
    inside = im["inside"] > 0.99
    r = np.corrcoef(np.log(im["ch0_tissue"][inside]), np.log(im["ch1"][inside]))[0, 1]
    assert r > 0.9, r


def test_bright_structures_in_both_channels(slab):
    """Vessels and debris raise both channels by about the same factor over the tissue."""
    ph, im = slab
    empty = Structures(*(np.zeros((0, 2, 3)), *[np.zeros(0)] * 2, np.zeros((0, 3)),
                         *[np.zeros(0)] * 2))  # fmt: skip
    bare = dataclasses.replace(ph, bright=empty)._scene
    shape = ph.preset.shape_zyx
    lo, hi = (shape[0] // 2 - 2, 0, 0), (shape[0] // 2 + 2, *shape[1:])
    ratios = [im[c] / bare.expected(lo, hi, channel=i, nuclei=False)
              for i, c in ((0, "ch0_tissue"), (1, "ch1"))]  # fmt: skip
    lit = ratios[1] > 1.5
    assert lit.sum() > 200, "the slab holds vessels or debris"
    # the same gain in both channels, up to the additive glow of the medium
    assert np.median(ratios[0][lit] / ratios[1][lit]) == pytest.approx(1.0, abs=0.1)
    assert ratios[0].max() > 2.5 and ratios[1].max() > 2.5


def test_sheet_decays_along_x_with_stripes(slab):
    ph, _ = slab
    scene = ph._scene
    extent = np.asarray(ph.preset.shape_zyx) * VOXEL_SIZE_UM
    coords = [np.arange(0.0, 20.0, 2.0), np.arange(0.0, extent[1], 1.0), np.array([0.0, extent[2]])]
    light = scene.illumination(coords)
    far_near = np.median(light[..., 1]) / np.median(light[..., 0])
    assert far_near == pytest.approx(SHEET_FAR_SIDE, rel=0.3)
    # stripes: strong variation across y over a few µm, constant along the sheet nearby
    across = np.abs(np.diff(np.log(light[..., 0]), axis=1))
    assert np.percentile(across, 90) > 0.03
    along = scene.illumination([coords[0], coords[1], np.array([100.0, 101.0])])
    assert np.abs(np.diff(np.log(along), axis=2)).max() < 0.01


def test_value_noise_is_smooth_bounded_and_box_independent():
    z, y, x = np.arange(0, 40.0, 2), np.arange(0, 300.0), np.arange(0, 10.0)
    v = value_noise((z, y, x), (10.0, 10.0, 10.0), key=1)
    assert np.abs(v).max() <= 1.0 and v.std() > 0.2
    # smoothstep: slope at most 1.5 × (lattice step of at most 2) / 10 µm
    assert np.abs(np.diff(v, axis=1)).max() <= 0.3 + 1e-6
    part = value_noise((z[3:7], y[101:250], x[2:]), (10.0, 10.0, 10.0), key=1)
    np.testing.assert_array_equal(part, v[3:7, 101:250, 2:])
    assert not np.array_equal(value_noise((z, y, x), (10.0,) * 3, key=2), v)


def test_tiles_join_seamlessly():
    """Any box renders alone (a PSF halo, nothing volume-sized): the tiles of a volume
    equal the volume rendered at once, so memory is that of a tile."""
    ph = build_realistic_phantom("tiny", seed=SEED, channels=1, cells="nuclei")
    shape, tshape = ph.preset.shape_zyx, ph.preset.tile_shape_zyx
    whole = ph.expected((0, 0, 0), shape, channel=0)
    for corner in ((0, 0, 0), (1, 0, 1), (1, 1, 1)):
        lo = np.multiply(corner, tshape)
        box = ph.expected(lo, lo + tshape, channel=0)
        sl = tuple(slice(a, a + t) for a, t in zip(lo, tshape, strict=True))
        np.testing.assert_allclose(box, whole[sl], rtol=1e-4, atol=1e-2)


def test_mosaic_tiles_each_lit_by_their_own_sheet(tmp_path):
    """Overlapping tiles of textured tissue: where two tiles share tissue, the left one
    sees it at its sheet's far side and the right one near its entry, as a microscope
    images one field after another (noise-free scenes: the ratio is the sheet's decay
    exactly). The files carry it too, and the config reads the autofluorescence channel."""
    from lightsheet.sample.overlap import generate_overlapping

    ph = build_realistic_phantom("tiny", seed=SEED, cells="somata")
    vox = np.asarray(VOXEL_SIZE_UM)
    side = 40  # voxels of a tile along x; the right tile starts at 30: 10 voxels shared
    left = ph.scene(sheet_um=(0.0, side * vox[2]))
    right = ph.scene(sheet_um=(30 * vox[2], side * vox[2]))
    lo, hi = (4, 20, 30), (8, 60, 40)
    a = left.expected(lo, hi, channel=1, nuclei=False)
    b = right.expected(lo, hi, channel=1, nuclei=False)
    # the sheets differ by a constant factor over the shared voxels, blurred or not
    np.testing.assert_allclose(a / b, SHEET_FAR_SIDE ** (30 / side), rtol=1e-4)

    info = generate_overlapping(
        tmp_path / "mosaic", size="tiny", seed=SEED, grid=(1, 1, 2), overlap=(0, 0, 0.25),
        stage_error_um=0.0, realistic=True, cells="somata",
    )  # fmt: skip
    assert info["realistic"]["cells"] == "somata"
    assert load_config(tmp_path / "mosaic" / "config.yaml").segment.background_channel == 1
    tiles = sorted((tmp_path / "mosaic" / "tiles").glob("*_ch1_*"))
    t0, t1 = (tifffile.imread(f).astype(float) - CAMERA["offset_adu"] for f in tiles)
    start = pd.read_csv(tmp_path / "mosaic" / "positions.csv")["x_um"].max() / vox[2]
    shared = t0.shape[2] - round(start)
    ratio = np.median(t0[..., -shared:]) / np.median(t1[..., :shared])
    assert ratio == pytest.approx(SHEET_FAR_SIDE ** (start / t0.shape[2]), rel=0.1)


def test_truth_centres_on_bright_somata(somata):
    out, info = somata
    cells = pd.read_csv(out / "truth" / "cells.csv")
    assert list(cells.columns) == list(CELL_COLUMNS) and len(cells) == info["n_cells"] >= 15
    assert cells["diameter_um"].between(*SOMA_DIAMETER_RANGE_UM).all()
    # sparse: no two somata overlap
    pos = cells[["z_um", "y_um", "x_um"]].to_numpy()
    gaps = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    reach = 0.5 * (cells["diameter_um"].to_numpy()[:, None] + cells["diameter_um"].to_numpy())
    assert (gaps[np.triu_indices(len(pos), 1)] >= reach[np.triu_indices(len(pos), 1)]).all()
    tiles = read_tiles(out)
    ch0, ch1 = stitched(tiles, 0, 0).astype(float), stitched(tiles, 0, 1).astype(float)
    ph = build_realistic_phantom("tiny", seed=SEED, cells="somata")
    tissue0 = ph._scene.expected((0, 0, 0), ph.preset.shape_zyx, channel=0, nuclei=False)
    tissue1 = ph._scene.expected((0, 0, 0), ph.preset.shape_zyx, channel=1, nuclei=False)
    idx = tuple(np.rint(pos / VOXEL_SIZE_UM).astype(int).T)
    signal = ch0[idx] - CAMERA["offset_adu"]
    # each soma's centre at least doubles the tissue there, far above its shot noise
    assert (signal > 2 * tissue0[idx] + 5 * np.sqrt(tissue0[idx])).mean() >= 0.95
    # channel 1 holds the tissue only: the camera's noise around its expected image
    residual = (ch1 - CAMERA["offset_adu"] - tissue1) / np.sqrt(tissue1 + 3)
    assert abs(residual.mean()) < 0.1 and residual.std() == pytest.approx(1.0, abs=0.15)


def test_truth_regions_and_density_for_somata(somata):
    """Each soma's region is the atlas voxel it lies in (BrainGlobe's truncation), and
    ``truth/density.csv`` counts them over the region's annotation volume."""
    out, info = somata
    cells = pd.read_csv(out / "truth" / "cells.csv")
    density = pd.read_csv(out / "truth" / "density.csv").set_index("structure_id")
    ann = tifffile.imread(out / "atlas" / "annotation.tiff")
    res = info["atlas"]["resolution_um"][0]
    idx = np.floor(cells[["z_um", "y_um", "x_um"]].to_numpy() / res).astype(int)
    np.testing.assert_array_equal(ann[tuple(idx.T)], cells["structure_id"])
    voxel_mm3 = res**3 * 1e-9
    for sid, n in cells["structure_id"].value_counts().items():
        row = density.loc[sid]
        volume = (ann == sid).sum() * voxel_mm3
        children = density[density["parent_structure_id"] == sid]
        if children.empty:  # a leaf: its own cells over its own voxels
            assert row["total_cells"] == n
            assert row["total_cells_per_mm3"] == pytest.approx(n / volume)


def test_config_and_record(somata):
    out, info = somata
    config = load_config(out / "config.yaml")
    assert config.segment.background_channel == 1 and config.segment.method == "local"
    assert 12 <= config.segment.nucleus_diameter_um <= 18
    record = json.loads((out / "sample.json").read_text())["realistic"]
    assert record["cells"] == "somata" and record["debris"] >= 1 and record["vessel_pieces"] >= 1
    assert info["channels"][0]["content"] == "somata"


def test_same_seed_same_files(somata, tmp_path):
    out, _ = somata

    def digests(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((folder / "tiles").iterdir())}  # fmt: skip

    generate(tmp_path / "again", size="tiny", seed=SEED, realistic=True, cells="somata")
    assert digests(tmp_path / "again") == digests(out)
    generate(tmp_path / "other", size="tiny", seed=SEED + 1, realistic=True, cells="somata")
    assert set(digests(tmp_path / "other").values()).isdisjoint(digests(out).values())


def test_nuclei_mode_keeps_the_plain_cells():
    plain = build_phantom("tiny", seed=SEED)
    realistic = build_realistic_phantom("tiny", seed=SEED, cells="nuclei")
    pd.testing.assert_frame_equal(plain.cells, realistic.cells)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cells": "somata"}, "realistic"),
        ({"realistic": True, "cells": "neurons"}, "neurons"),
        ({"misaligned": True, "cells": "somata"}, "realistic"),
        ({"misaligned": True, "realistic": True, "cells": "neurons"}, "neurons"),
        ({"misaligned": True, "voxel_size_um": (4, 2, 2)}, "voxel_size_um"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(SampleError, match=match):
        generate(tmp_path / "s", size="tiny", **kwargs)


def test_a_mosaic_refuses_somata_without_realistic(tmp_path):
    from lightsheet.sample.overlap import generate_overlapping

    with pytest.raises(SampleError, match="needs realistic=True"):
        generate_overlapping(tmp_path / "m", size="tiny", cells="somata", overlap=0.2)


def test_default_detection_finds_the_somata(somata):
    """The default `local` detection with the autofluorescence channel, on the raw tiles."""
    import dask.array as da

    from lightsheet.segment import segment_volume

    out, _ = somata
    tiles = read_tiles(out)
    config = load_config(out / "config.yaml")
    result = segment_volume(
        da.from_array(stitched(tiles, 0, 0), chunks=(24, 96, 96)),
        voxel_size_um=VOXEL_SIZE_UM,
        config=config.segment,
        background=da.from_array(stitched(tiles, 0, 1), chunks=(24, 96, 96)),
        camera_offset=config.camera_offset,
    )
    truth = pd.read_csv(out / "truth" / "cells.csv")
    score = match_points(
        result.table[["z_um", "y_um", "x_um"]].to_numpy(),
        truth[["z_um", "y_um", "x_um"]].to_numpy(),
        max_distance_um=truth["diameter_um"].to_numpy() / 2,
    )
    assert score.f1 >= 0.9, score.as_dict()


# -- cells planted into a real background ---------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from lightsheet.sample.planted import generate_planted

    before = {p.name: p.read_bytes() for p in CROP_CH1.iterdir()}
    out = tmp_path_factory.mktemp("planted") / "crop"
    info = generate_planted(out, CROP_CH1, voxel_size_um=CROP_VOXEL_UM, n=220, seed=2)
    assert {p.name: p.read_bytes() for p in CROP_CH1.iterdir()} == before  # input untouched
    return out, info


def test_planted_layout_reads_through_ingest(planted):
    from lightsheet.ingest import discover
    from lightsheet.stitch import stitch

    out, info = planted
    manifest = discover(str(out / info["input"]), info["pattern"])
    volume = stitch(manifest, voxel_size_um=info["voxel_size_um"])[0].compute()
    source = np.stack([tifffile.imread(p) for p in sorted(CROP_CH1.glob("*.tif"))])
    assert volume.shape == (2, *source.shape) and volume.dtype == source.dtype
    truth = pd.read_csv(out / "truth" / "cells.csv")
    assert len(truth) == info["n_cells"] == 220
    # channel 1: the same tissue with fresh noise; channel 0: the tissue + the somata
    diff = volume[1].astype(float) - source
    assert abs(np.median(diff)) <= 1 and 0 < np.std(diff) < 0.5 * np.std(source)
    idx = tuple(np.rint(truth[["z_um", "y_um", "x_um"]].to_numpy() / CROP_VOXEL_UM).astype(int).T)
    rise = volume[0][idx].astype(float) - source[idx]
    np.testing.assert_allclose(rise, truth["peak"], atol=1.0)
    assert (volume[0] >= source).all()


def test_planted_cells_found_by_the_default_detection(planted):
    """Issue #20: recall ≥ 0.9 and precision ≥ 0.85 within half a diameter, the defaults
    with the planted sample's background channel."""
    import dask.array as da

    from lightsheet.ingest import discover
    from lightsheet.segment import segment_volume
    from lightsheet.stitch import stitch

    out, info = planted
    volume = stitch(discover(str(out / info["input"]), info["pattern"]),
                    voxel_size_um=info["voxel_size_um"])[0]  # fmt: skip
    config = SegmentConfig(nucleus_diameter_um=14, background_channel=info["background_channel"])
    chunks = (10, 256, 256)
    result = segment_volume(
        da.from_array(volume[0].compute(), chunks=chunks),
        voxel_size_um=CROP_VOXEL_UM,
        config=config,
        background=da.from_array(volume[1].compute(), chunks=chunks),
    )
    truth = pd.read_csv(out / "truth" / "cells.csv")
    score = match_points(
        result.table[["z_um", "y_um", "x_um"]].to_numpy(),
        truth[["z_um", "y_um", "x_um"]].to_numpy(),
        max_distance_um=truth["diameter_um"].to_numpy() / 2,
    )
    assert score.recall >= 0.9 and score.precision >= 0.85, score.as_dict()


def test_planted_refuses_bad_input(tmp_path, planted):
    from lightsheet.sample.planted import generate_planted

    with pytest.raises(SampleError, match="voxel_size_um"):
        generate_planted(tmp_path / "a", CROP_CH1, voxel_size_um=(5.0, 2.0))
    with pytest.raises(SampleError, match="no .tif"):
        generate_planted(tmp_path / "b", tmp_path, voxel_size_um=CROP_VOXEL_UM)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        generate_planted(tmp_path / "taken", CROP_CH1, voxel_size_um=CROP_VOXEL_UM, n=5)
    with pytest.raises(SampleError, match="n=100000"):
        generate_planted(tmp_path / "c", CROP_CH1, voxel_size_um=CROP_VOXEL_UM, n=100000)


def test_cli_background_needs_voxel_size(tmp_path, capsys):
    from lightsheet.cli import main

    assert main(["sample", str(tmp_path / "x"), "--background", str(CROP_CH1)]) == 2
    assert "--voxel-size-um" in capsys.readouterr().err


def test_cli_realistic(tmp_path, capsys):
    from lightsheet.cli import main

    out = tmp_path / "r"
    assert main(["sample", str(out), "--realistic", "--cells", "somata", "--channels", "2"]) == 0
    info = json.loads((out / "sample.json").read_text())
    assert info["realistic"]["cells"] == "somata" and info["size"] == "tiny"
    assert main(["sample", str(tmp_path / "n"), "--cells", "somata"]) == 2
    assert "--realistic" in capsys.readouterr().err
    mosaic = ["sample", str(tmp_path / "m"), "--realistic", "--overlap", "0.2"]
    assert main([*mosaic, "--grid", "1", "1", "2"]) == 0
    info = json.loads((tmp_path / "m" / "sample.json").read_text())
    assert info["realistic"]["cells"] == "nuclei" and info["overlap"] == [0.0, 0.0, 0.2]
    assert main(["sample", str(tmp_path / "x"), "--realistic", "--misaligned"]) == 0
    config = yaml.safe_load((tmp_path / "x" / "config.yaml").read_text())
    assert config["register"]["enabled"] and config["segment"]["background_channel"] == 1
    coarse = ["sample", str(tmp_path / "c"), "--realistic", "--voxel-size-um", "4", "2", "2"]
    assert main(coarse) == 0
    info = json.loads((tmp_path / "c" / "sample.json").read_text())
    assert info["voxel_size_um"] == [4.0, 2.0, 2.0] and info["shape"][2:] == [24, 96, 96]
    assert main([*coarse, "--overlap", "0.2"]) == 2
    assert "--voxel-size-um and --sheet-fwhm-um cannot be combined" in capsys.readouterr().err


def test_realistic_misaligned_sample_is_textured_tissue_through_the_misalignment():
    """`--realistic --misaligned`: the truth is the atlas at each cell's mapped position, the
    anatomy follows the misalignment, and the tissue is the realistic sample's (its somata,
    a dark outside, the sheet's stripes in the image's frame)."""
    from lightsheet.sample.misaligned import build_misaligned_phantom, lookup_labels
    from lightsheet.sample.realistic import SOMA_DIAMETER_RANGE_UM

    ph = build_misaligned_phantom("tiny", seed=1, realistic=True, cells="somata")
    nuclei = build_misaligned_phantom("tiny", seed=1)
    cells = ph.cells
    q = ph.misalignment(cells[["z_um", "y_um", "x_um"]].to_numpy())
    np.testing.assert_array_equal(
        cells["structure_id"], lookup_labels(ph.annotation, ph.resolution_um, q)
    )
    lo, hi = SOMA_DIAMETER_RANGE_UM
    assert cells["diameter_um"].between(lo, hi).all()
    assert 0.15 < len(cells) / len(nuclei.cells) < 0.45, (len(cells), len(nuclei.cells))
    assert ph.info()["cells"] == "somata" and ph.channels[0].content == "somata"
    np.testing.assert_array_equal(ph.misalignment.matrix, nuclei.misalignment.matrix)

    shape = ph.preset.shape_zyx
    image = ph.expected((0, 0, 0), shape, channel=1)
    grid = np.stack(
        np.meshgrid(
            *[np.arange(n) * v for n, v in zip(shape, ph.voxel_size_um, strict=True)], indexing="ij"
        ),
        -1,
    )
    brain = lookup_labels(ph.annotation, ph.resolution_um, ph.misalignment(grid)) > 0
    inside, outside = np.median(image[brain]), np.median(image[~brain])
    assert inside > 4 * outside, (inside, outside)

    # the plain misaligned sample's background is smooth; this one's varies along y at the
    # stripes' scale, inside the brain, far more than along x (the sheet's direction)
    def fine(axis):
        smooth = ndi.gaussian_filter1d(image, 8.0, axis=axis)
        return np.median(np.abs(image / smooth - 1)[brain])

    assert fine(1) > 2 * fine(2), (fine(1), fine(2))
