"""Model checkpoints: written as safetensors, read without running code from them.

Three forms are read: ``.safetensors`` (tensors plus JSON metadata: the UNet arguments and
the record of how the model was made) through ``safetensors``; the dict form
``{"model_args", "model_state"[, "record"]}`` through ``torch.load(weights_only=True)``,
which refuses any pickle that would need code to be run; and TorchScript through
``torch.jit.load`` (TorchScript code and tensors, no Python pickles of arbitrary objects).
`save_model` writes safetensors (or the dict form for another suffix).

The record travels inside the file. Besides how the model was made, it may declare what
inference needs (`lightsheet.featurize`, `lightsheet.segment.model`): ``voxel_size_um``
(the voxel size it was trained at: blocks are resampled to it), ``normalisation``,
``targets`` (what each head channel predicts) and ``detection`` (the probability threshold
chosen on held-out volumes); `load_model` exposes them as attributes of the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightsheet.errors import ModelError
from lightsheet.models import checkpoint_path
from lightsheet.unet import HEAD_CLASSES, UNet

#: ``format`` of the safetensors metadata and of the record.
FORMAT = "lightsheet-unet/1"


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
        made, when the file says), ``checkpoint_sha256``, and what the record declares for
        inference: ``voxel_size_um`` (z, y, x, or None), ``targets`` (the head channels'
        names) and ``detection`` (e.g. the validated probability threshold; ``{}`` if none).

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
    model.voxel_size_um, model.targets, model.detection = declared_inference(record, path)
    return model


def declared_inference(
    record: dict[str, Any], path: str | os.PathLike[str] = "model"
) -> tuple[tuple[float, float, float] | None, tuple[str, ...], dict[str, Any]]:
    """What a record declares for inference: voxel size, head targets, detection settings.

    A record without them (a model from before they were recorded) declares no voxel size
    (no resampling), the head classes `lightsheet.unet.HEAD_CLASSES` and no detection
    settings.
    """
    vs = record.get("voxel_size_um")
    if vs is not None:
        ok = isinstance(vs, list | tuple) and len(vs) == 3
        ok = ok and all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in vs)
        if not ok:
            raise ModelError(
                f"model: {path}: record voxel_size_um must be 3 positive numbers (z, y, x) in "
                f"µm; got {vs!r}"
            )
        vs = tuple(float(v) for v in vs)
    targets = tuple(str(t) for t in record.get("targets", HEAD_CLASSES))
    detection = record.get("detection") or {}
    if not isinstance(detection, dict):
        raise ModelError(f"model: {path}: record detection must be a mapping; got {detection!r}")
    return vs, targets, dict(detection)


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

        meta = {"format": FORMAT, "model_args": json.dumps(model.model_args)}
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
