"""The sample's bead stack measured as a user measures theirs: how close to the tiles' PSF?

`lightsheet sample` writes ``beads.tif`` beside ``psf.tif`` (`lightsheet.sample.beads`).
For light sheets of 3, 7 and 20 µm and pixels of 0.5, 1 and 2 µm (planes twice as deep),
three seeds each, this writes the stack, distils it (`lightsheet.beads.distil_psf`, what
``lightsheet psf --beads`` runs), reads the result at the image's voxel size
(`lightsheet.psf.load_psf`: resampled from the stack's finer z step) and compares its
second-moment SDs with those of the PSF the tiles are blurred with
(`lightsheet.psf.psf_from_optics` at the image's voxel size, ``psf.tif``).

    python -m benchmarks.sample_beads --results benchmarks/results     # a minute

Writes ``sample_beads.csv`` under ``--results``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import tifffile

from lightsheet.beads import distil_psf
from lightsheet.psf import load_psf, psf_from_optics, psf_sigma_um, write_psf
from lightsheet.sample import OPTICS
from lightsheet.sample.beads import write_bead_stack

SHEETS_UM = (3.0, 7.0, 20.0)
VOXELS_UM = ((1.0, 0.5, 0.5), (2.0, 1.0, 1.0), (4.0, 2.0, 2.0))


def case(folder: Path, sheet_um: float, voxel_um, seed: int) -> dict:
    """One stack written, distilled and compared with the tiles' PSF."""
    optics = {**OPTICS, "sheet_fwhm_um": sheet_um}
    info = write_bead_stack(folder / "beads.tif", optics, voxel_um, seed=seed)
    result = distil_psf(tifffile.imread(folder / "beads.tif"))
    path = write_psf(folder / "measured.tif", result.psf, info["voxel_size_um"])
    measured = psf_sigma_um(load_psf(path, voxel_um), voxel_um)
    tiles = psf_sigma_um(psf_from_optics(voxel_size_um=voxel_um, **optics), voxel_um)
    reasons = result.beads["reason"]
    row = {
        "sheet_fwhm_um": sheet_um,
        "voxel_um": "x".join(f"{v:g}" for v in voxel_um),
        "seed": seed,
        "bead_step_um": info["voxel_size_um"][0],
        "planted": info["n_beads"],
        "clumps_planted": info["n_clumps"],
        "found": len(reasons),
        "used": int(result.beads["used"].sum()),
        "left_out_as_clumps": int((reasons == "clump").sum()),
        "left_out_otherwise": int(((reasons != "clump") & (reasons != "")).sum()),
    }
    for axis, m, t in zip("zyx", measured, tiles, strict=True):
        row[f"sigma_{axis}_um"] = round(m, 3)
        row[f"tiles_sigma_{axis}_um"] = round(t, 3)
        row[f"error_{axis}_pct"] = round(100 * (m / t - 1), 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="write sample_beads.csv here")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            case(Path(folder), sheet, vox, seed)
            for sheet in SHEETS_UM
            for vox in VOXELS_UM
            for seed in range(args.seeds)
        ]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    errors = table[[f"error_{a}_pct" for a in "zyx"]].abs()
    print("largest |error| % per voxel size:")
    print(errors.groupby(table["voxel_um"]).max().to_string())
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.results / "sample_beads.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
