"""Ingest: every bad-input case fails before compute, naming the file and what was expected."""

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import InputFilesError, TileGridError
from lightsheet.ingest import Manifest, discover, voxel_size_mismatch
from lightsheet.io.tiff import TiffRegion, inspect_tiff
from lightsheet.stitch import stitch

TILE = (5, 6, 7)


def name(c=0, t=0, z=0, y=0, x=0):
    return (
        f"ex6-2_CamA_ch{c}_CAM1_stack0000_560nm_0000000msec_0001291795msecAbs_"
        f"{x:03d}x_{y:03d}y_{z:03d}z_{t:04d}t.tif"
    )


def write_grid(folder: Path, grid=(1, 2, 1, 2, 3), dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tiles = {}
    for t in range(grid[0]):
        for c in range(grid[1]):
            for z in range(grid[2]):
                for y in range(grid[3]):
                    for x in range(grid[4]):
                        data = rng.integers(0, 4000, TILE).astype(dtype)
                        tifffile.imwrite(
                            folder / name(c, t, z, y, x), data, photometric="minisblack"
                        )
                        tiles[(t, c, z, y, x)] = data
    return tiles


def checksums(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_discover_parses_grid(tmp_path):
    write_grid(tmp_path)
    m = discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    assert m.grid_shape == (1, 2, 1, 2, 3)
    assert m.tile_shape == TILE
    assert m.shape == (1, 2, 5, 12, 21)
    assert m.channel_names() == ["ch0", "ch1"]
    assert Manifest.from_dict(m.to_dict()) == m


def test_missing_groups_mean_one(tmp_path):
    for x in range(2):
        tifffile.imwrite(tmp_path / f"tile_x{x}.tif", np.zeros(TILE, np.uint16))
    m = discover(str(tmp_path / "*.tif"), r"_x(?P<x>\d+)\.tif$")
    assert m.grid_shape == (1, 1, 1, 1, 2)


def test_numeric_order(tmp_path):
    for x in (1, 2, 10):
        tifffile.imwrite(tmp_path / f"t_x{x}.tif", np.full(TILE, x, np.uint16))
    m = discover(str(tmp_path / "*.tif"), r"_x(?P<x>\d+)\.tif$")
    assert m.values["x"] == ["1", "2", "10"]


def test_no_files(tmp_path):
    with pytest.raises(InputFilesError, match="no files match"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_names_not_matching_pattern(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 1))
    tifffile.imwrite(tmp_path / "psf.tif", np.zeros(TILE, np.uint16))
    with pytest.raises(TileGridError, match=r"psf\.tif"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_duplicate_tile(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 2))
    tifffile.imwrite(tmp_path / name(x=1).replace("560nm", "561nm"), np.zeros(TILE, np.uint16))
    with pytest.raises(TileGridError, match="same tile.*x=001"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_missing_tile(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 2, 2))
    (tmp_path / name(y=1, x=1)).unlink()
    with pytest.raises(TileGridError, match=r"1 of 4 tiles missing.*y=001, x=001"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_different_shape(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 3))
    tifffile.imwrite(tmp_path / name(x=2), np.zeros((5, 6, 6), np.uint16))
    with pytest.raises(
        TileGridError, match=r"000y_000z.*shape \(5, 6, 6\).*expected shape \(5, 6, 7\)"
    ):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_different_dtype(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 3))
    tifffile.imwrite(tmp_path / name(x=1), np.zeros(TILE, np.uint8))
    with pytest.raises(TileGridError, match="dtype uint8.*expected.*uint16"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_unreadable_tiff(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 2))
    (tmp_path / name(x=1)).write_bytes(b"this is not a tiff")
    with pytest.raises(InputFilesError, match=r"001x.*not a readable TIFF"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_truncated_tiff(tmp_path):
    write_grid(tmp_path, grid=(1, 1, 1, 1, 2))
    path = tmp_path / name(x=1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputFilesError, match=r"001x.*truncated"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)


def test_inputs_never_modified(tmp_path):
    write_grid(tmp_path)
    before = checksums(tmp_path)
    discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    assert checksums(tmp_path) == before


@settings(max_examples=80, deadline=None)
@given(
    bounds=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=3, max_size=3),
    dtype=st.sampled_from([np.uint16, np.float32, np.uint8]),
    scratch=st.sampled_from([None, 1, 50]),
    into=st.booleans(),
)
def test_tile_regions_equal_numpy_slices(tmp_path_factory, bounds, dtype, scratch, into):
    # whole planes, whole rows, partial rows (read a few rows at a time with a tiny scratch
    # buffer), empty regions, into a given array or not: the same voxels as NumPy
    path = tmp_path_factory.mktemp("region") / "tile.tif"
    data = np.random.default_rng(1).integers(0, 200, (5, 9, 11)).astype(dtype)
    tifffile.imwrite(path, data)
    region = TiffRegion(
        inspect_tiff(path), **({} if scratch is None else {"scratch_bytes": scratch})
    )
    assert region.info.data_offset is not None  # the contiguous fast path
    key = tuple(slice(min(a, b), max(a, b)) for a, b in bounds)
    if into:
        out = np.full(data[key].shape, 7, dtype)
        assert region.read(key, out=out) is out
    else:
        out = region[key]
    np.testing.assert_array_equal(out, data[key])


def test_pattern_with_slash_matches_relative_path(tmp_path):
    # one folder per channel, one file per z plane: cellfinder's crop layout
    planes = {}
    for c in range(2):
        (tmp_path / "brain" / f"ch{c}").mkdir(parents=True)
        for z in range(3):
            plane = np.full(TILE[1:], 10 * c + z, np.uint16)
            tifffile.imwrite(tmp_path / "brain" / f"ch{c}" / f"ch{c}{z:04d}.tif", plane)
            planes[(c, z)] = plane
    m = discover(str(tmp_path / "brain" / "ch*" / "*.tif"), r"ch(?P<c>\d+)/ch\d(?P<z>\d+)\.tif$")
    assert m.grid_shape == (1, 2, 3, 1, 1)
    assert m.tile_shape == (1, *TILE[1:])
    for tile in m.tiles:
        _, c, z, _, _ = tile.index
        assert Path(tile.path).parent.name == f"ch{c}"
        assert inspect_tiff(tile.path).shape == (1, *TILE[1:])
    # without '/' the same files are parsed by name only: the folder is not seen
    with pytest.raises(TileGridError, match="two files map to the same tile"):
        discover(str(tmp_path / "brain" / "ch*" / "*.tif"), r"ch\d(?P<z>\d{4})\.tif$")


def test_pattern_with_slash_names_unmatched_paths(tmp_path):
    (tmp_path / "ch0").mkdir()
    tifffile.imwrite(tmp_path / "ch0" / "a.tif", np.zeros(TILE, np.uint16))
    with pytest.raises(TileGridError, match=r"relative to .*: ch0/a\.tif"):
        discover(str(tmp_path / "*" / "*.tif"), r"ch(?P<c>\d+)/b\.tif$")


LAVISION = r"\[(?P<y>\d+) x (?P<x>\d+)\]_C(?P<c>\d+)_xyz-Table Z(?P<plane>\d+)\.ome\.tif$"


def test_one_file_per_plane_per_tile(tmp_path):
    # LaVision UltraMicroscope: one OME-TIFF per z plane, tile and channel
    rng = np.random.default_rng(3)
    stacks = {}
    for c, y, x in itertools.product(range(2), range(2), range(2)):
        stack = rng.integers(0, 60000, (4, *TILE[1:])).astype(np.uint16)
        stacks[(c, y, x)] = stack
        for z, plane in enumerate(stack):
            fname = f"13-52-56_brain_UltraII[{y:02d} x {x:02d}]_C{c:02d}_xyz-Table Z{z:04d}.ome.tif"
            tifffile.imwrite(tmp_path / fname, plane, ome=True, photometric="minisblack")
    m = discover(str(tmp_path / "*.ome.tif"), LAVISION)
    assert m.grid_shape == (1, 2, 1, 2, 2)
    assert m.tile_shape == (4, *TILE[1:])
    assert Manifest.from_dict(m.to_dict()) == m
    assert len(m.paths) == 32
    for tile in m.tiles:
        _, c, _, y, x = tile.index
        np.testing.assert_array_equal(tile.region()[:, :, :], stacks[(c, y, x)])
        np.testing.assert_array_equal(
            tile.region()[1:3, 2:5, 1:6], stacks[(c, y, x)][1:3, 2:5, 1:6]
        )
    # a plane missing from one tile is named
    (tmp_path / "13-52-56_brain_UltraII[01 x 00]_C01_xyz-Table Z0002.ome.tif").unlink()
    missing = r"c=01, z=0, y=01, x=00\) has 3 of the 4 planes.*plane 0002"
    with pytest.raises(TileGridError, match=missing):
        discover(str(tmp_path / "*.ome.tif"), LAVISION)


#: Files that hold every channel of a tile: an ImageJ hyperstack (Fiji's "Save As > Tiff",
#: channels interleaved plane by plane), OME-TIFF with each channel's planes together, and the
#: same compressed (read through tifffile, not the fast path).
MULTICHANNEL = {
    "imagej ZCYX": ("ZCYX", {"imagej": True}),
    "imagej ZCYX big-endian": ("ZCYX", {"imagej": True, "byteorder": ">"}),
    "ome CZYX": ("CZYX", {"ome": True}),
    "ome ZCYX zlib": ("ZCYX", {"ome": True, "compression": "zlib"}),
}


def write_channels(path: Path, channels: np.ndarray, axes: str, kwargs: dict) -> None:
    """Write (C, Z, Y, X) ``channels`` as one file with ``axes`` (CZYX, ZCYX or CYX)."""
    data = channels[:, 0] if axes == "CYX" else channels
    if axes == "ZCYX":
        data = data.transpose(1, 0, 2, 3)
    tifffile.imwrite(
        path, np.ascontiguousarray(data), photometric="minisblack", metadata={"axes": axes},
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("layout", MULTICHANNEL)
def test_channels_inside_each_file_are_the_channel_axis(tmp_path, layout):
    # one file per tile holding all its channels stitches to what one file per channel gives
    axes, kwargs = MULTICHANNEL[layout]
    rng = np.random.default_rng(4)
    stacks = {x: rng.integers(0, 60000, (3, *TILE)).astype(np.uint16) for x in range(2)}
    per_channel, together = tmp_path / "per_channel", tmp_path / "together"
    together.mkdir()
    per_channel.mkdir()
    for x, stack in stacks.items():
        write_channels(together / f"tile_{x:03d}x.tif", stack, axes, kwargs)
        for c, data in enumerate(stack):
            tifffile.imwrite(per_channel / name(c=c, x=x), data, photometric="minisblack")
    m = discover(str(together / "*.tif"), r"_(?P<x>\d+)x\.tif$")
    assert m.grid_shape == (1, 3, 1, 1, 2)
    assert m.channel_names() == ["ch0", "ch1", "ch2"]
    assert len(m.paths) == 2  # each file once, though three tiles read it
    assert Manifest.from_dict(m.to_dict()) == m
    assert (m.tiles[0].info.data_offset is not None) == ("compression" not in kwargs)
    for tile in m.tiles:
        _, c, _, _, x = tile.index
        region = tile.region()
        for key in [
            (slice(None),) * 3,
            (slice(1, 4), slice(2, 6), slice(0, 7)),  # whole rows
            (slice(2, 5), slice(1, 4), slice(2, 6)),  # part rows
            (slice(0, 5, 2), slice(None), slice(1, 7, 3)),  # strided
        ]:
            np.testing.assert_array_equal(region[key], stacks[x][c][key])
    reference = discover(str(per_channel / "*.tif"), DEFAULT_PATTERN)
    got = stitch(m, voxel_size_um=(2, 1, 1), chunks=(2, 4, 5)).compute()
    np.testing.assert_array_equal(got, stitch(reference, voxel_size_um=(2, 1, 1)).compute())


def test_channels_inside_plane_files(tmp_path):
    # one 2-D file of every channel per z plane (OME CYX), stacked by a plane group
    rng = np.random.default_rng(5)
    stack = rng.integers(0, 60000, (2, 4, *TILE[1:])).astype(np.uint16)  # (C, Z, Y, X)
    for z in range(4):
        write_channels(
            tmp_path / f"plane_Z{z:04d}.ome.tif", stack[:, z : z + 1], "CYX", {"ome": True}
        )
    m = discover(str(tmp_path / "*.ome.tif"), r"_Z(?P<plane>\d+)\.ome\.tif$")
    assert m.grid_shape == (1, 2, 1, 1, 1)
    for tile in m.tiles:
        c = tile.index[1]
        np.testing.assert_array_equal(tile.region()[:, :, :], stack[c])
        np.testing.assert_array_equal(tile.region()[1:3, 2:5, 1:6], stack[c, 1:3, 2:5, 1:6])


def test_channels_in_names_and_inside_files_refused(tmp_path):
    stack = np.zeros((2, *TILE), np.uint16)
    for c in range(2):
        write_channels(tmp_path / name(c=c), stack, "ZCYX", {"imagej": True})
    with pytest.raises(TileGridError, match=r"c group names 2 channels.*each file holds 2"):
        discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    write_channels(tmp_path / name(c=1), np.zeros((3, *TILE), np.uint16), "ZCYX", {"imagej": True})
    with pytest.raises(TileGridError, match=r"ch1_.*in each of 3 channels.*expected.*each of 2"):
        discover(str(tmp_path / "*.tif"), r"_(?P<x>ch\d)_")


def write_ome_set(
    folder: Path, stack: np.ndarray, names: list[str], *, sizes=None, order="XYZCT", **kwargs
) -> None:
    """``stack`` split over the files ``names`` in order, each file's OME-XML describing the
    whole set (the files named by UUID), as LaVision ImSpector (one plane a file), Bio-Formats
    and Micro-Manager write. ``sizes``: the set's (Z, C, T), default (planes, 1, 1); the planes
    run through them in ``order``, each file's from where the previous file's ended."""
    import uuid

    nz, ny, nx = stack.shape
    size_z, size_c, size_t = sizes or (nz, 1, 1)
    per = nz // len(names)
    fast = [{"Z": size_z, "C": size_c, "T": size_t}[a] for a in order[2:]]
    ids = [f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, n)}" for n in names]
    firsts = [np.unravel_index(k * per, fast[::-1])[::-1] for k in range(len(names))]
    tiffdata = "".join(
        "<TiffData "
        + " ".join(f'First{a}="{v}"' for a, v in zip(order[2:], first, strict=True))
        + f' IFD="0" PlaneCount="{per}"><UUID FileName="{n}">{ids[k]}</UUID></TiffData>'
        for k, (n, first) in enumerate(zip(names, firsts, strict=True))
    )
    for k, n in enumerate(names):
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
            f'Schemas/OME/2016-06" UUID="{ids[k]}"><Image ID="Image:0"><Pixels ID="Pixels:0" '
            f'DimensionOrder="{order}" Type="uint16" SizeX="{nx}" SizeY="{ny}" '
            f'SizeZ="{size_z}" SizeC="{size_c}" SizeT="{size_t}">'
            '<Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
            f"{tiffdata}</Pixels></Image></OME>"
        )
        tifffile.imwrite(
            folder / n, stack[k * per : (k + 1) * per].squeeze(), description=xml,
            photometric="minisblack", metadata=None, **kwargs,
        )  # fmt: skip


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_ome_set_spread_over_plane_files_reads_each_file_alone(tmp_path, compression):
    # every file's OME-XML describes the whole tile: each file must still be its own plane
    rng = np.random.default_rng(6)
    stacks = {}
    for y in range(2):
        stacks[(0, y, 0)] = rng.integers(0, 60000, (3, *TILE[1:])).astype(np.uint16)
        names = [f"brain_UltraII[{y:02d} x 00]_C00_xyz-Table Z{z:04d}.ome.tif" for z in range(3)]
        write_ome_set(tmp_path, stacks[(0, y, 0)], names, compression=compression)
    m = discover(str(tmp_path / "*.ome.tif"), LAVISION)
    assert m.grid_shape == (1, 1, 1, 2, 1)
    assert m.tile_shape == (3, *TILE[1:])
    assert all(p.own_pages and p.shape == (1, *TILE[1:]) for t in m.tiles for p in t.planes)
    for tile in m.tiles:
        _, c, _, y, x = tile.index
        stack = stacks[(c, y, x)]
        np.testing.assert_array_equal(tile.region()[:, :, :], stack)
        np.testing.assert_array_equal(tile.region()[1:3, 2:5, 1:6], stack[1:3, 2:5, 1:6])
    # a file of the set is read without the others (no warning, no zeroed planes)
    (tmp_path / names[2]).unlink()
    assert inspect_tiff(tmp_path / names[0]).shape == (1, *TILE[1:])
    with pytest.raises(TileGridError, match=r"has 2 of the 3 planes.*plane 0002"):
        discover(str(tmp_path / "*.ome.tif"), LAVISION)


def test_ome_set_files_of_one_channel_each_read_and_interleaved_ones_refused(tmp_path):
    # a set's file of several planes is a z stack where the XML puts them in one channel
    # (Bio-Formats: a file per channel), and refused where they span channels (Micro-Manager)
    stack = np.arange(4 * 6 * 7, dtype=np.uint16).reshape(4, 6, 7)
    names = ["set_C0.ome.tif", "set_C1.ome.tif"]
    for sizes in [None, (2, 2, 1)]:  # z planes only; two channels of two planes
        write_ome_set(tmp_path, stack, names, sizes=sizes)
        info = inspect_tiff(tmp_path / names[1])
        assert info.own_pages and info.shape == (2, 6, 7)
        np.testing.assert_array_equal(TiffRegion(info)[:, :, :], stack[2:])
    write_ome_set(tmp_path, stack, names, sizes=(2, 2, 1), order="XYCZT")  # channels fastest
    with pytest.raises(InputFilesError, match=r"set_C1\.ome\.tif: .*2 planes.*2 \(channel, time"):
        inspect_tiff(tmp_path / names[1])


def test_voxel_size_in_the_metadata_checked_against_the_run(tmp_path):
    for x in range(2):
        tifffile.imwrite(
            tmp_path / name(x=x), np.zeros(TILE, np.uint16), imagej=True, resolution=(1, 1),
            metadata={"spacing": 2.0, "unit": "micron"}, photometric="minisblack",
        )  # fmt: skip
    m = discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    assert Manifest.from_dict(m.to_dict()) == m
    assert voxel_size_mismatch(m, (2.0, 1.0, 1.0)) is None
    assert voxel_size_mismatch(m, (2.02, 0.99, 1.0)) is None  # within 2 %
    warning = voxel_size_mismatch(m, (5.0, 2.0, 2.0))
    assert "(5, 2, 2) µm" in warning and "declares (2, 1, 1) µm" in warning
    assert name(x=0) in warning


def test_a_psf_at_a_finer_z_step_is_checked_and_read_as_the_run_resamples_it(tiny_sample, tmp_path):
    # the sample's PSF at a quarter of its z step, in a file that says nothing of its voxel
    # size: too deep for the volume as stored; resampled by psf_voxel_size_um, it fits
    from lightsheet.config import load_config
    from lightsheet.errors import PSFError
    from lightsheet.psf import gaussian_psf, load_psf, psf_sigma_um
    from tasks.deconvolve import deconvolve_spec
    from tasks.ingest import check_inputs

    config = load_config(tiny_sample / "config.yaml")
    vz, vy, vx = config.voxel_size_um
    fine = (vz / 4, vy, vx)
    sigma = psf_sigma_um(load_psf(tiny_sample / "psf.tif"), config.voxel_size_um)
    bare = tmp_path / "psf.tif"
    tifffile.imwrite(bare, gaussian_psf(sigma, fine, truncate=6), photometric="minisblack")
    as_stored = config.model_copy(update={"psf": bare})
    with pytest.raises(PSFError, match=r"psf .*psf\.tif: shape \(\d+, .* larger than the stitched"):
        check_inputs(as_stored, atlas_labels=False)
    given = config.model_copy(update={"psf": bare, "psf_voxel_size_um": fine})
    check_inputs(given, atlas_labels=False)
    psf = load_psf(bare, config.voxel_size_um, psf_voxel_size_um=fine)
    np.testing.assert_allclose(psf_sigma_um(psf, config.voxel_size_um), sigma, rtol=0.05)
    # the deconvolve stage's key holds it (and not when it is not given: earlier runs reused)
    raw = {"stage": "stitch", "path": "raw.ome.zarr", "fingerprints": {"path": "x"}}
    spec = deconvolve_spec(raw, str(bare), config.deconvolve, str(tmp_path), 0.0, list(fine))
    assert spec.params["psf_voxel_size_um"] == list(fine)
    spec = deconvolve_spec(raw, str(bare), config.deconvolve, str(tmp_path), 0.0)
    assert "psf_voxel_size_um" not in spec.params
