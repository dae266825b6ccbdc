"""Segment speed: method local against method otsu on the same volume, in one run.

    python benchmarks/segment_speed.py VOLUME.npy [--voxel-size-um Z Y X] [--rounds N]

``VOLUME.npy``: a (Z, Y, X) volume, e.g. the deconvolved small phantom. The volume is
stored as Zarr first and read block by block with halos, as the segment task reads it.
Times `segment_volume`'s passes and the labels written to Zarr (as the stage writes them)
with the threads scheduler on 2 workers: otsu, local recomputing every pass, and local with
a ``scratch`` folder (statistics and cell bodies kept on disk), alternating. Prints wall and
CPU seconds, wall nanoseconds per voxel and each pass's wall seconds, and checks that both
local runs give the same labels and table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from lightsheet.config import SegmentConfig
from lightsheet.segment import segment_volume

#: The runs compared: (name, method, keep intermediates in a scratch folder).
RUNS = (("otsu", "otsu", False), ("local", "local", False), ("local+scratch", "local", True))


def run_once(source, shape, chunks, voxel_size_um, method, scratch, work: Path):
    """One segmentation with its labels written; (result, labels, seconds per pass)."""
    passes = {}

    def compute(collection, what):
        start = time.perf_counter()
        out = dask.compute(collection)[0]
        passes[what] = time.perf_counter() - start
        return out

    result = segment_volume(
        source,
        voxel_size_um=voxel_size_um,
        config=SegmentConfig(method=method),
        chunks=chunks,
        compute=compute,
        scratch=scratch,
    )
    start = time.perf_counter()
    labels = zarr.create_array(
        str(work / "labels.zarr"),
        shape=shape,
        chunks=chunks,
        dtype=result.labels.dtype,
        overwrite=True,
    )
    da.store(result.labels, labels, lock=False)
    passes["labels"] = time.perf_counter() - start
    return result, labels[:], passes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volume", help="a (Z, Y, X) .npy volume")
    parser.add_argument("--voxel-size-um", type=float, nargs=3, default=(2.0, 1.0, 1.0))
    parser.add_argument("--chunks", type=int, nargs=3, default=(64, 128, 128))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    image = np.load(args.volume)
    chunks = tuple(args.chunks)
    dask.config.set(scheduler="threads", num_workers=2)
    with tempfile.TemporaryDirectory(prefix="segment-speed-") as tmp:
        work = Path(tmp)
        source = zarr.create_array(
            str(work / "input.zarr"), shape=image.shape, chunks=chunks, dtype=image.dtype
        )
        source[:] = image
        outputs = {}
        for _ in range(args.rounds):
            for name, method, keep in RUNS:
                scratch = work / "scratch" if keep else None
                wall, cpu = time.perf_counter(), time.process_time()
                result, labels, passes = run_once(
                    source, image.shape, chunks, args.voxel_size_um, method, scratch, work
                )
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                shown = ", ".join(f"{k.split(' ')[0]} {v:.1f}" for k, v in passes.items())
                print(
                    f"{name}: {result.n} cells, {wall:.1f} s wall, {cpu:.1f} CPU s, "
                    f"{wall / image.size * 1e9:.0f} ns per voxel ({shown} s), "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                outputs.setdefault(method, []).append((result.table, labels))
                if scratch is not None:
                    shutil.rmtree(scratch)
    local = outputs["local"]
    same = all(t.equals(local[0][0]) and np.array_equal(lab, local[0][1]) for t, lab in local[1:])
    print(f"local with and without scratch: same labels and table: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
