"""IN → BS by intensity: global Otsu from one streaming histogram, absolute values, top-hat."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np

from lightsheet.errors import SegmentError
from lightsheet.regions import Region, map_overlap
from lightsheet.segment._common import (
    _as_volume,
    _ndi_for,
    _positive,
    _to_numpy,
    _voxel_size,
    _xp_for,
)

__all__ = [
    "otsu_threshold",
    "subtract_background",
    "threshold",
]


def _float_key(values: np.ndarray, xp=np) -> Any:
    """Order-preserving map float32 → uint32 (negative floats reversed below positives)."""
    bits = values.astype(xp.float32).view(xp.uint32)
    neg = (bits & xp.uint32(0x80000000)) != 0
    return xp.where(neg, ~bits, bits | xp.uint32(0x80000000))


def _key_to_float(key: np.ndarray) -> np.ndarray:
    key = np.asarray(key, dtype=np.uint32)
    pos = (key & np.uint32(0x80000000)) != 0
    bits = np.where(pos, key & np.uint32(0x7FFFFFFF), ~key)
    return bits.astype(np.uint32).view(np.float32)


def _histogram_block(block: Any) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-block histogram on global fixed bins: (counts, sums or None, non-finite count)."""
    xp = _xp_for(block)
    flat = block.ravel()
    if block.dtype == bool:
        flat = flat.astype(xp.uint8)
    if np.issubdtype(flat.dtype, np.integer) and flat.dtype.itemsize <= 2:
        # one bin per integer value: exact, and the same bins as skimage's integer histogram
        bits = 8 * flat.dtype.itemsize
        shift = 2 ** (bits - 1) if np.issubdtype(flat.dtype, np.signedinteger) else 0
        idx = flat.astype(xp.int64) + shift
        counts = xp.bincount(idx, minlength=2**bits)
        return _to_numpy(counts).astype(np.int64), None, 0
    values = flat.astype(xp.float64)
    finite = xp.isfinite(values)
    n_bad = int(flat.size - int(finite.sum()))
    if n_bad:
        values = values[finite]
    # the top 16 bits of the order-preserving float32 key: 128 bins per octave, global
    key = (_float_key(values, xp) >> xp.uint32(16)).astype(xp.int64)
    counts = xp.bincount(key, minlength=65536)
    sums = xp.bincount(key, weights=values, minlength=65536)
    return _to_numpy(counts).astype(np.int64), _to_numpy(sums), n_bad


#: Histograms summed per task when reducing the blocks' histograms (`otsu_threshold`).
HISTOGRAM_FAN_IN = 16


def _sum_histograms(*parts: tuple) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Sum of `_histogram_block` results (counts, sums or None, non-finite count)."""
    counts = np.sum([p[0] for p in parts], axis=0)
    sums = None if parts[0][1] is None else np.sum([p[1] for p in parts], axis=0)
    return counts, sums, sum(p[2] for p in parts)


def _otsu_from_histogram(counts: np.ndarray, values: np.ndarray) -> int:
    """Index ``k`` (into the non-empty bins) maximising the between-class variance."""
    weights = counts.astype(np.float64)
    w0 = np.cumsum(weights)[:-1]
    s0 = np.cumsum(weights * values)[:-1]
    total_w, total_s = weights.sum(), (weights * values).sum()
    w1 = total_w - w0
    mu0 = s0 / w0
    mu1 = (total_s - s0) / w1
    between = w0 * w1 * (mu0 - mu1) ** 2
    return int(np.argmax(between))


def _compute(compute: Callable[[Any, str], Any] | None, collection: Any, what: str) -> Any:
    """``dask.compute`` of ``collection``, or the caller's ``compute(collection, what)``."""
    return dask.compute(collection)[0] if compute is None else compute(collection, what)


def otsu_threshold(image: Any, *, compute: Callable[[Any, str], Any] | None = None) -> float:
    """Otsu's threshold of the whole volume from one global histogram (one streaming pass).

    Blocks contribute histograms on *fixed* bins shared by all blocks, so one pass suffices
    and no block ever sees a local threshold: integers of up to 16 bits get one bin per
    value (exact); other types are binned on the top 16 bits of their order-preserving
    float32 bit pattern (128 bins per octave, a relative resolution of 0.8 %), each bin
    keeping the sum of its values so class means are exact.

    Parameters
    ----------
    image : (Z, Y, X) dask or NumPy array
        Intensities.
    compute : callable, optional
        ``compute(collection, description)`` runs the pass (a task shows its progress
        this way); default ``dask.compute``.

    Returns
    -------
    threshold : float
        Foreground is ``image > threshold``. A constant image returns its value (empty mask).

    Raises
    ------
    SegmentError
        If the image is not 3-D, or holds NaN or infinite values.

    Examples
    --------
    >>> img = np.zeros((4, 8, 8), np.uint16); img[1:3, 2:6, 2:6] = 1000
    >>> otsu_threshold(da.from_array(img, chunks=2))
    0.0
    """
    image = _as_volume(image, "image")
    parts = [dask.delayed(_histogram_block)(b) for b in image.to_delayed().ravel()]
    # summed on the workers, a few at a time: a histogram is ~1 MB, and a volume can have
    # thousands of blocks (gathering them all made memory grow with the volume)
    while len(parts) > HISTOGRAM_FAN_IN:
        parts = [
            dask.delayed(_sum_histograms)(*parts[i : i + HISTOGRAM_FAN_IN])
            for i in range(0, len(parts), HISTOGRAM_FAN_IN)
        ]
    # at most HISTOGRAM_FAN_IN partial sums reach the client (and count as progress)
    counts, sums, n_bad = _sum_histograms(*_compute(compute, parts, "threshold (histogram)"))
    if n_bad:
        raise SegmentError(
            f"`image` holds {n_bad} NaN or infinite values; expected finite intensities"
        )
    integer = sums is None
    nonempty = np.flatnonzero(counts)
    if integer:
        shift = (
            2 ** (8 * image.dtype.itemsize - 1)
            if np.issubdtype(image.dtype, np.signedinteger)
            else 0
        )
        values = nonempty.astype(np.float64) - shift
    else:
        values = sums[nonempty] / counts[nonempty]
    if nonempty.size == 1:
        return float(values[0])
    k = _otsu_from_histogram(counts[nonempty], values)
    if integer:
        return float(values[k])
    # the largest float32 in bin k: `image > t` splits exactly between bins k and k+1
    top = (np.uint32(nonempty[k]) << np.uint32(16)) | np.uint32(0xFFFF)
    return float(_key_to_float(np.array([top]))[0])


def _tophat_block(block: Any, size: tuple[int, int, int], region: Region | None = None) -> Any:
    nd = _ndi_for(block)
    block = block.astype(_xp_for(block).float32)
    opened = nd.maximum_filter(nd.minimum_filter(block, size=size), size=size)
    return block - opened


def _tophat_geometry(vs, radius_um: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The opening's box (voxels per axis) and its reach (two box half-sizes): the halo."""
    radius_um = _positive(radius_um, "radius_um")
    half = tuple(max(1, round(radius_um / v)) for v in vs)
    return tuple(2 * h + 1 for h in half), tuple(2 * h for h in half)


def _tophat_region(padded: Any, *, region: Region, size: tuple[int, int, int]) -> Any:
    return _tophat_block(padded, size)


def subtract_background(
    image: Any, *, voxel_size_um: Sequence[float], radius_um: float
) -> da.Array:
    """Remove a smooth background with a white top-hat (image minus its grey opening).

    The opening with a box of half-size ``radius_um`` per axis (converted to voxels per
    axis, so anisotropic voxels get the same physical box) removes every bright structure
    narrower than the box; what remains is background. Exact at any chunking: the blocks
    overlap by the opening's full reach (two box half-sizes).

    Parameters
    ----------
    image : (Z, Y, X) dask array
        Intensities.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm.
    radius_um : float
        Half-size of the box; choose it larger than a nucleus radius (e.g. one diameter).

    Returns
    -------
    (Z, Y, X) dask array of float32
        Non-negative background-subtracted intensities, same chunks.
    """
    image = _as_volume(image, "image")
    size, reach = _tophat_geometry(_voxel_size(voxel_size_um), radius_um)
    depth = tuple(min(r, n) for r, n in zip(reach, image.shape, strict=True))
    out = map_overlap(
        _tophat_block,
        image,
        depth=depth,
        boundary="none",
        dtype=np.float32,
        size=size,
        meta=np.empty((0, 0, 0), np.float32),
    )
    return out if out.chunks == image.chunks else out.rechunk(image.chunks)


def threshold(
    image: Any,
    *,
    method: Literal["otsu", "absolute"] = "otsu",
    value: float | None = None,
) -> da.Array:
    """Binary foreground mask from intensities.

    Parameters
    ----------
    image : (Z, Y, X) dask array
        Intensities.
    method : {"otsu", "absolute"}
        ``otsu``: :func:`otsu_threshold` over the whole volume (computed now, one pass);
        ``absolute``: ``value``.
    value : float, optional
        Threshold for ``method="absolute"``.

    Returns
    -------
    mask : (Z, Y, X) dask array of bool
        ``image > threshold``, lazy, same chunks.

    Examples
    --------
    >>> img = da.from_array(np.arange(8, dtype=np.float32).reshape(2, 2, 2), chunks=1)
    >>> int(threshold(img, method="absolute", value=5.5).sum())
    2
    """
    image = _as_volume(image, "image")
    if method == "otsu":
        if value is not None:
            raise SegmentError("`value` is only used with method='absolute'; got method='otsu'")
        t = otsu_threshold(image)
    elif method == "absolute":
        if value is None or not math.isfinite(float(value)):
            raise SegmentError(f"method='absolute' needs a finite threshold `value`; got {value!r}")
        t = float(value)
    else:
        raise SegmentError(f"`method` must be 'otsu' or 'absolute'; got {method!r}")
    return image > t
