"""lightsheet.plots: the stitch overview, the MIP thumbnail, the sweep's overlay and the
registration's QC (density plots: test_density)."""

from __future__ import annotations

import io

import dask.array as da
import numpy as np
from PIL import Image

from lightsheet.io.omezarr import write_image
from lightsheet.plots import mip_png, overlay_png, plot_overview, plot_registration_qc
from lightsheet.stitch.register import Link, Solution


def test_mip_png_is_the_projection_of_the_coarsest_level(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 4000, (1, 2, 12, 40, 64)).astype("uint16")
    write_image(da.from_array(volume), tmp_path / "img.ome.zarr", voxel_size_um=(2, 1, 1))
    png = Image.open(io.BytesIO(mip_png(tmp_path / "img.ome.zarr", channel=1, max_side=128)))
    assert png.format == "PNG"
    assert png.size[0] == 128 and abs(png.size[1] - 128 * 40 / 64) <= 1
    # a channel beyond the image's shows its last one, not an error
    assert mip_png(tmp_path / "img.ome.zarr", channel=5) == mip_png(
        tmp_path / "img.ome.zarr", channel=1
    )


def test_plot_overview_draws_every_tile(tmp_path):
    pos = np.array([[0, 0, 0], [0, 0, 90.3], [0, 88.7, 1.2]], float)
    links = [Link(0, 1, (0, 0, 90), kept=True), Link(0, 2, (0, 90, 0), kept=False)]
    solution = Solution(positions=pos, nominal=pos.round(), links=links, fallback=[2])
    path = plot_overview(solution, (10, 100, 100), tmp_path / "overview.png")
    with Image.open(path) as png:
        assert png.size == (600, 600)
        pixels = np.asarray(png.convert("RGB"))
    r, g, b = np.moveaxis(pixels.astype(int), -1, 0)
    assert ((g > 150) & (r < 100) & (b < 100)).any(), "kept links in lime"
    assert ((r > 150) & (g < 100) & (b < 100)).any(), "dropped links in red"
    assert ((r > 200) & (g > 120) & (g < 200) & (b < 80)).any(), "nominal tiles in orange"


def test_overlay_circles_annotated_cells_found_and_missed():
    """Green circles where a detection matched an annotation, magenta where none did, each
    around its annotation's pixel (a dark image, one label outlined in yellow)."""
    mip = np.zeros((100, 200), np.float32)
    labels = np.zeros((100, 200), np.int32)
    labels[45:55, 20:30] = 1
    annotated = np.array([[50.0, 60.0], [50.0, 150.0]])
    png = overlay_png(mip, labels, lo=0, hi=1, annotated_yx=annotated,
                      annotated_found=np.array([True, False]), side=200)  # fmt: skip
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (100, 200)
    r, g, b = np.moveaxis(pixels, -1, 0)
    green = (g > 150) & (r < 120) & (b < 150)
    magenta = (r > 150) & (g < 120) & (b > 120)
    yellow = (r > 200) & (g > 150) & (b < 80)
    for mask, (y, x) in ((green, annotated[0]), (magenta, annotated[1])):
        ys, xs = np.nonzero(mask)
        assert len(ys) and abs(ys.mean() - y) < 1.5 and abs(xs.mean() - x) < 1.5
        assert np.hypot(ys - y, xs - x).max() < 8  # a circle around it, not beyond
    assert not (green[:, 100:].any() or magenta[:, :100].any())
    assert yellow[45:55, 20:30].any() and not yellow[:, 40:].any()
    # no annotations: only the outlines
    plain = np.asarray(Image.open(io.BytesIO(overlay_png(mip, labels, lo=0, hi=1, side=200))))
    assert not ((plain[..., 1] > 150) & (plain[..., 0] < 120)).any()


def test_registration_qc_draws_the_illumination_where_it_was_divided_out(tmp_path):
    """Region outlines in yellow; the gain's contours in cyan, only when one is given."""
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 30, 40)], indexing="ij")
    labels = (sum(x**2 for x in g) < 0.7).astype(int) + (g[2] > 0.3)
    gain = np.exp(-0.8 * g[2])
    image = 100 * gain * (labels > 0)

    def cyan(path):
        with Image.open(path) as png:
            r, gr, b = np.moveaxis(np.asarray(png.convert("RGB")).astype(int), -1, 0)
        return int(((r < 80) & (gr > 180) & (b > 180)).sum())

    plain = plot_registration_qc(image, labels, tmp_path / "plain.png")
    lit = plot_registration_qc(image, labels, tmp_path / "lit.png", illumination=gain)
    assert cyan(plain) == 0 and cyan(lit) > 100
