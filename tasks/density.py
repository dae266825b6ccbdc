"""Density task: cells + atlas → cells per mm³ in every region and hemisphere."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lightsheet.config import DensityConfig
from lightsheet.density import AtlasTransform, assign_regions, region_table
from lightsheet.io.atlas import atlas_metadata, load_atlas
from lightsheet.io.atomic import claim_path
from lightsheet.io.tables import read_table, write_table
from lightsheet.lineage import (
    file_content_fingerprint,
    file_stat_fingerprint,
    finish_record,
    folder_fingerprint,
    hash_json,
    write_sidecar,
)
from lightsheet.plots import plot_density_slice, plot_top_regions
from tasks._common import OUTPUTS, Stage, StageSpec, markdown_table, output_input, png_markdown

__all__ = [
    "ATLAS_ENTRIES",
    "SUMMARY_COLUMNS",
    "atlas_fingerprint",
    "atlas_input",
    "density_spec",
    "density_table",
    "publish_density",
    "registered_mapping",
    "top_regions",
]

#: density.csv columns shown first in artifacts and summaries.
SUMMARY_COLUMNS = [
    "acronym",
    "structure_name",
    "left_cells_per_mm3",
    "right_cells_per_mm3",
    "total_cells_per_mm3",
    "total_cells",
    "total_volume_mm3",
]


def density_spec(
    segmented: dict,
    raw: dict,
    atlas: str,
    config: DensityConfig,
    output: str,
    registered: dict | None = None,
) -> StageSpec:
    """What `density_table` makes from the cells table, the atlas (and the registration)."""
    out = Path(output)
    inputs = {"cells": output_input(segmented, "cells"), "atlas": atlas_input(atlas)}
    if registered is not None:
        inputs["registration"] = output_input(registered, "register")
    return StageSpec(
        "density",
        {"density": out / OUTPUTS["density"], "cells": out / OUTPUTS["density_cells"]},
        params={
            **config.model_dump(mode="json"),
            "image_shape_zyx": list(raw["shape"][2:]),
            "voxel_size_um": list(raw["voxel_size_um"]),
            "registered": registered is not None,
        },
        inputs=inputs,
    )


def atlas_input(atlas: str) -> dict:
    """The atlas as a lineage input: its folder, BrainGlobe name and version, fingerprint."""
    meta = atlas_metadata(atlas)
    return {
        "kind": "atlas",
        "path": meta["path"],
        "name": meta["name"],
        "version": meta["version"],
        "fingerprint": atlas_fingerprint(meta["path"]),
    }


#: What the pipeline reads of an atlas folder (BrainGlobe's meshes/ is never read).
ATLAS_ENTRIES = tuple(
    f"{stem}{ext}"
    for stem in ("annotation", "hemispheres", "reference")
    for ext in (".tiff", ".tif", ".ome.zarr", ".zarr")
) + ("metadata.json", "structures.json")


def atlas_fingerprint(path: str | Path) -> str:
    """Fingerprint of the atlas files the pipeline reads (`ATLAS_ENTRIES`).

    A downloaded BrainGlobe atlas also holds hundreds of MB of meshes, which the pipeline
    never reads: hashing them would cost every run's reuse check seconds.
    """
    path = Path(path)
    if not path.is_dir() or (path / "zarr.json").exists():
        return folder_fingerprint(path) if path.is_dir() else file_content_fingerprint(path)
    parts = {}
    for name in ATLAS_ENTRIES:
        entry = path / name
        if entry.is_dir():
            parts[name] = folder_fingerprint(entry)
        elif entry.is_file():
            # as folder_fingerprint: content of small files, path/size/time of large ones
            small = entry.stat().st_size <= 16 << 20
            parts[name] = (
                file_content_fingerprint(entry) if small else file_stat_fingerprint([entry])
            )
    return hash_json(parts)


@task(name="density")
def density_table(
    segmented: dict,
    raw: dict,
    atlas: str,
    config: DensityConfig,
    output: str,
    registered: dict | None = None,
) -> dict:
    """Map cells into the atlas, count per region and hemisphere, divide by volume.

    Without a registration the image maps to the atlas by ``config``'s orientation, offset
    and affine. With one (the register stage's record), cells go to the atlas through its
    transforms (transformix) and region volumes are measured in sample space, from the
    registered labels, as brainmapper does.
    """
    out = Path(output)
    image_shape_zyx, voxel_size_um = raw["shape"][2:], raw["voxel_size_um"]
    stage = Stage(density_spec(segmented, raw, atlas, config, output, registered))
    caught: list[warnings.WarningMessage] = []
    plots = [out / "density_top_regions.png", out / "density_slice.png"]
    # a reused table needs the atlas only to redraw plots deleted since
    plot = not stage.reused or not all(p.is_file() for p in plots)
    atlas_obj = load_atlas(atlas) if plot else None
    registration_warnings = [] if registered is None else list(registered.get("warnings", []))
    if not stage.reused:
        volumes = None
        if registered is None:
            transform = AtlasTransform.from_config(
                config, atlas_obj, image_shape=image_shape_zyx, voxel_size_um=voxel_size_um
            )
        else:
            transform, volumes = registered_mapping(registered, atlas_obj)
        cells = read_table(segmented["cells"], fingerprint=segmented["fingerprints"]["cells"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cells = assign_regions(cells, atlas_obj, transform)
            table = region_table(
                cells,
                atlas_obj,
                transform=transform if config.volume_within_image and volumes is None else None,
                outside_warning_fraction=config.outside_warning_fraction,
                volumes_mm3=volumes,
            )
        for w in caught:
            stage.logger.warning("density: %s", w.message)
        lineage = {**stage.lineage(), "warnings": [str(w.message) for w in caught]}
        fps = {}
        for role, frame in (("density", table), ("cells", cells)):
            write_table(frame, stage.outputs[role])
            fps[role] = file_content_fingerprint(stage.outputs[role])
            write_sidecar(stage.outputs[role], finish_record(lineage, fps[role]))
    record = stage.finish(None if stage.reused else fps)
    table = pd.read_csv(record["density"])
    if plot:
        plot_top_regions(table, claim_path(plots[0]))
        plot_density_slice(table, atlas_obj, claim_path(plots[1]))
    publish_density(table, plots, record["density"])
    record.update(
        plots=[str(p) for p in plots],
        n_cells=int(
            table.loc[table["depth"] == 0, "total_cells"].sum()
            + table.loc[table["structure_id"] <= 0, "total_cells"].sum()
        ),
        warnings=registration_warnings + [str(w.message) for w in caught],
    )
    return record


def registered_mapping(registered: dict, atlas) -> tuple:
    """The register stage's transform for `assign_regions`, and its sample-space volumes."""
    from lightsheet.io.omezarr import read_image
    from lightsheet.register import FixedGrid, RegisteredTransform, sample_space_volumes

    summary = json.loads(Path(registered["register"]).read_text())
    grid = FixedGrid(**summary["grid"])
    folder = Path(registered["register"]).parent / summary["transform_folder"]
    files = [folder / name for name in summary["transform_files"]]
    transform = RegisteredTransform(grid, files, atlas.resolution_um, atlas.shape)
    labels = [
        np.asarray(read_image(registered[role])[0][0, 0].compute())
        for role in ("register_atlas", "register_hemispheres")
    ]
    return transform, sample_space_volumes(*labels, grid.bin_volume_um3())


def top_regions(table: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The ``n`` densest atlas regions (background and outside rows left out)."""
    regions = table[(table["structure_id"] > 0) & (table["total_volume_mm3"] > 0)]
    return regions.sort_values("total_cells_per_mm3", ascending=False).head(n)[SUMMARY_COLUMNS]


def publish_density(table: pd.DataFrame, plots: list[Path], where: str) -> None:
    """The densest regions as a table artifact, and the plots as a markdown artifact."""
    create_table_artifact(
        key="density-top-regions",
        table=top_regions(table, 15).round(4).to_dict(orient="records"),
        description=f"Densest regions ({where})",
    )
    images = "\n\n".join(png_markdown(p, p.stem) for p in plots)
    create_markdown_artifact(
        key="density-plots",
        markdown=f"### Cell density\n\n{markdown_table(top_regions(table).round(1))}\n\n{images}",
        description="Densest regions and an atlas slice coloured by density",
    )
