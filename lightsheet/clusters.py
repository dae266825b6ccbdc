"""Cluster profiles: where the pipeline's Dask work runs, chosen by parameter, never by code.

``local``
    A `distributed.LocalCluster` on this machine (the default). A worker process that dies
    (killed, out of memory) is restarted by its nanny and kept, however long the new
    process takes to start (`local_cluster`).
``address``
    An existing scheduler (``tcp://host:8786``); the cluster outlives the run.
``slurm``
    dask-jobqueue's ``SLURMCluster``: one SLURM job per Dask worker, described by
    ``infra/jobqueue.yaml`` (or the file ``cluster.jobqueue`` names) and scaled adaptively
    between ``cluster.min_jobs`` and ``cluster.max_jobs``. The job is checked with
    ``sbatch --test-only`` before any work starts; a job that ends (``scancel``, walltime) is
    replaced and its lost work recomputed by the scheduler.
``cuda``
    dask-cuda's ``LocalCUDACluster``: one worker per GPU with an RMM memory pool that CuPy
    and torch allocate from. Its workers advertise a ``GPU`` resource.

`task_runner_kwargs` turns a `ClusterConfig` into the keyword arguments of prefect-dask's
``DaskTaskRunner``. They hold only names and plain values (``cluster_class`` is an import
path), because Prefect copies the task runner and a live cluster object does not survive the
copy. The cluster classes named there are factories in this module: they import the optional
packages lazily and set the scheduler's ``no-workers-timeout``, so a run whose cluster can no
longer run its work fails with a message instead of waiting forever.

Mixed clusters: a worker started with ``--resources GPU=1`` is a GPU worker. `stage_resources`
gives the Dask resources a stage's chunk tasks ask for: the GPU stages ask for one ``GPU``
when some worker has one, so they land there; on clusters without GPU workers they ask for
nothing (a restriction no worker can meet would wait forever).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightsheet.config import ClusterConfig
from lightsheet.errors import ClusterError

__all__ = [
    "DEFAULT_JOBQUEUE",
    "GPU_RESOURCE",
    "GPU_STAGES",
    "LOCAL_LOST_WORKER_TIMEOUT_S",
    "SLURM_COMMAND_TIMEOUT_S",
    "WORKER_MALLOC_ENV",
    "check_slurm_job",
    "cuda_cluster",
    "cuda_cluster_kwargs",
    "load_jobqueue",
    "local_cluster",
    "local_cluster_kwargs",
    "logger",
    "release_freed_memory",
    "slurm_cluster",
    "slurm_cluster_kwargs",
    "slurm_job_states",
    "stage_resources",
    "task_runner_kwargs",
]

logger = logging.getLogger(__name__)

#: Name of the Dask worker resource that marks a GPU worker (``dask worker --resources GPU=1``).
GPU_RESOURCE = "GPU"
#: Stages whose chunk tasks run on a GPU when the cluster has GPU workers.
GPU_STAGES = frozenset({"deconvolve", "featurize", "segment"})
#: The project's dask-jobqueue file, used by the ``slurm`` profile unless told otherwise.
DEFAULT_JOBQUEUE = Path(__file__).resolve().parents[1] / "infra" / "jobqueue.yaml"
#: Seconds allowed to each SLURM command (sbatch --test-only, squeue).
SLURM_COMMAND_TIMEOUT_S = 30.0


def task_runner_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of ``prefect_dask.DaskTaskRunner`` for a cluster profile.

    Parameters
    ----------
    config : ClusterConfig
        The run config's ``cluster`` section.

    Returns
    -------
    dict
        ``{"address": ...}`` for ``address``; otherwise ``cluster_class`` (an import path),
        ``cluster_kwargs`` and, for ``slurm``, ``adapt_kwargs``.

    Raises
    ------
    ClusterError
        The profile's package is not installed, or the jobqueue file cannot be used.

    Examples
    --------
    >>> from lightsheet.config import ClusterConfig
    >>> task_runner_kwargs(ClusterConfig(profile="address", address="tcp://10.0.0.5:8786"))
    {'address': 'tcp://10.0.0.5:8786'}
    """
    if config.profile == "address":
        return {"address": config.address}
    if config.profile == "local":
        return {
            "cluster_class": "lightsheet.clusters.local_cluster",
            "cluster_kwargs": local_cluster_kwargs(config),
        }
    if config.profile == "slurm":
        return {
            "cluster_class": "lightsheet.clusters.slurm_cluster",
            "cluster_kwargs": slurm_cluster_kwargs(config),
            "adapt_kwargs": {"minimum_jobs": config.min_jobs, "maximum_jobs": config.max_jobs},
        }
    if config.profile == "cuda":
        return {
            "cluster_class": "lightsheet.clusters.cuda_cluster",
            "cluster_kwargs": cuda_cluster_kwargs(config),
        }
    raise ClusterError(f"cluster.profile: unknown profile {config.profile!r}")


def local_cluster_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """LocalCluster settings: one worker process using every core unless told otherwise.

    One process with several threads keeps memory low (one copy of the imported libraries,
    no inter-worker transfers); numpy, scipy.fft and torch release the GIL in their kernels.
    """
    cores = _available_cores()
    n_workers = config.n_workers or 1
    threads = config.threads_per_worker or max(1, cores // n_workers)
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": True,
        "dashboard_address": None,
    }
    if config.memory_limit:
        kwargs["memory_limit"] = config.memory_limit
    return kwargs


#: How long a local cluster waits for a dead worker's replacement to connect before it drops
#: that worker for good (Dask's ``distributed.deploy.lost-worker-timeout``, default 15 s).
LOCAL_LOST_WORKER_TIMEOUT_S = 3600.0


#: glibc allocator settings for local workers. Dask's default trim threshold (64 KiB) makes
#: every large chunk buffer a fresh mapping the kernel must fault in: measured 10.8 s of
#: system CPU per GB stitched, 1.4 s with these (benchmarks/pipeline.py --worker-env).
#: Freed memory up to the trim threshold stays with the worker for reuse. Buffers up to the
#: mmap threshold come from that reused memory: at 64 MiB the stitch stage's 74 MB blocks
#: (4 GB sample) were fresh mappings, and its first pass in a new worker took 8.9 s against
#: 6.4 s at 256 MiB; the 1 GB pipeline's peak memory is the same (2.22 GiB) either way.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": 256 << 20, "MALLOC_MMAP_THRESHOLD_": 256 << 20}


def release_freed_memory(dask_worker: Any = None) -> int | None:
    """Return the allocator's freed memory to the system (glibc ``malloc_trim(0)``).

    Each stage task calls this on every worker as it starts (`tasks._common.dask_client`):
    `WORKER_MALLOC_ENV` keeps up to 256 MiB of freed memory per arena for reuse, which
    speeds a stage's own passes, but what the previous stage freed is not this stage's to
    reuse: on entering the 16 GB sample's segment stage it returned 145 MiB of the worker's
    1,547 (`benchmarks/results/real_data.md`; most of the rest was the deconvolve stage's
    OTF cache, which that stage now drops). Returns 1 when memory was released, 0 when
    none was, -1 where the C library has no ``malloc_trim`` (macOS, musl).

    Run through ``client.run``, it is given its worker (``dask_worker``) and trims only a
    worker that a nanny started in a process of its own. A worker without one may be
    running in the flow's own process (``processes=False``), whose heap is the flow's and
    whose other threads are mid-task: it is left alone, and None returned.
    """
    if dask_worker is not None and dask_worker.nanny is None:
        return None
    trim = _malloc_trim()
    return -1 if trim is None else int(trim(0))


@functools.cache
def _malloc_trim() -> Any:
    """The C library's ``malloc_trim``, looked up once a process; None where it has none."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: no ldconfig run
    except (OSError, AttributeError):
        return None


def local_cluster(**kwargs: Any) -> Any:
    """``distributed.LocalCluster(**kwargs)`` that keeps a dead worker's replacement.

    When a worker process dies, its nanny starts a new one, but ``LocalCluster`` closes that
    nanny (for the rest of the run) unless the new worker connects within Dask's
    ``lost-worker-timeout`` (15 s). A loaded machine often needs longer to start a Python
    process that imports the scientific stack, so one killed worker would silently shrink the
    cluster. Here the wait is `LOCAL_LOST_WORKER_TIMEOUT_S` (or Dask's setting when longer);
    nannies live in the flow's process, so a replacement always comes.
    """
    return _patient_local_cluster_class()(**kwargs)


@functools.cache
def _patient_local_cluster_class() -> type:
    import dask
    from dask.utils import parse_timedelta
    from distributed import LocalCluster

    key = "distributed.deploy.lost-worker-timeout"

    class PatientLocalCluster(LocalCluster):
        """``LocalCluster`` waiting `LOCAL_LOST_WORKER_TIMEOUT_S` for replacement workers.

        Its nannies start workers with `WORKER_MALLOC_ENV` (they read Dask's config once,
        here, and use it for replacements too).
        """

        def __init__(self, **kwargs: Any) -> None:
            env = {
                f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENV.items()
            }
            with dask.config.set(env):
                super().__init__(**kwargs)

        def _update_worker_status(self, op: str, msg: Any) -> None:
            # SpecCluster reads the timeout here, when the scheduler reports a removal
            wait_s = max(LOCAL_LOST_WORKER_TIMEOUT_S, parse_timedelta(dask.config.get(key)))
            with dask.config.set({key: f"{wait_s}s"}):
                super()._update_worker_status(op, msg)

    return PatientLocalCluster


def slurm_cluster_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """``SLURMCluster`` settings: the jobqueue file, then the run config's overrides.

    The workers run this process's Python (``sys.executable``) unless the file names one, so
    they import the same installed ``lightsheet``, ``tasks`` and ``flows``. Job logs go to
    the file's ``log-directory``, else ``~/.cache/lightsheet/slurm-logs`` (home is shared
    with the compute nodes on most sites; the job fails when SLURM cannot open its log).
    """
    _require("dask_jobqueue", "slurm", "pip install 'lightsheet[slurm]'")
    path = config.jobqueue if config.jobqueue is not None else DEFAULT_JOBQUEUE
    if config.jobqueue is None and not DEFAULT_JOBQUEUE.is_file():
        kwargs: dict[str, Any] = {}  # installed without the source tree: site config only
    else:
        kwargs = load_jobqueue(path)
    if config.threads_per_worker:
        kwargs["cores"] = config.threads_per_worker
    if config.memory_limit:
        kwargs["memory"] = config.memory_limit
    if config.interface:
        kwargs["interface"] = config.interface
    kwargs.setdefault("python", sys.executable)
    kwargs.setdefault("log_directory", str(Path.home() / ".cache" / "lightsheet" / "slurm-logs"))
    kwargs["no_workers_timeout_s"] = config.no_workers_timeout_s
    return kwargs


def cuda_cluster_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """``LocalCUDACluster`` settings: one worker per GPU, each advertising one ``GPU``."""
    kwargs: dict[str, Any] = {
        "threads_per_worker": config.threads_per_worker or 1,
        "rmm_pool_size": config.rmm_pool_size,
        "dashboard_address": None,
        "resources": {GPU_RESOURCE: 1},
        "no_workers_timeout_s": config.no_workers_timeout_s,
    }
    if config.n_workers:
        kwargs["n_workers"] = config.n_workers
    if config.memory_limit:
        kwargs["memory_limit"] = config.memory_limit
    return kwargs


def load_jobqueue(path: str | Path) -> dict[str, Any]:
    """The ``jobqueue.slurm`` section of a dask-jobqueue YAML file as ``SLURMCluster`` kwargs.

    Keys are dask-jobqueue's (``death-timeout`` becomes ``death_timeout``, ``name`` the job
    name); null values are left out, so the site's Dask configuration fills them in.

    Raises
    ------
    ClusterError
        The file is missing, is not YAML, has no ``jobqueue.slurm`` mapping, or has a key
        dask-jobqueue does not know.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"cluster.jobqueue: no file {path}; expected a dask-jobqueue YAML")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ClusterError(f"cluster.jobqueue: {path} is not valid YAML: {exc}") from exc
    section = raw.get("jobqueue", {}).get("slurm") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise ClusterError(
            f"cluster.jobqueue: {path} has no 'jobqueue: slurm:' mapping; expected the layout "
            "of dask-jobqueue's jobqueue.yaml"
        )
    known = set(_jobqueue_defaults())
    unknown = sorted(set(section) - known)
    if unknown:
        raise ClusterError(
            f"cluster.jobqueue: {path}: unknown keys {unknown} under jobqueue.slurm; "
            f"expected some of {sorted(known)}"
        )
    kwargs = {}
    for key, value in section.items():
        if value is None:
            continue
        kwargs["job_name" if key == "name" else key.replace("-", "_")] = value
    return kwargs


def stage_resources(stage: str, workers: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """Dask resources a stage's chunk tasks ask for on this cluster.

    Parameters
    ----------
    stage : str
        The stage name (``"deconvolve"``, ``"featurize"``, ...).
    workers : iterable of mapping
        Worker descriptions, e.g. ``client.scheduler_info()["workers"].values()``; each may
        have a ``"resources"`` mapping.

    Returns
    -------
    dict or None
        ``{"GPU": 1}`` for a GPU stage when some worker has a GPU resource, else None (no
        restriction: the chunk tasks run anywhere, on NumPy where there is no GPU).
    """
    if stage not in GPU_STAGES:
        return None
    for worker in workers:
        if float((worker.get("resources") or {}).get(GPU_RESOURCE, 0)) > 0:
            return {GPU_RESOURCE: 1}
    return None


# -- cluster factories (named by import path in ``cluster_class``) -----------------------------


def slurm_cluster(
    *, no_workers_timeout_s: float | None = None, check_job: bool = True, **kwargs: Any
) -> Any:
    """Start a ``SLURMCluster`` whose worker job is known to be accepted by SLURM.

    Parameters
    ----------
    no_workers_timeout_s : float, optional
        Tasks that wait this long with no worker to run them fail (``NoWorkerError``) instead
        of waiting forever; None waits forever.
    check_job : bool
        Submit the job script with ``sbatch --test-only`` first: a job SLURM would refuse
        (memory above every node's RealMemory, unknown partition or account) raises here
        rather than being retried silently by adaptive scaling.
    **kwargs
        ``dask_jobqueue.SLURMCluster`` keyword arguments.

    Returns
    -------
    dask_jobqueue.SLURMCluster
        With a watchdog (every 10 s) that submits replacements for worker jobs that ended
        and logs the SLURM state of its jobs while work waits without any worker.

    Raises
    ------
    ClusterError
        dask-jobqueue or the SLURM commands are missing, or SLURM refuses the job.
    """
    _require("dask_jobqueue", "slurm", "pip install 'lightsheet[slurm]'")
    for command in ("sbatch", "squeue", "scancel"):
        if shutil.which(command) is None:
            raise ClusterError(
                f"cluster.profile 'slurm': the SLURM command {command!r} is not on PATH; run "
                "the flow on a SLURM submit host (or start infra/slurm/start.sh and export "
                "SLURM_CONF)"
            )
    cls = _watched_slurm_cluster_class()
    with _scheduler_config(no_workers_timeout_s):
        cluster = cls(**kwargs)
    try:
        if check_job:
            check_slurm_job(cluster.job_script())
        cluster.start_watchdog(no_workers_timeout_s)
    except BaseException:
        cluster.close()
        raise
    return cluster


def cuda_cluster(*, no_workers_timeout_s: float | None = None, **kwargs: Any) -> Any:
    """Start a ``LocalCUDACluster``: one worker per visible GPU, RMM pool for CuPy and torch.

    Parameters
    ----------
    no_workers_timeout_s : float, optional
        As in `slurm_cluster`.
    **kwargs
        ``dask_cuda.LocalCUDACluster`` keyword arguments.

    Raises
    ------
    ClusterError
        dask-cuda, CuPy, a CUDA GPU or (with ``rmm_pool_size``) RAPIDS rmm is missing.
    """
    _require("dask_cuda", "cuda", "pip install 'lightsheet[gpu]'")
    _require("cupy", "cuda", "pip install 'lightsheet[gpu]'")
    import cupy

    try:
        n_gpus = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # driver or runtime errors have no common base class
        raise ClusterError(f"cluster.profile 'cuda': no usable CUDA GPU ({exc})") from exc
    if n_gpus == 0:
        raise ClusterError("cluster.profile 'cuda': no CUDA GPU is visible")
    if kwargs.get("n_workers") and kwargs["n_workers"] > n_gpus:
        raise ClusterError(
            f"cluster.n_workers: {kwargs['n_workers']} GPU workers asked for; "
            f"{n_gpus} GPU(s) visible"
        )
    import inspect

    from dask_cuda import LocalCUDACluster

    if kwargs.get("rmm_pool_size") is not None:
        _require("rmm", "cuda", "pip install rmm-cu12, or set cluster.rmm_pool_size: null")
        # CuPy and torch draw from the pool instead of keeping caches beside it
        if "rmm_allocator_external_lib_list" in inspect.signature(LocalCUDACluster).parameters:
            kwargs.setdefault("rmm_allocator_external_lib_list", ["cupy", "torch"])
        else:
            logger.warning(
                "dask-cuda %s cannot route CuPy/torch allocations to the RMM pool; they "
                "allocate beside it (lower cluster.rmm_pool_size if GPUs run out of memory)",
                getattr(sys.modules.get("dask_cuda"), "__version__", "?"),
            )
    with _scheduler_config(no_workers_timeout_s):
        return LocalCUDACluster(**kwargs)


def check_slurm_job(job_script: str, *, timeout_s: float = SLURM_COMMAND_TIMEOUT_S) -> str:
    """Ask SLURM whether it would run a job script, without submitting it.

    Returns
    -------
    str
        sbatch's answer (the expected start, node and partition).

    Raises
    ------
    ClusterError
        sbatch refuses the job (its message and the script's directives are included), or
        does not answer within ``timeout_s`` (slurmctld down).
    """
    try:
        done = subprocess.run(
            ["sbatch", "--test-only"],
            input=job_script,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(
            f"cluster.profile 'slurm': sbatch did not answer in {timeout_s:.0f} s; is "
            "slurmctld running and SLURM_CONF set?"
        ) from exc
    answer = (done.stderr + done.stdout).strip()
    if done.returncode != 0:
        directives = "\n".join(
            line for line in job_script.splitlines() if line.startswith("#SBATCH")
        )
        raise ClusterError(
            f"cluster.profile 'slurm': SLURM refuses the worker job: {answer}\n"
            f"job directives (from the jobqueue file and cluster settings):\n{directives}\n"
            "expected a job that fits a partition's nodes (cores, memory, walltime)"
        )
    return answer


def slurm_job_states(job_ids: Iterable[str] | None = None) -> dict[str, str] | None:
    """SLURM state (and pending reason) of this user's jobs, e.g. ``{"12": "PENDING (Resources)"}``.

    Parameters
    ----------
    job_ids : iterable of str, optional
        Report these jobs; a job that is no longer in the queue gets ``"ENDED"``.
        None: every job of the user that squeue lists.

    Returns
    -------
    dict or None
        None when squeue does not answer (slurmctld down): the states are unknown.
    """
    import getpass

    try:
        done = subprocess.run(
            ["squeue", "--noheader", "--format=%i|%T|%r", f"--user={getpass.getuser()}"],
            capture_output=True,
            text=True,
            timeout=SLURM_COMMAND_TIMEOUT_S,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():
        job_id, state, reason = ([*line.split("|"), "", ""])[:3]
        reason = reason.strip()
        states[job_id.strip()] = f"{state} ({reason})" if reason not in ("", "None") else state
    if job_ids is None:
        return states
    return {str(j): states.get(str(j), "ENDED") for j in job_ids}


def _job_ended(state: str) -> bool:
    """A job state after which the job's worker will not (or no longer) run."""
    return state.split(" ")[0] not in _LIVE_JOB_STATES


_LIVE_JOB_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING"}
)


# -- helpers ------------------------------------------------------------------------------------


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _require(module: str, profile: str, how: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ClusterError(
            f"cluster.profile {profile!r} needs the Python package {module!r}, which is not "
            f"installed here ({sys.executable}); {how}"
        )


def _import_dask_jobqueue() -> Any:
    """Import dask_jobqueue without the SIGINT handler its ``runner`` module installs.

    That handler (``sys.exit`` on Ctrl-C) would replace the flow's own, and installing it
    raises outside the main thread (a flow run in a thread, a Prefect worker's runner).
    """
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    import signal

    install = signal.signal
    signal.signal = lambda signalnum, handler: signal.getsignal(signalnum)  # keep handlers
    try:
        import dask_jobqueue
    finally:
        signal.signal = install
    return dask_jobqueue


@functools.cache
def _jobqueue_defaults() -> dict[str, Any]:
    import dask

    _import_dask_jobqueue()  # registers its defaults in dask.config
    return dict(dask.config.get("jobqueue.slurm"))


def _scheduler_config(no_workers_timeout_s: float | None):
    import dask

    timeout = None if no_workers_timeout_s is None else f"{no_workers_timeout_s}s"
    return dask.config.set({"distributed.scheduler.no-workers-timeout": timeout})


@functools.cache
def _watched_slurm_cluster_class() -> type:
    SLURMCluster = _import_dask_jobqueue().SLURMCluster

    class WatchedSLURMCluster(SLURMCluster):
        """``SLURMCluster`` that says why it has no workers while work waits."""

        _watchdog: threading.Thread | None = None
        _connected_jobs: set[str]

        def start_watchdog(self, no_workers_timeout_s: float | None, interval_s: float = 10.0):
            self._connected_jobs = set()
            self._watch_stop = threading.Event()
            self._watchdog = threading.Thread(
                target=self._watch,
                args=(no_workers_timeout_s, interval_s),
                name="lightsheet-slurm-watchdog",
                daemon=True,
            )
            self._watchdog.start()

        def slurm_job_ids(self) -> dict[str, str]:
            """SLURM job id of each worker job this cluster tracks, by worker name."""
            return {
                name: str(job.job_id)
                for name, job in list(self.workers.items())
                if getattr(job, "job_id", None)
            }

        def _watch(self, no_workers_timeout_s: float | None, interval_s: float) -> None:
            """Every ``interval_s``: replace ended jobs, explain a cluster without workers."""
            no_workers_since, last_report = None, 0.0
            while not self._watch_stop.wait(interval_s):
                if self.status.name in ("closing", "closed") or self.scheduler is None:
                    return
                jobs = self.slurm_job_ids()
                states = slurm_job_states(jobs.values())
                if states is None:
                    logger.warning("slurm: squeue does not answer; is slurmctld running?")
                    states = {}
                ended = {n: j for n, j in jobs.items() if j in states and _job_ended(states[j])}
                self.loop.add_callback(self._replace_ended_jobs, ended)

                scheduler = self.scheduler
                waiting = len(scheduler.queued) + len(scheduler.unrunnable)
                if scheduler.workers or not waiting:
                    no_workers_since = None
                    continue
                now = time.monotonic()
                no_workers_since = no_workers_since or now
                if now - no_workers_since < 60 or now - last_report < 60:
                    continue  # jobs take a while to start; say it once a minute
                last_report = now
                logger.warning(
                    "slurm: no Dask worker for %.0f s while %d tasks wait (the run fails after "
                    "%s without workers); worker jobs: %s",
                    now - no_workers_since,
                    waiting,
                    "never" if no_workers_timeout_s is None else f"{no_workers_timeout_s:.0f} s",
                    ", ".join(f"{j} {states.get(j, '?')}" for j in jobs.values())
                    or "none submitted",
                )

        async def _replace_ended_jobs(self, ended: Mapping[str, str]) -> None:
            """Forget jobs that ended without a connected worker, then resubmit the plan.

            A worker whose job ends is removed by the scheduler, and dask's cluster forgets
            its job after ``distributed.deploy.lost-worker-timeout``; a job that ends before
            its worker connects (cancelled while pending, failed at start) is never
            forgotten. Either way adaptive scaling sees the planned number of jobs and
            submits no replacement; `_correct_state` starts every planned job that is
            missing.
            """
            if self.status.name in ("closing", "closed"):
                return
            connected = {str(ws.name) for ws in self.scheduler.workers.values()}
            for name, job in self.workers.items():
                if any(w == str(name) or w.startswith(f"{name}-") for w in connected):
                    self._connected_jobs.add(str(job.job_id))
            replaced = []
            for name, job_id in ended.items():
                job = self.workers.get(name)
                if job is None or str(job.job_id) != job_id:
                    continue  # already forgotten or replaced
                if job_id in self._connected_jobs:
                    continue  # dask forgets it once the scheduler has lost its worker
                del self.workers[name]
                await job.close()
                replaced.append(job_id)
            missing = set(self.worker_spec) - set(self.workers)
            if replaced or missing:
                logger.warning(
                    "slurm: worker job(s) %s ended (cancelled, walltime, node failure); "
                    "submitting %d replacement(s); their lost work is recomputed",
                    ", ".join(replaced) or "(already removed)",
                    len(missing),
                )
                await self._correct_state()

        def close(self, *args, **kwargs):
            if self._watchdog is not None:
                self._watch_stop.set()
            return super().close(*args, **kwargs)

    return WatchedSLURMCluster
