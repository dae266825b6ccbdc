"""Scoring held-out volumes, and choosing the model path's detection settings on them.

Detections are matched to annotations over a range of thresholds, and a classifier of the
candidates is fitted on the same volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lightsheet.train.data import AnnotatedVolume
from lightsheet.train.targets import TARGETS

__all__ = ["CANDIDATE_THRESHOLD", "THRESHOLDS", "detect_points", "fit_classifier", "validate"]


#: Nucleus-probability thresholds tried on the held-out volumes: even steps of the logit
#: (-2 to 4 by 0.5), so they are as dense near 1 as near 0.5.
THRESHOLDS = tuple(round(float(1.0 / (1.0 + np.exp(-x))), 3) for x in np.arange(-2.0, 4.01, 0.5))

#: Nucleus probability of the candidates that the classifier sorts: the midpoint, below every
#: threshold chosen so far (0.82–0.92), so that most cells are candidates (92 % of the
#: annotated delivr-cfos cells, `benchmarks/results/delivr_model.md`).
CANDIDATE_THRESHOLD = 0.5

#: Fewest matched and unmatched candidates on the validation volumes to fit a classifier.
MIN_CLASS_CANDIDATES = 20


def _cells(
    maps: np.ndarray,
    voxel_size_um: Sequence[float],
    nucleus_diameter_um: float,
    threshold: float,
    split_depth: float,
    *,
    image: np.ndarray | None = None,
) -> tuple[Any, Any]:
    """`model_cells` on one in-memory volume: labels (dask) and table.

    ``image`` gives the intensities measured (default the nucleus map).
    """
    import dask.array as da

    from lightsheet.config import SegmentConfig
    from lightsheet.segment import default_volume_range_um3
    from lightsheet.segment.model import model_cells

    config = SegmentConfig(method="model", nucleus_diameter_um=nucleus_diameter_um)
    image = maps[0] if image is None else image
    return model_cells(
        da.from_array(image, chunks=image.shape),
        da.from_array(maps, chunks=maps.shape),
        voxel_size_um=voxel_size_um,
        config=config,
        targets=TARGETS,
        threshold=threshold,
        split_depth=split_depth,
        volume_range_um3=default_volume_range_um3(nucleus_diameter_um),
    )


def detect_points(
    maps: np.ndarray,
    voxel_size_um: Sequence[float],
    nucleus_diameter_um: float,
    threshold: float,
    split_depth: float,
) -> np.ndarray:
    """Cell centroids (µm, z y x) that `lightsheet.segment.model` finds in head maps.

    The same code as the pipeline's ``method: model`` (`model_cells`), on one in-memory
    volume, with the size filter of ``nucleus_diameter_um``.
    """
    _, table = _cells(maps, voxel_size_um, nucleus_diameter_um, threshold, split_depth)
    return table[["z_um", "y_um", "x_um"]].to_numpy(np.float64)


def fit_classifier(
    features: Any, positive: np.ndarray, n_cells: int, *, ridge: float = 1e-3
) -> dict[str, Any]:
    """A logistic regression of ``positive`` on ``features``, and its best-F1 cut.

    Features are standardised, the weights found by Newton's method on the mean
    log-likelihood with a small ridge (``ridge`` × the squared weights, which keeps separable
    data finite); the cut is the probability (0.05 … 0.95) with the best F1 when the
    candidates above it are kept and ``n_cells`` cells are annotated.

    >>> import pandas as pd
    >>> f = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]})
    >>> c = fit_classifier(f, np.array([0, 0, 0, 1, 1, 1], bool), 3)
    >>> from lightsheet.segment.model import apply_classifier
    >>> apply_classifier(f, c).tolist()
    [False, False, False, True, True, True]
    """
    from scipy.special import expit

    names = list(features.columns)
    x = features.to_numpy(np.float64)
    y = np.asarray(positive, np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], ridge)
    penalty[-1] = 0.0  # not the intercept
    for _ in range(50):
        p = expit(z @ w)
        grad = z.T @ (p - y) / len(y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    p = expit(z @ w)
    cuts = np.round(np.arange(0.05, 0.951, 0.01), 2)
    tps = np.array([(y[p > c] == 1).sum() for c in cuts])
    kept = np.array([(p > c).sum() for c in cuts])
    f1 = 2 * tps / np.maximum(1, kept + n_cells)
    best = int(np.argmax(f1))
    return {
        "features": names,
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "coef": [round(float(v), 6) for v in w[:-1]],
        "intercept": round(float(w[-1]), 6),
        "cut": float(cuts[best]),
        "f1": round(float(f1[best]), 4),
    }


def _fit_on_validation(
    maps: dict, volumes: Sequence[AnnotatedVolume], vs: np.ndarray, diameter: float,
    match_um: float,
) -> tuple[dict[str, Any] | None, str]:  # fmt: skip
    """The candidates' classifier fitted on the validation volumes, or None and why."""
    import dask.array as da
    import pandas as pd

    from lightsheet.evaluate import match_points
    from lightsheet.segment.model import DEFAULT_SPLIT_DEPTH, candidate_features

    rows, positive, n_cells = [], [], 0
    for v in volumes:
        labels, table = _cells(
            maps[v.name], vs, diameter, CANDIDATE_THRESHOLD, DEFAULT_SPLIT_DEPTH, image=v.image
        )
        features = candidate_features(
            labels, table, da.from_array(maps[v.name]), targets=TARGETS, voxel_size_um=vs,
            nucleus_diameter_um=diameter,
        )  # fmt: skip
        match = match_points(
            table[["z_um", "y_um", "x_um"]].to_numpy(), v.centres * vs, max_distance_um=match_um
        )
        y = np.zeros(len(table), bool)
        y[match.pairs[:, 0]] = True
        rows.append(features)
        positive.append(y)
        n_cells += len(v.centres)
    y = np.concatenate(positive) if positive else np.zeros(0, bool)
    if min(y.sum(), (~y).sum()) < MIN_CLASS_CANDIDATES:
        return None, (
            f"not fitted: {int(y.sum())} matched and {int((~y).sum())} unmatched candidates "
            f"on the validation volumes, fewer than {MIN_CLASS_CANDIDATES} of either"
        )
    fit = fit_classifier(pd.concat(rows, ignore_index=True), y, n_cells)
    return {"candidate_threshold": CANDIDATE_THRESHOLD, **fit}, (
        f"logistic regression on the candidates at nucleus probability {CANDIDATE_THRESHOLD} "
        "of the validation volumes, cut at its best F1 there"
    )


def validate(
    net: Any,
    volumes: Sequence[AnnotatedVolume],
    voxel_size_um: Sequence[float],
    nucleus_diameter_um: float,
    match_um: float,
    *,
    classifier: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out scores and the detection settings chosen on the held-out volumes.

    Every threshold of `THRESHOLDS` is scored over all held-out volumes together (cells
    matched one to one within ``match_um``); the best F1 sets the threshold. With
    ``classifier``, the candidates at `CANDIDATE_THRESHOLD` are then matched the same way,
    and a classifier fitted on them (`fit_classifier`, on
    `lightsheet.segment.model.CANDIDATE_FEATURES`), which the model path uses in place of
    the threshold.

    Returns
    -------
    validation : dict
        Volumes, pooled precision / recall / F1 at the chosen threshold, per-volume counts,
        and F1 at every threshold tried.
    detection : dict
        ``threshold`` and ``split_depth``, with how they were chosen; ``classifier`` when
        asked for and enough candidates of either kind were found (``classifier_fitted``
        says which).
    """
    from lightsheet.evaluate import match_points
    from lightsheet.featurize import run_model
    from lightsheet.segment.model import DEFAULT_SPLIT_DEPTH

    vs = np.asarray(voxel_size_um, np.float64)
    maps = {v.name: run_model(v.image, net, norm=(0.0, 1.0), mode="head") for v in volumes}
    truth = {v.name: v.centres * vs for v in volumes}
    curve, per_volume = [], {}
    for t in THRESHOLDS:
        results = {
            name: match_points(
                detect_points(m, vs, nucleus_diameter_um, t, DEFAULT_SPLIT_DEPTH),
                truth[name],
                max_distance_um=match_um,
            )
            for name, m in maps.items()
        }
        tp, fp, fn = (sum(getattr(r, k) for r in results.values()) for k in ("tp", "fp", "fn"))
        f1 = 2 * tp / max(1, 2 * tp + fp + fn)
        curve.append({"threshold": t, "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn})
        per_volume[t] = {k: {**r.as_dict()} for k, r in results.items()}
    # ties (e.g. nothing found anywhere): the threshold nearest 0.5
    best = max(curve, key=lambda c: (c["f1"], -abs(c["threshold"] - 0.5)))
    t = best["threshold"]
    tp, fp, fn = best["tp"], best["fp"], best["fn"]
    validation = {
        "volumes": [v.name for v in volumes],
        "match_distance_um": round(float(match_um), 3),
        "threshold": t,
        "precision": round(tp / max(1, tp + fp), 4),
        "recall": round(tp / max(1, tp + fn), 4),
        "f1": best["f1"],
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "per_volume": {
            k: {m: (round(x, 4) if isinstance(x, float) else x) for m, x in r.items()}
            for k, r in per_volume[t].items()
        },
        "f1_by_threshold": curve,
    }
    detection = {
        "threshold": t,
        "split_depth": DEFAULT_SPLIT_DEPTH,
        "chosen_on": "validation volumes: the threshold with the best F1 over all of them",
    }
    if not classifier:
        detection["classifier_fitted"] = "off (training config: candidate_classifier: false)"
        return validation, detection
    fitted, how = _fit_on_validation(maps, volumes, vs, nucleus_diameter_um, match_um)
    detection["classifier_fitted"] = how
    if fitted is not None:
        detection["classifier"] = fitted
        validation["classifier_f1"] = fitted["f1"]
    return validation, detection
