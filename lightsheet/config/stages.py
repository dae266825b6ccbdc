"""One model per stage: stitch, deconvolve, featurize, segment, density, register."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lightsheet.config._base import (
    ChunkShape,
    Overlap,
    PositiveFloat,
    _Model,
    is_orientation,
    schema_rules,
    when,
)
from lightsheet.config.derived import default_split_depth_um, default_volume_range_um3

__all__ = [
    "DeconvolveConfig",
    "DensityConfig",
    "FeaturizeConfig",
    "RegisterConfig",
    "SegmentConfig",
    "StitchConfig",
]


class StitchConfig(_Model):
    """How tiles become one volume."""

    model_config = schema_rules(  # _one_layout, as far as JSON Schema can say it
        when(
            "positions",
            {"type": "string"},
            "overlap",
            {
                "anyOf": [
                    {"type": "number", "maximum": 0},
                    {"type": "array", "items": {"maximum": 0}},
                ]
            },
        )
    )

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

    # _consistent, as far as JSON Schema can say it (it cannot compare two values: the volume
    # range and the two channels are checked when the run starts)
    model_config = schema_rules(
        when("method", {"const": "absolute"}, "threshold", {"type": "number"}, required=True),
        when("method", {"not": {"const": "local"}}, "background_channel", {"type": "null"}),
    )

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
        description="Intensity threshold for method=absolute; nucleus probability for "
        "method=model (default: the model record's, chosen on its validation volumes; "
        "setting one also turns off the record's candidate classifier).",
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
        "(lightsheet.config.derived.default_split_depth_um). The local method splits where the dip "
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
        lo, hi = default_volume_range_um3(self.nucleus_diameter_um)
        return (
            lo if self.min_volume_um3 is None else self.min_volume_um3,
            hi if self.max_volume_um3 is None else self.max_volume_um3,
        )

    def resolved(self, voxel_size_um: Sequence[float]) -> SegmentConfig:
        """The config with every default that derives from the data filled in, once.

        The size filter (``min_volume_um3``, ``max_volume_um3``) always; for the otsu and
        absolute methods with ``watershed`` the split depth
        (`lightsheet.config.derived.default_split_depth_um`, on the elevation smoothed by
        half the finest voxel); with ``subtract_background`` the top-hat radius (one
        diameter). Values given stay as given; a default that depends on something other
        than the voxel size stays None: method ``model``'s threshold and split depth come
        from the checkpoint's validated record. The local method's scales are fixed
        fractions of the diameter (`lightsheet.segment.local`), not parameters. The
        pipeline records the resolved config in each stage's lineage (``params``).

        Parameters
        ----------
        voxel_size_um : (3,) sequence of float
            Voxel size (z, y, x) in µm of the image segmented.

        Examples
        --------
        >>> r = SegmentConfig(method="otsu", nucleus_diameter_um=9.0).resolved((2.0, 1.0, 1.0))
        >>> round(r.min_volume_um3, 1), round(r.max_volume_um3, 1), round(r.split_depth_um, 2)
        (47.7, 3053.6, 0.21)
        >>> r.resolved((2.0, 1.0, 1.0)) == r
        True
        """
        lo, hi = self.volume_range_um3()
        update: dict[str, float] = {"min_volume_um3": lo, "max_volume_um3": hi}
        classical = self.method in ("otsu", "absolute")
        if classical and self.watershed and self.split_depth_um is None:
            update["split_depth_um"] = default_split_depth_um(
                self.nucleus_diameter_um, tuple(float(v) for v in voxel_size_um)
            )
        if classical and self.subtract_background and self.background_radius_um is None:
            update["background_radius_um"] = self.nucleus_diameter_um
        return self.model_copy(update=update)

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

    model_config = schema_rules(  # _penalty_threads
        when(
            "bending_energy_weight",
            {"exclusiveMinimum": 0},
            "threads",
            {"const": 1},
            required=True,
        )
    )

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
    correct_illumination: bool = Field(
        True,
        description="Fit the sample's illumination (a sheet fading along its path, one side "
        "brighter) against the atlas reference as the affine places it, a smooth gain that "
        "the template's anatomy does not explain, and divide it out (above camera_offset) "
        "before the B-spline, which it would otherwise bend (lightsheet.illumination).",
    )
    match_psf: bool = Field(
        True,
        description="Blur the atlas reference by the run's PSF (its width along each axis) "
        "before registering: the sample is seen through the microscope's optics, the atlas "
        "template is not, and a sharper reference makes the B-spline shift thin bright "
        "layers by a fraction of an atlas voxel. Where psf maps channels, the registered "
        "channel's; a run without a psf (or without one for that channel) leaves it "
        "unblurred.",
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
