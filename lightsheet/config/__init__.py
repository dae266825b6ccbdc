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

The config owns its rules: cross-field checks are the models' ``model_validator`` methods (the
only place their messages are written) and, where JSON Schema can state them, ``if``/``then``
clauses of the models' schema (`lightsheet.config._base.when`), which Prefect's server applies
when a flow run is created. Rules that compare two values (volume range, channels, job counts)
cannot be written in JSON Schema; they refuse the run when it starts, at parameter validation.
Every default derived from the data is computed once, by ``resolved``
(`PipelineConfig.resolved`, `SegmentConfig.resolved`, formulas in ``derived``).

The package, by concern: ``stages`` (one model per stage), ``cluster``, ``pipeline`` (the
run's model), ``train`` (`lightsheet train`), ``pattern`` (file names), ``files`` (reading
YAML), ``derived`` (defaults from cell and voxel size) and ``_base`` (field types).
Everything is imported from ``lightsheet.config``.
"""

from __future__ import annotations

from lightsheet.config._base import (
    ORIENTATION_PAIRS,
    ChunkShape,
    Overlap,
    PositiveFloat,
    VoxelSide,
    VoxelSize,
    is_orientation,
)
from lightsheet.config.cluster import ClusterConfig
from lightsheet.config.files import (
    MAX_YAML_VALUES,
    is_atlas_name,
    load_config,
    read_yaml,
    resolve_paths,
)
from lightsheet.config.pattern import (
    DEFAULT_PATTERN,
    PATTERN_GROUPS,
    PATTERN_TIMEOUT_S,
    PROBE_LENGTH,
    check_pattern,
    compile_pattern,
    search_name,
)
from lightsheet.config.pipeline import PipelineConfig, psf_of_channel
from lightsheet.config.stages import (
    DeconvolveConfig,
    DensityConfig,
    FeaturizeConfig,
    RegisterConfig,
    SegmentConfig,
    StitchConfig,
)
from lightsheet.config.train import TrainConfig, TrainData

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
    "psf_of_channel",
    "read_yaml",
    "resolve_paths",
    "search_name",
]
