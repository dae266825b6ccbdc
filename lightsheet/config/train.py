"""How `lightsheet train` trains the UNet: data sets, split, targets, optimisation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lightsheet.config._base import PositiveFloat, VoxelSize, _Model

__all__ = ["TrainConfig", "TrainData"]


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
    normalisation: Literal["percentiles", "background"] = Field(
        "background",
        description="How each volume's intensities are scaled before the network (the model "
        "declares it; featurize scales a whole acquisition the same way): 'background' "
        "divides by twice the volume's median, so the background sits at 0.5 and a cell's "
        "contrast over it is what the network sees; 'percentiles' maps the 1 and 99.8 % "
        "percentiles to 0 and 1 (a cell's level then depends on the brightest cells around; "
        "measured in benchmarks/results/delivr_model.md).",
    )
    candidate_classifier: bool = Field(
        False,
        description="Also fit a classifier of the model path's candidates on the held-out "
        "volumes (lightsheet.train.validation.fit_classifier): candidates at nucleus "
        "probability 0.5, kept by a logistic regression on their size, intensity, head "
        "probabilities and neighbour counts. On data like the training data it scores "
        "better (delivr-cfos five-fold F1 0.627 against 0.569); on other stains and on the "
        "generated phantom it keeps far more or far fewer cells than the threshold "
        "(benchmarks/results/delivr_model.md), so it is off unless asked for.",
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
