"""Per-pixel features from a pretrained UNet, block by block, without seams.

A block of the output is computed from an input region that reaches at least the
network's receptive field past the block on every side, and whose origin lies on the
network's pooling grid (a multiple of ``2**depth`` in global coordinates). With both, each
output pixel sees exactly the inputs, padding and pooling windows it sees when the network
runs on the whole slice, so blocks join without seams (up to float rounding).

Voxel-size transfer: a model that declares the voxel size it was trained at
(``model.voxel_size_um``, from its record) is run on the volume resampled to that voxel
size, and its outputs are resampled back (`lightsheet.resample`): each block reads the
source region whose resampling covers its model-grid region (receptive field and pooling
grid counted on the model's grid), so blocks stay exact. A 2-D model (one z-slice at a
time) is resampled in y and x only.

The kernel, `run_model` on one region, is in `lightsheet.featurize.kernel`; here it is lifted
over the volume by `lightsheet.regions.map_overlap`, with a 2-D model's neighbouring chunks
grouped into one task while one slice of their region fits a forward pass (`_task_cores`).
Checkpoints are read without running code from them (`lightsheet.models.checkpoint`).

Intensities are normalised as the model's record says (`model_normalisation`), from
statistics of the whole volume estimated on a strided subsample, so every block uses the
same mapping: robust percentiles (1 and 99.8 %, the convention of CSBDeep/StarDist) mapped
to 0 and 1, or, for models trained with ``normalisation: background``, the intensities
divided by twice the volume's median (the background level maps to 0.5: the network sees a
cell's contrast over the background, whatever the detector's gain and the cell density).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from dask.delayed import Delayed
from torch import nn

from lightsheet.blocks import feature_blocks
from lightsheet.errors import ConfigError, ModelError
from lightsheet.featurize.kernel import (
    CPU_PIXELS_PER_PASS,
    _axis_maps,
    _block_task,
    _ModelPayload,
    _plans,
    _to_numpy,
    model_geometry,
    model_voxel_size_um,
    run_model,
    z_context,
)
from lightsheet.models.checkpoint import load_model, save_model
from lightsheet.regions import Region, block_grid, is_stored, map_overlap
from lightsheet.resample import AxisMap

__all__ = [
    "BACKGROUND_LEVEL",
    "BACKGROUND_PERCENTILE",
    "CPU_PIXELS_PER_PASS",
    "NORMALISATIONS",
    "NORM_PERCENTILES",
    "featurize",
    "featurize_volumes",
    "foreground_probability",
    "head_probabilities",
    "intensity_range",
    "load_model",
    "model_intensity_range",
    "model_normalisation",
    "model_geometry",
    "model_voxel_size_um",
    "norm_range",
    "run_model",
    "save_model",
    "z_context",
]

#: Percentiles of the intensity distribution mapped to 0 and 1 before the network.
NORM_PERCENTILES = (1.0, 99.8)
#: Upper bound on voxels read by the percentile estimate (a strided subsample).
NORM_MAX_SAMPLES = 2**21
#: Normalisations a model can declare (``record["normalisation"]["method"]``).
NORMALISATIONS = ("percentiles", "background")
#: ``background`` normalisation: this percentile of the volume is its background level ...
BACKGROUND_PERCENTILE = 50.0
#: ... and is mapped to this value (zero intensity stays 0).
BACKGROUND_LEVEL = 0.5


def intensity_range(
    image: da.Array,
    *,
    percentiles: Sequence[float] = NORM_PERCENTILES,
    max_samples: int = NORM_MAX_SAMPLES,
    method: str = "percentiles",
) -> Delayed:
    """Lazy intensity range ``[lo, hi]`` (mapped to 0 and 1) of ``image``, from a subsample.

    Parameters
    ----------
    image : (Z, Y, X) dask array
    percentiles : (2,) sequence of float
        Lower and upper percentile in [0, 100] (``method="percentiles"``).
    max_samples : int
        Upper bound on the voxels that enter the estimate (a strided subsample).
    method : {"percentiles", "background"}
        ``percentiles``: the two percentiles map to 0 and 1. ``background``: 0 stays 0 and
        the `BACKGROUND_PERCENTILE` (the background level) maps to `BACKGROUND_LEVEL`.

    Returns
    -------
    range : Delayed
        Computes to a float64 array ``[lo, hi]`` with ``hi > lo``.
    """
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise ConfigError(f"percentiles must satisfy 0 <= lo < hi <= 100; got {percentiles!r}")
    if method not in NORMALISATIONS:
        raise ConfigError(f"normalisation must be one of {NORMALISATIONS}; got {method!r}")
    image = _as_dask(image, "image")
    step = max(1, math.ceil((image.size / max(1, max_samples)) ** (1.0 / image.ndim)))
    sub = image[(slice(None, None, step),) * image.ndim]
    return dask.delayed(norm_range, pure=True)(sub, method, (lo_p, hi_p))


def norm_range(
    sample: Any, method: str = "percentiles", percentiles: Sequence[float] = NORM_PERCENTILES
) -> np.ndarray:
    """``[lo, hi]`` of the normalisation ``method`` from intensities ``sample`` (any shape).

    Examples
    --------
    >>> norm_range(np.array([0.0, 100.0, 100.0, 300.0]), "background")
    array([  0., 200.])
    """
    sample = _to_numpy(sample).astype(np.float64, copy=False).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.array([0.0, 1.0])
    if method == "background":
        lo = 0.0
        hi = float(np.percentile(sample, BACKGROUND_PERCENTILE)) / BACKGROUND_LEVEL
    else:
        lo, hi = (float(v) for v in np.percentile(sample, list(percentiles)))
    if not hi > lo:  # a constant (or all-zero) image: any positive scale keeps it constant
        hi = lo + 1.0
    return np.array([lo, hi], dtype=np.float64)


def model_normalisation(model: Any) -> tuple[str, tuple[float, float]]:
    """The normalisation a model was trained with: method and percentiles, from its record.

    Models whose record names none (or the older "robust percentiles ..." text) use robust
    percentiles.

    Raises
    ------
    ModelError
        The record names a normalisation this version cannot apply.
    """
    norm = (getattr(model, "record", None) or {}).get("normalisation") or {}
    method = str(norm.get("method", "percentiles"))
    if method.startswith("robust percentiles"):  # records written before the choice existed
        method = "percentiles"
    percentiles = tuple(float(p) for p in norm.get("percentiles", NORM_PERCENTILES))
    background = (
        float(norm.get("background_percentile", BACKGROUND_PERCENTILE)),
        float(norm.get("background_level", BACKGROUND_LEVEL)),
    )
    if method not in NORMALISATIONS or background != (BACKGROUND_PERCENTILE, BACKGROUND_LEVEL):
        raise ModelError(
            f"model record: normalisation {norm!r} is not one this version applies: method "
            f"one of {NORMALISATIONS}, background percentile {BACKGROUND_PERCENTILE} mapped "
            f"to {BACKGROUND_LEVEL}"
        )
    return method, percentiles


def model_intensity_range(image: Any, model: Any) -> Delayed:
    """`intensity_range` of ``image`` with the normalisation ``model`` was trained with."""
    method, percentiles = model_normalisation(model)
    return intensity_range(image, percentiles=percentiles, method=method)


def featurize(
    image: da.Array,
    model: nn.Module,
    *,
    dtype: str = "float16",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    norm: Sequence[float] | Delayed | None = None,
    chunks: Any = None,
    voxel_size_um: Sequence[float] | None = None,
    pixels_per_pass: int = CPU_PIXELS_PER_PASS,
) -> da.Array:
    """Per-pixel UNet features of a volume, lazily and block by block, without seams.

    Parameters
    ----------
    image : (Z, Y, X) dask array or stored array-like
        Intensities (any real dtype); the output has the same chunks. A stored array (a
        `zarr.Array`, a `lightsheet.io.omezarr.StoredVolume`) is read region by region,
        each task reading its own input region with its halo, so memory does not grow with
        the volume; a dask array's regions are cut from its chunks.
    model : nn.Module
        From `load_model`; its receptive field and pooling grid set the halo.
    dtype : {"float16", "float32"}
        Output dtype.
    batch_size : int
        z-slices per forward pass (on a CPU at most ``pixels_per_pass`` pixels per pass).
    device : str or torch.device, optional
        None chooses on each worker: CUDA if it has a GPU (half precision), else CPU.
    norm : (2,) floats or Delayed, optional
        Intensities mapped to 0 and 1; default `model_intensity_range` of ``image``
        (the normalisation the model was trained with).
    chunks : chunk spec, optional
        Output chunks (z, y, x) for a stored ``image``; default its stored chunks.
    voxel_size_um : (3,) floats, optional
        Voxel size of ``image``. Where it differs from the voxel size the model was trained
        at (`model_voxel_size_um`), each block is resampled to the model's voxel size on
        the way in and back on the way out (y and x for a 2-D model). None: the image is
        taken to be at the model's voxel size.
    pixels_per_pass : int
        Pixels per forward pass on a CPU (default `CPU_PIXELS_PER_PASS`): z-slices are
        batched up to it, and a 2-D model's neighbouring chunks share one task while one
        slice of their region fits in it.

    Returns
    -------
    features : (F, Z, Y, X) dask array of ``dtype``
        Chunked like ``image``. For a 2-D model, chunks whose joint region fits one pass are
        computed by one task (in z-slabs no larger than a chunk), so their halos are shared.

    Examples
    --------
    >>> import dask.array as da
    >>> image = da.random.default_rng(0).random((4, 64, 64), chunks=(2, 40, 40))
    >>> featurize(image, load_model()).shape
    (16, 4, 64, 64)
    >>> featurize(image, load_model(), voxel_size_um=(2.0, 1.0, 1.0)).shape  # resampled
    (16, 4, 64, 64)
    """
    options = (batch_size, device, norm, chunks, voxel_size_um, pixels_per_pass)
    return _map_model(image, model, "features", dtype, *options)


def featurize_volumes(
    volumes: Sequence[Any],
    model: nn.Module,
    *,
    voxel_size_um: Sequence[float],
    dtype: str = "float16",
    **kwargs: Any,
) -> tuple[da.Array, tuple[int, int, int]]:
    """Features of stored volumes (one per time point), in blocks that write whole chunks.

    The blocks are `lightsheet.blocks.feature_blocks` of the volumes' stored chunks: thinned
    in z until a block's features fit a byte budget (memory per worker thread stays small
    whatever the number of features), two chunks along each axis that the first pyramid
    step does not halve (so the features' level 1 is written from each block in memory).

    Parameters
    ----------
    volumes : sequence of stored (Z, Y, X) volumes
        Same shape and stored chunks (`lightsheet.io.omezarr.stored_volume`); each task
        reads its own region, with its halo, from the store.
    voxel_size_um : (3,) floats
        Of the volumes: the blocks follow the writer's pyramid, and the model runs on each
        block resampled to its own voxel size (`featurize`).
    model, dtype, **kwargs
        As for `featurize`.

    Returns
    -------
    features : (T, F, Z, Y, X) dask array of ``dtype``
    chunks : (3,) ints
        The zarr chunks (z, y, x) to write the features with.
    """
    n_features = featurize(volumes[0], model, voxel_size_um=voxel_size_um).shape[0]  # lazy
    chunks, blocks = feature_blocks(
        volumes[0].chunks,
        volumes[0].shape,
        n_features * np.dtype(dtype).itemsize,
        voxel_size_um,
    )
    features = [
        featurize(v, model, dtype=dtype, chunks=blocks, voxel_size_um=voxel_size_um, **kwargs)
        for v in volumes
    ]
    return da.stack(features), chunks


def foreground_probability(image: da.Array, model: nn.Module, **kwargs: Any) -> da.Array:
    """Nucleus probability from the model's own head: `head_probabilities` of channel 0.

    Keyword arguments are those of `head_probabilities`.

    Returns
    -------
    probability : (Z, Y, X) dask array of float32 in [0, 1]
    """
    return head_probabilities(image, model, channel=0, **kwargs)


def head_probabilities(
    image: da.Array, model: nn.Module, *, channel: int | None = None, **options: Any
) -> da.Array:
    """The head channels' probabilities (sigmoid of the logits), block by block.

    ``channel``: one head channel, or None for all. Channel ``k`` predicts
    ``model.targets[k]`` (``nucleus`` and ``centre`` for models trained by
    `lightsheet.train`). The other keyword arguments are those of `featurize` but
    ``dtype`` (always float32): ``batch_size``, ``device``, ``norm``, ``chunks``,
    ``voxel_size_um``, ``pixels_per_pass``.

    Returns
    -------
    probabilities : (K, Z, Y, X), or (Z, Y, X) for one channel, dask array of float32 in [0, 1]
    """
    if not hasattr(model, "logits"):
        raise ModelError(
            f"model: {type(model).__name__} has no segmentation head (a 'logits' method); "
            "the head's probabilities need a lightsheet UNet or its TorchScript export"
        )
    mode = "head" if channel is None else ("probability", int(channel))
    return _map_model(image, model, mode, "float32", **options)


def _map_model(
    image: Any,
    model: nn.Module,
    mode: str,
    dtype: str,
    batch_size: int = 8,
    device: Any = None,
    norm: Any = None,
    chunks: Any = None,
    voxel_size_um: Any = None,
    pixels_per_pass: int = CPU_PIXELS_PER_PASS,
) -> da.Array:
    source = image if is_stored(image) else None
    if source is not None:
        image = da.from_array(source, chunks=block_grid(source, chunks))
    image = _as_dask(image, "image")
    if not isinstance(model, nn.Module):
        raise ModelError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if str(dtype) not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32'; got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not isinstance(pixels_per_pass, int) or pixels_per_pass < 1:
        raise ValueError(f"pixels_per_pass must be a positive integer; got {pixels_per_pass!r}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device: {device!r} is not a torch device: {exc}") from exc
    context = z_context(model)
    ndim, halo, align = model_geometry(model)
    maps = _axis_maps(image.shape, voxel_size_um, model_voxel_size_um(model), ndim == 3 or context)
    if mode == "features":
        n_out = int(getattr(model, "n_features", 0)) or _probe_features(model, ndim)
    else:
        n_out = _probe_head(model, ndim) if mode == "head" else 1
    norm = _norm_value(image, norm, model)
    opts = {
        "mode": mode,
        "dtype": np.dtype(dtype),
        "batch_size": batch_size,
        "device": device,
        "pixels_per_pass": pixels_per_pass,
    }
    grid = (
        maps,
        (halo if ndim == 3 else context, halo, halo),
        (align if ndim == 3 else 1, align, align),
    )
    bounds = [np.cumsum((0,) + c).tolist() for c in image.chunks]
    regions = []
    bytes_per_voxel = n_out * np.dtype(dtype).itemsize
    for i, cores in enumerate(
        _task_cores(bounds, *grid, bytes_per_voxel, ndim == 3, pixels_per_pass)
    ):
        start, stop = tuple(c0 for c0, _ in cores), tuple(c1 for _, c1 in cores)
        reads = [p.read for p in _plans(start, stop, *grid)]
        lo = tuple(c0 - r0 for c0, (r0, _) in zip(start, reads, strict=True))
        hi = tuple(r1 - c1 for c1, (_, r1) in zip(stop, reads, strict=True))
        regions.append(Region((i,), start, stop, lo, hi, image.shape))
    lead = mode in ("features", "head")  # the feature / head axis
    # a stored image's regions are read by the tasks themselves, not cut from its chunks
    return map_overlap(
        _block_task,
        image if source is None else source,
        chunks=image.chunks,
        dtype=dtype,
        meta=np.empty((0,) * (3 + lead), dtype=dtype, like=image._meta),
        trim=False,
        out_chunks=((n_out,), *image.chunks) if lead else image.chunks,
        name=mode if isinstance(mode, str) else "probability",
        regions=regions,
        boundary="none",
        payload=_ModelPayload(model),
        norm=norm,
        grid=grid,
        opts=opts,
    )


def _task_cores(
    bounds: list[list[int]],
    maps: Sequence[AxisMap],
    halos: tuple[int, int, int],
    aligns: tuple[int, int, int],
    bytes_per_voxel: int,
    one_per_chunk: bool,
    pixels_per_pass: int = CPU_PIXELS_PER_PASS,
) -> list[tuple[tuple[int, int], ...]]:
    """The output box (z, y, x ranges) of each task: chunks grouped so halos are shared.

    A 3-D model (``one_per_chunk``) gets one task per chunk. A 2-D model runs slice by
    slice, so in y and x neighbouring chunks are merged while the input region one forward
    pass sees (on the model's grid) stays within ``pixels_per_pass`` (fewer halo pixels
    computed twice, and passes of the size the network runs fastest at); in z, the group is
    cut into slabs so one task's output is no larger than the largest chunk's (same memory
    per task), each slab reading its z context as its halo.
    """
    per_chunk = [list(zip(b[:-1], b[1:], strict=True)) for b in bounds]
    if one_per_chunk:
        return list(itertools.product(*per_chunk))
    side = math.isqrt(pixels_per_pass)
    xs = _merge_chunks(bounds[2], maps[2], halos[2], aligns[2], side)
    widest = max(_model_length(x, maps[2], halos[2], aligns[2]) for x in xs)
    ys = _merge_chunks(
        bounds[1], maps[1], halos[1], aligns[1], max(side, pixels_per_pass // widest)
    )
    budget = math.prod(max(np.diff(b)) for b in bounds) * bytes_per_voxel
    out = []
    for z0, z1 in per_chunk[0]:
        for y, x in itertools.product(ys, xs):
            slab = (y[1] - y[0]) * (x[1] - x[0]) * bytes_per_voxel
            n = min(z1 - z0, -(-(z1 - z0) * slab // budget))
            edges = np.linspace(z0, z1, n + 1).round().astype(int).tolist()
            out += [((a, b), y, x) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return out


def _model_length(core: tuple[int, int], amap: AxisMap, halo: int, align: int) -> int:
    """Length of the model-grid region the network runs on for output ``core``."""
    r0, r1 = amap.plan(*core, halo=halo, align=align).model
    return r1 - r0


def _merge_chunks(
    b: list[int], amap: AxisMap, halo: int, align: int, limit: int
) -> list[tuple[int, int]]:
    """Runs of neighbouring chunks whose joint model-grid region is at most ``limit`` long."""
    runs, i = [], 0
    while i < len(b) - 1:
        j = i + 1
        while j < len(b) - 1:
            if _model_length((b[i], b[j + 1]), amap, halo, align) > limit:
                break
            j += 1
        runs.append((b[i], b[j]))
        i = j
    return runs


def _norm_value(image: da.Array, norm: Any, model: Any = None) -> Any:
    """``norm`` checked, or the model's `model_intensity_range` of ``image`` (Delayed)."""
    if norm is None:
        norm = model_intensity_range(image, model)
    if isinstance(norm, Delayed):
        return norm
    vals = np.asarray(norm, dtype=np.float64)
    if vals.shape != (2,) or not np.all(np.isfinite(vals)) or not vals[1] > vals[0]:
        raise ValueError(f"norm must be two finite numbers (lo, hi) with hi > lo; got {norm!r}")
    return vals


def _probe_input(model: nn.Module, ndim: int) -> torch.Tensor:
    side = 8 * getattr(model, "alignment_px", 1)
    return torch.zeros((1, int(getattr(model, "in_channels", 1))) + (side,) * ndim)


def _probe_head(model: nn.Module, ndim: int) -> int:
    with torch.inference_mode():
        return int(model.logits(_probe_input(model, ndim)).shape[1])


def _probe_features(model: nn.Module, ndim: int) -> int:
    with torch.inference_mode():
        return int(model(_probe_input(model, ndim)).shape[1])


def _as_dask(image: Any, name: str) -> da.Array:
    if not isinstance(image, da.Array):
        if isinstance(image, np.ndarray):
            image = da.from_array(image)
        else:
            raise TypeError(f"{name} must be a dask or NumPy array; got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (Z, Y, X) array; got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers; got dtype {image.dtype}")
    return image
