"""Atomic outputs: write in a hidden sibling, rename into place only when complete.

A stage killed mid-write (even by ``kill -9``) leaves only a hidden ``.NAME.partial-*``
sibling, never something at ``NAME`` that looks finished; the next write of the same
output removes such leftovers. One run writes a given output folder at a time.

A write that runs out of space (``ENOSPC``, or ``EDQUOT`` for a quota) removes its partial
sibling and raises `OutputSpaceError` naming the output, instead of an ``OSError`` about
some chunk file deep inside a hidden folder.

Output folders belong to lightsheet and to one run at a time:

* every name lightsheet writes in a folder is registered in the folder's hidden marker
  ``.lightsheet-output.json`` before it is written; a file or folder that is neither
  registered nor carries lightsheet's own evidence (an image's manifest or lineage, a table's
  lineage record) is never overwritten or deleted (`OutputExistsError`), nor is a store
  holding files its manifest does not list (someone's ``curated.txt``);
* `output_lock` holds an exclusive lock on ``.lightsheet.lock`` for the whole run, naming the
  run (host, process, flow run) in it; a second run is refused (`OutputInUseError`) with
  that name. The lock is ``flock``: the kernel drops it when the process ends, even by
  ``kill -9``, so a crashed run never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lightsheet.errors import (
    OutputExistsError,
    OutputInUseError,
    OutputNotWritableError,
    OutputSpaceError,
)

__all__ = [
    "LOCK_NAME",
    "MARKER_NAME",
    "SPACE_ERRNOS",
    "STORE_MANIFEST",
    "atomic_path",
    "check_replaceable",
    "claim_folder",
    "claim_path",
    "foreign_files",
    "mark_folder",
    "out_of_space",
    "output_lock",
    "partial_path",
    "register",
    "registered",
    "remove_stale_partials",
    "replace_path",
    "written_by_lightsheet",
]

#: Hidden file in an output folder listing the names lightsheet wrote there.
MARKER_NAME = ".lightsheet-output.json"
#: Hidden file in an output folder locked by the run writing there.
LOCK_NAME = ".lightsheet.lock"
#: Inside an image store: the manifest sub-group written by `lightsheet.io.omezarr`.
STORE_MANIFEST = "lightsheet/zarr.json"

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
    try:
        replace_path(tmp, path)
    except BaseException:
        _remove(tmp)  # refused (not ours to replace) or failed: leave nothing behind
        raise


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
    """Move ``src`` to ``dst``, replacing an existing file or folder there.

    Only something lightsheet wrote is replaced (`check_replaceable`); the name is
    registered in the folder's marker first, so a crash in between never leaves a file of
    ours that a later run would refuse to replace.
    """
    check_replaceable(dst)
    register(dst)
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# --------------------------------------------------------------------------- ownership


def registered(folder: Path) -> set[str]:
    """Names lightsheet registered in ``folder``'s marker (empty when there is none)."""
    try:
        data = json.loads((folder / MARKER_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return set()
    return set(data.get("written", [])) if isinstance(data, dict) else set()


def register(path: Path) -> None:
    """Record that lightsheet writes ``path``: its name, in the parent folder's marker."""
    path = Path(path)
    if path.name not in registered(path.parent):
        _update_marker(path.parent, lambda data: data["written"].append(path.name))


def mark_folder(folder: Path, *, created: bool) -> None:
    """Give ``folder`` a marker (``created``: lightsheet made the folder itself)."""
    _update_marker(folder, lambda data: data.setdefault("created_by_lightsheet", created))


def _update_marker(folder: Path, change: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / MARKER_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # writers in other processes wait for each other
        try:
            data = json.loads(f.read() or "{}")
        except ValueError:
            data = {}
        data = data if isinstance(data, dict) else {}
        data.setdefault("made_by", "lightsheet")
        data["written"] = list(data.get("written", []))
        change(data)
        data["written"] = sorted(set(data["written"]))
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=1))


def written_by_lightsheet(path: Path) -> bool:
    """True when ``path`` is registered in its folder's marker or carries lightsheet's evidence.

    Evidence (for folders written before markers existed): an image store's manifest or
    lineage attributes, a table's lineage record beside it, a lineage record itself.
    """
    path = Path(path)
    if path.name in registered(path.parent):
        return True
    if path.is_dir():
        if (path / STORE_MANIFEST).is_file():
            return True
        return "lightsheet" in _json(path / "zarr.json").get("attributes", {})
    if path.name.endswith(".lineage.json"):
        return "stage" in _json(path)
    return "stage" in _json(path.with_name(path.name + ".lineage.json"))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def foreign_files(store: Path) -> list[str]:
    """Files inside a lightsheet image store that its manifest does not list (sorted)."""
    manifest = _json(store / STORE_MANIFEST).get("attributes", {}).get("manifest", {})
    listed = set(manifest.get("files", {})) | {STORE_MANIFEST}
    if not manifest:
        return []  # no manifest (older writer): nothing to compare with
    found = []
    for where, _, files in os.walk(store):
        rel = Path(where).relative_to(store)
        found += [(rel / f).as_posix() for f in files if (rel / f).as_posix() not in listed]
    return sorted(found)


def check_replaceable(path: Path) -> None:
    """Refuse to overwrite or delete ``path`` unless lightsheet wrote it (and only that).

    Raises
    ------
    OutputExistsError
        ``path`` exists and lightsheet did not write it, or it is a store holding files
        lightsheet did not write.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():
        raise OutputExistsError(
            f"output: {path} is a symbolic link; lightsheet replaces only files and folders "
            "it wrote itself. Remove the link or choose another output folder"
        )
    if not written_by_lightsheet(path):
        raise OutputExistsError(
            f"output: {path} exists and was not written by lightsheet; refusing to overwrite "
            "it. Move it away or choose another output folder"
        )
    if path.is_dir():
        extra = foreign_files(path)
        if extra:
            shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise OutputExistsError(
                f"output: {path} holds {len(extra)} file(s) lightsheet did not write ({shown}); "
                "replacing the store would delete them. Move them out of the store, then re-run"
            )


def claim_path(path: str | Path) -> Path:
    """Check and register ``path`` before writing it directly (not through `atomic_path`)."""
    path = Path(path)
    check_replaceable(path)
    register(path)
    return path


def claim_folder(folder: str | Path, names: Iterable[str]) -> Path:
    """Create (or adopt) an output folder and check every output name a run may write.

    Parameters
    ----------
    folder : path-like
        The output folder; created (with its parents) and marked when missing.
    names : iterable of str
        Names the run may write in it (stage outputs, lineage records, plots).

    Raises
    ------
    OutputExistsError
        ``folder`` is not a folder (nor a link to one), or one of ``names`` exists there
        and lightsheet did not write it. Nothing is written then.
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.is_dir():
        raise OutputExistsError(
            f"output: {folder} is a symbolic link to {os.readlink(folder)}, which is not a "
            "folder; expected a folder (or a link to one) that lightsheet creates or owns"
        )
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(
            f"output: {folder} exists and is not a folder; expected a folder that lightsheet "
            "creates or owns"
        )
    foreign = [n for n in names if (folder / n).exists() and not written_by_lightsheet(folder / n)]
    if foreign:
        raise OutputExistsError(
            f"output: {folder} already holds {', '.join(sorted(foreign))}, not written by "
            "lightsheet; a run would overwrite them. Move them away or choose another "
            "output folder"
        )
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if created or not (folder / MARKER_NAME).exists():
            mark_folder(folder, created=created)
    except OSError as exc:
        raise OutputNotWritableError(
            f"output: cannot write to {folder} ({exc.strerror}); expected a writable folder"
        ) from exc
    return folder


# --------------------------------------------------------------------------- one run at a time

_held: dict[str, list[Any]] = {}  # lock path -> [open file, depth]


@contextlib.contextmanager
def output_lock(folder: str | Path, run: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; refuse when another process holds it.

    Re-entrant within a process (the CLI takes it before Prefect starts, the flow again).

    Parameters
    ----------
    folder : path-like
        An existing output folder.
    run : mapping, optional
        What to write in the lock for others to read (e.g. the flow run's id and name).

    Raises
    ------
    OutputInUseError
        Another process holds the lock; the message names its host, process and run.
    """
    path = (Path(folder) / LOCK_NAME).resolve()
    key = str(path)
    if key in _held:
        f = _held[key][0]
        if run:  # the flow run inside the command that took the lock: name it
            info = {**_json(path), **{k: v for k, v in run.items() if v is not None}}
            f.seek(0)
            f.truncate()
            f.write(json.dumps(info))
            f.flush()
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _json(path)
        f.close()
        raise OutputInUseError(
            f"output: {folder} is in use by {_describe(holder)}; wait for "
            "that run to end, or choose another output folder"
        ) from None
    try:
        info = {
            "host": platform.node(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{k: v for k, v in (run or {}).items() if v is not None},
        }
        f.seek(0)
        f.truncate()
        f.write(json.dumps(info))
        f.flush()
        _held[key] = [f, 1]
        yield
    finally:
        _held.pop(key, None)
        f.close()  # releases the lock


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "another run (no details recorded yet)"
    run = holder.get("flow_run_name") or holder.get("flow_run_id")
    who = f"flow run {run}" if run else "a lightsheet run"
    if holder.get("flow_run_id") and holder.get("flow_run_name"):
        who += f" ({holder['flow_run_id']})"
    return (
        f"{who} on host {holder.get('host', '?')}, process {holder.get('pid', '?')}, "
        f"since {holder.get('since', '?')}"
    )
