"""The pipeline flow: raw TIFF tiles → cells per mm³ in every atlas region. Wiring only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import Task, flow, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.assets import Asset
from prefect.tasks import MaterializingTask
from prefect_dask import DaskTaskRunner

from lightsheet.clusters import task_runner_kwargs
from lightsheet.config import PipelineConfig
from tasks._common import OUTPUTS, markdown_table
from tasks.deconvolve import deconvolve_volume
from tasks.density import density_table, top_regions
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
    runner = DaskTaskRunner(**task_runner_kwargs(config.cluster))
    with shared_api_url():
        summary = stages.with_options(task_runner=runner)(config)
    # on the parent run too, so the run a user opens shows its summary
    create_markdown_artifact(
        key="run-summary", markdown=summary["markdown"], description=summary["output"]
    )
    return summary


@contextmanager
def shared_api_url() -> Iterator[None]:
    """Point Dask workers started from this process at this flow's Prefect API.

    Without a configured server, Prefect runs a temporary one inside this process; workers
    would otherwise each start another. Worker processes inherit the environment.
    """
    from prefect.client.orchestration import get_client

    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url)
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def materializing(task: Task, *outputs: Path) -> MaterializingTask:
    """``task`` emitting Prefect asset materializations for its output files.

    Upstream assets are linked by Prefect from the futures passed in as inputs.
    """
    return MaterializingTask(
        fn=task.fn,
        assets=[Asset(key=p.resolve().as_uri()) for p in outputs],
        materialized_by="lightsheet",
        name=task.name,
    )


@flow(name="lightsheet-stages")
def stages(config: PipelineConfig) -> dict:
    """Ingest → stitch → deconvolve → featurize → segment → density."""
    out = Path(config.output)
    o = str(out)
    voxel = list(config.voxel_size_um)
    manifest = ingest.submit(config.input, config.pattern, str(config.psf), str(config.atlas), o)
    raw = materializing(stitch_tiles, out / OUTPUTS["stitch"]).submit(
        manifest, voxel, config.stitch.chunks_zyx, o
    )
    image = raw
    if config.deconvolve.enabled:
        image = materializing(deconvolve_volume, out / OUTPUTS["deconvolve"]).submit(
            raw, str(config.psf), config.deconvolve, o
        )
    features = None
    if config.featurize.enabled:
        features = materializing(featurize_volume, out / OUTPUTS["featurize"]).submit(
            image, config.segment.channel, config.featurize, o
        )
    segmented = materializing(
        segment_volume, out / OUTPUTS["segment"], out / OUTPUTS["segment_table"]
    ).submit(image, features, config.segment, _str(config.featurize.model), o)
    density = materializing(
        density_table, out / OUTPUTS["density"], out / OUTPUTS["density_cells"]
    ).submit(segmented, raw, str(config.atlas), config.density, o)
    # in pipeline order, so the first failure is the error the run reports
    manifest.result()
    records = [f.result() for f in (raw, image, features, segmented, density) if f is not None]
    records = list({r["stage"]: r for r in records}.values())
    return summarize(records, o)


def summarize(records: list[dict], output: str) -> dict:
    """The run summary: stages with timings and reuse, the densest regions (also an artifact)."""
    import pandas as pd

    density = records[-1]
    top = top_regions(pd.read_csv(density["density"]))
    stage_rows = [
        {
            "stage": r["stage"],
            "seconds": r["seconds"],
            "reused": r["reused"],
            "output": r["path"],
        }
        for r in records
    ]
    md = [
        "## lightsheet run summary",
        "",
        markdown_table(pd.DataFrame(stage_rows)),
        "",
        f"**{density['n_cells']} cells.** Densest regions (cells/mm³):",
        "",
        markdown_table(top.round(1)),
        "",
        f"Plots: {', '.join(density['plots'])}",
    ]
    create_markdown_artifact(key="run-summary", markdown="\n".join(md), description=output)
    return {
        "markdown": "\n".join(md),
        "flow_run_name": runtime.flow_run.name,
        "output": output,
        "stages": stage_rows,
        "n_cells": density["n_cells"],
        "density": density["density"],
        "cells": density["cells"],
        "plots": density["plots"],
        "top_regions": top.to_dict(orient="records"),
        "warnings": density["warnings"],
    }


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
