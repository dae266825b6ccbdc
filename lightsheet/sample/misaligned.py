"""Samples whose brain is rotated, scaled and warped against their atlas (with the truth).

`Misalignment` is the known map from sample positions (image µm, voxel ``i`` centred at
``i·v``) to atlas positions (µm along the atlas axes, BrainGlobe's voxel ``a`` spanning
``[a·R, (a+1)·R)``)::

    q = c_atlas + M · (r - c_sample) + shift + w(r),   r = reorientation(p)

``reorientation`` is the config's orientation (brainglobe-space, as the pipeline maps
cells, `lightsheet.density.reorientation_um`); ``M = s·Rot`` a rotation and scale; ``w``
a smooth warp, a sum of Gaussian bumps inside the brain (their gradients average out over
it, so the warp adds no affine part). Everything in the sample is made by this forward map:
its anatomy is the atlas reference looked up at ``q``, each cell's truth region is the
atlas voxel ``floor(q / R)``.

`registration_case` builds the registration benchmark: an atlas (the sample phantom's
anatomy at a mouse brain's size) and the sample's autofluorescence already at the atlas
resolution, with landmarks and the truth labels. `generate_misaligned` writes a whole
acquisition (`lightsheet sample --misaligned`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lightsheet.errors import SampleError
from lightsheet.geometry import atlas_voxel, reorientation_um
from lightsheet.sample.phantom import Phantom
from lightsheet.sample.realistic import (
    CELL_MODES,
    SOMA_DENSITY_FRACTION,
    SOMA_DIAMETER_RANGE_UM,
    SOMA_DIAMETER_SD_UM,
    SOMA_DIAMETER_SHIFT_UM,
    RealisticPhantom,
    RealisticScene,
    realistic_tissue,
)
from lightsheet.sample.render import _Scene

__all__ = [
    "MISALIGNED_ATLAS_REFINEMENT",
    "MISALIGNED_SEMI_AXIS_FRACTION",
    "MOUSE_EXTENT_UM",
    "MisalignedPhantom",
    "MisalignedScene",
    "Misalignment",
    "RealisticMisalignedPhantom",
    "RealisticMisalignedScene",
    "RegistrationCase",
    "SAMPLE_MISALIGNMENT",
    "SAMPLE_ORIENTATION",
    "TEXTURE_AMPLITUDE",
    "TEXTURE_UM",
    "build_misaligned_phantom",
    "lookup_labels",
    "make_misalignment",
    "phantom_atlas",
    "registration_case",
    "sample_field",
]

#: Allen CCFv3's extent (µm) along its axes (anterior–posterior, superior–inferior,
#: right–left): a mouse brain's size for the registration benchmark.
MOUSE_EXTENT_UM = (13_200.0, 8_000.0, 11_400.0)


@dataclass(frozen=True)
class Misalignment:
    """Sample µm (image axes) → atlas µm (atlas axes); see the module docstring.

    Attributes
    ----------
    reorient : (4, 4) ndarray
        Image µm → µm along the atlas axes (`lightsheet.density.reorientation_um`).
    matrix : (3, 3) ndarray
        ``s·Rot``, applied about ``centre_sample_um``.
    centre_sample_um, centre_atlas_um, shift_um : (3,) ndarrays
        Centres (atlas axes) and the translation.
    bump_centres_um : (K, 3) ndarray
        Warp bump centres (reoriented sample µm).
    bump_sigma_um : (K,) ndarray
    bump_um : (K, 3) ndarray
        Peak displacement of each bump (atlas axes, µm).
    """

    reorient: np.ndarray
    matrix: np.ndarray
    centre_sample_um: np.ndarray
    centre_atlas_um: np.ndarray
    shift_um: np.ndarray
    bump_centres_um: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    bump_sigma_um: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bump_um: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    def warp_um(self, r: np.ndarray) -> np.ndarray:
        """The warp's displacement (µm) at reoriented sample positions ``(N, 3)``."""
        out = np.zeros_like(r, dtype=np.float64)
        for c, s, a in zip(self.bump_centres_um, self.bump_sigma_um, self.bump_um, strict=True):
            g = np.exp(-0.5 * np.sum((r - c) ** 2, axis=-1) / s**2)
            out += g[..., None] * a
        return out

    def __call__(self, points_um: np.ndarray) -> np.ndarray:
        """Atlas positions (µm, atlas axes) of sample positions ``(..., 3)`` (image µm)."""
        p = np.asarray(points_um, dtype=np.float64)
        r = p @ self.reorient[:3, :3].T + self.reorient[:3, 3]
        q = (r - self.centre_sample_um) @ self.matrix.T + self.centre_atlas_um + self.shift_um
        return q + self.warp_um(r)

    @property
    def rotation_deg(self) -> float:
        """Angle of the rotation part of `matrix`."""
        u, _, vt = np.linalg.svd(self.matrix)
        rot = u @ vt
        return float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))))

    @property
    def scale(self) -> float:
        """Atlas size over sample size (the geometric mean of `matrix`'s scales)."""
        return float(abs(np.linalg.det(self.matrix)) ** (1 / 3))


def make_misalignment(
    *,
    image_shape: Sequence[int],
    voxel_size_um: Sequence[float],
    orientation: str,
    atlas_orientation: str,
    atlas_centre_um: Sequence[float],
    brain_semi_um: Sequence[float],
    rotation_deg: float = 8.0,
    sample_scale: float = 1.05,
    shift_um: Sequence[float] | float = 0.0,
    warp_um: float = 0.0,
    n_bumps: int = 4,
    rng: np.random.Generator,
) -> Misalignment:
    """A misalignment with the brain in the middle of the image.

    Parameters
    ----------
    image_shape, voxel_size_um, orientation : the image (its axes and their orientation)
    atlas_orientation : str
    atlas_centre_um, brain_semi_um : (3,) floats
        The atlas brain's centre and semi-axes (µm, atlas axes).
    rotation_deg : float
        Rotation about a random axis.
    sample_scale : float
        Sample brain size over the atlas's (the transform scales by its inverse).
    shift_um : float or (3,) floats
        Translation of the brain off the image centre (a float: that length, random direction).
    warp_um : float
        Peak displacement of each warp bump.
    n_bumps : int
        Warp bumps, placed inside the brain, each about a third of the brain across.
    rng : numpy.random.Generator
    """
    reorient = reorientation_um(
        orientation, atlas_orientation, image_shape=image_shape, voxel_size_um=voxel_size_um
    )
    centre_image = (np.asarray(image_shape) - 1) / 2 * np.asarray(voxel_size_um)
    centre_sample = reorient[:3, :3] @ centre_image + reorient[:3, 3]
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    rot = _rotation(axis, np.radians(rotation_deg))
    if np.ndim(shift_um) == 0:
        d = rng.normal(size=3)
        shift = float(shift_um) * d / np.linalg.norm(d)
    else:
        shift = np.asarray(shift_um, dtype=np.float64)
    semi = np.asarray(brain_semi_um, dtype=np.float64) * sample_scale
    centres = centre_sample + rng.uniform(-0.5, 0.5, size=(n_bumps, 3)) * semi
    sigma = np.full(n_bumps, semi.min() / 3)
    d = rng.normal(size=(n_bumps, 3))
    bumps = warp_um * d / np.linalg.norm(d, axis=1, keepdims=True)
    return Misalignment(
        reorient=reorient,
        matrix=rot / sample_scale,
        centre_sample_um=centre_sample,
        centre_atlas_um=np.asarray(atlas_centre_um, dtype=np.float64),
        shift_um=shift,
        bump_centres_um=centres,
        bump_sigma_um=sigma,
        bump_um=bumps,
    )


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def sample_field(volume: np.ndarray, resolution_um: float, q_um: np.ndarray) -> np.ndarray:
    """Trilinear value of an atlas-grid volume (voxel ``a`` centred at ``(a + 0.5)·R``).

    Constant (edge values) outside the grid.
    """
    from scipy.ndimage import map_coordinates

    q = np.asarray(q_um, dtype=np.float64)
    coords = np.moveaxis(q / resolution_um - 0.5, -1, 0)
    return map_coordinates(volume, coords, order=1, mode="nearest").astype(np.float32)


def lookup_labels(volume: np.ndarray, resolution_um: float, q_um: np.ndarray) -> np.ndarray:
    """BrainGlobe's lookup: the atlas voxel ``floor(q / R)``, 0 outside the atlas."""
    vox = atlas_voxel(np.asarray(q_um) / resolution_um)
    inside = np.all((vox >= 0) & (vox < volume.shape), axis=-1)
    out = np.zeros(vox.shape[:-1], volume.dtype)
    v = vox[inside]
    out[inside] = volume[v[..., 0], v[..., 1], v[..., 2]]
    return out


@dataclass(frozen=True, eq=False)
class RegistrationCase:
    """An atlas and a misaligned sample at the atlas resolution, with the truth.

    Attributes
    ----------
    annotation, hemispheres, reference : (A0, A1, A2) ndarrays
        The atlas (orientation ``asr``, isotropic ``resolution_um``).
    structures : list of dict
    resolution_um : float
    image : (Z, Y, X) ndarray of float32
        The sample's autofluorescence, one voxel per atlas voxel size (``voxel_size_um``),
        axes in ``orientation``.
    voxel_size_um : (3,) tuple of float
    orientation : str
    misalignment : Misalignment
        Image µm → atlas µm, the truth.
    landmarks_um : (N, 3) ndarray
        Sample positions inside the brain (image µm) to measure landmark errors on.
    """

    annotation: np.ndarray
    hemispheres: np.ndarray
    reference: np.ndarray
    structures: list
    resolution_um: float
    image: np.ndarray
    voxel_size_um: tuple[float, float, float]
    orientation: str
    misalignment: Misalignment
    landmarks_um: np.ndarray

    def truth_labels(self, points_um: np.ndarray) -> np.ndarray:
        """Truth structure ids at sample positions (image µm)."""
        return lookup_labels(self.annotation, self.resolution_um, self.misalignment(points_um))


#: Correlation length (µm) and relative amplitude of the tissue texture of the phantom's
#: autofluorescence: real tissue has structure inside every region (fibres, vessels, cell
#: density), which registration locks onto; uniform regions would leave it nothing to see.
TEXTURE_UM = 300.0
TEXTURE_AMPLITUDE = 0.15


def phantom_atlas(
    resolution_um: float, extent_um: Sequence[float] = MOUSE_EXTENT_UM, *, seed: int = 0
):
    """The sample phantom's atlas at a mouse brain's size: annotation, hemispheres, reference.

    The reference is the phantom's autofluorescence anatomy (region-dependent brightness,
    smoothed by one voxel, times a tissue texture of `TEXTURE_UM`) on a dark background,
    without illumination effects.
    """
    from scipy.ndimage import gaussian_filter

    from lightsheet.sample.phantom import BrainGeometry, structures_json
    from lightsheet.sample.presets import REGIONS

    res = float(resolution_um)
    shape = tuple(max(8, round(e / res)) for e in extent_um)
    geometry = BrainGeometry.for_volume(shape, (res, res, res))
    # BrainGeometry centres the brain on voxel centres i·R; the atlas's are (i + 0.5)·R
    annotation, hemispheres = geometry.atlas(shape, res)
    level = np.ones(shape, np.float32)
    for r in REGIONS:
        level[annotation == r.id] = r.anatomy
    level = gaussian_filter(level, sigma=1.0, mode="nearest")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 23]))
    texture = gaussian_filter(rng.standard_normal(shape), sigma=TEXTURE_UM / res, mode="wrap")
    level *= 1.0 + TEXTURE_AMPLITUDE * texture / max(float(texture.std()), 1e-12)
    z, y, x = ((np.arange(n, dtype=float) + 0.5) * res for n in shape)
    brain = geometry.brain_weight(
        z[:, None, None], y[None, :, None], x[None, None, :], edge_um=max(3.0, 0.5 * res)
    )
    reference = (200.0 * level * brain + 20.0).astype(np.float32)
    return annotation, hemispheres, reference, structures_json(), geometry


def registration_case(
    *,
    resolution_um: float = 50.0,
    orientation: str = "ipl",
    rotation_deg: float = 8.0,
    sample_scale: float = 1.05,
    shift_voxels: float = 10.0,
    warp_voxels: float = 2.5,
    noise: float = 0.03,
    illumination: float = 0.1,
    n_landmarks: int = 1000,
    extent_um: Sequence[float] = MOUSE_EXTENT_UM,
    seed: int = 0,
) -> RegistrationCase:
    """The registration benchmark: a phantom atlas and a misaligned, reoriented sample.

    The sample's autofluorescence is the atlas reference at the misaligned positions, under
    a smooth illumination gradient in sample space, with another gain and gamma than the
    template (mutual information must see through them) and multiplicative noise.

    Parameters
    ----------
    resolution_um : float
        Atlas resolution; the sample image has this voxel size too (as after downsampling).
    orientation : str
        Orientation of the sample image's axes (the atlas is ``asr``).
    rotation_deg, sample_scale : float
        The rotation and the sample's size against the atlas.
    shift_voxels, warp_voxels : float
        Translation and peak warp displacement, in atlas voxels.
    noise : float
        Relative noise per voxel.
    illumination : float
        Fall-off of the illumination across the sample's last axis (0.1: 10 %).
    n_landmarks : int
        Random landmark positions inside the sample brain.
    extent_um : (3,) floats
        Atlas extent (default: a mouse brain's, `MOUSE_EXTENT_UM`).
    seed : int
    """
    from lightsheet.geometry import reorientation_um as _reorient

    rng = np.random.default_rng(np.random.SeedSequence([seed, 22]))
    res = float(resolution_um)
    annotation, hemispheres, reference, structures, geometry = phantom_atlas(
        res, extent_um, seed=seed
    )
    atlas_shape = np.asarray(annotation.shape)
    # the image: the atlas box grown to hold the scaled, rotated and shifted brain, in the
    # sample's own axis order
    grow = sample_scale * 1.06 + 2 * shift_voxels / atlas_shape.min()
    perm = _reorient("asr", orientation, image_shape=atlas_shape, voxel_size_um=(res,) * 3)
    order = np.abs(perm[:3, :3]).argmax(axis=1)  # image axis k ← atlas axis order[k]
    image_shape = tuple(int(math.ceil(atlas_shape[a] * grow)) for a in order)
    vox = (res, res, res)
    mis = make_misalignment(
        image_shape=image_shape,
        voxel_size_um=vox,
        orientation=orientation,
        atlas_orientation="asr",
        atlas_centre_um=geometry.centre_um,
        brain_semi_um=geometry.semi_um,
        rotation_deg=rotation_deg,
        sample_scale=sample_scale,
        shift_um=shift_voxels * res,
        warp_um=warp_voxels * res,
        rng=rng,
    )
    grid = np.stack(np.meshgrid(*[np.arange(n) * res for n in image_shape], indexing="ij"), axis=-1)
    q = mis(grid)
    tissue = sample_field(reference, res, q)
    # illumination falls off across the sample's last axis; another gain and gamma
    illum = 1.0 - illumination * np.linspace(0, 1, image_shape[2])[None, None, :]
    image = 3.0 * (tissue**1.2) * illum
    image *= 1.0 + noise * rng.standard_normal(image.shape)
    brain_q = lookup_labels(annotation, res, q) > 0
    inside = np.flatnonzero(brain_q.ravel())
    pick = rng.choice(inside, size=min(n_landmarks, inside.size), replace=False)
    landmarks = grid.reshape(-1, 3)[pick] + rng.uniform(-0.5, 0.5, (pick.size, 3)) * res
    return RegistrationCase(
        annotation=annotation,
        hemispheres=hemispheres,
        reference=reference,
        structures=structures,
        resolution_um=res,
        image=image.astype(np.float32),
        voxel_size_um=vox,
        orientation=orientation,
        misalignment=mis,
        landmarks_um=landmarks,
    )


# -- the misaligned acquisition (lightsheet sample --misaligned) ------------------------------

#: Orientation of the misaligned sample's image axes (z, y, x): starts inferior, posterior,
#: left, so every axis is mirrored against the atlas and z and y swap roles.
SAMPLE_ORIENTATION = "ipl"
#: The misalignment of `lightsheet sample --misaligned` (shift and warp in atlas voxels).
SAMPLE_MISALIGNMENT = {
    "rotation_deg": 8.0,
    "sample_scale": 1.05,
    "shift_voxels": 3.0,
    "warp_voxels": 1.5,
}
#: The brain's semi-axes as a fraction of the atlas extent: smaller than the aligned
#: sample's, so the rotated, scaled and shifted brain stays inside the image.
MISALIGNED_SEMI_AXIS_FRACTION = 0.36
#: The misaligned sample's atlas is this much finer than the aligned sample's, so its thinnest
#: cortical layer spans a few atlas voxels (as a real atlas's do) and registration can place
#: cells in it: at the aligned sample's resolution it is one voxel thick.
MISALIGNED_ATLAS_REFINEMENT = 2


def build_misaligned_phantom(
    size: str = "tiny",
    *,
    seed: int = 0,
    channels: int = 2,
    realistic: bool = False,
    cells: str = "nuclei",
):
    """The content of a misaligned sample: atlas, misalignment, cells, fields.

    ``realistic``: image it as textured tissue (`lightsheet.sample.realistic`: the anatomy's
    levels through the misalignment; texture, vessels, debris, sheet decay and stripes in
    the image's frame), with ``cells`` "nuclei" or sparse "somata".

    The atlas (orientation ``asr``, the sample preset's resolution) spans the image's
    extent along the matching axes; the brain sits in it as in the aligned sample, a little
    smaller. The image shows it through `Misalignment` (`SAMPLE_ORIENTATION`,
    `SAMPLE_MISALIGNMENT`). Cells are placed uniformly in sample space at each region's
    density; their truth region and side are the atlas voxel their position maps to.

    Returns
    -------
    lightsheet.sample.Phantom
        Whose `truth_volumes` are the labels on a grid of half an atlas voxel in sample
        space (volumes as the sample has them, which registration measures).
    """
    from lightsheet.psf import psf_from_optics
    from lightsheet.sample.phantom import BrainGeometry, structures_json
    from lightsheet.sample.presets import CHANNELS, OPTICS, VOXEL_SIZE_UM, _check_args
    from lightsheet.sample.render import _background_fields

    preset = _check_args(size, seed, channels, 1)
    if cells not in CELL_MODES or (cells != "nuclei" and not realistic):
        raise SampleError(
            f"cells: got {cells!r}; expected one of {list(CELL_MODES)}, and 'nuclei' unless "
            "realistic"
        )
    vox = VOXEL_SIZE_UM
    res = preset.atlas_resolution_um(vox) / MISALIGNED_ATLAS_REFINEMENT
    reorient = reorientation_um(
        SAMPLE_ORIENTATION, "asr", image_shape=preset.shape_zyx, voxel_size_um=vox
    )
    extent = np.abs(reorient[:3, :3]) @ (np.asarray(preset.shape_zyx) * vox)
    shape = tuple(int(math.ceil(round(e / res, 9))) for e in extent)
    geometry = BrainGeometry(tuple(0.5 * extent), tuple(MISALIGNED_SEMI_AXIS_FRACTION * extent))
    annotation, hemispheres = geometry.atlas(shape, res)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 24]))
    m = SAMPLE_MISALIGNMENT
    mis = make_misalignment(
        image_shape=preset.shape_zyx,
        voxel_size_um=vox,
        orientation=SAMPLE_ORIENTATION,
        atlas_orientation="asr",
        atlas_centre_um=geometry.centre_um,
        brain_semi_um=geometry.semi_um,
        rotation_deg=m["rotation_deg"],
        sample_scale=m["sample_scale"],
        shift_um=m["shift_voxels"] * res,
        warp_um=m["warp_voxels"] * res,
        rng=rng,
    )
    labels = _sample_space_labels(mis, annotation, hemispheres, res, preset.shape_zyx, vox)
    table = _misaligned_cells(
        mis, annotation, hemispheres, res, labels, rng=rng, somata=cells == "somata"
    )
    common = {
        "preset": preset,
        "voxel_size_um": vox,
        "resolution_um": res,
        "geometry": geometry,
        "annotation": annotation,
        "hemispheres": hemispheres,
        "structures": structures_json(),
        "cells": table,
        "psf": psf_from_optics(voxel_size_um=vox, **OPTICS),
        "misalignment": mis,
        "sample_labels": labels,
    }
    if not realistic:
        chans = CHANNELS[:channels]
        fields = _background_fields(geometry, annotation, res, chans, seed)
        return MisalignedPhantom(**common, channels=chans, fields=fields)
    # vessels and debris in the brain as the image frames it (the aligned sample's place)
    in_image = BrainGeometry.for_volume(preset.shape_zyx, vox)
    chans, fields, bright = realistic_tissue(
        geometry, annotation, res, channels, cells, seed, structures_geometry=in_image
    )
    return RealisticMisalignedPhantom(
        **common, channels=chans, fields=fields, cell_mode=cells, bright=bright, seed=int(seed)
    )


def _sample_space_labels(mis, annotation, hemispheres, res, image_shape, vox):
    """Annotation and hemispheres on a grid of R/2 in sample space (image axes), and R/2.

    Cell ``j`` of the grid spans ``[j h, (j + 1) h) - v/2`` along each axis (from the image's
    low edge), labelled at its centre.
    """
    h = 0.5 * res
    axes = [
        (np.arange(math.ceil(round(n * v / h, 9))) + 0.5) * h - 0.5 * v
        for n, v in zip(image_shape, vox, strict=True)
    ]
    ann = np.zeros([len(a) for a in axes], annotation.dtype)
    hem = np.zeros(ann.shape, np.uint8)
    for i, z in enumerate(axes[0]):
        p = np.stack(np.broadcast_arrays(z, axes[1][:, None], axes[2][None, :]), axis=-1)
        q = mis(p)
        ann[i] = lookup_labels(annotation, res, q)
        hem[i] = lookup_labels(hemispheres, res, q)
    return ann, hem, h, axes


def _misaligned_cells(mis, annotation, hemispheres, res, labels, *, rng, somata=False):
    """Nuclei uniform in sample space at each region's density; truth = atlas voxel at q.

    ``somata``: sparse somata instead, at the density and sizes of
    `lightsheet.sample.realistic.soma_cells`.
    """
    from lightsheet.sample.phantom import cells_frame, draw_diameters, separate
    from lightsheet.sample.presets import REGIONS

    factor, shift = (SOMA_DENSITY_FRACTION, SOMA_DIAMETER_SHIFT_UM) if somata else (1.0, 0.0)
    sizes = (
        {"diameter_range_um": SOMA_DIAMETER_RANGE_UM, "diameter_sd_um": SOMA_DIAMETER_SD_UM}
        if somata
        else {}
    )

    ann_s, _, h, axes = labels
    voxel_mm3 = h**3 * 1e-9
    parts = []
    for region in REGIONS:
        if region.density_cells_per_mm3 is None:
            continue
        where = np.flatnonzero(ann_s.ravel() == region.id)
        n = int(round(factor * region.density_cells_per_mm3 * where.size * voxel_mm3))
        if n:
            parts.append((region, where, n))

    def draw(part, n: int) -> np.ndarray:
        region, where = part
        out = np.empty((0, 3))
        while len(out) < n:
            # a cell of the grid labelled with the region, a point in it, kept where the
            # point itself maps into the region: uniform over the region's sample space
            k = np.stack(np.unravel_index(rng.choice(where, size=2 * n), ann_s.shape), axis=1)
            centre = np.stack([axes[a][k[:, a]] for a in range(3)], axis=1)
            p = np.round(centre + rng.uniform(-0.5 * h, 0.5 * h, size=centre.shape), 3)
            p = p[lookup_labels(annotation, res, mis(p)) == region.id]
            out = np.concatenate([out, p])
        return out[:n]

    wheres = [(r, w) for r, w, _ in parts]
    positions = [draw(w, n) for w, (_, _, n) in zip(wheres, parts, strict=True)]
    owner = np.concatenate([np.full(n, i) for i, (_, _, n) in enumerate(parts)]).astype(int)
    pos = np.concatenate(positions) if positions else np.empty((0, 3))
    diam = draw_diameters(
        np.array([parts[i][0].diameter_um + shift for i in owner]), rng=rng, **sizes
    )
    pos = separate(pos, diam, owner, wheres, draw)
    q = mis(pos)
    ids = lookup_labels(annotation, res, q).astype(np.int64)
    hemi = lookup_labels(hemispheres, res, q).astype(np.int64)
    return cells_frame(pos, diam, ids, hemi, rng=rng)


class MisalignedScene(_Scene):
    """`_Scene` whose autofluorescence is the atlas-grid field at ``q = T(p)``."""

    def __init__(self, *args, misalignment: Misalignment, **kwargs):
        super().__init__(*args, **kwargs)
        self.misalignment = misalignment

    def _field(self, grid, lo, hi):
        axes = [np.arange(lo[a], hi[a]) * self.vox[a] for a in range(3)]
        out = np.empty([len(a) for a in axes], np.float32)
        for i, z in enumerate(axes[0]):
            p = np.stack(np.broadcast_arrays(z, axes[1][:, None], axes[2][None, :]), -1)
            out[i] = sample_field(grid, self.res_um, self.misalignment(p))
        return out


@dataclass(frozen=True, eq=False)
class MisalignedPhantom(Phantom):
    """A `Phantom` seen through a `Misalignment` (see `build_misaligned_phantom`)."""

    misalignment: Misalignment | None = None
    sample_labels: tuple = ()

    def scene(self, origin_um=(0.0, 0.0, 0.0), *, sheet_um=None) -> MisalignedScene:
        """`Phantom.scene`, in the one frame of the whole acquisition (no tile offsets)."""
        self._one_frame(origin_um)
        return MisalignedScene(
            self.cells, self.psf, self.voxel_size_um, self.resolution_um, self.fields,
            misalignment=self.misalignment,
        )  # fmt: skip

    @staticmethod
    def _one_frame(origin_um) -> None:
        if np.any(np.asarray(origin_um, float) != 0.0):
            raise SampleError(
                f"a misaligned sample is rendered in one frame; got a tile origin {origin_um} "
                "µm, expected (0, 0, 0)"
            )

    def truth_volumes(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Labels on the sample-space grid and its spacing: volumes as imaged."""
        ann, hem, h, _ = self.sample_labels
        return ann, hem, h


class RealisticMisalignedScene(MisalignedScene, RealisticScene):
    """`RealisticScene` whose anatomy is the atlas-grid field at ``q = T(p)``.

    Texture, vessels, debris, the sheet's decay and its stripes stay in the image's frame,
    as the tissue and the microscope put them; only the anatomy is misaligned.
    """


@dataclass(frozen=True, eq=False)
class RealisticMisalignedPhantom(MisalignedPhantom, RealisticPhantom):
    """A `MisalignedPhantom` imaged as `RealisticPhantom`'s textured tissue."""

    def scene(self, origin_um=(0.0, 0.0, 0.0), *, sheet_um=None) -> RealisticMisalignedScene:
        """`MisalignedPhantom.scene` with the textured tissue (one frame, one sheet)."""
        self._one_frame(origin_um)
        return RealisticMisalignedScene(
            self.cells, self.psf, self.voxel_size_um, self.resolution_um, self.fields,
            misalignment=self.misalignment, **self.scene_kwargs(sheet_um),
        )  # fmt: skip
