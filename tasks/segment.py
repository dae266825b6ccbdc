"""Segment task: nuclei channel → instance labels (OME-Zarr labels) + cells table."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact

from lightsheet.blocks import segment_chunks
from lightsheet.config import SegmentConfig
from lightsheet.io.atomic import partial_path, remove_stale_partials
from lightsheet.io.omezarr import read_image, stored_volume, write_image
from lightsheet.io.tables import write_table
from lightsheet.lineage import (
    file_content_fingerprint,
    finish_record,
    recorded_quantum,
    write_sidecar,
)
from lightsheet.segment import segment_volume as segment_one
from lightsheet.segment.local import whole_bin_chunks
from tasks._common import (
    OUTPUTS,
    Stage,
    StageSpec,
    check_camera_offset,
    compute_with_progress,
    dask_client,
    output_input,
    publish_image,
)
from tasks.featurize import check_channel, model_input

__all__ = [
    "segment_spec",
    "segment_volume",
]


def segment_spec(
    image: dict,
    features: dict | None,
    config: SegmentConfig,
    model: str | None,
    output: str,
    camera_offset: float = 0.0,
) -> StageSpec:
    """What `segment_volume` makes from the image (and the model, with ``method="model"``)."""
    params = config.model_dump(mode="json")
    if config.method == "local":  # the only method that reads it
        params["camera_offset"] = float(camera_offset)
    inputs = {"image": output_input(image)}
    if config.method == "model":
        inputs["model"] = model_input(model)
    return StageSpec(
        "segment",
        {
            "path": Path(output) / OUTPUTS["segment"],
            "cells": Path(output) / OUTPUTS["segment_table"],
        },
        params=params,
        inputs=inputs,
        related={} if features is None else {"features": output_input(features)},
    )


@task(name="segment")
def segment_volume(
    image: dict,
    features: dict | None,
    config: SegmentConfig,
    model: str | None,
    output: str,
    camera_offset: float = 0.0,
) -> dict:
    """Label nuclei with ids unique over the volume and measure each cell once.

    With ``config.background_channel`` (method local) candidates about as bright in that
    autofluorescence channel as in the nuclei channel are dropped, and the table gains its
    ``background_mean_intensity`` and ``background_contrast``.

    With ``method="model"`` cells come from the UNet's own heads (``model``: checkpoint,
    None for the bundled one; `lightsheet.segment.model`), resampled to and from the voxel
    size it was trained at, thresholded at ``config.threshold`` or else at the probability
    threshold its record validated on held-out volumes.

    ``camera_offset`` (the run's) is what the image reads with no light: the local method's
    planes' gain and contrasts count light above it.
    """
    uses_model = config.method == "model"
    stage = Stage(segment_spec(image, features, config, model, output, camera_offset))
    thresholds = None
    if not stage.reused:
        with dask_client(), _scratch(stage.outputs["path"]) as scratch:
            source, voxel_size_um, image_lineage = read_image(image["path"])
            check_channel(config.channel, source.shape[1], "segment.channel")
            if config.background_channel is not None:
                check_channel(
                    config.background_channel, source.shape[1], "segment.background_channel"
                )
            if config.method == "local":  # the method that counts light above it
                channels = (config.channel, config.background_channel)
                check_camera_offset(
                    image["path"], [c for c in channels if c is not None], camera_offset
                )
            net = None
            if uses_model:  # torch: only where tasks run
                from lightsheet.featurize import load_model

                net = load_model(model)
                stage.spec.inputs["model"]["record"] = net.record  # shown by `lightsheet lineage`
            chunks = segment_chunks(source.shape[2:], voxel_size_um, source.chunksize[2:])
            if config.method == "local":  # whole bins: each block's statistics one chunk
                chunks = whole_bin_chunks(chunks, voxel_size_um, config.nucleus_diameter_um)
            # blocks read their halos straight from the stored image: memory stays flat
            results = [
                segment_one(
                    stored_volume(image["path"], t, config.channel),
                    voxel_size_um=voxel_size_um,
                    config=config,
                    model=net,  # method "model": the UNet's heads, at its voxel size
                    background=None
                    if config.background_channel is None
                    else stored_volume(image["path"], t, config.background_channel),
                    chunks=chunks,
                    compute=lambda c, what: compute_with_progress(
                        c, description=f"segment: {what}", stage=stage.name
                    ),
                    scratch=scratch / f"t{t}",
                    quantum=recorded_quantum(source.dtype, image_lineage),
                    camera_offset=camera_offset,
                )
                for t in range(source.shape[0])
            ]
            thresholds = [r.threshold for r in results]
            lineage = {**stage.lineage(), "thresholds": thresholds}
            labels_fp = write_image(
                da.stack([r.labels[None] for r in results]),
                stage.outputs["path"],
                voxel_size_um=voxel_size_um,
                name="labels",
                labels=True,
                lineage=lineage,
                compute=stage.progress("segment: labelling"),
            )
        cells = pd.concat([r.table.assign(t=t) for t, r in enumerate(results)], ignore_index=True)
        cells.insert(1, "t", cells.pop("t"))
        write_table(cells, stage.outputs["cells"])
        cells_fp = file_content_fingerprint(stage.outputs["cells"])
        write_sidecar(stage.outputs["cells"], finish_record(lineage, cells_fp))
    record = stage.finish(
        None if stage.reused else {"path": labels_fp, "cells": cells_fp},
        thresholds=thresholds,
    )
    record.update(publish_image(record))
    cells = pd.read_csv(record["cells"])
    record["n_cells"] = len(cells)
    stage.logger.info("segment: %d cells", len(cells))
    create_table_artifact(
        key="segment-cells",
        table=cells.head(20).round(2).to_dict(orient="records"),
        description=f"First 20 of {len(cells)} cells ({record['cells']})",
    )
    return record


@contextlib.contextmanager
def _scratch(labels: Path) -> Iterator[Path]:
    """A hidden folder beside the labels for what the passes keep (method local), removed after.

    ``.NAME.scratch.partial-*``: never mistaken for output; a killed run's leftover is
    removed by the next run of the stage.
    """
    name = labels.with_name(f"{labels.name}.scratch")
    remove_stale_partials(name)
    folder = partial_path(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
