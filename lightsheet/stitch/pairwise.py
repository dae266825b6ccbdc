"""Pairwise registration of two overlapping tiles: the offset of b against a, sub-voxel.

`register_link` (one Dask task per link) reads a bounded window of the two tiles' nominal
overlap and hands it to `register_pair`:

1. **Window.** An overlap larger than `MAX_WINDOW_VOXELS` is cut down (its longest sides
   first) and the window is placed where the overlap has the most fine structure
   (`choose_window`: band-pass energy, summed over every window position from a bounded
   survey of the overlap). A centred window fell into the empty outside at the mosaic's
   border; a window over tissue registers as well as the whole overlap, at a fraction of
   the cost, and the cost per link no longer grows with the tile.
2. **Integer peak.** Phase correlation of the high-passed windows (`peaks`), computed with
   real FFTs in float32 at fast lengths and searched only within the allowed shifts; the
   periodic alternatives of the peak are told apart by NCC (Preibisch et al.,
   Bioinformatics 2009).
3. **Sub-voxel.** The NCC of the overlap under linear interpolation, maximised exactly
   within one unit cell of shifts (`refine_shift`, `_CellNCC`), started in the cell that a
   parabola through the cross-correlation peak points to.
4. **Distinctness.** The best NCC at any other peak of the cross-correlation (outside the
   main peak's half-maximum region) is kept as ``ncc_second``: a link whose peak does not
   stand out from the others (repetitive or smooth structure, noise) is not trusted
   (`lightsheet.stitch.register.judge_links`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CELL_VOX",
    "HIGHPASS_VOX",
    "MAX_WINDOW_VOXELS",
    "MIN_OVERLAP",
    "RUNNERS_UP",
    "SURVEY_VOXELS",
    "band_energy",
    "choose_window",
    "far_box",
    "highpass",
    "ncc_at",
    "overlap_boxes",
    "peaks",
    "refine_shift",
    "register_link",
    "register_pair",
    "shifted_overlap",
    "window_shape",
    "window_sums",
]

#: Side (voxels) of the local mean removed before comparing overlaps (`highpass`).
HIGHPASS_VOX = 9
#: Largest window (voxels) registered per link; larger overlaps are cut to their most
#: textured part (`choose_window`). The sub-voxel search holds 9 float64 copies: 38 MB.
MAX_WINDOW_VOXELS = 2**18
#: Largest read (voxels) surveyed to place the window; beyond it the overlap is sampled
#: every few planes along its longest axis.
SURVEY_VOXELS = 2**20
#: Cross-correlation peaks besides the main one whose NCC is measured (``ncc_second``).
RUNNERS_UP = 3
#: Fraction of a window's voxels that a shift must leave overlapping for its NCC to count
#: as another peak or as a null (`peaks`).
MIN_OVERLAP = 0.5


def overlap_boxes(
    nominal_vox: Sequence[float], tile_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray]:
    """Equal-sized boxes of tiles a and b over their whole nominal overlap, and b's offset.

    Returns slices into a, slices into b and the integer offset ``D`` (the nominal offset
    rounded): b's box is a's box minus ``D``.

    Examples
    --------
    >>> a, b, d = overlap_boxes((0.0, 0.0, 85.3), (10, 100, 100))
    >>> a[2], b[2], d.tolist()
    (slice(85, 100, None), slice(0, 15, None), [0, 0, 85])
    """
    shift = np.rint(np.asarray(nominal_vox, dtype=float)).astype(int)
    lo_a = [max(0, int(s)) for s in shift]
    hi_a = [min(n, n + int(s)) for n, s in zip(tile_shape, shift, strict=True)]
    box_a = tuple(slice(lo, hi) for lo, hi in zip(lo_a, hi_a, strict=True))
    return box_a, _moved(box_a, shift), shift


def _moved(box: Sequence[slice], by: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s.start - int(d), s.stop - int(d)) for s, d in zip(box, by, strict=True))


def window_shape(size: Sequence[int], max_voxels: int = MAX_WINDOW_VOXELS) -> tuple[int, ...]:
    """``size`` with its longest sides cut (by a fifth at a time) until under ``max_voxels``.

    Examples
    --------
    >>> window_shape((64, 512, 77), 2**19)
    (64, 105, 77)
    """
    out = [int(n) for n in size]
    while math.prod(out) > max_voxels and max(out) > 1:
        k = int(np.argmax(out))
        out[k] = max(1, int(out[k] * 0.8))
    return tuple(out)


#: Side (voxels) of the cells over which `choose_window` sums the texture and moves a window.
CELL_VOX = 8


def band_energy(
    box: np.ndarray, *, planes_axis: int | None = None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Energy of the structure finer than `HIGHPASS_VOX` in ``box``, per cell of `CELL_VOX`.

    The box is averaged over 2 voxels along each axis first (pixel noise then weighs less),
    the local mean over about `HIGHPASS_VOX` voxels is removed (illumination,
    autofluorescence), and the squares are summed over cells of `CELL_VOX` voxels a side
    (incomplete cells at the far ends are left out). ``planes_axis``: the box is a stack of
    separate planes along that axis (a survey), which is neither binned nor filtered
    across, and whose cells are one plane thick.

    Returns the energies and the side of a cell along each axis, in voxels of ``box``.
    """
    from scipy import ndimage as ndi

    data = np.asarray(box, dtype=np.float32)
    bins = [1 if k == planes_axis or n < 4 else 2 for k, n in enumerate(data.shape)]
    data = _bin(data, bins)
    size = [
        1 if k == planes_axis else min(max(1, HIGHPASS_VOX // b), n)
        for k, (b, n) in enumerate(zip(bins, data.shape, strict=True))
    ]
    data -= ndi.uniform_filter(data, size=size, mode="reflect")
    data *= data
    cells = [1 if k == planes_axis else max(1, CELL_VOX // b) for k, b in enumerate(bins)]
    cells = [min(c, n) for c, n in zip(cells, data.shape, strict=True)]
    return _bin(data, cells, mean=False), tuple(b * c for b, c in zip(bins, cells, strict=True))


def _bin(data: np.ndarray, factors: Sequence[int], *, mean: bool = True) -> np.ndarray:
    """Sums (or means) over blocks of ``factors`` voxels; incomplete blocks left out."""
    out, count = data, 1
    for axis, f in enumerate(factors):
        f = max(1, min(int(f), out.shape[axis]))
        if f == 1:
            continue
        count *= f
        n = out.shape[axis] - out.shape[axis] % f
        parts = [
            out[(slice(None),) * axis + (slice(j, n, f),)] for j in range(f)
        ]  # strided views: one add per part, no reshape copy
        total = parts[0] + parts[1]
        for part in parts[2:]:
            total += part
        out = total
    if mean and count > 1:
        out *= np.float32(1.0 / count)
    return out


def window_sums(values: np.ndarray, extent: Sequence[int]) -> np.ndarray:
    """Sum of ``values`` over every box of ``extent`` (one entry per start position).

    Examples
    --------
    >>> window_sums(np.arange(5.0).reshape(1, 1, 5), (1, 1, 2)).tolist()
    [[[1.0, 3.0, 5.0, 7.0]]]
    """
    total = np.asarray(values, dtype=np.float64)
    for axis in range(total.ndim):
        total = np.cumsum(total, axis=axis)
        pad = [(0, 0)] * total.ndim
        pad[axis] = (1, 0)
        total = np.pad(total, pad)
    out = 0.0
    for corner in itertools.product((0, 1), repeat=total.ndim):
        take = tuple(
            slice(e, None) if c else slice(0, n - e)
            for c, e, n in zip(corner, extent, total.shape, strict=True)
        )
        sign = -1.0 if (total.ndim - sum(corner)) % 2 else 1.0
        out = out + sign * total[take]
    return out


def choose_window(
    region, box: Sequence[slice], shape: Sequence[int], *, survey_voxels: int = SURVEY_VOXELS
) -> tuple[tuple[slice, ...], np.ndarray | None]:
    """The part of ``box`` (slices of ``region``) of ``shape`` with the most fine structure.

    The box is read whole when it holds at most ``survey_voxels`` voxels, otherwise every
    k-th plane along its longest axis; its `band_energy` per cell, log-compressed, is
    summed over every position of the window on the cell grid (`window_sums`) and the
    best one taken.

    Returns the window (slices of ``region``) and its voxels where the survey read them
    (None otherwise).
    """
    size = [s.stop - s.start for s in box]
    if list(shape) == size:
        return tuple(box), None
    axis, step = int(np.argmax(size)), 1
    if math.prod(size) > survey_voxels:
        step = math.ceil(math.prod(size) / survey_voxels)
    key = list(box)
    key[axis] = slice(box[axis].start, box[axis].stop, step)
    survey = region[tuple(key)]
    planes = axis if step > 1 else None
    energy, per_cell = band_energy(survey, planes_axis=planes)
    per_cell = [c * (step if k == axis else 1) for k, c in enumerate(per_cell)]
    extent = [max(1, min(e, n // c)) for n, c, e in zip(shape, per_cell, energy.shape, strict=True)]
    # log-compressed against the median cell: many structured cells outweigh one bright
    # edge (the tissue's border) or a speck of debris
    typical = max(float(np.median(energy)), float(np.finfo(np.float32).tiny))
    sums = window_sums(np.log1p(energy / typical), extent)
    start = np.unravel_index(int(np.argmax(sums)), sums.shape)
    out = []
    for s, n, first, c in zip(box, shape, start, per_cell, strict=True):
        lo = min(s.start + int(first) * c, s.stop - n)
        out.append(slice(lo, lo + n))
    window = tuple(out)
    if step > 1:
        return window, None
    return window, survey[
        tuple(slice(w.start - s.start, w.stop - s.start) for w, s in zip(window, box, strict=True))
    ]


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
    # float32 dot products (BLAS, blocked sums): ~1e-5 relative, far below what is compared
    x = x.astype(np.float32).ravel()
    y = y.astype(np.float32).ravel()
    x -= x.mean(dtype=np.float64)
    y -= y.mean(dtype=np.float64)
    denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y)) / denom if denom > 0 else float("nan")


def _allowed_shifts(n_box: int, reach: float) -> np.ndarray:
    """Integer shifts along one axis within ``reach`` that leave an overlap, in order."""
    r = int(math.floor(min(reach, n_box - 1)))
    return np.arange(-r, r + 1)


def peaks(
    a: np.ndarray, b: np.ndarray, reach: Sequence[float], *, min_overlap: float = 0.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Shift moving ``b`` onto ``a`` (``a(x) ≈ b(x - shift)``), and other peaks' shifts.

    Phase correlation (the cross-power spectrum normalised to unit magnitude) of the
    tapered boxes, zero-padded to fast FFT lengths, searched over the integer shifts within
    ``reach`` of 0 (per axis); a shift is known only modulo the padded length, so where
    ``reach`` allows two shifts for the peak the one whose overlap correlates best (NCC)
    wins. The main shift comes back with a sub-voxel estimate (a parabola through the
    plain cross-correlation's peak along each axis, within ±0.5), where the NCC search
    starts. The other shifts are the `RUNNERS_UP` highest local maxima of the plain
    cross-correlation outside the main peak's half-maximum region, among the shifts that
    keep at least `MIN_OVERLAP` of the boxes' voxels overlapping: an NCC over a sliver of
    the box is high by chance (0.7 over a 10-voxel-wide sliver of noise-free nuclei), so
    such shifts would make every peak look ambiguous. ``min_overlap`` restricts the main
    shift the same way (a null NCC is measured so).

    Binning the boxes 2× first made it 4× cheaper but picked wrong peaks in overlaps of
    little texture (mosaic borders), so it is not done.
    """
    from scipy import fft

    shape = tuple(fft.next_fast_len(int(n), real=True) for n in a.shape)
    fa = fft.rfftn(_prepare(a), s=shape, workers=1)
    fa *= np.conj(fft.rfftn(_prepare(b), s=shape, workers=1))
    plain = fft.irfftn(fa, s=shape, workers=1)
    fa /= np.maximum(np.abs(fa), np.finfo(np.float32).tiny)
    phase = fft.irfftn(fa, s=shape, workers=1)
    shifts = [_allowed_shifts(n, r) for n, r in zip(a.shape, reach, strict=True)]
    # the surfaces over the allowed shifts, in shift order (a bin appears once per shift
    # it stands for: twice where the reach exceeds half the padded length)
    index = np.ix_(*(s % m for s, m in zip(shifts, shape, strict=True)))
    phase, plain = phase[index], plain[index]
    if min_overlap > 0:
        phase = np.where(_overlap_fraction(shifts, a.shape) >= min_overlap, phase, -np.inf)
    best = np.unravel_index(int(np.argmax(phase)), phase.shape)
    same = [(s - s[i]) % m == 0 for s, i, m in zip(shifts, best, shape, strict=True)]
    options = [
        np.array(c, dtype=float)
        for c in itertools.product(*(s[k] for s, k in zip(shifts, same, strict=True)))
    ]
    if len(options) > 1:  # the same bin: NCC tells the shifts apart
        scores = [ncc_at(a, b, c) for c in options]
        main = options[int(np.argmax([s if math.isfinite(s) else -np.inf for s in scores]))]
    else:
        main = options[0]
    main_index = tuple(int(np.flatnonzero(s == v)[0]) for s, v in zip(shifts, main, strict=True))
    estimate = main + _parabola(plain, main_index)
    return estimate, _runners_up(plain, shifts, same, main_index, a.shape)


def _overlap_fraction(shifts: Sequence[np.ndarray], box: Sequence[int]) -> np.ndarray:
    """Fraction of a box's voxels that overlap at each shift of the grid ``shifts``."""
    out = np.ones([1] * len(box))
    for axis, (s, n) in enumerate(zip(shifts, box, strict=True)):
        along = [1] * len(box)
        along[axis] = -1
        out = out * (1.0 - np.abs(s) / n).reshape(along)
    return out


def _runners_up(plain, shifts, same, main_index, box) -> list[np.ndarray]:
    """The `RUNNERS_UP` highest other peaks of ``plain`` (as shifts).

    Among the shifts that keep `MIN_OVERLAP` of the box: local maxima outside the main
    peak's half-maximum region.
    """
    from scipy import ndimage as ndi

    # those shifts lie within half the box along each axis; one more is kept around them so
    # that a peak's shoulder at the edge is not taken for a maximum
    wide, grown = [], []
    for s, n in zip(shifts, box, strict=True):
        lo, hi = int(np.searchsorted(s, -(n // 2))), int(np.searchsorted(s, n // 2, "right"))
        wide.append((lo, hi))
        grown.append(slice(max(0, lo - 1), min(len(s), hi + 1)))
    inner = tuple(
        slice(lo - g.start, hi - g.start) for (lo, hi), g in zip(wide, grown, strict=True)
    )
    values = plain[tuple(grown)]
    alias = np.ones(values.shape, bool)
    for axis, (k, g) in enumerate(zip(same, grown, strict=True)):
        along = [1] * values.ndim
        along[axis] = -1
        alias &= k[g].reshape(along)
    # the main peak (all its aliases) and its half-maximum region, grown by a voxel
    top = plain[main_index]
    region = alias.copy()
    for peak in np.argwhere(alias) if top > 0 else ():
        near = tuple(slice(max(0, int(i) - HIGHPASS_VOX), int(i) + HIGHPASS_VOX + 1) for i in peak)
        labels, _ = ndi.label(values[near] > top / 2)
        at = labels[tuple(int(i) - b.start for i, b in zip(peak, near, strict=True))]
        region[near] |= ndi.binary_dilation(labels == at, iterations=1)
    # other peaks: local maxima only (the main peak's shoulder descends from it)
    inner_shifts = [s[lo:hi] for s, (lo, hi) in zip(shifts, wide, strict=True)]
    candidates = _local_maxima(values)[inner] & ~region[inner]
    candidates &= _overlap_fraction(inner_shifts, box) >= MIN_OVERLAP
    peak_at = np.flatnonzero(candidates)
    heights = values[inner].ravel()[peak_at]
    best = [np.unravel_index(int(f), candidates.shape) for f in peak_at[np.argsort(-heights)]]
    return [
        np.array([s[i] for s, i in zip(inner_shifts, idx, strict=True)], float)
        for idx in best[:RUNNERS_UP]
    ]


def _local_maxima(values: np.ndarray) -> np.ndarray:
    """Where ``values`` is at least each of its neighbours (3 voxels a side, edges clamped).

    Separable maxima of shifted views: a few vectorised passes, several times cheaper
    than ``scipy.ndimage.maximum_filter`` here.
    """
    top = values
    for axis in range(values.ndim):
        grown = top.copy()
        head = [slice(None)] * values.ndim
        tail = [slice(None)] * values.ndim
        head[axis], tail[axis] = slice(1, None), slice(0, -1)
        np.maximum(grown[tuple(head)], top[tuple(tail)], out=grown[tuple(head)])
        np.maximum(grown[tuple(tail)], top[tuple(head)], out=grown[tuple(tail)])
        top = grown
    return values >= top


def _parabola(values: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """Sub-voxel offset of a peak at ``index`` along each axis (3-point parabola, ±0.5)."""
    out = np.zeros(values.ndim)
    for axis, i in enumerate(index):
        if 0 < i < values.shape[axis] - 1:
            lo, mid, hi = (
                float(values[index[:axis] + (j,) + index[axis + 1 :]]) for j in (i - 1, i, i + 1)
            )
            curve = lo - 2 * mid + hi
            if curve < 0:
                out[axis] = np.clip(0.5 * (lo - hi) / curve, -0.5, 0.5)
    return out


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
        x = a[tuple(crop_a)]
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
    """Offset of b against a found in their boxes; NCC before, after, second and null.

    ``frac_vox`` is the nominal offset minus the boxes' integer offset ``D``. Returns
    ``shift_vox`` (found minus nominal) and the NCCs at the nominal offset, at the found
    one, at the best other peak (``ncc_second``), and of ``box_a`` against ``far_b`` at
    its best shift (a box it does not overlap).
    """
    frac = np.asarray(frac_vox, dtype=float)
    reach = np.abs(frac) + np.asarray(max_shift_vox, dtype=float)
    fine_a, fine_b = highpass(box_a), highpass(box_b)
    # the peak and the link's quality from the fine structure; the sub-voxel shift from
    # all of it (the smooth part is flat near the peak, and the fine part alone was noisier)
    start, runners = peaks(fine_a, fine_b, reach)
    found, _ = refine_shift(box_a, box_b, start)
    second = [ncc_at(fine_a, fine_b, s) for s in runners]
    second = [s for s in second if math.isfinite(s)]
    result = {
        "shift_vox": tuple(float(v) for v in found - frac),
        "ncc_before": ncc_at(fine_a, fine_b, frac),
        "ncc_after": ncc_at(fine_a, fine_b, found),
        "ncc_second": max(second) if second else float("nan"),
        "ncc_null": float("nan"),
        "voxels": int(box_a.size),
    }
    if far_b is not None:
        fine_far = highpass(far_b)
        shift, _ = peaks(fine_a, fine_far, reach, min_overlap=MIN_OVERLAP)
        result["ncc_null"] = ncc_at(fine_a, fine_far, np.rint(shift))
    return result


def far_box(box_b: tuple[slice, ...], tile_shape: Sequence[int], nominal_vox) -> tuple[slice, ...]:
    """B's box mirrored to the far side of b along each axis where a and b are offset."""
    out = []
    for sl, n, d in zip(box_b, tile_shape, nominal_vox, strict=True):
        if abs(d) >= 1 and sl.stop - sl.start < n:
            out.append(slice(n - sl.stop, n - sl.start))
        else:
            out.append(sl)
    return tuple(out)


def register_link(
    region_a,
    region_b,
    nominal_vox,
    tile_shape,
    max_shift_vox,
    null: bool,
    *,
    max_voxels: int = MAX_WINDOW_VOXELS,
) -> dict:
    """`register_pair` on the best window of the nominal overlap of two tiles (regions).

    ``null``: also measure the NCC against b's far side (for the null distribution).
    The window (at most ``max_voxels``; slices of tile a) comes back as ``window``.
    """
    box_a, _, offset = overlap_boxes(nominal_vox, tile_shape)
    size = [s.stop - s.start for s in box_a]
    win_a, a = choose_window(region_a, box_a, window_shape(size, max_voxels))
    win_b = _moved(win_a, offset)
    a = region_a[win_a] if a is None else a
    b = region_b[win_b]
    far = far_box(win_b, tile_shape, nominal_vox)
    far_b = None if far == win_b or not null else region_b[far]
    frac = np.asarray(nominal_vox, dtype=float) - offset
    result = register_pair(a, b, frac, far_b, max_shift_vox)
    result["window"] = tuple((s.start, s.stop) for s in win_a)
    return result
