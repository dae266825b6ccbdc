"""Stitch task: tiles → one raw OME-Zarr volume."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from prefect import task

from lightsheet.ingest import Manifest
from lightsheet.io.omezarr import write_image
from lightsheet.stitch import stitch
from tasks._common import (
    OUTPUTS,
    compute_with_progress,
    dask_client,
    image_record,
    lineage_attrs,
    publish_image_stage,
)


@task(name="stitch")
def stitch_tiles(manifest: dict, voxel_size_um: list[float], chunks_zyx, output: str) -> dict:
    """Place the tiles with ``dask.array.block`` and write ``raw.ome.zarr``."""
    start = time.monotonic()
    m = Manifest.from_dict(manifest)
    path = Path(output) / OUTPUTS["stitch"]
    with dask_client():
        volume = stitch(m, voxel_size_um=voxel_size_um, chunks=chunks_zyx)
        write_image(
            volume,
            path,
            voxel_size_um=voxel_size_um,
            name="raw",
            channel_names=m.channel_names(),
            attrs=lineage_attrs(
                "stitch",
                {"chunks_zyx": volume.chunksize[2:], "voxel_size_um": voxel_size_um},
                {"tiles": [t.path for t in m.tiles], "pattern": m.pattern},
            ),
            compute=partial(compute_with_progress, description="stitch: writing raw.ome.zarr"),
        )
    record = image_record(
        "stitch",
        path,
        volume,
        voxel_size_um,
        time.monotonic() - start,
        channel_names=m.channel_names(),
    )
    publish_image_stage(record)
    return record
