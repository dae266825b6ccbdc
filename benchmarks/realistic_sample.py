"""The default detection on the realistic sample, in both cell modes (issue #20).

For each cell mode, writes ``lightsheet sample --realistic --cells MODE`` and runs the whole
pipeline on it with its config (``segment.background_channel: 1``, every other segment
value default, deconvolution on), then scores:

* detection: the pipeline's ``cells.csv`` against ``truth/cells.csv``, one to one within
  half of each true cell's diameter: precision, recall, F1;
* density: per leaf region, ``(found − true) / true`` cells per mm³ from ``density.csv``
  against ``truth/density.csv``, and where each leaf's error comes from (`leaf_budget`):
  cells missed or falsely found (detection), and found cells whose centre lies in another
  region than their true cell's (placement).

    python -m benchmarks.realistic_sample --work /tmp/realistic --results benchmarks/results
    python -m benchmarks.realistic_sample --cells somata --size tiny --work /tmp/r
    python -m benchmarks.realistic_sample --work /tmp/r --overlap 0.15 --stage-error-um 2 8 8 \
        --name realistic_sample_mosaic --results benchmarks/results

With ``--overlap`` the sample is a mosaic of overlapping tiles at imprecise stage positions,
each lit by its own light sheet (`lightsheet.sample.overlap`); its config registers and
fuses them, so the figures include the stitching and its seams.

Writes ``NAME.json`` and ``NAME_leaves.csv`` under ``--results`` (``--name``, default
``realistic_sample``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd


def score(sample: Path, output: Path) -> tuple[dict, pd.DataFrame]:
    """Detection and per-leaf density figures of one run against its sample's truth."""
    from lightsheet.evaluate import match_points

    truth = pd.read_csv(sample / "truth" / "cells.csv")
    truth = truth[truth["t"] == 0]
    found = pd.read_csv(output / "cells.csv")
    if "t" in found:
        found = found[found["t"] == 0]
    axes = ["z_um", "y_um", "x_um"]
    s = match_points(
        found[axes].to_numpy(),
        truth[axes].to_numpy(),
        max_distance_um=truth["diameter_um"].to_numpy() / 2,
    )
    true_d = pd.read_csv(sample / "truth" / "density.csv").set_index("structure_id")
    got_d = pd.read_csv(output / "density.csv").set_index("structure_id")
    parents = set(true_d["parent_structure_id"].dropna().astype(int))
    leaves = true_d[(true_d.index > 0) & ~true_d.index.isin(parents) & (true_d["total_cells"] > 0)]
    col = "total_cells_per_mm3"
    rows = pd.DataFrame(
        {
            "acronym": leaves["acronym"],
            "true_cells": leaves["total_cells"],
            "found_cells": got_d["total_cells"].reindex(leaves.index).fillna(0).astype(int),
            "true_cells_per_mm3": leaves[col].round(0),
            "found_cells_per_mm3": got_d[col].reindex(leaves.index).round(0),
        }
    )
    rows["error"] = (rows["found_cells_per_mm3"] / rows["true_cells_per_mm3"] - 1).round(4)
    rows = rows.join(leaf_budget(found, truth, s.pairs, leaves.index))
    # each matched cell's true centre and its detection's offset from it (µm)
    matched = truth[axes].to_numpy()[s.pairs[:, 1]]
    offsets = found[axes].to_numpy()[s.pairs[:, 0]] - matched
    rows["expected_placement_error"] = expected_placement(sample, output, truth, offsets, rows)
    summary = {
        "radial_offset_um_by_shell": edge_bias(sample, matched, offsets),
        "true_cells": len(truth),
        "found_cells": len(found),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in s.as_dict().items()},
        "leaves": len(rows),
        "leaves_within_10pct": int((rows["error"].abs() <= 0.10).sum()),
        "max_abs_leaf_error": round(float(rows["error"].abs().max()), 4),
    }
    return summary, rows.reset_index()


def leaf_budget(found: pd.DataFrame, truth: pd.DataFrame, pairs, leaves: pd.Index) -> pd.DataFrame:
    """Where each leaf's count error comes from, in cells: ``found − true = false − missed +
    moved_in − moved_out``.

    ``missed`` and ``false`` are the leaf's true cells without a match and its detections
    without one (detection); ``moved_in`` and ``moved_out`` are matched cells whose found centre
    lies in another region than the true one, into and out of the leaf (placement: a centre a
    fraction of a µm off crosses an atlas voxel's face). ``detection_error`` and
    ``placement_error`` are the two sums over the true count; they add up to ``error`` where
    the found and true densities divide by the same volume (no registration).
    """
    import numpy as np

    found_sid = found["structure_id"].to_numpy()
    true_sid = truth["structure_id"].to_numpy()
    f, t = pairs[:, 0], pairs[:, 1]
    moved = found_sid[f] != true_sid[t]

    def per_leaf(ids) -> pd.Series:
        return pd.Series(ids, dtype="int64").value_counts().reindex(leaves, fill_value=0)

    budget = pd.DataFrame(
        {
            "missed": per_leaf(np.delete(true_sid, t)),
            "false": per_leaf(np.delete(found_sid, f)),
            "moved_in": per_leaf(found_sid[f][moved]),
            "moved_out": per_leaf(true_sid[t][moved]),
        }
    )
    true_n = truth["structure_id"].value_counts().reindex(leaves, fill_value=0)
    for name, plus, minus in (
        ("detection", "false", "missed"),
        ("placement", "moved_in", "moved_out"),
    ):
        budget[f"{name}_error"] = ((budget[plus] - budget[minus]) / true_n).round(4)
    return budget


def expected_placement(
    sample: Path, output: Path, truth: pd.DataFrame, offsets, rows: pd.DataFrame, draws: int = 200
) -> pd.Series:
    """Mean placement error per leaf of a detector that finds every true cell, its centre off
    by one of this run's matched offsets drawn at random (``draws`` times, seed 0).

    What the run's localisation alone costs each leaf on average, bias and scatter together:
    a thin leaf beside a denser one gains cells from any scatter. NaN for a registered run
    (its atlas mapping is the registration's, not the config's).
    """
    import numpy as np

    from lightsheet.config import load_config
    from lightsheet.density import AtlasTransform, lookup_points
    from lightsheet.io.atlas import load_atlas
    from lightsheet.io.omezarr import read_image

    config = load_config(sample / "config.yaml")
    if config.register.enabled:
        return pd.Series(np.nan, index=rows.index)
    atlas = load_atlas(config.atlas)
    transform = AtlasTransform.from_config(
        config.density,
        atlas,
        image_shape=read_image(output / "raw.ome.zarr")[0].shape[2:],
        voxel_size_um=config.voxel_size_um,
    )
    true = truth[["z_um", "y_um", "x_um"]].to_numpy()
    rng = np.random.default_rng(0)
    counts = pd.Series(0, index=rows.index)
    for _ in range(draws):
        moved = true + offsets[rng.integers(len(offsets), size=len(true))]
        sid = lookup_points(atlas, transform.to_atlas_voxel(moved))[0]
        counts += pd.Series(sid).value_counts().reindex(rows.index, fill_value=0)
    return (counts / draws / rows["true_cells"] - 1).round(4)


def edge_bias(sample: Path, true, offset) -> dict:
    """Mean offset (µm) of matched centroids along the brain's outward normal, per shell of
    the normalised brain radius: how far detection moves cells towards the tissue edge.

    ``true``: the matched cells' true centres, ``offset``: their detections' offsets (µm).
    """
    import numpy as np

    from lightsheet.sample import BrainGeometry

    info = json.loads((sample / "sample.json").read_text())
    geometry = BrainGeometry.for_volume(info["shape"][2:], info["voxel_size_um"])
    a, s, r = geometry.normalised(*true.T)
    squash = np.where(s > 0, 0.85, 1.0)  # the flatter ventral side (BrainGeometry)
    rho = np.sqrt(a**2 + (s / squash) ** 2 + r**2)
    # gradient of rho: the outward normal of the shell through each cell
    normal = np.stack([a, s / squash**2, r], axis=1) / np.asarray(geometry.semi_um)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    radial = (offset * normal).sum(axis=1)
    shells = ((0.0, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 1.01))
    return {
        f"{lo}-{hi}": round(float(radial[(rho >= lo) & (rho < hi)].mean()), 3)
        for lo, hi in shells
        if ((rho >= lo) & (rho < hi)).any()
    }


def run_mode(
    work: Path,
    size: str,
    cells: str,
    seed: int,
    mosaic: dict | None = None,
    *,
    deconvolve: bool = True,
    **imaging,
) -> tuple[dict, pd.DataFrame]:
    """Generate, run and score one cell mode; seconds of each step included.

    ``mosaic``: ``overlap`` and ``stage_error_um`` of an overlapping-tile sample (else one
    field of view cut into tiles that abut). ``imaging``: `lightsheet.sample.generate`'s
    ``voxel_size_um`` and ``sheet_fwhm_um`` (else the default's). ``deconvolve=False`` runs
    without deconvolution, as where no PSF is known.
    """
    from lightsheet.cli import run_config
    from lightsheet.config import load_config
    from lightsheet.sample import generate
    from lightsheet.sample.overlap import generate_overlapping

    sample = work / f"realistic-{size}-{cells}"
    if sample.exists():
        shutil.rmtree(sample)
    start = time.perf_counter()
    if mosaic:
        info = generate_overlapping(
            sample, size=size, seed=seed, realistic=True, cells=cells, **mosaic
        )
    else:
        info = generate(sample, size=size, seed=seed, realistic=True, cells=cells, **imaging)
    generated = time.perf_counter() - start
    config = load_config(sample / "config.yaml")
    if not deconvolve:
        off = config.deconvolve.model_copy(update={"enabled": False})
        config = config.model_copy(update={"deconvolve": off})
    start = time.perf_counter()
    run_config(config)
    ran = time.perf_counter() - start
    summary, leaves = score(sample, sample / "output")
    summary = {
        "cells": cells,
        "size": size,
        "seed": seed,
        **({"mosaic": mosaic} if mosaic else {}),
        "voxel_size_um": list(config.voxel_size_um),
        "sheet_fwhm_um": info["psf"]["sheet_fwhm_um"],
        "deconvolve": config.deconvolve.enabled,
        "segment": config.segment.model_dump(mode="json", exclude_defaults=True),
        **summary,
        "generate_s": round(generated, 1),
        "pipeline_s": round(ran, 1),
    }
    leaves.insert(0, "cells", cells)
    return summary, leaves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for samples and runs")
    parser.add_argument("--size", default="small", help="sample size (default small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", nargs="+", default=["nuclei", "somata"])
    parser.add_argument("--results", type=Path, help="write the JSON and the CSV here")
    parser.add_argument(
        "--overlap", type=float, help="a mosaic: tiles overlap by this fraction of a side"
    )
    parser.add_argument(
        "--stage-error-um", type=float, nargs="+", default=[0.0], help="with --overlap"
    )
    parser.add_argument("--name", default="realistic_sample", help="result files' stem")
    parser.add_argument(
        "--score-only", action="store_true", help="score the runs already in --work again"
    )
    args = parser.parse_args(argv)
    mosaic = None
    if args.overlap is not None:
        mosaic = {"overlap": args.overlap, "stage_error_um": args.stage_error_um}
    summaries, tables = [], []
    for cells in args.cells:
        if args.score_only:
            sample = args.work / f"realistic-{args.size}-{cells}"
            summary, leaves = score(sample, sample / "output")
            summary = {"cells": cells, "size": args.size, **summary}
            leaves.insert(0, "cells", cells)
        else:
            summary, leaves = run_mode(args.work, args.size, cells, args.seed, mosaic)
        print(json.dumps(summary))
        print(leaves.to_string(index=False))
        summaries.append(summary)
        tables.append(leaves)
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.name}.json").write_text(json.dumps(summaries, indent=1) + "\n")
        pd.concat(tables).to_csv(args.results / f"{args.name}_leaves.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
