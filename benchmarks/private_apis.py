"""What each private API the library uses buys, measured against its public fallback.

* ``scipy.fft._pocketfft.pypocketfft`` (`lightsheet.deconvolve`): Richardson–Lucy on one
  block with the transforms writing into reused buffers, against the public ``scipy.fft``
  (what the kernel falls back to when the probe fails).
* ``torch.ops.mkldnn._convolution_pointwise`` (`lightsheet.unet.CpuUNet`): the bundled model
  on one slice, fused conv + ReLU against the eager channels-last `UNet` featurize
  otherwise runs.

Both sides run alternately in the same process, the median of several repeats each; the
ratio is what counts (the machine is shared). Writes ``benchmarks/results/private_apis.md``.

    .venv/bin/python -m benchmarks.private_apis [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "private_apis.md"


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pocketfft(shape, repeats: int, threads: int) -> tuple[float, float]:
    """Seconds per RL run: (private pocketfft with out= buffers, public scipy.fft)."""
    import lightsheet.deconvolve.kernel as dec
    from lightsheet.psf import psf_from_optics

    rng = np.random.default_rng(0)
    block = rng.poisson(100, size=shape).astype(np.float32)
    psf = psf_from_optics(
        na=0.5, wavelength_nm=520, refractive_index=1.45, voxel_size_um=(2.0, 1.0, 1.0)
    )
    private = dec._pocketfft

    def run(use_private: bool) -> None:
        dec._pocketfft = private if use_private else (lambda: None)
        dec.clear_otf_cache()
        dec.richardson_lucy(block, psf, iterations=10, workers=threads)

    out = {True: [], False: []}
    run(True), run(False)  # warm-up: plans, OTF, page cache
    for _ in range(repeats):
        for side in (True, False):
            out[side].append(_median_seconds(lambda s=side: run(s), 1))
    dec._pocketfft = private
    return statistics.median(out[True]), statistics.median(out[False])


def mkldnn(side_px: int, repeats: int, threads: int) -> tuple[float, float]:
    """Seconds per slice: (CpuUNet, eager channels-last UNet), bundled model."""
    import torch

    from lightsheet.models.checkpoint import load_model
    from lightsheet.unet import CpuUNet, UNet, channels_last_format

    torch.set_num_threads(threads)
    net = load_model(None)
    if not isinstance(net, UNet):
        raise SystemExit(f"bundled model is {type(net).__name__}, not a UNet")
    net = net.eval().float()
    fused = CpuUNet(net)
    eager = net.to(memory_format=channels_last_format(net.ndim))
    shape = (1, net.in_channels, side_px, side_px)
    if net.ndim == 3:
        shape = (1, net.in_channels, 1, side_px, side_px)
    x = torch.rand(*shape)
    out = {True: [], False: []}
    with torch.no_grad():
        fused(x), eager(x)
        for _ in range(repeats):
            out[True].append(_median_seconds(lambda: fused(x), 1))
            out[False].append(_median_seconds(lambda: eager(x), 1))
    return statistics.median(out[True]), statistics.median(out[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    shape = (64, 256, 256)
    fft_private, fft_public = pocketfft(shape, args.repeats, args.threads)
    side = 304
    unet_fused, unet_eager = mkldnn(side, args.repeats, args.threads)
    lines = [
        "# Private APIs: what each buys (benchmarks/private_apis.py)",
        "",
        f"`.venv/bin/python -m benchmarks.private_apis --repeats {args.repeats} "
        f"--threads {args.threads}`; medians, both sides alternating in one process.",
        "",
        "| private API | workload | private s | public fallback s | fallback / private |",
        "|---|---|---|---|---|",
        f"| scipy.fft._pocketfft (out= buffers) | RL, 10 iterations, {shape} float32 | "
        f"{fft_private:.3f} | {fft_public:.3f} | {fft_public / fft_private:.2f} |",
        f"| torch.ops.mkldnn._convolution_pointwise | bundled UNet, one {side}x{side} slice | "
        f"{unet_fused:.3f} | {unet_eager:.3f} | {unet_eager / unet_fused:.2f} |",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
