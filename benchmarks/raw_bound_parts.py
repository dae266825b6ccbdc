"""What the raw bound leaves out: the bound, plus chunk digests, plus writing the chunks.

    python -m benchmarks.raw_bound_parts /tmp/lsbench/sample-4GB [--repeat 2]

`benchmarks.pipeline`'s raw bound reads every tile once and compresses its chunks with the
OME-Zarr writer's codec; it writes nothing. Any writer must also store the compressed
bytes, and the stitch stage hashes each chunk for the lineage. This runs the bound's own
loop (same threads, chunks and codec) three ways on a generated sample, so the cost of
each addition is measured on the same machine in the same run. Files go to a temporary
folder beside the sample and are deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import tifffile

from benchmarks.pipeline import _chunks, _tile_paths, cores
from lightsheet.io.omezarr import compressor
from lightsheet.lineage import chunk_digest

MODES = ("bound", "bound + digest", "bound + digest + write")


def run(folder: Path, mode: str, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one pass over the sample's tiles in ``mode``."""
    cfg = compressor().to_dict()["configuration"]
    blosc = numcodecs.Blosc(
        cname=cfg["cname"], clevel=cfg["clevel"], shuffle=numcodecs.Blosc.BITSHUFFLE
    )
    chunks = _chunks(folder)

    def one(path: str) -> None:
        tile = tifffile.imread(path)
        for z in range(0, tile.shape[0], chunks[0]):
            for y in range(0, tile.shape[1], chunks[1]):
                for x in range(0, tile.shape[2], chunks[2]):
                    block = tile[z : z + chunks[0], y : y + chunks[1], x : x + chunks[2]]
                    block = np.ascontiguousarray(block)
                    if "digest" in mode:
                        chunk_digest(block)
                    encoded = blosc.encode(block)
                    if "write" in mode:
                        (out / f"{Path(path).stem}.{z}.{y}.{x}").write_bytes(encoded)

    t, c = time.monotonic(), os.times()
    with ThreadPoolExecutor(cores()) as pool:
        list(pool.map(one, _tile_paths(folder)))
    c2 = os.times()
    return time.monotonic() - t, (c2.user - c.user) + (c2.system - c.system)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sample", type=Path, help="a folder made by lightsheet.sample.generate")
    p.add_argument("--repeat", type=int, default=2, help="passes per mode (best is shown)")
    args = p.parse_args()
    for path in _tile_paths(args.sample):  # warm the page cache, as the benchmark does
        Path(path).read_bytes()
    print(f"{'mode':<24} {'wall s':>7} {'CPU s':>7} {'× bound wall':>13}")
    base = None
    for mode in MODES:
        best = (float("inf"), float("inf"))
        for _ in range(args.repeat):
            out = Path(tempfile.mkdtemp(prefix="raw-bound-", dir=args.sample.parent))
            try:
                best = min(best, run(args.sample, mode, out))
            finally:
                shutil.rmtree(out, ignore_errors=True)
        base = base or best[0]
        print(f"{mode:<24} {best[0]:7.2f} {best[1]:7.2f} {base / best[0]:13.2f}")


if __name__ == "__main__":
    main()
