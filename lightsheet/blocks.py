"""Block geometry: every chunk, block, halo and pyramid decision, as pure functions.

A stage's data moves through three grids, all decided here from the volume's shape, its
voxel size, the bytes per voxel, the halo and a byte budget (never from the data's values):

- **chunks**: the stored OME-Zarr chunks (`default_chunks`, `stitch_chunks`,
  `fused_chunks`, `segment_chunks`; `inner_chunks` for a shard's inner chunks);
- **blocks**: what one task computes, whole chunks plus a halo (`choose_blocks`,
  `choose_chunks` and `default_depth` for deconvolution, `feature_blocks`, `write_blocks`);
- **pyramid levels**: the downsampling factors (`pyramid_factors`) and which levels are
  written from the level-0 blocks in memory (`fused_level_chunks`).

`lightsheet.regions.map_overlap` lifts a kernel over the blocks decided here. Tuning
constants are keyword parameters; the module constants are only their documented defaults.
Nothing here imports a stage, a task or Prefect: `voxel_size_um` goes down the layers and
never comes back up.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from lightsheet.errors import ConfigError

__all__ = [
    "BLOCK_BYTES",
    "DEPTH_PER_HALF",
    "FEATURE_BLOCK_BYTES",
    "FUSED_MIN_CHUNK_VOXELS",
    "SEGMENT_CHUNK_VOXELS",
    "TARGET_CHUNK_VOXELS",
    "check_iterations",
    "choose_blocks",
    "choose_chunks",
    "default_chunks",
    "default_depth",
    "fast_shape",
    "feature_blocks",
    "fused_chunks",
    "fused_level_chunks",
    "inner_chunks",
    "next_fast_size",
    "pyramid_factors",
    "segment_chunks",
    "stitch_chunks",
    "write_blocks",
]


# --------------------------------------------------------------------------- chunks


#: Voxels per chunk by default: 32 MiB as float32, big enough to amortise per-task
#: overhead and FFT halos, small enough for several per worker thread.
TARGET_CHUNK_VOXELS = 2**23


def default_chunks(
    volume_shape_zyx: Sequence[int],
    voxel_size_um: Sequence[float],
    *,
    tile_shape_zyx: Sequence[int] | None = None,
    target_voxels: int = TARGET_CHUNK_VOXELS,
    prefer_multiple_of: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """Chunk shape (z, y, x) with about the same physical extent along every axis.

    A chunk side that nearly divides the tile side is snapped to that divisor, so chunks
    rarely straddle tile borders (reads then touch one file per chunk). Among such
    divisors, multiples of ``prefer_multiple_of`` (per axis) win when there are any.

    Examples
    --------
    >>> default_chunks((500, 4000, 4000), (2.0, 1.0, 1.0), tile_shape_zyx=(500, 2000, 2000))
    (125, 250, 250)
    >>> default_chunks((500, 3600, 3600), (2.0, 1.0, 1.0), tile_shape_zyx=(500, 1800, 1800))
    (125, 225, 225)
    >>> default_chunks((500, 3600, 3600), (2.0, 1.0, 1.0), tile_shape_zyx=(500, 1800, 1800),
    ...                prefer_multiple_of=(1, 2, 2))
    (125, 300, 300)
    """
    side_um = (target_voxels * math.prod(voxel_size_um)) ** (1 / 3)
    step = (1, 1, 1) if prefer_multiple_of is None else tuple(int(m) for m in prefer_multiple_of)
    chunks = []
    for i, (n, v) in enumerate(zip(volume_shape_zyx, voxel_size_um, strict=True)):
        want = max(8, round(side_um / v))
        if tile_shape_zyx is not None:
            tile = int(tile_shape_zyx[i])
            divisors = [d for d in range(8, tile + 1) if tile % d == 0]
            near = [d for d in divisors if want / 1.5 <= d <= want * 1.5]
            near = [d for d in near if d % step[i] == 0] or near
            if near:
                want = min(near, key=lambda d: abs(math.log(d / want)))
        chunks.append(int(min(n, want)))
    return tuple(chunks)  # type: ignore[return-value]


def stitch_chunks(
    volume_shape_zyx: Sequence[int], voxel_size_um: Sequence[float], tile_shape_zyx: Sequence[int]
) -> tuple[int, int, int]:
    """The stitched volume's default chunks: tile-aligned, even where the pyramid halves.

    `default_chunks`, preferring sides that divide by the first step of `pyramid_factors`:
    the OME-Zarr writer then makes level 1 from each level-0 block while it is in memory
    instead of reading level 0 back (`lightsheet.io.omezarr.write_image`), and the stages
    after stitch inherit the chunks. Measured at 4 GB (530-voxel tiles, whose only near
    divisor is 265): the read-back pyramid took 11.1 s after a 7.2 s level 0, against 0.8 s
    after 2.0 s at 1 GB with 250-voxel chunks. Tile alignment is kept over evenness: even
    chunks straddling tile borders made that level 0 take 18.7 s.

    Examples
    --------
    >>> stitch_chunks((500, 3600, 3600), (2.0, 1.0, 1.0), (500, 1800, 1800))
    (125, 300, 300)
    >>> stitch_chunks((396, 1590, 1590), (2.0, 1.0, 1.0), (396, 530, 530))
    (132, 265, 265)
    """
    factors = pyramid_factors(volume_shape_zyx, voxel_size_um)
    return default_chunks(
        volume_shape_zyx,
        voxel_size_um,
        tile_shape_zyx=tile_shape_zyx,
        prefer_multiple_of=factors[0] if factors else None,
    )


def fused_chunks(
    shape_zyx: Sequence[int],
    voxel_size_um: Sequence[float],
    *,
    target_voxels: int = TARGET_CHUNK_VOXELS,
) -> tuple[int, int, int]:
    """Chunks of a fused volume: `default_chunks`, spread evenly, even where the pyramid halves.

    Tiles do not sit on a chunk grid once registered, so no tile alignment is sought;
    instead the number of chunks along each axis is the nearest to `default_chunks`'s and
    their side is the volume's divided by it (rounded up to the pyramid's step), so the
    last chunk is not mostly padding: a 1818-voxel side took 8 chunks of 256 (12 %
    padding, encoded and written like data) and now takes 7 of 260.

    Examples
    --------
    >>> fused_chunks((128, 513, 513), (2.0, 1.0, 1.0))
    (128, 258, 258)
    >>> fused_chunks((64, 1818, 1818), (2.0, 1.0, 1.0))
    (64, 260, 260)
    """
    factors = pyramid_factors(shape_zyx, voxel_size_um)
    step = factors[0] if factors else (1, 1, 1)
    chunks = default_chunks(
        shape_zyx, voxel_size_um, target_voxels=target_voxels, prefer_multiple_of=step
    )
    out = []
    for n, c, m in zip(shape_zyx, chunks, step, strict=True):
        k = max(1, round(n / c))
        side = -(-n // k)  # ceil
        out.append(int(min(n, -(-side // m) * m)))
    return tuple(out)  # type: ignore[return-value]


#: Voxels per block in segmentation (`segment_chunks`).
SEGMENT_CHUNK_VOXELS = 2**21


def segment_chunks(
    volume_shape_zyx: Sequence[int],
    voxel_size_um: Sequence[float],
    tile_shape_zyx: Sequence[int] | None = None,
    *,
    target_voxels: int = SEGMENT_CHUNK_VOXELS,
) -> tuple[int, int, int]:
    """Blocks (z, y, x) the segment stage cuts a stored image into: `default_chunks`, smaller.

    Smaller than the other stages' blocks: the watershed's per-block working set is large,
    and small blocks measured both faster and lighter (the cells are the same at any
    blocking). ``tile_shape_zyx`` is the stored image's chunk shape, which the blocks
    divide where they nearly can.

    Examples
    --------
    >>> segment_chunks((500, 4000, 4000), (2.0, 1.0, 1.0), (125, 250, 250))
    (81, 125, 125)
    """
    return default_chunks(
        volume_shape_zyx, voxel_size_um, tile_shape_zyx=tile_shape_zyx, target_voxels=target_voxels
    )


def inner_chunks(chunks: Sequence[int], *, parts: float = 3.0, smallest: int = 8) -> tuple:
    """Inner chunks of a shard: per axis the divisor of its side nearest to side / ``parts``.

    About ``parts``³ inner chunks per shard: a halo-padded region then decompresses little
    more than itself, while inner chunks stay large enough that Blosc compresses them as
    fast and as well as whole chunks (smaller ones cost up to 4x the CPU, measured on uint16
    tiles). Sides shorter than ``smallest`` or without a divisor near the target stay whole.

    Examples
    --------
    >>> inner_chunks((1, 1, 126, 252, 252))
    (1, 1, 42, 84, 84)
    >>> inner_chunks((1, 1, 125, 250, 250))
    (1, 1, 25, 125, 125)
    """
    out = []
    for side in (int(c) for c in chunks):
        want = side / parts
        divisors = [d for d in range(max(1, smallest), side + 1) if side % d == 0]
        out.append(min(divisors, key=lambda d: abs(math.log(d / want))) if divisors else side)
    return tuple(out)


# --------------------------------------------------------------------------- pyramid


def pyramid_factors(
    shape_zyx: Sequence[int], voxel_size_um: Sequence[float], *, min_size: int = 64
) -> list[tuple[int, int, int]]:
    """Downsampling factors (z, y, x) of each level relative to the one above.

    The finest axes are halved first, so anisotropic voxels become closer to isotropic
    before the coarse axis is reduced; levels stop when every axis is under ``min_size``.

    Examples
    --------
    >>> pyramid_factors((100, 400, 400), (2.0, 1.0, 1.0))
    [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    """
    shape = [int(s) for s in shape_zyx]
    size = [float(v) for v in voxel_size_um]
    factors = []
    while max(shape) > min_size:
        finest = min(size[i] for i in range(3) if shape[i] > 1)
        f = tuple(2 if shape[i] > 1 and size[i] <= finest * 1.5 else 1 for i in range(3))
        factors.append(f)
        shape = [-(-s // fi) for s, fi in zip(shape, f, strict=True)]
        size = [v * fi for v, fi in zip(size, f, strict=True)]
    return factors


def write_blocks(
    chunks: Sequence[int],
    shape: Sequence[int],
    itemsize: int,
    voxel_size_um: Sequence[float],
    *,
    target_bytes: int = 64 << 20,
    min_size: int = 64,
) -> tuple[int, ...]:
    """Dask blocks (z, y, x) for an image about to be written (`lightsheet.io.omezarr.write_image`).

    For a source that can produce larger blocks cheaply (the stitched tiles). Blocks hold
    whole chunks: two along each axis whose chunk side the first pyramid step does not
    halve, so that level 1 is still written from the blocks in memory (an odd chunk side
    otherwise meant reading level 0 back: 7.3 of the 16.9 s of the 4 GB sample's stitch),
    then stacked along z up to about ``target_bytes``, so that the writer overlaps each
    chunk's file write with the next chunk's encoding and the cluster runs a fraction of
    the tasks (the 4 GB sample's level 0 in 5.3 s instead of 6.3 s, medians of 6).

    Examples
    --------
    >>> write_blocks((132, 265, 265), (396, 1590, 1590), 2, (2.0, 1.0, 1.0))
    (132, 530, 530)
    >>> write_blocks((125, 250, 250), (500, 1000, 1000), 2, (2.0, 1.0, 1.0))
    (500, 250, 250)
    >>> write_blocks((64, 512, 512), (1000, 4000, 4000), 4, (2.0, 1.0, 1.0))
    (64, 512, 512)
    """
    factors = pyramid_factors(shape, voxel_size_um, min_size=min_size)  # as write_image's
    step = factors[0] if factors else (1,) * len(chunks)
    block = [int(c) * (f if c % f else 1) for c, f in zip(chunks, step, strict=True)]
    k = max(1, target_bytes // max(1, math.prod(block) * itemsize))
    block[0] *= k
    return tuple(min(b, max(int(c), int(n))) for b, c, n in zip(block, chunks, shape, strict=True))


#: Levels below level 1 are written from the blocks in memory only while their chunks (which
#: halve with every level) hold at least this many voxels: tiny files cost more than the
#: re-read of a level that small.
FUSED_MIN_CHUNK_VOXELS = 1 << 17


def _next_level_chunks(
    blocks: tuple[tuple[int, ...], ...], chunks: tuple[int, ...], factor: tuple[int, ...]
) -> tuple[int, ...] | None:
    """The next level's chunks when every block can write whole chunks of it, else None.

    Per axis: the chunk / factor where the factor divides it; otherwise the chunk itself,
    when every block but the last spans a multiple of factor x chunk (the last one ends at
    the image's edge, where windows are padded as in a re-read).
    """
    out = []
    for b, c, f in zip(blocks, chunks, factor, strict=True):
        if c % f == 0:
            out.append(c // f)
        elif all(n % (f * c) == 0 for n in b[:-1]):
            out.append(c)
        else:
            return None
    return tuple(out)


def fused_level_chunks(
    blocks: tuple[tuple[int, ...], ...],
    chunks: Sequence[int],
    factors: Sequence[Sequence[int]],
    *,
    min_chunk_voxels: int = FUSED_MIN_CHUNK_VOXELS,
) -> list[tuple[int, ...]]:
    """Chunks of the pyramid levels written from level 0's blocks while they are in memory.

    Level ``k`` (factor ``factors[k - 1]`` relative to the level above) is written from the
    blocks, downsampled, while every downsampled block covers whole chunks of it, and, below
    level 1, while those chunks hold at least ``min_chunk_voxels`` voxels (tiny files cost
    more than re-reading a level that small); the remaining levels are read back.

    Parameters
    ----------
    blocks : tuple of tuples
        Level 0's dask chunks.
    chunks : ints
        Level 0's zarr chunks (or shards).
    factors : sequence of ints
        Each level's downsampling factor, as many axes as ``chunks``.
    min_chunk_voxels : int
        Smallest chunk of a level below 1 written from memory.

    Returns
    -------
    list of tuples
        The zarr chunks of levels 1, 2, ... written from memory (possibly none).

    Examples
    --------
    >>> fused_level_chunks(((64, 64), (512, 488)), (64, 512), [(1, 2), (2, 2)])
    [(64, 256)]
    >>> fused_level_chunks(((64, 64), (512, 488)), (64, 512), [(1, 2), (2, 2)],
    ...                    min_chunk_voxels=1)
    [(64, 256), (32, 128)]
    >>> fused_level_chunks(((30, 30), (30,)), (15, 15), [(2, 2), (2, 2)])  # odd: pairs once
    [(15, 15)]
    """
    out: list[tuple[int, ...]] = []
    grid = tuple(int(c) for c in chunks)
    for k, factor in enumerate(factors, start=1):
        grid = _next_level_chunks(blocks, grid, tuple(factor))
        if grid is None or (k > 1 and math.prod(grid) < min_chunk_voxels):
            break
        out.append(grid)
        blocks = tuple(
            tuple(-(-b // f) for b in axis) for axis, f in zip(blocks, factor, strict=True)
        )
    return out


#: Bytes of features one block may produce (all F features of its voxels).
FEATURE_BLOCK_BYTES = 64 << 20


def feature_blocks(
    chunks_zyx: tuple[int, int, int],
    shape_zyx: tuple[int, int, int],
    bytes_per_voxel: int,
    voxel_size_um: tuple[float, float, float],
    *,
    target_bytes: int = FEATURE_BLOCK_BYTES,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The features' zarr chunks and dask blocks, (z, y, x) each.

    Chunks are the image's, thinned along z until a block's F features fit
    ``target_bytes`` (twice that where odd z chunks are paired too). Blocks are
    `write_blocks` of those chunks: two chunks along each axis whose side the first pyramid
    step does not halve, so that the features' level 1 is written from each block in memory
    instead of re-reading every feature of level 0.

    Examples
    --------
    >>> feature_blocks((66, 265, 265), (396, 1590, 1590), 16, (2.0, 1.0, 1.0))
    ((14, 265, 265), (14, 530, 530))
    >>> feature_blocks((62, 250, 250), (250, 1000, 1000), 16, (2.0, 1.0, 1.0))
    ((62, 250, 250), (62, 250, 250))
    """
    pairs = write_blocks(chunks_zyx, shape_zyx, bytes_per_voxel, voxel_size_um, target_bytes=0)
    z = max(1, target_bytes // max(1, math.prod(pairs[1:]) * bytes_per_voxel))
    chunks = (min(z, chunks_zyx[0]), *chunks_zyx[1:])
    blocks = write_blocks(
        chunks, shape_zyx, bytes_per_voxel, voxel_size_um, target_bytes=target_bytes
    )
    return chunks, blocks


# --------------------------------------------------------------------------- deconvolution


#: Largest halo-padded float32 block `deconvolve` builds from stored chunks (`choose_blocks`).
BLOCK_BYTES = 128 << 20


#: Extra halo depth in PSF half-sizes per square root of the iterations (`default_depth`).
DEPTH_PER_HALF = 0.5


@lru_cache(maxsize=4096)
def next_fast_size(n: int) -> int:
    """Smallest 2·3·5-smooth integer ``>= n``: fast for pocketfft, cuFFT and FFTW alike.

    Examples
    --------
    >>> [next_fast_size(n) for n in (1, 7, 97, 513)]
    [1, 8, 100, 540]
    """
    m = max(1, int(n))
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def fast_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Round every axis up to `next_fast_size`."""
    return tuple(next_fast_size(int(s)) for s in shape)


def default_depth(
    psf_shape: Sequence[int], iterations: int = 10, *, per_half: float = DEPTH_PER_HALF
) -> tuple[int, int, int]:
    """Halo depth ``(z, y, x)`` that makes chunked deconvolution match the whole volume.

    Fourier-space RL treats a block as periodic, and each iteration lets data up to two
    PSF half-sizes away influence a voxel (a blur, then a correlation), so after ``k``
    iterations the kept interior depends on data ``2k`` half-sizes away; the influence
    falls off like a random walk, its width growing as ``√k``. A halo of
    ``min(2k, 1 + 0.5·√k)`` PSF half-sizes kept the interior within 1e-3 of a
    whole-volume run (relative to its maximum) for Gaussian PSFs and 1–80 iterations on
    noisy blob phantoms; one half-size leaves errors of a few percent.

    Parameters
    ----------
    psf_shape : (3,) sequence of int
        PSF shape (odd sizes).
    iterations : int
        Richardson–Lucy iterations.

    Returns
    -------
    depth : tuple of 3 int

    Examples
    --------
    >>> default_depth((15, 7, 7), iterations=10)
    (19, 8, 8)
    """
    k = check_iterations(iterations)
    factor = min(2.0 * k, 1.0 + per_half * math.sqrt(k))
    return tuple(max(1, math.ceil(factor * (int(s) // 2))) for s in psf_shape)  # type: ignore[return-value]


def choose_chunks(
    shape_zyx: Sequence[int],
    psf_shape: Sequence[int],
    *,
    itemsize: int = 4,
    target_bytes: int = 128 << 20,
    depth: Sequence[int] | None = None,
    iterations: int = 10,
) -> tuple[int, int, int]:
    """Compute chunk shape ``(z, y, x)`` whose halo-padded blocks have fast FFT sizes.

    The padded block (chunk + 2·depth per axis) is kept near ``target_bytes`` with its
    sides proportional to the halo depths (the proportions that waste the least work on
    halos), then each side is set to the 2·3·5-smooth FFT size that minimises the total
    FFT work along that axis, the short last chunk included.

    Parameters
    ----------
    shape_zyx : (3,) sequence of int
        Volume shape.
    psf_shape : (3,) sequence of int
        PSF shape; sets the halo depth when ``depth`` is None (`default_depth`).
    itemsize : int
        Bytes per voxel of the working precision (4 for float32).
    target_bytes : int
        Approximate size of one padded block in bytes; the kernel's working set is about
        six times this.
    depth : (3,) sequence of int, optional
        Halo depth per side; default `default_depth` of ``psf_shape`` and ``iterations``.
    iterations : int
        Richardson–Lucy iterations (sets the default depth).

    Returns
    -------
    chunks : tuple of 3 int

    Examples
    --------
    >>> chunks = choose_chunks((512, 2048, 2048), (31, 31, 31), iterations=10)
    >>> chunks, default_depth((31, 31, 31), iterations=10)
    ((242, 242, 242), (39, 39, 39))
    >>> [c + 2 * 39 for c in chunks]  # blocks with halos: 320 = 2**6 * 5, a fast FFT size
    [320, 320, 320]
    """
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape_zyx must be three positive ints (z, y, x); got {shape_zyx!r}")
    d = tuple(
        int(v) for v in (depth if depth is not None else default_depth(psf_shape, iterations))
    )
    if len(d) != 3 or min(d) < 0:
        raise ValueError(f"depth must be three non-negative ints (z, y, x); got {depth!r}")
    if target_bytes < itemsize:
        raise ValueError(f"target_bytes must be at least itemsize={itemsize}; got {target_bytes}")
    budget = target_bytes / itemsize
    # ideal padded sides are proportional to the halos, capped by the padded volume
    weight = [max(1, 2 * di) for di in d]
    cap = [s + 2 * di for s, di in zip(shape, d, strict=True)]
    free = [0, 1, 2]
    side = [0.0, 0.0, 0.0]
    while free:
        fixed = math.prod(side[i] for i in range(3) if i not in free)
        scale = (budget / fixed / math.prod(weight[i] for i in free)) ** (1.0 / len(free))
        capped = [i for i in free if weight[i] * scale >= cap[i]]
        if not capped:
            for i in free:
                side[i] = weight[i] * scale
            break
        for i in capped:
            side[i] = float(cap[i])
            free.remove(i)
    return tuple(_best_chunk(s, di, b) for s, di, b in zip(shape, d, side, strict=True))  # type: ignore[return-value]


def _best_chunk(size: int, depth: int, padded_target: float) -> int:
    """Chunk along one axis minimising the summed FFT lengths of its padded blocks."""
    if size + 2 * depth <= padded_target:
        return size
    lo = 2 * depth + max(1, depth)
    hi = max(lo, int(padded_target))
    best: tuple[float, int] | None = None
    for n in sorted({next_fast_size(v) for v in range(lo, hi + 1)}):
        if n > hi and best is not None:
            break
        chunk = n - 2 * depth
        work = _axis_fft_work(size, chunk, depth)
        key = (work / size, -chunk)
        if best is None or key < (best[0], -best[1]):
            best = (work / size, chunk)
    assert best is not None
    return best[1]


def _axis_fft_work(size: int, block: int, depth: int) -> int:
    """Summed FFT lengths along one axis of ``size`` cut into ``block``-long padded blocks."""
    full, rest = divmod(size, block)
    return full * next_fast_size(block + 2 * depth) + (
        next_fast_size(rest + 2 * depth) if rest else 0
    )


def check_iterations(iterations: Any) -> int:
    """``iterations`` as an int, or a `ConfigError` unless it is an integer >= 1."""
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
        raise ConfigError(f"iterations must be an integer >= 1; got {iterations!r}")
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1; got {iterations}")
    return int(iterations)


def choose_blocks(
    shape_zyx: Sequence[int],
    chunks_zyx: Sequence[int],
    depth: Sequence[int],
    *,
    itemsize: int = 4,
    target_bytes: int = BLOCK_BYTES,
) -> tuple[int, int, int]:
    """Blocks of whole stored chunks that waste the least FFT work on halos.

    Every candidate block is ``k`` stored chunks per axis (so each output chunk is written
    by exactly one block); its halo-padded size, rounded up to fast FFT sizes, must hold at
    most ``target_bytes``. The candidate with the fewest padded FFT voxels per output voxel
    over the whole volume (the short last blocks included) wins; near ties go to the
    smaller block.

    Examples
    --------
    >>> choose_blocks((250, 1000, 1000), (125, 250, 250), (13, 8, 8))
    (250, 250, 250)
    """
    shape = tuple(int(s) for s in shape_zyx)
    chunk = tuple(min(int(c), s) for c, s in zip(chunks_zyx, shape, strict=True))
    d = tuple(int(v) for v in depth)
    budget = max(1, target_bytes // itemsize)

    options = []
    for n, c, di in zip(shape, chunk, d, strict=True):
        sizes = [min(k * c, n) for k in range(1, -(-n // c) + 1)]
        options.append([(b, _axis_fft_work(n, b, di) / n) for b in sizes])
    best: tuple[float, int, tuple[int, int, int]] | None = None
    for (bz, wz), (by, wy), (bx, wx) in itertools.product(*options):
        padded = math.prod(
            next_fast_size(b + 2 * di) for b, di in zip((bz, by, bx), d, strict=True)
        )
        if padded > budget and best is not None:
            continue
        work = wz * wy * wx
        key = (work, padded, (bz, by, bx))
        if best is None or work < best[0] * 0.99 or (work <= best[0] * 1.01 and padded < best[1]):
            best = key
    assert best is not None
    return best[2]
