"""OME-Zarr (NGFF 0.5, zarr v3) writing and reading: the one place images touch disk.

Every image the pipeline writes is a 5-D ``t, c, z, y, x`` multiscale image:

* level ``s0`` has zarr chunks that every dask block covers whole (two blocks writing one
  chunk in parallel would corrupt it), compressed with Blosc zstd + bitshuffle (the lower
  levels with lz4: `compressor`); images the next stage reads in halo-padded regions are
  sharded into smaller inner chunks;
* lower levels halve the finest spatial axes until the smallest is under ``min_size``,
  so napari opens a whole brain at once. The first levels are computed from each level-0
  block while it is in memory, for as long as every downsampled block covers whole chunks
  of the next level (chunks divided by the factor, or odd chunks in blocks of two), deeper
  ones from the *stored* level above (re-read chunk by chunk); never by re-running the
  stage's computation;
* ``coordinateTransformations`` carry the voxel size in µm;
* the write happens in a hidden sibling folder that is renamed into place only when
  every level and the metadata are written, so an interrupted stage never leaves an
  output that looks complete.

Labels are written the same way with NGFF ``image-label`` metadata and nearest-neighbour
downsampling.

Every image also holds a manifest, the attributes of its ``lightsheet`` sub-group (a zarr
group, so zarr and NGFF tools list it without complaint): each file written (path and size)
and the digest of every full-resolution chunk (`write_manifest`). Reuse checks
that every file is there with its size (`check_image`: a stat per file, no data read);
`verify_image` re-reads and re-hashes every chunk. Readers of such an image
(`read_image`, `stored_volume`) fail on a missing chunk (`OutputDamagedError`) instead of
reading zarr's fill value.

This module writes; the manifest and its checks are `lightsheet.io.manifest`, the readers
`lightsheet.io.reader` (both importable from here too).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from lightsheet.blocks import (
    FUSED_MIN_CHUNK_VOXELS,
    fused_level_chunks,
    inner_chunks,
    pyramid_factors,
    write_blocks,
)
from lightsheet.io.atomic import atomic_path
from lightsheet.io.direct import io_pool, write_new_file
from lightsheet.io.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MAX_PROBLEMS,
    CompleteStore,
    _write_grid,
    check_image,
    read_manifest,
    verify_image,
    write_manifest,
)
from lightsheet.io.reader import StoredVolume, read_image, stored_volume
from lightsheet.lineage import ATTRS_KEY, chunk_digest, combine_digests, finish_record

__all__ = [
    "AXES",
    "DOWNSAMPLE_SLAB_BYTES",
    "FUSED_MIN_CHUNK_VOXELS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MAX_PROBLEMS",
    "CompleteStore",
    "StoredVolume",
    "check_image",
    "compressor",
    "inner_chunks",
    "pyramid_factors",
    "read_image",
    "read_manifest",
    "store_chunks",
    "stored_volume",
    "verify_image",
    "write_blocks",
    "write_image",
    "write_manifest",
]

AXES = [
    {"name": "t", "type": "time", "unit": "second"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


def compressor(level: int = 0) -> BloscCodec:
    """The codec of pyramid level ``level``: Blosc with bitshuffle, zstd at full resolution.

    Zstd is a good default for uint16 microscopy and float data. The lower levels use lz4:
    they exist to be browsed, and averaged voxels encode slowly with zstd (the sample's level
    1 at 460 MB/s per core with zstd-3, 1450 MB/s with lz4, against 940 MB/s for level 0),
    for 7 % more bytes in levels that hold a quarter of level 0's voxels at most.
    """
    if level:
        return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _downsample(
    level: da.Array, factor: tuple[int, int, int], *, labels: bool, **kwargs: Any
) -> da.Array:
    """One pyramid step on a (T, C, Z, Y, X) array: block mean, or nearest for labels.

    Blocks must hold whole windows of ``factor`` voxels (the last ones excepted, which are
    padded by edge replication, as if the volume were); each gives one output block.
    Keyword arguments go to `_downsample_block`.
    """
    f = (1, 1, *factor)
    chunks = tuple(tuple(-(-b // fi) for b in c) for c, fi in zip(level.chunks, f, strict=True))
    return level.map_blocks(
        _downsample_block,
        factor=f,
        labels=labels,
        chunks=chunks,
        dtype=level.dtype,
        **kwargs,
        meta=np.empty((0,) * level.ndim, level.dtype),
    )


#: Input bytes reduced at once by `_downsample_block` (a few L2 caches' worth).
DOWNSAMPLE_SLAB_BYTES = 2 << 20


def _downsample_block(
    block: np.ndarray,
    *,
    factor: tuple[int, ...],
    labels: bool,
    slab_bytes: int = DOWNSAMPLE_SLAB_BYTES,
) -> np.ndarray:
    """Mean of each window of ``factor`` voxels, or its first voxel for labels.

    Integers are rounded half to even, as the float mean would be. A (T, C, Z, Y, X) block
    is reduced in z-slabs of about ``slab_bytes`` into one output array, so the
    temporaries stay in cache and are reused: on 31 MB uint16 blocks, 4x faster than
    summing the whole block at once (fresh memory for every temporary).
    """
    if labels:
        return np.ascontiguousarray(block[tuple(slice(None, None, fi) for fi in factor)])
    if block.ndim != 5 or block.shape[2] <= factor[2]:
        return _window_mean(block, factor)
    fz = factor[2]
    out = np.empty(tuple(-(-n // f) for n, f in zip(block.shape, factor, strict=True)), block.dtype)
    plane = math.prod(block.shape[:2] + block.shape[3:]) * block.dtype.itemsize
    step = max(1, slab_bytes // (plane * fz))  # output planes per slab
    for o in range(0, out.shape[2], step):
        out[:, :, o : o + step] = _window_mean(block[:, :, o * fz : (o + step) * fz], factor)
    return out


def _window_mean(block: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """Mean of each window of ``factor`` voxels (last windows padded by edge replication).

    Windows are summed one axis at a time, the outer axes first (whole contiguous rows), in
    32-bit integers for small integer types: about 5x faster than reshaping and reducing.
    """
    pad = [(0, (-n) % fi) for n, fi in zip(block.shape, factor, strict=True)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    small = block.dtype.kind in "ui" and block.dtype.itemsize <= 2
    acc = np.dtype(np.int32 if small else np.float64 if block.dtype.itemsize > 4 else np.float32)
    total = block.astype(acc) if all(fi == 1 for fi in factor) else block
    for axis, fi in enumerate(factor):
        if fi == 1:
            continue
        parts = [total[(slice(None),) * axis + (slice(o, None, fi),)] for o in range(fi)]
        summed = parts[0].astype(acc)
        for part in parts[1:]:
            summed += part
        total = summed
    n = math.prod(factor)
    if small:
        # exact: sums of up to 16-bit values fit; this is round(total / n), half to even
        k = n.bit_length() - 1
        if n == 1 << k and k:  # n = 2**k: add n/2 - 1, plus 1 when the quotient is odd
            total += (n >> 1) - 1 + ((total >> k) & 1)
            total >>= k
        else:
            q, r = np.divmod(total, n)
            total = q + ((2 * r > n) | ((2 * r == n) & (q % 2 == 1)))
        return total.astype(block.dtype)
    total = total.astype(acc, copy=False) * acc.type(1.0 / n)
    if block.dtype.kind == "f":
        return total.astype(block.dtype, copy=False)
    return np.round(total).astype(block.dtype)


def store_chunks(
    array: da.Array,
    target: zarr.Array,
    *,
    then: Sequence[tuple[zarr.Array, tuple[int, ...]]] = (),
    labels: bool = False,
) -> da.Array:
    """Lazily write each block of ``array`` into ``target``; one digest per zarr chunk.

    Every block must cover whole chunks (shards, when sharded) of ``target`` (the short
    last ones at the edges excepted), so no two blocks write the same chunk. Computing the
    returned array performs the writes; its elements, one per chunk of ``target`` in
    chunk-grid order, are the digests of the chunks' bytes
    (`lightsheet.lineage.chunk_digest`), hashed by the worker that writes them, so the
    output's fingerprint costs no extra read and does not depend on how the blocks were
    cut; a scheduler's per-key futures double as a progress count.

    ``then = [(level_1, factor_1), (level_2, factor_2), ...]`` also writes each block
    downsampled by ``factor_1`` (`_downsample_block`, nearest for ``labels``) into
    ``level_1``, that result downsampled by ``factor_2`` into ``level_2``, and so on; every
    downsampled block must cover whole chunks of its level
    (`lightsheet.blocks.fused_level_chunks`): those pyramid levels come from the block in
    memory, not from re-reading the level above.
    """
    grid = _write_grid(target)
    for axis, (blocks, step) in enumerate(zip(array.chunks, grid, strict=True)):
        if any(b % step for b in blocks[:-1]):
            raise ValueError(
                f"store_chunks: blocks {blocks} along axis {axis} are not whole zarr chunks "
                f"of {step}"
            )

    def write(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        start = tuple(a for a, _ in block_info[0]["array-location"])
        # level 1 is reduced and encoded while level 0's files are being written
        with _writes_done() as pending:
            digests = _write_whole_chunks(target, block, start, pending, digest=True)
            for nxt, factor in then:
                block = _downsample_block(block, factor=factor, labels=labels)
                start = tuple(a // f for a, f in zip(start, factor, strict=True))
                _write_whole_chunks(nxt, block, start, pending)
        return digests

    return array.map_blocks(
        write,
        dtype=np.int64,
        chunks=tuple(
            tuple(-(-b // g) for b in blocks) for blocks, g in zip(array.chunks, grid, strict=True)
        ),
        meta=np.empty((0,) * array.ndim, np.int64),
    )


@contextlib.contextmanager
def _writes_done() -> Iterator[list[futures.Future]]:
    """A list for file-write futures, all of them finished when the block exits.

    No write outlives the block, also when it fails; then the first failed write raises.
    """
    pending: list[futures.Future] = []
    try:
        yield pending
    finally:
        futures.wait(pending)
    for done in pending:
        done.result()


def _write_whole_chunks(
    target: zarr.Array,
    block: np.ndarray,
    start: tuple[int, ...],
    pending: list[futures.Future],
    *,
    digest: bool = False,
) -> np.ndarray | None:
    """Write ``block`` (whole chunks of ``target``) at ``start``; its chunks' digests.

    With the direct chunk writer, each chunk's file is written by the I/O threads
    (`lightsheet.io.direct.io_pool`) while this thread hashes and encodes the next chunk;
    the writes' futures go to ``pending`` (`_writes_done`).
    """
    grid = _write_grid(target)
    direct = _chunk_writer(target)
    if direct is None:
        target[tuple(slice(a, a + n) for a, n in zip(start, block.shape, strict=True))] = block
    first = tuple(a // g for a, g in zip(start, grid, strict=True))
    counts = tuple(-(-n // g) for n, g in zip(block.shape, grid, strict=True))
    digests = np.empty(counts, dtype=np.int64) if digest else None
    if direct is None and not digest:
        return None
    for idx in np.ndindex(*counts):
        part = block[tuple(slice(i * g, (i + 1) * g) for i, g in zip(idx, grid, strict=True))]
        part = np.ascontiguousarray(part)  # once, for both the digest and the encoder
        if digest:
            digests[idx] = chunk_digest(part)
        if direct is not None:
            pending.append(direct(tuple(f + i for f, i in zip(first, idx, strict=True)), part))
    return digests


def _chunk_writer(target: zarr.Array) -> Callable[[tuple, np.ndarray], futures.Future] | None:
    """``write(chunk_coords, data)`` storing one whole chunk's encoded bytes, or None.

    ``write`` encodes in the calling thread and returns the future of the file write,
    which runs in `lightsheet.io.direct.io_pool`.

    For the arrays this writer makes (local store, no sharding, bytes + Blosc codecs) each
    chunk is encoded with the array's own Blosc settings and written to its key: the bytes
    zarr would write, without zarr's chunk-buffer fill and copy (about 20 ms of CPU per
    16 MiB chunk, a third of the stitch stage's writing, zarr 3.1), and past the page cache
    where the file system allows (`lightsheet.io.direct`). Anything else (sharded arrays,
    other codecs or stores) returns None, and the caller goes through zarr.
    """
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    codecs = target.metadata.codecs if target.metadata.zarr_format == 3 else ()
    if (
        target.shards is not None
        or not isinstance(target.store, LocalStore)
        or len(codecs) != 2
        or not isinstance(codecs[0], BytesCodec)
        or not isinstance(codecs[1], BloscCodec)
        or (target.dtype.itemsize > 1 and codecs[0].endian.value != "little")
    ):
        return None
    import numcodecs

    b = codecs[1]
    blosc = numcodecs.Blosc(
        cname=b.cname.value,
        clevel=b.clevel,
        shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[b.shuffle.value],
        blocksize=b.blocksize,
        typesize=b.typesize,
    )
    root = Path(target.store.root) / target.path
    shape = tuple(int(c) for c in target.chunks)
    dtype = np.dtype(target.dtype).newbyteorder("<")
    fill = target.fill_value

    def write(coords: tuple, data: np.ndarray) -> None:
        if data.shape != shape:  # edge chunks are stored whole, padded with the fill value
            full = np.full(shape, fill, dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        path = root / target.metadata.encode_chunk_key(coords)
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = blosc.encode(np.ascontiguousarray(data, dtype=dtype).view(np.uint8))
        return io_pool().submit(write_new_file, path, encoded)

    return write


def _default_compute(written: da.Array, level: int) -> np.ndarray:
    return written.compute()


def _level0_chunks(array: da.Array, chunks: Sequence[int] | None) -> tuple[da.Array, tuple]:
    """Level 0's zarr chunks, and ``array`` rechunked unless its blocks cover whole chunks.

    Every block but the last along each axis must be a multiple of the zarr chunk.
    """
    if chunks is None:
        regular = all(len(set(c[:-1])) <= 1 and c[-1] <= c[0] for c in array.chunks)
        if not regular:
            array = array.rechunk(array.chunksize)
        zchunks = array.chunksize
    else:
        zchunks = (*array.chunksize[:2], *(int(c) for c in chunks))
        whole = all(
            all(b % z == 0 for b in blocks[:-1])
            for blocks, z in zip(array.chunks, zchunks, strict=True)
        )
        if not whole:
            array = array.rechunk(zchunks)
    zchunks = tuple(max(1, min(c, s)) for c, s in zip(zchunks, array.shape, strict=True))
    return array, zchunks


def write_image(
    image: da.Array,
    path: str | Path,
    *,
    voxel_size_um: Sequence[float],
    name: str | None = None,
    labels: bool = False,
    channel_names: Sequence[str] | None = None,
    lineage: Mapping[str, Any] | None = None,
    min_size: int = 64,
    compute: Callable[[da.Array, int], object] = _default_compute,
    chunks: Sequence[int] | None = None,
    sharded: bool = False,
    fused_min_chunk_voxels: int = FUSED_MIN_CHUNK_VOXELS,
) -> str:
    """Write a (T, C, Z, Y, X) dask array as a multiscale OME-Zarr image (or label image).

    Parameters
    ----------
    image : (T, C, Z, Y, X) dask.array.Array
        The data; its chunks become the zarr chunks of the full-resolution level unless
        ``chunks`` is given.
    path : path-like
        Output folder, conventionally ``<stage>.ome.zarr``; replaced atomically.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm of the full-resolution level.
    name : str, optional
        The multiscale's name.
    labels : bool
        Integer instance labels: nearest-neighbour pyramid and ``image-label`` metadata.
    channel_names : sequence of str, optional
        Recorded as ``omero`` channel labels (images only).
    lineage : mapping, optional
        Lineage record (`lightsheet.lineage.make_record`); stored under the ``lightsheet``
        attribute with the end time and the output fingerprint added.
    min_size : int
        Stop the pyramid when every spatial axis is at most this many voxels.
    compute : callable
        ``compute(writes, level)`` runs the lazy per-chunk writes of one pyramid level (see
        `store_chunks`); tasks pass one that reports progress. Level 0 carries the stage's
        computation (and writes the next levels too, as long as every downsampled block
        covers whole chunks of them: `lightsheet.blocks.fused_level_chunks`); deeper levels
        only re-read the stored level above.
    chunks : (3,) ints, optional
        Zarr chunk shape (z, y, x) of the full-resolution level, when the dask blocks are
        larger: each block then writes the whole chunks it covers (blocks that do not cover
        whole chunks are rechunked first). Each level's chunks are the level above's divided
        by its downsampling factor where it divides them, else the same
        (`lightsheet.blocks.fused_level_chunks`); levels re-read from the level above keep
        its chunks.
        `write_blocks` gives blocks that write level 1 (at least) along with level 0.
    sharded : bool
        Store each chunk as a zarr v3 shard of smaller inner chunks (`inner_chunks`), for
        images the next stage reads in halo-padded regions: a region then decompresses
        only the inner chunks it touches, not every whole chunk (a segment block with its
        halo read 6x faster). Fingerprints, chunk grid and readers are unchanged.
    fused_min_chunk_voxels : int
        Levels below 1 are written from level 0's blocks in memory only while their chunks
        hold at least this many voxels (`lightsheet.blocks.fused_level_chunks`).

    Returns
    -------
    fingerprint : str
        Hash of the full-resolution chunks (`lightsheet.lineage.combine_digests`).

    Notes
    -----
    The computation runs on the current Dask scheduler (the flow's cluster inside a task).
    """
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    if image.ndim != 5:
        raise ValueError(f"write_image: expected a (T, C, Z, Y, X) array; got shape {image.shape}")
    path = Path(path)
    vz, vy, vx = (float(v) for v in voxel_size_um)
    image, zchunks = _level0_chunks(image, chunks)
    factors = pyramid_factors(image.shape[2:], (vz, vy, vx), min_size=min_size)
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        datasets = []
        scale = [1.0, 1.0, vz, vy, vx]
        level = image
        made: dict[int, zarr.Array] = {}  # levels written along with the level above

        def create(i: int, shape: tuple, dtype: Any, zchunks: tuple) -> zarr.Array:
            layout = (
                {"chunks": inner_chunks(zchunks), "shards": zchunks}
                if sharded
                else {"chunks": zchunks}
            )
            return root.create_array(
                f"s{i}",
                shape=shape,
                dtype=dtype,
                **layout,
                compressors=[compressor(i)],
                dimension_names=[a["name"] for a in AXES],
                fill_value=0,
                # store every chunk: zarr's check for chunks equal to the fill value costs
                # more CPU than compressing them (measured 50 vs 30 ms per 16 MiB uint16
                # chunk, zarr 3.1), and an all-zero chunk compresses to a few bytes anyway
                config={"write_empty_chunks": True},
            )

        for i in range(len(factors) + 1):
            if i in made:
                arr = made[i]
                zchunks = _write_grid(arr)
            else:
                if i:
                    zchunks = tuple(
                        max(1, min(c, s)) for c, s in zip(zchunks, level.shape, strict=True)
                    )
                    level = level.rechunk(zchunks)
                arr = create(i, level.shape, level.dtype, zchunks)
                then = []
                if i == 0:
                    # the next levels from each block while it is in memory, as long as
                    # every (downsampled) block writes whole chunks of them
                    down = level
                    steps = [(1, 1, *factor) for factor in factors]
                    grids = fused_level_chunks(
                        level.chunks, zchunks, steps, min_chunk_voxels=fused_min_chunk_voxels
                    )
                    fused = zip(factors, steps, grids, strict=False)  # grids: the first levels
                    for k, (factor, f, grid) in enumerate(fused, start=1):
                        # lazy, never computed: the downsampled blocks' shapes
                        down = _downsample(down, factor, labels=labels)
                        made[k] = create(k, down.shape, down.dtype, grid)
                        then.append((made[k], f))
                digests = compute(store_chunks(level, arr, then=then, labels=labels), i)
                if i == 0:
                    level0_digests = np.asarray(digests, dtype=np.int64)
                    fingerprint = combine_digests(level0_digests.ravel())
            datasets.append(
                {
                    "path": f"s{i}",
                    "coordinateTransformations": [{"type": "scale", "scale": list(scale)}],
                }
            )
            if i < len(factors):
                f = factors[i]
                scale = scale[:2] + [s * fi for s, fi in zip(scale[2:], f, strict=True)]
                if i + 1 in made:
                    continue
                # read blocks of factor × chunk voxels: each downsampled block is then exactly
                # one chunk of the next level, with no rechunk in between (one that merged the
                # coarsened pieces made the pyramid's peak memory grow with the image: 0.7 GiB
                # at 1 GB, 1.9 GiB at 4 GB; this way it is the same at both)
                read = tuple(c * fi for c, fi in zip(zchunks, (1, 1, *f), strict=True))
                level = _downsample(da.from_zarr(arr, chunks=read), f, labels=labels)
        fmt = FormatV05()
        write_multiscales_metadata(
            root, datasets=datasets, fmt=fmt, axes=AXES, name=name or path.stem
        )
        if labels:
            # NGFF image-label metadata marks this multiscale as a label image
            root.attrs.update({"ome": {**root.attrs["ome"], "image-label": {}}})
        elif channel_names is not None:
            root.attrs.update(
                {
                    "ome": {
                        **root.attrs["ome"],
                        "omero": {
                            "channels": [{"label": str(n), "active": True} for n in channel_names]
                        },
                    }
                }
            )
        if lineage is not None:
            root.attrs[ATTRS_KEY] = finish_record(dict(lineage), fingerprint)
        write_manifest(tmp, level0_digests)
    return fingerprint
