"""The pipeline flow: raw TIFF tiles → cells per mm³ in every atlas region. Wiring only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.deployment import current_settings, guard_pipeline
from lightsheet.clusters import task_runner_kwargs
from lightsheet.config import PipelineConfig
from lightsheet.ingest import discover
from tasks._common import OUTPUTS, describe_image, output_claimed
from tasks.deconvolve import deconvolve_spec, deconvolve_volume
from tasks.density import density_spec, density_table
from tasks.featurize import featurize_spec, featurize_volume
from tasks.ingest import ingest
from tasks.pipeline import materializing, shared_api_url, summarize
from tasks.register import REGISTER_OUTPUTS, register_spec, register_volume
from tasks.segment import segment_spec, segment_volume
from tasks.stitch import stitch_spec, stitch_tiles

__all__ = [
    "STAGES",
    "first_stale_stage",
    "pipeline",
    "stages",
    "wire",
]


@flow(name="lightsheet-pipeline")
def pipeline(config: PipelineConfig) -> dict:
    """Run every stage on the Dask cluster chosen by ``config.cluster``.

    The cluster is a parameter, so the same deployment runs on a laptop, SLURM or GPUs:
    the stages run as a subflow whose task runner is built from it. When every stage's
    outputs are up to date (`first_stale_stage`), no cluster is started at all. The
    summary's ``flow_seconds`` is this flow's wall time.
    """
    start = time.monotonic()
    guard_pipeline(config, current_settings())  # a deployment's data roots and cluster
    with output_claimed(config):  # one run at a time; never over files lightsheet did not write
        stale = first_stale_stage(config)
        if stale is None:
            get_run_logger().info(
                "every stage's outputs are up to date: reusing them without starting a Dask cluster"
            )
            runner = ThreadPoolTaskRunner()
        else:
            get_run_logger().info("computing from the %s stage on", stale)
            runner = DaskTaskRunner(**task_runner_kwargs(config.cluster))
        with shared_api_url():
            summary = stages.with_options(task_runner=runner)(config)
    # on the parent run too, so the run a user opens shows its summary
    create_markdown_artifact(
        key="run-summary", markdown=summary["markdown"], description=summary["output"]
    )
    return {**summary, "flow_seconds": round(time.monotonic() - start, 3)}


#: Each stage's task, its spec function and the outputs (keys of ``OUTPUTS``) it writes.
STAGES = {
    "stitch": (stitch_tiles, stitch_spec, ("stitch",)),
    "deconvolve": (deconvolve_volume, deconvolve_spec, ("deconvolve",)),
    "featurize": (featurize_volume, featurize_spec, ("featurize",)),
    "segment": (segment_volume, segment_spec, ("segment", "segment_table")),
    "register": (register_volume, register_spec, tuple(REGISTER_OUTPUTS)),
    "density": (density_table, density_spec, ("density", "density_cells")),
}


def wire(config: PipelineConfig, ingest_step: Callable, step: Callable) -> list:
    """The stages' order and arguments, written once for running and for checking.

    ``ingest_step(config)`` gives the tile manifest and
    ``step(name, *args)`` a stage's record (or a future of it); the task arguments are
    those of `STAGES`' tasks. Returns the manifest and every stage's result (None for a
    disabled stage; deconvolution's is the raw image's when disabled).
    """
    config = config.resolved()  # derived defaults filled once, recorded in the lineage
    o = str(config.output)
    manifest = ingest_step(config)
    raw = step("stitch", manifest, list(config.voxel_size_um), config.stitch, o)
    psf_voxel = None if config.psf_voxel_size_um is None else list(config.psf_voxel_size_um)
    # one file, or each channel's (a mapping): what the stages' specs fingerprint
    psf = config.psf
    psf = {c: str(p) for c, p in psf.items()} if isinstance(psf, dict) else psf and str(psf)
    image = raw
    if config.deconvolve.enabled:
        image = step(
            "deconvolve", raw, psf, config.deconvolve, o, config.camera_offset, psf_voxel,
        )  # fmt: skip
    features = None
    if config.featurize.enabled:
        features = step("featurize", image, config.segment.channel, config.featurize, o)
    model = None if config.featurize.model is None else str(config.featurize.model)
    segmented = step("segment", image, features, config.segment, model, o, config.camera_offset)
    registered = None
    if config.register.enabled:
        # beside deconvolve/segment: it needs only the raw autofluorescence channel
        registered = step(
            "register", raw, str(config.atlas), config.register, config.density.orientation,
            config.segment.channel, psf, o, config.camera_offset, psf_voxel,
        )  # fmt: skip
    density = step("density", segmented, raw, str(config.atlas), config.density, o, registered)
    return [manifest, raw, image, features, segmented, registered, density]


class _Stale(Exception):
    pass


def first_stale_stage(config: PipelineConfig, manifest: dict | None = None) -> str | None:
    """The first stage whose outputs must be (re)computed, or None when all are up to date.

    Checked in the flow before any cluster starts, from the same specs the tasks use: a
    re-run with nothing to do needs no Dask cluster. Best effort: anything unexpected (a
    missing or changed input, an unreadable record) names ingest, and the tasks then
    report it properly. ``manifest``: the tiles' manifest when the caller has it already.
    """
    out = Path(config.output)

    def check(name: str, *args: Any) -> dict:
        spec = STAGES[name][1](*args)
        fingerprints = spec.reusable()
        if fingerprints is None:
            raise _Stale(name)
        record = spec.record(fingerprints)
        if name == "stitch":  # downstream specs read the image's shape and voxel size
            record.update(describe_image(out / OUTPUTS["stitch"]))
        return record

    try:
        wire(config, lambda c: manifest or discover(c.input, c.pattern).to_dict(), check)
    except _Stale as stale:
        return str(stale)
    except Exception:  # noqa: BLE001 - any problem: let the tasks run and explain it
        return "ingest"
    return None


@flow(name="lightsheet-stages")
def stages(config: PipelineConfig) -> dict:
    """Ingest → stitch → deconvolve → featurize → segment (→ register) → density."""
    out = Path(config.output)

    def submit(name: str, *args: Any) -> PrefectFuture:
        task, _, roles = STAGES[name]
        return materializing(task, *(out / OUTPUTS[r] for r in roles)).submit(*args)

    manifest, *futures = wire(config, ingest.submit, submit)
    # in pipeline order, so the first failure is the error the run reports
    manifest.result()
    records = [f.result() for f in futures if f is not None]
    records = list({r["stage"]: r for r in records}.values())
    return summarize(records, str(out))
