"""Create a process work pool if it is missing; optionally wait until a named worker is online.

    python infra/prefect/pool.py POOL [--wait-worker NAME --timeout S --pid PID]

Uses PREFECT_API_URL / PREFECT_API_AUTH_STRING like any Prefect client.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def ensure_pool(name: str) -> bool:
    """Create the process work pool ``name`` unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:  # created meanwhile by another script
            return False
    return True


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
