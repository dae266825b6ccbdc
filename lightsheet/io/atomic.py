"""Atomic outputs: write in a hidden sibling, rename into place only when complete.

A stage killed mid-write (even by ``kill -9``) leaves only a hidden ``.NAME.partial-*``
sibling, never something at ``NAME`` that looks finished; the next write of the same
output removes such leftovers. One run writes a given output folder at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: Path) -> Path:
    """A fresh hidden temporary sibling of ``path``."""
    return path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"


def remove_stale_partials(path: Path) -> None:
    """Delete leftovers of interrupted writes of ``path``."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(
            missing_ok=True
        )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (file or folder) that replaces ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    replace_path(tmp, path)


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing file or folder there."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
