"""Deconvolve task: raw → float32 Richardson–Lucy deconvolved OME-Zarr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task

from lightsheet.config import DeconvolveConfig, psf_of_channel
from lightsheet.deconvolve import clear_otf_cache, deconvolve_volumes
from lightsheet.errors import ConfigError
from lightsheet.io.omezarr import read_image, stored_volume, write_image
from lightsheet.lineage import file_content_fingerprint, recorded_quantum
from lightsheet.psf import load_psf
from tasks._common import (
    OUTPUTS,
    Stage,
    StageSpec,
    check_camera_offset,
    check_unchanged,
    dask_client,
    output_input,
    publish_image,
)

__all__ = [
    "deconvolve_spec",
    "deconvolve_volume",
]


def deconvolve_spec(
    raw: dict, psf: str | dict[int, str], config: DeconvolveConfig, output: str,
    camera_offset: float = 0.0, psf_voxel_size_um: list[float] | None = None,
) -> StageSpec:  # fmt: skip
    """What `deconvolve_volume` makes from the raw image, the PSF and the camera's offset.

    ``psf``: one file for every channel (input ``psf``), or each channel's (a mapping:
    inputs ``psf_c0``, ``psf_c1``, ... for the channels deconvolved).
    """
    params = {**config.model_dump(mode="json"), "camera_offset": float(camera_offset)}
    if psf_voxel_size_um is not None:  # absent when not given: earlier runs' keys hold
        params["psf_voxel_size_um"] = [float(v) for v in psf_voxel_size_um]
    return StageSpec(
        "deconvolve",
        {"path": Path(output) / OUTPUTS["deconvolve"]},
        params=params,
        inputs={
            "raw": output_input(raw),
            **{
                key: {"kind": "file", "path": p, "fingerprint": file_content_fingerprint(p)}
                for key, p in _psf_files(psf, raw, config).items()
            },
        },
    )


def _psf_files(psf: str | dict[int, str], raw: dict, config: DeconvolveConfig) -> dict:
    """The spec's PSF inputs: ``psf``, or ``psf_c{k}`` for each channel deconvolved.

    Only channels with a PSF: ingest, and `deconvolve_volumes`, refuse one without.
    """
    if not isinstance(psf, dict):
        return {"psf": psf}
    channels = config.channels or range(int(raw["shape"][1]))
    files = {c: psf_of_channel(psf, c) for c in channels}
    return {f"psf_c{c}": p for c, p in files.items() if p is not None}


@contextmanager
def _otfs_dropped(client: Any) -> Iterator[None]:
    """Every worker drops its cached OTFs when the stage ends, also when it fails.

    The cache (`lightsheet.deconvolve.kernel`, up to 2 GiB a process) spares each block
    of one shape a transform of the PSF; later stages have no use for it. Kept, it was
    live memory that the next stage started with: at 1 GB 151 MiB of the worker's 813.
    """
    try:
        yield
    finally:
        client.run(clear_otf_cache)


@task(name="deconvolve")
def deconvolve_volume(
    raw: dict, psf: str | dict[int, str], config: DeconvolveConfig, output: str,
    camera_offset: float = 0.0,
    psf_voxel_size_um: list[float] | None = None,
) -> dict:  # fmt: skip
    """Deconvolve every selected channel and time point; other channels pass through.

    ``camera_offset`` (the run's ``camera_offset``) is Richardson–Lucy's background
    (`lightsheet.deconvolve.kernel.richardson_lucy`); the result keeps the raw image's level.
    The PSF (one file for every channel, or each channel's: a mapping) is read at the
    image's voxel size (`lightsheet.psf.load_psf`; the file's own is ``psf_voxel_size_um``,
    the run's, or what its metadata declare).
    """
    stage = Stage(deconvolve_spec(raw, psf, config, output, camera_offset, psf_voxel_size_um))
    if not stage.reused:
        voxel, psfs = raw["voxel_size_um"], {}
        for key, spec in stage.spec.inputs.items():
            if key.startswith("psf"):
                array = load_psf(spec["path"], voxel, psf_voxel_size_um=psf_voxel_size_um)
                check_unchanged(spec, file_content_fingerprint(spec["path"]))
                psfs[None if key == "psf" else int(key.removeprefix("psf_c"))] = array
        psf_array = psfs.pop(None) if None in psfs else psfs  # one for all, or each channel's
        with dask_client() as client, _otfs_dropped(client):
            image, voxel_size_um, raw_lineage = read_image(raw["path"])
            n_channels = image.shape[1]
            channels = range(n_channels) if config.channels is None else config.channels
            for c in channels:
                if c >= n_channels:
                    raise ConfigError(
                        f"deconvolve.channels: channel {c} does not exist; the image has "
                        f"{n_channels} channels (0..{n_channels - 1})"
                    )
            check_camera_offset(raw["path"], channels, camera_offset)
            # each block reads its halo from the stored raw image (memory does not grow with
            # the volume) and covers whole raw chunks, which the output keeps
            volumes = [
                [stored_volume(raw["path"], t, c) for c in range(n_channels)]
                for t in range(image.shape[0])
            ]
            result, chunks = deconvolve_volumes(
                volumes,
                psf_array,
                channels=channels,
                iterations=config.iterations,
                acceleration=config.acceleration,
                depth=config.depth_zyx,
                block_bytes=config.block_mib << 20,
                background=camera_offset,
            )
            fingerprint = write_image(
                result,
                stage.outputs["path"],
                voxel_size_um=voxel_size_um,
                name="deconvolved",
                channel_names=raw.get("channel_names"),
                # float32 now, but the camera's integers' rounding stays in it
                lineage={**stage.lineage(), "quantum": recorded_quantum(image.dtype, raw_lineage)},
                compute=stage.progress(),
                chunks=chunks,
                # segment and featurize read it in halo-padded regions
                sharded=True,
            )
    record = stage.finish(
        None if stage.reused else {"path": fingerprint}, channel_names=raw.get("channel_names")
    )
    record.update(publish_image(record))
    return record
