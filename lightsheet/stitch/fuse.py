"""Fusion of registered, overlapping tiles into one lazy volume, block by block.

Each block of the output reads, from every tile that reaches it, only the region it covers
(plus one voxel where a sub-voxel position needs interpolating), moves it to its registered
position by linear interpolation (an integer position copies voxels), and blends the tiles
where they overlap: each tile is weighted by a ramp that rises linearly from its border over
``blend_vox`` voxels (per axis, multiplied), and the weighted mean is taken. Where one tile
covers a voxel the result is that tile's (interpolated) value; voxels no tile covers are 0.

Like the abutting path (`lightsheet.stitch.stitch`), the result is one blockwise dask layer
whose blocks share nothing: memory is a few blocks per worker thread, whatever the volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np


def mosaic_shape(positions_vox: np.ndarray, tile_shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxels (Z, Y, X) of the box from the origin to the far side of the farthest tile.

    Examples
    --------
    >>> mosaic_shape(np.array([[0, 0, 0], [0, 0, 85.2]]), (10, 100, 100))
    (10, 100, 186)
    """
    far = np.asarray(positions_vox, dtype=float).max(axis=0) + np.asarray(tile_shape)
    return tuple(int(math.ceil(v - 1e-9)) for v in far)  # type: ignore[return-value]


def fuse(
    regions: np.ndarray,
    positions_vox: np.ndarray,
    *,
    shape_zyx: Sequence[int],
    chunks: Sequence[int],
    blend_vox: Sequence[float],
    dtype,
    interpolation: str = "linear",
) -> da.Array:
    """Fuse tiles at registered positions into a lazy ``(T, C, Z, Y, X)`` volume.

    Parameters
    ----------
    regions : (T, C, n) ndarray of objects
        Array-likes of each tile's voxels (`lightsheet.io.tiff.TiffRegion`, ...), tiles in
        the order of ``positions_vox``.
    positions_vox : (n, 3) ndarray
        Each tile's origin (its voxel 0's centre) in output voxels.
    shape_zyx : (3,) sequence of int
        Output voxels; anything of a tile outside is cropped.
    chunks : (3,) sequence of int
        Block shape of the result.
    blend_vox : (3,) sequence of float
        Width of the blending ramp at a tile's border, per axis (at least 1).
    dtype : dtype
        Of the tiles and of the result (integers are rounded).
    interpolation : {"linear", "nearest"}
        How a sub-voxel position is honoured: linear interpolation, or the position
        rounded to the voxel grid (at most half a voxel off, voxels copied: faster).

    Returns
    -------
    (T, C, Z, Y, X) dask.array.Array
    """
    t, c, _ = regions.shape
    dtype = np.dtype(dtype)
    if interpolation not in ("linear", "nearest"):
        raise ValueError(f"interpolation must be 'linear' or 'nearest'; got {interpolation!r}")
    positions = np.asarray(positions_vox, dtype=float)
    table = {
        "positions": np.rint(positions) if interpolation == "nearest" else positions,
        "tile_shape": tuple(regions.flat[0].shape),
        "blend": tuple(max(1.0, float(b)) for b in blend_vox),
    }
    return da.map_blocks(
        _fuse_block,
        dask.delayed(regions, pure=True),
        dask.delayed(table, pure=True),
        dtype=dtype,
        chunks=da.core.normalize_chunks((1, 1, *chunks), (t, c, *shape_zyx)),
        meta=np.empty((0,) * 5, dtype),
        name=f"fuse-{dask.base.tokenize(regions, table, tuple(chunks), tuple(shape_zyx))}",
    )


def _fuse_block(regions: np.ndarray, table: dict, *, block_info: dict) -> np.ndarray:
    (t, _), (c, _), *zyx = block_info[None]["array-location"]
    dtype = np.dtype(block_info[None]["dtype"])
    shape = tuple(b - a for a, b in zyx)
    tile_shape = table["tile_shape"]
    covers = [
        (i, cover)
        for i, pos in enumerate(table["positions"])
        if (cover := _cover(zyx, pos, tile_shape)) is not None
    ]
    if len(covers) == 1 and covers[0][1][0] == tuple(slice(0, n) for n in shape):
        # one tile covers the whole block: its (interpolated) voxels, no blending
        i, (_, read_box, frac) = covers[0]
        return _cast(_resample(regions[t, c, i].read(read_box), frac), dtype)[None, None]
    acc = np.zeros(shape, np.float32)
    weights = np.zeros(shape, np.float32)
    for i, (out_box, read_box, frac) in covers:
        values = _resample(regions[t, c, i].read(read_box), frac)
        w = _weights(zyx, out_box, table["positions"][i], tile_shape, table["blend"])
        acc[out_box] += w * values
        weights[out_box] += w
    np.divide(acc, weights, out=acc, where=weights > 0)
    return _cast(acc, dtype)[None, None]


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Values in the tiles' dtype; integers rounded.

    Interpolation and blending are convex combinations of tile voxels, so they stay
    within the dtype's range: no clipping is needed.
    """
    if values.dtype == dtype:
        return values
    if dtype.kind in "ui":
        values = np.rint(values, out=values if values.dtype.kind == "f" else None)
    return values.astype(dtype)


def _cover(zyx, pos, tile_shape):
    """Where a tile at ``pos`` meets the block: output slices, tile slices to read, fractions.

    A tile at origin ``P = Pi + f`` (``f`` in [0, 1)) gives output voxel ``x`` the value
    ``f v[j - 1] + (1 - f) v[j]`` with ``j = x - Pi``; it covers ``x`` in
    ``[Pi + (f > 0), Pi + T - 1]``.
    """
    out_box, read_box, fracs = [], [], []
    for (a, b), p, n in zip(zyx, pos, tile_shape, strict=True):
        pi = math.floor(p)
        f = p - pi
        if f < 1e-9 or f > 1 - 1e-9:  # on the grid, up to rounding of the solve
            pi, f = round(p), 0.0
        lo = max(a, pi + (1 if f > 0 else 0))
        hi = min(b, pi + n)
        if hi <= lo:
            return None
        out_box.append(slice(lo - a, hi - a))
        read_box.append(slice(lo - pi - (1 if f > 0 else 0), hi - pi))
        fracs.append(f)
    return tuple(out_box), tuple(read_box), tuple(fracs)


def _resample(values: np.ndarray, frac) -> np.ndarray:
    """Linear interpolation along each axis with a fraction: ``f v[:-1] + (1 - f) v[1:]``."""
    for axis, f in enumerate(frac):
        if f == 0:
            continue
        lo = [slice(None)] * values.ndim
        hi = [slice(None)] * values.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        v = values.astype(np.float32, copy=False)
        out = v[tuple(hi)] * np.float32(1 - f)
        out += np.float32(f) * v[tuple(lo)]
        values = out
    return values


def _weights(zyx, out_box, pos, tile_shape, blend) -> np.ndarray:
    """Blending weight of a tile over ``out_box``: ramps from its borders, multiplied."""
    w = None
    for axis, ((a, _), sl, p, n, width) in enumerate(
        zip(zyx, out_box, pos, tile_shape, blend, strict=True)
    ):
        u = np.arange(sl.start + a, sl.stop + a, dtype=np.float64) - p
        ramp = np.minimum(1.0, (np.minimum(u, n - 1 - u) + 0.5) / width).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        w = ramp.reshape(shape) if w is None else w * ramp.reshape(shape)
    return w
