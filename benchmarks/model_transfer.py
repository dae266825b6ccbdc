"""The bundled model away from its training data: another stain and voxel size, a phantom.

Two checks of ``segment.method: model`` with the bundled model (trained on delivr-cfos at
6 × 1.62 × 1.62 µm), both through voxel-size transfer:

* ``cellfinder``: the cellfinder-crop (2 × 2 × 5 µm voxels, somata 12–18 µm, signal
  channel 0), read with `lightsheet.ingest.discover` + `lightsheet.stitch.stitch`, segmented
  with `lightsheet.segment.segment_volume(..., model=...)`; recall of its 56 reference cells
  (CellCounter type 2) matched one to one within 10 µm.
* ``sample``: the whole pipeline (Prefect flow) on a generated sample with
  ``segment.method: model``; every leaf region with at least 100 true cells against its
  true density.

    python benchmarks/model_transfer.py cellfinder --data ../shared/data/cellfinder-crop
    python benchmarks/model_transfer.py sample --sample /tmp/sample-small --workdir /tmp/mt

Results go to ``--results`` (``model_transfer_<check>.csv``) and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

CELLFINDER_UM = (5.0, 2.0, 2.0)
CELLFINDER_PATTERN = r"ch(?P<c>\d+)/ch\d(?P<z>\d+)\.tif$"


def cellfinder(args: argparse.Namespace) -> dict:
    import dask

    from lightsheet.config import SegmentConfig
    from lightsheet.evaluate import match_points, read_points, to_um
    from lightsheet.featurize import load_model
    from lightsheet.ingest import discover
    from lightsheet.segment import segment_volume
    from lightsheet.stitch import stitch

    manifest = discover(str(args.data / "ch*" / "*.tif"), CELLFINDER_PATTERN)
    volume = stitch(manifest, voxel_size_um=CELLFINDER_UM)[0, 0]
    model = load_model(args.model)
    # the somata are 12-18 µm across (the data's README): the size filter's diameter
    config = SegmentConfig(method="model", nucleus_diameter_um=15.0)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        res = segment_volume(
            volume,
            voxel_size_um=CELLFINDER_UM,
            config=config,
            model=model,
            chunks=(15, 256, 256),
        )
    seconds = time.perf_counter() - t0
    truth = to_um(read_points(args.data / "cell_classification.xml", cell_type=2), CELLFINDER_UM)
    found = res.table[["z_um", "y_um", "x_um"]].to_numpy()
    m = match_points(found, truth, max_distance_um=10.0)
    row = {
        "check": "cellfinder-crop",
        "model_sha256": model.checkpoint_sha256,
        "reference_cells": len(truth),
        "found": len(found),
        "matched_within_10um": m.tp,
        "recall": m.tp / len(truth),
        "threshold": res.threshold,
        "seconds": round(seconds, 1),
    }
    pd.DataFrame([row]).to_csv(args.results / "model_transfer_cellfinder.csv", index=False)
    if args.found:
        res.table.to_csv(args.found, index=False)
    return row


def sample(args: argparse.Namespace) -> dict:
    from lightsheet.cli import _prefect_defaults
    from lightsheet.config import load_config

    _prefect_defaults()
    from flows.pipeline import pipeline

    config = load_config(args.sample / "config.yaml")
    segment = config.segment.model_copy(update={"method": "model"})
    featurize = config.featurize.model_copy(update={"model": args.model})
    out = args.workdir / "output"
    config = config.model_copy(update={"output": out, "segment": segment, "featurize": featurize})
    t0 = time.perf_counter()
    pipeline(config)
    seconds = time.perf_counter() - t0
    found = pd.read_csv(out / "density.csv").set_index("structure_id")
    truth = pd.read_csv(args.sample / "truth" / "density.csv").set_index("structure_id")
    parents = set(truth["parent_structure_id"].dropna().astype(int))
    leaves = truth[~truth.index.isin(parents) & (truth.index > 0) & (truth["total_cells"] >= 100)]
    d = "total_cells_per_mm3"
    errors = (found.loc[leaves.index, d] - leaves[d]) / leaves[d]
    table = pd.DataFrame(
        {
            "acronym": leaves["acronym"],
            "true_cells": leaves["total_cells"],
            "found_cells": found.loc[leaves.index, "total_cells"],
            "true_per_mm3": leaves[d],
            "found_per_mm3": found.loc[leaves.index, d],
            "error": errors,
        }
    )
    table.to_csv(args.results / "model_transfer_sample.csv")
    print(table.round(3).to_string())
    return {
        "check": f"sample {args.sample.name}",
        "leaves": len(leaves),
        "max_abs_error": float(errors.abs().max()),
        "true_cells": int(truth.loc[truth.index > 0, "total_cells"].sum()),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    c = sub.add_parser("cellfinder")
    c.add_argument("--data", type=Path, required=True, help="the cellfinder-crop folder")
    c.add_argument("--found", type=Path, default=None, help="also write the cells found (CSV)")
    s = sub.add_parser("sample")
    s.add_argument("--sample", type=Path, required=True, help="a `lightsheet sample` folder")
    s.add_argument("--workdir", type=Path, required=True)
    for q in (c, s):
        q.add_argument("--model", default=None, help="checkpoint (default: the bundled one)")
        q.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    row = cellfinder(args) if args.check == "cellfinder" else sample(args)
    row["cores"] = os.cpu_count()
    print(json.dumps(row, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))


if __name__ == "__main__":
    main()
