"""Cluster profiles: runner settings per profile, jobqueue files, GPU resources, failures."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lightsheet import clusters
from lightsheet.clusters import (
    DEFAULT_JOBQUEUE,
    load_jobqueue,
    stage_resources,
    task_runner_kwargs,
)
from lightsheet.config import ClusterConfig
from lightsheet.errors import ClusterError

CORES = len(os.sched_getaffinity(0))


def test_local_profile_uses_every_core_by_default():
    kwargs = task_runner_kwargs(ClusterConfig())
    assert kwargs["cluster_class"] == "lightsheet.clusters.local_cluster"
    assert kwargs["cluster_kwargs"]["n_workers"] == 1
    assert kwargs["cluster_kwargs"]["threads_per_worker"] == CORES
    sized = task_runner_kwargs(
        ClusterConfig(n_workers=2, threads_per_worker=3, memory_limit="1GiB")
    )["cluster_kwargs"]
    assert (sized["n_workers"], sized["threads_per_worker"], sized["memory_limit"]) == (
        2,
        3,
        "1GiB",
    )


def test_address_profile_connects_only():
    assert task_runner_kwargs(ClusterConfig(profile="address", address="tcp://10.0.0.5:8786")) == {
        "address": "tcp://10.0.0.5:8786"
    }


def test_runner_kwargs_survive_prefect_copy():
    from prefect_dask import DaskTaskRunner

    for config in (ClusterConfig(), ClusterConfig(profile="slurm"), ClusterConfig(profile="cuda")):
        runner = DaskTaskRunner(**task_runner_kwargs(config))
        copy = runner.duplicate()
        assert copy == runner and copy.cluster_kwargs == runner.cluster_kwargs


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"profile": "address"}, "address is required"),
        ({"address": "tcp://x:1"}, "only used with profile 'address'"),
        ({"profile": "address", "address": "tcp://a b"}, "must look like"),
        ({"min_jobs": 5, "max_jobs": 2}, "must not exceed"),
        ({"rmm_pool_size": 1.5}, r"\(0, 1\]"),
        ({"rmm_pool_size": "lots"}, "size like"),
        ({"profile": "kubernetes"}, "profile"),
        ({"cores": 4}, "Extra inputs"),
    ],
)
def test_bad_cluster_config_is_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        ClusterConfig(**fields)


def test_rmm_pool_size_accepts_fractions_and_sizes():
    assert ClusterConfig.model_validate({"rmm_pool_size": "0.5"}).rmm_pool_size == 0.5
    assert ClusterConfig(rmm_pool_size="20GB").rmm_pool_size == "20GB"
    assert ClusterConfig(rmm_pool_size=None).rmm_pool_size is None


def test_slurm_profile_reads_the_project_jobqueue_file():
    kwargs = task_runner_kwargs(ClusterConfig(profile="slurm", min_jobs=0, max_jobs=3))
    assert kwargs["cluster_class"] == "lightsheet.clusters.slurm_cluster"
    assert kwargs["adapt_kwargs"] == {"minimum_jobs": 0, "maximum_jobs": 3}
    job = kwargs["cluster_kwargs"]
    from_file = load_jobqueue(DEFAULT_JOBQUEUE)
    assert job["cores"] == from_file["cores"] and job["memory"] == from_file["memory"]
    assert job["walltime"] == from_file["walltime"]
    assert job["python"] == sys.executable  # workers import this installation
    assert job["no_workers_timeout_s"] == 600.0


def test_run_config_overrides_the_jobqueue_file(tmp_path):
    path = tmp_path / "jobqueue.yaml"
    path.write_text(
        "jobqueue:\n  slurm:\n    cores: 8\n    memory: 30GiB\n    queue: gpu\n"
        "    python: /opt/env/bin/python\n    log-directory: /scratch/logs\n"
        "    job-extra-directives: ['--gres=gpu:1']\n    account: null\n"
    )
    config = ClusterConfig(
        profile="slurm",
        jobqueue=path,
        threads_per_worker=2,
        memory_limit="3GiB",
        interface="lo",
        no_workers_timeout_s=None,
    )
    job = task_runner_kwargs(config)["cluster_kwargs"]
    assert (job["cores"], job["memory"], job["interface"]) == (2, "3GiB", "lo")
    assert job["queue"] == "gpu" and job["job_extra_directives"] == ["--gres=gpu:1"]
    assert job["python"] == "/opt/env/bin/python"  # a site's explicit choice is kept
    assert job["log_directory"] == "/scratch/logs"
    assert "account" not in job  # null: left to the site's Dask configuration
    assert job["no_workers_timeout_s"] is None


def test_slurm_job_script_from_the_profile(tmp_path):
    """The settings make a real dask-jobqueue job script (no SLURM needed to write one)."""
    SLURMCluster = clusters._import_dask_jobqueue().SLURMCluster

    config = ClusterConfig(profile="slurm", threads_per_worker=2, memory_limit="3GiB")
    job = dict(task_runner_kwargs(config)["cluster_kwargs"])
    job.pop("no_workers_timeout_s")
    job["log_directory"] = str(tmp_path / "logs")
    with SLURMCluster(**job, scheduler_options={"dashboard_address": None}) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --cpus-per-task=2" in script
    assert "#SBATCH --mem=3G" in script
    assert "#SBATCH -t 01:00:00" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert "--nthreads 2" in script and "--death-timeout 60" in script


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "no file"),
        ("jobqueue: [unclosed", "not valid YAML"),
        ("jobqueue:\n  pbs:\n    cores: 1\n", "no 'jobqueue: slurm:' mapping"),
        ("jobqueue:\n  slurm:\n    cpus: 4\n", r"unknown keys \['cpus'\]"),
    ],
)
def test_bad_jobqueue_file(tmp_path, text, message):
    path = tmp_path / "jobqueue.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ClusterError, match=message) as info:
        task_runner_kwargs(ClusterConfig(profile="slurm", jobqueue=path))
    assert str(path) in str(info.value)


def test_cuda_profile_settings():
    kwargs = task_runner_kwargs(ClusterConfig(profile="cuda", n_workers=2, rmm_pool_size="20GB"))
    assert kwargs["cluster_class"] == "lightsheet.clusters.cuda_cluster"
    cuda = kwargs["cluster_kwargs"]
    assert cuda["resources"] == {"GPU": 1}  # GPU stages find these workers
    assert (cuda["n_workers"], cuda["threads_per_worker"], cuda["rmm_pool_size"]) == (
        2,
        1,
        "20GB",
    )


def test_missing_profile_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("dask_cuda", "dask_jobqueue") else real(name, *a),
    )
    with pytest.raises(ClusterError, match=r"'cuda' needs the Python package 'dask_cuda'"):
        clusters.cuda_cluster(**task_runner_kwargs(ClusterConfig(profile="cuda"))["cluster_kwargs"])
    with pytest.raises(ClusterError, match=r"lightsheet\[slurm\]"):
        task_runner_kwargs(ClusterConfig(profile="slurm"))


def test_slurm_profile_without_slurm_commands_is_explained(monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no sbatch
    with pytest.raises(ClusterError, match="'sbatch' is not on PATH"):
        clusters.slurm_cluster(
            **task_runner_kwargs(ClusterConfig(profile="slurm"))["cluster_kwargs"]
        )


def test_gpu_stages_ask_for_a_gpu_only_where_one_exists():
    cpu_only = [{"resources": {}}, {}]
    mixed = [{"resources": {}}, {"resources": {"GPU": 1}}]
    assert stage_resources("deconvolve", cpu_only) is None
    for stage in ("deconvolve", "featurize", "segment"):
        assert stage_resources(stage, mixed) == {"GPU": 1}
    assert stage_resources("stitch", mixed) is None
    assert stage_resources("density", mixed) is None


def test_gpu_restricted_chunks_run_on_gpu_workers():
    """A mixed cluster: chunk tasks of a GPU stage land only on the worker with a GPU."""
    import dask.array as da
    from distributed import Client, Scheduler, SpecCluster, Worker, get_worker

    def where(block):
        return block * 0 + (1 if get_worker().name == "gpu" else 2)

    workers = {
        "cpu": {"cls": Worker, "options": {"nthreads": 2}},
        "gpu": {"cls": Worker, "options": {"nthreads": 2, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with (
        SpecCluster(workers=workers, scheduler=scheduler) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2, timeout=30)
        found = client.scheduler_info(n_workers=-1)["workers"].values()
        image = da.zeros((8, 8, 8), chunks=2).map_blocks(where, dtype=float)
        on_gpu = client.compute(image, resources=stage_resources("featurize", found))
        assert set(on_gpu.result(timeout=60).ravel()) == {1}
        anywhere = client.compute(image, resources=stage_resources("stitch", found))
        assert set(anywhere.result(timeout=60).ravel()) <= {1, 2}


def test_work_without_workers_fails_instead_of_hanging():
    """The no-workers timeout the cluster factories set: a clear error, not a hang."""
    from distributed import Client, LocalCluster
    from distributed.scheduler import NoValidWorkerError

    with clusters._scheduler_config(1.0):
        cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=None)
    with cluster, Client(cluster) as client:
        future = client.submit(sum, [1, 2], resources={"GPU": 1})  # no worker has a GPU
        with pytest.raises(NoValidWorkerError, match="timed out after"):
            future.result(timeout=60)


def _hold_a_fragmented_heap(dask_worker) -> int:
    """200 MB in 100 kB blocks (under the mmap threshold), every tenth kept on the worker:
    the freed chunks lie between live ones, where glibc keeps them until ``malloc_trim``."""
    import psutil

    blocks = [bytearray(100_000) for _ in range(2_000)]
    for block in blocks:
        block[::4096] = bytes(len(block[::4096]))  # touch every page
    dask_worker.kept_for_test = blocks[::10]
    del blocks
    return psutil.Process().memory_info().rss


def _stage_rss() -> int:
    import psutil

    from tasks._common import dask_client

    with dask_client():
        return psutil.Process().memory_info().rss


def test_stage_client_returns_the_last_stage_s_freed_memory():
    """A stage task's client first has every worker release the heap the previous stage
    freed; a worker in the flow's own process (no nanny) is left alone."""
    from distributed import Client, LocalCluster

    if clusters.release_freed_memory() == -1:
        pytest.skip("this C library has no malloc_trim")

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.submit(_stage_rss, pure=False).result(timeout=120)  # imports the stage's code
        (held,) = client.run(_hold_a_fragmented_heap).values()
        after = client.submit(_stage_rss, pure=False).result(timeout=120)
        assert held - after > 100e6, (held, after)
        (result,) = client.run(clusters.release_freed_memory).values()
        assert result in (0, 1)  # a nanny's worker: trimmed

    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        assert list(client.run(clusters.release_freed_memory).values()) == [None]


def test_importing_dask_jobqueue_keeps_signal_handlers():
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT)
    errors = []

    def in_thread():
        try:
            clusters._import_dask_jobqueue()
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(60)
    assert not errors
    assert signal.getsignal(signal.SIGINT) is before


def test_squeue_unavailable_means_unknown(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert clusters.slurm_job_states(["1"]) is None


@pytest.mark.slow  # starts a Dask cluster of processes
@pytest.mark.gpu
def test_cuda_cluster_workers_have_gpus_and_rmm_pool():
    from distributed import Client

    config = ClusterConfig(profile="cuda", n_workers=1, rmm_pool_size=0.3)
    with (
        clusters.cuda_cluster(**task_runner_kwargs(config)["cluster_kwargs"]) as cluster,
        Client(cluster) as client,
    ):

        def on_worker():
            import cupy
            import rmm

            x = cupy.arange(10**6, dtype=cupy.float32)
            return float(x.sum()), type(rmm.mr.get_current_device_resource()).__name__

        total, resource = client.submit(on_worker, resources={"GPU": 1}).result(timeout=120)
        assert total == pytest.approx(10**6 * (10**6 - 1) / 2, rel=1e-4)
        assert "Pool" in resource
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert stage_resources("featurize", workers) == {"GPU": 1}


@pytest.mark.gpu
@pytest.mark.slow
def test_pipeline_cuda_profile_matches_local(tiny_sample, prefect_harness, tmp_path):
    """The whole flow on GPU workers finds the cells the CPU run finds."""
    import pandas as pd

    from flows.pipeline import pipeline
    from lightsheet.config import load_config

    config = load_config(tiny_sample / "config.yaml")
    local = pipeline(config.model_copy(update={"output": tmp_path / "local"}))
    cuda = pipeline(
        config.model_copy(
            update={"output": tmp_path / "cuda", "cluster": ClusterConfig(profile="cuda")}
        )
    )
    # float16 features and cuFFT round differently from the CPU: counts agree closely
    assert abs(cuda["n_cells"] - local["n_cells"]) <= max(2, 0.05 * local["n_cells"])
    a = pd.read_csv(tmp_path / "local" / "density.csv").set_index("structure_id")
    b = pd.read_csv(tmp_path / "cuda" / "density.csv").set_index("structure_id")
    assert list(a.index) == list(b.index)
    diff = (a["total_cells"] - b["total_cells"]).abs()
    assert (diff <= (0.1 * a["total_cells"]).clip(lower=2)).all(), diff[diff > 0].to_dict()
