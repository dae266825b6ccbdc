"""The deployments against a real Prefect server with basic auth, a worker and a browser.

Starts the components the way a user does (infra/prefect/server.sh, deploy.sh, worker.sh),
triggers the pipeline over the REST API on the tiny sample, checks what the API refuses, and
opens the finished run in headless Chromium.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lightsheet.config import load_config
from tests.prefect_stack import TEST_OUTPUT, get_stack

pytestmark = pytest.mark.slow

#: Seconds the tiny pipeline may take through the worker on a slow 2-core CI machine.
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def stack(request):
    return get_stack(request.config)


@pytest.fixture(scope="module")
def tiny_params(tiny_sample, tmp_path_factory):
    config = load_config(tiny_sample / "config.yaml").model_dump(mode="json")
    config["output"] = str(tmp_path_factory.mktemp("deployed-run") / "out")
    config["cluster"] = {"n_workers": 1, "threads_per_worker": 2}
    return {"config": config}


def count_runs(stack, deployment_id):
    with stack.client() as c:
        r = c.post("/flow_runs/count", json={"deployments": {"id": {"any_": [deployment_id]}}})
        r.raise_for_status()
        return r.json()


def test_authentication_required(stack):
    with stack.client(auth=False) as c:
        assert c.get("/health").status_code == 200  # probes stay open
        assert c.post("/deployments/filter", json={}).status_code == 401
        assert c.get("/deployments/name/lightsheet-pipeline/pipeline").status_code == 401
        wrong = c.get("/admin/version", auth=("lightsheet", "wrong")).status_code
        assert wrong == 401
    with stack.client() as c:
        assert c.get("/admin/version").status_code == 200


def test_deployments_from_prefect_yaml(stack):
    pipeline = stack.deployment("lightsheet-pipeline/pipeline")
    watch = stack.deployment("lightsheet-watch-incoming/watch-incoming")
    sweep = stack.deployment("lightsheet-sweep/sweep")
    for dep in (pipeline, watch, sweep):
        assert dep["enforce_parameter_schema"] is True
        assert dep["parameter_openapi_schema"]["additionalProperties"] is False
        assert dep["work_pool_name"] == "lightsheet"
        assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    # the UI builds its form from this schema: the run config's models, constraints included
    definitions = pipeline["parameter_openapi_schema"]["definitions"]
    assert definitions["PipelineConfig"]["additionalProperties"] is False
    assert definitions["DeconvolveConfig"]["properties"]["iterations"]["minimum"] == 1
    assert pipeline["parameter_openapi_schema"]["required"] == ["config"]
    (schedule,) = watch["schedules"]
    assert schedule["schedule"]["cron"] == "*/5 * * * *" and schedule["active"]
    assert watch["parameters"]["landing"] == str(stack.landing)
    limit = watch["concurrency_limit"] or (watch.get("global_concurrency_limit") or {}).get("limit")
    assert limit == 1


BAD = {
    "wrong type": (lambda p: p["config"].update(voxel_size_um=[2.0, 1.0, "one"]), "voxel_size_um"),
    "out of range": (lambda p: p["config"].update(deconvolve={"iterations": 0}), "iterations"),
    "missing required": (lambda p: p["config"].pop("atlas"), "'atlas' is a required property"),
    "deconvolution without a psf": (
        lambda p: p["config"].pop("psf"),
        "'config'. Failure reason: 'psf' is a required property",
    ),
    "missing parameter": (lambda p: p.pop("config"), "'config' is a required property"),
    "unknown key": (lambda p: p.update(colour="red"), "'colour' was unexpected"),
    "unknown nested key": (
        lambda p: p["config"].update(segment={"thresold": 3}),
        "'thresold' was unexpected",
    ),
    # cross-field rules (issue 24): the config's model_validators, stated in the schema too
    "absolute without a threshold": (
        lambda p: p["config"].update(segment={"method": "absolute"}),
        "'config.segment'. Failure reason: 'threshold' is a required property",
    ),
    "a background channel with otsu": (
        lambda p: p["config"].update(segment={"method": "otsu", "background_channel": 1}),
        "'config.segment.background_channel'",
    ),
    "a B-spline penalty on several threads": (
        lambda p: p["config"].update(register={"bending_energy_weight": 0.5, "threads": 4}),
        "'config.register.threads'",
    ),
    # what API callers may not touch (issue 25): paths outside the data roots, another cluster
    "output outside the data roots": (
        lambda p: p["config"].update(output="/etc"),
        "'config.output'",
    ),
    "a .. escaping a data root": (
        lambda p: p["config"].update(output=p["config"]["output"] + "/../../../../etc"),
        "'config.output'",
    ),
    "psf outside the data roots": (
        lambda p: p["config"].update(psf="/etc/passwd"),
        "'config.psf'",
    ),
    "a scheduler of the caller's choosing": (
        lambda p: p["config"].update(
            cluster={"profile": "address", "address": "tcp://203.0.113.9:8786"}
        ),
        "'config.cluster.address'",
    ),
    "a jobqueue file of the caller's choosing": (
        lambda p: p["config"].update(cluster={"profile": "slurm", "jobqueue": "/tmp/mine.yaml"}),
        "'config.cluster.jobqueue'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parameters_refused_at_creation(stack, tiny_params, case):
    change, named = BAD[case]
    params = copy.deepcopy(tiny_params)
    change(params)
    dep = stack.deployment("lightsheet-pipeline/pipeline")
    before = count_runs(stack, dep["id"])
    with stack.client() as c:
        r = c.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params})
    assert 400 <= r.status_code < 500, r.text
    assert named in r.json()["detail"], r.text
    assert count_runs(stack, dep["id"]) == before, "a refused request must not create a run"


@pytest.fixture(scope="module")
def finished_run(stack, tiny_params):
    """The pipeline on the tiny sample, triggered over the REST API, run by the worker."""
    dep = stack.deployment("lightsheet-pipeline/pipeline")
    with stack.client() as c:
        r = c.post(
            f"/deployments/{dep['id']}/create_flow_run",
            json={"parameters": tiny_params, "name": "tiny-over-rest"},
        )
    assert r.status_code == 201, r.text
    run = stack.wait_final(r.json()["id"], RUN_TIMEOUT_S)
    return run


def run_artifacts(stack, run):
    """Artifacts of a run and of its subflow runs, as the API lists them."""
    with stack.client() as c:
        children = c.post(
            "/flow_runs/filter",
            json={"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}},
        ).json()
        ids = [run["id"]] + [child["id"] for child in children]
        r = c.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": ids}}})
        r.raise_for_status()
        return r.json()


def test_pipeline_run_completes_with_artifacts(stack, finished_run, tiny_params):
    assert finished_run["state_type"] == "COMPLETED", finished_run["state"]
    assert finished_run["parameters"]["config"]["output"] == tiny_params["config"]["output"]
    keys = {a["key"] for a in run_artifacts(stack, finished_run) if a["key"]}
    assert {"run-summary", "density-top-regions", "segment-cells"} <= keys, keys
    output = tiny_params["config"]["output"]

    assert (Path(output) / "density.csv").is_file() and (Path(output) / "cells.csv").is_file()


def test_ui_shows_run_and_artifact_table(stack, finished_run):
    from infra.prefect import browser

    artifacts = {a["key"]: a for a in run_artifacts(stack, finished_run) if a["key"]}
    table = artifacts["density-top-regions"]
    stages_run = table["flow_run_id"]  # the stages subflow posts the artifacts
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    acronyms = [str(r["acronym"]) for r in rows][:5]
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    with browser.browser() as page:
        browser.sign_in(page, stack.auth)
        browser.snapshot(
            page,
            f"{stack.ui}/runs/flow-run/{finished_run['id']}",
            TEST_OUTPUT / "flow-run.png",
            texts=[finished_run["name"], "Completed"],
        )
        browser.snapshot(
            page,
            f"{stack.ui}/runs/flow-run/{stages_run}",
            TEST_OUTPUT / "stages-run.png",
            texts=["Artifacts"],
        )
        page.click_text("Artifacts")
        listed = browser.snapshot(
            page,
            None,
            TEST_OUTPUT / "flow-run-artifacts.png",
            texts=["run-summary", "Task runs"],
        )
        assert "MARKDOWN" in listed.upper()
        page_text = browser.snapshot(
            page,
            f"{stack.ui}/artifacts/artifact/{table['id']}",
            TEST_OUTPUT / "artifact-density-top-regions.png",
            texts=["density-top-regions", *acronyms],
        )
    for name in ("acronym", "total_cells_per_mm3", *acronyms):
        assert name in page_text
    assert (TEST_OUTPUT / "artifact-density-top-regions.png").stat().st_size > 10_000


# --- what API callers may not do (issue 25) ------------------------------------------------


def test_job_variables_cannot_choose_the_command(stack, tiny_params):
    dep = stack.deployment("lightsheet-pipeline/pipeline")
    before = count_runs(stack, dep["id"])
    for variables in ({"command": "touch /tmp/owned"}, {"env": {"PYTHONPATH": "/tmp"}}):
        with stack.client() as c:
            r = c.post(
                f"/deployments/{dep['id']}/create_flow_run",
                json={"parameters": tiny_params, "job_variables": variables},
            )
        assert r.status_code == 422, r.text
        assert next(iter(variables)) in r.json()["detail"], r.text
    assert count_runs(stack, dep["id"]) == before


def test_deployment_settings_stored_with_the_deployment(stack):
    from flows.deployment import DeploymentSettings

    for name in ("lightsheet-pipeline/pipeline", "lightsheet-watch-incoming/watch-incoming"):
        dep = stack.deployment(name)
        settings = DeploymentSettings.from_schema(dep["name"], dep["parameter_openapi_schema"])
        assert list(settings.data_roots) == stack.data_roots
        assert settings.cluster_address is None and settings.cluster_jobqueue is None


def refused_when_started(stack, deployment: str, params: dict) -> str:
    """Create a run the server accepts (201), wait for it; it fails: its state message."""
    dep = stack.deployment(deployment)
    with stack.client() as c:
        r = c.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params})
    assert r.status_code == 201, r.text
    run = stack.wait_final(r.json()["id"], RUN_TIMEOUT_S)
    assert run["state_type"] == "FAILED", run["state"]
    return run["state"]["message"]


def test_symlink_out_of_the_roots_refused_when_the_run_starts(stack, tiny_params, tmp_path):
    """A path the server's pattern accepts, but that leads outside the roots by a link."""
    link = tmp_path / "psf.tif"
    link.symlink_to("/etc/hostname")
    params = copy.deepcopy(tiny_params)
    params["config"]["psf"] = str(link)
    params["config"]["output"] = str(tmp_path / "out")
    message = refused_when_started(stack, "lightsheet-pipeline/pipeline", params)
    assert "psf" in message and "resolves to /etc/hostname" in message, message
    assert not (tmp_path / "out").exists(), "nothing is written for a refused run"


def test_run_form_renders_with_the_rules(stack):
    """The UI builds its form from the schema, whose models carry if/then rules (allOf): every
    section still renders, the fields the rules name included."""
    from infra.prefect import browser

    dep = stack.deployment("lightsheet-pipeline/pipeline")
    fields = ["Segment (Optional)", "Threshold (Optional)", "Background Channel (Optional)"]
    fields += ["Overlap (Optional)", "Threads (Optional)", "Address (Optional)"]
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    with browser.browser() as page:
        browser.sign_in(page, stack.auth)
        text = browser.snapshot(
            page,
            f"{stack.ui}/deployments/deployment/{dep['id']}/run",
            TEST_OUTPUT / "pipeline-run-form.png",
            texts=fields,
        )
    assert all(f in text for f in fields), text[:2000]


def test_rule_the_schema_cannot_state_refused_when_the_run_starts(stack, tiny_params, tmp_path):
    """min <= max volume compares two values, which JSON Schema cannot: the server creates the
    run, and it fails at parameter validation, before any stage, naming the fields."""
    params = copy.deepcopy(tiny_params)
    params["config"]["segment"] = {"min_volume_um3": 500.0, "max_volume_um3": 100.0}
    params["config"]["output"] = str(tmp_path / "out")
    message = refused_when_started(stack, "lightsheet-pipeline/pipeline", params)
    assert "min_volume_um3" in message and "max_volume_um3" in message, message
    assert not (tmp_path / "out").exists(), "nothing is written for a refused run"


def test_state_is_private_and_no_secret_in_arguments(stack):
    import os
    import stat

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.lstat().st_mode)

    # flow runs' own files (results) and the tests' landing folder sit in private folders
    inner = [stack.landing, stack.home / "storage", stack.home / "client-home"]
    assert mode(stack.home) == 0o700, oct(mode(stack.home))
    loose = [
        f"{p} {oct(mode(p))}"
        for p in stack.home.rglob("*")
        if not p.is_symlink() and not any(d in (p, *p.parents) for d in inner) and mode(p) & 0o077
    ]
    assert not loose, f"state readable by others: {loose}"
    assert all(mode(d) == 0o700 for d in inner[1:] if d.exists())
    password = stack.auth.split(":", 1)[1]
    seen = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if password.encode() in argv:
                seen.append(argv.replace(b"\0", b" ").decode(errors="replace")[:200])
    assert not seen, f"the password is in a process's arguments: {seen}"
    assert os.access(stack.home / "env", os.R_OK)  # still readable by its owner


def test_sweep_outside_the_roots_refused(stack, tmp_path):
    """The sweep deployment writes only inside the data roots, like the pipeline's: a path
    outside is refused at creation, one that leads outside by a link when the run starts."""
    dep = stack.deployment("lightsheet-sweep/sweep")
    params = {"source": str(tmp_path / "x.ome.zarr"), "settings": [{}], "output": "/etc/sweeps"}
    with stack.client() as c:
        r = c.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": params})
        assert 400 <= r.status_code < 500, r.text
    link = tmp_path / "elsewhere"
    link.symlink_to("/etc")
    params["output"] = str(link / "sweeps")
    message = refused_when_started(stack, "lightsheet-sweep/sweep", params)
    assert "sweep output" in message and "resolves to /etc/sweeps" in message, message
    assert not Path("/etc/sweeps").exists()
