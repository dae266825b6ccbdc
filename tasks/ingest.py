"""Ingest task: find and check every input and setting before anything is computed."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from lightsheet.config import PipelineConfig
from lightsheet.errors import AtlasError, ConfigError, OutputNotWritableError
from lightsheet.ingest import Manifest, discover, voxel_size_mismatch
from lightsheet.io.atlas import Atlas, load_atlas
from lightsheet.psf import (
    FWHM_PER_SIGMA,
    check_psf_fits,
    load_psf,
    psf_grid_note,
    psf_sigma_um,
)

__all__ = [
    "check_atlas",
    "check_channels",
    "check_inputs",
    "check_writable",
    "ingest",
]


@task(name="ingest")
def ingest(config: PipelineConfig) -> dict:
    """Check every input and setting before any compute; return the tile manifest.

    The tiles (names, grid, shapes, dtypes, readability, decodability, size against
    ``stitch.max_tile_gib``), the PSF (and that it fits the
    volume), the atlas (files, hemispheres, every labelled id a structure), the model
    checkpoint when one is used (file, metadata bounds, weights), the channel indices the
    stages use, and that the output folder can be written. A setting wrong for this data
    is refused here, never after upstream stages have computed. A voxel size that the
    tiles' own metadata contradict is warned of (the run's value is used).
    """
    manifest = check_inputs(config)
    t, c, nz, ny, nx = manifest.grid_shape
    logger = get_run_logger()
    mismatch = voxel_size_mismatch(manifest, config.voxel_size_um)
    if mismatch:
        logger.warning("ingest: %s", mismatch)
    psf_note = _psf_note(config)
    if psf_note:
        logger.info("ingest: psf %s", psf_note)
    logger.info(
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
            {"field": "voxel size (z, y, x) µm", "value": str(tuple(config.voxel_size_um))},
            {"field": "voxel size check", "value": mismatch or "no other size in the metadata"},
            {"field": "psf", "value": psf_note or "none"},
        ],
        description=f"Tiles matching {config.input}",
    )
    return manifest.to_dict()


def _psf_note(config: PipelineConfig) -> str:
    """Each PSF file's grid (`psf_grid_note`) and FWHM at the image's voxel size.

    Per channel where the run gives each channel its own; "" without a PSF.
    """
    voxel, own = config.voxel_size_um, config.psf_voxel_size_um
    notes = []
    for channel, path in config.psf_files().items():
        sigma = psf_sigma_um(load_psf(path, voxel, psf_voxel_size_um=own), voxel)
        fwhm = ", ".join(f"{FWHM_PER_SIGMA * s:.2f}" for s in sigma)
        grid = psf_grid_note(path, voxel, psf_voxel_size_um=own)
        which = "" if channel is None else f"channel {channel}: "
        notes.append(f"{which}{path}: {grid}; FWHM (z, y, x) ({fwhm}) µm")
    return "; ".join(notes)


def check_inputs(config: PipelineConfig, *, atlas_labels: bool = True) -> Manifest:
    """Every check of `ingest`, without Prefect; the tile manifest when all pass.

    Parameters
    ----------
    config : PipelineConfig
        The run.
    atlas_labels : bool
        Also check that every id the atlas annotation labels is a structure (`check_atlas`:
        reads the annotation, chunk by chunk). False: the atlas files are only opened; the
        ``lightsheet`` command's quick check before Prefect starts.

    Raises
    ------
    LightsheetError, OSError
        The first input or setting that cannot work, named.
    """
    manifest = discover(
        config.input, config.pattern, max_tile_bytes=int(config.stitch.max_tile_gib * 2**30)
    )
    for path in config.psf_paths():  # read even when unused: the register stage may blur by it
        psf = load_psf(path, config.voxel_size_um, psf_voxel_size_um=config.psf_voxel_size_um)
        if config.deconvolve.enabled:
            name = f"psf {path}"
            check_psf_fits(psf.shape, manifest.shape[2:], what="stitched volume", name=name)
    atlas = load_atlas(config.atlas)
    if atlas_labels:
        check_atlas(atlas)
    check_channels(config, manifest)
    if config.featurize.model is not None and (
        config.featurize.enabled or config.segment.method == "model"
    ):
        from lightsheet.featurize import load_model  # torch: only when a checkpoint is given

        load_model(config.featurize.model)
    check_writable(Path(config.output))
    return manifest


def check_channels(config: PipelineConfig, manifest: Manifest) -> None:
    """Refuse channel indices (``deconvolve.channels``, ``segment.channel``) the tiles lack."""
    n = manifest.grid_shape[1]
    asked = {"segment.channel": [config.segment.channel]}
    if config.deconvolve.enabled and config.deconvolve.channels is not None:
        asked["deconvolve.channels"] = list(config.deconvolve.channels)
    if isinstance(config.psf, dict):
        asked["psf"] = sorted(config.psf)
    for name, channels in asked.items():
        for c in channels:
            if not 0 <= c < n:
                raise ConfigError(
                    f"{name}: channel {c} does not exist; the tiles matching {config.input!r} "
                    f"have {n} channel(s) (0..{n - 1})"
                )
    if config.deconvolve.enabled:
        try:  # a PSF for every channel deconvolved (null: every channel the tiles hold)
            config.deconvolution_psfs(config.deconvolve.channels or range(n))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def check_atlas(atlas: Atlas) -> None:
    """Refuse an atlas whose labelled ids cannot be trusted.

    Every id labelled in the annotation must be a structure of ``structures.json`` (or 0,
    background): read chunk by chunk, memory independent of the atlas's size. (An atlas
    without hemispheres that is not declared symmetric is refused by `load_atlas` itself.)
    """
    import dask.array as da
    import numpy as np

    ids = np.asarray(da.unique(atlas.annotation).compute())
    unknown = sorted(set(ids.tolist()) - set(atlas.structures.index.tolist()) - {0})
    if unknown:
        raise AtlasError(
            f"{atlas.path}: annotation ids not in structures.json: "
            f"{', '.join(map(str, unknown[:10]))}{' ...' if len(unknown) > 10 else ''}; "
            "expected every labelled id to be a structure"
        )


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as exc:
        raise OutputNotWritableError(
            f"output: cannot write to {folder} ({exc.strerror}); expected a writable folder"
        ) from exc
