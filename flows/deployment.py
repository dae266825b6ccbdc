"""What a deployment allows its runs: data roots and the cluster, read from the server.

A deployment's settings are not flow-run parameters: ``deployments/strict_parameters.py``
(run by ``infra/prefect/deploy.sh``) stores them in the deployment's parameter schema under
`SETTINGS_KEY`, and also turns them into constraints the server checks when a run is created
(path parameters must lie beneath a data root, ``cluster.address`` and ``cluster.jobqueue``
may only be empty or the deployment's own). A caller who may create flow runs cannot
change them; the schema constraints refuse a bad request with a 4xx before any run exists.

What the server's schema cannot check (symbolic links, ``..``, files a glob matches) is
checked again here when the run starts, from the same settings read back from the server
(`current_settings`, `guard_pipeline`). A run that is not a deployment's (``lightsheet
run``, a notebook) has no settings: it runs with the permissions of whoever started it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightsheet.access import check_cluster, check_within_roots, config_paths
from lightsheet.config import PipelineConfig
from lightsheet.errors import PathNotAllowedError

__all__ = [
    "SETTINGS_KEY",
    "DeploymentSettings",
    "current_settings",
    "guard_paths",
    "guard_pipeline",
]

#: Key of the deployment settings in a deployment's parameter schema.
SETTINGS_KEY = "x-lightsheet"


@dataclass(frozen=True)
class DeploymentSettings:
    """A deployment's settings (see the module notes).

    Parameters
    ----------
    deployment : str
        The deployment's name, for messages.
    data_roots : tuple of str
        Folders beneath which its runs may read and write; empty: none.
    cluster_address : str, optional
        The only scheduler address its runs may use.
    cluster_jobqueue : str, optional
        The only dask-jobqueue file its runs may use.
    """

    deployment: str
    data_roots: tuple[str, ...] = ()
    cluster_address: str | None = None
    cluster_jobqueue: str | None = None

    @classmethod
    def from_schema(cls, name: str, schema: dict[str, Any] | None) -> DeploymentSettings:
        """The settings stored in a deployment's parameter schema (none: no roots)."""
        raw = (schema or {}).get(SETTINGS_KEY) or {}
        return cls(
            deployment=name,
            data_roots=tuple(str(r) for r in raw.get("data_roots") or ()),
            cluster_address=raw.get("cluster_address") or None,
            cluster_jobqueue=raw.get("cluster_jobqueue") or None,
        )

    def to_schema(self) -> dict[str, Any]:
        """The value stored under `SETTINGS_KEY`."""
        return {
            "data_roots": list(self.data_roots),
            "cluster_address": self.cluster_address,
            "cluster_jobqueue": self.cluster_jobqueue,
        }

    def check_paths(self, paths: dict[str, Any]) -> None:
        """Refuse paths outside the data roots (no roots declared: refuse everything)."""
        if not self.data_roots:
            raise PathNotAllowedError(
                f"deployment {self.deployment} declares no data roots, so its runs may not "
                "touch any path; expected LIGHTSHEET_DATA_ROOTS when it was deployed "
                "(infra/prefect/deploy.sh)"
            )
        check_within_roots(paths, self.data_roots)


def current_settings() -> DeploymentSettings | None:
    """The settings of the deployment this flow run belongs to; None outside a deployment.

    Read from the server (the deployment object), never from the run's parameters or
    environment, which the caller controls.
    """
    from prefect import runtime
    from prefect.client.orchestration import get_client

    deployment_id = runtime.deployment.id
    if not deployment_id:
        return None
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(deployment_id)
    return DeploymentSettings.from_schema(dep.name, dep.parameter_openapi_schema)


def guard_pipeline(config: PipelineConfig, settings: DeploymentSettings | None) -> None:
    """Check a deployment run's config against its deployment's settings (no-op without).

    Raises
    ------
    PathNotAllowedError
        A path outside the data roots (after resolving links and ``..``), or a scheduler
        address or jobqueue file other than the deployment's.
    """
    if settings is None:
        return
    settings.check_paths(config_paths(config))
    check_cluster(
        config.cluster, address=settings.cluster_address, jobqueue=settings.cluster_jobqueue
    )


def guard_paths(settings: DeploymentSettings | None, **paths: Path | str | None) -> None:
    """Check named paths (e.g. the watch flow's parameters) against a deployment's roots."""
    if settings is not None:
        settings.check_paths({k: v for k, v in paths.items() if v is not None})
