"""Stitch: place the tiles of a manifest into one lazy ``(T, C, Z, Y, X)`` volume.

Abutting tiles (no overlap, no positions: the default) sit on a regular grid. The volume
is one blockwise dask layer: each block reads the region of each tile it covers
(`lightsheet.io.tiff.TiffRegion`), so no tile is ever loaded whole and any chunk shape
works without a rechunk. It is what ``dask.array.block`` over lazy per-tile arrays
computes, with one task per block instead of two (``da.block`` adds an alias task after
each tile read, and a blockwise layer fuses with the writer's own per-block step).

Overlapping tiles (``overlap`` > 0, or stage positions) are registered first
(`lightsheet.stitch.register`: pairwise phase correlation refined to sub-voxel NCC, a
global solve that drops inconsistent links) and then fused block by block with blending
in the overlaps (`lightsheet.stitch.fuse`). `nominal_layout` gives the nominal positions
and the volume's shape; `stitch` with ``positions_vox`` fuses. `stitch_configured` does
either as a run config's ``stitch`` section says (the pipeline's stitch task and the
sweep's crop both use it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from lightsheet.blocks import fused_chunks, stitch_chunks
from lightsheet.config import StitchConfig
from lightsheet.errors import ConfigError
from lightsheet.ingest import Manifest
from lightsheet.stitch.fuse import fuse, mosaic_shape
from lightsheet.stitch.register import (
    Solution,
    check_layout,
    find_links,
    nominal_positions,
    read_positions,
    register,
)

__all__ = [
    "Layout",
    "configured_layout",
    "nominal_layout",
    "register",
    "stitch",
    "stitch_configured",
]


def stitch(
    manifest: Manifest,
    *,
    voxel_size_um: Sequence[float],
    chunks: Sequence[int] | None = None,
    positions_vox: np.ndarray | None = None,
    shape_zyx: Sequence[int] | None = None,
    blend_vox: Sequence[float] | None = None,
    interpolation: str = "linear",
) -> da.Array:
    """Place every tile into one lazy volume.

    Parameters
    ----------
    manifest : Manifest
        Checked tiles from `lightsheet.ingest.discover`.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm, used to choose default chunks.
    chunks : (3,) sequence of int, optional
        Chunk shape (z, y, x) of the result; default `stitch_chunks` (abutting) or
        `fused_chunks` (positions given).
    positions_vox : (n, 3) ndarray, optional
        Registered origin of each tile of a time point and channel (grid order), in
        voxels of the result: the tiles are fused (`lightsheet.stitch.fuse.fuse`). None:
        the tiles abut on their grid.
    shape_zyx : (3,) sequence of int, optional
        With ``positions_vox``: the result's shape (default: up to the farthest tile).
    blend_vox : (3,) sequence of float, optional
        With ``positions_vox``: width of the blending ramps (default: 1, no blending).
    interpolation : {"linear", "nearest"}
        With ``positions_vox``: see `lightsheet.stitch.fuse.fuse`.

    Returns
    -------
    volume : (T, C, Z, Y, X) dask.array.Array
        Chunks ``(1, 1, *chunks)``, dtype of the tiles. Each block reads only the tile
        regions it covers; the tile table is one shared graph key, sent once per worker.
    """
    if positions_vox is not None:
        shape = tuple(shape_zyx or mosaic_shape(positions_vox, manifest.tile_shape))
        t, c = manifest.grid_shape[:2]
        regions = np.empty((t, c, len(positions_vox)), dtype=object)
        for tile in manifest.tiles:
            ti, ci, *zyx = tile.index
            regions[ti, ci, np.ravel_multi_index(zyx, manifest.grid_shape[2:])] = tile.region()
        return fuse(
            regions,
            positions_vox,
            shape_zyx=shape,
            chunks=chunks or fused_chunks(shape, voxel_size_um),
            blend_vox=blend_vox or (1.0, 1.0, 1.0),
            dtype=manifest.dtype,
            interpolation=interpolation,
        )
    if chunks is None:
        chunks = stitch_chunks(manifest.shape[2:], voxel_size_um, manifest.tile_shape)
    regions = np.empty(manifest.grid_shape, dtype=object)
    for tile in manifest.tiles:
        regions[tile.index] = tile.region()
    dtype = np.dtype(manifest.dtype)
    return da.map_blocks(
        _read_block,
        dask.delayed(regions, pure=True),
        tile_shape=tuple(manifest.tile_shape),
        dtype=dtype,
        chunks=da.core.normalize_chunks((1, 1, *chunks), manifest.shape),
        meta=np.empty((0,) * 5, dtype),
        name=f"stitch-{dask.base.tokenize(regions, tuple(chunks))}",
    )


@dataclass(frozen=True)
class Layout:
    """Nominal placement of overlapping tiles, before registration.

    Attributes
    ----------
    positions_vox : (n, 3) ndarray
        Nominal origin of each tile (grid order), voxels; the smallest is 0 per axis.
    shape_zyx : (3,) tuple of int
        Voxels of the stitched volume: the box of the nominal mosaic.
    blend_vox : (3,) tuple of float
        Median nominal overlap width per axis (1 where tiles do not overlap along it):
        the width of the blending ramps.
    max_shift_vox : (3,) tuple of float
        Largest offset from nominal searched per axis.
    """

    positions_vox: np.ndarray
    shape_zyx: tuple[int, int, int]
    blend_vox: tuple[float, float, float]
    max_shift_vox: tuple[float, float, float]


def nominal_layout(
    manifest: Manifest,
    voxel_size_um: Sequence[float],
    *,
    overlap: float | Sequence[float] = 0.0,
    positions: str | None = None,
    max_shift_um: float | None = None,
) -> Layout | None:
    """The nominal layout of the tiles, or None when they abut (no overlap, no positions).

    Parameters
    ----------
    manifest : Manifest
        The tiles.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm.
    overlap : float or (3,) sequence of float
        Nominal fraction of a tile's side shared with its neighbour, per axis or for all.
    positions : path, optional
        CSV of stage positions in µm (`lightsheet.stitch.register.read_positions`);
        replaces ``overlap``.
    max_shift_um : float, optional
        Largest stage error searched (µm, every axis); default two thirds of the narrowest
        nominal overlap, so at least a third of the overlap is left to compare.

    Raises
    ------
    ConfigError
        Positions under which tiles coincide, or a positions file that does not fit.
    """
    tile = np.asarray(manifest.tile_shape)
    grid = manifest.grid_shape[2:]
    if positions is not None:
        nominal = read_positions(positions, manifest.values, grid, voxel_size_um)
    else:
        ov = np.broadcast_to(np.asarray(overlap, dtype=float), (3,))
        if not ov.any():
            return None
        nominal = nominal_positions(grid, tile, ov)
    try:
        check_layout(nominal, tile)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    widths: list[list[float]] = [[], [], []]
    for lk in find_links(nominal, tile):
        d = np.abs(lk.nominal_vox)
        axis = int(np.argmax(d / tile))
        widths[axis].append(float(tile[axis] - d[axis]))
    blend = tuple(float(np.median(w)) if w else 1.0 for w in widths)
    vox = np.asarray(voxel_size_um, dtype=float)
    if max_shift_um is None:
        narrowest = min(
            (b * v for b, v, w in zip(blend, vox, widths, strict=True) if w), default=0.0
        )
        max_shift_um = 2.0 / 3.0 * narrowest
    return Layout(
        positions_vox=nominal,
        shape_zyx=mosaic_shape(nominal, tile),
        blend_vox=blend,  # type: ignore[arg-type]
        max_shift_vox=tuple(float(max_shift_um / v) for v in vox),  # type: ignore[arg-type]
    )


def configured_layout(
    manifest: Manifest, voxel_size_um: Sequence[float], config: StitchConfig
) -> Layout | None:
    """`nominal_layout` as a run config's ``stitch`` section says (None: the tiles abut).

    Raises
    ------
    ConfigError
        ``stitch.registration_channel`` beyond the tiles' channels, or a layout
        `nominal_layout` refuses.
    """
    layout = nominal_layout(
        manifest,
        voxel_size_um,
        overlap=config.overlap,
        positions=None if config.positions is None else str(config.positions),
        max_shift_um=config.max_shift_um,
    )
    if layout is not None and config.registration_channel >= manifest.grid_shape[1]:
        raise ConfigError(
            f"stitch.registration_channel: {config.registration_channel}, but the tiles have "
            f"{manifest.grid_shape[1]} channel(s) ({', '.join(manifest.channel_names())}); "
            f"expected an index below {manifest.grid_shape[1]}"
        )
    return layout


def stitch_configured(
    manifest: Manifest,
    voxel_size_um: Sequence[float],
    config: StitchConfig,
    *,
    chunks: Sequence[int] | None = None,
    layout: Layout | None = None,
) -> tuple[da.Array, Solution | None]:
    """The stitched volume as the pipeline makes it from a run config's ``stitch`` section.

    Abutting tiles are placed (lazy, nothing read); overlapping ones are registered first
    (`register` reads their overlaps now) and then fused lazily.

    Parameters
    ----------
    manifest : Manifest
        Checked tiles from `lightsheet.ingest.discover`.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm.
    config : StitchConfig
        Overlap or positions, registration channel and bounds, interpolation.
    chunks : (3,) sequence of int, optional
        Chunk shape of the result (default: `stitch`'s).
    layout : Layout, optional
        `configured_layout`'s result when the caller has it already.

    Returns
    -------
    volume : (T, C, Z, Y, X) dask.array.Array
    solution : Solution or None
        The registration (None for abutting tiles).
    """
    if layout is None:
        layout = configured_layout(manifest, voxel_size_um, config)
    if layout is None:
        return stitch(manifest, voxel_size_um=voxel_size_um, chunks=chunks), None
    solution = register(
        manifest,
        layout.positions_vox,
        channel=config.registration_channel,
        max_shift_vox=layout.max_shift_vox,
        max_residual_vox=config.max_residual_vox,
    )
    volume = stitch(
        manifest,
        voxel_size_um=voxel_size_um,
        chunks=chunks,
        positions_vox=solution.positions,
        shape_zyx=layout.shape_zyx,
        blend_vox=layout.blend_vox,
        interpolation=config.interpolation,
    )
    return volume, solution


def _read_block(
    regions: np.ndarray, *, tile_shape: tuple[int, int, int], block_info: dict
) -> np.ndarray:
    """The block at ``block_info``'s location, read from the tiles it covers."""
    (t, _), (c, _), *zyx = block_info[None]["array-location"]
    # per axis: (tile index, slice within the tile, slice within the block) of each piece
    pieces = [
        [
            (i, slice(max(a, i * n) - i * n, min(b, (i + 1) * n) - i * n),
             slice(max(a, i * n) - a, min(b, (i + 1) * n) - a))
            for i in range(a // n, (b - 1) // n + 1)
        ]
        for (a, b), n in zip(zyx, tile_shape, strict=True)
    ]  # fmt: skip
    if all(len(p) == 1 for p in pieces):  # the usual, tile-aligned case: no copy
        (iz, kz, _), (iy, ky, _), (ix, kx, _) = (p[0] for p in pieces)
        return regions[t, c, iz, iy, ix][kz, ky, kx][None, None]
    out = np.empty((1, 1, *(b - a for a, b in zyx)), regions.flat[0].dtype)
    for (iz, kz, oz), (iy, ky, oy), (ix, kx, ox) in itertools.product(*pieces):
        # tiles stacked along z fill contiguous slabs of the block: read straight into them
        regions[t, c, iz, iy, ix].read((kz, ky, kx), out=out[0, 0, oz, oy, ox])
    return out
