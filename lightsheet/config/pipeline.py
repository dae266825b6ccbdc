"""The pipeline's parameters: one run from raw tiles to densities."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from lightsheet.config import stages
from lightsheet.config._base import VoxelSize, _Model, schema_rules, when
from lightsheet.config.cluster import ClusterConfig
from lightsheet.config.pattern import DEFAULT_PATTERN, PATTERN_GROUPS, check_pattern

__all__ = ["PipelineConfig", "psf_of_channel"]


# The run config's key is ``register`` (the stage's name). The only "register" it shadows is
# ABCMeta.register, a method of the model's metaclass that instances never see.
warnings.filterwarnings(
    "ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning
)


def psf_of_channel(psf, channel: int):
    """A run's PSF file for ``channel``: its one file, or its per-channel mapping's.

    ``psf`` as the config holds it, or as the flow passes it to the stages (strings; keys
    ints or, after JSON, their strings). None where the mapping has none, or no PSF.

    >>> psf_of_channel("psf.tif", 1), psf_of_channel({0: "a.tif", "1": "b.tif"}, 1)
    ('psf.tif', 'b.tif')
    """
    if isinstance(psf, dict):
        return psf.get(channel, psf.get(str(channel)))
    return psf


class PipelineConfig(_Model):
    """The pipeline's parameters: one run from raw tiles to densities."""

    model_config = schema_rules(  # _psf_when_deconvolving, as far as JSON Schema can say it
        when(
            "deconvolve",
            {"properties": {"enabled": {"const": True}}},
            "psf",
            {"type": ["string", "object"], "minProperties": 1},
            absent_matches=True,
            required=True,
        )
    )

    input: str = Field(..., description="Glob of the raw TIFF tiles, e.g. /data/brain1/*.tif")
    pattern: str = Field(
        DEFAULT_PATTERN,
        description="Regex searched in each file name, or, when it contains '/', in the "
        "file's path relative to the glob's fixed folder (e.g. 'ch(?P<c>\\d+)/.*_(?P<z>\\d+)"
        "\\.tif' for one folder per channel); named groups among c, t, z, y, x give channel, "
        "time point and tile grid position (a missing group means one; a missing c, the "
        "channels a file holds along its C axis).",
    )
    voxel_size_um: VoxelSize = Field(..., description="Voxel size (z, y, x) in µm.")
    camera_offset: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="What the camera reads with no light (its offset, baseline or dark level), "
        "in the raw tiles' units, e.g. 100 for many sCMOS cameras; 0 (the default) when the "
        "tiles' 0 is no light. Deconvolution models it as a background that is not light; "
        "counted as light, it let a bright cell's deconvolution echo along z in the dark "
        "outside, where echoes were found as cells. The segment stage's planes' gain and "
        "contrasts count light above it; counted as light, it moved cells along z.",
    )
    psf: Path | dict[int, Path] | None = Field(
        None,
        description="PSF TIFF (`lightsheet psf` writes one from the optics or from a stack of "
        "beads), or one per channel as a mapping of channel index to TIFF ({0: psf_640.tif, "
        "1: psf_488.tif}: each wavelength blurs by its own; every channel deconvolved needs "
        "one). One bead's crop as recorded serves: the level and noise of its border are "
        "taken off. Resampled to the image's voxel size where its ImageJ or OME metadata "
        "declare another; taken at the image's where they declare none. Needed to deconvolve "
        "(deconvolve.enabled, the default); without one set deconvolve.enabled: false, and "
        "register.match_psf then leaves the atlas unblurred (as it does where the mapping "
        "has no PSF for register's channel).",
    )
    psf_voxel_size_um: VoxelSize | None = Field(
        None,
        description="The PSF file's own voxel size (z, y, x) in µm, where its TIFF declares "
        "none (or a wrong one); it is resampled from it to the image's. null: the voxel size "
        "its ImageJ or OME metadata declare, else the image's.",
    )
    atlas: Path = Field(
        ...,
        description="BrainGlobe-layout atlas folder, or a BrainGlobe atlas name such as "
        "allen_mouse_25um (found as ~/.brainglobe/allen_mouse_25um_v*/, or in the "
        "brainglobe_dir of $BRAINGLOBE_CONFIG_DIR/bg_config.conf).",
    )
    output: Path = Field(..., description="Output folder.")
    stitch: stages.StitchConfig = stages.StitchConfig()
    deconvolve: stages.DeconvolveConfig = stages.DeconvolveConfig()
    featurize: stages.FeaturizeConfig = stages.FeaturizeConfig()
    segment: stages.SegmentConfig = stages.SegmentConfig()
    density: stages.DensityConfig = stages.DensityConfig()
    register: stages.RegisterConfig = stages.RegisterConfig()
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

    @field_validator("psf")
    @classmethod
    def _psf_channels(cls, v: Path | dict[int, Path] | None) -> Path | dict[int, Path] | None:
        if isinstance(v, dict) and (not v or min(v) < 0):
            raise ValueError(
                f"psf: got the mapping {v}; expected channel indices (0, 1, ...) to PSF TIFFs"
            )
        return v

    @model_validator(mode="after")
    def _psf_when_deconvolving(self) -> PipelineConfig:
        if self.deconvolve.enabled and self.psf is None:
            raise ValueError(
                "psf: deconvolve.enabled (the default) needs a PSF TIFF (`lightsheet psf` "
                "writes one from the optics or from a stack of beads); got none. Without a "
                "PSF set deconvolve.enabled: false"
            )
        if self.deconvolve.enabled and self.deconvolve.channels is not None:
            self.deconvolution_psfs(self.deconvolve.channels)
        return self

    def psf_for(self, channel: int) -> Path | None:
        """The PSF file of ``channel``: the one file, or the mapping's (None where none)."""
        return psf_of_channel(self.psf, channel)

    def psf_files(self) -> dict[int | None, Path]:
        """Every PSF file the run names, by channel (None: the one file of every channel)."""
        if isinstance(self.psf, dict):
            return dict(sorted(self.psf.items()))
        return {} if self.psf is None else {None: self.psf}

    def psf_paths(self) -> list[Path]:
        """Every PSF file the run names."""
        return list(self.psf_files().values())

    def deconvolution_psfs(self, channels: Sequence[int]) -> dict[int, Path]:
        """The PSF file of each channel deconvolved, or a ValueError naming those without."""
        found = {c: self.psf_for(c) for c in channels}
        missing = [c for c, p in found.items() if p is None]
        if missing:
            raise ValueError(
                f"psf: no PSF for channel(s) {missing}, which deconvolve.channels "
                f"({self.deconvolve.channels or 'null: every channel'}) deconvolves; the "
                f"psf mapping has channels {sorted(self.psf or {})}. Give each a PSF TIFF, "
                "or list the channels to deconvolve"
            )
        return found  # type: ignore[return-value]

    def resolved(self) -> PipelineConfig:
        """The run as it runs: each stage's derived defaults filled in at `voxel_size_um`.

        The pipeline flow runs (and records in every output's lineage) this config, so a
        reader of ``cells.csv.lineage.json`` sees the size filter and split depth used.
        Resolving twice changes nothing.
        """
        return self.model_copy(update={"segment": self.segment.resolved(self.voxel_size_um)})
