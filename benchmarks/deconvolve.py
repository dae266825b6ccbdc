"""Deconvolution speed: per-iteration kernels against baselines and the FFT floor, then the
whole chunked stage from OME-Zarr to OME-Zarr.

    python -m benchmarks.deconvolve            # the issue's sizes: 128x512x512, 31^3 PSF
    python -m benchmarks.deconvolve --quick    # small smoke test

Rows (same data, same iterations):
  (a) straightforward NumPy: np.fft.rfftn/irfftn in NumPy's default (float64) precision,
      2 forward + 2 inverse transforms per iteration, new arrays each step
  (b) skimage.restoration.richardson_lucy
  (c) lightsheet.deconvolve.richardson_lucy (pad_width=0: the same FFT size as (a), (d))
  (c''') (c) on the image plus 100 with ``background=100`` (a camera's offset)
  (d) the floor: just the 4 transforms per iteration (2 forward, 2 inverse, whole-volume
      3-D) with the kernel's FFT library (SciPy's pocketfft, float32, workers=threads,
      into reused buffers); other libraries' floors for comparison. The kernel itself
      splits each transform into 2-D plane and 1-D z-slab transforms so that its
      element-wise work runs in cache (`lightsheet.deconvolve.kernel._PlaneRL`).
Whole stage: `deconvolve` on 8 x the kernel's volume, stored as OME-Zarr in stitch-like
chunks, into another OME-Zarr with the project's writer, on the pipeline's local cluster, at
the default (accurate) depth and at the PSF's half-size, for each --block-mib budget. Shown:
the blocks `choose_blocks` picks, the halo overhead (padded FFT voxels per output voxel), the
same read + write with no computation, level 0 and the pyramid apart, the output rate against
(c), and the padded rate against the kernel on one block of the stage's own padded shape
(how well the stage runs its blocks, halos aside).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import scipy
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter

from lightsheet.blocks import BLOCK_BYTES, choose_blocks, default_depth, fast_shape
from lightsheet.deconvolve import _cuda_available, clear_otf_cache, deconvolve, richardson_lucy
from lightsheet.deconvolve.kernel import _backend, _pocketfft
from lightsheet.psf import gaussian_psf

GPU_BASELINE_VOXIT_S = 2.2e9  # plain CuPy RL on an older GPU (issue figure)


class _Skip(Exception):
    pass


def phantom(shape, psf, seed=0):
    """Blobs on a background, blurred with ``psf``, Poisson noise; float32."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    n = max(8, int(np.prod(shape) // 20000))
    truth[tuple(rng.integers(0, s, n) for s in shape)] = rng.uniform(1000, 5000, n)
    truth = gaussian_filter(truth, 1.5) * 50 + 20
    blurred = sfft.irfftn(
        sfft.rfftn(truth, workers=2) * _otf64(psf, shape), s=shape, workers=2
    ).astype(np.float32)
    return rng.poisson(np.maximum(blurred, 0)).astype(np.float32)


def _otf64(psf, shape):
    k = np.zeros(shape)
    k[tuple(slice(0, s) for s in psf.shape)] = psf
    k = np.roll(k, [-(s // 2) for s in psf.shape], axis=(0, 1, 2))
    return np.fft.rfftn(k)


def rl_numpy_naive(image, psf, iterations):
    """(a): float64 NumPy FFTs, 2 forward + 2 inverse per iteration, new arrays each step."""
    shape = image.shape
    otf = _otf64(psf, shape)
    est = image.astype(np.float64)
    for _ in range(iterations):
        conv = np.fft.irfftn(np.fft.rfftn(est) * otf, s=shape, axes=(0, 1, 2))
        ratio = image / np.maximum(conv, 1e-12)
        est = est * np.fft.irfftn(np.fft.rfftn(ratio) * np.conj(otf), s=shape, axes=(0, 1, 2))
    return est


def floor_kernel_fft(image, iterations, workers):
    """(d): 4 whole-volume 3-D transforms per iteration with the kernel's FFT library
    (SciPy's pocketfft, float32), written into reused buffers."""
    be = _backend(image, workers)
    spec = np.empty((*image.shape[:-1], image.shape[-1] // 2 + 1), np.complex64)
    real = np.empty(image.shape, np.float32)
    x = image
    for _ in range(iterations):
        for _ in range(2):
            spec = be.forward(x, image.shape, spec)
            x = be.inverse(spec, image.shape, real)
    return x


def floor_scipy(image, iterations, workers):
    """The same with the public scipy.fft API, which allocates every output."""
    x = image
    for _ in range(iterations):
        for _ in range(2):
            spec = sfft.rfftn(x, workers=workers)
            x = sfft.irfftn(spec, s=image.shape, workers=workers, overwrite_x=True)
    return x


def floor_torch(image, iterations, workers):
    import torch

    torch.set_num_threads(workers)
    x = torch.from_numpy(image)
    for _ in range(iterations):
        for _ in range(2):
            x = torch.fft.irfftn(torch.fft.rfftn(x), s=image.shape)
    return x


def floor_pyfftw(image, iterations, workers):
    import pyfftw  # optional, GPL: only measured when installed

    a = pyfftw.empty_aligned(image.shape, "float32")
    a[...] = image
    fwd = pyfftw.builders.rfftn(a, threads=workers, planner_effort="FFTW_MEASURE")
    inv = pyfftw.builders.irfftn(fwd.output_array, s=image.shape, threads=workers)
    for _ in range(iterations):
        for _ in range(2):
            fwd()
            inv()
    return inv.output_array


CPU_SECONDS = {}  # wall time -> CPU seconds of the same call (all threads), for the table


def timed(fn, *args, repeat=1, **kwargs):
    """Best wall time of ``repeat`` calls; its CPU time (all threads) goes to CPU_SECONDS.

    On a shared machine wall time grows with other processes' load, CPU time much less.
    """
    best, best_cpu = math.inf, math.inf
    for _ in range(repeat):
        clear_otf_cache()  # every call pays the kernel's set-up, as (a) and (b) do
        c0, t0 = time.process_time(), time.perf_counter()
        fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, best_cpu = wall, cpu
    CPU_SECONDS[best] = best_cpu
    return best


def run_stage(workdir, image, psf, iterations, store_chunks, depth, block_bytes, client):
    """Store ``image`` as OME-Zarr, deconvolve it block by block into another; time each part.

    Runs on ``client`` (the pipeline's local cluster), as the deconvolve task does: blocks of
    whole stored chunks (`choose_blocks`), each reading its halo from the store. Returns the
    seconds of level 0 (the deconvolution and its write) and of the pyramid, the seconds of
    the same read + float32 write with no computation, the blocks, and the padded FFT voxels
    per output voxel (the halo overhead).
    """
    from lightsheet.io.omezarr import stored_volume, write_image

    raw = workdir / "raw.ome.zarr"
    if not raw.exists():
        with dask.config.set(scheduler="threads"):  # in this process: the array is here
            write_image(
                da.from_array(image[None, None], chunks=(1, 1, *store_chunks)),
                raw,
                voxel_size_um=(1, 1, 1),
            )
    levels = []

    def compute(written, level):
        t0 = time.perf_counter()
        out = client.compute(written).result()
        levels.append(time.perf_counter() - t0)
        return out

    vol = stored_volume(raw)
    blocks = choose_blocks(vol.shape, vol.chunks, depth, target_bytes=block_bytes)
    # I/O alone: read and write the same blocks with no computation
    write_image(
        da.from_array(vol, chunks=blocks).astype(np.float32)[None, None],
        workdir / "copy.ome.zarr",
        voxel_size_um=(1, 1, 1),
        chunks=vol.chunks,
        compute=compute,
    )
    t_io = levels[0]
    levels.clear()
    client.run(clear_otf_cache)
    out = deconvolve(vol, psf, iterations=iterations, depth=depth, block_bytes=block_bytes)
    assert out.chunks == da.core.normalize_chunks(blocks, vol.shape), (out.chunks, blocks)
    write_image(
        out[None, None],
        workdir / "deconvolved.ome.zarr",
        voxel_size_um=(1, 1, 1),
        chunks=vol.chunks,
        compute=compute,
    )
    padded = sum(
        math.prod(fast_shape([c + 2 * d for c, d in zip(block, depth, strict=True)]))
        for block in itertools.product(*out.chunks)
    )
    return levels[0], sum(levels[1:]), t_io, blocks, padded / image.size, out.numblocks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small volume, 3 iterations")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (cores) to use")
    p.add_argument(
        "--repeat", type=int, default=2, help="best of N calls for every per-iteration row alike"
    )
    p.add_argument("--skip-baselines", action="store_true", help="skip (a) and (b)")
    p.add_argument("--skip-stage", action="store_true", help="skip the whole-stage rows")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder for OME-Zarr")
    p.add_argument(
        "--block-mib",
        type=int,
        nargs="+",
        default=[BLOCK_BYTES >> 20, 4 * (BLOCK_BYTES >> 20)],
        help="whole stage: largest padded block in MiB (deconvolve's block_bytes)",
    )
    args = p.parse_args(argv)

    shape = (32, 128, 128) if args.quick else (128, 512, 512)
    psf_size = 9 if args.quick else 31
    iterations = args.iterations or (3 if args.quick else 10)
    threads = args.threads
    rep = max(1, args.repeat)
    psf = gaussian_psf([(psf_size // 2) / 3.0] * 3, (1.0, 1.0, 1.0))  # 3-sigma half-size
    assert psf.shape == (psf_size,) * 3, psf.shape
    image = phantom(shape, psf)
    n = image.size

    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, dask {dask.__version__}")
    print(
        f"volume {shape} float32, PSF {psf.shape}, {iterations} iterations, {threads} threads, "
        f"best of {rep} calls per row"
    )
    print()

    rows = []

    def row(name, seconds, note=""):
        per_it = seconds / iterations
        cpu = CPU_SECONDS.get(seconds, math.nan) / iterations
        rows.append((name, seconds))
        print(
            f"  {name:<52} {per_it:7.3f} s/it {cpu:7.3f} cpu-s/it "
            f"{n * iterations / seconds:9.3g} vox-it/s  {note}"
        )

    print("per-iteration, one block (setup included, divided by the iterations);")
    print("wall seconds, and CPU seconds of all threads (less sensitive to other load):")
    if not args.skip_baselines:
        row(
            "(a) numpy.fft float64, straightforward",
            timed(rl_numpy_naive, image, psf, iterations, repeat=rep),
        )
        from skimage.restoration import richardson_lucy as sk_rl

        row(
            "(b) skimage.restoration.richardson_lucy",
            timed(sk_rl, image, psf, num_iter=iterations, clip=False, repeat=rep),
        )
    kernel = dict(iterations=iterations, workers=threads)
    t_c = timed(richardson_lucy, image, psf, pad_width=0, repeat=rep, **kernel)
    fft_name = "scipy pocketfft, outputs into reused buffers" if _pocketfft() else "scipy.fft"
    row("(c) lightsheet richardson_lucy (pad_width=0)", t_c, fft_name + ", planes + z-slabs")
    t_d = timed(floor_kernel_fft, image, iterations, threads, repeat=rep)
    row("(d) floor: 4 whole-volume transforms/it, float32", t_d, fft_name)
    floors = {"scipy (kernel's calls)": t_d}
    for name, fn in (
        ("scipy.fft public API", floor_scipy),
        ("torch.fft", floor_torch),
        ("pyFFTW", floor_pyfftw),
    ):
        try:
            fn(image, 1, threads)  # warm up: thread pools, plans
            floors[name] = timed(fn, image, iterations, threads, repeat=rep)
        except ImportError:
            continue
        row(f"    floor with {name} (for comparison)", floors[name])
    t_pad = timed(richardson_lucy, image, psf, repeat=rep, **kernel)
    padded = fast_shape([s + 2 * (q // 2) for s, q in zip(shape, psf.shape, strict=True)])
    row("(c') kernel, mirror-padded edges (default)", t_pad, f"FFT size {padded}")
    t_acc = timed(richardson_lucy, image, psf, pad_width=0, acceleration=True, repeat=rep, **kernel)
    row("(c'') kernel, Biggs-Andrews acceleration", t_acc)
    offset = image + np.float32(100)  # a camera's offset, modelled as background
    t_bg = timed(richardson_lucy, offset, psf, pad_width=0, background=100, repeat=rep, **kernel)
    row("(c''') kernel, a camera offset as background", t_bg, f"{t_bg / t_c:.3f} x (c)")

    print()
    print("targets:")
    fastest = min(floors, key=floors.get)
    print(f"  fastest FFT floor here: {fastest}; the kernel uses SciPy's pocketfft (BSD)")
    if not args.skip_baselines:
        print(f"  (c) vs (a): {rows[0][1] / t_c:5.2f}x faster (target >= 7)")
        print(f"  (c) vs (b): {rows[1][1] / t_c:5.2f}x faster (target >= 7)")
    print(f"  (c) / (d):  {t_c / t_d:5.3f} (target <= 1.15)")
    print(f"  (c) / (d) in CPU seconds: {CPU_SECONDS[t_c] / CPU_SECONDS[t_d]:5.3f}")
    if not args.skip_baselines:
        for i, tag in ((0, "a"), (1, "b")):
            ratio = CPU_SECONDS[rows[i][1]] / CPU_SECONDS[t_c]
            print(f"  ({tag}) / (c) in CPU seconds: {ratio:5.2f}")

    # --------------------------------------------------------------- whole stage
    print()
    print(
        "whole stage: OME-Zarr -> deconvolve -> OME-Zarr on the pipeline's local cluster; blocks "
        "of whole stored chunks, each reading its halo from the store"
    )
    kernel_rate = n * iterations / t_c
    tmp = Path(tempfile.mkdtemp(prefix="bench-deconv-", dir=args.workdir))
    client = cluster = None
    try:
        if args.skip_stage:
            raise _Skip
        from distributed import Client

        from lightsheet.clusters import local_cluster, local_cluster_kwargs
        from lightsheet.config import ClusterConfig

        cluster = local_cluster(**local_cluster_kwargs(ClusterConfig(threads_per_worker=threads)))
        client = Client(cluster)
        stage_shape = tuple(2 * s for s in shape)  # 8 x the kernel's volume
        # stitch-like stored chunks (8 M voxels at the size)
        store_chunks = (stage_shape[0] // 2, stage_shape[1] // 4, stage_shape[2] // 4)
        big = np.tile(image, (2, 2, 2))
        half = tuple(s // 2 for s in psf.shape)
        print(
            f"  volume {stage_shape} float32 stored in chunks {store_chunks}, "
            f"{threads} worker threads (one block each)"
        )
        head = (
            f"  {'depth':<22} {'budget':>7} {'blocks':<16} {'#':>3} {'halo':>5} {'I/O s':>6} "
            f"{'s0 s':>7} {'pyr s':>6} {'out vox-it/s':>12} {'of (c)':>7} "
            f"{'padded vox-it/s':>15} {'of kernel':>9}"
        )
        print(head)
        for label, depth in (
            ("default", default_depth(psf.shape, iterations)),
            ("PSF half-size", half),
        ):
            for mib in args.block_mib:
                blocks = choose_blocks(stage_shape, store_chunks, depth, target_bytes=mib << 20)
                padded_block = fast_shape([b + 2 * d for b, d in zip(blocks, depth, strict=True)])
                # the kernel alone on one block of the stage's padded shape, all threads
                one = big[tuple(slice(0, p) for p in padded_block)]
                if one.shape != padded_block:
                    one = np.pad(
                        one,
                        [(0, p - o) for p, o in zip(padded_block, one.shape, strict=True)],
                        mode="symmetric",
                    )
                t_one = timed(richardson_lucy, one, psf, pad_width=0, repeat=1, **kernel)
                block_rate = one.size * iterations / t_one
                t_s0, t_pyr, t_io, blocks, halo, nblocks = run_stage(
                    tmp, big, psf, iterations, store_chunks, depth, mib << 20, client
                )
                rate = big.size * iterations / t_s0
                print(
                    f"  {label + ' ' + str(depth):<22} {mib:>4}MiB {str(blocks):<16} "
                    f"{math.prod(nblocks):>3} {halo:5.2f} {t_io:6.1f} {t_s0:7.1f} {t_pyr:6.1f} "
                    f"{rate:12.3g} {rate / kernel_rate:7.1%} {rate * halo:15.3g} "
                    f"{rate * halo / block_rate:9.1%}"
                )
                for name in ("copy.ome.zarr", "deconvolved.ome.zarr"):
                    shutil.rmtree(tmp / name, ignore_errors=True)
        print(
            "  halo = padded FFT voxels / output voxels; of (c) = output voxel-iterations/s "
            "against (c) (target >= 70%);"
        )
        print(
            "  of kernel = the stage's padded voxel-iterations/s against the kernel on one "
            "block of the stage's padded shape with all threads (execution efficiency)"
        )
    except _Skip:
        print("  (skipped)")
    finally:
        if client is not None:
            client.close()
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)

    if _cuda_available():
        import cupy

        print()
        print("GPU: whole deconvolve on a volume bigger than one chunk (CuPy)")
        gshape = (2 * shape[0], shape[1], shape[2])
        gimage = phantom(gshape, psf, seed=2)
        lazy = deconvolve(
            da.from_array(gimage, chunks=(shape[0], *shape[1:])),
            psf,
            iterations=iterations,
            gpu=True,
        )
        lazy.compute()  # warm up: CUDA context, plans, OTFs
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=1):
            lazy.compute()
        t_gpu = time.perf_counter() - t0
        rate = gimage.size * iterations / t_gpu
        print(
            f"  {rate:10.3g} vox-it/s = {rate / GPU_BASELINE_VOXIT_S:5.2f}x the plain-CuPy "
            f"baseline ({GPU_BASELINE_VOXIT_S:.2g}; target >= 5x)"
        )
    load = os.getloadavg()
    print()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
