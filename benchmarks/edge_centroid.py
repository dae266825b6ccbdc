"""Where detections sit next to a tissue edge: centroid offsets towards the dark outside.

A cell near the brain's surface lies where the autofluorescence falls from the tissue's level
to the dark outside. Where the local method's background differs from the true one across a
cell (as the old one did: bin medians interpolated between bin centres a diameter apart fell
inside the tissue before a sharp edge), the centroid, weighted by the significance over it,
moves, and at a sharp edge the tissue stood out as a ridge that swallowed the cells. This puts
cells of one diameter at known distances inside an edge of known softness and reports how
far (µm, positive = outward) the segment stage's defaults place them.

Synthetic: one plane-wise background falling from 1000 to 100 across a logistic edge of
``--edge-um`` scale along x, cells as Gaussian blobs (σ a quarter of the diameter) of
amplitude 600 at 4, 6 and 8 µm inside the edge's middle, Gaussian noise of ``--noise`` SD
scaled by the square root of the local level. 2 × 1 × 1 µm voxels.

    python -m benchmarks.edge_centroid --edge-um 1 3 5 --noise 30 60

Writes ``edge_centroid.csv`` under ``--results`` (one row per cell and setting).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from lightsheet.config import SegmentConfig
from lightsheet.segment import segment_volume

VOXEL_UM = (2.0, 1.0, 1.0)
SHAPE = (24, 96, 160)
EDGE_X = 100  # voxels: the edge's middle
INSIDE_UM = (4.0, 6.0, 8.0)


def cells_beside_edge(edge_x: int, direction: int = -1) -> list[tuple[float, float, float]]:
    """Five cell centres (µm) in the middle plane, 4, 6, 8, 4 and 6 µm from the edge's middle
    at voxel ``edge_x``: on its low-x side (``direction`` −1) or its high-x side (+1)."""
    return [
        (12 * VOXEL_UM[0], y * VOXEL_UM[1], edge_x * VOXEL_UM[2] + direction * INSIDE_UM[i % 3])
        for i, y in enumerate(range(14, SHAPE[1] - 6, 16))
    ]


def step_volume(
    shape,
    *,
    edge_x: int,
    edge_um: float,
    cells_um,
    diameter_um: float,
    noise: float,
    levels=(1000.0, 100.0),
    amplitude: float = 600.0,
    seed: int = 0,
) -> np.ndarray:
    """A plane-wise step from ``levels[0]`` (low x) to ``levels[1]`` across a logistic edge of
    ``edge_um`` scale whose middle is voxel ``edge_x``, Gaussian cells (σ a quarter of the
    diameter) of ``amplitude`` at ``cells_um``, and Gaussian noise of SD ``noise`` scaled by the
    square root of the local level over ``levels[0]``. Voxels of `VOXEL_UM`."""
    rng = np.random.default_rng(seed)
    high, low = levels
    x_um = np.arange(shape[2]) * VOXEL_UM[2]
    level = low + (high - low) / (1 + np.exp((x_um - edge_x * VOXEL_UM[2]) / edge_um))
    image = np.broadcast_to(level, shape).astype(np.float32).copy()
    grid = np.indices(shape, dtype=np.float32) * np.reshape(VOXEL_UM, (3, 1, 1, 1))
    for c in cells_um:
        r2 = sum((grid[a] - c[a]) ** 2 for a in range(3))
        image += amplitude * np.exp(-r2 / (2 * (diameter_um / 4) ** 2))
    image += rng.normal(0, noise, shape).astype(np.float32) * np.sqrt(level / high)
    return image


def edge_volume(diameter_um: float, edge_um: float, noise: float, seed: int = 0):
    """The benchmark's volume (tissue at 1000, outside at 100) and its cells' centres (µm)."""
    centres = cells_beside_edge(EDGE_X)
    image = step_volume(
        SHAPE,
        edge_x=EDGE_X,
        edge_um=edge_um,
        cells_um=centres,
        diameter_um=diameter_um,
        noise=noise,
        seed=seed,
    )
    return image, np.array(centres)


def run(diameter_um: float, edge_um: float, noise: float) -> pd.DataFrame:
    image, truth = edge_volume(diameter_um, edge_um, noise)
    res = segment_volume(
        da.from_array(image, chunks=(24, 48, 64)),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(nucleus_diameter_um=diameter_um),
    )
    found = res.table[["z_um", "y_um", "x_um"]].to_numpy()
    rows = []
    for c in truth:
        d = np.linalg.norm(found - c, axis=1) if len(found) else np.array([np.inf])
        j = int(np.argmin(d))
        hit = d[j] < diameter_um / 2
        rows.append(
            {
                "edge_um": edge_um,
                "noise": noise,
                "inside_um": round(EDGE_X * VOXEL_UM[2] - c[2], 2),
                "found": bool(hit),
                "outward_um": round(float(found[j, 2] - c[2]), 3) if hit else np.nan,
                "distance_um": round(float(d[j]), 3) if hit else np.nan,
                "cells_found": len(found),
            }
        )
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diameter-um", type=float, default=12.0)
    p.add_argument("--edge-um", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--noise", type=float, nargs="+", default=[30.0, 60.0])
    p.add_argument("--results", type=Path, default=None, help="write edge_centroid.csv here")
    args = p.parse_args(argv)
    table = pd.concat(
        [run(args.diameter_um, e, n) for e in args.edge_um for n in args.noise], ignore_index=True
    )
    print(table.to_string(index=False))
    summary = table.groupby(["edge_um", "noise"]).agg(
        found=("found", "sum"), cells=("found", "size"), mean_outward_um=("outward_um", "mean")
    )
    print(summary.round(3).to_string())
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.results / "edge_centroid.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
