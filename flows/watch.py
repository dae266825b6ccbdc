"""The watch-incoming flow: start one pipeline run per complete new acquisition.

Deployed on a cron schedule (``deployments/prefect.yaml``). Each tick scans a landing folder
whose sub-folders are acquisitions, decides which are complete, and asks the Prefect server
for one run of the pipeline deployment per complete acquisition with an idempotency key
derived from the acquisition's input files: the server returns the existing run for a key it
has seen, so an acquisition is never processed twice (even by overlapping ticks), while a
half-copied acquisition waits for a later tick.

Which acquisitions are complete (a marker file, then a settle time on inode change times)
and the run config of each (its own ``config.yaml`` or ``template``; ``output_root``) are
decided by `lightsheet.watch`.

One bad acquisition never stops the others: an unreadable or invalid config, a folder that
cannot be read, paths outside the deployment's data roots, or a run the server refuses is
reported (a warning in the log and a row of the tick's artifact) and skipped; the tick still
starts every other complete acquisition and ends completed. Deployed, the tick's own
parameters (landing, template, output root) and every acquisition's paths must lie beneath
the watch deployment's data roots (`flows.deployment`).

Wiring only: the scanner is `lightsheet.watch`, the server calls and the artifact
`tasks.watch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from flows.deployment import current_settings, guard_paths
from tasks.watch import report, scan_landing, start_pipeline_run

__all__ = [
    "watch_incoming",
]


@flow(name="lightsheet-watch-incoming")
def watch_incoming(
    landing: Path,
    output_root: Path | None = None,
    marker: str | None = "acquisition.done",
    settle_seconds: Annotated[float, Field(ge=0)] = 60.0,
    template: Path | None = None,
    deployment: str = "lightsheet-pipeline/pipeline",
) -> list[dict]:
    """Start one pipeline run per complete acquisition in ``landing`` (never twice).

    Args:
        landing: Folder whose sub-folders are acquisitions.
        output_root: Outputs go to output_root/<acquisition>; default: each config's output.
        marker: File the microscope writes when an acquisition is complete; empty: settle
            time only.
        settle_seconds: An acquisition must be unchanged this long before it starts.
        template: Run config for acquisitions without their own config.yaml (relative paths
            relative to the acquisition folder).
        deployment: The pipeline deployment, flow-name/deployment-name.
    """
    settings = current_settings()  # deployed: the watch deployment's data roots
    guard_paths(settings, landing=landing, template=template, output_root=output_root)
    roots = list(settings.data_roots) if settings is not None else None
    records = scan_landing(landing, marker, settle_seconds, template, output_root, roots)
    complete = [r for r in records if r["status"] == "complete"]
    futures = [start_pipeline_run.submit(r, deployment) for r in complete]
    started = {r["name"]: r for r in (f.result() for f in futures)}
    rows = [started.get(r["name"], r) for r in records]
    report(rows, landing)
    logger = get_run_logger()
    for r in rows:
        if r["status"] == "invalid":  # reported and skipped: the others have started
            logger.warning("acquisition %s skipped: %s", r["name"], r["reason"])
    return rows
