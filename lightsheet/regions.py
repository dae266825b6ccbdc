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

`map_overlap` is the one entry point, and the library's one lift of a kernel over
halo-padded blocks: ``func(padded, region=Region)`` for every block, the result trimmed to
the block (or returned as is). `Region` tells ``func`` where its block lies in the volume,
so blocks can name voxels and compute global indices. With ``regions=`` the tasks are
boxes of any size (featurize groups chunks so their halos are computed once): each reads
its own padded box, and the result's blocks are cut and joined from the tasks' outputs.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask.array as da
import numpy as np
from dask.array.overlap import ensure_minimum_chunksize
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

__all__ = [
    "Region",
    "block_grid",
    "block_regions",
    "is_stored",
    "join",
    "map_overlap",
    "read_region",
]

_BOUNDARIES = ("reflect", "nearest", "none")
#: NumPy's padding mode for each boundary (dask's "reflect" is NumPy's "symmetric").
_PAD_MODES = {"reflect": "symmetric", "nearest": "edge"}


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
    ``"symmetric"``, dask's ``"reflect"``), ``"nearest"`` repeats the edge voxel; with
    ``"none"`` the region never leaves the volume.
    """
    lo = [a - d for a, d in zip(region.start, region.lo, strict=True)]
    hi = [b + d for b, d in zip(region.stop, region.hi, strict=True)]
    inside = tuple(
        slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, region.shape, strict=True)
    )
    block = np.asarray(source[inside])
    pad = [(s.start - a, b - s.stop) for a, b, s in zip(lo, hi, inside, strict=True)]
    if any(p or q for p, q in pad):
        if boundary not in _PAD_MODES:
            raise ValueError(f"region {region} leaves the volume with boundary={boundary!r}")
        block = np.pad(block, pad, mode=_PAD_MODES[boundary])
    return block


def _apply(func: Callable, padded: Any, region: Region, trim: bool, kwargs: dict) -> Any:
    out = func(padded, region=region, **kwargs)
    return out[(..., *region.core)] if trim else out


def _run(
    func: Callable,
    names: tuple[str, ...],
    values: list,
    source: Any,
    region: Region,
    boundary: str,
    trim: bool,
) -> Any:
    padded = read_region(source, region, boundary)
    return _apply(func, padded, region, trim, dict(zip(names, values, strict=True)))


def _run_parts(
    func: Callable, names: tuple[str, ...], values: list, parts: Any, region: Region, trim: bool
) -> Any:
    return _apply(func, join(parts), region, trim, dict(zip(names, values, strict=True)))


def _run_padded(
    padded: Any,
    func: Callable,
    regions: dict,
    trim: bool,
    block_info: dict | None = None,
    **kwargs: Any,
) -> Any:
    return _apply(func, padded, regions[tuple(block_info[0]["chunk-location"])], trim, kwargs)


def _xp(a: Any) -> Any:
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def join(parts: Any, axis: int = 0) -> Any:
    """``np.block`` for NumPy or CuPy: nested lists of blocks, outer list along ``axis``.

    Examples
    --------
    >>> join([[np.zeros((1, 2)), np.ones((1, 1))], [np.ones((2, 3))]]).shape
    (3, 3)
    """
    if not isinstance(parts, list):
        return parts
    arrays = [join(p, axis + 1) for p in parts]
    if len(arrays) == 1:
        return arrays[0]
    return _xp(arrays[0]).concatenate(arrays, axis=axis)


def _getitem(block: Any, index: tuple[slice, ...]) -> Any:
    return block[index]


def block_grid(image: Any, chunks: Any = None) -> tuple[tuple[int, ...], ...]:
    """The block grid `map_overlap` cuts ``image`` into: ``chunks``, else the image's own."""
    if chunks is None:
        chunks = getattr(image, "chunks", None)
        if chunks is None:
            raise ValueError("chunks: needed for a stored image without a .chunks attribute")
    return da.core.normalize_chunks(chunks, image.shape, dtype=image.dtype)


def _pieces(
    bounds: list[list[int]], start: Sequence[int], stop: Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """Blocks of the grid ``bounds`` that the box ``[start, stop)`` overlaps.

    For each: its index, the overlap's slices within the box, and within the block.
    """
    per_axis = []
    for b, a0, a1 in zip(bounds, start, stop, strict=True):
        first = bisect.bisect_right(b, a0) - 1
        last = bisect.bisect_left(b, a1) - 1
        per_axis.append(
            [
                (
                    j,
                    slice(max(a0, b[j]) - a0, min(a1, b[j + 1]) - a0),
                    slice(max(a0, b[j]) - b[j], min(a1, b[j + 1]) - b[j]),
                )
                for j in range(first, last + 1)
            ]
        )
    return [
        (tuple(j for j, _, _ in c), tuple(s for _, s, _ in c), tuple(s for _, _, s in c))
        for c in itertools.product(*per_axis)
    ]


def _nest(pieces: list[tuple[tuple[int, ...], Any]], axis: int = 0) -> Any:
    """Nested lists (one level per axis) of the pieces tiling a block, by their offsets."""
    if not pieces or axis == len(pieces[0][0]):
        if len(pieces) != 1:
            raise ValueError("regions: the tasks' outputs do not tile a block on a grid")
        return pieces[0][1]
    offsets = sorted({p[0][axis] for p in pieces})
    return [_nest([p for p in pieces if p[0][axis] == o], axis + 1) for o in offsets]


def map_overlap(
    func: Callable[..., Any],
    image: Any,
    *,
    depth: Sequence[int] | None = None,
    boundary: str = "reflect",
    chunks: Any = None,
    dtype: Any,
    meta: Any = None,
    trim: bool = True,
    out_chunks: tuple[tuple[int, ...], ...] | None = None,
    name: str = "overlap",
    regions: Sequence[Region] | None = None,
    **kwargs: Any,
) -> da.Array:
    """Apply ``func`` to every block of ``image`` padded with a halo of ``depth`` voxels.

    The one lift of the library: every stage that runs a kernel over halo-padded blocks
    goes through here, for stored and dask inputs alike.

    Parameters
    ----------
    func : callable
        ``func(padded, region=Region, **kwargs)`` → an array of ``padded``'s shape (when
        ``trim``, possibly with leading axes of its own) or of the block's own shape
        (``trim=False`` with ``out_chunks`` None), or of the blocks of ``out_chunks``.
    image : (Z, Y, X) dask array or stored array-like
        A stored array-like (see `is_stored`) is read region by region: every block's task
        reads its own padded region, so no block waits in memory for its neighbours. A dask
        array gets its halos from the neighbouring chunks (`dask.array.overlap.overlap`).
    depth : (3,) ints
        Halo per side and axis (not used with ``regions``).
    boundary : {"reflect", "nearest", "none"}
        Beyond the volume's edges: mirrored voxels or the edge voxel repeated (the halo is
        always ``depth`` deep), or no halo (blocks at the edges are padded only inwards).
    chunks : chunk spec, optional
        Block grid; default the image's own chunks (a dask array's, or a stored array's
        ``.chunks``). For a dask array, chunks shallower than the halo are merged with
        their neighbours first (as `dask.array.map_overlap` does), so the result's chunks
        can differ from ``chunks`` there.
    dtype, meta
        Of the result.
    trim : bool
        Cut ``func``'s output down to the block (``Region.core``, on its last axes).
    out_chunks : tuple of tuples, optional
        The result's chunks when they are not the block grid (``trim=False``). With
        ``regions``: the block grid (``chunks``) after any leading axes of ``func``'s
        output, each of those in one chunk, e.g. ``((F,), *grid)``.
    name : str
        Prefix of the result's key names.
    regions : sequence of Region, optional
        Grouping: the tasks, instead of one per block. Each task reads its region's padded
        box ``[start - lo, stop + hi)`` (inside the volume unless ``boundary`` pads) and
        computes the output voxels ``[start, stop)``, which may span several blocks or part
        of one; every block of the result is cut and joined from the tasks' outputs that
        cover it. A task whose output is exactly one block becomes that block.
    **kwargs
        Passed on to ``func``; a `dask.delayed.Delayed` value is computed first and passed
        as its result. For a stored image or with ``regions`` they are held once in the
        graph, not copied into every task (a model's weights go to each worker once).

    Returns
    -------
    dask.array.Array
        Lazy; one task per block (per region with ``regions``) for stored images.
    """
    if boundary not in _BOUNDARIES:
        raise ValueError(f"boundary must be one of {_BOUNDARIES}; got {boundary!r}")
    ndim = len(image.shape)
    grid = block_grid(image, chunks)
    if regions is None:
        depth = tuple(int(d) for d in depth) if depth is not None else None
        if depth is None or len(depth) != ndim or min(depth) < 0:
            raise ValueError(f"depth must be {ndim} non-negative ints; got {depth!r}")
        if isinstance(image, da.Array):
            # dask takes a halo from the next chunk only: chunks at least as deep as the halo
            grid = tuple(
                ensure_minimum_chunksize(d, c) if d else c for d, c in zip(depth, grid, strict=True)
            )
    result_chunks = out_chunks if out_chunks is not None else grid
    if meta is None:
        meta = np.empty((0,) * len(result_chunks), dtype=dtype)
    if isinstance(image, da.Array) and image.chunks != grid:
        image = image.rechunk(grid)
    if not isinstance(image, da.Array) and not is_stored(image):
        raise TypeError(
            f"image: expected a dask array or a stored array-like; got {type(image).__name__}"
        )
    token = tokenize(
        image if is_stored(image) else image.name,
        func,
        kwargs,
        depth,
        boundary,
        grid,
        trim,
        result_chunks,
        regions,
    )
    # Delayed arguments are computed first: the graph's dependencies
    names = tuple(k for k, v in kwargs.items() if isinstance(v, Delayed))
    kernel = partial(func, **{k: v for k, v in kwargs.items() if k not in names})
    if regions is None and isinstance(image, da.Array):
        padded = da.overlap.overlap(image, depth=dict(enumerate(depth)), boundary=boundary)
        return padded.map_blocks(
            _run_padded,
            kernel,
            block_regions(grid, depth, boundary),
            trim,
            dtype=dtype,
            meta=meta,
            chunks=result_chunks,
            name=f"{name}-{token}",
            **{k: kwargs[k] for k in names},
        )
    out = f"{name}-{token}"
    values = [kwargs[k].key for k in names]
    fkey = f"{name}-kernel-{token}"
    dsk: dict[Any, Any] = {fkey: kernel}  # the kernel and its arguments, once
    deps: list[Any] = [kwargs[k] for k in names]
    if is_stored(image):
        dsk[f"{name}-source-{token}"] = image
        source: Any = f"{name}-source-{token}"
    else:
        deps.append(image)
        source = image.name
    bounds = [np.cumsum((0,) + tuple(c)).tolist() for c in grid]
    if regions is None:
        for idx, region in block_regions(grid, depth, boundary).items():
            dsk[(out, *idx)] = (_run, fkey, names, values, source, region, boundary, trim)
    else:
        lead = (0,) * (len(result_chunks) - ndim)
        tasks = {}
        for i, region in enumerate(regions):
            if is_stored(image):
                task = (_run, fkey, names, values, source, region, boundary, trim)
            else:
                parts = _chunk_parts(source, bounds, region, image.shape)
                task = (_run_parts, fkey, names, values, parts, region, trim)
            tasks[(f"{name}-group-{token}", i)] = (task, region)
        dsk.update(_gather(tasks, bounds, out, lead))
    graph = HighLevelGraph.from_collections(out, dsk, dependencies=deps)
    return da.Array(graph, out, result_chunks, meta=meta)


def _chunk_parts(name: str, bounds: list[list[int]], region: Region, shape: tuple) -> Any:
    """Nested getitem tasks on the chunks of the dask array ``name``: the padded region."""
    lo = [a - d for a, d in zip(region.start, region.lo, strict=True)]
    hi = [b + d for b, d in zip(region.stop, region.hi, strict=True)]
    if min(lo) < 0 or any(b > n for b, n in zip(hi, shape, strict=True)):
        raise ValueError(f"regions: {region} leaves the volume")
    return _nest(
        [
            (tuple(s.start for s in box), (_getitem, (name, *idx), sub))
            for idx, box, sub in _pieces(bounds, lo, hi)
        ]
    )


def _gather(tasks: dict, bounds: list[list[int]], out: str, lead: tuple) -> dict:
    """The result's blocks from the grouped tasks' outputs (``tasks``: key → task, region)."""
    dsk: dict[Any, Any] = {}
    pieces: dict[tuple[int, ...], list] = {}  # a block of the result: its parts
    for key, (task, region) in tasks.items():
        covered = _pieces(bounds, region.start, region.stop)
        idx, _, sub = covered[0]
        whole = all(
            (s.start, s.stop) == (0, b[j + 1] - b[j])
            for s, b, j in zip(sub, bounds, idx, strict=True)
        )
        if len(covered) == 1 and whole:
            dsk[(out, *lead, *idx)] = task  # the task computes exactly one block
            continue
        dsk[key] = task
        for idx, box, sub in covered:
            offset = tuple(s.start for s in sub)
            part = (_getitem, key, (slice(None),) * len(lead) + box)
            pieces.setdefault(idx, []).append((offset, part))
    for idx, parts in pieces.items():
        nested = _nest(parts)
        dsk[(out, *lead, *idx)] = (join, nested, len(lead)) if isinstance(nested, list) else nested
    for idx in itertools.product(*(range(len(b) - 1) for b in bounds)):
        if (out, *lead, *idx) not in dsk:
            raise ValueError(f"regions: no task computes block {idx} of the result")
    return dsk
