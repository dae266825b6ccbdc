"""Atomic outputs: write in a hidden sibling, rename into place only when complete.

A stage killed mid-write (even by ``kill -9``) leaves only a hidden ``.NAME.partial-*``
sibling, never something at ``NAME`` that looks finished; the next write of the same
output removes such leftovers. One run writes a given output folder at a time.

A write that runs out of space (``ENOSPC``, or ``EDQUOT`` for a quota) removes its partial
sibling and raises `OutputSpaceError` naming the output, instead of an ``OSError`` about
some chunk file deep inside a hidden folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from lightsheet.errors import OutputSpaceError

#: errno values meaning the output's file system (or the user's quota there) is full.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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
    except BaseException as exc:
        _remove(tmp)
        space = _space_error(exc)
        if space is not None:
            raise out_of_space(path, space) from exc
        raise
    replace_path(tmp, path)


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _space_error(exc: BaseException) -> OSError | None:
    """The out-of-space ``OSError`` behind ``exc`` (itself or a cause), if there is one."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OutputSpaceError):
            return None  # already explained
        if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def out_of_space(path: Path, exc: OSError) -> OutputSpaceError:
    """The error for a write of ``path`` that ran out of space (``exc``: the low-level one)."""
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return OutputSpaceError(
        exc.errno,
        f"output: {what} while writing {path} ({free if free is not None else '?'} bytes free "
        f"on that file system after removing the partial write; low-level error: "
        f"{exc.strerror} at {exc.filename}); nothing was written at {path}: free space there "
        "or choose an output folder on a larger disk, then re-run (finished stages are reused)",
        str(path),
    )


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing file or folder there."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
