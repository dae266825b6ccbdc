"""Stitch: the lazy volume equals np.block of the tiles, for any chunking."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import InputFilesError
from lightsheet.ingest import discover
from lightsheet.io.omezarr import pyramid_factors, read_image, write_blocks, write_image
from lightsheet.stitch import default_chunks, stitch, stitch_chunks
from tests.test_ingest import name, write_grid


def reference(tiles, grid):
    return np.block(
        [
            [
                [
                    [[tiles[(t, c, z, y, x)] for x in range(grid[4])] for y in range(grid[3])]
                    for z in range(grid[2])
                ]
                for c in range(grid[1])
            ]
            for t in range(grid[0])
        ]
    )


@pytest.mark.parametrize("chunks", [(4, 6, 5), (3, 5, 7), (8, 12, 15), (2, 7, 4)])
def test_stitch_equals_block(tmp_path, chunks):
    grid = (2, 2, 2, 2, 3)
    tiles = write_grid(tmp_path, grid=grid)
    m = discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    vol = stitch(m, voxel_size_um=(2, 1, 1), chunks=chunks)
    assert vol.chunksize == (1, 1, *(min(c, s) for c, s in zip(chunks, vol.shape[2:], strict=True)))
    np.testing.assert_array_equal(vol.compute(scheduler="threads"), reference(tiles, grid))


def test_changed_input_detected(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 2))
    m = discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    vol = stitch(m, voxel_size_um=(2, 1, 1), chunks=(4, 6, 5))
    p = tmp_path / name(x=1)
    p.write_bytes(p.read_bytes() + b"\0" * 16)
    with pytest.raises(InputFilesError, match="changed while the run"):
        vol.compute(scheduler="sync")


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 3000)] * 3),
    voxel=st.tuples(*[st.floats(0.1, 10)] * 3),
)
def test_default_chunks_bounded(shape, voxel):
    chunks = default_chunks(shape, voxel, tile_shape_zyx=shape)
    assert all(1 <= c <= s for c, s in zip(chunks, shape, strict=True))
    assert np.prod(chunks) <= 4 * 2**23


@settings(max_examples=60, deadline=None)
@given(
    tile=st.tuples(*[st.integers(8, 3000)] * 3),
    grid=st.tuples(*[st.integers(1, 3)] * 3),
    voxel=st.tuples(*[st.sampled_from([0.5, 1.0, 2.0, 4.0])] * 3),
)
def test_stitch_chunks_keep_tiles_and_prefer_the_pyramid_step(tile, grid, voxel):
    # level 1 of the pyramid can be written from each level-0 block only when the chunk
    # sides divide by its factor; tile alignment must not be given up for that
    shape = tuple(t * g for t, g in zip(tile, grid, strict=True))
    plain = default_chunks(shape, voxel, tile_shape_zyx=tile)
    chunks = stitch_chunks(shape, voxel, tile)
    factors = pyramid_factors(shape, voxel)
    step = factors[0] if factors else (1, 1, 1)
    for p, c, t, f in zip(plain, chunks, tile, step, strict=True):
        if t % p == 0:  # the plain choice was tile-aligned: so is this one
            assert t % c == 0
        if p % f == 0:  # already a multiple: unchanged
            assert c == p
        elif c != p:  # changed only for a tile-aligned multiple of the step
            assert c % f == 0 and t % c == 0


def test_stitch_chunks_take_an_even_tile_divisor_over_a_nearer_odd_one():
    # 1800-voxel tiles: 225 is nearest the 256 target, 300 the nearest even divisor
    voxel = (2.0, 1.0, 1.0)
    assert default_chunks((500, 3600, 3600), voxel, tile_shape_zyx=(500, 1800, 1800))[1] == 225
    assert stitch_chunks((500, 3600, 3600), voxel, (500, 1800, 1800)) == (125, 300, 300)
    # 530-voxel tiles have no even divisor near the target: tile alignment is kept
    assert stitch_chunks((396, 1590, 1590), voxel, (396, 530, 530)) == (132, 265, 265)


@pytest.mark.usefixtures("two_dask_threads")
@pytest.mark.parametrize("chunks", [(4, 3, 5), (2, 6, 5), (4, 6, 4)])
def test_written_in_write_blocks_every_level_equals_a_chunk_by_chunk_write(tmp_path, chunks):
    # the stitch stage's way: blocks of several chunks (two along odd sides, so level 1 is
    # written from memory), against blocks of one chunk (odd sides: level 1 read back)
    grid = (1, 1, 2, 3, 3)
    tiles = write_grid(tmp_path / "tiles", grid=grid)
    m = discover(str(tmp_path / "tiles" / "*.tif"), DEFAULT_PATTERN)
    voxel = (1.0, 1.0, 1.0)
    blocks = write_blocks(chunks, m.shape[2:], 2, voxel, target_bytes=400, min_size=4)
    assert all(b % c == 0 for b, c in zip(blocks, chunks, strict=True))
    for label, dask_chunks in (("blocks", blocks), ("chunks", chunks)):
        write_image(
            stitch(m, voxel_size_um=voxel, chunks=dask_chunks),
            tmp_path / f"{label}.ome.zarr",
            voxel_size_um=voxel,
            chunks=chunks,
            min_size=4,
        )
    want = reference(tiles, grid)
    for level in range(len(pyramid_factors(m.shape[2:], voxel, min_size=4)) + 1):
        a, _, _ = read_image(tmp_path / "blocks.ome.zarr", level=level)
        b, _, _ = read_image(tmp_path / "chunks.ome.zarr", level=level)
        np.testing.assert_array_equal(a.compute(), b.compute())
        if level == 0:
            np.testing.assert_array_equal(a.compute(), want)
