"""Detection that follows the local background: the ``local`` method (the default).

Real tissue is not a dark field with bright nuclei: autofluorescence varies several-fold
across a brain, the outside is dark, planes and tiles differ in brightness, and the texture
of the tissue is the noise a cell must stand out from. A global intensity split picks the
tissue, not the cells. This method asks of every voxel how far it stands out at the size of
a cell, in units of the variation of the tissue around it:

1. **Smoothing at the cell's scale.** ``I_s = G(σ) * I`` with σ a fifth of the diameter per
   axis (in µm, so anisotropic voxels are handled).
2. **Local statistics, per plane** (`lightsheet.segment.background`). The background ``B`` follows
   the tissue's lower envelope: ``O``, a grey opening of ``I_s`` per plane by a square of
   ``2 × bin + 1`` voxels (about two diameters; ``levels``), removes every cell, vessel
   and speck narrower than the square and keeps a tissue edge or a plane's step where they
   are. The envelope lies below the tissue's typical level by an amount that follows the
   texture, so ``B = O + offset``: the planes are cut into bins of about one diameter
   square, each bin gives the median of ``I_s − O``, and the offset is the median of those
   over 3 × 3 bins. The noise ``S`` is the median over 9 × 9 bins (about nine diameters,
   where cells fill well under half of the bins, so ``S`` measures the tissue's texture and
   noise, not the cells) of each bin's median absolute deviation of ``I_s`` (× 1.4826: the
   SD of Gaussian noise), each capped at ``NOISE_CAP`` (8) times what the image's pixel
   noise alone gives there (`lightsheet.segment.background.pixel_noise`: each voxel minus
   its 3 × 3 in-plane mean, which a blurred cell, smooth at that scale, cannot raise).
   Where cells do fill most bins (a nuclear stain in a granule layer, blurred along z),
   their own contrast made ``S`` 42 times the noise and hid 72 % of them
   (`benchmarks/packing.py`: 10 % packing, axial σ 5 µm, F1 0.43 → 0.83); textured tissue
   stays under the cap (the cellfinder crop: 485 → 489 objects). A bin has two voxels a
   side at least, and ``S`` is scaled so that
   it estimates the same at any voxel size: a bin of a few voxels (a coarse camera pixel)
   gives a MAD biased low (`lightsheet.segment.background.noise_calibration`). A bin where
   more than half the raw voxels share one value was clipped (an offset subtracted at
   acquisition, a mosaic's empty fill) or recorded in steps coarser than its noise (a dim
   background in 8-bit data): what spread is left there is that of a few specks over
   nothing, so such a bin takes its plane's median noise instead
   (`lightsheet.segment.background._censored`; the cellfinder crop clipped at its 10th
   percentile gave 626 objects for 489, now 485). And no bin's noise is less than the
   rounding noise of the steps the values were recorded in (``quantum / √12`` a voxel,
   smoothed like the image; ``quantum`` is 1 for a camera's integers, and a deconvolved
   image keeps its raw image's): deconvolved, an 8-bit dark outside is a flat floor with a
   spike at each voxel that read one step more, and each spike stood out as a cell (the
   realistic small sample written as 8 bits, its four low bits dropped: 3,122 objects
   for 1,466 cells, now 1,412; `benchmarks/recording.py`).
   Offset and noise are interpolated linearly between bin centres.
   Per plane because light-sheet planes are acquired one at a time and their brightness
   steps (tile seams, sheet power, bleaching); medians because bright cells, vessels and
   the dark outside must not move the level of their neighbours. The bins alone (a median
   of bin medians, as before 2026-12-04) put the level of a sharp edge's dark side inside
   the tissue, where the tissue then stood out as a ridge that swallowed the cells beside
   it (`benchmarks/edge_centroid.py`).
3. **Significance** ``z = (I_s − B) / S``; seeds, basins and splits by the steepest-ascent
   watershed on ``z`` over voxels with ``z > 2`` (`lightsheet.segment.watershed`, exact at
   any chunking). Two peaks stay separate cells when the dip between them is at least 2
   noise SDs deep (dynamics) and at least a tenth of the lower peak, else they merge: a
   cell elongated by the axial PSF has many shallow maxima, and inside a bright cell the
   intensity's own variation grows with its brightness (shot noise, and deconvolution's
   ringing, which leaves a dip in the middle of a flat-topped nucleus along z), where the
   background's noise SD does not. Peaks closer than half the diameter are one cell
   whatever the dip: cells are solid, and no two centres are closer than a radius.
   Where the cells look elongated (an undeconvolved light-sheet's axial PSF stretches them
   along z several-fold), "closer" is measured in their own shape: once the cells are
   measured, the median extent of their bodies per axis gives the stretch, and cells whose
   centroids lie within half a diameter in the stretched metric are joined into one
   (`_same_cells`; two Gaussian-blurred objects closer than about one FWHM show no dip at
   all, so such maxima are texture inside one cell, not two cells).
4. **Cells.** A basin whose peak stands at least ``min_peak_sd`` above its background is a
   cell. The significance finds cells; their shape and place come from their light above
   the background in units of each plane's gain, ``R = (I_s − B) / g`` (``g``:
   `lightsheet.segment.background.plane_gain`, the median step of the bins' levels from
   one plane to the next, chained; a level is light, so taken above the camera's offset).
   The body is the basin where ``R`` is at least half its value at the peak (whatever the
   brightness): the extent at half maximum, which for a blurred nucleus lies near its
   surface, so the size filter (on the body) compares like with like. The centroid weights
   each voxel by how far its ``R`` rises above 0.7 of the peak's (the top of the cell,
   which neighbours and background slopes shift least). Not
   the significance ``z``: ``S`` is measured over nine diameters, and where that window
   reaches the dark outside (the planes near a brain's surface) it changes from one plane
   to the next across a cell, which cut the body short on the noisier side and moved the
   centre 1–2 µm towards the quieter one. Not ``I_s − B`` alone either: a plane's gain
   (sheet power, bleaching) scales a cell with its background, and a cell stretched over
   many planes by the axial PSF was pulled towards the brighter ones. Not ``(I_s − B) /
   B``: across a soft tissue edge the background falls while a cell's light does not.
   ``contrast`` is ``Σ(I_s − B) / Σ(B − dark)`` over the body (``dark``: the camera's
   offset, what it reads with no light; the sum is at least one recorded step, ``quantum``,
   a voxel: the precision a level above the dark one is known to).
5. **Artefacts** (``background_channel``). Vessels, debris and lipofuscin shine in every
   channel: a candidate whose contrast in the autofluorescence channel (measured the same
   way on that channel) is at least ``background_ratio`` of its contrast in the nuclei
   channel is dropped. A contrast over a level needs the level above the dark level (0, or
   the camera's offset when given): a candidate where either channel's is not is kept
   untested, with a `lightsheet.errors.ZeroLevelWarning` (float data with more than the
   dark level subtracted; before, such candidates were dropped by a test of meaningless
   numbers: 73 of the 77 of the realistic tiny sample minus 200).

Every scale derives from ``nucleus_diameter_um`` and the voxel size. The bins form a fixed
grid of the volume, and the statistics pass cuts blocks of whole bins, so every bin is
computed in one piece; each block is read with a halo that covers the smoothing and the
opening (``LocalGeometry.halo``), so the result does not depend on the chunking.

Passes over the data: the watershed analysis, the measurement, and the labels when
written. The analysis sends the client only the basins that can matter: a group of basins
that lies inside one block and peaks under ``min_peak_sd`` (most of the noise's bumps
above the mask) stays on the worker, so the client's tables grow with the cells, not the
volume (`lightsheet.segment.watershed._drop_closed_groups`; same cells). Each pass
re-smooths halo-padded blocks and recomputes the bin statistics (``1 / (bin side)²`` of
the volume) it reads; nothing volume-sized is held. Given a ``scratch`` folder
(the segment task gives one) the method keeps on disk what later passes would repeat: the
statistics of both channels become two passes of their own, written once and read by the
others' tasks (one task a statistics block writes its bins, then one task a few whole
planes takes the windows' medians and the gain: `background.stored_bins`,
`background.stored_statistics`); the first also writes each channel's ``I_s`` and ``O``
(float32, compressed: four times the bytes of a uint16 channel before compression), so the
later passes read both over a one-voxel shell instead of reading the image over the
smoothing's and the opening's halo and computing them again, and read the image itself only
at each block's core (the measurement's intensities); and the measurement writes each
block's cell bodies (basin labels, compressed), which the label pass only renumbers instead
of tobogganing and cutting bodies a third time. The watershed's plans (each block's basin →
label table) go there too, and each measurement task reads its own, instead of all of them
travelling in the pass's graph; so do the blocks' shells, which the analysis's neighbour tasks
read instead of the worker holding them until every neighbour is done. Same labels and table,
byte for byte; on the deconvolved small phantom the method's CPU time halves
(`benchmarks/results/real_data.md`, Speed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import zarr
from scipy.spatial import cKDTree

from lightsheet.errors import ZeroLevelWarning
from lightsheet.regions import Region, block_regions
from lightsheet.segment._common import _components, _to_numpy, label_dtype
from lightsheet.segment.background import (
    Kept,
    LocalGeometry,
    _bin_span,
    _lerp,
    _padded,
    _whole_bins,
    _write_block,
    gain_of,
    levels,
    plane_statistics,
    scratch_array,
    statistics_grid,
    stored_bins,
    stored_statistics,
)
from lightsheet.segment.measure import _combine, _measure_block
from lightsheet.segment.threshold import _compute
from lightsheet.segment.watershed import _basin_block, _watershed_analysis

__all__ = ["LocalResult", "detect_local", "whole_bin_chunks"]

#: Basins live where the significance exceeds this (noise SDs).
MASK_SD = 2.0
#: Two peaks are two cells when the dip between them is this deep (noise SDs) ...
SPLIT_SD = 2.0
#: ... and at least this fraction of the lower peak ...
SPLIT_FRACTION = 0.1
#: ... and their peaks at least this many diameters apart (cells are solid: no two centres
#: are closer than a radius).
MIN_PEAK_DISTANCE = 0.5
#: A cell's body: the voxels of its basin whose light ``R`` is at least this fraction of
#: ``R`` at its peak (its extent at half maximum, the usual measure of an object's size).
BODY_FRACTION = 0.5
#: Its centre: weighted by how far each voxel's ``R`` rises above this fraction of ``R`` at
#: its peak.
CENTRE_FRACTION = 0.7


# ----------------------------------------------------------------------------- blocks


def _shell_extent(region: Region) -> list[tuple[int, int]]:
    """Volume coordinates ``[first, stop)`` of a block and its one-voxel shell, per axis."""
    return [
        (a - min(1, lo), b + min(1, hi))
        for a, b, lo, hi in zip(region.start, region.stop, region.lo, region.hi, strict=True)
    ]


def _shell(region: Region) -> tuple[slice, ...]:
    """The block and its one-voxel shell in the padded block's coordinates."""
    return tuple(
        slice(lo - min(1, lo), lo + (b - a) + min(1, hi))
        for lo, hi, a, b in zip(region.lo, region.hi, region.start, region.stop, strict=True)
    )


def _maps(region: Region, geometry: LocalGeometry, nbins) -> tuple[tuple, list]:
    """The bins a block's shell reads: index slices, and (first, n) per axis for `_lerp`."""
    ext = _shell_extent(region)
    spans = [(ext[0][0], ext[0][1], 0)] + [
        (*_bin_span(*ext[a], geometry.bin_vox[a], nbins[a]), nbins[a]) for a in (1, 2)
    ]
    return tuple(slice(lo, hi) for lo, hi, _ in spans), spans


def _contrast_parts(
    padded, offset, noise, gain, region: Region, spans, geometry, kept=None
) -> dict:
    """On a block and its shell: ``E = I_s − B``, ``B``'s light, with ``noise`` ``z`` and ``R``.

    ``B``'s light is ``B`` above ``geometry.dark`` (what the image reads with no light).

    ``z = E / S`` is the significance, ``R = E / g`` the light above the background in
    units of each plane's gain ``g`` (``gain``: the block's planes, shell included).
    ``B = O + offset``: the opening, raised by the interpolated offset bins. ``I_s`` and
    ``O`` are read from ``kept`` (the statistics pass's, `plane_statistics`) when given,
    else computed from ``padded`` (the block with the halo of ``geometry.halo``).
    """
    ext = _shell_extent(region)
    offset, noise = (w.read() if isinstance(w, _StoredWindow) else w for w in (offset, noise))
    if kept is None:
        smoothed, opened = levels(padded, geometry)
        sl = _shell(region)
        s, opened = _to_numpy(smoothed[sl]), _to_numpy(opened[sl])
    else:
        window = kept.where(region.start, ext)
        s = zarr.open_array(kept.smoothed, mode="r")[window]
        opened = zarr.open_array(kept.opening, mode="r")[window]
    for axis in (1, 2):
        coords = np.arange(*ext[axis], dtype=np.float64)
        b, first, n = geometry.bin_vox[axis], spans[axis][0], spans[axis][2]
        offset = _lerp(offset, axis, coords, b, first, n)
        if noise is not None:
            noise = _lerp(noise, axis, coords, b, first, n)
    background = opened + offset
    e = s - background
    out = {"E": e, "B": background - np.float32(geometry.dark)}  # B: its light, for contrast
    if noise is not None:
        z = np.zeros(e.shape, np.float32)
        np.divide(e, noise, out=z, where=noise > 0)
        out["z"] = z
        out["R"] = (e / np.asarray(gain, np.float32)[:, None, None]).astype(np.float32, copy=False)
    return out


def _elevation(parts: dict) -> np.ndarray:
    z = parts["z"]
    return np.where(z > MASK_SD, z, np.float32(np.nan))


def _light(parts: dict) -> np.ndarray:
    return parts["R"]


def _mask(elev: np.ndarray) -> np.ndarray:
    return ~np.isnan(elev)


def _core(a: np.ndarray, region: Region) -> np.ndarray:
    lo = [min(1, x) for x in region.lo]
    return a[tuple(slice(lo[i], lo[i] + region.stop[i] - region.start[i]) for i in range(3))]


def _body(elev, light, region, plan, tops, struct, shape) -> tuple[np.ndarray, np.ndarray]:
    """A block's cell-body labels (``R ≥ BODY_FRACTION × tops[label]``) and core ``R``.

    ``light``: the block's ``R`` with its shell; ``tops``: each label's ``R`` at its peak,
    NaN for labels that are no cell.
    """
    m = ~np.isnan(elev)
    lo = tuple(min(1, x) for x in region.lo)
    hi = tuple(min(1, x) for x in region.hi)
    lab = _basin_block(elev, m, struct, lo, hi, region.start, shape, plan, np.int64)
    r = _core(light, region)
    return np.where((lab > 0) & (r >= BODY_FRACTION * tops[lab]), lab, 0), r


def _measure_cells(
    elev, parts, region, plan, tops, struct, shape, image, bg, bodies=None
) -> pd.DataFrame:
    """A block's partial sums per cell body.

    The centroid weights are ``R − CENTRE_FRACTION × tops[label]`` where positive.
    """
    body, r = _body(elev, parts["R"], region, plan, tops, struct, shape)
    w = np.where(body > 0, np.maximum(r - CENTRE_FRACTION * tops[body], 0.0), 0.0)
    if bodies is not None:  # kept for the label pass (`_kept_block`)
        _write_block(bodies, region, body)
    sums = {"E": _core(parts["E"], region), "B": _core(parts["B"], region)}
    if bg is not None:
        raw, bg_parts = bg
        sums["bg_raw"] = raw
        sums["bg_E"] = _core(bg_parts["E"], region)
        sums["bg_B"] = _core(bg_parts["B"], region)
    return _measure_block(body, image, region.start, weights=w, sums=sums)


def _final_block(elev, light, region, plan, tops, struct, shape, keep_lut, dtype) -> np.ndarray:
    return keep_lut[_body(elev, light, region, plan, tops, struct, shape)[0]].astype(dtype)


# ----------------------------------------------------------------------------- scratch


def _keep_statistics(channels: dict, geometry, grid, kept: dict, scratch: Path, compute) -> dict:
    """The bin statistics of every channel into ``scratch``, in two passes of few tasks.

    One task a statistics block writes its bins (and I_s and O, into ``kept``), then one
    task a few whole planes takes the windows' medians and the gain's steps
    (`background.stored_bins`, `background.stored_statistics`). Returns the offsets and
    the noise as opened Zarr arrays, whose windows the later passes' tasks read themselves
    (`_StoredWindows`), and the gain as an array. Without this every later pass recomputes
    the statistics (their smoothing and medians cost about as much as the pass's own work).
    """
    bins = {name: scratch / f"{name}-bins.zarr" for name in channels}
    tasks = [
        stored_bins(
            channel,
            geometry,
            chunks=grid,
            keep=kept[name],
            path=bins[name],
            noise=name == "image",
        )
        for name, channel in channels.items()
    ]
    _compute(compute, [tasks], "statistics (bins)")
    out = {f"{name}-offset": scratch / f"{name}-offset.zarr" for name in channels}
    out["image-noise"] = scratch / "image-noise.zarr"
    tasks = {
        name: stored_statistics(
            bins[name], geometry, offset=out[f"{name}-offset"],
            noise=out["image-noise"] if name == "image" else None,
        )
        for name in channels
    }  # fmt: skip
    (steps,) = _compute(compute, [tasks], "statistics (planes)")
    stats = {name: zarr.open_array(str(path), mode="r") for name, path in out.items()}
    stats["image-gain"] = gain_of(steps["image"])
    return stats


def _regular(grid) -> bool:
    """A grid a zarr array can hold one block per chunk of: equal sides, the last no larger."""
    return all(all(n == c[0] for n in c[:-1]) and c[-1] <= c[0] for c in grid)


def _kept_block(path: str, region: Region, keep_lut: np.ndarray, dtype) -> np.ndarray:
    """`_final_block` from the bodies the measurement pass kept."""
    store = zarr.open_array(path, mode="r")
    body = store[tuple(slice(a, b) for a, b in zip(region.start, region.stop, strict=True))]
    return keep_lut[body].astype(dtype)


# ----------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class LocalResult:
    """What :func:`detect_local` returns: lazy labels ``1 … n`` and one row per cell."""

    labels: da.Array
    table: pd.DataFrame


def _channel_parts(blocks, geometry, stats, regions, with_noise: bool, kept=None) -> dict:
    """Per block, the delayed `_contrast_parts` of one channel.

    ``stats``: its offset, noise ``S`` and plane gains; ``kept``: its ``I_s`` and ``O`` on
    disk (then ``blocks`` is None), or None (then ``blocks`` holds each region's padded
    block).
    """
    offset, noise, gain = stats
    stored = isinstance(offset, zarr.Array)
    o_win = _StoredWindows(offset) if stored else _Windows(offset)
    n_win = g_win = None
    if with_noise:
        n_win = _StoredWindows(noise) if stored else _Windows(noise)
        # the gain is a NumPy array once stored, else lazy: as windows, or every block's
        # slice would carry (and compute) its own copy of the whole statistics pass
        g_win = gain if stored else _Windows(gain)
    out = {}
    for idx, r in regions.items():
        sel, spans = _maps(r, geometry, offset.shape)
        out[idx] = dask.delayed(_contrast_parts)(
            None if blocks is None else blocks[idx],
            o_win[sel],
            n_win[sel] if with_noise else None,
            g_win[spans[0][0] : spans[0][1]] if with_noise else None,
            r,
            spans,
            geometry,
            kept,
        )
    return out


class _Windows:
    """Windows of a small lazy array as delayed objects that share its chunks' keys.

    Slicing the dask array per consumer would give each consumer its own optimised (fused)
    copy of the chunks' graph, and so compute the statistics once per block that reads them.
    A window joins whole chunks (small here) and cuts it: built from the pieces of a dask
    slice instead (which keep the chunks' keys too) it cost 1–2 s more on 45 blocks (6.8–7.7 s
    against 5.8–7.0).
    """

    def __init__(self, array: da.Array):
        self.blocks = array.to_delayed(optimize_graph=False)
        self.bounds = [np.cumsum((0,) + c) for c in array.chunks]

    def __getitem__(self, sel: slice | tuple[slice, ...]) -> Any:
        ranges, local = [], []
        for b, s in zip(self.bounds, sel if isinstance(sel, tuple) else (sel,), strict=True):
            first = int(np.searchsorted(b, s.start, side="right")) - 1
            ranges.append(range(first, int(np.searchsorted(b, s.stop, side="left"))))
            local.append(slice(s.start - b[first], s.stop - b[first]))
        return dask.delayed(_window)(self._nested((), ranges), tuple(local))

    def _nested(self, at: tuple[int, ...], ranges: list[range]) -> Any:
        """The blocks at ``ranges`` after ``at``, as nested lists for `np.block`."""
        if len(at) == len(ranges):
            return self.blocks[at]
        return [self._nested(at + (i,), ranges) for i in ranges[len(at)]]


def _window(nested: list, local: tuple[slice, ...]) -> np.ndarray:
    return np.block(nested)[local]


@dataclass(frozen=True)
class _StoredWindow:
    """A window of statistics that the statistics pass wrote: the task reads it itself."""

    path: str
    sel: tuple[slice, ...]

    def read(self) -> np.ndarray:
        return zarr.open_array(self.path, mode="r")[self.sel]


class _StoredWindows:
    """`_Windows` of a stored statistics array: each a path and a selection, not a task.

    Windows as tasks of their own, with the lazy arrays' graphs behind them (and the gain
    as a lazy slice per block), cost each block 4.5 tasks a pass and about 50 KiB of graph
    objects that the client held through the stage (200 MiB at 16 GB's 4,096 blocks).
    """

    def __init__(self, array: zarr.Array):
        self.path = str(array.store.root)  # the scratch's arrays: one local store each

    def __getitem__(self, sel: tuple[slice, ...]) -> _StoredWindow:
        return _StoredWindow(self.path, sel)


def _core_of(padded: np.ndarray, region: Region) -> np.ndarray:
    return padded[region.core]


def whole_bin_chunks(
    chunks: Sequence[int], voxel_size_um: Sequence[float], diameter_um: float
) -> tuple[int, ...]:
    """Blocks ``chunks`` (z, y, x) rounded to whole bins of the method's statistics.

    On a grid of whole bins the statistics pass stores the smoothed image and its opening by
    block, each chunk a block and its one-voxel shell (`Kept.step`), and the analysis and
    measurement passes read one chunk a block instead of the 8–27 a window touches
    otherwise. On the 1 GB generated sample (blocks of 126 voxels against 125 in y and x)
    the pipeline's segment stage took 48.4 s against 56.7–57.2, the same cells.

    Examples
    --------
    >>> whole_bin_chunks((81, 125, 125), (2.0, 1.0, 1.0), 9.26)
    (81, 126, 126)
    """
    geometry = LocalGeometry.of(tuple(float(v) for v in voxel_size_um), diameter_um)
    return tuple(_whole_bins(c, b) for c, b in zip(chunks, geometry.bin_vox, strict=True))


def detect_local(
    image: Any,
    *,
    voxel_size_um: Sequence[float],
    diameter_um: float,
    min_peak_sd: float,
    volume_range_um3: tuple[float, float],
    struct: np.ndarray,
    chunks: tuple[tuple[int, ...], ...],
    background: Any = None,
    background_ratio: float = 0.5,
    compute: Callable[[Any, str], Any] | None = None,
    scratch: str | Path | None = None,
    quantum: float | None = None,
    camera_offset: float = 0.0,
) -> LocalResult:
    """Cells of ``image`` by the local method (see the module's description).

    Parameters
    ----------
    image : (Z, Y, X) dask array or stored array-like
        The nuclei channel.
    voxel_size_um : (3,) floats
    diameter_um : float
        Typical cell diameter: every scale of the method derives from it.
    min_peak_sd : float
        Least peak significance of a cell (robust noise SDs above its background).
    volume_range_um3 : (float, float)
        Size filter on the cell bodies.
    struct : (3, 3, 3) bool ndarray
        Neighbourhood of the watershed.
    chunks : chunk grid
        Blocks of the analysis (and of the labels).
    background : (Z, Y, X) dask array or stored array-like, optional
        The autofluorescence channel (same shape): artefacts are dropped, and its mean
        intensity and contrast become columns.
    background_ratio : float
        Drop a candidate whose background-channel contrast is at least this fraction of its
        nuclei-channel contrast.
    compute : callable, optional
        ``compute(collection, description)`` runs each pass (default ``dask.compute``).
    scratch : path-like, optional
        A folder (created if missing) where the method keeps what later passes would
        otherwise recompute: each channel's bin statistics (then two passes of their own),
        ``I_s`` and ``O`` (float32, written by the first), and, when ``chunks`` is a regular
        grid, each block's cell bodies, which the labels then read instead of repeating the
        smoothing, statistics, basins and bodies; and the watershed's block shells and
        plans, which its neighbour and measurement tasks read instead of holding them. The
        returned labels read it: delete it once they are computed. Default: nothing kept,
        every pass recomputes (same labels and table, byte for byte).
    quantum : float, optional
        The step the intensities were recorded in: the noise ``S`` is at least their
        rounding noise (`lightsheet.segment.background.LocalGeometry`'s ``noise_floor``).
    camera_offset : float
        What the image reads with no light: the planes' gain and the contrasts count the
        light above it (`lightsheet.segment.background.LocalGeometry`'s ``dark``).

    Returns
    -------
    LocalResult
        ``table`` has :data:`lightsheet.segment.TABLE_COLUMNS` plus ``peak_sd`` (the
        peak's significance) and ``contrast``, and with a background channel
        ``background_mean_intensity`` and ``background_contrast``.
    """
    vs = tuple(float(v) for v in voxel_size_um)
    geometry = LocalGeometry.of(vs, diameter_um, quantum, camera_offset)
    shape = tuple(int(s) for s in image.shape)
    grid = chunks
    numblocks = tuple(len(c) for c in grid)
    channels = {"image": image} if background is None else {"image": image, "bg": background}
    # with a scratch folder the statistics pass keeps each channel's I_s and O there, and
    # the later passes read them over a one-voxel shell: no halo, no smoothing, no opening
    kept = dict.fromkeys(channels)
    if scratch is not None:
        scratch = Path(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        snapped = statistics_grid(grid, geometry)
        step = tuple(c[0] for c in snapped)
        # where the analysis grid is the statistics grid, each block's window is one chunk
        by_block = step if snapped == tuple(tuple(c) for c in grid) else None
        for name in channels:
            kept[name] = Kept(
                str(scratch / f"{name}-smoothed.zarr"),
                str(scratch / f"{name}-opening.zarr"),
                by_block,
            )
            kept[name].create(shape, step)
    if scratch is None:
        stats = {}
        for name, channel in channels.items():
            stats[f"{name}-offset"], stats[f"{name}-noise"], stats[f"{name}-gain"] = (
                plane_statistics(channel, geometry, chunks=grid, noise=name == "image")
            )
        regions = block_regions(grid, tuple(d + 1 for d in geometry.halo))
        # the padded blocks serve the smoothing and, cut to their core, the measurement
        blocks = {name: _padded(channel, regions) for name, channel in channels.items()}
        cores = {
            name: {idx: dask.delayed(_core_of)(b[idx], regions[idx]) for idx in regions}
            for name, b in blocks.items()
        }
    else:
        stats = _keep_statistics(channels, geometry, grid, kept, scratch, compute)
        regions = block_regions(grid, (1, 1, 1))
        blocks = dict.fromkeys(channels)  # I_s and O come from `kept`
        # the image itself only where the measurement reads it: each block's core
        core_regions = block_regions(grid, (0, 0, 0))
        cores = {name: _padded(channel, core_regions) for name, channel in channels.items()}
    parts = _channel_parts(
        blocks["image"],
        geometry,
        (stats["image-offset"], stats["image-noise"], stats["image-gain"]),
        regions,
        True,
        kept["image"],
    )
    bg_parts = (
        None
        if background is None
        else _channel_parts(
            blocks["bg"], geometry, (stats["bg-offset"], None, None), regions, False, kept["bg"]
        )
    )
    # grids of delayed blocks, not dask arrays: the mask, the analysis and the measurement
    # share each block's smoothing and statistics instead of each fusing its own copy
    e_blocks = np.empty(numblocks, dtype=object)
    m_blocks = np.empty(numblocks, dtype=object)
    r_blocks = np.empty(numblocks, dtype=object)
    for idx in regions:
        e_blocks[idx] = dask.delayed(_elevation)(parts[idx])
        m_blocks[idx] = dask.delayed(_mask)(e_blocks[idx])
        r_blocks[idx] = dask.delayed(_light)(parts[idx])
    _, _, _, peaks, plans, tops = _watershed_analysis(
        e_blocks, m_blocks, grid, struct, SPLIT_SD, 0, compute=compute,
        split_fraction=SPLIT_FRACTION, vs=vs,
        min_peak_distance_um=MIN_PEAK_DISTANCE * diameter_um, values=r_blocks,
        drop_below=min_peak_sd, tables_in=None if scratch is None else scratch / "watershed",
    )  # fmt: skip
    # a label is a cell when its peak is significant; others get no body
    peaks_by_label = np.r_[-np.inf, peaks]
    # one shared task for the table every block reads, not a copy embedded in each task
    cell_tops = dask.delayed(
        np.where(peaks_by_label >= min_peak_sd, np.r_[0.0, tops], np.nan), pure=True
    )
    bodies = None
    if scratch is not None and _regular(grid):
        bodies = str(scratch / "bodies.zarr")
        scratch_array(bodies, shape, tuple(c[0] for c in grid), label_dtype(len(peaks)))
    measured = [
        dask.delayed(_measure_cells)(
            e_blocks[idx],
            parts[idx],
            regions[idx],
            plans[idx],
            cell_tops,
            struct,
            shape,
            cores["image"][idx],
            None if background is None else (cores["bg"][idx], bg_parts[idx]),
            bodies,
        )
        for idx in np.ndindex(numblocks)
    ]
    (tables,) = _compute(compute, [measured], "measurement (cell bodies)")
    tables = list(tables)
    raw = _combine(tables, vs)
    same = _same_cells(raw, peaks_by_label, vs, diameter_um, volume_range_um3)
    if same is not None:  # pieces of one elongated cell: one label, whole-cell sums
        for t in tables:
            if len(t):
                t["label"] = same[t["label"].to_numpy()]
        raw = _combine(tables, vs)
        peaks_by_label = peaks_by_label.copy()
        np.maximum.at(peaks_by_label, same, peaks_by_label)
    table = _finish_table(
        raw, peaks_by_label, vs, volume_range_um3, background, background_ratio, quantum
    )
    # the labels written: bodies of the cells kept, numbered 1..len(table)
    keep_lut = np.zeros(len(peaks_by_label), np.int64)
    keep_lut[table["label"].to_numpy()] = np.arange(1, len(table) + 1)
    if same is not None:
        keep_lut = keep_lut[same]
    dtype = label_dtype(len(table))
    pieces = np.empty(numblocks, dtype=object)
    lut = dask.delayed(keep_lut, pure=True)
    for idx, r in regions.items():
        task = (
            dask.delayed(_final_block)(
                e_blocks[idx], r_blocks[idx], r, plans[idx], cell_tops, struct, shape, lut, dtype
            )
            if bodies is None
            else dask.delayed(_kept_block)(bodies, r, lut, dtype)
        )
        pieces[idx] = da.from_delayed(
            task,
            shape=tuple(b - a for a, b in zip(r.start, r.stop, strict=True)),
            dtype=dtype,
            meta=np.empty((0, 0, 0), dtype),
        )
    table["label"] = np.arange(1, len(table) + 1, dtype=np.int64)
    return LocalResult(labels=da.block(pieces.tolist()), table=table.reset_index(drop=True))


def _same_cells(
    raw: pd.DataFrame,
    peaks_by_label: np.ndarray,
    voxel_size_um: Sequence[float],
    diameter_um: float,
    volume_range_um3: tuple[float, float],
) -> np.ndarray | None:
    """Label → the label of its cell, where the cells' apparent shape is elongated; or None.

    The basins' merge (`_watershed_analysis`) takes peaks closer than half the diameter for
    one cell. Without deconvolution, a light-sheet's axial PSF stretches cells along z
    several-fold, and one cell's top then holds maxima further apart than that. The stretch
    is measured on the cells themselves: per axis, the median extent of the bodies (their
    extent at half maximum) over the narrowest axis's. Cells whose centroids lie closer than
    ``MIN_PEAK_DISTANCE`` diameters in the metric stretched so are one cell; the brightest
    names it. Where the cells are as tall as they are wide (stretch 1) nothing is joined.
    """
    lo, hi = volume_range_um3
    label = raw["label"].to_numpy()
    volume = raw["volume_um3"].to_numpy()
    ok = (volume >= lo) & (volume <= hi)  # the cells the size filter would keep
    t = raw[ok]
    if len(t) < 2:
        return None
    ext = np.array(
        [
            np.median(t[f"bbox_{a}_max"] - t[f"bbox_{a}_min"]) * v
            for a, v in zip("zyx", voxel_size_um, strict=True)
        ]
    )
    stretch = ext / ext.min()
    if not (stretch > 1).any():
        return None
    pts = t[["z_um", "y_um", "x_um"]].to_numpy() / (stretch * diameter_um)
    pairs = cKDTree(pts).query_pairs(MIN_PEAK_DISTANCE, output_type="ndarray")
    if not len(pairs):
        return None
    n = len(t)
    comp = _components(pairs[:, 0], pairs[:, 1], n)
    lab = label[ok]
    brightest_first = np.argsort(-peaks_by_label[lab], kind="stable")
    comps, first = np.unique(comp[brightest_first], return_index=True)
    head = np.empty(len(comps), np.int64)
    head[comps] = lab[brightest_first][first]
    same = np.arange(len(peaks_by_label), dtype=np.int64)
    same[lab] = head[comp]
    return same


def _finish_table(
    raw: pd.DataFrame,
    peaks_by_label: np.ndarray,
    voxel_size_um: tuple[float, float, float],
    volume_range_um3: tuple[float, float],
    background: Any,
    ratio: float,
    quantum: float | None = None,
) -> pd.DataFrame:
    """Size filter, the peak and contrast columns, artefact rejection.

    A level above the dark one counts at least one recorded step (``quantum``) a voxel: it
    is known to no better (the offset itself is rounded to it: 100 ADU in 8 bits reads 6
    for 6.25). In the 8-bit realistic sample's dark outside the levels above 6 were under
    one step, and five specks stood out there with contrasts of 0.8–4.6 over nearly
    nothing, which the artefact test kept; with the floor, none (`benchmarks/recording.py`).
    """
    lo, hi = volume_range_um3
    sums = ["sum_E", "sum_B"]
    if background is not None:
        sums += ["sum_bg_raw", "sum_bg_E", "sum_bg_B"]
    for c in sums:
        if c not in raw:  # no cell in any block
            raw[c] = pd.Series(dtype=np.float64)
    t = raw[(raw["volume_um3"] >= lo) & (raw["volume_um3"] <= hi)].copy()
    t["peak_sd"] = peaks_by_label[t["label"].to_numpy()]
    count = np.rint(t["volume_um3"] / math.prod(voxel_size_um))
    if quantum:
        for c in ("sum_B", "sum_bg_B") if background is not None else ("sum_B",):
            t[c] = np.where(t[c] > 0, np.maximum(t[c], count * quantum), t[c])
    if background is not None:
        # the test compares each channel's light over its own level's, which needs a level
        # above the dark one (sum_B is already taken above it)
        untested = ~((t["sum_B"] > 0) & (t["sum_bg_B"] > 0)).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        t["contrast"] = t.pop("sum_E") / t.pop("sum_B")
        if background is not None:
            t["background_mean_intensity"] = t.pop("sum_bg_raw") / count
            t["background_contrast"] = t.pop("sum_bg_E") / t.pop("sum_bg_B")
    if background is not None:
        if untested.any():
            warnings.warn(
                ZeroLevelWarning(
                    f"{untested.sum()} of {len(t)} candidates lie where the background level of "
                    "the nuclei or the autofluorescence channel is not above the level of no "
                    "light: their contrast is undefined and the background channel cannot test "
                    "them, so they are kept. The test needs the level of no light: 0, or "
                    "camera_offset when given. Was a background or an offset subtracted beyond "
                    "the dark level, or is camera_offset above it?"
                ),
                stacklevel=5,
            )
        shared = (t["background_contrast"] >= ratio * t["contrast"]).to_numpy()
        t = t[~(shared & ~untested)]
    return t.reset_index(drop=True)
