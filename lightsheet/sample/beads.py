"""A bead stack from the sample's microscope: what a user images to measure its PSF.

Nobody running the pipeline on their own brain has the PSF their tiles were blurred with;
they image sub-resolution fluorescent beads in agarose with the same objective, sheet and
camera, and `lightsheet psf OUT.tif --beads STACK.tif` (`lightsheet.beads.distil_psf`)
distils the PSF from it. The sample writes such a stack beside ``psf.tif`` (the PSF the
tiles were blurred with), so that path can be tried, and checked against the truth:

- the optics' PSF (`lightsheet.psf.optics_sigma_um`, the widths ``psf.tif`` is sampled
  with), drawn at each bead's own position between the voxels;
- at the tiles' pixel and half their z step, as bead stacks are usually taken (a multiple
  of that where a thick sheet would need more than `MAX_PLANES`), so the run resamples the
  measured PSF to the image's voxel size;
- `N_BEADS` beads apart from each other (their boxes of ±4 SDs do not overlap), a tenth of
  them clumps of two (twice the light: a measurement leaves them out), each bead's
  brightness spread by 10 % (bead sizes vary), on a faint agarose glow;
- through the tiles' camera (`lightsheet.sample.render.camera`: shot noise, read noise,
  offset, uint16) and written as Fiji writes a stack (ImageJ TIFF with its voxel size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lightsheet.psf import FWHM_PER_SIGMA, optics_sigma_um, write_psf
from lightsheet.sample.render import camera

__all__ = ["N_BEADS", "bead_stack", "write_bead_stack"]

#: Beads in a stack.
N_BEADS = 40
#: A single bead's median peak, photons per voxel (before noise).
BEAD_PHOTONS = 2000.0
#: Fraction of the beads that are two stuck together.
CLUMP_FRACTION = 0.1
#: Agarose's own glow, photons per voxel.
AGAROSE_PHOTONS = 2.0
#: Most planes a stack holds: a thick sheet is stepped more coarsely.
MAX_PLANES = 160
#: A bead's light reaches this many SDs above the camera's noise; its box (what
#: `lightsheet.beads.distil_psf` cuts) is 1.5 x as far + 2 voxels (+ 2 for the noise's
#: say in where the light ends), and no other bead's box overlaps it.
_REACH_SD = 4.0


def bead_stack(
    sigma_um: Sequence[float],
    voxel_size_um: Sequence[float],
    *,
    rng: np.random.Generator,
    n_beads: int = N_BEADS,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Expected photons of a stack of beads whose PSF has SDs ``sigma_um`` (z, y, x).

    The stack is two beads' boxes deep (a box: what a measurement cuts around a bead,
    about 6 SDs + 4 voxels a side) and wide enough for ``n_beads`` boxes side by side at
    half their closest packing; beads lie at least a box from its faces, their boxes
    apart (fewer where the random placement finds no room). Each bead is the Gaussian
    sampled at the voxel centres (voxel ``i`` centred at ``i × voxel_size_um``, as
    `lightsheet.psf.gaussian_psf` samples a PSF), centred on its own position between them.

    Returns
    -------
    expected : (Z, Y, X) float32
        Photons per voxel, the agarose's glow included.
    beads : DataFrame
        ``z_um, y_um, x_um`` (centres), ``photons`` (peak), ``clump`` (two beads).

    Examples
    --------
    >>> expected, beads = bead_stack((3.0, 0.8, 0.8), (1.0, 1.0, 1.0),
    ...                              rng=np.random.default_rng(0))
    >>> expected.shape, len(beads), int(beads["clump"].sum())
    ((88, 170, 170), 40, 6)
    """
    sigma = np.asarray(sigma_um, dtype=float)
    vox = np.asarray(voxel_size_um, dtype=float)
    half = _half_box(sigma, vox)
    half_um = half * vox
    side = math.ceil(math.sqrt(2 * n_beads) * max(2 * half[1:] + 1))
    shape = np.array([4 * half[0], side, side])
    extent = shape * vox
    centres: list[np.ndarray] = []
    for _ in range(200 * n_beads):
        if len(centres) == n_beads:
            break
        c = rng.uniform(half_um, extent - half_um - vox)
        if all(np.any(np.abs(c - o) > 2 * half_um + vox) for o in centres):
            centres.append(c)
    n = len(centres)
    clump = rng.random(n) < CLUMP_FRACTION
    photons = BEAD_PHOTONS * np.exp(0.1 * rng.standard_normal(n)) * np.where(clump, 2.0, 1.0)
    expected = np.full(tuple(shape), AGAROSE_PHOTONS, dtype=np.float32)
    reach = np.ceil(5 * sigma / vox).astype(int)  # the light beyond 5 SDs is < 4e-6
    for c, peak in zip(centres, photons, strict=True):
        mid = np.rint(c / vox).astype(int)
        lo, hi = np.maximum(mid - reach, 0), np.minimum(mid + reach + 1, shape)
        axes = [
            (np.arange(a, b) * v - x) / s
            for a, b, v, x, s in zip(lo, hi, vox, c, sigma, strict=True)
        ]
        z, y, x = (np.exp(-0.5 * d**2) for d in axes)
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        expected[region] += (peak * z[:, None, None] * y[None, :, None] * x[None, None, :]).astype(
            np.float32
        )
    beads = pd.DataFrame(np.reshape(centres, (n, 3)), columns=["z_um", "y_um", "x_um"])
    beads["photons"] = photons
    beads["clump"] = clump
    return expected, beads


def _half_box(sigma_um, voxel_um) -> np.ndarray:
    """Half side (voxels, z, y, x) of the box a bead's light fits in.

    As a measurement cuts it (1.5 x its reach + 2 voxels), with 2 voxels to spare.
    """
    sigma = np.asarray(sigma_um, dtype=float)
    return (np.ceil(1.5 * _REACH_SD * sigma / np.asarray(voxel_um, dtype=float)) + 4).astype(int)


def write_bead_stack(
    path: str | Path, optics: dict, voxel_size_um: Sequence[float], *, seed: int
) -> dict:
    """Image a bead stack with ``optics`` and the sample's camera; write it to ``path``.

    ``optics``: `lightsheet.psf.psf_from_optics`' keywords but the voxel size. The stack is
    at the tiles' pixel and half their z step (see the module docstring). Returns what it
    holds (``sample.json``'s ``beads``).
    """
    path = Path(path)
    sigma = optics_sigma_um(**optics)
    vz, vy, vx = (float(v) for v in voxel_size_um)
    step = vz / 2  # doubled while the stack (four half boxes, `bead_stack`) is too deep
    while 4 * _half_box(sigma, (step, vy, vx))[0] > MAX_PLANES:
        step *= 2
    vox = (step, vy, vx)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    expected, beads = bead_stack(sigma, vox, rng=rng)
    write_psf(path, camera(expected, rng=rng), vox, dtype=np.uint16)
    return {
        "path": path.name,
        "voxel_size_um": list(vox),
        "shape": list(expected.shape),
        "n_beads": len(beads),
        "n_clumps": int(beads["clump"].sum()),
        "sigma_um": [round(s, 4) for s in sigma],
        "fwhm_um": [round(s * FWHM_PER_SIGMA, 4) for s in sigma],
    }
