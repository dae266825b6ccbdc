"""The local method's statistics: smoothing, the background and the noise per plane.

What they are and why: the ``local`` method's description (`lightsheet.segment.local`),
step 2. Everything here is exact at any chunking: the statistics pass cuts blocks of whole
bins of a grid fixed to the volume, each read with the halo of ``LocalGeometry.halo``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
import zarr
from zarr.codecs import BloscCodec

from lightsheet.regions import Region, block_regions, map_overlap, read_region
from lightsheet.segment._common import _ndi_for, _to_numpy, _xp_for

__all__ = [
    "Kept",
    "LocalGeometry",
    "gain_of",
    "levels",
    "noise_calibration",
    "pixel_noise",
    "plane_gain",
    "plane_statistics",
    "smooth",
    "scratch_array",
    "statistics_grid",
    "stored_bins",
    "stored_statistics",
]

#: Smoothing σ as a fraction of the diameter.
SMOOTH_SIGMA = 0.2
#: The background's offset is a median over this many bins a side.
BACKGROUND_WINDOW_BINS = 3
#: The noise's median runs over this many bins a side.
NOISE_WINDOW_BINS = 9
#: A bin's spread counts at most this many times what the image's own pixel noise gives at
#: the smoothing's scale (`pixel_noise`): beyond it the spread is the cells themselves.
NOISE_CAP = 8.0
_MAD_TO_SD = 1.4826
#: The statistics pass's blocks join this many of the analysis's blocks a side in y and x:
#: its halo (the opening's 2 bins plus the Gaussian's radius, about 2.4 diameters a side)
#: then costs 1.4 times a block's voxels instead of 1.9 times (blocks of 14 bins: 126 voxels
#: on the phantom), and the pass a third less time; 3 gained nothing more. The blocks stay
#: a few million voxels.
STATISTICS_BLOCK = 2
#: A bin holds at least this many voxels a side: the MAD of one voxel is zero, and a
#: camera pixel over two thirds of the diameter made every cell's significance infinite.
MIN_BIN_VOX = 2
#: The well-sampled bin that `noise_calibration` compares with (voxels a side): from about
#: four voxels a side the noise estimate no longer depends on the sampling.
REFERENCE_BIN_VOX = 16
#: `stored_statistics` reads whole planes of bins (the windows' medians and the gain's step
#: need them), at most this many bytes of them a task, and at least one plane.
SLAB_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Kept:
    """Where the statistics pass writes a channel's ``I_s`` and ``O``, for later passes.

    Float32 Zarr arrays. Without ``step``: of the volume's shape, chunked as
    :func:`statistics_grid`. With ``step`` (the analysis grid's block, when that grid is the
    statistics grid): laid out by block, each chunk one block and its one-voxel shell
    (``step + 2`` a side), so that a later pass reads a block's window from one chunk
    instead of the 8–27 that it touches in the volume's layout (`where`).
    """

    smoothed: str
    opening: str
    step: tuple[int, ...] | None = None

    def create(self, shape: Sequence[int], chunks: Sequence[int]) -> None:
        """Both arrays, empty: of ``shape`` chunked by ``chunks``, or laid out by block."""
        if self.step is not None:
            shape = tuple(-(-n // c) * (c + 2) for n, c in zip(shape, self.step, strict=True))
            chunks = tuple(c + 2 for c in self.step)
        for path in (self.smoothed, self.opening):
            scratch_array(path, shape, chunks, np.float32)

    def where(self, start: Sequence[int], extent: Sequence[tuple[int, int]]) -> tuple:
        """Where voxels ``[first, stop)`` per axis of the block at ``start`` are stored.

        ``extent`` lies within the block and its one-voxel shell.

        Examples
        --------
        >>> Kept("s", "o", step=(4, 4, 4)).where((4, 0, 8), [(3, 9), (0, 5), (7, 12)])
        (slice(6, 12, None), slice(1, 6, None), slice(12, 17, None))
        >>> Kept("s", "o").where((4, 0, 8), [(3, 9), (0, 5), (7, 12)])
        (slice(3, 9, None), slice(0, 5, None), slice(7, 12, None))
        """
        if self.step is None:
            return tuple(slice(a, b) for a, b in extent)
        out = []
        for a0, (a, b), c in zip(start, extent, self.step, strict=True):
            base = a0 // c * (c + 2) + 1 - a0  # the block's first voxel at its chunk's second
            out.append(slice(a + base, b + base))
        return tuple(out)


@dataclass(frozen=True)
class LocalGeometry:
    """The method's scales in voxels, derived from the diameter and the voxel size.

    Attributes
    ----------
    sigma_vox : (3,) floats
        Smoothing σ per axis.
    depth : (3,) ints
        Halo that makes a block's smoothing exact (the Gaussian's radius).
    bin_vox : (3,) ints
        Statistics bin: one plane, about one diameter in y and x.
    open_vox : (3,) ints
        The opening's square: one plane, ``2 × bin + 1`` (about two diameters) in y and x.
    noise_floor : float
        The least noise ``S``: the rounding noise of values recorded in steps of ``quantum``
        (``quantum / √12`` a voxel, uniform), smoothed like the image. 0 without a quantum.
    dark : float
        What the image reads with no light (a camera's offset): the planes' gain and the
        contrast count light above it (`plane_gain`, `lightsheet.segment.local`).
    """

    sigma_vox: tuple[float, float, float]
    depth: tuple[int, int, int]
    bin_vox: tuple[int, int, int]
    open_vox: tuple[int, int, int]
    noise_floor: float = 0.0
    dark: float = 0.0

    @classmethod
    def of(
        cls,
        voxel_size_um: Sequence[float],
        diameter_um: float,
        quantum: float | None = None,
        dark: float = 0.0,
    ) -> LocalGeometry:
        """The geometry for a diameter at a voxel size (values in steps, a dark level).

        Examples
        --------
        >>> g = LocalGeometry.of((5.0, 2.0, 2.0), 14.0)
        >>> g.sigma_vox, g.depth, g.bin_vox, g.open_vox, g.halo
        ((0.56, 1.4, 1.4), (2, 6, 6), (1, 7, 7), (1, 15, 15), (2, 20, 20))
        >>> round(LocalGeometry.of((5.0, 2.0, 2.0), 14.0, quantum=1).noise_floor, 4)
        0.0429
        """
        sigma = tuple(round(SMOOTH_SIGMA * diameter_um / v, 6) for v in voxel_size_um)
        depth = tuple(int(4.0 * s + 0.5) for s in sigma)  # scipy's Gaussian radius
        bins = (1,) + tuple(max(MIN_BIN_VOX, round(diameter_um / v)) for v in voxel_size_um[1:])
        opening = (1,) + tuple(2 * b + 1 for b in bins[1:])
        floor = 0.0 if not quantum else quantum / math.sqrt(12.0) * _smoothing_gain(sigma)
        floor = round(floor, 9)
        return cls(sigma, depth, bins, opening, floor, float(dark))  # type: ignore[arg-type]

    @property
    def halo(self) -> tuple[int, int, int]:
        """Halo that makes a block's smoothing and its opening exact."""
        return tuple(d + k - 1 for d, k in zip(self.depth, self.open_vox, strict=True))


def smooth(block: Any, geometry: LocalGeometry) -> Any:
    """``G(σ) * block`` in float32 (NumPy or CuPy), exact ``geometry.depth`` from the edges."""
    nd = _ndi_for(block)
    xp = _xp_for(block)
    return nd.gaussian_filter(
        block.astype(xp.float32, copy=False), geometry.sigma_vox, truncate=4.0
    )


def levels(block: Any, geometry: LocalGeometry) -> tuple[Any, Any]:
    """``I_s`` and its opening per plane ``O`` (NumPy or CuPy), exact ``geometry.halo`` in.

    ``O`` is the lower envelope of the tissue at twice a cell's size: a cell, a vessel or a
    speck narrower than the square is removed, a tissue edge or a plane's step is kept.
    """
    s = smooth(block, geometry)
    return s, _ndi_for(block).grey_opening(s, size=geometry.open_vox)


def _whole_bins(side: int, bin_vox: int) -> int:
    """``side`` rounded to a whole number of bins, at least one."""
    return max(bin_vox, round(side / bin_vox) * bin_vox)


def _snap(grid: tuple[tuple[int, ...], ...], bins: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Chunks of the same shape whose sides (but the last) are whole numbers of bins."""
    out = []
    for c, b in zip(grid, bins, strict=True):
        n, step = sum(c), _whole_bins(max(c), b)
        out.append(tuple([step] * (n // step) + ([n % step] if n % step else [])))
    return tuple(out)


def statistics_grid(
    chunks: tuple[tuple[int, ...], ...], geometry: LocalGeometry
) -> tuple[tuple[int, ...], ...]:
    """``chunks`` snapped to whole bins (a regular grid): the chunks of `Kept`'s arrays.

    The statistics pass's blocks are ``STATISTICS_BLOCK`` of these a side in y and x
    (`_statistics_blocks`).
    """
    return _snap(chunks, geometry.bin_vox)


def _statistics_blocks(grid: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """``grid`` with every ``STATISTICS_BLOCK`` consecutive chunks in y and x joined.

    Examples
    --------
    >>> _statistics_blocks(((64, 64), (126, 126, 126, 126, 8), (126, 50)))
    ((64, 64), (252, 252, 8), (176,))
    """
    k = STATISTICS_BLOCK
    return (grid[0],) + tuple(
        tuple(sum(c[i : i + k]) for i in range(0, len(c), k)) for c in grid[1:]
    )


def _bin_stats_block(
    padded: Any,
    *,
    region: Region,
    geometry: LocalGeometry,
    keep: Kept | None = None,
    bins: str | None = None,
    shape: Sequence[int] | None = None,
    noise: bool = True,
) -> np.ndarray | None:
    """Per bin of the core: ``I_s − O``'s median, ``I_s``'s spread and level, and the noise.

    The level is ``I_s``'s median above ``geometry.dark`` (the light, for `plane_gain`).

    The spread is the MAD × 1.4826, the noise the spread at most ``NOISE_CAP`` × `pixel_noise`
    and at least ``geometry.noise_floor`` (before `noise_calibration`, which the windows'
    median is multiplied by), NaN without ``noise`` and in `_censored` bins.
    Returns ``(4, Z, NY, NX)`` in that order, or with ``bins`` (`stored_bins`' array) writes them
    there at the core's bins and returns None. With ``keep`` the core's ``I_s`` and ``O`` are also
    written to its Zarr arrays; laid out by block (``keep.step``), each block of the core with its
    one-voxel shell (the volume's ``shape`` bounds it; the halo must then be one voxel wider than
    ``geometry.halo``).
    """
    smoothed, opened = levels(padded, geometry)
    if keep is not None and keep.step is not None:
        smoothed, opened = _to_numpy(smoothed), _to_numpy(opened)
        _write_windows(keep, region, smoothed, opened, shape)
    a = _to_numpy(smoothed[region.core])
    opened = _to_numpy(opened[region.core])
    if keep is not None and keep.step is None:
        _write_block(keep.smoothed, region, a)
        _write_block(keep.opening, region, opened)
    residual = a - opened
    nbins = [-(-n // b) for n, b in zip(a.shape, geometry.bin_vox, strict=True)]
    out = np.empty((4, *nbins), np.float32)
    out[2], out[1] = _bin_median_mad(a, geometry.bin_vox)
    out[2] -= np.float32(geometry.dark)
    for cells, sl in _bins(residual, geometry.bin_vox):
        out[0][sl] = np.median(cells, axis=-1)
    out[1] *= _MAD_TO_SD
    if noise:
        cap = NOISE_CAP * pixel_noise(padded, region, geometry)
        out[3] = np.where(cap > 0, np.minimum(out[1], cap), out[1])
        if geometry.noise_floor:  # the recorded values' rounding: the least noise there is
            out[3] = np.maximum(out[3], geometry.noise_floor / noise_calibration(geometry))
        out[3][_censored(_to_numpy(padded[region.core]), geometry.bin_vox)] = np.nan
    else:  # a channel whose offset alone is read (`stored_statistics` without ``noise``)
        out[3] = np.nan
    if bins is None:
        return out
    at = [a // b for a, b in zip(region.start, geometry.bin_vox, strict=True)]
    zarr.open_array(bins, mode="r+")[
        (slice(None),) + tuple(slice(a, a + n) for a, n in zip(at, out.shape[1:], strict=True))
    ] = out
    return None


def _bins(a: np.ndarray, bin_vox: Sequence[int]):
    """``(values, where)``: each bin's voxels along the last axis, and its place in the grid.

    Whole bins at once; the volume's last row and column of bins may be partial.
    """
    _, by, bx = bin_vox
    z, y, x = a.shape
    ny, nx = -(-y // by), -(-x // bx)
    for ys, ye in ((0, min(ny, y // by)), (y // by, ny)):
        for xs, xe in ((0, min(nx, x // bx)), (x // bx, nx)):
            if ye <= ys or xe <= xs:
                continue
            part = a[:, ys * by : min(y, ye * by), xs * bx : min(x, xe * bx)]
            h, w = -(-part.shape[1] // (ye - ys)), -(-part.shape[2] // (xe - xs))
            cells = part.reshape(z, ye - ys, h, xe - xs, w).transpose(0, 1, 3, 2, 4)
            yield cells.reshape(z, ye - ys, xe - xs, h * w), np.s_[:, ys:ye, xs:xe]


def plane_statistics(
    image: Any,
    geometry: LocalGeometry,
    *,
    chunks: tuple[tuple[int, ...], ...],
    noise: bool = True,
) -> tuple[da.Array, da.Array | None, da.Array | None]:
    """Per plane: the background's offset and the noise ``S`` on the bins, and the gain.

    Parameters
    ----------
    image : (Z, Y, X) dask array or stored array-like
    geometry : LocalGeometry
    chunks : chunk grid
        Blocks of the analysis. The statistics pass's blocks are these snapped to whole
        bins (:func:`statistics_grid`) and joined ``STATISTICS_BLOCK`` a side in y and x.
        (:func:`stored_bins` and :func:`stored_statistics` compute the same onto disk, and
        keep ``I_s`` and ``O`` there too.)
    noise : bool
        False: the offset alone (an autofluorescence channel's); noise and gain are None,
        and no `pixel_noise` is computed.

    Returns
    -------
    offset, noise : (Z, ceil(Y / by), ceil(X / bx)) dask arrays of float32
        The median over 3 × 3 bins of each bin's median of ``I_s − O`` (see :func:`levels`),
        and the median over 9 × 9 bins of each bin's MAD × 1.4826 of ``I_s``, capped at
        ``NOISE_CAP`` × its `pixel_noise`. Lazy.
    gain : (Z,) dask array of float64
        Each plane's gain relative to the first (:func:`plane_gain`). Lazy.
    """
    grid = _statistics_blocks(statistics_grid(chunks, geometry))
    regions = block_regions(grid, geometry.halo)
    blocks = _padded(image, regions)
    parts = np.empty(tuple(len(c) for c in grid), dtype=object)
    for idx, r in regions.items():
        parts[idx] = da.from_delayed(
            dask.delayed(_bin_stats_block)(blocks[idx], region=r, geometry=geometry, noise=noise),
            shape=(4, *_nbins([b - a for a, b in zip(r.start, r.stop, strict=True)], geometry)),
            dtype=np.float32,
            meta=np.empty((0, 0, 0, 0), np.float32),
        )
    stats = da.concatenate(
        [
            da.concatenate([da.concatenate(list(row), axis=3) for row in plane], axis=2)
            for plane in parts
        ],
        axis=1,
    )
    offset = _median_bins(stats[0], BACKGROUND_WINDOW_BINS)
    if not noise:
        return offset, None, None
    return (
        offset,
        _median_bins(
            stats[3].rechunk({1: -1, 2: -1}).map_blocks(_fill_censored, dtype=np.float32),
            NOISE_WINDOW_BINS,
        )
        * np.float32(noise_calibration(geometry)),
        plane_gain(stats[2], stats[1]),
    )


@functools.lru_cache
def _bin_spread(
    sigma_yx: tuple[float, float], bins_yx: tuple[int, int], *, residual: bool = False
) -> float:
    """What the noise estimate returns for white noise smoothed by σ, over its true SD.

    The median over many bins of each bin's MAD × 1.4826 of Gaussian white noise smoothed
    by ``sigma_yx`` and cut into bins of ``bins_yx`` voxels, divided by the smoothed noise's
    SD. In-plane only: the bins are one plane, and smoothing along z scales a bin's MAD and
    the SD alike. With ``residual``, of the noise minus its 3 × 3 mean (`pixel_noise`)
    instead, over the noise's own SD (σ unused). Deterministic (a fixed seed): a plane of
    about 2048 × 2048 voxels (at least 32 × 32 bins), which puts the median within a few
    tenths of a per cent.
    """
    by, bx = bins_yx
    n = max(32, 2048 // max(by, bx))
    margin = [1, 1] if residual else [int(4.0 * s + 0.5) for s in sigma_yx]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((n * by + 2 * margin[0], n * bx + 2 * margin[1]), np.float32)
    if residual:
        s, sd = noise - ndi.uniform_filter(noise, size=3), noise.std()
    else:
        s = ndi.gaussian_filter(noise, sigma_yx, truncate=4.0)
    s = s[margin[0] : margin[0] + n * by, margin[1] : margin[1] + n * bx]
    mad = _bin_median_mad(s[None], (1, by, bx))[1]
    return float(np.median(mad) * _MAD_TO_SD / (sd if residual else s.std()))


def _censored(raw: np.ndarray, bin_vox: Sequence[int]) -> np.ndarray:
    """Bins where more than half the raw voxels share one value: their MAD is 0.

    Such a bin's spread measures how the image was written, not its noise. Clipped (an
    offset subtracted, a camera's floor, a stitched mosaic's empty fill: the shared value is
    the bin's lowest), or quantized more coarsely than its noise (a dim background in 8-bit
    data, or in data scaled down before it was saved: the outside reads one value with a
    few voxels one step off). What spread is left there is that of a few specks over
    nothing, near zero, which made every speck of the dark outside a cell.
    `_fill_censored` gives such bins their plane's noise instead.

    >>> raw = np.zeros((1, 2, 6), np.uint16); raw[0, :, 2:] = [[5, 7, 6, 6], [6, 9, 6, 7]]
    >>> _censored(raw, (1, 2, 2)).tolist()
    [[[True, False, True]]]
    """
    out = np.empty([-(-n // b) for n, b in zip(raw.shape, bin_vox, strict=True)], bool)
    for cells, sl in _bins(raw, bin_vox):
        # a value that more than half share is the middle one in sorted order
        k = (cells.shape[-1] - 1) // 2
        mid = np.partition(cells, k, axis=-1)[..., k : k + 1]
        out[sl] = 2 * np.count_nonzero(cells == mid, axis=-1) > cells.shape[-1]
    return out


def _fill_censored(noise: np.ndarray) -> np.ndarray:
    """Each plane's NaN (`_censored`) bins at the median of its other bins' noise.

    The noise's window median then reads the tissue's noise next to a clipped outside, and
    across it. A plane censored everywhere gets 0 (nothing is found there).

    >>> _fill_censored(np.array([[[1.0, np.nan, 3.0]], [[np.nan, np.nan, np.nan]]])).tolist()
    [[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]]
    """
    out = np.array(noise, np.float32)
    for plane in out:
        bad = np.isnan(plane)
        if bad.any():
            plane[bad] = 0.0 if bad.all() else np.median(plane[~bad])
    return out


def _bin_median_mad(a: np.ndarray, bin_vox: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's median and median absolute deviation (unscaled), float32 ``(Z, NY, NX)``."""
    med = np.empty([-(-n // b) for n, b in zip(a.shape, bin_vox, strict=True)], np.float32)
    mad = np.empty_like(med)
    for cells, sl in _bins(a, bin_vox):
        med[sl] = np.median(cells, axis=-1)
        mad[sl] = np.median(np.abs(cells - med[sl][..., None]), axis=-1)
    return med, mad


@functools.lru_cache
def _smoothing_gain(sigma_vox: tuple[float, ...]) -> float:
    """The SD of white noise of SD 1 after `smooth`'s Gaussian (its kernel's L2 norm)."""
    size = [2 * int(4.0 * s + 0.5) + 1 for s in sigma_vox]
    impulse = np.zeros(size)
    impulse[tuple(n // 2 for n in size)] = 1.0
    return float(np.sqrt((ndi.gaussian_filter(impulse, sigma_vox, truncate=4.0) ** 2).sum()))


def pixel_noise(padded: Any, region: Region, geometry: LocalGeometry) -> np.ndarray:
    """Per bin of ``region``'s core: the spread that the image's pixel noise alone gives ``I_s``.

    Each voxel minus the mean of its 3 × 3 in-plane neighbourhood keeps the noise and drops whatever
    is smooth at that scale: a blurred cell, a vessel, the tissue's slope. A bin's MAD × 1.4826 of
    that residual, over what it gives for white noise of SD 1 (`_bin_spread` with ``residual``:
    √(8/9) at large bins, less at a coarse pixel's few voxels), is the pixel noise's SD there; times
    the smoothing's gain (`_smoothing_gain`) and the smoothed noise's estimate in such a bin
    (`_bin_spread`) it is what the spread of ``I_s`` in a bin of pure noise would be. Cells cannot
    raise it, which is why the spread counts at most ``NOISE_CAP`` times it (`_bin_stats_block`).
    Exact at any chunking: the halo covers the 3 × 3 mean, and at the volume's faces the block's
    reflection is the volume's.
    """
    # the core and one voxel around it in y and x (where the halo has it; else the face)
    near = (region.core[0],) + tuple(
        slice(max(0, c.start - 1), c.stop + 1) for c in region.core[1:]
    )
    raw = padded[near].astype(_xp_for(padded).float32)
    raw -= _ndi_for(padded).uniform_filter(raw, size=(1, 3, 3))
    inner = (slice(None),) + tuple(
        slice(c.start - n.start, c.stop - n.start)
        for c, n in zip(region.core[1:], near[1:], strict=True)
    )
    residual = _to_numpy(raw[inner])
    sigma, bins = geometry.sigma_vox[1:], geometry.bin_vox[1:]
    scale = (
        _smoothing_gain(geometry.sigma_vox)
        * _bin_spread(sigma, bins)
        / _bin_spread(sigma, bins, residual=True)
    )
    mad = _bin_median_mad(residual, geometry.bin_vox)[1]
    return mad * np.float32(_MAD_TO_SD) * np.float32(scale)


def noise_calibration(geometry: LocalGeometry) -> float:
    """The factor that makes the noise ``S`` the same estimate at any voxel size.

    A bin is about one diameter, so a coarse camera pixel leaves it a few voxels, whose MAD
    is biased low: for white noise by a fifth at 2 × 2 voxels (its samples nearly
    independent, the smoothing under a voxel), against 0.79 of the SD at four or more
    voxels a side. Cells there stood 1.25 times as many "SDs" above the same tissue, and
    the crop binned to 6 µm pixels gave 787 objects for 482 at its own 2 µm. ``S`` is
    scaled by the estimate for white noise at a well-sampled bin (``REFERENCE_BIN_VOX``)
    over the estimate at this geometry's, both from :func:`_bin_spread`: 0.96–1.04 at
    three voxels a side or more, 1.18–1.29 at two.

    Examples
    --------
    >>> round(noise_calibration(LocalGeometry.of((5.0, 2.0, 2.0), 14.0)), 2)
    1.0
    >>> round(noise_calibration(LocalGeometry.of((5.0, 6.0, 6.0), 14.0)), 2)
    1.27
    """
    ref = REFERENCE_BIN_VOX
    fine = _bin_spread((SMOOTH_SIGMA * ref, SMOOTH_SIGMA * ref), (ref, ref))
    return fine / _bin_spread(geometry.sigma_vox[1:], geometry.bin_vox[1:])


def _nbins(shape: Sequence[int], geometry: LocalGeometry) -> tuple[int, ...]:
    """Bins over a box of ``shape`` voxels that starts on a bin (the last may be partial)."""
    return tuple(-(-n // b) for n, b in zip(shape, geometry.bin_vox, strict=True))


def stored_bins(
    image: Any,
    geometry: LocalGeometry,
    *,
    chunks: tuple[tuple[int, ...], ...],
    keep: Kept,
    path,
    noise: bool = True,
) -> list:
    """The statistics pass's first step on disk: one task a block, writing its raw bins.

    `plane_statistics` joins the blocks' bins into dask arrays and takes the windows'
    medians and the gain with dask-array operations over them: 15 small tasks per analysis
    block, whose graph the client builds and sends whole (at 1,024 blocks, 225–275 MiB of
    the peak of the worker that runs the segment stage as the client). Here each statistics
    block writes its ``(4, Z, NY, NX)`` bins into a Zarr array at ``path`` (a chunk per
    block: no two tasks share one), and I_s and O into ``keep``; `stored_statistics` then
    works on whole planes (without ``noise``, the offset alone: no `pixel_noise`, the noise
    row NaN). Returns the tasks.
    """
    grid = _statistics_blocks(statistics_grid(chunks, geometry))
    # laid out by block, the kept arrays hold each block's shell too: exact one voxel further
    wider = 0 if keep.step is None else 1
    regions = block_regions(grid, tuple(h + wider for h in geometry.halo))
    shape = tuple(int(n) for n in image.shape)
    block = _nbins([c[0] for c in grid], geometry)
    scratch_array(path, (4, *_nbins(shape, geometry)), (4, *block), np.float32)
    blocks = _padded(image, regions)
    return [
        dask.delayed(_bin_stats_block)(
            blocks[idx],
            region=r,
            geometry=geometry,
            keep=keep,
            bins=str(path),
            shape=shape,
            noise=noise,
        )
        for idx, r in regions.items()
    ]


def stored_statistics(bins, geometry: LocalGeometry, *, offset, noise=None) -> list:
    """The statistics from `stored_bins`' array ``bins``: the offset, and the noise and gain.

    Tasks of a few whole planes each (``SLAB_BYTES``), each writing the windows' medians to
    the Zarr arrays ``offset`` and (with ``noise``) ``noise`` (chunks of its planes by a
    statistics block's bins in y and x, which the later passes read windows of), and
    returning its planes' gain steps (with ``noise``; the first plane's is 1). `gain_of`
    chains them. The same values as `plane_statistics`.
    """
    src = zarr.open_array(str(bins), mode="r")
    _, nz, ny, nx = src.shape
    planes = max(1, SLAB_BYTES // (4 * ny * nx * 4))
    for path in (offset, noise):
        if path is not None:
            scratch_array(path, (nz, ny, nx), (planes, *src.chunks[2:]), np.float32)
    return [
        dask.delayed(_slab_statistics)(
            str(bins),
            z,
            min(nz, z + planes),
            geometry,
            str(offset),
            None if noise is None else str(noise),
        )
        for z in range(0, nz, planes)
    ]


def _slab_statistics(bins: str, z0: int, z1: int, geometry, offset: str, noise: str | None):
    src = zarr.open_array(bins, mode="r")
    first = max(0, z0 - 1)  # the plane before: the first plane's gain step
    stats = src[: 1 if noise is None else 4, first:z1]  # the offset alone needs one
    out = zarr.open_array(offset, mode="r+")
    out[z0:z1] = _median_block(stats[0, z0 - first :], window=BACKGROUND_WINDOW_BINS)
    if noise is None:
        return None
    calibration = np.float32(noise_calibration(geometry))
    out = zarr.open_array(noise, mode="r+")
    out[z0:z1] = (
        _median_block(_fill_censored(stats[3, z0 - first :]), window=NOISE_WINDOW_BINS)
        * calibration
    )
    step = _median_step(_plane_ratio(stats[2], stats[1]))
    return np.r_[1.0, step] if z0 == 0 else step


def gain_of(steps: Sequence[np.ndarray]) -> np.ndarray:
    """Each plane's gain from `stored_statistics`' steps, in order: as `plane_gain`'s."""
    return np.cumprod(np.concatenate(steps))


def scratch_array(path, shape, chunks, dtype) -> zarr.Array:
    """A compressed Zarr array for intermediates (zeros until written), replacing any."""
    return zarr.create_array(
        str(path),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        fill_value=0,
        overwrite=True,
    )


def plane_gain(level: da.Array, spread: da.Array) -> da.Array:
    """Each plane's gain, chained from its neighbour's: ``(Z,)`` float64, the first plane 1.

    Light-sheet planes are acquired one at a time: the sheet's power, the camera's exposure
    and bleaching scale a whole plane, cells and background alike. Between two neighbouring
    planes the gain's step is the median over the bins of one plane's level (the median of
    ``I_s`` above the dark level, `LocalGeometry.dark`: a camera's offset is not light and
    no gain scales it; counted as light it pulled every step towards 1, and the real
    fixture with 100 added moved 132 of its 201 centres more than 1 µm, none with the
    offset known) over the other's, among the bins whose level stands above their spread
    (MAD × 1.4826) in both: a level within its own noise of zero (a subtracted background)
    holds no gain. A plane pair without such bins steps by 1. Tissue that enters or leaves
    the field changes few bins from one plane to the next, so the median follows the gain,
    not the tissue; but tissue whose level changes along z as a whole is taken for a gain
    (the realistic sample, no gain in it, dims towards the brain's faces: 1.7 % a plane,
    chained to 2.8 × at mid-depth), which moves centres outward by about 0.1 µm there
    (`benchmarks/results/realistic_sample.md`). Exact at any chunking (bins lie on a global
    grid; each plane's median is taken over the whole plane).
    """
    if level.shape[0] < 2:
        return da.ones(level.shape[0], dtype=np.float64, chunks=-1)
    ratio = _plane_ratio(level, spread).rechunk({0: 8, 1: -1, 2: -1})  # whole planes
    step = ratio.map_blocks(_median_step, drop_axis=(1, 2), dtype=np.float64)
    steps = da.concatenate([da.ones(1, dtype=np.float64), step]).rechunk(-1)
    return steps.map_blocks(np.cumprod, dtype=np.float64)


def _plane_ratio(level, spread):
    """Each plane's bin levels over the previous plane's where both stand above their spread.

    ``(Z − 1, NY, NX)``, NaN elsewhere; NumPy or dask arrays alike.
    """
    clear = level > spread
    both = clear[1:] & clear[:-1]
    return np.where(both, level[1:] / np.where(both, level[:-1], 1), np.nan)


def _median_step(ratio: np.ndarray) -> np.ndarray:
    out = np.ones(ratio.shape[0], np.float64)
    for i, plane in enumerate(ratio):
        values = plane[np.isfinite(plane)]
        if values.size:
            out[i] = np.median(values)
    return out


def _median_bins(bins: da.Array, window: int) -> da.Array:
    half = window // 2
    depth = (0, min(half, bins.shape[1] - 1), min(half, bins.shape[2] - 1))
    return map_overlap(
        _median_block, bins, depth=depth, boundary="nearest", dtype=np.float32, window=window
    )


def _median_block(padded: np.ndarray, *, region: Region | None = None, window: int) -> np.ndarray:
    return ndi.median_filter(padded, size=(1, window, window), mode="nearest")


def _lerp(values: np.ndarray, axis: int, coords: np.ndarray, b: int, first: int, n: int):
    """Linear interpolation along ``axis`` between bin centres ``(j + 0.5) b − 0.5``."""
    u = (coords + 0.5) / b - 0.5
    j0 = np.floor(u)
    w = (u - j0).astype(np.float32)
    lo = np.clip(j0.astype(np.int64), 0, n - 1) - first
    hi = np.clip(j0.astype(np.int64) + 1, 0, n - 1) - first
    shape = [1, 1, 1]
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(values, lo, axis=axis) * (1 - w) + np.take(values, hi, axis=axis) * w


def _bin_span(start: int, stop: int, b: int, n: int) -> tuple[int, int]:
    """The bins ``[lo, hi)`` `_lerp` reads for voxels ``[start, stop)``."""
    lo = min(max(0, math.floor((start + 0.5) / b - 0.5)), n - 1)
    hi = min(n, max(1, math.floor((stop - 0.5) / b - 0.5) + 2))
    return lo, max(hi, lo + 1)


def _padded(image: Any, regions: dict) -> dict:
    """Each region's halo-padded block, delayed: read from the store, or cut from dask."""
    out = {}
    if isinstance(image, da.Array):
        for idx, r in regions.items():
            sl = tuple(
                slice(a - lo, b + hi)
                for a, b, lo, hi in zip(r.start, r.stop, r.lo, r.hi, strict=True)
            )
            out[idx] = dask.delayed(np.asarray)(image[sl])
        return out
    source = dask.delayed(image, pure=True, traverse=False)
    for idx, r in regions.items():
        out[idx] = dask.delayed(read_region)(source, r)
    return out


def _write_windows(keep: Kept, region: Region, smoothed, opened, shape) -> None:
    """Each block of ``region``'s core with its one-voxel shell into ``keep``'s chunks.

    ``smoothed`` and ``opened`` span the padded region. The blocks are those of the grid of
    ``keep.step``, which divides the region's core, so each chunk has one writer.
    """
    first = [a - lo for a, lo in zip(region.start, region.lo, strict=True)]
    starts = [range(a, b, c) for a, b, c in zip(region.start, region.stop, keep.step, strict=True)]
    arrays = [zarr.open_array(p, mode="r+") for p in (keep.smoothed, keep.opening)]
    for start in itertools.product(*starts):
        extent = [
            (max(0, a - 1), min(n, a + c + 1))
            for a, c, n in zip(start, keep.step, shape, strict=True)
        ]
        src = tuple(slice(a - f, b - f) for (a, b), f in zip(extent, first, strict=True))
        for array, values in zip(arrays, (smoothed, opened), strict=True):
            array[keep.where(start, extent)] = values[src]


def _write_block(path: str, region: Region, block: np.ndarray) -> None:
    store = zarr.open_array(path, mode="r+")
    store[tuple(slice(a, b) for a, b in zip(region.start, region.stop, strict=True))] = (
        block.astype(store.dtype)
    )
