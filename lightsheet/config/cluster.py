"""Where Dask computes: the cluster profile and its sizes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lightsheet.config._base import PositiveFloat, _Model, schema_rules, when

__all__ = ["ClusterConfig"]


class ClusterConfig(_Model):
    """Where Dask computes: a cluster profile and its sizes (see docs/clusters.md)."""

    # _profile_fields, as far as JSON Schema can say it (min_jobs <= max_jobs compares two
    # values: checked when the run starts)
    model_config = schema_rules(
        when("profile", {"const": "address"}, "address", {"type": "string"}, required=True),
        when(
            "profile",
            {"not": {"const": "address"}},
            "address",
            {"type": "null"},
            absent_matches=True,
        ),
    )

    profile: Literal["local", "slurm", "cuda", "address"] = Field(
        "local",
        description="local: this machine; slurm: SLURM jobs via dask-jobqueue, scaled "
        "adaptively; cuda: one worker per local GPU (dask-cuda); address: a running scheduler.",
    )
    address: str | None = Field(
        None, description="Scheduler address for profile=address, e.g. tcp://10.0.0.5:8786."
    )
    n_workers: int | None = Field(
        None,
        ge=1,
        description="local: worker processes (default 1); cuda: GPUs used, one worker each "
        "(default: every visible GPU).",
    )
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        description="Threads per worker. local: default all cores; cuda: default 1; slurm: "
        "cores of each job (default: the jobqueue file).",
    )
    memory_limit: str | None = Field(
        None,
        description="Memory per worker, e.g. '4GiB' (slurm: per job, must fit a node's "
        "RealMemory); default: auto, or the jobqueue file for slurm.",
    )
    min_jobs: int = Field(
        1, ge=0, description="slurm: adaptive scaling keeps at least this many worker jobs."
    )
    max_jobs: int = Field(
        4, ge=1, description="slurm: adaptive scaling runs at most this many worker jobs."
    )
    jobqueue: Path | None = Field(
        None,
        description="slurm: dask-jobqueue YAML whose jobqueue.slurm section describes one "
        "worker job (cores, memory, walltime, queue, account, ...); default: infra/jobqueue.yaml "
        "of the source tree, else the site's Dask configuration.",
    )
    interface: str | None = Field(
        None,
        description="slurm: network interface of scheduler and workers, e.g. 'ib0' ('lo' when "
        "jobs run on this machine); default: the jobqueue file.",
    )
    rmm_pool_size: PositiveFloat | str | None = Field(
        0.8,
        description="cuda: RMM memory pool per GPU, a fraction of its memory (0-1] or a size "
        "like '20GB'; CuPy and torch allocate from it. None: no pool.",
    )
    no_workers_timeout_s: PositiveFloat | None = Field(
        600.0,
        description="Fail the run when work has waited this long without any worker able to "
        "run it (jobs that never start, a cluster that is gone) instead of waiting forever. "
        "None: wait forever (long queues).",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([a-z]+://)?[^\s:/]+(:\d+)?/?", v.strip()):
            raise ValueError(f"address must look like tcp://host:8786; got {v!r}")
        return v if v is None else v.strip()

    @field_validator("rmm_pool_size", mode="before")
    @classmethod
    def _rmm_pool_size(cls, v: object) -> object:
        if isinstance(v, str):
            from dask.utils import parse_bytes

            try:
                v = float(v)  # a fraction typed as text (UI, CLI)
            except ValueError:
                try:
                    size = parse_bytes(v)
                except ValueError:
                    size = 0
                if size <= 0:
                    raise ValueError(
                        "rmm_pool_size must be a fraction in (0, 1] or a size like '20GB'; "
                        f"got {v!r}"
                    ) from None
                return v
        if isinstance(v, int | float) and not isinstance(v, bool) and not 0 < v <= 1:
            raise ValueError(f"rmm_pool_size as a fraction must be in (0, 1]; got {v}")
        return v

    @model_validator(mode="after")
    def _profile_fields(self) -> ClusterConfig:
        if self.profile == "address" and not self.address:
            raise ValueError("address is required when profile is 'address' (tcp://host:port)")
        if self.profile != "address" and self.address:
            raise ValueError(
                f"address is only used with profile 'address'; profile is {self.profile!r}"
            )
        if self.min_jobs > self.max_jobs:
            raise ValueError(
                f"min_jobs ({self.min_jobs}) must not exceed max_jobs ({self.max_jobs})"
            )
        return self
