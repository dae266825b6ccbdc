"""Richardson–Lucy kernel and its chunked lift, against float64 references and a phantom."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import convolve

import lightsheet.deconvolve as dec
import lightsheet.deconvolve.kernel as rl
from lightsheet.blocks import (
    choose_blocks,
    choose_chunks,
    default_depth,
    fast_shape,
    next_fast_size,
)
from lightsheet.deconvolve import clear_otf_cache, deconvolve, richardson_lucy
from lightsheet.errors import ImageError, PSFError
from lightsheet.psf import gaussian_psf

#: kernel (float32) against a float64 reference, relative to the reference's maximum
KERNEL_RTOL = 1e-4
#: chunked against whole-volume deconvolution, relative to the whole volume's maximum
CHUNKED_RTOL = 1e-3
#: deconvolution must cut the phantom's normalised RMSE at least this much (factor)
PHANTOM_GAIN = 2.0

HAS_CUDA = dec._cuda_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CuPy and a CUDA device")


pytestmark = pytest.mark.usefixtures("two_dask_threads")


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, requires_cuda])])
def xp(request):
    if request.param == "cupy":
        import cupy

        return cupy
    return np


def _max_rel(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _nrmse(x, truth) -> float:
    """Root-mean-square error over the truth's value range (skimage's 'min-max')."""
    return float(np.sqrt(np.mean((x - truth) ** 2)) / (truth.max() - truth.min()))


def rl_reference(image, psf, iterations, *, pad, accelerate=False, background=0.0):
    """Plain float64 Richardson–Lucy: mirror pad, periodic FFT convolution, crop.

    With ``background``: the model is ``background + psf * estimate``, the estimate starts
    at ``max(image - background, eps)`` and the background is added to the result.
    """
    image = np.asarray(image, dtype=np.float64)
    psf = np.asarray(psf, dtype=np.float64)
    psf = psf / psf.sum()
    padded_shape = [s + 2 * p for s, p in zip(image.shape, pad, strict=True)]
    shape = fast_shape(padded_shape)
    widths = [(p, p + f - q) for p, q, f in zip(pad, padded_shape, shape, strict=True)]
    img = np.pad(image, widths, mode="symmetric")
    kernel = np.zeros(shape)
    kernel[tuple(slice(0, s) for s in psf.shape)] = psf
    kernel = np.roll(kernel, [-(s // 2) for s in psf.shape], axis=(0, 1, 2))
    otf = np.fft.rfftn(kernel)
    eps = 1e-6 * img.max()

    def step(est):
        conv = np.fft.irfftn(np.fft.rfftn(est) * otf, s=shape) + background
        ratio = img / np.maximum(conv, eps)
        return est * np.fft.irfftn(np.fft.rfftn(ratio) * np.conj(otf), s=shape)

    x = np.maximum(img - background, eps) if background else img.copy()
    x_prev, g_prev, g_prev2 = x.copy(), None, None
    for _ in range(iterations):
        alpha = 0.0
        if accelerate and g_prev2 is not None:
            alpha = np.clip(np.sum(g_prev * g_prev2) / np.sum(g_prev2 * g_prev2), 0, 0.9999)
        y = np.maximum(x + alpha * (x - x_prev), 0) if accelerate else x
        x_next = step(y)
        g_prev2, g_prev = g_prev, x_next - y
        x_prev, x = x, x_next
    crop = tuple(slice(p, p + s) for p, s in zip(pad, image.shape, strict=True))
    return x[crop] + background


@pytest.fixture(scope="module")
def phantom():
    """Gaussian blobs on a dim background, blurred with a known PSF, with Poisson noise."""
    rng = np.random.default_rng(3)
    shape = (40, 64, 64)
    zz, yy, xx = np.indices(shape)
    truth = np.full(shape, 100.0)
    for _ in range(40):
        c = rng.uniform(4, np.array(shape) - 4)
        r = rng.uniform(1.0, 2.0)
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        truth += rng.uniform(2000, 8000) * np.exp(-d2 / (2 * r * r))
    psf = gaussian_psf((2.0, 1.5, 1.5), (1.0, 1.0, 1.0))
    blurred = convolve(truth, psf.astype(np.float64), mode="reflect")
    image = rng.poisson(blurred).astype(np.float32)
    return truth, image, psf


@pytest.fixture(scope="module")
def noisy_volume():
    rng = np.random.default_rng(11)
    shape = (36, 50, 44)
    truth = np.zeros(shape)
    idx = tuple(rng.integers(0, s, 60) for s in shape)
    truth[idx] = rng.uniform(500, 2000, 60)
    truth = convolve(truth, gaussian_psf((1.0, 1.0, 1.0), (1, 1, 1)).astype(float)) + 5
    psf = gaussian_psf((1.5, 1.0, 1.0), (1.0, 1.0, 1.0))
    image = rng.poisson(convolve(truth, psf.astype(float), mode="reflect")).astype(np.float32)
    return image, psf


# --------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("public_fft", [False, True], ids=["pocketfft-out", "scipy.fft"])
@pytest.mark.parametrize("pad", [(0, 0, 0), None])
def test_kernel_matches_float64_reference(xp, noisy_volume, pad, public_fft, monkeypatch):
    if public_fft:  # the fallback when SciPy's transforms-into-buffers API is unavailable
        monkeypatch.setattr(rl, "_pocketfft", lambda: None)
    image, psf = noisy_volume
    half = tuple(s // 2 for s in psf.shape)
    out = richardson_lucy(xp.asarray(image), psf, iterations=10, pad_width=pad)
    assert type(out) is type(xp.asarray(image))
    assert out.dtype == np.float32 and out.shape == image.shape
    ref = rl_reference(image, psf, 10, pad=half if pad is None else pad)
    assert _max_rel(rl._to_numpy(out), ref) < KERNEL_RTOL


def test_accelerated_kernel_matches_float64_reference(xp, noisy_volume):
    image, psf = noisy_volume
    out = richardson_lucy(xp.asarray(image), psf, iterations=8, acceleration=True)
    half = tuple(s // 2 for s in psf.shape)
    ref = rl_reference(image, psf, 8, pad=half, accelerate=True)
    assert _max_rel(rl._to_numpy(out), ref) < KERNEL_RTOL


@pytest.mark.parametrize("acceleration", [False, True], ids=["plain", "accelerated"])
def test_kernel_with_a_background_matches_float64_reference(xp, noisy_volume, acceleration):
    image, psf = noisy_volume
    image = image + np.float32(100)  # a camera's offset
    out = richardson_lucy(
        xp.asarray(image), psf, iterations=8, acceleration=acceleration, background=100
    )
    half = tuple(s // 2 for s in psf.shape)
    ref = rl_reference(image, psf, 8, pad=half, accelerate=acceleration, background=100.0)
    assert _max_rel(rl._to_numpy(out), ref) < KERNEL_RTOL
    # not the same as counting the offset as light
    plain = rl_reference(image, psf, 8, pad=half, accelerate=acceleration)
    assert _max_rel(ref, plain) > 100 * KERNEL_RTOL


def test_a_camera_offset_as_background_stops_the_echo_of_a_bright_cell():
    """A long axial PSF, a bright cell, a dark outside read at a camera's offset of 100.

    Counted as light, the offset lifts the outside off zero and Richardson–Lucy rings: an
    undershoot next to the cell and an echo beyond it along z, where the image holds none of
    the cell's light (the echoes that the realistic sample's thick sheets found as cells).
    Modelled as background, the cell's column falls to its surroundings' level there.
    """
    shape = (96, 24, 24)
    zz, yy, xx = np.indices(shape)
    cell = ((zz - 48) / 2.0) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 9
    light = 5.0 + 300.0 * cell
    psf = gaussian_psf((10.6, 1.0, 1.0), (2.0, 1.0, 1.0))  # a 25 µm sheet at 2 µm planes
    image = (convolve(light, psf.astype(np.float64), mode="reflect") + 100.0).astype(np.float32)

    def column(a):  # the cell's column over a column far from it, in each plane
        return a[:, 12, 12] - a[:, 0, 0]

    dark = column(image) < 1e-3 * column(image).max()  # planes where the image holds no cell
    assert dark.sum() > 30
    echo = {}
    for background in (0, 100):
        out = column(richardson_lucy(image, psf, iterations=10, background=background))
        echo[background] = out[dark].max() / out.max()
    assert echo[0] > 0.005  # the defect, as measured before
    assert echo[100] < 0.0005


def test_kernel_threads_do_not_change_result(noisy_volume):
    image, psf = noisy_volume
    one = richardson_lucy(image, psf, iterations=5, workers=1)
    two = richardson_lucy(image, psf, iterations=5, workers=3)
    np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6 * float(one.max()))


def test_kernel_accepts_uint16_and_conserves_flux(noisy_volume):
    image, psf = noisy_volume
    image = image[:, :, :40]  # (36, 50, 40): FFT-friendly, so no padding at all
    out = richardson_lucy(image.astype(np.uint16), psf, iterations=5, pad_width=0)
    assert out.dtype == np.float32
    # RL conserves the total intensity for a normalised PSF (periodic boundary)
    assert abs(float(out.sum()) / float(image.sum()) - 1) < 1e-4


def test_dark_voxels_do_not_divide_by_zero():
    psf = gaussian_psf((1.0, 1.0, 1.0), (1, 1, 1))
    image = np.zeros((16, 16, 16), np.float32)
    image[8, 8, 8] = 100.0
    out = richardson_lucy(image, psf, iterations=20)
    assert np.all(np.isfinite(out))
    zeros = richardson_lucy(np.zeros((16, 16, 16), np.float32), psf, iterations=3)
    assert np.all(zeros == 0)


def test_otf_computed_once_per_block_shape(noisy_volume):
    image, psf = noisy_volume
    clear_otf_cache()
    richardson_lucy(image, psf, iterations=2)
    assert len(rl._otf_cache) == 1
    richardson_lucy(image + 1, psf, iterations=2)  # same shape and PSF: cache hit
    assert len(rl._otf_cache) == 1
    richardson_lucy(image[:30], psf, iterations=2)  # another padded shape
    assert len(rl._otf_cache) == 2


def test_deconvolve_stage_leaves_no_otfs_on_its_workers(noisy_volume):
    """The stage's workers drop the cache when it ends, failed or not: the next stage
    does not start with the PSF's transforms in memory."""
    from distributed import Client, LocalCluster

    from tasks.deconvolve import _otfs_dropped

    image, psf = noisy_volume
    clear_otf_cache()
    with (
        LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        with _otfs_dropped(client):
            client.submit(richardson_lucy, image, psf, iterations=1).result(timeout=60)
            assert len(rl._otf_cache) == 1  # an in-process worker: its cache is ours
        assert len(rl._otf_cache) == 0
        with pytest.raises(ValueError, match="failed"), _otfs_dropped(client):
            richardson_lucy(image, psf, iterations=1)
            raise ValueError("the stage failed")
        assert len(rl._otf_cache) == 0


# --------------------------------------------------------------------------- phantom


def test_deconvolution_recovers_the_phantom(phantom):
    truth, image, psf = phantom
    out = richardson_lucy(image, psf, iterations=20)
    raw_err, dec_err = _nrmse(image, truth), _nrmse(out, truth)
    assert dec_err * PHANTOM_GAIN < raw_err, (raw_err, dec_err)


def test_acceleration_reaches_20_plain_iterations_in_10(phantom):
    truth, image, psf = phantom
    plain20 = _nrmse(richardson_lucy(image, psf, iterations=20), truth)
    plain10 = _nrmse(richardson_lucy(image, psf, iterations=10), truth)
    fast10 = _nrmse(richardson_lucy(image, psf, iterations=10, acceleration=True), truth)
    assert fast10 <= plain20 < plain10, (fast10, plain20, plain10)


# --------------------------------------------------------------------------- dask level


@pytest.mark.parametrize("iterations", [4, 10])
def test_chunked_equals_whole_volume(noisy_volume, iterations):
    image, psf = noisy_volume
    depth = default_depth(psf.shape, iterations)
    whole = richardson_lucy(image, psf, iterations=iterations, pad_width=depth)
    lazy = deconvolve(
        da.from_array(image, chunks=((9, 14, 13), (20, 17, 13), (44,))),
        psf,
        iterations=iterations,
    )
    assert lazy.dtype == np.float32 and lazy.shape == image.shape
    out = lazy.compute()
    m = tuple(s // 2 for s in psf.shape)  # away from the volume's edges
    inner = tuple(slice(mi, -mi) for mi in m)
    assert _max_rel(out[inner], whole[inner]) < CHUNKED_RTOL
    # the mirrored volume edges match too, since both sides reflect the same way
    assert _max_rel(out, whole) < CHUNKED_RTOL


def test_chunked_half_size_depth_is_only_approximate(noisy_volume):
    # documents why the default halo is deeper than the PSF's half-size
    image, psf = noisy_volume
    half = tuple(s // 2 for s in psf.shape)
    whole = richardson_lucy(image, psf, iterations=10, pad_width=half)
    out = deconvolve(da.from_array(image, chunks=12), psf, iterations=10, depth=half)
    assert CHUNKED_RTOL < _max_rel(out.compute(), whole) < 0.1


def test_chunked_with_a_background_equals_whole_volume(noisy_volume):
    image, psf = noisy_volume
    image = image + np.float32(100)
    depth = default_depth(psf.shape, 10)
    whole = richardson_lucy(image, psf, iterations=10, pad_width=depth, background=100)
    out = deconvolve(da.from_array(image, chunks=(12, 25, 44)), psf, iterations=10, background=100)
    assert _max_rel(out.compute(), whole) < CHUNKED_RTOL


def test_chunked_accelerated_is_close_to_whole_volume(noisy_volume):
    image, psf = noisy_volume
    depth = default_depth(psf.shape, 8)
    whole = richardson_lucy(image, psf, iterations=8, acceleration=True, pad_width=depth)
    out = deconvolve(da.from_array(image, chunks=18), psf, iterations=8, acceleration=True)
    # the extrapolation step is estimated per block: close, not equal
    assert _max_rel(out.compute(), whole) < 0.05


def test_deconvolve_is_lazy_and_streams():
    def boom(block):
        raise AssertionError("computed too early")

    image = da.zeros((64, 64, 64), chunks=32, dtype=np.uint16).map_blocks(boom, dtype=np.uint16)
    psf = gaussian_psf((1.0, 1.0, 1.0), (1, 1, 1))
    out = deconvolve(image, psf, iterations=3)
    assert out.chunks == image.chunks
    # each output chunk depends on its own block and its neighbours only
    tasks_8 = len(out.__dask_graph__())
    bigger = da.zeros((128, 64, 64), chunks=32, dtype=np.uint16).map_blocks(boom, dtype=np.uint16)
    tasks_16 = len(deconvolve(bigger, psf, iterations=3).__dask_graph__())
    assert tasks_16 < 2.2 * tasks_8


@pytest.mark.parametrize("iterations", [3, 10])
def test_stored_volume_equals_dask_chunks(noisy_volume, iterations):
    # halos read from the store per block give the same result as halos taken from the
    # neighbouring dask chunks, with uneven last blocks and blocks of several stored chunks
    image, psf = noisy_volume
    store = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(9, 13, 11))
    from_dask = deconvolve(da.from_array(image, chunks=(18, 26, 22)), psf, iterations=iterations)
    from_store = deconvolve(store, psf, iterations=iterations, chunks=(18, 26, 22))
    assert from_store.chunks == from_dask.chunks
    np.testing.assert_allclose(from_store.compute(), from_dask.compute(), rtol=0, atol=1e-3)
    # default blocks are whole stored chunks
    auto = deconvolve(store, psf, iterations=iterations)
    for blocks, chunk in zip(auto.chunks, store.chunks, strict=True):
        assert all(b % chunk == 0 for b in blocks[:-1])


def test_stored_blocks_read_only_their_region():
    # every block is one task with no dependencies: nothing waits for a neighbour
    psf = gaussian_psf((1.0, 1.0, 1.0), (1, 1, 1))
    store = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(64, 64, 96), chunks=(16, 16, 16), dtype="uint16"
    )
    out = deconvolve(store, psf, iterations=2, chunks=(32, 32, 32))
    graph = dict(out.__dask_graph__())
    blocks = [k for k in graph if isinstance(k, tuple)]
    # + the store and the kernel with its PSF, once each
    assert len(blocks) == 2 * 2 * 3 and len(graph) == len(blocks) + 2


@pytest.mark.parametrize(
    ("shape", "chunks", "depth"),
    [((250, 1000, 1000), (125, 250, 250), (13, 8, 8)), ((97, 300, 200), (32, 64, 64), (5, 3, 3))],
)
def test_choose_blocks_are_whole_chunks_within_budget(shape, chunks, depth):
    target = 64 << 20
    blocks = choose_blocks(shape, chunks, depth, target_bytes=target)
    for b, c, s in zip(blocks, chunks, shape, strict=True):
        assert b == s or b % c == 0
    padded = np.prod([next_fast_size(b + 2 * d) for b, d in zip(blocks, depth, strict=True)])
    assert padded * 4 <= target or blocks == tuple(chunks)


def test_auto_chunks_are_fft_friendly():
    psf = gaussian_psf((2.0, 1.0, 1.0), (1, 1, 1))
    image = da.ones((50, 300, 260), chunks=(50, 100, 100), dtype=np.float32)
    out = deconvolve(image, psf, iterations=4, chunks="auto")
    depth = default_depth(psf.shape, 4)
    for ax, chunks in enumerate(out.chunks):
        if len(chunks) > 1:
            padded = chunks[0] + 2 * depth[ax]
            assert padded == next_fast_size(padded)
    np.testing.assert_allclose(out[20:30, 100:110, 100:110].compute(), 1.0, rtol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_numpy_blocks_run_on_the_gpu_and_come_back(noisy_volume):
    import cupy

    image, psf = noisy_volume
    cpu = deconvolve(da.from_array(image, chunks=20), psf, iterations=5, gpu=False).compute()
    cupy.fft.config.get_plan_cache().clear()
    gpu = deconvolve(da.from_array(image, chunks=20), psf, iterations=5, gpu=True).compute()
    assert isinstance(gpu, np.ndarray)
    assert _max_rel(gpu, cpu) < KERNEL_RTOL
    # cuFFT plans are reused: a handful of block shapes, not one plan per FFT call
    assert 0 < cupy.fft.config.get_plan_cache().get_curr_size() <= 16


@pytest.mark.gpu
@requires_cuda
def test_cupy_backed_dask_array_stays_on_the_gpu(noisy_volume):
    import cupy

    image, psf = noisy_volume
    out = deconvolve(da.from_array(cupy.asarray(image), chunks=20), psf, iterations=3)
    assert isinstance(out._meta, cupy.ndarray)
    assert isinstance(out.compute(), cupy.ndarray)


# --------------------------------------------------------------------------- bad input


def _volume():
    return da.ones((20, 20, 20), chunks=10, dtype=np.float32)


def _unusable():
    # errors must come before any compute: the image cannot be computed at all
    def boom(block):
        raise AssertionError("computed before validating")

    return _volume().map_blocks(boom, dtype=np.float32)


@pytest.mark.parametrize(
    ("psf", "match"),
    [
        (np.zeros((5, 5, 5)), "sums to 0"),
        (-gaussian_psf((1, 1, 1), (1, 1, 1)), "negative"),
        (np.full((5, 5, 5), np.nan), "NaN"),
        (np.ones((5, 5)), "3-D"),
        (np.ones((25, 3, 1)), r"larger than the .*\(20, 20, 20\) along z"),
    ],
)
def test_bad_psf_is_rejected_before_compute(psf, match):
    with pytest.raises(PSFError, match=match):
        deconvolve(_unusable(), psf, iterations=3)
    with pytest.raises(PSFError, match=match):
        richardson_lucy(np.ones((20, 20, 20), np.float32), psf, iterations=3, pad_width=0)


@pytest.mark.parametrize(
    ("keyword", "value", "match"),
    [("iterations", v, "iterations") for v in (0, -2, 2.5, True, "10")]
    + [("background", v, "background: got") for v in (-1, float("nan"), float("inf"), "100", True)],
)
def test_bad_arguments_are_rejected(keyword, value, match):
    psf = gaussian_psf((1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match=match):
        deconvolve(_unusable(), psf, **{keyword: value})
    with pytest.raises(ValueError, match=match):
        richardson_lucy(np.ones((8, 8, 8)), psf, **{keyword: value})


def test_depth_below_half_size_is_rejected():
    psf = gaussian_psf((2.0, 1.0, 1.0), (1, 1, 1))
    with pytest.raises(ValueError, match="half-size"):
        deconvolve(_unusable(), psf, iterations=3, depth=(2, 3, 3))


@pytest.mark.parametrize(
    ("value", "match"), [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")]
)
def test_bad_image_values_are_rejected(value, match):
    psf = gaussian_psf((1, 1, 1), (1, 1, 1))
    image = np.ones((20, 20, 20), np.float32)
    image[15, 3, 4] = value
    with pytest.raises(ImageError, match=rf"{match}.*\(15, 3, 4\)"):
        richardson_lucy(image, psf, iterations=2)
    # lazily: the block holding it (or a neighbour, in its halo) names the voxel in volume
    # coordinates, before any FFT runs; from dask chunks and from a store alike
    store = zarr.create_array(zarr.storage.MemoryStore(), data=image, chunks=(10, 10, 10))
    for source in (da.from_array(image, chunks=10), store):
        lazy = deconvolve(source, psf, iterations=2)
        with pytest.raises(ImageError, match=rf"{match}.*\(15, 3, 4\) \(.*block \(\d, \d, \d\)\)"):
            lazy.compute()


def test_bad_values_of_a_stored_image_name_its_file_and_channel(tmp_path):
    """Data with a background subtracted in floating point holds negative values, which
    Richardson–Lucy cannot take: the error names the image, time point and channel (the
    pipeline's ``raw.ome.zarr``), the voxel, and what to do."""
    from lightsheet.deconvolve import deconvolve_volumes
    from lightsheet.io.omezarr import stored_volume, write_image

    image = np.ones((1, 2, 20, 20, 20), np.float32)
    image[0, 1, 15, 3, 4] = -5.0
    path = tmp_path / "raw.ome.zarr"
    write_image(da.from_array(image), path, voxel_size_um=(1.0, 1.0, 1.0), name="raw")
    volumes = [[stored_volume(path, 0, c) for c in range(2)]]
    result, _ = deconvolve_volumes(volumes, gaussian_psf((1, 1, 1), (1, 1, 1)), iterations=2)
    expected = r"raw.ome.zarr.*time point 0, channel 1: contains negative .*\(15, 3, 4\)"
    with pytest.raises(ImageError, match=expected + ".*deconvolve.channels"):
        result.compute()
    # the channel left undeconvolved passes through
    result, _ = deconvolve_volumes(volumes, gaussian_psf((1, 1, 1), (1, 1, 1)), channels=[0])
    assert result[0, 1, 15, 3, 4].compute() == -5.0


def test_bad_image_shapes_are_rejected():
    psf = gaussian_psf((1, 1, 1), (1, 1, 1))
    with pytest.raises(ImageError, match="3-D"):
        deconvolve(da.ones((20, 20), chunks=10), psf)
    with pytest.raises(ImageError, match="dask"):
        deconvolve(np.ones((20, 20, 20)), psf)
    with pytest.raises(ImageError, match="3-D"):
        richardson_lucy(np.ones((20, 20)), psf)
    with pytest.raises(ImageError, match="dtype"):
        deconvolve(da.ones((20, 20, 20), chunks=10, dtype=complex), psf)


# --------------------------------------------------------------------------- sizes


def _is_smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


@settings(deadline=None)
@given(st.integers(1, 5000))
def test_next_fast_size_is_the_smallest_smooth_size(n):
    m = next_fast_size(n)
    assert m >= n and _is_smooth(m)
    assert not any(_is_smooth(k) for k in range(n, m))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 700), st.integers(1, 3000), st.integers(1, 3000)),
    half=st.tuples(st.integers(0, 20), st.integers(0, 12), st.integers(0, 12)),
    target_mib=st.sampled_from([16, 64, 256]),
)
def test_choose_chunks_gives_fast_blocks_within_budget(shape, half, target_mib):
    psf_shape = tuple(2 * h + 1 for h in half)
    depth = default_depth(psf_shape, 10)
    chunks = choose_chunks(shape, psf_shape, target_bytes=target_mib << 20, iterations=10)
    for c, s, d in zip(chunks, shape, depth, strict=True):
        assert 1 <= c <= s
        if c < s:  # split axes: full blocks already have a fast FFT size
            assert _is_smooth(c + 2 * d)
    padded = np.prod([c + 2 * d for c, d in zip(chunks, depth, strict=True)])
    # within budget, unless an axis is already at the smallest chunk its halo allows
    at_minimum = any(c == max(1, d) < s for c, s, d in zip(chunks, shape, depth, strict=True))
    assert padded * 4 <= target_mib << 20 or at_minimum


def test_choose_chunks_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape_zyx"):
        choose_chunks((0, 10, 10), (3, 3, 3))
    with pytest.raises(ValueError, match="shape_zyx"):
        choose_chunks((10, 10), (3, 3, 3))


def test_each_channel_deconvolved_with_its_own_psf(tmp_path):
    """A mapping of channel to PSF: each channel as deconvolved alone with its own, at the
    halo of the widest, so every channel is cut into the same blocks."""
    from lightsheet.blocks import default_depth
    from lightsheet.deconvolve import deconvolve_volumes
    from lightsheet.errors import ConfigError
    from lightsheet.io.omezarr import stored_volume, write_image

    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, (1, 2, 24, 40, 40)).astype(np.float32)
    path = tmp_path / "raw.ome.zarr"
    write_image(da.from_array(image, chunks=(1, 1, 12, 20, 20)), path, voxel_size_um=(1, 1, 1))
    volumes = [[stored_volume(path, 0, c) for c in range(2)]]
    narrow, wide = gaussian_psf((1, 1, 1), (1, 1, 1)), gaussian_psf((3, 2, 2), (1, 1, 1))
    result, _ = deconvolve_volumes(volumes, {0: narrow, 1: wide}, iterations=3)
    depth = default_depth(wide.shape, 3)
    for channel, psf in ((0, narrow), (1, wide)):
        alone = deconvolve(volumes[0][channel], psf, iterations=3, depth=depth).compute()
        np.testing.assert_allclose(result[0, channel].compute(), alone, rtol=1e-5)
    assert result.chunks[2:] == deconvolve(volumes[0][1], wide, iterations=3).chunks
    # the narrow PSF's own halo gives (nearly) the same: the wider halo costs only time
    own = deconvolve(volumes[0][0], narrow, iterations=3).compute()
    np.testing.assert_allclose(result[0, 0].compute(), own, rtol=2e-3)
    with pytest.raises(ConfigError, match=r"no PSF for channel\(s\) \[1\]"):
        deconvolve_volumes(volumes, {0: narrow}, iterations=3)
    # a channel passed through needs none
    passed, _ = deconvolve_volumes(volumes, {0: narrow}, channels=[0], iterations=3)
    np.testing.assert_array_equal(passed[0, 1].compute(), image[0, 1])
