"""Stitch: the lazy volume equals np.block of the tiles, for any chunking."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import InputFilesError
from lightsheet.ingest import discover
from lightsheet.stitch import default_chunks, stitch
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
