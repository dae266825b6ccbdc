"""Registration accuracy and time on the synthetic misaligned brain (the issue's acceptance).

    .venv/bin/python -m benchmarks.register [--resolution-um 50] [--threads 2] [--seed 0]

A phantom atlas at a mouse brain's size (`lightsheet.sample.misaligned.registration_case`):
the sample reoriented (``ipl`` against the atlas's ``asr``), rotated 8° about a random axis,
5 % larger, shifted 10 atlas voxels and warped by Gaussian bumps of 2.5 voxels, under an
illumination gradient, another gain and gamma, and noise. Figures against the truth:
rotation and scale of the affine, landmark error after affine + B-spline (1000 random
points in the brain, in atlas voxels), Dice of the 10 largest regions (with descendants)
on the fixed grid, planted cells in their true leaf region, the smallest Jacobian
determinant, wall and CPU time (this process and elastix's). Writes
``benchmarks/results/register.md`` (appends a section per run).

``--sheet-far-side F`` multiplies the sample by a light sheet fading exponentially along its
last image axis to ``F`` at the far side (the realistic sample's is 0.45);
``--no-illumination`` registers without fitting and dividing out the illumination
(`lightsheet.illumination`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time
from pathlib import Path

import numpy as np

from lightsheet.io.atlas import Atlas
from lightsheet.register import FixedGrid, register_atlas
from lightsheet.sample.misaligned import registration_case

RESULTS = Path(__file__).parent / "results" / "register.md"


def cpu_seconds() -> float:
    self, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return self.ru_utime + self.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    from tests.register.test_register import registration_figures

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution-um", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rotation-deg", type=float, default=8.0)
    ap.add_argument(
        "--mask-margin-um", type=float, default=None,
        help="margin (µm) of the B-spline's mask of the brain; default the grid spacing",
    )  # fmt: skip
    ap.add_argument(
        "--no-bspline-mask", action="store_true",
        help="the B-spline samples the whole image (as before the mask)",
    )  # fmt: skip
    ap.add_argument(
        "--sheet-far-side", type=float, default=1.0,
        help="a light sheet fading along the last image axis to this at the far side",
    )  # fmt: skip
    ap.add_argument(
        "--no-illumination", action="store_true",
        help="register without dividing out the sample's illumination",
    )  # fmt: skip
    ap.add_argument("--out", default="/tmp/lightsheet-register-benchmark")
    args = ap.parse_args()

    t0 = time.perf_counter()
    case = registration_case(
        resolution_um=args.resolution_um, seed=args.seed, rotation_deg=args.rotation_deg
    )
    if args.sheet_far_side != 1.0:
        x = np.linspace(0.0, 1.0, case.image.shape[2], dtype=np.float32)
        fade = np.float32(args.sheet_far_side) ** x
        case = dataclasses.replace(case, image=case.image * fade[None, None, :])
    t_case = time.perf_counter() - t0
    res = (case.resolution_um,) * 3
    atlas = Atlas.from_arrays(
        case.annotation, case.structures, resolution_um=res, orientation="asr",
        hemispheres=case.hemispheres,
    )  # fmt: skip
    grid = FixedGrid.for_atlas(
        atlas, image_shape=case.image.shape, voxel_size_um=case.voxel_size_um,
        orientation=case.orientation,
    )  # fmt: skip
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    result = register_atlas(
        case.image, grid, annotation=case.annotation, hemispheres=case.hemispheres,
        reference=case.reference, resolution_um=res, out_dir=Path(args.out) / "registration",
        threads=args.threads, bspline_mask=not args.no_bspline_mask,
        mask_margin_um=args.mask_margin_um,
        illumination_dark=None if args.no_illumination else 0.0,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    t1 = time.perf_counter()
    fig = registration_figures(case, result, atlas)
    t_points = time.perf_counter() - t1
    load = os.getloadavg()
    rows = [
        ("atlas (voxels)", f"{case.annotation.shape} at {case.resolution_um:g} µm"),
        (
            "sample at atlas resolution (voxels)",
            f"{case.image.shape}, orientation {case.orientation}",
        ),
        ("affine rotation error", f"{fig['rotation_error_deg']:.3f}° (acceptance ≤ 0.5°)"),
        ("affine scale error", f"{100 * fig['scale_error']:+.3f} % (≤ 1 %)"),
        ("landmark error, mean", f"{fig['landmark_mean_voxels']:.3f} atlas voxels (≤ 0.5)"),
        ("landmark error, max", f"{fig['landmark_max_voxels']:.3f} atlas voxels (≤ 1.5)"),
        (
            "Dice, 10 largest regions",
            ", ".join(f"{k} {v:.3f}" for k, v in fig["dice_10_largest"].items()),
        ),
        ("Dice, smallest of them", f"{min(fig['dice_10_largest'].values()):.3f} (≥ 0.9)"),
        ("planted cells in their true leaf", f"{100 * fig['cells_in_true_region']:.2f} % (≥ 98 %)"),
        (
            "planted cells missed: on a boundary",
            f"{fig['missed_on_boundary']} of {fig['missed']} "
            "(their true atlas voxel has a 6-neighbour of another label)",
        ),
        (
            "missed, by (true, found) leaf",
            ", ".join(f"{a}→{b} {n}" for (a, b), n in fig["missed_pairs"]) or "none",
        ),
        ("min Jacobian determinant", f"{fig['min_jacobian']:.3f} (> 0)"),
        ("similarity (log-intensity correlation)", f"{fig['similarity']:.3f}"),
        (
            "illumination divided out, its range in the brain",
            "not fitted"
            if result.illumination_range is None
            else f"{result.illumination_range:.2f}×",
        ),  # fmt: skip
        ("registration wall time", f"{wall:.0f} s (≤ 120 s on 2 cores)"),
        ("registration CPU time (all processes)", f"{cpu:.0f} s"),
        ("elastix steps (wall s)", ", ".join(f"{k} {v:.0f}" for k, v in result.timings_s.items())),
        ("machine load average (1, 5, 15 min)", ", ".join(f"{x:.1f}" for x in load)),
        ("case generation, transformix + figures", f"{t_case:.0f} s, {t_points:.0f} s"),
        ("quality warnings", "; ".join(result.warnings) or "none"),
    ]
    flags = (
        f"--resolution-um {args.resolution_um:g} --threads {args.threads} --seed {args.seed} "
        f"--rotation-deg {args.rotation_deg:g}"
        + (f" --mask-margin-um {args.mask_margin_um:g}" if args.mask_margin_um is not None else "")
        + (" --no-bspline-mask" if args.no_bspline_mask else "")
        + (f" --sheet-far-side {args.sheet_far_side:g}" if args.sheet_far_side != 1.0 else "")
        + (" --no-illumination" if args.no_illumination else "")
    )
    text = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {args.resolution_um:g} µm, "
        f"{args.threads} elastix threads, seed {args.seed}, {args.rotation_deg:g}°"
        + (", no B-spline mask" if args.no_bspline_mask else ", B-spline mask")
        + (f", sheet fading to {args.sheet_far_side:g}" if args.sheet_far_side != 1.0 else "")
        + (", no illumination correction" if args.no_illumination else "")
        + "\n",
        f"`.venv/bin/python -m benchmarks.register {flags}`\n",
        "| figure | value |",
        "|---|---|",
        *(f"| {a} | {b} |" for a, b in rows),
        "",
    ]
    print("\n".join(text))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("# Registration benchmark\n\n" + __doc__.split("\n\n", 1)[1])
    with RESULTS.open("a") as f:
        f.write("\n".join(text))


if __name__ == "__main__":
    main()
