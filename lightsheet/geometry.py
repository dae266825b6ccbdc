"""Coordinate geometry shared by the stages and the sample generator (no stage imports).

BrainGlobe's atlas-voxel lookup (`atlas_voxel`), the map of image µm onto atlas axes
(`reorientation_um`), and tile origins on a regular overlapping grid (`nominal_positions`).
`lightsheet.density`, `lightsheet.register` and `lightsheet.stitch` use them, and so does
`lightsheet.sample`, which must build its ground truth without importing the stages it
tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["atlas_voxel", "nominal_positions", "reorientation_um"]


def atlas_voxel(atlas_index: np.ndarray) -> np.ndarray:
    """The atlas voxel holding each continuous atlas coordinate, BrainGlobe's way.

    Voxel ``a`` spans ``[a, a + 1)`` in atlas voxel units, i.e. ``[a·res, (a+1)·res)`` in
    atlas µm: brainglobe-atlasapi's ``structure_from_coords(coords_um, microns=True)``
    looks up ``int(coord_um / resolution)``. Inside the atlas the two agree exactly;
    below 0 this takes the floor (a voxel ``-1``, outside the atlas) where Python's
    ``int`` truncates towards voxel 0.

    Examples
    --------
    >>> atlas_voxel(np.array([[0.0, 0.99, 1.0], [12.5, -0.2, 3.999]])).tolist()
    [[0, 0, 1], [12, -1, 3]]
    """
    return np.floor(np.asarray(atlas_index, dtype=np.float64)).astype(np.int64)


def reorientation_um(
    orientation: str,
    atlas_orientation: str,
    *,
    image_shape: Sequence[int],
    voxel_size_um: Sequence[float],
) -> np.ndarray:
    """Homogeneous (4, 4) map of image µm ``(z, y, x)`` to µm along the atlas axes.

    brainglobe-space's ``AnatomicalSpace.transformation_matrix_to`` does the maths: axes
    are permuted to the atlas's order, and an axis running the other way is mirrored
    about the image's extent measured from voxel edges, ``p → N·v − p`` (``N`` voxels of
    ``v`` µm), exactly as ``map_points_to`` maps points.

    Parameters
    ----------
    orientation : str
        BrainGlobe orientation of the image axes.
    atlas_orientation : str
        BrainGlobe orientation of the atlas axes.
    image_shape : (3,) sequence of int
        Image shape ``(Z, Y, X)``.
    voxel_size_um : (3,) sequence of float
        Image voxel size in µm.
    """
    from brainglobe_space import AnatomicalSpace

    vox = np.asarray(voxel_size_um, dtype=np.float64)
    source = AnatomicalSpace(
        orientation, shape=tuple(int(n) for n in image_shape), resolution=tuple(vox)
    )
    target = AnatomicalSpace(atlas_orientation, resolution=(1.0, 1.0, 1.0))
    # brainglobe-space maps voxel coordinates: take µm in by dividing by the voxel size
    return source.transformation_matrix_to(target) @ np.diag([*(1.0 / vox), 1.0])


def nominal_positions(
    grid_zyx: Sequence[int], tile_shape: Sequence[int], overlap: Sequence[float]
) -> np.ndarray:
    """Tile origins (voxels) on a regular grid whose neighbours share ``overlap`` of a side.

    Examples
    --------
    >>> nominal_positions((1, 1, 3), (10, 100, 100), (0, 0, 0.15))[:, 2].tolist()
    [0.0, 85.0, 170.0]
    """
    step = [t * (1 - o) for t, o in zip(tile_shape, overlap, strict=True)]
    return np.array(
        [[i * s for i, s in zip(idx, step, strict=True)] for idx in np.ndindex(*grid_zyx)],
        dtype=float,
    ).reshape(-1, 3)
