"""A small UNet for per-pixel features, 2-D (per z-slice) or 3-D.

The network is fully convolutional with zero-padded convolutions, max pooling and
stride-2 transposed convolutions, and no normalisation layer that looks across pixels
(GroupNorm or InstanceNorm would make a block's output depend on the whole block). Two
facts about it make blockwise evaluation exact (see `lightsheet.featurize`):

* ``receptive_field_px``: output pixel ``p`` depends only on input pixels within this
  distance of ``p`` (measured exactly from the layer structure, not from the weights);
* ``alignment_px`` (``2 ** depth``): the output commutes with shifts of the input by
  multiples of this, so a block whose origin is a multiple of it sees the same pooling grid
  as the whole image.

``forward`` returns the ``F`` features per pixel (the segmentation head removed); ``head``
maps features to two logits, nucleus and nucleus boundary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as nnf

__all__ = [
    "HEAD_CLASSES",
    "CpuUNet",
    "UNet",
    "channels_last_format",
    "receptive_field_px",
]

#: The two outputs of the segmentation head, in order.
HEAD_CLASSES = ("nucleus", "boundary")


def _layers(ndim: int) -> tuple[Any, Any]:
    if ndim == 2:
        return nn.Conv2d, nn.ConvTranspose2d
    if ndim == 3:
        return nn.Conv3d, nn.ConvTranspose3d
    raise ValueError(f"ndim must be 2 (per z-slice) or 3; got {ndim!r}")


class _DoubleConv(nn.Module):
    def __init__(self, ndim: int, c_in: int, c_out: int, n_convs: int) -> None:
        super().__init__()
        conv, _ = _layers(ndim)
        self.convs = nn.ModuleList(
            conv(c_in if i == 0 else c_out, c_out, kernel_size=3, padding=1) for i in range(n_convs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = nnf.relu(conv(x))
        return x


class _Up(nn.Module):
    def __init__(self, ndim: int, c_in: int, c_out: int, n_convs: int) -> None:
        super().__init__()
        _, up = _layers(ndim)
        self.up = up(c_in, c_out, kernel_size=2, stride=2)
        self.convs = _DoubleConv(ndim, 2 * c_out, c_out, n_convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """UNet emitting ``features`` channels per pixel, with a two-class segmentation head.

    Parameters
    ----------
    ndim : {2, 3}
        2: input ``(B, 1, Y, X)`` (one z-slice per batch item); 3: input ``(B, 1, Z, Y, X)``.
    depth : int
        Number of 2× poolings; the bottleneck sees ``1 / 2**depth`` of the resolution.
    width : int
        Channels at full resolution; doubled at each level.
    features : int
        Channels of the feature map returned by `forward` (``F``).
    convs_per_level : int
        3×3 convolutions (each followed by ReLU) per level and path.
    in_channels : int
        Input channels (1 for a single fluorescence channel).

    Examples
    --------
    >>> net = UNet(depth=2, width=4, features=6).eval()
    >>> net(torch.zeros(1, 1, 30, 17)).shape
    torch.Size([1, 6, 30, 17])
    >>> net.alignment_px
    4
    """

    def __init__(
        self,
        *,
        ndim: int = 2,
        depth: int = 2,
        width: int = 8,
        features: int = 16,
        convs_per_level: int = 2,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        conv, _ = _layers(ndim)
        for name, value, low in (
            ("depth", depth, 0),
            ("width", width, 1),
            ("features", features, 1),
            ("convs_per_level", convs_per_level, 1),
            ("in_channels", in_channels, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"UNet {name} must be an integer >= {low}; got {value!r}")
        self.model_args = {
            "ndim": ndim,
            "depth": depth,
            "width": width,
            "features": features,
            "convs_per_level": convs_per_level,
            "in_channels": in_channels,
        }
        self.ndim = ndim
        self.depth = depth
        self.in_channels = in_channels
        self.n_features = features
        widths = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for level in range(depth):
            self.down.append(_DoubleConv(ndim, c_in, widths[level], convs_per_level))
            c_in = widths[level]
        self.bottom = _DoubleConv(ndim, c_in, widths[depth], convs_per_level)
        self.up = nn.ModuleList(
            _Up(ndim, widths[level + 1], widths[level], convs_per_level)
            for level in reversed(range(depth))
        )
        self.to_features = conv(widths[0], features, kernel_size=1)
        self.head = conv(features, len(HEAD_CLASSES), kernel_size=1)
        self.alignment_px = 2**depth
        self.receptive_field_px = receptive_field_px(depth=depth, convs_per_level=convs_per_level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, F, *spatial)`` of input ``(B, C, *spatial)``, any spatial size.

        Inputs whose size is not a multiple of ``alignment_px`` are zero-padded at the far
        end and the output cropped back, so any slice size works.
        """
        x, spatial = _pad_to_grid(x, self.alignment_px)
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = _max_pool(x, self.ndim)
        x = self.bottom(x)
        i = len(skips) - 1
        for up in self.up:
            x = up(x, skips[i])
            i -= 1
        x = nnf.relu(self.to_features(x))
        return _crop_to(x, spatial)

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation-head logits ``(B, 2, *spatial)``: nucleus, boundary."""
        return self.head(self.forward(x))


def _pad_to_grid(x: torch.Tensor, a: int) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad the spatial axes at the far end to multiples of ``a``; also the old sizes."""
    spatial = [int(n) for n in x.shape[2:]]
    # F.pad lists the last axis first: (x_before, x_after, y_before, y_after, ...)
    pad: list[int] = []
    padded = False
    for k in range(len(spatial) - 1, -1, -1):
        extra = (a - spatial[k] % a) % a
        pad += [0, extra]
        padded = padded or extra > 0
    if padded:
        x = nnf.pad(x, pad)
    return x, spatial


def _crop_to(x: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    if len(spatial) == 2:
        return x[:, :, : spatial[0], : spatial[1]]
    return x[:, :, : spatial[0], : spatial[1], : spatial[2]]


def _max_pool(x: torch.Tensor, ndim: int) -> torch.Tensor:
    if ndim == 2:
        return nnf.max_pool2d(x, 2)
    return nnf.max_pool3d(x, 2)


def receptive_field_px(*, depth: int, convs_per_level: int = 2) -> int:
    """Exact one-sided receptive field, in input pixels, of a `UNet` with this structure.

    Follows an impulse's support through the layers on a 1-D index grid, for every phase of
    the pooling grid: a 3-wide convolution widens it by one, a 2× max pooling keeps a coarse
    pixel if either of its two fine pixels is in it, a stride-2 transposed convolution copies
    a coarse pixel to its two fine pixels, a skip connection takes the union. Every layer is
    separable, so the per-axis extent is the same in 2-D and 3-D. The result depends on the
    structure only, never on the weights (a weight of zero can only shrink the dependence).

    Examples
    --------
    >>> receptive_field_px(depth=0, convs_per_level=2)
    2
    """
    a = 2**depth
    half = 8 * a * (convs_per_level + 2)
    n = 2 * half + 2 * a
    radius = 0
    for phase in range(a):
        x = np.zeros(n, dtype=bool)
        centre = half + phase
        x[centre] = True
        skips = []
        for _ in range(depth):
            x = _dilate(x, convs_per_level)
            skips.append(x)
            x = x.reshape(-1, 2).any(axis=1)
        x = _dilate(x, convs_per_level)
        for skip in reversed(skips):
            x = _dilate(np.repeat(x, 2) | skip, convs_per_level)
        idx = np.flatnonzero(x)
        radius = max(radius, centre - int(idx[0]), int(idx[-1]) - centre)
    return radius


def _dilate(x: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        y = x.copy()
        y[1:] |= x[:-1]
        y[:-1] |= x[1:]
        x = y
    return x


class CpuUNet(nn.Module):
    """Inference-only twin of a `UNet` for the CPU: same weights, same outputs, faster.

    Each 3×3 convolution and its ReLU are one oneDNN call
    (``torch.ops.mkldnn._convolution_pointwise`` with the ReLU as a post-op), so the
    activations are written once instead of being written, read and written again by a
    separate ReLU; weights are kept channels-last, so every activation is channels-last and
    no layout conversion happens between layers. Measured on the default model (one
    304×304 slice, one thread): ~1.7× the eager channels-last `UNet`. No autograd; build it
    from a `UNet` already in eval mode and in float32 on the CPU, with `available` true.

    Examples
    --------
    >>> net = UNet(depth=2, width=4, features=6).eval()
    >>> x = torch.rand(2, 1, 30, 17)
    >>> bool(torch.allclose(CpuUNet(net)(x), net(x), atol=1e-5)) if CpuUNet.available() else True
    True
    """

    def __init__(self, net: UNet) -> None:
        super().__init__()
        for name in ("model_args", "ndim", "depth", "in_channels", "n_features"):
            setattr(self, name, getattr(net, name))
        self.alignment_px = net.alignment_px
        self.receptive_field_px = net.receptive_field_px
        self._mem = channels_last_format(net.ndim)
        self._down = [[self._conv(c) for c in block.convs] for block in net.down]
        self._bottom = [self._conv(c) for c in net.bottom.convs]
        self._up = [
            (
                _channels_last_strides(up.up.weight.detach()),
                up.up.bias.detach().clone(),
                [self._conv(c) for c in up.convs.convs],
            )
            for up in net.up
        ]
        self._features = self._conv(net.to_features)
        self._head = self._conv(net.head)

    @staticmethod
    def available() -> bool:
        """True where this torch has oneDNN and its fused convolution."""
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_convolution_pointwise"
        )

    def _conv(self, conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        w = _channels_last_strides(conv.weight.detach())
        b = None if conv.bias is None else conv.bias.detach().clone()
        return w, b, [int(p) for p in conv.padding]

    def _run(self, x: torch.Tensor, conv: tuple, attr: str = "relu") -> torch.Tensor:
        w, b, pad = conv
        ones = [1] * len(pad)
        # private torch op: conv + ReLU in one oneDNN call, 1.65x the eager channels-last UNet
        # on a 304x304 slice (benchmarks/results/private_apis.md); tests/test_private_apis.py
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, ones, ones, 1, attr, [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, F, *spatial)``, as `UNet.forward`."""
        x, spatial = _pad_to_grid(x.contiguous(memory_format=self._mem), self.alignment_px)
        skips = []
        for block in self._down:
            for conv in block:
                x = self._run(x, conv)
            skips.append(x)
            x = _max_pool(x, self.ndim)
        for conv in self._bottom:
            x = self._run(x, conv)
        up_conv = nnf.conv_transpose2d if self.ndim == 2 else nnf.conv_transpose3d
        for w, b, convs in self._up:
            x = torch.cat([skips.pop(), up_conv(x, w, b, stride=2)], dim=1)
            for conv in convs:
                x = self._run(x, conv)
        return _crop_to(self._run(x, self._features), spatial)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation-head logits ``(B, 2, *spatial)``, as `UNet.logits`."""
        return self._run(self.forward(x), self._head, "none")


def channels_last_format(ndim: int) -> torch.memory_format:
    """Channels-last memory format of a 2-D (NHWC) or 3-D (NDHWC) network's tensors."""
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


def _channels_last_strides(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with channels-last strides, also where a dimension has size 1.

    ``contiguous(memory_format=channels_last)`` leaves a 1-channel weight (the first layer's)
    with its NCHW strides, as both layouts hold the same bytes; oneDNN then writes that
    layer's output NCHW and the next layer copies it to channels-last.
    """
    n, c, *spatial = t.shape
    strides = [c] * len(spatial)
    for k in range(len(spatial) - 2, -1, -1):
        strides[k] = strides[k + 1] * spatial[k + 1]
    return torch.empty_strided(t.shape, (c * math.prod(spatial), 1, *strides)).copy_(t)
