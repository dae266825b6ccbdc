"""A real Prefect server (basic auth) + the deployments + a worker, started by infra/prefect.

Shared by the test modules that need it: started once per pytest session on first use and
stopped when the session ends (``config.add_cleanup``), whatever happens in between.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra" / "prefect"
#: Screenshots and logs kept after the tests (git-ignored).
TEST_OUTPUT = REPO / "test-output" / "prefect"
#: Seconds any one script may take on a slow, shared CI machine.
SCRIPT_TIMEOUT_S = 420


class RetryingClient(httpx.Client):
    """Retries what Prefect's own client retries: 429, 502 and 503, the server's transient
    answers (e.g. 503 while its SQLite database is busy with another test's flow runs)."""

    def send(self, request: httpx.Request, **kwargs) -> httpx.Response:
        for attempt in range(5):  # waits 1 + 2 + 4 + 8 + 16 s at most
            response = super().send(request, **kwargs)
            if response.status_code not in (429, 502, 503):
                return response
            response.close()
            time.sleep(2**attempt)
        return super().send(request, **kwargs)


class Stack:
    """Handles of the running server, its credentials and its state folder."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="lightsheet-prefect-"))
        self.landing = self.home / "landing-deployed"  # what the cron schedule scans
        self.landing.mkdir()
        self.auth = f"lightsheet:{secrets.token_urlsafe(12)}"
        self.api = ""
        self.started: list[str] = []
        self.data_roots: list[str] = []

    # environment for the scripts and for Prefect clients of this server
    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_API_", "PREFECT_PROFILE"))
        }
        env.update(
            LIGHTSHEET_PREFECT_HOME=str(self.home),
            PREFECT_HOME=str(self.home / "client-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            LIGHTSHEET_PREFECT_START_TIMEOUT="300",
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_WORKER_PREFETCH_SECONDS="2",
        )
        if self.api:
            env.update(PREFECT_API_URL=self.api, PREFECT_API_AUTH_STRING=self.auth)
        env.update(extra)
        return env

    def script(self, name: str, *args: str, **extra_env: str) -> str:
        proc = subprocess.run(
            ["bash", str(INFRA / name), *args],
            env=self.env(**extra_env),
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{name} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def start(self, data_roots: list[str]) -> None:
        self.data_roots = data_roots
        self.started.append("server")
        self.script("server.sh", "start", PREFECT_SERVER_API_AUTH_STRING=self.auth)
        port = (self.home / "server.port").read_text().strip()
        self.api = f"http://127.0.0.1:{port}/api"
        self.script(
            "deploy.sh",
            LIGHTSHEET_LANDING=str(self.landing),
            LIGHTSHEET_DATA_ROOTS=os.pathsep.join(data_roots),
        )
        self.started.append("worker")
        self.script("worker.sh", "start")

    def stop(self) -> None:
        TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
        for log in ("server.log", "worker.log"):
            if (self.home / log).is_file():
                (TEST_OUTPUT / log).write_bytes((self.home / log).read_bytes())
        for name in reversed(self.started):
            subprocess.run(
                ["bash", str(INFRA / f"{name}.sh"), "stop"],
                env=self.env(),
                capture_output=True,
                timeout=120,
            )
        self.started.clear()
        shutil.rmtree(self.home, ignore_errors=True)

    @property
    def ui(self) -> str:
        return self.api.removesuffix("/api")

    def client(self, *, auth: bool = True) -> httpx.Client:
        creds = tuple(self.auth.split(":", 1)) if auth else None
        return RetryingClient(base_url=self.api, auth=creds, timeout=60)

    def prefect_settings(self):
        """Settings context that points in-process Prefect clients at this server."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        return temporary_settings(
            updates={PREFECT_API_URL: self.api, PREFECT_API_AUTH_STRING: self.auth}
        )

    def deployment(self, name: str) -> dict:
        with self.client() as c:
            r = c.get(f"/deployments/name/{name}")
            r.raise_for_status()
            return r.json()

    def wait_final(self, flow_run_id: str, timeout: float) -> dict:
        """Poll a flow run until it is in a final state (bounded)."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                run = c.get(f"/flow_runs/{flow_run_id}").json()
                if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    return run
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"flow run {run['name']} still {run['state_type']} after {timeout:.0f} s; "
                        f"worker log: {self.home / 'worker.log'}"
                    )
                time.sleep(2)


_STACK: Stack | None = None
_FAILED: BaseException | None = None


def get_stack(config: pytest.Config) -> Stack:
    """The session's stack, started on first use; stopped at the end of the session."""
    global _STACK, _FAILED
    if _FAILED is not None:
        pytest.fail(f"the Prefect stack failed to start earlier in this session: {_FAILED}")
    if _STACK is None:
        stack = Stack()
        config.add_cleanup(stack.stop)  # registered first: a failed start is still cleaned up
        try:
            # the deployments may touch this session's temporary folders and the stack's own
            stack.start([str(config._tmp_path_factory.getbasetemp()), str(stack.home)])
        except BaseException as exc:
            _FAILED = exc
            raise
        _STACK = stack
    return _STACK
