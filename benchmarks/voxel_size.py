"""The segment defaults at other voxel sizes and sheets: real data binned, generated truth.

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

With ``--sample voxels`` it measures the same on generated truth instead: the realistic
sample (``lightsheet sample --realistic --voxel-size-um Z Y X``, the brain and its cells the
same size in µm, each camera pixel collecting its area's light) imaged at each voxel size of
`SAMPLE_VOXELS`, both cell modes, the whole pipeline with the sample's config
(`benchmarks.realistic_sample.run_mode`), scored against the truth. ``--sample sheets``
images it through the light sheets of `SAMPLE_SHEETS` instead (``--sheet-fwhm-um F``: the
axial blur of another microscope), deconvolved with that PSF or not deconvolved at all:

    python -m benchmarks.voxel_size --sample voxels --work /tmp/vs --results benchmarks/results
    python -m benchmarks.voxel_size --sample sheets --work /tmp/vs --results benchmarks/results

Writes ``voxel_size_sample.csv`` or ``sheet_sample.csv`` (one row a cell mode and imaging)
and the matching ``_leaves.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dask
import numpy as np
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
#: Voxel sizes (z, y, x) µm of the generated sample: the default, finer, coarser, the two
#: real data sets', and planes 10 µm apart.
SAMPLE_VOXELS = (
    (2.0, 1.0, 1.0),
    (3.0, 0.75, 0.75),
    (4.0, 2.0, 2.0),
    (5.0, 2.0, 2.0),
    (6.0, 1.62, 1.62),
    (10.0, 2.0, 2.0),
)
#: Light sheets (FWHM µm) of the sample at its default voxel size, and whether the run
#: deconvolves: thinner and thicker than the default 7 µm, and 7 µm without a PSF.
SAMPLE_SHEETS = (
    (3.0, True),
    (7.0, False),
    (15.0, True),
    (15.0, False),
    (25.0, True),
    (25.0, False),
)


def _sampling(voxel_um, z_step: int, bin_yx: int, result: dict) -> dict:
    """The coarser voxel size, and the configured diameter in its pixels."""
    voxel = coarser_voxel(voxel_um, z_step, bin_yx)[0]
    across = result["config"]["nucleus_diameter_um"] / voxel[1]
    return {"voxel_size_um": voxel, "diameter_voxels_yx": round(across, 2)}


def sample_rows(work: Path, size: str, seed: int, part: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The realistic sample imaged each way of ``part`` (``voxels``: `SAMPLE_VOXELS`,
    ``sheets``: `SAMPLE_SHEETS`), both cell modes: scores and leaves."""
    from benchmarks.realistic_sample import run_mode

    if part == "voxels":
        ways = [({"voxel_size_um": v}, True) for v in SAMPLE_VOXELS]
    else:
        ways = [({"sheet_fwhm_um": f}, on) for f, on in SAMPLE_SHEETS]
    rows, leaves = [], []
    for imaging, deconvolve in ways:
        for cells in ("somata", "nuclei"):
            name = "-".join(f"{v:g}" for v in np.ravel(list(imaging.values()))) + f"-{deconvolve}"
            summary, table = run_mode(
                work / name, size, cells, seed, deconvolve=deconvolve, **imaging
            )
            d = summary["segment"]["nucleus_diameter_um"]
            voxel = summary["voxel_size_um"]
            worst = table.loc[table["error"].abs().idxmax()]
            rows.append(
                {
                    "cells": cells,
                    "voxel_size_um": " x ".join(f"{v:g}" for v in voxel),
                    "sheet_fwhm_um": summary["sheet_fwhm_um"],
                    "deconvolve": deconvolve,
                    "diameter_voxels_yx": round(d / voxel[1], 2),
                    **{k: summary[k] for k in ("true_cells", "found_cells", "tp", "fp", "fn")},
                    **{k: round(summary[k], 4) for k in ("precision", "recall", "f1")},
                    "leaves_within_10pct": summary["leaves_within_10pct"],
                    "leaves": summary["leaves"],
                    "worst_leaf": f"{worst['acronym']} {worst['error']:+.1%}",
                    "pipeline_s": summary["pipeline_s"],
                }
            )
            print(rows[-1], flush=True)
            leaves.append(
                table.assign(**{k: rows[-1][k] for k in ("voxel_size_um", "sheet_fwhm_um")}).assign(
                    deconvolve=deconvolve
                )
            )
    return pd.DataFrame(rows), pd.concat(leaves)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the data sets")
    parser.add_argument("--results", type=Path, help="write the CSV files here")
    parser.add_argument(
        "--sample",
        choices=("voxels", "sheets"),
        help="the generated sample at other voxel sizes or sheets instead of the real data",
    )
    parser.add_argument("--work", type=Path, help="with --sample: folder for samples and runs")
    parser.add_argument("--size", default="small", help="with --sample: its size (small)")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: its seed")
    args = parser.parse_args(argv)
    if args.sample:
        if args.work is None:
            parser.error("--sample needs --work")
        table, leaves = sample_rows(args.work, args.size, args.seed, args.sample)
        print(table.to_string(index=False))
        if args.results:
            stem = {"voxels": "voxel_size_sample", "sheets": "sheet_sample"}[args.sample]
            args.results.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.results / f"{stem}.csv", index=False)
            leaves.to_csv(args.results / f"{stem}_leaves.csv", index=False)
        return 0
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
