"""Watch-incoming tasks: scan the landing folder, start one pipeline run per acquisition.

The scanning itself is `lightsheet.watch`'s; these tasks talk to the Prefect server and
post the tick's artifact. Wired by `flows.watch`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lightsheet.watch import scan

__all__ = ["report", "scan_landing", "start_pipeline_run"]


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
