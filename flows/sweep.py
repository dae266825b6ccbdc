"""The segmentation sweep: several settings on one sub-volume, side by side in the Prefect UI.

Pick segmentation settings for a new acquisition in minutes: crop a sub-volume once (from a
stage output such as ``deconvolved.ome.zarr``, or from a run config's tiles, stitched lazily
and deconvolved like the pipeline would), segment it with every setting in parallel, and
post one artifact with a table of counts per setting and a thumbnail of each result over
the same crop (label outlines on the maximum-intensity projection).

Outputs go to ``<output>/sweep-<key>/`` (key: a hash of the source, crop and settings, so a
sweep never overwrites another): ``crop.ome.zarr``, ``setting-<i>/labels.ome.zarr``,
``setting-<i>/cells.csv``, ``setting-<i>.png`` and ``sweep.csv``. Wiring only: the checks
and the crop are `lightsheet.sweep`'s, the I/O `tasks.sweep`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.deployment import current_settings, guard_paths
from lightsheet.access import config_paths
from lightsheet.config import SegmentConfig, load_config
from lightsheet.sweep import (
    CropCorner,
    CropShape,
    SegmentOverride,
    crop_points,
    is_config,
    merged_settings,
    sweep_key,
)
from tasks.sweep import projection, publish, segment_setting, write_crop

__all__ = [
    "sweep",
]


@flow(
    name="lightsheet-sweep",
    task_runner=ThreadPoolTaskRunner(max_workers=max(2, os.cpu_count() or 2)),
)
def sweep(
    source: str,
    settings: list[SegmentOverride],  # type: ignore[valid-type]
    base: SegmentConfig | None = None,
    t: Annotated[int, Field(ge=0)] = 0,
    channel: Annotated[int, Field(ge=0)] | None = None,
    crop_start_zyx: CropCorner | None = None,
    crop_shape_zyx: CropShape | None = None,
    deconvolve: bool = True,
    output: str | None = None,
    annotations: str | None = None,
    camera_offset: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None,
) -> dict:
    """Segment one sub-volume with several settings in parallel and compare them.

    Args:
        source: An OME-Zarr image (e.g. a run's deconvolved.ome.zarr) or a run config YAML
            (its tiles are stitched lazily; only the crop is read).
        settings: Segmentation settings to compare, each the fields that differ from base.
        base: Settings every one starts from; default: the run config's segment section
            (YAML source) or the defaults.
        t: Time point.
        channel: Channel holding the nuclei; default: base.channel.
        crop_start_zyx: First voxel (z, y, x) of the crop; default: centred.
        crop_shape_zyx: Crop shape (z, y, x) in voxels; default: 16 nucleus diameters a side.
        deconvolve: YAML source: deconvolve the crop as the run config says (recommended, so
            the settings see what the pipeline's segmentation sees).
        output: Folder for results; default: <run output>/sweeps.
        annotations: Cells a person marked, as a CSV of z, y, x or a Fiji CellCounter XML,
            in voxels of the source volume: each setting's precision, recall and F1 on the
            crop (one to one, within half a nucleus diameter).
        camera_offset: What the source reads with no light, in its units (the local
            method's gain and contrasts count light above it; a YAML source's crop is
            deconvolved with it); default: the run config's, or the one a run's deconvolved
            image was made with, else 0.

    Settings may differ in ``method`` (local, otsu, absolute, model: the run config's
    ``featurize.model`` or the bundled UNet) and may name a ``background_channel`` (the same
    in all of them), so methods compare side by side on one crop.
    """
    run_config = load_config(source) if is_config(source) else None
    if base is None:
        base = run_config.segment if run_config is not None else SegmentConfig()
    configs = merged_settings(base, settings)
    if output is None:
        output = str((run_config.output if run_config else Path(source).parent) / "sweeps")
    key = sweep_key(
        source=str(Path(source).resolve()),
        t=t,
        channel=channel,
        start=crop_start_zyx,
        shape=crop_shape_zyx,
        deconvolve=deconvolve,
        camera_offset=camera_offset,
        configs=[c.model_dump(mode="json") for c in configs],
    )
    # deployed: every path the sweep reads or writes lies in the deployment's data roots
    paths = {"sweep output": output, "source": source, "annotations": annotations}
    paths |= config_paths(run_config) if run_config is not None else {}
    guard_paths(current_settings(), **paths)
    folder = str(Path(output) / f"sweep-{key}")
    channel = base.channel if channel is None else channel
    points = None
    if annotations is not None:
        from lightsheet.evaluate import read_points

        points = read_points(annotations)  # before any compute: a bad file fails now
    background = next((c.background_channel for c in configs if c.background_channel), None)
    channels = channel if background is None else (channel, background)
    crop = write_crop(
        source, t, channels, base, crop_start_zyx, crop_shape_zyx, deconvolve, folder,
        camera_offset,
    )  # fmt: skip
    if points is not None:
        crop["points_um"] = crop_points(points, crop).tolist()
    shared = projection(crop, base)
    model = None
    if run_config is not None and run_config.featurize.model is not None:
        model = str(run_config.featurize.model)
    futures = [segment_setting.submit(shared, i, c, folder, model) for i, c in enumerate(configs)]
    rows = [f.result() for f in futures]
    return publish(rows, crop, folder, source)
