"""Defaults derived from the physical description: cell size and voxel size.

Pure functions of ``nucleus_diameter_um`` and ``voxel_size_um``, used by the models'
``resolved`` step (`lightsheet.config.SegmentConfig.resolved`) and by the stages that take
them as arguments (`lightsheet.segment.watershed`), so each default has one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import scipy.ndimage as ndi

__all__ = [
    "SPLIT_SEPARATION",
    "default_smooth_um",
    "default_split_depth_um",
    "default_volume_range_um3",
]


def default_volume_range_um3(nucleus_diameter_um: float) -> tuple[float, float]:
    """Default size filter (µm³): spheres of half and of twice the nucleus diameter.

    Examples
    --------
    >>> lo, hi = default_volume_range_um3(10.0)
    >>> round(lo, 1), round(hi, 1)
    (65.4, 4188.8)
    """
    v = math.pi / 6.0 * float(nucleus_diameter_um) ** 3
    return v / 8.0, v * 8.0


#: Two equal nuclei of diameter ``d`` are split once their centres are this far apart (× d):
#: the neck between them is then under 92 % of their radius.
SPLIT_SEPARATION = 0.4


def default_smooth_um(voxel_size_um: Sequence[float]) -> float:
    """Default smoothing of the distance transform: half the finest voxel (µm).

    The distance transform measures to background voxel *centres*, so its values are the
    grid's rounding of the surface: on a ball's plateau they jump by up to a voxel along
    the coarse axis, which makes spurious peaks (a large nucleus cut in two along a
    z-slice). A Gaussian of half the finest voxel removes that rounding; the split depth
    (:func:`default_split_depth_um`) is measured on the same smoothed elevation.

    Examples
    --------
    >>> default_smooth_um((2.0, 1.0, 1.0))
    0.5
    """
    return min(float(v) for v in voxel_size_um) / 2.0


@lru_cache(maxsize=64)
def _pair_dynamics_um(diameter_um: float, separation_um: float, smooth_um: float) -> float:
    """Dynamics of the lower peak of two equal balls in the smoothed distance (µm).

    The distance to the union's boundary is exact (analytic): from each centre's sphere,
    or from the neck circle where the sphere's nearest point lies inside the other ball.
    It is sampled on a grid four times finer than the smoothing (or than the diameter /
    64), smoothed, and read along the axis: peak minus the value at the neck.
    """
    r, s = diameter_um / 2.0, separation_um
    h = min(smooth_um / 4.0 if smooth_um > 0 else np.inf, diameter_um / 64.0)
    reach = 4.0 * smooth_um + h
    z = np.arange(-(s / 2 + r + reach), s / 2 + r + reach + h / 2, h)
    q = np.arange(0.0, r + reach + h / 2, h)  # one quadrant across: symmetric
    q = np.concatenate([-q[:0:-1], q])
    zz, yy, xx = np.meshgrid(z, q, q, indexing="ij", sparse=True)
    rho = np.sqrt(yy**2 + xx**2)
    neck_z, neck_rho = 0.0, math.sqrt(max(r * r - s * s / 4.0, 0.0))
    to_neck = np.sqrt((zz - neck_z) ** 2 + (rho - neck_rho) ** 2)
    dist = np.full(np.broadcast_shapes(zz.shape, rho.shape), np.inf)
    inside = np.zeros(dist.shape, dtype=bool)
    for c, other in ((-s / 2, s / 2), (s / 2, -s / 2)):
        dc = np.sqrt((zz - c) ** 2 + rho**2)
        inside |= dc <= r
        # this sphere's nearest point lies along the ray from its centre; where that point
        # is inside the other ball, the nearest boundary point is on the neck circle
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(dc > 0, r / dc, 0.0)
        pz, pr = c + (zz - c) * scale, rho * scale
        visible = (pz - other) ** 2 + pr**2 >= r * r
        dist = np.minimum(dist, np.where(visible, np.abs(r - dc), to_neck))
    dist = np.where(inside, dist, 0.0)
    if smooth_um > 0:
        dist = ndi.gaussian_filter(dist, smooth_um / h, truncate=4.0)
    axis = dist[:, q.size // 2, q.size // 2]
    neck = axis[np.argmin(np.abs(z))]
    return float(axis.max() - neck)


def default_split_depth_um(
    nucleus_diameter_um: float, voxel_size_um: Sequence[float], smooth_um: float | None = None
) -> float:
    """Default watershed split depth (µm), measured on the elevation the watershed uses.

    Two equal balls of diameter ``d`` whose centres are ``s`` apart have distance peaks
    ``d/2`` and a neck of radius ``sqrt(d² - s²) / 2``. The default is the dynamics of
    such a pair at ``s = SPLIT_SEPARATION × d`` in the distance smoothed like the image's
    (``smooth_um``, default :func:`default_smooth_um` of the voxel size): pairs further
    apart split, single nuclei (whose smoothed plateau has no second peak) do not.
    Without smoothing (``smooth_um=0``), at least a quarter of the finest voxel: below
    that, peaks are the grid's rounding of the surface.

    Examples
    --------
    >>> round(default_split_depth_um(9.0, (2.0, 1.0, 1.0)), 2)
    0.21
    >>> round(default_split_depth_um(9.0, (2.0, 1.0, 1.0), smooth_um=0), 2)
    0.38
    """
    d = float(nucleus_diameter_um)
    smooth = default_smooth_um(voxel_size_um) if smooth_um is None else float(smooth_um)
    # rounded, so equal inputs computed differently share the cache
    depth = _pair_dynamics_um(round(d, 6), round(SPLIT_SEPARATION * d, 6), round(smooth, 6))
    return depth if smooth > 0 else max(depth, min(voxel_size_um) / 4.0)
