"""Create (or harden) a process work pool; optionally wait until a named worker is online.

    python infra/prefect/pool.py POOL [--wait-worker NAME --timeout S --pid PID]

The pool's base job template lets a flow run choose nothing but its name and whether its
output is streamed (`hardened_template`): Prefect's default lets whoever creates a flow run
set ``job_variables`` such as the ``command`` the worker executes, its environment and its
working directory, i.e. run any command on the worker. The server now refuses such a run
with 422. An existing pool's template is replaced by the hardened one.

Uses PREFECT_API_URL / PREFECT_API_AUTH_STRING like any Prefect client.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: Job variables a flow run may still set (harmless ones).
RUN_VARIABLES = ("name", "stream_output")


def hardened_template() -> dict:
    """The process worker's default base job template, closed to flow-run overrides.

    Only `RUN_VARIABLES` remain variables (``additionalProperties: false``, so the server
    refuses any other); the command, environment, working directory and labels are fixed
    to the worker's defaults (its own environment, a fresh temporary folder; the
    deployments' pull step then moves into the checkout).
    """
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    variables = template["variables"]
    variables["properties"] = {
        k: v for k, v in variables["properties"].items() if k in RUN_VARIABLES
    }
    variables["required"] = []
    variables["additionalProperties"] = False
    template["job_configuration"].update(command=None, env={}, labels={}, working_dir=None)
    return template


def ensure_pool(name: str) -> bool:
    """Create the process work pool ``name`` or harden its template; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    template = hardened_template()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pool = None
        if pool is None:
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template)
                )
                return True
            except ObjectAlreadyExists:  # created meanwhile by another script
                pass
        if (pool and pool.base_job_template) != template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
    return False


def wait_worker(pool: str, worker: str, *, timeout: float, pid: int | None) -> bool:
    """Poll until ``worker`` is ONLINE in ``pool``; False on timeout or when ``pid`` exits."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if pid is not None:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return False
            workers = client.read_workers_for_work_pool(pool)
            if any(w.name == worker and w.status == "ONLINE" for w in workers):
                return True
            time.sleep(1.0)
    return False


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool")
    parser.add_argument("--wait-worker", metavar="NAME")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--pid", type=int)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.wait_worker:
        online = wait_worker(args.pool, args.wait_worker, timeout=args.timeout, pid=args.pid)
        return 0 if online else 1
    if ensure_pool(args.pool):
        print(f"work pool {args.pool} (process) created")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
