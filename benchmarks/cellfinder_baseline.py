"""BrainGlobe cellfinder's own detection on the real data, scored as `benchmarks.real_data`.

The crop's 56 reference cells are positions that cellfinder's detection placed and its
classifier kept, so this says what the crop's acceptance figure measures, and how the
field's tool does on the other two real checks under the same rules:

* ``cellfinder-crop``: references found within 10 µm (one to one), and the total;
* ``delivr-cfos``: precision, recall and F1 against the human annotations (components of
  ≥ 4 voxels, one to one within 6 µm, all 27 patches together), and per patch;
* ``planted``: the 220 somata planted into the crop's autofluorescence channel, precision
  and recall within half a diameter.

cellfinder's detection only (``cellfinder.core.main.main(..., skip_classification=True)``:
its classifier needs trained weights from the network), every parameter its default except
the soma diameter, which is the one each check gives our method (14, 11 and 14 µm), and
once more on the crop at cellfinder's default (16 µm), with which it wrote the references.

cellfinder is not a dependency of the project (it brings napari, Keras and Qt); install it
beside, for example into a folder of its own::

    pip install --target /tmp/cellfinder --no-deps cellfinder==1.3.3 brainglobe-utils==0.11.2 \\
        keras==3.5.0 numba llvmlite natsort tqdm namex optree ml_dtypes absl-py h5py rich \\
        slurmio configobj psutil pooch platformdirs rapidyaml deprecation fancylog scikit-learn \\
        threadpoolctl joblib narwhals
    KERAS_BACKEND=torch PYTHONPATH=/tmp/cellfinder python -m benchmarks.cellfinder_baseline \\
        --results benchmarks/results

Writes ``cellfinder_baseline.json`` and ``cellfinder_baseline_delivr_per_patch.csv``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.real_data import (
    CELLFINDER_VOXEL_UM,
    DATA,
    DELIVR_VOXEL_UM,
    crop,
    delivr_patches,
    planted_volume,
    score_crop,
    score_delivr,
    score_planted,
)


def _cellfinder():
    try:
        from cellfinder.core.main import main
    except ImportError as error:
        raise SystemExit(
            f"cellfinder is not importable ({error}); install it as this module's docstring "
            "says, and set KERAS_BACKEND=torch"
        ) from None
    return main


def detect(image: np.ndarray, voxel_um, soma_diameter_um: float) -> np.ndarray:
    """cellfinder's candidates in ``image`` (z, y, x), as positions in µm."""
    main = _cellfinder()
    cells = main(
        image,
        image,  # the background channel is read only by the classifier, which is skipped
        tuple(voxel_um),
        soma_diameter=soma_diameter_um,
        skip_classification=True,
        n_free_cpus=0,
    )
    zyx = np.array([[c.z, c.y, c.x] for c in cells], dtype=float).reshape(-1, 3)
    return zyx * np.asarray(voxel_um)


def defaults() -> dict:
    """cellfinder's detection defaults, read from its own signature."""
    names = ("soma_diameter", "ball_xy_size", "ball_z_size", "ball_overlap_fraction",
             "log_sigma_size", "n_sds_above_mean_thresh", "soma_spread_factor")  # fmt: skip
    params = inspect.signature(_cellfinder()).parameters
    return {n: params[n].default for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the data sets")
    parser.add_argument("--results", type=Path, help="write the JSON and the CSV here")
    args = parser.parse_args(argv)
    import cellfinder

    out: dict = {"cellfinder": cellfinder.__version__, "defaults": defaults()}
    signal, _, voxel_um, _, reference = crop(args.data / "cellfinder-crop")
    for diameter in (14.0, float(out["defaults"]["soma_diameter"])):
        start = time.perf_counter()
        found = detect(signal, voxel_um, diameter)
        out[f"crop_d{diameter:g}"] = {
            **score_crop(found, reference),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"cellfinder-crop, d = {diameter:g} µm:", json.dumps(out[f"crop_d{diameter:g}"]))
    image, truth, _ = planted_volume(args.data / "cellfinder-crop")
    out["planted_d14"] = score_planted(detect(image, CELLFINDER_VOXEL_UM, 14.0), truth)
    print("planted, d = 14 µm:", json.dumps(out["planted_d14"]))
    out["delivr_d11"], per_patch = score_delivr(
        (patch, detect(image, DELIVR_VOXEL_UM, 11.0), truth)
        for patch, image, truth in delivr_patches(args.data / "delivr-cfos")
    )
    print("delivr-cfos, d = 11 µm:", json.dumps(out["delivr_d11"]))
    print(per_patch.round(3).to_string(index=False))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        per_patch.round(4).to_csv(
            args.results / "cellfinder_baseline_delivr_per_patch.csv", index=False
        )
        (args.results / "cellfinder_baseline.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
