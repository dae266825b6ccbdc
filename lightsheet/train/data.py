"""Training data: annotated volumes read, annotated and put on the model's grid."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightsheet.config import TrainConfig, TrainData
from lightsheet.errors import AnnotationError, ConfigError, InputFilesError

__all__ = [
    "MAX_VOLUME_VOXELS",
    "AnnotatedVolume",
    "load_train_config",
    "load_volumes",
    "model_voxel_size",
    "spheres_mask",
]

#: Largest training volume (voxels): annotated volumes are held in memory.
MAX_VOLUME_VOXELS = 2**28


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
        Normalised intensities (this volume's `lightsheet.featurize.norm_range` of the
        config's ``normalisation`` mapped to 0 and 1).
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
        raise InputFilesError(f"train: no such training config {path}")
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
        volumes += _load_data_set(data, base, model_um, resample_z, config.normalisation)
    names = [v.name for v in volumes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"train: volume names {dupes} appear twice; name the data sets apart")
    return volumes


def _load_data_set(
    data: TrainData, base: Path, model_um: tuple, resample_z: bool, normalisation: str
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
        lo, hi = _norm_range(image, normalisation)
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
        raise InputFilesError(
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
        raise InputFilesError(f"train: no ground truth {path}; expected truth/cells.csv")
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


def _norm_range(image: np.ndarray, method: str) -> tuple[float, float]:
    """Intensities mapped to 0 and 1, as featurize maps a whole acquisition's."""
    from lightsheet.featurize import norm_range

    lo, hi = (float(v) for v in norm_range(image, method))
    return lo, hi
