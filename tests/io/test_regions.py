"""Blocks with halos read from a store equal dask's overlap; regions mirror at the edges."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

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


@pytest.mark.parametrize("boundary", ["reflect", "nearest", "none"])
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


def _grouped_regions(shape, depth):
    """Tasks that do not follow the chunks: two y halves, each cut into three z slabs."""
    out = []
    for y0, y1 in ((0, 40), (40, shape[1])):
        for z0, z1 in ((0, 5), (5, 16), (16, shape[0])):
            start, stop = (z0, y0, 0), (z1, y1, shape[2])
            lo = tuple(min(d, a) for d, a in zip(depth, start, strict=True))
            hi = tuple(min(d, n - b) for d, n, b in zip(depth, shape, stop, strict=True))
            out.append(Region((len(out),), start, stop, lo, hi, shape))
    return out


@pytest.mark.parametrize("stored", [True, False])
def test_grouped_regions_equal_the_whole_array_filter(uint16_volume, stored):
    # featurize's grouping: tasks whose outputs span several chunks or part of one are cut
    # and joined into the result's chunks; a leading axis of the kernel's own; a Delayed
    # argument computed first. Against SciPy on the whole array (at the volume's edges the
    # regions stop, and the kernel's "nearest" mode pads as on the whole array)
    image = uint16_volume[0, 0].astype(np.float32)
    chunks = (7, 32, 20)
    depth = (1, 2, 1)
    size = tuple(2 * d + 1 for d in depth)
    source = (
        zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=chunks)
        if stored
        else da.from_array(image, chunks=chunks)
    )
    scale = dask.delayed(lambda: 3.0)()

    def kernel(padded, region, factor):
        filtered = ndi.uniform_filter(padded, size=size, mode="nearest")[region.core]
        return np.stack([filtered, filtered * factor])

    got = map_overlap(
        kernel,
        source,
        chunks=chunks,
        dtype=np.float32,
        trim=False,
        out_chunks=((2,), *da.core.normalize_chunks(chunks, image.shape)),
        regions=_grouped_regions(image.shape, depth),
        boundary="none",
        factor=scale,
    )
    assert got.chunks[1:] == da.core.normalize_chunks(chunks, image.shape)
    whole = ndi.uniform_filter(image, size=size, mode="nearest")
    result = got.compute()
    np.testing.assert_allclose(result[0], whole, rtol=1e-6)
    np.testing.assert_allclose(result[1], 3.0 * result[0], rtol=1e-6)


def test_grouped_regions_must_cover_every_block(uint16_volume):
    image = da.from_array(uint16_volume[0, 0], chunks=(7, 32, 20))
    regions = _grouped_regions(image.shape, (1, 1, 1))[:-1]  # the last slab is missing
    with pytest.raises(ValueError, match="no task computes block"):
        map_overlap(lambda b, region: b, image, dtype=image.dtype, regions=regions, trim=False,
                    boundary="none")  # fmt: skip


def test_delayed_arguments_are_computed_first(uint16_volume):
    # a Delayed keyword argument reaches func as its value, on the stored and the dask path
    image = uint16_volume[0, 0].astype(np.float32)
    store = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(7, 32, 20))
    factor = dask.delayed(lambda: 2.0)()
    for source in (store, da.from_array(image, chunks=(7, 32, 20))):
        got = map_overlap(
            lambda b, region, k: b * k, source, depth=(1, 2, 1), dtype=np.float32, k=factor
        )
        np.testing.assert_array_equal(got.compute(), 2 * image)
