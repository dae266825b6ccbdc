"""Peak memory of a command's whole process tree (sum of RSS, sampled).

    python -m benchmarks.memory [--interval 0.2] -- COMMAND [ARGS...]

Prints the command's exit code, wall time and the peak of the summed resident memory of
the process and all its descendants (Dask workers, Prefect's temporary server, ...).
Summed RSS counts pages shared between processes more than once, so it is an upper bound.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and its descendants (0 for those that just exited)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(cmd: list[str], *, interval: float = 0.2) -> tuple[int, float, int]:
    """Run ``cmd``; return (exit code, seconds, peak tree RSS in bytes)."""
    start = time.monotonic()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(proc))
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    return child.wait(), time.monotonic() - start, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.2, help="sampling period, s")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give a command after --")
    rc, seconds, peak = measure(cmd, interval=args.interval)
    print(
        f"exit code {rc}, wall {seconds:.1f} s, peak memory of the process tree "
        f"{peak / 2**30:.2f} GiB ({peak / 1e9:.2f} GB)",
        file=sys.stderr,
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
