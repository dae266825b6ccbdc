"""Featurize task: per-pixel UNet features of the nuclei channel → features OME-Zarr."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import dask.array as da
from prefect import task

from lightsheet.config import FeaturizeConfig
from lightsheet.featurize import featurize, load_model
from lightsheet.io.omezarr import read_image, write_image
from tasks._common import (
    OUTPUTS,
    compute_with_progress,
    dask_client,
    image_record,
    lineage_attrs,
    publish_image_stage,
)


@task(name="featurize")
def featurize_volume(image: dict, channel: int, config: FeaturizeConfig, output: str) -> dict:
    """UNet features of one channel at every time point; features are the channel axis."""
    start = time.monotonic()
    path = Path(output) / OUTPUTS["featurize"]
    model = load_model(config.model)
    with dask_client():
        source, voxel_size_um, _ = read_image(image["path"])
        _check_channel(channel, source.shape[1], "segment.channel")
        features = da.stack(
            [
                featurize(
                    source[t, channel], model, dtype=config.dtype, batch_size=config.batch_size
                )
                for t in range(source.shape[0])
            ]
        )
        write_image(
            features,
            path,
            voxel_size_um=voxel_size_um,
            name="features",
            channel_names=[f"feature{i}" for i in range(features.shape[1])],
            attrs=lineage_attrs(
                "featurize",
                {**config.model_dump(mode="json"), "channel": channel},
                {"image": image["path"], "model": str(config.model or "bundled default")},
            ),
            compute=partial(compute_with_progress, description="featurize"),
        )
    record = image_record("featurize", path, features, voxel_size_um, time.monotonic() - start)
    publish_image_stage(record)
    return record


def _check_channel(channel: int, n_channels: int, parameter: str) -> None:
    if not 0 <= channel < n_channels:
        raise ValueError(
            f"{parameter}: channel {channel} does not exist; the image has {n_channels} "
            f"channels (0..{n_channels - 1})"
        )
