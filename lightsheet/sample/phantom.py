"""The phantom: brain geometry, atlas, cells and the truth density table."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from lightsheet.errors import SampleError
from lightsheet.io.tables import DENSITY_COLUMNS
from lightsheet.psf import psf_from_optics
from lightsheet.sample.presets import (
    BLEACH_PER_TIMEPOINT,
    BRAIN_SEMI_AXIS_FRACTION,
    CELL_COLUMNS,
    CHANNELS,
    NUCLEUS_DIAMETER_RANGE_UM,
    NUCLEUS_DIAMETER_SD_UM,
    NUCLEUS_LOG_SIGMA,
    NUCLEUS_MEDIAN_PHOTONS,
    OPTICS,
    REGIONS,
    VOXEL_SIZE_UM,
    Channel,
    Region,
    SizePreset,
    _check_args,
    check_voxel_size,
    optics_with,
)
from lightsheet.sample.render import _background_fields, _Scene

__all__ = [
    "atlas_shape",
    "BrainGeometry",
    "build_phantom",
    "cells_frame",
    "draw_diameters",
    "Phantom",
    "sample_cells",
    "separate",
    "structures_json",
    "truth_region_table",
]


@dataclass(frozen=True, eq=False)
class Phantom:
    """Everything about a sample except its noise: atlas, cells, PSF and smooth fields.

    Attributes
    ----------
    preset : SizePreset
        The size it was built for.
    voxel_size_um : (3,) tuple of float
        Image voxel size (z, y, x) in µm.
    resolution_um : float
        Isotropic atlas voxel size in µm.
    geometry : BrainGeometry
        The analytic shape the atlas samples.
    annotation : (A0, A1, A2) ndarray of uint32
        Structure id per atlas voxel, 0 outside the brain.
    hemispheres : (A0, A1, A2) ndarray of uint8
        0 outside the brain, 1 left (high x), 2 right.
    structures : list of dict
        ``structures.json`` records.
    cells : pandas.DataFrame
        The nuclei, see `sample_cells`.
    psf : (Z, Y, X) ndarray of float32
        The PSF every channel is blurred with.
    channels : tuple of Channel
        The channels imaged.
    fields : list of (A0, A1, A2) ndarray of float32
        Expected autofluorescence photons per channel on the atlas grid.
    optics : dict
        What the PSF was made from (`psf_from_optics`' keywords): `OPTICS`, or another sheet.
    """

    preset: SizePreset
    voxel_size_um: tuple[float, float, float]
    resolution_um: float
    geometry: BrainGeometry
    annotation: np.ndarray
    hemispheres: np.ndarray
    structures: list[dict]
    cells: pd.DataFrame
    psf: np.ndarray
    channels: tuple[Channel, ...]
    fields: list[np.ndarray]
    optics: dict = field(default_factory=lambda: dict(OPTICS))

    def truth_volumes(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Labels and their voxel size that define the truth's region volumes."""
        return self.annotation, self.hemispheres, self.resolution_um

    def scene(
        self,
        origin_um: Sequence[float] = (0.0, 0.0, 0.0),
        *,
        sheet_um: Sequence[float] | None = None,
    ) -> _Scene:
        """The renderer of this phantom, voxel ``i`` centred at ``origin_um + i × voxel size``.

        A non-zero ``origin_um`` images a tile whose stage position is not a whole number of
        voxels (`lightsheet.sample.overlap`). ``sheet_um`` (x where the light sheet enters,
        its length across the field) is for scenes that model the sheet
        (`lightsheet.sample.realistic`); the plain phantom's illumination is part of its
        fields, so it ignores it.
        """
        return _Scene(
            self.cells, self.psf, self.voxel_size_um, self.resolution_um, self.fields,
            origin_um=origin_um,
        )  # fmt: skip

    @cached_property
    def _scene(self) -> _Scene:
        return self.scene()

    def expected(self, lo: Sequence[int], hi: Sequence[int], *, channel: int, t: int = 0):
        """Expected photons per voxel (noise-free, blurred) of the box ``[lo, hi)``.

        Parameters
        ----------
        lo, hi : (3,) sequence of int
            Voxel index bounds (z, y, x) of the box; any box, inside the volume or not.
        channel : int
            Channel index; channel 0 holds the nuclei.
        t : int
            Time point (nuclei bleach by `BLEACH_PER_TIMEPOINT` per step).

        Returns
        -------
        (Z, Y, X) ndarray of float32
        """
        return self._scene.expected(
            lo, hi, channel=channel, nuclei=channel == 0, bleach=BLEACH_PER_TIMEPOINT**t
        )


def build_phantom(
    size: str = "tiny",
    *,
    seed: int = 0,
    channels: int = 2,
    voxel_size_um: Sequence[float] | None = None,
    sheet_fwhm_um: float | None = None,
) -> Phantom:
    """The deterministic content of a sample: atlas, cells, PSF and background fields.

    Parameters
    ----------
    size : str
        Key of `SIZES`, or a custom size such as ``"4GB"`` (see `size_preset`).
    seed : int
        Seed of the random draws (cells and illumination).
    channels : int
        Number of channels, 1 to ``len(CHANNELS)``.
    voxel_size_um : (3,) floats, optional
        Image voxel size (z, y, x); default `VOXEL_SIZE_UM`. Another keeps the brain's
        extent and the atlas in µm (`SizePreset.at_voxel_size`), the optics' PSF in µm, and
        the light a µm² of tissue gives (`_Scene`: photons per voxel grow with the pixel's
        area).
    sheet_fwhm_um : float, optional
        The light sheet's thickness (FWHM, µm) instead of `OPTICS`'; a thicker sheet blurs
        the cells longer along z.

    Returns
    -------
    Phantom
    """
    preset = _check_args(size, seed, channels, 1)
    vox = VOXEL_SIZE_UM if voxel_size_um is None else check_voxel_size(voxel_size_um)
    if vox != VOXEL_SIZE_UM:
        preset = preset.at_voxel_size(vox)
    optics = optics_with(sheet_fwhm_um)
    res_um = preset.atlas_resolution_um(vox)
    geometry = BrainGeometry.for_volume(preset.shape_zyx, vox)
    annotation, hemispheres = geometry.atlas(atlas_shape(preset.shape_zyx, vox, res_um), res_um)
    rng_cells = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    cells = sample_cells(annotation, hemispheres, res_um, rng=rng_cells)
    chans = CHANNELS[:channels]
    return Phantom(
        preset=preset,
        voxel_size_um=vox,
        resolution_um=res_um,
        geometry=geometry,
        annotation=annotation,
        hemispheres=hemispheres,
        structures=structures_json(),
        cells=cells,
        psf=psf_from_optics(voxel_size_um=vox, **optics),
        channels=chans,
        fields=_background_fields(geometry, annotation, res_um, chans, seed),
        optics=optics,
    )


def truth_region_table(
    cells: pd.DataFrame,
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    structures: Sequence[Mapping],
    resolution_um: float | Sequence[float],
) -> pd.DataFrame:
    """Cell counts, volumes and densities per region and hemisphere (``density.csv``).

    This is the definition the pipeline's density stage is checked against: a region's
    volume is its annotation voxels × the atlas voxel volume (left/right from
    ``hemispheres``), its count is the number of cells with its ``structure_id``, and a
    parent carries its own voxels and cells plus those of all its descendants.

    Parameters
    ----------
    cells : pandas.DataFrame
        One row per cell with ``structure_id`` (0 background, -1 outside the atlas) and
        ``hemisphere`` (0 none, 1 left, 2 right).
    annotation : (A0, A1, A2) ndarray of int
        Structure id per atlas voxel, 0 outside the brain.
    hemispheres : (A0, A1, A2) ndarray of uint8
        0 outside the brain, 1 left, 2 right.
    structures : list of dict
        BrainGlobe ``structures.json`` records (``id``, ``acronym``, ``name``,
        ``structure_id_path``).
    resolution_um : float or (3,) sequence of float
        Atlas voxel size in µm.

    Returns
    -------
    pandas.DataFrame
        `DENSITY_COLUMNS`; one row per structure in the order given, then ``0``
        ("background") and ``-1`` ("outside atlas"). Densities are NaN where the volume is 0
        or undefined.
    """
    res = np.broadcast_to(np.asarray(resolution_um, dtype=float), (3,))
    voxel_mm3 = float(np.prod(res)) * 1e-9
    ann = np.asarray(annotation).ravel()
    hemi = np.asarray(hemispheres).ravel()
    if ann.shape != hemi.shape:
        raise SampleError(
            f"hemispheres: shape {np.shape(hemispheres)} differs from the annotation's "
            f"{np.shape(annotation)}; expected the same shape"
        )
    # voxels and cells per (structure id, hemisphere)
    vox_counts = pd.Series(1, index=pd.MultiIndex.from_arrays([ann, hemi])).groupby(level=[0, 1])
    voxels = vox_counts.size()
    sid = cells["structure_id"].to_numpy(np.int64)
    cell_counts = (
        pd.Series(1, index=pd.MultiIndex.from_arrays([sid, cells["hemisphere"].to_numpy(int)]))
        .groupby(level=[0, 1])
        .size()
    )

    def own(table: pd.Series, ids: list[int], h: int | None) -> int:
        sel = table[table.index.get_level_values(0).isin(ids)]
        if h is not None:
            sel = sel[sel.index.get_level_values(1) == h]
        return int(sel.sum())

    descendants = {
        int(s["id"]): [int(d["id"]) for d in structures if int(s["id"]) in d["structure_id_path"]]
        for s in structures
    }
    rows = []
    for s in structures:
        path = [int(p) for p in s["structure_id_path"]]
        ids = descendants[int(s["id"])]
        rows.append(
            {
                "structure_id": int(s["id"]),
                "acronym": s["acronym"],
                "structure_name": s["name"],
                "parent_structure_id": path[-2] if len(path) > 1 else pd.NA,
                "depth": len(path) - 1,
                "left_cell_count": own(cell_counts, ids, 1),
                "right_cell_count": own(cell_counts, ids, 2),
                "total_cells": own(cell_counts, ids, None),
                "left_volume_mm3": own(voxels, ids, 1) * voxel_mm3,
                "right_volume_mm3": own(voxels, ids, 2) * voxel_mm3,
                "total_volume_mm3": own(voxels, ids, None) * voxel_mm3,
            }
        )
    for special, name in ((0, "background"), (-1, "outside atlas")):
        inside = special == 0  # the atlas has background voxels; outside it, no volume
        rows.append(
            {
                "structure_id": special,
                "acronym": name,
                "structure_name": name,
                "parent_structure_id": pd.NA,
                "depth": pd.NA,
                "left_cell_count": own(cell_counts, [special], 1),
                "right_cell_count": own(cell_counts, [special], 2),
                "total_cells": own(cell_counts, [special], None),
                "left_volume_mm3": own(voxels, [0], 1) * voxel_mm3 if inside else np.nan,
                "right_volume_mm3": own(voxels, [0], 2) * voxel_mm3 if inside else np.nan,
                "total_volume_mm3": own(voxels, [0], None) * voxel_mm3 if inside else np.nan,
            }
        )
    table = pd.DataFrame(rows)
    for side in ("left", "right", "total"):
        count = table["total_cells" if side == "total" else f"{side}_cell_count"]
        volume = table[f"{side}_volume_mm3"].astype(float)
        # an empty or undefined volume has no density
        table[f"{side}_cells_per_mm3"] = (count / volume.where(volume > 0)).astype(float)
    table["parent_structure_id"] = table["parent_structure_id"].astype("Int64")
    table["depth"] = table["depth"].astype("Int64")
    return table[list(DENSITY_COLUMNS)]


def structures_json() -> list[dict]:
    """The phantom's hierarchy as BrainGlobe ``structures.json`` records (root first)."""
    by_id = {r.id: r for r in REGIONS}

    def path(r: Region) -> list[int]:
        return [*path(by_id[r.parent]), r.id] if r.parent is not None else [r.id]

    return [
        {
            "acronym": r.acronym,
            "id": r.id,
            "name": r.name,
            "structure_id_path": path(r),
            "rgb_triplet": list(r.rgb),
        }
        for r in REGIONS
    ]


def atlas_shape(
    shape_zyx: Sequence[int], voxel_size_um: Sequence[float], resolution_um: float
) -> tuple[int, int, int]:
    """Atlas voxels per axis so that the atlas covers the whole image.

    Image voxel ``i`` covers ``[(i - 0.5) v, (i + 0.5) v)`` and atlas voxel ``j`` covers
    ``[j R, (j + 1) R)`` (BrainGlobe), so the last atlas voxel is the one holding the
    image's far edge. (The image's first half voxel, below 0 µm, is outside the atlas.)

    Examples
    --------
    >>> atlas_shape((48, 192, 192), (2.0, 1.0, 1.0), 4.0)
    (24, 48, 48)
    """
    return tuple(  # type: ignore[return-value]
        max(1, math.ceil(round((n - 0.5) * v / resolution_um, 9)))
        for n, v in zip(shape_zyx, voxel_size_um, strict=True)
    )


# -- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrainGeometry:
    """The phantom's shape in physical coordinates.

    Positions are normalised by the brain's centre and semi-axes: ``a`` along z
    (anterior → posterior), ``s`` along y (superior → inferior), ``r`` along x
    (right → left); the brain is ``a² + s'² + r² ≤ 1`` with ``s' = s / 0.85`` below the
    equator (a flatter ventral side).
    """

    centre_um: tuple[float, float, float]
    semi_um: tuple[float, float, float]

    @classmethod
    def for_volume(cls, shape_zyx: Sequence[int], voxel_size_um: Sequence[float]):
        """Brain centred in the volume, semi-axes `BRAIN_SEMI_AXIS_FRACTION` of the extent."""
        centre = tuple((n - 1) / 2 * v for n, v in zip(shape_zyx, voxel_size_um, strict=True))
        semi = tuple(
            BRAIN_SEMI_AXIS_FRACTION * n * v for n, v in zip(shape_zyx, voxel_size_um, strict=True)
        )
        return cls(centre, semi)  # type: ignore[arg-type]

    def normalised(self, z_um, y_um, x_um):
        """Normalised coordinates ``(a, s, r)`` of positions (broadcasting arrays)."""
        return tuple(
            (p - c) / h
            for p, c, h in zip((z_um, y_um, x_um), self.centre_um, self.semi_um, strict=True)
        )

    def labels(self, z_um, y_um, x_um) -> tuple[np.ndarray, np.ndarray]:
        """Structure id and hemisphere at positions in µm (broadcasting arrays)."""
        a, s, r = self.normalised(z_um, y_um, x_um)
        s_flat = np.where(s > 0, s / 0.85, s)
        rho = np.sqrt(a**2 + s_flat**2 + r**2)
        ar = np.abs(r)
        brain = rho <= 1.0
        # cortex: nested shells over the dorsal and lateral surface, slightly undulating
        depth = rho * (1.0 + 0.025 * np.cos(5.0 * np.arctan2(s, a)))
        dorsal = s < 0.45 - 0.25 * a
        # hippocampus: a tilted lobe per hemisphere, posterior-dorsal, with a dentate core
        ha, hs, hr = a - 0.28, s + 0.12, ar - 0.40
        hu = 0.8 * ha + 0.6 * hs  # tilt the lobe in the a–s plane
        hv = -0.6 * ha + 0.8 * hs
        hpf = (hu / 0.50) ** 2 + (hv / 0.30) ** 2 + (hr / 0.40) ** 2
        # thalamus: a central lobe pair; hypothalamus: ventral, straddling the midline
        th = ((a + 0.02) / 0.52) ** 2 + ((s - 0.05) / 0.36) ** 2 + ((ar - 0.15) / 0.34) ** 2
        hy = ((a + 0.12) / 0.66) ** 2 + ((s - 0.52) / 0.34) ** 2 + (r / 0.60) ** 2
        ids = np.full(np.broadcast(a, s, r).shape, 343, dtype=np.uint32)  # brain-stem own
        ids = np.where(hy <= 1.0, 1097, ids)
        ids = np.where(th <= 1.0, 549, ids)
        shell = dorsal & (depth >= 0.76)
        ids = np.where(shell, 68856, ids)
        ids = np.where(shell & (depth >= 0.84), 68823, ids)
        ids = np.where(shell & (depth >= 0.915), 68801, ids)
        in_hpf = (hpf <= 1.0) & ~(shell & (depth >= 0.84))
        ids = np.where(in_hpf, 375, ids)
        ids = np.where(in_hpf & (hpf <= 0.5), 726, ids)
        ids = np.where(brain, ids, 0).astype(np.uint32)
        left = np.broadcast_to(x_um >= self.centre_um[2], ids.shape)
        hemi = np.where(brain, np.where(left, 1, 2), 0).astype(np.uint8)
        return ids, hemi

    def atlas(self, shape: Sequence[int], resolution_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Annotation (uint32) and hemispheres (uint8) sampled at atlas voxel centres.

        Voxel ``j`` spans ``[j R, (j + 1) R)`` µm (BrainGlobe), so its centre is ``(j + 0.5) R``.
        """
        z, y, x = ((np.arange(n, dtype=float) + 0.5) * resolution_um for n in shape)
        return self.labels(z[:, None, None], y[None, :, None], x[None, None, :])

    def brain_weight(self, z_um, y_um, x_um, *, edge_um: float = 3.0) -> np.ndarray:
        """Soft inside-the-brain indicator (1 inside, 0 outside, a smooth edge)."""
        a, s, r = self.normalised(z_um, y_um, x_um)
        s_flat = np.where(s > 0, s / 0.85, s)
        rho = np.sqrt(a**2 + s_flat**2 + r**2)
        scale = min(self.semi_um)
        return 1.0 / (1.0 + np.exp(np.clip((rho - 1.0) * scale / edge_um, -50, 50)))


# -- cells ----------------------------------------------------------------------------------


def sample_cells(
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    resolution_um: float,
    *,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Place nuclei uniformly inside each region's annotation voxels at its density.

    Parameters
    ----------
    annotation : (A0, A1, A2) ndarray of uint32
        Structure ids at the atlas voxel centres.
    hemispheres : (A0, A1, A2) ndarray of uint8
        Hemisphere of each atlas voxel.
    resolution_um : float
        Isotropic atlas voxel size in µm.
    rng : numpy.random.Generator
        Source of every draw.

    Returns
    -------
    pandas.DataFrame
        ``cell_id`` (from 1), ``z_um, y_um, x_um`` (inside their atlas voxel ``j``,
        which spans ``[j R, (j + 1) R)`` µm), ``diameter_um``, ``semi_z_um, semi_y_um, semi_x_um``,
        ``intensity`` (peak photons per voxel of `VOXEL_SIZE_UM` before blur), ``structure_id``,
        ``hemisphere``; sorted by position.
    """
    parts, draw, owner = _region_draws(annotation, resolution_um, rng)
    pos = np.concatenate([draw(where, n) for _, where, n in parts]) if parts else np.empty((0, 3))
    diam = draw_diameters(np.array([parts[i][0].diameter_um for i in owner]), rng=rng)
    pos = separate(pos, diam, owner, [w for _, w, _ in parts], draw)
    ids, hemi = _region_of(pos, owner, parts, hemispheres, resolution_um)
    return cells_frame(pos, diam, ids, hemi, rng=rng)


def _region_draws(annotation: np.ndarray, resolution_um: float, rng, density_factor=1.0):
    """Cells per region at ``density_factor`` × its density, and where to put them.

    Returns ``parts`` (``(region, its flat annotation voxels, n)`` for every region given
    cells), ``draw(where, n)`` (n positions uniform in those voxels, in µm, clear of voxel
    faces so each one's atlas voxel is unambiguous) and ``owner`` (each cell's part).
    """
    res = float(resolution_um)
    voxel_mm3 = res**3 * 1e-9
    inset = 2e-3 * res
    parts = []
    for region in REGIONS:
        if region.density_cells_per_mm3 is None:
            continue
        where = np.flatnonzero(annotation.ravel() == region.id)
        n = int(round(density_factor * region.density_cells_per_mm3 * where.size * voxel_mm3))
        if n:
            parts.append((region, where, n))

    def draw(where: np.ndarray, n: int) -> np.ndarray:
        vox = np.stack(np.unravel_index(rng.choice(where, size=n), annotation.shape), axis=1)
        return np.round(vox * res + rng.uniform(inset, res - inset, size=(n, 3)), 3)

    owner = np.concatenate([np.full(n, i) for i, (_, _, n) in enumerate(parts)]).astype(int)
    return parts, draw, owner


def _region_of(pos, owner, parts, hemispheres: np.ndarray, resolution_um: float):
    """Structure id (of each cell's part) and hemisphere (at its position) per cell."""
    ids = np.array([parts[i][0].id for i in owner], dtype=np.int64)
    idx = np.floor(pos / float(resolution_um)).astype(np.intp)
    idx = np.clip(idx, 0, np.array(hemispheres.shape) - 1)
    return ids, hemispheres[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.int64)


def draw_diameters(
    mean_diameter_um: np.ndarray,
    *,
    rng: np.random.Generator,
    diameter_range_um: tuple[float, float] = NUCLEUS_DIAMETER_RANGE_UM,
    diameter_sd_um: float = NUCLEUS_DIAMETER_SD_UM,
) -> np.ndarray:
    """Cell diameters (µm) drawn around each cell's mean.

    Normal around ``mean_diameter_um`` with SD ``diameter_sd_um``, clipped to
    ``diameter_range_um``, rounded to 0.01 µm.
    """
    mean = np.asarray(mean_diameter_um, dtype=float)
    return np.clip(rng.normal(mean, diameter_sd_um, size=mean.shape), *diameter_range_um).round(2)


def cells_frame(
    pos: np.ndarray,
    diameter_um: np.ndarray,
    structure_id: np.ndarray,
    hemisphere: np.ndarray,
    *,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Cells at ``pos`` (µm) of the given diameters: shapes and brightness drawn, sorted.

    Returns the `sample_cells` table for cells whose region and side are known.
    """
    n_total = len(pos)
    diam = np.asarray(diameter_um, dtype=float)
    # slightly ellipsoidal: per-axis stretch around the mean radius, volume kept
    stretch = np.exp(rng.normal(0.0, 0.08, size=(n_total, 3)))
    stretch /= np.cbrt(stretch.prod(axis=1, keepdims=True))
    semi = 0.5 * diam[:, None] * stretch
    intensity = (NUCLEUS_MEDIAN_PHOTONS * rng.lognormal(0.0, NUCLEUS_LOG_SIGMA, n_total)).round(1)
    cells = pd.DataFrame(
        {
            "z_um": pos[:, 0],
            "y_um": pos[:, 1],
            "x_um": pos[:, 2],
            "diameter_um": diam,
            "semi_z_um": semi[:, 0],
            "semi_y_um": semi[:, 1],
            "semi_x_um": semi[:, 2],
            "intensity": intensity,
            "structure_id": structure_id,
            "hemisphere": hemisphere,
        }
    )
    cells = cells.sort_values(["z_um", "y_um", "x_um"], kind="stable").reset_index(drop=True)
    cells.insert(0, "cell_id", np.arange(1, len(cells) + 1, dtype=np.int64))
    return cells


def separate(
    pos: np.ndarray,
    diameter_um: np.ndarray,
    owner: np.ndarray,
    wheres: Sequence,
    draw: Callable,
    *,
    rounds: int = 200,
) -> np.ndarray:
    """Redraw cells until no two are closer than the mean of their diameters.

    Cells are solid bodies: two nuclei (or somata) may touch but not interpenetrate, and
    where they would, their images would add into one brighter blob that no detector, and
    no person, could split. Uniform placement alone puts a quarter of the cells of a dense
    region inside another's diameter. One cell of each close pair is redrawn in its own
    region (``draw(wheres[owner], n)``), so region counts and densities stay exact.

    Raises
    ------
    SampleError
        If the cells cannot be placed apart in ``rounds`` redraws (a region too small or
        too dense for its cells' size).
    """
    from scipy.spatial import cKDTree

    pos = np.array(pos, dtype=float)
    diam = np.asarray(diameter_um, dtype=float)
    for _ in range(rounds):
        if len(pos) < 2:
            return pos
        pairs = cKDTree(pos).query_pairs(float(diam.max()), output_type="ndarray")
        gap = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
        close = pairs[gap < 0.5 * (diam[pairs[:, 0]] + diam[pairs[:, 1]])]
        if len(close) == 0:
            return pos
        redo = np.unique(close[:, 1])
        for i in np.unique(owner[redo]):
            sel = redo[owner[redo] == i]
            pos[sel] = draw(wheres[i], len(sel))
    raise SampleError(
        f"could not place {len(pos)} cells apart (no two closer than the mean of their "
        f"diameters) in {rounds} redraws: a region is too small or too dense for its cells"
    )


def _cells_over_time(cells: pd.DataFrame, timepoints: int) -> pd.DataFrame:
    """The truth table: one row per cell and time point, intensity bleached over time."""
    frames = []
    for t in range(timepoints):
        f = cells.copy()
        f.insert(1, "t", t)
        f["intensity"] = (f["intensity"] * BLEACH_PER_TIMEPOINT**t).round(1)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)[list(CELL_COLUMNS)]


# -- imaging --------------------------------------------------------------------------------
