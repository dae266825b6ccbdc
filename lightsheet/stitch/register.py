"""Registration of overlapping tiles: nominal positions, pairwise shifts, a global solve.

Positions are tile origins (the centre of a tile's voxel 0) in voxels of the stitched
volume, ``(n, 3)`` float arrays over the tiles of one time point and channel in grid order
(z slowest). The stitched volume's voxel 0 is the nominal frame's origin: the smallest
nominal position along each axis.

1. Nominal positions come from the tile grid and ``overlap`` (`nominal_positions`), or from
   a CSV of stage positions in µm (`read_positions`).
2. Every pair of tiles whose nominal boxes overlap is a link (`find_links`). `register_pair`
   reads the nominal overlap of both tiles and finds their offset by phase correlation
   (``skimage.registration.phase_cross_correlation``, phase normalisation; the periodic
   alternatives within the search range are told apart by NCC), refined to sub-voxel
   precision by maximising the normalised cross-correlation (NCC) of the overlap under
   linear interpolation (`refine_shift`). The NCC at the nominal and at the found offset
   are kept.
3. A link is kept when its NCC beats every NCC found the same way between boxes that do
   not overlap (a link's box against the far side of its partner, for up to
   `MAX_NULL_LINKS` links: a null distribution from the data, as ashlar does), and its
   shift is within the search range.
   `solve` then finds the positions that best agree with the kept links (least squares,
   weighted by NCC times the voxels compared), and drops, one at a time, the link that
   disagrees most with the others while any disagrees by more than ``max_residual_vox``.
   Each connected group of tiles keeps the mean of its nominal positions (stage errors
   average out); a tile left with no link stays at its nominal position, and is reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lightsheet.errors import ConfigError, TileGridError

#: Largest box (voxels) one pairwise registration reads per tile: a centred part of the
#: overlap is used beyond it (the sub-voxel search holds 9 float64 copies: 150 MB).
#: Side (voxels) of the local mean removed before comparing overlaps (`highpass`).
HIGHPASS_VOX = 9
#: Links whose null NCC (against a box they do not overlap) is measured: evenly chosen.
MAX_NULL_LINKS = 8
MAX_BOX_VOXELS = 2**21


@dataclass
class Link:
    """One registered pair of overlapping tiles (indices into the tile list)."""

    a: int
    b: int
    nominal_vox: tuple[float, float, float]  # nominal position of b minus a's
    shift_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)  # found offset minus nominal
    ncc_before: float = float("nan")
    ncc_after: float = float("nan")
    ncc_null: float = float("nan")  # this link's box against a box it does not overlap
    voxels: int = 0  # voxels of the overlap box compared
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


def overlap_boxes(
    nominal_vox: Sequence[float], tile_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray]:
    """Equal-sized boxes of tiles a and b over their nominal overlap, and b's box offset.

    Capped (centred) so a box stays under `MAX_BOX_VOXELS`. Returns slices into a, slices
    into b and the integer offset ``D`` (the nominal offset rounded): b's box is a's box
    minus ``D``.
    """
    shift = np.rint(np.asarray(nominal_vox, dtype=float)).astype(int)
    lo_a = [max(0, int(s)) for s in shift]
    hi_a = [min(n, n + int(s)) for n, s in zip(tile_shape, shift, strict=True)]
    size = np.subtract(hi_a, lo_a)
    while size.prod() > MAX_BOX_VOXELS:
        k = int(np.argmax(size))
        cut = size[k] - int(size[k] * 0.8)
        lo_a[k] += cut // 2
        hi_a[k] -= cut - cut // 2
        size = np.subtract(hi_a, lo_a)
    box_a = tuple(slice(lo, hi) for lo, hi in zip(lo_a, hi_a, strict=True))
    box_b = tuple(slice(lo - s, hi - s) for lo, hi, s in zip(lo_a, hi_a, shift, strict=True))
    return box_a, box_b, shift


def _prepare(box: np.ndarray) -> np.ndarray:
    """Float32 box, mean removed, tapered at its borders (Tukey window, 1/8 per side)."""
    out = box.astype(np.float32)
    out -= out.mean()
    for axis, n in enumerate(out.shape):
        if n < 8:
            continue
        w = np.ones(n, np.float32)
        r = max(1, n // 8)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)
        w[:r], w[-r:] = ramp, ramp[::-1]
        shape = [1] * out.ndim
        shape[axis] = n
        out *= w.reshape(shape)
    return out


def shifted_overlap(
    a: np.ndarray, b: np.ndarray, shift: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` moved by ``shift`` (``b(x - shift)``, linear), where both exist.

    Separable: along each axis ``b(j - f) = f b[j - 1] + (1 - f) b[j]`` for the fractional
    part ``f``; an integer shift copies no voxel values. Returns two equal-shaped arrays
    (float32 where interpolated).
    """
    for axis, s in enumerate(shift):
        n = a.shape[axis]
        i0 = math.floor(s)
        f = float(s - i0)
        lo = max(0, i0 + (1 if f > 0 else 0))
        hi = min(n, n + i0)
        if hi <= lo:
            empty = [slice(None)] * a.ndim
            empty[axis] = slice(0, 0)
            return a[tuple(empty)], b[tuple(empty)]
        take_a = [slice(None)] * a.ndim
        take_a[axis] = slice(lo, hi)
        j = [slice(None)] * a.ndim
        j[axis] = slice(lo - i0, hi - i0)
        a = a[tuple(take_a)]
        if f > 0:
            jm = list(j)
            jm[axis] = slice(lo - i0 - 1, hi - i0 - 1)
            b = f * b[tuple(jm)].astype(np.float32) + (1 - f) * b[tuple(j)].astype(np.float32)
        else:
            b = b[tuple(j)]
    return a, b


def ncc_at(a: np.ndarray, b: np.ndarray, shift: Sequence[float]) -> float:
    """Normalised cross-correlation of ``a`` and ``b`` moved by ``shift`` where both exist."""
    x, y = shifted_overlap(a, b, shift)
    if x.size < 16:
        return float("nan")
    stack = np.empty((2, x.size))
    stack[0], stack[1] = x.ravel(), y.ravel()
    stack -= stack.mean(axis=1, keepdims=True)
    gram = stack @ stack.T  # a matrix product: far faster than two vector dots here
    denom = math.sqrt(float(gram[0, 0] * gram[1, 1]))
    return float(gram[0, 1] / denom) if denom > 0 else float("nan")


def phase_shift(a: np.ndarray, b: np.ndarray, max_shift_vox: Sequence[float]) -> np.ndarray:
    """Shift that moves ``b`` onto ``a`` (``a(x) ≈ b(x - shift)``), to about a voxel.

    Phase correlation (`skimage.registration.phase_cross_correlation`, phase
    normalisation, to the voxel: the sub-voxel search follows). The peak is known only
    modulo the box size; each alternative within ``max_shift_vox`` is tried and the one
    whose overlap correlates best (NCC) wins, as in Preibisch et al. (Bioinformatics 2009).
    Binning the boxes 2× first made it 4× cheaper but picked wrong peaks in overlaps of
    little texture (mosaic borders), so it is not done.
    """
    from skimage.registration import phase_cross_correlation

    peak, _, _ = phase_cross_correlation(_prepare(a), _prepare(b), normalization="phase")
    peak = np.asarray(peak, dtype=float)
    options = []
    for p, n, m in zip(peak, a.shape, max_shift_vox, strict=True):
        near = [p + j * n for j in (-1, 0, 1) if abs(p + j * n) <= m + 1 and abs(p + j * n) < n]
        options.append(near or [p])
    candidates = [np.array(c, dtype=float) for c in itertools.product(*options)]
    if len(candidates) == 1:
        return candidates[0]
    scores = [ncc_at(a, b, c) for c in candidates]
    scores = [s if math.isfinite(s) else -np.inf for s in scores]
    return candidates[int(np.argmax(scores))]


def refine_shift(
    a: np.ndarray, b: np.ndarray, shift: Sequence[float], *, max_cells: int = 4
) -> tuple[np.ndarray, float]:
    """Sub-voxel shift maximising the NCC of the overlap, from a start within ~a voxel.

    Within one unit cell of shifts ``i0 + f`` (``f`` in [0, 1]³) the linearly interpolated
    ``b`` is a weighted sum of its 8 integer shifts, so the NCC is a ratio of a linear and
    a quadratic form in 8 weights: 44 dot products over the overlap give the NCC at every
    ``f`` (`_CellNCC`), searched on a grid and then a finer one around the best. A best
    ``f`` on the cell's border moves to the next cell. Phase correlation's own sub-voxel
    peak was 0.3–1.1 voxels off on noisy overlaps (tile positions ±0.45 voxel after the
    global solve); this brought every link within 0.11 voxel of the truth on the same data
    (``benchmarks/results/stitch.md``).

    Returns the shift and its NCC.
    """
    i0 = np.floor(np.asarray(shift, dtype=float)).astype(int)
    seen: set[tuple] = set()
    best = (np.asarray(shift, dtype=float), float("nan"))
    for _ in range(max_cells):
        seen.add(tuple(i0))
        cell = _CellNCC(a, b, i0)
        if cell.n < 16:
            break
        f, value = cell.maximum()
        best = (i0 + f, value)
        move = np.where(f <= 0.0, -1, np.where(f >= 1.0, 1, 0))
        if not move.any() or tuple(i0 + move) in seen:
            break
        i0 = i0 + move
    return best


class _CellNCC:
    """NCC of ``a`` and ``b(x - i0 - f)`` for any ``f`` in [0, 1]³ (trilinear ``b``)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, i0: np.ndarray):
        crop_a = []
        for n, s in zip(a.shape, i0, strict=True):
            lo, hi = max(0, int(s) + 1), min(n, n + int(s))
            crop_a.append(slice(lo, max(lo, hi)))
        x = a[tuple(crop_a)].astype(np.float64)
        self.n = x.size
        if self.n < 16:
            return
        self.corners = list(itertools.product((0, 1), repeat=a.ndim))
        stack = np.empty((1 + len(self.corners), self.n))
        stack[0] = x.ravel()
        for j, c in enumerate(self.corners, start=1):
            take = tuple(
                slice(sl.start - s - k, sl.stop - s - k)
                for sl, s, k in zip(crop_a, i0, c, strict=True)
            )
            stack[j] = b[take].ravel()
        gram = stack @ stack.T  # one BLAS call: every dot product at once
        sums = stack.sum(axis=1)
        self.sa, self.saa = float(sums[0]), float(gram[0, 0])
        self.s, self.p, self.q = sums[1:], gram[0, 1:], gram[1:, 1:]

    def __call__(self, f: np.ndarray) -> np.ndarray:
        """NCC at fractional shifts ``f`` (k, 3)."""
        f = np.atleast_2d(f)
        w = np.ones((len(f), len(self.corners)))
        for j, c in enumerate(self.corners):
            for axis, k in enumerate(c):
                w[:, j] *= f[:, axis] if k else 1 - f[:, axis]
        sy = w @ self.s
        cov = w @ self.p - self.sa * sy / self.n
        var_a = self.saa - self.sa**2 / self.n
        var_b = np.einsum("ij,jk,ik->i", w, self.q, w) - sy**2 / self.n
        with np.errstate(invalid="ignore", divide="ignore"):
            return cov / np.sqrt(np.maximum(var_a * var_b, 0))

    def maximum(self) -> tuple[np.ndarray, float]:
        """The best ``f`` on a 0.05 grid, then on 0.01 and 0.002 grids around it."""
        best = np.full(3, 0.5)
        for step, half in ((0.05, 10), (0.01, 5), (0.002, 5)):
            axis = np.arange(-half, half + 1) * step
            grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
            grid = np.clip(best + grid, 0.0, 1.0)
            values = np.nan_to_num(self(grid), nan=-np.inf)
            k = int(np.argmax(values))
            best = grid[k]
        return best, float(self(best)[0])


def register_pair(
    box_a: np.ndarray,
    box_b: np.ndarray,
    frac_vox: Sequence[float],
    far_b: np.ndarray | None,
    max_shift_vox: Sequence[float],
) -> dict:
    """Offset of b against a found in their boxes; NCC before, after and against ``far_b``.

    ``frac_vox`` is the nominal offset minus the boxes' integer offset ``D``. Returns
    ``shift_vox`` (found minus nominal) and the NCCs at the nominal offset, at the found
    one, and of ``box_a`` against ``far_b`` at its best shift (a box it does not overlap).
    """
    frac = np.asarray(frac_vox, dtype=float)
    reach = np.abs(frac) + np.asarray(max_shift_vox, dtype=float)
    fine_a, fine_b = highpass(box_a), highpass(box_b)
    # the peak and the link's quality from the fine structure; the sub-voxel shift from
    # all of it (the smooth part is flat near the peak, and the fine part alone was noisier)
    found, _ = refine_shift(box_a, box_b, phase_shift(fine_a, fine_b, reach))
    result = {
        "shift_vox": tuple(float(v) for v in found - frac),
        "ncc_before": ncc_at(fine_a, fine_b, frac),
        "ncc_after": ncc_at(fine_a, fine_b, found),
        "ncc_null": float("nan"),
        "voxels": int(box_a.size),
    }
    if far_b is not None:
        fine_far = highpass(far_b)
        result["ncc_null"] = ncc_at(fine_a, fine_far, phase_shift(fine_a, fine_far, reach))
    return result


def highpass(box: np.ndarray) -> np.ndarray:
    """``box`` minus its local mean over `HIGHPASS_VOX` voxels a side (float32).

    Illumination, autofluorescence and the dark outside of the tissue vary slowly; left in,
    they correlate at any shift, so an overlap with no structure of its own (the mosaic's
    empty corners) found a confident wrong offset. Only the structure finer than the
    window (nuclei, fibres, vessels) is compared.
    """
    from scipy import ndimage as ndi

    data = box.astype(np.float32)
    size = [min(HIGHPASS_VOX, n) for n in data.shape]
    return data - ndi.uniform_filter(data, size=size, mode="reflect")


def far_box(box_b: tuple[slice, ...], tile_shape: Sequence[int], nominal_vox) -> tuple[slice, ...]:
    """B's box mirrored to the far side of b along each axis where a and b are offset."""
    out = []
    for sl, n, d in zip(box_b, tile_shape, nominal_vox, strict=True):
        if abs(d) >= 1 and sl.stop - sl.start < n:
            out.append(slice(n - sl.stop, n - sl.start))
        else:
            out.append(sl)
    return tuple(out)


def judge_links(links: list[Link], max_shift_vox: Sequence[float]) -> float:
    """Keep links whose NCC beats the null threshold and whose shift is in range.

    Returns the threshold: the largest NCC found between boxes that do not overlap.
    """
    nulls = [lk.ncc_null for lk in links if math.isfinite(lk.ncc_null)]
    threshold = max(nulls) if nulls else 0.0
    for lk in links:
        if not math.isfinite(lk.ncc_after) or lk.ncc_after <= threshold:
            lk.kept, lk.reason = False, f"NCC {lk.ncc_after:.3f} ≤ null {threshold:.3f}"
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
        Pairwise links run in parallel on the current Dask scheduler, one task per link
        reading only the two overlap boxes (and the far box for the null NCC).
    """
    import dask

    tiles = spatial_tiles(manifest, channel=channel, timepoint=timepoint)
    shape = tuple(manifest.tile_shape)
    links = find_links(nominal, shape)
    null = set(np.linspace(0, len(links) - 1, min(len(links), MAX_NULL_LINKS)).round().astype(int))
    tasks = [
        dask.delayed(_register_link, pure=True)(
            tiles[lk.a].region(),
            tiles[lk.b].region(),
            lk.nominal_vox,
            shape,
            tuple(max_shift_vox),
            i in null,
        )
        for i, lk in enumerate(links)
    ]
    for lk, result in zip(links, dask.compute(*tasks), strict=True):
        for k, v in result.items():
            setattr(lk, k, v)
    threshold = judge_links(links, max_shift_vox)
    solution = solve(nominal, links, max_residual_vox=max_residual_vox)
    solution.null_ncc = threshold
    return solution


def spatial_tiles(manifest, *, channel: int, timepoint: int) -> list:
    """The tiles of one channel and time point in grid order (z slowest)."""
    by_index = {t.index: t for t in manifest.tiles}
    _, _, nz, ny, nx = manifest.grid_shape
    return [by_index[(timepoint, channel, *idx)] for idx in np.ndindex(nz, ny, nx)]


def _register_link(region_a, region_b, nominal_vox, tile_shape, max_shift_vox, null) -> dict:
    box_a, box_b, shift = overlap_boxes(nominal_vox, tile_shape)
    far = far_box(box_b, tile_shape, nominal_vox)
    a = region_a[box_a]
    b = region_b[box_b]
    far_b = None if far == box_b or not null else region_b[far]
    frac = np.asarray(nominal_vox, dtype=float) - shift
    return register_pair(a, b, frac, far_b, max_shift_vox)


def link_table(solution: Solution, voxel_size_um: Sequence[float]):
    """One row per link: tiles, nominal offset, shift found (µm), NCC before/after, kept.

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
                "kept": lk.kept,
                "residual_vox": round(float(np.nanmax(np.abs(lk.residual_vox))), 2),
                "why_dropped": lk.reason,
            }
        )
    return pd.DataFrame(rows)


def plot_overview(
    solution: Solution,
    tile_shape: Sequence[int],
    path: str | Path,
    *,
    background: np.ndarray | None = None,
    shape_yx: Sequence[int] | None = None,
) -> Path:
    """PNG of the mosaic seen from above (y, x): tile outlines, links, dropped ones in red.

    ``background`` (a 2-D max projection of the fused volume, at any downsampling) is
    drawn under the outlines, stretched over ``shape_yx`` full-resolution voxels. Tiles
    left at their nominal position are outlined in orange and labelled "nominal".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pos = solution.positions[:, 1:]
    ny, nx = (float(t) for t in tile_shape[1:])
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    if background is not None:
        h, w = shape_yx or background.shape
        lo, hi = np.percentile(background, [1, 99.5])
        ax.imshow(background, cmap="gray", vmin=lo, vmax=hi, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    for i, (y, x) in enumerate(pos):
        nominal = i in solution.fallback
        ax.add_patch(
            Rectangle(
                (x - 0.5, y - 0.5), nx, ny, fill=False, lw=1.5,
                ec="orange" if nominal else "cyan",
            )
        )  # fmt: skip
        label = f"{i}" + (" nominal" if nominal else "")
        ax.text(x + nx / 2, y + ny / 2, label, color="yellow", ha="center", va="center")
    for lk in solution.links:
        (ya, xa), (yb, xb) = pos[lk.a] + (ny / 2, nx / 2), pos[lk.b] + (ny / 2, nx / 2)
        ax.plot(
            [xa, xb], [ya, yb], "-" if lk.kept else "--", lw=1.2, c="lime" if lk.kept else "red"
        )
    ax.set_xlim(min(pos[:, 1].min(), 0) - 2, pos[:, 1].max() + nx + 2)
    ax.set_ylim(pos[:, 0].max() + ny + 2, min(pos[:, 0].min(), 0) - 2)
    ax.set_aspect("equal")
    kept = sum(lk.kept for lk in solution.links)
    ax.set_title(
        f"{len(pos)} tiles, {kept}/{len(solution.links)} links kept (dropped: red dashed)",
        fontsize=9,
    )
    ax.set_xlabel("x (voxels)")
    ax.set_ylabel("y (voxels)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
