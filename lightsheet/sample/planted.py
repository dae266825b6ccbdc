"""Cells planted at known places into a real background (`lightsheet sample --background`).

A folder of single-plane TIFFs of real tissue without labelled cells (an autofluorescence
channel, e.g. ``cellfinder-crop/ch1``) becomes a two-channel acquisition with exact truth::

    DIR/ch0/ch0ZZZZZ.tif   the background plus somata (`lightsheet.sample.tissue.plant_cells`)
    DIR/ch1/ch1ZZZZZ.tif   the background imaged again: fresh noise of its local SD
                           (`lightsheet.sample.tissue.second_exposure`), the background channel
    DIR/truth/cells.csv    cell_id, z_um, y_um, x_um (voxel i centred at i × voxel size),
                           diameter_um, peak_sd, peak
    DIR/sample.json        voxel size, pattern, counts, where the background came from

One folder per channel, one file per plane: the layout ingest reads with the pattern in
``sample.json`` (`PLANTED_PATTERN`). There is no atlas, so no run config: score detection
(``lightsheet.segment.segment_volume``, ``background_channel: 1``) against the truth.

The voxel size must be given: single-plane TIFFs rarely record the z step, and a size read
from a header that holds only the lateral pixel size would be wrong without a word. The
background is read whole (planting needs its local noise and tissue mask), so it is limited
to `MAX_BACKGROUND_VOXELS`; this is a generator for test and benchmark crops, not a stage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightsheet.errors import SampleError
from lightsheet.sample._output import output_entries, replace_previous

__all__ = ["PLANTED_PATTERN", "generate_planted"]

#: The layout's pattern (ingest's ``pattern``): channel folder, plane number.
PLANTED_PATTERN = r"ch(?P<c>\d+)/ch\d(?P<plane>\d+)\.tif$"
#: Largest background accepted (voxels): 2 GiB as float32 while planting.
MAX_BACKGROUND_VOXELS = 2**29
#: Default somata per mm³ of the background's volume when ``n`` is not given.
DEFAULT_CELLS_PER_MM3 = 3_000.0
_KIND = "planted"
_ENTRIES = ("ch0", "ch1", "truth", "sample.json")


def read_planes(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """The single-plane TIFFs of ``folder`` stacked in name order, and their names.

    Raises
    ------
    SampleError
        No TIFF in the folder, a file that is not one 2-D plane, planes of different shapes,
        or more than `MAX_BACKGROUND_VOXELS` voxels.
    """
    import tifffile

    folder = Path(folder)
    if not folder.is_dir():
        raise SampleError(f"background: {folder} is not a folder; expected a folder of TIFFs")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not files:
        raise SampleError(f"background: no .tif/.tiff file in {folder}; expected one per plane")
    shapes = []
    for f in files:
        with tifffile.TiffFile(f) as tif:
            shapes.append(tuple(tif.series[0].shape))
    bad = [(f.name, s) for f, s in zip(files, shapes, strict=True) if len(s) != 2]
    if bad or len(set(shapes)) > 1:
        found = bad[0] if bad else sorted(set(shapes))[:3]
        raise SampleError(f"background: {folder} must hold 2-D planes of one shape; found {found}")
    n_vox = len(files) * int(np.prod(shapes[0]))
    if n_vox > MAX_BACKGROUND_VOXELS:
        raise SampleError(
            f"background: {folder} holds {n_vox:,} voxels; expected at most "
            f"{MAX_BACKGROUND_VOXELS:,} (a crop: the background is read whole)"
        )
    return np.stack([tifffile.imread(f) for f in files]), [f.name for f in files]


def generate_planted(
    out_dir: str | Path,
    background_dir: str | Path,
    *,
    voxel_size_um: Sequence[float],
    n: int | None = None,
    seed: int = 0,
    diameter_um: tuple[float, float] = (11.0, 17.0),
    peak_sd: tuple[float, float] = (5.0, 15.0),
) -> dict:
    """Plant somata into a real background and write the acquisition and its truth.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write: missing, empty, or a previous planted sample (replaced).
    background_dir : str or Path
        Folder of single-plane TIFFs, one per z plane in name order; never modified.
    voxel_size_um : (3,) floats
        Voxel size (z, y, x) of the background in µm.
    n : int, optional
        Somata to plant; default `DEFAULT_CELLS_PER_MM3` × the volume.
    seed : int
        Seed of the planting and of the second exposure's noise.
    diameter_um, peak_sd : (lo, hi)
        Soma diameters and peak heights in local noise SDs (`plant_cells`).

    Returns
    -------
    dict
        The content of ``sample.json``.

    Raises
    ------
    SampleError
        Bad voxel size, seed or n, an unreadable background, or no room for ``n`` somata.
    OutputExistsError
        ``out_dir`` holds other files.
    """
    import tifffile

    from lightsheet.sample.presets import SAMPLE_FORMAT, SAMPLE_VERSION, check_voxel_size
    from lightsheet.sample.tissue import plant_cells, second_exposure
    from lightsheet.sample.writer import _write_json

    vs = check_voxel_size(voxel_size_um)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SampleError(f"seed: got {seed!r}; expected a non-negative integer")
    background, names = read_planes(background_dir)
    volume_mm3 = float(np.prod(np.asarray(background.shape) * vs)) * 1e-9
    if n is None:
        n = max(1, round(DEFAULT_CELLS_PER_MM3 * volume_mm3))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SampleError(f"n: got {n!r}; expected a positive integer")
    out = _prepare(Path(out_dir))
    _write_json(out / "sample.json", {"format": SAMPLE_FORMAT, "kind": _KIND, "complete": False})
    try:
        image, truth = plant_cells(
            background, vs, n=n, diameter_um=diameter_um, peak_sd=peak_sd, seed=seed
        )
    except ValueError as err:
        raise SampleError(f"background {background_dir}: {err}") from err
    window = max(4, round(2 * diameter_um[1] / float(np.mean(vs[1:]))))
    second = second_exposure(background, window, rng=np.random.default_rng([seed, 1]))
    if np.issubdtype(background.dtype, np.integer):
        info = np.iinfo(background.dtype)
        second = np.clip(np.rint(second), info.min, info.max).astype(background.dtype)
    for c, volume in enumerate((image, second)):
        (out / f"ch{c}").mkdir()
        for z, plane in enumerate(volume):
            tifffile.imwrite(out / f"ch{c}" / f"ch{c}{z:05d}.tif", plane, photometric="minisblack")
    (out / "truth").mkdir()
    truth.insert(0, "cell_id", np.arange(1, len(truth) + 1, dtype=np.int64))
    truth.round(4).to_csv(out / "truth" / "cells.csv", index=False)
    meta = {
        "format": SAMPLE_FORMAT,
        "version": SAMPLE_VERSION,
        "kind": _KIND,
        "complete": True,
        "seed": seed,
        "background": {"path": str(Path(background_dir).resolve()), "files": len(names)},
        "shape": [1, 2, *background.shape],
        "dtype": str(background.dtype),
        "voxel_size_um": list(vs),
        "input": "ch*/*.tif",
        "pattern": PLANTED_PATTERN,
        "channels": [
            {"index": 0, "content": "background + planted somata"},
            {"index": 1, "content": "background, second exposure (fresh noise)"},
        ],
        "nuclei_channel": 0,
        "background_channel": 1,
        "n_cells": len(truth),
        "diameter_um": list(diameter_um),
        "peak_sd": list(peak_sd),
        "nucleus_diameter_um": round(float(truth["diameter_um"].mean()), 2),
    }
    _write_json(out / "sample.json", meta)
    return meta


def _prepare(out: Path) -> Path:
    """Create ``out``, or empty it of a previous planted sample; refuse anything else."""
    entries = output_entries(out)
    if not entries:
        return out
    try:
        previous = json.loads((out / "sample.json").read_text()).get("kind") == _KIND
    except (OSError, ValueError, AttributeError):
        previous = False
    unknown = [e for e in entries if e not in _ENTRIES]
    for c in ("ch0", "ch1"):
        if (out / c).is_dir():
            name = re.compile(rf"^ch{c[-1]}\d{{5}}\.tif$")
            unknown += [f"{c}/{p.name}" for p in (out / c).iterdir() if not name.match(p.name)]
    return replace_previous(
        out, entries, previous=previous, unknown=unknown, kind="planted sample", clear=_ENTRIES
    )
