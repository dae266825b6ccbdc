"""Stitch: the lazy volume equals np.block of the tiles, for any chunking."""

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from lightsheet.blocks import default_chunks, pyramid_factors, stitch_chunks, write_blocks
from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import InputFilesError
from lightsheet.ingest import discover
from lightsheet.io.omezarr import read_image, write_image
from lightsheet.stitch import stitch
from tests.ingest.test_ingest import name, write_grid
from tests.stitch.test_stitch_pairwise import nearest_tile_values


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


# -- overlapping tiles: registration and fusion ---------------------------------------------

#: Acceptance: every tile within half a voxel of its true position, per axis.
TOLERANCE_VOX = 0.5


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """3 x 3 tiles, 15 % overlap, stage errors ±2 µm in z and ±8 µm in y and x."""
    from lightsheet.sample.overlap import generate_overlapping

    folder = tmp_path_factory.mktemp("overlap")
    info = generate_overlapping(
        folder, size="small", seed=4, channels=1, grid=(1, 3, 3), overlap=(0, 0.15, 0.15),
        stage_error_um=(2, 8, 8),
    )  # fmt: skip
    return folder, info


def true_positions(folder, info):
    import pandas as pd

    truth = pd.read_csv(folder / "truth" / "tiles.csv")
    return truth[["true_z_um", "true_y_um", "true_x_um"]].to_numpy() / info["voxel_size_um"]


def layout_of(folder, info, **kwargs):
    from lightsheet.stitch import nominal_layout

    m = discover(str(folder / "tiles" / "*.tif"), DEFAULT_PATTERN)
    return m, nominal_layout(m, info["voxel_size_um"], overlap=info["overlap"], **kwargs)


@pytest.fixture(scope="module")
def textured_mosaic(tmp_path_factory):
    """The same mosaic of textured tissue with stripes (`lightsheet.sample.realistic`),
    each tile lit by its own light sheet along x: the tissue that two neighbours along x
    share is about half as bright in the left tile as in the right one."""
    from lightsheet.sample.overlap import generate_overlapping

    folder = tmp_path_factory.mktemp("textured")
    info = generate_overlapping(
        folder, size="small", seed=4, channels=1, grid=(1, 3, 3), overlap=(0, 0.15, 0.15),
        stage_error_um=(2, 8, 8), realistic=True, cells="somata",
    )  # fmt: skip
    return folder, info


@pytest.mark.usefixtures("two_dask_threads")
@pytest.mark.parametrize("mosaic", ["overlapping", "textured_mosaic"])
def test_registration_places_every_tile_within_half_a_voxel(mosaic, request):
    from lightsheet.stitch import register

    folder, info = request.getfixturevalue(mosaic)
    m, layout = layout_of(folder, info)
    assert layout.shape_zyx == tuple(info["shape"][2:])
    errors = np.abs(true_positions(folder, info) - layout.positions_vox)
    assert errors[:, 1:].max() > 2  # the stage errors are real
    solution = register(m, layout.positions_vox, max_shift_vox=layout.max_shift_vox)
    sides = [lk for lk in solution.links if np.count_nonzero(lk.nominal_vox) == 1]
    assert len(sides) == 12 and all(lk.kept for lk in sides) and not solution.fallback
    errors = np.abs(solution.positions - true_positions(folder, info))
    assert errors.max() < TOLERANCE_VOX, errors
    for lk in sides:
        assert lk.ncc_after > max(lk.ncc_before, solution.null_ncc)


@pytest.mark.usefixtures("two_dask_threads")
def test_positions_file_gives_the_same_registration(overlapping):
    from lightsheet.stitch import register

    folder, info = overlapping
    m, grid_layout = layout_of(folder, info)
    _, csv_layout = layout_of(folder, info, positions=str(folder / "positions.csv"))
    np.testing.assert_allclose(csv_layout.positions_vox, grid_layout.positions_vox, atol=1e-6)
    solution = register(m, csv_layout.positions_vox, max_shift_vox=csv_layout.max_shift_vox)
    assert np.abs(solution.positions - true_positions(folder, info)).max() < TOLERANCE_VOX


@pytest.mark.usefixtures("two_dask_threads")
def test_tiles_numbered_in_one_sequence_are_placed_by_their_positions(overlapping, tmp_path):
    # mesoSPIM-like names (Tile0 ... Tile8): the number is the x group, the stage positions
    # come from a positions file keyed by it; registration then finds the same places
    import re
    import shutil

    import pandas as pd

    from lightsheet.stitch import nominal_layout, register

    folder, info = overlapping
    (tmp_path / "tiles").mkdir()
    for f in (folder / "tiles").glob("*.tif"):
        x, y = map(int, re.search(r"_(\d+)x_(\d+)y_", f.name).groups())
        shutil.copy(f, tmp_path / "tiles" / f"brain_Tile{3 * y + x}_Ch488.tif")
    grid = pd.read_csv(folder / "positions.csv")
    numbered = grid.assign(x=3 * grid["y"] + grid["x"]).drop(columns="y")
    numbered.to_csv(tmp_path / "positions.csv", index=False)
    m = discover(str(tmp_path / "tiles" / "*.tif"), r"_Tile(?P<x>\d+)_Ch")
    assert m.grid_shape == (1, 1, 1, 1, 9)
    layout = nominal_layout(m, info["voxel_size_um"], positions=str(tmp_path / "positions.csv"))
    _, grid_layout = layout_of(folder, info)
    np.testing.assert_allclose(layout.positions_vox, grid_layout.positions_vox, atol=1e-6)
    solution = register(m, layout.positions_vox, max_shift_vox=layout.max_shift_vox)
    assert np.abs(solution.positions - true_positions(folder, info)).max() < TOLERANCE_VOX


@pytest.mark.usefixtures("two_dask_threads")
def test_an_overlap_of_noise_is_dropped_and_the_rest_stay_placed(overlapping, tmp_path):
    import shutil

    from lightsheet.stitch import register

    folder, info = overlapping
    shutil.copytree(folder / "tiles", tmp_path / "tiles")
    m, layout = layout_of(tmp_path, info)
    # tile 5 (y=1, x=2): its overlap with tile 4 (its left side) becomes camera noise
    victim = next(t for t in m.tiles if t.index[2:] == (0, 1, 2))
    data = tifffile.imread(victim.path)
    width = int(np.ceil(layout.blend_vox[2]))
    rng = np.random.default_rng(0)
    noise = rng.normal(data.mean(), data.std(), data[:, :, :width].shape)
    data[:, :, :width] = np.clip(noise, 0, 65535)
    tifffile.imwrite(victim.path, data, photometric="minisblack")
    m, layout = layout_of(tmp_path, info)
    solution = register(m, layout.positions_vox, max_shift_vox=layout.max_shift_vox)
    link = next(lk for lk in solution.links if (lk.a, lk.b) == (4, 5))
    assert not link.kept and link.reason
    sides = [lk for lk in solution.links if np.count_nonzero(lk.nominal_vox) == 1]
    assert all(lk.kept for lk in sides if lk is not link) and not solution.fallback
    errors = np.abs(solution.positions - true_positions(folder, info))
    assert errors.max() < TOLERANCE_VOX, errors


def test_a_tile_without_links_stays_nominal():
    from lightsheet.stitch.register import Link, solve

    nominal = np.array([[0.0, 0, 0], [0, 0, 90], [0, 0, 180]])
    links = [
        Link(0, 1, (0, 0, 90), shift_vox=(0, 1.0, -2.0), ncc_after=0.9, kept=True),
        Link(1, 2, (0, 0, 90), shift_vox=(0, 5.0, 5.0), ncc_after=0.1, kept=False),
    ]
    solution = solve(nominal, links)
    assert solution.fallback == [2]
    np.testing.assert_allclose(solution.positions[2], nominal[2])
    np.testing.assert_allclose(solution.positions[1] - solution.positions[0], [0, 1, 88])
    # each connected group keeps its mean nominal position
    np.testing.assert_allclose(solution.positions[:2].mean(0), nominal[:2].mean(0), atol=1e-9)


def test_inconsistent_link_dropped_by_the_global_solve():
    from lightsheet.stitch.register import Link, solve

    nominal = np.array([[0.0, 0, 0], [0, 0, 90], [0, 90, 0], [0, 90, 90]])
    true = nominal + np.array([[0, 0.3, -0.2], [0, -1.1, 0.4], [0, 2.0, 1.0], [0, 0.5, -0.7]])
    pairs = [(0, 1), (0, 2), (1, 3), (2, 3), (0, 3), (1, 2)]
    links = [
        Link(a, b, tuple(nominal[b] - nominal[a]),
             shift_vox=tuple((true[b] - true[a]) - (nominal[b] - nominal[a])),
             ncc_after=0.9, kept=True)
        for a, b in pairs
    ]  # fmt: skip
    links[3].shift_vox = (0.0, 7.0, -4.0)  # a wrong peak
    solution = solve(nominal, links)
    assert [lk.kept for lk in links] == [True, True, True, False, True, True]
    moved = solution.positions - solution.positions.mean(0)
    np.testing.assert_allclose(moved, true - true.mean(0), atol=1e-9)


def write_cut_tiles(folder, volume, origins, tile_shape):
    """Tiles cut from ``volume`` at integer origins, named on the default pattern's grid."""
    folder.mkdir()
    for k, idx in enumerate(np.ndindex(1, 2, 2)):
        z, y, x = (int(v) for v in origins[k])
        tile = volume[z : z + tile_shape[0], y : y + tile_shape[1], x : x + tile_shape[2]]
        tifffile.imwrite(
            folder / name(z=idx[0], y=idx[1], x=idx[2]), tile, photometric="minisblack"
        )


def fuse_cut(tmp_path, shape, origins, tile, chunks, blend_vox, shape_zyx=None):
    """A random volume, tiles cut from it at ``origins``, and their fusion (computed)."""
    volume = np.random.default_rng(5).integers(100, 60000, shape).astype(np.uint16)
    write_cut_tiles(tmp_path / "tiles", volume, origins, tile)
    m = discover(str(tmp_path / "tiles" / "*.tif"), DEFAULT_PATTERN)
    fused = stitch(
        m, voxel_size_um=(2, 1, 1), chunks=chunks, positions_vox=origins.astype(float),
        shape_zyx=shape_zyx, blend_vox=blend_vox,
    ).compute()  # fmt: skip
    return volume, m, fused


@pytest.mark.parametrize("chunks", [(6, 13, 17), (12, 40, 40), (5, 8, 64)])
def test_fusion_at_true_integer_positions_gives_back_the_volume(tmp_path, chunks):
    origins = np.array([[0, 0, 0], [0, 0, 23], [0, 22, 0], [0, 22, 23]])
    volume, m, fused = fuse_cut(tmp_path, (12, 52, 55), origins, (12, 30, 32), chunks, (1, 8, 9))
    assert fused.shape == (1, 1, 12, 52, 55)
    np.testing.assert_array_equal(fused[0, 0], volume)
    # nearest: positions within half a voxel of the grid are rounded onto it
    nearest = stitch(
        m, voxel_size_um=(2, 1, 1), chunks=chunks, positions_vox=origins + [0.3, -0.4, 0.2],
        shape_zyx=(12, 52, 55), blend_vox=(1, 8, 9), interpolation="nearest",
    ).compute()  # fmt: skip
    np.testing.assert_array_equal(nearest[0, 0], volume)


def test_fusion_at_sub_voxel_positions_interpolates_linearly(tmp_path):
    # a linear field is what linear interpolation reproduces exactly
    tile = (6, 30, 32)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in (8, 60, 60)), indexing="ij")
    origins = np.array([[0.4, 0.0, 0.0], [0.0, 0.0, 25.3], [0.0, 24.7, 0.25], [0.5, 24.2, 25.6]])
    (tmp_path / "tiles").mkdir()

    def field(zz, yy, xx):
        return 3.0 * zz + 0.5 * yy + 0.25 * xx + 10

    for k, idx in enumerate(np.ndindex(1, 2, 2)):
        grid = np.meshgrid(*(np.arange(n, dtype=float) for n in tile), indexing="ij")
        values = field(*(g + o for g, o in zip(grid, origins[k], strict=True)))
        tifffile.imwrite(
            tmp_path / "tiles" / name(z=idx[0], y=idx[1], x=idx[2]),
            values.astype(np.float32),
            photometric="minisblack",
        )
    m = discover(str(tmp_path / "tiles" / "*.tif"), DEFAULT_PATTERN)
    fused = stitch(
        m, voxel_size_um=(2, 1, 1), chunks=(4, 16, 16), positions_vox=origins,
        shape_zyx=(8, 60, 60), blend_vox=(1, 5, 6),
    ).compute()[0, 0]  # fmt: skip
    # covered: inside a tile's box, past the first voxel where the origin is sub-voxel
    covered = np.zeros(fused.shape, bool)
    for o in origins:
        lo = [int(np.floor(v)) + (1 if v % 1 else 0) for v in o]
        hi = [int(np.floor(v)) + n for v, n in zip(o, tile, strict=True)]
        covered[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    assert covered[1:6, 1:54, 1:57].all() and not covered.all()
    np.testing.assert_allclose(fused[covered], field(z, y, x)[covered], rtol=1e-5)


@pytest.mark.parametrize("chunks", [(3, 13, 17), (12, 60, 64), (1, 8, 64)])
def test_voxels_no_tile_covers_mirror_the_nearest_tile(tmp_path, chunks):
    # tiles shifted inward by stage errors leave the mosaic's border uncovered: those voxels
    # take the nearest tile's voxels mirrored about its edge (no step to 0 for deconvolution
    # to ring at, no rows of repeated values), the same at any chunking
    tile = (10, 30, 32)
    origins = np.array([[1, 2, 0], [0, 0, 25], [3, 24, 1], [2, 23, 27]])
    shape = (14, 56, 60)
    volume, _, fused = fuse_cut(tmp_path, shape, origins, tile, chunks, (1, 4, 4), shape)
    fused = fused[0, 0]
    # the reference, voxel by voxel: squared distance to each tile's box, ties to the lower
    # index; the value is the tile's voxel at the position mirrored into the box
    tiles = [volume[z : z + tile[0], y : y + tile[1], x : x + tile[2]] for z, y, x in origins]
    expected, dist = nearest_tile_values(tiles, origins, shape)
    covered = dist == 0
    assert 0 < (~covered).sum() < covered.sum()
    np.testing.assert_array_equal(fused[covered], volume[covered])
    np.testing.assert_array_equal(fused[~covered], expected[~covered])


@pytest.mark.slow
def test_stitch_stage_registers_fuses_and_records(overlapping, prefect_harness, tmp_path):
    # the Prefect task end to end: raw.ome.zarr holds the fused volume, its lineage the
    # registration; the same tiles LZW-compressed give identical voxels
    import shutil

    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from lightsheet.config import StitchConfig
    from lightsheet.io.omezarr import read_image
    from tasks.stitch import solution_from_record, stitch_tiles

    folder, info = overlapping
    config = StitchConfig(overlap=info["overlap"])
    lzw = tmp_path / "lzw"
    lzw.mkdir()
    for path in (folder / "tiles").glob("*.tif"):
        tifffile.imwrite(
            lzw / path.name, tifffile.imread(path), photometric="minisblack", compression="lzw"
        )

    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 1, "threads_per_worker": 2, "processes": False}
    )

    @flow(task_runner=runner)
    def stitch_only(tiles: str, out: str) -> dict:
        manifest = discover(tiles, DEFAULT_PATTERN).to_dict()
        return stitch_tiles.submit(manifest, info["voxel_size_um"], config, out).result()

    record = stitch_only(str(folder / "tiles" / "*.tif"), str(tmp_path / "plain"))
    assert record["links_kept"] >= 12 and record["tiles_at_nominal"] == []
    raw, voxel, lineage = read_image(tmp_path / "plain" / "raw.ome.zarr")
    assert raw.shape == tuple(info["shape"]) and voxel == tuple(info["voxel_size_um"])
    solution = solution_from_record(lineage["registration"])
    errors = np.abs(solution.positions - true_positions(folder, info))
    assert errors.max() < TOLERANCE_VOX
    assert lineage["params"]["registration"]["overlap"] == list(info["overlap"])

    stitch_only(str(lzw / "*.tif"), str(tmp_path / "lzw-out"))
    compressed, _, _ = read_image(tmp_path / "lzw-out" / "raw.ome.zarr")
    np.testing.assert_array_equal(compressed.compute(), raw.compute())
    shutil.rmtree(lzw)


def test_overlap_sample_from_the_command_line(tmp_path):
    import pandas as pd
    import yaml

    from lightsheet.cli import main

    out = tmp_path / "ov"
    args = ["sample", str(out), "--size", "tiny", "--overlap", "0.2", "--stage-error-um", "3"]
    assert main([*args, "--grid", "1", "2", "2", "--channels", "1"]) == 0
    truth = pd.read_csv(out / "truth" / "tiles.csv")
    errors = truth[["error_z_um", "error_y_um", "error_x_um"]].to_numpy()
    assert len(truth) == 4 and np.abs(errors).max() <= 3 + 1e-9 and np.abs(errors).max() > 0.5
    np.testing.assert_allclose(errors.mean(0), 0, atol=1e-6)  # centred: the nominal frame
    positions = pd.read_csv(out / "positions.csv")
    np.testing.assert_allclose(
        positions[["z_um", "y_um", "x_um"]], truth[["nominal_z_um", "nominal_y_um", "nominal_x_um"]]
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["stitch"] == {"overlap": [0.0, 0.2, 0.2]}
    m = discover(str(out / "tiles" / "*.tif"), DEFAULT_PATTERN)
    assert m.grid_shape == (1, 1, 1, 2, 2)


def test_positions_file_errors_name_the_file(tmp_path, overlapping):
    from lightsheet.errors import ConfigError
    from lightsheet.stitch import nominal_layout

    folder, info = overlapping
    m = discover(str(folder / "tiles" / "*.tif"), DEFAULT_PATTERN)
    bad = tmp_path / "positions.csv"
    bad.write_text("y,x,y_um,x_um\n0,0,0,0\n")
    with pytest.raises(ConfigError, match=r"positions\.csv lacks columns \['z_um'\]"):
        nominal_layout(m, info["voxel_size_um"], positions=str(bad))
    bad.write_text("y,x,z_um,y_um,x_um\n0,0,0,0,0\n")
    with pytest.raises(ConfigError, match=r"no row for tile \{'y': '0', 'x': '1'\}"):
        nominal_layout(m, info["voxel_size_um"], positions=str(bad))
    rows = ["y,x,z_um,y_um,x_um"] + [f"{y},{x},0,0,{x}" for y in range(3) for x in range(3)]
    bad.write_text("\n".join(rows) + "\n")  # every tile at nearly one place
    with pytest.raises(ConfigError, match="more than half a tile"):
        nominal_layout(m, info["voxel_size_um"], positions=str(bad))


def test_stitch_config_checks():
    from pydantic import ValidationError

    from lightsheet.config import StitchConfig

    assert StitchConfig().overlap == 0.0
    assert StitchConfig(overlap=[0, 0.1, 0.1]).overlap == (0.0, 0.1, 0.1)
    for bad in ({"overlap": 0.5}, {"overlap": -0.1}, {"overlap": 0.1, "positions": "p.csv"}):
        with pytest.raises(ValidationError):
            StitchConfig(**bad)
