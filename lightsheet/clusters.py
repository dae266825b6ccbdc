"""Cluster profiles: where the pipeline's Dask work runs, chosen by parameter, never by code.

``local``
    A `distributed.LocalCluster` on this machine (the default).
``address``
    An existing scheduler (``tcp://host:8786``); the cluster outlives the run.
``slurm``
    dask-jobqueue's ``SLURMCluster`` configured from ``infra/jobqueue.yaml`` (or the
    user's ``~/.config/dask/jobqueue.yaml``), scaled adaptively.
``cuda``
    dask-cuda's ``LocalCUDACluster``: one worker per GPU with an RMM memory pool.

`task_runner_kwargs` turns a `ClusterConfig` into the keyword arguments of prefect-dask's
``DaskTaskRunner``; the flow layer builds the runner from them.
"""

from __future__ import annotations

import os
from typing import Any

from lightsheet.config import ClusterConfig


def local_cluster_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """LocalCluster settings: one worker process using every core unless told otherwise.

    One process with several threads keeps memory low (one copy of the imported libraries,
    no inter-worker transfers); numpy, scipy.fft and torch release the GIL in their kernels.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_workers = config.n_workers or 1
    threads = config.threads_per_worker or max(1, (cores or 1) // n_workers)
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": True,
        "dashboard_address": None,
    }
    if config.memory_limit:
        kwargs["memory_limit"] = config.memory_limit
    return kwargs


def task_runner_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments of ``prefect_dask.DaskTaskRunner`` for a cluster profile."""
    if config.profile == "address":
        if not config.address:
            raise ValueError("cluster.address is required when cluster.profile is 'address'")
        return {"address": config.address}
    if config.profile == "local":
        return {
            "cluster_class": "distributed.LocalCluster",
            "cluster_kwargs": local_cluster_kwargs(config),
        }
    if config.profile == "slurm":
        kwargs: dict[str, Any] = {}
        if config.memory_limit:
            kwargs["memory"] = config.memory_limit
        return {
            "cluster_class": "dask_jobqueue.SLURMCluster",
            "cluster_kwargs": kwargs,
            "adapt_kwargs": {"minimum": 1, "maximum": config.n_workers or 4},
        }
    if config.profile == "cuda":
        return {
            "cluster_class": "dask_cuda.LocalCUDACluster",
            "cluster_kwargs": {"rmm_pool_size": "0.8", "dashboard_address": None},
        }
    raise ValueError(f"cluster.profile: unknown profile {config.profile!r}")
