"""The UNet on one in-memory region: the per-block kernel of `lightsheet.featurize`.

`run_model` normalises a region, resamples it to the model's voxel size where the model
declares one (`lightsheet.resample`), runs the network (2-D models slice by slice, batched
up to ``pixels_per_pass`` pixels on a CPU; CuPy regions stay on the GPU), crops the output to
the block and resamples it back. `model_geometry` gives the halo (receptive field) and the
pooling grid a block's region must respect; `_block_task` is what the lift runs per task.
The weights travel as a `_ModelPayload`: sent once to each worker, built there once per
device.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import torch
from dask.base import tokenize
from torch import nn

from lightsheet.errors import ConfigError, ModelError
from lightsheet.regions import Region
from lightsheet.resample import AxisMap, Taps, apply_taps
from lightsheet.unet import CpuUNet, UNet, channels_last_format

__all__ = [
    "CPU_PIXELS_PER_PASS",
    "model_geometry",
    "model_voxel_size_um",
    "run_model",
    "z_context",
]

#: Pixels per forward pass on a CPU: z-slices are batched up to it, and a 2-D model's
#: neighbouring chunks share one task while one slice of their region fits in it. Measured
#: (default model, one thread): ~4.2 Mpx/s for passes of 2**18 px, ~3.4 at 2**16, ~1.7 at 2**20.
CPU_PIXELS_PER_PASS = 2**18


# --------------------------------------------------------------------------- geometry


def model_geometry(model: nn.Module) -> tuple[int, int, int]:
    """Spatial dims, one-sided receptive field and pooling-grid alignment of ``model``.

    Taken from the model's ``ndim``, ``receptive_field_px`` and ``alignment_px`` attributes
    (a `UNet` and its TorchScript export carry them); a model without them is measured: the
    receptive field by perturbing one input pixel at every phase, the alignment as the
    smallest power-of-two shift the output follows exactly.

    Returns
    -------
    ndim, halo_px, alignment_px : int
    """
    ndim = int(getattr(model, "ndim", 2))
    halo = getattr(model, "receptive_field_px", None)
    align = getattr(model, "alignment_px", None)
    if halo is None or align is None:
        halo, align = _probe_geometry(model, ndim)
    return ndim, int(halo), int(align)


@torch.inference_mode()
def _probe_geometry(model: nn.Module, ndim: int, *, n: int = 256) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1) + (n,) * ndim, generator=gen)
    y = model(x)
    mid = slice(n // 2 - n // 8, n // 2 + n // 8)
    align = None
    for s in (1, 2, 4, 8, 16, 32, 64):
        ys = model(x[(..., *[slice(s, None)] * ndim)])
        a = y[(..., *[slice(mid.start, mid.stop)] * ndim)]
        b = ys[(..., *[slice(mid.start - s, mid.stop - s)] * ndim)]
        if torch.allclose(a, b, atol=1e-5, rtol=1e-4):
            align = s
            break
    if align is None:
        raise ModelError(
            "model: output does not follow shifts of the input by up to 64 pixels; "
            "cannot featurize it block by block without seams"
        )
    halo = 0
    for phase in range(align):
        x2 = x.clone()
        c = n // 2 + phase
        x2[(0, 0, *(c,) * ndim)] += 1.0
        changed = (model(x2) - y).abs().amax(dim=(0, 1)) > 0
        for axis in range(ndim):
            other = tuple(d for d in range(ndim) if d != axis)
            idx = torch.nonzero(changed.any(dim=other) if other else changed).flatten()
            if idx.numel():
                halo = max(halo, c - int(idx.min()), int(idx.max()) - c)
    if halo >= n // 2 - align:
        raise ModelError(f"model: receptive field larger than {n // 2} px; too large to probe")
    return halo, align


# --------------------------------------------------------------------------- the kernel


class _ModelPayload:
    """The weights, sent once to each worker; modules are built there once per device."""

    def __init__(self, model: nn.Module) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(model, buf)
            self.kind, self.blob = "torchscript", buf.getvalue()
        elif isinstance(model, UNet):
            state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
            self.kind, self.blob = "unet", (dict(model.model_args), state)
        else:
            self.kind, self.blob = "module", model
        self.token = tokenize(self.kind, _fingerprint(model))
        # what the kernel needs to know without building the module
        self.ndim = int(getattr(model, "ndim", 2))
        self.resample_z = self.ndim == 3 or z_context(model) > 0
        self.voxel_size_um = model_voxel_size_um(model)
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[tuple[str, str], nn.Module] = {}

    def __getstate__(self) -> dict[str, Any]:
        keep = ("kind", "blob", "token", "ndim", "resample_z", "voxel_size_um")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __dask_tokenize__(self) -> str:
        return self.token

    def module(self, device: torch.device, precision: torch.dtype) -> nn.Module:
        key = (str(device), str(precision))
        with self._lock:
            if key not in self._modules:
                if self.kind == "torchscript":
                    net = torch.jit.load(io.BytesIO(self.blob), map_location="cpu")
                elif self.kind == "unet":
                    args, state = self.blob
                    net = UNet(**args)
                    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
                else:  # a copy: moving to a device or dtype must not touch the caller's
                    net = copy.deepcopy(self.blob)
                net = net.eval().to(device=device, dtype=precision)
                cpu = device.type == "cpu"
                if cpu and isinstance(net, UNet) and precision == torch.float32:
                    if CpuUNet.available():  # fused conv + ReLU, channels-last (unet.py)
                        net = CpuUNet(net)
                if cpu and not isinstance(net, (torch.jit.ScriptModule, CpuUNet)):
                    # channels-last convolutions are ~30 % faster with oneDNN on CPU
                    net = net.to(memory_format=_channels_last(net))
                self._modules[key] = net
            return self._modules[key]


def _channels_last(net: nn.Module) -> torch.memory_format:
    return channels_last_format(getattr(net, "ndim", 2))


def _fingerprint(model: nn.Module) -> str:
    sha = getattr(model, "checkpoint_sha256", None)
    h = hashlib.sha256(str(sha).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _set_torch_threads() -> None:
    """Share this worker's cores between Dask's threads so torch does not oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        worker = None
    if worker is not None:
        # a nanny sets OMP_NUM_THREADS per worker process: that is the cluster's choice
        omp = os.environ.get("OMP_NUM_THREADS")
        n = int(omp) if omp and omp.isdigit() else (cores or 1) // worker.state.nthreads
    elif threading.current_thread() is threading.main_thread():
        # called directly, not from a Dask thread pool: all cores, unless the user chose
        # with torch's own variable (on a busy shared machine 1 thread can be much faster)
        omp = os.environ.get("OMP_NUM_THREADS")
        n = int(omp) if omp and omp.isdigit() else cores or 1
    else:
        n = (cores or 1) // max(1, int(dask.config.get("num_workers", None) or cores or 1))
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _xp(a: Any) -> Any:
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _to_numpy(a: Any) -> np.ndarray:
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def run_model(
    region: Any,
    model: nn.Module | _ModelPayload,
    *,
    norm: Sequence[float],
    crop: tuple[slice, slice, slice] | None = None,
    mode: str = "features",
    dtype: Any = np.float32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    voxel_size_um: Sequence[float] | None = None,
    taps: tuple[tuple[Taps | None, Taps | None], ...] | None = None,
    pixels_per_pass: int = CPU_PIXELS_PER_PASS,
) -> Any:
    """Run the network on one in-memory region: the per-block kernel.

    Parameters
    ----------
    region : (Z, Y, X) ndarray (NumPy or CuPy)
        Raw intensities; normalised here with ``norm``.
    model : nn.Module
        Feature network (2-D: run per z-slice, ``batch_size`` slices at a time; 3-D: the
        whole region at once).
    norm : (2,) sequence of float
        Intensities mapped to 0 and 1.
    crop : tuple of slices, optional
        Part of the network's output to return (the block's core), on the model's grid.
    mode : {"features", "head", "probability"} or ("probability", k)
        Features ``(F, Z, Y, X)``, every head channel's probability ``(K, Z, Y, X)``, or
        head channel ``k``'s (default 0, the nucleus) ``(Z, Y, X)``.
    dtype : dtype
        Output dtype.
    batch_size : int
        z-slices per forward pass (2-D models; on a CPU at most ``pixels_per_pass`` pixels).
    device : str or torch.device, optional
        None: CUDA if available (half precision there), else CPU (float32).
    voxel_size_um : (3,) floats, optional
        Voxel size of ``region`` taken as a whole volume: it is resampled to the model's
        voxel size (`model_voxel_size_um`) and the output back (the whole-volume reference
        of `featurize`'s blocks). Not with ``taps`` or ``crop``.
    taps : per axis (z, y, x) ``(to_model, to_source)``, optional
        The block's resampling (`lightsheet.resample.AxisPlan`), set by `featurize`.
    pixels_per_pass : int
        Largest forward pass on a CPU, in pixels (default `CPU_PIXELS_PER_PASS`).

    Returns
    -------
    out : (F, Z, Y, X), (Z, Y, X) or (K, Z, Y, X) array, NumPy (CuPy if ``region`` is CuPy)
    """
    payload = model if isinstance(model, _ModelPayload) else _ModelPayload(model)
    if voxel_size_um is not None:
        if taps is not None or crop is not None:
            raise ValueError("run_model: give voxel_size_um, or taps and crop; not both")
        crop, taps = _whole_region_plan(region.shape, voxel_size_um, payload)
    is_cupy = _xp(region) is not np
    # a CuPy block stays on its GPU unless a device is asked for
    dev = _resolve_device("cuda" if is_cupy and device is None else device)
    precision = torch.float16 if dev.type == "cuda" else torch.float32
    net = payload.module(dev, precision)
    ndim = int(getattr(net, "ndim", 2))
    context = z_context(net)
    if mode == "probability":
        mode = ("probability", 0)
    one = mode != "features" and mode != "head"  # one head channel: (Z, Y, X)
    crop = crop or (slice(None),) * 3
    taps = taps if taps is not None else ((None, None),) * 3
    to_model, to_source = (tuple(t[k] for t in taps) for k in (0, 1))
    if ndim == 2 and not context and (to_model[0] is not None or to_source[0] is not None):
        raise ValueError("run_model: a 2-D model without z context is resampled in y and x only")
    lo, hi = (float(v) for v in np.asarray(norm, dtype=np.float64))
    scale = 1.0 / (hi - lo)
    if dev.type == "cpu":
        _set_torch_threads()
    mem = _channels_last(net) if dev.type == "cpu" else torch.contiguous_format
    if is_cupy:
        x_all = torch.from_dlpack(region.astype("float32")).to(dev)
    else:
        x_all = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32)).to(dev)
    to_host = dev.type == "cpu" and not is_cupy
    out_dtype = np.dtype(dtype)
    # the output is resampled along z only once every model slice is done
    stream = to_host and to_source[0] is None
    outs: list[torch.Tensor] = []
    out_np: np.ndarray | None = None
    with torch.inference_mode():
        if ndim == 2:
            # z to the model's grid first (models with z context; the filter is separable)
            x_all = apply_taps(x_all, to_model[0], 0)
            if dev.type == "cpu":
                # on a CPU, small passes keep the activations in cache: faster than big batches
                per_slice = math.prod(
                    region.shape[a] if t is None else t.weight.shape[1]
                    for a, t in ((1, to_model[1]), (2, to_model[2]))
                )
                batch_size = max(1, min(batch_size, pixels_per_pass // per_slice))
            zs = range(x_all.shape[0])[crop[0]]
            batches = [zs[i : i + batch_size] for i in range(0, len(zs), batch_size)]
            inputs = (_with_context(x_all, b, context) for b in batches)
        else:
            inputs = iter([x_all[None, None]])
        z_done = 0
        for x in inputs:
            # to the model's grid (before normalising: the weights sum to 1 either way)
            for axis in range(3 - ndim, 3):
                x = apply_taps(x, to_model[axis], axis - 3)
            x = ((x - lo) * scale).to(precision).contiguous(memory_format=mem)
            if mode == "features":
                y = net(x)
            elif mode == "head":
                y = net.logits(x).sigmoid()
            else:  # ("probability", channel)
                y = net.logits(x)[:, mode[1] : mode[1] + 1].sigmoid()
            if ndim == 2:
                y = y[:, :, crop[1], crop[2]].transpose(0, 1)  # (F, B, Y, X)
            else:
                y = y[0][:, crop[0], crop[1], crop[2]]
            for axis in (1, 2) if ndim == 2 else (0, 1, 2):  # back to the source grid
                y = apply_taps(y, to_source[axis], axis - 3)
            if stream:
                # one pass gathers the strided view and casts into the output
                if out_np is None:
                    n_z = len(zs) if ndim == 2 else y.shape[1]
                    out_np = np.empty((y.shape[0], n_z, *y.shape[2:]), dtype=out_dtype)
                if out_dtype in _TORCH_DTYPES:  # torch casts ~4x faster than a strided NumPy copy
                    y = y.to(_TORCH_DTYPES[out_dtype])
                out_np[:, z_done : z_done + y.shape[1]] = y.numpy()
                z_done += y.shape[1]
            else:
                outs.append(y if ndim == 3 else y.float())
    if stream:
        assert out_np is not None
        return out_np[0] if one else out_np
    out = torch.cat(outs, dim=1)
    if ndim == 2:
        out = apply_taps(out, to_source[0], 1)  # model slices back to the source's z
    out = out.to(_TORCH_DTYPES.get(out_dtype, torch.float32))
    if one:
        out = out[0]
    if is_cupy:
        import cupy

        if out.is_cuda:
            return cupy.from_dlpack(out.contiguous()).astype(out_dtype, copy=False)
        return cupy.asarray(out.numpy()).astype(out_dtype, copy=False)
    return out.cpu().numpy().astype(out_dtype, copy=False)


def _with_context(x_all: torch.Tensor, zs: range, context: int) -> torch.Tensor:
    """Slices ``zs`` of ``x_all`` as a batch ``(B, 2k+1, Y, X)`` with ``k`` neighbours each side.

    Neighbours past the region's ends repeat its first or last slice. A region ends only
    where the volume does (it carries ``k`` slices of halo elsewhere), so this is the
    volume's own edge rule, the same for every block.
    """
    if context == 0:
        return x_all[zs.start : zs.stop : zs.step, None]
    offsets = torch.arange(-context, context + 1)
    idx = (torch.tensor(list(zs))[:, None] + offsets[None, :]).clamp(0, x_all.shape[0] - 1)
    return x_all[idx.to(x_all.device)]


def z_context(model: nn.Module) -> int:
    """Neighbouring z-slices a 2-D model sees on each side: ``(in_channels - 1) // 2``.

    A 2-D model with ``in_channels = 2k + 1`` takes the slice it predicts and ``k``
    neighbours on each side as its input channels (z context); a 3-D model has none.
    """
    c = int(getattr(model, "in_channels", 1))
    if int(getattr(model, "ndim", 2)) == 3:
        if c != 1:
            raise ModelError(f"model: a 3-D model must take 1 input channel; got {c}")
        return 0
    if c < 1 or c % 2 == 0:
        raise ModelError(
            f"model: a 2-D model takes an odd number of z-slices as channels (the slice and "
            f"its neighbours); got in_channels={c}"
        )
    return (c - 1) // 2


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _whole_region_plan(shape: Sequence[int], voxel_size_um: Any, payload: _ModelPayload) -> tuple:
    """Crop and taps of a region taken as a whole volume (`run_model`'s reference path)."""
    maps = _axis_maps(shape, voxel_size_um, payload.voxel_size_um, payload.resample_z)
    plans = [m.plan(0, n, halo=0, align=1) for m, n in zip(maps, shape, strict=True)]
    return tuple(p.crop for p in plans), tuple((p.to_model, p.to_source) for p in plans)


def _block_task(padded: Any, *, region: Region, payload: _ModelPayload, norm: Any, grid: Any,
                opts: dict) -> Any:  # fmt: skip
    """`run_model` on one task's region, cropped and resampled as `_plans` says."""
    plans = _plans(region.start, region.stop, *grid)
    crop, taps = tuple(p.crop for p in plans), tuple((p.to_model, p.to_source) for p in plans)
    return run_model(padded, payload, norm=norm, crop=crop, taps=taps, **opts)


def _plans(start: Sequence[int], stop: Sequence[int], maps: Any, halos: Any, aligns: Any) -> list:
    """Per axis, what the network reads and crops for the output ``[start, stop)``."""
    return [
        m.plan(c0, c1, halo=h, align=a)
        for c0, c1, m, h, a in zip(start, stop, maps, halos, aligns, strict=True)
    ]


# --------------------------------------------------------------------------- voxel size


def model_voxel_size_um(model: nn.Module) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) in µm a model was trained at, when it declares one.

    From the model's ``voxel_size_um`` attribute (set by `load_model` from the record),
    else its ``record["voxel_size_um"]``; None for a model that declares none.
    """
    vs = getattr(model, "voxel_size_um", None)
    if vs is None:
        vs = (getattr(model, "record", None) or {}).get("voxel_size_um")
    if vs is None:
        return None
    vs = tuple(float(v) for v in vs)
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise ModelError(f"model: voxel_size_um must be 3 positive numbers (z, y, x); got {vs}")
    return vs  # type: ignore[return-value]


def _axis_maps(
    shape: Sequence[int], voxel_size_um: Any, model_um: Any, resample_z: bool
) -> tuple[AxisMap, ...]:
    """Per axis (z, y, x): the image's grid against the model's.

    z is resampled for 3-D models and for 2-D models with z context (their neighbouring
    slices must be as far apart as in training); a 2-D model without it sees one slice, at
    any spacing.
    """
    if voxel_size_um is not None:
        vs = np.asarray(voxel_size_um, dtype=np.float64)
        if vs.shape != (3,) or not np.all(np.isfinite(vs)) or not np.all(vs > 0):
            raise ConfigError(
                f"voxel_size_um must be 3 positive numbers (z, y, x); got {voxel_size_um!r}"
            )
    resampled = voxel_size_um is not None and model_um is not None
    return tuple(
        AxisMap(
            n,
            source_um=float(voxel_size_um[a]) if resampled and (a or resample_z) else None,
            model_um=float(model_um[a]) if resampled and (a or resample_z) else None,
        )
        for a, n in enumerate(shape)
    )
