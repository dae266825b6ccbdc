"""The ``slurm`` profile on the development SLURM cluster of infra/slurm, started here.

The session fixture starts the cluster (installing its Debian packages when missing) unless
it is already running, and stops it at the end if it started it. Runs of the whole flow on
the ``tiny`` sample: its workers are SLURM jobs, its outputs equal the ``local`` profile's,
a worker job cancelled mid-stage is replaced and the run still gives identical outputs, and
a cluster that cannot run the work fails the run with a message instead of hanging.
"""

from __future__ import annotations

import contextvars
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lightsheet.config import ClusterConfig, load_config
from lightsheet.errors import ClusterError

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = ROOT / "infra" / "slurm"
SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
JOB_NAME = "lightsheet-test-worker"
IMAGES = ("raw.ome.zarr", "deconvolved.ome.zarr", "features.ome.zarr", "labels.ome.zarr")
#: Longest a whole run of the tiny sample may take here (2 cores shared with other work).
RUN_TIMEOUT_S = 600


def _why_no_slurm() -> str | None:
    if os.geteuid() != 0:
        return f"the development SLURM cluster runs its daemons as root (uid {os.geteuid()})"
    if all(shutil.which(c) for c in SLURM_COMMANDS):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm():
    """A running development SLURM cluster; ``SLURM_CONF`` set for this process."""
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    done = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "start.sh")],
        capture_output=True,
        text=True,
        timeout=600,  # includes installing the packages on a clean machine
        check=False,
    )
    assert done.returncode == 0, f"infra/slurm/start.sh failed:\n{done.stdout}\n{done.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", done.stdout).group(1)
    started_here = "already running" not in done.stdout
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if started_here:
            subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh")], timeout=120, check=False)


@pytest.fixture(scope="module")
def local_run(tiny_sample, prefect_harness, tmp_path_factory):
    """The reference: the tiny sample on the ``local`` profile."""
    from flows.pipeline import pipeline

    out = tmp_path_factory.mktemp("local")
    config = load_config(tiny_sample / "config.yaml").model_copy(update={"output": out})
    return out, pipeline(config)


def slurm_config(sample: Path, output: Path, logs: Path, **cluster):
    """The run config with the ``slurm`` profile: the project's jobqueue file, test logs."""
    jobqueue = yaml.safe_load((ROOT / "infra" / "jobqueue.yaml").read_text())
    jobqueue["jobqueue"]["slurm"].update(
        {
            "name": JOB_NAME,
            "log-directory": str(logs),
            # written by the job's shell: the worker that follows runs inside this SLURM job
            "job-script-prologue": ["echo SLURM_JOB_ID=$SLURM_JOB_ID"],
        }
    )
    jobqueue["jobqueue"]["slurm"].update(cluster.pop("jobqueue", {}))
    path = output.parent / f"{output.name}-jobqueue.yaml"
    path.write_text(yaml.safe_dump(jobqueue))
    settings = {"interface": "lo", "min_jobs": 1, "max_jobs": 2, "no_workers_timeout_s": 300.0}
    settings.update(cluster)
    config = load_config(sample / "config.yaml")
    return config.model_copy(
        update={
            "output": output,
            "cluster": ClusterConfig(profile="slurm", jobqueue=path, **settings),
        }
    )


def squeue() -> dict[str, str]:
    """State of the test's worker jobs, by job id."""
    done = subprocess.run(
        ["squeue", "--noheader", f"--name={JOB_NAME}", "--format=%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(line.split() for line in done.stdout.splitlines() if line.strip())


class Run:
    """The pipeline in a thread (with the Prefect test harness's context) and its job log."""

    def __init__(self, config):
        from flows.pipeline import pipeline

        self.jobs_seen: dict[str, set[str]] = {}
        self.result: dict = {}
        context = contextvars.copy_context()
        self.thread = threading.Thread(
            target=context.run, args=(self._run, pipeline, config), daemon=True
        )
        self.thread.start()

    def _run(self, pipeline, config):
        try:
            self.result["summary"] = pipeline(config)
        except BaseException as exc:  # handed to the test thread
            self.result["error"] = exc

    def poll(self) -> dict[str, str]:
        jobs = squeue()
        for job_id, state in jobs.items():
            self.jobs_seen.setdefault(job_id, set()).add(state)
        return jobs

    def wait_until(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return
            assert self.thread.is_alive(), f"the run ended before {what}: {self.result}"
            time.sleep(0.5)
        pytest.fail(f"no {what} within {timeout_s:.0f} s; jobs seen: {self.jobs_seen}")

    def finish(self, timeout_s: float = RUN_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.poll()
            self.thread.join(2.0)
        assert not self.thread.is_alive(), f"the run did not end in {timeout_s:.0f} s"
        if "error" in self.result:
            raise self.result["error"]
        return self.result["summary"]


def assert_same_outputs(a: Path, b: Path) -> None:
    """Two runs' outputs hold the same tables and the same image voxels."""
    from lightsheet.io.omezarr import read_image

    for table in ("cells.csv", "density.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(a / table), pd.read_csv(b / table))
    for name in IMAGES:
        x, voxel_x, _ = read_image(a / name)
        y, voxel_y, _ = read_image(b / name)
        assert voxel_x == voxel_y and x.shape == y.shape and x.dtype == y.dtype, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def registered_jobs(logs: Path) -> set[str]:
    """SLURM jobs whose Dask worker connected to the scheduler, from the jobs' own logs.

    SLURM names the logs by job id; the job's shell wrote ``SLURM_JOB_ID`` (set by slurmd)
    before starting the worker, and the worker logged its registration.
    """
    found = set()
    for err in logs.glob(f"{JOB_NAME}-*.err"):
        job_id = err.name.removeprefix(f"{JOB_NAME}-").removesuffix(".err")
        out = err.with_suffix(".out").read_text(errors="replace")
        assert f"SLURM_JOB_ID={job_id}" in out, (err, out)
        if "Registered to:" in err.read_text(errors="replace"):
            found.add(job_id)
    return found


def test_slurm_profile_runs_on_slurm_jobs_and_matches_local(
    slurm, tiny_sample, local_run, tmp_path
):
    local_out, local_summary = local_run
    logs = tmp_path / "logs"
    run = Run(slurm_config(tiny_sample, tmp_path / "out", logs))
    summary = run.finish()

    # the run's Dask workers were processes of SLURM jobs (and only of those: the cluster
    # starts no other workers)
    workers = registered_jobs(logs)
    assert workers, f"no worker registered; jobs seen: {run.jobs_seen}"
    assert any("RUNNING" in states for states in run.jobs_seen.values()), run.jobs_seen
    assert summary["n_cells"] == local_summary["n_cells"] > 0
    assert_same_outputs(local_out, tmp_path / "out")
    # the cluster is gone with the run: its jobs were cancelled
    assert not squeue(), "worker jobs outlived the run"


def test_cancelled_worker_job_is_replaced_and_results_are_identical(
    slurm, tiny_sample, local_run, tmp_path
):
    local_out, _ = local_run
    out, logs = tmp_path / "out", tmp_path / "logs"
    run = Run(slurm_config(tiny_sample, out, logs))

    def deconvolving() -> bool:
        running = [j for j, s in squeue().items() if s == "RUNNING"]
        partial = out.is_dir() and any(out.glob(".deconvolved.ome.zarr.partial-*"))
        return partial and len(running) >= 1

    run.wait_until(deconvolving, timeout_s=RUN_TIMEOUT_S, what="deconvolve stage in progress")
    victim = min(j for j, s in squeue().items() if s == "RUNNING")  # the oldest: it has work
    before = set(run.poll())
    subprocess.run(["scancel", victim], timeout=30, check=True)

    run.finish()
    assert_same_outputs(local_out, out)
    assert victim in registered_jobs(logs), "the cancelled job was one of the run's workers"
    replacements = set(run.jobs_seen) - before
    assert replacements, f"no job was submitted after {victim} was cancelled: {run.jobs_seen}"


def test_job_slurm_refuses_fails_before_any_work(slurm, tiny_sample, tmp_path):
    from flows.pipeline import pipeline

    # more memory per job than any node has: sbatch refuses, which scale() would hide
    config = slurm_config(tiny_sample, tmp_path / "out", tmp_path / "logs", memory_limit="64TiB")
    with pytest.raises(ClusterError, match="SLURM refuses the worker job"):
        pipeline(config)
    assert not any((tmp_path / "out").glob("*.ome.zarr")), "no stage may start"
    assert not squeue()


def test_jobs_that_never_start_fail_the_run_instead_of_hanging(slurm, tiny_sample, tmp_path):
    from distributed.scheduler import NoWorkerError

    # every worker job exits before its worker starts (a broken environment on the nodes)
    config = slurm_config(
        tiny_sample,
        tmp_path / "out",
        tmp_path / "logs",
        no_workers_timeout_s=20.0,
        jobqueue={"job-script-prologue": ["echo 'no usable python here' >&2; exit 3"]},
    )
    run = Run(config)
    started = time.monotonic()
    with pytest.raises(NoWorkerError, match="without any running workers"):
        run.finish(timeout_s=300)
    assert time.monotonic() - started < 300
    assert not any((tmp_path / "out").glob("*.ome.zarr"))
    # worker jobs were submitted and ran (their logs say why they died); they end too fast
    # for squeue polling to see them reliably, so their log files are the evidence
    died = [p for p in (tmp_path / "logs").glob("*") if "no usable python here" in p.read_text()]
    assert died, f"no worker job ran; jobs seen by squeue: {run.jobs_seen}"
