"""PSF generation from optics, TIFF round trip and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile

from lightsheet.errors import PSFError
from lightsheet.psf import (
    FWHM_PER_SIGMA,
    check_psf_fits,
    gaussian_psf,
    load_psf,
    psf_from_optics,
    psf_grid_note,
    psf_sigma_um,
    validate_psf,
    write_psf,
)

#: second-moment widths of a sampled Gaussian against the requested sigma
SIGMA_RTOL = 0.05


def _sigma_vox(psf: np.ndarray) -> np.ndarray:
    """Standard deviation (in voxels) of the PSF along each axis, from second moments."""
    grids = np.indices(psf.shape, dtype=np.float64)
    w = psf.astype(np.float64) / psf.sum()
    centre = [(g * w).sum() for g in grids]
    return np.array(
        [math.sqrt(((g - c) ** 2 * w).sum()) for g, c in zip(grids, centre, strict=True)]
    )


def _assert_normalised(psf: np.ndarray) -> None:
    assert psf.dtype == np.float32 and psf.ndim == 3
    assert all(n % 2 == 1 for n in psf.shape)
    assert abs(float(psf.sum(dtype=np.float64)) - 1) < 1e-6
    assert np.unravel_index(np.argmax(psf), psf.shape) == tuple(n // 2 for n in psf.shape)


def test_gaussian_psf_has_requested_widths():
    psf = gaussian_psf((3.0, 1.2, 0.9), (2.0, 0.4, 0.3), truncate=4.0)
    _assert_normalised(psf)
    np.testing.assert_allclose(_sigma_vox(psf), [1.5, 3.0, 3.0], rtol=SIGMA_RTOL)
    assert psf.shape == (13, 25, 25)


def test_psf_from_optics_follows_the_paraxial_model():
    na, lam_nm, n = 0.5, 520.0, 1.33
    voxel = (1.0, 0.1, 0.1)
    psf = psf_from_optics(na=na, wavelength_nm=lam_nm, refractive_index=n, voxel_size_um=voxel)
    _assert_normalised(psf)
    sigma_xy_um = 0.21 * lam_nm / 1000 / na
    sigma_z_um = 0.66 * lam_nm / 1000 * n / na**2
    # truncation at 3 sigma shrinks the measured width a little
    expected = np.array([sigma_z_um / voxel[0], sigma_xy_um / 0.1, sigma_xy_um / 0.1])
    np.testing.assert_allclose(_sigma_vox(psf), expected * 0.986, rtol=SIGMA_RTOL)


def test_light_sheet_narrows_the_axial_profile():
    common = dict(na=0.3, wavelength_nm=600.0, refractive_index=1.45)
    voxel = (0.5, 0.5, 0.5)
    wide = psf_from_optics(**common, voxel_size_um=voxel)
    sheet = psf_from_optics(**common, voxel_size_um=voxel, sheet_fwhm_um=3.0)
    assert sheet.shape[0] < wide.shape[0] and sheet.shape[1:] == wide.shape[1:]
    sigma_sheet = 3.0 / FWHM_PER_SIGMA
    sigma_det = 0.66 * 0.6 * 1.45 / 0.3**2
    combined = 1 / math.sqrt(1 / sigma_det**2 + 1 / sigma_sheet**2)
    assert _sigma_vox(sheet)[0] == pytest.approx(combined / 0.5 * 0.986, rel=SIGMA_RTOL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(na=1.5, wavelength_nm=500, refractive_index=1.33), "na must be"),
        (dict(na=0.0, wavelength_nm=500, refractive_index=1.33), "na must be"),
        (dict(na=0.5, wavelength_nm=-1, refractive_index=1.33), "wavelength_nm"),
        (dict(na=0.5, wavelength_nm=500, refractive_index=1.33, sheet_fwhm_um=0), "sheet"),
    ],
)
def test_bad_optics_are_rejected(kwargs, match):
    with pytest.raises(PSFError, match=match):
        psf_from_optics(voxel_size_um=(1, 1, 1), **kwargs)


def test_bad_voxel_size_is_rejected():
    with pytest.raises(ValueError, match="voxel_size_um"):
        gaussian_psf((1, 1, 1), (1, 0, 1))


def test_write_and_load_round_trip(tmp_path):
    psf = psf_from_optics(
        na=0.4, wavelength_nm=560, refractive_index=1.45, voxel_size_um=(2.0, 0.5, 0.5)
    )
    path = write_psf(tmp_path / "sub" / "psf.tif", psf, (2.0, 0.5, 0.5))
    loaded = load_psf(path)
    np.testing.assert_allclose(loaded, psf, rtol=1e-6)
    with tifffile.TiffFile(path) as tif:
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)


def test_off_centre_even_psf_is_recentred_and_normalised():
    psf = np.zeros((6, 8, 7), np.float32)
    psf[1, 5, 2] = 10.0
    psf[1, 4, 2] = 5.0
    psf[2, 5, 2] = 5.0
    out = validate_psf(psf * 3, name="bead.tif")
    _assert_normalised(out)
    # the peak moved to the centre and its neighbours kept their offsets
    c = tuple(n // 2 for n in out.shape)
    assert out[c] == pytest.approx(0.5)
    assert out[c[0], c[1] - 1, c[2]] == pytest.approx(0.25)
    assert out[c[0] + 1, c[1], c[2]] == pytest.approx(0.25)


def test_flat_topped_centred_psf_is_kept():
    psf = np.ones((5, 3, 3))
    out = validate_psf(psf)
    assert out.shape == (5, 3, 3)
    np.testing.assert_allclose(out, 1 / 45)


@pytest.mark.parametrize(
    ("psf", "match"),
    [
        (np.zeros((5, 5, 5)), "sums to 0"),
        (np.full((3, 3, 3), -1.0), "negative"),
        (np.array([[[0, 1, 0]]], float) * np.nan, "NaN"),
        (np.full((3, 3, 3), np.inf), "infinite"),
        (np.ones((3, 3)), "3-D"),
    ],
)
def test_unusable_psf_is_rejected(psf, match):
    with pytest.raises(PSFError, match=match):
        validate_psf(psf, name="bad.tif")
    with pytest.raises(PSFError, match="bad.tif"):
        validate_psf(psf, name="bad.tif")


def test_load_psf_reports_missing_and_unreadable_files(tmp_path):
    with pytest.raises(PSFError, match="no such file"):
        load_psf(tmp_path / "missing.tif")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff")
    with pytest.raises(PSFError, match="cannot read"):
        load_psf(junk)
    zeros = tmp_path / "zeros.tif"
    tifffile.imwrite(zeros, np.zeros((3, 3, 3), np.float32), photometric="minisblack")
    with pytest.raises(PSFError, match=r"zeros\.tif.*sums to 0"):
        load_psf(zeros)


def test_psf_must_fit_the_data():
    check_psf_fits((7, 7, 7), (7, 64, 64))
    with pytest.raises(PSFError, match=r"larger than the chunk plus halo .* along y, x"):
        check_psf_fits((7, 65, 65), (64, 64, 64), what="chunk plus halo")


def _resampled_gaussian(sigma_um, voxel_um, half, centre_um=(0.0, 0.0, 0.0)) -> np.ndarray:
    """What `resample_psf` approximates from a finer stack, normalised to sum 1: a Gaussian
    point-sampled at the planes (z) and integrated over each pixel (y, x; erf)."""
    from scipy.special import erf

    profiles = []
    for axis, (s, v, h, c) in enumerate(zip(sigma_um, voxel_um, half, centre_um, strict=True)):
        if axis == 0:
            profiles.append(np.exp(-0.5 * ((np.arange(-h, h + 1) * v - c) / s) ** 2))
        else:
            edges = ((np.arange(-h, h + 2) - 0.5) * v - c) / (s * math.sqrt(2))
            profiles.append(np.diff(erf(edges)))
    psf = np.einsum("i,j,k->ijk", *profiles)
    return psf / psf.sum()


def _bead_stack(rng, sigma_um, voxel_um, half, *, peak, level, centre_um=(0.0, 0.0, 0.0)):
    """A bead's image as a camera records it: Poisson light on ``level``, read noise."""
    axes = [
        (np.arange(-h, h + 1) * v - c) / s
        for s, v, h, c in zip(sigma_um, voxel_um, half, centre_um, strict=True)
    ]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    light = peak * np.exp(-0.5 * (z**2 + y**2 + x**2))
    return (rng.poisson(light) + level + rng.normal(0, 2, light.shape)).astype(np.float32)


def test_a_bead_stack_on_the_cameras_level_gives_the_psf():
    # a bead 4,000 counts bright on a level of 100 (a box of 17 x 21 x 21 voxels: the level
    # alone would outweigh the bead 12 times)
    rng = np.random.default_rng(1)
    sigma, voxel = (3.0, 0.8, 0.8), (2.0, 1.0, 1.0)
    bead = _bead_stack(rng, sigma, voxel, (8, 10, 10), peak=4000, level=100)
    psf = validate_psf(bead, name="bead.tif")
    _assert_normalised(psf)
    truth = gaussian_psf(sigma, voxel, truncate=20)
    np.testing.assert_allclose(_sigma_vox(psf) * voxel, _sigma_vox(truth) * voxel, rtol=0.03)
    c = tuple(n // 2 for n in psf.shape)
    assert psf[c] == pytest.approx(truth[tuple(n // 2 for n in truth.shape)], rel=0.03)
    # the level's noise is gone, and the PSF cut to the bead's light
    assert all(p < b for p, b in zip(psf.shape, bead.shape, strict=True))
    np.testing.assert_array_equal(validate_psf(psf), psf)  # a PSF validated stays as it is
    # the same bead with the level already subtracted (its noise below zero) gives the same
    np.testing.assert_allclose(validate_psf(bead - 100), psf, atol=1e-6)


def test_a_psf_declaring_another_voxel_size_is_resampled_to_the_images(tmp_path):
    sigma, fine, image = (3.0, 0.8, 0.8), (0.5, 0.25, 0.25), (2.0, 1.0, 1.0)
    path = write_psf(tmp_path / "psf.tif", gaussian_psf(sigma, fine, truncate=5), fine)
    assert load_psf(path).shape == gaussian_psf(sigma, fine, truncate=5).shape  # as stored
    psf = load_psf(path, image)
    _assert_normalised(psf)
    # (every fourth plane; the fine pixels' point samples summed over each pixel: within 2 %
    # of the integral)
    reference = _resampled_gaussian(sigma, image, tuple(n // 2 for n in psf.shape))
    np.testing.assert_allclose(psf, reference, atol=0.02 * reference.max())
    assert "resampled to the image's (2, 1, 1) µm" in psf_grid_note(path, image)
    assert psf_grid_note(path, fine) == "at the image's voxel size (0.5, 0.25, 0.25) µm"
    # a file without a voxel size in a length unit is taken at the image's
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, gaussian_psf(sigma, image), photometric="minisblack")
    assert load_psf(bare, image).shape == gaussian_psf(sigma, image).shape
    assert psf_grid_note(bare, image).startswith("declares no voxel size")
    # the run's psf_voxel_size_um says what the file does not, or overrides what it says
    given = load_psf(bare, (image[0] / 2, *image[1:]), psf_voxel_size_um=image)
    assert given.shape[0] > gaussian_psf(sigma, image).shape[0]  # resampled to finer planes
    note = psf_grid_note(bare, (1.0, 1.0, 1.0), psf_voxel_size_um=image)
    assert (
        note == "given (psf_voxel_size_um) at (2, 1, 1) µm: resampled to the image's (1, 1, 1) µm"
    )
    np.testing.assert_array_equal(load_psf(path, image, psf_voxel_size_um=image), load_psf(path))


def test_a_bead_stack_at_a_finer_z_step_is_centred_on_its_light(tmp_path):
    # beads are imaged at a fine z step, where the noise moves the brightest plane around a
    # flat axial top; the bead also sits between voxels
    rng = np.random.default_rng(2)
    sigma, fine, image = (3.0, 0.8, 0.8), (0.5, 1.0, 1.0), (2.0, 1.0, 1.0)
    centre = (0.3, 0.2, -0.1)
    bead = _bead_stack(rng, sigma, fine, (24, 8, 8), peak=4000, level=100, centre_um=centre)
    path = tmp_path / "bead.tif"
    tifffile.imwrite(
        path, bead.astype(np.uint16), imagej=True, resolution=(1.0, 1.0),
        metadata={"spacing": 0.5, "unit": "um", "axes": "ZYX"},
    )  # fmt: skip
    psf = load_psf(path, image)
    _assert_normalised(psf)
    # centred on the bead's light along z (where it was resampled), to a tenth of a voxel
    grids = np.indices(psf.shape, dtype=np.float64)
    centroid = [float((g * psf).sum()) - n // 2 for g, n in zip(grids, psf.shape, strict=True)]
    assert abs(centroid[0]) < 0.1
    # the reference: point-sampled at the image's planes (resampled), and in y and x
    half = tuple(n // 2 for n in psf.shape)
    z = _resampled_gaussian(sigma, image, half).sum(axis=(1, 2))
    y, x = (
        np.exp(-0.5 * ((np.arange(-h, h + 1) * v - c) / s) ** 2)
        for s, v, h, c in zip(sigma[1:], image[1:], half[1:], centre[1:], strict=True)
    )
    reference = np.einsum("i,j,k->ijk", z, y, x)
    reference /= reference.sum()
    np.testing.assert_allclose(psf, reference, atol=0.05 * reference.max())


def test_a_field_of_beads_gives_its_brightest_bead_cut_to_its_light():
    rng = np.random.default_rng(3)
    sigma, voxel = (3.0, 0.8, 0.8), (2.0, 1.0, 1.0)
    field = np.full((17, 64, 64), 100.0)
    for (y, x), peak in (((16, 16), 4000), ((40, 48), 2500), ((50, 12), 3000)):
        bead = _bead_stack(rng, sigma, voxel, (8, 10, 10), peak=peak, level=0)
        field[:, y - 10 : y + 11, x - 10 : x + 11] += bead
    field += rng.normal(0, 2, field.shape)
    psf = validate_psf(field, name="beads.tif")
    _assert_normalised(psf)
    assert psf.shape[1] < 21 and psf.shape[2] < 21  # one bead's light, not the field
    truth = gaussian_psf(sigma, voxel, truncate=20)
    np.testing.assert_allclose(_sigma_vox(psf) * voxel, _sigma_vox(truth) * voxel, rtol=0.03)


def test_a_light_sheets_planes_are_point_samples_of_the_psf(tmp_path):
    # a thin sheet (axial SD 1.5 µm) at 2 µm planes, its bead imaged at 0.5 µm steps: the
    # planes are the sheet's light at their depths, so the PSF resampled to them is the
    # optics' sampled there (what psf_from_optics gives), not averaged over each step
    # (which would widen it by 7 %)
    sigma, fine, image = (1.5, 0.8, 0.8), (0.5, 1.0, 1.0), (2.0, 1.0, 1.0)
    for centre in (0.0, 0.3):  # on a fine plane, and between
        bead = _bead_stack(
            np.random.default_rng(3), sigma, fine, (12, 6, 6), peak=1e6, level=0,
            centre_um=(centre, 0.0, 0.0),
        )  # fmt: skip
        psf = load_psf(write_psf(tmp_path / "bead.tif", np.clip(bead, 0, None), fine), image)
        truth = gaussian_psf(sigma, image, truncate=4)
        assert psf_sigma_um(psf, image)[0] == pytest.approx(psf_sigma_um(truth, image)[0], rel=0.01)
        half = tuple((a - b) // 2 for a, b in zip(psf.shape, truth.shape, strict=True))
        inner = psf[tuple(slice(h, n - h) for h, n in zip(half, psf.shape, strict=True))]
        np.testing.assert_allclose(inner, truth, atol=0.01 * truth.max())
