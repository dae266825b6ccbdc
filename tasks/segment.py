"""Segment task: nuclei channel → instance labels (OME-Zarr labels) + cells table."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import dask.array as da
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from lightsheet.config import SegmentConfig
from lightsheet.io.omezarr import read_image, write_image
from lightsheet.io.tables import write_table
from lightsheet.segment import segment_volume as segment_one
from tasks._common import (
    OUTPUTS,
    compute_with_progress,
    dask_client,
    image_record,
    lineage_attrs,
    publish_image_stage,
)
from tasks.featurize import _check_channel


@task(name="segment")
def segment_volume(image: dict, features: dict | None, config: SegmentConfig, output: str) -> dict:
    """Label nuclei with ids unique over the volume, then measure each cell once."""
    start = time.monotonic()
    logger = get_run_logger()
    path = Path(output) / OUTPUTS["segment"]
    channel = config.channel
    with dask_client():
        source, voxel_size_um, _ = read_image(image["path"])
        _check_channel(channel, source.shape[1], "segment.channel")
        feats = read_image(features["path"])[0] if features else None
        per_t = [
            segment_one(
                source[t, channel],
                voxel_size_um=voxel_size_um,
                config=config,
                features=None if feats is None else feats[t],
            )
            for t in range(source.shape[0])
        ]
        labels = da.stack([r.labels[None] for r in per_t])
        write_image(
            labels,
            path,
            voxel_size_um=voxel_size_um,
            name="labels",
            labels=True,
            attrs=lineage_attrs(
                "segment",
                {**config.model_dump(mode="json"), "thresholds": [r.threshold for r in per_t]},
                {"image": image["path"], "features": features["path"] if features else None},
            ),
            compute=partial(compute_with_progress, description="segment: writing labels"),
        )
    tables = []
    for t, r in enumerate(per_t):
        table = r.table.copy()
        table.insert(1, "t", t)
        tables.append(table)
    cells = pd.concat(tables, ignore_index=True)
    cells_path = write_table(cells, Path(output) / "cells.csv")
    seconds = time.monotonic() - start
    logger.info("segment: %d cells in %.1f s", len(cells), seconds)
    record = image_record(
        "segment",
        path,
        labels,
        voxel_size_um,
        seconds,
        cells=str(cells_path),
        n_cells=len(cells),
        thresholds=[r.threshold for r in per_t],
    )
    publish_image_stage(record)
    create_table_artifact(
        key="segment-cells",
        table=cells.head(20).round(2).to_dict(orient="records"),
        description=f"First 20 of {len(cells)} cells ({cells_path})",
    )
    return record
