"""Deconvolve task: raw → float32 Richardson–Lucy deconvolved OME-Zarr."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import dask.array as da
import numpy as np
from prefect import task

from lightsheet.config import DeconvolveConfig
from lightsheet.deconvolve import deconvolve
from lightsheet.io.omezarr import read_image, write_image
from lightsheet.psf import load_psf
from tasks._common import (
    OUTPUTS,
    compute_with_progress,
    dask_client,
    image_record,
    lineage_attrs,
    publish_image_stage,
)


@task(name="deconvolve")
def deconvolve_volume(raw: dict, psf: str, config: DeconvolveConfig, output: str) -> dict:
    """Deconvolve every selected channel and time point; other channels pass through."""
    start = time.monotonic()
    path = Path(output) / OUTPUTS["deconvolve"]
    psf_array = load_psf(psf)
    with dask_client():
        image, voxel_size_um, _ = read_image(raw["path"])
        channels = range(image.shape[1]) if config.channels is None else config.channels
        for c in channels:
            if c >= image.shape[1]:
                raise ValueError(
                    f"deconvolve.channels: channel {c} does not exist; the image has "
                    f"{image.shape[1]} channels (0..{image.shape[1] - 1})"
                )
        volumes = [
            [
                deconvolve(
                    image[t, c],
                    psf_array,
                    iterations=config.iterations,
                    acceleration=config.acceleration,
                )
                if c in channels
                else image[t, c].astype(np.float32)
                for c in range(image.shape[1])
            ]
            for t in range(image.shape[0])
        ]
        result = da.stack([da.stack(per_t) for per_t in volumes])
        write_image(
            result,
            path,
            voxel_size_um=voxel_size_um,
            name="deconvolved",
            channel_names=raw.get("channel_names"),
            attrs=lineage_attrs(
                "deconvolve", config.model_dump(mode="json"), {"raw": raw["path"], "psf": psf}
            ),
            compute=partial(compute_with_progress, description="deconvolve"),
        )
    record = image_record(
        "deconvolve",
        path,
        result,
        voxel_size_um,
        time.monotonic() - start,
        channel_names=raw.get("channel_names"),
        voxel_iterations_per_s=round(
            result.size * config.iterations / max(time.monotonic() - start, 1e-9)
        ),
    )
    publish_image_stage(record)
    return record
