"""Training from annotated volumes: data loading, split by volume, smoke run, record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightsheet.config import TrainConfig, TrainData
from lightsheet.errors import AnnotationError, ConfigError, ModelError
from lightsheet.train import (
    THRESHOLDS,
    centre_map,
    load_train_config,
    load_volumes,
    spheres_mask,
    split_volumes,
    train,
)

FIXTURE = Path(__file__).parents[1] / "data" / "delivr-cfos"
DELIVR_UM = (6.0, 1.62, 1.62)


def _delivr(**kw) -> TrainData:
    args = {
        "name": "delivr-cfos",
        "licence": "MIT",
        "licence_file": FIXTURE / "LICENSE",
        "source": "github.com/erturklab/delivr_cfos",
        "voxel_size_um": DELIVR_UM,
        "images": "images/*.tif",
        "masks": "masks/{name}_mask.tif",
        "min_component_voxels": 4,
    }
    return TrainData(**{**args, **kw})


def _smoke_config(**kw) -> TrainConfig:
    args = {
        "data": [_delivr()],
        "steps": 12,
        "batch_size": 4,
        "crop_px": 32,
        "model": {"width": 4, "features": 4, "in_channels": 3},
        "match_distance_um": 6.0,
        "device": "cpu",
    }
    return TrainConfig(**{**args, **kw})


# ------------------------------------------------------------------------------- data


def test_masks_give_cells_and_centres_like_the_points_list():
    config = _smoke_config()
    volumes = load_volumes(config, FIXTURE, voxel_size_um=DELIVR_UM)
    assert [v.name for v in volumes] == [
        "delivr-cfos/patch_1008_0",
        "delivr-cfos/patch_695_4",
        "delivr-cfos/patch_969_6",
    ]
    for v in volumes:
        stem = v.name.split("/")[1]
        points = np.loadtxt(FIXTURE / "points" / f"{stem}_points.csv", delimiter=",", skiprows=1)
        kept = points[points[:, 3] >= 4, :3]  # components of at least 4 voxels
        np.testing.assert_allclose(np.sort(v.centres, axis=0), np.sort(kept, axis=0), atol=2e-3)
        assert v.image.shape == v.nucleus.shape == (16, 64, 64)
        assert v.image.dtype == np.float32 and 0.0 <= np.median(v.image) <= 1.0
        assert v.fingerprint.startswith("sha256:")


def test_point_annotations_and_other_voxel_sizes_are_resampled():
    # the same crops declared at twice the model's voxel size in y and x: read at their own
    # voxel size, resampled to the model's (as featurize does), points drawn as spheres
    data = _delivr(voxel_size_um=(6.0, 3.24, 3.24), masks=None, points="points/{name}_points.csv")
    config = _smoke_config(data=[data], nucleus_diameter_um=10.0)
    volumes = load_volumes(config, FIXTURE, voxel_size_um=DELIVR_UM)
    v = volumes[0]
    assert v.image.shape == (16, 127, 127)  # (64 - 1) * 2 + 1
    assert v.nucleus is None  # drawn once the diameter is known (in `train`)
    raw = np.loadtxt(FIXTURE / "points" / "patch_1008_0_points.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(v.centres, raw[:, :3] * [1, 2, 2])
    mask = spheres_mask(v.centres, 10.0, v.image.shape, DELIVR_UM)
    assert mask[tuple(np.round(v.centres[0]).astype(int))]


def test_sample_volumes_are_read_with_ingest_and_stitch(tiny_sample):
    import pandas as pd

    data = TrainData(name="phantom", licence="generated", sample=tiny_sample)
    config = TrainConfig(data=[data])
    info = json.loads((tiny_sample / "sample.json").read_text())
    volumes = load_volumes(config, Path("."), voxel_size_um=info["voxel_size_um"])
    truth = pd.read_csv(tiny_sample / "truth" / "cells.csv")
    assert len(volumes) == 1 and len(volumes[0].centres) == len(truth)
    assert volumes[0].image.shape == tuple(info["shape"][2:])
    assert volumes[0].nucleus.mean() > 0.001


def test_split_is_by_whole_volume_across_cell_counts():
    config = _smoke_config()
    volumes = load_volumes(config, FIXTURE, voxel_size_um=DELIVR_UM)
    train_v, val_v = split_volumes(volumes, config)
    assert len(val_v) == 1 and len(train_v) == 2
    assert {v.name for v in train_v}.isdisjoint(v.name for v in val_v)
    # the held-out one is picked from the middle of the cell counts, not the extremes
    assert val_v[0].name == "delivr-cfos/patch_1008_0"
    named = _smoke_config(validation=["delivr-cfos/patch_695_4"])
    assert [v.name for v in split_volumes(volumes, named)[1]] == ["delivr-cfos/patch_695_4"]
    with pytest.raises(ConfigError, match="not volumes"):
        split_volumes(volumes, _smoke_config(validation=["nope"]))
    with pytest.raises(ConfigError, match="one volume cannot be split"):
        split_volumes(volumes[:1], config)


def test_centre_map_peaks_at_the_centres():
    m = centre_map(np.array([[4.0, 10.0, 10.0]]), (9, 21, 21), (2.0, 1.0, 1.0), 2.0)
    assert np.unravel_index(m.argmax(), m.shape) == (4, 10, 10) and m.max() == 1.0
    assert abs(m[4, 10, 12] - np.exp(-0.5)) < 1e-6 and abs(m[5, 10, 10] - np.exp(-0.5)) < 1e-6


def test_bad_training_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of images"):
        TrainData(name="x", licence="MIT", voxel_size_um=DELIVR_UM, masks="m.tif")
    with pytest.raises(ValueError, match="exactly one of masks or points"):
        TrainData(name="x", licence="MIT", voxel_size_um=DELIVR_UM, images="*.tif")
    with pytest.raises(ValueError, match="voxel_size_um is required"):
        TrainData(name="x", licence="MIT", images="*.tif", masks="{name}.tif")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig.model_validate({"data": [_delivr().model_dump()], "epochs": 3})
    with pytest.raises(AnnotationError, match="mask .*nope_mask.tif not found"):
        load_volumes(
            _smoke_config(data=[_delivr(masks="masks/nope_mask.tif")]),
            FIXTURE,
            voxel_size_um=DELIVR_UM,
        )
    with pytest.raises(AnnotationError, match="no files match"):
        load_volumes(
            _smoke_config(data=[_delivr(images="none/*.tif")]), FIXTURE, voxel_size_um=DELIVR_UM
        )
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": [], "steps": 3}))
    with pytest.raises(ConfigError, match="invalid training config"):
        load_train_config(bad)


# ------------------------------------------------------------------------------- smoke run


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model.safetensors"
    record = train(_smoke_config(), out, base=FIXTURE, command="pytest smoke")
    return out, record


def test_smoke_training_writes_a_safe_checkpoint_with_its_record(smoke_model):
    from lightsheet.featurize import load_model

    out, record = smoke_model
    assert out.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    model = load_model(out)
    assert model.record == record == json.loads(out.with_suffix(".json").read_text())
    assert model.voxel_size_um == DELIVR_UM and model.targets == ("nucleus", "centre")
    assert model.in_channels == 3 and model.detection["threshold"] in THRESHOLDS
    (data,) = record["data"]
    assert data["name"] == "delivr-cfos" and data["licence"] == "MIT"
    assert data["licence_text"].startswith("MIT License") and len(data["volumes"]) == 3
    norm = record["normalisation"]
    assert norm["method"] == "background" and norm["background_percentile"] == 50.0
    for v in data["volumes"]:  # each volume: 0 stays 0, its median maps to 0.5
        assert norm["per_volume"][v["name"]][0] == 0.0
    val = record["validation"]
    assert val["volumes"] == ["delivr-cfos/patch_1008_0"]
    assert set(val["volumes"]).isdisjoint(record["training"]["train_volumes"])
    assert 0.0 <= val["f1"] <= 1.0 and val["threshold"] == record["detection"]["threshold"]
    assert len(val["f1_by_threshold"]) == len(THRESHOLDS)
    assert np.isfinite(record["training"]["loss_history"]).all()
    # no candidates' classifier unless the config asks for one
    assert "classifier" not in record["detection"]
    assert record["detection"]["classifier_fitted"].startswith("off (training config")


def test_a_classifier_is_fitted_only_on_enough_candidates(tmp_path):
    # asked for, a 12-step model finds too few cells on its one held-out patch: the record
    # says so, and the model path uses the threshold alone
    config = _smoke_config(candidate_classifier=True)
    record = train(config, tmp_path / "m.safetensors", base=FIXTURE)
    assert "classifier" not in record["detection"]
    assert record["detection"]["classifier_fitted"].startswith("not fitted: ")
    assert "fewer than 20 of either" in record["detection"]["classifier_fitted"]


def test_the_classifier_is_fitted_on_the_held_out_candidates_and_keeps_the_annotated():
    # ideal heads over 60 cells of which the annotation marks the 30 bright ones: the
    # classifier fitted on the candidates keeps exactly those
    import dask.array as da

    from lightsheet.config import SegmentConfig
    from lightsheet.segment.model import model_cells
    from lightsheet.train.data import AnnotatedVolume
    from lightsheet.train.validation import _fit_on_validation

    vs, shape, d = (2.0, 1.0, 1.0), (16, 96, 96), 7.0
    grid = np.array(
        [[z, 8 + 16 * i, 8 + 16 * j] for z in (4, 11) for i in range(6) for j in range(5)]
    )
    marked = np.arange(len(grid)) % 2 == 0
    image = np.zeros(shape, np.float32)
    for c, bright in zip(grid, marked, strict=True):
        image[spheres_mask(c[None].astype(float), d, shape, vs)] = 1.0 if bright else 0.3
    nucleus = spheres_mask(grid.astype(float), d, shape, vs)
    maps = np.stack([0.05 + 0.9 * nucleus, centre_map(grid.astype(float), shape, vs, d / 4)])
    volume = AnnotatedVolume(
        name="v", dataset="v", image=image, nucleus=nucleus, centres=grid[marked].astype(float),
        fingerprint="sha256:0", norm=(0.0, 1.0),
    )  # fmt: skip
    fitted, how = _fit_on_validation({"v": maps.astype(np.float32)}, [volume], np.array(vs), d, 3.5)
    assert how.startswith("logistic regression") and fitted["f1"] == 1.0
    _, table = model_cells(
        da.from_array(image, chunks=(8, 40, 40)), da.from_array(maps, chunks=(2, 8, 40, 40)),
        voxel_size_um=vs, config=SegmentConfig(method="model", nucleus_diameter_um=d),
        targets=("nucleus", "centre"), threshold=fitted["candidate_threshold"],
        volume_range_um3=(10.0, 1e5), classifier=fitted,
    )  # fmt: skip
    found = table[["z_um", "y_um", "x_um"]].to_numpy()
    assert len(found) == marked.sum()
    assert np.linalg.norm(found[:, None] - grid[marked] * vs, axis=2).min(axis=0).max() < 1.0


def test_the_candidates_classifier_is_the_penalised_maximum_likelihood():
    # reference: SciPy's minimiser on the same objective, and the best-F1 cut by brute force
    import pandas as pd
    from scipy.optimize import minimize

    from lightsheet.segment.model import apply_classifier
    from lightsheet.train.validation import fit_classifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, 2.0]
    y = rng.random(400) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - 0.3 * (x[:, 1] - 10) + 0.5)))
    features = pd.DataFrame(x, columns=["a", "b", "c"])
    fit = fit_classifier(features, y, n_cells=int(y.sum()) + 30)
    z = np.column_stack([(x - x.mean(0)) / x.std(0), np.ones(len(x))])

    def loss(w):
        t = z @ w
        return np.mean(np.logaddexp(0, t) - y * t) + 0.5e-3 * np.sum(w[:-1] ** 2)

    ref = minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose([*fit["coef"], fit["intercept"]], ref, atol=1e-4)
    keep = apply_classifier(features, fit)
    f1 = 2 * (keep & y).sum() / (keep.sum() + y.sum() + 30)
    p = 1 / (1 + np.exp(-(z @ ref)))
    best = max(
        2 * ((p > c) & y).sum() / ((p > c).sum() + y.sum() + 30)
        for c in np.arange(0.05, 0.951, 0.01)
    )
    assert f1 == pytest.approx(fit["f1"], abs=1e-4) and f1 == pytest.approx(best, abs=1e-4)


def test_featurize_normalises_as_the_model_was_trained(smoke_model):
    import dask.array as da
    import tifffile

    from lightsheet.featurize import head_probabilities, load_model, run_model
    from lightsheet.featurize import model_intensity_range as model_range

    out, record = smoke_model
    model = load_model(out)
    image = tifffile.imread(next((FIXTURE / "images").glob("*.tif"))).astype(np.float32)
    lo, hi = model_range(da.from_array(image), model).compute()
    assert lo == 0.0 and hi == pytest.approx(2.0 * np.median(image))  # the whole patch here
    blocks = head_probabilities(
        da.from_array(image, chunks=(40, 48, 48)), model, voxel_size_um=DELIVR_UM
    ).compute()
    ref = run_model(image, model, norm=(0.0, hi), mode="head", voxel_size_um=DELIVR_UM)
    np.testing.assert_allclose(blocks, ref, atol=2e-4)
    # a record without a method (older models) keeps the robust percentiles
    model.record = {k: v for k, v in record.items() if k != "normalisation"}
    expect = np.percentile(image, [1.0, 99.8])
    np.testing.assert_allclose(model_range(da.from_array(image), model).compute(), expect)
    model.record = {**record, "normalisation": {"method": "zscore"}}
    with pytest.raises(ModelError, match="normalisation .*zscore"):
        model_range(da.from_array(image), model)


def test_the_record_is_shown_by_lineage(smoke_model):
    from lightsheet.cli import format_lineage_step

    _, record = smoke_model
    step = {
        "stage": "segment",
        "inputs": {"model": {"kind": "model checkpoint", "path": "m", "record": record}},
    }
    text = format_lineage_step("labels.ome.zarr", step)
    assert "data 'delivr-cfos' (MIT licence" in text
    assert "trained at voxel size (z, y, x) [6.0, 1.62, 1.62] µm" in text
    assert "normalisation: background (intensities of the whole volume divided by" in text
    assert "held-out scores (1 volumes, match within 6.0 µm): F1" in text
    assert f"probability threshold {record['detection']['threshold']}" in text
    fitted = {**record["detection"], "classifier": {"candidate_threshold": 0.5, "cut": 0.3,
              "features": ["a", "b"], "f1": 0.66}}  # fmt: skip
    step["inputs"]["model"]["record"] = {**record, "detection": fitted}
    text = format_lineage_step("labels.ome.zarr", step)
    assert "candidates at probability 0.5, kept by a logistic regression on 2 features" in text


def test_cli_train(tmp_path):
    from lightsheet.cli import main

    cfg = tmp_path / "train.yaml"
    config = _smoke_config(steps=2).model_dump(mode="json")
    config["data"][0]["licence_file"] = "LICENSE"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "m.safetensors"
    code = main(["train", str(cfg), "--out", str(out), "--data-root", str(FIXTURE), "--seed", "3"])
    assert code == 0 and out.is_file()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["training"]["seed"] == 3 and "--seed 3" in record["command"]
    assert main(["train", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
