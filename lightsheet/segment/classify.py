"""IN → BS by a pixel classifier on UNet features (trained from truth or sparse labels)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from lightsheet.errors import SegmentError
from lightsheet.segment._common import _as_volume, _to_numpy

__all__ = [
    "PixelClassifier",
    "classify",
    "train_pixel_classifier",
]


@dataclass(frozen=True)
class PixelClassifier:
    """Logistic regression from per-voxel features to nucleus probability.

    Attributes
    ----------
    mean, scale : (F,) ndarray of float64
        Feature standardisation.
    weights : (F,) ndarray of float64
    bias : float
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def to_dict(self) -> dict:
        """JSON-ready parameters (for storing beside a run)."""
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": float(self.bias),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PixelClassifier:
        """Inverse of :meth:`to_dict`."""
        arrays = {k: np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "weights")}
        if not arrays["mean"].shape == arrays["scale"].shape == arrays["weights"].shape:
            raise SegmentError("pixel classifier: mean, scale and weights differ in length")
        return cls(bias=float(d["bias"]), **arrays)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(F, ...) features → (...) float32 probability."""
        f = np.moveaxis(np.asarray(features, dtype=np.float64), 0, -1)
        z = ((f - self.mean) / self.scale) @ self.weights + self.bias
        return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)


def _sample_labelled(features, labels, budget: int, seed: int):
    lab = _to_numpy(labels).ravel()
    idx = np.flatnonzero(lab)
    if idx.size > budget:
        idx = np.random.default_rng(seed).choice(idx, budget, replace=False)
    f = _to_numpy(features).reshape(features.shape[0], -1)[:, idx].T.astype(np.float64)
    return f, lab[idx]


def train_pixel_classifier(
    features: da.Array,
    labels: Any,
    *,
    max_voxels: int = 200_000,
    l2: float = 1e-3,
    seed: int = 0,
) -> PixelClassifier:
    """Fit a pixel classifier on (sparse) labelled voxels.

    Parameters
    ----------
    features : (F, Z, Y, X) dask array
        Per-voxel features (e.g. from the UNet).
    labels : (Z, Y, X) array of int or bool
        ``bool``: the whole ground-truth foreground (every voxel labelled). Integers: sparse
        user labels, 0 unlabelled, 1 background, 2 nucleus.
    max_voxels : int
        Labelled voxels used (a random sample, spread over the blocks).
    l2 : float
        Ridge penalty on the standardised weights.
    seed : int
        Sampling seed.

    Returns
    -------
    PixelClassifier
        Class-balanced logistic regression (Newton iterations).
    """
    features = _as_features(features)
    labels = _as_volume(labels, "labels")
    if labels.shape != features.shape[1:]:
        raise SegmentError(
            f"`labels` shape {labels.shape} differs from the features' (Z, Y, X) "
            f"{features.shape[1:]}"
        )
    if labels.dtype == bool:
        labels = labels.astype(np.uint8) + 1  # every voxel: 1 background, 2 nucleus
    elif not np.issubdtype(labels.dtype, np.integer):
        raise SegmentError(f"`labels` must be bool or integer; got dtype {labels.dtype}")
    labels = labels.rechunk(features.chunks[1:])
    per_block = max(1, max_voxels // math.prod(labels.numblocks))
    fb, lb = features.to_delayed(), labels.to_delayed()
    parts = dask.compute(
        *[
            dask.delayed(_sample_labelled)(fb[(0, *idx)], lb[idx], per_block, seed + k)
            for k, idx in enumerate(np.ndindex(labels.numblocks))
        ]
    )
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if not set(np.unique(y).tolist()) <= {1, 2}:
        raise SegmentError(
            f"`labels` values must be 0 (unlabelled), 1 (background) or 2 (nucleus); "
            f"found {sorted(set(np.unique(y).tolist()) - {1, 2})}"
        )
    if (y == 1).sum() == 0 or (y == 2).sum() == 0:
        raise SegmentError("`labels` must mark both background (1) and nucleus (2) voxels")
    t = (y == 2).astype(np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0  # constant features carry no information
    xs = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    # balance the classes: sparse labels rarely mark as many nucleus as background voxels
    sw = np.where(t == 1, 0.5 / t.mean(), 0.5 / (1 - t.mean()))
    w = np.zeros(xs.shape[1])
    reg = l2 * np.r_[np.ones(xs.shape[1] - 1), 0.0] * len(t)
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ w, -50, 50)))
        grad = xs.T @ (sw * (p - t)) + reg * w
        hess = (xs * (sw * p * (1 - p))[:, None]).T @ xs + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return PixelClassifier(mean=mean, scale=scale, weights=w[:-1], bias=float(w[-1]))


def _as_features(features: Any) -> da.Array:
    if not isinstance(features, da.Array):
        features = da.asarray(features)
    if features.ndim != 4:
        raise SegmentError(
            f"`features` must be a 4-D (F, Z, Y, X) array; got shape {features.shape}"
        )
    if features.numblocks[0] != 1:
        features = features.rechunk({0: -1})  # all features of a voxel in one block
    return features


def _predict_block(block, classifier: PixelClassifier):
    return classifier.predict(_to_numpy(block))


def classify(features: da.Array, classifier: PixelClassifier) -> da.Array:
    """Nucleus probability per voxel from features, lazily.

    Parameters
    ----------
    features : (F, Z, Y, X) dask array
    classifier : PixelClassifier

    Returns
    -------
    (Z, Y, X) dask array of float32 in [0, 1], the features' spatial chunks.
    """
    features = _as_features(features)
    if features.shape[0] != classifier.weights.size:
        raise SegmentError(
            f"`features` has {features.shape[0]} features; the classifier was trained on "
            f"{classifier.weights.size}"
        )
    return features.map_blocks(
        _predict_block,
        classifier,
        drop_axis=0,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )
