"""Imaging the phantom: background fields, the scene of one tile, the camera."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lightsheet.sample.presets import (
    CAMERA,
    NUCLEUS_EDGE_UM,
    REGIONS,
    TILE_THREADS,
    VOXEL_SIZE_UM,
)

__all__ = [
    "camera",
]


def _background_fields(geometry, annotation, res_um, chans, seed) -> list[np.ndarray]:
    """Expected autofluorescence photons per channel on the atlas grid (smooth, float32).

    Illumination: a few random low-frequency waves (±10 %) times the light sheet's decay
    across x. Tissue: brighter inside the brain, region-dependent anatomy contrast smoothed
    over about one atlas voxel.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    # atlas voxel j's centre is at (j + 0.5) R (BrainGlobe: the voxel spans [j R, (j+1) R))
    z, y, x = ((np.arange(n, dtype=float)[:, None, None] + 0.5) * res_um for n in annotation.shape)
    y, x = y.reshape(1, -1, 1), x.reshape(1, 1, -1)
    extent = max(n * res_um for n in annotation.shape)
    wave = np.zeros(annotation.shape)
    for _ in range(4):
        direction = rng.normal(size=3)
        k = 2 * np.pi / (extent * rng.uniform(0.6, 1.6)) * direction / np.linalg.norm(direction)
        wave = wave + np.cos(k[0] * z + k[1] * y + k[2] * x + rng.uniform(0, 2 * np.pi))
    illumination = (1.0 + 0.1 * wave / 4.0) * np.exp(-0.3 * x / (annotation.shape[2] * res_um))
    brain = geometry.brain_weight(z, y, x, edge_um=max(3.0, 0.5 * res_um))
    level = np.ones(annotation.shape)
    for r in REGIONS:
        level[annotation == r.id] = r.anatomy
    level = gaussian_filter(level, sigma=1.0, mode="nearest")
    fields = []
    for ch in chans:
        tissue = ch.inside_photons * (1.0 + ch.anatomy_contrast * (level - 1.0))
        fields.append(
            (illumination * (ch.outside_photons + (tissue - ch.outside_photons) * brain)).astype(
                np.float32
            )
        )
    return fields


class _Scene:
    """Renders the expected (noise-free) image of any box of the volume.

    Voxel ``i`` is centred at ``origin_um + i × voxel_size_um``: a non-zero origin renders
    a tile whose stage position is not a whole number of voxels. Photons are given per voxel
    of `VOXEL_SIZE_UM` (cells' ``intensity``, the fields); a camera pixel of another size
    collects ``light`` times as many, its area over the default's (the z step, set by the
    sheet, does not change what one plane collects).
    """

    def __init__(self, cells, psf, voxel_size_um, res_um, fields, origin_um=(0.0, 0.0, 0.0)):
        self.origin_um = np.asarray(origin_um, dtype=float)
        self.vox = np.asarray(voxel_size_um, dtype=float)
        self.light = float(self.vox[1] * self.vox[2] / (VOXEL_SIZE_UM[1] * VOXEL_SIZE_UM[2]))
        self.psf = np.asarray(psf, dtype=np.float32)
        self._psf_ft: dict[tuple[int, ...], np.ndarray] = {}
        self.half = np.array(psf.shape) // 2
        self.res_um = float(res_um)
        self.fields = fields
        self.centre = cells[["z_um", "y_um", "x_um"]].to_numpy(float) - self.origin_um
        self.semi = cells[["semi_z_um", "semi_y_um", "semi_x_um"]].to_numpy(float)
        self.intensity = cells["intensity"].to_numpy(float)
        # a nucleus reaches this far (µm) from its centre before its edge fades out
        self.reach = self.semi.max(axis=1) + 6 * NUCLEUS_EDGE_UM

    def expected(self, lo, hi, *, channel: int, nuclei: bool, bleach: float = 1.0):
        """Expected photons per voxel of the box ``[lo, hi)`` (voxel indices), float32.

        The box plus a PSF-half-size halo is rendered and blurred, then the halo is cut
        away ('valid' convolution), so adjacent boxes join exactly.
        """
        lo_h = np.asarray(lo) - self.half
        hi_h = np.asarray(hi) + self.half
        image = self._field(self.fields[channel], lo_h, hi_h)
        if nuclei:
            self._add_nuclei(image, lo_h, hi_h, bleach)
        blurred = self._convolve_valid(image)
        return np.maximum(blurred, 0.0, out=blurred)

    def _convolve_valid(self, image: np.ndarray) -> np.ndarray:
        """'valid' part of ``image`` ⊛ PSF by FFT, times ``light``; float32 on all cores.

        A circular convolution at any length ≥ the image's leaves the 'valid' voxels
        untouched by wrap-around, so the FFT length is just the next fast size.
        """
        import scipy.fft

        fast = tuple(scipy.fft.next_fast_len(n, real=True) for n in image.shape)
        if fast not in self._psf_ft:
            self._psf_ft[fast] = scipy.fft.rfftn(self.psf * self.light, s=fast, workers=-1)
        spectrum = scipy.fft.rfftn(image, s=fast, workers=-1)
        spectrum *= self._psf_ft[fast]
        full = scipy.fft.irfftn(spectrum, s=fast, workers=-1)
        valid = tuple(slice(k - 1, n) for k, n in zip(self.psf.shape, image.shape, strict=True))
        return np.ascontiguousarray(full[valid], dtype=np.float32)

    def _field(self, grid: np.ndarray, lo, hi) -> np.ndarray:
        """Trilinear interpolation of an atlas-grid field at the voxel centres of a box.

        Outside the atlas grid the field continues constant (edge values).
        """
        out = grid
        for axis in range(3):
            # grid value j is the atlas voxel centre (j + 0.5) R
            q = (
                np.arange(lo[axis], hi[axis]) * self.vox[axis] + self.origin_um[axis]
            ) / self.res_um - 0.5
            n = grid.shape[axis]
            i0 = np.clip(np.floor(q).astype(np.intp), 0, max(n - 2, 0))
            frac = np.clip(q - i0, 0.0, 1.0) if n > 1 else np.zeros_like(q)
            i1 = np.minimum(i0 + 1, n - 1)
            # work on the few grid planes this box needs, not the whole grid
            first = int(i0.min())
            out = np.take(out, np.arange(first, int(i1.max()) + 1), axis=axis)
            shape = [1, 1, 1]
            shape[axis] = -1
            a = np.take(out, i0 - first, axis=axis)
            b = np.take(out, i1 - first, axis=axis)
            out = a + (b - a) * frac.reshape(shape).astype(np.float32)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _add_nuclei(self, image: np.ndarray, lo, hi, bleach: float) -> None:
        """Add the soft-edged ellipsoidal nuclei that reach into the box."""
        lo_um = np.asarray(lo) * self.vox
        hi_um = (np.asarray(hi) - 1) * self.vox
        reach = self.reach[:, None]
        hit = np.all((self.centre + reach >= lo_um) & (self.centre - reach <= hi_um), axis=1)
        for k in np.flatnonzero(hit):
            c, semi = self.centre[k], self.semi[k]
            start = np.maximum(np.ceil((c - self.reach[k]) / self.vox).astype(int), lo)
            stop = np.minimum(np.floor((c + self.reach[k]) / self.vox).astype(int) + 1, hi)
            if np.any(stop <= start):
                continue
            axes = [
                ((np.arange(start[d], stop[d]) * self.vox[d] - c[d]) / semi[d]) for d in range(3)
            ]
            rho = np.sqrt(
                axes[0][:, None, None] ** 2
                + axes[1][None, :, None] ** 2
                + axes[2][None, None, :] ** 2
            )
            # soft boundary: logistic in the distance (µm) from the nuclear surface
            dist = (rho - 1.0) * semi.mean()
            blob = (
                self.intensity[k]
                * bleach
                / (1.0 + np.exp(np.clip(dist / NUCLEUS_EDGE_UM, -50, 50)))
            )
            box = tuple(slice(s - o, e - o) for s, e, o in zip(start, stop, lo, strict=True))
            image[box] += blob.astype(np.float32)


def camera(expected: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Detect expected photons: Poisson shot noise, Gaussian read noise, offset, uint16.

    Parameters
    ----------
    expected : (Z, Y, X) ndarray of float
        Expected photo-electrons per voxel.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    (Z, Y, X) ndarray of uint16
    """
    electrons = rng.poisson(expected).astype(np.float32)
    electrons += CAMERA["read_noise_e"] * rng.standard_normal(expected.shape, dtype=np.float32)
    adu = electrons * CAMERA["gain_adu_per_e"] + CAMERA["offset_adu"]
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _bounded_map(fn: Callable, jobs: Sequence[tuple]):
    """``fn(*job)`` for every job on `TILE_THREADS` threads, yielded in order.

    At most two jobs per thread are in flight, so memory stays that of a few tiles
    however many there are. NumPy, the FFT and the file write release the GIL; the
    Poisson draw does not, so threads give about 1.5× on two cores.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(TILE_THREADS, thread_name_prefix="sample-tile") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= 2 * TILE_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# -- files ----------------------------------------------------------------------------------
