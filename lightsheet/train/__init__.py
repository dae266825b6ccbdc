"""Training the UNet on annotated volumes: images with masks or point lists.

``lightsheet train CONFIG.yaml --out MODEL.safetensors`` (`train`) reads the data sets of a
`lightsheet.config.TrainConfig`, trains a 2-D `lightsheet.unet.UNet` on them and writes a
safetensors checkpoint whose record names the data and their licences, the voxel size the
model was trained at, the normalisation, the held-out scores and the probability threshold
chosen on the held-out volumes.

Data. Every volume is read with `lightsheet.ingest.discover` and `lightsheet.stitch.stitch`
(a 3-D TIFF is an acquisition of one tile), at its own voxel size, and resampled in y and x
to the model's voxel size (`lightsheet.resample`, as featurize does at inference). Each
volume is normalised on its own as featurize normalises a whole acquisition, by the config's
``normalisation`` (`lightsheet.featurize.norm_range`; the record names it and featurize
follows it): by default ``background``, the intensities divided by twice the volume's median,
so the network sees a cell's contrast over the background rather than its level against the
volume's brightest cells (robust percentiles, the other choice, put the background of a
sparse patch and of a dense one at different levels). Training volumes are held in memory: they are
annotated crops, small by nature (`MAX_VOLUME_VOXELS`).

Targets (two head channels, `TARGETS`):

* ``nucleus``: the annotated mask (for point annotations, spheres of the nucleus diameter);
* ``centre``: a Gaussian bump of σ = `CENTRE_SIGMA` × the nucleus diameter (in µm, 3-D)
  around every annotated cell (mask component centroid, or point).

The loss is a class-weighted binary cross-entropy on the nucleus channel plus a binary
cross-entropy against the soft centre map; `lightsheet.segment.model` turns the two maps
into one instance per cell (seeds: peaks of the centre map; extent: the nucleus mask).
Why these: on the delivr-cfos patches, a foreground-only model merged touching cells and
scored lower; see ``benchmarks/results/delivr_model.md`` for the alternatives measured.

Split. Held-out volumes are whole volumes, never voxels of a training volume: by name
(``validation``) or a share (``validation_fraction``) picked evenly along the volumes'
annotated cell counts. The threshold that maximises F1 on them is the model's default.

Device. The same command runs on a CPU or a GPU (``device``, default CUDA when present);
on CUDA the forward and backward passes use automatic mixed precision.

The package, by concern: `lightsheet.train.data` (reading and annotating the volumes),
`lightsheet.train.targets` (targets, split, batches), `lightsheet.train.validation` (held-out
scores and the threshold), and here `train` itself; every name is imported from
``lightsheet.train``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightsheet.config import TrainConfig
from lightsheet.errors import ConfigError, InputFilesError
from lightsheet.train.data import (
    MAX_VOLUME_VOXELS,
    AnnotatedVolume,
    _resolve,
    load_train_config,
    load_volumes,
    model_voxel_size,
    spheres_mask,
)
from lightsheet.train.targets import (
    CENTRE_SIGMA,
    SCALE_RANGE,
    TARGETS,
    centre_map,
    nucleus_diameter_from_masks,
    split_volumes,
    training_batch,
)
from lightsheet.train.validation import THRESHOLDS, detect_points, validate

__all__ = [
    "CENTRE_SIGMA",
    "DEFAULT_MODEL_ARGS",
    "MAX_VOLUME_VOXELS",
    "SCALE_RANGE",
    "TARGETS",
    "THRESHOLDS",
    "AnnotatedVolume",
    "centre_map",
    "detect_points",
    "load_train_config",
    "load_volumes",
    "model_voxel_size",
    "nucleus_diameter_from_masks",
    "spheres_mask",
    "split_volumes",
    "train",
    "training_batch",
    "validate",
]

#: Default UNet arguments of a trained model.
DEFAULT_MODEL_ARGS = {"ndim": 2, "depth": 2, "width": 16, "features": 16}


# --------------------------------------------------------------------------- training


def train(
    config: TrainConfig,
    out_path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] = ".",
    progress: Callable[[int, int, float], None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train the UNet on annotated volumes and write a checkpoint with its record.

    Parameters
    ----------
    config : TrainConfig
        Data sets, split, model and optimisation settings.
    out_path : path-like
        Checkpoint to write (``.safetensors``; another suffix writes the dict form); the
        record is also written beside it as JSON (same name, ``.json``).
    base : path-like
        Folder that relative data paths are relative to.
    progress : callable, optional
        ``progress(step, steps, mean_loss)``, called every few steps.
    command : str, optional
        The command line, for the record.

    Returns
    -------
    record : dict
        How the checkpoint was made; also stored in the checkpoint.
    """
    import torch

    from lightsheet import __version__
    from lightsheet.models.checkpoint import FORMAT, save_model
    from lightsheet.unet import UNet

    t_start = time.perf_counter()
    base, out_path = Path(base), Path(out_path)
    model_um = model_voxel_size(config, base)
    args = {**DEFAULT_MODEL_ARGS, **config.model}
    if args["ndim"] != 2 or args.get("in_channels", 1) % 2 != 1:
        raise ConfigError(
            "train: models are 2-D (per z-slice) with an odd number of z-slices as input "
            f"channels (the slice and its neighbours); got {args}"
        )
    volumes = load_volumes(
        config, base, voxel_size_um=model_um, resample_z=args.get("in_channels", 1) > 1
    )
    masked = [v for v in volumes if v.nucleus is not None]
    diameter = config.nucleus_diameter_um or nucleus_diameter_from_masks(masked, model_um)
    for v in volumes:
        if v.nucleus is None:
            v.nucleus = spheres_mask(v.centres, diameter, v.image.shape, model_um)
    train_v, val_v = split_volumes(volumes, config)
    sigma_um = CENTRE_SIGMA * diameter
    targets = {
        v.name: np.stack(
            [v.nucleus.astype(np.float32), centre_map(v.centres, v.image.shape, model_um, sigma_um)]
        )
        for v in train_v
    }
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if device.type == "cpu" and config.threads:
        torch.set_num_threads(config.threads)  # else torch's default (cores, OMP_NUM_THREADS)
    net = UNet(**args).to(device)
    crop = _crop_side(train_v, config.crop_px, net.alignment_px)
    fg = float(np.mean([targets[v.name][0].mean() for v in train_v]))
    # rare foreground: weigh its voxels up, at most 5 x (1 and 5 scored alike on delivr-cfos;
    # the threshold chosen on held-out volumes absorbs the calibration)
    pos_weight = min(5.0, max(1.0, (1.0 - fg) / max(fg, 1e-6)))
    opt = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.learning_rate, total_steps=config.steps
    )
    history: list[float] = []
    losses: list[float] = []
    every = max(1, config.steps // 20)
    net.train()
    for step in range(config.steps):
        xb, yb = training_batch(train_v, targets, config.batch_size, crop, rng, net.in_channels)
        loss = _loss(net, xb.to(device), yb.to(device), pos_weight, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == config.steps:
            history.append(round(float(np.mean(losses)), 5))
            losses = []
            if progress is not None:
                progress(step + 1, config.steps, history[-1])
    net = net.eval().cpu()
    match_um = config.match_distance_um or diameter / 2.0
    validation, detection = validate(
        net, val_v, model_um, diameter, match_um, classifier=config.candidate_classifier
    )
    record = {
        "format": FORMAT,
        "command": command or f"lightsheet train CONFIG --out {out_path}",
        "data": _data_record(config, base, volumes),
        "data_fingerprint": _combined_fingerprint(volumes),
        "voxel_size_um": list(model_um),
        "normalisation": {
            **_norm_description(config.normalisation),
            "per_volume": {v.name: [round(v.norm[0], 3), round(v.norm[1], 3)] for v in volumes},
        },
        "targets": list(TARGETS),
        "nucleus_diameter_um": round(float(diameter), 3),
        "centre_sigma_um": round(float(sigma_um), 3),
        "detection": detection,
        "validation": validation,
        "model_args": dict(net.model_args),
        "training": {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "crop_px": crop,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "optimizer": "AdamW + OneCycleLR",
            "loss": "BCE(nucleus, pos_weight) + BCE(centre, soft Gaussian target)",
            "pos_weight": round(pos_weight, 3),
            "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "loss_history": history,
            "train_volumes": [v.name for v in train_v],
        },
        "versions": {"lightsheet": __version__, "torch": torch.__version__},
        "duration_s": round(time.perf_counter() - t_start, 1),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model(net, out_path, record=record)
    out_path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _norm_description(method: str) -> dict[str, Any]:
    """The record's normalisation: what featurize must do to a volume before the model."""
    from lightsheet.featurize import BACKGROUND_LEVEL, BACKGROUND_PERCENTILE, NORM_PERCENTILES

    if method == "background":
        return {
            "method": "background",
            "description": f"intensities of the whole volume divided by its "
            f"{BACKGROUND_PERCENTILE:g} % percentile (the background level) and multiplied by "
            f"{BACKGROUND_LEVEL:g}",
            "background_percentile": BACKGROUND_PERCENTILE,
            "background_level": BACKGROUND_LEVEL,
        }
    return {
        "method": "percentiles",
        "description": "robust percentiles of the whole volume mapped to 0 and 1",
        "percentiles": list(NORM_PERCENTILES),
    }


def _crop_side(volumes: Sequence[AnnotatedVolume], crop_px: int, align: int) -> int:
    """The training crop: ``crop_px``, or the smallest volume's side, on the pooling grid."""
    side = min(crop_px, *(min(v.image.shape[1:]) for v in volumes))
    side = side // align * align
    if side < align:
        raise ConfigError(
            f"train: volumes of {min(min(v.image.shape[1:]) for v in volumes)} px in y or x "
            f"are smaller than the network's pooling grid ({align} px)"
        )
    return side


def _loss(net: Any, xb: Any, yb: Any, pos_weight: float, device: Any) -> Any:
    import torch
    from torch.nn import functional as nnf

    # on a GPU, mixed precision (bfloat16 needs no loss scaling)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = net.logits(xb)
    logits = logits.float()
    pw = torch.tensor([pos_weight], device=logits.device).view(1, 1, 1, 1)
    nucleus = nnf.binary_cross_entropy_with_logits(logits[:, :1], yb[:, :1], pos_weight=pw)
    centre = nnf.binary_cross_entropy_with_logits(logits[:, 1:2], yb[:, 1:2])
    return nucleus + centre


def _data_record(config: TrainConfig, base: Path, volumes: Sequence[AnnotatedVolume]) -> list:
    out = []
    for data in config.data:
        lic = _resolve(base, data.licence_file)
        entry = {
            "name": data.name,
            "licence": data.licence,
            "source": data.source,
            "voxel_size_um": list(data.voxel_size_um) if data.voxel_size_um else None,
            "annotation": "masks" if data.masks else "points" if data.points else "sample truth",
            "volumes": [
                {
                    "name": v.name,
                    "split": v.split,
                    "shape_zyx": list(v.image.shape),
                    "n_cells": len(v.centres),
                    "fingerprint": v.fingerprint,
                }
                for v in volumes
                if v.dataset == data.name
            ],
        }
        if lic is not None:
            if not Path(lic).is_file():
                raise InputFilesError(f"train: licence_file {lic} of {data.name!r} not found")
            text = Path(lic).read_text(errors="replace")
            entry["licence_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            entry["licence_text"] = text.strip()
        out.append(entry)
    return out


def _combined_fingerprint(volumes: Sequence[AnnotatedVolume]) -> str:
    h = hashlib.sha256()
    for v in sorted(volumes, key=lambda v: v.name):
        h.update(f"{v.name}:{v.fingerprint}:{v.split}".encode())
    return "sha256:" + h.hexdigest()
