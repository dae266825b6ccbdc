"""OS → cells: per-block partial sums per label, combined on the client (each cell once)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import pandas as pd

from lightsheet.errors import SegmentError
from lightsheet.segment._common import _as_volume, _block_origins, _to_numpy, _voxel_size

__all__ = [
    "TABLE_COLUMNS",
    "count_map",
    "measure",
]

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


#: Partial sums every block reports (``sum_w`` only with weights).
_SUMS = ("sum_w", "sum_z", "sum_y", "sum_x", "sum_i")


def _measure_block(
    labels: Any,
    image: Any,
    origin: tuple[int, int, int],
    *,
    weights: Any = None,
    sums: dict[str, Any] | None = None,
    maxes: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Per-label partial sums of one block (one sort of its foreground voxels).

    With ``weights`` the coordinate sums are weighted (``sum_w`` and ``sum_z`` … are
    ``Σw``, ``Σw·z`` …) for a weighted centroid; ``sums`` adds ``sum_<name>`` and
    ``maxes`` adds ``max_<name>`` per label of each named array.
    """
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
    w = None if weights is None else _to_numpy(weights).ravel()[fg].astype(np.float64)
    if w is not None:
        out["sum_w"] = np.add.reduceat(w, starts)
    for a, name in enumerate("zyx"):
        c = coords[a].astype(np.int64) + origin[a]
        cw = c.astype(np.float64) if w is None else c * w
        out[f"sum_{name}"] = np.add.reduceat(cw, starts)
        out[f"bbox_{name}_min"] = np.minimum.reduceat(c, starts)
        out[f"bbox_{name}_max"] = np.maximum.reduceat(c, starts) + 1
    out["sum_i"] = np.add.reduceat(inten, starts)
    out["max_i"] = np.maximum.reduceat(inten, starts)
    for name, values in (sums or {}).items():
        v = _to_numpy(values).ravel()[fg].astype(np.float64)
        out[f"sum_{name}"] = np.add.reduceat(v, starts)
    for name, values in (maxes or {}).items():
        v = _to_numpy(values).ravel()[fg].astype(np.float64)
        out[f"max_{name}"] = np.maximum.reduceat(v, starts)
    return pd.DataFrame(out)


def _combine(parts: list[pd.DataFrame], voxel_size_um) -> pd.DataFrame:
    """Whole-cell rows from the blocks' partial sums.

    Columns :data:`TABLE_COLUMNS`, plus ``sum_<name>`` (summed) and ``max_<name>`` (their
    maximum) for the ``sums`` and ``maxes`` the blocks measured. Centroids are weighted
    where the blocks measured ``weights``.
    """
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=_column_dtype(c)) for c in TABLE_COLUMNS})
    df = pd.concat(parts, ignore_index=True)
    extra = [c for c in df.columns if c.startswith("sum_") and c not in _SUMS]
    extra_max = [c for c in df.columns if c.startswith("max_") and c != "max_i"]
    agg = {c: "sum" for c in ("count", *_SUMS, *extra) if c in df.columns}
    agg.update({c: "max" for c in ("max_i", *extra_max)})
    agg.update({f"bbox_{a}_min": "min" for a in "zyx"})
    agg.update({f"bbox_{a}_max": "max" for a in "zyx"})
    g = df.groupby("label", sort=True).agg(agg)
    count = g["count"].to_numpy()
    norm = g["sum_w"].to_numpy() if "sum_w" in g else count
    vz, vy, vx = voxel_size_um
    table = pd.DataFrame(
        {
            "label": g.index.to_numpy().astype(np.int64),
            "z_um": g["sum_z"].to_numpy() / norm * vz,
            "y_um": g["sum_y"].to_numpy() / norm * vy,
            "x_um": g["sum_x"].to_numpy() / norm * vx,
            "volume_um3": count * (vz * vy * vx),
            "mean_intensity": g["sum_i"].to_numpy() / count,
            "max_intensity": g["max_i"].to_numpy(),
        }
    )
    for c in TABLE_COLUMNS[7:]:
        table[c] = g[c].to_numpy().astype(np.int64)
    for c in (*extra, *extra_max):
        table[c] = g[c].to_numpy()
    return table


def _column_dtype(c: str):
    return np.int64 if c == "label" or c.startswith("bbox") else np.float64


def measure(
    labels: Any,
    image: Any,
    *,
    voxel_size_um: Sequence[float],
    extra: dict[str, Any] | None = None,
) -> pd.DataFrame:
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
    extra : dict of name → (Z, Y, X) dask array, optional
        More arrays measured in the same pass: columns ``<name>_mean`` and ``<name>_max``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS` (and the ``extra`` columns), sorted by label; bounding
        boxes in voxels, min inclusive and max exclusive.
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
    extra = {k: _as_volume(v, k) for k, v in (extra or {}).items()}
    for name, values in extra.items():
        if values.shape != labels.shape:
            raise SegmentError(
                f"`extra[{name!r}]` shape {values.shape} differs from `labels` shape {labels.shape}"
            )
    origins = _block_origins(labels.chunks)
    lb, ib = labels.to_delayed(), image.to_delayed()
    eb = {k: v.rechunk(labels.chunks).to_delayed() for k, v in extra.items()}
    parts = dask.compute(
        *[
            dask.delayed(_measure_block)(
                lb[idx],
                ib[idx],
                tuple(int(origins[a][idx[a]]) for a in range(3)),
                sums={k: b[idx] for k, b in eb.items()},
                maxes={k: b[idx] for k, b in eb.items()},
            )
            for idx in np.ndindex(labels.numblocks)
        ]
    )
    table = _combine(list(parts), vs)
    count = table["volume_um3"].to_numpy() / np.prod(vs)
    for k in extra:
        empty = np.zeros(0)  # no labels: _combine has no per-array columns
        table[f"{k}_mean"] = table.pop(f"sum_{k}").to_numpy() / count if len(table) else empty
        table[f"{k}_max"] = table.pop(f"max_{k}").to_numpy() if len(table) else empty
    return table


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
