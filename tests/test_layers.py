"""The layers hold: import-linter's contracts in pyproject.toml, and every public module's API.

The contracts (`[tool.importlinter]`): cli → flows → tasks → applications (train, sweep,
watch, sample) → stages → helpers → foundations (regions/io/lineage → blocks → config →
errors), no Prefect in the library, and a sample generator that imports no stage.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """`lint-imports` on this checkout (not an installed copy): every contract kept."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the dev extra (import-linter)")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [str(exe), "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout, done.stdout


def _public_modules() -> list[Path]:
    out = []
    for package in ("lightsheet", "tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.startswith("_") and path.name != "__init__.py":
                continue  # private modules
            out.append(path)
    return out


def test_every_public_module_declares_its_api():
    """``__all__`` in every public module (an empty package ``__init__`` has nothing to list),
    naming only what the module defines or imports."""
    missing, unknown = [], []
    for path in _public_modules():
        tree = ast.parse(path.read_text())
        if not tree.body:
            continue
        names = set()
        listed = None
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                listed = ast.literal_eval(node.value)
        rel = path.relative_to(ROOT).as_posix()
        if listed is None:
            missing.append(rel)
        else:
            unknown += [f"{rel}: {n}" for n in listed if n not in names]
    assert not missing, f"no __all__ in {missing}"
    assert not unknown, f"__all__ names what the module lacks: {unknown}"


def test_every_direct_dependency_is_declared():
    """Each third-party module the code imports comes from a distribution pyproject.toml names
    (dependencies or an extra: cupy for gpu, dask-jobqueue for slurm)."""
    import ast
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    declared = {re.split(r"[\[<>=~!; ]", r, maxsplit=1)[0].lower() for r in requirements}
    declared = {d.replace("_", "-") for d in declared}
    ours = {"lightsheet", "tasks", "flows", "deployments"}
    imported: dict[str, str] = {}
    for package in sorted(ours):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ours:
                        imported.setdefault(top, path.relative_to(ROOT).as_posix())
    distributions = packages_distributions()
    undeclared = []
    for module, where in sorted(imported.items()):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        # a GPU extra that does not install here: its module is cupy/cupyx
        if module in ("cupy", "cupyx") and "cupy-cuda12x" in declared:
            continue
        if module == "dask_cuda" and "dask-cuda" in declared:
            continue
        if not dists & declared:
            undeclared.append(f"{module} ({where}; from {sorted(dists) or 'not installed'})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


#: Longest module (lines): dask-image's and scikit-image's run 200-600.
MAX_MODULE_LINES = 800
#: Longest flow module: flow bodies and wiring only.
MAX_FLOW_LINES = 170


def test_modules_stay_small():
    too_long = []
    for package in ("lightsheet", "tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            limit = MAX_FLOW_LINES if package == "flows" else MAX_MODULE_LINES
            lines = len(path.read_text().splitlines())
            if lines > limit:
                too_long.append(f"{rel}: {lines} lines (limit {limit})")
    assert not too_long, too_long
