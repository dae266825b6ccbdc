"""Segmentation: intensity → binary mask → instance labels → one row per cell.

Every step is exact at any chunking: the result on a chunked volume equals the result on
the same volume held in one chunk (labels equal up to renumbering).

* **IN → BS** :func:`threshold` — an absolute value, or Otsu's threshold from *one* global
  histogram built in a single streaming pass (:func:`otsu_threshold`), optionally after a
  top-hat background subtraction (:func:`subtract_background`), or a nucleus probability:
  the UNet's own head, or a pixel classifier on the UNet features trained from ground truth
  or sparse user labels (:func:`train_pixel_classifier`, :func:`classify`).
* **BS → OS** :func:`label` — connected components with ids unique over the volume: each
  block is labelled on its own, neighbouring blocks are joined using only their face planes
  (small), a union–find over the face pairs runs on the client (small), and blocks are
  relabelled lazily. :func:`watershed` splits touching nuclei: every foreground voxel follows
  its steepest ascent on the (clipped) distance transform to a peak; paths that leave a block
  are continued through the neighbour's face, so basins never depend on the chunking; basins
  whose peak rises less than ``split_depth_um`` above the saddle to a higher neighbour are
  merged (a dynamics / h-maxima criterion evaluated on a table of saddles).
* **One analysis pass** — inside :func:`segment_volume` the pass that finds the face
  equivalences (or the watershed's peaks and saddles) also yields the measurement partials
  keyed by provisional ids, so the table needs no extra pass; the labels are computed once
  more when written.
* **OS → cells** :func:`measure` — per-block partial sums per label (count, coordinate sums,
  intensity sum/max, bounding box) combined on the client: each cell once, whatever the
  chunking. :func:`count_map` — cells per block (by centroid). :func:`segment_volume` chains
  everything from a :class:`~lightsheet.config.SegmentConfig`.

Connectivity: the structuring element is ``scipy.ndimage.generate_binary_structure(3,
connectivity)``; ``connectivity=1`` (default, SciPy's default) joins voxels sharing a face
(6-neighbourhood), ``2`` also edges (18), ``3`` also corners (26).

Passes over the data are recomputed rather than held: a label array is lazy and recomputes
its blocks' local labelling when read, so memory stays bounded by a few chunks (persist the
input on a cluster if recomputation costs more than memory).

CuPy: the block kernels choose ``cupyx.scipy.ndimage`` when the block is a CuPy array
(imported lazily); small per-block tables are always NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lightsheet.config import SegmentConfig
from lightsheet.errors import SegmentError
from lightsheet.regions import Region, is_stored, map_overlap

#: Columns of :func:`measure`'s table, in order (bounding boxes in voxels, min inclusive,
#: max exclusive, like Python slices).
TABLE_COLUMNS = (
    "label",
    "z_um",
    "y_um",
    "x_um",
    "volume_um3",
    "mean_intensity",
    "max_intensity",
    "bbox_z_min",
    "bbox_y_min",
    "bbox_x_min",
    "bbox_z_max",
    "bbox_y_max",
    "bbox_x_max",
)

_UINT32_MAX = np.iinfo(np.uint32).max


# --------------------------------------------------------------------------- helpers


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _ndi_for(a: Any):
    """``scipy.ndimage`` for NumPy blocks, ``cupyx.scipy.ndimage`` for CuPy blocks."""
    if _is_cupy(a):
        import cupyx.scipy.ndimage as cndi

        return cndi
    return ndi


def _xp_for(a: Any):
    if _is_cupy(a):
        import cupy

        return cupy
    return np


def _to_numpy(a: Any) -> np.ndarray:
    return a.get() if _is_cupy(a) else np.asarray(a)


def structure(connectivity: int = 1) -> np.ndarray:
    """Structuring element used for connectivity.

    Parameters
    ----------
    connectivity : {1, 2, 3}
        1: faces (6-neighbourhood), 2: faces and edges (18), 3: also corners (26).

    Returns
    -------
    structure : (3, 3, 3) ndarray of bool

    Examples
    --------
    >>> int(structure(1).sum()), int(structure(3).sum())
    (7, 27)
    """
    if connectivity not in (1, 2, 3):
        raise SegmentError(f"connectivity must be 1, 2 or 3; got {connectivity!r}")
    return ndi.generate_binary_structure(3, connectivity)


def _as_volume(image: Any, name: str) -> da.Array:
    if not isinstance(image, da.Array):
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            raise SegmentError(
                f"`{name}` must be a 3-D (Z, Y, X) array; got {type(image).__name__}"
            )
        image = da.asarray(image)
    if image.ndim != 3:
        raise SegmentError(
            f"`{name}` must be a 3-D (Z, Y, X) array; got {image.ndim} dimensions "
            f"with shape {image.shape}"
        )
    if 0 in image.shape:
        raise SegmentError(f"`{name}` is empty: shape {image.shape}")
    return image


def _as_mask(mask: Any) -> da.Array:
    mask = _as_volume(mask, "mask")
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise SegmentError(
        f"`mask` must be boolean (or integer, nonzero = foreground); got dtype {mask.dtype}"
    )


def _voxel_size(voxel_size_um: Any) -> tuple[float, float, float]:
    try:
        vs = tuple(float(v) for v in voxel_size_um)
    except TypeError:
        raise SegmentError(
            f"`voxel_size_um` must be three positive numbers (z, y, x); got {voxel_size_um!r}"
        ) from None
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise SegmentError(
            f"`voxel_size_um` must be three positive numbers (z, y, x); got {voxel_size_um!r}"
        )
    return vs  # type: ignore[return-value]


def _positive(value: Any, name: str) -> float:
    if value is None or not (isinstance(value, int | float) and math.isfinite(value)) or value <= 0:
        raise SegmentError(f"`{name}` must be a positive number; got {value!r}")
    return float(value)


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned type that holds ``max_label``: uint32, else uint64 (never wraps)."""
    return np.dtype(np.uint32) if max_label <= _UINT32_MAX else np.dtype(np.uint64)


def _block_origins(chunks: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    return [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in chunks]


def _pad_widths(block_id: tuple[int, ...], numblocks: tuple[int, ...], depth: int = 1):
    lo = tuple(depth if i > 0 else 0 for i in block_id)
    hi = tuple(depth if i < n - 1 else 0 for i, n in zip(block_id, numblocks, strict=True))
    return lo, hi


def _check_offset(offset: int) -> int:
    if not isinstance(offset, int | np.integer) or offset < 0:
        raise SegmentError(f"`offset` must be a non-negative integer; got {offset!r}")
    return int(offset)


# --------------------------------------------------------------------------- IN → BS


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


def _tophat_block(block: Any, size: tuple[int, int, int]) -> Any:
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
    depth = {a: min(r, image.shape[a]) for a, r in enumerate(reach)}
    out = image.map_overlap(
        _tophat_block,
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


@dataclass(frozen=True)
class PixelClassifier:
    """Logistic regression from per-voxel features to nucleus probability.

    Attributes
    ----------
    mean, scale : (F,) ndarray of float64
        Feature standardisation.
    weights : (F,) ndarray of float64
    bias : float
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def to_dict(self) -> dict:
        """JSON-ready parameters (for storing beside a run)."""
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": float(self.bias),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PixelClassifier:
        """Inverse of :meth:`to_dict`."""
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "weights")}
        if not arrays["mean"].shape == arrays["scale"].shape == arrays["weights"].shape:
            raise SegmentError("pixel classifier: mean, scale and weights differ in length")
        return cls(bias=float(d["bias"]), **arrays)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(F, ...) features → (...) float32 probability."""
        f = np.moveaxis(np.asarray(features, dtype=np.float64), 0, -1)
        z = ((f - self.mean) / self.scale) @ self.weights + self.bias
        return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)


def _sample_labelled(features, labels, budget: int, seed: int):
    lab = _to_numpy(labels).ravel()
    idx = np.flatnonzero(lab)
    if idx.size > budget:
        idx = np.random.default_rng(seed).choice(idx, budget, replace=False)
    f = _to_numpy(features).reshape(features.shape[0], -1)[:, idx].T.astype(np.float64)
    return f, lab[idx]


def train_pixel_classifier(
    features: da.Array,
    labels: Any,
    *,
    max_voxels: int = 200_000,
    l2: float = 1e-3,
    seed: int = 0,
) -> PixelClassifier:
    """Fit a pixel classifier on (sparse) labelled voxels.

    Parameters
    ----------
    features : (F, Z, Y, X) dask array
        Per-voxel features (e.g. from the UNet).
    labels : (Z, Y, X) array of int or bool
        ``bool``: the whole ground-truth foreground (every voxel labelled). Integers: sparse
        user labels, 0 unlabelled, 1 background, 2 nucleus.
    max_voxels : int
        Labelled voxels used (a random sample, spread over the blocks).
    l2 : float
        Ridge penalty on the standardised weights.
    seed : int
        Sampling seed.

    Returns
    -------
    PixelClassifier
        Class-balanced logistic regression (Newton iterations).
    """
    features = _as_features(features)
    labels = _as_volume(labels, "labels")
    if labels.shape != features.shape[1:]:
        raise SegmentError(
            f"`labels` shape {labels.shape} differs from the features' (Z, Y, X) "
            f"{features.shape[1:]}"
        )
    if labels.dtype == bool:
        labels = labels.astype(np.uint8) + 1  # every voxel: 1 background, 2 nucleus
    elif not np.issubdtype(labels.dtype, np.integer):
        raise SegmentError(f"`labels` must be bool or integer; got dtype {labels.dtype}")
    labels = labels.rechunk(features.chunks[1:])
    per_block = max(1, max_voxels // math.prod(labels.numblocks))
    fb, lb = features.to_delayed(), labels.to_delayed()
    parts = dask.compute(
        *[
            dask.delayed(_sample_labelled)(fb[(0, *idx)], lb[idx], per_block, seed + k)
            for k, idx in enumerate(np.ndindex(labels.numblocks))
        ]
    )
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if not set(np.unique(y).tolist()) <= {1, 2}:
        raise SegmentError(
            f"`labels` values must be 0 (unlabelled), 1 (background) or 2 (nucleus); "
            f"found {sorted(set(np.unique(y).tolist()) - {1, 2})}"
        )
    if (y == 1).sum() == 0 or (y == 2).sum() == 0:
        raise SegmentError("`labels` must mark both background (1) and nucleus (2) voxels")
    t = (y == 2).astype(np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0  # constant features carry no information
    xs = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    # balance the classes: sparse labels rarely mark as many nucleus as background voxels
    sw = np.where(t == 1, 0.5 / t.mean(), 0.5 / (1 - t.mean()))
    w = np.zeros(xs.shape[1])
    reg = l2 * np.r_[np.ones(xs.shape[1] - 1), 0.0] * len(t)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ w, -50, 50)))
        grad = xs.T @ (sw * (p - t)) + reg * w
        hess = (xs * (sw * p * (1 - p))[:, None]).T @ xs + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return PixelClassifier(mean=mean, scale=scale, weights=w[:-1], bias=float(w[-1]))


def _as_features(features: Any) -> da.Array:
    if not isinstance(features, da.Array):
        features = da.asarray(features)
    if features.ndim != 4:
        raise SegmentError(
            f"`features` must be a 4-D (F, Z, Y, X) array; got shape {features.shape}"
        )
    if features.numblocks[0] != 1:
        features = features.rechunk({0: -1})  # all features of a voxel in one block
    return features


def _predict_block(block, classifier: PixelClassifier):
    return classifier.predict(_to_numpy(block))


def classify(features: da.Array, classifier: PixelClassifier) -> da.Array:
    """Nucleus probability per voxel from features, lazily.

    Parameters
    ----------
    features : (F, Z, Y, X) dask array
    classifier : PixelClassifier

    Returns
    -------
    (Z, Y, X) dask array of float32 in [0, 1], the features' spatial chunks.
    """
    features = _as_features(features)
    if features.shape[0] != classifier.weights.size:
        raise SegmentError(
            f"`features` has {features.shape[0]} features; the classifier was trained on "
            f"{classifier.weights.size}"
        )
    return features.map_blocks(
        _predict_block,
        classifier,
        drop_axis=0,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


# --------------------------------------------------------------------------- labels


def _encode(local: np.ndarray, block_flat: int) -> np.ndarray:
    """Local labels → int64 keys ``block << 32 | local`` (0 stays background)."""
    local = local.astype(np.int64)
    return np.where(local > 0, (np.int64(block_flat) << 32) | local, 0)


def _label_local(block: Any, struct: np.ndarray) -> tuple[Any, int]:
    nd = _ndi_for(block)
    xp = _xp_for(block)
    out = xp.int32 if block.size < 2**31 else xp.int64
    lab = xp.empty(block.shape, dtype=out)
    n = nd.label(block, structure=xp.asarray(struct), output=lab)
    return lab, int(n)


def _label_faces(
    block: Any, struct: np.ndarray, block_flat: int, has_lo, has_hi, image=None, origin=None
) -> dict:
    """Label one block; keep its count, encoded face planes and (with ``image``) partials."""
    lab, n = _label_local(block, struct)
    out: dict = {"n": n}
    if image is not None:
        out["parts"] = _measure_block(_encode(_to_numpy(lab), block_flat), image, origin)
    for axis in range(3):
        if has_lo[axis]:
            out[(axis, 0)] = _encode(_to_numpy(lab.take(0, axis=axis)), block_flat)
        if has_hi[axis]:
            out[(axis, 1)] = _encode(_to_numpy(lab.take(-1, axis=axis)), block_flat)
    return out


def _extended_plane(center: np.ndarray, around: dict) -> np.ndarray:
    """The neighbour's face plane with a one-voxel rim taken from the blocks around it."""
    p, q = center.shape
    ext = np.zeros((p + 2, q + 2), dtype=np.int64)
    ext[1:-1, 1:-1] = center
    for (dp, dq), face in around.items():
        if face is None or (dp, dq) == (0, 0):
            continue
        rows = slice(1, -1) if dp == 0 else (0 if dp < 0 else -1)
        cols = slice(1, -1) if dq == 0 else (0 if dq < 0 else -1)
        src_rows = slice(None) if dp == 0 else (-1 if dp < 0 else 0)
        src_cols = slice(None) if dq == 0 else (-1 if dq < 0 else 0)
        ext[rows, cols] = face[src_rows, src_cols]
    return ext


def _unique_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.size == 0:
        return np.empty((0, 2), np.int64)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs.astype(np.int64)


def _face_pairs(a_face: np.ndarray, b_center: np.ndarray, around: dict, inplane: np.ndarray):
    """Label pairs (encoded) touching across one block face, incl. its edges and corners."""
    ext = _extended_plane(b_center, around)
    p, q = a_face.shape
    fa, fb = [], []
    for dp in (-1, 0, 1):
        for dq in (-1, 0, 1):
            if not inplane[dp + 1, dq + 1]:
                continue
            b = ext[1 + dp : 1 + dp + p, 1 + dq : 1 + dq + q]
            m = (a_face != 0) & (b != 0)
            fa.append(a_face[m])
            fb.append(b[m])
    return _unique_rows(np.concatenate(fa), np.concatenate(fb))


def _boundary_pairs(infos: np.ndarray, struct: np.ndarray) -> list:
    """Delayed pair lists, one per pair of face-sharing blocks."""
    numblocks = infos.shape
    tasks = []
    for idx in np.ndindex(numblocks):
        for axis in range(3):
            if idx[axis] + 1 >= numblocks[axis]:
                continue
            nb = list(idx)
            nb[axis] += 1
            inplane = struct.take(2, axis=axis)  # offsets with +1 along `axis`
            others = [a for a in range(3) if a != axis]
            rim = bool(inplane.sum() > 1)  # diagonal steps reach the blocks around
            around = {}
            for dp in (-1, 0, 1):
                for dq in (-1, 0, 1):
                    if (dp, dq) != (0, 0) and not rim:
                        continue
                    j = list(nb)
                    j[others[0]] += dp
                    j[others[1]] += dq
                    if all(0 <= j[a] < numblocks[a] for a in range(3)):
                        around[(dp, dq)] = infos[tuple(j)][(axis, 0)]
            a_face = infos[idx][(axis, 1)]
            center = around.pop((0, 0))
            tasks.append(dask.delayed(_face_pairs)(a_face, center, around, inplane))
    return tasks


@dataclass(frozen=True)
class _Merge:
    """Client-side result of a face merge: what each block needs to relabel itself."""

    n: int
    plans: dict


def _merge_plan(counts: np.ndarray, pairs: np.ndarray, numblocks, offset: int) -> _Merge:
    """Union–find over face pairs → per-block relabelling plans (small)."""
    counts = counts.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # provisional id = start + local
    total = int(counts.sum())
    if pairs.size:
        prov = starts[pairs >> 32] + (pairs & 0xFFFFFFFF)
        ids, inv = np.unique(prov.ravel(), return_inverse=True)
        inv = inv.reshape(prov.shape)
        graph = coo_matrix(
            (np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(ids.size, ids.size)
        )
        _, comp = connected_components(graph, directed=False)
        root = np.full(comp.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(root, comp, ids)
        roots = root[comp]
    else:
        ids = roots = np.empty(0, np.int64)
    removed = ids[roots != ids]  # merged away (sorted, as ids is)
    n = total - removed.size
    # final id of a kept provisional id p: offset + p - #(removed < p)
    face_final = offset + roots - np.searchsorted(removed, roots)
    plans = {}
    for flat, idx in enumerate(np.ndindex(tuple(numblocks))):
        lo, hi = starts[flat], starts[flat] + counts[flat]
        r0, r1 = np.searchsorted(removed, [lo + 1, hi + 1])
        f0, f1 = np.searchsorted(ids, [lo + 1, hi + 1])
        plans[idx] = (
            int(lo),
            int(r0),
            removed[r0:r1].copy(),
            (ids[f0:f1] - lo).astype(np.int64),
            face_final[f0:f1].copy(),
        )
    return _Merge(n=int(n), plans=plans)


def _plan_lut(plan: tuple, n_local: int, offset: int, dtype) -> np.ndarray:
    start, base_shift, removed, face_local, face_final = plan
    prov = start + np.arange(1, n_local + 1, dtype=np.int64)
    lut = np.zeros(n_local + 1, dtype=np.int64)
    lut[1:] = offset + prov - base_shift - np.searchsorted(removed, prov)
    lut[face_local] = face_final
    return lut.astype(dtype)


def _relabel_block(block, struct, plans, offset, dtype, block_id=None):
    lab, n = _label_local(block, struct)
    lut = _plan_lut(plans[block_id], n, offset, dtype)
    xp = _xp_for(block)
    return xp.asarray(lut)[lab]


def label(mask: Any, *, connectivity: int = 1, offset: int = 0) -> tuple[da.Array, int]:
    """Connected components with ids unique across the whole volume, at any chunking.

    Each block is labelled with ``scipy.ndimage.label``; one pass returns only each block's
    count and face planes, pairs of labels touching across faces (edges and corners included
    for ``connectivity`` 2 and 3) are joined with a union–find on the client, and the
    returned array relabels every block lazily from a small per-block plan. The result is
    the same partition as ``scipy.ndimage.label(mask, structure(connectivity))`` on the whole
    array, numbered ``offset + 1 … offset + n``.

    Parameters
    ----------
    mask : (Z, Y, X) dask array of bool
        Foreground (integer arrays: nonzero).
    connectivity : {1, 2, 3}
        Neighbourhood, see :func:`structure`. 1 (faces) is SciPy's default.
    offset : int
        Added to every label (to keep ids unique across time points or channels).

    Returns
    -------
    labels : (Z, Y, X) dask array of uint32 (uint64 when ``offset + n`` exceeds uint32)
        Lazy, same chunks as ``mask``; 0 is background.
    n : int
        Number of objects.

    Examples
    --------
    >>> m = np.zeros((1, 1, 9), bool); m[..., [0, 1, 2, 4, 5, 8]] = True
    >>> labels, n = label(da.from_array(m, chunks=(1, 1, 2)))
    >>> n, labels.compute().ravel().tolist()
    (3, [1, 1, 1, 0, 2, 2, 0, 0, 3])
    """
    mask = _as_mask(mask)
    labels, n, _ = _label_analysis(mask, structure(connectivity), _check_offset(offset))
    return labels, n


def _label_analysis(
    mask: da.Array,
    struct: np.ndarray,
    offset: int,
    image: da.Array | None = None,
    vs=None,
    compute: Callable[[Any, str], Any] | None = None,
) -> tuple[da.Array, int, pd.DataFrame | None]:
    """One pass over ``mask`` (and ``image``): lazy global labels, n, and their table."""
    numblocks = mask.numblocks
    blocks = mask.to_delayed()
    origins = _block_origins(mask.chunks)
    images = image.rechunk(mask.chunks).to_delayed() if image is not None else None
    infos = np.empty(numblocks, dtype=object)
    for flat, idx in enumerate(np.ndindex(numblocks)):
        lo, hi = _pad_widths(idx, numblocks)
        extra = ()
        if images is not None:
            extra = (images[idx], tuple(int(origins[a][idx[a]]) for a in range(3)))
        infos[idx] = dask.delayed(_label_faces)(blocks[idx], struct, flat, lo, hi, *extra)
    per_block = [
        (infos[idx]["n"], infos[idx]["parts"] if images is not None else None)
        for idx in np.ndindex(numblocks)
    ]
    per_block, pair_lists = _compute(
        compute, [per_block, _boundary_pairs(infos, struct)], "analysis (block faces)"
    )
    counts = np.array([c for c, _ in per_block], dtype=np.int64)
    pairs = np.concatenate(pair_lists) if pair_lists else np.empty((0, 2), np.int64)
    merge = _merge_plan(counts, pairs, numblocks, offset)
    dtype = label_dtype(offset + merge.n)
    table = None
    if images is not None:
        parts = []
        for (n_b, part), idx in zip(per_block, np.ndindex(numblocks), strict=True):
            if len(part):
                lut = _plan_lut(merge.plans[idx], n_b, offset, np.int64)
                part["label"] = lut[part["label"].to_numpy() & 0xFFFFFFFF]
                parts.append(part)
        table = _combine(parts, vs)
    plans = dask.delayed(merge.plans, pure=True)
    labels = mask.map_blocks(
        _relabel_block,
        struct,
        plans,
        offset,
        dtype,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype),
    )
    return labels, merge.n, table


def _relabel_lut_block(block, keys, values, dtype):
    """Map label values through sorted ``keys`` → ``values``; labels not in keys become 0."""
    xp = _xp_for(block)
    if keys.size == 0:
        return xp.zeros(block.shape, dtype=dtype)
    k = xp.asarray(keys)
    flat = block.ravel().astype(k.dtype)
    pos = xp.searchsorted(k, flat).clip(0, keys.size - 1)
    out = xp.where(k[pos] == flat, xp.asarray(values)[pos], 0)
    return out.astype(dtype).reshape(block.shape)


def relabel(labels: da.Array, keys: np.ndarray, values: np.ndarray) -> da.Array:
    """Lazily map label ids ``keys`` (sorted) to ``values``; any other id becomes 0.

    Parameters
    ----------
    labels : (Z, Y, X) dask array of unsigned int
    keys, values : (N,) ndarray of int
        Sorted old ids and their new ids (0 removes).

    Returns
    -------
    (Z, Y, X) dask array of uint32 or uint64 (as wide as the largest new id needs)
    """
    keys = np.asarray(keys, dtype=np.uint64)
    values = np.asarray(values, dtype=np.int64)
    if keys.size and np.any(np.diff(keys.astype(np.int64)) <= 0):
        raise SegmentError("relabel: `keys` must be sorted and unique")
    dtype = label_dtype(int(values.max()) if values.size else 0)
    k = dask.delayed(keys, pure=True)
    v = dask.delayed(values, pure=True)
    return labels.map_blocks(
        _relabel_lut_block, k, v, dtype, dtype=dtype, meta=np.empty((0, 0, 0), dtype)
    )


# --------------------------------------------------------------------------- watershed


def clipped_distance(mask: Any, voxel_size_um: Sequence[float], clip_um: float) -> Any:
    """Euclidean distance (µm) from each voxel to the nearest background voxel, clipped.

    Equals ``numpy.minimum(scipy.ndimage.distance_transform_edt(mask, sampling), clip_um)``
    (float32), computed as the separable squared distance transform with each 1-D pass
    limited to ``clip_um``: a distance under the clip has every axis component under it,
    and a window that misses the nearest background only overestimates a distance that is
    clipped anyway. About 2 + 2·clip/voxel array operations per axis, on NumPy or CuPy
    arrays, and several times faster than the exact transform for nucleus-sized clips.
    A voxel's value depends only on the mask within ``clip_um`` of it, bit for bit, which
    keeps overlapping blocks exact.
    """
    xp = _xp_for(mask)
    big = xp.float32(np.inf)
    sq = xp.where(mask, big, xp.float32(0))
    for axis, v in enumerate(voxel_size_um):
        reach = min(int(clip_um // v), mask.shape[axis] - 1)
        out = sq.copy()
        for k in range(1, reach + 1):
            step = xp.float32((k * v) ** 2)
            lo = (slice(None),) * axis + (slice(None, -k),)
            hi = (slice(None),) * axis + (slice(k, None),)
            xp.minimum(out[lo], sq[hi] + step, out=out[lo])
            xp.minimum(out[hi], sq[lo] + step, out=out[hi])
        sq = out
    xp.minimum(sq, xp.float32(clip_um) ** 2, out=sq)
    return xp.sqrt(sq, out=sq)


def _distance_block(block: Any, *, voxel_size_um, clip_um: float, sigma_vox) -> Any:
    nd = _ndi_for(block)
    xp = _xp_for(block)
    dist = clipped_distance(block, voxel_size_um, clip_um)
    if any(s > 0 for s in sigma_vox):
        dist = nd.gaussian_filter(dist, sigma=sigma_vox, truncate=4.0)
    return xp.where(block, dist, xp.float32(0))


def distance_elevation(
    mask: Any,
    *,
    voxel_size_um: Sequence[float],
    clip_um: float,
    smooth_um: float = 0.0,
) -> da.Array:
    """Euclidean distance to background in µm, clipped at ``clip_um``, optionally smoothed.

    Exact at any chunking: blocks overlap by the clip distance (where the true distance is
    at most ``clip_um`` its nearest background voxel lies inside the overlap; where it is
    more, the window's value is larger too and is clipped) plus the Gaussian's reach.

    Parameters
    ----------
    mask : (Z, Y, X) dask array of bool
    voxel_size_um : (3,) sequence of float
    clip_um : float
        Distances above this are clipped (one nucleus diameter is enough to split nuclei).
    smooth_um : float
        Gaussian sigma in µm applied after clipping (0: none).

    Returns
    -------
    (Z, Y, X) dask array of float32, 0 outside the mask.
    """
    mask = _as_mask(mask)
    vs = _voxel_size(voxel_size_um)
    clip_um = _positive(clip_um, "clip_um")
    sigma_vox = tuple(float(smooth_um) / v for v in vs)
    depth = {
        a: min(n, d)
        for a, (n, d) in enumerate(
            zip(mask.shape, _elevation_depth(vs, clip_um, smooth_um), strict=True)
        )
    }
    # map_overlap merges chunks smaller than the depth; hand back the caller's chunks
    out = mask.map_overlap(
        _distance_block,
        depth=depth,
        boundary="none",
        dtype=np.float32,
        voxel_size_um=vs,
        clip_um=clip_um,
        sigma_vox=sigma_vox,
        meta=np.empty((0, 0, 0), np.float32),
    )
    return out if out.chunks == mask.chunks else out.rechunk(mask.chunks)


def _neighbour_offsets(struct: np.ndarray) -> list[tuple[int, int, int]]:
    return [
        (dz - 1, dy - 1, dx - 1)
        for dz, dy, dx in zip(*np.nonzero(struct), strict=True)
        if (dz, dy, dx) != (1, 1, 1)
    ]


def _toboggan(elev, mask, struct, lo, hi, origin, shape):
    """Steepest-ascent endpoints of a padded block.

    ``elev`` and ``mask`` are the block with ``lo``/``hi`` voxels of halo. Every core
    foreground voxel points to the highest neighbour (ties broken by global voxel index, a
    total order shared by all blocks), pointers are followed inside the block, and halo
    voxels end paths. Returns the core's endpoint global indices (-1 off the mask) and
    the endpoint is-core flags needed by the callers.
    """
    elev = np.asarray(_to_numpy(elev), dtype=np.float32)
    mask = np.asarray(_to_numpy(mask), dtype=bool)
    e = np.pad(np.where(mask, elev, -np.inf).astype(np.float32), 1, constant_values=-np.inf)
    m = np.pad(mask, 1, constant_values=False)
    pshape = e.shape
    # global flat index of each voxel of the padded array (the outer ring is never chosen)
    coords = [np.arange(pshape[a], dtype=np.int64) + origin[a] - lo[a] - 1 for a in range(3)]
    gidx = (coords[0][:, None, None] * shape[1] + coords[1][None, :, None]) * shape[2] + coords[2][
        None, None, :
    ]
    inner = (slice(1, -1),) * 3
    best_e = e[inner].copy()
    best_g = gidx[inner].copy()
    best_off = np.zeros(best_e.shape, dtype=np.int64)
    strides = (pshape[1] * pshape[2], pshape[2], 1)
    for dz, dy, dx in _neighbour_offsets(struct):
        sl = tuple(slice(1 + d, pshape[a] - 1 + d) for a, d in enumerate((dz, dy, dx)))
        ne, ng = e[sl], gidx[sl]
        better = m[sl] & ((ne > best_e) | ((ne == best_e) & (ng > best_g)))
        best_e = np.where(better, ne, best_e)
        best_g = np.where(better, ng, best_g)
        best_off[better] = dz * strides[0] + dy * strides[1] + dx * strides[2]
    flat = np.arange(e.size, dtype=np.int64).reshape(pshape)
    ptr = flat.copy()
    core = tuple(slice(1 + lo[a], pshape[a] - 1 - hi[a]) for a in range(3))
    # only core foreground voxels move; halo voxels are path ends
    inner_core = tuple(slice(lo[a], best_off.shape[a] - hi[a]) for a in range(3))
    ptr[core] = flat[core] + np.where(m[core], best_off[inner_core], 0)
    ptr = ptr.ravel()
    is_max = np.zeros(pshape, dtype=bool)
    is_max[core] = m[core] & (ptr.reshape(pshape)[core] == flat[core])
    # pointer jumping: each round doubles the followed path length
    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    end = ptr.reshape(pshape)[core]
    end_g = np.where(m[core], gidx.ravel()[end], -1)
    return end_g, gidx[core], m[core], is_max[core], e[core]


def _positive_offsets(struct: np.ndarray) -> list[tuple[int, int, int]]:
    """Half of the neighbourhood: each unordered neighbour pair once."""
    return [o for o in _neighbour_offsets(struct) if o > (0, 0, 0)]


def _max_by_pair(a: np.ndarray, b: np.ndarray, s: np.ndarray):
    """Unordered pairs (a != b) with the largest ``s`` of each: ((K, 2) int64, (K,) float)."""
    keep = a != b
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if lo.size == 0:
        return np.empty((0, 2), np.int64), np.empty(0, np.float64)
    order = np.lexsort((s, hi, lo))
    lo, hi, s = lo[order], hi[order], s[order]
    last = np.r_[(lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1]), True]  # max saddle sorts last
    return np.stack([lo[last], hi[last]], axis=1), s[last].astype(np.float64)


def _inner_saddles(end: np.ndarray, e: np.ndarray, m: np.ndarray, struct: np.ndarray):
    """Saddles between different endpoints for neighbour pairs inside one block's core."""
    shape = end.shape
    la, lb, ss = [], [], []
    for off in _positive_offsets(struct):
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(off, shape, strict=True))
        dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(off, shape, strict=True))
        sel = m[src] & m[dst] & (end[src] != end[dst])
        la.append(end[src][sel])
        lb.append(end[dst][sel])
        ss.append(np.minimum(e[src], e[dst])[sel])
    if not la:
        return np.empty((0, 2), np.int64), np.empty(0, np.float64)
    return _max_by_pair(np.concatenate(la), np.concatenate(lb), np.concatenate(ss))


def _toboggan_info(elev, mask, struct, lo, hi, origin, shape, image=None):
    """The watershed's one analysis pass over a block.

    Small tables: peaks (global index, height); exits (endpoints in a neighbour's core);
    saddles between endpoints inside the core; and with ``image``, measurement partials
    keyed by endpoint + 1. And the core's shell towards neighbours (``face_*``: each voxel's
    global index, endpoint and height), which `_neighbour_tables` reduces on the workers.
    """
    end_g, g, m, is_max, e = _toboggan(elev, mask, struct, lo, hi, origin, shape)
    peaks = g[is_max]
    order = np.argsort(peaks)
    # exits: endpoints that are not peaks of this block (they lie in a neighbour's core)
    exits = np.setdiff1d(np.unique(end_g[m]), peaks)
    shell = np.zeros(m.shape, dtype=bool)
    for a in range(3):
        if lo[a]:
            shell[(slice(None),) * a + (0,)] = True
        if hi[a]:
            shell[(slice(None),) * a + (-1,)] = True
    sel = shell & m
    out = {
        "peaks": peaks[order],
        "heights": e[is_max][order],
        "exits": exits,
        "face_keys": g[sel],
        "face_ends": end_g[sel],
        "face_heights": e[sel],
        "saddles": _inner_saddles(end_g, e, m, struct),
    }
    if image is not None:
        out["parts"] = _measure_block(np.where(m, end_g + 1, 0), image, origin)
    return out


def _resolve(keys: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Follow face endpoints across blocks until every one is a peak (keys sorted)."""
    while keys.size:
        pos = np.searchsorted(keys, ends).clip(0, keys.size - 1)
        nxt = np.where(keys[pos] == ends, ends[pos], ends)
        if np.array_equal(nxt, ends):
            break
        ends = nxt
    return keys, ends


def _basin_block(elev, mask, struct, lo, hi, origin, shape, plan, dtype):
    end_g, _, m, _, _ = _toboggan(elev, mask, struct, lo, hi, origin, shape)
    keys, values = plan
    out = np.zeros(m.shape, dtype=dtype)
    if keys.size:
        out[m] = values[np.searchsorted(keys, end_g[m])]
    return out


def _block_tables(info: dict) -> dict:
    """A block's analysis without its shell arrays (those stay on the workers)."""
    return {k: v for k, v in info.items() if not k.startswith("face_")}


def _sorted_lookup(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which ``queries`` are in the sorted ``keys``, and where: (found mask, positions)."""
    if keys.size == 0:
        return np.zeros(queries.shape, bool), np.zeros(queries.shape, np.int64)
    pos = np.searchsorted(keys, queries).clip(0, keys.size - 1)
    return keys[pos] == queries, pos


def _neighbour_tables(a: dict, b: dict, shape, struct):
    """What two touching blocks' shells tell about each other, as small tables.

    ``a`` and ``b`` are `_toboggan_info` results of blocks that touch (across a face, or an
    edge or corner for connectivity 2 and 3). Returns the saddles of the voxel pairs that
    straddle them, reduced to the largest per pair of endpoints ((K, 2) int64, (K,) float),
    and one step of every path that leaves one block into the other: each such exit's
    endpoint in the block that owns the exit voxel (keys, ends).
    """
    hop_keys, hop_ends = [], []
    for x, y in ((a, b), (b, a)):
        found, pos = _sorted_lookup(y["face_keys"], x["exits"])
        hop_keys.append(x["exits"][found])
        hop_ends.append(y["face_ends"][pos[found]])
    keys = a["face_keys"]
    coords = np.unravel_index(keys, shape)
    la, lb, ss = [], [], []
    for off in _neighbour_offsets(struct):
        c2 = [coords[i] + off[i] for i in range(3)]
        ok = np.ones(keys.size, bool)
        for i in range(3):
            ok &= (c2[i] >= 0) & (c2[i] < shape[i])
        g2 = np.ravel_multi_index(tuple(c[ok] for c in c2), shape)
        found, pos = _sorted_lookup(b["face_keys"], g2)
        src, pos = np.flatnonzero(ok)[found], pos[found]
        la.append(a["face_ends"][src])
        lb.append(b["face_ends"][pos])
        ss.append(np.minimum(a["face_heights"][src], b["face_heights"][pos]))
    edges, saddles = _max_by_pair(np.concatenate(la), np.concatenate(lb), np.concatenate(ss))
    return edges, saddles, np.concatenate(hop_keys), np.concatenate(hop_ends)


def _touching_blocks(numblocks, struct) -> list[tuple[tuple, tuple]]:
    """Each unordered pair of blocks that a neighbourhood step can cross, once."""
    pairs = []
    for idx in np.ndindex(numblocks):
        for off in _positive_offsets(struct):
            nb = tuple(i + o for i, o in zip(idx, off, strict=True))
            if all(0 <= nb[a] < numblocks[a] for a in range(3)):
                pairs.append((idx, nb))
    return pairs


def _merge_by_dynamics(
    heights: np.ndarray, edges: np.ndarray, saddles: np.ndarray, depth: float
) -> np.ndarray:
    """Union basins whose lower peak rises less than ``depth`` above their best saddle.

    Edges are processed from the highest saddle down (Kruskal on the maximum spanning
    tree), each component keeping its highest peak; returns each basin's root (0-based).
    """
    parent = np.arange(heights.size, dtype=np.int64)
    top = heights.astype(np.float64).copy()

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for k in np.argsort(-saddles, kind="stable"):
        ra, rb = find(int(edges[k, 0])), find(int(edges[k, 1]))
        if ra == rb:
            continue
        if min(top[ra], top[rb]) - float(saddles[k]) < depth:
            hi_, lo_ = (ra, rb) if (top[ra], ra) > (top[rb], rb) else (rb, ra)
            parent[lo_] = hi_
    return np.array([find(i) for i in range(heights.size)], dtype=np.int64)


#: Two equal nuclei of diameter ``d`` are split once their centres are this far apart (× d):
#: the neck between them is then under 92 % of their radius.
SPLIT_SEPARATION = 0.4


def default_smooth_um(voxel_size_um: Sequence[float]) -> float:
    """Default smoothing of the distance transform: half the finest voxel (µm).

    The distance transform measures to background voxel *centres*, so its values are the
    grid's rounding of the surface: on a ball's plateau they jump by up to a voxel along
    the coarse axis, which makes spurious peaks (a large nucleus cut in two along a
    z-slice). A Gaussian of half the finest voxel removes that rounding; the split depth
    (:func:`default_split_depth_um`) is measured on the same smoothed elevation.

    Examples
    --------
    >>> default_smooth_um((2.0, 1.0, 1.0))
    0.5
    """
    return min(float(v) for v in voxel_size_um) / 2.0


@lru_cache(maxsize=64)
def _pair_dynamics_um(diameter_um: float, separation_um: float, smooth_um: float) -> float:
    """Dynamics of the lower peak of two equal balls in the smoothed distance (µm).

    The distance to the union's boundary is exact (analytic): from each centre's sphere,
    or from the neck circle where the sphere's nearest point lies inside the other ball.
    It is sampled on a grid four times finer than the smoothing (or than the diameter /
    64), smoothed, and read along the axis: peak minus the value at the neck.
    """
    r, s = diameter_um / 2.0, separation_um
    h = min(smooth_um / 4.0 if smooth_um > 0 else np.inf, diameter_um / 64.0)
    reach = 4.0 * smooth_um + h
    z = np.arange(-(s / 2 + r + reach), s / 2 + r + reach + h / 2, h)
    q = np.arange(0.0, r + reach + h / 2, h)  # one quadrant across: symmetric
    q = np.concatenate([-q[:0:-1], q])
    zz, yy, xx = np.meshgrid(z, q, q, indexing="ij", sparse=True)
    rho = np.sqrt(yy**2 + xx**2)
    neck_z, neck_rho = 0.0, math.sqrt(max(r * r - s * s / 4.0, 0.0))
    to_neck = np.sqrt((zz - neck_z) ** 2 + (rho - neck_rho) ** 2)
    dist = np.full(np.broadcast_shapes(zz.shape, rho.shape), np.inf)
    inside = np.zeros(dist.shape, dtype=bool)
    for c, other in ((-s / 2, s / 2), (s / 2, -s / 2)):
        dc = np.sqrt((zz - c) ** 2 + rho**2)
        inside |= dc <= r
        # this sphere's nearest point lies along the ray from its centre; where that point
        # is inside the other ball, the nearest boundary point is on the neck circle
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(dc > 0, r / dc, 0.0)
        pz, pr = c + (zz - c) * scale, rho * scale
        visible = (pz - other) ** 2 + pr**2 >= r * r
        dist = np.minimum(dist, np.where(visible, np.abs(r - dc), to_neck))
    dist = np.where(inside, dist, 0.0)
    if smooth_um > 0:
        dist = ndi.gaussian_filter(dist, smooth_um / h, truncate=4.0)
    axis = dist[:, q.size // 2, q.size // 2]
    neck = axis[np.argmin(np.abs(z))]
    return float(axis.max() - neck)


def default_split_depth_um(
    nucleus_diameter_um: float, voxel_size_um: Sequence[float], smooth_um: float | None = None
) -> float:
    """Default watershed split depth (µm), measured on the elevation the watershed uses.

    Two equal balls of diameter ``d`` whose centres are ``s`` apart have distance peaks
    ``d/2`` and a neck of radius ``sqrt(d² - s²) / 2``. The default is the dynamics of
    such a pair at ``s = SPLIT_SEPARATION × d`` in the distance smoothed like the image's
    (``smooth_um``, default :func:`default_smooth_um` of the voxel size): pairs further
    apart split, single nuclei (whose smoothed plateau has no second peak) do not.
    Without smoothing (``smooth_um=0``), at least a quarter of the finest voxel: below
    that, peaks are the grid's rounding of the surface.

    Examples
    --------
    >>> round(default_split_depth_um(9.0, (2.0, 1.0, 1.0)), 2)
    0.21
    >>> round(default_split_depth_um(9.0, (2.0, 1.0, 1.0), smooth_um=0), 2)
    0.38
    """
    d = float(nucleus_diameter_um)
    smooth = default_smooth_um(voxel_size_um) if smooth_um is None else float(smooth_um)
    # rounded, so equal inputs computed differently share the cache
    depth = _pair_dynamics_um(round(d, 6), round(SPLIT_SEPARATION * d, 6), round(smooth, 6))
    return depth if smooth > 0 else max(depth, min(voxel_size_um) / 4.0)


def watershed(
    mask: Any,
    *,
    voxel_size_um: Sequence[float],
    nucleus_diameter_um: float,
    connectivity: int = 1,
    split_depth_um: float | None = None,
    smooth_um: float | None = None,
    elevation: da.Array | None = None,
    offset: int = 0,
) -> tuple[da.Array, int]:
    """Split touching nuclei: steepest-ascent watershed on the distance transform.

    Seeds are the peaks of the elevation (by default :func:`distance_elevation`, the
    distance to background in µm clipped at one nucleus diameter, lightly smoothed); every
    foreground voxel follows its steepest ascent to a peak (ties broken by global voxel
    index), which makes the basins a property of the volume, not of the blocks: paths that
    leave a block are continued through the neighbour's face table. Adjacent basins are then
    merged when the lower peak rises less than ``split_depth_um`` above the highest saddle
    between them (the dynamics or h-maxima criterion), decided on a small table of saddles.

    Parameters
    ----------
    mask : (Z, Y, X) dask array of bool
        Foreground.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm: the distance transform is in µm, so anisotropic voxels
        are handled.
    nucleus_diameter_um : float
        Typical nucleus diameter; sets the clip, smoothing and split-depth defaults.
    connectivity : {1, 2, 3}
        Neighbourhood of the ascent and of basin adjacency.
    split_depth_um : float, optional
        Minimum dynamics of a peak to keep it as a separate nucleus; default
        :func:`default_split_depth_um`.
    smooth_um : float, optional
        Gaussian sigma (µm) applied to the distance transform. Default: half the finest
        voxel (:func:`default_smooth_um`), which removes the grid's rounding of the surface
        (spurious peaks on anisotropic voxels); 0 turns it off.
    elevation : (Z, Y, X) dask array of float, optional
        Use this instead of the distance transform (e.g. a smoothed intensity); then
        ``split_depth_um`` is in its units and must be given.
    offset : int
        Added to every label.

    Returns
    -------
    labels : (Z, Y, X) dask array of uint32 (uint64 when needed), lazy, chunks of ``mask``
    n : int
        Number of nuclei.
    """
    mask = _as_mask(mask)
    struct = structure(connectivity)
    offset = _check_offset(offset)
    elevation, depth = _elevation_and_depth(
        mask, voxel_size_um, nucleus_diameter_um, split_depth_um, smooth_um, elevation
    )
    labels, n, _ = _watershed_analysis(
        *_shells(elevation, mask), mask.chunks, struct, depth, offset
    )
    return labels, n


def _shells(elevation: da.Array, mask: da.Array) -> tuple[da.Array, da.Array]:
    """Elevation and mask blocks with one voxel of their neighbours around them."""
    return tuple(
        da.overlap.overlap(a, depth={0: 1, 1: 1, 2: 1}, boundary="none") for a in (elevation, mask)
    )


def _shell_chunks(grid: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """Chunks of blocks with a one-voxel shell (none beyond the volume's edges)."""
    return tuple(tuple(b + (i > 0) + (i < len(c) - 1) for i, b in enumerate(c)) for c in grid)


def _elevation_depth(voxel_size_um, clip_um: float, smooth_um: float) -> tuple[int, int, int]:
    """Halo that makes `distance_elevation`'s blocks exact: the clip plus the Gaussian's reach."""
    return tuple(math.ceil(clip_um / v) + math.ceil(4.0 * smooth_um / v) + 1 for v in voxel_size_um)


def _surface_block(
    padded: np.ndarray,
    *,
    region: Region,
    threshold: float,
    voxel_size_um,
    clip_um: float,
    sigma_vox,
    tophat_size=None,
) -> np.ndarray:
    """Elevation of a stored block and a one-voxel shell, NaN off the mask.

    ``padded`` is the block with a halo of `_elevation_depth` + 1 (+ the top-hat's reach)
    read from the store, so every value kept equals `distance_elevation` of the whole
    volume (`_stored_watershed`).
    """
    if tophat_size is not None:
        padded = _tophat_block(padded, tophat_size)
    mask = padded > threshold
    elev = _distance_block(mask, voxel_size_um=voxel_size_um, clip_um=clip_um, sigma_vox=sigma_vox)
    shell = tuple(
        slice(lo - min(1, lo), lo + (b - a) + min(1, hi))
        for lo, hi, a, b in zip(region.lo, region.hi, region.start, region.stop, strict=True)
    )
    return np.where(mask[shell], elev[shell], np.float32(np.nan))


def _elevation_and_depth(
    mask, voxel_size_um, nucleus_diameter_um, split_depth_um, smooth_um, elevation
):
    vs = _voxel_size(voxel_size_um)
    diameter = _positive(nucleus_diameter_um, "nucleus_diameter_um")
    if elevation is None:
        smooth = default_smooth_um(vs) if smooth_um is None else float(smooth_um)
        if not (math.isfinite(smooth) and smooth >= 0):
            raise SegmentError(f"`smooth_um` must be >= 0; got {smooth_um!r}")
        elevation = distance_elevation(mask, voxel_size_um=vs, clip_um=diameter, smooth_um=smooth)
        return elevation, _split_depth(diameter, vs, smooth, split_depth_um)
    else:
        elevation = _as_volume(elevation, "elevation")
        if elevation.shape != mask.shape:
            raise SegmentError(
                f"`elevation` shape {elevation.shape} differs from `mask` shape {mask.shape}"
            )
        if split_depth_um is None:
            raise SegmentError("with a custom `elevation`, `split_depth_um` must be given")
        elevation = elevation.rechunk(mask.chunks)
    return elevation, _split_depth(diameter, vs, None, split_depth_um)


def _split_depth(diameter_um: float, vs, smooth_um: float | None, split_depth_um) -> float:
    """``split_depth_um``, or its default for the distance elevation (``smooth_um``)."""
    depth = (
        default_split_depth_um(diameter_um, vs, smooth_um)
        if split_depth_um is None
        else split_depth_um
    )
    return _positive(depth, "split_depth_um") if depth else 0.0


def _watershed_analysis(
    e_ov: da.Array,
    m_ov: da.Array,
    grid: tuple[tuple[int, ...], ...],
    struct: np.ndarray,
    split_depth: float,
    offset: int,
    image: da.Array | None = None,
    vs=None,
    compute: Callable[[Any, str], Any] | None = None,
) -> tuple[da.Array, int, pd.DataFrame | None]:
    """One pass over the blocks → lazy watershed labels, n, and (with ``image``) the table.

    ``e_ov`` and ``m_ov`` are the elevation and mask of the blocks of ``grid`` with a shell
    of one voxel (`_shells`, or `_surface_block` on a stored image).
    """
    numblocks = tuple(len(c) for c in grid)
    origins = _block_origins(grid)
    shape = tuple(sum(c) for c in grid)
    e_blocks, m_blocks = e_ov.to_delayed(), m_ov.to_delayed()
    i_blocks = image.rechunk(grid).to_delayed() if image is not None else None
    geo = {}
    for idx in np.ndindex(numblocks):
        lo, hi = _pad_widths(idx, numblocks)
        geo[idx] = (lo, hi, tuple(int(origins[a][idx[a]]) for a in range(3)))
    # per block: its tables; per pair of touching blocks: what crosses between them. The
    # shell arrays that the pairs need stay on the workers: only small tables come back
    full = {
        idx: dask.delayed(_toboggan_info)(
            e_blocks[idx],
            m_blocks[idx],
            struct,
            *geo[idx],
            shape,
            i_blocks[idx] if i_blocks is not None else None,
        )
        for idx in np.ndindex(numblocks)
    }
    touching = [
        dask.delayed(_neighbour_tables)(full[a], full[b], shape, struct)
        for a, b in _touching_blocks(numblocks, struct)
    ]
    tables = [dask.delayed(_block_tables)(info) for info in full.values()]
    infos, touching = _compute(compute, [tables, touching], "analysis (basins and saddles)")
    infos = dict(zip(np.ndindex(numblocks), infos, strict=True))

    # peaks → basins 0..n_basins-1 (in global index order)
    peaks = np.concatenate([i["peaks"] for i in infos.values()])
    heights = np.concatenate([i["heights"] for i in infos.values()])
    order = np.argsort(peaks)
    peaks, heights = peaks[order], heights[order]
    # exits → their endpoints in the neighbour, followed until each ends at a peak
    hop_keys = np.concatenate([np.empty(0, np.int64)] + [t[2] for t in touching])
    hop_ends = np.concatenate([np.empty(0, np.int64)] + [t[3] for t in touching])
    hop_keys, first = np.unique(hop_keys, return_index=True)
    hop_keys, hop_ends = _resolve(hop_keys, hop_ends[first])

    def basin_of(keys: np.ndarray) -> np.ndarray:
        # endpoint (a peak, or an exit into a neighbour's shell) → basin index
        found, pos = _sorted_lookup(hop_keys, keys)
        if found.any():
            keys = np.where(found, hop_ends[pos], keys)
        return np.searchsorted(peaks, keys)

    # the saddle between every two touching basins: inside blocks, and across their borders
    pairs = [i["saddles"] for i in infos.values()] + [t[:2] for t in touching]
    edges = np.concatenate(
        [np.empty((0, 2), np.int64)] + [basin_of(p.ravel()).reshape(-1, 2) for p, _ in pairs]
    )
    saddles = np.concatenate([np.empty(0)] + [s for _, s in pairs])
    edges, saddles = _max_by_pair(edges[:, 0], edges[:, 1], saddles)
    roots = _merge_by_dynamics(heights, edges, saddles, split_depth)
    _, merged = np.unique(roots, return_inverse=True)
    n = int(merged.max()) + 1 if merged.size else 0
    final = offset + merged.astype(np.int64) + 1  # basin → label
    dtype = label_dtype(offset + n)

    plans = {}
    for idx, info in infos.items():
        keys = np.concatenate([info["peaks"], info["exits"]])
        o = np.argsort(keys)
        plans[idx] = (keys[o], final[basin_of(keys[o])] if keys.size else keys[o])
    plan_d = dask.delayed(plans, pure=True)
    parts = np.empty(numblocks, dtype=object)
    for idx in np.ndindex(numblocks):
        block_shape = tuple(grid[a][idx[a]] for a in range(3))
        task = dask.delayed(_pick_basin)(
            e_blocks[idx], m_blocks[idx], struct, *geo[idx], shape, plan_d, idx, dtype
        )
        parts[idx] = da.from_delayed(
            task, shape=block_shape, dtype=dtype, meta=np.empty((0, 0, 0), dtype)
        )
    labels = da.block(parts.tolist())

    table = None
    if image is not None:
        measured = []
        for info in infos.values():
            part = info["parts"]
            if len(part):
                part["label"] = final[basin_of(part["label"].to_numpy().astype(np.int64) - 1)]
                measured.append(part)
        table = _combine(measured, vs)
    return labels, n, table


def _pick_basin(elev, mask, struct, lo, hi, origin, shape, plans, idx, dtype):
    return _basin_block(elev, mask, struct, lo, hi, origin, shape, plans[idx], dtype)


# --------------------------------------------------------------------------- measure


_PARTIAL = ("count", "sum_z", "sum_y", "sum_x", "sum_i", "max_i") + TABLE_COLUMNS[7:]


def _measure_block(labels: Any, image: Any, origin: tuple[int, int, int]) -> pd.DataFrame:
    """Per-label partial sums of one block (one sort of its foreground voxels)."""
    lab = _to_numpy(labels).ravel()
    fg = np.flatnonzero(lab)
    if fg.size == 0:
        return pd.DataFrame({"label": np.empty(0, np.int64)})
    lab = lab[fg]
    order = np.argsort(lab, kind="stable")
    fg, lab = fg[order], lab[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    coords = np.unravel_index(fg, labels.shape)
    inten = _to_numpy(image).ravel()[fg].astype(np.float64)
    out = {"label": lab[starts].astype(np.int64), "count": np.diff(np.r_[starts, lab.size])}
    for a, name in enumerate("zyx"):
        c = coords[a].astype(np.int64) + origin[a]
        out[f"sum_{name}"] = np.add.reduceat(c.astype(np.float64), starts)
        out[f"bbox_{name}_min"] = np.minimum.reduceat(c, starts)
        out[f"bbox_{name}_max"] = np.maximum.reduceat(c, starts) + 1
    out["sum_i"] = np.add.reduceat(inten, starts)
    out["max_i"] = np.maximum.reduceat(inten, starts)
    return pd.DataFrame(out)


def _combine(parts: list[pd.DataFrame], voxel_size_um) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=_column_dtype(c)) for c in TABLE_COLUMNS})
    df = pd.concat(parts, ignore_index=True)
    agg = {c: "sum" for c in ("count", "sum_z", "sum_y", "sum_x", "sum_i")}
    agg.update({"max_i": "max"})
    agg.update({f"bbox_{a}_min": "min" for a in "zyx"})
    agg.update({f"bbox_{a}_max": "max" for a in "zyx"})
    g = df.groupby("label", sort=True).agg(agg)
    vz, vy, vx = voxel_size_um
    table = pd.DataFrame(
        {
            "label": g.index.to_numpy().astype(np.int64),
            "z_um": g["sum_z"].to_numpy() / g["count"].to_numpy() * vz,
            "y_um": g["sum_y"].to_numpy() / g["count"].to_numpy() * vy,
            "x_um": g["sum_x"].to_numpy() / g["count"].to_numpy() * vx,
            "volume_um3": g["count"].to_numpy() * (vz * vy * vx),
            "mean_intensity": g["sum_i"].to_numpy() / g["count"].to_numpy(),
            "max_intensity": g["max_i"].to_numpy(),
        }
    )
    for c in TABLE_COLUMNS[7:]:
        table[c] = g[c].to_numpy().astype(np.int64)
    return table


def _column_dtype(c: str):
    return np.int64 if c == "label" or c.startswith("bbox") else np.float64


def measure(labels: Any, image: Any, *, voxel_size_um: Sequence[float]) -> pd.DataFrame:
    """One row per label: centroid (µm), volume (µm³), mean/max intensity, bounding box.

    Each block yields per-label partial sums; they are combined on the client, so a cell
    cut by chunk borders still gets exactly one row with its whole-cell values.

    Parameters
    ----------
    labels : (Z, Y, X) dask array of unsigned int
        Instance labels, 0 background.
    image : (Z, Y, X) dask array
        Intensities (rechunked to the labels' chunks if needed).
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm. Voxel ``i`` has its centre at ``i * voxel_size_um``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`, sorted by label; bounding boxes in voxels, min
        inclusive and max exclusive.
    """
    labels = _as_volume(labels, "labels")
    image = _as_volume(image, "image")
    vs = _voxel_size(voxel_size_um)
    if not np.issubdtype(labels.dtype, np.integer):
        raise SegmentError(f"`labels` must be an integer array; got dtype {labels.dtype}")
    if image.shape != labels.shape:
        raise SegmentError(
            f"`image` shape {image.shape} differs from `labels` shape {labels.shape}"
        )
    image = image.rechunk(labels.chunks)
    origins = _block_origins(labels.chunks)
    lb, ib = labels.to_delayed(), image.to_delayed()
    parts = dask.compute(
        *[
            dask.delayed(_measure_block)(
                lb[idx], ib[idx], tuple(int(origins[a][idx[a]]) for a in range(3))
            )
            for idx in np.ndindex(labels.numblocks)
        ]
    )
    return _combine(list(parts), vs)


def count_map(
    table: pd.DataFrame,
    *,
    chunks: tuple[tuple[int, ...], ...],
    voxel_size_um: Sequence[float],
) -> np.ndarray:
    """Cells per block: each cell counted in the block that holds its centroid.

    Parameters
    ----------
    table : pandas.DataFrame
        With ``z_um, y_um, x_um`` (e.g. from :func:`measure`).
    chunks : tuple of 3 tuples of int
        The volume's chunks (``labels.chunks``).
    voxel_size_um : (3,) sequence of float

    Returns
    -------
    (NZ, NY, NX) ndarray of int64
        One value per block; sums to ``len(table)``.
    """
    vs = _voxel_size(voxel_size_um)
    if len(chunks) != 3:
        raise SegmentError(f"`chunks` must have 3 axes (z, y, x); got {len(chunks)}")
    counts = np.zeros(tuple(len(c) for c in chunks), dtype=np.int64)
    if len(table) == 0:
        return counts
    idx = []
    for a, name in enumerate(("z_um", "y_um", "x_um")):
        if name not in table:
            raise SegmentError(f"`table` lacks column {name!r}; has {list(table.columns)}")
        bounds = np.cumsum(chunks[a])
        vox = np.floor(table[name].to_numpy() / vs[a] + 0.5).astype(np.int64)
        idx.append(np.searchsorted(bounds, vox.clip(0, bounds[-1] - 1), side="right"))
    np.add.at(counts, tuple(idx), 1)
    return counts


# --------------------------------------------------------------------------- pipeline


def default_volume_range_um3(nucleus_diameter_um: float) -> tuple[float, float]:
    """Default size filter: spheres of half and of twice the nucleus diameter.

    Examples
    --------
    >>> lo, hi = default_volume_range_um3(10.0)
    >>> round(lo, 1), round(hi, 1)
    (65.4, 4188.8)
    """
    v = math.pi / 6.0 * nucleus_diameter_um**3
    return v / 8.0, v * 8.0


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_volume` returns.

    Attributes
    ----------
    labels : (Z, Y, X) dask array of uint32 or uint64
        Lazy instance labels ``1 … n`` matching ``table.label``; 0 background.
    table : pandas.DataFrame
        One row per cell, columns :data:`TABLE_COLUMNS`.
    threshold : float
        Intensity threshold used (a probability for ``method="model"``).
    n : int
        Number of cells (``len(table)``).
    count_map : (NZ, NY, NX) ndarray of int64
        Cells per block of ``labels`` by centroid; sums to ``n``.
    """

    labels: da.Array
    table: pd.DataFrame
    threshold: float
    n: int
    count_map: np.ndarray


def _model_probability(image, features, classifier) -> da.Array:
    if features is None:
        raise SegmentError(
            "segment.method='model' needs `features`: a (Z, Y, X) probability or "
            "(F, Z, Y, X) features with a `classifier`"
        )
    if not isinstance(features, da.Array):
        features = da.asarray(features)
    if features.ndim == 3:
        probability = features
    elif classifier is None:
        raise SegmentError("(F, Z, Y, X) `features` need a `classifier` (train_pixel_classifier)")
    else:
        probability = classify(features, classifier)
    if probability.shape != image.shape:
        raise SegmentError(
            f"model probability shape {probability.shape} differs from image shape {image.shape}"
        )
    return probability.rechunk(image.chunks)


def segment_volume(
    image: Any,
    *,
    voxel_size_um: Sequence[float],
    config: SegmentConfig | None = None,
    features: da.Array | None = None,
    classifier: PixelClassifier | None = None,
    chunks: Any = None,
    compute: Callable[[Any, str], Any] | None = None,
    model: Any = None,
) -> SegmentResult:
    """Intensities → mask → labels → cells table, each cell once, at any chunking.

    Parameters
    ----------
    image : (Z, Y, X) dask array or stored array-like
        Intensities of the nuclei channel (deconvolved or raw). A stored array (a
        `zarr.Array`, a `lightsheet.io.omezarr.StoredVolume`) is read block by block, each
        block's halo straight from the store (`lightsheet.regions`), so memory does not grow
        with the volume; a dask array gets its halos from neighbouring chunks.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm.
    config : SegmentConfig, optional
        Method and parameters; defaults derive from ``nucleus_diameter_um`` and the voxel size.
    features : dask array, optional
        For ``method="model"``: ``(Z, Y, X)`` nucleus probability (the UNet's own head,
        :func:`lightsheet.featurize.foreground_probability`), or ``(F, Z, Y, X)`` UNet
        features with ``classifier``. The mask is ``probability > config.threshold``
        (default 0.5).
    classifier : PixelClassifier, optional
        From :func:`train_pixel_classifier`, for ``(F, Z, Y, X)`` features.
    chunks : chunk spec, optional
        The blocks segmented (and the labels' chunks); default the image's chunks.
    compute : callable, optional
        ``compute(collection, description)`` runs each pass over the volume (the threshold's
        histogram, the analysis); a task passes one that shows progress. Default
        ``dask.compute``.
    model : torch.nn.Module, optional
        For ``method="model"``: the UNet itself (`lightsheet.featurize.load_model`), instead
        of ``features``; cells come from its heads with voxel-size transfer and its
        validated threshold (`lightsheet.segment.model.segment_with_model`).

    Returns
    -------
    SegmentResult
    """
    config = SegmentConfig() if config is None else config
    vs = _voxel_size(voxel_size_um)
    if config.method == "model" and model is not None:  # issue #21: the model's own heads
        from lightsheet.segment.model import segment_with_model

        return segment_with_model(image, model, voxel_size_um=vs, config=config, chunks=chunks)
    stored = is_stored(image) and config.method != "model"
    if is_stored(image):
        if len(image.shape) != 3:
            raise SegmentError(f"`image` must be a 3-D (Z, Y, X) array; got shape {image.shape}")
        grid = da.core.normalize_chunks(
            chunks if chunks is not None else image.chunks, image.shape, dtype=image.dtype
        )
        source, image = image, da.from_array(image, chunks=grid)
    image = _as_volume(image, "image")
    if chunks is not None and not stored:
        image = image.rechunk(chunks)
    diameter = config.nucleus_diameter_um
    lo_um3, hi_um3 = default_volume_range_um3(diameter)
    lo_um3 = config.min_volume_um3 if config.min_volume_um3 is not None else lo_um3
    hi_um3 = config.max_volume_um3 if config.max_volume_um3 is not None else hi_um3
    if lo_um3 > hi_um3:
        raise SegmentError(f"min_volume_um3 ({lo_um3}) is larger than max_volume_um3 ({hi_um3})")
    if config.method == "absolute" and config.threshold is None:
        raise SegmentError("segment.method='absolute' needs segment.threshold; got None")
    if config.method == "model":
        probability = _model_probability(image, features, classifier)
    tophat = None
    if config.subtract_background:
        radius = config.background_radius_um or diameter
        tophat = _tophat_geometry(vs, radius)
        image = (
            map_overlap(
                _tophat_region,
                source,
                depth=tophat[1],
                boundary="none",
                chunks=image.chunks,
                dtype=np.float32,
                size=tophat[0],
            )
            if stored
            else subtract_background(image, voxel_size_um=vs, radius_um=radius)
        )
    if config.method == "otsu":
        t = otsu_threshold(image, compute=compute)
        mask = image > t
    elif config.method == "absolute":
        t = float(config.threshold)
        mask = image > t
    else:
        t = 0.5 if config.threshold is None else float(config.threshold)
        mask = probability > t
    struct = structure(config.connectivity)
    # one analysis pass yields the labels' plan and the measurements together
    if config.watershed and stored:
        e_ov, m_ov, depth = _stored_watershed(source, mask.chunks, t, vs, config, tophat)
        labels, _, raw = _watershed_analysis(
            e_ov, m_ov, mask.chunks, struct, depth, 0, image, vs, compute
        )
    elif config.watershed:
        elevation, depth = _elevation_and_depth(
            mask, vs, diameter, config.split_depth_um, None, None
        )
        labels, _, raw = _watershed_analysis(
            *_shells(elevation, mask), mask.chunks, struct, depth, 0, image, vs, compute
        )
    else:
        labels, _, raw = _label_analysis(mask, struct, 0, image, vs, compute)
    keep = (raw["volume_um3"] >= lo_um3) & (raw["volume_um3"] <= hi_um3)
    table = raw[keep].reset_index(drop=True)
    new = np.arange(1, len(table) + 1, dtype=np.int64)
    final = relabel(labels, table["label"].to_numpy(), new)
    table["label"] = new
    cmap = count_map(table, chunks=final.chunks, voxel_size_um=vs)
    return SegmentResult(labels=final, table=table, threshold=t, n=len(table), count_map=cmap)


def _stored_watershed(source, grid, threshold: float, vs, config: SegmentConfig, tophat):
    """Elevation and mask shells of a stored image's blocks, each read with its own halo."""
    diameter = config.nucleus_diameter_um
    smooth = default_smooth_um(vs)
    halo = tuple(d + 1 for d in _elevation_depth(vs, diameter, smooth))
    if tophat is not None:
        halo = tuple(h + t for h, t in zip(halo, tophat[1], strict=True))
    surface = map_overlap(
        _surface_block,
        source,
        depth=halo,
        boundary="none",
        chunks=grid,
        dtype=np.float32,
        trim=False,
        out_chunks=_shell_chunks(grid),
        name="surface",
        threshold=float(threshold),
        voxel_size_um=vs,
        clip_um=diameter,
        sigma_vox=tuple(smooth / v for v in vs),
        tophat_size=None if tophat is None else tophat[0],
    )
    return surface, ~da.isnan(surface), _split_depth(diameter, vs, smooth, config.split_depth_um)
