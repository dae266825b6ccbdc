"""Every TIFF read is correct or refused: each layout gives tifffile.imread's voxels."""

import struct

import numpy as np
import pytest
import tifffile

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import InputFilesError, PSFError
from lightsheet.ingest import discover
from lightsheet.io.tiff import TiffRegion, inspect_tiff
from lightsheet.psf import gaussian_psf, load_psf
from lightsheet.stitch import stitch
from tests.ingest.test_ingest import name

#: The layouts microscopes and tools write: byte order, codecs, tiling, BigTIFF, ImageJ/OME
#: metadata, several strips per page, pages written one at a time (not contiguous).
VARIANTS = {
    "plain": {},
    "big-endian": {"byteorder": ">"},
    "big-endian bigtiff": {"byteorder": ">", "bigtiff": True},
    "lzw": {"compression": "lzw"},
    "zlib": {"compression": "zlib"},
    "zlib predictor": {"compression": "zlib", "predictor": True},
    "zstd": {"compression": "zstd"},
    "packbits": {"compression": "packbits"},
    "tiled": {"tile": (16, 16)},
    "tiled zstd big-endian": {"tile": (16, 16), "compression": "zstd", "byteorder": ">"},
    "bigtiff": {"bigtiff": True},
    "imagej": {"imagej": True, "metadata": {"axes": "ZYX"}},
    "imagej big-endian": {"imagej": True, "metadata": {"axes": "ZYX"}, "byteorder": ">"},
    "ome": {"ome": True, "metadata": {"axes": "ZYX"}},
    "strips": {"rowsperstrip": 5},
}
SHAPE = (6, 40, 35)


def write_variant(path, data, variant):
    if variant == "pages":  # one IFD per plane, appended: scattered pixel data
        for plane in data:
            tifffile.imwrite(path, plane, append=True, photometric="minisblack", metadata=None)
        return
    tifffile.imwrite(path, data, photometric="minisblack", **VARIANTS[variant])


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
@pytest.mark.parametrize("variant", [*VARIANTS, "pages"])
def test_every_layout_reads_as_tifffile_does(tmp_path, variant, dtype):
    data = np.random.default_rng(0).integers(0, 30000, SHAPE).astype(dtype)
    path = tmp_path / "tile.tif"
    write_variant(path, data, variant)
    reference = tifffile.imread(path)
    np.testing.assert_array_equal(reference, data)
    region = TiffRegion(inspect_tiff(path))
    assert region.dtype == np.dtype(dtype).newbyteorder("=")
    for key in [
        (slice(None),) * 3,
        (slice(1, 4), slice(3, 33), slice(0, 35)),  # whole rows
        (slice(2, 3), slice(7, 21), slice(5, 30)),  # part rows
        (slice(0, 6), slice(39, 40), slice(34, 35)),
    ]:
        got = region[key]
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, reference[key])
        out = np.zeros(reference[key].shape, region.dtype)
        np.testing.assert_array_equal(region.read(key, out=out), reference[key])


def test_fast_path_only_where_exact(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    for variant, fast in [("plain", True), ("big-endian", True), ("zlib predictor", False)]:
        path = tmp_path / f"{variant}.tif"
        write_variant(path, data, variant)
        assert (inspect_tiff(path).data_offset is not None) == fast, variant


@pytest.mark.parametrize("variant", ["big-endian", "lzw", "zstd", "tiled", "bigtiff", "pages"])
def test_stitched_volume_equals_the_plain_tiles(tmp_path, variant):
    # the same grid written plain and in another layout: identical stitched voxels
    rng = np.random.default_rng(2)
    tiles = {x: rng.integers(0, 60000, SHAPE).astype(np.uint16) for x in range(2)}
    volumes = []
    for kind in ("plain", variant):
        folder = tmp_path / kind.replace(" ", "-")
        folder.mkdir()
        for x, data in tiles.items():
            write_variant(folder / name(x=x), data, kind)
        m = discover(str(folder / "*.tif"), DEFAULT_PATTERN)
        volumes.append(stitch(m, voxel_size_um=(2, 1, 1), chunks=(4, 16, 20)).compute())
    np.testing.assert_array_equal(volumes[1], volumes[0])
    np.testing.assert_array_equal(volumes[0][0, 0, :, :, 35:], tiles[1])


def _corrupt(path, at, data):
    raw = bytearray(path.read_bytes())
    raw[at : at + len(data)] = data
    path.write_bytes(bytes(raw))


def test_undecodable_tile_refused_at_ingest_naming_it(tmp_path):
    data = np.random.default_rng(0).integers(0, 60000, SHAPE).astype(np.uint16)
    tifffile.imwrite(tmp_path / name(x=0), data, photometric="minisblack")
    bad = tmp_path / name(x=1)
    tifffile.imwrite(bad, data, photometric="minisblack", compression="zstd")
    with tifffile.TiffFile(bad) as tf:
        offset = tf.pages[0].dataoffsets[0]
    _corrupt(bad, offset, b"\xff" * 8)
    with pytest.raises(InputFilesError, match=r"001x.*cannot decode page 0 \(ZSTD"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def _claim_shape(path, height, width):
    """Rewrite the first IFD's ImageLength / ImageWidth (a header lying about its size)."""
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        for tag, value in (("ImageLength", height), ("ImageWidth", width)):
            t = tags[tag]
            fmt = {3: "<H", 4: "<I"}[t.dtype]
            raw = bytearray(path.read_bytes())
            struct.pack_into(fmt, raw, t.valueoffset, value)
            path.write_bytes(bytes(raw))


def test_declared_size_that_the_file_cannot_hold_is_refused(tmp_path):
    path = tmp_path / "liar.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), photometric="minisblack")
    _claim_shape(path, 60000, 60000)
    with pytest.raises(InputFilesError, match=r"liar\.tif.*(truncated|stores)"):
        inspect_tiff(path)


def test_tile_beyond_the_limit_refused_before_reading(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), photometric="minisblack")
    _claim_shape(path, 60000, 60000)  # 6.7 GiB declared in a few kB
    with pytest.raises(InputFilesError, match=r"huge\.tif: header declares .*at most 1\.0 GiB"):
        inspect_tiff(path, max_bytes=1 << 30)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros(SHAPE, np.uint16), photometric="minisblack")
    with pytest.raises(InputFilesError, match="stitch.max_tile_gib"):
        discover(str(small), r"(?P<x>small)", max_tile_bytes=1000)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {
                "shape": (3, 2, 10, 10),
                "photometric": "minisblack",
                "imagej": True,
                "metadata": {"axes": "ZCYX"},
            },
            "C=2: several channels",
        ),  # fmt: skip
        ({"shape": (10, 10, 3), "photometric": "rgb"}, "S=3"),
    ],
)
def test_several_channels_in_one_file_refused(tmp_path, kwargs, match):
    shape = kwargs.pop("shape")
    path = tmp_path / "multi.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint8 if len(shape) == 3 else np.uint16), **kwargs)
    with pytest.raises(InputFilesError, match=rf"multi\.tif: .*{match}"):
        inspect_tiff(path)


def test_psf_read_safely(tmp_path):
    psf = gaussian_psf((2.0, 0.8, 0.8), (2.0, 1.0, 1.0))
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, psf, byteorder=">", photometric="minisblack")  # Fiji's default
    np.testing.assert_allclose(load_psf(path), psf, rtol=1e-6)
    _claim_shape(path, 60000, 60000)
    with pytest.raises(PSFError, match=r"psf\.tif"):
        load_psf(path)
    tifffile.imwrite(path, psf, photometric="minisblack")
    with pytest.raises(PSFError, match="at most 100 bytes"):
        load_psf(path, max_bytes=100)


def test_channels_allowed_still_refuse_samples_and_two_stack_axes(tmp_path):
    rgb, plain4d = tmp_path / "rgb.tif", tmp_path / "plain4d.tif"
    tifffile.imwrite(rgb, np.zeros((10, 10, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(plain4d, np.zeros((3, 2, 10, 10), np.uint16), photometric="minisblack")
    with pytest.raises(InputFilesError, match=r"rgb\.tif: .*S=3: samples per pixel.*one value"):
        inspect_tiff(rgb, channels=True)
    with pytest.raises(InputFilesError, match=r"plain4d\.tif: .*QQYX.*stack per channel"):
        inspect_tiff(plain4d, channels=True)


def test_several_images_in_one_file_refused(tmp_path):
    # OME series of equal planes (tiles or positions in one file): only the first would be read
    path = tmp_path / "positions.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for k in range(3):
            tw.write(np.full(SHAPE, k, np.uint16), photometric="minisblack")
    with pytest.raises(InputFilesError, match=r"positions\.ome\.tif: holds 3 images.*first"):
        inspect_tiff(path, channels=True)
    # a smaller image after the stack (a thumbnail) is not another tile
    thumb = tmp_path / "thumb.tif"
    tifffile.imwrite(thumb, np.ones(SHAPE, np.uint16), photometric="minisblack")
    tifffile.imwrite(thumb, np.zeros((4, 5), np.uint8), photometric="minisblack", append=True)
    np.testing.assert_array_equal(TiffRegion(inspect_tiff(thumb))[:, :, :], np.ones(SHAPE))


@pytest.mark.parametrize(
    ("kwargs", "declared"),
    [
        ({}, None),  # tifffile's own metadata: no physical size
        ({"imagej": True, "resolution": (2, 2), "metadata": {"spacing": 5, "unit": "um"}},
         (5.0, 0.5, 0.5)),
        ({"imagej": True, "resolution": (1, 1), "metadata": {"unit": "micron"}}, (None, 1, 1)),
        ({"imagej": True, "resolution": (2, 2), "metadata": {"spacing": 5}}, None),  # pixels
        ({"ome": True, "metadata": {"PhysicalSizeX": 0.8, "PhysicalSizeY": 0.8,
                                    "PhysicalSizeZ": 4.0}}, (4.0, 0.8, 0.8)),
        ({"ome": True, "metadata": {"PhysicalSizeX": 800, "PhysicalSizeXUnit": "nm",
                                    "PhysicalSizeY": 0.8}}, (None, 0.8, 0.8)),
    ],
)  # fmt: skip
def test_voxel_size_declared_in_metadata(tmp_path, kwargs, declared):
    path = tmp_path / "tile.tif"
    if kwargs:
        kwargs["metadata"] = {"axes": "ZYX", **kwargs["metadata"]}
    tifffile.imwrite(path, np.zeros(SHAPE, np.uint16), photometric="minisblack", **kwargs)
    got = inspect_tiff(path).voxel_size_um
    assert got == (None if declared is None else pytest.approx(declared))
