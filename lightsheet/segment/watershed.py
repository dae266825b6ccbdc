"""BS → OS: steepest-ascent watershed, exact at any chunking (basins, saddles, dynamics)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from lightsheet.config.derived import default_smooth_um, default_split_depth_um
from lightsheet.errors import SegmentError
from lightsheet.regions import Region, map_overlap
from lightsheet.segment._common import (
    _as_mask,
    _as_volume,
    _block_origins,
    _check_offset,
    _components,
    _ndi_for,
    _pad_widths,
    _positive,
    _to_numpy,
    _voxel_size,
    _xp_for,
    label_dtype,
    structure,
)
from lightsheet.segment.graph import (
    _block_edges,
    _inner_saddles,
    _max_by_pair,
    _merge_by_dynamics,
    _neighbour_offsets,
    _resolve,
    _sorted_lookup,
    _step,
    _touching_blocks,
)
from lightsheet.segment.measure import _combine, _measure_block
from lightsheet.segment.plans import StoredPlan, _store_faces, _store_plans
from lightsheet.segment.threshold import _compute, _tophat_block

__all__ = [
    "clipped_distance",
    "default_smooth_um",
    "default_split_depth_um",
    "distance_elevation",
    "watershed",
]


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


def _distance_block(block: Any, *, voxel_size_um, clip_um: float, sigma_vox, region=None) -> Any:
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
    depth = tuple(
        min(n, d) for n, d in zip(mask.shape, _elevation_depth(vs, clip_um, smooth_um), strict=True)
    )
    # map_overlap merges chunks smaller than the depth; hand back the caller's chunks
    out = map_overlap(
        _distance_block,
        mask,
        depth=depth,
        boundary="none",
        dtype=np.float32,
        voxel_size_um=vs,
        clip_um=clip_um,
        sigma_vox=sigma_vox,
        meta=np.empty((0, 0, 0), np.float32),
    )
    return out if out.chunks == mask.chunks else out.rechunk(mask.chunks)


def _toboggan(elev, mask, struct, lo, hi, origin, shape):
    """Steepest-ascent endpoints of a padded block.

    ``elev`` and ``mask`` are the block with ``lo``/``hi`` voxels of halo. Every core
    foreground voxel points to the highest neighbour (ties broken by global voxel index, a
    total order shared by all blocks), pointers are followed inside the block, and halo
    voxels end paths. Returns the core's endpoint global indices (-1 off the mask), its
    mask, its local maxima and its elevation.

    Only foreground voxels are visited (as flat indices of the block padded by one voxel,
    whose order within a block is the global order), so the cost follows the mask, not the
    block.
    """
    elev = np.asarray(_to_numpy(elev), dtype=np.float32)
    mask = np.asarray(_to_numpy(mask), dtype=bool)
    e = np.pad(np.where(mask, elev, -np.inf).astype(np.float32), 1, constant_values=-np.inf)
    m = np.pad(mask, 1, constant_values=False)
    pshape = e.shape
    core = tuple(slice(1 + lo[a], pshape[a] - 1 - hi[a]) for a in range(3))
    cshape = tuple(c.stop - c.start for c in core)
    ef, mf = e.ravel(), m.ravel()
    fg = np.flatnonzero(mf)
    best_e, best_p = ef[fg], fg.copy()
    strides = (pshape[1] * pshape[2], pshape[2], 1)
    for dz, dy, dx in _neighbour_offsets(struct):
        nb = fg + (dz * strides[0] + dy * strides[1] + dx * strides[2])
        ne = ef[nb]
        better = mf[nb] & ((ne > best_e) | ((ne == best_e) & (nb > best_p)))
        best_e = np.where(better, ne, best_e)
        best_p = np.where(better, nb, best_p)
    zyx = np.unravel_index(fg, pshape)
    in_core = np.ones(fg.size, dtype=bool)
    for a in range(3):
        in_core &= (zyx[a] >= core[a].start) & (zyx[a] < core[a].stop)
    # only core foreground voxels move; halo voxels are path ends
    target = np.where(in_core, best_p, fg)
    ptr = np.searchsorted(fg, target)
    # pointer jumping: each round doubles the followed path length
    while True:
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    c = np.ravel_multi_index(tuple(zyx[a][in_core] - core[a].start for a in range(3)), cshape)
    ends = fg[ptr[in_core]]
    ez = np.unravel_index(ends, pshape)
    end_g = np.full(cshape, -1, dtype=np.int64)
    end_g.flat[c] = np.ravel_multi_index(
        tuple(ez[a] - 1 - lo[a] + origin[a] for a in range(3)), shape
    )
    is_max = np.zeros(cshape, dtype=bool)
    is_max.flat[c] = target[in_core] == fg[in_core]
    return end_g, m[core], is_max, e[core]


def _global_index(block_shape, origin, shape) -> np.ndarray:
    """The global flat index of each voxel of a block at ``origin`` of a volume."""
    coords = [np.arange(n, dtype=np.int64) + o for n, o in zip(block_shape, origin, strict=True)]
    return (coords[0][:, None, None] * shape[1] + coords[1][None, :, None]) * shape[2] + coords[2][
        None, None, :
    ]


def _toboggan_info(
    elev, mask, struct, lo, hi, origin, shape, image=None, values=None, drop_below=None,
    faces_in=None,
):  # fmt: skip
    """The watershed's one analysis pass over a block.

    Small tables: peaks (global index, height, and with ``values``, laid out as ``elev``,
    their value there); exits (endpoints in a neighbour's core); saddles between endpoints
    inside the core; and with ``image``, measurement partials keyed by endpoint + 1. And
    the core's shell towards neighbours (``face_*``: each voxel's global index, endpoint and
    height), which `_block_edges` reduces on the workers.

    With ``drop_below``, the basins of groups that lie wholly inside the block and peak
    below it are left out (`_drop_closed_groups`). With ``faces_in`` (a folder), the shell
    arrays go to a file there (`_store_faces`).
    """
    end_g, m, is_max, e = _toboggan(elev, mask, struct, lo, hi, origin, shape)
    g = _global_index(m.shape, origin, shape)
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
    if values is not None:
        v = np.asarray(_to_numpy(values))
        core = tuple(slice(lo[a], v.shape[a] - hi[a]) for a in range(3))
        out["values"] = v[core][is_max][order]
    if image is not None:
        out["parts"] = _measure_block(np.where(m, end_g + 1, 0), image, origin)
    if drop_below is not None:
        out = _drop_closed_groups(out, drop_below)
    return out if faces_in is None else _store_faces(out, faces_in, origin)


def _drop_closed_groups(info: dict, below: float) -> dict:
    """``info`` without the basins of closed groups that peak below ``below``.

    A group is a set of basins joined by the block's inner saddles (a connected component
    of the mask, as far as the block sees it). It is closed when none of its basins
    reaches the block's shell or leads to an exit: then no saddle joins it to any basin
    outside, the merge by dynamics cannot join it to one, and its basins merge at most
    among themselves, into labels whose peak is the group's. A caller that keeps only
    labels peaking at ``below`` or higher (`lightsheet.segment.local`: cells stand
    ``min_peak_sd`` above the noise) loses nothing when such groups never reach the client:
    on tissue most basins are the noise's bumps above the mask, closed and low (82 % of
    them on the 1 GB generated sample), and the client's tables then grow with the cells,
    not the volume. Their voxels get label 0 (`_basin_block`).
    """
    peaks, pairs = info["peaks"], info["saddles"][0]
    keys = np.union1d(peaks, info["exits"])
    if keys.size == 0:
        return info
    ia, ib = np.searchsorted(keys, pairs[:, 0]), np.searchsorted(keys, pairs[:, 1])
    group = _components(ia, ib, keys.size)
    at_peak = np.searchsorted(keys, peaks)
    kept = np.isin(keys, info["exits"]) | np.isin(keys, info["face_ends"])
    kept[at_peak[info["heights"] >= below]] = True
    keep_group = np.zeros(int(group.max()) + 1, bool)
    keep_group[group[kept]] = True
    keep = keep_group[group]
    out = dict(info)
    k = keep[at_peak]
    for name in ("peaks", "heights", "values"):
        if name in info:
            out[name] = info[name][k]
    s = keep[ia]  # both ends of a saddle lie in one group
    out["saddles"] = (pairs[s], info["saddles"][1][s])
    if "parts" in info and len(info["parts"]):
        gone = peaks[~k]
        part = info["parts"]
        out["parts"] = part[~np.isin(part["label"].to_numpy() - 1, gone)].reset_index(drop=True)
    return out


def _basin_block(elev, mask, struct, lo, hi, origin, shape, plan, dtype):
    end_g, m, _, _ = _toboggan(elev, mask, struct, lo, hi, origin, shape)
    keys, values = plan.load() if isinstance(plan, StoredPlan) else plan
    out = np.zeros(m.shape, dtype=dtype)
    if keys.size:  # endpoints the plan lacks (`_drop_closed_groups`) stay 0
        found, pos = _sorted_lookup(keys, end_g[m])
        out[m] = np.where(found, values[pos], 0)
    return out


#: What `_block_edges` returns in another form, left out of `_block_tables`.
_REDUCED = ("saddles", "exits")


def _block_tables(info: dict) -> dict:
    """A block's analysis for the client, without what `_block_edges` returns reduced.

    The shells stay on the workers or on disk, the saddles come back reduced, and the exits
    come back as the keys of their first step.
    """
    return {k: v for k, v in info.items() if not k.startswith("face_") and k not in _REDUCED}


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
    labels, n, *_ = _watershed_analysis(
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
    e_ov: da.Array | np.ndarray,
    m_ov: da.Array | np.ndarray,
    grid: tuple[tuple[int, ...], ...],
    struct: np.ndarray,
    split_depth: float,
    offset: int,
    image: da.Array | None = None,
    vs=None,
    compute: Callable[[Any, str], Any] | None = None,
    split_fraction: float = 0.0,
    min_peak_distance_um: float = 0.0,
    values: da.Array | np.ndarray | None = None,
    drop_below: float | None = None,
    tables_in: Path | None = None,
) -> tuple[da.Array, int, pd.DataFrame | None, np.ndarray, dict, np.ndarray | None]:
    """One pass over the blocks → lazy labels, n, table, peaks, plans, values at the peaks.

    The table comes with ``image``, the values with ``values`` (else None).

    Basins merge unless the dip between them is at least ``split_depth`` and at least
    ``split_fraction`` of the lower peak, and their peaks are at least
    ``min_peak_distance_um`` apart (µm, with ``vs``; `_merge_by_dynamics`).

    ``e_ov`` and ``m_ov`` are the elevation and mask of the blocks of ``grid`` with a shell
    of one voxel (`_shells`, or `_surface_block` on a stored image): dask arrays, or
    object arrays of their delayed blocks (`_delayed_blocks`). ``peaks[i]`` is the
    highest elevation of label ``offset + i + 1``; ``plans[block index]`` maps the block's
    path endpoints to labels (`_basin_block`). ``values``, laid out as ``e_ov``, gives
    another quantity that the caller wants where each label peaks: ``label_values[i]`` is
    its value at the voxel of ``peaks[i]`` (ties: the highest global index, as the
    watershed breaks them).

    ``drop_below``: for a caller that keeps only labels whose peak reaches it, the blocks
    leave out the basins of groups that lie inside one block and peak lower
    (`_drop_closed_groups`); they get no label, and the labels of the others are the same
    up to their numbering.

    ``tables_in``: a folder where the blocks' shells (`_store_faces`) and the plans
    (`_store_plans`) are written; then ``plans[block index]`` is a `StoredPlan`, which
    `_basin_block` reads.
    """
    numblocks = tuple(len(c) for c in grid)
    origins = _block_origins(grid)
    shape = tuple(sum(c) for c in grid)
    e_blocks, m_blocks = _delayed_blocks(e_ov), _delayed_blocks(m_ov)
    v_blocks = _delayed_blocks(values) if values is not None else None
    i_blocks = image.rechunk(grid).to_delayed() if image is not None else None
    geo = {}
    for idx in np.ndindex(numblocks):
        lo, hi = _pad_widths(idx, numblocks)
        geo[idx] = (lo, hi, tuple(int(origins[a][idx[a]]) for a in range(3)))
    # per block: its tables, and its saddles and exits reduced with its neighbours' shells
    # (`_block_edges`). The shell arrays stay on the workers or on disk: only small tables
    # come back
    full = {
        idx: dask.delayed(_toboggan_info)(
            e_blocks[idx],
            m_blocks[idx],
            struct,
            *geo[idx],
            shape,
            i_blocks[idx] if i_blocks is not None else None,
            v_blocks[idx] if v_blocks is not None else None,
            drop_below,
            None if tables_in is None else str(tables_in),
        )
        for idx in np.ndindex(numblocks)
    }
    touching = [
        dask.delayed(_block_edges)(
            full[idx], [full[b] for b in earlier], [full[b] for b in later], shape, struct
        )
        for idx, (earlier, later) in _touching_blocks(numblocks, struct).items()
    ]
    tables = [dask.delayed(_block_tables)(info) for info in full.values()]
    infos, touching = _compute(compute, [tables, touching], "analysis (basins and saddles)")
    for info, (_, _, exits, _) in zip(infos, touching, strict=True):
        info["exits"] = exits  # the block's exits, each found in a neighbour's shell
    infos = dict(zip(np.ndindex(numblocks), infos, strict=True))

    # peaks → basins 0..n_basins-1 (in global index order)
    peaks = np.concatenate([i["peaks"] for i in infos.values()])
    heights = np.concatenate([i["heights"] for i in infos.values()])
    order = np.argsort(peaks)
    peaks, heights = peaks[order], heights[order]
    if values is not None:
        values = np.concatenate([i["values"] for i in infos.values()])[order]
    # exits → their endpoints in the neighbour, followed until each ends at a peak
    hop_keys = np.concatenate([np.empty(0, np.int64)] + [t[2] for t in touching])
    hop_ends = np.concatenate([np.empty(0, np.int64)] + [t[3] for t in touching])
    order = np.argsort(hop_keys)  # each exit once: its own block's task steps it
    hop_keys, hop_ends = _resolve(hop_keys[order], hop_ends[order])
    # the saddle between every two touching basins, inside blocks and across their borders:
    # tables of endpoint pairs (int64 keys), each dropped as soon as it is mapped to basins
    pairs = [t[:2] for t in touching]
    del touching

    # basin indices in the smallest type that holds them: the edges are the client's
    # largest table (saddles inside and between blocks, 2.4 M on the 4 GB sample)
    index = np.int32 if peaks.size < 2**31 else np.int64

    def basin_of(keys: np.ndarray) -> np.ndarray:
        # endpoint (a peak, or an exit into a neighbour's shell) → basin index
        keys = _step(hop_keys, hop_ends, keys)
        return np.searchsorted(peaks, keys).astype(index, copy=False)

    size = sum(s.size for _, s in pairs)
    edges, saddles, at = np.empty((size, 2), index), np.empty(size, np.float32), 0
    for k, (p, s) in enumerate(pairs):
        pairs[k] = None
        edges[at : at + s.size] = basin_of(p.ravel()).reshape(-1, 2)
        saddles[at : at + s.size] = s
        at += s.size
    edges, saddles = _max_by_pair(edges[:, 0], edges[:, 1], saddles)
    positions = None
    if min_peak_distance_um > 0:
        positions = np.stack(np.unravel_index(peaks, shape), axis=1) * np.asarray(vs, float)
    roots = _merge_by_dynamics(
        heights, edges, saddles, split_depth, split_fraction, positions, min_peak_distance_um
    )
    _, merged = np.unique(roots, return_inverse=True)
    n = int(merged.max()) + 1 if merged.size else 0
    final = offset + merged.astype(np.int64) + 1  # basin → label
    label_peaks = np.full(n, -np.inf)
    np.maximum.at(label_peaks, merged, heights)
    label_values = None
    if values is not None:  # each label's highest basin sorts last (ties: the highest key)
        o = np.lexsort((peaks, heights, merged))
        last = np.r_[merged[o][1:] != merged[o][:-1], True] if o.size else o.astype(bool)
        label_values = np.full(n, np.nan)
        label_values[merged[o][last]] = values[o][last]
    dtype = label_dtype(offset + n)

    def plan(info: dict) -> tuple[np.ndarray, np.ndarray]:
        keys = np.sort(np.concatenate([info["peaks"], info["exits"]]))
        return keys, final[basin_of(keys)] if keys.size else keys

    plans = ((idx, plan(info)) for idx, info in infos.items())
    plans = dict(plans) if tables_in is None else _store_plans(plans, tables_in)
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
    return labels, n, table, label_peaks, plans, label_values


def _delayed_blocks(blocks: Any) -> np.ndarray:
    """A dask array's blocks as delayed objects, or a grid of delayed blocks as given.

    A grid of delayed objects lets a caller share work between arrays: the blocks of two
    arrays derived from one delayed computation keep that computation's key, where each
    array's own graph optimisation would fuse (and so repeat) it.
    """
    return blocks.to_delayed() if isinstance(blocks, da.Array) else blocks


def _pick_basin(elev, mask, struct, lo, hi, origin, shape, plans, idx, dtype):
    return _basin_block(elev, mask, struct, lo, hi, origin, shape, plans[idx], dtype)
