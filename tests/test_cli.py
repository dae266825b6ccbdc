"""The ``lightsheet`` command's documented bad-input cases: exit 2, one line naming the culprit.

Each case is a mistake a user makes (README, "Errors"): a config that is missing, not YAML,
with a wrong or unknown field or a bad combination; tiles that are not there or not named as
the pattern says; a missing PSF; a channel the tiles lack; bad optics; a missing output.
All are refused before any compute (and before Prefect starts), with one line on stderr
that names the file or the parameter, and exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: This checkout first, whatever copy of lightsheet is installed.
PYTHONPATH = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The tiny sample (tiles, PSF, atlas, config) in a folder the cases may copy from."""
    from lightsheet.sample import generate

    path = tmp_path_factory.mktemp("cli-sample")
    generate(path, size="tiny", seed=0)
    return path


def config_with(sample: Path, folder: Path, **changes) -> Path:
    """The sample's run config with ``changes`` (None removes a key), written to ``folder``."""
    raw = yaml.safe_load((sample / "config.yaml").read_text())
    raw |= {
        "input": str(sample / "tiles" / "*.tif"),
        "psf": str(sample / "psf.tif"),
        "atlas": str(sample / "atlas"),
        "output": str(folder / "output"),
    }
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cases(sample: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case name → (arguments, a text the one line must contain)."""
    not_yaml = tmp / "list.yaml"
    not_yaml.write_text("- just\n- a list\n")
    broken = tmp / "broken.yaml"
    broken.write_text("input: [unclosed\n")
    bad = {}
    for name, changes in {
        "bad field": {"deconvolve": {"iterations": 0}},
        "unknown field": {"segmnt": {"channel": 0}},
        "bad combination": {"segment": {"method": "absolute"}},
        "missing input folder": {"input": str(tmp / "nowhere" / "*.tif")},
        "wrong pattern": {"pattern": r"_tile(?P<x>\d+)\.tif$"},
        "missing psf": {"psf": str(tmp / "no-psf.tif")},
        "deconvolution without a psf": {"psf": None},
        "missing channel": {"segment": {"channel": 5, "nucleus_diameter_um": 9.3}},
    }.items():
        folder = tmp / name.replace(" ", "-")
        folder.mkdir()
        bad[name] = config_with(sample, folder, **changes)
    psf = ["psf", str(tmp / "psf.tif"), "--na", "0.5", "--wavelength-nm", "500"]
    psf += ["--refractive-index", "1.33"]
    return {
        "missing config": (["run", str(tmp / "missing.yaml")], "missing.yaml"),
        "config not a mapping": (["run", str(not_yaml)], "list.yaml"),
        "config not YAML": (["run", str(broken)], "broken.yaml"),
        "bad field": (["run", str(bad["bad field"])], "deconvolve.iterations"),
        "unknown field": (["run", str(bad["unknown field"])], "segmnt"),
        "bad combination": (["run", str(bad["bad combination"])], "threshold"),
        "missing input folder": (["run", str(bad["missing input folder"])], "nowhere"),
        "wrong pattern": (["run", str(bad["wrong pattern"])], "pattern"),
        "missing psf": (["run", str(bad["missing psf"])], "no-psf.tif"),
        "deconvolution without a psf": (
            ["run", str(bad["deconvolution without a psf"])],
            "deconvolve.enabled: false",
        ),
        "missing channel": (["run", str(bad["missing channel"])], "segment.channel"),
        "bad optics": ([*psf, "--voxel-size-um", "0", "1", "1"], "voxel_size_um"),
        "missing output (lineage)": (["lineage", str(tmp / "no-output")], "no-output"),
        "missing output (verify)": (["verify", str(tmp / "no-output")], "no-output"),
        "sample options that conflict": (
            ["sample", str(tmp / "s"), "--misaligned", "--overlap", "0.1"],
            "--misaligned",
        ),
        "missing train config": (
            ["train", str(tmp / "train.yaml"), "--out", str(tmp / "m.safetensors")],
            "train.yaml",
        ),
    }


#: Runs ``lightsheet.cli.main`` on each argv (JSON on stdin) in a child process, so the
#: command's Prefect settings and logging never leak into the test session.
RUN_CASES = """
import contextlib, io, json, sys
from lightsheet.cli import main
out = []
for argv in json.load(sys.stdin):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_every_documented_bad_input_exits_2_with_one_line(sample, tmp_path):
    cases = _cases(sample, tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", RUN_CASES],
        input=json.dumps([argv for argv, _ in cases.values()]),
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failures = []
    for (name, (argv, names)), (code, err) in zip(cases.items(), results, strict=True):
        lines = err.strip().splitlines()
        ok = code == 2 and len(lines) == 1 and names in lines[0] and "Traceback" not in err
        ok = ok and lines[0].startswith(f"lightsheet {argv[0]}: error: ")
        if not ok:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    # nothing was written for the refused runs: no output folder looks like a result
    assert not any(tmp_path.glob("*/output/*.ome.zarr"))


def test_the_console_script_says_it_in_one_line(tmp_path):
    """Through the installed entry point, as a user types it: no traceback, exit 2."""
    exe = shutil.which("lightsheet", path=str(Path(sys.executable).parent))
    argv = [exe] if exe else [sys.executable, "-m", "lightsheet.cli"]
    done = subprocess.run(
        [*argv, "run", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "missing.yaml" in done.stderr, done.stderr
