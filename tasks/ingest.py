"""Ingest task: find and check every tile before anything is computed."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from lightsheet.ingest import discover
from lightsheet.io.atlas import load_atlas
from lightsheet.psf import load_psf


@task(name="ingest")
def ingest(
    input: str, pattern: str, psf: str, atlas: str, output: str, max_tile_gib: float = 64.0
) -> dict:
    """Check every input before any compute; return the tile manifest as plain data.

    The tiles (names, grid, shapes, dtypes, readability, decodability, size against
    ``max_tile_gib``), the PSF, the atlas folder and that the output folder can be written
    are all checked here.
    """
    manifest = discover(input, pattern, max_tile_bytes=int(max_tile_gib * 2**30))
    load_psf(psf)
    load_atlas(atlas)
    check_writable(Path(output))
    t, c, nz, ny, nx = manifest.grid_shape
    get_run_logger().info(
        "ingest: %d tiles (%d time points, %d channels, %dx%dx%d tiles) of %s %s, %.2f GB",
        len(manifest.tiles),
        t,
        c,
        nz,
        ny,
        nx,
        manifest.tile_shape,
        manifest.dtype,
        manifest.nbytes / 1e9,
    )
    create_table_artifact(
        key="ingest-manifest",
        table=[
            {"field": "files", "value": len(manifest.paths)},
            {"field": "grid (t, c, z, y, x)", "value": str(manifest.grid_shape)},
            {"field": "tile shape (z, y, x)", "value": str(manifest.tile_shape)},
            {"field": "dtype", "value": manifest.dtype},
            {"field": "volume shape", "value": str(manifest.shape)},
            {"field": "bytes", "value": manifest.nbytes},
            {"field": "channels", "value": ", ".join(manifest.channel_names())},
        ],
        description=f"Tiles matching {input}",
    )
    return manifest.to_dict()


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(
            f"output: cannot write to {folder} ({exc.strerror}); expected a writable folder"
        ) from exc
