"""Stitch task: tiles → one raw OME-Zarr volume.

Abutting tiles (``stitch.overlap`` 0, no ``stitch.positions``) are placed as they are.
Overlapping tiles are registered on one channel (`lightsheet.stitch.register`), then fused
chunk by chunk straight into ``raw.ome.zarr``; the registration (every link's shift, NCC
before and after, kept or why dropped; every tile's position) goes into the image's lineage
record and two artifacts (a link table, and an overview image of the mosaic), and a tile
left at its nominal position is logged as a warning.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lightsheet.blocks import fused_chunks, stitch_chunks, write_blocks
from lightsheet.config import StitchConfig
from lightsheet.ingest import Manifest
from lightsheet.io.omezarr import read_image, write_image
from lightsheet.lineage import file_content_fingerprint, file_stat_fingerprint, read_lineage
from lightsheet.plots import plot_overview
from lightsheet.stitch import (
    configured_layout,
    stitch_configured,
)
from lightsheet.stitch.register import Link, Solution, link_table
from tasks._common import (
    OUTPUTS,
    Stage,
    StageSpec,
    dask_client,
    markdown_table,
    png_markdown,
    publish_image,
)

__all__ = [
    "publish_registration",
    "solution_from_record",
    "stitch_spec",
    "stitch_tiles",
]


def _config(config: StitchConfig | dict | None) -> StitchConfig:
    if isinstance(config, StitchConfig):
        return config
    return StitchConfig.model_validate(config or {})


def stitch_spec(
    manifest: dict, voxel_size_um: list[float], config: StitchConfig | dict | None, output: str
) -> StageSpec:
    """What `stitch_tiles` makes from the tiles (chunks default from the tile grid)."""
    m = Manifest.from_dict(manifest)
    config = _config(config)
    layout = configured_layout(m, voxel_size_um, config)
    if layout is None:
        chunks = config.chunks_zyx or stitch_chunks(m.shape[2:], voxel_size_um, m.tile_shape)
        params = {"chunks_zyx": list(chunks), "voxel_size_um": list(voxel_size_um)}
    else:
        chunks = config.chunks_zyx or fused_chunks(layout.shape_zyx, voxel_size_um)
        params = {
            "chunks_zyx": list(chunks),
            "voxel_size_um": list(voxel_size_um),
            "registration": {
                "overlap": config.overlap,
                "nominal_positions_vox": layout.positions_vox.round(6).tolist(),
                "registration_channel": config.registration_channel,
                "max_shift_vox": list(layout.max_shift_vox),
                "max_residual_vox": config.max_residual_vox,
                "blend_vox": list(layout.blend_vox),
                "interpolation": config.interpolation,
            },
        }
    inputs = {
        "tiles": {
            "kind": "raw tiles",
            "glob": m.input,
            "pattern": m.pattern,
            "n_files": len(m.paths),
            "grid_shape": list(m.grid_shape),
            "fingerprint": file_stat_fingerprint(m.paths),
        }
    }
    if config.positions is not None:
        inputs["positions"] = {
            "kind": "stage positions",
            "path": str(config.positions),
            "fingerprint": file_content_fingerprint(config.positions),
        }
    return StageSpec(
        "stitch",
        {"path": Path(output) / OUTPUTS["stitch"]},
        params=params,
        inputs=inputs,
        files=m.paths,
        files_by_content=False,
    )


@task(name="stitch")
def stitch_tiles(
    manifest: dict, voxel_size_um: list[float], config: StitchConfig | dict | None, output: str
) -> dict:
    """Place (or register and fuse) the tiles (`lightsheet.stitch`), write ``raw.ome.zarr``."""
    m = Manifest.from_dict(manifest)
    config = _config(config)
    stage = Stage(stitch_spec(manifest, voxel_size_um, config, output))
    layout = configured_layout(m, voxel_size_um, config)
    extra: dict = {}
    if not stage.reused:
        with dask_client():
            chunks = tuple(stage.spec.params["chunks_zyx"])
            shape = m.shape[2:] if layout is None else layout.shape_zyx
            # blocks of several chunks: fewer tasks, file writes overlapping the encoding
            blocks = write_blocks(chunks, shape, np.dtype(m.dtype).itemsize, voxel_size_um)
            lineage = stage.lineage()
            volume, solution = stitch_configured(
                m, voxel_size_um, config, chunks=blocks, layout=layout
            )
            if solution is not None:
                lineage["registration"] = solution.to_dict()
            fingerprint = write_image(
                volume,
                stage.outputs["path"],
                chunks=chunks,
                voxel_size_um=voxel_size_um,
                name="raw",
                channel_names=m.channel_names(),
                lineage=lineage,  # the tiles: listed in raw.ome.zarr.inputs.json
                compute=stage.progress("stitch: writing raw.ome.zarr"),
            )
    if layout is not None:
        extra = publish_registration(stage.outputs["path"], m.tile_shape, voxel_size_um)
    record = stage.finish(
        None if stage.reused else {"path": fingerprint},
        channel_names=m.channel_names(),
        **extra,
    )
    record.update(publish_image(record))
    return record


def publish_registration(path: Path, tile_shape, voxel_size_um) -> dict:
    """Artifacts of a registration read back from the image's lineage; warns on fallbacks.

    Returns a small summary for the stage record: links kept/total, tiles left nominal.
    """
    logger = get_run_logger()
    record = read_lineage(path) or {}
    solution = solution_from_record(record.get("registration"))
    if solution is None:
        return {}
    for i in solution.fallback:
        logger.warning(
            "stitch: tile %d has no registered link and stays at its nominal position %s "
            "(voxels); check its overlaps (noise, empty, or a stage error beyond "
            "stitch.max_shift_um)",
            i,
            solution.nominal[i].round(2).tolist(),
        )
    sides = [lk for lk in solution.links if np.count_nonzero(np.rint(lk.nominal_vox)) == 1]
    if sides and sum(lk.kept for lk in sides) < len(sides) / 2:
        logger.warning(
            "stitch: only %d of %d links between side neighbours were kept: the registration "
            "channel may have too little fine structure to register on (links kept without "
            "loops to check them can be wrong); consider stitch.registration_channel",
            sum(lk.kept for lk in sides),
            len(sides),
        )
    table = link_table(solution, voxel_size_um)
    full, _, _ = read_image(path)
    level = 0
    while True:  # the first pyramid level at most 512 voxels a side: a few MB
        try:
            image, _, _ = read_image(path, level=level)
        except IndexError:
            break
        if max(image.shape[3:]) <= 512:
            break
        level += 1
    background = np.asarray(image[0, 0].max(axis=0))
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_overview(
            solution,
            tile_shape,
            Path(tmp) / "overview.png",
            background=background,
            shape_yx=full.shape[3:],
        )
        picture = png_markdown(png, "mosaic overview")
    kept = int(table["kept"].sum())
    fallback = ", ".join(map(str, solution.fallback)) or "none"
    create_markdown_artifact(
        key="stitch-registration",
        markdown="\n\n".join(
            [
                f"### stitch: registration of {len(solution.positions)} tiles",
                f"{kept} of {len(table)} links kept; null NCC {solution.null_ncc:.3f}; "
                f"tiles at their nominal position: {fallback}.",
                markdown_table(table),
                picture,
            ]
        ),
        description="pairwise links (shift, NCC before/after, kept) and the mosaic",
    )
    return {
        "links_kept": kept,
        "links": len(table),
        "tiles_at_nominal": list(solution.fallback),
    }


def solution_from_record(reg: dict | None) -> Solution | None:
    """The `Solution` stored in a lineage record's ``registration`` entry."""
    if not reg:
        return None
    links = [
        Link(**{k: tuple(v) if isinstance(v, list) else v for k, v in lk.items()})
        for lk in reg["links"]
    ]
    return Solution(
        np.asarray(reg["positions_vox"], dtype=float),
        np.asarray(reg["nominal_vox"], dtype=float),
        links,
        list(reg["fallback_tiles"]),
        float(reg["null_ncc"]),
    )
