"""Tissue realism for the generated sample (`lightsheet sample --realistic`).

The plain phantom has a nearly flat, dark background: detection on it is easy and says
little about real tissue. The realistic phantom keeps the plain one's atlas, hierarchy and
truth definitions, and images a tissue closer to a cleared whole brain:

Autofluorescence
    Per channel, the region's anatomy level (as the plain phantom) times a texture
    ``exp(Σ aₖ·Vₖ(p))``: value noise `value_noise` at 160, 30 and 7 µm with log-amplitudes
    `TEXTURE_OCTAVES`. The coarsest octave alone moves the level several-fold across the
    brain (10th → 90th percentile about 2.5×, extremes about 6×). Every channel shares the
    same texture and bright structures: one anatomy, seen at each channel's own brightness.
A dark outside
    The tissue is multiplied by the brain's soft mask (`BrainGeometry.brain_weight`, edge
    `MASK_EDGE_UM` or half an atlas voxel), sampled on the atlas grid and interpolated; the
    outside holds only the mounting medium's faint glow.
Bright non-cell structures
    Vessel-like tubes (random walks of straight pieces, radius 2–6 µm) and debris blobs
    (3–10 µm across), at `VESSEL_LENGTH_UM_PER_MM3` and `DEBRIS_PER_MM3`. They raise the
    tissue by the same factor in every channel (vessels 0.8–2×, debris 2–8× the local
    level), so an autofluorescence channel tells them from cells.
Illumination
    The light sheet enters at x = 0 and decays along x to `SHEET_FAR_SIDE` of its power at
    the far side, times ±10 % slow waves; light-sheet stripes (shadows cast along the
    sheet) modulate it ±~20 % across y and z, varying slowly along x. Illumination
    multiplies everything the sheet excites: outside glow, tissue, structures and cells.
Cells (channel 0 only)
    ``nuclei``: the plain phantom's dense nuclei (6–12 µm, 40k–150k cells/mm³).
    ``somata``: sparse somata, 12–18 µm across, `SOMA_DENSITY_FRACTION` of each region's
    nuclear density, never overlapping (centres at least the mean of two diameters apart).
    Truth ``intensity`` is a cell's peak photons before the illumination and the blur.

Everything is a function of the position in µm: a tile is rendered alone with a PSF halo
(`RealisticScene.expected`), so tiles join exactly and memory stays that of a few tiles. The
texture is hashed value noise (no stored lattice); the structure lists are a few kB per
mm³ of brain. The truth files are those of the plain phantom (``truth/cells.csv``,
``truth/density.csv``), for the cells actually imaged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from lightsheet.errors import SampleError
from lightsheet.sample.phantom import (
    BrainGeometry,
    Phantom,
    _region_draws,
    _region_of,
    build_phantom,
    cells_frame,
    draw_diameters,
    separate,
)
from lightsheet.sample.presets import CHANNELS, REGIONS
from lightsheet.sample.render import _Scene

__all__ = [
    "CELL_MODES",
    "RealisticPhantom",
    "RealisticScene",
    "Structures",
    "build_realistic_phantom",
    "realistic_tissue",
    "soma_cells",
    "value_noise",
]

#: The two cell modes: dense nuclei (the plain phantom's) and sparse somata.
CELL_MODES = ("nuclei", "somata")
#: Soma diameters (µm): drawn around the region's nuclear mean + `SOMA_DIAMETER_SHIFT_UM`.
SOMA_DIAMETER_RANGE_UM = (12.0, 18.0)
SOMA_DIAMETER_SHIFT_UM = 6.0
SOMA_DIAMETER_SD_UM = 1.5
#: Somata per mm³ as a fraction of the region's nuclear density (12k–45k cells/mm³).
SOMA_DENSITY_FRACTION = 0.3
#: Texture octaves: (length scale µm, log-amplitude). The first moves the level several-fold.
TEXTURE_OCTAVES = ((160.0, 1.6), (30.0, 0.3), (7.0, 0.15))
#: Width (µm) of the tissue's soft boundary.
MASK_EDGE_UM = 6.0
#: Bright vessel length per brain volume (µm per mm³) and vessel radius range (µm).
VESSEL_LENGTH_UM_PER_MM3 = 250_000.0
VESSEL_RADIUS_UM = (2.0, 6.0)
VESSEL_STEP_UM = 25.0
VESSEL_GAIN = (0.8, 2.0)
#: Debris blobs per mm³ of brain, their radius range (µm) and gain over the local level.
DEBRIS_PER_MM3 = 3_000.0
DEBRIS_RADIUS_UM = (1.5, 5.0)
DEBRIS_GAIN = (2.0, 8.0)
#: Edge width (µm) of vessels and debris.
STRUCTURE_EDGE_UM = 0.7
#: Sheet power at the far side (x = extent) relative to the entry side (x = 0).
SHEET_FAR_SIDE = 0.45
#: Stripes: length scales (z, y, x) in µm (thin in y, long along the sheet) and log-amplitude.
STRIPE_SCALE_UM = (12.0, 4.0, 400.0)
STRIPE_AMPLITUDE = 0.4
#: Outside the tissue: the mounting medium's glow as a fraction of the plain phantom's.
OUTSIDE_FRACTION = 0.5


# -- value noise ----------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_PRIMES = tuple(np.uint64(p) for p in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9))


def _hash_uniform(key: int, iz, iy, ix) -> np.ndarray:
    """Uniform values in [-1, 1) for integer lattice points (splitmix64 of the indices)."""
    h = np.uint64((int(key) * int(_PRIMES[0])) % 2**64)
    for idx, prime in zip((iz, iy, ix), _PRIMES, strict=True):
        h = h ^ (np.asarray(idx).astype(np.int64).astype(np.uint64) * prime)
        h = (h ^ (h >> np.uint64(30))) * _M1
        h = (h ^ (h >> np.uint64(27))) * _M2
        h = h ^ (h >> np.uint64(31))
    return ((h >> np.uint64(11)).astype(np.float64) / float(2**53) * 2.0 - 1.0).astype(np.float32)


def value_noise(coords_um: Sequence[np.ndarray], scale_um: Sequence[float], key: int) -> np.ndarray:
    """Smooth random field on the grid ``coords_um[0] × coords_um[1] × coords_um[2]``.

    Lattice values uniform in [-1, 1) at multiples of ``scale_um`` per axis, hashed from
    ``key`` and the lattice index (nothing is stored: any box of the volume is computed
    alone and agrees with its neighbours), interpolated with a smoothstep per axis.

    Parameters
    ----------
    coords_um : three 1-D arrays
        Positions (µm) along z, y and x.
    scale_um : (3,) floats
        Lattice spacing per axis.
    key : int
        Selects the field (e.g. the seed and the octave).

    Returns
    -------
    (len(z), len(y), len(x)) ndarray of float32

    Examples
    --------
    >>> z, y, x = np.arange(4.0), np.arange(50.0), np.arange(60.0)
    >>> whole = value_noise((z, y, x), (5.0, 10.0, 10.0), key=7)
    >>> part = value_noise((z, y[20:], x[:30]), (5.0, 10.0, 10.0), key=7)
    >>> bool(np.array_equal(whole[:, 20:, :30], part))
    True
    """
    q = [np.asarray(c, np.float64) / s for c, s in zip(coords_um, scale_um, strict=True)]
    first = [int(np.floor(a.min())) for a in q]
    last = [int(np.floor(a.max())) + 1 for a in q]
    lattice = np.meshgrid(
        *(np.arange(f, e + 1) for f, e in zip(first, last, strict=True)), indexing="ij"
    )
    out = _hash_uniform(key, *lattice)
    for axis, (a, f) in enumerate(zip(q, first, strict=True)):
        i0 = np.floor(a).astype(np.intp)
        t = a - i0
        w = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        lo = np.take(out, i0 - f, axis=axis)
        hi = np.take(out, i0 - f + 1, axis=axis)
        out = lo + (hi - lo) * w.reshape(shape)
    return np.ascontiguousarray(out, dtype=np.float32)


# -- bright structures ----------------------------------------------------------------------


@dataclass(frozen=True)
class Structures:
    """Vessel pieces and debris blobs (µm), bright by the same factor in every channel.

    Attributes
    ----------
    segments_um : (S, 2, 3) ndarray
        Start and end of each straight vessel piece.
    segment_radius_um, segment_gain : (S,) ndarrays
        Radius and brightness over the local tissue level.
    debris_um : (D, 3) ndarray
        Blob centres.
    debris_radius_um, debris_gain : (D,) ndarrays
    """

    segments_um: np.ndarray
    segment_radius_um: np.ndarray
    segment_gain: np.ndarray
    debris_um: np.ndarray
    debris_radius_um: np.ndarray
    debris_gain: np.ndarray

    @classmethod
    def draw(cls, geometry: BrainGeometry, brain_mm3: float, rng: np.random.Generator):
        """Vessels and debris inside the brain at the module's densities."""
        semi = np.asarray(geometry.semi_um)
        centre = np.asarray(geometry.centre_um)

        def inside(n: int) -> np.ndarray:
            pts = np.empty((0, 3))
            while len(pts) < n:
                p = centre + rng.uniform(-1, 1, size=(4 * n + 8, 3)) * semi
                w = geometry.brain_weight(p[:, 0], p[:, 1], p[:, 2], edge_um=MASK_EDGE_UM)
                pts = np.concatenate([pts, p[w > 0.9]])
            return pts[:n]

        n_steps = max(0, round(VESSEL_LENGTH_UM_PER_MM3 * brain_mm3 / VESSEL_STEP_UM))
        n_vessels = max(1, round(n_steps / 12)) if n_steps else 0
        segments, radius, gain = [], [], []
        for start in inside(n_vessels):
            direction = rng.normal(size=3)
            r, g = rng.uniform(*VESSEL_RADIUS_UM), rng.uniform(*VESSEL_GAIN)
            p = start
            for _ in range(12):
                direction = direction / np.linalg.norm(direction) + 0.5 * rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                q = p + VESSEL_STEP_UM * direction
                segments.append((p, q))
                radius.append(r)
                gain.append(g)
                p = q
        n_debris = round(DEBRIS_PER_MM3 * brain_mm3)
        return cls(
            segments_um=np.asarray(segments, float).reshape(-1, 2, 3),
            segment_radius_um=np.asarray(radius, float),
            segment_gain=np.asarray(gain, float),
            debris_um=inside(n_debris),
            debris_radius_um=rng.uniform(*DEBRIS_RADIUS_UM, n_debris),
            debris_gain=rng.uniform(*DEBRIS_GAIN, n_debris),
        )

    def render(self, coords_um: Sequence[np.ndarray]) -> np.ndarray:
        """Gain over the tissue level on a grid box (0 away from every structure)."""
        z, y, x = (np.asarray(c, np.float64) for c in coords_um)
        out = np.zeros((len(z), len(y), len(x)), np.float32)
        box_lo = np.array([z[0], y[0], x[0]])
        box_hi = np.array([z[-1], y[-1], x[-1]])
        step = np.array([z[1] - z[0] if len(z) > 1 else 1.0, y[1] - y[0], x[1] - x[0]])
        edge = 6 * STRUCTURE_EDGE_UM

        def sub(lo_um, hi_um):
            lo_i = np.maximum(np.ceil((lo_um - box_lo) / step).astype(int), 0)
            hi_i = np.minimum(np.floor((hi_um - box_lo) / step).astype(int) + 1, out.shape)
            if np.any(hi_i <= lo_i):
                return None
            box = tuple(slice(a, b) for a, b in zip(lo_i, hi_i, strict=True))
            pts = (z[box[0]][:, None, None], y[box[1]][None, :, None], x[box[2]][None, None, :])
            return box, pts

        ends = self.segments_um
        reach = self.segment_radius_um + edge
        lo_all = ends.min(axis=1) - reach[:, None]
        hi_all = ends.max(axis=1) + reach[:, None]
        hit = np.all((hi_all >= box_lo) & (lo_all <= box_hi), axis=1)
        for k in np.flatnonzero(hit):
            found = sub(lo_all[k], hi_all[k])
            if found is None:
                continue
            box, (pz, py, px) = found
            a, d = ends[k, 0], ends[k, 1] - ends[k, 0]
            t = ((pz - a[0]) * d[0] + (py - a[1]) * d[1] + (px - a[2]) * d[2]) / (d @ d)
            t = np.clip(t, 0.0, 1.0)
            dist = np.sqrt(
                (pz - a[0] - t * d[0]) ** 2
                + (py - a[1] - t * d[1]) ** 2
                + (px - a[2] - t * d[2]) ** 2
            )
            prof = self.segment_gain[k] * _soft_edge(dist - self.segment_radius_um[k])
            np.maximum(out[box], prof, out=out[box])  # joints of a vessel are not brighter
        reach = self.debris_radius_um + edge
        c = self.debris_um
        hit = np.all((c + reach[:, None] >= box_lo) & (c - reach[:, None] <= box_hi), axis=1)
        for k in np.flatnonzero(hit):
            found = sub(c[k] - reach[k], c[k] + reach[k])
            if found is None:
                continue
            box, (pz, py, px) = found
            dist = np.sqrt((pz - c[k, 0]) ** 2 + (py - c[k, 1]) ** 2 + (px - c[k, 2]) ** 2)
            prof = self.debris_gain[k] * _soft_edge(dist - self.debris_radius_um[k])
            np.maximum(out[box], prof, out=out[box])
        return out

    def info(self) -> dict:
        """Counts for ``sample.json``."""
        length = np.linalg.norm(np.diff(self.segments_um, axis=1), axis=-1).sum()
        return {
            "vessel_pieces": len(self.segments_um),
            "vessel_length_um": round(float(length), 1),
            "debris": len(self.debris_um),
        }


def _soft_edge(dist_um: np.ndarray) -> np.ndarray:
    """1 well inside a surface, 0 well outside, logistic across `STRUCTURE_EDGE_UM`."""
    return (1.0 / (1.0 + np.exp(np.clip(dist_um / STRUCTURE_EDGE_UM, -50, 50)))).astype(np.float32)


# -- the scene ------------------------------------------------------------------------------


class RealisticScene(_Scene):
    """`_Scene` whose background is the textured tissue of the module docstring.

    ``fields`` are the per-channel anatomy levels (photons) times the tissue's soft mask on
    the atlas grid, interpolated per voxel as `_Scene`'s; ``outside`` the per-channel glow of
    the medium.
    """

    def __init__(self, *args, bright, outside, key, extent_um, sheet_um=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bright = bright
        self.outside = outside
        self.key = int(key)
        self.extent_um = np.asarray(extent_um, float)
        # x (µm) where the sheet enters the field of view, and the field's length along x
        entry, length = (0.0, self.extent_um[2]) if sheet_um is None else sheet_um
        self.sheet_um = (float(entry), float(length))

    def _coords(self, lo, hi) -> list[np.ndarray]:
        return [np.arange(lo[a], hi[a]) * self.vox[a] + self.origin_um[a] for a in range(3)]

    def texture(self, coords) -> np.ndarray:
        """``exp(Σ aₖ Vₖ)`` over the texture octaves, float32."""
        log = np.zeros([len(c) for c in coords], np.float32)
        for k, (scale, amp) in enumerate(TEXTURE_OCTAVES):
            log += amp * value_noise(coords, (scale,) * 3, key=self.key * 16 + k)
        return np.exp(log)

    def illumination(self, coords) -> np.ndarray:
        """Sheet decay along x, slow ±10 % waves and stripes; float32 (Z, Y, X)."""
        z, y, x = coords
        entry, length = self.sheet_um
        decay = np.exp(np.log(SHEET_FAR_SIDE) * (x - entry) / length).astype(np.float32)
        waves = 0.1 * value_noise(coords, (self.extent_um.max() / 2,) * 3, key=self.key * 16 + 8)
        stripes = value_noise(coords, STRIPE_SCALE_UM, key=self.key * 16 + 9)
        return (1.0 + waves) * np.exp(STRIPE_AMPLITUDE * stripes) * decay[None, None, :]

    def expected(self, lo, hi, *, channel: int, nuclei: bool, bleach: float = 1.0):
        """Expected photons per voxel of the box ``[lo, hi)``, float32 (see `_Scene`)."""
        lo_h = np.asarray(lo) - self.half
        hi_h = np.asarray(hi) + self.half
        coords = self._coords(lo_h, hi_h)
        tissue = self._field(self.fields[channel], lo_h, hi_h)
        tissue *= self.texture(coords)
        tissue *= 1.0 + self.bright.render(coords)
        image = tissue + np.float32(self.outside[channel])
        del tissue
        if nuclei:
            self._add_nuclei(image, lo_h, hi_h, bleach)
        image *= self.illumination(coords)
        blurred = self._convolve_valid(image)
        return np.maximum(blurred, 0.0, out=blurred)


@dataclass(frozen=True, eq=False)
class RealisticPhantom(Phantom):
    """A `Phantom` imaged as textured tissue with structures (see the module docstring).

    Attributes (besides `Phantom`'s)
    --------------------------------
    cell_mode : {"nuclei", "somata"}
    structures : Structures
    seed : int
    """

    cell_mode: str = "nuclei"
    bright: Structures | None = None
    seed: int = 0

    def scene(self, origin_um=(0.0, 0.0, 0.0), *, sheet_um=None) -> RealisticScene:
        """`Phantom.scene` with the textured tissue.

        ``sheet_um``: x (µm) where the light sheet enters and the length it crosses; default
        the whole sample, one field of view. A tile of a mosaic has its own
        (`lightsheet.sample.overlap`).
        """
        return RealisticScene(
            self.cells, self.psf, self.voxel_size_um, self.resolution_um, self.fields,
            **self.scene_kwargs(sheet_um), origin_um=origin_um,
        )  # fmt: skip

    def scene_kwargs(self, sheet_um=None) -> dict:
        """`RealisticScene`'s own arguments: structures, outside glow, key, extent, sheet."""
        return {
            "bright": self.bright,
            "outside": [OUTSIDE_FRACTION * ch.outside_photons for ch in self.channels],
            "key": self.seed,
            "extent_um": np.asarray(self.preset.shape_zyx) * np.asarray(self.voxel_size_um),
            "sheet_um": sheet_um,
        }

    def info(self) -> dict:
        """The ``realistic`` record of ``sample.json``."""
        return {
            "cells": self.cell_mode,
            **self.bright.info(),
            "texture_octaves_um_log_amplitude": [list(o) for o in TEXTURE_OCTAVES],
            "sheet_far_side": SHEET_FAR_SIDE,
            "stripe_scale_um": list(STRIPE_SCALE_UM),
        }


def soma_cells(
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    resolution_um: float,
    *,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Sparse somata: `SOMA_DENSITY_FRACTION` of each region's density, 12–18 µm, apart.

    Centres are uniform in the region's annotation voxels (as `sample_cells`); any soma
    closer to another than the mean of their diameters is redrawn in its region, so no two
    overlap. Columns as `sample_cells`.
    """
    parts, draw, owner = _region_draws(
        annotation, resolution_um, rng, density_factor=SOMA_DENSITY_FRACTION
    )
    pos = np.concatenate([draw(w, n) for _, w, n in parts]) if parts else np.empty((0, 3))
    mean_d = np.array([parts[i][0].diameter_um + SOMA_DIAMETER_SHIFT_UM for i in owner])
    diam = draw_diameters(
        mean_d,
        rng=rng,
        diameter_range_um=SOMA_DIAMETER_RANGE_UM,
        diameter_sd_um=SOMA_DIAMETER_SD_UM,
    )
    pos = separate(pos, diam, owner, [w for _, w, _ in parts], draw)
    ids, hemi = _region_of(pos, owner, parts, hemispheres, resolution_um)
    return cells_frame(pos, diam, ids, hemi, rng=rng)


def realistic_tissue(
    geometry: BrainGeometry,
    annotation: np.ndarray,
    resolution_um: float,
    channels: int,
    cells: str,
    seed: int,
    *,
    structures_geometry: BrainGeometry | None = None,
) -> tuple[tuple, list[np.ndarray], Structures]:
    """A realistic sample's channels, tissue fields and bright structures.

    The fields (expected photons per channel on the atlas grid of ``annotation``, before the
    texture, structures and illumination of `RealisticScene`) are each region's anatomy
    level inside the brain's soft boundary (``geometry``, atlas µm); vessels and debris are
    drawn in ``structures_geometry``'s brain (image µm; default ``geometry``, where the
    image and the atlas share their frame).
    """
    from scipy.ndimage import gaussian_filter

    res_um = float(resolution_um)
    brain_mm3 = float((annotation > 0).sum()) * res_um**3 * 1e-9
    rng_structures = np.random.default_rng(np.random.SeedSequence([seed, 4]))
    bright = Structures.draw(structures_geometry or geometry, brain_mm3, rng_structures)
    level = np.ones(annotation.shape)
    for r in REGIONS:
        level[annotation == r.id] = r.anatomy
    level = gaussian_filter(level, sigma=1.0, mode="nearest")
    chans = tuple(
        replace(ch, content="somata") if c == 0 and cells == "somata" else ch
        for c, ch in enumerate(CHANNELS[:channels])
    )
    # atlas voxel j's centre is at (j + 0.5) R (BrainGlobe: the voxel spans [j R, (j+1) R))
    z, y, x = ((np.arange(n) + 0.5) * res_um for n in annotation.shape)
    edge_um = max(MASK_EDGE_UM, 0.5 * res_um)
    mask = geometry.brain_weight(
        z[:, None, None], y[None, :, None], x[None, None, :], edge_um=edge_um
    )
    fields = [
        (ch.inside_photons * (1.0 + ch.anatomy_contrast * (level - 1.0)) * mask).astype(np.float32)
        for ch in chans
    ]
    return chans, fields, bright


def build_realistic_phantom(
    size: str = "tiny",
    *,
    seed: int = 0,
    channels: int = 2,
    cells: str = "nuclei",
    voxel_size_um: Sequence[float] | None = None,
    sheet_fwhm_um: float | None = None,
) -> RealisticPhantom:
    """The deterministic content of a realistic sample (see the module docstring).

    Parameters
    ----------
    size, seed, channels, voxel_size_um, sheet_fwhm_um
        As `lightsheet.sample.build_phantom`.
    cells : {"nuclei", "somata"}
        Dense nuclei (6–12 µm) or sparse somata (12–18 µm).

    Returns
    -------
    RealisticPhantom

    Raises
    ------
    SampleError
        Unknown ``cells`` mode, or the arguments `build_phantom` refuses.
    """
    if cells not in CELL_MODES:
        raise SampleError(f"cells: got {cells!r}; expected one of {list(CELL_MODES)}")
    base = build_phantom(
        size, seed=seed, channels=channels, voxel_size_um=voxel_size_um, sheet_fwhm_um=sheet_fwhm_um
    )
    geometry, annotation, res_um = base.geometry, base.annotation, base.resolution_um
    if cells == "nuclei":
        table = base.cells
    else:
        rng_cells = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        table = soma_cells(annotation, base.hemispheres, res_um, rng=rng_cells)
    chans, fields, bright = realistic_tissue(geometry, annotation, res_um, channels, cells, seed)
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(Phantom)}
    return RealisticPhantom(
        **{**common, "cells": table, "channels": chans, "fields": fields},
        cell_mode=cells,
        bright=bright,
        seed=int(seed),
    )
