"""Runs that explain themselves: reuse, selective recompute, resume after kill -9, artifacts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightsheet.config import load_config
from lightsheet.lineage import lineage_chain, read_lineage

# every test here runs the pipeline flow under a temporary Prefect server
pytestmark = pytest.mark.slow

STAGES = ["stitch", "deconvolve", "featurize", "segment", "density"]


def run_flow(sample: Path, output: Path, **update):
    from flows.pipeline import pipeline

    return pipeline(sample_config(sample, output, **update))


def sample_config(sample: Path, output: Path, **update):
    config = load_config(sample / "config.yaml")
    return config.model_copy(update={"output": output, **update})


def reused(summary) -> dict[str, bool]:
    return {s["stage"]: s["reused"] for s in summary["stages"]}


def label_chunks(out: Path) -> dict[str, bytes]:
    s0 = out / "labels.ome.zarr" / "s0"
    return {str(p.relative_to(s0)): p.read_bytes() for p in sorted(s0.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tiny_sample, tmp_path_factory):
    """A private copy: these tests touch input files."""
    dst = tmp_path_factory.mktemp("caching") / "sample"
    shutil.copytree(tiny_sample, dst, ignore=shutil.ignore_patterns("output"))
    return dst


@pytest.fixture(scope="module")
def first_run(sample, prefect_harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "out"
    start = time.monotonic()
    summary = run_flow(sample, out)
    return out, summary, time.monotonic() - start


def test_first_run_computes_everything(first_run):
    _, summary, _ = first_run
    assert reused(summary) == dict.fromkeys(STAGES, False)


def test_rerun_reuses_every_stage(sample, first_run):
    from flows.pipeline import first_stale_stage

    out, _, first_seconds = first_run
    assert first_stale_stage(sample_config(sample, out)) is None, "no cluster is needed"
    before = {s: read_lineage(out / n) for s, n in [("d", "density.csv"), ("l", "labels.ome.zarr")]}
    start = time.monotonic()
    summary = run_flow(sample, out)
    assert reused(summary) == dict.fromkeys(STAGES, True)
    after = {s: read_lineage(out / n) for s, n in [("d", "density.csv"), ("l", "labels.ome.zarr")]}
    assert before == after, "reused outputs must not be rewritten"
    print(f"first run {first_seconds:.1f} s, re-run {time.monotonic() - start:.1f} s")


def test_lineage_names_everything(sample, first_run):
    out, _, _ = first_run
    chain = lineage_chain(out / "density.csv")
    stages = {step["record"]["stage"] for step in chain}
    assert set(STAGES) <= stages
    records = {step["record"]["stage"]: step["record"] for step in chain}
    assert records["stitch"]["inputs"]["tiles"]["n_files"] == 16
    assert records["deconvolve"]["inputs"]["psf"]["path"].endswith("psf.tif")
    assert records["density"]["inputs"]["atlas"]["path"].endswith("atlas")
    assert records["featurize"]["inputs"]["model"]["fingerprint"]
    assert records["segment"]["params"]["method"] == "local"
    # the defaults derived from the diameter are recorded as they ran (config.resolved)
    config = load_config(sample / "config.yaml")
    lo, hi = config.segment.volume_range_um3()
    assert config.segment.min_volume_um3 is None
    assert records["segment"]["params"]["min_volume_um3"] == pytest.approx(lo)
    assert records["segment"]["params"]["max_volume_um3"] == pytest.approx(hi)
    cli = subprocess.run(
        [sys.executable, "-m", "lightsheet.cli", "lineage", str(out / "density.csv")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for needle in (
        "raw TIFF tiles",
        "psf.tif",
        "atlas",
        "model checkpoint",
        "iterations=10",
        "nucleus_diameter_um",
    ):
        assert needle in cli, needle
    machine = subprocess.run(
        [sys.executable, "-m", "lightsheet.cli", "lineage", "--json", str(out / "labels.ome.zarr")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(machine)[0]["record"]["stage"] == "segment"


def test_segment_parameter_recomputes_segment_and_density_only(sample, first_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)  # keys hold fingerprints, not paths: copies are reused
    from flows.pipeline import first_stale_stage

    config = load_config(sample / "config.yaml")
    segment = config.segment.model_copy(
        update={"nucleus_diameter_um": config.segment.nucleus_diameter_um * 1.5}
    )
    assert first_stale_stage(sample_config(sample, out, segment=segment)) == "segment"
    summary = run_flow(sample, out, segment=segment)
    assert reused(summary) == {
        "stitch": True,
        "deconvolve": True,
        "featurize": True,
        "segment": False,
        "density": False,
    }


def test_changed_input_file_recomputes_everything(sample, prefect_harness, tmp_path):
    import tifffile

    sample = shutil.copytree(sample, tmp_path / "sample")  # this test edits a tile
    out = tmp_path / "out"
    run_flow(sample, out)
    # touched, same content: stitch re-reads the tiles, gets identical voxels (same
    # fingerprint), so everything downstream is still reused
    tile = sorted((sample / "tiles").glob("*.tif"))[0]
    st = tile.stat()
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert reused(run_flow(sample, out)) == {"stitch": False, **dict.fromkeys(STAGES[1:], True)}
    # new content: everything downstream of the tile is recomputed
    data = tifffile.imread(tile)
    data[data.shape[0] // 2] += 50
    tifffile.imwrite(tile, data)
    assert not any(reused(run_flow(sample, out)).values())


def test_artifacts_readable_through_api(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = [
            "stitch-output",
            "deconvolve-thumbnail",
            "segment-link",
            "density-top-regions",
            "run-summary",
        ]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
    assert {a.key for a in artifacts} >= set(keys)
    summary = next(a for a in artifacts if a.key == "run-summary")
    assert "density" in summary.data and "reused" in summary.data


@pytest.mark.slow
def test_resume_after_kill_during_deconvolution(sample, first_run, tmp_path):
    """kill -9 the flow process mid-deconvolution; the re-run equals an uninterrupted run."""
    reference, _, _ = first_run
    out = tmp_path / "out"
    config = load_config(sample / "config.yaml").model_copy(update={"output": out})
    config = config.model_dump(mode="json")  # absolute paths: the YAML moves
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # the subprocess uses its own temporary Prefect server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    cmd = [sys.executable, "-m", "lightsheet.cli", "run", str(config_path)]
    log = open(tmp_path / "killed-run.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob(".deconvolved.ome.zarr.partial-*")):
            if proc.poll() is not None:
                tail = (tmp_path / "killed-run.log").read_text()[-3000:]
                pytest.fail(f"the run ended before deconvolution started:\n{tail}")
            assert time.monotonic() < deadline, "deconvolution never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert (out / "raw.ome.zarr").is_dir()
    assert not (out / "deconvolved.ome.zarr").exists(), "a partial output looks complete"
    subprocess.run(cmd, env=env, check=True, timeout=600, capture_output=True)
    assert (out / "density.csv").read_bytes() == (reference / "density.csv").read_bytes()
    assert label_chunks(out) == label_chunks(reference)
    assert not list(out.glob(".*.partial-*")), "leftovers of the killed run are removed"
    stitch = read_lineage(out / "raw.ome.zarr")
    deconv = read_lineage(out / "deconvolved.ome.zarr")
    assert stitch["run"]["flow_run_id"] != deconv["run"]["flow_run_id"], "stitch was reused"


# --- damaged outputs, paths as users write them, one run at a time (issue 25) ------------


def test_lineage_lists_every_input_file(sample, first_run):
    out, _, _ = first_run
    record = read_lineage(out / "raw.ome.zarr")
    listed = record["input_files"]
    rows = json.loads(Path(listed["path"]).read_text())["files"]
    tiles = sorted(str(p) for p in (sample / "tiles").glob("*.tif"))
    assert listed["n_files"] == len(tiles) == 16
    assert [r["path"] for r in rows] == tiles
    for row in rows:
        st = os.stat(row["path"])
        assert (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        assert row["fingerprinted_by"] == "path, size and mtime"
    atlas = json.loads(Path(read_lineage(out / "density.csv")["input_files"]["path"]).read_text())
    assert {Path(r["path"]).name for r in atlas["files"]} >= {"annotation.tiff", "structures.json"}
    cli = subprocess.run(
        [sys.executable, "-m", "lightsheet.cli", "lineage", str(out / "raw.ome.zarr")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"input files: 16 listed in {listed['path']}" in cli


def run_logs(summary, needle: str, timeout: float = 60) -> str:
    """The Prefect logs of a run's stages (tasks run on Dask workers), once ``needle`` is in."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[summary["flow_run_name"]]))
        )
        while True:  # workers send their logs in batches
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
            text = "\n".join(log.message for log in logs)
            if needle in text or time.monotonic() > deadline:
                return text
            time.sleep(1)


def damaged_copy(first_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)  # keys hold fingerprints, not paths: copies are reused
    return out


def test_deleted_chunk_is_recomputed_and_the_result_equals(sample, first_run, tmp_path):
    out = damaged_copy(first_run, tmp_path)
    chunk = next(
        p
        for p in sorted((out / "deconvolved.ome.zarr" / "s0").rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.unlink()
    verify = subprocess.run(
        [sys.executable, "-m", "lightsheet.cli", "verify", str(out)], capture_output=True, text=True
    )
    assert verify.returncode == 1 and f"{chunk}: missing" in verify.stdout, verify.stdout
    summary = run_flow(sample, out)
    assert reused(summary) == {**dict.fromkeys(STAGES, True), "deconvolve": False}
    warning = f"deconvolve: output damaged, recomputing it: {chunk}: missing"
    assert warning in run_logs(summary, warning)
    assert (out / "density.csv").read_bytes() == (first_run[0] / "density.csv").read_bytes()
    assert label_chunks(out) == label_chunks(first_run[0])


def test_edited_table_is_recomputed_and_the_result_equals(sample, first_run, tmp_path):
    out = damaged_copy(first_run, tmp_path)
    table = out / "cells_segmented.csv"
    rows = table.read_text().splitlines()
    table.write_text("\n".join(rows[: len(rows) // 2]) + "\n")  # half the cells "lost"
    summary = run_flow(sample, out)
    assert not reused(summary)["segment"], "an edited table must not be reused"
    warning = f"segment: output damaged, recomputing it: {table}: content differs"
    assert warning in run_logs(summary, warning)
    assert table.read_bytes() == (first_run[0] / "cells_segmented.csv").read_bytes()
    assert (out / "density.csv").read_bytes() == (first_run[0] / "density.csv").read_bytes()
    record = read_lineage(out / "density.csv")
    assert record["inputs"]["cells"]["fingerprint"] == read_lineage(table)["output_fingerprint"]


@pytest.mark.slow
def test_paths_with_spaces_non_ascii_and_brackets(sample, first_run, tmp_path):
    """A sample in 'brain [1] ü/' (its config's relative paths) writing to 'out put ü [1]/'."""
    from lightsheet.config import load_config

    where = shutil.copytree(sample, tmp_path / "brain [1] ü", ignore=shutil.ignore_patterns("out*"))
    out = tmp_path / "out put ü [1]"
    config = load_config(where / "config.yaml").model_copy(update={"output": out})
    from flows.pipeline import pipeline

    summary = pipeline(config)
    assert not any(reused(summary).values())
    assert (out / "density.csv").read_bytes() == (first_run[0] / "density.csv").read_bytes()
    from prefect.client.orchestration import get_client

    from tasks._common import asset_key

    key = asset_key(out / "density.csv")
    assert "~20" in key and "ü" in key and "~5B1~5D" in key
    query = {"filter": {"resource": {"id": [key]}}, "limit": 5}
    events = []
    for _ in range(60):  # events reach the server asynchronously, after the flow returns
        with get_client(sync_client=True) as client:
            events = client.request("POST", "/events/filter", json=query).json()["events"]
        if events:
            break
        time.sleep(0.5)
    assert [e["resource"]["prefect.resource.id"] for e in events][:1] == [key]


def test_noop_rerun_starts_no_prefect(sample, first_run, tmp_path):
    """An unchanged `lightsheet run` only checks the outputs: no temporary server, no run."""
    import yaml

    out, _, _ = first_run
    config = load_config(sample / "config.yaml").model_copy(update={"output": out})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightsheet.cli",
            "run",
            str(path),
            "--summary-json",
            str(tmp_path / "s.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())  # rich wraps lines at the terminal's width
    assert "Up to date" in said and "no Prefect flow run was started" in said, said
    assert "temporary server" not in done.stderr, done.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["up_to_date"] and all(s["reused"] for s in summary["stages"])
    assert summary["n_cells"] == first_run[1]["n_cells"]


@pytest.mark.slow
def test_two_concurrent_runs_one_clear_refusal(sample, tmp_path):
    """Two `lightsheet run` on one output: the second exits 2 naming the first; the first ends."""
    import fcntl

    import yaml

    out = tmp_path / "out"
    config = load_config(sample / "config.yaml").model_copy(update={"output": out})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    cmd = [sys.executable, "-m", "lightsheet.cli", "run", str(path)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = out / ".lightsheet.lock"
    deadline = time.monotonic() + 300
    while True:  # until the first run holds the lock
        assert first.poll() is None and time.monotonic() < deadline, "the first run never locked"
        if lock.exists():
            with open(lock) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                except BlockingIOError:
                    break
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1.decode()[-3000:]
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("lightsheet run: error: output: ") and "is in use by" in last, last
    assert f"process {first.pid}" in last and "Traceback" not in second.stderr
    assert (out / "density.csv").is_file()
