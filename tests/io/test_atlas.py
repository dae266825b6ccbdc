"""Atlas loading: BrainGlobe folders and OME-Zarr annotations, lazily, with clear errors."""

from __future__ import annotations

import json
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile

from lightsheet.errors import AtlasError
from lightsheet.io.atlas import (
    Atlas,
    load_atlas,
    read_structures,
    split_hemispheres,
    validate_orientation,
    write_atlas,
)

STRUCTURES = [
    {"id": 997, "acronym": "root", "name": "root", "structure_id_path": [997]},
    {"id": 8, "acronym": "grey", "name": "Grey matter", "structure_id_path": [997, 8]},
    {"id": 10, "acronym": "CTX", "name": "Cortex", "structure_id_path": [997, 8, 10]},
    {"id": 11, "acronym": "TH", "name": "Thalamus", "structure_id_path": [997, 8, 11]},
    {"id": 20, "acronym": "fib", "name": "Fibre tracts", "structure_id_path": [997, 20]},
]


def random_annotation(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 997, 8, 10, 11, 20], np.uint32), size=shape)


@pytest.fixture
def atlas_dir(tmp_path):
    ann = random_annotation((9, 7, 6))
    hemi = np.where(ann > 0, 1 + (np.arange(6) >= 3), 0).astype(np.uint8)
    write_atlas(
        tmp_path / "atlas",
        ann,
        STRUCTURES,
        resolution_um=(25, 20, 10),
        orientation="asr",
        hemispheres=hemi,
    )
    return tmp_path / "atlas", ann, hemi


def test_load_round_trip(atlas_dir):
    path, ann, hemi = atlas_dir
    atlas = load_atlas(path)
    assert isinstance(atlas.annotation, da.Array) and isinstance(atlas.hemispheres, da.Array)
    assert atlas.shape == ann.shape
    assert atlas.resolution_um == (25.0, 20.0, 10.0)
    assert atlas.orientation == "asr"
    assert atlas.voxel_volume_mm3 == pytest.approx(25 * 20 * 10 * 1e-9)
    assert atlas.hemispheres_from_file
    np.testing.assert_array_equal(atlas.annotation.compute(), ann)
    np.testing.assert_array_equal(atlas.hemispheres.compute(), hemi)
    s = atlas.structures
    assert list(s.index) == [997, 8, 10, 11, 20]
    assert s.loc[10, "acronym"] == "CTX" and s.loc[10, "structure_name"] == "Cortex"
    assert s.loc[10, "parent_structure_id"] == 8 and s.loc[10, "depth"] == 2
    assert s["parent_structure_id"].isna().tolist() == [True, False, False, False, False]


def test_lazy_chunks_and_pickle(atlas_dir):
    path, ann, _ = atlas_dir
    # a chunk budget of two planes: several chunks, each read on its own
    atlas = load_atlas(path, chunk_bytes=2 * 7 * 6 * 4)
    assert atlas.annotation.numblocks == (5, 1, 1)
    assert atlas.annotation.chunks[0] == (2, 2, 2, 2, 1)
    np.testing.assert_array_equal(atlas.annotation.blocks[3].compute(), ann[6:8])
    # the graph travels to distributed workers: it must pickle (no open file handles)
    clone = pickle.loads(pickle.dumps(atlas.annotation))
    np.testing.assert_array_equal(clone.compute(), ann)


def test_tiled_compressed_tiff(tmp_path):
    ann = random_annotation((5, 40, 48), seed=3)
    write_atlas(
        tmp_path, ann, STRUCTURES, resolution_um=(10, 10, 10), orientation="asr", symmetric=True
    )
    tifffile.imwrite(tmp_path / "annotation.tiff", ann, tile=(16, 16), compression="zlib")
    atlas = load_atlas(tmp_path, chunk_bytes=16 * 16 * 4)
    assert atlas.annotation.numblocks[1] > 1
    np.testing.assert_array_equal(atlas.annotation.compute(), ann)


def test_omezarr_annotation(tmp_path):
    import zarr
    from ome_zarr.writer import write_image

    ann = random_annotation((8, 6, 10), seed=1)
    write_atlas(
        tmp_path / "a", ann, STRUCTURES, resolution_um=(25, 25, 25), orientation="asr",
        symmetric=True,
    )  # fmt: skip
    (tmp_path / "a" / "annotation.tiff").unlink()
    group = zarr.open_group(str(tmp_path / "a" / "annotation.ome.zarr"), mode="w")
    units = dict.fromkeys("zyx", "millimeter")
    write_image(
        ann,
        group,
        axes="zyx",
        scale_factors=[],
        scale=dict.fromkeys("zyx", 0.025),
        axes_units=units,
    )
    for target in (tmp_path / "a", tmp_path / "a" / "annotation.ome.zarr"):
        atlas = load_atlas(target)
        assert atlas.resolution_um == pytest.approx((25.0, 25.0, 25.0))
        np.testing.assert_array_equal(atlas.annotation.compute(), ann)
        assert not atlas.hemispheres_from_file
    # a scale that disagrees with metadata.json is an error
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    meta["resolution"] = [10, 10, 10]
    (tmp_path / "a" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(AtlasError, match="differs from metadata.json 'resolution'"):
        load_atlas(tmp_path / "a")


@pytest.mark.parametrize("missing", ["metadata.json", "structures.json", "annotation.tiff"])
def test_missing_file(atlas_dir, missing):
    path, _, _ = atlas_dir
    (path / missing).unlink()
    with pytest.raises(AtlasError, match=f"missing {missing}"):
        load_atlas(path)


def test_missing_folder(tmp_path):
    with pytest.raises(AtlasError, match="no such file or folder"):
        load_atlas(tmp_path / "nope")


def test_invalid_orientation_in_metadata(atlas_dir):
    path, _, _ = atlas_dir
    meta = json.loads((path / "metadata.json").read_text())
    meta["orientation"] = "aas"
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(AtlasError, match="invalid orientation 'aas'"):
        load_atlas(path)


@pytest.mark.parametrize("bad", ["as", "asrl", "xyz", "aps", "ssr", ""])
def test_validate_orientation(bad):
    with pytest.raises(AtlasError, match="one from each pair"):
        validate_orientation(bad)
    assert validate_orientation("RAS") == "ras"


def test_shape_mismatches(atlas_dir):
    path, ann, _ = atlas_dir
    tifffile.imwrite(path / "hemispheres.tiff", np.ones((9, 7, 5), np.uint8))
    with pytest.raises(AtlasError, match="hemispheres.tiff: shape"):
        load_atlas(path)
    meta = json.loads((path / "metadata.json").read_text())
    meta["shape"] = [9, 7, 7]
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(AtlasError, match="differs from metadata.json 'shape'"):
        load_atlas(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[0].pop("structure_id_path"), "lacks"),
        (lambda s: s.append(dict(s[1])), "duplicate structure ids"),
        (lambda s: s[2].update(structure_id_path=[997, 5, 10]), r"ancestors \[5\]"),
        (lambda s: s[2].update(structure_id_path=[997, 8]), "ending with its own id"),
        (
            lambda s: s.append({"id": 0, "acronym": "bg", "name": "bg", "structure_id_path": [0]}),
            "expected a positive id",
        ),
    ],
)
def test_bad_structures(tmp_path, edit, message):
    records = [dict(s) for s in STRUCTURES]
    edit(records)
    (tmp_path / "structures.json").write_text(json.dumps(records))
    with pytest.raises(AtlasError, match=message):
        read_structures(tmp_path / "structures.json")


def test_structures_not_json(tmp_path):
    (tmp_path / "structures.json").write_text("{not json")
    with pytest.raises(AtlasError, match="cannot read as JSON"):
        read_structures(tmp_path / "structures.json")


@pytest.mark.parametrize("orientation", ["asr", "asl", "rsa", "lip", "sla"])
@pytest.mark.parametrize("n_lr", [6, 7])
def test_split_hemispheres(orientation, n_lr):
    axis = next(i for i, c in enumerate(orientation) if c in "lr")
    shape = [4, 5, 3]
    shape[axis] = n_lr
    ann = random_annotation(tuple(shape), seed=n_lr)
    hemi = split_hemispheres(da.from_array(ann, chunks=2), orientation).compute()
    # expected: first half (centres up to the midpoint) on the side the axis starts at
    idx = np.arange(n_lr)
    starts_right = orientation[axis] == "r"
    first = np.where(idx + 0.5 <= n_lr / 2, 2 if starts_right else 1, 1 if starts_right else 2)
    expect = np.moveaxis(np.broadcast_to(first, (*np.delete(shape, axis), n_lr)), -1, axis)
    expect = np.where(ann > 0, expect, 0)
    np.testing.assert_array_equal(hemi, expect)
    assert hemi.dtype == np.uint8


def test_no_hemispheres_file_splits_only_a_symmetric_atlas(atlas_dir):
    path, ann, _ = atlas_dir
    (path / "hemispheres.tiff").unlink()
    with pytest.raises(AtlasError, match=r"no hemispheres.tiff, .*\(symmetric: False\)"):
        load_atlas(path)
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps({**meta, "symmetric": True}))
    atlas = load_atlas(path)
    assert not atlas.hemispheres_from_file
    hemi = atlas.hemispheres.compute()
    # asr: axis 2 starts at the right, so its first half is right (2)
    assert set(np.unique(hemi[:, :, :3][ann[:, :, :3] > 0])) == {2}
    assert set(np.unique(hemi[:, :, 3:][ann[:, :, 3:] > 0])) == {1}
    assert (hemi[ann == 0] == 0).all()


def test_float_annotation_rejected(tmp_path):
    write_atlas(
        tmp_path,
        random_annotation((3, 3, 3)),
        STRUCTURES,
        resolution_um=(1, 1, 1),
        orientation="asr",
    )
    tifffile.imwrite(tmp_path / "annotation.tiff", np.zeros((3, 3, 3), np.float32))
    with pytest.raises(AtlasError, match="expected an integer label volume"):
        load_atlas(tmp_path)


def test_from_arrays_matches_loaded(atlas_dir):
    path, ann, hemi = atlas_dir
    loaded = load_atlas(path)
    built = Atlas.from_arrays(
        ann, STRUCTURES, resolution_um=(25, 20, 10), orientation="asr", hemispheres=hemi
    )
    a, b = dask.compute(loaded.annotation, built.annotation)
    np.testing.assert_array_equal(a, b)
    assert built.structures.equals(loaded.structures)


# -- BrainGlobe's own library as the reference ---------------------------------------------


def test_lookup_matches_brainglobe_atlasapi(tmp_path):
    """10,000 random positions (and exact voxel faces) give BrainGlobe's region and side."""
    from brainglobe_atlasapi.core import Atlas as BrainGlobeAtlas

    from lightsheet.density import image_to_atlas, lookup_points

    shape, res = (23, 17, 19), (25.0, 20.0, 10.0)
    ann = random_annotation(shape, seed=7)
    hemi = np.where(ann > 0, 1 + (np.arange(shape[2]) >= 9), 0).astype(np.uint8)
    folder = write_atlas(
        tmp_path / "bg_atlas", ann, STRUCTURES, resolution_um=res, orientation="asr",
        hemispheres=hemi, reference=np.ones(shape, np.uint16),
    )  # fmt: skip
    bg = BrainGlobeAtlas(folder)
    ours = load_atlas(folder)
    rng = np.random.default_rng(11)
    extent = np.asarray(shape) * res
    points = rng.uniform(0, 1, size=(10_000, 3)) * extent
    # positions exactly on voxel faces, where rounding and truncation part ways
    faces = rng.integers(0, shape, size=(500, 3)) * np.asarray(res)
    points = np.concatenate([points, faces, faces + 1e-9, np.maximum(faces - 1e-9, 0)])
    # the atlas as its own image: identity in µm
    t = image_to_atlas(ours, image_shape=shape, voxel_size_um=res, orientation="asr")
    sid, side = lookup_points(ours, t.to_atlas_voxel(points))
    expected_sid = [bg.structure_from_coords(p, microns=True) for p in points]
    expected_side = [bg.hemisphere_from_coords(p, microns=True) for p in points]
    np.testing.assert_array_equal(sid, expected_sid)
    np.testing.assert_array_equal(side, expected_side)


def _installed_atlas(brainglobe_dir, name, version="1.2"):
    folder = brainglobe_dir / f"{name}_v{version}"
    write_atlas(
        folder, random_annotation((5, 4, 3)), STRUCTURES, resolution_um=(10, 10, 10),
        orientation="asr", reference=np.ones((5, 4, 3), np.uint16), name=name, symmetric=True,
    )  # fmt: skip
    return folder


def test_atlas_by_name_from_brainglobe_config(tmp_path, monkeypatch):
    from brainglobe_atlasapi.bg_atlas import BrainGlobeAtlas

    from lightsheet.io.atlas import atlas_metadata, resolve_atlas

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    store = tmp_path / "atlases"
    conf = config_dir / "bg_config.conf"
    conf.write_text(f"[default_dirs]\nbrainglobe_dir = {store}\ninterm_download_dir = {store}\n")
    folder = _installed_atlas(store, "test_mouse_10um")
    monkeypatch.setenv("BRAINGLOBE_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_atlas("test_mouse_10um") == folder
    # brainglobe-atlasapi finds the same folder (offline: the atlas is there)
    bg = BrainGlobeAtlas("test_mouse_10um", config_dir=conf, check_latest=False)
    assert bg.root_dir == folder
    atlas = load_atlas("test_mouse_10um")
    assert atlas.path == folder and atlas.shape == (5, 4, 3)
    meta = atlas_metadata("test_mouse_10um")
    assert (meta["name"], meta["version"]) == ("test_mouse_10um", "0.1")
    # a folder path still works, and wins over a name
    assert resolve_atlas(folder) == folder
    # a deployment's data roots are checked on the folder the name resolves to
    from lightsheet.access import check_within_roots, config_paths
    from lightsheet.config import PipelineConfig
    from lightsheet.errors import PathNotAllowedError

    config = PipelineConfig(
        input=str(tmp_path / "t" / "*.tif"), voxel_size_um=(2, 1, 1), psf=tmp_path / "psf.tif",
        atlas="test_mouse_10um", output=tmp_path / "out",
    )  # fmt: skip
    atlas_paths = config_paths(config)["atlas"]
    assert atlas_paths[0] == folder and (folder / "annotation.tiff") in atlas_paths
    check_within_roots({"atlas": atlas_paths}, [store])
    with pytest.raises(PathNotAllowedError, match="atlas: "):
        check_within_roots({"atlas": atlas_paths}, [tmp_path / "home"])


def test_atlas_by_name_default_folder_and_errors(tmp_path, monkeypatch):
    from lightsheet.io.atlas import brainglobe_dir, resolve_atlas

    home = tmp_path / "home"
    monkeypatch.delenv("BRAINGLOBE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert brainglobe_dir() == (home / ".brainglobe", "default")
    with pytest.raises(AtlasError) as err:
        resolve_atlas("allen_mouse_25um")
    message = str(err.value)
    assert str(home / ".brainglobe" / "allen_mouse_25um_v*") in message
    assert "brainglobe install -a allen_mouse_25um" in message
    assert str(tmp_path / "allen_mouse_25um") in message  # the folder it also looked for
    folder = _installed_atlas(home / ".brainglobe", "allen_mouse_25um")
    assert resolve_atlas("allen_mouse_25um") == folder
    _installed_atlas(home / ".brainglobe", "allen_mouse_25um", version="1.3")
    with pytest.raises(AtlasError, match="several versions"):
        resolve_atlas("allen_mouse_25um")
    with pytest.raises(AtlasError, match="no such file or folder"):
        resolve_atlas(tmp_path / "not" / "there")
