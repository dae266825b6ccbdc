"""Segment speed: method local against method otsu on the same volume, in one run.

    python benchmarks/segment_speed.py VOLUME.npy [--voxel-size-um Z Y X]

``VOLUME.npy``: a (Z, Y, X) volume, e.g. the deconvolved small phantom. Times
`segment_volume`'s passes (statistics, analysis, measurement; labels stay lazy) with the
threads scheduler on 2 workers, the methods alternating twice, and prints wall and CPU
seconds and wall nanoseconds per voxel.
"""

from __future__ import annotations

import argparse
import os
import time

import dask
import dask.array as da
import numpy as np

from lightsheet.config import SegmentConfig
from lightsheet.segment import segment_volume


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volume", help="a (Z, Y, X) .npy volume")
    parser.add_argument("--voxel-size-um", type=float, nargs=3, default=(2.0, 1.0, 1.0))
    args = parser.parse_args(argv)
    image = np.load(args.volume)
    dask.config.set(scheduler="threads", num_workers=2)
    for method in ("otsu", "local", "otsu", "local"):
        wall, cpu = time.perf_counter(), time.process_time()
        result = segment_volume(
            da.from_array(image, chunks=(64, 128, 128)),
            voxel_size_um=args.voxel_size_um,
            config=SegmentConfig(method=method),
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"{method}: {result.n} cells, {wall:.1f} s wall, {cpu:.1f} CPU s, "
            f"{wall / image.size * 1e9:.0f} ns per voxel, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
