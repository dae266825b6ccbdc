"""A PSF distilled from a stack of beads, against the Gaussian that made them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from lightsheet.beads import distil_psf
from lightsheet.errors import PSFError
from lightsheet.psf import gaussian_psf, load_psf, psf_sigma_um, validate_psf

SIGMA_UM = (3.0, 0.8, 0.8)
VOXEL_UM = (2.0, 1.0, 1.0)


def _field(rng, beads, shape=(32, 160, 160), level=100.0):
    """A uint16 bead stack: each bead ``(z, y, x, photons)`` (µm, between voxels) a Gaussian
    of ``SIGMA_UM``, on ``level`` with Poisson light and read noise, clipped as a camera."""
    grids = np.indices(shape, dtype=np.float64) * np.array(VOXEL_UM)[:, None, None, None]
    light = np.zeros(shape)
    for *centre, peak in beads:
        r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, SIGMA_UM, strict=True))
        light += peak * np.exp(-r2 / 2)
    counts = rng.poisson(light) + level + rng.normal(0, 2, shape)
    return np.clip(np.round(counts), 0, 65535).astype(np.uint16)


def _stack(rng):
    """Ten single beads, two clumps (two beads 0.2 µm apart), a close pair, one at the
    stack's edge, one saturated, each a few tenths of a voxel off the grid."""
    singles = [(30 + rng.uniform(-1, 1), y + rng.uniform(-0.5, 0.5), x + rng.uniform(-0.5, 0.5),
                rng.uniform(2000, 4000))
               for y, x in [(20, 20), (20, 60), (20, 100), (60, 20), (60, 100), (100, 20),
                            (100, 60), (100, 100), (140, 40), (140, 80)]]  # fmt: skip
    clumps = [(31, y, x + d, 3000) for y, x in [(60, 60), (20, 140)] for d in (0, 0.2)]
    pair = [(30, 140, 125, 3000), (30, 145, 131, 3000)]
    edge = [(4, 100, 140, 3000)]
    saturated = [(30, 60, 140, 80000)]
    return _field(rng, singles + clumps + pair + edge + saturated), singles


def test_the_isolated_single_beads_give_the_psf():
    rng = np.random.default_rng(0)
    field, singles = _stack(rng)
    result = distil_psf(field, name="beads.tif")
    beads = result.beads
    assert beads["used"].sum() == len(singles)
    reasons = beads.loc[~beads["used"], "reason"].value_counts().to_dict()
    assert reasons == {"clump": 2, "neighbour": 2, "edge": 1, "saturated": 1}
    # each single bead found where it was put, to a tenth of a voxel
    used = beads[beads["used"]][["z", "y", "x"]].to_numpy() * VOXEL_UM
    for z, y, x, _ in singles:
        nearest = np.linalg.norm(used - (z, y, x), axis=1).min()
        assert nearest < 0.1 * VOXEL_UM[1]
    truth = gaussian_psf(SIGMA_UM, VOXEL_UM, truncate=4)
    psf = result.psf
    np.testing.assert_allclose(psf_sigma_um(psf, VOXEL_UM), SIGMA_UM, rtol=0.03)
    # the same grid as the truth's, then voxel by voxel
    half = [min(a, b) // 2 for a, b in zip(psf.shape, truth.shape, strict=True)]
    np.testing.assert_allclose(_middle(psf, half), _middle(truth, half), atol=0.05 * truth.max())
    # ten beads summed are nearer the truth than the brightest bead alone
    z, y, x = (int(round(v / s)) for v, s in zip(singles[0][:3], VOXEL_UM, strict=True))
    one = validate_psf(field[z - 8 : z + 9, y - 10 : y + 11, x - 10 : x + 11])
    assert _error(psf, truth) < 0.7 * _error(one, truth)


def _middle(a: np.ndarray, half) -> np.ndarray:
    """``a``'s centre voxel and ``half`` voxels each side of it."""
    return a[tuple(slice(n // 2 - h, n // 2 + h + 1) for n, h in zip(a.shape, half, strict=True))]


def _error(psf, truth) -> float:
    """RMS difference from ``truth`` on ``truth``'s grid (both centred)."""
    pad = [max(a - b, 0) for a, b in zip(psf.shape, truth.shape, strict=True)]
    t = np.pad(truth, [(p // 2, p // 2) for p in pad])
    pad = [max(b - a, 0) for a, b in zip(psf.shape, t.shape, strict=True)]
    p = np.pad(psf, [(q // 2, q // 2) for q in pad])
    return float(np.sqrt(np.mean((p - t) ** 2)))


def test_the_stack_is_read_slab_by_slab_from_its_file(tmp_path):
    # a TiffRegion (what the command reads) gives what the array gives
    from lightsheet.io.tiff import TiffRegion, inspect_tiff

    field, _ = _stack(np.random.default_rng(1))
    path = tmp_path / "beads.tif"
    tifffile.imwrite(path, field)
    from_file = distil_psf(TiffRegion(inspect_tiff(path)))
    in_memory = distil_psf(field)
    np.testing.assert_array_equal(from_file.psf, in_memory.psf)
    pd.testing.assert_frame_equal(from_file.beads, in_memory.beads)


def test_a_stack_without_beads_is_refused():
    rng = np.random.default_rng(2)
    with pytest.raises(PSFError, match=r"noise\.tif: no bead stands 10 noise SDs"):
        distil_psf(rng.poisson(100, (16, 64, 64)).astype(np.uint16), name="noise.tif")
    with pytest.raises(PSFError, match=r"plane\.tif: a bead stack must be 3-D .* \(1, 64, 64\)"):
        distil_psf(rng.poisson(100, (1, 64, 64)), name="plane.tif")
    crowded = _field(rng, [(30, 32, 32 + 3 * i, 3000) for i in range(3)], shape=(32, 64, 64))
    with pytest.raises(PSFError, match="none isolated"):
        distil_psf(crowded, name="crowded.tif")


def test_the_command_writes_the_psf_its_beads_and_a_figure(tmp_path, capsys):
    from lightsheet.cli import main

    field, singles = _stack(np.random.default_rng(3))
    beads = tmp_path / "beads.tif"
    vz, vy, vx = VOXEL_UM
    tifffile.imwrite(beads, field, imagej=True, resolution=(1 / vx, 1 / vy),
                     metadata={"spacing": vz, "unit": "um", "axes": "ZYX"})  # fmt: skip
    out = tmp_path / "psf.tif"
    assert main(["psf", str(out), "--beads", str(beads)]) == 0
    printed = capsys.readouterr().out
    assert f"{len(singles)} beads of 16" in printed and "FWHM" in printed
    psf = load_psf(out, VOXEL_UM)  # declares the stack's voxel size: nothing resampled
    np.testing.assert_allclose(psf_sigma_um(psf, VOXEL_UM), SIGMA_UM, rtol=0.03)
    table = pd.read_csv(tmp_path / "psf.beads.csv")
    assert table["used"].sum() == len(singles)
    assert (tmp_path / "psf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a stack that declares no voxel size needs one on the command line
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, field)
    assert main(["psf", str(tmp_path / "p2.tif"), "--beads", str(bare)]) == 2
    assert "--voxel-size-um" in capsys.readouterr().err
    assert main(["psf", str(tmp_path / "p2.tif"), "--beads", str(bare),
                 "--voxel-size-um", "2", "1", "1"]) == 0  # fmt: skip


def test_a_psf_that_varies_across_the_field_is_shown_and_said(tmp_path, capsys):
    # a light sheet thinnest in the middle of x: the beads' axial width grows away from it
    from lightsheet.cli import main

    rng = np.random.default_rng(4)
    shape, vz = (40, 64, 200), VOXEL_UM[0]
    grids = np.indices(shape, dtype=np.float64) * np.array(VOXEL_UM)[:, None, None, None]
    light = np.zeros(shape)
    xs = np.arange(20, 200, 30)
    for x in xs:
        sigma = (2.2 + 0.02 * abs(x - 100), *SIGMA_UM[1:])
        r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, (40, 32, x), sigma, strict=True))
        light += 3000 * np.exp(-r2 / 2)
    field = np.round(rng.poisson(light) + 100.0).astype(np.uint16)
    beads = tmp_path / "beads.tif"
    tifffile.imwrite(beads, field, imagej=True, resolution=(1, 1),
                     metadata={"spacing": vz, "unit": "um", "axes": "ZYX"})  # fmt: skip
    assert main(["psf", str(tmp_path / "psf.tif"), "--beads", str(beads)]) == 0
    assert "the PSF varies across the field" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "psf.beads.csv").sort_values("x_um")
    assert table["used"].all() and len(table) == len(xs)
    # each bead's axial FWHM follows the sheet's (its light above the noise: a little less)
    truth = 2.355 * (2.2 + 0.02 * np.abs(table["x_um"] - 100))
    np.testing.assert_allclose(table["fwhm_z_um"], truth, rtol=0.1)
    assert np.corrcoef(table["fwhm_z_um"], truth)[0, 1] > 0.95


def test_a_stack_of_several_channels_is_measured_in_the_one_asked_for(tmp_path, capsys):
    # multi-coloured beads imaged in two channels (Fiji's ZCYX hyperstack); the longer
    # wavelength's PSF is wider: each channel gives its own
    from lightsheet.cli import main
    from lightsheet.sample.beads import bead_stack
    from lightsheet.sample.render import camera

    rng = np.random.default_rng(5)
    sigmas = [(2.5, 0.7, 0.7), (3.5, 1.0, 1.0)]
    voxel = (1.0, 1.0, 1.0)
    stacks = [camera(bead_stack(s, voxel, rng=rng, n_beads=12)[0], rng=rng) for s in sigmas]
    n = np.min([s.shape for s in stacks], axis=0)
    field = np.stack([s[: n[0], : n[1], : n[2]] for s in stacks], axis=1)
    beads = tmp_path / "beads.tif"
    tifffile.imwrite(beads, field, imagej=True, resolution=(1, 1),
                     metadata={"spacing": 1.0, "unit": "um", "axes": "ZCYX"})  # fmt: skip
    out = tmp_path / "psf.tif"
    # without --channel: every channel, each to its own file, and the run config's mapping
    assert main(["psf", str(out), "--beads", str(beads)]) == 0
    files = [tmp_path / f"psf_c{k}.tif" for k in range(2)]
    assert f"psf: {{0: {files[0]}, 1: {files[1]}}}" in capsys.readouterr().out
    for path, sigma in zip(files, sigmas, strict=True):
        np.testing.assert_allclose(psf_sigma_um(load_psf(path), voxel), sigma, rtol=0.05)
        assert path.with_suffix(".beads.csv").is_file() and path.with_suffix(".png").is_file()
    assert main(["psf", str(out), "--beads", str(beads), "--channel", "2"]) == 2
    assert "--channel 2" in capsys.readouterr().err
    for channel, sigma in enumerate(sigmas):
        assert main(["psf", str(out), "--beads", str(beads), "--channel", str(channel)]) == 0
        np.testing.assert_allclose(psf_sigma_um(load_psf(out), voxel), sigma, rtol=0.05)
    # --channel picks what --beads measures; the optics' PSF has none
    assert main(["psf", str(out), "--na", "0.2", "--wavelength-nm", "600",
                 "--voxel-size-um", "2", "1", "1", "--channel", "1"]) == 2  # fmt: skip
    assert "--channel" in capsys.readouterr().err


def test_a_stack_written_one_file_per_plane_is_measured_as_the_stack(tmp_path, capsys):
    # LaVision and others write one file per plane, numbered without padding (Z2 < Z10):
    # a folder or a glob of them is the stack, in the natural order of their names
    from lightsheet.cli import main
    from lightsheet.sample.beads import bead_stack
    from lightsheet.sample.render import camera

    rng = np.random.default_rng(6)
    stack = camera(bead_stack(SIGMA_UM, VOXEL_UM, rng=rng, n_beads=12)[0], rng=rng)
    whole = tmp_path / "stack.tif"
    tifffile.imwrite(whole, stack, imagej=True, resolution=(1, 1),
                     metadata={"spacing": VOXEL_UM[0], "unit": "um", "axes": "ZYX"})  # fmt: skip
    planes = tmp_path / "planes"
    planes.mkdir()
    for z, plane in enumerate(stack):
        tifffile.imwrite(planes / f"beads_C00_Z{z}.ome.tif", plane)
    assert main(["psf", str(tmp_path / "whole.tif"), "--beads", str(whole)]) == 0
    reference = load_psf(tmp_path / "whole.tif")
    for beads in (planes, planes / "*_Z*.ome.tif"):
        out = tmp_path / "from_planes.tif"
        # plane files do not say their z step
        assert main(["psf", str(out), "--beads", str(beads)]) == 2
        assert "--voxel-size-um" in capsys.readouterr().err
        assert main(["psf", str(out), "--beads", str(beads), "--voxel-size-um", "2", "1", "1"]) == 0
        np.testing.assert_array_equal(load_psf(out), reference)
    # a plane of another size is named
    tifffile.imwrite(planes / "beads_C00_Z999.ome.tif", stack[0, :10])
    assert main(["psf", str(out), "--beads", str(planes), "--voxel-size-um", "2", "1", "1"]) == 2
    assert "Z999.ome.tif holds (1, 10," in capsys.readouterr().err
