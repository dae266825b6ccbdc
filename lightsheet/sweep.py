"""The segmentation sweep's library half: settings, the crop box and the crop itself.

No Prefect here: `tasks.sweep` writes the crop and segments it once per setting, and
`flows.sweep` wires them. A setting is a `SegmentOverride` (the fields that differ from a
base `SegmentConfig`); `merged_settings` checks every one with the config's own rules
before anything is computed. `crop_source` cuts the sub-volume out of the source lazily:
an OME-Zarr image, or a run config's tiles found (`lightsheet.ingest.discover`), stitched
(`lightsheet.stitch.stitch_configured`) and deconvolved (`lightsheet.deconvolve.deconvolve`,
with the config's halo and block size) the way the pipeline's own tasks do it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import dask.array as da
import numpy as np
from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from lightsheet.config import PipelineConfig, SegmentConfig, load_config
from lightsheet.errors import ConfigError, SweepError
from lightsheet.lineage import recorded_quantum

__all__ = [
    "DEFAULT_CROP_DIAMETERS",
    "Crop",
    "CropCorner",
    "CropShape",
    "SegmentOverride",
    "SweepError",
    "crop_box",
    "crop_points",
    "crop_source",
    "is_config",
    "merged_settings",
    "select_volume",
    "sweep_key",
]

CropCorner = tuple[
    Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]
]
CropShape = tuple[
    Annotated[int, Field(ge=4)], Annotated[int, Field(ge=4)], Annotated[int, Field(ge=4)]
]
#: Crop side in nucleus diameters when no shape is given: enough cells to compare settings.
DEFAULT_CROP_DIAMETERS = 16

#: One setting: any `SegmentConfig` field but ``channel`` (the sweep's), unset = the base's.
SegmentOverride = create_model(
    "SegmentOverride",
    __config__=ConfigDict(extra="forbid", frozen=True),
    __doc__="Segmentation settings that differ from the base (unset fields: the base's).",
    **{
        name: (Optional[f.annotation], FieldInfo.merge_field_infos(f, default=None))  # noqa: UP045
        for name, f in SegmentConfig.model_fields.items()
        if name != "channel"
    },
)


def is_config(source: str | Path) -> bool:
    """Whether a sweep source is a run config (YAML) rather than an OME-Zarr image."""
    return Path(source).suffix in (".yaml", ".yml")


def merged_settings(base: SegmentConfig, settings: list) -> list[SegmentConfig]:
    """Every setting as a full `SegmentConfig`, checked before any compute.

    Raises
    ------
    SweepError
        No settings, or a setting the segmentation would refuse (named by its index).
    """
    if not settings:
        raise SweepError("settings: expected at least one segmentation setting; got none")
    out = []
    for i, s in enumerate(settings):
        s = SegmentOverride.model_validate(s) if isinstance(s, dict) else s
        try:  # the config's own rules (absolute needs a threshold, volume range, channels)
            cfg = SegmentConfig.model_validate(
                {**base.model_dump(), **s.model_dump(exclude_none=True)}
            )
        except ValidationError as exc:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise SweepError(f"settings[{i}]: {why}") from exc
        out.append(cfg)
    channels = {c.background_channel for c in out} - {None}
    if len(channels) > 1:
        raise SweepError(
            f"settings: background_channel {sorted(channels)}; the crop holds one "
            "autofluorescence channel, expected the same in every setting"
        )
    return out


def crop_points(points_vox: np.ndarray, crop: dict) -> np.ndarray:
    """Annotated points (source voxels) inside the crop, in the crop's µm (``index · voxel``).

    Examples
    --------
    >>> crop = {"start_zyx": [1, 0, 0], "shape_zyx": [2, 4, 4], "voxel_size_um": [2.0, 1.0, 1.0]}
    >>> crop_points(np.array([[1, 1, 1], [3, 1, 1], [2.4, 0, 3]]), crop).tolist()
    [[0.0, 1.0, 1.0], [2.8, 0.0, 3.0]]
    """
    start = np.asarray(crop["start_zyx"], float)
    shape = np.asarray(crop["shape_zyx"], float)
    rel = np.asarray(points_vox, float).reshape(-1, 3) - start
    inside = np.all((rel >= -0.5) & (rel < shape - 0.5), axis=1)
    return rel[inside] * np.asarray(crop["voxel_size_um"], float)


def crop_box(
    shape_zyx: tuple[int, int, int],
    voxel_size_um: tuple[float, float, float],
    *,
    nucleus_diameter_um: float,
    start_zyx: tuple[int, int, int] | None = None,
    crop_shape_zyx: tuple[int, int, int] | None = None,
) -> tuple[slice, slice, slice]:
    """The crop: given, or centred with sides of `DEFAULT_CROP_DIAMETERS` nucleus diameters.

    Raises
    ------
    SweepError
        A crop that leaves the volume.
    """
    if crop_shape_zyx is None:
        side_um = DEFAULT_CROP_DIAMETERS * nucleus_diameter_um
        crop_shape_zyx = tuple(
            min(n, max(4, round(side_um / v)))
            for n, v in zip(shape_zyx, voxel_size_um, strict=True)
        )
    if start_zyx is None:
        start_zyx = tuple((n - c) // 2 for n, c in zip(shape_zyx, crop_shape_zyx, strict=True))
    box = []
    for axis, n, s, c in zip("zyx", shape_zyx, start_zyx, crop_shape_zyx, strict=True):
        if s < 0 or c < 1 or s + c > n:
            raise SweepError(
                f"crop along {axis}: voxels {s}..{s + c} leave the volume (0..{n}); "
                f"crop_start_zyx={tuple(start_zyx)}, crop_shape_zyx={tuple(crop_shape_zyx)}, "
                f"volume shape (z, y, x) {tuple(shape_zyx)}"
            )
        box.append(slice(s, s + c))
    return tuple(box)


def sweep_key(**parts: Any) -> str:
    """Short hash naming one sweep's output folder."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def select_volume(image: da.Array, t: int, channel: int, source: str) -> da.Array:
    """(Z, Y, X) of one time point and channel, with a clear error when they do not exist.

    Raises
    ------
    SweepError
        ``t`` or ``channel`` beyond the image's.
    """
    n_t, n_c = image.shape[0], image.shape[1]
    if not 0 <= t < n_t:
        raise SweepError(f"t={t}: {source} has {n_t} time point(s) (0..{n_t - 1})")
    if not 0 <= channel < n_c:
        raise SweepError(f"channel={channel}: {source} has {n_c} channel(s) (0..{n_c - 1})")
    return image[t, channel]


@dataclass(frozen=True)
class Crop:
    """A lazy sub-volume of a sweep source.

    Attributes
    ----------
    volume : (C, Z, Y, X) dask.array.Array
        The nuclei channel (deconvolved when asked), then any other channels as stored.
    box : tuple of 3 slice
        Where the crop lies in the source volume (voxels).
    voxel_size_um : tuple of 3 float
        Voxel size (z, y, x) in µm.
    quantum : float or None
        The step the source's values were recorded in (`lightsheet.lineage.recorded_quantum`),
        which a deconvolved crop keeps: the segment stage's ``quantum``.
    camera_offset : float
        What the source reads with no light (a deconvolved crop keeps it): the segment
        stage's ``camera_offset``.
    """

    volume: da.Array
    box: tuple[slice, slice, slice]
    voxel_size_um: tuple[float, float, float]
    quantum: float | None = None
    camera_offset: float = 0.0


def crop_source(
    source: str,
    *,
    t: int,
    channels: tuple[int, ...],
    nucleus_diameter_um: float,
    start_zyx: tuple[int, int, int] | None = None,
    crop_shape_zyx: tuple[int, int, int] | None = None,
    deconvolve: bool = True,
    camera_offset: float | None = None,
) -> Crop:
    """Cut the crop out of an OME-Zarr image or a run config's tiles, lazily.

    A run config's tiles are found, stitched (registered first when they overlap) and, with
    ``deconvolve`` and the config's ``deconvolve.enabled``, the nuclei channel deconvolved
    as the pipeline does it: with the config's PSF, iterations, halo and block size, over
    the crop and a halo of real data around it (reflected only at the volume's own edge,
    as in the pipeline), which is then trimmed.

    Parameters
    ----------
    source : str
        OME-Zarr image, or a run config YAML.
    t : int
        Time point.
    channels : tuple of int
        The nuclei channel first, then any others (an autofluorescence channel).
    nucleus_diameter_um : float
        Sets the default crop size (`crop_box`).
    start_zyx, crop_shape_zyx : tuple of 3 int, optional
        The crop (`crop_box`).
    deconvolve : bool
        Run config source: deconvolve the nuclei channel as the config says.
    camera_offset : float, optional
        What the source reads with no light. Default: the run config's (YAML source), the
        one a run's deconvolved image was made with (its lineage's ``params``), else 0.

    Raises
    ------
    SweepError
        A time point, channel or crop that the source does not have.
    """
    config: PipelineConfig | None = None
    if is_config(source):
        from lightsheet.ingest import discover
        from lightsheet.stitch import stitch_configured

        config = load_config(source)
        if camera_offset is not None:
            config = config.model_copy(update={"camera_offset": float(camera_offset)})
        manifest = discover(
            config.input, config.pattern, max_tile_bytes=int(config.stitch.max_tile_gib * 2**30)
        )
        image, _ = stitch_configured(manifest, config.voxel_size_um, config.stitch)
        voxel = tuple(float(v) for v in config.voxel_size_um)
        lineage: dict = {}
    else:
        from lightsheet.io.omezarr import read_image

        image, voxel, lineage = read_image(source)
    volume = select_volume(image, t, channels[0], source)
    box = crop_box(
        volume.shape,
        voxel,
        nucleus_diameter_um=nucleus_diameter_um,
        start_zyx=start_zyx,
        crop_shape_zyx=crop_shape_zyx,
    )
    crop = volume[box]
    if config is not None and deconvolve and config.deconvolve.enabled:
        crop = _deconvolved_crop(volume, box, config, channels[0])
    planes = [da.asarray(crop)] + [select_volume(image, t, c, source)[box] for c in channels[1:]]
    quantum = recorded_quantum(image.dtype, lineage)
    if camera_offset is None:
        camera_offset = (
            config.camera_offset
            if config is not None
            else (lineage.get("params") or {}).get("camera_offset", 0.0)
        )
    return Crop(da.stack(planes), box, voxel, quantum, float(camera_offset))  # type: ignore[arg-type]


def _deconvolved_crop(
    volume: da.Array, box: tuple[slice, ...], config: PipelineConfig, channel: int
):
    """The box of ``volume`` (``channel``) deconvolved with the pipeline's settings and halo."""
    from lightsheet.blocks import default_depth
    from lightsheet.deconvolve import check_background, deconvolve
    from lightsheet.psf import load_psf

    settings = config.deconvolve
    try:
        path = config.deconvolution_psfs([channel])[channel]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    psf = load_psf(path, config.voxel_size_um, psf_voxel_size_um=config.psf_voxel_size_um)
    depth = settings.depth_zyx or default_depth(psf.shape, settings.iterations)
    # the pipeline's halo of real data on each side of the crop (less only at the volume's
    # own edge, reflected there as in the pipeline), trimmed after: no edge artefacts
    wide = tuple(
        slice(max(0, s.start - d), min(n, s.stop + d))
        for s, n, d in zip(box, volume.shape, depth, strict=True)
    )
    check_background(volume[wide], config.camera_offset, where="the crop")
    sharp = deconvolve(
        volume[wide].astype(np.float32),
        psf,
        iterations=settings.iterations,
        acceleration=settings.acceleration,
        depth=settings.depth_zyx,
        block_bytes=settings.block_mib << 20,
        background=config.camera_offset,
    )
    inner = tuple(
        slice(s.start - w.start, s.stop - w.start) for s, w in zip(box, wide, strict=True)
    )
    return sharp[inner]
