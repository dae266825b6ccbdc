"""A second stage on the model path's candidates: can per-cell features recover what the
UNet's threshold loses on the delivr-cfos patches?

Reads the five fold models that `benchmarks/delivr_model.py` trained (``--workdir``, each
``fold<k>/model.safetensors``). Each fold's model segments its own test patches (the
pipeline's model path, `lightsheet.segment.model.model_cells`, on 48³ blocks) at a low
probability threshold (``--candidate-threshold``, default 0.5), so that most annotated cells
are candidates, and each candidate gets features:

* ``basic``: volume, mean and peak intensity over the patch median (the model's
  normalisation), mean and peak nucleus probability, peak centre probability;
* ``local``: + the mean of the non-candidate voxels around it (3 × 15 × 15 and 5 × 41 × 41
  voxels) over the patch median, and the cell's mean and peak over that local level;
* ``ctx``: + how many other candidates lie within 20 and 40 µm;
* ``ctx80``: + within 80 and 120 µm;
* ``ctx+patch``: ``ctx`` + the patch's candidate count and 99.5th percentile over its median.

Candidates matched one to one within 6 µm to the annotation (components of ≥ 4 voxels) are
positives. A classifier (logistic regression, ``lr``, or gradient-boosted trees, ``gb``:
scikit-learn's, which is not a dependency of the project; install it beside) is trained on
the candidates of four folds' test patches (each scored by a model that had not seen them),
its decision threshold chosen on those four folds for the best F1, and applied to the fifth;
all 27 patches are scored together. A fold's classifier is thus trained on features of
detections made by the other folds' models, which were trained on patches of the fold it is
applied to: an estimate of what the stage could give, not a clean cross-validation of a
built one.

    OMP_NUM_THREADS=2 PYTHONPATH=/tmp/sklearn python -m benchmarks.delivr_candidates \\
        --data ../shared/data/delivr-cfos --workdir /tmp/delivr-cv --results benchmarks/results

Writes ``delivr_candidates.csv`` (one row per feature set and classifier).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.delivr_model import MATCH_UM, MIN_VOXELS, VOXEL_UM, folds_by_count

BASIC = ["vol", "mean_c", "max_c", "nuc_mean", "nuc_max", "cen_max"]
LOCAL = [*BASIC, "bg_local", "bg_wide", "ratio_local", "max_local"]
FEATURES = {
    "basic": BASIC,
    "local": LOCAL,
    "ctx": [*LOCAL, "n20", "n40"],
    "ctx80": [*LOCAL, "n20", "n40", "n80", "n120"],
    "ctx+patch": [*LOCAL, "n20", "n40", "n_patch", "patch_p99"],
}


def candidates(model_path: Path, data: Path, ids: list[str], threshold: float) -> pd.DataFrame:
    """The candidates of the model path at ``threshold`` in patches ``ids``, with features
    and ``y`` (1: matched to an annotated cell)."""
    import dask
    import dask.array as da
    import tifffile
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    from lightsheet.config import SegmentConfig
    from lightsheet.evaluate import match_points, to_um
    from lightsheet.featurize import head_probabilities, load_model, model_intensity_range
    from lightsheet.segment.model import model_cells

    model = load_model(model_path)
    targets = list(model.targets)
    config = SegmentConfig(method="model", nucleus_diameter_um=model.record["nucleus_diameter_um"])
    split = model.record["detection"].get("split_depth", 0.1)
    rows = []
    for pid in ids:
        image = tifffile.imread(data / "images" / f"patch_{pid}.tif").astype(np.float32)
        points = pd.read_csv(data / "points" / f"patch_{pid}_points.csv")
        truth = to_um(points.loc[points["n_voxels"] >= MIN_VOXELS, ["z", "y", "x"]], VOXEL_UM)
        with dask.config.set(scheduler="threads"):
            x = da.from_array(image, chunks=48)
            norm = model_intensity_range(x, model).compute()
            maps = head_probabilities(x, model, voxel_size_um=VOXEL_UM, chunks=48, norm=norm)
            labels, table = model_cells(
                x, maps, voxel_size_um=VOXEL_UM, config=config, targets=targets,
                threshold=threshold, split_depth=split,
                volume_range_um3=config.volume_range_um3(),
            )  # fmt: skip
            labels, maps = dask.compute(labels, maps)
        index = table["label"].to_numpy()
        median = float(np.median(image))

        nucleus, centre = maps[targets.index("nucleus")], maps[targets.index("centre")]
        f = pd.DataFrame(
            {
                "patch": pid,
                "vol": table["volume_um3"].to_numpy(),
                "mean_c": table["mean_intensity"].to_numpy() / median,
                "max_c": table["max_intensity"].to_numpy() / median,
                "nuc_mean": ndi.mean(nucleus, labels, index),
                "nuc_max": ndi.maximum(nucleus, labels, index),
                "cen_max": ndi.maximum(centre, labels, index),
                "bg_local": _around(image, labels, index, (3, 15, 15)) / median,
                "bg_wide": _around(image, labels, index, (5, 41, 41)) / median,
                "n_patch": len(table),
                "patch_p99": np.percentile(image, 99.5) / median,
            }
        )
        f["ratio_local"] = f["mean_c"] / f["bg_local"]
        f["max_local"] = f["max_c"] / f["bg_local"]
        found = table[["z_um", "y_um", "x_um"]].to_numpy()
        tree = cKDTree(found)
        for r in (20, 40, 80, 120):
            f[f"n{r}"] = [len(n) - 1 for n in tree.query_ball_point(found, r)]
        match = match_points(found, truth, max_distance_um=MATCH_UM)
        f["y"] = 0
        f.loc[match.pairs[:, 0], "y"] = 1
        f["n_truth"] = len(truth)
        rows.append(f)
    return pd.concat(rows, ignore_index=True)


def _around(image, labels, index, size) -> np.ndarray:
    """Per label: the mean over its voxels of the local mean of the voxels outside every
    candidate (a box of ``size``)."""
    from scipy import ndimage as ndi

    outside = (labels == 0).astype(np.float32)
    level = ndi.uniform_filter(image * outside, size)
    level /= np.maximum(ndi.uniform_filter(outside, size), 1e-3)
    return ndi.mean(level, labels, index)


def _f1(tp, fp, fn):
    return 2 * tp / max(2 * tp + fp + fn, 1)


def leave_one_fold_out(table: pd.DataFrame, columns: list[str], kind: str) -> dict:
    """Train on four folds' candidates, threshold for the best F1 there, score the fifth."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth = int(table.groupby("patch")["n_truth"].first().sum())
    tp = fp = 0
    for k in sorted(table["fold"].unique()):
        train, test = table[table["fold"] != k], table[table["fold"] == k]
        if kind == "lr":
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        else:
            clf = HistGradientBoostingClassifier(max_depth=3, max_iter=200, learning_rate=0.05)
        clf.fit(train[columns], train["y"])
        p, y = clf.predict_proba(train[columns])[:, 1], train["y"].to_numpy() == 1
        n = int(train.groupby("patch")["n_truth"].first().sum())

        def score(c, p=p, y=y, n=n):
            return _f1(((p > c) & y).sum(), ((p > c) & ~y).sum(), n - ((p > c) & y).sum())

        cut = max(np.arange(0.2, 0.8, 0.02), key=score)
        keep = clf.predict_proba(test[columns])[:, 1] > cut
        tp += int((keep & (test["y"] == 1)).sum())
        fp += int((keep & (test["y"] == 0)).sum())
    return {"tp": tp, "fp": fp, "fn": truth - tp, "precision": tp / max(tp + fp, 1),
            "recall": tp / truth, "f1": _f1(tp, fp, truth - tp)}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the delivr-cfos folder")
    p.add_argument("--workdir", type=Path, required=True, help="benchmarks/delivr_model.py's")
    p.add_argument("--candidate-threshold", type=float, default=0.5)
    p.add_argument("--results", type=Path)
    args = p.parse_args(argv)
    fold_of = folds_by_count(args.data / "points")
    table = pd.concat(
        candidates(
            args.workdir / f"fold{k}" / "model.safetensors",
            args.data,
            sorted(pid for pid, f in fold_of.items() if f == k),
            args.candidate_threshold,
        ).assign(fold=k)
        for k in range(5)
    )
    truth = int(table.groupby("patch")["n_truth"].first().sum())
    tp = int(table["y"].sum())
    rows = [{"features": "none (every candidate)", "classifier": "-", "tp": tp,
             "fp": len(table) - tp, "fn": truth - tp, "precision": tp / len(table),
             "recall": tp / truth, "f1": _f1(tp, len(table) - tp, truth - tp)}]  # fmt: skip
    for name, columns in FEATURES.items():
        for kind in ("lr", "gb"):
            rows.append({"features": name, "classifier": kind,
                         **leave_one_fold_out(table, columns, kind)})  # fmt: skip
    out = pd.DataFrame(rows).round(3)
    print(out.to_string(index=False))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        out.to_csv(args.results / "delivr_candidates.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
