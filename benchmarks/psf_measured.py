"""A measured PSF as a microscope gives it: a bead stack on the camera's level, at a finer z step.

Deconvolution needs the PSF at the image's voxel size, normalised to the light it spreads.
A bead stack is neither: it holds the camera's level and noise under the bead (over a crop
of thousands of voxels, a flat box that outweighs the bead), and beads are usually imaged
at a finer z step than the sample. This generates both sides with known truth:

* a sample of nuclei (spheres 6-10 µm across, 5 × brighter than the tissue around them)
  at (2, 1, 1) µm, blurred by a Gaussian PSF of σ (3.0, 0.8, 0.8) µm, on a camera level of
  100 with Poisson noise and a read noise of 2 counts;
* the same PSF's bead stack at (0.5, 1, 1) µm (a sub-resolution bead, peak 4,000 counts on
  the same camera), uint16, its voxel size in its ImageJ metadata, as Fiji writes it;
* a field of 16 such beads 30 µm apart, distilled by ``lightsheet psf --beads``;
* other channels of other nuclei, at a shorter (σ 2.6, 0.69, 0.69 µm) and a longer
  wavelength (σ 3.6, 0.96, 0.96 µm), each deconvolved with the first channel's PSF and with
  its own (their rows' RMS are against their own PSF's deconvolution and their own truth);

and deconvolves the sample (`lightsheet.deconvolve.kernel.richardson_lucy`, 10 iterations,
``background`` the camera's level) with the true PSF and with the bead stack as
`lightsheet.psf.load_psf` reads it: with the image's voxel size (resampled to it) and
without (the stack's planes taken as the image's). Per row: the PSF's second-moment widths,
and the deconvolution's RMS difference from the true PSF's (as a fraction of that
result's RMS above the level) and from the sharp truth; the image itself, not
deconvolved, for scale.

    python -m benchmarks.psf_measured --results benchmarks/results     # seconds

Writes ``psf_measured.csv`` under ``--results``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

from lightsheet.deconvolve.kernel import richardson_lucy
from lightsheet.psf import gaussian_psf, load_psf, psf_sigma_um

VOXEL_UM = (2.0, 1.0, 1.0)
BEAD_VOXEL_UM = (0.5, 1.0, 1.0)
SIGMA_UM = (3.0, 0.8, 0.8)
#: Other channels' PSFs: emission at 520 nm (a thinner sheet too), and at 720 nm.
SIGMA_OTHER_UM = {"shorter": (2.6, 0.69, 0.69), "longer": (3.6, 0.96, 0.96)}
CAMERA_LEVEL = 100.0
PEAK = 4000.0
READ_NOISE = 2.0


def _camera(light: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a camera records: Poisson light on its level, read noise, integer counts."""
    counts = rng.poisson(light) + CAMERA_LEVEL + rng.normal(0, READ_NOISE, light.shape)
    return np.clip(np.round(counts), 0, 65535).astype(np.uint16)


def sample(
    rng: np.random.Generator, shape=(48, 160, 160), sigma_um=SIGMA_UM
) -> tuple[np.ndarray, np.ndarray]:
    """(sharp truth, recorded image) of nuclei in tissue, in counts of light."""
    grid = np.indices(shape, dtype=np.float32) * np.array(VOXEL_UM, np.float32)[:, None, None, None]
    truth = np.full(shape, 40.0, np.float32)
    extent = np.array(shape) * np.array(VOXEL_UM)
    for _ in range(120):
        centre = rng.uniform(0, extent)
        radius = rng.uniform(3.0, 5.0)
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        truth[inside] = 200.0
    psf = gaussian_psf(sigma_um, VOXEL_UM, truncate=4)
    blurred = ndimage.convolve(truth, psf, mode="reflect")
    return truth, _camera(blurred, rng)


def beads(rng: np.random.Generator, path: Path, shape, centres_um) -> Path:
    """Beads at ``centres_um`` in a stack of ``shape`` at ``BEAD_VOXEL_UM`` on the camera
    (peaks of 4,000 counts), written as Fiji does (its voxel size in ImageJ metadata)."""
    grids = np.indices(shape, dtype=np.float64) * np.array(BEAD_VOXEL_UM)[:, None, None, None]
    light = np.zeros(shape)
    for centre in centres_um:
        r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, SIGMA_UM, strict=True))
        light += PEAK * np.exp(-r2 / 2)
    vz, vy, vx = BEAD_VOXEL_UM
    tifffile.imwrite(
        path, _camera(light, rng), imagej=True, resolution=(1 / vx, 1 / vy),
        metadata={"spacing": vz, "unit": "um", "axes": "ZYX"},
    )  # fmt: skip
    return path


def _row(name: str, psf: np.ndarray | None, image, truth, reference) -> dict:
    """Deconvolved with ``psf`` (None: the image itself), against the reference and truth."""
    if psf is None:
        out = image - CAMERA_LEVEL
    else:
        out = richardson_lucy(image, psf, iterations=10, background=CAMERA_LEVEL) - CAMERA_LEVEL
    scale = float(np.sqrt(np.mean(reference**2)))
    sigma = (np.nan,) * 3 if psf is None else psf_sigma_um(psf, VOXEL_UM)
    return {
        "psf": name,
        "shape": "" if psf is None else "x".join(map(str, psf.shape)),
        "sigma_z_um": round(sigma[0], 3),
        "sigma_y_um": round(sigma[1], 3),
        "sigma_x_um": round(sigma[2], 3),
        "rms_vs_true_psf": round(float(np.sqrt(np.mean((out - reference) ** 2))) / scale, 4),
        "rms_vs_truth": round(float(np.sqrt(np.mean((out - truth) ** 2))) / scale, 4),
    }


def _field_row(rng, folder: Path, image, truth, reference) -> dict:
    """A field of 16 beads 30 µm apart (a few tenths of a voxel off the grid) through
    `lightsheet psf --beads`, then `load_psf` at the image's voxel size."""
    from lightsheet.cli import main as lightsheet

    grid = [(24.0, 15.0 + 30 * i, 15.0 + 30 * j) for i in range(4) for j in range(4)]
    centres = [np.add(c, rng.uniform(-0.5, 0.5, 3)) for c in grid]
    field = beads(rng, folder / "beads.tif", (96, 120, 120), centres)
    out = folder / "psf_beads.tif"
    with contextlib.redirect_stdout(io.StringIO()):
        lightsheet(["psf", str(out), "--beads", str(field)])
    row = _row(
        "bead field, lightsheet psf --beads", load_psf(out, VOXEL_UM), image, truth, reference
    )
    return row


def _channel_rows(rng: np.random.Generator) -> list[dict]:
    """Another channel at a shorter and at a longer wavelength (``SIGMA_OTHER_UM``), each
    deconvolved with the first channel's PSF (one ``psf`` for every channel) and with its
    own (a per-channel ``psf`` mapping)."""
    first = gaussian_psf(SIGMA_UM, VOXEL_UM, truncate=4)
    rows = []
    for name, sigma in SIGMA_OTHER_UM.items():
        truth, image = sample(rng, sigma_um=sigma)
        own = gaussian_psf(sigma, VOXEL_UM, truncate=4)
        reference = richardson_lucy(image, own, iterations=10, background=CAMERA_LEVEL)
        reference = reference - CAMERA_LEVEL
        what = f"a {name} wavelength's channel"
        rows += [
            _row(f"{what}, not deconvolved", None, image.astype(np.float32), truth, reference),
            _row(f"{what}, with channel 0's PSF", first, image, truth, reference),
            _row(f"{what}, with its own PSF", own, image, truth, reference),
        ]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="write psf_measured.csv here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    truth, image = sample(rng)
    true_psf = gaussian_psf(SIGMA_UM, VOXEL_UM, truncate=4)
    reference = richardson_lucy(image, true_psf, iterations=10, background=CAMERA_LEVEL)
    reference = reference - CAMERA_LEVEL
    with tempfile.TemporaryDirectory() as folder:
        # one bead, cut ±12 µm in z and ±10 µm in y and x around it
        path = beads(rng, Path(folder) / "bead.tif", (49, 21, 21), [(12.0, 10.0, 10.0)])
        rows = [
            _row(
                "none: the image, not deconvolved", None, image.astype(np.float32), truth, reference
            ),
            _row("true PSF at the image's voxel size", true_psf, image, truth, reference),
        ]
        rows.append(_row("bead stack, load_psf(path)", load_psf(path), image, truth, reference))
        if "voxel_size_um" in inspect.signature(load_psf).parameters:  # not before it existed
            loaded = load_psf(path, VOXEL_UM)
            rows.append(_row("bead stack, load_psf(path, voxel)", loaded, image, truth, reference))
        if (Path(__file__).parents[1] / "lightsheet" / "beads.py").is_file():
            rows.append(_field_row(rng, Path(folder), image, truth, reference))
    rows += _channel_rows(rng)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.results:
        args.results.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.results / "psf_measured.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
