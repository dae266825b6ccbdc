"""Registration of overlapping tiles: nominal positions, pairwise shifts, a global solve.

Positions are tile origins (the centre of a tile's voxel 0) in voxels of the stitched
volume, ``(n, 3)`` float arrays over the tiles of one time point and channel in grid order
(z slowest). The stitched volume's voxel 0 is the nominal frame's origin: the smallest
nominal position along each axis.

1. Nominal positions come from the tile grid and ``overlap`` (`nominal_positions`), or from
   a CSV of stage positions in µm (`read_positions`).
2. Every pair of tiles whose nominal boxes overlap is a link (`find_links`). The side
   links (neighbours along one grid axis) are registered, each by
   `lightsheet.stitch.pairwise.register_link`: phase correlation on the most textured
   window of the nominal overlap (at most ``MAX_WINDOW_VOXELS``), refined to sub-voxel
   precision by maximising the normalised cross-correlation (NCC) under linear
   interpolation. The NCC at the nominal and at the found offset are kept, and the NCC at
   the best other peak of the search (``ncc_second``). Diagonal links (tiles sharing a
   corner or an edge) are registered only for tiles the kept side links leave apart
   (`rescue_links`).
3. A link is kept when its NCC beats every NCC found the same way between boxes that do
   not overlap (a link's box against the far side of its partner, for up to
   `MAX_NULL_LINKS` links: a null distribution from the data, as ashlar does), is at
   least `PEAK_RATIO` times its ``ncc_second`` (a distinct peak), and its shift is within
   the search range. A link not kept is registered again on a window of up to
   `RETRY_WINDOW_VOXELS` and judged against nulls of that size before it is dropped.
   `solve` then finds the positions that best agree with the kept links (least squares,
   weighted by NCC times the voxels compared), and drops, one at a time, the link that
   disagrees most with the others while any disagrees by more than ``max_residual_vox``.
   Each connected group of tiles keeps the mean of its nominal positions (stage errors
   average out); a tile left with no link stays at its nominal position, and is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lightsheet.errors import ConfigError, TileGridError
from lightsheet.geometry import nominal_positions
from lightsheet.stitch.pairwise import MAX_WINDOW_VOXELS, register_link

__all__ = [
    "MAX_NULL_LINKS",
    "PEAK_RATIO",
    "RETRY_WINDOW_VOXELS",
    "Link",
    "Solution",
    "check_layout",
    "find_links",
    "judge_links",
    "link_table",
    "nominal_positions",
    "read_positions",
    "register",
    "rescue_links",
    "solve",
    "spatial_tiles",
]

#: Links whose null NCC (against a box they do not overlap) is measured: evenly chosen.
MAX_NULL_LINKS = 8
#: Largest window of a link registered again after failing on its first window
#: (`lightsheet.stitch.pairwise.MAX_WINDOW_VOXELS`): an overlap of little texture gets
#: more voxels before it is dropped.
RETRY_WINDOW_VOXELS = 2**21
#: A link's NCC must be at least this many times the NCC at its best other peak.
PEAK_RATIO = 2.5


@dataclass
class Link:
    """One registered pair of overlapping tiles (indices into the tile list)."""

    a: int
    b: int
    nominal_vox: tuple[float, float, float]  # nominal position of b minus a's
    shift_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)  # found offset minus nominal
    ncc_before: float = float("nan")
    ncc_after: float = float("nan")
    ncc_second: float = float("nan")  # at the best other peak of the cross-correlation
    ncc_null: float = float("nan")  # this link's box against a box it does not overlap
    voxels: int = 0  # voxels of the overlap window compared
    window: tuple = ()  # the window of tile a compared: (start, stop) per axis
    kept: bool = False
    reason: str = ""
    residual_vox: tuple[float, float, float] = field(default=(math.nan,) * 3)

    @property
    def offset_vox(self) -> np.ndarray:
        """Measured position of b minus a's, in voxels."""
        return np.add(self.nominal_vox, self.shift_vox)

    def to_dict(self) -> dict:
        """Plain data (JSON)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def read_positions(
    path: str | Path,
    values: dict[str, list[str]],
    grid_zyx: Sequence[int],
    voxel_size_um: Sequence[float],
) -> np.ndarray:
    """Tile origins (voxels) from a CSV of stage positions in µm.

    The CSV has ``z_um, y_um, x_um`` (the tile's first voxel centre) and, for each of
    ``z, y, x`` that the tile grid has more than one of, a column with the tile's value as
    the file names give it (``values``; digits compare as numbers). The result is shifted
    so that the smallest position along each axis is 0.

    Raises
    ------
    ConfigError
        Missing columns, a tile without a row or with two, non-finite positions.
    """
    import pandas as pd

    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"stitch.positions: cannot read {path} as CSV ({exc})") from exc
    axes = [a for a, n in zip("zyx", grid_zyx, strict=True) if n > 1]
    needed = [*axes, "z_um", "y_um", "x_um"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ConfigError(
            f"stitch.positions: {path} lacks columns {missing}; expected {needed} (tile grid "
            "values as in the file names, positions of each tile's first voxel in µm)"
        )

    def key(value: str) -> str:
        v = str(value).strip()
        return str(int(v)) if v.isdigit() else v

    rows: dict[tuple, np.ndarray] = {}
    for _, row in table.iterrows():
        k = tuple(key(row[a]) for a in axes)
        try:
            um = np.array([float(row[f"{a}_um"]) for a in "zyx"])
        except ValueError as exc:
            raise ConfigError(f"stitch.positions: {path}, tile {k}: {exc}") from exc
        if not np.isfinite(um).all():
            raise ConfigError(f"stitch.positions: {path}, tile {k}: position {um} not finite")
        if k in rows:
            raise ConfigError(f"stitch.positions: {path} has two rows for tile {k}")
        rows[k] = um
    out = []
    for idx in np.ndindex(*grid_zyx):
        k = tuple(key(values[a][i]) for a, i in zip("zyx", idx, strict=True) if a in axes)
        if k not in rows:
            raise ConfigError(
                f"stitch.positions: {path} has no row for tile {dict(zip(axes, k, strict=True))}"
                f"; expected one row per tile ({math.prod(grid_zyx)})"
            )
        out.append(rows[k])
    pos = np.array(out) / np.asarray(voxel_size_um, dtype=float)
    return pos - pos.min(axis=0)


def find_links(positions: np.ndarray, tile_shape: Sequence[int]) -> list[Link]:
    """Every pair of tiles whose boxes overlap by at least one voxel along every axis."""
    tile = np.asarray(tile_shape, dtype=float)
    links = []
    for a in range(len(positions)):
        for b in range(a + 1, len(positions)):
            d = positions[b] - positions[a]
            if np.all(tile - np.abs(d) >= 1):
                links.append(Link(a, b, tuple(float(v) for v in d)))
    return links


def judge_links(
    links: list[Link], max_shift_vox: Sequence[float], threshold: float | None = None
) -> float:
    """Keep links whose NCC beats the null threshold and their other peaks, shift in range.

    ``threshold``: default the largest NCC found between boxes that do not overlap
    (``ncc_null`` of the links that measured one). A link's NCC must also be at least
    `PEAK_RATIO` times its ``ncc_second`` (the best other peak of its own search): an
    overlap whose structure repeats (or has none) correlates almost as well at a wrong
    shift. Returns the threshold used.
    """
    if threshold is None:
        nulls = [lk.ncc_null for lk in links if math.isfinite(lk.ncc_null)]
        threshold = max(nulls) if nulls else 0.0
    for lk in links:
        if not math.isfinite(lk.ncc_after) or lk.ncc_after <= threshold:
            lk.kept, lk.reason = False, f"NCC {lk.ncc_after:.3f} ≤ null {threshold:.3f}"
        elif lk.ncc_after < PEAK_RATIO * lk.ncc_second:
            lk.kept = False
            lk.reason = f"peak not distinct: NCC {lk.ncc_after:.3f}, another {lk.ncc_second:.3f}"
        elif np.any(np.abs(lk.shift_vox) > np.asarray(max_shift_vox)):
            lk.kept, lk.reason = False, "shift beyond max_shift_um"
        else:
            lk.kept, lk.reason = True, ""
    return threshold


@dataclass
class Solution:
    """Registered tile positions and how they were found."""

    positions: np.ndarray  # (n, 3) voxels
    nominal: np.ndarray  # (n, 3) voxels
    links: list[Link]
    fallback: list[int]  # tiles left at their nominal position (no kept link)
    null_ncc: float = float("nan")

    def to_dict(self) -> dict:
        """Plain data (JSON) for lineage records."""
        return {
            "positions_vox": self.positions.round(4).tolist(),
            "nominal_vox": self.nominal.round(4).tolist(),
            "fallback_tiles": list(self.fallback),
            "null_ncc": self.null_ncc,
            "links": [lk.to_dict() for lk in self.links],
        }


def solve(nominal: np.ndarray, links: list[Link], *, max_residual_vox: float = 1.0) -> Solution:
    """Positions that best agree with the kept links; inconsistent links dropped.

    Parameters
    ----------
    nominal : (n, 3) ndarray
        Nominal tile origins in voxels.
    links : list of Link
        Judged links (`judge_links`); ``kept`` and ``residual_vox`` are updated.
    max_residual_vox : float
        A kept link may disagree with the solved positions by at most this many voxels
        along any axis; the worst offender is dropped and the rest solved again.

    Returns
    -------
    Solution
    """
    nominal = np.asarray(nominal, dtype=float)
    while True:
        positions, groups = _least_squares(nominal, [lk for lk in links if lk.kept])
        worst, worst_r = None, max_residual_vox
        for lk in links:
            r = positions[lk.b] - positions[lk.a] - lk.offset_vox
            lk.residual_vox = tuple(float(v) for v in r)
            if lk.kept and np.abs(r).max() > worst_r:
                worst, worst_r = lk, float(np.abs(r).max())
        if worst is None:
            break
        worst.kept = False
        worst.reason = f"disagrees with the other links by {worst_r:.2f} voxels"
    fallback = [g[0] for g in groups if len(g) == 1 and len(nominal) > 1]
    return Solution(positions, nominal, links, fallback)


def _least_squares(nominal: np.ndarray, kept: list[Link]) -> tuple[np.ndarray, list[list[int]]]:
    """Weighted least squares of the corrections to nominal, mean zero per connected group."""
    n = len(nominal)
    groups = _components(n, [(lk.a, lk.b) for lk in kept])
    rows, rhs, weights = [], [], []
    for lk in kept:
        row = np.zeros(n)
        row[lk.b], row[lk.a] = 1.0, -1.0
        rows.append(row)
        rhs.append(lk.offset_vox - (nominal[lk.b] - nominal[lk.a]))
        # more voxels and a better match weigh more (a corner link counts less than a side)
        weights.append(max(lk.ncc_after, 1e-3) * max(lk.voxels, 1))
    for g in groups:  # gauge: each group keeps its mean nominal position
        row = np.zeros(n)
        row[g] = 1.0
        rows.append(row)
        rhs.append(np.zeros(3))
        weights.append(1.0)
    w = np.asarray(weights)
    w[len(kept) :] = w[: len(kept)].max() if kept else 1.0  # the gauge as firm as any link
    w = np.sqrt(w)[:, None]
    correction, *_ = np.linalg.lstsq(np.asarray(rows) * w, np.asarray(rhs) * w, rcond=None)
    return nominal + correction, groups


def _components(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def check_layout(positions: np.ndarray, tile_shape: Sequence[int]) -> None:
    """Refuse positions under which two tiles coincide (a wrong overlap or positions file)."""
    for a in range(len(positions)):
        for b in range(a + 1, len(positions)):
            if np.all(np.abs(positions[b] - positions[a]) < 0.5 * np.asarray(tile_shape)):
                raise TileGridError(
                    f"stitch: tiles {a} and {b} would overlap by more than half a tile at "
                    f"positions {positions[a].round(1).tolist()} and "
                    f"{positions[b].round(1).tolist()} (voxels); expected neighbours sharing "
                    "less than half their side (check stitch.overlap or stitch.positions)"
                )


def register(
    manifest,
    nominal: np.ndarray,
    *,
    channel: int = 0,
    timepoint: int = 0,
    max_shift_vox: Sequence[float],
    max_residual_vox: float = 1.0,
) -> Solution:
    """Register the tiles of one channel and time point; the result holds for all.

    Parameters
    ----------
    manifest : lightsheet.ingest.Manifest
        The checked tiles.
    nominal : (n, 3) ndarray
        Nominal tile origins (voxels), tiles in grid order.
    channel, timepoint : int
        Which tiles to register (indices into the manifest's grid).
    max_shift_vox : (3,) sequence of float
        Largest stage error searched, per axis, in voxels.
    max_residual_vox : float
        See `solve`.

    Returns
    -------
    Solution
        With the registered links only. Pairwise links run in parallel on the current
        Dask scheduler, one task per link reading only its two windows (and the far box
        for the null NCC).
    """
    tiles = spatial_tiles(manifest, channel=channel, timepoint=timepoint)
    shape = tuple(manifest.tile_shape)
    grid = manifest.grid_shape[2:]
    links = find_links(nominal, shape)
    sides = [lk for lk in links if _grid_steps(lk, grid) == 1] or links
    threshold = _register_links(sides, tiles, shape, max_shift_vox)
    solution = solve(nominal, sides, max_residual_vox=max_residual_vox)
    rescue = rescue_links(links, sides, len(nominal))
    if rescue:
        _register_links(rescue, tiles, shape, max_shift_vox, threshold=threshold)
        solution = solve(nominal, sides + rescue, max_residual_vox=max_residual_vox)
    solution.null_ncc = threshold
    return solution


def _grid_steps(link: Link, grid: Sequence[int]) -> int:
    """Grid axes along which a link's tiles differ (1: side neighbours; more: diagonal)."""
    a, b = np.unravel_index(link.a, grid), np.unravel_index(link.b, grid)
    return int(np.count_nonzero(np.subtract(a, b)))


def rescue_links(links: list[Link], sides: list[Link], n_tiles: int) -> list[Link]:
    """The links besides ``sides`` between tiles that the kept side links leave apart.

    Diagonal neighbours share only a corner or an edge of their tiles: few voxels, often
    at the mosaic's empty border, and their shifts were the least reliable (0.8 and 1.4
    voxels off on two of the benchmark's seeds). They are registered only to join tiles
    (or groups of tiles) that the side links did not.
    """
    kept = [(lk.a, lk.b) for lk in sides if lk.kept]
    group = {i: g for g, members in enumerate(_components(n_tiles, kept)) for i in members}
    side = {id(lk) for lk in sides}
    return [lk for lk in links if id(lk) not in side and group[lk.a] != group[lk.b]]


def _register_links(
    links: list[Link], tiles, shape, max_shift_vox, *, threshold: float | None = None
) -> float:
    """Register and judge ``links`` (in place); returns the null threshold of the first pass.

    Every link is registered on a window of at most `MAX_WINDOW_VOXELS`, the null NCC
    measured for up to `MAX_NULL_LINKS` of them (unless ``threshold`` is given). A link
    then not kept whose overlap is larger than that window is registered again on up to
    `RETRY_WINDOW_VOXELS` and judged against nulls measured on windows of that size (its
    own, and others' up to `MAX_NULL_LINKS`): a larger window correlates less by chance.
    """
    _measure(links, tiles, shape, max_shift_vox, MAX_WINDOW_VOXELS, _evenly(links, threshold))
    threshold = judge_links(links, max_shift_vox, threshold)
    retry = [lk for lk in links if not lk.kept and _overlap_voxels(lk, shape) > lk.voxels]
    if retry:
        others = [lk for lk in links if lk.kept or _overlap_voxels(lk, shape) <= lk.voxels]
        extra = _evenly(others, None)[: max(0, MAX_NULL_LINKS - len(retry))]
        copies = [Link(lk.a, lk.b, lk.nominal_vox) for lk in extra]  # for their nulls only
        _measure(retry + copies, tiles, shape, max_shift_vox, RETRY_WINDOW_VOXELS, retry + copies)
        nulls = [lk.ncc_null for lk in retry + copies if math.isfinite(lk.ncc_null)]
        judge_links(retry, max_shift_vox, max(nulls) if nulls else 0.0)
    return threshold


def _evenly(links: list[Link], threshold: float | None) -> list[Link]:
    """Up to `MAX_NULL_LINKS` links spread evenly over ``links`` (none with a threshold)."""
    if threshold is not None or not links:
        return []
    picks = np.linspace(0, len(links) - 1, min(len(links), MAX_NULL_LINKS)).round()
    return [links[int(i)] for i in sorted(set(picks))]


def _overlap_voxels(link: Link, shape) -> int:
    return int(np.prod([n - abs(round(d)) for n, d in zip(shape, link.nominal_vox, strict=True)]))


def _measure(links, tiles, shape, max_shift_vox, max_voxels: int, null: list[Link]) -> None:
    """`register_link` for each link, in parallel on the current Dask scheduler.

    ``null``: the links that also measure their null NCC.
    """
    import dask

    tasks = [
        dask.delayed(register_link, pure=True)(
            tiles[lk.a].region(),
            tiles[lk.b].region(),
            lk.nominal_vox,
            shape,
            tuple(max_shift_vox),
            any(lk is n for n in null),
            max_voxels=max_voxels,
        )
        for lk in links
    ]
    for lk, result in zip(links, dask.compute(*tasks), strict=True):
        for k, v in result.items():
            setattr(lk, k, v)


def spatial_tiles(manifest, *, channel: int, timepoint: int) -> list:
    """The tiles of one channel and time point in grid order (z slowest)."""
    by_index = {t.index: t for t in manifest.tiles}
    _, _, nz, ny, nx = manifest.grid_shape
    return [by_index[(timepoint, channel, *idx)] for idx in np.ndindex(nz, ny, nx)]


def link_table(solution: Solution, voxel_size_um: Sequence[float]):
    """One row per link: tiles, shift found (µm), NCC before/after/at its best other peak, kept.

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    vox = np.asarray(voxel_size_um, dtype=float)
    rows = []
    for lk in solution.links:
        shift = np.asarray(lk.shift_vox) * vox
        rows.append(
            {
                "tile_a": lk.a,
                "tile_b": lk.b,
                "shift_z_um": round(float(shift[0]), 2),
                "shift_y_um": round(float(shift[1]), 2),
                "shift_x_um": round(float(shift[2]), 2),
                "ncc_before": round(lk.ncc_before, 3),
                "ncc_after": round(lk.ncc_after, 3),
                "ncc_other_peak": round(lk.ncc_second, 3),
                "kept": lk.kept,
                "residual_vox": round(float(np.nanmax(np.abs(lk.residual_vox))), 2),
                "why_dropped": lk.reason,
            }
        )
    return pd.DataFrame(rows)
