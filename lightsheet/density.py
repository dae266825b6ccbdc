"""Cells per mm³ in every atlas region, with the hierarchy and both hemispheres.

Three steps, each usable on its own:

1. `image_to_atlas` builds an `AtlasTransform`: image positions in µm ``(z, y, x)`` →
   atlas voxel indices (orientation, offset, optional affine, atlas resolution).
2. `assign_regions` looks every cell centroid up in the annotation and hemisphere volumes,
   reading only the atlas chunks that hold cells.
3. `region_table` counts cells per region and hemisphere, measures region volumes by a
   streaming pass over the annotation, rolls both up the hierarchy (a parent carries its
   descendants plus its own voxels) and divides. Cells in the background (id 0) and outside
   the atlas volume (id -1) get their own rows; none are dropped.

The row layout is the one of ``truth/density.csv`` written by `lightsheet.sample`.

`lightsheet.plots` draws the table as PNGs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dask
import numpy as np
import pandas as pd

from lightsheet.errors import AtlasCoverageWarning, AtlasError, ConfigError, TableError
from lightsheet.geometry import atlas_voxel, reorientation_um
from lightsheet.io.atlas import (
    HEMISPHERE_LEFT,
    HEMISPHERE_NONE,
    HEMISPHERE_RIGHT,
    Atlas,
    validate_orientation,
)
from lightsheet.io.tables import DENSITY_COLUMNS

if TYPE_CHECKING:
    from lightsheet.config import DensityConfig

__all__ = [
    "BACKGROUND_ID",
    "OUTSIDE_ID",
    "POSITION_COLUMNS",
    "TABLE_COLUMNS",
    "AtlasTransform",
    "assign_regions",
    "atlas_voxel",
    "image_to_atlas",
    "lookup_points",
    "region_table",
    "region_voxel_counts",
    "reorientation_um",
]

#: Structure id of cells in atlas voxels labelled 0 (inside the atlas volume, not brain).
BACKGROUND_ID = 0
#: Structure id of cells whose centroid falls outside the atlas volume.
OUTSIDE_ID = -1

POSITION_COLUMNS = ("z_um", "y_um", "x_um")
TABLE_COLUMNS = DENSITY_COLUMNS
_UM3_PER_MM3 = 1e9


# -- image → atlas ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AtlasTransform:
    """Affine map from image positions in µm ``(z, y, x)`` to atlas voxel coordinates.

    Build it with `image_to_atlas` or `AtlasTransform.from_config`.

    Attributes
    ----------
    matrix : (4, 4) ndarray of float64
        Homogeneous matrix: ``atlas_index = (matrix @ [z_um, y_um, x_um, 1])[:3]``, a
        continuous coordinate in atlas voxels where voxel ``a`` spans ``[a, a + 1)``
        (BrainGlobe's convention: its centre is at ``a + 0.5``).
    image_shape : (3,) tuple of int
        Image shape ``(Z, Y, X)``.
    voxel_size_um : (3,) tuple of float
        Image voxel size ``(z, y, x)`` in µm.
    atlas_shape : (3,) tuple of int
        Shape of the atlas the transform was made for.
    """

    matrix: np.ndarray
    image_shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float]
    atlas_shape: tuple[int, int, int]

    @classmethod
    def from_config(
        cls,
        config: DensityConfig,
        atlas: Atlas,
        *,
        image_shape: Sequence[int],
        voxel_size_um: Sequence[float],
    ) -> AtlasTransform:
        """`image_to_atlas` with the orientation, offset and affine of a `DensityConfig`."""
        return image_to_atlas(
            atlas,
            image_shape=image_shape,
            voxel_size_um=voxel_size_um,
            orientation=config.orientation,
            offset_um=config.offset_um,
            affine=config.affine,
        )

    def to_atlas_index(self, points_um: np.ndarray) -> np.ndarray:
        """Continuous atlas coordinates ``(N, 3)`` (voxel ``a`` spans ``[a, a + 1)``)."""
        pts = np.asarray(points_um, dtype=np.float64).reshape(-1, 3)
        return pts @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_atlas_voxel(self, points_um: np.ndarray) -> np.ndarray:
        """Atlas voxel ``(N, 3)`` int64 holding each image position (`atlas_voxel`)."""
        return atlas_voxel(self.to_atlas_index(points_um))

    def to_image_um(self, atlas_index: np.ndarray) -> np.ndarray:
        """Image positions ``(N, 3)`` in µm of continuous atlas coordinates ``(N, 3)``."""
        inv = np.linalg.inv(self.matrix)
        idx = np.asarray(atlas_index, dtype=np.float64).reshape(-1, 3)
        return idx @ inv[:3, :3].T + inv[:3, 3]

    def image_bounds_um(self) -> tuple[np.ndarray, np.ndarray]:
        """Low and high edges ``(3,)`` of the imaged box in image µm (voxel centres at i·v)."""
        v = np.asarray(self.voxel_size_um)
        return -0.5 * v, (np.asarray(self.image_shape) - 0.5) * v


def image_to_atlas(
    atlas: Atlas,
    *,
    image_shape: Sequence[int],
    voxel_size_um: Sequence[float],
    orientation: str = "asr",
    offset_um: Sequence[float] = (0.0, 0.0, 0.0),
    affine: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> AtlasTransform:
    """Map image positions in µm to atlas voxel coordinates.

    A centroid ``p = (z_um, y_um, x_um)`` (voxel ``i`` of the image has its centre at
    ``i * voxel_size_um``) goes through four steps, in this order:

    1. **Orientation** (`reorientation_um`, brainglobe-space). Each atlas axis ``k``
       takes the image axis ``j`` whose letter is of the same pair (a/p, s/i, l/r). Same
       letter: ``q_k = p_j``. Opposite letter: ``q_k = n_j * v_j - p_j``, mirrored about
       the image extent from voxel edges (``n_j`` voxels of ``v_j`` µm), as
       brainglobe-space's ``map_points_to``. ``q`` is in µm along the atlas axes.
    2. **Offset.** ``q += offset_um`` (atlas axis order, µm): where a sub-volume sits in
       the atlas.
    3. **Affine.** ``q = (affine @ [q, 1])[:3]``, µm → µm in atlas axes (default identity).
    4. **Scale.** ``index_k = q_k / atlas.resolution_um[k]``; the cell lies in voxel
       ``floor(index)`` (BrainGlobe: voxel ``a`` spans ``[a·res, (a+1)·res)``, see
       `atlas_voxel`), outside the atlas when that is not in ``[0, A_k)``.

    Parameters
    ----------
    atlas : Atlas
        Target atlas (its orientation, resolution and shape).
    image_shape : (3,) sequence of int
        Image shape ``(Z, Y, X)``, needed to mirror flipped axes.
    voxel_size_um : (3,) sequence of float
        Image voxel size ``(z, y, x)`` in µm.
    orientation : str
        BrainGlobe orientation of the image axes ``(z, y, x)``: the side each axis starts at.
    offset_um : (3,) sequence of float
        Translation in µm along the atlas axes, applied after reorientation.
    affine : (4, 4) array, optional
        µm → µm affine in atlas axes applied after the offset; last row ``[0, 0, 0, 1]``.

    Returns
    -------
    AtlasTransform

    Raises
    ------
    ConfigError
        Invalid orientation, voxel size, image shape, offset or affine.
    AtlasError
        The mapped image box and the atlas volume do not overlap at all.

    Examples
    --------
    An image of 50 × 80 × 100 voxels of (4, 2, 2) µm, its z axis running posterior →
    anterior ("psr"), placed 100 µm into a 10 µm "asr" atlas of 60 × 20 × 30 voxels:

    >>> atlas = Atlas.from_arrays(np.ones((60, 20, 30), np.uint32),
    ...     [{"id": 1, "acronym": "r", "name": "root", "structure_id_path": [1]}],
    ...     resolution_um=(10, 10, 10), orientation="asr")
    >>> t = image_to_atlas(atlas, image_shape=(50, 80, 100), voxel_size_um=(4, 2, 2),
    ...                    orientation="psr", offset_um=(100, 0, 0))

    The cell at (40, 60, 100) µm: z mirrors to 50·4 − 40 = 160 µm, plus the offset is
    260 µm, 26 atlas voxels; y and x scale to 6 and 10:

    >>> t.to_atlas_index([[40.0, 60.0, 100.0]]).round(3).tolist()
    [[26.0, 6.0, 10.0]]
    >>> t.to_atlas_voxel([[40.0, 60.0, 100.0], [41.0, 59.0, 100.0]]).tolist()
    [[26, 6, 10], [25, 5, 10]]
    """
    orientation = _orientation(orientation)
    shape = _int_triple(image_shape, "image_shape")
    vox = _float_triple(voxel_size_um, "voxel_size_um", positive=True)
    offset = _float_triple(offset_um, "offset_um", positive=False)

    reorient = reorientation_um(
        orientation, atlas.orientation, image_shape=shape, voxel_size_um=vox
    )
    translate = np.eye(4)
    translate[:3, 3] = offset
    aff = np.eye(4) if affine is None else _affine(affine)
    scale = np.diag([*(1.0 / r for r in atlas.resolution_um), 1.0])
    transform = AtlasTransform(scale @ aff @ translate @ reorient, shape, vox, atlas.shape)
    _check_overlap(transform, orientation, offset)
    return transform


def _check_overlap(transform: AtlasTransform, orientation: str, offset) -> None:
    lo, hi = transform.image_bounds_um()
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
    idx = transform.to_atlas_index(corners)
    a_lo, a_hi = idx.min(axis=0), idx.max(axis=0)
    if np.any(a_hi <= 0) or np.any(a_lo >= np.asarray(transform.atlas_shape)):
        raise AtlasError(
            f"image and atlas do not overlap: the image ({transform.image_shape} voxels of "
            f"{transform.voxel_size_um} µm, orientation {orientation!r}, offset {tuple(offset)} "
            f"µm) maps to atlas voxels {np.round(a_lo, 1).tolist()}..{np.round(a_hi, 1).tolist()}"
            f"; expected overlap with the atlas [0, {list(transform.atlas_shape)}). Check "
            "voxel_size_um, density.orientation, density.offset_um and density.affine"
        )


# -- cells → regions ----------------------------------------------------------------------


def assign_regions(
    cells: pd.DataFrame,
    atlas: Atlas,
    transform: AtlasTransform,
    *,
    columns: Sequence[str] = POSITION_COLUMNS,
) -> pd.DataFrame:
    """Look each cell's centroid up in the atlas.

    Only the annotation chunks that hold at least one cell are read, each once.

    Parameters
    ----------
    cells : pandas.DataFrame
        One row per cell with centroid columns in image µm (default ``z_um, y_um, x_um``).
    atlas : Atlas
        The atlas the transform maps into.
    transform : AtlasTransform
        From `image_to_atlas` for this atlas.
    columns : (3,) sequence of str
        Names of the ``(z, y, x)`` centroid columns.

    Returns
    -------
    pandas.DataFrame
        A copy of ``cells`` with ``structure_id`` (int64: the region, 0 background, -1
        outside the atlas volume) and ``hemisphere`` (uint8: 0 none, 1 left, 2 right).

    Raises
    ------
    ValueError
        Missing or non-finite centroid columns.
    AtlasError
        The transform was made for an atlas of another shape.
    """
    cols = list(columns)
    missing = [c for c in cols if c not in cells.columns]
    if missing:
        raise TableError(
            f"cells: missing centroid columns {missing}; expected {cols} (image µm, z, y, x)"
        )
    if tuple(transform.atlas_shape) != atlas.shape:
        raise AtlasError(
            f"transform was made for an atlas of shape {transform.atlas_shape}; this atlas has "
            f"shape {atlas.shape}; expected the same atlas"
        )
    points = cells[cols].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise TableError(
            f"cells: {int(bad.sum())} rows with NaN or infinite centroids (first at row "
            f"{int(np.flatnonzero(bad)[0])}); expected finite positions in µm"
        )
    structure_id, hemisphere = lookup_points(atlas, transform.to_atlas_voxel(points))
    out = cells.copy()
    out["structure_id"] = structure_id
    out["hemisphere"] = hemisphere
    return out


def lookup_points(atlas: Atlas, voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Structure id and hemisphere at integer atlas voxels, reading only occupied chunks.

    Parameters
    ----------
    atlas : Atlas
    voxels : (N, 3) ndarray of int
        Atlas voxel indices; those outside the volume give ``(-1, 0)``.

    Returns
    -------
    structure_id : (N,) ndarray of int64
    hemisphere : (N,) ndarray of uint8
    """
    voxels = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    n = len(voxels)
    structure_id = np.full(n, OUTSIDE_ID, dtype=np.int64)
    hemisphere = np.full(n, HEMISPHERE_NONE, dtype=np.uint8)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(atlas.shape)), axis=1)
    rows = np.flatnonzero(inside)
    if rows.size == 0:
        return structure_id, hemisphere
    idx = voxels[rows]
    starts = [np.cumsum((0, *c)) for c in atlas.annotation.chunks]
    block = np.stack(
        [np.searchsorted(s, idx[:, a], side="right") - 1 for a, s in enumerate(starts)], axis=1
    )
    local = idx - np.stack([starts[a][block[:, a]] for a in range(3)], axis=1)
    nblocks = atlas.annotation.numblocks
    flat = np.ravel_multi_index(block.T, nblocks)
    order = np.argsort(flat, kind="stable")
    uniq, first = np.unique(flat[order], return_index=True)
    groups = np.split(order, first[1:])
    ann_blocks = atlas.annotation.to_delayed().ravel()
    hemi_blocks = atlas.hemispheres.to_delayed().ravel()
    tasks = [
        dask.delayed(_take)(ann_blocks[b], hemi_blocks[b], local[g])
        for b, g in zip(uniq, groups, strict=True)
    ]
    for g, (ids, hem) in zip(groups, dask.compute(*tasks), strict=True):
        structure_id[rows[g]] = ids
        hemisphere[rows[g]] = hem
    return structure_id, hemisphere


def _take(annotation: np.ndarray, hemispheres: np.ndarray, local: np.ndarray):
    where = (local[:, 0], local[:, 1], local[:, 2])
    return (
        np.asarray(annotation[where]).astype(np.int64),
        np.asarray(hemispheres[where]).astype(np.uint8),
    )


# -- counting -----------------------------------------------------------------------------


def region_voxel_counts(atlas: Atlas, transform: AtlasTransform | None = None) -> pd.DataFrame:
    """Voxels of every annotation id per hemisphere, by one streaming pass over the atlas.

    Parameters
    ----------
    atlas : Atlas
    transform : AtlasTransform, optional
        When given, only atlas voxels whose centres (``(a + 0.5)·res``: the lookup's
        grid) lie inside the imaged box count, so a sub-volume's densities divide by the
        imaged part of each region.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``structure_id`` (every id present, 0 included), int64 columns ``none``,
        ``left``, ``right`` and ``total`` (voxel counts).

    Raises
    ------
    AtlasError
        Negative ids, or hemisphere values other than 0, 1, 2 (raised during the pass).
    """
    inv = None
    bounds = None
    if transform is not None:
        if tuple(transform.atlas_shape) != atlas.shape:
            raise AtlasError(
                f"transform was made for an atlas of shape {transform.atlas_shape}; this atlas "
                f"has shape {atlas.shape}; expected the same atlas"
            )
        inv = np.linalg.inv(transform.matrix)
        bounds = transform.image_bounds_um()
    ann = atlas.annotation.to_delayed().ravel()
    hem = atlas.hemispheres.to_delayed().ravel()
    starts = [np.cumsum((0, *c))[:-1] for c in atlas.annotation.chunks]
    tasks = []
    for b, (ia, ja, ka) in enumerate(np.ndindex(*atlas.annotation.numblocks)):
        origin = (starts[0][ia], starts[1][ja], starts[2][ka])
        tasks.append(dask.delayed(_count_block)(ann[b], hem[b], origin, inv, bounds))
    parts = [p for p in dask.compute(*tasks) if p[0].size]
    if parts:
        keys = np.concatenate([p[0] for p in parts])
        counts = np.concatenate([p[1] for p in parts])
        keys, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, weights=counts).astype(np.int64)
    else:
        keys = np.zeros(0, np.uint64)
        counts = np.zeros(0, np.int64)
    ids = (keys // 3).astype(np.int64)
    frame = (
        pd.DataFrame({"structure_id": ids, "h": (keys % 3).astype(np.int64), "n": counts})
        .pivot_table(index="structure_id", columns="h", values="n", aggfunc="sum", fill_value=0)
        .reindex(columns=[HEMISPHERE_NONE, HEMISPHERE_LEFT, HEMISPHERE_RIGHT], fill_value=0)
    )
    frame.columns = ["none", "left", "right"]
    frame = frame.astype(np.int64)
    frame["total"] = frame.sum(axis=1)
    frame.columns.name = None
    return frame


def _count_block(labels, hemispheres, origin, inv, bounds):
    labels = np.asarray(labels)
    hemispheres = np.asarray(hemispheres)
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise AtlasError(
            f"annotation: negative structure id {int(labels.min())} in the block at {origin}; "
            "expected ids >= 0"
        )
    if hemispheres.size and (hemispheres.max() > 2 or hemispheres.min() < 0):
        raise AtlasError(
            f"hemispheres: value {int(hemispheres.max())} in the block at {origin}; expected "
            "0 (none), 1 (left) or 2 (right)"
        )
    if inv is not None:
        mask = _inside_image(labels.shape, origin, inv, bounds)
        labels, hemispheres = labels[mask], hemispheres[mask]
    labels, hemispheres = labels.ravel(), hemispheres.ravel()
    keys, counts = [], []
    # one unique per hemisphere sorts the labels' own dtype, not a wider combined key
    for h in (HEMISPHERE_NONE, HEMISPHERE_LEFT, HEMISPHERE_RIGHT):
        ids, n = np.unique(labels[hemispheres == h], return_counts=True)
        keys.append(ids.astype(np.uint64) * np.uint64(3) + np.uint64(h))
        counts.append(n)
    return np.concatenate(keys), np.concatenate(counts)


def _inside_image(shape, origin, inv, bounds) -> np.ndarray:
    """Mask of block voxels whose centres (voxel ``a`` at ``a + 0.5``) map inside the image."""
    lo, hi = bounds
    axes = [np.arange(o, o + n, dtype=np.float64) + 0.5 for o, n in zip(origin, shape, strict=True)]
    lin = inv[:3, :3]
    if np.all(np.count_nonzero(lin, axis=1) == 1):
        # axis-aligned (orientation, offset, scaling): a box, one 1-D test per atlas axis
        mask = np.ones(shape, dtype=bool)
        for d in range(3):
            a = int(np.flatnonzero(lin[d])[0])
            coord = lin[d, a] * axes[a] + inv[d, 3]
            keep = (coord >= lo[d]) & (coord < hi[d])
            mask &= keep.reshape([-1 if k == a else 1 for k in range(3)])
        return mask
    mask = np.empty(shape, dtype=bool)
    for p, i in enumerate(axes[0]):
        # one plane at a time keeps the float temporaries to a plane's size
        plane = np.ones(shape[1:], dtype=bool)
        for d in range(3):
            coord = (
                lin[d, 1] * axes[1][:, None] + lin[d, 2] * axes[2][None, :] + lin[d, 0] * i
            ) + inv[d, 3]
            plane &= (coord >= lo[d]) & (coord < hi[d])
        mask[p] = plane
    return mask


def region_table(
    cells: pd.DataFrame,
    atlas: Atlas,
    *,
    transform: AtlasTransform | None = None,
    outside_warning_fraction: float = 0.2,
    volumes_mm3: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Cells, volumes and densities per region and hemisphere, rolled up the hierarchy.

    Parameters
    ----------
    cells : pandas.DataFrame
        Output of `assign_regions` (columns ``structure_id`` and ``hemisphere``).
    atlas : Atlas
    transform : AtlasTransform, optional
        When given, region volumes count only the atlas voxels inside the imaged box (see
        `region_voxel_counts`); leave out to use whole regions.
    outside_warning_fraction : float
        Warn (`AtlasCoverageWarning`) when more than this fraction of the cells is in the
        background or outside the atlas: usually a wrong orientation, voxel size or offset.
    volumes_mm3 : pandas.DataFrame, optional
        Own volume (mm³) of every annotation id per hemisphere, the layout of
        `region_voxel_counts` (columns ``left``, ``right``, ``total``): e.g. measured in
        sample space from registered labels (`lightsheet.register.sample_space_volumes`),
        as brainmapper does. Replaces the atlas's own voxel counts (``transform`` is then
        not used for volumes).

    Returns
    -------
    pandas.DataFrame
        Columns `TABLE_COLUMNS`: one row per structure (``structures.json`` order), then
        the background (id 0, "background": annotation voxels labelled 0, their volume and
        the cells in them) and the cells outside the atlas volume (id -1, "outside atlas",
        volume NaN). A structure's counts and volumes include all its descendants'.
        ``left``/``right`` split by the hemisphere volume; ``total`` also includes
        hemisphere 0. Densities are cells per mm³, NaN (never inf) where the volume is 0 or
        undefined; ``parent_structure_id`` and ``depth`` (root 0) are missing for roots
        and for the two special rows.

    Raises
    ------
    ValueError
        ``cells`` lacks ``structure_id`` or ``hemisphere``.
    AtlasError
        Ids in the annotation or in ``cells`` that ``structures.json`` does not list.

    Examples
    --------
    >>> atlas = Atlas.from_arrays(np.array([[[0, 2, 3, 3]]], np.uint32),
    ...     [{"id": 1, "acronym": "A", "name": "a", "structure_id_path": [1]},
    ...      {"id": 2, "acronym": "B", "name": "b", "structure_id_path": [1, 2]},
    ...      {"id": 3, "acronym": "C", "name": "c", "structure_id_path": [1, 3]}],
    ...     resolution_um=(100, 100, 100), orientation="asr")
    >>> cells = pd.DataFrame({"structure_id": [2, 3, 3, 0, -1], "hemisphere": [2, 1, 1, 0, 0]})
    >>> t = region_table(cells, atlas, outside_warning_fraction=1.0)
    >>> t[["acronym", "total_cells", "total_volume_mm3", "total_cells_per_mm3"]]
             acronym  total_cells  total_volume_mm3  total_cells_per_mm3
    0              A            3             0.003               1000.0
    1              B            1             0.001               1000.0
    2              C            2             0.002               1000.0
    3     background            1             0.001               1000.0
    4  outside atlas            1               NaN                  NaN
    """
    for col in ("structure_id", "hemisphere"):
        if col not in cells.columns:
            raise TableError(f"cells: no {col!r} column; expected the output of assign_regions")
    if not 0.0 <= outside_warning_fraction <= 1.0:
        raise ValueError(
            f"outside_warning_fraction must be in [0, 1]; got {outside_warning_fraction}"
        )
    structures = atlas.structures
    sid = cells["structure_id"].to_numpy(dtype=np.int64)
    hemi = cells["hemisphere"].to_numpy(dtype=np.int64)
    known = set(structures.index.tolist()) | {BACKGROUND_ID, OUTSIDE_ID}
    unknown_cells = sorted(set(np.unique(sid).tolist()) - known)
    if unknown_cells:
        raise AtlasError(
            f"cells: structure ids {unknown_cells[:10]} are not in the atlas's structures.json"
            f" ({atlas.path or 'in memory'}); expected ids from the annotation"
        )
    _warn_outside(sid, outside_warning_fraction)

    if volumes_mm3 is None:
        voxels, unit, unit_name = (
            region_voxel_counts(atlas, transform),
            atlas.voxel_volume_mm3,
            "voxels",
        )
    else:
        voxels, unit, unit_name = volumes_mm3, 1.0, "mm³"
    unknown = voxels.index.difference(structures.index).difference([BACKGROUND_ID])
    if len(unknown):
        n_vox = voxels.loc[unknown, "total"]
        listed = ", ".join(f"{i} ({n:g} {unit_name})" for i, n in list(n_vox.items())[:10])
        raise AtlasError(
            f"{atlas.path or 'annotation'}: annotation ids not in structures.json: {listed}"
            f"{' ...' if len(unknown) > 10 else ''}; expected every labelled id to be a structure"
        )

    # own counts per structure row (cells and voxels of exactly that id), then roll up
    pos = pd.Index(structures.index)
    nrow = len(pos)
    own_cells = np.zeros((nrow, 3), np.int64)  # columns: left, right, total
    in_region = sid > 0
    rows = pos.get_indexer(sid[in_region])
    h = hemi[in_region]
    np.add.at(own_cells[:, 0], rows[h == HEMISPHERE_LEFT], 1)
    np.add.at(own_cells[:, 1], rows[h == HEMISPHERE_RIGHT], 1)
    np.add.at(own_cells[:, 2], rows, 1)
    own_vox = np.zeros((nrow, 3), np.float64)  # exact for counts below 2**53
    listed = voxels.index[voxels.index > 0]
    own_vox[pos.get_indexer(listed)] = voxels.loc[listed, ["left", "right", "total"]].to_numpy()
    desc, anc = atlas.ancestor_pairs()
    cells_sum = np.zeros_like(own_cells)
    vox_sum = np.zeros_like(own_vox)
    np.add.at(cells_sum, anc, own_cells[desc])
    np.add.at(vox_sum, anc, own_vox[desc])

    def special(value: int) -> np.ndarray:
        m = sid == value
        return np.array(
            [
                np.count_nonzero(m & (hemi == HEMISPHERE_LEFT)),
                np.count_nonzero(m & (hemi == HEMISPHERE_RIGHT)),
                np.count_nonzero(m),
            ]
        )

    background_vox = (
        voxels.loc[BACKGROUND_ID, ["left", "right", "total"]].to_numpy()
        if BACKGROUND_ID in voxels.index
        else np.zeros(3)
    )
    counts = np.vstack([cells_sum, special(BACKGROUND_ID), special(OUTSIDE_ID)])
    # outside the atlas volume there is no volume to speak of: NaN, not 0
    volume_mm3 = np.vstack([vox_sum, background_vox, np.full(3, np.nan)]) * unit
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(volume_mm3 > 0, counts / np.where(volume_mm3 > 0, volume_mm3, 1), np.nan)

    depth = pd.array([*structures["depth"], pd.NA, pd.NA], dtype="Int64")
    table = pd.DataFrame(
        {
            "structure_id": np.concatenate([pos.to_numpy(), [BACKGROUND_ID, OUTSIDE_ID]]),
            "acronym": [*structures["acronym"], "background", "outside atlas"],
            "structure_name": [*structures["structure_name"], "background", "outside atlas"],
            "parent_structure_id": pd.array(
                [*structures["parent_structure_id"], pd.NA, pd.NA], dtype="Int64"
            ),
            "depth": depth,
            "left_cell_count": counts[:, 0],
            "right_cell_count": counts[:, 1],
            "total_cells": counts[:, 2],
            "left_volume_mm3": volume_mm3[:, 0],
            "right_volume_mm3": volume_mm3[:, 1],
            "total_volume_mm3": volume_mm3[:, 2],
            "left_cells_per_mm3": density[:, 0],
            "right_cells_per_mm3": density[:, 1],
            "total_cells_per_mm3": density[:, 2],
        }
    )
    return table[list(TABLE_COLUMNS)]


def _warn_outside(sid: np.ndarray, fraction: float) -> None:
    n = len(sid)
    if n == 0:
        return
    n_out = int(np.count_nonzero(sid == OUTSIDE_ID))
    n_bg = int(np.count_nonzero(sid == BACKGROUND_ID))
    if (n_out + n_bg) / n > fraction:
        warnings.warn(
            AtlasCoverageWarning(
                f"{n_out + n_bg} of {n} cells ({100 * (n_out + n_bg) / n:.1f}%) are not in "
                f"any atlas region ({n_out} outside the atlas volume, {n_bg} in its "
                f"background), more than outside_warning_fraction={fraction}; check "
                "voxel_size_um, density.orientation and density.offset_um. They are counted "
                "in the 'outside' and 'background' rows"
            ),
            stacklevel=2,
        )


# -- argument checks ----------------------------------------------------------------------


def _orientation(value: str) -> str:
    try:
        return validate_orientation(value, name="density.orientation (image axes z, y, x)")
    except AtlasError as exc:
        raise ConfigError(str(exc)) from None


def _int_triple(values, name) -> tuple[int, int, int]:
    vals = tuple(values)
    if len(vals) != 3 or any(int(v) != v or int(v) < 1 for v in vals):
        raise ConfigError(f"{name} must be three positive integers (Z, Y, X); got {values!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def _float_triple(values, name, *, positive) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in vals):
        kind = "positive" if positive else "finite"
        raise ConfigError(f"{name} must be three {kind} numbers (z, y, x); got {values!r}")
    return vals  # type: ignore[return-value]


def _affine(values) -> np.ndarray:
    try:
        m = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"density.affine: not a numeric 4x4 matrix: {exc}") from exc
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ConfigError(f"density.affine must be a finite 4x4 matrix; got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ConfigError(f"density.affine: last row is {m[3].tolist()}; expected [0, 0, 0, 1]")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ConfigError("density.affine is singular; expected an invertible matrix")
    return m
