"""Segment memory, pass by pass, as the pipeline runs the stage.

    python -m benchmarks.segment_memory IMAGE.ome.zarr --diameter-um D [--channel C]
        [--scratch DIR] [--trim-every S] [--tile K --tiled-copy DIR]

Runs `lightsheet.segment.segment_volume` (method local, the scratch folder kept, as the
segment task runs it) on a stored OME-Zarr image in the pipeline's local cluster: the
scheduler in this process, the stage itself on the worker as a client (``worker_client``,
as `tasks._common.dask_client`). Samples every 0.2 s the resident memory of this process
(the scheduler) and of the worker processes, and prints each pass's seconds, number of
outputs and peaks, with the worker's managed memory (Dask's stored results) and the number
of tasks it holds state for. Two runs, one on an image and one on ``--tile K`` (the same
image's channel repeated K × K in y and x, written once into ``--tiled-copy`` as the
deconvolve stage writes: sharded, the same chunks), show what grows with the volume and what
does not.

``--trim-every S`` calls ``malloc_trim(0)`` on the workers every S seconds: how much of
their resident memory is freed memory that the allocator keeps.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.memory import tree_rss


def _stage(path: str, channel: int, diameter_um: float, scratch: str) -> tuple[list, int]:
    """On a worker: the segment stage's passes, timed; ([(pass, start, end, outputs)], n)."""
    import dask
    from dask.base import unpack_collections
    from distributed import futures_of, wait, worker_client

    from lightsheet.blocks import segment_chunks
    from lightsheet.config import SegmentConfig
    from lightsheet.io.omezarr import read_image, stored_volume
    from lightsheet.segment import segment_volume

    marks = []
    src, vs, _ = read_image(path)
    chunks = segment_chunks(src.shape[2:], vs, src.chunksize[2:])
    with worker_client() as client:

        def compute(collection, what):
            start = time.time()
            parts, repack = unpack_collections(collection, traverse=True)
            persisted = client.persist(list(parts))
            futures = futures_of(persisted)
            wait(futures)
            out = repack(dask.compute(*persisted))[0]
            marks.append((what, start, time.time(), len(futures)))
            return out

        result = segment_volume(
            stored_volume(path, 0, channel),
            voxel_size_um=vs,
            config=SegmentConfig(nucleus_diameter_um=diameter_um),
            chunks=chunks,
            compute=compute,
            scratch=scratch,
        )
        start = time.time()
        top = result.labels.map_blocks(lambda b: np.array([[[b.max()]]]), chunks=(1, 1, 1))
        client.compute(top.max()).result()
        marks.append(("labels", start, time.time(), top.npartitions))
    return marks, result.n


def _worker_state(dask_worker) -> tuple[int, int]:
    return dask_worker.state.nbytes, len(dask_worker.state.tasks)


def _trim() -> int:
    return ctypes.CDLL("libc.so.6").malloc_trim(0)


def tile(path: str, out: Path, k: int, channel: int) -> str:
    """``path``'s ``channel`` repeated ``k`` × ``k`` in y and x, written to ``out`` (once).

    The copy holds that one channel (its channel 0): at ``k = 4`` a copy of both channels
    of the 1 GB sample's deconvolved image would take 31 GB of disk.
    """
    import dask.array as da

    from lightsheet.io.omezarr import read_image, write_image

    if not out.exists():
        src, vs, _ = read_image(path)
        a = src if isinstance(src, da.Array) else da.from_array(src, chunks=src.chunksize)
        a = a[:, channel : channel + 1]
        rows = da.concatenate([a] * k, axis=3)
        big = da.concatenate([rows] * k, axis=4).rechunk(a.chunksize)
        write_image(big, out, voxel_size_um=vs, name="tiled", chunks=a.chunksize[2:], sharded=True)
    return str(out)


def measure(path: str, channel: int, diameter_um: float, scratch: str, trim_every: float):
    """Run the stage once; print its passes' seconds and peaks."""
    from distributed import Client

    from lightsheet.clusters import local_cluster, local_cluster_kwargs
    from lightsheet.config.cluster import ClusterConfig

    cluster = local_cluster(**local_cluster_kwargs(ClusterConfig()))
    client = Client(cluster)
    me = psutil.Process()
    workers = [p for p in me.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    rss, state, stop = [], [], threading.Event()

    def sample_rss():
        while not stop.is_set():
            worker_rss = sum(tree_rss(w) for w in workers)
            rss.append((time.time(), me.memory_info().rss, worker_rss))
            time.sleep(0.2)

    def sample_state():
        while not stop.is_set():
            if trim_every:
                client.run(_trim)
            state.append((time.time(), *next(iter(client.run(_worker_state).values()))))
            stop.wait(trim_every or 1.0)

    for target in (sample_rss, sample_state):
        threading.Thread(target=target, daemon=True).start()
    marks, n = client.submit(_stage, path, channel, diameter_um, scratch, pure=False).result()
    stop.set()
    client.close()
    cluster.close()
    rss, state = np.array(rss), np.array(state)
    print(f"{path}: {n} cells, {len(workers)} worker process(es)")
    print(f"{'pass':32s} {'s':>5s} {'outputs':>8s} {'scheduler MiB':>14s} "
          f"{'worker MiB':>11s} {'managed MiB':>12s} {'worker tasks':>13s}")  # fmt: skip
    for what, start, end, outputs in marks:
        r = rss[(rss[:, 0] >= start) & (rss[:, 0] <= end)]
        s = state[(state[:, 0] >= start) & (state[:, 0] <= end)]
        s = s if len(s) else np.zeros((1, 3))
        mib = (r[:, 1].max() / 2**20, r[:, 2].max() / 2**20, s[:, 1].max() / 2**20)
        print(f"{what[:32]:32s} {end - start:5.0f} {outputs:8d} {mib[0]:14.0f} {mib[1]:11.0f} "
              f"{mib[2]:12.0f} {s[:, 2].max():13.0f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", help="OME-Zarr image (e.g. a run's deconvolved.ome.zarr)")
    p.add_argument("--diameter-um", type=float, required=True, help="nucleus_diameter_um")
    p.add_argument("--channel", type=int, default=0)
    p.add_argument("--scratch", type=Path, help="the stage's scratch (default: a temporary one)")
    p.add_argument("--trim-every", type=float, default=0.0, help="seconds (0: never)")
    p.add_argument("--tile", type=int, default=1, help="repeat the image K × K in y and x")
    p.add_argument("--tiled-copy", type=Path, help="where the tiled image is written")
    args = p.parse_args()
    path = args.image
    if args.tile > 1:
        if args.tiled_copy is None:
            p.error("--tile needs --tiled-copy")
        path, channel = tile(path, args.tiled_copy, args.tile, args.channel), 0
    else:
        channel = args.channel
    with tempfile.TemporaryDirectory() as tmp:
        scratch = str(args.scratch or tmp)
        measure(path, channel, args.diameter_um, scratch, args.trim_every)


if __name__ == "__main__":
    main()
