"""The manifest of every image `lightsheet.io.omezarr.write_image` writes, and its checks.

The attributes of the image's ``lightsheet`` sub-group list each file written (path and
size) and the digest of every full-resolution chunk (`write_manifest`). `check_image` stats
every file (no data read), `verify_image` re-reads and re-hashes every chunk, and
`CompleteStore` makes a reader fail on a missing chunk (`OutputDamagedError`) instead of
reading zarr's fill value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

from lightsheet.errors import OutputDamagedError
from lightsheet.lineage import ATTRS_KEY, chunk_digest, combine_digests

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MAX_PROBLEMS",
    "CompleteStore",
    "check_image",
    "read_manifest",
    "verify_image",
    "write_manifest",
]


#: The manifest of every image written by `write_image`: this sub-group's attributes.
MANIFEST_NAME = "lightsheet/zarr.json"
MANIFEST_FORMAT = "lightsheet-manifest/1"
#: Problems listed in full by `check_image` / `verify_image` before the rest are counted.
MAX_PROBLEMS = 20


def write_manifest(store: str | Path, level0_digests: np.ndarray) -> dict[str, Any]:
    """List every file of a just-written image store, with its size, and the chunk digests.

    Called last inside the atomic write, so the manifest describes exactly what was renamed
    into place. ``level0_digests`` holds one `lightsheet.lineage.chunk_digest` per write
    unit (shard or chunk) of ``s0``, in chunk-grid order, as `store_chunks` computed them.
    """
    store = Path(store)
    files = {rel: size for rel, size in _walk_files(store) if rel != MANIFEST_NAME}
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": dict(sorted(files.items())),
        "level0": {
            "path": "s0",
            "grid": list(level0_digests.shape),
            "digests": [int(d) for d in level0_digests.ravel()],
        },
    }
    group = {"zarr_format": 3, "node_type": "group", "attributes": {"manifest": manifest}}
    (store / MANIFEST_NAME).parent.mkdir(exist_ok=True)
    (store / MANIFEST_NAME).write_text(json.dumps(group, separators=(",", ":")))
    return manifest


def _walk_files(folder: Path) -> Iterator[tuple[str, int]]:
    """(path relative to ``folder`` with ``/``, size) of every file below it (no links)."""
    stack = [(folder, "")]
    while stack:
        where, prefix = stack.pop()
        with os.scandir(where) as entries:
            for e in entries:
                rel = prefix + e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), rel + "/"))
                else:
                    yield rel, e.stat(follow_symlinks=False).st_size


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of an image written by `write_image`, or None (none, or unreadable)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())["attributes"]["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def check_image(path: str | Path) -> list[str]:
    """What is missing from a stored image: each file of its manifest, present, same size.

    One ``stat`` per file and no data read (the reuse check before a stage is skipped). An
    empty list means complete; ``verify_image`` also re-hashes the voxels.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return [f"{path}: no readable manifest {MANIFEST_NAME} (not written whole by lightsheet)"]
    problems = []
    for rel, size in manifest["files"].items():
        try:
            found = (path / rel).lstat().st_size
        except FileNotFoundError:
            problems.append(f"{path / rel}: missing (expected {size} bytes)")
            continue
        if found != size:
            problems.append(f"{path / rel}: {found} bytes, expected {size}")
    return _bounded(problems)


def verify_image(path: str | Path, *, workers: int = 2) -> list[str]:
    """`check_image`, then re-read every chunk: level 0 against its digests, others decode.

    The level-0 digests also have to combine into the lineage record's output fingerprint.
    Reads one write unit (shard or chunk) at a time per worker thread.
    """
    path = Path(path)
    problems = check_image(path)
    manifest = read_manifest(path)
    if manifest is None:
        return problems
    root = _open_group(path)
    level0 = manifest["level0"]
    digests = np.asarray(level0["digests"], dtype=np.int64).reshape(level0["grid"])
    record = dict(root.attrs.get(ATTRS_KEY, {}))
    if record.get("output_fingerprint") not in (None, combine_digests(digests.ravel())):
        problems.append(
            f"{path / MANIFEST_NAME}: its chunk digests do not give the lineage record's "
            f"output fingerprint {record['output_fingerprint']}"
        )
    jobs = []
    for name, arr in sorted(root.arrays()):
        grid = _write_grid(arr)
        counts = tuple(-(-n // g) for n, g in zip(arr.shape, grid, strict=True))
        for idx in np.ndindex(*counts):
            expected = digests[idx] if name == level0["path"] else None
            jobs.append((name, arr, grid, idx, expected))

    def check(job: tuple) -> str | None:
        name, arr, grid, idx, expected = job
        region = tuple(slice(i * g, (i + 1) * g) for i, g in zip(idx, grid, strict=True))
        where = f"{path}/{name} chunk {idx}"
        try:
            block = np.asarray(arr[region])
        except OutputDamagedError:
            return None  # a missing file: check_image names it
        except Exception as exc:  # noqa: BLE001 - any decoding failure is damage to report
            return f"{where}: cannot be decoded ({type(exc).__name__}: {exc})"
        if expected is not None and chunk_digest(block) != expected:
            return f"{where}: voxels differ from those written (digest mismatch)"
        return None

    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        problems += [p for p in pool.map(check, jobs) if p is not None]
    return _bounded(problems)


def _bounded(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more"]


class CompleteStore(WrapperStore):
    """A read-only local store in which every chunk must exist.

    Lightsheet writes every chunk of its images (empty ones too), so a chunk file that is
    not there was lost after the write: reading it raises `OutputDamagedError` naming the
    file instead of returning zarr's fill value (a deleted chunk once became a region of
    zeros, and 0 cells). Metadata keys may be absent as usual.
    """

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)

    def __str__(self) -> str:
        # zarr's WrapperStore keeps the wrapped store in the private ``_store`` (no public
        # accessor in zarr 3.1); tests/test_private_apis.py guards it
        return str(self._store)

    def _missing(self, key: str) -> OutputDamagedError:
        where = Path(str(self._store.root)) / key
        return OutputDamagedError(
            f"{where}: chunk file missing from an image lightsheet wrote whole; expected every "
            "chunk to be present (the output was damaged after it was written: re-run to "
            "recompute it; `lightsheet verify` lists all damage)"
        )

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        """The stored value of ``key``; `OutputDamagedError` for a missing chunk."""
        value = await self._store.get(key, prototype, byte_range)
        if value is None and not _is_metadata_key(key):
            raise self._missing(key)
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list:
        """Byte ranges of several keys; `OutputDamagedError` for a missing chunk."""
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values, strict=True):
            if value is None and not _is_metadata_key(key):
                raise self._missing(key)
        return values


def _is_metadata_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def _open_group(path: Path) -> zarr.Group:
    """The image's root group; through `CompleteStore` when lightsheet wrote it whole."""
    if (path / MANIFEST_NAME).is_file():
        store = CompleteStore(LocalStore(str(path), read_only=True))
        return zarr.open_group(store=store, mode="r")
    return zarr.open_group(str(path), mode="r")


def _write_grid(target: zarr.Array) -> tuple[int, ...]:
    """The unit written at once: the shard of a sharded array, else the chunk."""
    return tuple(int(c) for c in (target.shards or target.chunks))
