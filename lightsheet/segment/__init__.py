"""Segmentation: intensity → cells, each cell once, exact at any chunking.

The package, by step (every step gives the same result on a chunked volume as on the
volume held in one chunk; labels equal up to renumbering):

* ``local`` (:mod:`lightsheet.segment.local`, the default): a band-pass at the cell's size
  against each plane's own background, significance in units of the local noise (robust
  spread per plane over about nine diameters), steepest-ascent basins split where the dip
  between peaks is significant, cells whose peak stands ``min_peak_sd`` above the noise,
  artefacts present in an autofluorescence channel dropped.
* IN → BS by intensity (:mod:`~lightsheet.segment.threshold`): an absolute value, or Otsu's
  threshold from *one* global histogram (:func:`otsu_threshold`), optionally after a top-hat
  (:func:`subtract_background`); by a nucleus probability
  (:mod:`~lightsheet.segment.classify`): the UNet's own head, or a pixel classifier on UNet
  features.
* BS → OS (:mod:`~lightsheet.segment.labels`, :mod:`~lightsheet.segment.watershed`):
  connected components with ids unique over the volume (blocks joined by their face planes,
  a union–find over small tables); a steepest-ascent watershed whose paths continue through
  neighbouring blocks and whose basins merge by dynamics.
* OS → cells (:mod:`~lightsheet.segment.measure`): per-block partial sums per label combined
  on the client, so a cell cut by block borders gets one row with its whole-cell values.

:func:`segment_volume` chains them from a :class:`~lightsheet.config.SegmentConfig`.

Connectivity: the structuring element is ``scipy.ndimage.generate_binary_structure(3,
connectivity)``; ``1`` joins voxels sharing a face (6-neighbourhood), ``2`` also edges (18),
``3`` also corners (26).

Passes over the data are recomputed rather than held: memory stays a few blocks (method
``local`` keeps its statistics and cell bodies in a ``scratch`` folder on disk when given
one; without one its peak still grew, 1.5 to 2.2 GiB from lazy volumes of 0.25 to 1 GiB:
give large volumes a scratch folder, as the segment stage does). CuPy: the block kernels
choose ``cupyx.scipy.ndimage`` when a block is a CuPy array; small per-block tables are
always NumPy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from lightsheet.config import SegmentConfig
from lightsheet.config.derived import default_volume_range_um3
from lightsheet.deconvolve.kernel import check_dark_level
from lightsheet.errors import SegmentError, UndersampledCellWarning
from lightsheet.lineage import recorded_quantum
from lightsheet.regions import is_stored, map_overlap
from lightsheet.segment._common import _as_volume, _voxel_size, label_dtype, structure
from lightsheet.segment.classify import (
    PixelClassifier,
    classify,
    train_pixel_classifier,
)
from lightsheet.segment.labels import _label_analysis, label, relabel
from lightsheet.segment.local import detect_local
from lightsheet.segment.measure import TABLE_COLUMNS, count_map, measure
from lightsheet.segment.threshold import (
    _tophat_geometry,
    _tophat_region,
    otsu_threshold,
    subtract_background,
    threshold,
)
from lightsheet.segment.watershed import (
    _elevation_and_depth,
    _elevation_depth,
    _shell_chunks,
    _shells,
    _split_depth,
    _surface_block,
    _watershed_analysis,
    clipped_distance,
    default_smooth_um,
    default_split_depth_um,
    distance_elevation,
    watershed,
)

__all__ = [
    "TABLE_COLUMNS",
    "PixelClassifier",
    "SegmentResult",
    "classify",
    "clipped_distance",
    "count_map",
    "default_smooth_um",
    "default_split_depth_um",
    "default_volume_range_um3",
    "distance_elevation",
    "label",
    "label_dtype",
    "measure",
    "otsu_threshold",
    "relabel",
    "segment_volume",
    "structure",
    "subtract_background",
    "threshold",
    "train_pixel_classifier",
    "watershed",
]


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_volume` returns.

    Attributes
    ----------
    labels : (Z, Y, X) dask array of uint32 or uint64
        Lazy instance labels ``1 … n`` matching ``table.label``; 0 background.
    table : pandas.DataFrame
        One row per cell, columns :data:`TABLE_COLUMNS`.
    threshold : float
        Intensity threshold used (a probability for ``method="model"``; the least peak
        significance in noise SDs for ``method="local"``).
    n : int
        Number of cells (``len(table)``).
    count_map : (NZ, NY, NX) ndarray of int64
        Cells per block of ``labels`` by centroid; sums to ``n``.
    """

    labels: da.Array
    table: pd.DataFrame
    threshold: float
    n: int
    count_map: np.ndarray


def _model_probability(image, features, classifier) -> da.Array:
    if features is None:
        raise SegmentError(
            "segment.method='model' needs `features`: a (Z, Y, X) probability or "
            "(F, Z, Y, X) features with a `classifier`"
        )
    if not isinstance(features, da.Array):
        features = da.asarray(features)
    if features.ndim == 3:
        probability = features
    elif classifier is None:
        raise SegmentError("(F, Z, Y, X) `features` need a `classifier` (train_pixel_classifier)")
    else:
        probability = classify(features, classifier)
    if probability.shape != image.shape:
        raise SegmentError(
            f"model probability shape {probability.shape} differs from image shape {image.shape}"
        )
    return probability.rechunk(image.chunks)


def segment_volume(
    image: Any,
    *,
    voxel_size_um: Sequence[float],
    config: SegmentConfig | None = None,
    features: da.Array | None = None,
    classifier: PixelClassifier | None = None,
    background: Any = None,
    chunks: Any = None,
    compute: Callable[[Any, str], Any] | None = None,
    model: Any = None,
    scratch: str | Path | None = None,
    quantum: float | None = None,
    camera_offset: float = 0.0,
) -> SegmentResult:
    """Intensities → cells: labels and one row per cell, each cell once, at any chunking.

    Parameters
    ----------
    image : (Z, Y, X) dask array or stored array-like
        Intensities of the nuclei channel (deconvolved or raw). A stored array (a
        `zarr.Array`, a `lightsheet.io.omezarr.StoredVolume`) is read block by block, each
        block's halo straight from the store (`lightsheet.regions`), so memory does not grow
        with the volume; a dask array gets its halos from neighbouring chunks.
    voxel_size_um : (3,) sequence of float
        Voxel size (z, y, x) in µm.
    config : SegmentConfig, optional
        Method and parameters; defaults derive from ``nucleus_diameter_um`` and the voxel size.
    features : dask array, optional
        For ``method="model"``: ``(Z, Y, X)`` nucleus probability (the UNet's own head,
        :func:`lightsheet.featurize.foreground_probability`), or ``(F, Z, Y, X)`` UNet
        features with ``classifier``. The mask is ``probability > config.threshold``
        (default 0.5).
    classifier : PixelClassifier, optional
        From :func:`train_pixel_classifier`, for ``(F, Z, Y, X)`` features.
    background : (Z, Y, X) dask array or stored array-like, optional
        For ``method="local"`` with ``config.background_channel``: the autofluorescence
        channel (same shape as ``image``). Candidates about as bright there, relative to its
        own local level, are dropped (:mod:`lightsheet.segment.local`).
    chunks : chunk spec, optional
        The blocks segmented (and the labels' chunks); default the image's chunks.
    compute : callable, optional
        ``compute(collection, description)`` runs each pass over the volume (the noise
        statistics or the threshold's histogram, the analysis, the measurement); a task
        passes one that shows progress. Default ``dask.compute``.
    model : torch.nn.Module, optional
        For ``method="model"``: the UNet itself (`lightsheet.featurize.load_model`), instead
        of ``features``; cells come from its heads with voxel-size transfer and its
        validated threshold, or its record's candidate classifier
        (`lightsheet.segment.model.segment_with_model`).
    scratch : path-like, optional
        For ``method="local"``: a folder for intermediates kept on disk instead of
        recomputed in later passes (`lightsheet.segment.local.detect_local`); the labels
        read it, so delete it only after computing them. Other methods ignore it.
    quantum : float, optional
        For ``method="local"``: the step of the values the intensities were recorded in (a
        camera's integers: 1; a deconvolved image keeps its raw image's). Their rounding
        noise, ``quantum / √12`` a voxel, is the least noise the method assumes: where a
        dim background reads one value but for a few voxels one step off (8-bit data, data
        scaled down before it was saved) the spread measured is near 0, and every such speck
        stood out as a cell. Default: 1 for an integer ``image``, none for a real one.
    camera_offset : float
        For ``method="local"``: what the image reads with no light (a camera's offset, in
        its units; a deconvolved image keeps its raw image's level). The planes' gain and
        the contrasts count light above it: counted as light, 100 added to the real
        fixture moved 132 of its 201 centres by more than 1 µm along z. Default 0: the
        image's 0 is no light.

    Returns
    -------
    SegmentResult
        With ``method="local"`` the table also has ``peak_sd`` and ``contrast``, and with a
        background channel ``background_mean_intensity`` and ``background_contrast``.
    """
    vs = _voxel_size(voxel_size_um)
    config = (SegmentConfig() if config is None else config).resolved(vs)
    if config.method == "local":
        if quantum is None:
            quantum = recorded_quantum(image.dtype, {})
        return _segment_local(
            image, vs, config, background, chunks, compute, scratch, quantum, camera_offset
        )
    if background is not None:
        raise SegmentError(
            f"`background` (an autofluorescence channel) is used by method 'local' only; "
            f"method is {config.method!r}"
        )
    if config.method == "model" and model is not None:  # issue #21: the model's own heads
        from lightsheet.segment.model import segment_with_model

        return segment_with_model(image, model, voxel_size_um=vs, config=config, chunks=chunks)
    stored = is_stored(image) and config.method != "model"
    if is_stored(image):
        if len(image.shape) != 3:
            raise SegmentError(f"`image` must be a 3-D (Z, Y, X) array; got shape {image.shape}")
        grid = da.core.normalize_chunks(
            chunks if chunks is not None else image.chunks, image.shape, dtype=image.dtype
        )
        source, image = image, da.from_array(image, chunks=grid)
    image = _as_volume(image, "image")
    if chunks is not None and not stored:
        image = image.rechunk(chunks)
    diameter = config.nucleus_diameter_um
    lo_um3, hi_um3 = config.volume_range_um3()
    if config.method == "model":
        probability = _model_probability(image, features, classifier)
    tophat = None
    if config.subtract_background:
        radius = config.background_radius_um or diameter
        tophat = _tophat_geometry(vs, radius)
        image = (
            map_overlap(
                _tophat_region,
                source,
                depth=tophat[1],
                boundary="none",
                chunks=image.chunks,
                dtype=np.float32,
                size=tophat[0],
            )
            if stored
            else subtract_background(image, voxel_size_um=vs, radius_um=radius)
        )
    if config.method == "otsu":
        t = otsu_threshold(image, compute=compute)
        mask = image > t
    elif config.method == "absolute":
        t = float(config.threshold)
        mask = image > t
    else:
        t = 0.5 if config.threshold is None else float(config.threshold)
        mask = probability > t
    struct = structure(config.connectivity)
    # one analysis pass yields the labels' plan and the measurements together
    if config.watershed and stored:
        e_ov, m_ov, depth = _stored_watershed(source, mask.chunks, t, vs, config, tophat)
        labels, _, raw, *_ = _watershed_analysis(
            e_ov, m_ov, mask.chunks, struct, depth, 0, image, vs, compute
        )
    elif config.watershed:
        elevation, depth = _elevation_and_depth(
            mask, vs, diameter, config.split_depth_um, None, None
        )
        labels, _, raw, *_ = _watershed_analysis(
            *_shells(elevation, mask), mask.chunks, struct, depth, 0, image, vs, compute
        )
    else:
        labels, _, raw = _label_analysis(mask, struct, 0, image, vs, compute)
    keep = (raw["volume_um3"] >= lo_um3) & (raw["volume_um3"] <= hi_um3)
    table = raw[keep].reset_index(drop=True)
    new = np.arange(1, len(table) + 1, dtype=np.int64)
    final = relabel(labels, table["label"].to_numpy(), new)
    table["label"] = new
    cmap = count_map(table, chunks=final.chunks, voxel_size_um=vs)
    return SegmentResult(labels=final, table=table, threshold=t, n=len(table), count_map=cmap)


def _segment_local(
    image, vs, config: SegmentConfig, background, chunks, compute, scratch, quantum, offset
):
    """`segment_volume` for ``method="local"``: stored or dask inputs alike."""
    _check_volume(image, "image")
    offset = check_dark_level(offset, "camera_offset", SegmentError)
    across = config.nucleus_diameter_um / max(vs[1:])
    if across < 2:
        warnings.warn(
            UndersampledCellWarning(
                f"nucleus_diameter_um={config.nucleus_diameter_um:g} is {across:.1f} pixels "
                f"across at the voxel size {tuple(vs)} µm (z, y, x); cells under 2 pixels "
                "across are found, but fewer of them, and placed only to about a pixel (the "
                "real crop of benchmarks/voxel_size.py binned to 1.4 pixels a soma: 411 "
                "objects for 485). Check voxel_size_um, or image at a finer pixel"
            ),
            stacklevel=3,
        )
    deep = config.nucleus_diameter_um / vs[0]
    if deep < 1:
        warnings.warn(
            UndersampledCellWarning(
                f"nucleus_diameter_um={config.nucleus_diameter_um:g} is {deep:.2f} planes deep "
                f"at the voxel size {tuple(vs)} µm (z, y, x); cells thinner than the plane "
                "spacing fall between planes or join a neighbour above or below (the realistic "
                "nuclei sample imaged at 10 µm planes: recall 0.84 against 0.97 at 2 µm, "
                "benchmarks/voxel_size.py --sample voxels). Check voxel_size_um, or image "
                "at finer z steps"
            ),
            stacklevel=3,
        )
    grid = da.core.normalize_chunks(
        chunks if chunks is not None else image.chunks, image.shape, dtype=image.dtype
    )
    if background is not None:
        _check_volume(background, "background")
        if tuple(background.shape) != tuple(image.shape):
            raise SegmentError(
                f"`background` shape {tuple(background.shape)} differs from `image` shape "
                f"{tuple(image.shape)}; expected the autofluorescence channel of the same volume"
            )
    result = detect_local(
        image,
        voxel_size_um=vs,
        diameter_um=config.nucleus_diameter_um,
        min_peak_sd=config.min_peak_sd,
        volume_range_um3=config.volume_range_um3(),
        struct=structure(config.connectivity),
        chunks=grid,
        background=background,
        background_ratio=config.background_ratio,
        compute=compute,
        scratch=scratch,
        quantum=quantum,
        camera_offset=offset,
    )
    table = result.table
    cmap = count_map(table, chunks=result.labels.chunks, voxel_size_um=vs)
    return SegmentResult(
        labels=result.labels,
        table=table,
        threshold=float(config.min_peak_sd),
        n=len(table),
        count_map=cmap,
    )


def _check_volume(image: Any, name: str) -> None:
    if not isinstance(image, da.Array) and not is_stored(image):
        image = _as_volume(image, name)  # raises with the type named
    if len(image.shape) != 3:
        raise SegmentError(f"`{name}` must be a 3-D (Z, Y, X) array; got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise SegmentError(f"`{name}` must hold numbers; got dtype {image.dtype}")


def _stored_watershed(source, grid, threshold: float, vs, config: SegmentConfig, tophat):
    """Elevation and mask shells of a stored image's blocks, each read with its own halo."""
    diameter = config.nucleus_diameter_um
    smooth = default_smooth_um(vs)
    halo = tuple(d + 1 for d in _elevation_depth(vs, diameter, smooth))
    if tophat is not None:
        halo = tuple(h + t for h, t in zip(halo, tophat[1], strict=True))
    surface = map_overlap(
        _surface_block,
        source,
        depth=halo,
        boundary="none",
        chunks=grid,
        dtype=np.float32,
        trim=False,
        out_chunks=_shell_chunks(grid),
        name="surface",
        threshold=float(threshold),
        voxel_size_um=vs,
        clip_um=diameter,
        sigma_vox=tuple(smooth / v for v in vs),
        tophat_size=None if tophat is None else tophat[0],
    )
    return surface, ~da.isnan(surface), _split_depth(diameter, vs, smooth, config.split_depth_um)
