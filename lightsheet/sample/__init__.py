"""The generated sample acquisition: a mouse-brain-like phantom imaged as light-sheet tiles.

`generate` writes what a microscope and an atlas would give the pipeline, plus the ground
truth it should recover (layout in ``docs/architecture.md``)::

    DIR/tiles/*.tif  psf.tif  atlas/  truth/cells.csv  truth/density.csv  sample.json  config.yaml

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
    read noise and a camera offset, clipped to uint16. Time points repeat the same cells
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
    ``intensity`` is the nucleus's peak brightness in photons per voxel before blur.
    ``truth/density.csv`` (`truth_region_table`) counts the cells of one time point.

Examples
--------
>>> from lightsheet.sample import generate
>>> info = generate("/tmp/sample", size="tiny", seed=0)  # doctest: +SKIP
>>> info["shape"]  # (T, C, Z, Y, X)  # doctest: +SKIP
[1, 2, 48, 192, 192]
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import SampleError
from lightsheet.io.tables import DENSITY_COLUMNS
from lightsheet.psf import psf_from_optics, write_psf
from lightsheet.sample._output import output_entries, replace_previous

#: Format tag written to ``sample.json``; a folder holding it may be overwritten.
SAMPLE_FORMAT = "lightsheet-sample"
SAMPLE_VERSION = 1

#: Voxel size (z, y, x) in µm of every preset: a low-magnification light-sheet, 2 µm steps.
VOXEL_SIZE_UM = (2.0, 1.0, 1.0)


@dataclass(frozen=True)
class SizePreset:
    """Extent and tiling of one sample size.

    Attributes
    ----------
    shape_zyx : (3,) tuple of int
        Voxels (Z, Y, X) of the whole volume per channel and time point.
    tile_grid_zyx : (3,) tuple of int
        Number of abutting tiles along (z, y, x); each divides the matching shape.
    atlas_factor : int
        Atlas voxel size (isotropic) as a multiple of the lateral image voxel size.
    description : str
        What the size is for.
    """

    shape_zyx: tuple[int, int, int]
    tile_grid_zyx: tuple[int, int, int]
    atlas_factor: int
    description: str

    def __post_init__(self) -> None:
        for n, g in zip(self.shape_zyx, self.tile_grid_zyx, strict=True):
            if g < 1 or n % g:
                raise ValueError(f"tile grid {self.tile_grid_zyx} must divide {self.shape_zyx}")

    @property
    def tile_shape_zyx(self) -> tuple[int, int, int]:
        """Voxels (Z, Y, X) of one tile."""
        return tuple(n // g for n, g in zip(self.shape_zyx, self.tile_grid_zyx, strict=True))  # type: ignore[return-value]

    def atlas_resolution_um(self, voxel_size_um: Sequence[float] = VOXEL_SIZE_UM) -> float:
        """Isotropic atlas voxel size in µm."""
        return float(self.atlas_factor * min(voxel_size_um[1:]))

    def raw_bytes(self, *, channels: int = 2, timepoints: int = 1) -> int:
        """Bytes of uint16 pixel data over all channels and time points."""
        return int(math.prod(self.shape_zyx)) * channels * timepoints * 2


#: The sizes of `generate`. Physical extent = shape × `VOXEL_SIZE_UM`.
SIZES: dict[str, SizePreset] = {
    "tiny": SizePreset(
        (48, 192, 192), (2, 2, 2), 4, "tests: 96×192×192 µm, ~80 cells, 2×2×2 tiles, < 5 s"
    ),
    "small": SizePreset(
        (128, 512, 512),
        (2, 2, 2),
        8,
        "demo: 256×512×512 µm, ≥ 100 cells in every leaf region, 128 MiB for 2 channels",
    ),
    "medium": SizePreset(
        (256, 1024, 1024),
        (2, 4, 4),
        8,
        "benchmark: 512×1024×1024 µm, 1 GiB raw for 2 channels, 2×4×4 tiles",
    ),
    "large": SizePreset(
        (512, 2048, 2048),
        (4, 8, 8),
        10,
        "scaling: 1×2×2 mm, 8 GiB raw for 2 channels, 4×8×8 tiles",
    ),
}


#: A custom size: raw bytes of one time point over all its channels, e.g. ``"4GB"``, ``"0.5 GB"``.
_CUSTOM_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*GB\s*$", re.IGNORECASE)
#: Tile extent (z, y, x) in voxels that custom sizes aim for (the presets' 16 MiB tiles).
CUSTOM_TILE_ZYX = (128, 256, 256)
#: Atlas voxels along y (and x) that custom sizes aim for (the medium preset's 128).
CUSTOM_ATLAS_SIDE = 128


def size_preset(size: str | SizePreset, *, channels: int = 2) -> SizePreset:
    """The `SizePreset` of a preset name or of a custom size in GB.

    A custom size ``"<N>GB"`` (decimal GB of raw uint16 for one time point over all
    ``channels``) keeps the presets' proportions: z : y : x = 1 : 4 : 4 voxels (the brain
    twice as wide as deep at 2 µm z steps), tiles near `CUSTOM_TILE_ZYX` and an atlas about
    `CUSTOM_ATLAS_SIDE` voxels wide. Tile counts are rounded, so the result is within a few
    percent of the request (see `SizePreset.raw_bytes`).

    Examples
    --------
    >>> size_preset("1GB").shape_zyx
    (250, 1000, 1000)
    >>> size_preset("16GB").tile_grid_zyx
    (5, 10, 10)
    """
    if isinstance(size, SizePreset):  # built by the caller (e.g. around a tile shape)
        return size
    if size in SIZES:
        return SIZES[size]
    m = _CUSTOM_SIZE.match(size) if isinstance(size, str) else None
    if m is None or float(m.group(1)) <= 0:
        raise SampleError(
            f"size: unknown sample size {size!r}; expected one of {list(SIZES)} or a positive "
            "size in GB such as '4GB'"
        )
    voxels = float(m.group(1)) * 1e9 / (2 * channels)  # per channel
    side_z = (voxels / 16) ** (1 / 3)
    target = (side_z, 4 * side_z, 4 * side_z)
    grid = tuple(max(1, round(n / t)) for n, t in zip(target, CUSTOM_TILE_ZYX, strict=True))
    tile = tuple(max(8, round(n / g)) for n, g in zip(target, grid, strict=True))
    shape = tuple(g * t for g, t in zip(grid, tile, strict=True))
    return SizePreset(
        shape,  # type: ignore[arg-type]
        grid,  # type: ignore[arg-type]
        max(1, round(shape[1] / CUSTOM_ATLAS_SIDE)),
        f"custom: {size.strip()} raw for {channels} channel(s), "
        f"{'x'.join(map(str, grid))} tiles of {'x'.join(map(str, tile))}",
    )


@dataclass(frozen=True)
class Channel:
    """One acquisition channel: laser line (for the file name) and what it shows."""

    wavelength_nm: int
    content: str
    inside_photons: float  # autofluorescence in the brain, per voxel before blur
    outside_photons: float  # mounting medium / background outside the brain
    anatomy_contrast: float  # 0: flat autofluorescence; 1: full region contrast


#: Channel 0 holds the nuclei (a 560 nm-excited nuclear dye), channel 1 the green
#: autofluorescence that shows anatomy; further channels are other anatomy-like backgrounds.
CHANNELS = (
    Channel(560, "nuclei", 60.0, 12.0, 0.3),
    Channel(488, "autofluorescence", 260.0, 25.0, 1.0),
    Channel(642, "anatomy", 90.0, 10.0, 0.6),
    Channel(405, "anatomy", 180.0, 30.0, 0.8),
)

#: Optics of the simulated detection: low-NA objective in a cleared sample (n = 1.45), a
#: light sheet 7 µm thick; emission of the nuclear dye. sigma ≈ (2.9, 0.8, 0.8) µm.
OPTICS = {"na": 0.16, "wavelength_nm": 600.0, "refractive_index": 1.45, "sheet_fwhm_um": 7.0}

#: Camera: sCMOS-like, gain 1 ADU per photo-electron.
CAMERA = {"offset_adu": 100.0, "read_noise_e": 1.6, "gain_adu_per_e": 1.0}

#: Nuclei: median peak brightness (photons per voxel before blur) and its lognormal sigma.
NUCLEUS_MEDIAN_PHOTONS = 450.0
NUCLEUS_LOG_SIGMA = 0.35
NUCLEUS_DIAMETER_RANGE_UM = (6.0, 12.0)
NUCLEUS_DIAMETER_SD_UM = 1.0
NUCLEUS_EDGE_UM = 0.5  # width of the soft nuclear boundary
BLEACH_PER_TIMEPOINT = 0.97
TIMEPOINT_INTERVAL_MS = 60_000
START_ABS_MS = 1_291_795
PLANE_EXPOSURE_MS = 10
#: Tiles rendered at once by `generate` (threads; each holds a few copies of one tile).
TILE_THREADS = max(1, min(4, os.cpu_count() or 1))

FILE_NAME = (
    "ex6-2_CamA_ch{c}_CAM1_stack0000_{wavelength}nm_{ms:07d}msec_{abs:010d}msecAbs_"
    "{x:03d}x_{y:03d}y_{z:03d}z_{t:04d}t.tif"
)


@dataclass(frozen=True)
class Region:
    """One structure of the phantom's hierarchy."""

    id: int
    acronym: str
    name: str
    parent: int | None
    rgb: tuple[int, int, int]
    density_cells_per_mm3: float | None = None  # own voxels' density; None: owns none
    diameter_um: float = 9.0  # mean nucleus diameter
    anatomy: float = 1.0  # relative autofluorescence


ROOT_ID = 997
#: The hierarchy (ids follow the Allen CCF where a matching structure exists).
REGIONS = (
    Region(ROOT_ID, "root", "root", None, (255, 255, 255)),
    Region(688, "CTX", "Cerebral cortex", ROOT_ID, (176, 255, 184)),
    Region(68801, "CTX1", "Cerebral cortex, layer 1", 688, (200, 255, 210), 40_000, 8.0, 1.25),
    Region(68823, "CTX2/3", "Cerebral cortex, layer 2/3", 688, (120, 230, 140), 140_000, 9.0, 1.0),
    Region(68856, "CTX5/6", "Cerebral cortex, layer 5/6", 688, (60, 190, 90), 95_000, 10.5, 0.9),
    Region(1089, "HPF", "Hippocampal formation", ROOT_ID, (126, 208, 75)),
    Region(375, "CA", "Ammon's horn", 1089, (126, 208, 75), 80_000, 10.0, 1.1),
    Region(726, "DG", "Dentate gyrus", 1089, (60, 150, 40), 150_000, 7.5, 1.35),
    Region(343, "BS", "Brain stem", ROOT_ID, (255, 112, 128), 45_000, 10.0, 0.75),
    Region(549, "TH", "Thalamus", 343, (255, 150, 160), 90_000, 9.5, 0.85),
    Region(1097, "HY", "Hypothalamus", 343, (230, 68, 56), 65_000, 9.0, 1.05),
)

#: The brain's semi-axes as a fraction of the volume's extent (the rest is a margin).
BRAIN_SEMI_AXIS_FRACTION = 0.42

CELL_COLUMNS = (
    "cell_id",
    "t",
    "z_um",
    "y_um",
    "x_um",
    "diameter_um",
    "intensity",
    "structure_id",
    "hemisphere",
)
_SAMPLE_ENTRIES = (
    "tiles", "atlas", "truth", "psf.tif", "sample.json", "config.yaml", "positions.csv",
)  # fmt: skip
_ATLAS_FILES = (
    "metadata.json",
    "structures.json",
    "annotation.tiff",
    "hemispheres.tiff",
    "reference.tiff",
)
_TRUTH_FILES = ("cells.csv", "density.csv", "tiles.csv")
_TILE_NAME = re.compile(
    r"^ex6-2_CamA_ch\d+_CAM1_stack0000_\d+nm_\d+msec_\d+msecAbs_\d+x_\d+y_\d+z_\d+t\.tif$"
)

Progress = Callable[[int, int, str], None]


# -- public API -----------------------------------------------------------------------------


def generate(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    channels: int = 2,
    timepoints: int = 1,
    progress: Progress | None = None,
    misaligned: bool = False,
    realistic: bool = False,
    cells: str = "nuclei",
) -> dict:
    """Write a sample acquisition with its atlas and ground truth.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write; created if missing. It must be empty or hold a previous sample
        (its ``sample.json``), whose files are replaced; other content is refused.
    size : {"tiny", "small", "medium", "large"} or str
        Preset from `SIZES`, or a custom size such as ``"4GB"`` (raw bytes of one time
        point over all channels; see `size_preset`).
    seed : int
        Seed of every random draw; the same seed gives the same files.
    channels : int
        1 to 4; channel 0 holds the nuclei, the others autofluorescence/anatomy only.
    timepoints : int
        Time points: the same cells with fresh noise and slight bleaching.
    progress : callable, optional
        ``progress(done, total, what)``, called after each tile file is written.
    misaligned : bool
        Rotate, scale, shift and warp the brain against its atlas and reorient the image
        (`lightsheet.sample.misaligned`); the config then registers the atlas.
    realistic : bool
        Image textured tissue with a dark outside, vessels, debris, uneven illumination and
        light-sheet stripes (`lightsheet.sample.realistic`); the config then sets channel 1
        as ``segment.background_channel``.
    cells : {"nuclei", "somata"}
        With ``realistic``: dense nuclei (6–12 µm) or sparse somata (12–18 µm).

    Returns
    -------
    dict
        The content of ``sample.json``.

    Raises
    ------
    SampleError
        Unknown size, or channels/timepoints/seed out of range.
    OutputExistsError
        ``out_dir`` holds files that are not a previous sample.
    """
    preset = _check_args(size, seed, channels, timepoints)
    out = _prepare_out_dir(Path(out_dir))
    # marks the folder as a sample from the start, so an interrupted run can be redone
    _write_json(out / "sample.json", {"format": SAMPLE_FORMAT, "complete": False, "size": size})

    if misaligned and realistic:
        raise SampleError("misaligned and realistic cannot be combined; expected one of them")
    if cells != "nuclei" and not realistic:
        raise SampleError(f"cells: {cells!r} needs realistic=True; expected 'nuclei' without")
    if misaligned:
        from lightsheet.sample.misaligned import build_misaligned_phantom

        ph = build_misaligned_phantom(size, seed=seed, channels=channels)
    elif realistic:
        from lightsheet.sample.realistic import build_realistic_phantom

        ph = build_realistic_phantom(size, seed=seed, channels=channels, cells=cells)
    else:
        ph = build_phantom(size, seed=seed, channels=channels)
    vox, shape = ph.voxel_size_um, preset.shape_zyx
    labels, sides, volume_res = ph.truth_volumes()
    density = truth_region_table(ph.cells, labels, sides, ph.structures, volume_res)
    write_psf(out / "psf.tif", ph.psf, vox)
    _write_phantom_atlas(out / "atlas", ph, channels)

    (out / "tiles").mkdir()
    grid = preset.tile_grid_zyx
    tshape = preset.tile_shape_zyx

    def write_tile(t: int, c: int, ordinal: int, tz: int, ty: int, tx: int) -> tuple[str, int]:
        lo = (tz * tshape[0], ty * tshape[1], tx * tshape[2])
        hi = tuple(a + b for a, b in zip(lo, tshape, strict=True))
        expected = ph.expected(lo, hi, channel=c, t=t)
        # one stream per tile: the result does not depend on the order of tiles
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, t, c, tz, ty, tx]))
        tile = camera(expected, rng=rng)
        del expected
        ms = t * TIMEPOINT_INTERVAL_MS
        absolute = START_ABS_MS + ms + ordinal * shape[0] * PLANE_EXPOSURE_MS
        name = FILE_NAME.format(
            c=c, wavelength=ph.channels[c].wavelength_nm, ms=ms, abs=absolute,
            x=tx, y=ty, z=tz, t=t,
        )  # fmt: skip
        _write_tile(out / "tiles" / name, tile)
        return name, (out / "tiles" / name).stat().st_size

    _ = ph._scene  # built once here, not raced for by the threads
    jobs = [
        (t, c, ordinal, *tile)
        for t in range(timepoints)
        for c in range(channels)
        for ordinal, tile in enumerate(itertools.product(*map(range, grid)))
    ]
    nbytes = 0
    for done, (name, size_bytes) in enumerate(_bounded_map(write_tile, jobs), start=1):
        nbytes += size_bytes
        if progress is not None:
            progress(done, len(jobs), name)

    (out / "truth").mkdir()
    truth = _cells_over_time(ph.cells, timepoints)
    truth.to_csv(out / "truth" / "cells.csv", index=False)
    density.to_csv(out / "truth" / "density.csv", index=False)

    info = _sample_info(ph, size=size, seed=seed, timepoints=timepoints)
    info.update(
        {
            "shape": [timepoints, channels, *shape],
            "tile_grid": list(grid),
            "tile_shape": list(tshape),
            "n_tiles": len(jobs),
            "bytes_written": nbytes,
            "misalignment": None if not misaligned else _misalignment_info(ph),
            "realistic": ph.info() if realistic else None,
        }
    )
    _write_config(out / "config.yaml", info)
    _write_json(out / "sample.json", info)
    return info


@dataclass(frozen=True, eq=False)
class Phantom:
    """Everything about a sample except its noise: atlas, cells, PSF and smooth fields.

    Attributes
    ----------
    preset : SizePreset
        The size it was built for.
    voxel_size_um : (3,) tuple of float
        Image voxel size (z, y, x) in µm.
    resolution_um : float
        Isotropic atlas voxel size in µm.
    geometry : BrainGeometry
        The analytic shape the atlas samples.
    annotation : (A0, A1, A2) ndarray of uint32
        Structure id per atlas voxel, 0 outside the brain.
    hemispheres : (A0, A1, A2) ndarray of uint8
        0 outside the brain, 1 left (high x), 2 right.
    structures : list of dict
        ``structures.json`` records.
    cells : pandas.DataFrame
        The nuclei, see `sample_cells`.
    psf : (Z, Y, X) ndarray of float32
        The PSF every channel is blurred with.
    channels : tuple of Channel
        The channels imaged.
    fields : list of (A0, A1, A2) ndarray of float32
        Expected autofluorescence photons per channel on the atlas grid.
    """

    preset: SizePreset
    voxel_size_um: tuple[float, float, float]
    resolution_um: float
    geometry: BrainGeometry
    annotation: np.ndarray
    hemispheres: np.ndarray
    structures: list[dict]
    cells: pd.DataFrame
    psf: np.ndarray
    channels: tuple[Channel, ...]
    fields: list[np.ndarray]

    def truth_volumes(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Labels and their voxel size that define the truth's region volumes."""
        return self.annotation, self.hemispheres, self.resolution_um

    @cached_property
    def _scene(self) -> _Scene:
        return _Scene(self.cells, self.psf, self.voxel_size_um, self.resolution_um, self.fields)

    def expected(self, lo: Sequence[int], hi: Sequence[int], *, channel: int, t: int = 0):
        """Expected photons per voxel (noise-free, blurred) of the box ``[lo, hi)``.

        Parameters
        ----------
        lo, hi : (3,) sequence of int
            Voxel index bounds (z, y, x) of the box; any box, inside the volume or not.
        channel : int
            Channel index; channel 0 holds the nuclei.
        t : int
            Time point (nuclei bleach by `BLEACH_PER_TIMEPOINT` per step).

        Returns
        -------
        (Z, Y, X) ndarray of float32
        """
        return self._scene.expected(
            lo, hi, channel=channel, nuclei=channel == 0, bleach=BLEACH_PER_TIMEPOINT**t
        )


def build_phantom(size: str = "tiny", *, seed: int = 0, channels: int = 2) -> Phantom:
    """The deterministic content of a sample: atlas, cells, PSF and background fields.

    Parameters
    ----------
    size : str
        Key of `SIZES`, or a custom size such as ``"4GB"`` (see `size_preset`).
    seed : int
        Seed of the random draws (cells and illumination).
    channels : int
        Number of channels, 1 to ``len(CHANNELS)``.

    Returns
    -------
    Phantom
    """
    preset = _check_args(size, seed, channels, 1)
    vox = VOXEL_SIZE_UM
    res_um = preset.atlas_resolution_um(vox)
    geometry = BrainGeometry.for_volume(preset.shape_zyx, vox)
    annotation, hemispheres = geometry.atlas(atlas_shape(preset.shape_zyx, vox, res_um), res_um)
    rng_cells = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    cells = sample_cells(annotation, hemispheres, res_um, rng=rng_cells)
    chans = CHANNELS[:channels]
    return Phantom(
        preset=preset,
        voxel_size_um=vox,
        resolution_um=res_um,
        geometry=geometry,
        annotation=annotation,
        hemispheres=hemispheres,
        structures=structures_json(),
        cells=cells,
        psf=psf_from_optics(voxel_size_um=vox, **OPTICS),
        channels=chans,
        fields=_background_fields(geometry, annotation, res_um, chans, seed),
    )


def truth_region_table(
    cells: pd.DataFrame,
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    structures: Sequence[Mapping],
    resolution_um: float | Sequence[float],
) -> pd.DataFrame:
    """Cell counts, volumes and densities per region and hemisphere (``density.csv``).

    This is the definition the pipeline's density stage is checked against: a region's
    volume is its annotation voxels × the atlas voxel volume (left/right from
    ``hemispheres``), its count is the number of cells with its ``structure_id``, and a
    parent carries its own voxels and cells plus those of all its descendants.

    Parameters
    ----------
    cells : pandas.DataFrame
        One row per cell with ``structure_id`` (0 background, -1 outside the atlas) and
        ``hemisphere`` (0 none, 1 left, 2 right).
    annotation : (A0, A1, A2) ndarray of int
        Structure id per atlas voxel, 0 outside the brain.
    hemispheres : (A0, A1, A2) ndarray of uint8
        0 outside the brain, 1 left, 2 right.
    structures : list of dict
        BrainGlobe ``structures.json`` records (``id``, ``acronym``, ``name``,
        ``structure_id_path``).
    resolution_um : float or (3,) sequence of float
        Atlas voxel size in µm.

    Returns
    -------
    pandas.DataFrame
        `DENSITY_COLUMNS`; one row per structure in the order given, then ``0``
        ("background") and ``-1`` ("outside atlas"). Densities are NaN where the volume is 0
        or undefined.
    """
    res = np.broadcast_to(np.asarray(resolution_um, dtype=float), (3,))
    voxel_mm3 = float(np.prod(res)) * 1e-9
    ann = np.asarray(annotation).ravel()
    hemi = np.asarray(hemispheres).ravel()
    if ann.shape != hemi.shape:
        raise SampleError(
            f"hemispheres: shape {np.shape(hemispheres)} differs from the annotation's "
            f"{np.shape(annotation)}; expected the same shape"
        )
    # voxels and cells per (structure id, hemisphere)
    vox_counts = pd.Series(1, index=pd.MultiIndex.from_arrays([ann, hemi])).groupby(level=[0, 1])
    voxels = vox_counts.size()
    sid = cells["structure_id"].to_numpy(np.int64)
    cell_counts = (
        pd.Series(1, index=pd.MultiIndex.from_arrays([sid, cells["hemisphere"].to_numpy(int)]))
        .groupby(level=[0, 1])
        .size()
    )

    def own(table: pd.Series, ids: list[int], h: int | None) -> int:
        sel = table[table.index.get_level_values(0).isin(ids)]
        if h is not None:
            sel = sel[sel.index.get_level_values(1) == h]
        return int(sel.sum())

    descendants = {
        int(s["id"]): [int(d["id"]) for d in structures if int(s["id"]) in d["structure_id_path"]]
        for s in structures
    }
    rows = []
    for s in structures:
        path = [int(p) for p in s["structure_id_path"]]
        ids = descendants[int(s["id"])]
        rows.append(
            {
                "structure_id": int(s["id"]),
                "acronym": s["acronym"],
                "structure_name": s["name"],
                "parent_structure_id": path[-2] if len(path) > 1 else pd.NA,
                "depth": len(path) - 1,
                "left_cell_count": own(cell_counts, ids, 1),
                "right_cell_count": own(cell_counts, ids, 2),
                "total_cells": own(cell_counts, ids, None),
                "left_volume_mm3": own(voxels, ids, 1) * voxel_mm3,
                "right_volume_mm3": own(voxels, ids, 2) * voxel_mm3,
                "total_volume_mm3": own(voxels, ids, None) * voxel_mm3,
            }
        )
    for special, name in ((0, "background"), (-1, "outside atlas")):
        inside = special == 0  # the atlas has background voxels; outside it, no volume
        rows.append(
            {
                "structure_id": special,
                "acronym": name,
                "structure_name": name,
                "parent_structure_id": pd.NA,
                "depth": pd.NA,
                "left_cell_count": own(cell_counts, [special], 1),
                "right_cell_count": own(cell_counts, [special], 2),
                "total_cells": own(cell_counts, [special], None),
                "left_volume_mm3": own(voxels, [0], 1) * voxel_mm3 if inside else np.nan,
                "right_volume_mm3": own(voxels, [0], 2) * voxel_mm3 if inside else np.nan,
                "total_volume_mm3": own(voxels, [0], None) * voxel_mm3 if inside else np.nan,
            }
        )
    table = pd.DataFrame(rows)
    for side in ("left", "right", "total"):
        count = table["total_cells" if side == "total" else f"{side}_cell_count"]
        volume = table[f"{side}_volume_mm3"].astype(float)
        # an empty or undefined volume has no density
        table[f"{side}_cells_per_mm3"] = (count / volume.where(volume > 0)).astype(float)
    table["parent_structure_id"] = table["parent_structure_id"].astype("Int64")
    table["depth"] = table["depth"].astype("Int64")
    return table[list(DENSITY_COLUMNS)]


def structures_json() -> list[dict]:
    """The phantom's hierarchy as BrainGlobe ``structures.json`` records (root first)."""
    by_id = {r.id: r for r in REGIONS}

    def path(r: Region) -> list[int]:
        return [*path(by_id[r.parent]), r.id] if r.parent is not None else [r.id]

    return [
        {
            "acronym": r.acronym,
            "id": r.id,
            "name": r.name,
            "structure_id_path": path(r),
            "rgb_triplet": list(r.rgb),
        }
        for r in REGIONS
    ]


def atlas_shape(
    shape_zyx: Sequence[int], voxel_size_um: Sequence[float], resolution_um: float
) -> tuple[int, int, int]:
    """Atlas voxels per axis so that the atlas covers the whole image.

    Image voxel ``i`` covers ``[(i - 0.5) v, (i + 0.5) v)`` and atlas voxel ``j`` covers
    ``[j R, (j + 1) R)`` (BrainGlobe), so the last atlas voxel is the one holding the
    image's far edge. (The image's first half voxel, below 0 µm, is outside the atlas.)

    Examples
    --------
    >>> atlas_shape((48, 192, 192), (2.0, 1.0, 1.0), 4.0)
    (24, 48, 48)
    """
    return tuple(  # type: ignore[return-value]
        max(1, math.ceil(round((n - 0.5) * v / resolution_um, 9)))
        for n, v in zip(shape_zyx, voxel_size_um, strict=True)
    )


# -- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrainGeometry:
    """The phantom's shape in physical coordinates.

    Positions are normalised by the brain's centre and semi-axes: ``a`` along z
    (anterior → posterior), ``s`` along y (superior → inferior), ``r`` along x
    (right → left); the brain is ``a² + s'² + r² ≤ 1`` with ``s' = s / 0.85`` below the
    equator (a flatter ventral side).
    """

    centre_um: tuple[float, float, float]
    semi_um: tuple[float, float, float]

    @classmethod
    def for_volume(cls, shape_zyx: Sequence[int], voxel_size_um: Sequence[float]):
        """Brain centred in the volume, semi-axes `BRAIN_SEMI_AXIS_FRACTION` of the extent."""
        centre = tuple((n - 1) / 2 * v for n, v in zip(shape_zyx, voxel_size_um, strict=True))
        semi = tuple(
            BRAIN_SEMI_AXIS_FRACTION * n * v for n, v in zip(shape_zyx, voxel_size_um, strict=True)
        )
        return cls(centre, semi)  # type: ignore[arg-type]

    def normalised(self, z_um, y_um, x_um):
        """Normalised coordinates ``(a, s, r)`` of positions (broadcasting arrays)."""
        return tuple(
            (p - c) / h
            for p, c, h in zip((z_um, y_um, x_um), self.centre_um, self.semi_um, strict=True)
        )

    def labels(self, z_um, y_um, x_um) -> tuple[np.ndarray, np.ndarray]:
        """Structure id and hemisphere at positions in µm (broadcasting arrays)."""
        a, s, r = self.normalised(z_um, y_um, x_um)
        s_flat = np.where(s > 0, s / 0.85, s)
        rho = np.sqrt(a**2 + s_flat**2 + r**2)
        ar = np.abs(r)
        brain = rho <= 1.0
        # cortex: nested shells over the dorsal and lateral surface, slightly undulating
        depth = rho * (1.0 + 0.025 * np.cos(5.0 * np.arctan2(s, a)))
        dorsal = s < 0.45 - 0.25 * a
        # hippocampus: a tilted lobe per hemisphere, posterior-dorsal, with a dentate core
        ha, hs, hr = a - 0.28, s + 0.12, ar - 0.40
        hu = 0.8 * ha + 0.6 * hs  # tilt the lobe in the a–s plane
        hv = -0.6 * ha + 0.8 * hs
        hpf = (hu / 0.50) ** 2 + (hv / 0.30) ** 2 + (hr / 0.40) ** 2
        # thalamus: a central lobe pair; hypothalamus: ventral, straddling the midline
        th = ((a + 0.02) / 0.52) ** 2 + ((s - 0.05) / 0.36) ** 2 + ((ar - 0.15) / 0.34) ** 2
        hy = ((a + 0.12) / 0.66) ** 2 + ((s - 0.52) / 0.34) ** 2 + (r / 0.60) ** 2
        ids = np.full(np.broadcast(a, s, r).shape, 343, dtype=np.uint32)  # brain-stem own
        ids = np.where(hy <= 1.0, 1097, ids)
        ids = np.where(th <= 1.0, 549, ids)
        shell = dorsal & (depth >= 0.76)
        ids = np.where(shell, 68856, ids)
        ids = np.where(shell & (depth >= 0.84), 68823, ids)
        ids = np.where(shell & (depth >= 0.915), 68801, ids)
        in_hpf = (hpf <= 1.0) & ~(shell & (depth >= 0.84))
        ids = np.where(in_hpf, 375, ids)
        ids = np.where(in_hpf & (hpf <= 0.5), 726, ids)
        ids = np.where(brain, ids, 0).astype(np.uint32)
        left = np.broadcast_to(x_um >= self.centre_um[2], ids.shape)
        hemi = np.where(brain, np.where(left, 1, 2), 0).astype(np.uint8)
        return ids, hemi

    def atlas(self, shape: Sequence[int], resolution_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Annotation (uint32) and hemispheres (uint8) sampled at atlas voxel centres.

        Voxel ``j`` spans ``[j R, (j + 1) R)`` µm (BrainGlobe), so its centre is ``(j + 0.5) R``.
        """
        z, y, x = ((np.arange(n, dtype=float) + 0.5) * resolution_um for n in shape)
        return self.labels(z[:, None, None], y[None, :, None], x[None, None, :])

    def brain_weight(self, z_um, y_um, x_um, *, edge_um: float = 3.0) -> np.ndarray:
        """Soft inside-the-brain indicator (1 inside, 0 outside, a smooth edge)."""
        a, s, r = self.normalised(z_um, y_um, x_um)
        s_flat = np.where(s > 0, s / 0.85, s)
        rho = np.sqrt(a**2 + s_flat**2 + r**2)
        scale = min(self.semi_um)
        return 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) * scale / edge_um, -50, 50)))


# -- cells ----------------------------------------------------------------------------------


def sample_cells(
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    resolution_um: float,
    *,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Place nuclei uniformly inside each region's annotation voxels at its density.

    Parameters
    ----------
    annotation : (A0, A1, A2) ndarray of uint32
        Structure ids at the atlas voxel centres.
    hemispheres : (A0, A1, A2) ndarray of uint8
        Hemisphere of each atlas voxel.
    resolution_um : float
        Isotropic atlas voxel size in µm.
    rng : numpy.random.Generator
        Source of every draw.

    Returns
    -------
    pandas.DataFrame
        ``cell_id`` (from 1), ``z_um, y_um, x_um`` (inside their atlas voxel ``j``,
        which spans ``[j R, (j + 1) R)`` µm), ``diameter_um``, ``semi_z_um, semi_y_um, semi_x_um``,
        ``intensity`` (peak photons per voxel before blur), ``structure_id``,
        ``hemisphere``; sorted by position.
    """
    parts, draw, owner = _region_draws(annotation, resolution_um, rng)
    pos = np.concatenate([draw(where, n) for _, where, n in parts]) if parts else np.empty((0, 3))
    diam = draw_diameters(np.array([parts[i][0].diameter_um for i in owner]), rng=rng)
    pos = separate(pos, diam, owner, [w for _, w, _ in parts], draw)
    ids, hemi = _region_of(pos, owner, parts, hemispheres, resolution_um)
    return cells_frame(pos, diam, ids, hemi, rng=rng)


def _region_draws(annotation: np.ndarray, resolution_um: float, rng, density_factor=1.0):
    """Cells per region at ``density_factor`` × its density, and where to put them.

    Returns ``parts`` (``(region, its flat annotation voxels, n)`` for every region given
    cells), ``draw(where, n)`` (n positions uniform in those voxels, in µm, clear of voxel
    faces so each one's atlas voxel is unambiguous) and ``owner`` (each cell's part).
    """
    res = float(resolution_um)
    voxel_mm3 = res**3 * 1e-9
    inset = 2e-3 * res
    parts = []
    for region in REGIONS:
        if region.density_cells_per_mm3 is None:
            continue
        where = np.flatnonzero(annotation.ravel() == region.id)
        n = int(round(density_factor * region.density_cells_per_mm3 * where.size * voxel_mm3))
        if n:
            parts.append((region, where, n))

    def draw(where: np.ndarray, n: int) -> np.ndarray:
        vox = np.stack(np.unravel_index(rng.choice(where, size=n), annotation.shape), axis=1)
        return np.round(vox * res + rng.uniform(inset, res - inset, size=(n, 3)), 3)

    owner = np.concatenate([np.full(n, i) for i, (_, _, n) in enumerate(parts)]).astype(int)
    return parts, draw, owner


def _region_of(pos, owner, parts, hemispheres: np.ndarray, resolution_um: float):
    """Structure id (of each cell's part) and hemisphere (at its position) per cell."""
    ids = np.array([parts[i][0].id for i in owner], dtype=np.int64)
    idx = np.floor(pos / float(resolution_um)).astype(np.intp)
    idx = np.clip(idx, 0, np.array(hemispheres.shape) - 1)
    return ids, hemispheres[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.int64)


def draw_diameters(
    mean_diameter_um: np.ndarray,
    *,
    rng: np.random.Generator,
    diameter_range_um: tuple[float, float] = NUCLEUS_DIAMETER_RANGE_UM,
    diameter_sd_um: float = NUCLEUS_DIAMETER_SD_UM,
) -> np.ndarray:
    """Cell diameters (µm) drawn around each cell's mean.

    Normal around ``mean_diameter_um`` with SD ``diameter_sd_um``, clipped to
    ``diameter_range_um``, rounded to 0.01 µm.
    """
    mean = np.asarray(mean_diameter_um, dtype=float)
    return np.clip(rng.normal(mean, diameter_sd_um, size=mean.shape), *diameter_range_um).round(2)


def cells_frame(
    pos: np.ndarray,
    diameter_um: np.ndarray,
    structure_id: np.ndarray,
    hemisphere: np.ndarray,
    *,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Cells at ``pos`` (µm) of the given diameters: shapes and brightness drawn, sorted.

    Returns the `sample_cells` table for cells whose region and side are known.
    """
    n_total = len(pos)
    diam = np.asarray(diameter_um, dtype=float)
    # slightly ellipsoidal: per-axis stretch around the mean radius, volume kept
    stretch = np.exp(rng.normal(0.0, 0.08, size=(n_total, 3)))
    stretch /= np.cbrt(stretch.prod(axis=1, keepdims=True))
    semi = 0.5 * diam[:, None] * stretch
    intensity = (NUCLEUS_MEDIAN_PHOTONS * rng.lognormal(0.0, NUCLEUS_LOG_SIGMA, n_total)).round(1)
    cells = pd.DataFrame(
        {
            "z_um": pos[:, 0],
            "y_um": pos[:, 1],
            "x_um": pos[:, 2],
            "diameter_um": diam,
            "semi_z_um": semi[:, 0],
            "semi_y_um": semi[:, 1],
            "semi_x_um": semi[:, 2],
            "intensity": intensity,
            "structure_id": structure_id,
            "hemisphere": hemisphere,
        }
    )
    cells = cells.sort_values(["z_um", "y_um", "x_um"], kind="stable").reset_index(drop=True)
    cells.insert(0, "cell_id", np.arange(1, len(cells) + 1, dtype=np.int64))
    return cells


def separate(
    pos: np.ndarray,
    diameter_um: np.ndarray,
    owner: np.ndarray,
    wheres: Sequence,
    draw: Callable,
    *,
    rounds: int = 200,
) -> np.ndarray:
    """Redraw cells until no two are closer than the mean of their diameters.

    Cells are solid bodies: two nuclei (or somata) may touch but not interpenetrate, and
    where they would, their images would add into one brighter blob that no detector, and
    no person, could split. Uniform placement alone puts a quarter of the cells of a dense
    region inside another's diameter. One cell of each close pair is redrawn in its own
    region (``draw(wheres[owner], n)``), so region counts and densities stay exact.

    Raises
    ------
    SampleError
        If the cells cannot be placed apart in ``rounds`` redraws (a region too small or
        too dense for its cells' size).
    """
    from scipy.spatial import cKDTree

    pos = np.array(pos, dtype=float)
    diam = np.asarray(diameter_um, dtype=float)
    for _ in range(rounds):
        if len(pos) < 2:
            return pos
        pairs = cKDTree(pos).query_pairs(float(diam.max()), output_type="ndarray")
        gap = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
        close = pairs[gap < 0.5 * (diam[pairs[:, 0]] + diam[pairs[:, 1]])]
        if len(close) == 0:
            return pos
        redo = np.unique(close[:, 1])
        for i in np.unique(owner[redo]):
            sel = redo[owner[redo] == i]
            pos[sel] = draw(wheres[i], len(sel))
    raise SampleError(
        f"could not place {len(pos)} cells apart (no two closer than the mean of their "
        f"diameters) in {rounds} redraws: a region is too small or too dense for its cells"
    )


def _cells_over_time(cells: pd.DataFrame, timepoints: int) -> pd.DataFrame:
    """The truth table: one row per cell and time point, intensity bleached over time."""
    frames = []
    for t in range(timepoints):
        f = cells.copy()
        f.insert(1, "t", t)
        f["intensity"] = (f["intensity"] * BLEACH_PER_TIMEPOINT**t).round(1)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)[list(CELL_COLUMNS)]


# -- imaging --------------------------------------------------------------------------------


def _background_fields(geometry, annotation, res_um, chans, seed) -> list[np.ndarray]:
    """Expected autofluorescence photons per channel on the atlas grid (smooth, float32).

    Illumination: a few random low-frequency waves (±10 %) times the light sheet's decay
    across x. Tissue: brighter inside the brain, region-dependent anatomy contrast smoothed
    over about one atlas voxel.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    # atlas voxel j's centre is at (j + 0.5) R (BrainGlobe: the voxel spans [j R, (j+1) R))
    z, y, x = ((np.arange(n, dtype=float)[:, None, None] + 0.5) * res_um for n in annotation.shape)
    y, x = y.reshape(1, -1, 1), x.reshape(1, 1, -1)
    extent = max(n * res_um for n in annotation.shape)
    wave = np.zeros(annotation.shape)
    for _ in range(4):
        direction = rng.normal(size=3)
        k = 2 * np.pi / (extent * rng.uniform(0.6, 1.6)) * direction / np.linalg.norm(direction)
        wave = wave + np.cos(k[0] * z + k[1] * y + k[2] * x + rng.uniform(0, 2 * np.pi))
    illumination = (1.0 + 0.1 * wave / 4.0) * np.exp(-0.3 * x / (annotation.shape[2] * res_um))
    brain = geometry.brain_weight(z, y, x, edge_um=max(3.0, 0.5 * res_um))
    level = np.ones(annotation.shape)
    for r in REGIONS:
        level[annotation == r.id] = r.anatomy
    level = gaussian_filter(level, sigma=1.0, mode="nearest")
    fields = []
    for ch in chans:
        tissue = ch.inside_photons * (1.0 + ch.anatomy_contrast * (level - 1.0))
        fields.append(
            (illumination * (ch.outside_photons + (tissue - ch.outside_photons) * brain)).astype(
                np.float32
            )
        )
    return fields


class _Scene:
    """Renders the expected (noise-free) image of any box of the volume.

    Voxel ``i`` is centred at ``origin_um + i × voxel_size_um``: a non-zero origin renders
    a tile whose stage position is not a whole number of voxels.
    """

    def __init__(self, cells, psf, voxel_size_um, res_um, fields, origin_um=(0.0, 0.0, 0.0)):
        self.origin_um = np.asarray(origin_um, dtype=float)
        self.vox = np.asarray(voxel_size_um, dtype=float)
        self.psf = np.asarray(psf, dtype=np.float32)
        self._psf_ft: dict[tuple[int, ...], np.ndarray] = {}
        self.half = np.array(psf.shape) // 2
        self.res_um = float(res_um)
        self.fields = fields
        self.centre = cells[["z_um", "y_um", "x_um"]].to_numpy(float) - self.origin_um
        self.semi = cells[["semi_z_um", "semi_y_um", "semi_x_um"]].to_numpy(float)
        self.intensity = cells["intensity"].to_numpy(float)
        # a nucleus reaches this far (µm) from its centre before its edge fades out
        self.reach = self.semi.max(axis=1) + 6 * NUCLEUS_EDGE_UM

    def expected(self, lo, hi, *, channel: int, nuclei: bool, bleach: float = 1.0):
        """Expected photons per voxel of the box ``[lo, hi)`` (voxel indices), float32.

        The box plus a PSF-half-size halo is rendered and blurred, then the halo is cut
        away ('valid' convolution), so adjacent boxes join exactly.
        """
        lo_h = np.asarray(lo) - self.half
        hi_h = np.asarray(hi) + self.half
        image = self._field(self.fields[channel], lo_h, hi_h)
        if nuclei:
            self._add_nuclei(image, lo_h, hi_h, bleach)
        blurred = self._convolve_valid(image)
        return np.maximum(blurred, 0.0, out=blurred)

    def _convolve_valid(self, image: np.ndarray) -> np.ndarray:
        """'valid' part of ``image`` ⊛ PSF by FFT, in float32 on all cores.

        A circular convolution at any length ≥ the image's leaves the 'valid' voxels
        untouched by wrap-around, so the FFT length is just the next fast size.
        """
        import scipy.fft

        fast = tuple(scipy.fft.next_fast_len(n, real=True) for n in image.shape)
        if fast not in self._psf_ft:
            self._psf_ft[fast] = scipy.fft.rfftn(self.psf, s=fast, workers=-1)
        spectrum = scipy.fft.rfftn(image, s=fast, workers=-1)
        spectrum *= self._psf_ft[fast]
        full = scipy.fft.irfftn(spectrum, s=fast, workers=-1)
        valid = tuple(slice(k - 1, n) for k, n in zip(self.psf.shape, image.shape, strict=True))
        return np.ascontiguousarray(full[valid], dtype=np.float32)

    def _field(self, grid: np.ndarray, lo, hi) -> np.ndarray:
        """Trilinear interpolation of an atlas-grid field at the voxel centres of a box.

        Outside the atlas grid the field continues constant (edge values).
        """
        out = grid
        for axis in range(3):
            # grid value j is the atlas voxel centre (j + 0.5) R
            q = (
                np.arange(lo[axis], hi[axis]) * self.vox[axis] + self.origin_um[axis]
            ) / self.res_um - 0.5
            n = grid.shape[axis]
            i0 = np.clip(np.floor(q).astype(np.intp), 0, max(n - 2, 0))
            frac = np.clip(q - i0, 0.0, 1.0) if n > 1 else np.zeros_like(q)
            i1 = np.minimum(i0 + 1, n - 1)
            # work on the few grid planes this box needs, not the whole grid
            first = int(i0.min())
            out = np.take(out, np.arange(first, int(i1.max()) + 1), axis=axis)
            shape = [1, 1, 1]
            shape[axis] = -1
            a = np.take(out, i0 - first, axis=axis)
            b = np.take(out, i1 - first, axis=axis)
            out = a + (b - a) * frac.reshape(shape).astype(np.float32)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _add_nuclei(self, image: np.ndarray, lo, hi, bleach: float) -> None:
        """Add the soft-edged ellipsoidal nuclei that reach into the box."""
        lo_um = np.asarray(lo) * self.vox
        hi_um = (np.asarray(hi) - 1) * self.vox
        reach = self.reach[:, None]
        hit = np.all((self.centre + reach >= lo_um) & (self.centre - reach <= hi_um), axis=1)
        for k in np.flatnonzero(hit):
            c, semi = self.centre[k], self.semi[k]
            start = np.maximum(np.ceil((c - self.reach[k]) / self.vox).astype(int), lo)
            stop = np.minimum(np.floor((c + self.reach[k]) / self.vox).astype(int) + 1, hi)
            if np.any(stop <= start):
                continue
            axes = [
                ((np.arange(start[d], stop[d]) * self.vox[d] - c[d]) / semi[d]) for d in range(3)
            ]
            rho = np.sqrt(
                axes[0][:, None, None] ** 2
                + axes[1][None, :, None] ** 2
                + axes[2][None, None, :] ** 2
            )
            # soft boundary: logistic in the distance (µm) from the nuclear surface
            dist = (rho - 1.0) * semi.mean()
            blob = (
                self.intensity[k]
                * bleach
                / (1.0 + np.exp(np.clip(dist / NUCLEUS_EDGE_UM, -50, 50)))
            )
            box = tuple(slice(s - o, e - o) for s, e, o in zip(start, stop, lo, strict=True))
            image[box] += blob.astype(np.float32)


def camera(expected: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Detect expected photons: Poisson shot noise, Gaussian read noise, offset, uint16.

    Parameters
    ----------
    expected : (Z, Y, X) ndarray of float
        Expected photo-electrons per voxel.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    (Z, Y, X) ndarray of uint16
    """
    electrons = rng.poisson(expected).astype(np.float32)
    electrons += CAMERA["read_noise_e"] * rng.standard_normal(expected.shape, dtype=np.float32)
    adu = electrons * CAMERA["gain_adu_per_e"] + CAMERA["offset_adu"]
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _bounded_map(fn: Callable, jobs: Sequence[tuple]):
    """``fn(*job)`` for every job on `TILE_THREADS` threads, yielded in order.

    At most two jobs per thread are in flight, so memory stays that of a few tiles
    however many there are. NumPy, the FFT and the file write release the GIL; the
    Poisson draw does not, so threads give about 1.5× on two cores.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(TILE_THREADS, thread_name_prefix="sample-tile") as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= 2 * TILE_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# -- files ----------------------------------------------------------------------------------


def _check_args(size, seed, channels, timepoints) -> SizePreset:
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise SampleError(f"seed: got {seed!r}; expected a non-negative integer")
    for name, value, top in (
        ("channels", channels, len(CHANNELS)),
        ("timepoints", timepoints, 9999),
    ):
        if (
            not isinstance(value, int | np.integer)
            or isinstance(value, bool)
            or not 1 <= value <= top
        ):
            raise SampleError(f"{name}: got {value!r}; expected an integer from 1 to {top}")
    return size_preset(size, channels=channels)


def _prepare_out_dir(out: Path) -> Path:
    """Create ``out``, or empty it of a previous sample; refuse anything else."""
    entries = output_entries(out)
    if not entries:
        return out
    previous = _read_sample_json(out / "sample.json")
    # the pipeline's results may live beside a sample: they are left alone
    unknown = [e for e in entries if e not in (*_SAMPLE_ENTRIES, "output")]
    unknown += [
        f"tiles/{p.name}"
        for p in (out / "tiles").glob("*")
        if (out / "tiles").is_dir() and not (p.is_file() and _TILE_NAME.match(p.name))
    ]
    unknown += [f"atlas/{p.name}" for p in _extra(out / "atlas", _ATLAS_FILES)]
    unknown += [f"truth/{p.name}" for p in _extra(out / "truth", _TRUTH_FILES)]
    return replace_previous(
        out,
        entries,
        previous=previous is not None,
        unknown=unknown,
        kind="sample",
        clear=_SAMPLE_ENTRIES,
    )


def _extra(folder: Path, allowed: Sequence[str]) -> list[Path]:
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder]
    return [p for p in folder.iterdir() if p.name not in allowed or not p.is_file()]


def _read_sample_json(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == SAMPLE_FORMAT else None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_tile(path: Path, tile: np.ndarray) -> None:
    import tifffile

    # plain uncompressed pages: contiguous data that readers can memory-map
    tifffile.imwrite(path, tile, photometric="minisblack", metadata={"axes": "ZYX"})


def _write_phantom_atlas(folder: Path, ph: Phantom, channels: int) -> None:
    """The phantom's atlas; its reference is the anatomy channel at atlas resolution."""
    field = ph.fields[min(1, channels - 1)]
    reference = np.rint(field * (20_000 / float(field.max())))
    _write_atlas(
        folder,
        ph.annotation,
        ph.hemispheres,
        reference.astype(np.uint16),
        ph.structures,
        ph.resolution_um,
    )


def _sample_info(ph: Phantom, *, size: str, seed: int, timepoints: int) -> dict:
    """``sample.json`` but the tiling (shape, tile grid and shape, counts: None here)."""
    channels = len(ph.channels)
    return {
        "format": SAMPLE_FORMAT,
        "version": SAMPLE_VERSION,
        "complete": True,
        "size": size,
        "seed": int(seed),
        "shape": None,
        "dtype": "uint16",
        "voxel_size_um": list(ph.voxel_size_um),
        "tile_grid": None,
        "tile_shape": None,
        "n_tiles": None,
        "channels": [
            {"index": c, "wavelength_nm": ch.wavelength_nm, "content": ch.content}
            for c, ch in enumerate(ph.channels)
        ],
        "nuclei_channel": 0,
        "pattern": DEFAULT_PATTERN,
        "input": "tiles/*.tif",
        "atlas": {
            "path": "atlas",
            "resolution_um": [ph.resolution_um] * 3,
            "shape": list(ph.annotation.shape),
            "orientation": "asr",
            "offset_um": [0.0, 0.0, 0.0],
        },
        "psf": {"path": "psf.tif", "shape": list(ph.psf.shape), **OPTICS},
        "camera": CAMERA,
        "n_cells": len(ph.cells),
        "nucleus_diameter_um": round(float(ph.cells["diameter_um"].mean()), 2),
        "regions": [
            {
                "structure_id": r.id,
                "acronym": r.acronym,
                "density_cells_per_mm3": r.density_cells_per_mm3,
                "nucleus_diameter_um": r.diameter_um,
            }
            for r in REGIONS
            if r.density_cells_per_mm3 is not None
        ],
        "raw_bytes": ph.preset.raw_bytes(channels=channels, timepoints=timepoints),
        "bytes_written": None,
    }


def _write_atlas(folder: Path, annotation, hemispheres, reference, structures, res_um) -> None:
    import tifffile

    folder.mkdir()
    meta = {
        "name": "lightsheet_synthetic_mouse",
        "citation": "unpublished (generated by lightsheet.sample)",
        "atlas_link": "",
        "species": "Mus musculus (synthetic phantom)",
        "symmetric": False,
        "resolution": [res_um] * 3,
        "orientation": "asr",
        "version": f"{SAMPLE_VERSION}.0",
        "shape": list(annotation.shape),
        "trasform_to_bg": np.eye(4).tolist(),  # (sic) BrainGlobe's key
        "additional_references": [],
    }
    _write_json(folder / "metadata.json", meta)
    _write_json(folder / "structures.json", structures)
    tifffile.imwrite(folder / "annotation.tiff", annotation.astype(np.uint32))
    tifffile.imwrite(folder / "hemispheres.tiff", hemispheres.astype(np.uint8))
    tifffile.imwrite(folder / "reference.tiff", reference)


def _misalignment_info(ph) -> dict:
    from lightsheet.sample.misaligned import SAMPLE_MISALIGNMENT, SAMPLE_ORIENTATION

    m = ph.misalignment
    return {
        "orientation": SAMPLE_ORIENTATION,
        **SAMPLE_MISALIGNMENT,
        "rotation_matrix": np.round(m.matrix * SAMPLE_MISALIGNMENT["sample_scale"], 6).tolist(),
        "shift_um": np.round(m.shift_um, 3).tolist(),
    }


def _write_config(path: Path, info: dict, *, stitch: dict | None = None) -> None:
    import yaml

    config = {
        "input": info["input"],
        "pattern": info["pattern"],
        "voxel_size_um": info["voxel_size_um"],
        "psf": info["psf"]["path"],
        "atlas": info["atlas"]["path"],
        "output": "output",
        "segment": {
            "channel": info["nuclei_channel"],
            "nucleus_diameter_um": info["nucleus_diameter_um"],
        },
        "density": {"orientation": "asr", "offset_um": [0.0, 0.0, 0.0]},
    }
    if stitch:
        config["stitch"] = stitch
    if info.get("realistic") and len(info["channels"]) > 1:  # the autofluorescence channel
        config["segment"]["background_channel"] = 1
    if info.get("misalignment"):
        config["density"] = {"orientation": info["misalignment"]["orientation"]}
        config["register"] = {"enabled": True, "channel": 1}
    header = (
        f"# Run config for the generated sample (size {info['size']}, seed {info['seed']}).\n"
        "# Relative paths are relative to this file's folder.\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
