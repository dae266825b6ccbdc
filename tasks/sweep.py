"""Sweep tasks: write the crop, its shared projection, one segmentation per setting, report.

The crop is cut by the library (`lightsheet.sweep.crop_source`: the pipeline's own ingest,
stitch and deconvolve path for a run config); these tasks do the I/O around it and post the
side-by-side artifact. Wired by `flows.sweep`.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lightsheet.config import SegmentConfig
from lightsheet.plots import overlay_png
from lightsheet.sweep import crop_source

__all__ = ["projection", "publish", "segment_setting", "write_crop"]


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
    camera_offset: float | None = None,
) -> dict:
    """Cut the sub-volume out of the source (lazily) and store it as ``crop.ome.zarr``.

    ``channel``: the nuclei channel, or (nuclei, autofluorescence); the crop's channels are
    those, in that order. ``camera_offset``: what the source reads with no light (default:
    the run config's, or a deconvolved image's lineage's, else 0; `crop_source`).
    """
    from lightsheet.io.omezarr import write_image

    path = Path(folder) / "crop.ome.zarr"
    crop = crop_source(
        source,
        t=t,
        channels=(channel,) if isinstance(channel, int) else tuple(channel),
        nucleus_diameter_um=base.nucleus_diameter_um,
        start_zyx=start_zyx,
        crop_shape_zyx=crop_shape_zyx,
        deconvolve=deconvolve_crop,
        camera_offset=camera_offset,
    )
    write_image(crop.volume[None], path, voxel_size_um=crop.voxel_size_um, name="crop")
    start = [s.start for s in crop.box]
    shape = [s.stop - s.start for s in crop.box]
    get_run_logger().info("sweep crop: start %s, shape %s (z, y, x) → %s", start, shape, path)
    return {
        "path": str(path),
        "start_zyx": start,
        "shape_zyx": shape,
        "voxel_size_um": list(crop.voxel_size_um),
        "quantum": crop.quantum,  # a deconvolved crop keeps its raw values' step
        "camera_offset": crop.camera_offset,  # and its raw level
    }


@task(name="sweep-segment")
def segment_setting(
    crop: dict, index: int, config: SegmentConfig, folder: str, model: str | None = None
) -> dict:
    """Segment the crop with one setting; write labels, cells and the thumbnail.

    Method ``model`` runs the UNet at ``model`` (None: the bundled one); with
    ``config.background_channel`` the crop's second channel is the autofluorescence; with
    ``crop["points_um"]`` (annotations in the crop) the row gets precision, recall and F1,
    and the thumbnail circles the annotated cells, found and missed.
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
        quantum=crop.get("quantum"),
        camera_offset=crop.get("camera_offset", 0.0),
    )
    out = Path(folder) / f"setting-{index}"
    out.mkdir(parents=True, exist_ok=True)
    write_image(
        result.labels[None, None], out / "labels.ome.zarr", voxel_size_um=voxel, labels=True
    )
    write_table(result.table, out / "cells.csv")
    score = annotated_yx = matched = None
    if crop.get("points_um") is not None:
        from lightsheet.evaluate import match_points

        points_um = np.asarray(crop["points_um"], float).reshape(-1, 3)
        score = match_points(
            result.table[["z_um", "y_um", "x_um"]].to_numpy(), points_um,
            max_distance_um=config.nucleus_diameter_um / 2,
        )  # fmt: skip
        annotated_yx = points_um[:, 1:] / np.asarray(voxel[1:], float)
        matched = np.isin(np.arange(len(points_um)), score.pairs[:, 1])
    labels_mip = np.asarray(result.labels.max(axis=0).compute())
    png = Path(folder) / f"setting-{index}.png"
    png.write_bytes(
        overlay_png(
            np.load(crop["mip"]), labels_mip, lo=crop["lo"], hi=crop["hi"],
            aspect=crop["aspect"], annotated_yx=annotated_yx, annotated_found=matched,
        )
    )  # fmt: skip
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
    if score is not None:
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
    circles = "; annotated cells circled, green where a detection matched them, magenta where not"
    caption = "Label outlines (yellow) over the crop's maximum-intensity projection"
    md += ["", caption + (circles if scored else "") + ":", ""]
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
