"""Block helpers shared by the segmentation modules: array modules, checks, geometry."""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lightsheet.errors import SegmentError

__all__ = [
    "label_dtype",
    "structure",
]

_UINT32_MAX = np.iinfo(np.uint32).max


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


def _components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """The connected component of each of ``n`` nodes joined by the pairs ``(a[i], b[i])``.

    Examples
    --------
    >>> _components(np.array([0, 3]), np.array([1, 4]), 5).tolist()
    [0, 0, 1, 2, 2]
    """
    graph = coo_matrix((np.ones(len(a), bool), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


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
