"""Tables (cells, densities): CSV with unit-bearing columns, Parquet too when large.

Writes are atomic: a hidden temporary file renamed over the target, so a crash never
leaves a half-written table that looks complete.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from lightsheet.errors import OutputDamagedError
from lightsheet.io.atomic import atomic_path

__all__ = [
    "DENSITY_COLUMNS",
    "PARQUET_MIN_ROWS",
    "read_table",
    "write_table",
]

#: Columns of the per-region density table (`lightsheet.density`), brainmapper's names.
DENSITY_COLUMNS = (
    "structure_id",
    "acronym",
    "structure_name",
    "parent_structure_id",
    "depth",
    "left_cell_count",
    "right_cell_count",
    "total_cells",
    "left_volume_mm3",
    "right_volume_mm3",
    "total_volume_mm3",
    "left_cells_per_mm3",
    "right_cells_per_mm3",
    "total_cells_per_mm3",
)

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


def read_table(path: str | Path, *, fingerprint: str | None = None) -> pd.DataFrame:
    """Read a CSV table; with ``fingerprint``, only if its bytes still have that fingerprint.

    The bytes are read once, hashed and parsed, so what a stage records as its input's
    fingerprint is the fingerprint of the bytes it actually used.

    Raises
    ------
    OutputDamagedError
        The file's bytes differ from ``fingerprint`` (edited or damaged since it was written).
    """
    from lightsheet.lineage import hash_bytes

    path = Path(path)
    data = path.read_bytes()
    if fingerprint is not None and hash_bytes(data) != fingerprint:
        raise OutputDamagedError(
            f"{path}: content differs from what the stage that wrote it recorded (fingerprint "
            f"{hash_bytes(data)}, expected {fingerprint}); it was edited or damaged during the "
            "run. Re-run: the damaged table is recomputed"
        )
    return pd.read_csv(io.BytesIO(data))
