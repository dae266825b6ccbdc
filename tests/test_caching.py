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


def test_lineage_names_everything(first_run):
    out, _, _ = first_run
    chain = lineage_chain(out / "density.csv")
    stages = {step["record"]["stage"] for step in chain}
    assert set(STAGES) <= stages
    records = {step["record"]["stage"]: step["record"] for step in chain}
    assert records["stitch"]["inputs"]["tiles"]["n_files"] == 16
    assert records["deconvolve"]["inputs"]["psf"]["path"].endswith("psf.tif")
    assert records["density"]["inputs"]["atlas"]["path"].endswith("atlas")
    assert records["featurize"]["inputs"]["model"]["fingerprint"]
    assert records["segment"]["params"]["method"] == "otsu"
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
    segment = config.segment.model_copy(update={"watershed": not config.segment.watershed})
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
