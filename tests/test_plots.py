"""lightsheet.plots: the stitch overview and the MIP thumbnail (density plots: test_density)."""

from __future__ import annotations

import io

import dask.array as da
import numpy as np
from PIL import Image

from lightsheet.io.omezarr import write_image
from lightsheet.plots import mip_png, plot_overview
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
