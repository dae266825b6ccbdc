"""Per-pixel features from a pretrained UNet, block by block, without seams.

A block of the output is computed from an input region that reaches at least the
network's receptive field past the block on every side, and whose origin lies on the
network's pooling grid (a multiple of ``2**depth`` in global coordinates). With both, each
output pixel sees exactly the inputs, padding and pooling windows it sees when the network
runs on the whole slice, so blocks join without seams (up to float rounding).

Checkpoints are read without running code from them: the dict form through
``torch.load(weights_only=True)``, safetensors through ``safetensors``, TorchScript through
``torch.jit.load`` (an archive of TorchScript code and tensors, no Python pickles of
arbitrary objects).

Intensities are normalised by robust percentiles of the whole volume (1 and 99.8 %, the
convention of CSBDeep/StarDist), estimated from a strided subsample so every block uses the
same mapping.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from scipy import ndimage as ndi
from torch import nn

from lightsheet.errors import ModelError
from lightsheet.models import checkpoint_path
from lightsheet.regions import is_stored
from lightsheet.unet import HEAD_CLASSES, CpuUNet, UNet, channels_last_format

#: Percentiles of the intensity distribution mapped to 0 and 1 before the network.
NORM_PERCENTILES = (1.0, 99.8)
#: Upper bound on voxels read by the percentile estimate (a strided subsample).
NORM_MAX_SAMPLES = 2**21
#: Pixels per forward pass on a CPU: z-slices are batched up to it, and a 2-D model's
#: neighbouring chunks share one task while one slice of their region fits in it. Measured
#: (default model, one thread): ~4.2 Mpx/s for passes of 2**18 px, ~3.4 at 2**16, ~1.7 at 2**20.
CPU_PIXELS_PER_PASS = 2**18
_FORMAT = "lightsheet-unet/1"


# --------------------------------------------------------------------------- checkpoints


def load_model(path: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load a UNet checkpoint safely, in eval mode on the CPU.

    Parameters
    ----------
    path : path-like, optional
        A ``.safetensors`` file with ``model_args`` in its metadata, a ``torch.save`` file
        holding ``{"model_args": {...}, "model_state": {...}}``, or a TorchScript archive.
        None loads the bundled default model.

    Returns
    -------
    model : torch.nn.Module
        `lightsheet.unet.UNet` (or the TorchScript module) in eval mode, with
        ``receptive_field_px`` and ``alignment_px`` attributes, plus ``record`` (how it was
        made, when the file says) and ``checkpoint_sha256``.

    Raises
    ------
    ModelError
        Missing or unreadable file, a pickle that would need to run code, unknown
        ``model_args``, or weights whose names or shapes do not match the architecture.

    Examples
    --------
    >>> model = load_model()
    >>> model.n_features
    16
    """
    path = checkpoint_path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix == ".safetensors":
        model, record = _load_safetensors(data, path)
    elif _is_torchscript(data):
        model, record = _load_torchscript(data, path), {}
    else:
        model, record = _load_dict(data, path)
    model.eval()
    model.record = record
    model.checkpoint_sha256 = digest
    return model


def save_model(
    model: UNet, path: str | os.PathLike[str], *, record: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` as ``.safetensors`` (metadata: args + record) or a dict ``.pt``.

    Parameters
    ----------
    model : UNet
        The network to save.
    path : path-like
        Target file; the suffix chooses the format (``.safetensors``, else the dict form).
    record : dict, optional
        JSON-serialisable record of how the model was made.

    Returns
    -------
    path : Path
    """
    if not isinstance(model, UNet):
        raise ModelError(f"save_model: expected a lightsheet UNet, got {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {"format": _FORMAT, "model_args": json.dumps(model.model_args)}
        if record is not None:
            meta["record"] = json.dumps(record)
        # bytes, then an ordinary write: the file gets the usual permissions (umask)
        path.write_bytes(save(state, metadata=meta))
    else:
        ckpt: dict[str, Any] = {"model_args": dict(model.model_args), "model_state": state}
        if record is not None:
            ckpt["record"] = json.loads(json.dumps(record))
        torch.save(ckpt, path)
    return path


def _is_torchscript(data: bytes) -> bool:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        # torch.jit.save writes the module's TorchScript source under <archive>/code/
        return any(name.split("/")[1:2] == ["code"] for name in zf.namelist())


def _load_torchscript(data: bytes, path: Path) -> nn.Module:
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # any loader failure is reported with the file name
        raise ModelError(f"model: cannot load {path} as TorchScript: {exc}") from exc


def _load_safetensors(data: bytes, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    try:
        state = load_tensors(data)
        meta = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"model: cannot read {path} as safetensors: {exc}") from exc
    if "model_args" not in meta:
        raise ModelError(
            f"model: {path} has no 'model_args' in its safetensors metadata; expected the "
            "UNet arguments as JSON (written by lightsheet.featurize.save_model)"
        )
    args = json.loads(meta["model_args"])
    record = json.loads(meta["record"]) if "record" in meta else {}
    return _build(args, state, path), record


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # the header is an 8-byte little-endian length followed by JSON
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def _load_dict(data: bytes, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            # plain pickle files use newer protocols; the weights-only unpickler still checks
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"model: refused to load {path}: it is a pickle that needs code to be run "
            f"(weights_only=True refused it: {str(exc).splitlines()[0]}). Only plain "
            "{'model_args', 'model_state'} dicts of tensors, safetensors or TorchScript files "
            "are loaded; re-save the weights in one of those forms"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"model: cannot read {path} as a torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"model_args", "model_state"} <= set(ckpt):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(
            f"model: {path} holds {found}; expected a dict with keys 'model_args' and 'model_state'"
        )
    return _build(ckpt["model_args"], ckpt["model_state"], path), dict(ckpt.get("record") or {})


#: Largest model a checkpoint's metadata may describe (weights, estimated before building).
MAX_MODEL_PARAMETERS = 100_000_000
#: Bounds of each UNet argument a checkpoint's metadata may give (inclusive).
MODEL_ARG_BOUNDS = {
    "ndim": (2, 3),
    "depth": (0, 12),
    "width": (1, 4096),
    "features": (1, 4096),
    "convs_per_level": (1, 16),
    "in_channels": (1, 64),
}


def check_model_args(args: dict[str, Any], path: Path) -> None:
    """Refuse checkpoint metadata describing a model out of bounds, before building it.

    Each argument must be an integer within `MODEL_ARG_BOUNDS`, and the weights they imply
    (estimated as ``(convs_per_level + 2) * 3**ndim * width_l**2`` per level, within 2x of
    the true count) at most `MAX_MODEL_PARAMETERS`; metadata such as ``{"depth": 1e9}``
    would otherwise allocate a gigantic network before the weights are compared.

    Raises
    ------
    ModelError
        Naming the file, the argument, its value and the bounds.
    """
    for name, value in args.items():
        lo, hi = MODEL_ARG_BOUNDS.get(name, (None, None))
        if lo is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ModelError(
                f"model: {path}: model_args {name}={value!r}; expected an integer in [{lo}, {hi}]"
            )
    defaults = {"ndim": 2, "depth": 2, "width": 8, "convs_per_level": 2}
    a = {**defaults, **{k: v for k, v in args.items() if k in defaults}}
    kernel = 3 ** a["ndim"]
    widths = [a["width"] * 2**level for level in range(a["depth"] + 1)]
    estimate = sum((a["convs_per_level"] + 2) * kernel * w**2 for w in widths)
    if estimate > MAX_MODEL_PARAMETERS:
        raise ModelError(
            f"model: {path}: model_args {args} describe about {estimate:,} weights; expected "
            f"at most {MAX_MODEL_PARAMETERS:,}"
        )


def _build(args: Any, state: Any, path: Path) -> UNet:
    known = {"ndim", "depth", "width", "features", "convs_per_level", "in_channels"}
    if not isinstance(args, dict):
        raise ModelError(f"model: {path}: model_args must be a dict; got {type(args).__name__}")
    unknown = sorted(set(args) - known)
    if unknown:
        raise ModelError(
            f"model: {path}: unknown model_args {unknown}; expected some of {sorted(known)}"
        )
    check_model_args(args, path)
    try:
        model = UNet(**args)
    except ValueError as exc:
        raise ModelError(f"model: {path}: invalid model_args {args}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"model: {path}: model_state must be a dict of tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("shape mismatches [" + "; ".join(shapes) + "]")
        raise ModelError(f"model: {path}: weights do not match UNet({args}): " + ", ".join(parts))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model


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


# --------------------------------------------------------------------------- normalisation


def intensity_range(
    image: da.Array,
    *,
    percentiles: Sequence[float] = NORM_PERCENTILES,
    max_samples: int = NORM_MAX_SAMPLES,
) -> Delayed:
    """Lazy robust intensity range ``[lo, hi]`` of ``image`` from a strided subsample.

    Parameters
    ----------
    image : (Z, Y, X) dask array
    percentiles : (2,) sequence of float
        Lower and upper percentile in [0, 100].
    max_samples : int
        Upper bound on the voxels that enter the estimate.

    Returns
    -------
    range : Delayed
        Computes to a float64 array ``[lo, hi]`` with ``hi > lo``.
    """
    lo_p, hi_p = (float(p) for p in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100; got {percentiles!r}")
    image = _as_dask(image, "image")
    step = max(1, math.ceil((image.size / max(1, max_samples)) ** (1.0 / image.ndim)))
    sub = image[(slice(None, None, step),) * image.ndim]
    return dask.delayed(_percentile_range, pure=True)(sub, lo_p, hi_p)


def _percentile_range(sample: Any, lo_p: float, hi_p: float) -> np.ndarray:
    sample = _to_numpy(sample).astype(np.float64, copy=False).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.array([0.0, 1.0])
    lo, hi = np.percentile(sample, [lo_p, hi_p])
    if not hi > lo:  # a constant image: any positive scale keeps it constant
        hi = lo + 1.0
    return np.array([lo, hi], dtype=np.float64)


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
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._modules: dict[tuple[str, str], nn.Module] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "blob": self.blob, "token": self.token}

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
        n = cores or 1  # called directly, not from a Dask thread pool
    else:
        n = (cores or 1) // max(1, int(dask.config.get("num_workers", None) or cores or 1))
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _concat_nested(parts: Any, axis: int = 0) -> Any:
    """``np.block`` for NumPy or CuPy: nested lists (z, y, x) of blocks into one array."""
    if not isinstance(parts, list):
        return parts
    arrays = [_concat_nested(p, axis + 1) for p in parts]
    if len(arrays) == 1:
        return arrays[0]
    return _xp(arrays[0]).concatenate(arrays, axis=axis)


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
        Part of the region to return (the block's core).
    mode : {"features", "probability"}
        Features ``(F, Z, Y, X)`` or the head's nucleus probability ``(Z, Y, X)``.
    dtype : dtype
        Output dtype.
    batch_size : int
        z-slices per forward pass (2-D models).
    device : str or torch.device, optional
        None: CUDA if available (half precision there), else CPU (float32).

    Returns
    -------
    out : (F, Z, Y, X) or (Z, Y, X) array, NumPy (CuPy if ``region`` is CuPy)
    """
    payload = model if isinstance(model, _ModelPayload) else _ModelPayload(model)
    is_cupy = _xp(region) is not np
    # a CuPy block stays on its GPU unless a device is asked for
    dev = _resolve_device("cuda" if is_cupy and device is None else device)
    precision = torch.float16 if dev.type == "cuda" else torch.float32
    net = payload.module(dev, precision)
    ndim = int(getattr(net, "ndim", 2))
    crop = crop or (slice(None),) * 3
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
    outs: list[torch.Tensor] = []
    out_np: np.ndarray | None = None
    with torch.inference_mode():
        if ndim == 2:
            if dev.type == "cpu":
                # on a CPU, small passes keep the activations in cache: faster than big batches
                per_slice = region.shape[1] * region.shape[2]
                batch_size = max(1, min(batch_size, CPU_PIXELS_PER_PASS // per_slice))
            zs = range(region.shape[0])[crop[0]]
            batches = [zs[i : i + batch_size] for i in range(0, len(zs), batch_size)]
            inputs = [x_all[b.start : b.stop : b.step, None] for b in batches]
        else:
            inputs = [x_all[None, None]]
        z_done = 0
        for x in inputs:
            x = ((x - lo) * scale).to(precision).contiguous(memory_format=mem)
            y = net(x) if mode == "features" else net.logits(x)[:, :1].sigmoid()
            if ndim == 2:
                y = y[:, :, crop[1], crop[2]].transpose(0, 1)  # (F, B, Y, X)
            else:
                y = y[0][:, crop[0], crop[1], crop[2]]
            if to_host:
                # one pass gathers the strided view and casts into the output
                if out_np is None:
                    n_z = len(zs) if ndim == 2 else y.shape[1]
                    out_np = np.empty((y.shape[0], n_z, *y.shape[2:]), dtype=out_dtype)
                if out_dtype in _TORCH_DTYPES:  # torch casts ~4x faster than a strided NumPy copy
                    y = y.to(_TORCH_DTYPES[out_dtype])
                out_np[:, z_done : z_done + y.shape[1]] = y.numpy()
                z_done += y.shape[1]
            else:
                outs.append(y.to(_TORCH_DTYPES.get(out_dtype, torch.float32)))
    if to_host:
        assert out_np is not None
        return out_np[0] if mode == "probability" else out_np
    out = torch.cat(outs, dim=1)
    if mode == "probability":
        out = out[0]
    if is_cupy:
        import cupy

        if out.is_cuda:
            return cupy.from_dlpack(out.contiguous()).astype(out_dtype, copy=False)
        return cupy.asarray(out.numpy()).astype(out_dtype, copy=False)
    return out.cpu().numpy().astype(out_dtype, copy=False)


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def _block_task(parts: Any, payload: _ModelPayload, norm: Any, crop: Any, opts: dict) -> Any:
    return run_model(_concat_nested(parts), payload, norm=norm, crop=crop, **opts)


# --------------------------------------------------------------------------- dask level


def featurize(
    image: da.Array,
    model: nn.Module,
    *,
    dtype: str = "float16",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    norm: Sequence[float] | Delayed | None = None,
    chunks: Any = None,
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
        z-slices per forward pass (on a CPU at most `CPU_PIXELS_PER_PASS` pixels per pass).
    device : str or torch.device, optional
        None chooses on each worker: CUDA if it has a GPU (half precision), else CPU.
    norm : (2,) floats or Delayed, optional
        Intensities mapped to 0 and 1; default `intensity_range` of ``image``.
    chunks : chunk spec, optional
        Output chunks (z, y, x) for a stored ``image``; default its stored chunks.

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
    """
    return _map_model(image, model, "features", dtype, batch_size, device, norm, chunks)


def foreground_probability(
    image: da.Array,
    model: nn.Module,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    norm: Sequence[float] | Delayed | None = None,
    chunks: Any = None,
) -> da.Array:
    """Nucleus probability from the model's own segmentation head, block by block.

    Parameters are those of `featurize`; the model must have the head (``logits``).

    Returns
    -------
    probability : (Z, Y, X) dask array of float32 in [0, 1]
    """
    if not hasattr(model, "logits"):
        raise ModelError(
            f"model: {type(model).__name__} has no segmentation head (a 'logits' method); "
            "foreground_probability needs a lightsheet UNet or its TorchScript export"
        )
    return _map_model(image, model, "probability", "float32", batch_size, device, norm, chunks)


def _map_model(
    image: Any,
    model: nn.Module,
    mode: str,
    dtype: str,
    batch_size: int,
    device: Any,
    norm: Any,
    chunks: Any = None,
) -> da.Array:
    source = image if is_stored(image) else None
    if source is not None:
        image = da.from_array(source, chunks=chunks if chunks is not None else source.chunks)
    image = _as_dask(image, "image")
    if not isinstance(model, nn.Module):
        raise ModelError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if str(dtype) not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32'; got {dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: {device!r} is not a torch device: {exc}") from exc
    in_channels = getattr(model, "in_channels", 1)
    if in_channels != 1:
        raise ModelError(f"model: expects {in_channels} input channels; featurize feeds 1")
    ndim, halo, align = model_geometry(model)
    n_features = int(getattr(model, "n_features", 0)) or _probe_features(model, ndim)
    norm_key, norm_graph = _norm_node(image, norm)
    payload = _ModelPayload(model)
    opts = {"mode": mode, "dtype": np.dtype(dtype), "batch_size": batch_size, "device": device}
    token = tokenize(image.name, payload.token, norm_key, opts, halo, align, CPU_PIXELS_PER_PASS)
    name = f"{mode}-{token}"
    payload_key = f"unet-weights-{payload.token}"
    halos = (halo if ndim == 3 else 0, halo, halo)
    aligns = (align if ndim == 3 else 1, align, align)
    bounds = [np.cumsum((0,) + c).tolist() for c in image.chunks]
    lead = (slice(None),) if mode == "features" else ()  # the feature axis

    def out_key(idx: tuple[int, ...]) -> tuple:
        return (name, *(0,) * len(lead), *idx)

    dsk: dict[Any, Any] = {payload_key: payload}
    source_key = f"{name}-source"
    if source is not None:
        dsk[source_key] = source
    pieces: dict[tuple[int, ...], list] = {}  # output chunk -> its parts, in z order
    bytes_per_voxel = (n_features if mode == "features" else 1) * np.dtype(dtype).itemsize
    for cores in _task_cores(bounds, halos, aligns, bytes_per_voxel):
        ranges = [
            _region(c0, c1, h, a, b[-1])
            for (c0, c1), h, a, b in zip(cores, halos, aligns, bounds, strict=True)
        ]
        crop = tuple(
            slice(c0 - r0, c1 - r0) for (c0, c1), (r0, _) in zip(cores, ranges, strict=True)
        )
        parts = (
            (_read_box, source_key, ranges)
            if source is not None
            else _region_parts(image.name, bounds, ranges)
        )
        task = (_block_task, parts, payload_key, norm_key, crop, opts)
        chunks = _chunks_within(bounds, cores)
        if len(chunks) == 1 and chunks[0][2]:  # the task computes exactly one chunk
            dsk[out_key(chunks[0][0])] = task
            continue
        group_key = (f"{name}-group", *(c0 for c0, _ in cores))
        dsk[group_key] = task
        for idx, sub, _ in chunks:
            pieces.setdefault(idx, []).append((_getitem, group_key, lead + sub))
    for idx, parts in pieces.items():
        # a chunk split in z between tasks is joined from its parts
        dsk[out_key(idx)] = parts[0] if len(parts) == 1 else (_concat_nested, parts, len(lead))
    # a stored image's regions are read by the tasks themselves, not cut from its chunks
    deps = ([image] if source is None else []) + ([norm_graph] if norm_graph is not None else [])
    if norm_graph is None:
        dsk[norm_key] = np.asarray(norm, dtype=np.float64)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    if mode == "features":
        chunks = ((n_features,), *image.chunks)
    else:
        chunks = image.chunks
    meta = np.empty((0,) * len(chunks), dtype=dtype, like=image._meta)
    return da.Array(graph, name, chunks, meta=meta)


def _task_cores(
    bounds: list[list[int]],
    halos: tuple[int, int, int],
    aligns: tuple[int, int, int],
    bytes_per_voxel: int,
) -> list[tuple[tuple[int, int], ...]]:
    """The output box (z, y, x ranges) of each task: chunks grouped so halos are shared.

    A model with a halo along z (3-D) gets one task per chunk. A 2-D model needs no halo
    along z, so in y and x neighbouring chunks are merged while the input region one forward
    pass sees stays within `CPU_PIXELS_PER_PASS` (fewer halo pixels computed twice, and
    passes of the size the network runs fastest at); in z, the group is cut into slabs so
    one task's output is no larger than the largest chunk's (same memory per task).
    """
    per_chunk = [list(zip(b[:-1], b[1:], strict=True)) for b in bounds]
    if halos[0] > 0:
        return list(itertools.product(*per_chunk))
    side = math.isqrt(CPU_PIXELS_PER_PASS)
    xs = _merge_chunks(bounds[2], halos[2], aligns[2], side)
    widest = max(
        r1 - r0 for r0, r1 in (_region(*x, halos[2], aligns[2], bounds[2][-1]) for x in xs)
    )
    ys = _merge_chunks(bounds[1], halos[1], aligns[1], max(side, CPU_PIXELS_PER_PASS // widest))
    budget = math.prod(max(np.diff(b)) for b in bounds) * bytes_per_voxel
    out = []
    for z0, z1 in per_chunk[0]:
        for y, x in itertools.product(ys, xs):
            slab = (y[1] - y[0]) * (x[1] - x[0]) * bytes_per_voxel
            n = min(z1 - z0, -(-(z1 - z0) * slab // budget))
            edges = np.linspace(z0, z1, n + 1).round().astype(int).tolist()
            out += [((a, b), y, x) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return out


def _merge_chunks(b: list[int], halo: int, align: int, limit: int) -> list[tuple[int, int]]:
    """Runs of neighbouring chunks whose joint input region is at most ``limit`` long."""
    runs, i = [], 0
    while i < len(b) - 1:
        j = i + 1
        while j < len(b) - 1:
            r0, r1 = _region(b[i], b[j + 1], halo, align, b[-1])
            if r1 - r0 > limit:
                break
            j += 1
        runs.append((b[i], b[j]))
        i = j
    return runs


def _region(core0: int, core1: int, halo: int, align: int, size: int) -> tuple[int, int]:
    """Input range for output ``[core0, core1)``: the halo either side, on the pooling grid."""
    r0 = max(0, (core0 - halo) // align * align)
    # end on the pooling grid too, so the model pads with real data, not zeros
    return r0, min(size, r0 + -(-(core1 + halo - r0) // align) * align)


def _chunks_within(
    bounds: list[list[int]], cores: tuple[tuple[int, int], ...]
) -> list[tuple[tuple[int, ...], tuple[slice, ...], bool]]:
    """Chunks overlapping a task's output box: index, slices of the box, whole chunk or not."""
    per_axis = []
    for b, (c0, c1) in zip(bounds, cores, strict=True):
        first = bisect.bisect_right(b, c0) - 1
        last = bisect.bisect_left(b, c1) - 1
        per_axis.append(
            [
                (j, slice(max(c0, b[j]) - c0, min(c1, b[j + 1]) - c0), (b[j], b[j + 1]) == (c0, c1))
                for j in range(first, last + 1)
            ]
        )
    return [
        (tuple(j for j, _, _ in combo), tuple(s for _, s, _ in combo), all(w for _, _, w in combo))
        for combo in itertools.product(*per_axis)
    ]


def _region_parts(name: str, bounds: list[list[int]], ranges: list[tuple[int, int]]) -> Any:
    """Nested lists (z, y, x) of getitem tasks covering ``ranges`` of the chunked array."""
    per_axis = []
    for b, (r0, r1) in zip(bounds, ranges, strict=True):
        first = bisect.bisect_right(b, r0) - 1
        last = bisect.bisect_left(b, r1) - 1
        per_axis.append(
            [
                (j, slice(max(r0, b[j]) - b[j], min(r1, b[j + 1]) - b[j]))
                for j in range(first, last + 1)
            ]
        )

    def nest(ax: int, prefix: tuple) -> Any:
        if ax == 3:
            keys = tuple(j for j, _ in prefix)
            sl = tuple(s for _, s in prefix)
            return (_getitem, (name, *keys), sl)
        return [nest(ax + 1, prefix + (item,)) for item in per_axis[ax]]

    return nest(0, ())


def _read_box(source: Any, ranges: list[tuple[int, int]]) -> np.ndarray:
    """The input region ``ranges`` (z, y, x) read straight from a stored image."""
    return np.asarray(source[tuple(slice(a, b) for a, b in ranges)])


def _getitem(block: Any, index: tuple[slice, ...]) -> Any:
    return block[index]


def _norm_node(image: da.Array, norm: Any) -> tuple[Any, Delayed | None]:
    if norm is None:
        norm = intensity_range(image)
    if isinstance(norm, Delayed):
        return norm.key, norm
    vals = np.asarray(norm, dtype=np.float64)
    if vals.shape != (2,) or not np.all(np.isfinite(vals)) or not vals[1] > vals[0]:
        raise ValueError(f"norm must be two finite numbers (lo, hi) with hi > lo; got {norm!r}")
    return f"featurize-norm-{tokenize(vals)}", None


def _probe_features(model: nn.Module, ndim: int) -> int:
    with torch.inference_mode():
        return int(
            model(torch.zeros((1, 1) + (8 * getattr(model, "alignment_px", 1),) * ndim)).shape[1]
        )


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


# --------------------------------------------------------------------------- training


def train(
    sample_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    epochs: int = 30,
    seed: int = 0,
    model_args: dict[str, int] | None = None,
    crop_px: int = 64,
    crops_per_slice: int = 2,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    val_fraction: float = 0.2,
    timepoint: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the UNet to find nuclei and their boundaries in a sample acquisition.

    The nuclei channel of time point ``timepoint`` is stitched from the sample's tiles and
    normalised like `featurize` does (`intensity_range`). Targets come from the ground truth
    (``truth/cells.csv``): a nucleus mask (voxels within each nucleus' radius, shared voxels
    going to the nearer centre) and its per-slice boundary. Training uses random crops of
    z-slices with flips, rotations and intensity/noise augmentation; the last
    ``val_fraction`` of the slices is held out for the validation figures in the record.

    Parameters
    ----------
    sample_dir : path-like
        A folder written by `lightsheet.sample.generate`.
    out_path : path-like
        Checkpoint to write (``.safetensors``, else the dict form); the record is also
        written beside it as JSON (same name, ``.json``).
    epochs : int
        Passes; each draws ``crops_per_slice`` random crops from every training slice.
    seed : int
        Seed of weight initialisation, crops and augmentation.
    model_args : dict, optional
        `lightsheet.unet.UNet` arguments; default ``depth=2, width=8, features=16``.
    crop_px, crops_per_slice, batch_size, learning_rate, val_fraction, timepoint
        Training settings (recorded).
    progress : callable, optional
        ``progress(epoch, epochs, mean_loss)``, called after each epoch.

    Returns
    -------
    record : dict
        How the checkpoint was made: data fingerprint, settings, loss per epoch, validation
        accuracy, versions, duration. Also stored in the checkpoint.
    """
    from lightsheet import __version__

    t_start = time.perf_counter()
    sample_dir, out_path = Path(sample_dir), Path(out_path)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    volume, info, fingerprint = _load_sample_channel(sample_dir, timepoint)
    cells = _load_truth(sample_dir, timepoint)
    vox = tuple(float(v) for v in info["voxel_size_um"])
    nucleus, boundary = truth_targets(cells, volume.shape, vox)
    lo, hi = intensity_range(da.from_array(volume, chunks=volume.shape)).compute()
    x_all = ((volume.astype(np.float32) - lo) / (hi - lo)).astype(np.float32)
    n_val = max(1, round(volume.shape[0] * val_fraction))
    if volume.shape[0] - n_val < 1 or min(volume.shape[1:]) < crop_px:
        raise ValueError(
            f"sample {sample_dir}: volume {volume.shape} too small to train with "
            f"crop_px={crop_px} and val_fraction={val_fraction}"
        )
    n_train = volume.shape[0] - n_val

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
    args = {"ndim": 2, "depth": 2, "width": 8, "features": 16, **(model_args or {})}
    if args["ndim"] != 2:
        raise ValueError("train: only 2-D (per z-slice) models are trained here; got ndim=3")
    net = UNet(**args)
    # class balance: rare positives get a weight up to 10
    pos = [float(t[:n_train].mean()) for t in (nucleus, boundary)]
    pos_weight = torch.tensor([min(10.0, max(1.0, (1 - p) / max(p, 1e-6))) for p in pos])
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight.view(1, 2, 1, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n_train * crops_per_slice / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    target = np.stack([nucleus, boundary], axis=1).astype(np.float32)  # (Z, 2, Y, X)
    centres = np.argwhere(nucleus[:n_train])
    history = []
    net.train()
    for _ in range(epochs):
        losses = []
        for _ in range(steps_per_epoch):
            xb, yb = _training_batch(
                x_all[:n_train], target[:n_train], batch_size, crop_px, rng, centres
            )
            loss = loss_fn(net.logits(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(round(float(np.mean(losses)), 5))
        if progress is not None:
            progress(len(history), epochs, history[-1])
    net.eval()
    val = _validate(net, x_all[n_train:], target[n_train:], loss_fn)
    record = {
        "format": _FORMAT,
        "command": f"lightsheet train {sample_dir} --out {out_path} --epochs {epochs} "
        f"--seed {seed}",
        "epochs": epochs,
        "seed": seed,
        "final_loss": history[-1],
        "loss_per_epoch": history,
        "validation": val,
        "data_fingerprint": fingerprint,
        "data": {
            "sample_dir": str(sample_dir),
            "size": info.get("size"),
            "sample_seed": info.get("seed"),
            "shape_zyx": list(volume.shape),
            "voxel_size_um": list(vox),
            "channel": int(info.get("nuclei_channel", 0)),
            "timepoint": timepoint,
            "n_cells": len(cells),
            "train_slices": [0, n_train],
            "validation_slices": [n_train, volume.shape[0]],
        },
        "targets": list(HEAD_CLASSES),
        "model_args": dict(net.model_args),
        "normalisation": {"percentiles": list(NORM_PERCENTILES), "lo": float(lo), "hi": float(hi)},
        "training": {
            "crop_px": crop_px,
            "crops_per_slice": crops_per_slice,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "steps": epochs * steps_per_epoch,
            "optimizer": "AdamW + OneCycleLR",
            "pos_weight": [round(float(w), 3) for w in pos_weight],
        },
        "versions": {"lightsheet": __version__, "torch": torch.__version__},
        "duration_s": round(time.perf_counter() - t_start, 1),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model(net, out_path, record=record)
    out_path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def truth_targets(
    cells: Any, shape_zyx: Sequence[int], voxel_size_um: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus mask and per-slice nucleus boundary from ground-truth nuclei.

    Parameters
    ----------
    cells : DataFrame
        Columns ``z_um, y_um, x_um, diameter_um`` (voxel ``i`` has its centre at
        ``i * voxel_size_um``).
    shape_zyx : (3,) ints
        Volume shape (Z, Y, X).
    voxel_size_um : (3,) floats
        Voxel size (z, y, x) in µm.

    Returns
    -------
    nucleus, boundary : (Z, Y, X) ndarray of bool
        Voxels inside a nucleus; nucleus voxels on the in-plane border of their nucleus
        (next to background or another nucleus).
    """
    from skimage.segmentation import find_boundaries

    shape = tuple(int(n) for n in shape_zyx)
    vox = np.asarray(voxel_size_um, dtype=np.float64)
    labels = np.zeros(shape, dtype=np.int32)
    best = np.full(shape, np.inf, dtype=np.float32)
    centres = cells[["z_um", "y_um", "x_um"]].to_numpy(dtype=np.float64)
    radii_um = cells["diameter_um"].to_numpy(dtype=np.float64) / 2
    for i, (c_um, r_um) in enumerate(zip(centres, radii_um, strict=True), start=1):
        c = c_um / vox
        r = r_um / vox
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grids, c, r, strict=True))
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        # shared voxels go to the nucleus whose (scaled) centre is nearer
        take = (d <= 1.0) & (d < best[box])
        labels[box][take] = i
        best[box][take] = d[take]
    nucleus = labels > 0
    boundary = np.zeros(shape, dtype=bool)
    for z in range(shape[0]):
        boundary[z] = find_boundaries(labels[z], mode="inner") & nucleus[z]
    return nucleus, boundary


def _training_batch(
    x: np.ndarray,
    y: np.ndarray,
    n: int,
    crop: int,
    rng: np.random.Generator,
    centres: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    zs = rng.integers(0, x.shape[0], n)
    ys = rng.integers(0, x.shape[1] - crop + 1, n)
    xs = rng.integers(0, x.shape[2] - crop + 1, n)
    # half of the crops hold a nucleus somewhere (nuclei fill ~1 % of a sparse volume)
    near = (rng.random(n) < 0.5) & (len(centres) > 0)
    if near.any():
        pick = centres[rng.integers(0, len(centres), int(near.sum()))]
        zs[near] = pick[:, 0]
        ys[near] = np.clip(pick[:, 1] - rng.integers(0, crop, len(pick)), 0, x.shape[1] - crop)
        xs[near] = np.clip(pick[:, 2] - rng.integers(0, crop, len(pick)), 0, x.shape[2] - crop)
    xb = np.stack([x[z, a : a + crop, b : b + crop] for z, a, b in zip(zs, ys, xs, strict=True)])
    yb = np.stack([y[z, :, a : a + crop, b : b + crop] for z, a, b in zip(zs, ys, xs, strict=True)])
    xb = xb[:, None].copy()
    # geometry: the 8 flips/rotations of the square
    k = int(rng.integers(4))
    xb, yb = np.rot90(xb, k, axes=(2, 3)), np.rot90(yb, k, axes=(2, 3))
    if rng.random() < 0.5:
        xb, yb = xb[..., ::-1], yb[..., ::-1]
    # intensity: per-crop gain, offset, gamma-like curvature and extra noise, so the features
    # do not depend on one sample's brightness, background or noise level
    gain = rng.uniform(0.6, 1.5, (n, 1, 1, 1))
    offset = rng.uniform(-0.1, 0.1, (n, 1, 1, 1))
    noise = rng.uniform(0.0, 0.05, (n, 1, 1, 1)) * rng.standard_normal(xb.shape)
    # optics: a random extra blur on half of the crops (raw vs deconvolved sharpness)
    for i in np.flatnonzero(rng.random(n) < 0.5):
        xb[i, 0] = ndi.gaussian_filter(xb[i, 0], rng.uniform(0.3, 1.2))
    xb = xb * gain + offset + noise
    return (
        torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(yb, dtype=np.float32)),
    )


@torch.inference_mode()
def _validate(net: UNet, x: np.ndarray, y: np.ndarray, loss_fn: nn.Module) -> dict[str, float]:
    losses, tp, tn, pos, neg = [], 0, 0, 0, 0
    for z in range(x.shape[0]):
        logits = net.logits(torch.from_numpy(x[z][None, None]))
        target = torch.from_numpy(y[z][None])
        losses.append(float(loss_fn(logits, target)))
        pred = (logits[0, 0] > 0).numpy()
        truth = y[z, 0] > 0.5
        tp += int(np.sum(pred & truth))
        tn += int(np.sum(~pred & ~truth))
        pos += int(truth.sum())
        neg += int((~truth).sum())
    sens = tp / max(pos, 1)
    spec = tn / max(neg, 1)
    return {
        "loss": round(float(np.mean(losses)), 5),
        "nucleus_sensitivity": round(sens, 4),
        "nucleus_specificity": round(spec, 4),
        "nucleus_balanced_accuracy": round((sens + spec) / 2, 4),
    }


def _load_sample_channel(sample_dir: Path, timepoint: int) -> tuple[np.ndarray, dict, str]:
    """The stitched nuclei channel of one time point, the sample info and a fingerprint."""
    import re

    import tifffile

    info_path = sample_dir / "sample.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"train: {sample_dir} has no sample.json; expected a folder made by `lightsheet sample`"
        )
    info = json.loads(info_path.read_text())
    if not info.get("complete", False):
        raise ValueError(f"train: {info_path} says the sample is incomplete")
    channel = int(info.get("nuclei_channel", 0))
    grid = tuple(int(g) for g in info["tile_grid"])
    rx = re.compile(info["pattern"])
    tiles: dict[tuple[int, int, int], Path] = {}
    for p in sorted((sample_dir / "tiles").glob("*.tif*")):
        m = rx.search(p.name)
        if m is None:
            continue
        g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
        if g.get("c", 0) == channel and g.get("t", 0) == timepoint:
            tiles[(g.get("z", 0), g.get("y", 0), g.get("x", 0))] = p
    missing = [idx for idx in np.ndindex(*grid) if idx not in tiles]
    if missing:
        raise FileNotFoundError(
            f"train: {sample_dir / 'tiles'} lacks tiles {missing[:3]} (of grid {grid}) for "
            f"channel {channel}, time point {timepoint}"
        )
    h = hashlib.sha256()
    nested: list = []
    for iz in range(grid[0]):
        rows = []
        for iy in range(grid[1]):
            row = []
            for ix in range(grid[2]):
                tile = tifffile.imread(tiles[(iz, iy, ix)])
                # the pixels, not the file bytes: TIFF metadata (dates, software) may differ
                h.update(f"{(iz, iy, ix)}{tile.shape}{tile.dtype.str}".encode())
                h.update(np.ascontiguousarray(tile).tobytes())
                row.append(tile)
            rows.append(row)
        nested.append(rows)
    truth = sample_dir / "truth" / "cells.csv"
    if truth.is_file():
        h.update(truth.read_bytes())
    return np.block(nested), info, "sha256:" + h.hexdigest()


def _load_truth(sample_dir: Path, timepoint: int) -> Any:
    import pandas as pd

    path = sample_dir / "truth" / "cells.csv"
    if not path.is_file():
        raise FileNotFoundError(f"train: no ground truth {path}; expected truth/cells.csv")
    cells = pd.read_csv(path)
    need = {"z_um", "y_um", "x_um", "diameter_um"}
    if not need <= set(cells.columns):
        raise ValueError(f"train: {path} lacks columns {sorted(need - set(cells.columns))}")
    if "t" in cells.columns:
        cells = cells[cells["t"] == timepoint]
    return cells
