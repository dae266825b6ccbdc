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
    "DEFAULT_SPLIT_DEPTH",
    "detection_settings",
    "model_cells",
    "segment_with_model",
]

#: Dynamics (probability units) of a centre-map peak over the saddle to a higher one that
#: keeps it a separate cell, for models whose record names none.
DEFAULT_SPLIT_DEPTH = 0.1


def detection_settings(
    record: dict[str, Any] | None, config: SegmentConfig
) -> tuple[float, float, str]:
    """Probability threshold and centre split depth: the run's, else the model's record.

    Returns
    -------
    threshold : float
        ``config.threshold`` when set, else the record's validated ``detection.threshold``.
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
    threshold, split, _ = detection_settings(getattr(model, "record", None), config)
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
    )
    cmap = count_map(table, chunks=labels.chunks, voxel_size_um=voxel_size_um)
    return SegmentResult(
        labels=labels, table=table, threshold=threshold, n=len(table), count_map=cmap
    )
