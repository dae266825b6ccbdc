"""Detection from a model's heads: one instance per cell, exact at any chunking."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

from lightsheet.config import SegmentConfig
from lightsheet.errors import SegmentError
from lightsheet.segment import segment_volume
from lightsheet.segment.model import detection_settings, model_cells
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
