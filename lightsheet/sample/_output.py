"""The output folder of a sample generator: created, or emptied of a previous sample."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightsheet.errors import OutputExistsError

__all__ = [
    "output_entries",
    "replace_previous",
]


def output_entries(out: Path) -> list[str]:
    """Create ``out`` (a folder) and list what it holds, sorted."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"sample: {out} exists and is not a folder; expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    return sorted(p.name for p in out.iterdir())


def replace_previous(
    out: Path,
    entries: Sequence[str],
    *,
    previous: bool,
    unknown: Sequence[str],
    kind: str,
    clear: Iterable[str],
) -> Path:
    """Remove ``clear`` from ``out`` when it holds a previous ``kind`` and nothing else.

    ``previous``: ``out/sample.json`` records a sample of this kind; ``unknown``: entries
    that no such sample writes. Anything else is refused, so no user file is deleted.
    """
    if not previous or unknown:
        what = f"holds no {kind}.json" if not previous else f"also holds {list(unknown)[:5]}"
        raise OutputExistsError(
            f"sample: {out} is not empty and {what}; expected a missing or empty folder, or "
            f"a previous {kind} to overwrite (found {list(entries)[:8]})"
        )
    for e in clear:
        p = out / e
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return out
