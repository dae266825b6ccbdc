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


def tree_cpu(proc: psutil.Process | None = None) -> float:
    """CPU seconds (user + system) so far of a process (default: this one) and its live
    descendants."""
    proc = proc or psutil.Process()
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def sampled(cmd: list[str], *, env=None, interval: float = 0.2) -> tuple[int, float, list]:
    """Run ``cmd``; return (exit code, seconds, [(unix time, tree RSS bytes, tree CPU s)]).

    The CPU seconds are summed over the live processes of the tree, so they are only
    comparable between samples while the same processes live (a flow's Dask workers do).
    """
    start = time.monotonic()
    child = subprocess.Popen(cmd, env=env)
    proc = psutil.Process(child.pid)
    samples = []
    while child.poll() is None:
        try:
            samples.append((time.time(), tree_rss(proc), tree_cpu(proc)))
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    return child.wait(), time.monotonic() - start, samples


def measure(cmd: list[str], *, interval: float = 0.2) -> tuple[int, float, int]:
    """Run ``cmd``; return (exit code, seconds, peak tree RSS in bytes)."""
    rc, seconds, samples = sampled(cmd, interval=interval)
    return rc, seconds, max((rss for _, rss, _ in samples), default=0)


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
