"""The models' shared base and field types (no side effects, no I/O)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ORIENTATION_PAIRS",
    "ChunkShape",
    "Overlap",
    "PositiveFloat",
    "VoxelSide",
    "VoxelSize",
    "is_orientation",
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
