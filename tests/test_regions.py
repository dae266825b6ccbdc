"""Blocks with halos read from a store equal dask's overlap; regions mirror at the edges."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from lightsheet.io.omezarr import stored_volume, write_image
from lightsheet.regions import Region, map_overlap, read_region

pytestmark = pytest.mark.usefixtures("two_dask_threads")


def test_stored_volume_reads_regions(tmp_path, uint16_volume):
    write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 8, 16, 16)),
        tmp_path / "e.ome.zarr",
        voxel_size_um=(1, 1, 1),
    )
    vol = stored_volume(tmp_path / "e.ome.zarr", t=0, c=1)
    assert vol.shape == uint16_volume.shape[2:] and vol.dtype == uint16_volume.dtype
    assert vol.chunks == (8, 16, 16)
    np.testing.assert_array_equal(vol[3:9, 60:70, :5], uint16_volume[0, 1, 3:9, 60:70, :5])
    # reflected halos beyond the edges: NumPy's "symmetric", dask's "reflect"
    region = Region((0, 0, 0), (0, 60, 40), (8, 70, 45), (3, 4, 5), (3, 4, 5), vol.shape)
    want = np.pad(uint16_volume[0, 1], 5, mode="symmetric")[2:16, 61:79, 40:60]
    np.testing.assert_array_equal(read_region(vol, region, "reflect"), want)
    with pytest.raises(ValueError, match="leaves the volume"):
        read_region(vol, region, "none")


@pytest.mark.parametrize("boundary", ["reflect", "none"])
def test_overlap_from_store_equals_dask_overlap(tmp_path, uint16_volume, boundary):
    write_image(
        da.from_array(uint16_volume, chunks=(1, 1, 8, 16, 16)),
        tmp_path / "f.ome.zarr",
        voxel_size_um=(1, 1, 1),
    )
    vol = stored_volume(tmp_path / "f.ome.zarr", t=0, c=0)
    depth = (3, 5, 2)
    ref = da.overlap.overlap(da.from_array(uint16_volume[0, 0], chunks=vol.chunks), depth, boundary)

    def padded(block, region):
        return block

    from_store = map_overlap(
        padded,
        vol,
        depth=depth,
        boundary=boundary,
        dtype=vol.dtype,
        trim=False,
        out_chunks=ref.chunks,
    )
    np.testing.assert_array_equal(from_store.compute(), ref.compute())

    def where(block, region):
        # each block knows its place: the global flat index of every core voxel
        z, y, x = np.indices(block.shape)
        o = region.origin
        return ((z + o[0]) * 1000 + y + o[1]) * 1000 + x + o[2]

    for source in (vol, da.from_array(uint16_volume[0, 0], chunks=vol.chunks)):
        got = map_overlap(where, source, depth=depth, boundary=boundary, dtype=np.int64).compute()
        z, y, x = np.indices(uint16_volume.shape[2:])
        np.testing.assert_array_equal(got, (z * 1000 + y) * 1000 + x)
