"""The watershed's tables kept on disk: each block's plan, and each block's shell.

Plans (`StoredPlan`): each block's endpoint → label table, read by the block's later tasks.
Shells (`_store_faces`, `_load_faces`): the voxels of a block's core that border its
neighbours, with their endpoints and heights, which the analysis pass's neighbour tasks
compare (`lightsheet.segment.graph._block_edges`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["StoredPlan"]


@dataclass(frozen=True)
class StoredPlan:
    """Where a block's plan lies in the files of `_store_plans`: three numbers in a task.

    The plans of all blocks are about 24 bytes per basin that the client sees (23 MB on
    the 4 GB sample): embedded in the tasks they travel with the graph, and the scheduler
    holds them while the pass runs; stored, each task reads its own.
    """

    folder: str
    start: int
    count: int

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The block's (sorted endpoint keys, labels), as `_basin_block` takes them."""
        return tuple(
            np.fromfile(
                Path(self.folder) / name, dtype=np.int64, count=self.count, offset=8 * self.start
            )
            for name in _PLAN_FILES
        )


_PLAN_FILES = ("plan-keys.i8", "plan-labels.i8")


def _store_plans(plans: Iterable[tuple[tuple, tuple]], folder: Path) -> dict[tuple, StoredPlan]:
    """Write each block's plan, one after the other, into two files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stored, start = {}, 0
    with open(folder / _PLAN_FILES[0], "wb") as fk, open(folder / _PLAN_FILES[1], "wb") as fv:
        for idx, (keys, values) in plans:
            fk.write(np.ascontiguousarray(keys, np.int64).tobytes())
            fv.write(np.ascontiguousarray(values, np.int64).tobytes())
            stored[idx] = StoredPlan(str(folder), start, int(keys.size))
            start += int(keys.size)
    return stored


#: A block's shell arrays, in the order `_store_faces` writes them.
_FACES = ("face_keys", "face_ends", "face_heights")


def _store_faces(info: dict, folder: str | Path, origin: tuple[int, ...]) -> dict:
    """``info`` with its shell arrays moved into a file of ``folder``; ``face_file`` says where.

    Until every neighbour of a block has been analysed, the worker holds the block's
    analysis; Dask's order keeps a layer of blocks or more waiting (931 of 4,000 blocks of
    a 10 × 20 × 20 grid), so shells held in memory grew with the volume's cross-section
    (about 0.1 MiB a block on the 1 GB sample). Stored, the waiting analyses are the small
    tables, and each neighbour task reads the shells it compares (`_load_faces`).
    """
    path = Path(folder) / ("faces-" + "-".join(map(str, origin)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for name in _FACES:
            np.ascontiguousarray(info[name]).tofile(f)
    out = {k: v for k, v in info.items() if k not in _FACES}
    dtypes = tuple(info[name].dtype.str for name in _FACES)
    out["face_file"] = (str(path), int(info["face_keys"].size), dtypes)
    return out


def _load_faces(info: dict) -> dict:
    """``info`` with the shell arrays that `_store_faces` wrote read back (as given if held)."""
    if "face_file" not in info:
        return info
    path, count, dtypes = info["face_file"]
    with open(path, "rb") as f:
        arrays = [np.fromfile(f, dtype, count) for dtype in dtypes]
    return {**info, **dict(zip(_FACES, arrays, strict=True))}
