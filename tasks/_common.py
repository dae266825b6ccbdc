"""What every stage task shares: running Dask work with progress, records, artifacts, lineage."""

from __future__ import annotations

import base64
import io
import platform
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

import lightsheet

#: Stage output names, in pipeline order: a reader of the output folder sees the pipeline.
OUTPUTS = {
    "stitch": "raw.ome.zarr",
    "deconvolve": "deconvolved.ome.zarr",
    "featurize": "features.ome.zarr",
    "segment": "labels.ome.zarr",
}


@contextmanager
def dask_client() -> Iterator[Any]:
    """The flow's Dask client inside a task (seceding from the worker's thread pool)."""
    from prefect_dask import get_dask_client

    with get_dask_client() as client:
        yield client


def compute_with_progress(collection: da.Array, level: int = 0, *, description: str) -> Any:
    """Compute on the current Dask client, moving a Prefect progress artifact as chunks finish.

    ``level`` is the pyramid level being written (see `lightsheet.io.omezarr.write_image`):
    level 0 holds the stage's work and gets the progress artifact; lower levels are logged.
    Falls back to ``dask.compute`` when no distributed client is active (library use).
    """
    from distributed import as_completed, futures_of, get_client

    try:
        client = get_client()
    except ValueError:
        return dask.compute(collection)[0]
    logger = get_run_logger()
    persisted = client.persist(collection)
    futures = futures_of(persisted)
    total = len(futures)
    if level:
        description = f"{description} (pyramid level s{level})"
    artifact = None if level else create_progress_artifact(0.0, description=description)
    last_report, done = time.monotonic(), 0
    for future in as_completed(futures):
        done += 1
        if future.status == "error":
            future.result()  # re-raises the chunk's error with its traceback
        now = time.monotonic()
        if now - last_report > 2.0 or done == total:
            pct = 100.0 * done / total
            if artifact is not None:
                update_progress_artifact(artifact, pct)
            logger.info("%s: %d/%d chunks (%.0f%%)", description, done, total, pct)
            last_report = now
    return persisted.compute()


def lineage_attrs(stage: str, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict:
    """The record stored with an output: what made it, from what, with which code."""
    from prefect import runtime

    return {
        "stage": stage,
        "params": _jsonable(params),
        "inputs": _jsonable(inputs),
        "code_version": lightsheet.__version__,
        "flow_run_id": str(runtime.flow_run.id) if runtime.flow_run.id else None,
        "task_run_id": str(runtime.task_run.id) if runtime.task_run.id else None,
        "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def image_record(
    stage: str, path: Path, image: da.Array, voxel_size_um, seconds: float, **extra: Any
) -> dict[str, Any]:
    """Small description of a written image, returned by the task (never the array)."""
    nbytes = int(image.nbytes)
    return {
        "stage": stage,
        "path": str(path),
        "shape": list(image.shape),
        "chunks": list(image.chunksize),
        "dtype": str(image.dtype),
        "bytes": nbytes,
        "voxel_size_um": list(voxel_size_um),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 1),
        **extra,
    }


def mip_png(path: Path, *, channel: int = 0, max_side: int = 256) -> bytes:
    """Maximum-intensity projection along z of the coarsest level, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightsheet.io.omezarr import read_image

    levels = sorted(p.name for p in Path(path).glob("s*") if p.name[1:].isdigit())
    level = max(0, len(levels) - 1)
    image, _, _ = read_image(path, level=level)
    mip = np.asarray(image[0, min(channel, image.shape[1] - 1)].max(axis=0).compute(), float)
    lo, hi = np.percentile(mip, [1, 99.8]) if mip.size else (0, 1)
    fig = plt.figure(figsize=(3, 3 * mip.shape[0] / max(mip.shape[1], 1)), dpi=max_side / 3)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(mip, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def publish_image_stage(record: Mapping[str, Any], *, channel: int = 0) -> None:
    """Artifact for an image stage: its numbers and a thumbnail, keyed by stage across runs."""
    stage = record["stage"]
    rows = "\n".join(
        f"| {k} | {record[k]} |"
        for k in (
            "path",
            "shape",
            "chunks",
            "dtype",
            "bytes",
            "voxel_size_um",
            "seconds",
            "mb_per_s",
        )
    )
    png = base64.b64encode(mip_png(Path(record["path"]), channel=channel)).decode()
    create_markdown_artifact(
        key=f"{stage}-output",
        markdown=(
            f"### {stage}\n\n| field | value |\n|---|---|\n{rows}\n\n"
            f"![max-intensity projection](data:image/png;base64,{png})\n"
        ),
        description=f"{stage}: {record['path']}",
    )


def markdown_table(table) -> str:
    """A pandas DataFrame as a GitHub-flavoured markdown table."""
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])
