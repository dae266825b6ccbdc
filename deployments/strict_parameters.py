"""Make the server reject unknown parameters of the deployments in ``prefect.yaml``.

Run after ``prefect deploy --all`` (``infra/prefect/deploy.sh`` does both)::

    python deployments/strict_parameters.py

Why: ``enforce_parameter_schema`` makes the server check every run's parameters against the
deployment's JSON schema when the run is created (a wrong type, an out-of-range value or a
missing required parameter is refused with 409 naming the field), and the run config's
pydantic models (``extra="forbid"``) put ``additionalProperties: false`` on every nested
object. The schema's top level, though, is written by ``prefect deploy`` without it, so an
unknown top-level key would pass creation and only fail when the flow starts. This sets
``additionalProperties: false`` on the top level of each deployment's stored schema; the
server then refuses such a run at creation with "'<key>' was unexpected".

Deployments are matched by name and entrypoint. Uses ``PREFECT_API_URL`` and
``PREFECT_API_AUTH_STRING`` like any Prefect client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def deployments_in(prefect_yaml: Path) -> list[tuple[str, str]]:
    """(name, entrypoint) of every deployment declared in a prefect.yaml."""
    import yaml

    spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    return [(d["name"], d["entrypoint"]) for d in spec.get("deployments") or []]


def strict_schema(schema: dict) -> dict:
    """The schema with unknown top-level parameters forbidden."""
    return {**schema, "additionalProperties": False}


def forbid_unknown_parameters(prefect_yaml: Path = HERE / "prefect.yaml") -> list[str]:
    """Forbid unknown top-level parameters on the server's copy of each deployment.

    Returns
    -------
    list of str
        ``flow-name/deployment-name`` of every deployment updated.

    Raises
    ------
    LookupError
        A deployment of the file is not on the server (deploy it first).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    wanted = deployments_in(prefect_yaml)
    done = []
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[name for name, _ in wanted])
            )
        )
        for name, entrypoint in wanted:
            matches = [d for d in found if d.name == name and d.entrypoint == entrypoint]
            if not matches:
                raise LookupError(
                    f"deployment {name!r} (entrypoint {entrypoint}) is not on the server "
                    f"{client.api_url}; run `prefect deploy --all` first"
                )
            for dep in matches:
                if not dep.enforce_parameter_schema:
                    raise ValueError(
                        f"deployment {name!r}: enforce_parameter_schema is off; "
                        "expected it on (prefect.yaml)"
                    )
                schema = strict_schema(dep.parameter_openapi_schema or {})
                client.update_deployment(dep.id, DeploymentUpdate(parameter_openapi_schema=schema))
                flow = client.read_flow(dep.flow_id)
                done.append(f"{flow.name}/{dep.name}")
    return done


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefect_yaml", nargs="?", default=str(HERE / "prefect.yaml"))
    args = parser.parse_args(argv)
    for name in forbid_unknown_parameters(Path(args.prefect_yaml)):
        print(f"{name}: unknown parameters are refused at run creation")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
