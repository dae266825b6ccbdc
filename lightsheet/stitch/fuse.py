"""Fusion of registered, overlapping tiles into one lazy volume, block by block.

Each block of the output reads, from every tile that reaches it, only the region it covers
(plus one voxel where a sub-voxel position needs interpolating), moves it to its registered
position by linear interpolation (an integer position copies voxels), and blends the tiles
where they overlap: each tile is weighted by a ramp that rises linearly from its border over
``blend_vox`` voxels (per axis, multiplied), and the weighted mean is taken. Where one tile
covers a voxel the result is that tile's (interpolated) value.

Voxels no tile covers (the mosaic's box reaches past the tiles that stage errors shifted
inward, a few voxels along its border) take the nearest tile's voxels mirrored about its
edge (`_mirrored`): the tiles' edges are extended, as image borders are for filtering. Zeros
there would be a step from no signal to the tissue's level, which deconvolution rings at and
detection finds as a row of bright objects (measured: 344 false cells on the overlapping
small sample, ``benchmarks/results/stitch.md``). The edge voxel repeated instead (before
2026-12-07) made rows of equal values, where one speck of noise, repeated over a few rows,
stood out as a nucleus (two false on the realistic mosaic, none mirrored). "Nearest" is a
function of the voxel and the tiles' positions only, so the result does not depend on the
blocks.

The block is cut where any tile's part of it starts or ends, so each piece has one set of
tiles: a piece of one tile is only moved (copied where its position is on the grid), and
only the pieces where tiles overlap are weighted and blended, with weights that vary only
along the axes where a tile's ramp does. Pieces are worked through in slabs of a few
planes (`SLAB_VOXELS`) whose float32 scratch stays in the CPU's cache: with the 4 × 4
benchmark this took fusion from 4.7 to about 2× the abutting path's time per output GB
(``benchmarks/results/stitch.md``).

Like the abutting path (`lightsheet.stitch.stitch`), the result is one blockwise dask layer
whose blocks share nothing: memory is a few blocks per worker thread, whatever the volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np

__all__ = [
    "SLAB_VOXELS",
    "fuse",
    "mosaic_shape",
]


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


#: Voxels per slab of planes that fusion interpolates and blends at a time: the float32
#: scratch arrays of a slab stay in the CPU's cache (2.5× less CPU than whole pieces).
SLAB_VOXELS = 2**17


def _fuse_block(regions: np.ndarray, table: dict, *, block_info: dict) -> np.ndarray:
    (t, _), (c, _), *zyx = block_info[None]["array-location"]
    dtype = np.dtype(block_info[None]["dtype"])
    shape = tuple(b - a for a, b in zyx)
    tile_shape = table["tile_shape"]
    covers = {
        i: cover
        for i, pos in enumerate(table["positions"])
        if (cover := _cover(zyx, pos, tile_shape)) is not None
    }
    # each tile's voxels over its part of the block (and one more where it interpolates)
    raw = {i: regions[t, c, i].read(read_box) for i, (_, read_box, _) in covers.items()}
    boxes = {i: out_box for i, (out_box, _, _) in covers.items()}
    fracs = {i: frac for i, (_, _, frac) in covers.items()}
    if len(covers) == 1:
        (i,) = covers
        if boxes[i] == tuple(slice(0, n) for n in shape) and not any(fracs[i]):
            return raw[i].astype(dtype, copy=False)[None, None]  # one tile on the grid: as read
    out = np.zeros(shape, dtype)
    if not covers:
        _extend_tiles(out, ((0, n) for n in shape), zyx, table, regions[t, c])
        return out[None, None]
    # the block cut where any tile's part starts or ends: each piece has one set of tiles
    cuts = [
        sorted({0, n, *(b[k].start for b in boxes.values()), *(b[k].stop for b in boxes.values())})
        for k, n in enumerate(shape)
    ]
    for piece in itertools.product(*(list(itertools.pairwise(c)) for c in cuts)):
        who = [
            i
            for i, box in boxes.items()
            if all(s.start <= lo and hi <= s.stop for s, (lo, hi) in zip(box, piece, strict=True))
        ]
        if not who:
            _extend_tiles(out, piece, zyx, table, regions[t, c])
            continue
        if len(who) == 1 and not any(fracs[who[0]]):  # on the grid, alone: copied
            i = who[0]
            out[tuple(slice(lo, hi) for lo, hi in piece)] = raw[i][_source(piece, boxes[i], 0)]
            continue
        # 1-D border ramps of each tile along each axis over the piece (None: all 1)
        ramps = [_ramps(zyx, piece, table["positions"][i], tile_shape, table["blend"]) for i in who]
        (z0, z1), rest = piece[0], piece[1:]
        planes = max(1, SLAB_VOXELS // max(1, math.prod(hi - lo for lo, hi in rest)))
        for za in range(z0, z1, planes):
            slab = ((za, min(z1, za + planes)), *rest)
            target = tuple(slice(lo, hi) for lo, hi in slab)
            parts = [_resample(raw[i][_source(slab, boxes[i], fracs[i])], fracs[i]) for i in who]
            if len(who) == 1:
                _store(out, target, parts[0])
                continue
            weights = [_outer(r, za - z0, slab[0][1] - za) for r in ramps]
            total = sum(weights[1:], weights[0])
            acc = None
            for w, values in zip(weights, parts, strict=True):
                term = np.multiply(values, w / total, dtype=np.float32)
                acc = term if acc is None else np.add(acc, term, out=acc)
            _store(out, target, acc)
    return out[None, None]


def _extend_tiles(out: np.ndarray, piece, zyx, table: dict, tiles: np.ndarray) -> None:
    """Fill ``out[piece]``, which no tile covers, from the nearest tile mirrored about its edge.

    The nearest tile is the one whose voxel box (origins rounded) is nearest in Euclidean
    distance, ties to the lower index; its voxel is the voxel position mirrored into it.
    """
    piece = [tuple(p) for p in piece]
    coords = [np.arange(lo + a, hi + a) for (lo, hi), (a, _) in zip(piece, zyx, strict=True)]
    best = np.full(tuple(len(x) for x in coords), np.inf)
    owner = np.full(best.shape, -1)
    starts = np.rint(np.asarray(table["positions"], dtype=float)).astype(np.int64)
    size = np.asarray(table["tile_shape"])
    for i, start in enumerate(starts):
        gaps = [
            np.maximum(0, np.maximum(s - x, x - (s + n - 1))).astype(np.float64) ** 2
            for x, s, n in zip(coords, start, size, strict=True)
        ]
        d = gaps[0][:, None, None] + gaps[1][None, :, None] + gaps[2][None, None, :]
        closer = d < best
        best[closer], owner[closer] = d[closer], i
    target = out[tuple(slice(lo, hi) for lo, hi in piece)]
    for i in np.unique(owner):
        j = [_mirrored(x - s, n) for x, s, n in zip(coords, starts[i], size, strict=True)]
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in j)
        values = tiles[i].read(box)[np.ix_(*(a - a.min() for a in j))]
        mine = owner == i
        target[mine] = values[mine]


def _mirrored(k: np.ndarray, n: int) -> np.ndarray:
    """Indices ``k`` mirrored into a tile of ``n`` voxels about its first and last voxel.

    The edge voxel is not repeated; an index beyond a whole tile's width is clipped.

    >>> _mirrored(np.arange(-3, 8), 5).tolist()
    [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    """
    k = np.abs(k)
    return np.clip(np.where(k > n - 1, 2 * (n - 1) - k, k), 0, n - 1)


def _source(piece, box, frac) -> tuple[slice, ...]:
    """Slices of a tile's read voxels that interpolate to ``piece`` (block coordinates)."""
    fracs = np.broadcast_to(np.asarray(frac, dtype=float), (len(piece),))
    return tuple(
        slice(lo - s.start, hi - s.start + (1 if f > 0 else 0))
        for (lo, hi), s, f in zip(piece, box, fracs, strict=True)
    )


def _store(out: np.ndarray, target: tuple[slice, ...], values: np.ndarray) -> None:
    """``values`` into ``out[target]`` in ``out``'s dtype; integers rounded.

    Interpolation and blending are convex combinations of tile voxels, so they stay
    within the dtype's range: no clipping is needed. ``values`` (float, this block's own
    scratch) may be changed.
    """
    if values.dtype.kind == "f" and out.dtype.kind == "u":
        # non-negative: the cast truncates v + 0.5, which rounds (halves up)
        values = np.add(values, np.float32(0.5), out=values if values.flags.writeable else None)
    elif values.dtype.kind == "f" and out.dtype.kind == "i":
        values = np.rint(values)
    out[target] = values


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
    """Linear interpolation along each axis with a fraction: ``f v[:-1] + (1 - f) v[1:]``.

    Computed as ``v[1:] + f (v[:-1] - v[1:])`` in float32: three passes over the voxels
    per axis, the first of which also converts them.
    """
    for axis, f in enumerate(frac):
        if f == 0:
            continue
        lo = [slice(None)] * values.ndim
        hi = [slice(None)] * values.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        after = values[tuple(hi)]
        out = np.subtract(values[tuple(lo)], after, dtype=np.float32)
        out *= np.float32(f)
        out += after
        values = out
    return values


def _ramps(zyx, piece, pos, tile_shape, blend) -> list[np.ndarray | None]:
    """A tile's blending ramp along each axis over ``piece`` (block coordinates).

    The ramp rises linearly from the tile's border over ``blend`` voxels; None where it is
    1 over the whole piece.
    """
    out: list[np.ndarray | None] = []
    for (a, _), (lo, hi), p, n, width in zip(zyx, piece, pos, tile_shape, blend, strict=True):
        u = np.arange(lo + a, hi + a, dtype=np.float64) - p
        ramp = np.minimum(1.0, (np.minimum(u, n - 1 - u) + 0.5) / width)
        out.append(None if ramp.min() >= 1.0 else ramp.astype(np.float32))
    return out


def _outer(ramps: list[np.ndarray | None], z0: int, nz: int) -> np.ndarray | float:
    """The weight (product of ramps) over planes ``z0 : z0 + nz`` of a piece, broadcastable.

    Axes whose ramp is all 1 are left out, so a side overlap's weight varies along one
    axis and is never spread over the piece.
    """
    w: np.ndarray | float = 1.0
    for axis, ramp in enumerate(ramps):
        if ramp is None:
            continue
        if axis == 0:
            ramp = ramp[z0 : z0 + nz]
        shape = [1] * len(ramps)
        shape[axis] = -1
        w = w * ramp.reshape(shape)
    return w
