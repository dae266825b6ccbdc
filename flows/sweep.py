"""The segmentation sweep: several settings on one sub-volume, side by side in the Prefect UI.

Pick segmentation settings for a new acquisition in minutes: crop a sub-volume once (from a
stage output such as ``deconvolved.ome.zarr``, or from a run config's tiles, stitched lazily
and deconvolved like the pipeline would), segment it with every setting in parallel, and
post one artifact with a table of counts per setting and a thumbnail of each result over
the same crop (label outlines on the maximum-intensity projection).

Outputs go to ``<output>/sweep-<key>/`` (key: a hash of the source, crop and settings, so a
sweep never overwrites another): ``crop.ome.zarr``, ``setting-<i>/labels.ome.zarr``,
``setting-<i>/cells.csv``, ``setting-<i>.png`` and ``sweep.csv``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from flows.deployment import current_settings, guard_paths
from lightsheet.access import config_paths
from lightsheet.config import SegmentConfig, load_config

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


class SweepError(ValueError):
    """Sweep parameters that cannot work (raised before any compute)."""


# --------------------------------------------------------------------------- helpers (no Prefect)


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


def overlay_png(
    mip: np.ndarray, labels_mip: np.ndarray, *, lo: float, hi: float, aspect: float = 1.0
) -> bytes:
    """Label outlines over a maximum-intensity projection, as a small PNG.

    Parameters
    ----------
    mip : (Y, X) ndarray
        Intensity projection (the same for every setting).
    labels_mip : (Y, X) ndarray of int
        Label projection of one setting's result.
    lo, hi : float
        Display range (the same for every setting, so thumbnails compare).
    aspect : float
        Pixel height / width in µm.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    gray = np.clip((mip.astype(float) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    edges = find_boundaries(labels_mip, mode="inner")
    rgb[edges] = (1.0, 0.85, 0.0)  # outlines in yellow
    h, w = gray.shape
    scale = 256 / max(h * aspect, w)
    fig = plt.figure(figsize=(w * scale / 100, h * aspect * scale / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(rgb, aspect=aspect, interpolation="nearest")
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def sweep_key(**parts: Any) -> str:
    """Short hash naming one sweep's output folder."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- tasks


@task(name="sweep-crop")
def write_crop(
    source: str,
    t: int,
    channel: int | tuple[int, ...],
    base: SegmentConfig,
    start_zyx,
    crop_shape_zyx,
    deconvolve_crop: bool,
    folder: str,
) -> dict:
    """Cut the sub-volume out of the source (lazily) and store it as ``crop.ome.zarr``.

    ``channel``: the nuclei channel, or (nuclei, autofluorescence); the crop's channels are
    those, in that order.
    """
    import dask.array as da

    from lightsheet.io.omezarr import read_image, write_image

    path = Path(folder) / "crop.ome.zarr"
    config = None
    if Path(source).suffix in (".yaml", ".yml"):
        from lightsheet.ingest import discover
        from lightsheet.stitch import stitch

        config = load_config(source)
        image = stitch(discover(config.input, config.pattern), voxel_size_um=config.voxel_size_um)
        voxel = tuple(float(v) for v in config.voxel_size_um)
    else:
        image, voxel, _ = read_image(source)
    channels = (channel,) if isinstance(channel, int) else tuple(channel)
    volume = _select(image, t, channels[0], source)
    box = crop_box(
        volume.shape,
        voxel,
        nucleus_diameter_um=base.nucleus_diameter_um,
        start_zyx=start_zyx,
        crop_shape_zyx=crop_shape_zyx,
    )
    crop = volume[box]
    if config is not None and deconvolve_crop and config.deconvolve.enabled:
        from lightsheet.deconvolve import deconvolve
        from lightsheet.psf import load_psf

        psf = load_psf(config.psf)
        # deconvolve with a PSF-sized margin of real data, then trim it: no edge artefacts
        margin = [
            min(s.start, n - s.stop, p // 2)
            for s, n, p in zip(box, volume.shape, psf.shape, strict=True)
        ]
        wide = tuple(slice(s.start - m, s.stop + m) for s, m in zip(box, margin, strict=True))
        sharp = deconvolve(
            volume[wide].astype(np.float32),
            psf,
            iterations=config.deconvolve.iterations,
            acceleration=config.deconvolve.acceleration,
        )
        crop = sharp[
            tuple(slice(m, m + (s.stop - s.start)) for s, m in zip(box, margin, strict=True))
        ]
    planes = [da.asarray(crop)] + [_select(image, t, c, source)[box] for c in channels[1:]]
    write_image(da.stack(planes)[None], path, voxel_size_um=voxel, name="crop")
    start = [s.start for s in box]
    shape = [s.stop - s.start for s in box]
    get_run_logger().info("sweep crop: start %s, shape %s (z, y, x) → %s", start, shape, path)
    return {"path": str(path), "start_zyx": start, "shape_zyx": shape, "voxel_size_um": list(voxel)}


def _select(image, t: int, channel: int, source: str):
    """(Z, Y, X) of one time point and channel, with a clear error when they do not exist."""
    n_t, n_c = image.shape[0], image.shape[1]
    if not 0 <= t < n_t:
        raise SweepError(f"t={t}: {source} has {n_t} time point(s) (0..{n_t - 1})")
    if not 0 <= channel < n_c:
        raise SweepError(f"channel={channel}: {source} has {n_c} channel(s) (0..{n_c - 1})")
    return image[t, channel]


@task(name="sweep-segment")
def segment_setting(
    crop: dict, index: int, config: SegmentConfig, folder: str, model: str | None = None
) -> dict:
    """Segment the crop with one setting; write labels, cells and the thumbnail.

    Method ``model`` runs the UNet at ``model`` (None: the bundled one); with
    ``config.background_channel`` the crop's second channel is the autofluorescence; with
    ``crop["points_um"]`` (annotations in the crop) the row gets precision, recall and F1.
    """
    from lightsheet.io.omezarr import read_image, write_image
    from lightsheet.io.tables import write_table
    from lightsheet.segment import segment_volume

    begin = time.monotonic()
    image, voxel, _ = read_image(crop["path"])
    net = None
    if config.method == "model":
        from lightsheet.featurize import load_model

        net = load_model(model)
    result = segment_volume(
        image[0, 0],
        voxel_size_um=voxel,
        config=config,
        background=image[0, 1] if config.background_channel is not None else None,
        model=net,
    )
    out = Path(folder) / f"setting-{index}"
    out.mkdir(parents=True, exist_ok=True)
    write_image(
        result.labels[None, None], out / "labels.ome.zarr", voxel_size_um=voxel, labels=True
    )
    write_table(result.table, out / "cells.csv")
    labels_mip = np.asarray(result.labels.max(axis=0).compute())
    png = Path(folder) / f"setting-{index}.png"
    png.write_bytes(
        overlay_png(
            np.load(crop["mip"]), labels_mip, lo=crop["lo"], hi=crop["hi"], aspect=crop["aspect"]
        )
    )
    volume_mm3 = float(np.prod(image.shape[2:]) * np.prod(voxel)) / 1e9
    seconds = time.monotonic() - begin
    changed = {k: v for k, v in config.model_dump(mode="json").items() if v != crop["base"].get(k)}
    row = {
        "setting": index,
        "method": config.method,
        "changes": changed,
        "threshold": round(float(result.threshold), 4),
        "cells": int(result.n),
        "cells_per_mm3": round(result.n / volume_mm3, 1),
        "median_volume_um3": round(float(result.table["volume_um3"].median()), 1)
        if result.n
        else None,
    }
    if crop.get("points_um") is not None:
        from lightsheet.evaluate import match_points

        found = result.table[["z_um", "y_um", "x_um"]].to_numpy()
        score = match_points(
            found, np.asarray(crop["points_um"]).reshape(-1, 3),
            max_distance_um=config.nucleus_diameter_um / 2,
        )  # fmt: skip
        row |= {k: round(getattr(score, k), 3) for k in ("precision", "recall", "f1")}
    return {**row, "seconds": round(seconds, 2), "labels": str(out / "labels.ome.zarr"),
            "png": str(png)}  # fmt: skip


@task(name="sweep-projection")
def projection(crop: dict, base: SegmentConfig) -> dict:
    """The crop's maximum-intensity projection and display range shared by all thumbnails."""
    from lightsheet.io.omezarr import read_image

    image, voxel, _ = read_image(crop["path"])
    mip = np.asarray(image[0, 0].max(axis=0).compute(), dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(mip, [1, 99.8]))
    path = Path(crop["path"]).with_name("crop-mip.npy")
    np.save(path, mip)
    return {
        **crop,
        "mip": str(path),
        "lo": lo,
        "hi": hi,
        "aspect": voxel[1] / voxel[2],
        "base": base.model_dump(mode="json"),
    }


# --------------------------------------------------------------------------- flow


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

    Settings may differ in ``method`` (local, otsu, absolute, model: the run config's
    ``featurize.model`` or the bundled UNet) and may name a ``background_channel`` (the same
    in all of them), so methods compare side by side on one crop.
    """
    is_config = Path(source).suffix in (".yaml", ".yml")
    run_config = load_config(source) if is_config else None
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
    crop = write_crop(source, t, channels, base, crop_start_zyx, crop_shape_zyx, deconvolve, folder)
    if points is not None:
        crop["points_um"] = crop_points(points, crop).tolist()
    shared = projection(crop, base)
    model = None
    if run_config is not None and run_config.featurize.model is not None:
        model = str(run_config.featurize.model)
    futures = [segment_setting.submit(shared, i, c, folder, model) for i, c in enumerate(configs)]
    rows = [f.result() for f in futures]
    return publish(rows, crop, folder, source)


def publish(rows: list[dict], crop: dict, folder: str, source: str) -> dict:
    """``sweep.csv`` and the side-by-side artifact (counts table and thumbnails)."""
    import pandas as pd

    table = pd.DataFrame(
        [
            {**{k: v for k, v in r.items() if k != "changes"}, "changes": json.dumps(r["changes"])}
            for r in rows
        ]
    )
    csv = Path(folder) / "sweep.csv"
    table.to_csv(csv, index=False)
    scored = "f1" in rows[0]
    header = "| setting | method | changes | threshold | cells | cells/mm³ | median volume µm³ |"
    header += " precision | recall | F1 | s |" if scored else " s |"
    md = [
        f"## Segmentation sweep of `{source}`",
        "",
        f"Crop: start {crop['start_zyx']}, shape {crop['shape_zyx']} (z, y, x) voxels at "
        f"{crop['voxel_size_um']} µm. Results: `{folder}`.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(base)"
        score = f"{r['precision']} | {r['recall']} | {r['f1']} | " if scored else ""
        md.append(
            f"| {r['setting']} | {r['method']} | {changes} | {r['threshold']} | {r['cells']} | "
            f"{r['cells_per_mm3']} | {r['median_volume_um3']} | {score}{r['seconds']} |"
        )
    md += ["", "Label outlines over the crop's maximum-intensity projection:", ""]
    md.append("| " + " | ".join(f"setting {r['setting']}" for r in rows) + " |")
    md.append("|" + "---|" * len(rows))
    pics = [base64.b64encode(Path(r["png"]).read_bytes()).decode() for r in rows]
    md.append("| " + " | ".join(f"![setting](data:image/png;base64,{p})" for p in pics) + " |")
    create_markdown_artifact(key="segmentation-sweep", markdown="\n".join(md), description=folder)
    create_table_artifact(
        key="segmentation-sweep-counts",
        table=[
            {
                k: r[k]
                for k in ("setting", "method", "threshold", "cells", "cells_per_mm3", "f1")
                if k in r
            }
            for r in rows
        ],  # fmt: skip
        description=f"cells per setting on the crop of {source}",
    )
    return {"folder": folder, "csv": str(csv), "crop": crop, "settings": rows}
