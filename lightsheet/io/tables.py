"""Tables (cells, densities): CSV with unit-bearing columns, Parquet too when large.

Writes are atomic: a hidden temporary file renamed over the target, so a crash never
leaves a half-written table that looks complete.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd

#: Above this many rows a Parquet copy is written beside the CSV (faster to load).
PARQUET_MIN_ROWS = 200_000


def write_table(table: pd.DataFrame, path: str | Path, *, float_format: str = "%.6g") -> Path:
    """Write ``table`` as CSV at ``path`` (and ``.parquet`` beside it when large)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        table.to_csv(tmp, index=False, float_format=float_format)
        os.replace(tmp, path)
        if len(table) >= PARQUET_MIN_ROWS:
            pq = path.with_suffix(".parquet")
            tmp_pq = path.parent / f".{pq.name}.partial-{uuid.uuid4().hex[:8]}"
            table.to_parquet(tmp_pq, index=False)
            os.replace(tmp_pq, pq)
    finally:
        tmp.unlink(missing_ok=True)
    return path
