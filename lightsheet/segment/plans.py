"""The watershed's plans kept on disk: each block's endpoint → label table, read by its task."""

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
