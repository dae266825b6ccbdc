"""The sample's fixed description: sizes, channels, optics, camera, regions, nuclei."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightsheet.errors import SampleError

__all__ = [
    "BLEACH_PER_TIMEPOINT",
    "BRAIN_SEMI_AXIS_FRACTION",
    "CAMERA",
    "CELL_COLUMNS",
    "CHANNELS",
    "CUSTOM_ATLAS_SIDE",
    "CUSTOM_TILE_ZYX",
    "FILE_NAME",
    "NUCLEUS_DIAMETER_RANGE_UM",
    "NUCLEUS_DIAMETER_SD_UM",
    "NUCLEUS_EDGE_UM",
    "NUCLEUS_LOG_SIGMA",
    "NUCLEUS_MEDIAN_PHOTONS",
    "OPTICS",
    "PLANE_EXPOSURE_MS",
    "REGIONS",
    "ROOT_ID",
    "SAMPLE_FORMAT",
    "SAMPLE_VERSION",
    "SIZES",
    "START_ABS_MS",
    "TILE_THREADS",
    "TIMEPOINT_INTERVAL_MS",
    "VOXEL_SIZE_UM",
    "check_voxel_size",
    "optics_with",
    "Channel",
    "Region",
    "size_preset",
    "SizePreset",
]

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
    atlas_um : float or None
        The atlas voxel size in µm, where it is not ``atlas_factor`` image voxels (a preset
        sampled at another voxel size keeps its atlas: `at_voxel_size`).
    """

    shape_zyx: tuple[int, int, int]
    tile_grid_zyx: tuple[int, int, int]
    atlas_factor: int
    description: str
    atlas_um: float | None = None

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
        if self.atlas_um is not None:
            return self.atlas_um
        return float(self.atlas_factor * min(voxel_size_um[1:]))

    def at_voxel_size(self, voxel_size_um: Sequence[float]) -> SizePreset:
        """The same brain in µm sampled at ``voxel_size_um`` instead of `VOXEL_SIZE_UM`.

        Each side keeps its extent in µm, to the nearest voxel count the tile grid divides
        (at least one voxel a tile), and the atlas its resolution in µm: about the same
        brain and regions, with cells drawn afresh in them.

        Examples
        --------
        >>> small = SIZES["small"]
        >>> coarse = small.at_voxel_size((4.0, 2.0, 2.0))
        >>> coarse.shape_zyx, coarse.tile_grid_zyx
        ((64, 256, 256), (2, 2, 2))
        >>> coarse.atlas_resolution_um((4.0, 2.0, 2.0)) == small.atlas_resolution_um()
        True
        """
        shape = tuple(
            g * max(1, round(n * v0 / (v * g)))
            for n, g, v0, v in zip(
                self.shape_zyx, self.tile_grid_zyx, VOXEL_SIZE_UM, voxel_size_um, strict=True
            )
        )
        return SizePreset(
            shape,  # type: ignore[arg-type]
            self.tile_grid_zyx,
            self.atlas_factor,
            f"{self.description}; sampled at {' x '.join(f'{v:g}' for v in voxel_size_um)} µm",
            self.atlas_resolution_um(),
        )

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


def check_voxel_size(voxel_size_um) -> tuple[float, float, float]:
    """``voxel_size_um`` as three floats, or a `SampleError` naming it.

    Examples
    --------
    >>> check_voxel_size([4, 2, 2])
    (4.0, 2.0, 2.0)
    """
    try:
        vs = tuple(float(v) for v in voxel_size_um)
    except (TypeError, ValueError):
        vs = ()
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise SampleError(
            f"voxel_size_um: got {voxel_size_um!r}; expected three positive µm (z, y, x)"
        )
    return vs  # type: ignore[return-value]


def optics_with(sheet_fwhm_um: float | None = None) -> dict:
    """`OPTICS`, with another light sheet's thickness (FWHM, µm), or a `SampleError`.

    Examples
    --------
    >>> optics_with(20)["sheet_fwhm_um"], optics_with()["sheet_fwhm_um"]
    (20.0, 7.0)
    """
    optics = dict(OPTICS)
    if sheet_fwhm_um is not None:
        ok = isinstance(sheet_fwhm_um, int | float | np.number) and not isinstance(
            sheet_fwhm_um, bool
        )
        if not (ok and 0 < sheet_fwhm_um < math.inf):
            raise SampleError(
                f"sheet_fwhm_um: got {sheet_fwhm_um!r}; expected a positive thickness in µm"
            )
        optics["sheet_fwhm_um"] = float(sheet_fwhm_um)
    return optics


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
