"""Detection from a trained UNet: head probabilities → seeds → one instance per cell.

A model trained by `lightsheet.train` has two head channels (its ``targets``): ``nucleus``,
the probability that a voxel belongs to a cell, and ``centre``, a bump that peaks at each
cell's centre. Cells are found as follows, every step exact at any chunking:

1. the mask is ``nucleus > threshold``, the threshold chosen on held-out volumes when the
   model was trained (its record's ``detection.threshold``) unless the run sets one;
2. seeds are the peaks of the centre map inside the mask, and the exact steepest-ascent
   watershed on the centre map (`lightsheet.segment.watershed` with the centre map as the
   elevation) gives each seed its voxels; neighbouring peaks whose lower one rises less than
   the record's ``detection.split_depth`` above the saddle between them are one cell;
3. instances are measured once each (`lightsheet.segment.measure`), those outside the size
   range of the run's nucleus diameter are dropped, and the rest numbered ``1 … n``
   (`lightsheet.segment.relabel`).

A model whose record holds a ``detection.classifier`` (fitted by `lightsheet train` on its
validation volumes when its config says ``candidate_classifier: true``) finds candidates at
the classifier's lower ``candidate_threshold`` instead, and keeps those the classifier
accepts: a logistic regression on each candidate's `CANDIDATE_FEATURES` (its size,
intensity, head probabilities, and how many candidates lie within a few nucleus diameters;
on delivr-cfos the count of neighbours is what separates the cells annotators marked from
the spots they left, `benchmarks/results/delivr_model.md`). The features are exact at any
chunking (measured per instance across chunks; neighbours counted over the whole table). A
run that sets ``segment.threshold`` uses that threshold alone.

A model with only a nucleus head (the older two-class models: nucleus and boundary) is
split with the distance-transform watershed instead, as the classical path does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from lightsheet.config import SegmentConfig
from lightsheet.errors import SegmentError

__all__ = [
    "CANDIDATE_FEATURES",
    "DEFAULT_SPLIT_DEPTH",
    "NEIGHBOUR_RADII",
    "apply_classifier",
    "candidate_features",
    "detection_classifier",
    "detection_settings",
    "model_cells",
    "segment_with_model",
]

#: Dynamics (probability units) of a centre-map peak over the saddle to a higher one that
#: keeps it a separate cell, for models whose record names none.
DEFAULT_SPLIT_DEPTH = 0.1

#: Radii, in nucleus diameters, within which a candidate's neighbouring candidates are counted.
NEIGHBOUR_RADII = (2, 4, 8, 12)

#: What the classifier of a model's record sees of each candidate: volume (µm³), mean and
#: peak intensity (in the model's normalisation: 0 and 1 are the model's intensity range),
#: mean and peak nucleus probability, peak centre probability, and neighbour counts (other
#: candidates within each radius, divided by the share of the radius's cube inside the volume).
CANDIDATE_FEATURES = (
    "volume_um3",
    "intensity_mean",
    "intensity_max",
    "nucleus_mean",
    "nucleus_max",
    "centre_max",
    *(f"neighbours_{r}d" for r in NEIGHBOUR_RADII),
)


def detection_settings(
    record: dict[str, Any] | None, config: SegmentConfig
) -> tuple[float, float, str]:
    """Probability threshold and centre split depth: the run's, else the model's record.

    Returns
    -------
    threshold : float
        ``config.threshold`` when set, else the candidate threshold of the record's
        classifier (`detection_classifier`), else the record's validated
        ``detection.threshold``.
    split_depth : float
        The record's ``detection.split_depth`` (else `DEFAULT_SPLIT_DEPTH`).
    source : str
        Where the threshold came from (for the lineage).

    Raises
    ------
    SegmentError
        No threshold in the config and none validated in the record.
    """
    detection = (record or {}).get("detection") or {}
    split = float(detection.get("split_depth", DEFAULT_SPLIT_DEPTH))
    if config.threshold is not None:
        return float(config.threshold), split, "segment.threshold"
    classifier = detection_classifier(record, config)
    if classifier is not None:
        t = float(classifier["candidate_threshold"])
        return t, split, "model record (validation): candidates, then its classifier"
    if "threshold" not in detection:
        raise SegmentError(
            "segment.method='model': the model's record has no validated probability "
            "threshold (detection.threshold; models trained by `lightsheet train` have one); "
            "set segment.threshold"
        )
    t = float(detection["threshold"])
    if not 0.0 < t < 1.0:
        raise SegmentError(f"model record: detection.threshold must be in (0, 1); got {t}")
    return t, split, "model record (validation)"


def detection_classifier(
    record: dict[str, Any] | None, config: SegmentConfig
) -> dict[str, Any] | None:
    """The record's ``detection.classifier``, unless the run sets its own threshold.

    Raises
    ------
    SegmentError
        The classifier lacks a field, or names features other than `CANDIDATE_FEATURES`.
    """
    found = ((record or {}).get("detection") or {}).get("classifier")
    if found is None or config.threshold is not None:
        return None
    need = ("candidate_threshold", "features", "mean", "scale", "coef", "intercept", "cut")
    missing = [k for k in need if k not in found]
    if missing or list(found["features"]) != list(CANDIDATE_FEATURES):
        raise SegmentError(
            f"model record: detection.classifier lacks {missing} or names features "
            f"{found.get('features')}; expected the fields {list(need)} and the features "
            f"{list(CANDIDATE_FEATURES)}"
        )
    return found


def candidate_features(
    labels: da.Array,
    table: Any,
    maps: da.Array,
    *,
    targets: Sequence[str],
    voxel_size_um: Sequence[float],
    nucleus_diameter_um: float,
    norm: Sequence[float] = (0.0, 1.0),
) -> Any:
    """`CANDIDATE_FEATURES` of each row of ``table`` (instances of ``labels``).

    Parameters
    ----------
    labels : (Z, Y, X) dask array
        Instances.
    table : pandas.DataFrame
        Their measurements (`lightsheet.segment.measure`, on the image), the rows to describe.
    maps : (K, Z, Y, X) dask array
        Head probabilities, channel ``k`` predicting ``targets[k]`` (``nucleus``, ``centre``).
    voxel_size_um : (3,) floats
    nucleus_diameter_um : float
        The unit of the neighbour radii (`NEIGHBOUR_RADII`).
    norm : (2,) floats
        The intensities that the model's normalisation maps to 0 and 1.

    Returns
    -------
    pandas.DataFrame
        One row per row of ``table``, columns `CANDIDATE_FEATURES`.
    """
    import pandas as pd
    from scipy.spatial import cKDTree

    from lightsheet.segment import measure

    targets = list(targets)
    if "centre" not in targets:
        raise SegmentError(f"model: a classifier needs a centre head; targets are {targets}")
    lo, hi = (float(v) for v in np.asarray(norm, np.float64).ravel()[:2])
    scale = hi - lo if hi > lo else 1.0
    out = pd.DataFrame(
        {
            "volume_um3": table["volume_um3"].to_numpy(np.float64),
            "intensity_mean": (table["mean_intensity"].to_numpy(np.float64) - lo) / scale,
            "intensity_max": (table["max_intensity"].to_numpy(np.float64) - lo) / scale,
        }
    )
    if len(table) == 0:
        return out.reindex(columns=list(CANDIDATE_FEATURES))
    heads = (
        measure(  # one pass for both heads
            labels,
            maps[targets.index("nucleus")],
            voxel_size_um=voxel_size_um,
            extra={"centre": maps[targets.index("centre")]},
        )
        .set_index("label")
        .reindex(table["label"].to_numpy())
    )
    out["nucleus_mean"] = heads["mean_intensity"].to_numpy(np.float64)
    out["nucleus_max"] = heads["max_intensity"].to_numpy(np.float64)
    out["centre_max"] = heads["centre_max"].to_numpy(np.float64)
    centres = table[["z_um", "y_um", "x_um"]].to_numpy(np.float64)
    vs = np.asarray(voxel_size_um, np.float64)
    start, stop = -vs / 2, (np.asarray(labels.shape) - 0.5) * vs  # the volume's extent (µm)
    tree = cKDTree(centres)
    for r in NEIGHBOUR_RADII:
        radius = r * nucleus_diameter_um
        near = tree.query_ball_point(centres, radius, return_length=True) - 1.0
        # counts near the volume's faces scaled by the share of the ball's cube inside it,
        # so that a small volume and a whole brain give the same density the same count
        inside = np.clip(
            np.minimum(centres + radius, stop) - np.maximum(centres - radius, start), 0, None
        )
        share = np.prod(inside / (2 * radius), axis=1)
        out[f"neighbours_{r}d"] = near / np.maximum(share, 1e-3)
    return out[list(CANDIDATE_FEATURES)]


def apply_classifier(features: Any, classifier: dict[str, Any]) -> np.ndarray:
    """Which candidates the record's logistic regression keeps (probability above its cut).

    >>> import pandas as pd
    >>> c = {"features": ["a"], "mean": [0.0], "scale": [1.0], "coef": [2.0],
    ...      "intercept": 0.0, "cut": 0.5}
    >>> apply_classifier(pd.DataFrame({"a": [-1.0, 1.0]}), c).tolist()
    [False, True]
    """
    x = features[list(classifier["features"])].to_numpy(np.float64)
    z = (x - np.asarray(classifier["mean"])) / np.asarray(classifier["scale"])
    logit = z @ np.asarray(classifier["coef"], np.float64) + float(classifier["intercept"])
    cut = float(classifier["cut"])
    return logit > np.log(cut / (1.0 - cut))


def model_cells(
    image: da.Array,
    maps: da.Array,
    *,
    voxel_size_um: Sequence[float],
    config: SegmentConfig,
    targets: Sequence[str],
    threshold: float,
    split_depth: float = DEFAULT_SPLIT_DEPTH,
    volume_range_um3: tuple[float, float],
    classifier: dict[str, Any] | None = None,
    norm: Sequence[float] = (0.0, 1.0),
) -> tuple[da.Array, Any]:
    """Instances (one per cell) and their table from a model's head probabilities.

    Parameters
    ----------
    image : (Z, Y, X) dask array
        Intensities, for the table's intensity columns.
    maps : (K, Z, Y, X) dask array of float
        Head probabilities (`lightsheet.featurize.head_probabilities`), channel ``k``
        predicting ``targets[k]``.
    voxel_size_um : (3,) floats
    config : SegmentConfig
        ``connectivity``, ``nucleus_diameter_um``, ``watershed`` (for models without a centre
        head) and ``split_depth_um`` are used.
    targets : sequence of str
        Names of the head channels (``model.targets``); must hold ``nucleus``.
    threshold : float
        Nucleus probability above which a voxel belongs to a cell.
    split_depth : float
        Centre-map dynamics that keeps two peaks apart.
    volume_range_um3 : (float, float)
        Instances outside this range are dropped.
    classifier : dict, optional
        A record's ``detection.classifier`` (`detection_classifier`): the instances found
        at ``threshold`` are candidates, and those it rejects are dropped too.
    norm : (2,) floats
        The intensities the model's normalisation maps to 0 and 1 (the classifier's
        intensity features).

    Returns
    -------
    labels : (Z, Y, X) dask array
        Lazy labels ``1 … n``, chunked like ``image``.
    table : pandas.DataFrame
        One row per cell (`lightsheet.segment.TABLE_COLUMNS`), ``label`` = ``1 … n``.
    """
    from lightsheet.segment import label, measure, relabel, watershed

    targets = list(targets)
    if maps.ndim != 4 or maps.shape[1:] != image.shape or maps.shape[0] != len(targets):
        raise SegmentError(
            f"model maps of shape {maps.shape} do not match the image {image.shape} and the "
            f"model's targets {targets}"
        )
    if "nucleus" not in targets:
        raise SegmentError(f"model: head targets {targets} lack 'nucleus'")
    maps = maps.rechunk((1, *image.chunks))
    nucleus = maps[targets.index("nucleus")]
    mask = nucleus > threshold
    if "centre" in targets:
        centre = maps[targets.index("centre")]
        labels, _ = watershed(
            mask,
            voxel_size_um=voxel_size_um,
            nucleus_diameter_um=config.nucleus_diameter_um,
            connectivity=config.connectivity,
            elevation=centre,
            split_depth_um=split_depth,
        )
    elif config.watershed:
        labels, _ = watershed(
            mask,
            voxel_size_um=voxel_size_um,
            nucleus_diameter_um=config.nucleus_diameter_um,
            connectivity=config.connectivity,
            split_depth_um=config.split_depth_um,
        )
    else:
        labels, _ = label(mask, connectivity=config.connectivity)
    raw = measure(labels, image, voxel_size_um=voxel_size_um)
    lo, hi = volume_range_um3
    table = raw[(raw["volume_um3"] >= lo) & (raw["volume_um3"] <= hi)].reset_index(drop=True)
    if classifier is not None:
        features = candidate_features(
            labels, table, maps, targets=targets, voxel_size_um=voxel_size_um,
            nucleus_diameter_um=config.nucleus_diameter_um, norm=norm,
        )  # fmt: skip
        table = table[apply_classifier(features, classifier)].reset_index(drop=True)
    final = relabel(labels, table["label"].to_numpy(), np.arange(1, len(table) + 1))
    table["label"] = np.arange(1, len(table) + 1, dtype=np.int64)
    return final, table


def segment_with_model(
    image: Any,
    model: Any,
    *,
    voxel_size_um: Sequence[float],
    config: SegmentConfig,
    chunks: Any = None,
    norm: Any = None,
) -> Any:
    """`lightsheet.segment.segment_volume` for ``method="model"`` given the model itself.

    The head probabilities are computed block by block with voxel-size transfer
    (`lightsheet.featurize.head_probabilities`), the threshold and split depth come from
    `detection_settings`, and `model_cells` makes the instances.

    Parameters
    ----------
    image : (Z, Y, X) dask array or stored array-like
        Intensities; a stored array is read region by region.
    model : torch.nn.Module
        From `lightsheet.featurize.load_model` (``targets``, ``record``, ``voxel_size_um``).
    voxel_size_um : (3,) floats
    config : SegmentConfig
        Its size filter (``min_volume_um3``, ``max_volume_um3``, default from
        ``nucleus_diameter_um``) applies as in the classical path.
    chunks : chunk spec, optional
        Blocks (z, y, x); default the image's chunks.
    norm : (2,) floats, optional
        Intensities mapped to 0 and 1 (default: the volume's, by the normalisation the model
        was trained with, `lightsheet.featurize.model_intensity_range`).

    Returns
    -------
    SegmentResult
    """
    from lightsheet.featurize import head_probabilities, model_intensity_range
    from lightsheet.regions import is_stored
    from lightsheet.segment import SegmentResult, count_map

    lo_um3, hi_um3 = config.volume_range_um3()  # the config refuses min > max
    record = getattr(model, "record", None)
    threshold, split, _ = detection_settings(record, config)
    classifier = detection_classifier(record, config)
    targets = tuple(getattr(model, "targets", None) or ("nucleus", "boundary"))
    if norm is None:  # once, not in each of the passes below
        source = da.from_array(image, chunks=image.chunks) if is_stored(image) else image
        norm = model_intensity_range(source, model).compute()
    maps = head_probabilities(image, model, voxel_size_um=voxel_size_um, chunks=chunks, norm=norm)
    if is_stored(image):
        image = da.from_array(image, chunks=maps.chunks[1:])
    elif chunks is not None:
        image = image.rechunk(chunks)
    labels, table = model_cells(
        image,
        maps,
        voxel_size_um=voxel_size_um,
        config=config,
        targets=targets,
        threshold=threshold,
        split_depth=split,
        volume_range_um3=(lo_um3, hi_um3),
        classifier=classifier,
        norm=norm,
    )
    cmap = count_map(table, chunks=labels.chunks, voxel_size_um=voxel_size_um)
    return SegmentResult(
        labels=labels, table=table, threshold=threshold, n=len(table), count_map=cmap
    )
