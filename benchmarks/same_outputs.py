"""Outputs byte for byte: the pipeline run by two source trees on one sample acquisition.

    git archive REV | tar -x -C /tmp/before
    python -m benchmarks.same_outputs --before /tmp/before [--after .] [--size small] [--seed 0]

For a change that must not move any result (issue 24's refactors): generates a sample
acquisition (`lightsheet.sample.generate`, by the ``--after`` tree), copies it once per tree,
and runs ``lightsheet run`` on each copy in its own process with that tree first on
``PYTHONPATH`` (Prefect's temporary server per run). Then every stage output is compared:
each data file (the zarr chunks of every pyramid level, the CSV tables) byte for byte, and
the output fingerprint each image records in its lineage. Metadata (``zarr.json``, lineage
sidecars: times, hosts and code versions differ) and plots are not compared. Exit status 1
when anything differs. Results: ``benchmarks/results/same_outputs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lightsheet.sample import SIZES, generate

SKIPPED = (".json", ".lock", ".png")


def run_tree(tree: Path, sample: Path, log: Path) -> None:
    """``lightsheet run`` of ``sample``'s config with the code of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env["PREFECT_HOME"] = str(log.with_suffix(".prefect"))  # its own temporary server's database
    cmd = [sys.executable, "-m", "lightsheet.cli", "run", str(sample / "config.yaml")]
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        sys.exit(f"{tree}: {' '.join(cmd)} failed (exit {rc}):\n{log.read_text()[-4000:]}")


def compare(before: Path, after: Path) -> tuple[int, list[str], list[str]]:
    """Data files alike, the paths that differ, and each image's fingerprints."""
    files = {
        p.relative_to(root).as_posix()
        for root in (before, after)
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(SKIPPED)
    }
    same, differ = 0, []
    for rel in sorted(files):
        a, b = before / rel, after / rel
        if a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes():
            same += 1
        else:
            differ.append(rel)
    prints = []
    for meta in sorted(before.glob("*.ome.zarr/zarr.json")):
        image = meta.parent.name
        fp = [
            json.loads((root / image / "zarr.json").read_text())["attributes"]["lightsheet"].get(
                "output_fingerprint"
            )
            for root in (before, after)
        ]
        prints.append(f"| {image} | `{fp[0]}` | `{fp[1]}` | {'yes' if fp[0] == fp[1] else 'NO'} |")
    return same, differ, prints


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="source tree of the baseline")
    p.add_argument("--after", type=Path, default=Path("."), help="source tree (default: .)")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--results", type=Path, default=None, help="write same_outputs.md here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        sample = Path(tmp) / "sample"
        generate(sample, size=args.size, seed=args.seed)
        outputs = {}
        for side, tree in (("before", args.before), ("after", args.after)):
            copy = Path(tmp) / side
            shutil.copytree(sample, copy, ignore=shutil.ignore_patterns("output"))
            run_tree(tree, copy, Path(tmp) / f"{side}.log")
            outputs[side] = copy / "output"
        same, differ, prints = compare(outputs["before"], outputs["after"])
    lines = [
        "# benchmarks/same_outputs.py: the pipeline's outputs before and after a change",
        "",
        f"    python -m benchmarks.same_outputs --before {args.before} --after {args.after} "
        f"--size {args.size} --seed {args.seed}",
        "",
        f"sample {args.size} (seed {args.seed}): {same} data files identical byte for byte, "
        f"{len(differ)} differ" + ("" if not differ else ": " + ", ".join(differ[:20])),
        "",
        "| image | fingerprint before | fingerprint after | same |",
        "|---|---|---|---|",
        *prints,
    ]
    print("\n".join(lines))
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "same_outputs.md").write_text("\n".join(lines) + "\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
