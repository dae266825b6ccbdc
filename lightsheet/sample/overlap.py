"""The sample acquired as a microscope does: overlapping tiles at imprecise stage positions.

`generate_overlapping` writes the same phantom as `lightsheet.sample.generate` (atlas, cells,
PSF, truth), but its tiles share ``overlap`` of their side with each neighbour, and each
tile is imaged at its nominal stage position plus an error drawn uniformly from
``± stage_error_um`` per axis (sub-voxel, so no tile sits on the voxel grid). The errors are
centred (their mean over the tiles is zero), so the nominal frame is the true frame on
average: the fused volume's voxel 0 is the first tile's nominal origin, which is where the
truth's coordinates (and the atlas) start. Every channel and time point of a tile shares
its position.

Besides the layout of `lightsheet.sample` (``docs/architecture.md``) it writes:

``positions.csv``
    The nominal stage positions, as microscope metadata gives them (``z, y, x`` tile grid
    values as in the file names, ``z_um, y_um, x_um`` of the tile's first voxel centre):
    usable as ``stitch.positions``.
``truth/tiles.csv``
    Per tile: grid values, nominal and true position in µm, and the error.

Examples
--------
>>> from lightsheet.sample.overlap import generate_overlapping
>>> info = generate_overlapping("/tmp/ov", size="tiny", overlap=0.15,
...                             stage_error_um=6.0)  # doctest: +SKIP
>>> info["tile_grid"], info["overlap"]  # doctest: +SKIP
([2, 2, 2], [0.15, 0.15, 0.15])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lightsheet.errors import SampleError

#: Positions columns of ``positions.csv`` and ``truth/tiles.csv``.
AXES = ("z", "y", "x")


def tiling(
    shape_zyx: Sequence[int], grid_zyx: Sequence[int], overlap: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Tile shape and nominal tile origins (voxels) that cover ``shape_zyx`` with overlaps.

    Along each axis, ``g`` tiles of side ``T`` at steps of ``T (1 - overlap)`` cover at least
    ``N`` voxels: ``T = ceil(N / (1 + (g - 1)(1 - overlap)))``.

    Returns
    -------
    tile_shape : (3,) tuple of int
    origins : (n, 3) ndarray of float
        Nominal origin of each tile in grid order (z slowest), in voxels.

    Examples
    --------
    >>> shape, origins = tiling((48, 192, 192), (1, 3, 3), (0.0, 0.15, 0.15))
    >>> shape, origins[-1].tolist()
    ((48, 72, 72), [0.0, 122.4, 122.4])
    """
    tile = tuple(
        int(math.ceil(n / (1 + (g - 1) * (1 - o))))
        for n, g, o in zip(shape_zyx, grid_zyx, overlap, strict=True)
    )
    return tile, nominal_origins(grid_zyx, tile, overlap)  # type: ignore[return-value]


def nominal_origins(grid_zyx, tile_shape, overlap) -> np.ndarray:
    """Nominal tile origins (voxels), grid order: ``index × tile × (1 - overlap)``."""
    from lightsheet.geometry import nominal_positions

    return nominal_positions(grid_zyx, tile_shape, overlap).round(6)


def stage_errors(
    n_tiles: int, error_um: Sequence[float], *, rng: np.random.Generator
) -> np.ndarray:
    """Errors (n, 3) in µm, uniform in ``± error_um`` per axis, centred over the tiles."""
    err = rng.uniform(-1.0, 1.0, size=(n_tiles, 3)) * np.asarray(error_um, dtype=float)
    if n_tiles > 1:
        err -= err.mean(axis=0)
        # centring can push an error past the bound: scale back in, keeping the mean zero
        over = np.max(np.abs(err) / np.maximum(np.asarray(error_um, float), 1e-12), axis=0)
        err /= np.maximum(over, 1.0)
    return err


def generate_overlapping(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    channels: int = 2,
    timepoints: int = 1,
    overlap: float | Sequence[float] = 0.15,
    stage_error_um: float | Sequence[float] = 6.0,
    grid: Sequence[int] | None = None,
    tile_shape: Sequence[int] | None = None,
    progress=None,
    realistic: bool = False,
    cells: str = "nuclei",
) -> dict:
    """Write an overlapping-tile sample acquisition with its truth (see the module doc).

    Parameters
    ----------
    out_dir, size, seed, channels, timepoints, progress
        As for `lightsheet.sample.generate`.
    overlap : float or (3,) sequence of float
        Nominal fraction of a tile's side shared with its neighbour, in [0, 0.5), per axis
        (z, y, x) or for all; an axis with one tile has none.
    stage_error_um : float or (3,) sequence of float
        Largest stage error per axis (z, y, x) in µm, or one value for all.
    grid : (3,) sequence of int, optional
        Tiles along (z, y, x); default the size preset's grid.
    tile_shape : (3,) sequence of int, optional
        Voxels (z, y, x) of a tile; the phantom then spans the mosaic ``size`` is ignored
        (benchmarks compare mosaics of equal tiles).
    realistic, cells
        As for `lightsheet.sample.generate`: textured tissue (`lightsheet.sample.realistic`).
        Each tile is then lit by its own light sheet, entering at the tile's first column
        and fading across it, as a microscope images one field of view after another: the
        same tissue is darker in one tile's overlap than in its neighbour's, and the fused
        volume has seams.

    Returns
    -------
    dict
        The content of ``sample.json``.
    """
    from lightsheet.sample import phantom, presets, render, writer

    preset = presets._check_args(size, seed, channels, timepoints)
    grid = tuple(int(g) for g in (grid or preset.tile_grid_zyx))
    ov = _triple(overlap, "overlap")
    if tile_shape is not None:
        extent = tuple(
            int(math.ceil(round((g - 1) * t * (1 - o), 6))) + int(t)
            for g, t, o in zip(grid, tile_shape, ov, strict=True)
        )
        size = f"{'x'.join(map(str, extent))} voxels"
        preset = presets.SizePreset(extent, (1, 1, 1), 8, f"mosaic of {grid} tiles {tile_shape}")
    err_um = _triple(stage_error_um, "stage_error_um")
    if len(grid) != 3 or any(g < 1 for g in grid):
        raise SampleError(f"grid: got {grid!r}; expected three positive tile counts (z, y, x)")
    if any(not 0 <= o < 0.5 for o in ov) or any(e < 0 for e in err_um):
        raise SampleError(
            f"overlap {ov} / stage_error_um {err_um}: expected overlaps in [0, 0.5) and "
            "non-negative errors"
        )
    ov = tuple(o if g > 1 else 0.0 for o, g in zip(ov, grid, strict=True))
    out = writer._prepare_out_dir(Path(out_dir))
    writer._write_json(
        out / "sample.json", {"format": presets.SAMPLE_FORMAT, "complete": False, "size": size}
    )
    ph = writer.build(preset, seed=seed, channels=channels, realistic=realistic, cells=cells)
    vox = np.asarray(ph.voxel_size_um, dtype=float)
    if tile_shape is None:
        tile_shape, origins = tiling(preset.shape_zyx, grid, ov)
    else:
        tile_shape = tuple(int(t) for t in tile_shape)
        origins = nominal_origins(grid, tile_shape, ov)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    errors = stage_errors(len(origins), err_um, rng=rng)
    nominal_um = origins * vox
    true_um = nominal_um + errors
    mosaic = tuple(int(math.ceil(o.max() + t)) for o, t in zip(origins.T, tile_shape, strict=True))

    beads = writer._write_psf(out, ph, seed)
    writer._write_phantom_atlas(out / "atlas", ph, channels)
    (out / "tiles").mkdir()
    indices = list(np.ndindex(*grid))

    def write_tile(t: int, c: int, k: int) -> tuple[str, int]:
        lo = np.floor(true_um[k] / vox).astype(int)
        scene = ph.scene(true_um[k] - lo * vox, sheet_um=(true_um[k][2], tile_shape[2] * vox[2]))
        expected = scene.expected(
            lo, lo + tile_shape, channel=c, nuclei=c == 0, bleach=presets.BLEACH_PER_TIMEPOINT**t
        )
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, t, c, *indices[k]]))
        tile = render.camera(expected, rng=rng)
        del expected
        tz, ty, tx = indices[k]
        ms = t * presets.TIMEPOINT_INTERVAL_MS
        name = presets.FILE_NAME.format(
            c=c, wavelength=ph.channels[c].wavelength_nm, ms=ms,
            abs=presets.START_ABS_MS + ms + k * tile_shape[0] * presets.PLANE_EXPOSURE_MS,
            x=tx, y=ty, z=tz, t=t,
        )  # fmt: skip
        writer._write_tile(out / "tiles" / name, tile)
        return name, (out / "tiles" / name).stat().st_size

    jobs = list(itertools.product(range(timepoints), range(channels), range(len(indices))))
    nbytes = 0
    for done, (name, n) in enumerate(render._bounded_map(write_tile, jobs), start=1):
        nbytes += n
        if progress is not None:
            progress(done, len(jobs), name)

    grid_cols = pd.DataFrame(indices, columns=list(AXES))
    positions = grid_cols.join(pd.DataFrame(nominal_um.round(6), columns=_um("")))
    positions.to_csv(out / "positions.csv", index=False)
    (out / "truth").mkdir()
    truth = grid_cols.join(
        [
            pd.DataFrame(nominal_um.round(6), columns=_um("nominal_")),
            pd.DataFrame(true_um.round(6), columns=_um("true_")),
            pd.DataFrame(errors.round(6), columns=_um("error_")),
        ]
    )
    truth.to_csv(out / "truth" / "tiles.csv", index=False)
    phantom._cells_over_time(ph.cells, timepoints).to_csv(out / "truth" / "cells.csv", index=False)
    labels, sides, volume_res = ph.truth_volumes()
    density = phantom.truth_region_table(ph.cells, labels, sides, ph.structures, volume_res)
    density.to_csv(out / "truth" / "density.csv", index=False)

    info = writer._sample_info(ph, size=size, seed=seed, timepoints=timepoints, beads=beads)
    info.update(
        {
            "shape": [timepoints, channels, *mosaic],
            "tile_grid": list(grid),
            "tile_shape": list(tile_shape),
            "n_tiles": len(jobs),
            "overlap": list(ov),
            "stage_error_um": list(err_um),
            "positions": "positions.csv",
            "tile_truth": "truth/tiles.csv",
            "bytes_written": nbytes,
            "realistic": ph.info() if realistic else None,
        }
    )
    writer._write_config(out / "config.yaml", info, stitch={"overlap": list(ov)})
    writer._write_json(out / "sample.json", info)
    return info


def _um(prefix: str) -> list[str]:
    return [f"{prefix}{a}_um" for a in AXES]


def _triple(value, name: str) -> tuple[float, float, float]:
    values = (value,) * 3 if np.isscalar(value) else tuple(value)
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3 or not all(math.isfinite(float(v)) for v in values):
        raise SampleError(f"{name}: got {value!r}; expected one number or three (z, y, x)")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def tile_truth(sample_dir: str | Path) -> pd.DataFrame:
    """``truth/tiles.csv`` of an overlapping sample (true and nominal positions in µm)."""
    return pd.read_csv(Path(sample_dir) / "truth" / "tiles.csv")


__all__ = ["generate_overlapping", "stage_errors", "tile_truth", "tiling"]
