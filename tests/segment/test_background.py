"""The local method's background (`lightsheet.segment.background`) against SciPy on the whole
array, and cells at a step in it."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from benchmarks import packing
from benchmarks.edge_centroid import VOXEL_UM, cells_beside_edge, step_volume
from benchmarks.real_data import coarser
from lightsheet.config import SegmentConfig
from lightsheet.evaluate import match_points
from lightsheet.regions import block_regions
from lightsheet.segment import background, segment_volume
from lightsheet.segment.background import (
    BACKGROUND_WINDOW_BINS,
    NOISE_WINDOW_BINS,
    Kept,
    LocalGeometry,
    _bin_spread,
    _nbins,
    _padded,
    gain_of,
    noise_calibration,
    plane_statistics,
    smooth,
    statistics_grid,
    stored_bins,
    stored_statistics,
)
from lightsheet.segment.local import _channel_parts, _core


def _binned(a, bins, stat):
    z, y, x = a.shape
    out = np.empty((z, -(-y // bins[1]), -(-x // bins[2])), np.float32)
    for j in range(out.shape[1]):
        for i in range(out.shape[2]):
            cell = a[:, j * bins[1] : (j + 1) * bins[1], i * bins[2] : (i + 1) * bins[2]]
            out[:, j, i] = stat(cell.reshape(z, -1))
    return out


def _mad(v):
    return 1.4826 * np.median(np.abs(v - np.median(v, axis=-1)[:, None]), axis=-1)


def _interpolated(bins, shape, size):
    """Linear between bin centres, constant beyond the first and last."""
    out = bins
    for axis in (1, 2):
        centres = (np.arange(bins.shape[axis]) + 0.5) * size[axis] - 0.5
        out = np.apply_along_axis(
            lambda v, c=centres, n=shape[axis]: np.interp(np.arange(n), c, v), axis, out
        )
    return out


def _reference(image, geometry, quantum=None):
    """``B`` and ``z`` of the whole array, written from the module's description."""
    s = ndi.gaussian_filter(image.astype(np.float32), geometry.sigma_vox, truncate=4.0)
    opened = ndi.grey_opening(s, size=geometry.open_vox)

    def median(v):
        return np.median(v, axis=-1)

    def windowed(bins, w):
        return ndi.median_filter(bins, size=(1, w, w), mode="nearest")

    offset = windowed(_binned(s - opened, geometry.bin_vox, median), BACKGROUND_WINDOW_BINS)
    # the spread, at most NOISE_CAP x the pixel noise's (the residual of a 3 x 3 mean, taken
    # to I_s by the Gaussian's L2 norm, one axis at a time, and the bins' sampling biases)
    residual = image.astype(np.float32) - ndi.uniform_filter(image.astype(np.float32), (1, 3, 3))
    norm = 1.0
    for sigma in geometry.sigma_vox:
        impulse = np.zeros(2 * int(4.0 * sigma + 0.5) + 1)
        impulse[impulse.size // 2] = 1.0
        norm *= np.sqrt((ndi.gaussian_filter1d(impulse, sigma, truncate=4.0) ** 2).sum())
    sigma, bins = geometry.sigma_vox[1:], geometry.bin_vox[1:]
    bias = _bin_spread(sigma, bins) / _bin_spread(sigma, bins, residual=True)
    cap = background.NOISE_CAP * _binned(residual, geometry.bin_vox, _mad) * norm * bias
    spread = _binned(s, geometry.bin_vox, _mad)
    capped = np.where(cap > 0, np.minimum(spread, cap), spread)
    if quantum:  # and at least the rounding noise of the recorded steps (before calibration)
        capped = np.maximum(capped, quantum / np.sqrt(12) * norm / noise_calibration(geometry))

    # bins where more than half the voxels share one value (clipped or coarsely quantized)
    # take their plane's median over the other bins
    def one_value(v):
        return 2 * (v == np.median(v, -1)[:, None]).sum(-1) > v.shape[-1]

    censored = _binned(image, geometry.bin_vox, one_value).astype(bool)
    for plane, bad in zip(capped, censored, strict=True):
        plane[bad] = np.median(plane[~bad])
    noise = windowed(capped, NOISE_WINDOW_BINS)
    noise *= noise_calibration(geometry)
    b = opened + _interpolated(offset, s.shape, geometry.bin_vox)
    return b, (s - b) / _interpolated(noise, s.shape, geometry.bin_vox)


@pytest.mark.parametrize(
    "cap, floor, quantum", [(None, None, None), (1.0, None, None), (None, 110.0, None),
                            (None, None, 200.0)]
)  # fmt: skip
@pytest.mark.parametrize("chunks", [(6, 70, 90), (3, 30, 40), (2, 17, 23), (6, 9, 90)])
def test_background_and_significance_equal_whole_array_scipy(
    chunks, cap, floor, quantum, monkeypatch
):
    """Blockwise ``B`` and ``z`` are the whole array's, at any blocks (the halo covers the
    smoothing, the opening and the pixel noise's 3 × 3 mean; the bins are whole in every
    block). ``cap`` 1: the pixel noise caps the spread in some bins, not in others. ``floor``:
    the image clipped there, which censors most bins of the dark side. ``quantum``: values
    recorded in steps whose rounding noise is the least noise, more than the spread in some
    bins (the dark side's)."""
    if cap is not None:
        monkeypatch.setattr(background, "NOISE_CAP", cap)
    diameter = 8.0
    shape = (6, 70, 90)
    cells = [(6.0, 20.0, 30.0), (4.0, 50.0, 52.0), (8.0, 35.0, 70.0)]
    image = step_volume(
        shape, edge_x=55, edge_um=1.0, cells_um=cells, diameter_um=diameter, noise=60.0
    )
    geometry = LocalGeometry.of(VOXEL_UM, diameter, quantum)
    if floor is not None:
        image = np.maximum(image, np.float32(floor))
        assert 0.2 < background._censored(image, geometry.bin_vox).mean() < 0.5
    b_ref, z_ref = _reference(image, geometry, quantum)
    dimage = da.from_array(image, chunks=chunks)
    grid = dimage.chunks
    regions = block_regions(grid, tuple(d + 1 for d in geometry.halo))
    stats = plane_statistics(dimage, geometry, chunks=grid)
    parts = _channel_parts(_padded(dimage, regions), geometry, stats, regions, True)
    (computed,) = dask.compute(parts)
    for idx, r in regions.items():
        core = tuple(slice(a, b) for a, b in zip(r.start, r.stop, strict=True))
        np.testing.assert_allclose(_core(computed[idx]["B"], r), b_ref[core], rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(_core(computed[idx]["z"], r), z_ref[core], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("pixel_um", [0.5, 2.0, 6.0])
def test_pixel_noise_is_the_spread_of_pure_noise(pixel_um):
    """On white noise (Poisson, 400 photons), `pixel_noise` per bin is the bins' own spread
    of ``I_s`` (what the noise ``S`` is made of), at fine and coarse pixels (bins of 28 down
    to 2 voxels a side): both estimate the same thing (0.95–0.96 of it here), so the cap
    binds only where something else raises the spread. Without the bins' sampling bias of
    the residual it was 0.70 at 6 µm."""
    rng = np.random.default_rng(5)
    image = rng.poisson(400.0, (8, 256, 256)).astype(np.float32)
    geometry = LocalGeometry.of((5.0, pixel_um, pixel_um), 14.0)
    region = block_regions(tuple((n,) for n in image.shape), geometry.halo)[(0, 0, 0)]
    pixel = background.pixel_noise(image, region, geometry)
    spread = _binned(smooth(image, geometry), geometry.bin_vox, _mad)
    ratio = np.median(pixel) / np.median(spread)
    assert 0.92 < ratio < 1.08, ratio


def test_a_dark_outside_below_one_step_holds_no_cells():
    """8-bit tiles (a camera's 100 ADU offset and 1.5 ADU read noise, saved divided by 16):
    the dark outside reads 6 but for 0.4 % of its voxels at 7. Deconvolved (float32), it is
    6 ± 10⁻³ with a spike at each 7, and the spread there, near 0, made each spike a cell
    (50 of them beside the 10 somata). The noise is at least the rounding noise of the
    recorded steps (``quantum`` 1, which the deconvolve stage passes on): the 10 somata, and
    nothing outside. The undeconvolved integers need no quantum: most of a bin reads one
    value (`background._censored`)."""
    from lightsheet.deconvolve import deconvolve
    from lightsheet.psf import gaussian_psf

    rng = np.random.default_rng(3)
    shape, diameter, sigma_um = (16, 96, 160), 8.0, (2.0, 0.6, 0.6)
    cells = np.c_[rng.uniform(6, 26, 10), rng.uniform(8, 88, 10), rng.uniform(8, 72, 10)]
    grid = np.indices(shape, dtype=np.float32) * np.reshape(VOXEL_UM, (3, 1, 1, 1))
    light = np.broadcast_to(np.where(np.arange(shape[2]) < 80, 200.0, 0.0), shape).copy()
    for c in cells:  # tissue on the left half, the dark outside on the right
        r2 = sum((grid[a] - c[a]) ** 2 for a in range(3))
        light += 300 * np.exp(-r2 / (2 * (diameter / 4) ** 2))
    light = ndi.gaussian_filter(light, np.divide(sigma_um, VOXEL_UM))
    raw = rng.poisson(light) + 100 + rng.normal(0, 1.5, shape)
    tiles = np.rint(raw / 16).astype(np.uint8)
    assert 0.001 < np.mean(tiles[:, :, 100:] != 6) < 0.01
    psf = gaussian_psf(sigma_um, VOXEL_UM)
    deconvolved = deconvolve(da.from_array(tiles, chunks=(16, 48, 80)), psf).compute()

    def found(image, quantum):
        config = SegmentConfig(nucleus_diameter_um=diameter)
        image = da.from_array(image, chunks=(16, 48, 80))
        result = segment_volume(image, voxel_size_um=VOXEL_UM, config=config, quantum=quantum)
        return result.table[["z_um", "y_um", "x_um"]].to_numpy()

    for image, quantum in [(deconvolved, 1.0), (tiles, None)]:
        f = found(image, quantum)
        assert match_points(f, cells, max_distance_um=diameter / 2).tp == len(f) == 10
    assert len(found(deconvolved, None)) > 20  # without the floor: the outside's spikes


def test_crowded_nuclei_keep_the_noise_of_the_image():
    """Nuclei filling 10 % of the volume, blurred along z by σ 5 µm (a nuclear stain in a
    granule layer, undeconvolved; `benchmarks/packing.py`): the cells' own contrast raised
    the spread of every bin to 42 times the image's noise, and 72 % of them fell under
    ``min_peak_sd`` (recall 0.28, F1 0.43). Capped by the pixel noise (which the cells'
    shot noise raises a little): about 10 times the noise, recall 0.73, F1 0.83."""
    score = packing.run(0.10, 5.0)
    assert score["noise_estimate_over_true"] <= 12, score
    assert score["f1"] >= 0.8 and score["precision"] >= 0.95, score


def test_noise_is_the_same_estimate_at_any_pixel_size():
    """White noise, imaged with camera pixels of 2–10 µm (bins of 7 voxels down to 2):
    ``S`` over the smoothed noise's SD is the same at every pixel size (0.82–0.84).
    Uncalibrated it was 0.82–0.86 at 2–4 µm and 0.66–0.71 at 6–10 µm (bins of 2 × 2), and
    0 at 10 µm while a bin could be one voxel."""
    rng = np.random.default_rng(3)
    fine = rng.normal(1000.0, 50.0, (6, 240, 240)).astype(np.float32)
    ratios = []
    for k in (1, 2, 3, 4, 5):
        image = coarser(fine, 1, k)
        geometry = LocalGeometry.of((5.0, 2.0 * k, 2.0 * k), 14.0)
        assert min(geometry.bin_vox[1:]) >= 2
        grid = tuple((n,) for n in image.shape)
        _, noise, _ = plane_statistics(da.from_array(image), geometry, chunks=grid)
        ratios.append(float(np.median(noise.compute()) / smooth(image, geometry)[1:-1].std()))
    assert max(ratios) / min(ratios) < 1.08, np.round(ratios, 3)


@pytest.mark.parametrize("edge_um", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("side", ["bright", "dim"])
def test_cells_next_to_a_sharp_step(edge_um, side):
    """Cells 4–8 µm from a step in the background are found, and the step is no cell.

    ``bright``: inside tissue (1000) next to the dark outside (100). A background
    interpolated between bin medians fell inside the tissue before a sharp edge; the tissue
    then stood out as a ridge that swallowed the cells beside it (0 of 5 found at an edge of
    1 µm scale, `benchmarks/edge_centroid.py`). ``dim``: in dim tissue (400) next to bright
    (1000), where that background stood too high (1 of 5 found at 1 µm; at 3 µm 17 objects
    along the step). The opening follows the step on both sides.
    """
    diameter, shape = 12.0, (24, 96, 160)
    edge_x, direction, levels, amplitude, noise = (
        (100, -1, (1000, 100), 600, 60.0) if side == "bright" else (60, 1, (1000, 400), 300, 30.0)
    )
    cells = cells_beside_edge(edge_x, direction)
    image = step_volume(
        shape,
        edge_x=edge_x,
        edge_um=edge_um,
        cells_um=cells,
        diameter_um=diameter,
        noise=noise,
        levels=levels,
        amplitude=amplitude,
    )
    _exactly_these_cells(image, cells, diameter, chunks=(24, 48, 64))


def _exactly_these_cells(image, cells, diameter, *, chunks):
    """The defaults find ``cells`` and nothing else: (detections, one-to-one match)."""
    result = segment_volume(
        da.from_array(image, chunks=chunks),
        voxel_size_um=VOXEL_UM,
        config=SegmentConfig(nucleus_diameter_um=diameter),
    )
    found = result.table[["z_um", "y_um", "x_um"]].to_numpy()
    score = match_points(found, np.array(cells), max_distance_um=diameter / 2)
    assert (score.tp, result.n) == (len(cells), len(cells)), (score, result.n)
    return found, score


def _five_cells(diameter, *, stretch_z=1.0):
    """Five Gaussian cells (600, σ a quarter of the diameter, ``stretch_z`` × that along z)
    in the middle of 24 × 96 × 96 voxels of background 1000, no noise: (image, centres µm)."""
    shape = (24, 96, 96)
    grid = np.indices(shape, dtype=np.float32) * np.reshape(VOXEL_UM, (3, 1, 1, 1))
    cells = [(23.0, y, x) for y, x in ((20, 20), (20, 70), (48, 45), (75, 20), (75, 70))]
    sigma = np.array([stretch_z, 1.0, 1.0]) * diameter / 4
    image = np.full(shape, 1000.0, np.float32)
    for c in cells:
        image += 600 * np.exp(-sum(((grid[a] - c[a]) / sigma[a]) ** 2 for a in range(3)) / 2)
    return image, cells


def test_centre_follows_the_cell_not_the_noise_of_its_planes():
    """A cell whose planes differ in noise is centred on its light, not on its significance.

    The noise ``S`` is measured over nine diameters of each plane, so where that window
    reaches the dark outside (the planes near a brain's surface) it changes from one plane
    to the next across a cell. Significance-weighted centres moved towards the quieter
    planes: 1–2 µm outwards near the realistic sample's surface, which carried its thin
    outer layer's cells across a region boundary. Here five cells sit on a flat background
    whose noise SD is 60 in the planes before their middle (z < 23 µm) and 15 from it on.
    """
    diameter = 12.0
    image, cells = _five_cells(diameter)
    shape, rng = image.shape, np.random.default_rng(0)
    sd = np.where(np.arange(shape[0]) * VOXEL_UM[0] < 23.0, 60.0, 15.0)[:, None, None]
    image += rng.normal(0, 1, shape).astype(np.float32) * sd.astype(np.float32)
    found, score = _exactly_these_cells(image, cells, diameter, chunks=(12, 48, 48))
    offsets = found[score.pairs[:, 0]] - np.array(cells)[score.pairs[:, 1]]
    # significance (before 2026-12-05): +2.9 µm along z, towards the quiet planes
    assert abs(offsets[:, 0].mean()) < 0.3, offsets


GRID = ((5, 5, 2), (45, 45), (60, 60))


def _gained_image(shape=(12, 90, 120)):
    """Textured tissue over a growing part of each plane, each plane scaled by its gain."""
    geometry = LocalGeometry.of(VOXEL_UM, 8.0)
    rng = np.random.default_rng(1)
    true = 1.0 + 0.04 * np.arange(shape[0])
    true[7:] *= 1.5
    edge = np.linspace(30, 90, shape[0]).astype(int)
    image = rng.normal(0.0, 5.0, shape)
    for z in range(shape[0]):
        tissue = 1000 + 80 * ndi.gaussian_filter(rng.normal(size=shape[1:]), 3)
        image[z, :, : edge[z]] += tissue[:, : edge[z]]
    return (image * true[:, None, None]).astype(np.float32), true, geometry


@pytest.mark.parametrize("planes", [1, 5, None])
def test_stored_statistics_equal_the_lazy_ones(planes, tmp_path, monkeypatch):
    """The scratch's two passes (bins per block, then whole planes a few at a time) give
    `plane_statistics`' offset, noise and gain bit for bit, whatever the planes per task."""
    image, _, geometry = _gained_image()
    if planes is not None:  # else all 12 planes in one task
        _, ny, nx = _nbins(image.shape, geometry)
        monkeypatch.setattr(background, "SLAB_BYTES", planes * 4 * ny * nx * 4)
    keep = Kept(str(tmp_path / "s.zarr"), str(tmp_path / "o.zarr"))
    step = tuple(c[0] for c in statistics_grid(GRID, geometry))
    keep.create(image.shape, step)
    bins, offset, noise = (tmp_path / f"{n}.zarr" for n in ("bins", "offset", "noise"))
    dask.compute(stored_bins(image, geometry, chunks=GRID, keep=keep, path=bins))
    tasks = stored_statistics(bins, geometry, offset=offset, noise=noise)
    assert len(tasks) == -(-12 // (planes or 12))
    (steps,) = dask.compute(tasks)
    lazy = dask.compute(*plane_statistics(da.from_array(image, chunks=GRID), geometry, chunks=GRID))
    stored = [zarr.open_array(str(p))[:] for p in (offset, noise)] + [gain_of(steps)]
    for got, want in zip(stored, lazy, strict=True):
        np.testing.assert_array_equal(got, want)


def test_plane_gain_follows_the_planes_not_the_tissue():
    """Each plane's gain, against the gains that made the image (smoothed along z as
    ``I_s`` is, whose levels it compares).

    Tissue (1000, textured) covers a part of every plane that grows from a quarter to three
    quarters; the rest is a subtracted background (0), whose level is within its noise of
    zero and holds no gain. Every plane is then scaled by its own gain (a ramp with a step).
    """
    image, true, geometry = _gained_image()
    *_, gain = plane_statistics(da.from_array(image, chunks=(5, 45, 60)), geometry, chunks=GRID)
    expected = ndi.gaussian_filter1d(true, geometry.sigma_vox[0], truncate=4.0)
    gain = gain.compute()
    assert gain[0] == 1.0
    # what a cell sees is the step from one plane to the next (the chain's product drifts)
    np.testing.assert_allclose(gain[1:] / gain[:-1], expected[1:] / expected[:-1], rtol=0.015)


def test_centre_ignores_a_gain_ramp_across_planes():
    """Tall cells in planes whose gain doubles across the stack are centred where they are.

    The contrast ``I_s − B`` of a cell grows with its planes' gain (a light sheet's power,
    bleaching), and weighted by it the centre of a cell that the axial PSF stretches over
    many planes moved towards the brighter ones (the cellfinder crop brightens by 60 %
    across each group of ten planes); the gain of each plane divides it out.
    """
    diameter = 12.0
    image, cells = _five_cells(diameter, stretch_z=2.0)  # twice as tall as wide
    image += np.random.default_rng(0).normal(0, 30, image.shape).astype(np.float32)
    image *= np.linspace(0.7, 1.6, image.shape[0], dtype=np.float32)[:, None, None]
    found, score = _exactly_these_cells(image, cells, diameter, chunks=(12, 48, 48))
    offsets = found[score.pairs[:, 0]] - np.array(cells)[score.pairs[:, 1]]
    # weighted by I_s − B without the gain: +0.6 µm along z; with it: −0.14
    assert abs(offsets[:, 0].mean()) < 0.3, offsets
