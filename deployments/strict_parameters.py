"""Make the server refuse what a deployment's runs may not do, when the run is created.

Run after ``prefect deploy --all`` (``infra/prefect/deploy.sh`` does both)::

    python deployments/strict_parameters.py

Three things are added to each deployment's stored parameter schema:

* **Unknown parameters are refused** (below).
* **Data roots.** Each deployment's ``lightsheet:`` block in ``prefect.yaml`` declares the
  folders its runs may read and write (``data_roots``, a list, or a string of folders
  separated by ``:``; ``{{ $VAR }}`` takes an environment variable, as Prefect's own
  templating does). Every path parameter (``format: path``, and the globs and paths typed as
  text: ``input``, ``source``, ``output``) gets a ``pattern``: an absolute path beneath a
  root, without ``.`` or ``..`` components. The server refuses a run with any other path
  with a 409 that names the field (``output: /etc`` included). Symbolic links and the files
  a glob matches are checked again when the run starts (`flows.deployment`).
* **The cluster.** ``cluster.address`` and ``cluster.jobqueue`` may only be empty or the
  deployment's own ``cluster_address`` / ``cluster_jobqueue``: a caller cannot point the
  workers at a scheduler of its choosing.

The settings themselves are stored under ``x-lightsheet`` in the same schema, where the
flow reads them back at run time (`flows.deployment.current_settings`).

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
import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: String parameters that name paths (or globs) although their type does not say so.
PATH_PARAMETERS = ("input", "source", "output")
#: Characters with a meaning in regular expressions (Python's and ECMAScript's).
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def deployments_in(prefect_yaml: Path) -> list[tuple[str, str]]:
    """(name, entrypoint) of every deployment declared in a prefect.yaml."""
    return [(d["name"], d["entrypoint"]) for d in _deployments(prefect_yaml)]


def _deployments(prefect_yaml: Path) -> list[dict]:
    import yaml

    spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    return list(spec.get("deployments") or [])


def settings_in(prefect_yaml: Path) -> dict[str, Any]:
    """Each deployment's settings (its ``lightsheet:`` block, variables filled in), by name."""
    from flows.deployment import DeploymentSettings

    found = {}
    for dep in _deployments(prefect_yaml):
        block = {k: _fill(v) for k, v in (dep.get("lightsheet") or {}).items()}
        roots = block.get("data_roots") or []
        if isinstance(roots, str):
            roots = [r for r in roots.split(os.pathsep) if r]
        for root in roots:
            if not os.path.isabs(root):
                raise ValueError(
                    f"deployment {dep['name']!r}: data root {root!r} is not an absolute path"
                )
        found[dep["name"]] = DeploymentSettings(
            deployment=dep["name"],
            data_roots=tuple(os.path.normpath(r) for r in roots),
            cluster_address=block.get("cluster_address") or None,
            cluster_jobqueue=block.get("cluster_jobqueue") or None,
        )
    return found


def _fill(value: Any) -> Any:
    """``{{ $NAME }}`` replaced by the environment variable NAME (empty when unset)."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\{\{\s*\$(\w+)\s*\}\}", lambda m: os.environ.get(m.group(1), ""), value)


def strict_schema(schema: dict, settings: Any = None) -> dict:
    """The schema with unknown top-level parameters forbidden and the settings applied.

    ``settings`` (`flows.deployment.DeploymentSettings`): path parameters constrained to
    the data roots, the cluster's address and jobqueue to the deployment's own, and the
    settings stored under `flows.deployment.SETTINGS_KEY`.
    """
    from flows.deployment import SETTINGS_KEY

    out = copy.deepcopy(schema)
    out["additionalProperties"] = False
    if settings is None:
        return out
    pattern = roots_pattern(settings.data_roots)
    _constrain_paths(out, pattern)
    cluster = out.get("definitions", {}).get("ClusterConfig", {}).get("properties", {})
    for name, own in (
        ("address", settings.cluster_address),
        ("jobqueue", settings.cluster_jobqueue),
    ):
        if name in cluster:
            keep = {k: v for k, v in cluster[name].items() if k in ("title", "description")}
            cluster[name] = {
                **keep,
                "enum": [None] if own is None else [None, own],
                "default": None,
            }
    out[SETTINGS_KEY] = settings.to_schema()
    return out


def roots_pattern(roots: tuple[str, ...] | list[str]) -> str:
    """A regular expression for absolute paths beneath one of ``roots``, free of ``..``.

    Written for both Python's ``re`` (the server's check) and ECMAScript (the UI's form):
    only plain escapes and a negative lookahead. No roots: a pattern nothing matches.

    Examples
    --------
    >>> import re
    >>> rx = re.compile(roots_pattern(["/data/lab one"]))
    >>> [bool(rx.match(p)) for p in ("/data/lab one/x/*.tif", "/data/lab onex", "/etc",
    ...                              "/data/lab one/../etc", "/data/lab one")]
    [True, False, False, False, True]
    """
    if not roots:
        return "(?!)"
    alternatives = "|".join(_REGEX_SPECIAL.sub(r"\\\1", r.rstrip("/")) for r in roots)
    return f"^(?:{alternatives})(?:/(?!\\.\\.?(?:/|$))[^/]+)*/?$"


def _constrain_paths(node: Any, pattern: str) -> None:
    """Add ``pattern`` to every path-valued string property below ``node`` (in place)."""
    if isinstance(node, list):
        for item in node:
            _constrain_paths(item, pattern)
        return
    if not isinstance(node, dict):
        return
    for name, prop in (node.get("properties") or {}).items():
        if isinstance(prop, dict):
            for branch in [prop, *prop.get("anyOf", [])]:
                is_path = branch.get("format") == "path" or name in PATH_PARAMETERS
                if branch.get("type") == "string" and is_path:
                    branch["pattern"] = pattern
    for value in node.values():
        _constrain_paths(value, pattern)


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
    settings = settings_in(prefect_yaml)
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
                schema = strict_schema(dep.parameter_openapi_schema or {}, settings.get(name))
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
        print(  # noqa: T201
            f"{name}: unknown parameters, paths outside the data roots and other clusters "
            "are refused at run creation"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
