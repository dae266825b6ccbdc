"""Blocks with halos, read straight from a stored array: overlap without a wavefront.

`dask.array.map_overlap` gives every block a halo taken from its neighbours' chunks, so a
chunk stays in memory until every neighbour has taken its share; in a sweep over a 3-D grid
that is a whole layer of chunks, and memory grows with the volume's cross-section. When the
input is stored (a `zarr.Array`, a `lightsheet.io.omezarr.StoredVolume`, any array-like that
reads a region on ``[...]``), each block's task here reads its own halo-padded region from
the store instead: the tasks share nothing, each holds one padded block, and memory stays
the same at any volume size. The price is reading the halo twice (once for each block that
needs it), small beside the stages that use halos. Dask arrays keep dask's own overlap, with
the same results.

`map_overlap` is the one entry point: ``func(padded, region=Region)`` for every block, the
result trimmed to the block (or returned as is). `Region` tells ``func`` where its block
lies in the volume, so blocks can name voxels and compute global indices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

__all__ = ["Region", "block_regions", "is_stored", "map_overlap", "read_region"]

_BOUNDARIES = ("reflect", "none")


@dataclass(frozen=True)
class Region:
    """Where a halo-padded block lies in the volume.

    Attributes
    ----------
    index : tuple of int
        The block's position in the block grid.
    start, stop : tuple of int
        The block's own voxels (without halo), volume coordinates ``[start, stop)``.
    lo, hi : tuple of int
        Halo voxels before and after the block on each axis (fewer at the volume's edges
        with ``boundary="none"``).
    shape : tuple of int
        The whole volume's shape.
    """

    index: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def origin(self) -> tuple[int, ...]:
        """Volume index of the padded block's first voxel (negative in a reflected halo)."""
        return tuple(s - lo for s, lo in zip(self.start, self.lo, strict=True))

    @property
    def core(self) -> tuple[slice, ...]:
        """The block's own voxels within the padded block."""
        return tuple(
            slice(lo, lo + b - a) for lo, a, b in zip(self.lo, self.start, self.stop, strict=True)
        )


def is_stored(image: Any) -> bool:
    """True for array-likes read region by region (not dask or NumPy arrays)."""
    return (
        not isinstance(image, da.Array | np.ndarray)
        and hasattr(image, "shape")
        and hasattr(image, "dtype")
        and hasattr(image, "__getitem__")
    )


def block_regions(
    chunks: tuple[tuple[int, ...], ...], depth: tuple[int, ...], boundary: str = "none"
) -> dict[tuple[int, ...], Region]:
    """Every block of the grid ``chunks`` with its halo of ``depth``, by block index."""
    shape = tuple(sum(c) for c in chunks)
    bounds = [np.cumsum((0,) + tuple(c)).tolist() for c in chunks]
    out = {}
    for idx in itertools.product(*(range(len(c)) for c in chunks)):
        start = tuple(int(bounds[a][i]) for a, i in enumerate(idx))
        stop = tuple(int(bounds[a][i + 1]) for a, i in enumerate(idx))
        if boundary == "none":
            lo = tuple(min(d, s) for d, s in zip(depth, start, strict=True))
            hi = tuple(min(d, n - e) for d, n, e in zip(depth, shape, stop, strict=True))
        else:
            lo = hi = tuple(depth)
        out[idx] = Region(idx, start, stop, lo, hi, shape)
    return out


def read_region(source: Any, region: Region, boundary: str = "none") -> np.ndarray:
    """The padded block of ``region`` from ``source``; a halo beyond the volume is mirrored.

    ``boundary="reflect"`` mirrors the volume's edge voxels into the halo (NumPy's
    ``"symmetric"``, dask's ``"reflect"``); with ``"none"`` the region never leaves the volume.
    """
    lo = [a - d for a, d in zip(region.start, region.lo, strict=True)]
    hi = [b + d for b, d in zip(region.stop, region.hi, strict=True)]
    inside = tuple(
        slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, region.shape, strict=True)
    )
    block = np.asarray(source[inside])
    pad = [(s.start - a, b - s.stop) for a, b, s in zip(lo, hi, inside, strict=True)]
    if any(p or q for p, q in pad):
        if boundary != "reflect":
            raise ValueError(f"region {region} leaves the volume with boundary={boundary!r}")
        block = np.pad(block, pad, mode="symmetric")
    return block


def _apply(func: Callable, padded: Any, region: Region, trim: bool) -> Any:
    out = func(padded, region=region)
    return out[region.core] if trim else out


def _run(func: Callable, source: Any, region: Region, boundary: str, trim: bool) -> Any:
    return _apply(func, read_region(source, region, boundary), region, trim)


def _run_padded(
    padded: Any, func: Callable, regions: dict, trim: bool, block_info: dict | None = None
) -> Any:
    return _apply(func, padded, regions[tuple(block_info[0]["chunk-location"])], trim)


def _normal_chunks(image: Any, chunks: Any) -> tuple[tuple[int, ...], ...]:
    if chunks is None:
        chunks = getattr(image, "chunks", None)
        if chunks is None:
            raise ValueError("chunks: needed for a stored image without a .chunks attribute")
    return da.core.normalize_chunks(chunks, image.shape, dtype=image.dtype)


def map_overlap(
    func: Callable[..., Any],
    image: Any,
    *,
    depth: Sequence[int],
    boundary: str = "reflect",
    chunks: Any = None,
    dtype: Any,
    meta: Any = None,
    trim: bool = True,
    out_chunks: tuple[tuple[int, ...], ...] | None = None,
    name: str = "overlap",
    **kwargs: Any,
) -> da.Array:
    """Apply ``func`` to every block of ``image`` padded with a halo of ``depth`` voxels.

    Parameters
    ----------
    func : callable
        ``func(padded, region=Region, **kwargs)`` → an array of ``padded``'s shape (when
        ``trim``) or of the block's own shape (``trim=False`` with ``out_chunks`` None), or
        of the blocks of ``out_chunks``.
    image : (Z, Y, X) dask array or stored array-like
        A stored array-like (see `is_stored`) is read region by region: every block's task
        reads its own padded region, so no block waits in memory for its neighbours. A dask
        array gets its halos from the neighbouring chunks (`dask.array.overlap.overlap`).
    depth : (3,) ints
        Halo per side and axis.
    boundary : {"reflect", "none"}
        Beyond the volume's edges: mirrored voxels (the halo is always ``depth`` deep), or
        no halo (blocks at the edges are padded only inwards).
    chunks : chunk spec, optional
        Block grid; default the image's own chunks (a dask array's, or a stored array's
        ``.chunks``). For a dask array, chunks shallower than the halo are merged with
        their neighbours first (as `dask.array.map_overlap` does), so the result's chunks
        can differ from ``chunks`` there.
    dtype, meta
        Of the result.
    trim : bool
        Cut ``func``'s output down to the block (``Region.core``).
    out_chunks : tuple of tuples, optional
        The result's chunks when they are not the block grid (``trim=False``).
    name : str
        Prefix of the result's key names.
    **kwargs
        Passed on to ``func``.

    Returns
    -------
    dask.array.Array
        Lazy; one task per block for stored images.
    """
    if boundary not in _BOUNDARIES:
        raise ValueError(f"boundary must be one of {_BOUNDARIES}; got {boundary!r}")
    depth = tuple(int(d) for d in depth)
    if len(depth) != len(image.shape) or min(depth) < 0:
        raise ValueError(f"depth must be {len(image.shape)} non-negative ints; got {depth!r}")
    grid = _normal_chunks(image, chunks)
    if isinstance(image, da.Array):
        # dask takes a halo from the next chunk only: chunks at least as deep as the halo
        grid = tuple(
            ensure_minimum_chunksize(d, c) if d else c for d, c in zip(depth, grid, strict=True)
        )
    regions = block_regions(grid, depth, boundary)
    result_chunks = out_chunks if out_chunks is not None else grid
    if meta is None:
        meta = np.empty((0,) * len(result_chunks), dtype=dtype)
    func = partial(func, **kwargs)
    if isinstance(image, da.Array):
        if image.chunks != grid:
            image = image.rechunk(grid)
        padded = da.overlap.overlap(image, depth=dict(enumerate(depth)), boundary=boundary)
        return padded.map_blocks(
            _run_padded,
            func,
            regions,
            trim,
            dtype=dtype,
            meta=meta,
            chunks=result_chunks,
            name=f"{name}-{tokenize(padded.name, func, depth, trim, result_chunks)}",
        )
    if not is_stored(image):
        raise TypeError(
            f"image: expected a dask array or a stored array-like; got {type(image).__name__}"
        )
    token = tokenize(image, func, depth, boundary, grid, trim, result_chunks)
    out = f"{name}-{token}"
    src = f"{name}-source-{token}"
    dsk: dict[Any, Any] = {src: image}
    for idx, region in regions.items():
        dsk[(out, *idx)] = (_run, func, src, region, boundary, trim)
    graph = HighLevelGraph.from_collections(out, dsk, dependencies=[])
    return da.Array(graph, out, result_chunks, meta=meta)
