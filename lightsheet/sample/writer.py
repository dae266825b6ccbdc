"""Writing a sample: `generate`, its argument checks and its files."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lightsheet.config import DEFAULT_PATTERN
from lightsheet.errors import SampleError
from lightsheet.psf import write_psf
from lightsheet.sample._output import output_entries, replace_previous
from lightsheet.sample.phantom import Phantom, _cells_over_time, build_phantom, truth_region_table
from lightsheet.sample.presets import (
    CAMERA,
    FILE_NAME,
    PLANE_EXPOSURE_MS,
    REGIONS,
    SAMPLE_FORMAT,
    SAMPLE_VERSION,
    START_ABS_MS,
    TIMEPOINT_INTERVAL_MS,
    _check_args,
    check_voxel_size,
    optics_with,
)
from lightsheet.sample.render import _bounded_map, camera

__all__ = [
    "generate",
    "Progress",
]

_SAMPLE_ENTRIES = (
    "tiles", "atlas", "truth", "psf.tif", "beads.tif", "sample.json", "config.yaml",
    "positions.csv",
)  # fmt: skip
_ATLAS_FILES = (
    "metadata.json",
    "structures.json",
    "annotation.tiff",
    "hemispheres.tiff",
    "reference.tiff",
)
_TRUTH_FILES = ("cells.csv", "density.csv", "tiles.csv")
_TILE_NAME = re.compile(
    r"^ex6-2_CamA_ch\d+_CAM1_stack0000_\d+nm_\d+msec_\d+msecAbs_\d+x_\d+y_\d+z_\d+t\.tif$"
)

Progress = Callable[[int, int, str], None]


# -- public API -----------------------------------------------------------------------------


def generate(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    channels: int = 2,
    timepoints: int = 1,
    progress: Progress | None = None,
    misaligned: bool = False,
    realistic: bool = False,
    cells: str = "nuclei",
    voxel_size_um: Sequence[float] | None = None,
    sheet_fwhm_um: float | None = None,
) -> dict:
    """Write a sample acquisition with its atlas and ground truth.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write; created if missing. It must be empty or hold a previous sample
        (its ``sample.json``), whose files are replaced; other content is refused.
    size : {"tiny", "small", "medium", "large"} or str
        Preset from `SIZES`, or a custom size such as ``"4GB"`` (raw bytes of one time
        point over all channels; see `size_preset`).
    seed : int
        Seed of every random draw; the same seed gives the same files.
    channels : int
        1 to 4; channel 0 holds the nuclei, the others autofluorescence/anatomy only.
    timepoints : int
        Time points: the same cells with fresh noise and slight bleaching.
    progress : callable, optional
        ``progress(done, total, what)``, called after each tile file is written.
    misaligned : bool
        Rotate, scale, shift and warp the brain against its atlas and reorient the image
        (`lightsheet.sample.misaligned`); the config then registers the atlas. With
        ``realistic``, its textured tissue is what the registration sees.
    realistic : bool
        Image textured tissue with a dark outside, vessels, debris, uneven illumination and
        light-sheet stripes (`lightsheet.sample.realistic`); the config then sets channel 1
        as ``segment.background_channel``.
    cells : {"nuclei", "somata"}
        With ``realistic``: dense nuclei (6–12 µm) or sparse somata (12–18 µm).
    voxel_size_um : (3,) floats, optional
        The voxel size (z, y, x) to image at; default `VOXEL_SIZE_UM`. The brain, its atlas
        and the optics keep their size in µm (`SizePreset.at_voxel_size`), so ``size``
        names an extent, not a byte count; a pixel collects light in proportion to its
        area. Not with ``misaligned``.
    sheet_fwhm_um : float, optional
        The light sheet's thickness (FWHM, µm; default `OPTICS`' 7): the PSF the tiles are
        blurred with and ``psf.tif`` holds. Not with ``misaligned``.

    Returns
    -------
    dict
        The content of ``sample.json``.

    Raises
    ------
    SampleError
        Unknown size, bad voxel size, or channels/timepoints/seed out of range.
    OutputExistsError
        ``out_dir`` holds files that are not a previous sample.
    """
    _check_args(size, seed, channels, timepoints)
    if voxel_size_um is not None:
        check_voxel_size(voxel_size_um)
    optics_with(sheet_fwhm_um)  # refused before anything is written
    out = _prepare_out_dir(Path(out_dir))
    # marks the folder as a sample from the start, so an interrupted run can be redone
    _write_json(out / "sample.json", {"format": SAMPLE_FORMAT, "complete": False, "size": size})

    custom = voxel_size_um is not None or sheet_fwhm_um is not None
    if misaligned and custom:
        raise SampleError(
            "misaligned cannot be combined with voxel_size_um or sheet_fwhm_um; expected one "
            "of them"
        )
    if misaligned:
        from lightsheet.sample.misaligned import build_misaligned_phantom

        ph = build_misaligned_phantom(
            size, seed=seed, channels=channels, realistic=realistic, cells=cells
        )
    else:
        ph = build(
            size, seed=seed, channels=channels, realistic=realistic, cells=cells,
            voxel_size_um=voxel_size_um, sheet_fwhm_um=sheet_fwhm_um,
        )  # fmt: skip
    preset = ph.preset
    shape = preset.shape_zyx
    labels, sides, volume_res = ph.truth_volumes()
    density = truth_region_table(ph.cells, labels, sides, ph.structures, volume_res)
    beads = _write_psf(out, ph, seed)
    _write_phantom_atlas(out / "atlas", ph, channels)

    (out / "tiles").mkdir()
    grid = preset.tile_grid_zyx
    tshape = preset.tile_shape_zyx

    def write_tile(t: int, c: int, ordinal: int, tz: int, ty: int, tx: int) -> tuple[str, int]:
        lo = (tz * tshape[0], ty * tshape[1], tx * tshape[2])
        hi = tuple(a + b for a, b in zip(lo, tshape, strict=True))
        expected = ph.expected(lo, hi, channel=c, t=t)
        # one stream per tile: the result does not depend on the order of tiles
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, t, c, tz, ty, tx]))
        tile = camera(expected, rng=rng)
        del expected
        ms = t * TIMEPOINT_INTERVAL_MS
        absolute = START_ABS_MS + ms + ordinal * shape[0] * PLANE_EXPOSURE_MS
        name = FILE_NAME.format(
            c=c, wavelength=ph.channels[c].wavelength_nm, ms=ms, abs=absolute,
            x=tx, y=ty, z=tz, t=t,
        )  # fmt: skip
        _write_tile(out / "tiles" / name, tile)
        return name, (out / "tiles" / name).stat().st_size

    _ = ph._scene  # built once here, not raced for by the threads
    jobs = [
        (t, c, ordinal, *tile)
        for t in range(timepoints)
        for c in range(channels)
        for ordinal, tile in enumerate(itertools.product(*map(range, grid)))
    ]
    nbytes = 0
    for done, (name, size_bytes) in enumerate(_bounded_map(write_tile, jobs), start=1):
        nbytes += size_bytes
        if progress is not None:
            progress(done, len(jobs), name)

    (out / "truth").mkdir()
    truth = _cells_over_time(ph.cells, timepoints)
    truth.to_csv(out / "truth" / "cells.csv", index=False)
    density.to_csv(out / "truth" / "density.csv", index=False)

    info = _sample_info(ph, size=size, seed=seed, timepoints=timepoints, beads=beads)
    info.update(
        {
            "shape": [timepoints, channels, *shape],
            "tile_grid": list(grid),
            "tile_shape": list(tshape),
            "n_tiles": len(jobs),
            "bytes_written": nbytes,
            "misalignment": None if not misaligned else _misalignment_info(ph),
            "realistic": ph.info() if realistic else None,
        }
    )
    _write_config(out / "config.yaml", info)
    _write_json(out / "sample.json", info)
    return info


def build(size, *, seed: int, channels: int, realistic: bool, cells: str, **imaging) -> Phantom:
    """The plain or the realistic phantom (``cells`` only with ``realistic``).

    ``imaging``: `build_phantom`'s ``voxel_size_um`` and ``sheet_fwhm_um``.
    """
    if cells != "nuclei" and not realistic:
        raise SampleError(f"cells: {cells!r} needs realistic=True; expected 'nuclei' without")
    if not realistic:
        return build_phantom(size, seed=seed, channels=channels, **imaging)
    from lightsheet.sample.realistic import build_realistic_phantom

    return build_realistic_phantom(size, seed=seed, channels=channels, cells=cells, **imaging)


def _prepare_out_dir(out: Path) -> Path:
    """Create ``out``, or empty it of a previous sample; refuse anything else."""
    entries = output_entries(out)
    if not entries:
        return out
    previous = _read_sample_json(out / "sample.json")
    # the pipeline's results may live beside a sample: they are left alone
    unknown = [e for e in entries if e not in (*_SAMPLE_ENTRIES, "output")]
    unknown += [
        f"tiles/{p.name}"
        for p in (out / "tiles").glob("*")
        if (out / "tiles").is_dir() and not (p.is_file() and _TILE_NAME.match(p.name))
    ]
    unknown += [f"atlas/{p.name}" for p in _extra(out / "atlas", _ATLAS_FILES)]
    unknown += [f"truth/{p.name}" for p in _extra(out / "truth", _TRUTH_FILES)]
    return replace_previous(
        out,
        entries,
        previous=previous is not None,
        unknown=unknown,
        kind="sample",
        clear=_SAMPLE_ENTRIES,
    )


def _extra(folder: Path, allowed: Sequence[str]) -> list[Path]:
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder]
    return [p for p in folder.iterdir() if p.name not in allowed or not p.is_file()]


def _read_sample_json(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == SAMPLE_FORMAT else None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_tile(path: Path, tile: np.ndarray) -> None:
    import tifffile

    # plain uncompressed pages: contiguous data that readers can memory-map
    tifffile.imwrite(path, tile, photometric="minisblack", metadata={"axes": "ZYX"})


def _write_phantom_atlas(folder: Path, ph: Phantom, channels: int) -> None:
    """The phantom's atlas; its reference is the anatomy channel at atlas resolution.

    Each reference voxel is the mean over the voxel of the field the sample images (the
    field's trilinear interpolant: weights 1/8, 3/4, 1/8 along each axis), as a template
    averaged from finer data holds; no PSF blurs it.
    """
    from scipy.ndimage import convolve1d

    field = ph.fields[min(1, channels - 1)]
    for axis in range(field.ndim):
        field = convolve1d(field, [0.125, 0.75, 0.125], axis=axis, mode="nearest")
    reference = np.rint(field * (20_000 / float(field.max())))
    _write_atlas(
        folder,
        ph.annotation,
        ph.hemispheres,
        reference.astype(np.uint16),
        ph.structures,
        ph.resolution_um,
    )


def _write_psf(out: Path, ph: Phantom, seed: int) -> dict:
    """Write ``psf.tif`` and ``beads.tif``; return ``sample.json``'s ``beads``.

    ``psf.tif``: what the tiles are blurred with; ``beads.tif``: a stack of beads imaged
    with the same optics and camera (`lightsheet.sample.beads`).
    """
    from lightsheet.sample.beads import write_bead_stack

    write_psf(out / "psf.tif", ph.psf, ph.voxel_size_um)
    return write_bead_stack(out / "beads.tif", ph.optics, ph.voxel_size_um, seed=seed)


def _sample_info(ph: Phantom, *, size: str, seed: int, timepoints: int, beads: dict) -> dict:
    """``sample.json`` but the tiling (shape, tile grid and shape, counts: None here)."""
    channels = len(ph.channels)
    return {
        "format": SAMPLE_FORMAT,
        "version": SAMPLE_VERSION,
        "complete": True,
        "size": size,
        "seed": int(seed),
        "shape": None,
        "dtype": "uint16",
        "voxel_size_um": list(ph.voxel_size_um),
        "tile_grid": None,
        "tile_shape": None,
        "n_tiles": None,
        "channels": [
            {"index": c, "wavelength_nm": ch.wavelength_nm, "content": ch.content}
            for c, ch in enumerate(ph.channels)
        ],
        "nuclei_channel": 0,
        "pattern": DEFAULT_PATTERN,
        "input": "tiles/*.tif",
        "atlas": {
            "path": "atlas",
            "resolution_um": [ph.resolution_um] * 3,
            "shape": list(ph.annotation.shape),
            "orientation": "asr",
            "offset_um": [0.0, 0.0, 0.0],
        },
        "psf": {"path": "psf.tif", "shape": list(ph.psf.shape), **ph.optics},
        "beads": beads,
        "camera": CAMERA,
        "n_cells": len(ph.cells),
        "nucleus_diameter_um": round(float(ph.cells["diameter_um"].mean()), 2),
        "regions": [
            {
                "structure_id": r.id,
                "acronym": r.acronym,
                "density_cells_per_mm3": r.density_cells_per_mm3,
                "nucleus_diameter_um": r.diameter_um,
            }
            for r in REGIONS
            if r.density_cells_per_mm3 is not None
        ],
        "raw_bytes": ph.preset.raw_bytes(channels=channels, timepoints=timepoints),
        "bytes_written": None,
    }


def _write_atlas(folder: Path, annotation, hemispheres, reference, structures, res_um) -> None:
    import tifffile

    folder.mkdir()
    meta = {
        "name": "lightsheet_synthetic_mouse",
        "citation": "unpublished (generated by lightsheet.sample)",
        "atlas_link": "",
        "species": "Mus musculus (synthetic phantom)",
        "symmetric": False,
        "resolution": [res_um] * 3,
        "orientation": "asr",
        "version": f"{SAMPLE_VERSION}.0",
        "shape": list(annotation.shape),
        "trasform_to_bg": np.eye(4).tolist(),  # (sic) BrainGlobe's key
        "additional_references": [],
    }
    _write_json(folder / "metadata.json", meta)
    _write_json(folder / "structures.json", structures)
    tifffile.imwrite(folder / "annotation.tiff", annotation.astype(np.uint32))
    tifffile.imwrite(folder / "hemispheres.tiff", hemispheres.astype(np.uint8))
    tifffile.imwrite(folder / "reference.tiff", reference)


def _misalignment_info(ph) -> dict:
    from lightsheet.sample.misaligned import SAMPLE_MISALIGNMENT, SAMPLE_ORIENTATION

    m = ph.misalignment
    return {
        "orientation": SAMPLE_ORIENTATION,
        **SAMPLE_MISALIGNMENT,
        "rotation_matrix": np.round(m.matrix * SAMPLE_MISALIGNMENT["sample_scale"], 6).tolist(),
        "shift_um": np.round(m.shift_um, 3).tolist(),
    }


def _write_config(path: Path, info: dict, *, stitch: dict | None = None) -> None:
    import yaml

    config = {
        "input": info["input"],
        "pattern": info["pattern"],
        "voxel_size_um": info["voxel_size_um"],
        "camera_offset": info["camera"]["offset_adu"],
        "psf": info["psf"]["path"],
        "atlas": info["atlas"]["path"],
        "output": "output",
        "segment": {
            "channel": info["nuclei_channel"],
            "nucleus_diameter_um": info["nucleus_diameter_um"],
        },
        "density": {"orientation": "asr", "offset_um": [0.0, 0.0, 0.0]},
    }
    if stitch:
        config["stitch"] = stitch
    if info.get("realistic") and len(info["channels"]) > 1:  # the autofluorescence channel
        config["segment"]["background_channel"] = 1
    if info.get("misalignment"):
        config["density"] = {"orientation": info["misalignment"]["orientation"]}
        config["register"] = {"enabled": True, "channel": 1}
    header = (
        f"# Run config for the generated sample (size {info['size']}, seed {info['seed']}).\n"
        "# Relative paths are relative to this file's folder.\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
