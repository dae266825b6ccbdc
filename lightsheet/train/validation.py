"""Scoring held-out volumes: detections matched to annotations over a range of thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lightsheet.train.data import AnnotatedVolume
from lightsheet.train.targets import TARGETS

__all__ = ["THRESHOLDS", "detect_points", "validate"]


#: Nucleus-probability thresholds tried on the held-out volumes: even steps of the logit
#: (-2 to 4 by 0.5), so they are as dense near 1 as near 0.5.
THRESHOLDS = tuple(round(float(1.0 / (1.0 + np.exp(-x))), 3) for x in np.arange(-2.0, 4.01, 0.5))


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
    import dask.array as da

    from lightsheet.config import SegmentConfig
    from lightsheet.segment import default_volume_range_um3
    from lightsheet.segment.model import model_cells

    config = SegmentConfig(method="model", nucleus_diameter_um=nucleus_diameter_um)
    image = da.from_array(maps[0], chunks=maps.shape[1:])
    _, table = model_cells(
        image,
        da.from_array(maps, chunks=maps.shape),
        voxel_size_um=voxel_size_um,
        config=config,
        targets=TARGETS,
        threshold=threshold,
        split_depth=split_depth,
        volume_range_um3=default_volume_range_um3(nucleus_diameter_um),
    )
    return table[["z_um", "y_um", "x_um"]].to_numpy(np.float64)


def validate(
    net: Any,
    volumes: Sequence[AnnotatedVolume],
    voxel_size_um: Sequence[float],
    nucleus_diameter_um: float,
    match_um: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out scores and the detection settings chosen on the held-out volumes.

    Every threshold of `THRESHOLDS` is scored over all held-out volumes together (cells
    matched one to one within ``match_um``); the best F1 sets the threshold.

    Returns
    -------
    validation : dict
        Volumes, pooled precision / recall / F1 at the chosen threshold, per-volume counts,
        and F1 at every threshold tried.
    detection : dict
        ``threshold`` and ``split_depth``, with how they were chosen.
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
    return validation, detection
