"""Re-running an unchanged config: how long it takes next to the first run.

    python benchmarks/rerun.py                     # the `small` sample, in a temporary folder
    python benchmarks/rerun.py --size tiny --workdir /scratch/rerun

Runs ``lightsheet run CONFIG`` twice on a generated sample acquisition, each in its own
process as a user would, and prints a table: the command's wall time (Python start-up and,
without ``PREFECT_API_URL``, Prefect's temporary server included), the pipeline flow's own
wall time (from the run summary), and whether every stage was reused the second time.
Target (issues 7, 25): the re-run under 10 % of the first run. With ``PREFECT_API_URL`` set the
commands use that server instead of starting a temporary one; an unchanged re-run starts no
Prefect at all (`lightsheet.cli.run_config`). Results: ``benchmarks/results/rerun.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightsheet.sample import SIZES, generate


def run(config: Path, summary: Path) -> tuple[float, dict]:
    """``lightsheet run`` in a new process; (command seconds, run summary). Logs: summary.log."""
    cmd = [
        sys.executable,
        "-m",
        "lightsheet.cli",
        "run",
        str(config),
        "--summary-json",
        str(summary),
    ]
    log = summary.with_suffix(".log")
    start = time.monotonic()
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}):\n{log.read_text()[-4000:]}")
    return time.monotonic() - start, json.loads(summary.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="small", help="sample size (default small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        sample = Path(tmp) / "sample"
        generate(sample, size=args.size, seed=args.seed)
        config = sample / "config.yaml"
        load = os.getloadavg()
        first_cmd, first = run(config, Path(tmp) / "first.json")
        second_cmd, second = run(config, Path(tmp) / "second.json")
    reused = all(s["reused"] for s in second["stages"])
    print(f"sample {args.size} (seed {args.seed}); {os.cpu_count()} CPUs, load {load[0]:.2f}")
    print(f"Prefect API: {os.environ.get('PREFECT_API_URL') or 'temporary server per command'}")
    print(f"{'run':<10}{'command s':>12}{'flow s':>10}  stages reused")
    print(
        f"{'first':<10}{first_cmd:>12.1f}{first['flow_seconds']:>10.1f}  "
        f"{sum(s['reused'] for s in first['stages'])}/{len(first['stages'])}"
    )
    print(
        f"{'re-run':<10}{second_cmd:>12.1f}{second['flow_seconds']:>10.1f}  "
        f"{sum(s['reused'] for s in second['stages'])}/{len(second['stages'])}"
    )
    cmd_ratio = second_cmd / first_cmd
    flow_ratio = second["flow_seconds"] / first["flow_seconds"]
    print(f"re-run / first: command {cmd_ratio:.1%}, flow {flow_ratio:.1%} (target < 10%)")
    print(f"every stage reused on the re-run: {reused}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0 if reused else 1


if __name__ == "__main__":
    sys.exit(main())
