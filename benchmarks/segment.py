"""Connected-component labelling of a chunked volume: lightsheet vs dask-image vs SciPy.

The volume is a phantom of random ellipsoids (radii 3 to 60 voxels, so many cross several
chunk faces, some span many chunks), rendered chunk by chunk into a Zarr store that every
method reads. Each method runs in a fresh process and streams its labels into a Zarr store
on disk (so the output is not held in memory); time and the process's peak resident memory
are recorded. SciPy labels the
whole array in memory: the single-machine reference. The three stored results are then
compared chunk by chunk (same partition up to renumbering) without loading them whole.

    python benchmarks/segment.py --size 512 --chunk 128
    python benchmarks/segment.py --size 256 --chunk 64 --connectivity 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def blobs(size: int, seed: int, fill: float = 0.12) -> np.ndarray:
    """Random ellipsoids (z, y, x, rz, ry, rx) until their volume sum reaches ``fill``."""
    rng = np.random.default_rng(seed)
    rows, volume = [], 0.0
    while volume < fill * size**3:
        big = rng.random() < 0.05
        r = rng.uniform(15, 60, 3) if big else rng.uniform(3, 12, 3)
        c = rng.uniform(0, size, 3)
        rows.append(np.r_[c, r])
        volume += 4 / 3 * np.pi * np.prod(r)
    return np.array(rows)


def _render(block_info=None, *, table):
    info = block_info[None]
    lo = np.array([a for a, _ in info["array-location"]])
    hi = np.array([b for _, b in info["array-location"]])
    out = np.zeros(tuple(hi - lo), bool)
    for row in table:
        c, r = row[:3], row[3:]
        a = np.maximum(np.ceil(c - r), lo).astype(int)
        b = np.minimum(np.floor(c + r) + 1, hi).astype(int)
        if np.any(a >= b):
            continue
        # only the blob's bounding box inside this chunk
        z, y, x = np.ogrid[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        inside = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
        out[tuple(slice(i - o, j - o) for i, j, o in zip(a, b, lo, strict=True))] |= inside <= 1
    return out


def write_phantom(path: str, size: int, chunk: int, seed: int) -> float:
    """Render the phantom chunk by chunk into a Zarr store; return its foreground fraction."""
    import dask.array as da

    mask = da.map_blocks(
        _render,
        table=blobs(size, seed),
        chunks=((chunk,) * (size // chunk),) * 3,
        dtype=bool,
        meta=np.empty((0, 0, 0), bool),
    )
    mask.to_zarr(path, overwrite=True)
    return float(da.from_zarr(path).mean().compute())


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_one(method: str, source: str, connectivity: int, out: str) -> dict:
    """Label the stored mask with one method in this process; store labels in ``out``."""
    import dask
    import dask.array as da
    import scipy.ndimage as ndi

    from lightsheet import segment as seg

    mask = da.from_zarr(source)
    chunk = mask.chunksize
    struct = seg.structure(connectivity)
    if method == "dask-image":
        from dask_image import ndmeasure
    base = _rss_mib()
    t0 = time.perf_counter()
    if method == "lightsheet":
        labels, n = seg.label(mask, connectivity=connectivity)
        labels.to_zarr(out, overwrite=True)
    elif method == "dask-image":
        labels, n = ndmeasure.label(mask, structure=struct)
        labels, n = dask.persist(labels, n)  # one graph execution, like the others
        n = int(n)
        labels.to_zarr(out, overwrite=True)
    elif method == "scipy":
        whole = mask.compute()
        labels, n = ndi.label(whole, structure=struct)
        da.from_array(labels, chunks=chunk).to_zarr(out, overwrite=True)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "seconds": seconds, "n": int(n), "peak_mib": peak, "base_mib": base}


def same_partition(a_path: str, b_path: str, chunk: int) -> bool:
    """Compare two stored label arrays chunk by chunk: one-to-one map between their ids."""
    import zarr

    a, b = zarr.open_array(a_path, mode="r"), zarr.open_array(b_path, mode="r")
    pairs = set()
    for z in range(0, a.shape[0], chunk):
        for y in range(0, a.shape[1], chunk):
            for x in range(0, a.shape[2], chunk):
                sl = (slice(z, z + chunk), slice(y, y + chunk), slice(x, x + chunk))
                la, lb = a[sl].astype(np.int64), b[sl].astype(np.int64)
                if not np.array_equal(la == 0, lb == 0):
                    return False
                fg = la != 0
                pairs.update(map(tuple, np.unique(np.stack([la[fg], lb[fg]], 1), axis=0)))
    pairs = np.array(sorted(pairs)).reshape(-1, 2)
    return len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1])) == len(pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="edge of the cubic volume (voxels)")
    p.add_argument("--chunk", type=int, default=128, help="edge of the cubic chunks (voxels)")
    p.add_argument("--connectivity", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="lightsheet,dask-image,scipy")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        res = run_one(args.one, args.source, args.connectivity, args.out)
        print(json.dumps(res))
        return 0
    if args.size % args.chunk:
        p.error("--chunk must divide --size")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        source = str(Path(tmp) / "mask.zarr")
        fill = write_phantom(source, args.size, args.chunk, args.seed)
        stores = {}
        for method in args.methods.split(","):
            store = str(Path(tmp) / f"{method}.zarr")
            cmd = [sys.executable, __file__, "--one", method, "--out", store, "--source", source]
            cmd += ["--connectivity", str(args.connectivity)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            stores[method] = store
            print(f"  {method}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
        ref = "scipy" if "scipy" in stores else next(iter(stores))
        for r in results:
            r["same_as_" + ref] = same_partition(stores[r["method"]], stores[ref], args.chunk)
    chunk_mib = args.chunk**3 / 2**20  # one bool chunk
    print(
        f"\nConnected components, {args.size}³ voxels, chunks {args.chunk}³ "
        f"({(args.size // args.chunk) ** 3} blocks), {fill:.1%} foreground, "
        f"connectivity {args.connectivity}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'method':<12} {'time s':>8} {'objects':>9} {'peak MiB':>9} {'+ MiB':>8} same")
    for r in results:
        print(
            f"{r['method']:<12} {r['seconds']:>8.2f} {r['n']:>9d} {r['peak_mib']:>9.0f} "
            f"{r['peak_mib'] - r['base_mib']:>8.0f} {r['same_as_' + ref]}"
        )
    by = {r["method"]: r for r in results}
    if "lightsheet" in by and "dask-image" in by:
        ratio = by["dask-image"]["seconds"] / by["lightsheet"]["seconds"]
        print(f"speed-up over dask-image: {ratio:.1f}x")
    print(f"(one bool chunk = {chunk_mib:.1f} MiB; '+ MiB' = peak minus RSS after imports)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
