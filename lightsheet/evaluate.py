"""Detection scores against annotations: one-to-one matching of points within a distance.

Annotations come as point lists in voxels (CSV with columns ``z, y, x``, or a Fiji
CellCounter XML file) and are compared in µm, so anisotropic voxels count correctly. Each
detection matches at most one annotation and vice versa (an optimal assignment that
maximises the number of matches, then minimises their total distance), which is how
cellfinder, DELiVR and ClearMap papers score cell detection.

Examples
--------
>>> import numpy as np
>>> found = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 40.0, 0.0]])
>>> truth = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 30.0]])
>>> s = match_points(found, truth, max_distance_um=6.0)
>>> s.tp, s.fp, s.fn, round(s.f1, 3)
(1, 2, 1, 0.4)
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lightsheet.errors import AnnotationError

__all__ = ["MatchResult", "match_points", "read_points", "to_um"]


@dataclass(frozen=True)
class MatchResult:
    """Counts and pairs of a one-to-one matching.

    Attributes
    ----------
    tp, fp, fn : int
        Matched detections, unmatched detections, unmatched annotations.
    pairs : (M, 2) ndarray of int
        ``(detection index, annotation index)`` of each match.
    distances_um : (M,) ndarray of float
        Distance of each match.
    """

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray = field(repr=False)
    distances_um: np.ndarray = field(repr=False)

    @property
    def precision(self) -> float:
        """Matched fraction of the detections (1 when there are none)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """Matched fraction of the annotations (1 when there are none)."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall: ``2 tp / (2 tp + fp + fn)``."""
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0

    def as_dict(self) -> dict:
        """The counts and scores, for a table row."""
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def match_points(
    found_um: np.ndarray, truth_um: np.ndarray, *, max_distance_um: float | np.ndarray
) -> MatchResult:
    """Match detections to annotations one to one within ``max_distance_um``.

    Parameters
    ----------
    found_um, truth_um : (N, 3) and (M, 3) array_like
        Positions in µm (any consistent axis order).
    max_distance_um : float or (M,) array_like
        Largest distance of a match; per annotation when an array (e.g. half of each
        true cell's diameter).

    Returns
    -------
    MatchResult
        The most matches possible, and among those the smallest total distance.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    found = np.asarray(found_um, dtype=np.float64).reshape(-1, 3)
    truth = np.asarray(truth_um, dtype=np.float64).reshape(-1, 3)
    radius = np.broadcast_to(np.asarray(max_distance_um, dtype=np.float64), (len(truth),))
    empty = np.zeros((0, 2), np.int64)
    if len(found) == 0 or len(truth) == 0:
        return MatchResult(0, len(found), len(truth), empty, np.zeros(0))
    # candidate pairs only (sparse), then an exact assignment per connected group
    pairs = cKDTree(truth).query_ball_point(found, r=float(radius.max()))
    rows = np.repeat(np.arange(len(found)), [len(p) for p in pairs])
    cols = np.fromiter((j for p in pairs for j in p), np.int64, count=len(rows))
    dist = np.linalg.norm(found[rows] - truth[cols], axis=1) if len(rows) else np.zeros(0)
    ok = dist <= radius[cols]
    rows, cols, dist = rows[ok], cols[ok], dist[ok]
    n = len(found) + len(truth)
    graph = coo_matrix((np.ones(len(rows)), (rows, len(found) + cols)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    matched, distances = [], []
    order = np.argsort(group[rows], kind="stable")
    rows, cols, dist = rows[order], cols[order], dist[order]
    bounds = np.flatnonzero(np.diff(group[rows])) + 1
    for r, c, d in zip(
        np.split(rows, bounds), np.split(cols, bounds), np.split(dist, bounds), strict=True
    ):
        if len(r) == 0:
            continue
        ur, ri = np.unique(r, return_inverse=True)
        uc, ci = np.unique(c, return_inverse=True)
        # a match is worth more than any total distance: maximise matches first
        big = 1.0 + d.sum()
        cost = np.full((len(ur), len(uc)), 0.0)
        cost[ri, ci] = d - big
        a, b = linear_sum_assignment(cost)
        keep = cost[a, b] < 0
        matched.append(np.stack([ur[a[keep]], uc[b[keep]]], axis=1))
        distances.append(cost[a[keep], b[keep]] + big)
    pairs_out = np.concatenate(matched) if matched else empty
    dist_out = np.concatenate(distances) if distances else np.zeros(0)
    tp = len(pairs_out)
    return MatchResult(tp, len(found) - tp, len(truth) - tp, pairs_out, dist_out)


def read_points(path: str | Path, *, cell_type: int | None = None) -> np.ndarray:
    """Annotated positions in voxels, ``(N, 3)`` in ``(z, y, x)`` order.

    Parameters
    ----------
    path : str or Path
        A CSV file with columns ``z, y, x`` (other columns are ignored), or a Fiji
        CellCounter XML file (``MarkerX/Y/Z``: column, row, plane).
    cell_type : int, optional
        CellCounter only: keep markers of this ``Type`` (all types by default).

    Raises
    ------
    AnnotationError
        The file is missing, or holds no ``z, y, x`` columns or CellCounter markers.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found; expected a CSV or XML file")
    if path.suffix.lower() == ".xml":
        return _read_cellcounter(path, cell_type)
    table = pd.read_csv(path)
    cols = {c.strip().lower(): c for c in table.columns}
    missing = [c for c in "zyx" if c not in cols]
    if missing:
        raise AnnotationError(
            f"{path}: no column(s) {missing}; expected a CSV with columns z, y, x (voxels), "
            f"found {list(table.columns)}"
        )
    return table[[cols["z"], cols["y"], cols["x"]]].to_numpy(np.float64)


def _read_cellcounter(path: Path, cell_type: int | None) -> np.ndarray:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: not a readable XML file ({exc})") from exc
    points = []
    for mtype in root.iter("Marker_Type"):
        t = mtype.findtext("Type")
        if cell_type is not None and (t is None or int(t) != cell_type):
            continue
        for m in mtype.iter("Marker"):
            xyz = [m.findtext(k) for k in ("MarkerZ", "MarkerY", "MarkerX")]
            if None in xyz:
                raise AnnotationError(f"{path}: a Marker lacks MarkerX/MarkerY/MarkerZ")
            points.append([float(v) for v in xyz])
    if root.tag != "CellCounter_Marker_File":
        raise AnnotationError(
            f"{path}: root element is <{root.tag}>; expected a Fiji CellCounter file "
            "(<CellCounter_Marker_File>)"
        )
    return np.asarray(points, np.float64).reshape(-1, 3)


def to_um(points_vox: np.ndarray, voxel_size_um: Sequence[float]) -> np.ndarray:
    """Voxel positions ``(z, y, x)`` to µm (voxel centres at ``index × voxel size``)."""
    return np.asarray(points_vox, np.float64) * np.asarray(voxel_size_um, np.float64)
