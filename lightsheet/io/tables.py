"""Tables (cells, densities): CSV with unit-bearing columns, Parquet too when large.

Writes are atomic: a hidden temporary file renamed over the target, so a crash never
leaves a half-written table that looks complete.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lightsheet.io.atomic import atomic_path

#: Above this many rows a Parquet copy is written beside the CSV (faster to load).
PARQUET_MIN_ROWS = 200_000


def write_table(table: pd.DataFrame, path: str | Path, *, float_format: str = "%.6g") -> Path:
    """Write ``table`` as CSV at ``path`` (and ``.parquet`` beside it when large)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format=float_format)
    if len(table) >= PARQUET_MIN_ROWS:
        with atomic_path(path.with_suffix(".parquet")) as tmp:
            table.to_parquet(tmp, index=False)
    return path
