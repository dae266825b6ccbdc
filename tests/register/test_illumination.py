"""The illumination fitted against the atlas (`lightsheet.illumination`), against a known gain."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from lightsheet.illumination import fit_illumination


def _anatomy(shape=(40, 48, 56), seed=0):
    """A template of blob-like regions of a few levels, and an ellipsoidal brain."""
    rng = np.random.default_rng(seed)
    ref = gaussian_filter(rng.standard_normal(shape), 3)
    ref = np.exp(2.0 * ref / ref.std()).astype(np.float32)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.8
    return ref, inside, grid


def _in_brain_error(fit, truth, inside):
    truth = truth / np.exp(np.log(truth[inside]).mean())
    return float(np.abs(fit.gain[inside] / truth[inside] - 1).max())


@pytest.mark.parametrize(
    "far_side, contrast",
    [(0.45, lambda r: r**1.3), (0.2, lambda r: r**1.3), (0.45, lambda r: 1 / r)],
    ids=["gamma-0.45", "gamma-0.2", "inverted-0.45"],
)
def test_a_fading_sheet_is_recovered_under_another_contrast(far_side, contrast):
    """Exponential fade along x; the sample's contrast a gamma of the template's, or the
    template's inverted (another stain, bright where the template is dark); noise."""
    ref, inside, grid = _anatomy()
    x = (grid[2] + 1) / 2
    truth = far_side**x
    rng = np.random.default_rng(1)
    fixed = 5.0 * contrast(ref) * truth * (1 + 0.05 * rng.standard_normal(ref.shape))
    fit = fit_illumination(fixed, ref, inside)
    assert _in_brain_error(fit, truth, inside) < 0.03
    assert fit.range == pytest.approx(truth[inside].max() / truth[inside].min(), rel=0.03)


def test_light_from_both_sides_and_a_camera_offset():
    """A sheet from each side (dim in the middle), above a camera's offset of 100."""
    ref, inside, grid = _anatomy(seed=2)
    truth = np.exp(0.6 * grid[2] ** 2 + 0.2 * grid[0])
    fixed = 100.0 + 40.0 * np.sqrt(ref) * truth
    fit = fit_illumination(fixed, ref, inside, dark=100.0)
    assert _in_brain_error(fit, truth, inside) < 0.02
    corrected = fit.correct(fixed, dark=100.0)
    # the light above the offset now follows the template alone
    ratio = (corrected[inside] - 100.0) / np.sqrt(ref[inside])
    assert ratio.std() / ratio.mean() < 0.02
    # the offset itself counted as light: the fit is off
    assert _in_brain_error(fit_illumination(fixed, ref, inside), truth, inside) > 0.05


def test_anatomy_the_template_shares_is_not_illumination():
    """A brain brighter on one side in the template too: no gain to divide out."""
    ref, inside, grid = _anatomy(seed=3)
    ref = ref * np.exp(0.8 * grid[2])  # the anatomy itself is brighter along x
    fixed = 3.0 * ref**0.8
    fit = fit_illumination(fixed, ref, inside)
    assert fit.range < 1.03


def test_misaligned_parts_do_not_pull_the_fit():
    """A fifth of the brain shows something else (the affine off there): robust weights."""
    ref, inside, grid = _anatomy(seed=4)
    truth = 0.4 ** ((grid[2] + 1) / 2)
    fixed = ref * truth
    rng = np.random.default_rng(5)
    wrong = inside & (rng.random(ref.shape) < 0.2)
    fixed[wrong] = ref[wrong][rng.permutation(int(wrong.sum()))] * truth[wrong] * 3
    fit = fit_illumination(fixed, ref, inside)
    assert _in_brain_error(fit, truth, inside) < 0.05


def test_the_gain_is_held_at_its_brain_range_outside_and_too_little_light_fits_nothing():
    ref, inside, grid = _anatomy(seed=6)
    truth = np.exp(0.5 * grid[2])
    fit = fit_illumination(ref * truth, ref, inside)
    assert fit.gain.min() >= fit.gain[inside].min() and fit.gain.max() <= fit.gain[inside].max()
    assert np.exp(np.log(fit.gain[inside]).mean()) == pytest.approx(1.0, abs=1e-4)
    dark = np.zeros_like(ref)
    assert fit_illumination(dark, ref, inside) is None
