"""The sample's illumination, seen against the atlas: the smooth gain its anatomy does not explain.

A light sheet fades along its path through the tissue (scattering and absorption), and
one side of a brain is often brighter than the other. Mutual information sees through a
global change of gain or contrast, but not through a gain that varies across the brain:
the B-spline then bends the atlas to make the bright side's regions match bright template
regions. On the registration benchmark's mouse-size case, a sheet fading to 0.45 of its
strength across the sample took the planted cells kept in their leaf from 98 % to 89 %,
with the affine still right (`benchmarks/results/register.md`).

Model. Once the affine has placed the atlas, inside the brain

    log(fixed - dark) = h(reference) + P(position) + noise,

with ``h`` any function of the template's intensity (a level per quantile bin of the
reference: the two images' contrast need not be linear, nor even monotonic) and ``P`` a
polynomial of low degree in the position (the illumination, smooth across the brain). The
two are fitted together by least squares, reweighted to discount voxels the affine does
not yet align (edges, ventricles: Tukey's biweight on the residuals), and the gain is
``exp(P)``, normalised to a geometric mean of 1 inside the brain and held at its range
inside the brain beyond it. Anatomy that the template shares goes into ``h``, not into the
gain, which is why this is fitted against the atlas and not on the sample alone (N4 on
the sample alone took the template's own large-scale anatomy for bias: 0.94 of the cells
in their leaf, below the 0.98 without any correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ILLUMINATION_DEGREE",
    "REFERENCE_LEVELS",
    "IlluminationFit",
    "divide_out",
    "fit_illumination",
]

#: Degree of the illumination polynomial: 2 holds a fade along the sheet (nearly linear in
#: log) and the dip in the middle of a sheet from both sides, and stays smoother than any
#: region of the brain.
ILLUMINATION_DEGREE = 2
#: Quantile bins of the template's intensity, each with its own sample level.
REFERENCE_LEVELS = 16
#: Tukey's biweight constant (in robust SDs of the residuals): 95 % efficiency for Gaussian
#: noise.
TUKEY_C = 4.685


@dataclass(frozen=True, eq=False)
class IlluminationFit:
    """The gain fitted by `fit_illumination`.

    Attributes
    ----------
    gain : ndarray of float32
        The illumination at each voxel of the fixed image (geometric mean 1 in the brain).
    range : float
        Its largest over its smallest value in the brain.
    """

    gain: np.ndarray
    range: float

    def correct(self, fixed: np.ndarray, dark: float = 0.0) -> np.ndarray:
        """``fixed`` with the gain divided out (`divide_out`)."""
        return divide_out(fixed, self.gain, dark)


def divide_out(fixed: np.ndarray, gain: np.ndarray, dark: float = 0.0) -> np.ndarray:
    """``fixed`` with ``gain`` divided out of its light above ``dark`` (float32).

    Examples
    --------
    >>> divide_out(np.array([100.0, 300.0]), np.array([1.0, 2.0]), dark=100.0).tolist()
    [100.0, 200.0]
    """
    return (dark + (np.asarray(fixed, np.float32) - dark) / gain).astype(np.float32)


def _monomials(coords: Sequence[np.ndarray], degree: int) -> list[np.ndarray]:
    """Products of the coordinates up to ``degree``, without the constant."""
    out: list[np.ndarray] = []

    def grow(term, start, left):
        for k in range(start, len(coords)):
            t = coords[k] if term is None else term * coords[k]
            out.append(t)
            if left > 1:
                grow(t, k, left - 1)

    grow(None, 0, degree)
    return out


def fit_illumination(
    fixed: np.ndarray,
    reference: np.ndarray,
    inside: np.ndarray,
    *,
    dark: float = 0.0,
    degree: int = ILLUMINATION_DEGREE,
    levels: int = REFERENCE_LEVELS,
    max_samples: int = 200_000,
    iterations: int = 4,
    seed: int = 0,
) -> IlluminationFit | None:
    """Fit the fixed image's illumination against the reference that the affine placed on it.

    Parameters
    ----------
    fixed : 3-D ndarray
        The sample's image.
    reference : 3-D ndarray
        The atlas reference resampled onto ``fixed``'s grid (through the affine).
    inside : 3-D ndarray of bool
        The brain, as the affine places the atlas's.
    dark : float
        What ``fixed`` reads with no light (the camera's offset).
    degree : int
        Degree of the polynomial in position.
    levels : int
        Quantile bins of the reference.
    max_samples : int
        At most this many voxels of the brain, drawn at random (``seed``), enter the fit.
    iterations : int
        Least-squares passes (at least 1), each reweighted by the last one's residuals.

    Returns
    -------
    IlluminationFit, or None where too few voxels hold light (fewer than 20 per unknown).

    Examples
    --------
    A gain that doubles across the last axis, under an anatomy of four levels:

    >>> rng = np.random.default_rng(0)
    >>> ref = rng.integers(1, 5, (20, 20, 20)).astype(np.float32)
    >>> gain = np.exp(np.linspace(-0.35, 0.35, 20))[None, None, :]
    >>> fit = fit_illumination(3 * ref**1.5 * gain, ref, np.ones(ref.shape, bool))
    >>> round(fit.range, 2)
    2.01
    """
    fixed = np.asarray(fixed, np.float32)
    light = fixed - np.float32(dark)
    use = np.asarray(inside, bool) & (light > 0) & np.isfinite(light)
    index = np.flatnonzero(use)
    n_unknowns = levels + len(_monomials([0.0] * fixed.ndim, degree))
    if index.size < 20 * n_unknowns:
        return None
    if index.size > max_samples:
        index = np.sort(np.random.default_rng(seed).choice(index, max_samples, replace=False))
    # positions scaled to [-1, 1] over the image, one axis at a time
    scale = [2.0 / max(n - 1, 1) for n in fixed.shape]
    pos = [c * s - 1.0 for c, s in zip(np.unravel_index(index, fixed.shape), scale, strict=True)]
    ref = np.asarray(reference, np.float32).ravel()[index]
    edges = np.quantile(ref, np.linspace(0, 1, levels + 1)[1:-1])
    bins = np.searchsorted(edges, ref, side="right")
    terms = np.stack(_monomials(pos, degree), axis=1)
    design = np.zeros((index.size, levels + terms.shape[1]), np.float64)
    design[np.arange(index.size), bins] = 1.0
    design[:, levels:] = terms
    y = np.log(light.ravel()[index].astype(np.float64))
    weight = np.ones_like(y)
    for _ in range(iterations):
        w = np.sqrt(weight)
        coef, *_ = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)
        resid = y - design @ coef
        spread = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        if not spread > 0:
            break
        u = resid / (TUKEY_C * spread)
        weight = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
    poly = coef[levels:]
    # P at every voxel, plane by plane along the first axis (a few planes' temporaries)
    grids = [np.arange(n) * s - 1.0 for n, s in zip(fixed.shape, scale, strict=True)]
    field = np.empty(fixed.shape, np.float32)
    yx = np.meshgrid(*grids[1:], indexing="ij")
    for i, z in enumerate(grids[0]):
        terms = _monomials([np.full_like(yx[0], z), *yx], degree)
        field[i] = sum(c * t for c, t in zip(poly, terms, strict=True))
    inner = field[np.asarray(inside, bool)]
    lo, hi = float(inner.min()), float(inner.max())
    field = np.clip(field, lo, hi) - np.float32(inner.mean())
    return IlluminationFit(np.exp(field), float(np.exp(hi - lo)))
