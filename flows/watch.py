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

One bad acquisition never stops the others: an unreadable or invalid config, a folder that
cannot be read, paths outside the deployment's data roots, or a run the server refuses is
reported (a warning in the log and a row of the tick's artifact) and skipped; the tick still
starts every other complete acquisition and ends completed. Deployed, the tick's own
parameters (landing, template, output root) and every acquisition's paths must lie beneath
the watch deployment's data roots (`flows.deployment`).
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

from flows.deployment import current_settings, guard_paths
from lightsheet.access import check_within_roots, config_paths
from lightsheet.config import PipelineConfig, load_config, read_yaml
from lightsheet.errors import LightsheetError

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
    own = folder / CONFIG_NAME
    try:
        if own.exists():  # a folder or an unreadable file is reported as such
            config = load_config(own)
        elif template is not None:
            raw = read_yaml(template) or {}
            if not isinstance(raw, dict):
                raise AcquisitionError(f"template {template}: expected a mapping of parameters")
            for key in PATH_KEYS:
                if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
                    # the folder's own glob characters are literal ([1] is not a pattern)
                    base = glob.escape(str(folder)) if key == "input" else str(folder)
                    raw[key] = os.path.join(base, raw[key])
            config = PipelineConfig.model_validate(raw)
        else:
            raise AcquisitionError(
                f"acquisition {folder}: no {CONFIG_NAME} in the folder and no `template` "
                "parameter; expected one of them"
            )
    except ValidationError as exc:
        source = own if own.exists() else template
        message = f"acquisition {folder}: invalid run config {source}:\n{exc}"
        raise AcquisitionError(message) from exc
    except (LightsheetError, OSError) as exc:  # unreadable, not YAML, an alias bomb, ...
        raise AcquisitionError(f"acquisition {folder}: {exc}") from exc
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
    data_roots: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Classify every acquisition (sub-folder) of ``landing``.

    ``data_roots`` (a deployment's): an acquisition whose config reads or writes elsewhere
    is invalid. Whatever goes wrong with one folder makes it invalid, never the scan fail.

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
        try:
            records.append(
                {
                    **rec,
                    **classify(
                        folder, marker, settle_seconds, template, output_root, now, data_roots
                    ),
                }
            )
        except (AcquisitionError, LightsheetError, OSError) as exc:
            records.append({**rec, "status": "invalid", "reason": str(exc)})
    return records


def classify(
    folder: Path,
    marker: str | None,
    settle_seconds: float,
    template: Path | None,
    output_root: Path | None,
    now: float,
    data_roots: list[str] | None,
) -> dict[str, Any]:
    """Status (and, when complete, config and idempotency key) of one acquisition folder."""
    if marker and not (folder / marker).is_file():
        return {"status": "waiting", "reason": f"no {marker} yet"}
    config = acquisition_config(folder, template=template, output_root=output_root)
    age = now - last_change(folder, exclude=config.output)
    if age < settle_seconds:
        reason = f"changed {age:.0f} s ago; waiting until unchanged for {settle_seconds:g} s"
        return {"status": "waiting", "reason": reason}
    if not glob.glob(config.input, recursive=True):
        reason = f"acquisition {folder}: no file matches input {config.input}"
        return {"status": "invalid", "reason": reason}
    if data_roots is not None:
        check_within_roots(config_paths(config), data_roots)
    return {
        "status": "complete",
        "reason": "",
        "config": config.model_dump(mode="json"),
        "idempotency_key": f"lightsheet-acquisition-{fingerprint(folder, config)}",
    }


# --------------------------------------------------------------------------- Prefect


@task(name="scan-landing")
def scan_landing(landing, marker, settle_seconds, template, output_root, data_roots) -> list:
    """Classify the acquisitions of the landing folder."""
    return scan(
        landing,
        marker=marker,
        settle_seconds=settle_seconds,
        template=template,
        output_root=output_root,
        data_roots=data_roots,
    )


@task(name="start-pipeline-run")
def start_pipeline_run(acquisition: dict, deployment: str) -> dict:
    """Create the acquisition's pipeline run, or find the one its idempotency key already made.

    A run the server refuses (a 4xx: parameters outside the pipeline deployment's schema or
    data roots) or a deployment that is not there makes this acquisition invalid, with the
    server's reason, instead of failing the tick.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    key = acquisition["idempotency_key"]
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(deployment)
            known = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])
                )
            )
            known = [r for r in known if r.deployment_id == dep.id]
            run = client.create_flow_run_from_deployment(
                dep.id,
                parameters={"config": acquisition["config"]},
                idempotency_key=key,
                name=acquisition["name"],
                tags=["watch-incoming", f"acquisition:{acquisition['name']}"],
            )
    except ObjectNotFound:
        reason = f"deployment {deployment} not found on the server"
        return {**acquisition, "status": "invalid", "reason": reason}
    except PrefectHTTPStatusError as exc:
        if not 400 <= exc.response.status_code < 500:
            raise  # the server failing is not this acquisition's fault
        try:
            detail = exc.response.json().get("detail", exc.response.text)
        except ValueError:
            detail = exc.response.text
        reason = f"the server refused its run ({exc.response.status_code}): {detail}"
        return {**acquisition, "status": "invalid", "reason": reason}
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


def report(rows: list[dict], landing: Path) -> None:
    """Markdown artifact: what this tick found and did."""
    n_new = sum(bool(r.get("started")) for r in rows)
    n_bad = sum(r["status"] == "invalid" for r in rows)
    md = [
        f"## watch-incoming: {landing}",
        "",
        f"**{n_new} run(s) started**, {len(rows)} acquisition folder(s), "
        f"**{n_bad} skipped as invalid**.",
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
