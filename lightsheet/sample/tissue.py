"""Somata planted at known places into a real tissue background.

A real autofluorescence channel (`tests/data/cellfinder-crop/ch1`, or any crop a user has)
carries what the phantom lacks: a level that varies several-fold across the tissue, dark
margins, stripes and bright non-cell structures. Planting cells of known size, place and
contrast into it gives a ground truth on real background (issue #20's acceptance), measured
in units of the *local* noise, which is what a detector has to beat.

The crop is held in memory: this is a generator for test and benchmark crops (tens of MB),
not a stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

__all__ = ["local_noise_sd", "plant_cells", "second_exposure"]


def local_noise_sd(volume: np.ndarray, window: int) -> np.ndarray:
    """Robust per-plane noise SD around each pixel, ``(Z, Y, X)`` float32.

    The SD comes from neighbouring-pixel differences along x (white noise: ``SD(a - b) =
    √2·SD``), as 1.4826 × the median absolute difference over ``window × window`` bins of
    each plane, then bilinearly spread to every pixel. Differences ignore structure larger
    than a pixel, so tissue texture and cells barely move it.
    """
    vol = np.asarray(volume, np.float32)
    diff = np.abs(np.diff(vol, axis=2)) / np.sqrt(2.0)
    z, y, x = diff.shape
    ny, nx = max(1, y // window), max(1, x // window)
    out = np.empty(vol.shape, np.float32)
    for k in range(z):
        crop = diff[k, : ny * window, : nx * window].reshape(ny, window, nx, window)
        mad = 1.4826 * np.median(crop.transpose(0, 2, 1, 3).reshape(ny, nx, -1), axis=2)
        mad = np.maximum(mad, 1e-3)
        zoom = (vol.shape[1] / ny, vol.shape[2] / nx)
        out[k] = ndimage.zoom(mad, zoom, order=1, mode="nearest", grid_mode=True)[
            : vol.shape[1], : vol.shape[2]
        ]
    return out


def plant_cells(
    background: np.ndarray,
    voxel_size_um: Sequence[float],
    *,
    n: int = 220,
    diameter_um: tuple[float, float] = (11.0, 17.0),
    peak_sd: tuple[float, float] = (5.0, 15.0),
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """``background`` with ``n`` somata added; the image (same dtype) and its truth.

    Parameters
    ----------
    background : (Z, Y, X) ndarray
        A real channel without labelled cells (an autofluorescence channel).
    voxel_size_um : (3,) sequence of float
        Its voxel size (z, y, x) in µm.
    n : int
        Somata to plant; each lies whole inside the volume and at least 1.5 of the larger
        of two diameters from every other one, centred where the background is tissue
        (above its 20th percentile).
    diameter_um : (lo, hi)
        Diameters, uniform in this range.
    peak_sd : (lo, hi)
        Each soma's peak above the background, in units of the local noise SD
        (`local_noise_sd` over bins of two diameters), uniform in this range.
    seed : int
        Random seed.

    Returns
    -------
    image : ndarray
        ``background`` plus the somata, clipped to the dtype's range.
    truth : DataFrame
        ``z_um, y_um, x_um`` (voxel centres at ``index · voxel size``), ``diameter_um``,
        ``peak_sd``, ``peak`` (added intensity at the centre).

    Raises
    ------
    ValueError
        The volume cannot hold ``n`` such somata.
    """
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size_um, np.float64)
    bg = np.asarray(background)
    shape = np.asarray(bg.shape)
    window = max(4, int(round(2 * diameter_um[1] / vs[1:].mean())))
    noise = local_noise_sd(bg, window)
    tissue = bg > np.percentile(bg, 20)
    extent = shape * vs
    centres: list[np.ndarray] = []
    diameters: list[float] = []
    # packing bound: balls of 0.75 × the smallest diameter around the centres are disjoint
    room = np.prod(extent + 1.5 * diameter_um[0]) / (4 / 3 * np.pi * (0.75 * diameter_um[0]) ** 3)
    if n > room:
        raise ValueError(
            f"plant_cells: a volume of {tuple(extent.round(1))} µm holds at most {int(room)} "
            f"somata of {diameter_um} µm, 1.5 diameters apart; asked for n={n}"
        )
    misses = 0
    while len(centres) < n and misses < 20_000:  # 20,000 draws in a row without room: full
        misses += 1
        d = rng.uniform(*diameter_um)
        lo = np.minimum(d / 2, extent / 2)
        c = rng.uniform(lo, extent - lo)
        idx = tuple(np.minimum((c / vs).round().astype(int), shape - 1))
        if not tissue[idx]:
            continue
        if centres:
            gaps = np.linalg.norm(np.asarray(centres) - c, axis=1)
            if np.any(gaps < 1.5 * np.maximum(np.asarray(diameters), d)):
                continue
        centres.append(c)
        diameters.append(d)
        misses = 0
    if len(centres) < n:
        raise ValueError(
            f"plant_cells: room for {len(centres)} somata of {diameter_um} µm in a volume of "
            f"{tuple(extent.round(1))} µm; asked for n={n}"
        )
    out = bg.astype(np.float32)
    rows = []
    for c, d in zip(centres, diameters, strict=True):
        k = rng.uniform(*peak_sd)
        idx = tuple(np.minimum((c / vs).round().astype(int), shape - 1))
        peak = float(k * noise[idx])
        reach = np.ceil((d / 2 + 3.0) / vs).astype(int)
        centre = (c / vs).round().astype(int)
        lo = np.maximum(centre - reach, 0)
        hi = np.minimum(centre + reach + 1, shape)
        grid = np.meshgrid(*(np.arange(a, b) * s for a, b, s in zip(lo, hi, vs, strict=True)),
                           indexing="ij")  # fmt: skip
        r = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)))
        # a ball with a soft 1 µm edge, brightest at its centre (nucleus-like profile)
        profile = 0.5 * (1 - np.tanh((r - d / 2) / 1.0)) * (1 - 0.3 * (r / (d / 2)).clip(0, 1) ** 2)
        profile /= profile.max()
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        out[box] += peak * profile
        rows.append({"z_um": c[0], "y_um": c[1], "x_um": c[2], "diameter_um": d,
                     "peak_sd": k, "peak": peak})  # fmt: skip
    if np.issubdtype(bg.dtype, np.integer):
        info = np.iinfo(bg.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(bg.dtype), pd.DataFrame(rows)


def second_exposure(
    autofluorescence: np.ndarray, window: int, *, rng: np.random.Generator
) -> np.ndarray:
    """The tissue imaged again: ``autofluorescence`` plus fresh noise of its local SD.

    What a second channel of the same tissue gives a detector (the ``background_channel``)
    when only one real channel is at hand: the same structures, its own noise
    (`local_noise_sd` over ``window × window`` pixel bins, Gaussian).

    Parameters
    ----------
    autofluorescence : (Z, Y, X) ndarray
        A real channel without labelled cells.
    window : int
        Bin side (pixels) of the noise estimate.
    rng : numpy.random.Generator
        Source of the fresh noise.

    Returns
    -------
    (Z, Y, X) ndarray of float32
    """
    tissue = np.asarray(autofluorescence)
    noise = local_noise_sd(tissue, window)
    noise *= rng.standard_normal(size=tissue.shape, dtype=np.float32)
    noise += tissue
    return noise
