"""Featurize task: per-pixel UNet features of the nuclei channel → features OME-Zarr."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from lightsheet.config import FeaturizeConfig
from lightsheet.errors import ConfigError
from lightsheet.io.omezarr import read_image, stored_volume, write_image
from lightsheet.models import checkpoint_sha256
from tasks._common import (
    OUTPUTS,
    Stage,
    StageSpec,
    check_unchanged,
    dask_client,
    output_input,
    publish_image,
)

__all__ = [
    "check_channel",
    "featurize_spec",
    "featurize_volume",
    "model_input",
]


def featurize_spec(image: dict, channel: int, config: FeaturizeConfig, output: str) -> StageSpec:
    """What `featurize_volume` makes from an image and the model checkpoint."""
    return StageSpec(
        "featurize",
        {"path": Path(output) / OUTPUTS["featurize"]},
        params={**config.model_dump(mode="json"), "channel": channel},
        inputs={"image": output_input(image), "model": model_input(config.model)},
    )


def model_input(path: str | Path | None) -> dict:
    """A model checkpoint as a stage input, fingerprinted by its bytes (torch not needed)."""
    return {
        "kind": "model checkpoint",
        "path": str(path or "bundled default"),
        "fingerprint": checkpoint_sha256(path),
    }


@task(name="featurize")
def featurize_volume(image: dict, channel: int, config: FeaturizeConfig, output: str) -> dict:
    """UNet features of one channel at every time point; features are the channel axis.

    A model that declares the voxel size it was trained at runs on each block resampled to
    it, and its features are resampled back to the image's voxel size (`featurize`).

    The UNet is 2-D per z-slice, so blocks are thinned in z until one block's F features fit
    in a byte budget: memory per worker thread stays small whatever F is, at no cost in
    halo; each block writes levels 0 and 1 of the features (`featurize_volumes`).
    """
    spec = featurize_spec(image, channel, config, output)
    stage = Stage(spec)
    if not stage.reused:
        from lightsheet.featurize import featurize_volumes, load_model  # torch: where tasks run

        model = load_model(config.model)
        check_unchanged(spec.inputs["model"], model.checkpoint_sha256)
        # how the checkpoint was made, when it says, shown in the lineage
        spec.inputs["model"]["record"] = getattr(model, "record", {})
        with dask_client():
            source, voxel_size_um, _ = read_image(image["path"])
            check_channel(channel, source.shape[1], "segment.channel")
            # each task reads its own region (with halo) from the stored image
            volumes = [stored_volume(image["path"], t, channel) for t in range(source.shape[0])]
            features, chunks = featurize_volumes(
                volumes,
                model,
                dtype=config.dtype,
                batch_size=config.batch_size,
                voxel_size_um=voxel_size_um,  # resampled to the model's voxel size
            )
            fingerprint = write_image(
                features,
                stage.outputs["path"],
                voxel_size_um=voxel_size_um,
                name="features",
                chunks=chunks,
                channel_names=[f"feature{i}" for i in range(features.shape[1])],
                lineage=stage.lineage(),
                compute=stage.progress(),
            )
    record = stage.finish(None if stage.reused else {"path": fingerprint})
    record.update(publish_image(record))
    return record


def check_channel(channel: int, n_channels: int, parameter: str) -> None:
    """A channel index that exists, or an error naming the parameter."""
    if not 0 <= channel < n_channels:
        raise ConfigError(
            f"{parameter}: channel {channel} does not exist; the image has {n_channels} "
            f"channels (0..{n_channels - 1})"
        )
