"""Stitch task: tiles → one raw OME-Zarr volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task

from lightsheet.ingest import Manifest
from lightsheet.io.omezarr import write_blocks, write_image
from lightsheet.lineage import file_stat_fingerprint
from lightsheet.stitch import stitch, stitch_chunks
from tasks._common import OUTPUTS, Stage, StageSpec, dask_client, publish_image


def stitch_spec(manifest: dict, voxel_size_um: list[float], chunks_zyx, output: str) -> StageSpec:
    """What `stitch_tiles` makes from the tiles (chunks default from the tile grid)."""
    m = Manifest.from_dict(manifest)
    paths = [t.path for t in m.tiles]
    return StageSpec(
        "stitch",
        {"path": Path(output) / OUTPUTS["stitch"]},
        params={
            "chunks_zyx": list(
                chunks_zyx or stitch_chunks(m.shape[2:], voxel_size_um, m.tile_shape)
            ),
            "voxel_size_um": list(voxel_size_um),
        },
        inputs={
            "tiles": {
                "kind": "raw tiles",
                "glob": m.input,
                "pattern": m.pattern,
                "n_files": len(paths),
                "grid_shape": list(m.grid_shape),
                "fingerprint": file_stat_fingerprint(paths),
            }
        },
        files=paths,
        files_by_content=False,
    )


@task(name="stitch")
def stitch_tiles(manifest: dict, voxel_size_um: list[float], chunks_zyx, output: str) -> dict:
    """Place the tiles (`lightsheet.stitch.stitch`) and write ``raw.ome.zarr``."""
    m = Manifest.from_dict(manifest)
    stage = Stage(stitch_spec(manifest, voxel_size_um, chunks_zyx, output))
    if not stage.reused:
        with dask_client():
            chunks = tuple(stage.spec.params["chunks_zyx"])
            # blocks of several chunks: fewer tasks, file writes overlapping the encoding
            blocks = write_blocks(chunks, m.shape[2:], np.dtype(m.dtype).itemsize, voxel_size_um)
            volume = stitch(m, voxel_size_um=voxel_size_um, chunks=blocks)
            fingerprint = write_image(
                volume,
                stage.outputs["path"],
                chunks=chunks,
                voxel_size_um=voxel_size_um,
                name="raw",
                channel_names=m.channel_names(),
                lineage=stage.lineage(),  # the tiles: listed in raw.ome.zarr.inputs.json
                compute=stage.progress("stitch: writing raw.ome.zarr"),
            )
    record = stage.finish(
        None if stage.reused else {"path": fingerprint}, channel_names=m.channel_names()
    )
    record.update(publish_image(record))
    return record
