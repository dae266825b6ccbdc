"""What the model learns: the head targets, the held-out split and the training batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightsheet.config import TrainConfig
from lightsheet.errors import ConfigError
from lightsheet.train.data import AnnotatedVolume

__all__ = [
    "CENTRE_SIGMA",
    "SCALE_RANGE",
    "TARGETS",
    "centre_map",
    "nucleus_diameter_from_masks",
    "split_volumes",
    "training_batch",
]

#: Names of the head channels a trained model predicts, in order.
TARGETS = ("nucleus", "centre")
#: σ of the centre target, as a fraction of the nucleus diameter.
CENTRE_SIGMA = 0.375
#: Range of the zoom applied to half the training crops (cells of other sizes than the
#: annotated ones: other cell types, stains and magnifications).
SCALE_RANGE = (0.75, 1.5)


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
