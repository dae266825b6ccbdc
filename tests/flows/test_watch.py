"""watch-incoming: which acquisitions are complete, and one run each against a real server."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import yaml

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.watch import AcquisitionError, acquisition_config, fingerprint, scan

MARKER = "acquisition.done"


def make_acquisition(landing, name, *, n_tiles=2, marker=True, config=True):
    folder = landing / name
    (folder / "tiles").mkdir(parents=True)
    for i in range(n_tiles):
        tile = folder / "tiles" / f"img_ch0_x_{i:03d}x_000y_000z_0000t.tif"
        tile.write_bytes(b"\0" * (100 + i))
    (folder / "psf.tif").write_bytes(b"\0" * 10)
    if config:
        (folder / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "input": "tiles/*.tif",
                    "voxel_size_um": [2.0, 1.0, 1.0],
                    "psf": "psf.tif",
                    "atlas": "/atlases/example",
                    "output": "output",
                }
            )
        )
    if marker:
        (folder / MARKER).touch()
    return folder


def by_name(records):
    return {r["name"]: r for r in records}


def test_marker_decides_and_half_copied_waits(tmp_path):
    make_acquisition(tmp_path, "brain1")
    make_acquisition(tmp_path, "brain2", marker=False)
    (tmp_path / ".rsync-tmp").mkdir()  # copy tools' hidden folders are not acquisitions
    found = by_name(scan(tmp_path, marker=MARKER, settle_seconds=0))
    assert set(found) == {"brain1", "brain2"}
    assert found["brain1"]["status"] == "complete"
    assert found["brain2"]["status"] == "waiting" and MARKER in found["brain2"]["reason"]
    config = found["brain1"]["config"]
    assert config["input"] == str(tmp_path / "brain1" / "tiles" / "*.tif")


def test_settle_time_uses_change_times(tmp_path):
    folder = make_acquisition(tmp_path, "brain1")
    # a copy that keeps old modification times (rsync -a) still looks fresh
    old = time.time() - 3600
    for p in folder.rglob("*"):
        os.utime(p, (old, old))
    found = by_name(scan(tmp_path, marker=MARKER, settle_seconds=600))
    assert found["brain1"]["status"] == "waiting"
    assert by_name(scan(tmp_path, marker=MARKER, settle_seconds=600, now=time.time() + 601))[
        "brain1"
    ]["status"] == ("complete")
    # without a marker, the settle time alone decides
    assert by_name(scan(tmp_path, marker=None, settle_seconds=0))["brain1"]["status"] == "complete"


def test_idempotency_key_follows_the_inputs_not_the_outputs(tmp_path):
    folder = make_acquisition(tmp_path, "brain1")
    config = acquisition_config(folder)
    key = fingerprint(folder, config)
    (folder / "output").mkdir()
    (folder / "output" / "density.csv").write_text("written by the run")
    assert fingerprint(folder, config) == key
    found = by_name(scan(tmp_path, marker=MARKER, settle_seconds=5, now=time.time() + 6))
    assert found["brain1"]["status"] == "complete", "the run's outputs do not reset the settle"
    (folder / "tiles" / "img_ch0_x_005x_000y_000z_0000t.tif").write_bytes(b"\0")
    assert fingerprint(folder, config) != key
    other = make_acquisition(tmp_path, "brain2")
    assert fingerprint(other, acquisition_config(other)) != key


def test_template_and_output_root(tmp_path):
    landing = tmp_path / "landing"
    folder = make_acquisition(landing, "brain1", config=False)
    template = tmp_path / "template.yaml"
    template.write_text(
        yaml.safe_dump(
            {
                "input": "tiles/*.tif",
                "pattern": DEFAULT_PATTERN,
                "voxel_size_um": [2.0, 1.0, 1.0],
                "psf": "psf.tif",
                "atlas": "/atlases/example",
                "output": "ignored",
                "segment": {"nucleus_diameter_um": 8.0},
            }
        )
    )
    config = acquisition_config(folder, template=template, output_root=tmp_path / "results")
    assert config.input == str(folder / "tiles" / "*.tif")
    assert config.psf == folder / "psf.tif"
    assert config.output == tmp_path / "results" / "brain1"
    assert config.segment.nucleus_diameter_um == 8.0
    # a BrainGlobe atlas name in a template stays a name, as in a run config
    raw = yaml.safe_load(template.read_text())
    template.write_text(yaml.safe_dump({**raw, "atlas": "allen_mouse_25um"}))
    config = acquisition_config(folder, template=template, output_root=tmp_path / "results")
    assert str(config.atlas) == "allen_mouse_25um"


def test_bad_acquisitions_are_reported(tmp_path):
    make_acquisition(tmp_path, "no-config", config=False)
    bad = make_acquisition(tmp_path, "bad-config")
    (bad / "config.yaml").write_text("input: tiles/*.tif\nvoxel_size_um: [2, 1]\n")
    empty = make_acquisition(tmp_path, "no-tiles")
    shutil.rmtree(empty / "tiles")
    found = by_name(scan(tmp_path, marker=MARKER, settle_seconds=0))
    assert found["no-config"]["status"] == "invalid"
    assert "no config.yaml" in found["no-config"]["reason"]
    assert found["bad-config"]["status"] == "invalid"
    assert "voxel_size_um" in found["bad-config"]["reason"]
    assert "no file matches" in found["no-tiles"]["reason"]
    with pytest.raises(AcquisitionError, match="no config.yaml"):
        acquisition_config(tmp_path / "no-config")
    with pytest.raises(FileNotFoundError, match="landing folder"):
        scan(tmp_path / "missing")


def test_one_bad_acquisition_never_stops_the_scan(tmp_path):
    """Whatever is wrong with one folder makes it invalid; the others are still classified."""
    from tests.test_config import ALIAS_BOMB

    make_acquisition(tmp_path, "a-good")
    make_acquisition(tmp_path, "b-bomb").joinpath("config.yaml").write_text(ALIAS_BOMB)
    make_acquisition(tmp_path, "c-not-yaml").joinpath("config.yaml").write_text("input: [\n")
    make_acquisition(tmp_path, "d-folder-config").joinpath("config.yaml").unlink()
    (tmp_path / "d-folder-config" / "config.yaml").mkdir()
    escaping = make_acquisition(tmp_path, "e-outside-roots")
    config = yaml.safe_load((escaping / "config.yaml").read_text())
    (escaping / "config.yaml").write_text(yaml.safe_dump({**config, "output": "/etc/out"}))
    found = by_name(
        scan(tmp_path, marker=MARKER, settle_seconds=0, data_roots=[str(tmp_path), "/atlases"])
    )
    assert found["a-good"]["status"] == "complete"
    reasons = {n: r["reason"] for n, r in found.items() if r["status"] == "invalid"}
    assert set(reasons) == {"b-bomb", "c-not-yaml", "d-folder-config", "e-outside-roots"}
    assert "aliases expand" in reasons["b-bomb"]
    assert "not valid YAML" in reasons["c-not-yaml"]
    assert "is a folder" in reasons["d-folder-config"]
    assert "output: /etc/out is outside the data roots" in reasons["e-outside-roots"]


def test_template_in_a_folder_with_glob_characters(tmp_path):
    landing = tmp_path / "landing"
    folder = make_acquisition(landing, "brain[1]", config=False)
    template = tmp_path / "template.yaml"
    template.write_text(
        yaml.safe_dump(
            {
                "input": "tiles/*.tif",
                "voxel_size_um": [2.0, 1.0, 1.0],
                "psf": "psf.tif",
                "atlas": "/atlases/example",
                "output": "out",
            }
        )
    )
    config = acquisition_config(folder, template=template)
    import glob

    assert sorted(glob.glob(config.input)) == sorted(map(str, (folder / "tiles").glob("*.tif")))


# --------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def held_pipeline(request):
    """A copy of the pipeline deployment in a pool without a worker: its runs wait."""
    from tests.prefect_stack import get_stack

    stack = get_stack(request.config)
    real = stack.deployment("lightsheet-pipeline/pipeline")
    with stack.client() as c:
        r = c.post("/work_pools/", json={"name": "lightsheet-held", "type": "process"})
        assert r.status_code in (201, 409), r.text
        r = c.post(
            "/deployments/",
            json={
                "name": "pipeline-held",
                "flow_id": real["flow_id"],
                "entrypoint": real["entrypoint"],
                "work_pool_name": "lightsheet-held",
                "enforce_parameter_schema": True,
                "parameter_openapi_schema": real["parameter_openapi_schema"],
            },
        )
        assert r.status_code in (200, 201), r.text
    return stack, r.json()


def held_runs(stack, deployment_id):
    with stack.client() as c:
        r = c.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}})
        r.raise_for_status()
        return r.json()


@pytest.mark.slow
def test_one_run_per_complete_acquisition(held_pipeline, tiny_sample, tmp_path):
    from flows.watch import watch_incoming

    stack, held = held_pipeline
    landing = tmp_path / "landing"
    landing.mkdir()
    for name in ("brain-a", "brain-b", "brain-c", "brain-d"):
        shutil.copytree(tiny_sample, landing / name, ignore=shutil.ignore_patterns("output"))
    (landing / "brain-a" / MARKER).touch()
    (landing / "brain-b" / MARKER).touch()
    # brain-d asks for an output outside the data roots: the server refuses its run (409),
    # the tick reports and skips it, the others start
    bad = landing / "brain-d" / "config.yaml"
    bad.write_text(bad.read_text().replace("output: output", "output: /etc/lightsheet"))
    (landing / "brain-d" / MARKER).touch()
    params = {
        "landing": str(landing),
        "deployment": "lightsheet-pipeline/pipeline-held",
        "settle_seconds": 0,
    }
    # tick 1: the deployed watch-incoming flow, run by the worker
    watch = stack.deployment("lightsheet-watch-incoming/watch-incoming")
    with stack.client() as c:
        r = c.post(f"/deployments/{watch['id']}/create_flow_run", json={"parameters": params})
    assert r.status_code == 201, r.text
    tick = stack.wait_final(r.json()["id"], 300)
    assert tick["state_type"] == "COMPLETED", tick["state"]
    runs = held_runs(stack, held["id"])
    assert sorted(r["name"] for r in runs) == ["brain-a", "brain-b"]
    with stack.client() as c:
        artifacts = c.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [tick["id"]]}}}
        ).json()
    (report,) = [a for a in artifacts if a["key"] == "watch-incoming"]
    # deployed, the tick's own data roots catch it before the server would
    assert "| brain-d | invalid |" in report["data"] and "/etc/lightsheet" in report["data"]
    assert len({r["idempotency_key"] for r in runs}) == 2
    inputs = {r["name"]: r["parameters"]["config"]["input"] for r in runs}
    assert inputs["brain-a"] == str(landing / "brain-a" / "tiles" / "*.tif")

    # tick 2 (in this process, same server, no deployment settings): nothing new; the
    # server itself refuses brain-d's run (409 naming the field), reported and skipped
    with stack.prefect_settings():
        rows = watch_incoming(**params)
    assert not any(r.get("started") for r in rows)
    refused = {r["name"]: r for r in rows}["brain-d"]
    assert refused["status"] == "invalid" and "(409)" in refused["reason"], refused
    assert "config.output" in refused["reason"]
    assert len(held_runs(stack, held["id"])) == 2

    # the third acquisition finishes copying: tick 3 starts exactly it
    (landing / "brain-c" / MARKER).touch()
    with stack.prefect_settings():
        rows = watch_incoming(**params)
    assert [r["name"] for r in rows if r.get("started")] == ["brain-c"]
    assert sorted(r["name"] for r in held_runs(stack, held["id"])) == [
        "brain-a",
        "brain-b",
        "brain-c",
    ]
