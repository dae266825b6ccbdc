"""Voxel-size transfer: a block resampled to a model's voxel size and back, exactly.

A model trained at one voxel size sees cells of a known size in pixels; an acquisition at
another voxel size is resampled to the model's grid on the way in and the model's output
resampled back on the way out. Both resamplings are defined on the *global* grids, so a
block computes the same values as the whole volume would, and blocks join without seams:

* voxel ``i`` of an axis has its centre at ``i * voxel_size_um`` (the project's
  convention), so the model grid of an axis of ``n`` source voxels has
  ``floor((n - 1) * source / model) + 1`` voxels over the same extent, starting at the
  same centre;
* each output value is a weighted sum of the input values around its position: linear
  interpolation (two taps) where the output is finer than the input, and where it is
  coarser a triangle filter as wide as one output voxel (the area-weighted "antialias"
  linear filter of Pillow and ``torch.nn.functional.interpolate(antialias=True)``), so
  downsampling averages instead of aliasing. Weights are renormalised where the volume's
  edge cuts the filter;
* an axis whose voxel size equals the model's is not touched (bit for bit).

`AxisMap` turns a block's output range on the source grid into the source range it reads,
the model-grid region the network runs on (its receptive field and pooling grid taken into
account) and the taps of both resamplings; `apply_taps` applies taps along one axis of a
NumPy array or a torch tensor.

Examples
--------
>>> amap = AxisMap(100, source_um=2.0, model_um=1.62)
>>> amap.n_model
123
>>> amap.identity
False
>>> plan = amap.plan(40, 60, halo=0, align=1)
>>> plan.read[0] <= 40 and plan.read[1] >= 60
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Relative difference of voxel sizes under which an axis is not resampled (float noise).
SAME_VOXEL_RTOL = 1e-6


@dataclass(frozen=True)
class Taps:
    """Sparse weights of a 1-D resampling: ``out[j] = sum_k weight[k, j] * in[index[k, j]]``.

    Attributes
    ----------
    index : (K, N) ndarray of int64
        Input positions (absolute from `taps`; relative to the array's start in a plan).
    weight : (K, N) ndarray of float32
        Weights; each column sums to 1 (unused taps have weight 0 and index 0).
    """

    index: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class AxisPlan:
    """What one block needs along one axis.

    Attributes
    ----------
    read : (int, int)
        Source range read (global source indices).
    model : (int, int)
        Model-grid range the network runs on (global model indices, on its pooling grid).
    crop : slice
        Part of the network's output kept (relative to ``model``) before resampling back.
    to_model, to_source : Taps or None
        Source → model taps (relative to ``read``) and model → source taps (relative to the
        cropped output); None where the axis is not resampled.
    """

    read: tuple[int, int]
    model: tuple[int, int]
    crop: slice
    to_model: Taps | None
    to_source: Taps | None


class AxisMap:
    """Geometry of one axis between the source grid and a model's grid.

    Parameters
    ----------
    n_source : int
        Voxels along the axis in the source volume.
    source_um, model_um : float or None
        Voxel sizes; None for either (or equal sizes) means no resampling.
    """

    def __init__(self, n_source: int, *, source_um: float | None, model_um: float | None) -> None:
        self.n_source = int(n_source)
        same = (
            source_um is None
            or model_um is None
            or abs(float(source_um) / float(model_um) - 1.0) <= SAME_VOXEL_RTOL
        )
        self.identity = same
        # source voxels per model voxel (> 1: the model grid is coarser)
        self.step = 1.0 if same else float(model_um) / float(source_um)
        if same:
            self.n_model = self.n_source
        else:
            self.n_model = int(math.floor((self.n_source - 1) / self.step + 1e-9)) + 1

    def __repr__(self) -> str:
        return f"AxisMap(n_source={self.n_source}, n_model={self.n_model}, step={self.step:.6g})"

    def model_range(self, core0: int, core1: int) -> tuple[int, int]:
        """Model-grid voxels whose outputs the source range ``[core0, core1)`` is made of."""
        if self.identity:
            return core0, core1
        return support(taps(core0, core1, 1.0 / self.step, self.n_model))

    def plan(self, core0: int, core1: int, *, halo: int, align: int) -> AxisPlan:
        """Ranges and taps for the output ``[core0, core1)`` of a network with this geometry.

        Parameters
        ----------
        core0, core1 : int
            Output range on the source grid.
        halo : int
            The network's one-sided receptive field, in model voxels (0: none on this axis).
        align : int
            The network's pooling grid, in model voxels (1: none on this axis).
        """
        if self.identity:
            r0, r1 = grid_region(core0, core1, halo, align, self.n_model)
            return AxisPlan((r0, r1), (r0, r1), slice(core0 - r0, core1 - r0), None, None)
        # the read ranges are the taps' own supports: consistent with them by construction
        to_source = taps(core0, core1, 1.0 / self.step, self.n_model)
        m0, m1 = support(to_source)
        r0, r1 = grid_region(m0, m1, halo, align, self.n_model)
        to_model = taps(r0, r1, self.step, self.n_source)
        s0, s1 = support(to_model)
        return AxisPlan(
            (s0, s1),
            (r0, r1),
            slice(m0 - r0, m1 - r0),
            _shifted(to_model, s0),
            _shifted(to_source, m0),
        )


def grid_region(core0: int, core1: int, halo: int, align: int, size: int) -> tuple[int, int]:
    """Input range for output ``[core0, core1)``: the halo either side, on the pooling grid.

    Examples
    --------
    >>> grid_region(10, 20, 3, 4, 100)
    (4, 24)
    """
    r0 = max(0, (core0 - halo) // align * align)
    # end on the pooling grid too, so the model pads with real data, not zeros
    return r0, min(size, r0 + -(-(core1 + halo - r0) // align) * align)


def _half_width(step: float) -> float:
    """Half-width (input voxels) of the filter: linear, widened to one output voxel."""
    return max(1.0, step)


def taps(out0: int, out1: int, step: float, n_in: int) -> Taps:
    """Taps of outputs ``[out0, out1)`` whose centres lie ``step`` input voxels apart.

    Output ``j`` sits at input coordinate ``j * step``; its weights are a triangle of
    half-width ``max(1, step)`` input voxels (linear interpolation, or its area-weighted
    widening when the output is coarser), renormalised where the input's ends ``0`` and
    ``n_in - 1`` cut it. Indices are input positions (absolute).

    Examples
    --------
    >>> t = taps(0, 3, 0.5, 2)
    >>> t.weight.sum(0).tolist()
    [1.0, 1.0, 1.0]
    >>> (t.index * t.weight).sum(0).tolist()  # positions 0, 0.5, 1
    [0.0, 0.5, 1.0]
    """
    w = _half_width(step)
    pos = np.arange(out0, out1, dtype=np.float64) * step
    first = np.floor(pos - w).astype(np.int64) + 1
    k = int(math.ceil(2 * w)) + 1
    index = first[None, :] + np.arange(k)[:, None]
    weight = 1.0 - np.abs(index - pos[None, :]) / w
    # a tap at the filter's edge is 0 up to rounding: exactly 0, so supports are exact
    weight[(weight < 1e-9) | (index < 0) | (index >= n_in)] = 0.0
    weight /= weight.sum(axis=0, keepdims=True)
    index = np.where(weight > 0, index, 0)
    keep = np.flatnonzero((weight > 0).any(axis=1))  # drop rows that are all zero
    return Taps(index[keep].astype(np.int64), weight[keep].astype(np.float32))


def support(t: Taps) -> tuple[int, int]:
    """The input range ``[lo, hi)`` that taps ``t`` (absolute indices) read."""
    used = t.index[t.weight > 0]
    return int(used.min()), int(used.max()) + 1


def _shifted(t: Taps, start: int) -> Taps:
    """Taps with indices relative to ``start`` (unused taps point at 0, weight 0)."""
    return Taps(np.where(t.weight > 0, t.index - start, 0), t.weight)


def apply_taps(x: Any, t: Taps | None, axis: int) -> Any:
    """Resample ``x`` (NumPy array or torch tensor) along ``axis`` with taps ``t``.

    NumPy sums the taps in a fixed order (equal inputs give equal bits in any block); torch
    multiplies by the taps' banded matrix (BLAS: equal up to float rounding).
    """
    if t is None:
        return x
    axis = axis % x.ndim
    if isinstance(x, np.ndarray):
        out = None
        for idx, w in zip(t.index, t.weight, strict=True):
            shape = [1] * x.ndim
            shape[axis] = len(w)
            term = np.take(x, idx, axis=axis) * w.reshape(shape)
            out = term if out is None else out + term
        return out
    import torch

    # a dense banded matrix and one matrix product: BLAS beats K strided gathers by far
    n_in = x.shape[axis]
    rows = np.broadcast_to(np.arange(t.weight.shape[1]), t.weight.shape)
    dense = np.zeros((t.weight.shape[1], n_in), np.float32)
    np.add.at(dense, (rows, t.index), t.weight)
    m = torch.from_numpy(dense).to(device=x.device, dtype=x.dtype)
    if axis == x.ndim - 1:
        return x @ m.T
    return torch.movedim(m @ torch.movedim(x, axis, -2), -2, axis)
