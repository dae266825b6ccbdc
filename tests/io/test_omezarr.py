"""The OME-Zarr writer and reader, and region reads of stored volumes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr_models import open_ome_zarr

from lightsheet.io.omezarr import read_image, stored_volume, write_image

pytestmark = pytest.mark.usefixtures("two_dask_threads")


def test_blocks_of_several_chunks_store_the_same_chunks(tmp_path, uint16_volume):
    one = write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 8, 16, 16)),
        tmp_path / "a.ome.zarr",
        voxel_size_um=(2, 1, 1),
    )
    # blocks of 2 x 3 x 1 zarr chunks (and short last blocks) write the same chunks
    many = write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 16, 48, 16)),
        tmp_path / "b.ome.zarr",
        voxel_size_um=(2, 1, 1),
        chunks=(8, 16, 16),
    )
    assert one == many  # the fingerprint is per zarr chunk, whatever the blocks
    for name in ("a", "b"):
        root = zarr.open_group(str(tmp_path / f"{name}.ome.zarr"), mode="r")
        assert root["s0"].chunks == (1, 1, 8, 16, 16)
        open_ome_zarr(root)  # valid NGFF
        image, voxel, _ = read_image(tmp_path / f"{name}.ome.zarr")
        np.testing.assert_array_equal(image.compute(), uint16_volume)
        assert voxel == (2.0, 1.0, 1.0)
    a1, _, _ = read_image(tmp_path / "a.ome.zarr", level=1)
    b1, _, _ = read_image(tmp_path / "b.ome.zarr", level=1)
    np.testing.assert_array_equal(a1.compute(), b1.compute())


def test_blocks_that_split_chunks_are_rechunked(tmp_path, uint16_volume):
    fp = write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 12, 20, 45)),
        tmp_path / "c.ome.zarr",
        voxel_size_um=(1, 1, 1),
        chunks=(8, 16, 16),
    )
    ref = write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 8, 16, 16)),
        tmp_path / "d.ome.zarr",
        voxel_size_um=(1, 1, 1),
    )
    assert fp == ref


def test_sharded_image_holds_the_same_data(tmp_path, uint16_volume):
    plain = write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 12, 30, 45)),
        tmp_path / "p.ome.zarr",
        voxel_size_um=(1, 1, 1),
    )
    sharded = write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 12, 30, 45)),
        tmp_path / "s.ome.zarr",
        voxel_size_um=(1, 1, 1),
        sharded=True,
    )
    assert plain == sharded
    root = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="r")
    assert root["s0"].shards == (1, 1, 12, 30, 45)
    assert root["s0"].chunks == (1, 1, 12, 10, 15)  # about a third of each side
    open_ome_zarr(root)
    image, _, _ = read_image(tmp_path / "s.ome.zarr")
    assert image.chunksize == (1, 1, 12, 30, 45)  # a shard per task
    np.testing.assert_array_equal(image.compute(), uint16_volume)
    vol = stored_volume(tmp_path / "s.ome.zarr", c=1)
    assert vol.chunks == (12, 30, 45)
    np.testing.assert_array_equal(vol[5:20, 7:61, 3:44], uint16_volume[0, 1, 5:20, 7:61, 3:44])
    a, _, _ = read_image(tmp_path / "p.ome.zarr", level=1)
    b, _, _ = read_image(tmp_path / "s.ome.zarr", level=1)
    np.testing.assert_array_equal(a.compute(), b.compute())


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32, np.uint32])
@pytest.mark.parametrize("factor", [(1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("slab_bytes", [None, 1])
def test_pyramid_step_is_the_window_mean(dtype, factor, slab_bytes):
    # against NumPy on the whole array: windows of `factor`, edges replicated, integers
    # rounded as the float mean rounds (half to even); blocks reduced whole or one output
    # plane at a time (slab_bytes=1), the last slab padded
    from lightsheet.io.omezarr import _downsample

    slab = {} if slab_bytes is None else {"slab_bytes": slab_bytes}

    rng = np.random.default_rng(2)
    x = rng.integers(-300 if dtype == np.int16 else 0, 1000, (1, 1, 13, 21, 17)).astype(dtype)
    pad = [(0, 0), (0, 0)] + [(0, (-n) % f) for n, f in zip(x.shape[2:], factor, strict=True)]
    p = np.pad(x, pad, mode="edge").astype(np.float64)
    windows = p.reshape(
        1, 1, *(v for n, f in zip(p.shape[2:], factor, strict=True) for v in (n // f, f))
    )
    want = windows.mean(axis=(3, 5, 7))
    want = want if x.dtype.kind == "f" else np.round(want)
    chunks = (1, 1, 4 * factor[0], 6 * factor[1], 8 * factor[2])
    got = _downsample(da.from_array(x, chunks=chunks), factor, labels=False, **slab).compute()
    assert got.dtype == x.dtype
    np.testing.assert_allclose(got, want.astype(x.dtype), rtol=1e-6)
    nearest = _downsample(da.from_array(x, chunks=chunks), factor, labels=True).compute()
    np.testing.assert_array_equal(nearest, x[:, :, :: factor[0], :: factor[1], :: factor[2]])


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_direct_chunk_writes_are_the_bytes_zarr_writes(tmp_path, dtype):
    # the writer encodes whole chunks itself, with each level's codec (zstd at level 0, lz4
    # below); zarr's own setitem must store the same files
    from lightsheet.io.omezarr import compressor

    x = (np.random.default_rng(0).random((1, 1, 23, 31, 17)) * 1000).astype(dtype)
    write_image(
        da.from_array(x, chunks=(1, 1, 16, 20, 9)),
        tmp_path / "d.ome.zarr",
        voxel_size_um=(1, 1, 1),
        chunks=(8, 10, 9),
        min_size=16,
    )
    group = zarr.open_group(str(tmp_path / "d.ome.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["s0", "s1"]
    for level in range(2):
        written = group[f"s{level}"]
        assert written.compressors[0].cname.value == ("lz4" if level else "zstd")
        ref = zarr.create_array(
            str(tmp_path / f"ref{level}.zarr"),
            shape=written.shape,
            chunks=written.chunks,
            dtype=dtype,
            compressors=[compressor(level)],
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        ref[...] = written[...]
        ours = sorted((tmp_path / "d.ome.zarr" / f"s{level}" / "c").rglob("*"))
        theirs = sorted((tmp_path / f"ref{level}.zarr" / "c").rglob("*"))
        assert [p.relative_to(tmp_path / "d.ome.zarr" / f"s{level}") for p in ours] == [
            p.relative_to(tmp_path / f"ref{level}.zarr") for p in theirs
        ]
        for a, b in zip(ours, theirs, strict=True):
            assert a.is_dir() or a.read_bytes() == b.read_bytes(), a
    np.testing.assert_array_equal(group["s0"][...], x)


def test_levels_from_blocks_in_memory_equal_the_reread(tmp_path, uint16_volume):
    # the next levels are written from each block as it is written while every block covers
    # whole chunks of them: chunks divisible by the factor ("f": levels 1-3), or odd chunks
    # in blocks of two along each axis, as write_blocks gives ("o": level 1); otherwise each
    # level is read back from the one above ("r"). Every level holds the same voxels.
    for name, blocks, chunks in [
        ("f", (8, 16, 16), None),
        ("r", (8, 15, 15), None),
        ("o", (16, 30, 30), (8, 15, 15)),
    ]:
        write_image(
            da.from_array(uint16_volume, chunks=(1, 1, *blocks)),
            tmp_path / f"{name}.ome.zarr",
            voxel_size_um=(1, 1, 1),
            chunks=chunks,
            min_size=8,
            fused_min_chunk_voxels=1,  # this image's tiny chunks too
        )
    fused = zarr.open_group(str(tmp_path / "f.ome.zarr"), mode="r")
    # chunks halve with each level written from memory, and stay once re-read
    assert [fused[f"s{i}"].chunks[2:] for i in range(1, 5)] == [(4, 8, 8), (2, 4, 4)] + [
        (1, 2, 2)
    ] * 2
    odd = zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r")
    assert odd["s1"].chunks == (1, 1, 4, 15, 15)  # the level-0 chunk, where odd
    n = len(list(fused.array_keys()))
    assert n >= 3 and n == len(list(odd.array_keys()))
    for level in range(n):
        b, _, _ = read_image(tmp_path / "r.ome.zarr", level=level)
        for name in ("f", "o"):
            a, _, _ = read_image(tmp_path / f"{name}.ome.zarr", level=level)
            np.testing.assert_array_equal(a.compute(), b.compute())
