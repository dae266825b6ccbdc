"""The models' shared base and field types (no side effects, no I/O)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ORIENTATION_PAIRS",
    "ChunkShape",
    "Overlap",
    "PositiveFloat",
    "VoxelSide",
    "VoxelSize",
    "is_orientation",
    "schema_rules",
    "when",
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: Voxel sides are microscopic: anything beyond 10 mm is a unit mistake (and overflows µm³).
VoxelSide = Annotated[float, Field(gt=0, le=1e4, allow_inf_nan=False)]
VoxelSize = tuple[VoxelSide, VoxelSide, VoxelSide]
ChunkShape = tuple[
    Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)], Annotated[int, Field(ge=8)]
]
#: BrainGlobe orientation letters: each axis names one letter of each pair where it starts.
ORIENTATION_PAIRS = ("ap", "si", "lr")


def is_orientation(value: str) -> bool:
    """True for a BrainGlobe three-letter orientation such as ``"asr"`` (any case)."""
    v = str(value).lower()
    return len(v) == 3 and all(sum(c in pair for c in v) == 1 for pair in ORIENTATION_PAIRS)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Overlap = Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)]


def when(
    field: str,
    condition: dict[str, Any],
    target: str,
    schema: dict[str, Any],
    *,
    absent_matches: bool = False,
    required: bool = False,
) -> dict[str, Any]:
    """A cross-field rule in JSON Schema: ``target`` meets ``schema`` where ``field`` does.

    Where ``field`` meets ``condition``, ``target`` must meet ``schema``.

    The pydantic ``model_validator`` states the rule (and its message); this is its
    counterpart in the model's JSON schema, which is the Prefect deployment's parameter
    schema, so the server refuses a flow run that breaks it when the run is created (409,
    naming ``target``). ``absent_matches``: the field's default meets the condition (the
    rule applies when the field is left out); ``required``: ``target`` must be given.
    """
    given = {} if absent_matches else {"required": [field]}
    then: dict[str, Any] = {"properties": {target: schema}}
    if required:
        then["required"] = [target]
    return {"if": {"properties": {field: condition}, **given}, "then": then}


def schema_rules(*rules: dict[str, Any]) -> ConfigDict:
    """A model config adding `when` rules to the model's JSON schema (``allOf``)."""
    return ConfigDict(json_schema_extra={"allOf": list(rules)})
