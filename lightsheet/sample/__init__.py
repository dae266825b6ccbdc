"""The generated sample acquisition: a mouse-brain-like phantom imaged as light-sheet tiles.

`generate` writes what a microscope and an atlas would give the pipeline, plus the ground
truth it should recover (layout in ``docs/architecture.md``)::

    DIR/tiles/*.tif  psf.tif  beads.tif  atlas/  truth/cells.csv  truth/density.csv
        sample.json  config.yaml

The phantom
    An ellipsoidal brain (flattened ventrally) fills the middle ~84 % of the volume, split
    into hemispheres along x (BrainGlobe ``"asr"``: x runs right → left, so the high-x half
    is left). A small hierarchy, root → 3 parents → 7 leaves, fills it: cortical layers as
    nested shells over the dorsal surface, a hippocampal lobe per hemisphere with a dentate
    core, thalamic and hypothalamic lobes, and brain-stem tissue owned by the parent itself.
    The annotation is this geometry sampled at the atlas voxel centres: BrainGlobe's atlas
    voxel ``j`` spans ``[j·R, (j+1)·R)`` µm (``R`` the atlas resolution), so its centre is
    at ``(j + 0.5)·R``.
Cells
    Each leaf (and the parent-own region) has its own density (40k–150k cells/mm³); its
    cell count is density × its annotation volume, and the cells are placed uniformly inside
    its annotation voxels, so each truth ``structure_id`` is the annotation at the cell and
    truth densities are count / annotation volume exactly. Nuclei are soft-edged, slightly
    ellipsoidal blobs 6–12 µm across (region-dependent mean), with lognormal brightness.
    Nuclei are solid bodies: a cell closer to another than the mean of their diameters is
    redrawn in its region (`separate`), so no two interpenetrate (they may touch).
Imaging
    Expected photons = smooth uneven illumination × autofluorescence (brighter inside the
    brain, region-dependent anatomy contrast) + nuclei (channel 0 only), blurred by a
    light-sheet PSF (`lightsheet.psf.psf_from_optics`), then Poisson shot noise, Gaussian
    read noise and a camera offset (`CAMERA`; ``config.yaml`` gives it as ``camera_offset``,
    the deconvolution's background), clipped to uint16. Time points repeat the same cells
    with fresh noise and slight bleaching.
Tiles
    Abutting tiles are rendered one at a time with a PSF-sized halo and cropped after the
    FFT convolution, so the stitched volume equals imaging the whole brain at once; memory
    stays at a few tiles whatever the size. Only the cell list and the coarse atlas are
    held whole.
Realism
    ``generate(..., realistic=True, cells="nuclei" | "somata")`` images textured tissue with
    vessels, debris, sheet decay and stripes instead (`lightsheet.sample.realistic`);
    `lightsheet.sample.planted` plants somata into a real background instead of a phantom.
Truth
    ``truth/cells.csv``: one row per nucleus and time point, centres in µm with voxel ``i``
    centred at ``i × voxel_size_um``; the image → atlas mapping is the identity in µm
    (orientation ``asr``, offset 0) and a cell at ``p`` µm lies in atlas voxel
    ``floor(p / R)``, BrainGlobe's lookup (`lightsheet.density.atlas_voxel`);
    ``intensity`` is the nucleus's peak brightness in photons per voxel before blur, at
    `VOXEL_SIZE_UM` (a sample at another voxel size, ``generate(..., voxel_size_um=)``,
    collects a pixel's area's worth more or less light).
    ``truth/density.csv`` (`truth_region_table`) counts the cells of one time point.

The package, by concern: `lightsheet.sample.presets` (sizes, channels, optics, camera,
regions), `lightsheet.sample.phantom` (geometry, atlas, cells, truth table),
`lightsheet.sample.render` (imaging one tile), `lightsheet.sample.writer` (`generate` and its
files); the variants in `realistic`, `overlap`, `misaligned`, `planted` and `tissue`.
Everything below is imported from ``lightsheet.sample``.

Examples
--------
>>> from lightsheet.sample import generate
>>> info = generate("/tmp/sample", size="tiny", seed=0)  # doctest: +SKIP
>>> info["shape"]  # (T, C, Z, Y, X)  # doctest: +SKIP
[1, 2, 48, 192, 192]
"""

from __future__ import annotations

from lightsheet.io.tables import DENSITY_COLUMNS
from lightsheet.sample.phantom import (
    BrainGeometry,
    Phantom,
    atlas_shape,
    build_phantom,
    cells_frame,
    draw_diameters,
    sample_cells,
    separate,
    structures_json,
    truth_region_table,
)
from lightsheet.sample.presets import (
    BLEACH_PER_TIMEPOINT,
    BRAIN_SEMI_AXIS_FRACTION,
    CAMERA,
    CELL_COLUMNS,
    CHANNELS,
    CUSTOM_ATLAS_SIDE,
    CUSTOM_TILE_ZYX,
    FILE_NAME,
    OPTICS,
    PLANE_EXPOSURE_MS,
    REGIONS,
    ROOT_ID,
    SAMPLE_FORMAT,
    SAMPLE_VERSION,
    SIZES,
    START_ABS_MS,
    TILE_THREADS,
    TIMEPOINT_INTERVAL_MS,
    VOXEL_SIZE_UM,
    Channel,
    Region,
    SizePreset,
    size_preset,
)
from lightsheet.sample.render import camera
from lightsheet.sample.writer import Progress, generate

__all__ = [  # A to Z; the nuclei's constants stay in lightsheet.sample.presets
    "atlas_shape",
    "BLEACH_PER_TIMEPOINT",
    "BRAIN_SEMI_AXIS_FRACTION",
    "BrainGeometry",
    "build_phantom",
    "CAMERA",
    "camera",
    "CELL_COLUMNS",
    "cells_frame",
    "draw_diameters",
    "Channel",
    "CHANNELS",
    "CUSTOM_ATLAS_SIDE",
    "CUSTOM_TILE_ZYX",
    "DENSITY_COLUMNS",
    "FILE_NAME",
    "generate",
    "OPTICS",
    "Phantom",
    "PLANE_EXPOSURE_MS",
    "Progress",
    "Region",
    "REGIONS",
    "ROOT_ID",
    "sample_cells",
    "separate",
    "SAMPLE_FORMAT",
    "SAMPLE_VERSION",
    "size_preset",
    "SizePreset",
    "SIZES",
    "START_ABS_MS",
    "structures_json",
    "TILE_THREADS",
    "TIMEPOINT_INTERVAL_MS",
    "truth_region_table",
    "VOXEL_SIZE_UM",
]
