"""Plots of the pipeline's results, as PNG files: one home for every figure.

Density: `plot_top_regions` (the densest regions, left and right), `plot_density_slice` (an
atlas slice coloured by density). Registration: `plot_registration_qc` (atlas outlines on
the sample). Segmentation: `overlay_png` (label outlines over a projection, the sweep's
thumbnails). Stitching: `plot_overview` (the mosaic's tiles and links). Any stage output:
`mip_png` (a maximum-intensity projection thumbnail, the tasks' artifacts). PSF: `plot_psf`
(its projections, `lightsheet psf --beads`). Figures are
drawn on matplotlib's Agg canvas without pyplot's global state, so tasks can draw in worker
threads.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd

from lightsheet.io.atlas import HEMISPHERE_LEFT, HEMISPHERE_RIGHT, Atlas

__all__ = [
    "mip_png",
    "overlay_png",
    "plot_overview",
    "plot_psf",
    "plot_density_slice",
    "plot_registration_qc",
    "plot_top_regions",
]


def plot_top_regions(
    table: pd.DataFrame,
    path: str | Path,
    *,
    n: int = 20,
    min_cells: int = 10,
    leaves_only: bool = True,
    title: str | None = None,
) -> Path:
    """Bar chart of the ``n`` regions with the highest density, left and right marked.

    Background, outside and zero-volume rows are left out; so are regions with fewer than
    ``min_cells`` cells (a Poisson count of 10 is ±30%: its density is mostly noise).

    Parameters
    ----------
    table : pandas.DataFrame
        From `region_table`.
    path : str or Path
        PNG to write.
    n : int
        Number of regions shown.
    min_cells : int
        Fewest cells a region needs to be shown.
    leaves_only : bool
        Show only regions without children (a parent's density is an average of its
        children's, so mixing levels repeats the same cells).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    rows = table[
        (table["structure_id"] > 0)
        & (table["total_volume_mm3"] > 0)
        & (table["total_cells"] >= min_cells)
    ]
    if leaves_only:
        rows = rows[~rows["structure_id"].isin(table["parent_structure_id"].dropna())]
    rows = rows.sort_values("total_cells_per_mm3", ascending=False).head(n)[::-1]
    height = max(2.5, 0.32 * len(rows) + 1.2)
    fig = _figure(figsize=(7.5, height))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, rows["total_cells_per_mm3"], color="#4c72b0", label="both hemispheres")
    ax.scatter(rows["left_cells_per_mm3"], y, marker="<", color="#dd8452", zorder=3, label="left")
    ax.scatter(rows["right_cells_per_mm3"], y, marker=">", color="#55a868", zorder=3, label="right")
    ax.set_yticks(
        y,
        [f"{a}  ({c:,} cells)" for a, c in zip(rows["acronym"], rows["total_cells"], strict=True)],
    )
    ax.set_xlabel("density (cells per mm³)")
    kind = "leaf regions" if leaves_only else "regions"
    ax.set_title(title or f"Densest {len(rows)} {kind} (≥ {min_cells} cells)")
    ax.grid(axis="x", alpha=0.3)
    if len(rows):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.text(0.5, 0.5, "no region with cells", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def plot_density_slice(
    table: pd.DataFrame,
    atlas: Atlas,
    path: str | Path,
    *,
    axis: int | None = None,
    index: int | None = None,
    title: str | None = None,
) -> Path:
    """One atlas slice, each voxel coloured by the density of its region in its hemisphere.

    A voxel takes the density of its own (deepest) region from ``table``: the left or right
    density by its hemisphere, the total where the hemisphere is 0. Region outlines are
    drawn; background is white. Only the one slice of the annotation is read.

    Parameters
    ----------
    table : pandas.DataFrame
        From `region_table` for this atlas.
    atlas : Atlas
    path : str or Path
        PNG to write.
    axis : int, optional
        Atlas axis cut across; default the anterior–posterior axis (a coronal slice).
    index : int, optional
        Slice index along ``axis``; default the middle.
    title : str, optional

    Returns
    -------
    Path
        The PNG.
    """
    if axis is None:
        axis = next(i for i, c in enumerate(atlas.orientation) if c in "ap")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2; got {axis}")
    n_axis = atlas.shape[axis]
    index = n_axis // 2 if index is None else int(index)
    if not 0 <= index < n_axis:
        raise ValueError(f"index must be in [0, {n_axis}) along atlas axis {axis}; got {index}")
    sl = tuple(index if a == axis else slice(None) for a in range(3))
    labels, hemi = dask.compute(atlas.annotation[sl], atlas.hemispheres[sl])
    labels = np.asarray(labels).astype(np.int64)
    hemi = np.asarray(hemi)

    regions = table[table["structure_id"] > 0].set_index("structure_id")
    values = np.full(labels.shape, np.nan)
    for col, which in (
        ("total_cells_per_mm3", None),
        ("left_cells_per_mm3", HEMISPHERE_LEFT),
        ("right_cells_per_mm3", HEMISPHERE_RIGHT),
    ):
        m = labels > 0 if which is None else (labels > 0) & (hemi == which)
        lut = regions[col].reindex(labels[m]).to_numpy(dtype=np.float64)
        values[m] = lut
    from matplotlib import colormaps

    other = [a for a in range(3) if a != axis]
    res = atlas.resolution_um
    extent_mm = (
        -0.5 * res[other[1]] / 1e3,
        (labels.shape[1] - 0.5) * res[other[1]] / 1e3,
        (labels.shape[0] - 0.5) * res[other[0]] / 1e3,
        -0.5 * res[other[0]] / 1e3,
    )
    fig = _figure(figsize=(7, 6))
    ax = fig.add_subplot()
    ax.set_facecolor("white")
    cmap = colormaps["magma"].with_extremes(bad="white")
    finite = values[np.isfinite(values)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    shown = np.ma.masked_where(labels == 0, values)
    img = ax.imshow(
        shown, cmap=cmap, vmin=0, vmax=max(vmax, 1e-9), extent=extent_mm, interpolation="nearest"
    )
    edges = np.zeros(labels.shape, bool)
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    ax.imshow(
        np.ma.masked_where(~edges, edges),
        cmap="Greys",
        vmin=0,
        vmax=1,
        alpha=0.6,
        extent=extent_mm,
        interpolation="nearest",
    )
    _label_regions(ax, labels, regions["acronym"], extent_mm)
    cbar = fig.colorbar(img, ax=ax, shrink=0.8)
    cbar.set_label("density (cells per mm³)")
    names = {
        "a": ("anterior", "posterior"),
        "p": ("posterior", "anterior"),
        "s": ("superior", "inferior"),
        "i": ("inferior", "superior"),
        "l": ("left", "right"),
        "r": ("right", "left"),
    }
    o = atlas.orientation
    ax.set_ylabel("{} → {} (mm)".format(*names[o[other[0]]]))
    ax.set_xlabel("{} → {} (mm)".format(*names[o[other[1]]]))
    plane = {"a": "coronal", "p": "coronal", "s": "horizontal", "i": "horizontal"}
    ax.set_title(
        title or f"Density, {plane.get(o[axis], 'sagittal')} atlas slice {index} of {n_axis}"
    )
    fig.tight_layout()
    return _save(fig, path)


def _label_regions(ax, labels, acronyms, extent_mm, *, most=12) -> None:
    """Write the acronym of the largest regions of a slice at their medoid-ish centre."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    if ids.size == 0:
        return
    # regions under 1% of the slice's brain area are too small to label legibly
    order = np.argsort(counts)[::-1][:most]
    keep = ids[order][counts[order] >= 0.01 * counts.sum()]
    x0, x1, y1, y0 = extent_mm
    sx = (x1 - x0) / labels.shape[1]
    sy = (y1 - y0) / labels.shape[0]
    for sid in keep:
        rr, cc = np.nonzero(labels == sid)
        # the region's own pixel nearest its mean: inside even for curved regions
        k = np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2)
        ax.text(
            x0 + (cc[k] + 0.5) * sx,
            y0 + (rr[k] + 0.5) * sy,
            str(acronyms.get(sid, sid)),
            ha="center",
            va="center",
            fontsize="small",
            color="white",
            bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.45, "lw": 0},
        )


def _figure(figsize, dpi: float = 110):
    """A Figure on an Agg canvas: no pyplot global state, safe in worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_registration_qc(
    image: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    grid=None,
    similarity: float | None = None,
    title: str | None = None,
    illumination: np.ndarray | None = None,
) -> Path:
    """Atlas region outlines over the sample: three orthogonal mid-planes, as a PNG.

    Parameters
    ----------
    image : (K0, K1, K2) ndarray
        The sample at atlas resolution (image axes).
    labels : (K0, K1, K2) ndarray of int
        The atlas annotation brought into the same grid.
    path : str or Path
        PNG to write.
    grid : lightsheet.register.FixedGrid, optional
        For the planes' physical aspect and axis names.
    similarity : float, optional
        Shown in the title.
    title : str, optional
    illumination : (K0, K1, K2) ndarray, optional
        The gain divided out before the B-spline (`lightsheet.illumination`), drawn as
        labelled contours: where the sheet faded, and by how much.
    """
    image = np.asarray(image, dtype=np.float64)
    labels = np.asarray(labels)
    spacing = grid.spacing_um if grid is not None else (1.0, 1.0, 1.0)
    names = ("z", "y", "x")
    if grid is not None:
        names = tuple(f"{a} ({grid.orientation[i]}→)" for i, a in enumerate(names))
    fig = _figure(figsize=(12, 4.4))
    brain = labels > 0
    values = image[brain] if brain.any() else image.ravel()
    lo, hi = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    for k, axis in enumerate(range(3)):
        ax = fig.add_subplot(1, 3, k + 1)
        mid = _brain_middle(brain, axis)
        sl = tuple(mid if a == axis else slice(None) for a in range(3))
        img, lab = image[sl], labels[sl]
        rows, cols = [a for a in range(3) if a != axis]
        extent = (0, img.shape[1] * spacing[cols], img.shape[0] * spacing[rows], 0)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-9), extent=extent)
        edges = np.zeros(lab.shape, bool)
        edges[1:, :] |= lab[1:, :] != lab[:-1, :]
        edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        ax.imshow(
            np.ma.masked_where(~edges, edges), cmap="autumn", vmin=0, vmax=1,
            extent=extent, interpolation="nearest",
        )  # fmt: skip
        if illumination is not None:
            gain = np.asarray(illumination)[sl]
            if np.ptp(gain) > 1e-3:
                lines = ax.contour(
                    gain, levels=5, colors="cyan", linewidths=0.7,
                    extent=extent, origin="upper",
                )  # fmt: skip
                ax.clabel(lines, fmt="×%.2f", fontsize="xx-small")
        ax.set_title(f"plane {names[axis]} = {mid}", fontsize="small")
        ax.set_xlabel(f"{names[cols]} (µm)", fontsize="small")
        ax.set_ylabel(f"{names[rows]} (µm)", fontsize="small")
        ax.tick_params(labelsize="x-small")
    sim = "" if similarity is None else f" (similarity {similarity:.3f})"
    lit = "" if illumination is None else "; cyan: the illumination divided out"
    fig.suptitle(title or f"Atlas regions registered to the sample{sim}{lit}")
    fig.tight_layout()
    return _save(fig, path)


def _brain_middle(brain: np.ndarray, axis: int) -> int:
    """The middle plane of the brain along ``axis`` (of the array where there is none)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(brain.any(axis=other))
    return int(present[len(present) // 2]) if present.size else brain.shape[axis] // 2


def overlay_png(
    mip: np.ndarray,
    labels_mip: np.ndarray,
    *,
    lo: float,
    hi: float,
    aspect: float = 1.0,
    annotated_yx: np.ndarray | None = None,
    annotated_found: np.ndarray | None = None,
    side: int = 256,
) -> bytes:
    """Label outlines over a maximum-intensity projection, as a small PNG.

    Outlines are yellow. Annotated cells, where given, are circled: green where a detection
    matched them, magenta where none did (so a setting's misses show at a glance; its false
    detections are the outlines without a circle).

    Parameters
    ----------
    mip : (Y, X) ndarray
        Intensity projection (the same for every setting).
    labels_mip : (Y, X) ndarray of int
        Label projection of one setting's result.
    lo, hi : float
        Display range (the same for every setting, so thumbnails compare).
    aspect : float
        Pixel height / width in µm.
    annotated_yx : (N, 2) ndarray, optional
        Annotated cells' positions in the projection's pixels (row, column).
    annotated_found : (N,) ndarray of bool, optional
        Which of them a detection matched (default: none).
    side : int
        Pixels of the PNG along its longer side.

    Returns
    -------
    bytes
        The PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from skimage.segmentation import find_boundaries

    gray = np.clip((mip.astype(float) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    edges = find_boundaries(labels_mip, mode="inner")
    rgb[edges] = (1.0, 0.85, 0.0)  # outlines in yellow
    h, w = gray.shape
    scale = side / max(h * aspect, w)
    fig = Figure(figsize=(w * scale / 100, h * aspect * scale / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(rgb, aspect=aspect, interpolation="nearest")
    if annotated_yx is not None and len(annotated_yx):
        yx = np.asarray(annotated_yx, float).reshape(-1, 2)
        found = (
            np.zeros(len(yx), bool)
            if annotated_found is None
            else np.asarray(annotated_found, bool)
        )
        for hit, colour in ((True, "#33ff66"), (False, "#ff33cc")):
            sel = found == hit
            ax.scatter(yx[sel, 1], yx[sel, 0], s=24, facecolors="none", edgecolors=colour,
                       linewidths=0.8)  # fmt: skip
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_overview(
    solution: Any,
    tile_shape: Sequence[int],
    path: str | Path,
    *,
    background: np.ndarray | None = None,
    shape_yx: Sequence[int] | None = None,
) -> Path:
    """PNG of the mosaic seen from above (y, x): tile outlines, links, dropped ones in red.

    ``solution`` is a `lightsheet.stitch.register.Solution` (its ``positions``, ``fallback``
    and ``links``, each with ``a``, ``b`` and ``kept``). ``background`` (a 2-D max projection
    of the fused volume, at any downsampling) is drawn under the outlines, stretched over
    ``shape_yx`` full-resolution voxels. Tiles left at their nominal position are outlined
    in orange and labelled "nominal".
    """
    from matplotlib.patches import Rectangle

    pos = solution.positions[:, 1:]
    ny, nx = (float(t) for t in tile_shape[1:])
    fig = _figure((6, 6), dpi=100)
    ax = fig.subplots()
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
    return path


def plot_psf(
    psf: np.ndarray,
    voxel_size_um: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    beads: pd.DataFrame | None = None,
) -> Path:
    """PNG of a PSF's maximum projections along z, y and x, in µm.

    Square-root scaled, so that its faint tails and side lobes show. With ``beads`` (columns
    ``x_um``, ``y_um``, ``fwhm_z_um``: the beads it was measured from), a fourth panel maps
    their axial FWHM across the field, where a light sheet's waist shows.
    """
    from matplotlib.colors import PowerNorm

    vz, vy, vx = (float(v) for v in voxel_size_um)
    nz, ny, nx = psf.shape
    views = [
        (psf.max(axis=0), (0, nx * vx, ny * vy, 0), "x (µm)", "y (µm)"),
        (psf.max(axis=1), (0, nx * vx, nz * vz, 0), "x (µm)", "z (µm)"),
        (psf.max(axis=2), (0, ny * vy, nz * vz, 0), "y (µm)", "z (µm)"),
    ]
    panels = 3 if beads is None else 4
    fig = _figure((3.4 * panels, 3.8), dpi=100)
    axes = fig.subplots(1, panels)
    for ax, (image, extent, xlabel, ylabel) in zip(axes, views, strict=False):
        ax.imshow(image, cmap="magma", norm=PowerNorm(0.5, vmin=0), extent=extent)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if beads is not None:
        ax = axes[3]
        dots = ax.scatter(beads["x_um"], beads["y_um"], c=beads["fwhm_z_um"], cmap="viridis")
        fig.colorbar(dots, ax=ax, label="axial FWHM (µm)")
        # one scale on both axes, wide enough for beads all on one line
        x, y = beads["x_um"].to_numpy(), beads["y_um"].to_numpy()
        half = 0.6 * max(np.ptp(x), np.ptp(y), 10 * vx)
        ax.set_xlim((x.min() + x.max()) / 2 - half, (x.min() + x.max()) / 2 + half)
        ax.set_ylim((y.min() + y.max()) / 2 + half, (y.min() + y.max()) / 2 - half)
        ax.set_aspect("equal")
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        ax.set_title("beads used", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def mip_png(path: str | Path, *, channel: int = 0, max_side: int = 256) -> bytes:
    """Maximum-intensity projection along z of an OME-Zarr image's coarsest level, as a PNG.

    The first time point of ``channel`` (the last channel where there are fewer), about
    ``max_side`` pixels wide, display range the 1st to 99.8th percentile.
    """
    from lightsheet.io.omezarr import read_image

    levels = sorted(p.name for p in Path(path).glob("s*") if p.name[1:].isdigit())
    image, _, _ = read_image(path, level=max(0, len(levels) - 1))
    mip = np.asarray(image[0, min(channel, image.shape[1] - 1)].max(axis=0).compute(), float)
    lo, hi = np.percentile(mip, [1, 99.8]) if mip.size else (0.0, 1.0)
    aspect = mip.shape[0] / max(mip.shape[1], 1)
    fig = _figure((3, 3 * aspect), dpi=max_side / 3)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(mip, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
