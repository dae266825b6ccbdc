"""Featurization speed: the straightforward map_blocks loop vs `lightsheet.featurize`.

Same model, same data, same Dask scheduler, in one run:

(a) straightforward: the volume rechunked to one z-slice per block, `map_blocks` calling the
    model on each slice (a new tensor per call, batch of one, autograd on, no halo: seams at
    block borders; each slice zoomed to the model's pixel size and back with SciPy), with
    the same torch threads per Dask thread as (b), so that (a) is not slowed by
    oversubscribed cores (torch's default would start one thread per core in each Dask
    thread);
(b) this project: `featurize` with voxel-size transfer (each block resampled to the model's
    voxel size and back), halo + pooling-grid alignment, neighbouring chunks of a 2-D
    model grouped so their halos are shared and passes have the size the network runs
    fastest at, inference mode, on a CPU a fused conv+ReLU twin of the UNet with channels-last
    activations, CUDA + half precision when present).

Prints pixels per second and the speed-up; on a GPU also the GPU utilisation sampled by
``nvidia-smi`` during (b). ``--accuracy`` also reports each method's largest deviation from
running the model on whole slices (the seams of (a)).

Usage::

    python benchmarks/featurize.py                       # (16, 512, 512), chunks (8, 256, 256)
    python benchmarks/featurize.py --shape 32 1024 1024 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
import time

import dask
import dask.array as da
import numpy as np
import torch
from scipy import ndimage as ndi

from lightsheet.featurize import (
    featurize,
    intensity_range,
    load_model,
    model_voxel_size_um,
    run_model,
)


def phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Nucleus-like blobs (~8 px) on a smooth background with shot noise, uint16."""
    rng = np.random.default_rng(seed)
    n = max(1, int(np.prod(shape) * 2e-4))
    spots = np.zeros(shape, np.float32)
    idx = tuple(rng.integers(0, s, n) for s in shape)
    spots[idx] = 1.0
    blobs = ndi.gaussian_filter(spots, (1.5, 3.0, 3.0)) * 1.5e4
    yy = np.linspace(0, 1, shape[1], dtype=np.float32)[None, :, None]
    return rng.poisson(200 + 100 * yy + blobs).astype(np.uint16)


def naive(
    image: da.Array, model: torch.nn.Module, norm: np.ndarray, voxel_size_um=None
) -> da.Array:
    """(a): one z-slice per map_blocks call, a fresh tensor each time, no batching, no halo.

    A model with z context gets its neighbouring slices through a one-slice overlap (the
    volume's end slices repeated, as featurize does). With ``voxel_size_um`` other than the
    model's, each slice is zoomed in y and x to the model's pixel size with
    ``scipy.ndimage.zoom`` (linear) before the model and its features zoomed back: what a
    straightforward loop does for voxel-size transfer (z spacing ignored).
    """
    lo, hi = (float(v) for v in norm)
    n_features = model.n_features
    context = (model.in_channels - 1) // 2
    threads = max(1, (os.cpu_count() or 1) // dask.system.CPU_COUNT)
    model_um = model_voxel_size_um(model)
    factor = (
        None
        if voxel_size_um is None or model_um is None
        else (voxel_size_um[1] / model_um[1], voxel_size_um[2] / model_um[2])
    )

    def one_slice(block: np.ndarray) -> np.ndarray:
        if torch.get_num_threads() != threads:  # per thread: Dask's threads share the cores
            torch.set_num_threads(threads)
        planes = block.astype(np.float32)
        if factor is not None:
            planes = ndi.zoom(planes, (1, *factor), order=1)
        # (1, 1 + 2 * context, Y, X): the slice, with its neighbours as channels
        x = torch.tensor((planes - lo) / (hi - lo))[None]
        y = model(x).detach().numpy().transpose(1, 0, 2, 3)
        if factor is not None:
            back = [n / m for n, m in zip(block.shape[1:], y.shape[2:], strict=True)]
            y = ndi.zoom(y, (1, 1, *back), order=1)
        return y.astype(np.float16)

    per_slice = image.rechunk((1, *image.chunksize[1:]))
    if context:
        padded = da.overlap.overlap(
            per_slice, depth={0: context, 1: 0, 2: 0}, boundary={0: "nearest", 1: 0, 2: 0}
        )
        # one output slice per block, from its slice and its neighbours
        return padded.map_blocks(
            one_slice,
            dtype=np.float16,
            chunks=((n_features,), *per_slice.chunks),
            new_axis=0,
        )
    return per_slice.map_blocks(
        one_slice,
        dtype=np.float16,
        chunks=((n_features,), *per_slice.chunks),
        new_axis=0,
    )


class GPUSampler:
    """Samples GPU utilisation (%) with nvidia-smi every 0.2 s while active."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            time.sleep(0.2)

    def __enter__(self) -> GPUSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(arr: da.Array) -> tuple[float, float, np.ndarray]:
    """Wall seconds, CPU seconds of this process (all threads), result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = arr.compute(scheduler="threads")
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=(16, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--chunks", type=int, nargs=3, default=(8, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--voxel-size-um",
        type=float,
        nargs=3,
        default=(5.0, 2.0, 2.0),
        metavar=("Z", "Y", "X"),
        help="the phantom's voxel size: (b) resamples each block to the model's and back "
        "(default 5 2 2 µm, coarser than the bundled model's: more model pixels than image "
        "pixels, the costlier direction); the model's own voxel size: no resampling",
    )
    p.add_argument("--repeat", type=int, default=2, help="runs per method; the best is kept")
    p.add_argument("--model", default=None, help="checkpoint (default: bundled)")
    p.add_argument("--accuracy", action="store_true", help="also compare with whole slices")
    args = p.parse_args()

    shape = tuple(args.shape)
    model = load_model(args.model)
    data = phantom(shape)
    image = da.from_array(data, chunks=tuple(args.chunks))
    norm = intensity_range(image).compute()
    cuda = torch.cuda.is_available()
    n_px = int(np.prod(shape))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"volume {shape} uint16, chunks {tuple(args.chunks)}, model "
        f"{model.model_args}, {n_px / 1e6:.1f} Mpx at {tuple(args.voxel_size_um)} µm (model: "
        f"{model_voxel_size_um(model)} µm); cores {os.cpu_count()}, dask threads "
        f"{dask.system.CPU_COUNT}, torch default threads {torch.get_num_threads()}, "
        f"device {'cuda: ' + torch.cuda.get_device_name() if cuda else 'cpu'}, "
        f"load average {load:.2f} at start"
    )
    default_threads = torch.get_num_threads()

    # warm-up (oneDNN/cuDNN plans) on a small piece, not timed
    featurize(image[:1, :128, :128], model, norm=norm, voxel_size_um=args.voxel_size_um).compute()
    naive(image[:2, :128, :128], model, norm, args.voxel_size_um).compute()

    # (a) and (b) alternate, best of `repeat` each, so a change in the machine's load
    # (other processes share the CPU) hits both alike
    vs = tuple(args.voxel_size_um)
    arr_a = naive(image, model, norm, vs)
    arr_b = featurize(image, model, batch_size=args.batch_size, norm=norm, voxel_size_um=vs)
    t_a = t_b = c_a = c_b = np.inf
    out_a = out_b = None
    samples: list[float] = []
    for _ in range(args.repeat):
        t, c, out_a = timed(arr_a)
        t_a, c_a = min(t_a, t), min(c_a, c)
        torch.set_num_threads(default_threads)
        if cuda and shutil.which("nvidia-smi"):
            with GPUSampler() as s:
                t, c, out_b = timed(arr_b)
            samples += s.samples
        else:
            t, c, out_b = timed(arr_b)
        t_b, c_b = min(t_b, t), min(c_b, c)
        torch.set_num_threads(default_threads)
    gpu_util = (float(np.mean(samples)), float(np.max(samples))) if samples else None
    rows = [
        ["(a) map_blocks per slice", t_a, c_a, out_a],
        ["(b) lightsheet.featurize", t_b, c_b, out_b],
    ]

    ref = None
    if args.accuracy:  # (a) is on the image's grid, (b) resampled: compare (b) with itself
        ref = run_model(data, model, norm=norm, device="cuda" if cuda else "cpu", voxel_size_um=vs)
    # on a shared CPU the wall clock also measures the neighbours; CPU seconds do not
    head = f"{'method':<28}{'seconds':>9}{'Mpx/s':>8}{'speed-up':>10}"
    head += f"{'CPU s':>8}{'Mpx/CPU-s':>11}{'CPU speed-up':>14}"
    if ref is not None:
        head += f"{'max |Δ| vs whole':>18}"
    print(head)
    for name, t, c, out in rows:
        line = f"{name:<28}{t:>9.2f}{n_px / t / 1e6:>8.2f}{t_a / t:>10.2f}"
        line += f"{c:>8.1f}{n_px / c / 1e6:>11.2f}{c_a / c:>14.2f}"
        if ref is not None:
            line += f"{float(np.abs(out.astype(np.float32) - ref).max()):>18.4f}"
        print(line)
    if gpu_util is not None:
        print(f"GPU utilisation during (b): mean {gpu_util[0]:.0f} %, max {gpu_util[1]:.0f} %")
    if hasattr(os, "getloadavg"):
        print(f"load average at end {os.getloadavg()[0]:.2f} (other processes share the CPU)")


if __name__ == "__main__":
    main()
