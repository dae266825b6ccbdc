"""What the pipeline flow uses around its stage tasks: the API for workers, assets, summary.

Wired by `flows.pipeline`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import Task, runtime
from prefect.artifacts import create_markdown_artifact
from prefect.assets import Asset
from prefect.tasks import MaterializingTask

from tasks._common import asset_key, markdown_table, png_markdown
from tasks.density import top_regions

__all__ = ["materializing", "shared_api_url", "summarize"]


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
        assets=[Asset(key=asset_key(p)) for p in outputs],
        materialized_by="lightsheet",
        name=task.name,
    )


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
        png_markdown(Path(density["plots"][0]), "densest regions"),
        "",
        f"Plots: {', '.join(density['plots'])}",
        *(f"\n**Warning:** {w}" for w in density["warnings"]),
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
