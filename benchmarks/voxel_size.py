"""The segment defaults at other voxel sizes: the real data as coarser cameras record them.

Every scale of the ``local`` method derives from ``nucleus_diameter_um`` and the voxel size,
so one tissue imaged with coarser pixels should give about the same cells. This runs
`benchmarks.real_data` on the same real data recorded coarser (`benchmarks.real_data.coarser`:
``k × k`` camera pixels binned in y and x, or every second plane), every value default:

* ``cellfinder-crop`` (5 × 2 × 2 µm; ``nucleus_diameter_um: 14``, ``background_channel: 1``):
  objects, and the 56 reference cells with a detection within 10 µm, at pixels of 2–10 µm
  and at 10 µm plane spacing;
* ``delivr-cfos`` (6 × 1.62 × 1.62 µm; ``nucleus_diameter_um: 11``): precision, recall and
  F1 over all 27 patches at pixels of 1.62–4.86 µm.

    python -m benchmarks.voxel_size --results benchmarks/results     # about 3 minutes

Writes ``voxel_size.csv`` under ``--results``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask
import pandas as pd

from benchmarks.real_data import (
    CELLFINDER_VOXEL_UM,
    DATA,
    DELIVR_VOXEL_UM,
    cellfinder,
    coarser_voxel,
    delivr,
)

#: (z step, y/x bin) of the crop, and y/x bins of the DELiVR patches.
CROP = ((1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1))
DELIVR = (1, 2, 3)


def _sampling(voxel_um, z_step: int, bin_yx: int, result: dict) -> dict:
    """The coarser voxel size, and the configured diameter in its pixels."""
    voxel = coarser_voxel(voxel_um, z_step, bin_yx)[0]
    across = result["config"]["nucleus_diameter_um"] / voxel[1]
    return {"voxel_size_um": voxel, "diameter_voxels_yx": round(across, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the data sets")
    parser.add_argument("--results", type=Path, help="write voxel_size.csv here")
    args = parser.parse_args(argv)
    dask.config.set(scheduler="threads")
    rows = []
    for z_step, k in CROP:
        r = cellfinder(args.data / "cellfinder-crop", {}, z_step=z_step, bin_yx=k)
        rows.append(
            {
                "data": "cellfinder-crop",
                **_sampling(CELLFINDER_VOXEL_UM, z_step, k, r),
                "objects": r["cells"],
                "reference_found": r["reference_found"],
            }
        )
        print(rows[-1], flush=True)
    for k in DELIVR:
        summary, _ = delivr(args.data / "delivr-cfos", {}, bin_yx=k)
        rows.append(
            {
                "data": "delivr-cfos",
                **_sampling(DELIVR_VOXEL_UM, 1, k, summary),
                "objects": summary["found"],
                **{m: round(summary[m], 4) for m in ("precision", "recall", "f1")},
            }
        )
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows).astype({"reference_found": "Int64"})
    table["voxel_size_um"] = [" x ".join(f"{v:g}" for v in t) for t in table["voxel_size_um"]]
    print(table.to_string(index=False))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.results / "voxel_size.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
