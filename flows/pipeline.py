"""The pipeline flow: raw TIFF tiles → cells per mm³ in every atlas region. Wiring only."""

from __future__ import annotations

import os

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect_dask import DaskTaskRunner

from lightsheet.clusters import task_runner_kwargs
from lightsheet.config import PipelineConfig
from tasks._common import markdown_table
from tasks.deconvolve import deconvolve_volume
from tasks.density import SUMMARY_COLUMNS, density_table
from tasks.featurize import featurize_volume
from tasks.ingest import ingest
from tasks.segment import segment_volume
from tasks.stitch import stitch_tiles


@flow(name="lightsheet-pipeline")
def pipeline(config: PipelineConfig) -> dict:
    """Run every stage on the Dask cluster chosen by ``config.cluster``.

    The cluster is a parameter, so the same deployment runs on a laptop, SLURM or GPUs:
    the stages run as a subflow whose task runner is built from it.
    """
    share_api_url()
    runner = DaskTaskRunner(**task_runner_kwargs(config.cluster))
    return stages.with_options(task_runner=runner)(config)


def share_api_url() -> None:
    """Point Dask workers started from this process at this flow's Prefect API.

    Without a configured server, Prefect runs a temporary one inside this process; workers
    would otherwise each start another. Worker processes inherit the environment.
    """
    from prefect.client.orchestration import get_client

    if not os.environ.get("PREFECT_API_URL"):
        with get_client(sync_client=True) as client:
            os.environ["PREFECT_API_URL"] = str(client.api_url)


@flow(name="lightsheet-stages")
def stages(config: PipelineConfig) -> dict:
    """Ingest → stitch → deconvolve → featurize → segment → density."""
    out = str(config.output)
    voxel = list(config.voxel_size_um)
    manifest = ingest.submit(config.input, config.pattern, str(config.psf), str(config.atlas), out)
    raw = stitch_tiles.submit(manifest, voxel, config.stitch.chunks_zyx, out)
    image = (
        deconvolve_volume.submit(raw, str(config.psf), config.deconvolve, out)
        if config.deconvolve.enabled
        else raw
    )
    features = (
        featurize_volume.submit(image, config.segment.channel, config.featurize, out)
        if config.featurize.enabled
        else None
    )
    segmented = segment_volume.submit(image, features, config.segment, out)
    density = density_table.submit(segmented, raw, str(config.atlas), config.density, out)
    records = [r.result() for r in (raw, image, features, segmented) if r is not None]
    records = list({r["stage"]: r for r in records}.values()) + [density.result()]
    return summarize(records, out)


def summarize(records: list[dict], output: str) -> dict:
    """The run summary: stage timings, outputs and the densest regions (also an artifact)."""
    import pandas as pd

    density = records[-1]
    table = pd.read_csv(density["density"])
    top = table[(table["structure_id"] > 0) & (table["total_volume_mm3"] > 0)]
    top = top.sort_values("total_cells_per_mm3", ascending=False)
    top = top.head(10)[SUMMARY_COLUMNS]
    stages = [
        {"stage": r["stage"], "seconds": r["seconds"], "output": r.get("path", r.get("density"))}
        for r in records
    ]
    md = ["## lightsheet run summary", "", "| stage | seconds | output |", "|---|---|---|"]
    md += [f"| {s['stage']} | {s['seconds']:.1f} | `{s['output']}` |" for s in stages]
    md += ["", f"**{density['n_cells']} cells.** Densest regions (cells/mm³):", ""]
    md += [markdown_table(top.round(4))]
    create_markdown_artifact(key="run-summary", markdown="\n".join(md), description=output)
    return {
        "flow_run_name": runtime.flow_run.name,
        "output": output,
        "stages": stages,
        "n_cells": density["n_cells"],
        "density": density["density"],
        "cells": density["cells"],
        "plots": density["plots"],
        "top_regions": top.to_dict(orient="records"),
        "warnings": density["warnings"],
    }
