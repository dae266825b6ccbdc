"""Detection from a model's heads: one instance per cell, exact at any chunking."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

from lightsheet.config import SegmentConfig
from lightsheet.errors import SegmentError
from lightsheet.segment import segment_volume
from lightsheet.segment.model import (
    CANDIDATE_FEATURES,
    NEIGHBOUR_RADII,
    candidate_features,
    detection_classifier,
    detection_settings,
    model_cells,
)
from lightsheet.train import centre_map, spheres_mask

VOXEL_UM = (2.0, 1.0, 1.0)
TARGETS = ("nucleus", "centre")


def _maps(shape, centres_vox, diameter_um=9.0):
    """Ideal head maps: spheres (nucleus) and Gaussian bumps at the centres (centre)."""
    nucleus = spheres_mask(centres_vox, diameter_um, shape, VOXEL_UM).astype(np.float32)
    centre = centre_map(centres_vox, shape, VOXEL_UM, 0.25 * diameter_um)
    return np.stack([0.05 + 0.9 * nucleus, centre])


def _same_partition(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# two touching nuclei (centres 7 µm apart, diameter 9 µm: one component of the mask), and
# one on its own
CENTRES = np.array([[8.0, 20.0, 20.0], [8.0, 20.0, 27.0], [5.0, 40.0, 45.0]])


@pytest.mark.parametrize("chunks", [(16, 64, 64), (5, 13, 22), (3, 40, 7)])
def test_touching_cells_are_split_at_any_chunking(chunks):
    shape = (16, 64, 64)
    maps = _maps(shape, CENTRES)
    assert np.unique(np.where(maps[0] > 0.5, 1, 0)).size == 2
    image = da.from_array(maps[0] * 100, chunks=chunks)
    labels, table = model_cells(
        image,
        da.from_array(maps, chunks=(2, *chunks)),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(method="model"),
        targets=TARGETS,
        threshold=0.5,
        volume_range_um3=(10.0, 1e5),
    )
    assert len(table) == 3
    found = table[["z_um", "y_um", "x_um"]].to_numpy() / VOXEL_UM
    for c in CENTRES:
        assert np.linalg.norm((found - c) * VOXEL_UM, axis=1).min() < 2.0
    got = labels.compute()
    assert set(np.unique(got)) == {0, 1, 2, 3}
    whole, _ = model_cells(
        da.from_array(maps[0] * 100, chunks=shape),
        da.from_array(maps, chunks=(2, *shape)),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(method="model"),
        targets=TARGETS,
        threshold=0.5,
        volume_range_um3=(10.0, 1e5),
    )
    assert _same_partition(got, whole.compute())


def test_without_a_centre_head_touching_cells_merge_by_threshold():
    # an older model (nucleus + boundary heads) uses the distance-transform watershed
    shape = (16, 64, 64)
    maps = _maps(shape, CENTRES)
    maps[1] = 0.0
    _, table = model_cells(
        da.from_array(maps[0], chunks=8),
        da.from_array(maps, chunks=(2, 8, 32, 32)),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(method="model", watershed=False),
        targets=("nucleus", "boundary"),
        threshold=0.5,
        volume_range_um3=(10.0, 1e5),
    )
    assert len(table) == 2


def test_threshold_comes_from_the_validation_record_unless_set():
    record = {"detection": {"threshold": 0.62, "split_depth": 0.2}}
    assert detection_settings(record, SegmentConfig(method="model")) == (
        0.62,
        0.2,
        "model record (validation)",
    )
    t, _, source = detection_settings(record, SegmentConfig(method="model", threshold=0.3))
    assert t == 0.3 and source == "segment.threshold"
    with pytest.raises(SegmentError, match="no validated probability threshold"):
        detection_settings({}, SegmentConfig(method="model"))
    with pytest.raises(SegmentError, match=r"\(0, 1\)"):
        detection_settings({"detection": {"threshold": 1.5}}, SegmentConfig(method="model"))


# twelve cells of two brightnesses: the classifier below keeps the bright ones
MANY = np.array(
    [[4 + 3 * (i % 3), 12 + 14 * (i // 3 % 4), 10 + 30 * (i % 2)] for i in range(12)], float
)
BRIGHT = np.arange(12) % 2 == 0
KEEP_BRIGHT = {
    "candidate_threshold": 0.5,
    "features": list(CANDIDATE_FEATURES),
    "mean": [0.0] * len(CANDIDATE_FEATURES),
    "scale": [1.0] * len(CANDIDATE_FEATURES),
    "coef": [10.0 if f == "intensity_mean" else 0.0 for f in CANDIDATE_FEATURES],
    "intercept": -10.0 * 30.0,  # norm (0, 2): the bright (80) at 40, the dim (20) at 10
    "cut": 0.5,
}


def _many(chunks, **kw):
    """The twelve cells' image and maps, and `model_cells` on them (``kw`` passed on)."""
    shape = (16, 64, 64)
    maps = _maps(shape, MANY, diameter_um=7.0)
    level = np.zeros(shape, np.float32)
    for c, bright in zip(MANY, BRIGHT, strict=True):
        one = spheres_mask(c[None], 7.0, shape, VOXEL_UM)
        level[one] = 80.0 if bright else 20.0
    image, maps = da.from_array(level, chunks=chunks), da.from_array(maps, chunks=(2, *chunks))
    config = SegmentConfig(method="model", nucleus_diameter_um=7.0)
    labels, table = model_cells(
        image, maps, voxel_size_um=VOXEL_UM, config=config, targets=TARGETS, threshold=0.5,
        volume_range_um3=(10.0, 1e5), **kw,
    )  # fmt: skip
    return image, maps, labels, table


@pytest.mark.parametrize("chunks", [(16, 64, 64), (5, 13, 22)])
def test_candidate_features_equal_whole_array_scipy_at_any_chunking(chunks):
    from scipy import ndimage as ndi

    image, maps, labels, table = _many(chunks)
    assert len(table) == 12
    got = candidate_features(
        labels, table, maps, targets=TARGETS, voxel_size_um=VOXEL_UM, nucleus_diameter_um=7.0,
        norm=(0.0, 2.0),
    )  # fmt: skip
    lab, m, img, idx = labels.compute(), maps.compute(), image.compute(), table["label"].to_numpy()
    np.testing.assert_allclose(got["intensity_mean"], ndi.mean(img, lab, idx) / 2, rtol=1e-6)
    np.testing.assert_allclose(got["nucleus_max"], ndi.maximum(m[0], lab, idx), rtol=1e-6)
    np.testing.assert_allclose(got["nucleus_mean"], ndi.mean(m[0], lab, idx), rtol=1e-5)
    np.testing.assert_allclose(got["centre_max"], ndi.maximum(m[1], lab, idx), rtol=1e-6)
    # neighbours: brute force, each count divided by the share of its cube inside the volume
    p = table[["z_um", "y_um", "x_um"]].to_numpy()
    dist = np.linalg.norm(p[:, None] - p[None], axis=2)
    extent = np.array(lab.shape) * VOXEL_UM
    lo = np.array(VOXEL_UM) / 2
    for r in NEIGHBOUR_RADII:
        rad = r * 7.0
        inside = np.clip(np.minimum(p + rad, extent - lo) - np.maximum(p - rad, -lo), 0, None)
        want = ((dist <= rad).sum(1) - 1) / np.maximum(np.prod(inside / (2 * rad), 1), 1e-3)
        np.testing.assert_allclose(got[f"neighbours_{r}d"], want, rtol=1e-9)


@pytest.mark.parametrize("chunks", [(16, 64, 64), (3, 40, 7)])
def test_the_record_s_classifier_drops_the_candidates_it_rejects(chunks):
    image, _, labels, table = _many(chunks, classifier=KEEP_BRIGHT, norm=(0.0, 2.0))
    assert len(table) == BRIGHT.sum()
    np.testing.assert_allclose(table["mean_intensity"], 80.0)
    found = table[["z_um", "y_um", "x_um"]].to_numpy()
    for c in MANY[BRIGHT] * VOXEL_UM:
        assert np.linalg.norm(found - c, axis=1).min() < 1.0
    lab = labels.compute()
    assert set(np.unique(lab)) == set(range(len(table) + 1))
    assert (image.compute()[lab > 0] == 80.0).all()  # the dim cells' voxels are background


def test_the_record_s_classifier_sets_the_candidate_threshold_unless_a_threshold_is_set():
    record = {"detection": {"threshold": 0.88, "classifier": KEEP_BRIGHT}}
    config = SegmentConfig(method="model")
    assert detection_settings(record, config)[0] == 0.5
    assert detection_classifier(record, config) is KEEP_BRIGHT
    own = SegmentConfig(method="model", threshold=0.7)
    assert detection_settings(record, own)[0] == 0.7 and detection_classifier(record, own) is None
    bad = {"detection": {"threshold": 0.88, "classifier": {**KEEP_BRIGHT, "features": ["a"]}}}
    with pytest.raises(SegmentError, match="detection.classifier"):
        detection_classifier(bad, config)


def test_segment_volume_with_the_model_itself():
    from lightsheet.unet import UNet

    torch.manual_seed(0)
    net = UNet(depth=1, width=2, features=2).eval()
    net.record = {"detection": {"threshold": 0.5}}
    net.targets = TARGETS
    net.voxel_size_um = (4.0, 1.5, 1.5)
    image = da.random.default_rng(0).random((6, 40, 40), chunks=(3, 20, 20)) * 100
    res = segment_volume(
        image, voxel_size_um=VOXEL_UM, config=SegmentConfig(method="model"), model=net
    )
    assert res.threshold == 0.5
    assert res.labels.shape == image.shape and res.count_map.sum() == res.n == len(res.table)
    with pytest.raises(ValueError, match="min_volume_um3"):  # refused by the config itself
        SegmentConfig(method="model", min_volume_um3=10.0, max_volume_um3=5.0)
