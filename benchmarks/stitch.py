"""Overlapping tiles: registration accuracy, and the stitch stage's time and memory.

    python -m benchmarks.stitch accuracy [--seeds 0 1 2] [--workdir DIR]
    python -m benchmarks.stitch scale [--tile 64 512 512] [--repeat 2] [--workdir DIR]
                                      [--runs RUN ...] [--baseline SOURCE_TREE]

``accuracy``: 3 × 3 tiles of the `small` sample, 15 % overlap, stage errors up to ±2 µm in z
and ±8 µm in y and x (non-integer). Per seed: the largest error of any tile's registered
position, per axis, in voxels; seconds. Our registration (`lightsheet.stitch.register`)
and, where it imports, multiview-stitcher's (phase correlation + global optimisation, its
defaults), on the same tiles.

``scale``: the stitch stage's work (ingest, registration, fusion, OME-Zarr with pyramid,
on the pipeline's local Dask cluster), each in its own process with its process tree's
peak memory and CPU time sampled, for overlapping mosaics of 2 × 2 and 4 × 4 tiles of the
same shape (15 % overlap, ±8 µm), and the abutting path on 2 × 2 and 4 × 4 abutting
tiles of that shape. Seconds (wall and CPU) per output GB compare the two paths for the same output
volume; the runs are interleaved and the best of the repeats compared (the machine is
shared). ``--baseline DIR`` also runs another commit's source tree
(``git archive COMMIT | tar -x -C DIR``), interleaved, for before/after figures.

Results: ``benchmarks/results/stitch.md`` (written by hand from the printed tables) and
``benchmarks/results/stitch_*.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import sampled, tree_cpu

VOXEL = (2.0, 1.0, 1.0)
OVERLAP = (0.0, 0.15, 0.15)
ERROR_UM = (2.0, 8.0, 8.0)


def _truth(folder: Path) -> np.ndarray:
    import pandas as pd

    t = pd.read_csv(folder / "truth" / "tiles.csv")
    return t[["true_z_um", "true_y_um", "true_x_um"]].to_numpy() / np.asarray(VOXEL)


def ours(folder: Path) -> tuple[np.ndarray, float, dict]:
    import dask

    from lightsheet.config import DEFAULT_PATTERN
    from lightsheet.ingest import discover
    from lightsheet.stitch import nominal_layout, register

    t = time.monotonic()
    with dask.config.set(scheduler="threads", num_workers=2):
        m = discover(str(folder / "tiles" / "*.tif"), DEFAULT_PATTERN)
        layout = nominal_layout(m, VOXEL, overlap=OVERLAP)
        sol = register(m, layout.positions_vox, max_shift_vox=layout.max_shift_vox)
    kept = sum(lk.kept for lk in sol.links)
    return sol.positions, time.monotonic() - t, {"links": f"{kept}/{len(sol.links)}"}


def mvs_register(folder: Path) -> tuple[np.ndarray, float, dict]:
    """multiview-stitcher 0.1.62: msi_utils views at nominal positions, registration.register
    with its phase-correlation pairwise method and global optimisation (defaults)."""
    import tifffile
    from multiview_stitcher import msi_utils, registration
    from multiview_stitcher import spatial_image_utils as si_utils

    from lightsheet.config import DEFAULT_PATTERN
    from lightsheet.ingest import discover
    from lightsheet.stitch import nominal_layout
    from lightsheet.stitch.register import spatial_tiles

    m = discover(str(folder / "tiles" / "*.tif"), DEFAULT_PATTERN)
    layout = nominal_layout(m, VOXEL, overlap=OVERLAP)
    tiles = spatial_tiles(m, channel=0, timepoint=0)
    t = time.monotonic()
    msims = []
    for tile, pos in zip(tiles, layout.positions_vox, strict=True):
        sim = si_utils.get_sim_from_array(
            tifffile.imread(tile.path),
            dims=["z", "y", "x"],
            scale=dict(zip("zyx", VOXEL, strict=True)),
            translation=dict(zip("zyx", pos * np.asarray(VOXEL), strict=True)),
            transform_key="stage",
        )
        msims.append(msi_utils.get_msim_from_sim(sim, scale_factors=[]))
    params = registration.register(
        msims, reg_channel_index=0, transform_key="stage", new_transform_key="registered"
    )
    seconds = time.monotonic() - t
    positions = []
    for p, pos in zip(params, layout.positions_vox, strict=True):
        # registered = params @ stage (multiview-stitcher's convention: its notebooks set
        # set_affine_transform(msim, params[i], "registered", base_transform_key="stage"))
        affine = np.asarray(p.squeeze())
        world = (affine @ np.append(pos * np.asarray(VOXEL), 1.0))[:3]
        positions.append(world / np.asarray(VOXEL))
    return np.asarray(positions), seconds, {}


def accuracy(args) -> int:
    from lightsheet.sample.overlap import generate_overlapping

    methods = {"ours": ours}
    try:
        import multiview_stitcher  # noqa: F401

        methods["multiview-stitcher"] = mvs_register
    except ImportError:
        print("multiview-stitcher does not import: measuring ours only")
    rows = []
    for seed in args.seeds:
        folder = Path(args.workdir) / f"accuracy-{seed}"
        if not (folder / "sample.json").is_file():
            generate_overlapping(
                folder, size="small", seed=seed, channels=1, grid=(1, 3, 3),
                overlap=OVERLAP, stage_error_um=ERROR_UM,
            )  # fmt: skip
        truth = _truth(folder)
        for name, fn in methods.items():
            positions, seconds, extra = fn(folder)
            err = positions - truth
            err -= err.mean(axis=0)  # a global translation is not an error
            worst = np.abs(err).max(axis=0)
            rows.append(
                {
                    "seed": seed,
                    "method": name,
                    "max_err_z_vox": round(float(worst[0]), 3),
                    "max_err_y_vox": round(float(worst[1]), 3),
                    "max_err_x_vox": round(float(worst[2]), 3),
                    "seconds": round(seconds, 1),
                    **extra,
                }
            )
            print(rows[-1], flush=True)
    _write_csv(Path(args.results) / "stitch_accuracy.csv", rows)
    return 0


def child(kind: str, folder: Path, out: Path, result: Path) -> None:
    """One measured run (its own process): the stitch stage's work on one sample."""
    from benchmarks.pipeline import _cluster
    from lightsheet.blocks import fused_chunks, stitch_chunks, write_blocks
    from lightsheet.config import DEFAULT_PATTERN
    from lightsheet.ingest import discover
    from lightsheet.io.omezarr import write_image
    from lightsheet.stitch import nominal_layout, register, stitch

    cluster, client = _cluster()
    t, cpu = time.monotonic(), tree_cpu()
    m = discover(str(folder / "tiles" / "*.tif"), DEFAULT_PATTERN)
    itemsize = np.dtype(m.dtype).itemsize
    marks = {}
    if kind.startswith("abutting"):
        chunks = stitch_chunks(m.shape[2:], VOXEL, m.tile_shape)
        blocks = write_blocks(chunks, m.shape[2:], itemsize, VOXEL)
        volume = stitch(m, voxel_size_um=VOXEL, chunks=blocks)
    else:
        interpolation = kind.partition(":")[2] or "linear"
        layout = nominal_layout(m, VOXEL, overlap=OVERLAP)
        sol = register(m, layout.positions_vox, max_shift_vox=layout.max_shift_vox)
        marks["register_s"] = round(time.monotonic() - t, 2)
        marks["register_cpu_s"] = round(tree_cpu() - cpu, 2)
        chunks = fused_chunks(layout.shape_zyx, VOXEL)
        blocks = write_blocks(chunks, layout.shape_zyx, itemsize, VOXEL)
        volume = stitch(
            m, voxel_size_um=VOXEL, chunks=blocks, positions_vox=sol.positions,
            shape_zyx=layout.shape_zyx, blend_vox=layout.blend_vox, interpolation=interpolation,
        )  # fmt: skip
        err = sol.positions - _truth(folder)
        marks["max_err_vox"] = round(float(np.abs(err - err.mean(0)).max()), 3)
    write_image(volume, out, chunks=chunks, voxel_size_um=VOXEL, name="raw")
    result.write_text(
        json.dumps(
            {
                "seconds": time.monotonic() - t,
                "cpu_s": tree_cpu() - cpu,
                "out_gb": volume.nbytes / 1e9,
                "tiles": len(m.tiles),
                **marks,
            }
        )
    )
    client.close()
    cluster.close()


def scale(args) -> int:
    from lightsheet.sample.overlap import generate_overlapping

    work = Path(args.workdir)
    tile = tuple(args.tile)
    samples = {
        "fused 2x2": ((1, 2, 2), OVERLAP, ERROR_UM),
        "fused 4x4": ((1, 4, 4), OVERLAP, ERROR_UM),
        "abutting 2x2": ((1, 2, 2), 0.0, 0.0),
        "abutting 4x4": ((1, 4, 4), 0.0, 0.0),
    }
    runs = {**{n: n for n in samples}, "fused 4x4 nearest": "fused 4x4"}
    runs = {n: v for n, v in runs.items() if not args.runs or n.replace(" ", "-") in args.runs}
    samples = {n: v for n, v in samples.items() if n in runs.values()}
    for name, (grid, ov, err) in samples.items():
        folder = work / name.replace(" ", "-")
        if not (folder / "sample.json").is_file():
            generate_overlapping(
                folder, seed=0, channels=args.channels, grid=grid, tile_shape=tile,
                overlap=ov, stage_error_um=err,
            )  # fmt: skip
    # the code measured: this checkout, and (interleaved with it) a baseline source tree
    sources = {"this": Path(__file__).resolve().parents[1]}
    if args.baseline:
        sources["baseline"] = Path(args.baseline).resolve()
    rows = []
    for repeat in range(args.repeat):
        for name, sample in runs.items():
            for source, root in sources.items():
                rows.append(_scale_run(work, name, sample, source, root, repeat))
                print(rows[-1], flush=True)
    _write_csv(Path(args.results) / "stitch_scale.csv", rows)
    _summary(rows)
    return 0


def _scale_run(work: Path, name: str, sample: str, source: str, root: Path, repeat: int) -> dict:
    """One child process on one sample, with the code of the source tree ``root``."""
    folder = work / sample.replace(" ", "-")
    out = work / "out.ome.zarr"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    result = work / "result.json"
    kind = "abutting" if name.startswith("abutting") else "fused"
    kind += ":nearest" if name.endswith("nearest") else ""
    # this module of ``root`` (first on the path, for the Dask workers too)
    start = f"import sys; sys.path.insert(0, {str(root)!r}); from benchmarks.stitch import main; "
    cmd = [sys.executable, "-c", start + "sys.exit(main())", "child", kind, str(folder)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code, _, samples_ = sampled([*cmd, str(out), str(result)], env=env)
    if code != 0:
        raise SystemExit(f"{name} ({source}): child failed ({code})")
    r = json.loads(result.read_text())
    return {
        "repeat": repeat,
        "run": name,
        "source": source,
        "tiles": r["tiles"],
        "out_gb": round(r["out_gb"], 3),
        "seconds": round(r["seconds"], 2),
        "cpu_s": round(r["cpu_s"], 1),
        "s_per_gb": round(r["seconds"] / r["out_gb"], 2),
        "cpu_s_per_gb": round(r["cpu_s"] / r["out_gb"], 2),
        "register_s": r.get("register_s", ""),
        "register_cpu_s": r.get("register_cpu_s", ""),
        "max_err_vox": r.get("max_err_vox", ""),
        "peak_gib": round(max(s[1] for s in samples_) / 2**30, 3),
        "load": round(os.getloadavg()[0], 1),
    }


def _summary(rows: list[dict]) -> None:
    """Best of the repeats per run and source; each fused run against the abutting run of
    the same tile grid (about the same output volume)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    best = table.groupby(["source", "run"])[["s_per_gb", "cpu_s_per_gb", "peak_gib"]].min()
    for source in table["source"].unique():
        b = best.loc[source]
        for run in b.index:
            grid = run.split()[1]
            if run.startswith("abutting") or f"abutting {grid}" not in b.index:
                continue
            ratio = b.loc[run] / b.loc[f"abutting {grid}"]
            print(
                f"{source}: {run}: {b.loc[run, 's_per_gb']:.1f} s/GB, "
                f"{ratio['s_per_gb']:.2f}x the abutting {grid} in wall time, "
                f"{ratio['cpu_s_per_gb']:.2f}x in CPU time (best of the repeats)"
            )


def _write_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stitch")
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s = sub.add_parser("scale")
    s.add_argument("--tile", type=int, nargs=3, default=[64, 512, 512])
    s.add_argument("--repeat", type=int, default=2)
    s.add_argument("--channels", type=int, default=1)
    s.add_argument(
        "--runs",
        nargs="+",
        help="only these runs (fused-2x2 fused-4x4 abutting-2x2 abutting-4x4 fused-4x4-nearest)",
    )
    s.add_argument(
        "--baseline",
        help="a source tree of another commit (git archive COMMIT | tar -x -C DIR): its "
        "runs are interleaved with this checkout's, for before/after figures",
    )
    for q in (a, s):
        q.add_argument("--workdir", default="/tmp/lsbench-stitch")
        q.add_argument("--results", default="benchmarks/results")
    c = sub.add_parser("child")
    c.add_argument("kind")
    c.add_argument("folder", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("result", type=Path)
    args = p.parse_args(argv)
    if args.part == "child":
        child(args.kind, args.folder, args.out, args.result)
        return 0
    return {"accuracy": accuracy, "scale": scale}[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
