"""The same tissue in another field of view: what the default detection should not notice.

A detector that follows the local background should find the same cells, at the same
places, whichever way the stage or the camera framed the tissue. This runs the default
``local`` method (``nucleus_diameter_um: 14``, ``background_channel: 1``) on the real crop
in ``tests/data/cellfinder-crop`` (ten planes, 5 × 2 × 2 µm) and on the same voxels
transformed, maps the detections back to the crop's frame, and counts:

* ``moved_1um`` / ``moved_3um``: detections of the crop with no transformed one within 1 /
  3 µm;
* ``moved_lateral_3um``: of those, the ones without a transformed detection within 3 µm in
  y and x (at any z): a cell gained or lost, not a centre moved along z;
* ``reference_found``: the 56 reference cells with a detection within 10 µm.

Transforms: planes in reverse order; all intensities × 3; the image and its rows mirrored
in y; shifted by one row, and by three columns; padded with 63 voxels of 0 (the dark
outside of a larger field, a whole number of the method's 7-voxel bins) and with 3 voxels
(not a whole number); 100 added to every voxel (a camera's offset), stated as
``camera_offset`` and not. The crop is first cut to 504 × 665 voxels (whole bins) so that the
mirror keeps the bin grid.

    python -m benchmarks.invariance --results benchmarks/results     # about a minute

Writes ``invariance.csv`` under ``--results``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from benchmarks.real_data import CELLFINDER_VOXEL_UM

CROP = Path(__file__).resolve().parents[1] / "tests" / "data" / "cellfinder-crop"
VOXEL_UM = np.array(CELLFINDER_VOXEL_UM)
PATTERN = r"ch(?P<c>\d+)/ch\d(?P<plane>\d+)\.tif$"


def _crop() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signal, autofluorescence (cut to whole bins) and the reference cells in µm."""
    from lightsheet.ingest import discover
    from lightsheet.stitch import stitch

    manifest = discover(str(CROP / "ch*" / "*.tif"), PATTERN)
    volume = stitch(manifest, voxel_size_um=tuple(VOXEL_UM))[0].compute()
    reference = pd.read_csv(CROP / "cells.csv")[["z", "y", "x"]].to_numpy(float) * VOXEL_UM
    return volume[0][:, :504, :665], volume[1][:, :504, :665], reference


def _cells(signal: np.ndarray, background: np.ndarray, camera_offset: float) -> np.ndarray:
    from lightsheet.config import SegmentConfig
    from lightsheet.segment import segment_volume

    config = SegmentConfig(nucleus_diameter_um=14, background_channel=1)
    result = segment_volume(
        da.from_array(signal, chunks=(10, 256, 256)),
        voxel_size_um=tuple(VOXEL_UM),
        config=config,
        background=da.from_array(background, chunks=(10, 256, 256)),
        camera_offset=camera_offset,
    )
    return result.table[["z_um", "y_um", "x_um"]].to_numpy()


def transforms(shape) -> dict:
    """name → (transform of a volume, detections in µm back to the crop's frame, the
    ``camera_offset`` the transformed volume is segmented with)."""
    nz, ny, _ = shape
    top = (nz - 1) * VOXEL_UM[0]
    bottom = (ny - 1) * VOXEL_UM[1]

    def pad(k):
        return (
            lambda v: np.pad(v, ((0, 0), (k, k), (k, k))),
            lambda p: p - [0.0, k * VOXEL_UM[1], k * VOXEL_UM[2]],
            0.0,
        )

    def same(p):
        return p

    def lifted(v):
        return v + np.uint16(100)

    return {
        "planes reversed": (lambda v: v[::-1], lambda p: np.c_[top - p[:, 0], p[:, 1:]], 0.0),
        "intensities x 3": (lambda v: v * np.uint16(3), same, 0.0),
        "mirrored in y": (
            lambda v: v[:, ::-1],
            lambda p: np.c_[p[:, 0], bottom - p[:, 1], p[:, 2]],
            0.0,
        ),
        "shifted 1 row": (lambda v: v[:, 1:], lambda p: p + [0.0, VOXEL_UM[1], 0.0], 0.0),
        "shifted 3 columns": (
            lambda v: v[:, :, 3:],
            lambda p: p + [0.0, 0.0, 3 * VOXEL_UM[2]],
            0.0,
        ),
        "dark margin of 63 (whole bins)": pad(63),
        "dark margin of 3": pad(3),
        "camera offset 100, not stated": (lifted, same, 0.0),
        "camera offset 100, given": (lifted, same, 100.0),
    }


def compare(base: np.ndarray, found: np.ndarray, reference: np.ndarray) -> dict:
    """How many of ``base``'s detections ``found`` lacks, and the reference cells found."""
    from lightsheet.evaluate import match_points

    nearest = cKDTree(found).query(base)[0]
    lateral = cKDTree(found[:, 1:]).query(base[:, 1:])[0]
    return {
        "objects": len(found),
        "moved_1um": int((nearest > 1).sum()),
        "moved_3um": int((nearest > 3).sum()),
        "moved_lateral_3um": int((lateral > 3).sum()),
        "reference_found": match_points(found, reference, max_distance_um=10.0).tp,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="write invariance.csv here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # the warnings of the stages are not what is measured
    signal, background, reference = _crop()
    base = _cells(signal, background, 0.0)
    rows = [{"transform": "none", **compare(base, base, reference)}]
    for name, (forward, back, offset) in transforms(signal.shape).items():
        found = back(_cells(forward(signal), forward(background), offset))
        rows.append({"transform": name, **compare(base, found, reference)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.results / "invariance.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
