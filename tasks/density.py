"""Density task: cells + atlas → cells per mm³ in every region and hemisphere."""

from __future__ import annotations

import base64
import time
import warnings
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lightsheet.config import DensityConfig
from lightsheet.density import (
    AtlasTransform,
    assign_regions,
    plot_density_slice,
    plot_top_regions,
    region_table,
)
from lightsheet.io.atlas import load_atlas
from lightsheet.io.tables import write_table

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


@task(name="density")
def density_table(
    segmented: dict, raw: dict, atlas: str, config: DensityConfig, output: str
) -> dict:
    """Map cells into the atlas, count per region and hemisphere, divide by volume."""
    start = time.monotonic()
    image_shape_zyx, voxel_size_um = raw["shape"][2:], raw["voxel_size_um"]
    logger = get_run_logger()
    out = Path(output)
    atlas_obj = load_atlas(atlas)
    transform = AtlasTransform.from_config(
        config, atlas_obj, image_shape=image_shape_zyx, voxel_size_um=voxel_size_um
    )
    cells = pd.read_csv(segmented["cells"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cells = assign_regions(cells, atlas_obj, transform)
        table = region_table(
            cells,
            atlas_obj,
            transform=transform if config.volume_within_image else None,
            outside_warning_fraction=config.outside_warning_fraction,
        )
    for w in caught:
        logger.warning("density: %s", w.message)
    density_path = write_table(table, out / "density.csv")
    cells_path = write_table(cells, out / "cells.csv")
    bar = plot_top_regions(table, out / "density_top_regions.png")
    slice_png = plot_density_slice(table, atlas_obj, out / "density_slice.png")
    top = table.sort_values("total_cells_per_mm3", ascending=False)
    top = top[(top["structure_id"] > 0) & (top["total_volume_mm3"] > 0)].head(15)[SUMMARY_COLUMNS]
    create_table_artifact(
        key="density-top-regions",
        table=top.round(1).to_dict(orient="records"),
        description=f"Densest regions ({density_path})",
    )
    create_markdown_artifact(
        key="density-plots",
        markdown="### Cell density\n\n"
        + "\n\n".join(
            f"![{p.stem}](data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()})"
            for p in (bar, slice_png)
        ),
        description="Densest regions and an atlas slice coloured by density",
    )
    return {
        "stage": "density",
        "density": str(density_path),
        "cells": str(cells_path),
        "plots": [str(bar), str(slice_png)],
        "n_cells": int(len(cells)),
        "seconds": round(time.monotonic() - start, 3),
        "warnings": [str(w.message) for w in caught],
    }
