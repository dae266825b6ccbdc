"""BS → OS: connected components with ids unique across the volume, at any chunking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from lightsheet.errors import SegmentError
from lightsheet.segment._common import (
    _as_mask,
    _block_origins,
    _check_offset,
    _components,
    _ndi_for,
    _pad_widths,
    _to_numpy,
    _xp_for,
    label_dtype,
    structure,
)
from lightsheet.segment.measure import _combine, _measure_block
from lightsheet.segment.threshold import _compute

__all__ = [
    "label",
    "relabel",
]


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
        comp = _components(inv[:, 0], inv[:, 1], ids.size)
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
