"""Detection on real tissue: the cellfinder crop and the annotated DELiVR c-Fos patches.

Runs `lightsheet.segment.segment_volume` exactly as the segment stage does (the stage's
config, every value default unless given), on the real data in ``../shared/data`` (or
``--data``), and scores it:

* ``cellfinder-crop`` (30 planes of 510 × 667 at 5 × 2 × 2 µm, signal ch0, autofluorescence
  ch1, ``nucleus_diameter_um: 14``, ``background_channel: 1``): how many of the 56 cells
  cellfinder's classifier kept have a detection within 10 µm (one to one), and the total.
* ``delivr-cfos`` (27 patches of 100³ at 6 × 1.62 × 1.62 µm, ``nucleus_diameter_um: 11``):
  precision, recall and F1 against the human annotations, components of ≥ 4 voxels, one to
  one within 6 µm, all patches scored together; per patch in a CSV.

    python -m benchmarks.real_data                      # both, defaults
    python -m benchmarks.real_data --set min_peak_sd=5  # any SegmentConfig field
    python -m benchmarks.real_data --results benchmarks/results
    python -m benchmarks.real_data --set method=otsu --name real_data_otsu --results …

* ``planted``: 220 somata (11–17 µm, peaks 5–15 local noise SDs) planted into the crop's
  autofluorescence channel (`lightsheet.sample.tissue.plant_cells`): precision and recall
  within half a diameter, without and with a background channel.

Writes ``<name>.json`` (the figures) and ``<name>_delivr_per_patch.csv`` under ``--results``.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import tifffile

from lightsheet.config import SegmentConfig
from lightsheet.evaluate import match_points, read_points
from lightsheet.segment import segment_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CELLFINDER_VOXEL_UM = (5.0, 2.0, 2.0)
DELIVR_VOXEL_UM = (6.0, 1.62, 1.62)


def _planes(folder: Path) -> np.ndarray:
    return np.stack([tifffile.imread(f) for f in sorted(glob.glob(str(folder / "*.tif")))])


def coarser(volume: np.ndarray, z_step: int = 1, bin_yx: int = 1) -> np.ndarray:
    """The volume as a coarser acquisition records it: every ``z_step``-th plane, and
    ``bin_yx`` × ``bin_yx`` camera pixels summed into one (kept as their mean, float32;
    a partial last row or column is dropped). Unchanged for ``(1, 1)``."""
    if (z_step, bin_yx) == (1, 1):
        return volume
    k = bin_yx
    v = volume[::z_step, : volume.shape[1] // k * k, : volume.shape[2] // k * k]
    z, y, x = v.shape
    return v.astype(np.float32).reshape(z, y // k, k, x // k, k).mean(axis=(2, 4))


def coarser_voxel(voxel_um, z_step: int, bin_yx: int) -> tuple[tuple, np.ndarray]:
    """The coarser volume's voxel size, and the shift from its voxel centres (µm) to the
    original's: a binned pixel's centre lies half a bin less one pixel further on."""
    vz, vy, vx = voxel_um
    shift = np.array([0.0, (bin_yx - 1) / 2 * vy, (bin_yx - 1) / 2 * vx])
    return (vz * z_step, vy * bin_yx, vx * bin_yx), shift


def crop(root: Path, *, z_step: int = 1, bin_yx: int = 1):
    """The crop's signal and autofluorescence (as :func:`coarser` records them), their voxel
    size, the shift from its voxel centres to the original's (µm), and the 56 reference
    cells (µm)."""
    signal, autofluorescence = (coarser(_planes(root / c), z_step, bin_yx) for c in ("ch0", "ch1"))
    voxel_um, shift = coarser_voxel(CELLFINDER_VOXEL_UM, z_step, bin_yx)
    reference = read_points(root / "cell_classification.xml", cell_type=2) * CELLFINDER_VOXEL_UM
    return signal, autofluorescence, voxel_um, shift, reference


def score_crop(found_um: np.ndarray, reference_um: np.ndarray) -> dict:
    """How many reference cells have a detection within 10 µm (one to one), and the total."""
    score = match_points(found_um, reference_um, max_distance_um=10.0)
    return {
        "cells": len(found_um),
        "reference_cells": len(reference_um),
        "reference_found": score.tp,
        "reference_found_fraction": score.tp / len(reference_um),
    }


def cellfinder(
    root: Path, overrides: dict, chunks=(30, 256, 256), *, z_step: int = 1, bin_yx: int = 1
) -> dict:
    """The crop's count and how many of its 56 reference cells are found within 10 µm.

    ``z_step`` and ``bin_yx``: score the crop as a coarser acquisition records it
    (:func:`coarser`), against the same reference positions.
    """
    signal, autofluorescence, voxel_um, shift, reference = crop(root, z_step=z_step, bin_yx=bin_yx)
    local = overrides.get("method", "local") == "local"
    config = SegmentConfig(
        **{"nucleus_diameter_um": 14.0, "background_channel": 1 if local else None,
           "channel": 0, **overrides}
    )  # fmt: skip
    start = time.perf_counter()
    result = segment_volume(
        dask.array.from_array(signal, chunks=chunks),
        voxel_size_um=voxel_um,
        config=config,
        background=dask.array.from_array(autofluorescence, chunks=chunks)
        if config.background_channel is not None
        else None,
    )
    seconds = time.perf_counter() - start
    found = result.table[["z_um", "y_um", "x_um"]].to_numpy() + shift
    return {
        "config": config.model_dump(mode="json"),
        **score_crop(found, reference),
        "seconds": round(seconds, 1),
    }


def delivr_patches(root: Path, *, bin_yx: int = 1):
    """Each patch: its id, image (as :func:`coarser` records it) and annotated cells (µm;
    mask components of ≥ 4 voxels)."""
    for image_path in sorted((root / "images").glob("patch_*.tif")):
        patch = image_path.stem.removeprefix("patch_")
        points = pd.read_csv(root / "points" / f"patch_{patch}_points.csv")
        truth = points[points["n_voxels"] >= 4][["z", "y", "x"]].to_numpy(float)
        yield patch, coarser(tifffile.imread(image_path), 1, bin_yx), truth * DELIVR_VOXEL_UM


def score_delivr(found_by_patch) -> tuple[dict, pd.DataFrame]:
    """``(patch, found µm, truth µm)`` triples scored one to one within 6 µm: all patches
    together, and per patch."""
    rows = []
    for patch, found, truth in found_by_patch:
        s = match_points(found, truth, max_distance_um=6.0)
        rows.append({"patch": patch, "annotated": len(truth), "found": len(found), **s.as_dict()})
    table = pd.DataFrame(rows)
    tp, fp, fn = (int(table[c].sum()) for c in ("tp", "fp", "fn"))
    summary = {
        "annotated": tp + fn,
        "found": tp + fp,
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
    }
    return summary, table


def delivr(root: Path, overrides: dict, *, bin_yx: int = 1) -> tuple[dict, pd.DataFrame]:
    """Precision, recall and F1 over all 27 patches, and per patch (``bin_yx``: binned
    camera pixels, :func:`coarser`)."""
    config = SegmentConfig(**{"nucleus_diameter_um": 11.0, **overrides})
    voxel_um, shift = coarser_voxel(DELIVR_VOXEL_UM, 1, bin_yx)

    def found():
        for patch, image, truth in delivr_patches(root, bin_yx=bin_yx):
            result = segment_volume(
                dask.array.from_array(image, chunks=image.shape),
                voxel_size_um=voxel_um,
                config=config,
            )
            yield patch, result.table[["z_um", "y_um", "x_um"]].to_numpy() + shift, truth

    start = time.perf_counter()
    summary, table = score_delivr(found())
    summary = {"config": config.model_dump(mode="json"), **summary}
    return {**summary, "seconds": round(time.perf_counter() - start, 1)}, table


def planted_volume(root: Path, *, seed: int = 0):
    """220 somata planted into the crop's autofluorescence channel: the image, the truth
    table, and the autofluorescence with fresh noise of its local SD (a second exposure)."""
    from lightsheet.sample.tissue import plant_cells, second_exposure

    tissue = _planes(root / "ch1")
    image, truth = plant_cells(tissue, CELLFINDER_VOXEL_UM, seed=seed)
    second = second_exposure(tissue, 14, rng=np.random.default_rng(seed + 1))
    return image, truth, second


def score_planted(found_um: np.ndarray, truth: pd.DataFrame) -> dict:
    """Precision and recall within half of each planted cell's diameter."""
    true = truth[["z_um", "y_um", "x_um"]].to_numpy()
    s = match_points(found_um, true, max_distance_um=truth["diameter_um"].to_numpy() / 2)
    return {"found": len(found_um), **{k: round(v, 4) for k, v in s.as_dict().items()}}


def planted(root: Path, overrides: dict, *, seed: int = 0) -> dict:
    """220 somata planted into the crop's autofluorescence channel, found again.

    Scored without a background channel (every native bright structure counts against
    precision), and with one: the same autofluorescence with fresh noise of its local SD,
    as a second exposure of the tissue would give.
    """
    image, truth, second = planted_volume(root, seed=seed)
    out = {"planted": len(truth), "diameter_um": [11, 17], "peak_sd": [5, 15]}
    local = overrides.get("method", "local") == "local"
    for name, background in (("without_background", None), ("with_background", second)):
        if background is not None and not local:
            continue
        config = SegmentConfig(
            **{"nucleus_diameter_um": 14.0, "channel": 0, **overrides,
               "background_channel": None if background is None else 1}
        )  # fmt: skip
        result = segment_volume(
            dask.array.from_array(image.astype(np.float32), chunks=(30, 256, 256)),
            voxel_size_um=CELLFINDER_VOXEL_UM,
            config=config,
            background=None
            if background is None
            else dask.array.from_array(background, chunks=(30, 256, 256)),
        )
        out[name] = score_planted(result.table[["z_um", "y_um", "x_um"]].to_numpy(), truth)
    return out


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the data sets")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="SegmentConfig field"
    )
    parser.add_argument("--only", choices=("cellfinder", "delivr", "planted"))
    parser.add_argument("--results", type=Path, help="write the JSON and the CSV here")
    parser.add_argument("--name", default="real_data", help="results file stem (default real_data)")
    args = parser.parse_args(argv)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    dask.config.set(scheduler="threads")
    out: dict = {"overrides": overrides}
    if args.only in (None, "cellfinder"):
        out["cellfinder"] = cellfinder(args.data / "cellfinder-crop", overrides)
        print(
            "cellfinder-crop:",
            json.dumps({k: v for k, v in out["cellfinder"].items() if k != "config"}),
        )
    if args.only in (None, "planted"):
        out["planted"] = planted(args.data / "cellfinder-crop", overrides)
        print("planted:", json.dumps(out["planted"]))
    if args.only in (None, "delivr"):
        out["delivr"], per_patch = delivr(args.data / "delivr-cfos", overrides)
        print("delivr-cfos:", json.dumps({k: v for k, v in out["delivr"].items() if k != "config"}))
        print(per_patch.round(3).to_string(index=False))
        if args.results:
            args.results.mkdir(parents=True, exist_ok=True)
            per_patch.round(4).to_csv(
                args.results / f"{args.name}_delivr_per_patch.csv", index=False
            )
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
