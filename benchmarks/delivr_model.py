"""Five-fold cross-validation of ``segment.method: model`` on the delivr-cfos patches.

The 27 annotated patches are dealt into five folds by annotated cell count (sorted, then
round-robin, so every fold holds dense and sparse patches). For each fold, a model is
trained with `lightsheet.train.train` on the patches of the other four folds (which hold
some of those patches out themselves to choose the probability threshold: the test fold is
never seen, not even for the threshold), and the test patches are segmented with the
pipeline's own model path (`lightsheet.segment.segment_volume(..., model=...)`, i.e.
featurize's blockwise heads and `lightsheet.segment.model`), on blocks smaller than a patch.

Scoring, as the data's README asks: annotated cells are the mask's 26-connected components
of at least 4 voxels (``points/*.csv`` rows with ``n_voxels >= 4``); detections match them
one to one within 6 µm (`lightsheet.evaluate.match_points`); all patches are scored
together. Writes ``delivr_model_folds.csv``, ``delivr_model_patches.csv`` and the records of
the fold models into ``--results``.

    python benchmarks/delivr_model.py --data ../shared/data/delivr-cfos \\
        --config lightsheet/models/unet_default.train.yaml --workdir /tmp/delivr-cv \\
        --link train-data/sample-small-seed1

``--device cuda`` trains on a GPU with the same settings; ``--steps`` overrides the config's;
``--candidate-classifier`` fits the candidates' classifier on each fold's inner validation
patches (the training config's ``candidate_classifier``) and names the tables
``delivr_model_classifier_*.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

VOXEL_UM = (6.0, 1.62, 1.62)
MATCH_UM = 6.0
MIN_VOXELS = 4


def folds_by_count(points_dir: Path, k: int = 5) -> dict[str, int]:
    """Patch id → fold: sorted by annotated cells (≥ 4 voxels), dealt round-robin."""
    counts = {}
    for f in sorted(points_dir.glob("patch_*_points.csv")):
        pid = f.name[len("patch_") : -len("_points.csv")]
        counts[pid] = int((pd.read_csv(f)["n_voxels"] >= MIN_VOXELS).sum())
    order = sorted(counts, key=lambda p: (-counts[p], p))
    return {p: i % k for i, p in enumerate(order)}


def link_subset(data: Path, ids: list[str], into: Path) -> Path:
    """A folder of symlinks to the patches ``ids`` (images, masks) and the licence."""
    for sub, suffix in (("images", ".tif"), ("masks", "_mask.tif")):
        (into / sub).mkdir(parents=True, exist_ok=True)
        for pid in ids:
            link = into / sub / f"patch_{pid}{suffix}"
            if not link.exists():
                link.symlink_to((data / sub / f"patch_{pid}{suffix}").resolve())
    if not (into / "LICENSE").exists():
        (into / "LICENSE").symlink_to((data / "LICENSE").resolve())
    return into


def score_patches(model_path: Path, data: Path, ids: list[str], block: int) -> pd.DataFrame:
    """Segment each patch with the pipeline's model path; match to its annotation."""
    import dask
    import dask.array as da
    import tifffile

    from lightsheet.config import SegmentConfig
    from lightsheet.evaluate import match_points, to_um
    from lightsheet.featurize import load_model
    from lightsheet.segment import segment_volume

    model = load_model(model_path)
    config = SegmentConfig(method="model", nucleus_diameter_um=model.record["nucleus_diameter_um"])
    rows = []
    for pid in ids:
        image = tifffile.imread(data / "images" / f"patch_{pid}.tif")
        points = pd.read_csv(data / "points" / f"patch_{pid}_points.csv")
        truth = to_um(points.loc[points["n_voxels"] >= MIN_VOXELS, ["z", "y", "x"]], VOXEL_UM)
        with dask.config.set(scheduler="threads"):
            res = segment_volume(
                da.from_array(image, chunks=(block, block, block)),
                voxel_size_um=VOXEL_UM,
                config=config,
                model=model,
            )
        found = res.table[["z_um", "y_um", "x_um"]].to_numpy()
        m = match_points(found, truth, max_distance_um=MATCH_UM)
        rows.append({"patch": pid, "annotated": len(truth), "found": len(found), **m.as_dict()})
    return pd.DataFrame(rows)


def pooled(df: pd.DataFrame) -> dict:
    tp, fp, fn = (int(df[k].sum()) for k in ("tp", "fp", "fn"))
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / max(1, tp + fp),
        "recall": tp / max(1, tp + fn),
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
    }


def main() -> None:
    from lightsheet.train import load_train_config, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the delivr-cfos folder")
    p.add_argument("--config", type=Path, required=True, help="training config (YAML)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--folds", type=int, nargs="*", default=None, help="default: all five")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--candidate-classifier",
        action="store_true",
        help="fit the candidates' classifier too (training config candidate_classifier)",
    )
    p.add_argument("--block", type=int, default=48, help="block side when segmenting (voxels)")
    p.add_argument(
        "--link",
        type=Path,
        nargs="*",
        default=[],
        help="folders the config's other data sets name (linked beside delivr-cfos/ by name)",
    )
    args = p.parse_args()

    fold_of = folds_by_count(args.data / "points")
    todo = args.folds if args.folds is not None else range(5)
    base_config, _ = load_train_config(args.config)
    for k in todo:
        test = sorted(p for p, f in fold_of.items() if f == k)
        train_ids = sorted(p for p, f in fold_of.items() if f != k)
        # the config's paths start at a folder holding delivr-cfos/: give it the subset
        folder = args.workdir / f"fold{k}" / "data"
        link_subset(args.data, train_ids, folder / "delivr-cfos")
        for extra in args.link:  # other data sets the config names (e.g. a generated sample)
            if not (folder / extra.name).exists():
                (folder / extra.name).symlink_to(extra.resolve())
        update = {"validation": None}
        if args.steps is not None:
            update["steps"] = args.steps
        if args.device is not None:
            update["device"] = args.device
        if args.candidate_classifier:
            update["candidate_classifier"] = True
        config = base_config.model_validate({**base_config.model_dump(), **update})
        out = args.workdir / f"fold{k}" / "model.safetensors"
        if not out.is_file():
            train(config, out, base=folder, command=f"benchmarks/delivr_model.py fold {k}")
        record = json.loads(out.with_suffix(".json").read_text())
        df = score_patches(out, args.data, test, args.block).assign(fold=k)
        df.to_csv(args.workdir / f"fold{k}" / "patches.csv", index=False)
        row = {
            "fold": k,
            "test_patches": " ".join(test),
            **pooled(df),
            "threshold": record["detection"]["threshold"],
            "inner_validation_patches": " ".join(
                v.split("/")[-1].removeprefix("patch_") for v in record["validation"]["volumes"]
            ),
            "inner_validation_f1": record["validation"]["f1"],
            "train_seconds": record["duration_s"],
            "device": record["training"]["device"],
        }
        (args.workdir / f"fold{k}" / "fold.json").write_text(json.dumps(row))
        print(json.dumps(row), flush=True)
    stem = "delivr_model_classifier" if args.candidate_classifier else "delivr_model"
    summarise(args.workdir, args.results, stem)


def summarise(workdir: Path, results: Path, stem: str = "delivr_model") -> None:
    """Every fold done so far in ``workdir``: per-fold and per-patch tables
    (``<stem>_folds.csv``, ``<stem>_patches.csv``), pooled F1."""
    folds = sorted(workdir.glob("fold*/fold.json"))
    if not folds:
        return
    per_fold = pd.DataFrame([json.loads(f.read_text()) for f in folds])
    per_patch = pd.concat([pd.read_csv(f.parent / "patches.csv") for f in folds])
    results.mkdir(parents=True, exist_ok=True)
    per_fold.to_csv(results / f"{stem}_folds.csv", index=False)
    per_patch.to_csv(results / f"{stem}_patches.csv", index=False)
    total = pooled(per_patch)
    print(
        f"{len(per_fold)} folds, {len(per_patch)} patches together: F1 {total['f1']:.3f} "
        f"(precision {total['precision']:.3f}, recall {total['recall']:.3f}; tp {total['tp']}, "
        f"fp {total['fp']}, fn {total['fn']}); {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
