"""What verifying outputs before reuse costs, next to the run that made them.

    python -m benchmarks.verify                                  # 1 GB, in a temporary folder
    python -m benchmarks.verify --size 1GB --workdir /scratch/verify --results benchmarks/results

Generates a sample acquisition (``lightsheet.sample.generate``, reused when the workdir has
it), runs the pipeline flow on it once (featurize off and one Richardson–Lucy iteration, as
``benchmarks/pipeline.py`` runs it: the cheapest real run, so the largest ratio), then times,
in the same process and on the same files:

* **reuse check** — what a stage's reuse costs now on top of comparing cache keys
  (`lightsheet.lineage.check_output` of every output: a ``stat`` per file of each image's
  manifest, every table re-hashed), best of ``--repeat``;
* **up-front check** — the flow's whole `flows.pipeline.first_stale_stage` (ingest's
  discovery, the cache keys and the reuse checks of every stage), best of ``--repeat``;
* **verify** — ``lightsheet verify``'s deep check (every chunk re-read and re-hashed), once.

Prints a table and writes ``verify.md`` under ``--results``. The page cache is warm for the
checks (the outputs were just written or read); the reuse check reads no data either way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1GB", help="sample size (default 1GB)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--results", type=Path, default=None, help="write verify.md here")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = args.workdir or Path(tmp)
        return run(work, args)


def run(work: Path, args: argparse.Namespace) -> int:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import first_stale_stage, pipeline
    from lightsheet.config import DeconvolveConfig, FeaturizeConfig, load_config
    from lightsheet.io.omezarr import read_manifest
    from lightsheet.lineage import check_output
    from lightsheet.sample import generate
    from tasks._common import OUTPUTS

    sample = work / f"sample-{args.size}"
    if not (sample / "sample.json").is_file():
        generate(sample, size=args.size, seed=0)
    out = work / f"output-{args.size}"
    config = load_config(sample / "config.yaml").model_copy(
        update={
            "output": out,
            "deconvolve": DeconvolveConfig(iterations=1),
            "featurize": FeaturizeConfig(enabled=False),
        }
    )
    with prefect_test_harness(server_startup_timeout=300):
        start = time.perf_counter()
        summary = pipeline(config)
        run_s = time.perf_counter() - start
    computed = [s["stage"] for s in summary["stages"] if not s["reused"]]
    outputs = [out / n for n in OUTPUTS.values() if (out / n).exists()]
    n_files = sum(len(read_manifest(o)["files"]) for o in outputs if o.is_dir())
    raw_bytes = sum(f.stat().st_size for f in (sample / "tiles").glob("*.tif"))

    def reuse_check() -> None:
        assert all(not check_output(o) for o in outputs)

    def up_front() -> None:
        assert first_stale_stage(config) is None

    reuse_s = best_of(args.repeat, reuse_check)
    up_front_s = best_of(args.repeat, up_front)
    start = time.perf_counter()
    deep = [p for o in outputs for p in check_output(o, deep=True)]
    deep_s = time.perf_counter() - start
    assert not deep, deep
    rows = [
        ("run (flow wall time)", run_s, "stages computed: " + ", ".join(computed)),
        ("reuse check (all outputs)", reuse_s, f"{n_files} image files stat'ed, tables hashed"),
        ("up-front check (first_stale_stage)", up_front_s, "discovery + keys + reuse checks"),
        ("verify (deep)", deep_s, "every chunk re-read and re-hashed"),
    ]
    lines = [
        f"sample {args.size}: {raw_bytes / 1e9:.2f} GB of raw tiles; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}",
        "",
        "| what | seconds | share of the run | note |",
        "|---|---|---|---|",
        *[f"| {w} | {s:.3f} | {100 * s / run_s:.2f} % | {n} |" for w, s, n in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "verify.md").write_text(
            "# benchmarks/verify.py: what verifying outputs before reuse costs\n\n"
            f"    python -m benchmarks.verify --size {args.size} --results {args.results}\n\n"
            + text
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
