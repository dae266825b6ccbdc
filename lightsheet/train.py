"""Training the UNet on annotated volumes: images with masks or point lists.

``lightsheet train CONFIG.yaml --out MODEL.safetensors`` (`train`) reads the data sets of a
`lightsheet.config.TrainConfig`, trains a 2-D `lightsheet.unet.UNet` on them and writes a
safetensors checkpoint whose record names the data and their licences, the voxel size the
model was trained at, the normalisation, the held-out scores and the probability threshold
chosen on the held-out volumes.

Data. Every volume is read with `lightsheet.ingest.discover` and `lightsheet.stitch.stitch`
(a 3-D TIFF is an acquisition of one tile), at its own voxel size, and resampled in y and x
to the model's voxel size (`lightsheet.resample`, as featurize does at inference). Each
volume is normalised by its own robust percentiles (`lightsheet.featurize.NORM_PERCENTILES`),
as featurize normalises a whole acquisition. Training volumes are held in memory: they are
annotated crops, small by nature (`MAX_VOLUME_VOXELS`).

Targets (two head channels, `TARGETS`):

* ``nucleus``: the annotated mask (for point annotations, spheres of the nucleus diameter);
* ``centre``: a Gaussian bump of σ = `CENTRE_SIGMA` × the nucleus diameter (in µm, 3-D)
  around every annotated cell (mask component centroid, or point).

The loss is a class-weighted binary cross-entropy on the nucleus channel plus a binary
cross-entropy against the soft centre map; `lightsheet.segment.model` turns the two maps
into one instance per cell (seeds: peaks of the centre map; extent: the nucleus mask).
Why these: on the delivr-cfos patches, a foreground-only model merged touching cells and
scored lower; see ``benchmarks/results/delivr_model.md`` for the alternatives measured.

Split. Held-out volumes are whole volumes, never voxels of a training volume: by name
(``validation``) or a share (``validation_fraction``) picked evenly along the volumes'
annotated cell counts. The threshold that maximises F1 on them is the model's default.

Device. The same command runs on a CPU or a GPU (``device``, default CUDA when present);
on CUDA the forward and backward passes use automatic mixed precision.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightsheet.config import TrainConfig, TrainData
from lightsheet.errors import AnnotationError, ConfigError

#: Names of the head channels a trained model predicts, in order.
TARGETS = ("nucleus", "centre")
#: σ of the centre target, as a fraction of the nucleus diameter.
CENTRE_SIGMA = 0.375
#: Largest training volume (voxels): annotated volumes are held in memory.
MAX_VOLUME_VOXELS = 2**28
#: Range of the zoom applied to half the training crops (cells of other sizes than the
#: annotated ones: other cell types, stains and magnifications).
SCALE_RANGE = (0.75, 1.5)
#: Default UNet arguments of a trained model.
DEFAULT_MODEL_ARGS = {"ndim": 2, "depth": 2, "width": 16, "features": 16}


@dataclass
class AnnotatedVolume:
    """One training volume on the model's grid, with its annotation.

    Attributes
    ----------
    name : str
        Unique name (data set / volume).
    dataset : str
        The data set it belongs to.
    image : (Z, Y, X) ndarray of float32
        Normalised intensities (robust percentiles of this volume mapped to 0 and 1).
    nucleus : (Z, Y, X) ndarray of bool
        Annotated cell voxels.
    centres : (N, 3) ndarray of float64
        Annotated cell centres in voxels of the model's grid (z, y, x).
    fingerprint : str
        SHA-256 of the source pixels and the annotation.
    norm : (float, float)
        The intensities mapped to 0 and 1.
    """

    name: str
    dataset: str
    image: np.ndarray
    nucleus: np.ndarray
    centres: np.ndarray
    fingerprint: str
    norm: tuple[float, float]
    split: str = field(default="train")


# --------------------------------------------------------------------------- loading


def load_train_config(path: str | os.PathLike[str], *, data_root: str | None = None) -> Any:
    """Read a training YAML; relative paths are taken relative to ``data_root`` or its folder.

    Returns
    -------
    config : TrainConfig
    base : Path
        The folder relative paths were resolved against.
    """
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train: no such training config {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of training parameters")
    base = Path(data_root).resolve() if data_root else path.resolve().parent
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid training config:\n{exc}") from exc
    return config, base


def _resolve(base: Path, value: str | Path | None) -> str | None:
    if value is None:
        return None
    p = Path(value)
    return str(p if p.is_absolute() else base / p)


def model_voxel_size(config: TrainConfig, base: Path) -> tuple[float, float, float]:
    """The voxel size the model is trained at: the config's, else the first data set's."""
    if config.voxel_size_um is not None:
        return tuple(float(v) for v in config.voxel_size_um)  # type: ignore[return-value]
    first = config.data[0]
    if first.voxel_size_um is not None:
        return tuple(float(v) for v in first.voxel_size_um)  # type: ignore[return-value]
    info = _sample_info(Path(_resolve(base, first.sample)))
    return tuple(float(v) for v in info["voxel_size_um"])  # type: ignore[return-value]


def load_volumes(
    config: TrainConfig, base: Path, *, voxel_size_um: Sequence[float], resample_z: bool = True
) -> list[AnnotatedVolume]:
    """Every annotated volume of ``config``, on the grid of ``voxel_size_um``.

    z is resampled too when ``resample_z`` (models with z context, as featurize does).
    """
    volumes = []
    model_um = tuple(float(v) for v in voxel_size_um)
    for data in config.data:
        volumes += _load_data_set(data, base, model_um, resample_z)
    names = [v.name for v in volumes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"train: volume names {dupes} appear twice; name the data sets apart")
    return volumes


def _load_data_set(
    data: TrainData, base: Path, model_um: tuple, resample_z: bool
) -> list[AnnotatedVolume]:
    from lightsheet.evaluate import read_points

    out = []
    for name, source in _data_set_sources(data, base):
        image, vs, fp = _read_volume(*source, data=data)
        h = hashlib.sha256(fp.encode())
        sample = source[3]
        if sample is not None:
            cells = _sample_truth(sample, data.timepoint)
            centres = cells[["z_um", "y_um", "x_um"]].to_numpy(np.float64) / np.asarray(vs)
            nucleus = spheres_mask(centres, cells["diameter_um"].to_numpy(), image.shape, vs)
            h.update((sample / "truth" / "cells.csv").read_bytes())
        elif data.masks is not None:
            mask_path = Path(_resolve(base, data.masks.format(name=name)))
            nucleus, centres = _read_mask(mask_path, image.shape, data.min_component_voxels)
            h.update(mask_path.read_bytes())
        else:
            pts_path = Path(_resolve(base, data.points.format(name=name)))
            centres = read_points(pts_path, cell_type=data.cell_type)
            _check_inside(centres, image.shape, pts_path)
            nucleus = None  # spheres of the nucleus diameter, once it is known
            h.update(pts_path.read_bytes())
        axes = (0, 1, 2) if resample_z else (1, 2)
        image, nucleus, centres = _to_model_grid(image, nucleus, centres, vs, model_um, axes)
        lo, hi = _percentiles(image)
        out.append(
            AnnotatedVolume(
                name=f"{data.name}/{name}",
                dataset=data.name,
                image=((image - lo) / (hi - lo)).astype(np.float32),
                nucleus=nucleus,
                centres=centres,
                fingerprint="sha256:" + h.hexdigest(),
                norm=(lo, hi),
            )
        )
    if not out:
        raise AnnotationError(f"train: data set {data.name!r} has no volumes")
    return out


def _data_set_sources(data: TrainData, base: Path) -> list[tuple[str, tuple]]:
    """(volume name, (glob, pattern, voxel size, sample folder)) of each volume."""
    import glob as globlib

    if data.images is not None:
        files = sorted(globlib.glob(_resolve(base, data.images), recursive=True))
        if not files:
            raise AnnotationError(f"train: data set {data.name!r}: no files match {data.images}")
        # a 3-D TIFF is an acquisition of one tile: its own name is the pattern
        one_tile = [(f, re.escape(Path(f).name) + "$", data.voxel_size_um, None) for f in files]
        return [(Path(f).name.split(".")[0], src) for f, src in zip(files, one_tile, strict=True)]
    if data.input is not None:
        return [("volume", (_resolve(base, data.input), data.pattern, data.voxel_size_um, None))]
    sample = Path(_resolve(base, data.sample))
    info = _sample_info(sample)
    glob = str(sample / "tiles" / "*.tif")
    return [(sample.name, (glob, info["pattern"], tuple(info["voxel_size_um"]), sample))]


def _read_volume(
    glob: str, pattern: str, voxel_size_um: Sequence[float], sample: Path | None, *, data
) -> tuple[np.ndarray, tuple, str]:
    """One channel and time point of an acquisition, with ingest + stitch; its fingerprint."""
    from lightsheet.ingest import discover
    from lightsheet.stitch import stitch

    manifest = discover(glob, pattern)
    t, c = data.timepoint, data.channel
    if t >= manifest.shape[0] or c >= manifest.shape[1]:
        raise AnnotationError(
            f"train: data set {data.name!r}: {glob} has {manifest.shape[0]} time points and "
            f"{manifest.shape[1]} channels; asked for time point {t}, channel {c}"
        )
    n = math.prod(manifest.shape[2:])
    if n > MAX_VOLUME_VOXELS:
        raise AnnotationError(
            f"train: data set {data.name!r}: volume {manifest.shape[2:]} from {glob} has "
            f"{n} voxels; training volumes are held in memory, at most {MAX_VOLUME_VOXELS}: "
            "crop the annotated region"
        )
    vs = tuple(float(v) for v in voxel_size_um)
    volume = stitch(manifest, voxel_size_um=vs)[t, c].compute(scheduler="threads")
    h = hashlib.sha256(f"{volume.shape}{volume.dtype.str}".encode())
    h.update(np.ascontiguousarray(volume).tobytes())
    return volume.astype(np.float32), vs, h.hexdigest()


def _sample_info(sample: Path) -> dict:
    info_path = sample / "sample.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"train: {sample} has no sample.json; expected a folder made by `lightsheet sample`"
        )
    info = json.loads(info_path.read_text())
    if not info.get("complete", False):
        raise AnnotationError(f"train: {info_path} says the sample is incomplete")
    return info


def _sample_truth(sample: Path, timepoint: int) -> Any:
    import pandas as pd

    path = sample / "truth" / "cells.csv"
    if not path.is_file():
        raise FileNotFoundError(f"train: no ground truth {path}; expected truth/cells.csv")
    cells = pd.read_csv(path)
    need = {"z_um", "y_um", "x_um", "diameter_um"}
    if not need <= set(cells.columns):
        raise AnnotationError(f"train: {path} lacks columns {sorted(need - set(cells.columns))}")
    if "t" in cells.columns:
        cells = cells[cells["t"] == timepoint]
    return cells


def _read_mask(path: Path, shape: tuple, min_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """A mask's cells (components of at least ``min_voxels``, 26-connected) and centroids."""
    import tifffile
    from scipy import ndimage as ndi

    if not path.is_file():
        raise AnnotationError(f"train: mask {path} not found")
    mask = np.asarray(tifffile.imread(path)) != 0
    if mask.shape != tuple(shape):
        raise AnnotationError(
            f"train: mask {path} has shape {mask.shape}; its image has shape {tuple(shape)}"
        )
    labels, n = ndi.label(mask, np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    mask = keep[labels]
    idx = np.flatnonzero(keep)
    centres = np.asarray(ndi.center_of_mass(mask, labels, idx), np.float64).reshape(-1, 3)
    return mask, centres


def _check_inside(points: np.ndarray, shape: tuple, path: Path) -> None:
    bad = (points < -0.5) | (points > np.asarray(shape) - 0.5)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise AnnotationError(
            f"train: {path}: point {points[row].tolist()} (z, y, x voxels) lies outside its "
            f"volume of shape {tuple(shape)}"
        )


def spheres_mask(
    centres_vox: np.ndarray,
    diameters_um: np.ndarray | float,
    shape: Sequence[int],
    voxel_size_um: Sequence[float],
) -> np.ndarray:
    """Voxels within each cell's radius of its centre (anisotropic voxels handled).

    Parameters
    ----------
    centres_vox : (N, 3) array
        Centres in voxels (z, y, x); voxel ``i`` has its centre at ``i * voxel_size_um``.
    diameters_um : float or (N,) array
    shape : (3,) ints
    voxel_size_um : (3,) floats

    Returns
    -------
    (Z, Y, X) ndarray of bool

    Examples
    --------
    >>> m = spheres_mask(np.array([[10.0, 30.0, 30.0]]), 10.0, (20, 60, 60), (2.0, 1.0, 1.0))
    >>> ratio = float(m.sum() * 2.0 / (4 / 3 * np.pi * 5**3))  # voxels on the edge count
    >>> 1.0 <= ratio < 1.15
    True
    """
    shape = tuple(int(n) for n in shape)
    vox = np.asarray(voxel_size_um, np.float64)
    centres = np.asarray(centres_vox, np.float64).reshape(-1, 3)
    radii_um = np.broadcast_to(np.asarray(diameters_um, np.float64) / 2, (len(centres),))
    mask = np.zeros(shape, bool)
    for c, r_um in zip(centres, radii_um, strict=True):
        r = r_um / vox
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, r, strict=True))
        mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] |= d <= 1.0
    return mask


def _to_model_grid(
    image: np.ndarray,
    nucleus: np.ndarray | None,
    centres: np.ndarray,
    vs: Sequence[float],
    model_um: Sequence[float],
    axes: Sequence[int],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resample a volume (and its mask) to the model's voxel size along ``axes``.

    As featurize does: y and x always, z for models with z context (the slices they see as
    channels must be as far apart as in training).
    """
    from lightsheet.resample import AxisMap, apply_taps

    centres = np.asarray(centres, np.float64).reshape(-1, 3).copy()
    for axis in axes:
        amap = AxisMap(image.shape[axis], source_um=vs[axis], model_um=model_um[axis])
        if amap.identity:
            continue
        plan = amap.plan(0, image.shape[axis], halo=0, align=1)
        image = apply_taps(image, plan.to_model, axis)
        if nucleus is not None:
            nucleus = apply_taps(nucleus.astype(np.float32), plan.to_model, axis) >= 0.5
        centres[:, axis] /= amap.step
    return np.ascontiguousarray(image, np.float32), nucleus, centres


def _percentiles(image: np.ndarray) -> tuple[float, float]:
    from lightsheet.featurize import NORM_PERCENTILES

    lo, hi = (float(v) for v in np.percentile(image, NORM_PERCENTILES))
    return lo, hi if hi > lo else lo + 1.0


# --------------------------------------------------------------------------- targets


def nucleus_diameter_from_masks(volumes: Sequence[AnnotatedVolume], voxel_size_um) -> float:
    """Median equivalent diameter (µm) of the annotated cells of mask-annotated volumes."""
    from scipy import ndimage as ndi

    voxel_um3 = float(np.prod(voxel_size_um))
    sizes = []
    for v in volumes:
        labels, n = ndi.label(v.nucleus, np.ones((3, 3, 3), bool))
        if n:
            sizes.append(np.bincount(labels.ravel())[1:])
    if not sizes:
        raise ConfigError(
            "train: nucleus_diameter_um is needed when no data set is annotated with masks"
        )
    volume_um3 = float(np.median(np.concatenate(sizes))) * voxel_um3
    return (6.0 * volume_um3 / math.pi) ** (1.0 / 3.0)


def centre_map(
    centres_vox: np.ndarray, shape: Sequence[int], voxel_size_um: Sequence[float], sigma_um: float
) -> np.ndarray:
    """Gaussian bumps (peak 1, σ in µm) at cell centres; overlaps keep the larger value.

    Examples
    --------
    >>> m = centre_map(np.array([[2.0, 5.0, 5.0]]), (5, 11, 11), (2.0, 1.0, 1.0), 1.0)
    >>> float(m[2, 5, 5]), round(float(m[2, 5, 6]), 3)
    (1.0, 0.607)
    """
    shape = tuple(int(n) for n in shape)
    vox = np.asarray(voxel_size_um, np.float64)
    out = np.zeros(shape, np.float32)
    reach = np.ceil(3.0 * sigma_um / vox).astype(int)
    for c in np.asarray(centres_vox, np.float64).reshape(-1, 3):
        lo = np.maximum(np.floor(c).astype(int) - reach, 0)
        hi = np.minimum(np.ceil(c).astype(int) + reach + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        d2 = sum(((g - cc) * v) ** 2 for g, cc, v in zip(grids, c, vox, strict=True))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        np.maximum(out[box], np.exp(-d2 / (2 * sigma_um**2)).astype(np.float32), out=out[box])
    return out


def split_volumes(
    volumes: Sequence[AnnotatedVolume], config: TrainConfig
) -> tuple[list[AnnotatedVolume], list[AnnotatedVolume]]:
    """Training and held-out volumes (whole volumes, never parts of one).

    By name when ``config.validation`` lists them; else ``validation_fraction`` of the
    volumes: the volumes sorted by annotated cell count are cut into that many equal slices
    and the middle one of each is held out, so the held-out set spans dense and sparse
    volumes alike.
    """
    names = [v.name for v in volumes]
    if config.validation is not None:
        unknown = sorted(set(config.validation) - set(names))
        if unknown:
            raise ConfigError(f"train: validation names {unknown} are not volumes; have {names}")
        held = set(config.validation)
    else:
        if len(volumes) < 2:
            raise ConfigError(
                "train: one volume cannot be split by volume into training and validation; "
                "give at least two annotated volumes"
            )
        n_val = min(len(volumes) - 1, max(1, round(len(volumes) * config.validation_fraction)))
        # the middle volume of each of n_val equal slices of the count order: dense and
        # sparse volumes alike are held out
        order = sorted(volumes, key=lambda v: (len(v.centres), v.name))
        picks = ((np.arange(n_val) + 0.5) * len(order) / n_val).astype(int)
        held = {order[i].name for i in picks}
    train = [v for v in volumes if v.name not in held]
    val = [v for v in volumes if v.name in held]
    if not train:
        raise ConfigError("train: every volume is held out; none is left to train on")
    for v in volumes:
        v.split = "validation" if v.name in held else "train"
    return train, val


# --------------------------------------------------------------------------- training


def train(
    config: TrainConfig,
    out_path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] = ".",
    progress: Callable[[int, int, float], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train the UNet on annotated volumes and write a checkpoint with its record.

    Parameters
    ----------
    config : TrainConfig
        Data sets, split, model and optimisation settings.
    out_path : path-like
        Checkpoint to write (``.safetensors``; another suffix writes the dict form); the
        record is also written beside it as JSON (same name, ``.json``).
    base : path-like
        Folder that relative data paths are relative to.
    progress : callable, optional
        ``progress(step, steps, mean_loss)``, called every few steps.
    command : str, optional
        The command line, for the record.

    Returns
    -------
    record : dict
        How the checkpoint was made; also stored in the checkpoint.
    """
    import torch

    from lightsheet import __version__
    from lightsheet.models.checkpoint import FORMAT, save_model
    from lightsheet.unet import UNet

    t_start = time.perf_counter()
    base, out_path = Path(base), Path(out_path)
    model_um = model_voxel_size(config, base)
    args = {**DEFAULT_MODEL_ARGS, **config.model}
    if args["ndim"] != 2 or args.get("in_channels", 1) % 2 != 1:
        raise ConfigError(
            "train: models are 2-D (per z-slice) with an odd number of z-slices as input "
            f"channels (the slice and its neighbours); got {args}"
        )
    volumes = load_volumes(
        config, base, voxel_size_um=model_um, resample_z=args.get("in_channels", 1) > 1
    )
    masked = [v for v in volumes if v.nucleus is not None]
    diameter = config.nucleus_diameter_um or nucleus_diameter_from_masks(masked, model_um)
    for v in volumes:
        if v.nucleus is None:
            v.nucleus = spheres_mask(v.centres, diameter, v.image.shape, model_um)
    train_v, val_v = split_volumes(volumes, config)
    sigma_um = CENTRE_SIGMA * diameter
    targets = {
        v.name: np.stack(
            [v.nucleus.astype(np.float32), centre_map(v.centres, v.image.shape, model_um, sigma_um)]
        )
        for v in train_v
    }
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if device.type == "cpu" and config.threads:
        torch.set_num_threads(config.threads)  # else torch's default (cores, OMP_NUM_THREADS)
    net = UNet(**args).to(device)
    crop = _crop_side(train_v, config.crop_px, net.alignment_px)
    fg = float(np.mean([targets[v.name][0].mean() for v in train_v]))
    # rare foreground: weigh its voxels up, at most 5 x (1 and 5 scored alike on delivr-cfos;
    # the threshold chosen on held-out volumes absorbs the calibration)
    pos_weight = min(5.0, max(1.0, (1.0 - fg) / max(fg, 1e-6)))
    opt = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.learning_rate, total_steps=config.steps
    )
    history: list[float] = []
    losses: list[float] = []
    every = max(1, config.steps // 20)
    net.train()
    for step in range(config.steps):
        xb, yb = training_batch(train_v, targets, config.batch_size, crop, rng, net.in_channels)
        loss = _loss(net, xb.to(device), yb.to(device), pos_weight, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == config.steps:
            history.append(round(float(np.mean(losses)), 5))
            losses = []
            if progress is not None:
                progress(step + 1, config.steps, history[-1])
    net = net.eval().cpu()
    match_um = config.match_distance_um or diameter / 2.0
    validation, detection = validate(net, val_v, model_um, diameter, match_um)
    record = {
        "format": FORMAT,
        "command": command or f"lightsheet train CONFIG --out {out_path}",
        "data": _data_record(config, base, volumes),
        "data_fingerprint": _combined_fingerprint(volumes),
        "voxel_size_um": list(model_um),
        "normalisation": {
            "method": "robust percentiles of the whole volume mapped to 0 and 1",
            "percentiles": list(_norm_percentiles()),
            "per_volume": {v.name: [round(v.norm[0], 3), round(v.norm[1], 3)] for v in volumes},
        },
        "targets": list(TARGETS),
        "nucleus_diameter_um": round(float(diameter), 3),
        "centre_sigma_um": round(float(sigma_um), 3),
        "detection": detection,
        "validation": validation,
        "model_args": dict(net.model_args),
        "training": {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "crop_px": crop,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "optimizer": "AdamW + OneCycleLR",
            "loss": "BCE(nucleus, pos_weight) + BCE(centre, soft Gaussian target)",
            "pos_weight": round(pos_weight, 3),
            "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "loss_history": history,
            "train_volumes": [v.name for v in train_v],
        },
        "versions": {"lightsheet": __version__, "torch": torch.__version__},
        "duration_s": round(time.perf_counter() - t_start, 1),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model(net, out_path, record=record)
    out_path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _norm_percentiles() -> tuple[float, float]:
    from lightsheet.featurize import NORM_PERCENTILES

    return NORM_PERCENTILES


def _crop_side(volumes: Sequence[AnnotatedVolume], crop_px: int, align: int) -> int:
    """The training crop: ``crop_px``, or the smallest volume's side, on the pooling grid."""
    side = min(crop_px, *(min(v.image.shape[1:]) for v in volumes))
    side = side // align * align
    if side < align:
        raise ConfigError(
            f"train: volumes of {min(min(v.image.shape[1:]) for v in volumes)} px in y or x "
            f"are smaller than the network's pooling grid ({align} px)"
        )
    return side


def _loss(net: Any, xb: Any, yb: Any, pos_weight: float, device: Any) -> Any:
    import torch
    from torch.nn import functional as nnf

    # on a GPU, mixed precision (bfloat16 needs no loss scaling)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = net.logits(xb)
    logits = logits.float()
    pw = torch.tensor([pos_weight], device=logits.device).view(1, 1, 1, 1)
    nucleus = nnf.binary_cross_entropy_with_logits(logits[:, :1], yb[:, :1], pos_weight=pw)
    centre = nnf.binary_cross_entropy_with_logits(logits[:, 1:2], yb[:, 1:2])
    return nucleus + centre


def training_batch(
    volumes: Sequence[AnnotatedVolume],
    targets: dict[str, np.ndarray],
    n: int,
    crop: int,
    rng: np.random.Generator,
    in_channels: int = 1,
) -> tuple[Any, Any]:
    """``n`` random crops (z-slices with their z context) with targets, flipped and re-lit.

    Half the crops are centred near an annotated cell drawn uniformly from all the cells of
    all volumes (every annotation weighs the same, as in a pooled score); the others lie
    anywhere in a volume drawn uniformly. Augmentation: a zoom in y and x on half the crops
    (`SCALE_RANGE`: cells of other sizes), the 8 flips/rotations of the square, z flipped,
    a per-crop gain, offset and extra noise (robustness to brightness, background and noise
    level).
    """
    import torch

    xs, ys = [], []
    context = (in_channels - 1) // 2
    counts = np.array([len(v.centres) for v in volumes])
    for _ in range(n):
        near = counts.sum() > 0 and rng.random() < 0.5
        if near:
            i = int(np.searchsorted(np.cumsum(counts), rng.integers(counts.sum()), side="right"))
            v = volumes[i]
            c = v.centres[int(rng.integers(len(v.centres)))]
        else:
            v = volumes[int(rng.integers(len(volumes)))]
        t = targets[v.name]
        zmax = v.image.shape[0]
        # cells of other sizes: on half the crops a zoom, as far as the volume allows
        zoom = np.exp(rng.uniform(np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1])))
        zoom = max(zoom if rng.random() < 0.5 else 1.0, crop / min(v.image.shape[1:]))
        side = crop / zoom  # the window read, in volume voxels
        ymax, xmax = v.image.shape[1] - side, v.image.shape[2] - side
        if near:
            z = int(np.clip(round(c[0]), 0, zmax - 1))
            a = float(np.clip(c[1] - rng.uniform(0, side), 0, ymax))
            b = float(np.clip(c[2] - rng.uniform(0, side), 0, xmax))
        else:
            z = int(rng.integers(zmax))
            a, b = float(rng.uniform(0, ymax)), float(rng.uniform(0, xmax))
        # the slice and its z context (the volume's end slices repeat, as in featurize)
        zs = np.clip(np.arange(z - context, z + context + 1), 0, zmax - 1)
        x = _window(v.image[zs], a, b, crop, zoom)
        y = _window(t[:, z], a, b, crop, zoom)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, :, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]  # z flipped: up and down look alike
        x = x * rng.uniform(0.7, 1.4) + rng.uniform(-0.1, 0.1)
        x = x + rng.uniform(0.0, 0.03) * rng.standard_normal(x.shape)
        xs.append(np.ascontiguousarray(x, np.float32))
        ys.append(np.ascontiguousarray(y, np.float32))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _window(planes: np.ndarray, a: float, b: float, crop: int, zoom: float) -> np.ndarray:
    """``crop`` × ``crop`` pixels of each plane from ``(a, b)`` on, magnified by ``zoom``."""
    if zoom == 1.0 and a == int(a) and b == int(b):
        return planes[:, int(a) : int(a) + crop, int(b) : int(b) + crop]
    from scipy import ndimage as ndi

    g = np.arange(crop, dtype=np.float64) / zoom
    yy, xx = np.meshgrid(a + g, b + g, indexing="ij")
    return np.stack([ndi.map_coordinates(p, [yy, xx], order=1, mode="nearest") for p in planes])


# --------------------------------------------------------------------------- validation

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


def _data_record(config: TrainConfig, base: Path, volumes: Sequence[AnnotatedVolume]) -> list:
    out = []
    for data in config.data:
        lic = _resolve(base, data.licence_file)
        entry = {
            "name": data.name,
            "licence": data.licence,
            "source": data.source,
            "voxel_size_um": list(data.voxel_size_um) if data.voxel_size_um else None,
            "annotation": "masks" if data.masks else "points" if data.points else "sample truth",
            "volumes": [
                {
                    "name": v.name,
                    "split": v.split,
                    "shape_zyx": list(v.image.shape),
                    "n_cells": len(v.centres),
                    "fingerprint": v.fingerprint,
                }
                for v in volumes
                if v.dataset == data.name
            ],
        }
        if lic is not None:
            if not Path(lic).is_file():
                raise FileNotFoundError(f"train: licence_file {lic} of {data.name!r} not found")
            text = Path(lic).read_text(errors="replace")
            entry["licence_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            entry["licence_text"] = text.strip()
        out.append(entry)
    return out


def _combined_fingerprint(volumes: Sequence[AnnotatedVolume]) -> str:
    h = hashlib.sha256()
    for v in sorted(volumes, key=lambda v: v.name):
        h.update(f"{v.name}:{v.fingerprint}:{v.split}".encode())
    return "sha256:" + h.hexdigest()
