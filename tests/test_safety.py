"""Never silently wrong, never harmful (issue 25), at the level of the library and the CLI.

One test (at least) per finding of the probe that these pieces fix; the end-to-end cases are
in tests/flows/: test_caching.py (damaged outputs, paths, concurrent runs), test_faults.py
(refusals at ingest), test_deployments.py (the API) and test_watch.py (resilient watching).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from lightsheet.errors import (
    ModelError,
    OutputDamagedError,
    OutputExistsError,
    OutputInUseError,
    PathNotAllowedError,
)
from lightsheet.io.atomic import claim_folder, output_lock, written_by_lightsheet
from lightsheet.io.omezarr import (
    check_image,
    read_image,
    stored_volume,
    verify_image,
    write_image,
)
from lightsheet.io.tables import read_table, write_table
from lightsheet.lineage import check_output, write_sidecar


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 3000, (1, 2, 20, 70, 45), dtype=np.uint16)
    path = tmp_path / "raw.ome.zarr"
    write_image(
        da.from_array(data, chunks=(1, 1, 10, 32, 32)),
        path,
        voxel_size_um=(2, 1, 1),
        lineage={"stage": "test"},
    )
    return path, data


def chunk_files(path: Path, level: str = "s0") -> list[Path]:
    return sorted(p for p in (path / level).rglob("*") if p.is_file() and p.name != "zarr.json")


# --- a stored image is complete, or reading it fails -------------------------------------


def test_missing_chunk_is_an_error_not_zeros(image):
    path, data = image
    assert check_image(path) == [] and verify_image(path) == []
    lost = next(p for p in chunk_files(path) if p.relative_to(path).parts[2:4] == ("0", "1"))
    lost.unlink()
    assert check_image(path) == [f"{lost}: missing (expected {_size(path, lost)} bytes)"]
    with pytest.raises(OutputDamagedError, match=f"{lost}: chunk file missing"):
        read_image(path)[0].compute()
    with pytest.raises(OutputDamagedError, match="chunk file missing"):
        stored_volume(path, 0, 1)[:, :, :]


def _size(path: Path, chunk: Path) -> int:
    manifest = json.loads((path / "lightsheet" / "zarr.json").read_text())["attributes"]
    return manifest["manifest"]["files"][chunk.relative_to(path).as_posix()]


def test_changed_chunk_found_by_verify(image):
    path, _ = image
    chunk = chunk_files(path)[0]
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF  # same size: only re-reading finds it
    chunk.write_bytes(bytes(raw))
    assert check_image(path) == []
    problems = verify_image(path)
    assert problems and str(path / "s0") in problems[0], problems
    assert check_output(path, deep=True) == problems


def test_image_without_manifest_is_not_trusted(image):
    import shutil

    path, _ = image
    shutil.rmtree(path / "lightsheet")
    assert "no readable manifest" in check_image(path)[0]


def test_table_hashed_from_the_bytes_used(tmp_path):
    import pandas as pd

    from lightsheet.lineage import file_content_fingerprint

    table = tmp_path / "cells.csv"
    write_table(pd.DataFrame({"label": [1, 2], "z_um": [1.0, 2.0]}), table)
    fp = file_content_fingerprint(table)
    write_sidecar(table, {"stage": "segment", "output_fingerprint": fp})
    assert check_output(table) == []
    assert len(read_table(table, fingerprint=fp)) == 2
    table.write_text("label,z_um\n1,1.0\n")
    assert "content differs from what stage 'segment' wrote" in check_output(table)[0]
    with pytest.raises(OutputDamagedError, match="content differs"):
        read_table(table, fingerprint=fp)


# --- output folders belong to lightsheet and to one run ----------------------------------


def test_files_lightsheet_did_not_write_are_never_replaced(image, tmp_path):
    path, data = image
    # a store holding a file of the user: replacing it would delete that file
    (path / "labels-curated.txt").write_text("my corrections")
    with pytest.raises(OutputExistsError, match="labels-curated.txt"):
        write_image(da.from_array(data), path, voxel_size_um=(2, 1, 1))
    assert (path / "labels-curated.txt").read_text() == "my corrections"
    # a table of the user where lightsheet would write one
    import pandas as pd

    theirs = tmp_path / "cells.csv"
    theirs.write_text("their own table\n")
    assert not written_by_lightsheet(theirs)
    with pytest.raises(OutputExistsError, match="not written by lightsheet"):
        write_table(pd.DataFrame({"a": [1]}), theirs)
    assert theirs.read_text() == "their own table\n"
    with pytest.raises(OutputExistsError, match="already holds cells.csv"):
        claim_folder(tmp_path, ["cells.csv", "density.csv"])
    # what lightsheet wrote it may replace
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "density.csv")
    write_table(pd.DataFrame({"a": [2]}), tmp_path / "density.csv")
    assert written_by_lightsheet(tmp_path / "density.csv")


def test_output_folder_that_is_a_link_to_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "out").symlink_to(tmp_path / "file")
    with pytest.raises(OutputExistsError, match="symbolic link to .*not a folder"):
        claim_folder(tmp_path / "out", [])
    (tmp_path / "folder").mkdir()
    (tmp_path / "out2").symlink_to(tmp_path / "folder")
    assert claim_folder(tmp_path / "out2", []) == tmp_path / "out2"  # a link to a folder is fine


def test_lock_refuses_a_second_process_naming_the_first(tmp_path):
    code = (
        "import sys, time; from lightsheet.io.atomic import output_lock\n"
        "with output_lock(sys.argv[1], {'flow_run_name': 'brave-otter'}):\n"
        "    print('locked', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError) as info:
            with output_lock(tmp_path):
                pass
        message = str(info.value)
        assert "in use by flow run brave-otter" in message and f"process {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path, {"flow_run_name": "next"}):  # freed when its holder died
        with output_lock(tmp_path):  # re-entrant in one process
            pass


# --- paths a run may touch -----------------------------------------------------------------


def test_data_roots_resolve_links_and_dotdot(tmp_path):
    from lightsheet.access import check_within_roots, literal_root

    root = tmp_path / "data"
    (root / "brain").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    check_within_roots({"output": root / "brain" / "out"}, [root])
    with pytest.raises(PathNotAllowedError, match="output: /etc is outside the data roots"):
        check_within_roots({"output": "/etc"}, [root])
    with pytest.raises(PathNotAllowedError, match="resolves to /etc/x"):
        check_within_roots({"psf": root / "escape" / "x"}, [root])
    with pytest.raises(PathNotAllowedError, match="resolves to"):
        check_within_roots({"atlas": f"{root}/brain/../../x"}, [root])
    with pytest.raises(PathNotAllowedError, match="none declared"):
        check_within_roots({"output": root}, [])
    assert literal_root("/d/brain[[]1] ü/tiles/*.tif") == Path("/d/brain[1] ü/tiles")


def test_cluster_address_and_jobqueue_only_the_deployments(tmp_path):
    from lightsheet.access import check_cluster
    from lightsheet.config import ClusterConfig

    asked = ClusterConfig(profile="address", address="tcp://203.0.113.9:8786")
    with pytest.raises(PathNotAllowedError, match="cluster.address: tcp://203.0.113.9:8786"):
        check_cluster(asked)
    with pytest.raises(PathNotAllowedError, match="set it to tcp://10.0.0.5:8786"):
        check_cluster(asked, address="tcp://10.0.0.5:8786")
    check_cluster(asked, address="tcp://203.0.113.9:8786")
    with pytest.raises(PathNotAllowedError, match="cluster.jobqueue"):
        check_cluster(ClusterConfig(profile="slurm", jobqueue=tmp_path / "mine.yaml"))
    check_cluster(ClusterConfig())


def test_schema_pattern_refuses_what_the_roots_do_not_allow():
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    from deployments.strict_parameters import strict_schema
    from flows.deployment import DeploymentSettings
    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    settings = DeploymentSettings("pipeline", ("/data/lab [1]",), "tcp://10.0.0.5:8786", None)
    strict = strict_schema(schema, settings)
    base = {
        "input": "/data/lab [1]/b/*.tif",
        "voxel_size_um": [2, 1, 1],
        "psf": "/data/lab [1]/psf.tif",
        "atlas": "/data/lab [1]/atlas",
        "output": "/data/lab [1]/out",
    }
    jsonschema.validate({"config": base}, strict)
    for change in (
        {"output": "/etc"},
        {"output": "/data/lab [1]/../etc"},
        {"input": "/data/lab 1/b/*.tif"},
        {"cluster": {"profile": "address", "address": "tcp://203.0.113.9:8786"}},
        {"cluster": {"profile": "slurm", "jobqueue": "/data/lab [1]/jq.yaml"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"config": {**base, **change}}, strict)
    ok = {"cluster": {"profile": "address", "address": "tcp://10.0.0.5:8786"}}
    jsonschema.validate({"config": {**base, **ok}}, strict)
    assert strict["x-lightsheet"]["data_roots"] == ["/data/lab [1]"]


def test_asset_keys_for_any_path():
    from prefect.assets import Asset

    from tasks._common import asset_key

    for path in ("/data/out put/raw.ome.zarr", "/d/Müller [1]/#5%/x.csv", "/d/" + "a b/" * 200):
        key = asset_key(path)
        Asset(key=key)  # Prefect's own validation
        assert key.startswith("file:///d") or key.startswith("file:///data")
    assert asset_key("/d/a b") != asset_key("/d/a~20b")  # the escape is itself escaped


# --- bounded model metadata ----------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [{"depth": 10**9}, {"width": 10**7}, {"depth": 12, "width": 512}])
def test_checkpoint_metadata_bounded_before_building(tmp_path, args):
    import torch
    from safetensors.torch import save_file

    from lightsheet.featurize import load_model

    path = tmp_path / "model.safetensors"
    meta = {"format": "lightsheet-unet/1", "model_args": json.dumps(args)}
    save_file({"w": torch.zeros(1)}, path, metadata=meta)
    with pytest.raises(ModelError, match=f"model: {path}: model_args"):
        load_model(path)


# --- one line, exit 2 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.joinpath("run.yaml").write_text("input: [\n"), "not valid YAML"),
        (lambda d: d.joinpath("run.yaml").mkdir(), "is a folder"),
        (
            lambda d: d.joinpath("run.yaml").write_text(
                "input: a\nvoxel_size_um: [1e300, 1, 1]\npsf: p\natlas: a\noutput: o\n"
            ),
            "invalid run config: voxel_size_um.0: Input should be less than or equal to 10000",
        ),
        (lambda d: None, "No such file or directory"),
    ],
)
def test_cli_expected_errors_are_one_line_exit_2(tmp_path, setup, message):
    setup(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run(
        [sys.executable, "-m", "lightsheet.cli", "run", str(tmp_path / "run.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightsheet run: error: "), done.stderr
    assert message in lines[0]


def test_verify_command_exit_status(image, tmp_path):
    path, _ = image
    verify = [sys.executable, "-m", "lightsheet.cli", "verify"]
    assert subprocess.run([*verify, str(path)], capture_output=True).returncode == 0
    chunk_files(path)[0].unlink()
    done = subprocess.run([*verify, "--quick", str(path)], capture_output=True, text=True)
    assert done.returncode == 1 and "DAMAGED" in done.stdout and "missing" in done.stdout
    assert subprocess.run([*verify, str(tmp_path / "nothing")], capture_output=True).returncode == 2
