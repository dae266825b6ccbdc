"""The bundled UNet checkpoint (how it was made: README.md here), found without torch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lightsheet.errors import ModelError

__all__ = [
    "DEFAULT_MODEL",
    "checkpoint_path",
    "checkpoint_sha256",
    "describe_record",
]

#: File name of the default model, next to this module.
DEFAULT_MODEL = "unet_default.safetensors"


def checkpoint_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, or the bundled default model's file when None; `ModelError` if missing."""
    file = Path(__file__).with_name(DEFAULT_MODEL) if path is None else Path(path)
    if not file.is_file():
        raise ModelError(
            f"model: no such file {file}; expected a .safetensors, dict .pt or TorchScript file"
        )
    return file


def checkpoint_sha256(path: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of a checkpoint's bytes: its identity in cache keys and lineage."""
    file = checkpoint_path(path)
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_record(record: dict) -> list[str]:
    """A model record, readable: data and licences, voxel size, normalisation, held-out scores.

    Examples
    --------
    >>> describe_record({"voxel_size_um": [6.0, 1.62, 1.62], "detection": {"threshold": 0.6}})
    ['trained at voxel size (z, y, x) [6.0, 1.62, 1.62] µm', 'probability threshold 0.6 (...)']
    """
    lines = []
    for d in record.get("data") or []:
        vols = d.get("volumes") or []
        held = sum(v.get("split") == "validation" for v in vols)
        source = d.get("source") or "source n/a"
        lines.append(
            f"data {d.get('name')!r} ({d.get('licence')} licence; {source}): {len(vols)} "
            f"volumes, {held} held out"
        )
    if "data_fingerprint" in record and not record.get("data"):
        lines.append(f"data fingerprint {record['data_fingerprint']}")
    if record.get("voxel_size_um"):
        lines.append(f"trained at voxel size (z, y, x) {record['voxel_size_um']} µm")
    norm = record.get("normalisation") or {}
    if norm:
        how = norm.get("description") or norm.get("percentiles", "")
        lines.append(f"normalisation: {norm.get('method', 'percentiles')} ({how})")
    val = record.get("validation") or {}
    if "f1" in val:
        lines.append(
            f"held-out scores ({len(val.get('volumes', []))} volumes, match within "
            f"{val.get('match_distance_um')} µm): F1 {val['f1']}, precision "
            f"{val.get('precision')}, recall {val.get('recall')}"
        )
    det = record.get("detection") or {}
    if "threshold" in det:
        lines.append(f"probability threshold {det['threshold']} ({det.get('chosen_on', '...')})")
    if det.get("classifier"):
        c = det["classifier"]
        lines.append(
            f"candidates at probability {c['candidate_threshold']}, kept by a logistic "
            f"regression on {len(c['features'])} features (cut {c['cut']}; F1 {c['f1']} on the "
            "volumes it was fitted on)"
        )
    if record.get("command"):
        lines.append(f"made by: {record['command']}")
    return lines
