"""Richardson–Lucy deconvolution of one block: the Fourier-space kernel.

`richardson_lucy` works on one block, NumPy or CuPy (chosen by the block's type):
float32/complex64 throughout, real FFTs, the OTF and its conjugate computed once per padded
block shape and reused, in-place updates, FFT sizes rounded up to 2·3·5-smooth numbers
(`lightsheet.blocks.next_fast_size`), and a guard against division by zero in dark voxels.
On the CPU each 3-D transform is split into 2-D transforms of z-planes and 1-D transforms of
z-slabs (SciPy's pocketfft, ``workers`` threads), so the element-wise work runs on planes and
slabs while they are in cache (`_PlaneRL`); on a GPU whole-block cuFFT transforms run
through ``cupyx.scipy.fft``. `lightsheet.deconvolve` lifts it over a volume.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft as sfft

from lightsheet.blocks import (
    check_iterations,
    fast_shape,
)
from lightsheet.errors import ImageError
from lightsheet.psf import check_psf_fits, validate_psf

__all__ = ["check_dark_level", "clear_otf_cache", "richardson_lucy"]

#: Bytes of spectrum per z-transform slab on the CPU (`_PlaneRL`) when the L3 cache size
#: is unknown (see `_slab_bytes`).
_SLAB_BYTES = 4 << 20
#: Relative floor of the blurred estimate, as a fraction of the block's maximum: guards
#: the ratio ``image / (psf * estimate)`` against division by zero in dark voxels.
_EPS_REL = 1e-6
#: Bytes of OTFs kept per process (each entry holds the OTF and its conjugate).
_OTF_CACHE_BYTES = 2 << 30
# --------------------------------------------------------------------------- sizes


def _psf_half(psf_shape: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(s) // 2 for s in psf_shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class _Backend:
    """Array module and whole-array real FFTs for one array type.

    ``forward``/``inverse`` take an optional preallocated output and return the result
    (that output when the library can write into it, a new array otherwise); ``inverse``
    may overwrite its input spectrum.
    """

    name: str
    xp: Any
    forward: Callable[[Any, tuple, Any], Any]
    inverse: Callable[[Any, tuple, Any], Any]
    device: int
    workers: int


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def _pocketfft() -> Any:
    """SciPy's pocketfft binding, whose transforms write into given arrays, or None.

    Writing into reused buffers saves the page faults of fresh arrays (about a third of
    the transform time for large blocks). It is a private SciPy module, so the calls the
    kernel makes (2-D plane transforms, in-place z transforms of a strided slab, a whole
    3-D forward) are probed on a tiny array and it is skipped if anything differs; the
    public ``scipy.fft`` is then used.
    """
    try:
        # private SciPy API: its out= buffers make RL 1.37x faster than scipy.fft on a
        # 64x256x256 block (benchmarks/results/private_apis.md); tests/test_private_apis.py
        from scipy.fft._pocketfft import pypocketfft as pp

        a = np.arange(60, dtype=np.float32).reshape(3, 4, 5) % 7
        spec = np.empty((3, 4, 3), np.complex64)
        out = np.empty_like(a)
        for k in range(3):
            pp.r2c(a[k], axes=(0, 1), forward=True, inorm=0, out=spec[k], nthreads=1)
        slab = spec[:, 1:3]
        pp.c2c(slab, axes=(0,), forward=True, inorm=0, out=slab, nthreads=1)
        whole = pp.r2c(a, axes=(0, 1, 2), forward=True, inorm=0, out=None, nthreads=1)
        same = np.allclose(slab, whole[:, 1:3], atol=1e-3)
        pp.c2c(slab, axes=(0,), forward=False, inorm=2, out=slab, nthreads=1)
        for k in range(3):
            pp.c2c(spec[k], axes=(0,), forward=False, inorm=2, out=spec[k], nthreads=1)
            pp.c2r(spec[k], axes=(1,), lastsize=5, forward=False, inorm=2, out=out[k], nthreads=1)
        return pp if same and np.allclose(out, a, atol=1e-4) else None
    except Exception:  # any API difference: fall back to the public scipy.fft
        return None


def _backend(image: Any, workers: int | None) -> _Backend:
    """Pick NumPy/scipy.fft or CuPy/cuFFT from the block's array type."""
    if type(image).__module__.split(".")[0] == "cupy":
        import cupy
        import cupyx.scipy.fft as cufft

        # cuFFT plans are cached and reused by CuPy's per-device plan cache; outputs come
        # from CuPy's memory pool, so there is nothing to preallocate
        return _Backend(
            "cupy",
            cupy,
            lambda x, s, out: cufft.rfftn(x, s=s),
            lambda x, s, out: cufft.irfftn(x, s=s, overwrite_x=True),
            int(cupy.cuda.Device().id),
            1,
        )
    w = _cpu_count() if workers is None else int(workers)
    if w < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    pp = _pocketfft()
    if pp is None:
        return _Backend(
            "numpy",
            np,
            lambda x, s, out: sfft.rfftn(x, s=s, workers=w),
            lambda x, s, out: sfft.irfftn(x, s=s, workers=w, overwrite_x=True),
            -1,
            w,
        )
    axes = (0, 1, 2)

    def forward(x: np.ndarray, s: tuple, out: np.ndarray | None) -> np.ndarray:
        return pp.r2c(x, axes=axes, forward=True, inorm=0, out=out, nthreads=w)

    def inverse(spec: np.ndarray, s: tuple, out: np.ndarray | None) -> np.ndarray:
        # complex inverse over z, y in place, then complex-to-real over x: no temporaries
        pp.c2c(spec, axes=axes[:-1], forward=False, inorm=2, out=spec, nthreads=w)
        return pp.c2r(
            spec, axes=axes[-1:], lastsize=s[-1], forward=False, inorm=2, out=out, nthreads=w
        )

    return _Backend("numpy", np, forward, inverse, -1, w)


# --------------------------------------------------------------------------- OTF cache

_otf_cache: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
_otf_lock = threading.Lock()


def clear_otf_cache() -> None:
    """Drop the cached OTFs (they are rebuilt on demand)."""
    with _otf_lock:
        _otf_cache.clear()


def _psf_key(psf: np.ndarray) -> str:
    return hashlib.blake2b(psf.tobytes(), digest_size=16).hexdigest() + str(psf.shape)


def _otf(psf: np.ndarray, shape: tuple[int, ...], be: _Backend) -> tuple[Any, Any]:
    """OTF of ``psf`` (centred on voxel 0) at ``shape`` and its conjugate, cached."""
    key = (_psf_key(psf), shape, be.name, be.device)
    with _otf_lock:
        hit = _otf_cache.get(key)
        if hit is not None:
            _otf_cache.move_to_end(key)
            return hit
    xp = be.xp
    embedded = np.zeros(shape, dtype=np.float32)
    embedded[tuple(slice(0, s) for s in psf.shape)] = psf
    # roll the PSF's centre voxel to the origin so convolution does not shift the image
    embedded = np.roll(embedded, [-(s // 2) for s in psf.shape], axis=(0, 1, 2))
    otf = be.forward(xp.asarray(embedded), shape, None).astype(np.complex64, copy=False)
    entry = (otf, xp.conj(otf))
    size = 2 * otf.nbytes
    with _otf_lock:
        _otf_cache[key] = entry
        total = sum(2 * v[0].nbytes for v in _otf_cache.values())
        while len(_otf_cache) > 1 and total > max(_OTF_CACHE_BYTES, size):
            _, old = _otf_cache.popitem(last=False)
            total -= 2 * old[0].nbytes
    return entry


# --------------------------------------------------------------------------- validation


def _triple_int(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    vals = (value,) * 3 if np.isscalar(value) else tuple(value)  # type: ignore[arg-type]
    if len(vals) != 3 or any(int(v) != v or v < 0 for v in vals):
        raise ValueError(f"{name} must be a non-negative int or three of them; got {value!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def check_dark_level(value: Any, name: str = "background", error: type = ValueError) -> float:
    """``value`` as a float: a finite real number >= 0, else ``error`` naming ``name``.

    The one check of a stated level of no light (Richardson–Lucy's ``background``, the
    segment stage's ``camera_offset``): numbers only, so ``"100"`` or ``True`` is refused too.
    """
    real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value >= 0):
        raise error(
            f"{name}: got {value!r}; expected the image's reading with no light "
            "(a camera's offset), a finite number >= 0"
        )
    return float(value)


def _check_values(
    block: Any,
    *,
    offset: Sequence[int] = (0, 0, 0),
    shape: Sequence[int] | None = None,
    where: str = "",
    name: str = "image",
) -> None:
    """Raise `ImageError` for NaN, infinite or negative intensities, naming ``name``'s voxel.

    ``offset`` is the volume index of ``block[0, 0, 0]``; indices outside a volume of
    ``shape`` are mirrored back (dask's "reflect" halo at the volume's edges).
    """
    if block.size == 0:
        return
    lo, hi = float(block.min()), float(block.max())
    if not (math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or math.isinf(hi) or lo < 0):
        return
    xp = _backend(block, 1).xp
    for bad, what, expected in (
        (xp.isnan(block), "NaN", "finite intensities"),
        (xp.isinf(block), "infinite values", "finite intensities"),
        (
            block < 0,
            f"negative intensities (min {lo:.4g})",
            "non-negative data for Richardson–Lucy (clip or offset it first, or leave it "
            "undeconvolved: deconvolve.enabled, deconvolve.channels)",
        ),
    ):
        hits = xp.argwhere(bad)
        if len(hits):
            voxel = [int(v) + int(o) for v, o in zip(hits[0].tolist(), offset, strict=True)]
            if shape is not None:
                voxel = [_mirror(v, n) for v, n in zip(voxel, shape, strict=True)]
            voxel = tuple(voxel)
            raise ImageError(
                f"{name}: contains {what}, first at voxel (z, y, x) = {voxel}{where}; "
                f"expected {expected}"
            )


def _mirror(index: int, size: int) -> int:
    """Fold an index outside ``[0, size)`` back in by symmetric reflection."""
    period = 2 * size
    index %= period
    return index if index < size else period - 1 - index


# --------------------------------------------------------------------------- kernel


def richardson_lucy(
    image: Any,
    psf: np.ndarray,
    *,
    iterations: int = 10,
    acceleration: bool = False,
    pad_width: int | Sequence[int] | None = None,
    eps: float | None = None,
    workers: int | None = None,
    check: bool = True,
    background: float = 0.0,
) -> Any:
    """Deconvolve one block with Richardson–Lucy iterations in Fourier space.

    Each iteration computes ``estimate *= psf⋆ (image / max(background + psf * estimate,
    eps))`` with two forward and two inverse real FFTs; with ``acceleration`` the estimate is first
    extrapolated along its last step (Biggs & Andrews, Appl. Opt. 36, 1997), which reaches
    the same quality in about half the iterations.

    Parameters
    ----------
    image : (Z, Y, X) numpy.ndarray or cupy.ndarray
        Non-negative intensities, any real dtype. A CuPy array runs on its GPU.
    psf : (z, y, x) ndarray
        Point-spread function at the image's voxel size; validated, recentred and
        normalised to sum 1 (`lightsheet.psf.validate_psf`).
    iterations : int
        Number of iterations, >= 1.
    acceleration : bool
        Biggs–Andrews vector extrapolation.
    pad_width : int or (3,) ints, optional
        Mirror padding per side before the (periodic) FFTs, so the volume's edges do not
        ring. Default: the PSF's half-size. `deconvolve` passes 0 because its halo
        already holds the neighbours. The padded block is further extended to fast FFT
        sizes (`fast_shape`).
    eps : float, optional
        Floor of the blurred estimate in the ratio. Default: 1e-6 × the block's maximum.
    workers : int, optional
        CPU threads for FFTs and element-wise passes; default all usable cores.
    check : bool
        Reject NaN, infinite and negative intensities (one pass over the block).
    background : float
        What the image reads where no light falls (a camera's offset, its dark level), in
        the image's units, >= 0. Richardson–Lucy's model is light with Poisson noise: the
        background is not light, so the model is ``background + psf * estimate``, the
        estimate starts from ``max(image - background, floor)``, and ``background`` is added
        back to the result (which keeps the image's units and level). Counted as light
        instead, an offset lifts the dark outside off zero, where positivity no longer
        holds the estimate's ringing down: a bright cell deconvolved with a long axial PSF
        echoes along z about two sheet FWHMs away, a few per cent as bright, and in a dark
        outside such an echo stands out as a cell.

    Returns
    -------
    estimate : (Z, Y, X) ndarray of float32
        Same array type (NumPy or CuPy) as ``image``.

    Raises
    ------
    PSFError
        Unusable PSF (see `validate_psf`), or larger than the padded image.
    ImageError
        ``image`` is not 3-D, or holds NaN, infinite or negative values.
    ValueError
        ``iterations`` < 1 or a bad ``pad_width``/``workers``.

    Examples
    --------
    >>> from lightsheet.psf import gaussian_psf
    >>> from scipy.ndimage import convolve
    >>> truth = np.zeros((16, 16, 16), np.float32); truth[8, 8, 8] = 1000
    >>> psf = gaussian_psf((1.5, 1.5, 1.5), (1.0, 1.0, 1.0))
    >>> blurred = convolve(truth, psf, mode="reflect")
    >>> out = richardson_lucy(blurred, psf, iterations=30)
    >>> bool(out[8, 8, 8] > 3 * blurred[8, 8, 8])
    True
    """
    iterations = check_iterations(iterations)
    if getattr(image, "ndim", None) != 3:
        raise ImageError(
            f"image: expected a 3-D (Z, Y, X) array; got shape {getattr(image, 'shape', None)}"
        )
    psf = validate_psf(_to_numpy(psf))
    be = _backend(image, workers)
    half = _psf_half(psf.shape)
    pad = half if pad_width is None else _triple_int(pad_width, "pad_width")
    padded = tuple(s + 2 * p for s, p in zip(image.shape, pad, strict=True))
    check_psf_fits(psf.shape, padded, what="padded image")
    if check:
        _check_values(image)
    background = check_dark_level(background)
    shape = fast_shape(padded)
    xp = be.xp

    # mirror the edges (dask's "reflect" is numpy's "symmetric"), extra fast-size pad at the end
    widths = [(p, p + f - q) for p, q, f in zip(pad, padded, shape, strict=True)]
    img = image.astype(np.float32, copy=False)
    if any(a or b for a, b in widths):
        img = xp.pad(img, widths, mode="symmetric")
    img = xp.ascontiguousarray(img)
    hi = float(img.max()) if img.size else 0.0
    floor = float(eps) if eps is not None else max(_EPS_REL * hi, float(np.finfo(np.float32).tiny))
    otf, otf_conj = _otf(psf, shape, be)

    start = xp.maximum(img - np.float32(background), np.float32(floor)) if background else img
    if be.name == "numpy":
        with _PlaneRL(img, otf, otf_conj, floor, be.workers, background) as rl:
            est = rl.accelerated(start, iterations) if acceleration else rl.plain(start, iterations)
    else:  # whole-array transforms (the GPU)
        correction = partial(
            _correction, img, otf=otf, otf_conj=otf_conj, floor=floor, background=background,
            shape=shape, be=be,
        )  # fmt: skip
        if acceleration:
            est = _iterate_accelerated(start, correction, iterations, be)
        else:
            est = start.copy()
            for _ in range(iterations):
                est *= correction(est)
    if background:
        est += np.float32(background)
    crop = tuple(slice(p, p + s) for p, s in zip(pad, image.shape, strict=True))
    if est.shape == tuple(image.shape):
        return est
    return xp.ascontiguousarray(est[crop])


class _PlaneRL:
    """Richardson–Lucy on the CPU, its 3-D FFTs split so that each pass works in cache.

    A 3-D real transform is done as 2-D transforms of z-planes and 1-D transforms along z
    of y-slabs of the spectrum. One pass over the planes does a plane's 2-D inverse, the
    element-wise step (the guarded ratio, or the update) and the next 2-D forward while
    the plane is in cache; one pass over the slabs does the forward z transform, the OTF
    product and the inverse z transform of a slab likewise. An iteration thus streams the
    volume through memory four times, where whole-volume 3-D transforms and separate
    element-wise passes stream it about sixteen times; the FFT arithmetic is the same.
    Planes and slabs are split across ``workers`` threads (pocketfft releases the GIL).
    """

    def __init__(
        self,
        img: np.ndarray,
        otf: np.ndarray,
        otf_conj: np.ndarray,
        floor: float,
        workers: int,
        background: float = 0.0,
    ):
        nz, ny, nx = img.shape
        self.img, self.otf, self.otf_conj, self.floor = img, otf, otf_conj, floor
        self.background = np.float32(background)
        self.spec = np.empty((nz, ny, nx // 2 + 1), np.complex64)
        self.workers = max(1, min(int(workers), nz, ny))
        self.scratch = [np.empty((ny, nx), np.float32) for _ in range(self.workers)]
        row_bytes = nz * self.spec.shape[2] * self.spec.itemsize
        self.rows = max(1, _slab_bytes(self.workers) // row_bytes)
        self.pp = _pocketfft()
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __enter__(self) -> _PlaneRL:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    # -- scheduling

    def _split(self, fn: Callable[[int, int, int], None], n: int) -> None:
        """``fn(lo, hi, thread)`` over ``range(n)`` cut into one contiguous run per thread."""
        bounds = np.linspace(0, n, self.workers + 1).astype(int)
        if self.pool is None:
            fn(0, n, 0)
            return
        runs = [
            self.pool.submit(fn, int(bounds[t]), int(bounds[t + 1]), t) for t in range(self.workers)
        ]
        for run in runs:
            run.result()

    def planes(self, fn: Callable[[int, int], None]) -> None:
        """``fn(z, thread)`` for every z-plane."""

        def run(lo: int, hi: int, t: int) -> None:
            for k in range(lo, hi):
                fn(k, t)

        self._split(run, self.spec.shape[0])

    # -- transforms

    def forward2(self, real: np.ndarray, k: int) -> None:
        """``spec[k]`` = the 2-D real FFT (y, x) of the plane ``real``."""
        if self.pp is not None:
            self.pp.r2c(real, axes=(0, 1), forward=True, inorm=0, out=self.spec[k], nthreads=1)
        else:
            self.spec[k] = sfft.rfft2(real, workers=1)

    def inverse2(self, k: int, out: np.ndarray) -> np.ndarray:
        """``out`` = the 2-D inverse of ``spec[k]`` (normalised; ``spec[k]`` is overwritten)."""
        plane = self.spec[k]
        if self.pp is not None:
            self.pp.c2c(plane, axes=(0,), forward=False, inorm=2, out=plane, nthreads=1)
            self.pp.c2r(
                plane, axes=(1,), lastsize=out.shape[1], forward=False, inorm=2, out=out, nthreads=1
            )
        else:
            out[...] = sfft.irfft2(plane, s=out.shape, workers=1)
        return out

    def blur(self, otf: np.ndarray) -> None:
        """Along z: forward transform, times ``otf``, inverse (normalised), slab by slab."""

        def run(lo: int, hi: int, t: int) -> None:
            for a in range(lo, hi, self.rows):
                b = min(a + self.rows, hi)
                slab = self.spec[:, a:b]
                if self.pp is not None:
                    self.pp.c2c(slab, axes=(0,), forward=True, inorm=0, out=slab, nthreads=1)
                    np.multiply(slab, otf[:, a:b], out=slab)
                    self.pp.c2c(slab, axes=(0,), forward=False, inorm=2, out=slab, nthreads=1)
                else:
                    slab[...] = sfft.ifft(sfft.fft(slab, axis=0) * otf[:, a:b], axis=0)

        self._split(run, self.spec.shape[1])

    def correct(self, finish: Callable[[int, np.ndarray, int], None]) -> None:
        """``finish(z, corr, thread)`` with each plane of ``psf⋆ (img / max(psf * est, floor))``.

        On entry ``spec`` holds the 2-D transforms of the estimate's planes (`forward2`).
        """

        def ratio(k: int, t: int) -> None:
            r = self.inverse2(k, self.scratch[t])
            if self.background:
                r += self.background
            # guard against division by zero in dark voxels
            np.maximum(r, self.floor, out=r)
            np.divide(self.img[k], r, out=r)
            self.forward2(r, k)

        self.blur(self.otf)
        self.planes(ratio)
        self.blur(self.otf_conj)
        self.planes(lambda k, t: finish(k, self.inverse2(k, self.scratch[t]), t))

    # -- iterations

    def plain(self, start: np.ndarray, iterations: int) -> np.ndarray:
        """``est *= correction`` ``iterations`` times, starting from ``start``."""
        est = start.copy()
        self.planes(lambda k, t: self.forward2(est[k], k))
        for i in range(iterations):
            more = i < iterations - 1

            def update(k: int, corr: np.ndarray, t: int, more: bool = more) -> None:
                np.multiply(est[k], corr, out=est[k])
                if more:  # the next iteration's forward transform, while the plane is in cache
                    self.forward2(est[k], k)

            self.correct(update)
        return est

    def accelerated(self, start: np.ndarray, iterations: int) -> np.ndarray:
        """Biggs–Andrews accelerated RL (see `_iterate_accelerated`) from ``start``, by plane.

        The step's two inner products are summed per plane in the same pass, in float64.
        """
        x = start.copy()
        x_prev, y, g_new, g_old = x.copy(), np.empty_like(x), np.empty_like(x), np.zeros_like(x)
        alpha = 0.0
        for i in range(iterations):
            sums = np.zeros((self.workers, 2))
            self.planes(partial(self._extrapolate, x=x, x_prev=x_prev, y=y, alpha=alpha))
            # x_prev is no longer needed: the next estimate is written over it
            self.correct(partial(self._step, y=y, g_new=g_new, g_old=g_old, out=x_prev, sums=sums))
            x, x_prev = x_prev, x
            alpha = _step_size(*sums.sum(axis=0)) if i >= 1 else 0.0
            g_old, g_new = g_new, g_old
        return x

    def _extrapolate(self, k: int, t: int, *, x, x_prev, y, alpha: float) -> None:
        """``y = max(x + α (x - x_prev), 0)`` (the estimate stays non-negative), transformed."""
        np.subtract(x[k], x_prev[k], out=y[k])
        y[k] *= alpha
        y[k] += x[k]
        np.maximum(y[k], 0, out=y[k])
        self.forward2(y[k], k)

    @staticmethod
    def _step(k: int, corr: np.ndarray, t: int, *, y, g_new, g_old, out, sums) -> None:
        """``g = y·corr - y`` and ``out = y + g``; ``sums[t]`` += ``<g, g_old>, <g_old, g_old>``."""
        corr -= 1
        np.multiply(y[k], corr, out=g_new[k])
        np.add(y[k], g_new[k], out=out[k])
        gn, go = g_new[k].reshape(-1), g_old[k].reshape(-1)
        sums[t] += (float(np.dot(gn, go)), float(np.dot(go, go)))


@lru_cache(maxsize=16)
def _slab_bytes(workers: int) -> int:
    """Spectrum bytes per z-slab: a quarter of the L3 cache's share per thread.

    A slab and its OTF slab stay in cache from the forward z transform through the
    product to the inverse; wider slabs give pocketfft more pencils per pass (on a 32 MiB
    L3 with 2 threads, 4 MiB slabs ran the z passes about 20 % faster than 1 MiB ones).
    """
    l3 = _l3_cache_bytes()
    if l3 <= 0:
        return _SLAB_BYTES
    return int(min(max(l3 // (4 * max(1, workers)), 256 << 10), 16 << 20))


def _l3_cache_bytes() -> int:
    """The L3 cache's size from Linux sysfs, or 0 where it is not known."""
    try:
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * unit
    except (OSError, ValueError):
        pass
    return 0


def _step_size(num: float, den: float) -> float:
    """Biggs–Andrews ``α = <g_k, g_{k-1}> / <g_{k-1}, g_{k-1}>`` clipped to ``[0, 1)``."""
    return min(max(num / den, 0.0), 0.9999) if den > 0 else 0.0


def _correction(
    img: Any,
    est: Any,
    otf: Any,
    otf_conj: Any,
    floor: float,
    background: float,
    shape: tuple,
    be: _Backend,
) -> Any:
    """``psf⋆ (img / max(background + psf * est, floor))``, whole-array FFTs (the GPU path)."""
    xp = be.xp
    spec = be.forward(est, shape, None)
    spec *= otf
    conv = be.inverse(spec, shape, None)
    if background:
        conv += np.float32(background)
    # guard against division by zero in dark voxels
    xp.maximum(conv, floor, out=conv)
    xp.divide(img, conv, out=conv)
    spec = be.forward(conv, shape, None)
    spec *= otf_conj
    return be.inverse(spec, shape, None)


def _iterate_accelerated(
    start: Any, correction: Callable[..., Any], iterations: int, be: _Backend
) -> Any:
    """Biggs–Andrews accelerated RL from ``start``: ``y = x + α (x - x_prev)``, ``x_next = RL(y)``.

    ``α = <g_k, g_{k-1}> / <g_{k-1}, g_{k-1}>`` clipped to ``[0, 1)``, where
    ``g_k = RL(y_k) - y_k`` is the change made by the k-th plain step, and ``correction(y)``
    is `_correction`'s factor for the estimate ``y``.
    """
    xp = be.xp
    x = start.copy()
    x_prev = x.copy()
    g_old = xp.zeros_like(x)
    alpha = 0.0
    for i in range(iterations):
        # the estimate must stay non-negative
        y = xp.maximum(x + alpha * (x - x_prev), 0)
        g_new = y * (correction(y) - 1)
        x_prev, x = x, y + g_new
        if i >= 1:
            alpha = _step_size(float(xp.vdot(g_new, g_old)), float(xp.vdot(g_old, g_old)))
        g_old = g_new
    return x


def _to_numpy(a: Any) -> np.ndarray:
    """Host copy of a NumPy/CuPy array (PSFs are small)."""
    get = getattr(a, "get", None)
    return np.asarray(get() if callable(get) and type(a).__module__.startswith("cupy") else a)
