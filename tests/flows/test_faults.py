"""Faults a run must survive, or report clearly without leaving anything that looks finished.

* A Dask worker process killed mid-stage: its nanny starts a new one, the scheduler
  recomputes what was lost, and the outputs equal an undisturbed run's byte for byte.
* The output disk filling up: an error naming the output and "no space left on device";
  no final store, no lineage record, at most a hidden ``.NAME.partial-*`` folder.
* An input tile rewritten after ingest checked it: the stitch stage's reads notice (size and
  modification time are re-checked around every read) and the run fails naming the file,
  never mixing old and new voxels into a ``raw.ome.zarr``.
* The flow process killed (``kill -9``) and re-run: covered by
  ``tests/flows/test_caching.py::test_resume_after_kill_during_deconvolution``.
* Bad input, swept in one parametrized test through the real pipeline flow: each case names
  the file or folder and says what was found and what was expected, and no input is modified.

Mounts (a tiny tmpfs for a full disk, a read-only one for an unwritable output) need root;
those cases skip with the reason when the mount cannot be made.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lightsheet.config import DEFAULT_PATTERN, ClusterConfig
from lightsheet.errors import (
    AtlasError,
    ConfigError,
    ImageError,
    InputFilesError,
    ModelError,
    OutputExistsError,
    OutputSpaceError,
    PathNotAllowedError,
    PSFError,
    TileGridError,
)
from lightsheet.ingest import discover
from lightsheet.io.atomic import atomic_path
from lightsheet.lineage import read_lineage
from lightsheet.stitch import stitch
from tests.flows.test_caching import label_chunks, run_flow
from tests.flows.test_pipeline import tree_checksums
from tests.ingest.test_ingest import name, write_grid

#: Longest wait for a stage to start, or for a killed worker to be replaced.
WAIT_S = 300


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (created) for the block; skips the test when impossible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    try:
        done = subprocess.run(mount, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs at {path}: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        # lazy: a worker process may still hold a file open there
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def copy_sample(sample: Path, dst: Path) -> Path:
    """A private copy of a sample acquisition (its config uses relative paths)."""
    return shutil.copytree(sample, dst, ignore=shutil.ignore_patterns("output"))


def tiles(sample: Path) -> list[Path]:
    return sorted((sample / "tiles").glob("*.tif"))


def assert_nothing_complete(out: Path, *names: str) -> None:
    """No final store or lineage record under ``out``; leftovers only as hidden partials."""
    for output in names:
        assert not (out / output).exists(), f"{output} looks complete after a failed write"
    assert not list(out.glob("*.lineage.json")), "a lineage record claims a finished table"
    ours = (".lightsheet-output.json", ".lightsheet.lock")  # the folder's marker and lock
    leftovers = [p.name for p in out.iterdir() if not p.name.startswith((".write-test-", *ours))]
    assert all(re.fullmatch(r"\..+\.partial-[0-9a-f]+", n) for n in leftovers), leftovers


# --- a worker killed mid-stage ---------------------------------------------------------


def worker_processes() -> set[int]:
    """pids of the Dask worker processes that nannies in this process spawned."""
    import psutil

    found = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(p.cmdline()):
                found.add(p.pid)
    return found


class WorkerKiller(threading.Thread):
    """Kills one worker process (SIGKILL) as soon as ``pattern`` appears in ``out``.

    Then records the worker processes that were not there before the kill and are alive
    when ``last`` (the run's last output) appears: the nanny's replacement, unless the
    cluster gave up on it.
    """

    def __init__(self, out: Path, pattern: str, last: str):
        super().__init__(daemon=True)
        self.out, self.pattern, self.last = out, pattern, last
        self.killed: int | None = None
        self.alive_at_end: set[int] = set()
        self.stop = threading.Event()
        self.error: str | None = None
        self.others = worker_processes()  # another cluster's, started before the run

    def wait_for(self, name: str) -> bool:
        deadline = time.monotonic() + WAIT_S
        while not list(self.out.glob(name)):
            if self.stop.is_set() or time.monotonic() > deadline:
                self.error = f"{name} never appeared in {self.out}"
                return False
            time.sleep(0.01)
        return True

    def run(self) -> None:
        if not self.wait_for(self.pattern):
            return
        before = worker_processes() - self.others
        if len(before) < 2:
            self.error = f"expected at least 2 worker processes, found {sorted(before)}"
            return
        self.killed = max(before)  # any one; the pid is only a stable choice
        os.kill(self.killed, signal.SIGKILL)
        if self.wait_for(self.last):
            self.alive_at_end = worker_processes() - before - self.others


@pytest.fixture(scope="module")
def clean_run(tiny_sample, prefect_harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-clean") / "out"
    run_flow(tiny_sample, out)
    return out


@pytest.mark.slow
def test_worker_killed_during_stage_is_replaced_and_work_recomputed(
    tiny_sample, clean_run, tmp_path
):
    out = tmp_path / "out"
    killer = WorkerKiller(out, ".deconvolved.ome.zarr.partial-*", last="density.csv")
    killer.start()
    try:
        summary = run_flow(
            tiny_sample, out, cluster=ClusterConfig(n_workers=2, threads_per_worker=1)
        )
    finally:
        killer.stop.set()
        killer.join(timeout=30)
    assert killer.error is None, killer.error
    assert killer.killed is not None, "no worker was killed"
    assert killer.alive_at_end, (
        f"worker process {killer.killed} was not replaced by one that stayed in the cluster"
    )
    # stitch may show as reused: its task's result lived on the killed worker, so Dask ran
    # the task again, which found raw.ome.zarr complete
    assert not any(s["reused"] for s in summary["stages"] if s["stage"] != "stitch")
    assert (out / "density.csv").read_bytes() == (clean_run / "density.csv").read_bytes()
    assert label_chunks(out) == label_chunks(clean_run)
    deconv = read_lineage(out / "deconvolved.ome.zarr")
    assert (
        deconv["output_fingerprint"]
        == read_lineage(clean_run / "deconvolved.ome.zarr")["output_fingerprint"]
    ), "the deconvolved voxels differ from an undisturbed run's"
    assert not list(out.glob(".*.partial-*")), "the interrupted write's leftovers are removed"


@pytest.fixture(scope="module")
def shared_cluster(prefect_harness):
    """One running cluster (profile ``address``) for the runs that fail: each run then
    connects to it instead of starting worker processes of its own (seconds, not a minute,
    on a loaded machine)."""
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    # the workers run the stage tasks: they report to this session's Prefect server
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        dashboard_address=None,
        env={"PREFECT_API_URL": PREFECT_API_URL.value()},
    ) as cluster:
        yield ClusterConfig(profile="address", address=cluster.scheduler_address)


# --- the output disk fills up ----------------------------------------------------------


@pytest.mark.slow  # runs the pipeline flow on a cluster of processes
def test_output_disk_full_fails_clearly_and_marks_nothing_complete(
    tiny_sample, shared_cluster, tmp_path
):
    out = tmp_path / "out"
    # the raw volume takes ~3.7 MB compressed: the stitch stage's write runs out of space
    with mounted_tmpfs(out, "size=2m"):
        raw = out / "raw.ome.zarr"
        with pytest.raises(OutputSpaceError) as info:
            run_flow(tiny_sample, out, cluster=shared_cluster)
        message = str(info.value)
        assert f"no space left on device while writing {raw}" in message
        assert "nothing was written" in message
        assert_nothing_complete(out, "raw.ome.zarr", "deconvolved.ome.zarr", "density.csv")


def test_out_of_space_in_a_write_names_the_output(tmp_path):
    """Any disk: what an ``ENOSPC`` inside an atomic write becomes, and what is left."""
    target = tmp_path / "raw.ome.zarr"
    with pytest.raises(OutputSpaceError, match=f"no space left on device while writing {target}"):
        with atomic_path(target) as tmp:
            (tmp / "s0").mkdir(parents=True)
            chunk = tmp / "s0" / "c" / "0"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(chunk))
    assert not list(tmp_path.iterdir()), "the partial write is removed"


# --- an input tile changes during the run ----------------------------------------------


def rewrite_when(out: Path, tile: Path) -> threading.Thread:
    """Rewrite ``tile`` (same shape and dtype, other voxels) once the stitch stage starts.

    The stitch stage's hidden partial ``raw.ome.zarr`` appears after ingest has checked every
    tile and just before the stage reads them, so the rewrite lands between the two.
    """

    def rewrite() -> None:
        deadline = time.monotonic() + WAIT_S
        while not list(out.glob(".raw.ome.zarr.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.002)
        data = tifffile.imread(tile)
        tifffile.imwrite(tile, data[::-1].copy())

    thread = threading.Thread(target=rewrite, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # runs the pipeline flow on a cluster of processes
def test_tile_rewritten_during_run_fails_naming_it(tiny_sample, shared_cluster, tmp_path):
    sample = copy_sample(tiny_sample, tmp_path / "sample")
    tile = tiles(sample)[-1]
    out = tmp_path / "out"
    before = tile.read_bytes()
    thread = rewrite_when(out, tile)
    with pytest.raises(InputFilesError, match=re.escape(f"{tile}: file changed while the run")):
        run_flow(sample, out, cluster=shared_cluster)
    thread.join(timeout=30)
    assert tile.read_bytes() != before, "the tile was not rewritten"
    assert_nothing_complete(out, "raw.ome.zarr")


# --- bad input, one case at a time ------------------------------------------------------


def truncated(sample: Path, out: Path) -> tuple[type, str]:
    tile = tiles(sample)[3]  # a copy interrupted half-way
    tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])
    return InputFilesError, rf"{re.escape(str(tile))}: truncated TIFF: .*expected a complete file"


def other_dtype(sample: Path, out: Path) -> tuple[type, str]:
    tile = tiles(sample)[5]
    tifffile.imwrite(tile, tifffile.imread(tile).astype(np.uint8))
    return TileGridError, rf"{re.escape(str(tile))}: .*dtype uint8; expected .*dtype uint16"


def not_a_tiff(sample: Path, out: Path) -> tuple[type, str]:
    tile = tiles(sample)[0]
    tile.write_text("exported by the acquisition software: see the log\n" * 50)
    return InputFilesError, rf"{re.escape(str(tile))}: not a readable TIFF .*expected a TIFF"


def nan_in_float_tiles(sample: Path, out: Path) -> tuple[type, str]:
    paths = tiles(sample)
    for path in paths:
        tifffile.imwrite(path, tifffile.imread(path).astype(np.float32))
    victim = paths[6]
    data = tifffile.imread(victim)
    data[5, 7, 9] = np.nan
    tifffile.imwrite(victim, data)
    return ImageError, (
        rf"{re.escape(str(victim))}: NaN intensity at voxel \(z, y, x\) = \(5, 7, 9\) of the "
        r"tile .*expected finite intensities"
    )


def empty_folder(sample: Path, out: Path) -> tuple[type, str]:
    for path in tiles(sample):
        path.unlink()
    folder = sample / "tiles"
    return InputFilesError, rf"no files match .*\(folder {re.escape(str(folder))} is empty\)"


def read_only_output(sample: Path, out: Path) -> tuple[type, str]:
    return PermissionError, (
        rf"output: cannot write to {re.escape(str(out))} \(Read-only file system\); "
        "expected a writable folder"
    )


def edit_config(sample: Path, **changes) -> None:
    """Change top-level keys (or, with a dict, keys of a section) of the sample's config."""
    import yaml

    config = yaml.safe_load((sample / "config.yaml").read_text())
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    (sample / "config.yaml").write_text(yaml.safe_dump(config))


def missing_hemispheres(sample: Path, out: Path) -> tuple[type, str]:
    (sample / "atlas" / "hemispheres.tiff").unlink()
    folder = re.escape(str(sample / "atlas"))
    return AtlasError, rf"atlas folder {folder}: no hemispheres.tiff, .*symmetric: False"


def unknown_atlas_id(sample: Path, out: Path) -> tuple[type, str]:
    path = sample / "atlas" / "annotation.tiff"
    annotation = tifffile.imread(path)
    annotation[0, 0, 0] = 987654
    tifffile.imwrite(path, annotation)
    return AtlasError, r"annotation ids not in structures.json: 987654"


def psf_larger_than_volume(sample: Path, out: Path) -> tuple[type, str]:
    from lightsheet.psf import gaussian_psf, write_psf

    write_psf(sample / "psf.tif", gaussian_psf((40.0, 4.0, 4.0), (2.0, 1.0, 1.0)), (2, 1, 1))
    path = re.escape(str(sample / "psf.tif"))
    return PSFError, rf"psf {path}: shape \(\d+, \d+, \d+\) is larger than the stitched volume"


def channel_out_of_range(sample: Path, out: Path) -> tuple[type, str]:
    edit_config(sample, segment={"channel": 7})
    return ConfigError, r"segment.channel: channel 7 does not exist; .* have 2 channel"


def model_metadata_out_of_bounds(sample: Path, out: Path) -> tuple[type, str]:
    import json

    import torch
    from safetensors.torch import save_file

    path = sample / "huge.safetensors"
    meta = {"format": "lightsheet-unet/1", "model_args": json.dumps({"depth": 10**9})}
    save_file({"w": torch.zeros(1)}, path, metadata=meta)
    edit_config(sample, featurize={"model": str(path)})
    return ModelError, rf"{re.escape(str(path))}: model_args depth=1000000000; expected an integer"


def output_inside_tiles(sample: Path, out: Path) -> tuple[type, str]:
    (sample / "tiles" / "results").mkdir()
    out.symlink_to(sample / "tiles" / "results")  # found only by resolving the link
    return PathNotAllowedError, rf"output: {re.escape(str(out))} is inside the tiles' folder"


def someone_elses_table(sample: Path, out: Path) -> tuple[type, str]:
    out.mkdir()
    (out / "cells.csv").write_text("my own hand counts\n")
    return OutputExistsError, rf"{re.escape(str(out))} already holds cells.csv, not written by"


BAD_INPUTS: dict[str, Callable[[Path, Path], tuple[type, str]]] = {
    "truncated": truncated,
    "other-dtype": other_dtype,
    "not-a-tiff": not_a_tiff,
    "nan-in-float32": nan_in_float_tiles,
    "empty-folder": empty_folder,
    "read-only-output": read_only_output,
    # refused before any compute, though only the data shows them wrong (issue 25)
    "missing-hemispheres": missing_hemispheres,
    "unknown-atlas-id": unknown_atlas_id,
    "psf-larger-than-volume": psf_larger_than_volume,
    "channel-out-of-range": channel_out_of_range,
    "model-metadata-out-of-bounds": model_metadata_out_of_bounds,
    "output-inside-tiles": output_inside_tiles,
    "someone-elses-table": someone_elses_table,
}


def test_nan_reported_at_its_voxel_in_any_chunk(tmp_path):
    """The voxel named is the tile's own index, also when a chunk starts inside the tile."""
    write_grid(tmp_path, grid=(1, 1, 1, 1, 2), dtype=np.float32)
    victim = tmp_path / name(x=1)
    data = tifffile.imread(victim)
    data[3, 4, 2] = np.inf
    tifffile.imwrite(victim, data)
    manifest = discover(str(tmp_path / "*.tif"), DEFAULT_PATTERN)
    volume = stitch(manifest, voxel_size_um=(2, 1, 1), chunks=(2, 3, 2))
    with pytest.raises(ImageError, match=rf"{victim.name}: infinite .* = \(3, 4, 2\) of the tile"):
        volume.compute(scheduler="sync")


@pytest.mark.slow  # runs the pipeline flow on a cluster of processes
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_and_left_untouched(case, tiny_sample, shared_cluster, tmp_path):
    sample = copy_sample(tiny_sample, tmp_path / "sample")
    out = tmp_path / "out"
    error, pattern = BAD_INPUTS[case](sample, out)
    before = tree_checksums(sample)
    mount = mounted_tmpfs(out, "ro,size=1m") if case == "read-only-output" else None
    mine = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    with mount or contextlib.nullcontext():
        with pytest.raises(error, match=pattern):
            run_flow(sample, out, cluster=shared_cluster)
        if out.exists():
            assert not list(out.glob("*.ome.zarr")), "no stage output on bad input"
            written = {p for p in out.glob("*.csv")} - set(mine)
            assert not written, "no table on bad input"
    assert tree_checksums(sample) == before, "an input file was modified"
    assert all(p.read_bytes() == data for p, data in mine.items()), "a file of the user changed"
