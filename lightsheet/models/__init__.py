"""The bundled UNet checkpoint (how it was made: README.md here), found without torch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lightsheet.errors import ModelError

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
