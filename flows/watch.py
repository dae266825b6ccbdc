"""The watch-incoming flow: start one pipeline run per complete new acquisition.

Deployed on a cron schedule (``deployments/prefect.yaml``). Each tick scans a landing folder
whose sub-folders are acquisitions, decides which are complete, and asks the Prefect server
for one run of the pipeline deployment per complete acquisition with an idempotency key
derived from the acquisition's input files: the server returns the existing run for a key it
has seen, so an acquisition is never processed twice (even by overlapping ticks), while a
half-copied acquisition waits for a later tick.

An acquisition is complete when

* ``marker`` is set (default ``acquisition.done``, the file the microscope writes last) and
  the file exists, and
* nothing in the folder was created, renamed or rewritten for ``settle_seconds`` (inode change
  times, which copies cannot back-date, unlike modification times kept by ``rsync -a`` or
  ``cp -p``; this also covers a marker that an alphabetical copy delivers first).

With ``marker`` empty, the settle time alone decides.

Each acquisition's run config is its own ``config.yaml`` (relative paths relative to it), or
else ``template``: a run config whose relative paths are taken relative to the acquisition
folder. ``output_root`` (when set) puts the outputs in ``output_root/<acquisition name>``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field, ValidationError

from lightsheet.config import PipelineConfig, load_config

#: The acquisition's own run config.
CONFIG_NAME = "config.yaml"
#: Keys of a run config that are paths (relative ones are resolved).
PATH_KEYS = ("input", "psf", "atlas", "output")


class AcquisitionError(ValueError):
    """An acquisition folder that cannot be turned into a valid pipeline run."""


# --------------------------------------------------------------------------- scanning (no Prefect)


def acquisition_config(
    folder: Path, *, template: Path | None = None, output_root: Path | None = None
) -> PipelineConfig:
    """The run config of one acquisition folder.

    Parameters
    ----------
    folder : Path
        The acquisition.
    template : Path, optional
        Run config used when the folder has no ``config.yaml``; its relative paths are taken
        relative to ``folder``.
    output_root : Path, optional
        Outputs go to ``output_root / folder.name`` instead of the config's ``output``.

    Raises
    ------
    AcquisitionError
        No config and no template, or a config that does not validate.
    """
    import yaml

    own = folder / CONFIG_NAME
    try:
        if own.is_file():
            config = load_config(own)
        elif template is not None:
            raw = yaml.safe_load(Path(template).read_text()) or {}
            if not isinstance(raw, dict):
                raise AcquisitionError(f"template {template}: expected a mapping of parameters")
            for key in PATH_KEYS:
                if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
                    raw[key] = str(folder / raw[key])
            config = PipelineConfig.model_validate(raw)
        else:
            raise AcquisitionError(
                f"acquisition {folder}: no {CONFIG_NAME} in the folder and no `template` "
                "parameter; expected one of them"
            )
    except ValidationError as exc:
        source = own if own.is_file() else template
        message = f"acquisition {folder}: invalid run config {source}:\n{exc}"
        raise AcquisitionError(message) from exc
    if output_root is not None:
        config = config.model_copy(update={"output": Path(output_root) / folder.name})
    return config


def _inputs(folder: Path, config: PipelineConfig) -> list[Path]:
    """The files a run of ``config`` reads from the acquisition folder."""
    files = [Path(p) for p in glob.glob(config.input, recursive=True)]
    files += [config.psf, folder / CONFIG_NAME]
    return sorted({p for p in files if p.is_file()})


def fingerprint(folder: Path, config: PipelineConfig) -> str:
    """Identity of an acquisition: its path and the names and sizes of the files a run reads.

    The run's own outputs (even inside the folder) do not change it; re-copied identical
    files keep it; changed inputs (or config) make a new acquisition.
    """
    h = hashlib.sha256(str(folder.resolve()).encode())
    for p in _inputs(folder, config):
        rel = os.path.relpath(p.resolve(), folder.resolve())
        h.update(json.dumps([rel, p.stat().st_size]).encode())
    return h.hexdigest()[:32]


def last_change(folder: Path, *, exclude: Path | None = None) -> float:
    """Newest inode change time (s since the epoch) in ``folder``, ``exclude`` left out."""
    newest = folder.stat().st_ctime
    skip = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(folder):
        if skip is not None:
            dirs[:] = [d for d in dirs if (Path(root) / d).resolve() != skip]
        for name in dirs + files:
            try:
                newest = max(newest, (Path(root) / name).lstat().st_ctime)
            except FileNotFoundError:  # removed while scanning (a temporary copy file)
                newest = time.time()
    return newest


def scan(
    landing: Path,
    *,
    marker: str | None = "acquisition.done",
    settle_seconds: float = 60.0,
    template: Path | None = None,
    output_root: Path | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Classify every acquisition (sub-folder) of ``landing``.

    Returns
    -------
    list of dict
        One record per sub-folder (sorted by name): ``name``, ``path``, ``status``
        (``complete``, ``waiting`` or ``invalid``), ``reason``; complete ones also carry
        ``config`` (JSON-ready) and ``idempotency_key``.

    Raises
    ------
    FileNotFoundError
        ``landing`` is not a folder.
    """
    landing = Path(landing)
    if not landing.is_dir():
        raise FileNotFoundError(f"landing folder {landing} does not exist or is not a folder")
    now = time.time() if now is None else now
    records = []
    for folder in sorted(p for p in landing.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "_")):  # temporary or hidden folders of copy tools
            continue
        rec: dict[str, Any] = {"name": folder.name, "path": str(folder)}
        if marker and not (folder / marker).is_file():
            records.append({**rec, "status": "waiting", "reason": f"no {marker} yet"})
            continue
        try:
            config = acquisition_config(folder, template=template, output_root=output_root)
        except AcquisitionError as exc:
            records.append({**rec, "status": "invalid", "reason": str(exc)})
            continue
        age = now - last_change(folder, exclude=config.output)
        if age < settle_seconds:
            reason = f"changed {age:.0f} s ago; waiting until unchanged for {settle_seconds:g} s"
            records.append({**rec, "status": "waiting", "reason": reason})
            continue
        if not glob.glob(config.input, recursive=True):
            reason = f"acquisition {folder}: no file matches input {config.input}"
            records.append({**rec, "status": "invalid", "reason": reason})
            continue
        records.append(
            {
                **rec,
                "status": "complete",
                "reason": "",
                "config": config.model_dump(mode="json"),
                "idempotency_key": f"lightsheet-acquisition-{fingerprint(folder, config)}",
            }
        )
    return records


# --------------------------------------------------------------------------- Prefect


@task(name="scan-landing")
def scan_landing(landing, marker, settle_seconds, template, output_root) -> list[dict]:
    """Classify the acquisitions of the landing folder."""
    return scan(
        landing,
        marker=marker,
        settle_seconds=settle_seconds,
        template=template,
        output_root=output_root,
    )


@task(name="start-pipeline-run")
def start_pipeline_run(acquisition: dict, deployment: str) -> dict:
    """Create the acquisition's pipeline run, or find the one its idempotency key already made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    key = acquisition["idempotency_key"]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        known = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key]))
        )
        known = [r for r in known if r.deployment_id == dep.id]
        run = client.create_flow_run_from_deployment(
            dep.id,
            parameters={"config": acquisition["config"]},
            idempotency_key=key,
            name=acquisition["name"],
            tags=["watch-incoming", f"acquisition:{acquisition['name']}"],
        )
    started = not known
    get_run_logger().info(
        "%s: %s flow run %s (%s)",
        acquisition["name"],
        "started" if started else "already has",
        run.name,
        run.id,
    )
    return {**acquisition, "started": started, "flow_run_id": str(run.id), "flow_run": run.name}


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
    records = scan_landing(landing, marker, settle_seconds, template, output_root)
    complete = [r for r in records if r["status"] == "complete"]
    futures = [start_pipeline_run.submit(r, deployment) for r in complete]
    started = {r["name"]: r for r in (f.result() for f in futures)}
    rows = [started.get(r["name"], r) for r in records]
    report(rows, landing)
    invalid = [r for r in rows if r["status"] == "invalid"]
    if invalid:
        # the others are started; the tick still fails so that bad acquisitions are seen
        raise AcquisitionError(
            f"{len(invalid)} acquisition(s) in {landing} cannot run:\n"
            + "\n".join(r["reason"] for r in invalid)
        )
    return rows


def report(rows: list[dict], landing: Path) -> None:
    """Markdown artifact: what this tick found and did."""
    n_new = sum(bool(r.get("started")) for r in rows)
    md = [
        f"## watch-incoming: {landing}",
        "",
        f"**{n_new} run(s) started**, {len(rows)} acquisition folder(s).",
        "",
        "| acquisition | status | flow run | note |",
        "|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"]
        if status == "complete":
            status = "started" if r.get("started") else "already started"
        note = r["reason"].replace("\n", " ").replace("|", "\\|")[:300]
        md.append(f"| {r['name']} | {status} | {r.get('flow_run', '')} | {note} |")
    create_markdown_artifact(key="watch-incoming", markdown="\n".join(md), description=str(landing))
