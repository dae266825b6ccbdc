"""Registration of the atlas to the sample: geometry, downsampling, elastix, accuracy."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from lightsheet.density import assign_regions, atlas_voxel, region_table
from lightsheet.elastix import _DEFAULT_MAPS, parameter_maps, register
from lightsheet.errors import RegistrationError
from lightsheet.io.atlas import Atlas
from lightsheet.register import (
    FixedGrid,
    downsample,
    pick_level,
    register_atlas,
    sample_space_volumes,
)
from lightsheet.sample.misaligned import registration_case

ORIENTATIONS = ["asr", "ipl", "lai", "rsp", "sla"]


def _atlas(case):
    res = (case.resolution_um,) * 3
    return Atlas.from_arrays(
        case.annotation, case.structures, resolution_um=res, orientation="asr",
        hemispheres=case.hemispheres,
    )  # fmt: skip


# -- geometry -----------------------------------------------------------------------------


def _small_grid(orientation):
    """The grid of a 61 × 93 × 47 image at (3, 1.5, 2) µm on an asr atlas at (25, 20, 10) µm."""
    atlas = Atlas.from_arrays(
        np.ones((30, 20, 25), np.uint32),
        [{"id": 1, "acronym": "r", "name": "root", "structure_id_path": [1]}],
        resolution_um=(25, 20, 10),
        orientation="asr",
    )
    grid = FixedGrid.for_atlas(
        atlas, image_shape=(61, 93, 47), voxel_size_um=(3.0, 1.5, 2.0), orientation=orientation
    )
    return grid


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_fixed_grid_physical_geometry_matches_point_mapping(orientation):
    """A bin's centre mapped like a cell lands where the reoriented array says it is."""
    grid = _small_grid(orientation)
    ids = np.arange(np.prod(grid.shape)).reshape(grid.shape)
    moved = grid.to_atlas_axes(ids)
    np.testing.assert_array_equal(grid.from_atlas_axes(moved), ids)
    origin, spacing, shape = grid.physical_geometry()
    assert moved.shape == shape
    # every bin: its centre (image µm) → physical, against origin + index × spacing
    k = np.stack(np.unravel_index(ids.ravel(), grid.shape), axis=1)
    centres = k @ grid.bin_to_image()[:3, :3].T + grid.bin_to_image()[:3, 3]
    m = grid.image_to_physical()
    physical = centres @ m[:3, :3].T + m[:3, 3]
    where = np.stack(np.unravel_index(np.argsort(moved.ravel()), shape), axis=1)
    np.testing.assert_allclose(origin + where * spacing, physical, atol=1e-9)
    # bins cover the image exactly once
    assert grid.bin_volume_um3().sum() == pytest.approx(
        np.prod(np.multiply((61, 93, 47), (3.0, 1.5, 2.0)))
    )


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_psf_width_in_atlas_voxels_follows_the_reorientation(orientation):
    """A width along each image axis lands on the atlas axis brainglobe-space maps it to."""
    grid = _small_grid(orientation)
    sigma_um = np.array([3.0, 1.0, 2.0])
    m = grid.image_to_physical()[:3, :3]  # image µm -> atlas-axes µm (brainglobe-space)
    expected = np.abs(m) @ sigma_um / np.array([25.0, 20.0, 10.0])
    np.testing.assert_allclose(grid.atlas_sigma_vox(sigma_um), expected)


def test_registration_blurs_the_reference_by_the_psf(coarse_case, tmp_path):
    """``psf_sigma_um`` registers a reference blurred by the PSF: its warped image is that
    of the reference blurred by SciPy along the mapped axes (the affine is the same)."""
    from scipy.ndimage import gaussian_filter

    case = coarse_case
    atlas = _atlas(case)
    grid = FixedGrid.for_atlas(
        atlas, image_shape=case.image.shape, voxel_size_um=case.voxel_size_um,
        orientation=case.orientation,
    )  # fmt: skip
    fixed = case.image
    sigma_um = np.array([3.0, 1.0, 2.0]) * case.resolution_um
    maps = parameter_maps(grid.physical_geometry()[2], atlas.resolution_um, bspline=False)
    common = dict(
        annotation=case.annotation, hemispheres=case.hemispheres,
        resolution_um=atlas.resolution_um, maps=maps, threads=2, bspline_mask=False,
    )  # fmt: skip
    blurred = gaussian_filter(
        case.reference.astype(np.float32), grid.atlas_sigma_vox(sigma_um), mode="nearest"
    )
    a = register_atlas(
        fixed, grid, reference=case.reference, psf_sigma_um=sigma_um, out_dir=tmp_path / "a",
        **common,
    )  # fmt: skip
    b = register_atlas(fixed, grid, reference=blurred, out_dir=tmp_path / "b", **common)
    np.testing.assert_allclose(a.warped_reference, b.warped_reference, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(a.affine["matrix"], b.affine["matrix"])


def _brute_force_mean(volume, voxel, bins):
    """Reference: every voxel split over the bins it overlaps, one voxel at a time."""
    out = np.zeros(
        [int(np.ceil(n * v / b - 1e-9)) for n, v, b in zip(volume.shape, voxel, bins, strict=True)]
    )
    weight = np.zeros_like(out)
    for idx in np.ndindex(volume.shape):
        parts = []
        for a in range(3):
            lo, hi = idx[a] * voxel[a], (idx[a] + 1) * voxel[a]
            ks = range(int(lo // bins[a]), int(np.ceil(hi / bins[a] - 1e-9)))
            parts.append([(k, min(hi, (k + 1) * bins[a]) - max(lo, k * bins[a])) for k in ks])
        for k0, w0 in parts[0]:
            for k1, w1 in parts[1]:
                for k2, w2 in parts[2]:
                    out[k0, k1, k2] += volume[idx] * w0 * w1 * w2
                    weight[k0, k1, k2] += w0 * w1 * w2
    return out / weight


def test_downsample_matches_brute_force_at_any_ratio():
    atlas = Atlas.from_arrays(
        np.ones((4, 4, 4), np.uint32),
        [{"id": 1, "acronym": "r", "name": "root", "structure_id_path": [1]}],
        resolution_um=(7.0, 5.0, 3.0),
        orientation="asr",
    )
    rng = np.random.default_rng(2)
    vol = rng.random((11, 13, 9)).astype(np.float32) * 1000
    grid = FixedGrid.for_atlas(
        atlas, image_shape=vol.shape, voxel_size_um=(2.0, 1.5, 1.0), orientation="asr"
    )
    got = downsample(da.from_array(vol, chunks=(4, 5, 3)), grid)
    ref = _brute_force_mean(vol.astype(np.float64), (2.0, 1.5, 1.0), grid.spacing_um)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_downsample_from_a_pyramid_level():
    """A level that is a 2x block mean gives the full-resolution result (block-constant)."""
    atlas = Atlas.from_arrays(
        np.ones((4, 4, 4), np.uint32),
        [{"id": 1, "acronym": "r", "name": "root", "structure_id_path": [1]}],
        resolution_um=(10.0, 10.0, 10.0),
        orientation="asr",
    )
    rng = np.random.default_rng(3)
    coarse = rng.random((6, 7, 5)).astype(np.float32)
    full = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    grid = FixedGrid.for_atlas(
        atlas, image_shape=full.shape, voxel_size_um=(1.5, 1.5, 1.5), orientation="asr"
    )
    a = downsample(da.from_array(full, chunks=5), grid)
    b = downsample(da.from_array(coarse, chunks=3), grid, factor=(2, 2, 2))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert pick_level([(1.5,) * 3, (3.0,) * 3, (6.0,) * 3], grid.spacing_um) == 0
    assert pick_level([(1.5,) * 3, (3.0,) * 3, (6.0,) * 3], (30.0,) * 3) == 2


def test_default_parameter_maps_are_elastix_own():
    """The maps written here without importing itk are itk-elastix's defaults."""
    code = (
        "import itk, json; p = itk.ParameterObject.New(); "
        "print(json.dumps({m: {k: list(v) for k, v in p.GetDefaultParameterMap(m).items()} "
        "for m in ('affine', 'bspline')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _DEFAULT_MAPS


# -- failures -----------------------------------------------------------------------------


def test_elastix_failure_fails_with_its_log_and_leaves_nothing(tmp_path):
    fixed = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    maps = parameter_maps(fixed.shape, (10, 10, 10), bspline=False)
    maps[0]["Transform"] = ["NoSuchTransform"]
    out = tmp_path / "registration"
    with pytest.raises(RegistrationError, match=r"exited with status 1; no output.*Log tail"):
        register(
            fixed, fixed, fixed_origin_um=(5, 5, 5), fixed_spacing_um=(10, 10, 10),
            moving_spacing_um=(10, 10, 10), maps=maps, out_dir=out, threads=1,
        )  # fmt: skip
    with pytest.raises(RegistrationError, match="did not finish in 0.5 s"):
        register(
            fixed, fixed, fixed_origin_um=(5, 5, 5), fixed_spacing_um=(10, 10, 10),
            moving_spacing_um=(10, 10, 10), maps=maps, out_dir=out, timeout_s=0.5,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _elastix_children(marker) -> list:
    """Live ``lightsheet.elastix`` processes whose job folder lies under ``marker``."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] != psutil.STATUS_ZOMBIE and "lightsheet.elastix" in cmd:
            if any(str(marker) in c for c in cmd):
                found.append(p)
    return found


#: A parent that registers until it is stopped: temporary folders under argv[1], output argv[2].
#: SIGTERM raises Prefect's TerminationSignal, as a Prefect flow run's handler does on
#: cancellation (`prefect.utilities.engine`).
_PARENT = """
import signal, sys, tempfile
import numpy as np
from prefect.exceptions import TerminationSignal

def on_sigterm(sig, frame):
    raise TerminationSignal(signal=sig)

signal.signal(signal.SIGTERM, on_sigterm)
tempfile.tempdir = sys.argv[1]
from lightsheet.elastix import parameter_maps, register
fixed = np.random.default_rng(0).random((48, 48, 48)).astype(np.float32)
maps = parameter_maps(fixed.shape, (10, 10, 10), affine_iterations=10**6, bspline=False)
register(fixed, fixed[::-1].copy(), fixed_origin_um=(5, 5, 5), fixed_spacing_um=(10, 10, 10),
         moving_spacing_um=(10, 10, 10), maps=maps, out_dir=sys.argv[2], threads=1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stopped_parent_leaves_no_elastix_and_no_output(tmp_path, stop):
    """Ctrl-C (KeyboardInterrupt), a termination (Prefect's cancellation: TerminationSignal)
    or SIGKILL of the process that runs elastix: its child goes too, no output appears."""
    import signal
    import time

    jobs, out = tmp_path / "tmp", tmp_path / "registration"
    jobs.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(jobs), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not _elastix_children(jobs):
            assert parent.poll() is None, "the parent ended before elastix started"
            assert time.monotonic() < deadline, "elastix did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # into the child's run (itk's import, or elastix itself)
        parent.send_signal(getattr(signal, stop))
        assert parent.wait(timeout=60) != 0
        # SIGKILL: the kernel kills the child at once (PR_SET_PDEATHSIG); allow for reaping
        deadline = time.monotonic() + 10
        while _elastix_children(jobs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _elastix_children(jobs) == []
    finally:
        parent.kill()
        parent.wait()
        for p in _elastix_children(jobs):  # never leave one behind, even when failing
            p.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no output, no partial
    if stop != "SIGKILL":  # the parent cleaned its job folder up on the way out
        assert list(jobs.iterdir()) == []


def test_a_timeout_kills_elastix(tmp_path, monkeypatch):
    """``timeout_s``: the stage fails, and the elastix child is gone when it does."""
    import tempfile

    jobs = tmp_path / "tmp"
    jobs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(jobs))
    fixed = np.random.default_rng(0).random((48, 48, 48)).astype(np.float32)
    maps = parameter_maps(fixed.shape, (10, 10, 10), affine_iterations=10**6, bspline=False)
    with pytest.raises(RegistrationError, match="did not finish in 3 s"):
        register(
            fixed, fixed[::-1].copy(), fixed_origin_um=(5, 5, 5), fixed_spacing_um=(10, 10, 10),
            moving_spacing_um=(10, 10, 10), maps=maps, out_dir=tmp_path / "r", threads=1,
            timeout_s=3,
        )  # fmt: skip
    assert _elastix_children(jobs) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not list(jobs.iterdir())


# -- accuracy -----------------------------------------------------------------------------


def _rotation_error_deg(a, b):
    u, _, vt = np.linalg.svd(a)
    u2, _, vt2 = np.linalg.svd(b)
    d = (u @ vt) @ (u2 @ vt2).T
    return float(np.degrees(np.arccos(np.clip((np.trace(d) - 1) / 2, -1, 1))))


def registration_figures(case, result, atlas):
    """The acceptance figures of one registration, against the case's truth."""
    res = case.resolution_um
    mis = case.misalignment
    transform = result.transform(atlas)
    q = transform.to_atlas_um(case.landmarks_um)
    err = np.linalg.norm(q - mis(case.landmarks_um), axis=1) / res
    truth_ids = case.truth_labels(case.landmarks_um)
    got_ids = case.annotation[
        tuple(np.clip(np.floor(q / res).astype(int), 0, np.array(case.annotation.shape) - 1).T)
    ]
    grid = result.grid
    k = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    centres = k @ grid.bin_to_image()[:3, :3].T + grid.bin_to_image()[:3, 3]
    truth_labels = case.truth_labels(centres)
    dice = {}
    for s in case.structures:
        members = [t["id"] for t in case.structures if s["id"] in t["structure_id_path"]]
        t, p = np.isin(truth_labels, members), np.isin(result.annotation, members)
        dice[s["acronym"]] = (
            int(t.sum()),
            2 * float((t & p).sum()) / max(1, int(t.sum() + p.sum())),
        )
    largest = sorted(dice.items(), key=lambda kv: -kv[1][0])[:10]
    missed = got_ids != truth_ids
    true_voxel = atlas_voxel(mis(case.landmarks_um[missed]) / res)
    name = {s["id"]: s["acronym"] for s in case.structures} | {0: "outside"}
    return {
        "rotation_error_deg": _rotation_error_deg(np.array(result.affine["matrix"]), mis.matrix),
        "scale_error": result.affine["scale"] / mis.scale - 1,
        "landmark_mean_voxels": float(err.mean()),
        "landmark_max_voxels": float(err.max()),
        "dice_10_largest": {k: round(v[1], 4) for k, v in largest},
        "cells_in_true_region": float((got_ids == truth_ids).mean()),
        "min_jacobian": result.min_jacobian,
        "similarity": result.similarity,
        # where the missed cells were: their true voxel on a region boundary, and which leaves
        "missed_on_boundary": int(_on_boundary(case.annotation, true_voxel).sum()),
        "missed": int(missed.sum()),
        "missed_pairs": collections.Counter(
            (name.get(int(a), str(a)), name.get(int(b), str(b)))
            for a, b in zip(truth_ids[missed], got_ids[missed], strict=True)
        ).most_common(),
    }


def _on_boundary(labels: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Whether each voxel (inside or outside ``labels``) has a 6-neighbour of another label."""
    padded = np.pad(labels, 1, mode="edge")
    v = np.clip(voxels, -1, np.array(labels.shape)) + 1
    out = np.zeros(len(v), bool)
    for axis in range(3):
        for step in (-1, 1):
            n = v.copy()
            n[:, axis] = np.clip(n[:, axis] + step, 0, padded.shape[axis] - 1)
            out |= padded[tuple(n.T)] != padded[tuple(v.T)]
    return out


@pytest.fixture(scope="module")
def coarse_case():
    return registration_case(resolution_um=200.0, seed=0, n_landmarks=400)


@pytest.fixture(scope="module")
def coarse_result(coarse_case, tmp_path_factory):
    case = coarse_case
    atlas = _atlas(case)
    grid = FixedGrid.for_atlas(
        atlas,
        image_shape=case.image.shape,
        voxel_size_um=case.voxel_size_um,
        orientation=case.orientation,
    )
    out = tmp_path_factory.mktemp("reg") / "registration"
    result = register_atlas(
        case.image, grid, annotation=case.annotation, hemispheres=case.hemispheres,
        reference=case.reference, resolution_um=atlas.resolution_um, out_dir=out, threads=2,
    )  # fmt: skip
    return case, atlas, result


def test_registration_recovers_a_misaligned_brain(coarse_result):
    """200 µm, 8°, 5 % scale, 10-voxel shift, 2.5-voxel warp, reoriented sample."""
    case, atlas, result = coarse_result
    fig = registration_figures(case, result, atlas)
    assert fig["rotation_error_deg"] < 1.0, fig
    assert abs(fig["scale_error"]) < 0.02, fig
    assert fig["landmark_mean_voxels"] < 0.5 and fig["landmark_max_voxels"] < 2.0, fig
    assert fig["min_jacobian"] > 0, fig
    assert min(fig["dice_10_largest"].values()) > 0.7, fig
    assert fig["cells_in_true_region"] > 0.85, fig
    assert result.warnings == [] and result.similarity > 0.8
    files = sorted(p.name for p in result.transform_files)
    assert files == ["TransformParameters.0.txt", "TransformParameters.1.txt"]


def test_transformix_points_agree_with_the_registered_labels(coarse_result):
    """Cells (transformix) and labels (deformation field) go to the same atlas voxels."""
    case, atlas, result = coarse_result
    grid = result.grid
    rng = np.random.default_rng(5)
    k = rng.integers(0, grid.shape, size=(2000, 3))
    centres = k @ grid.bin_to_image()[:3, :3].T + grid.bin_to_image()[:3, 3]
    sid, _ = (
        assign_regions(
            __import__("pandas").DataFrame(centres, columns=["z_um", "y_um", "x_um"]),
            atlas,
            result.transform(atlas),
        )[["structure_id", "hemisphere"]]
        .to_numpy()
        .T
    )
    labels = result.annotation[tuple(k.T)].astype(np.int64)
    agree = (np.where(sid < 0, 0, sid) == labels).mean()
    assert agree > 0.995, agree  # a voxel centre on a boundary may round either way


def test_sample_space_volumes_and_table(coarse_result):
    case, atlas, result = coarse_result
    vol = sample_space_volumes(result.annotation, result.hemispheres, result.grid.bin_volume_um3())
    total = result.grid.bin_volume_um3().sum() * 1e-9
    assert vol["total"].sum() == pytest.approx(total)
    cells = __import__("pandas").DataFrame({"structure_id": [997, 343], "hemisphere": [1, 2]})
    table = region_table(cells, atlas, volumes_mm3=vol, outside_warning_fraction=1.0).set_index(
        "structure_id"
    )
    brain = vol.loc[vol.index > 0, "total"].sum()
    assert table.loc[997, "total_volume_mm3"] == pytest.approx(brain)
    assert table.loc[997, "total_cells_per_mm3"] == pytest.approx(2 / brain)


def test_wrong_orientation_gives_a_quality_warning(coarse_case, tmp_path):
    """The same sample registered as if its axes ran the other way: a warning, not silence."""
    case = coarse_case
    atlas = _atlas(case)
    assert case.orientation == "ipl"
    # upside down: superior and inferior swapped (a mirror, which no rotation undoes)
    grid = FixedGrid.for_atlas(
        atlas, image_shape=case.image.shape, voxel_size_um=case.voxel_size_um, orientation="spl"
    )
    shape = grid.physical_geometry()[2]
    result = register_atlas(
        case.image, grid, annotation=case.annotation, hemispheres=case.hemispheres,
        reference=case.reference, resolution_um=atlas.resolution_um, out_dir=tmp_path / "r",
        threads=2, maps=parameter_maps(shape, atlas.resolution_um, bspline=False),
    )  # fmt: skip
    assert any("registration quality" in w for w in result.warnings), result.summary()


@pytest.mark.slow
def test_a_fading_light_sheet_is_divided_out_before_the_b_spline(coarse_result, tmp_path):
    """The sheet fades to a quarter across the sample: corrected, the B-spline is not pulled.

    The reference is the same case without the fade (`coarse_result`): the landmarks stay as
    close to the truth (measured 0.15 atlas voxels against 0.12 unfaded; 0.52 without the
    correction), and the fitted range is the fade's with the case's own gradient (10 %),
    across the brain's extent along it.
    """
    import dataclasses

    case, atlas, unfaded = coarse_result
    t = np.linspace(0.0, 1.0, case.image.shape[2], dtype=np.float32)
    fade = 0.25**t
    case = dataclasses.replace(case, image=case.image * fade[None, None, :])
    light = fade * (1 - 0.1 * t)
    result = register_atlas(
        case.image, unfaded.grid, annotation=case.annotation, hemispheres=case.hemispheres,
        reference=case.reference, resolution_um=atlas.resolution_um, out_dir=tmp_path / "r",
        threads=2,
    )  # fmt: skip
    gain = result.illumination
    assert gain.shape == case.image.shape  # the image is at the atlas's resolution
    brain = np.flatnonzero((result.annotation > 0).any(axis=(0, 1)))
    truth = light[brain[0]] / light[brain[-1]]
    assert result.summary()["illumination_range"] == pytest.approx(truth, rel=0.1)
    # brighter on the sheet's side: the brain's first quarter along the fade over its last
    inside, quarter = result.annotation > 0, (brain[-1] - brain[0]) // 4
    near, far = (np.s_[..., a : a + quarter] for a in (brain[0], brain[-1] - quarter))
    ratio = gain[near][inside[near]].mean() / gain[far][inside[far]].mean()
    assert ratio == pytest.approx(light[near[-1]].mean() / light[far[-1]].mean(), rel=0.1)
    faded, reference = (registration_figures(case, r, atlas) for r in (result, unfaded))
    assert faded["landmark_mean_voxels"] < reference["landmark_mean_voxels"] + 0.1, (
        faded,
        reference,
    )
    assert result.warnings == [], result.warnings


@pytest.mark.slow
def test_registration_acceptance_at_50um(tmp_path):
    """The issue's acceptance case: 50 µm atlas, mouse-brain size."""
    case = registration_case(resolution_um=50.0, seed=0)
    atlas = _atlas(case)
    grid = FixedGrid.for_atlas(
        atlas,
        image_shape=case.image.shape,
        voxel_size_um=case.voxel_size_um,
        orientation=case.orientation,
    )
    result = register_atlas(
        case.image, grid, annotation=case.annotation, hemispheres=case.hemispheres,
        reference=case.reference, resolution_um=atlas.resolution_um, out_dir=tmp_path / "r",
        threads=2,
    )  # fmt: skip
    fig = registration_figures(case, result, atlas)
    assert fig["rotation_error_deg"] <= 0.5 and abs(fig["scale_error"]) <= 0.01, fig
    assert fig["landmark_mean_voxels"] <= 0.5, fig
    assert min(fig["dice_10_largest"].values()) >= 0.9, fig
    assert fig["min_jacobian"] > 0, fig
    assert fig["landmark_max_voxels"] <= 1.5, fig  # measured 0.32 (1.13 without illumination)
    # measured 99.0 % on this case (98.0 % before the illumination was divided out; 98.6 % and
    # 98.1 % on two others then, 97.8-98.2 % with other elastix sampling seeds;
    # benchmarks/results/register.md): the 98 % is checked there; here a margin of
    # one elastix seed's spread, so another machine's rounding of one landmark does not fail
    # the suite
    assert fig["cells_in_true_region"] >= 0.975, fig


def test_misaligned_sample_truth_is_the_atlas_at_the_mapped_position():
    from lightsheet.sample.misaligned import build_misaligned_phantom, lookup_labels

    ph = build_misaligned_phantom("tiny", seed=1, channels=2)
    cells = ph.cells
    q = ph.misalignment(cells[["z_um", "y_um", "x_um"]].to_numpy())
    np.testing.assert_array_equal(
        cells["structure_id"], lookup_labels(ph.annotation, ph.resolution_um, q)
    )
    np.testing.assert_array_equal(
        cells["hemisphere"], lookup_labels(ph.hemispheres, ph.resolution_um, q)
    )
    assert ph.misalignment.rotation_deg == pytest.approx(8.0)
    assert ph.misalignment.scale == pytest.approx(1 / 1.05)
    # truth volumes are sample-space volumes: the grid covers the image once
    ann, hem, h = ph.truth_volumes()
    extent = np.multiply(ph.preset.shape_zyx, ph.voxel_size_um)
    assert np.all(np.array(ann.shape) * h >= extent) and ((ann > 0) == (hem > 0)).all()
    # the autofluorescence follows the atlas: brighter where the mapped position is brain
    lo, hi = (0, 0, 0), ph.preset.shape_zyx
    image = ph.expected(lo, hi, channel=1)
    grid = np.stack(
        np.meshgrid(
            *[np.arange(n) * v for n, v in zip(hi, ph.voxel_size_um, strict=True)], indexing="ij"
        ),
        -1,
    )
    brain = lookup_labels(ph.annotation, ph.resolution_um, ph.misalignment(grid)) > 0
    assert np.median(image[brain]) > 2 * np.median(image[~brain])


def test_wrong_voxel_size_is_reported(coarse_case, tmp_path):
    """Voxels said to be twice their size: a warning or a failure that names voxel_size_um."""
    case = coarse_case
    atlas = _atlas(case)
    vox = tuple(2 * v for v in case.voxel_size_um)
    grid = FixedGrid.for_atlas(
        atlas, image_shape=case.image.shape, voxel_size_um=vox, orientation=case.orientation
    )
    fixed = downsample(da.from_array(case.image, chunks=64), grid)
    maps = parameter_maps(grid.physical_geometry()[2], atlas.resolution_um, bspline=False)
    try:
        result = register_atlas(
            fixed, grid, annotation=case.annotation, hemispheres=case.hemispheres,
            reference=case.reference, resolution_um=atlas.resolution_um,
            out_dir=tmp_path / "r", threads=2, maps=maps,
        )  # fmt: skip
    except RegistrationError as exc:
        assert "voxel_size_um" in str(exc).split("Log tail")[0]
        assert not (tmp_path / "r").exists()
    else:
        assert any("voxel_size_um" in w for w in result.warnings), result.summary()


@pytest.mark.slow
def test_register_stage_warns_in_log_artifact_and_record_and_fails_clean(
    coarse_case, prefect_harness, tmp_path
):
    """The task: a wrong orientation warns (log, artifact, record, and through the density
    stage the run summary); elastix failing leaves no output of the stage."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect_dask import DaskTaskRunner

    from lightsheet.config import RegisterConfig
    from lightsheet.io.atlas import write_atlas
    from lightsheet.io.omezarr import write_image
    from tasks.register import register_volume

    case = coarse_case
    atlas = write_atlas(
        tmp_path / "atlas", case.annotation, case.structures,
        resolution_um=(case.resolution_um,) * 3, orientation="asr",
        hemispheres=case.hemispheres, reference=case.reference,
    )  # fmt: skip
    image = np.stack([np.zeros_like(case.image), case.image])[None]
    raw_path = tmp_path / "raw.ome.zarr"
    fp = write_image(
        da.from_array(image, chunks=(1, 1, 64, 64, 64)), raw_path, voxel_size_um=case.voxel_size_um
    )
    raw = {
        "stage": "stitch", "path": str(raw_path), "fingerprints": {"path": fp},
        "shape": list(image.shape), "voxel_size_um": list(case.voxel_size_um),
    }  # fmt: skip
    runner = DaskTaskRunner(
        cluster_kwargs={"n_workers": 1, "threads_per_worker": 2, "processes": False}
    )

    @flow(task_runner=runner)
    def register_only(config, orientation, out):  # no hints: RegisterConfig is a local import
        return register_volume.submit(raw, str(atlas), config, orientation, 0, None, out).result()

    # upside down (superior and inferior swapped): registration runs, and says it is poor
    config = RegisterConfig(enabled=True, channel=1, bspline=False, threads=2)
    record = register_only(config, "spl", str(tmp_path / "wrong"))
    assert any("registration quality" in w for w in record["warnings"]), record
    summary = json.loads((tmp_path / "wrong" / "registration.json").read_text())
    assert summary["warnings"] == record["warnings"]
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["register-qc"])),
            sort=ArtifactSort.CREATED_DESC,  # this run's: the harness's server holds others
            limit=1,
        )
    assert "**warning:** registration quality" in art.data

    # ... and the run summary: the density stage carries it on, `summarize` shows it
    from lightsheet.config import DensityConfig
    from lightsheet.io.tables import write_table
    from lightsheet.lineage import file_content_fingerprint
    from tasks.density import density_table
    from tasks.pipeline import summarize

    cells_csv = tmp_path / "cells.csv"
    positions = case.landmarks_um[:20]
    write_table(pd.DataFrame(positions, columns=["z_um", "y_um", "x_um"]), cells_csv)
    segmented = {
        "stage": "segment", "path": str(cells_csv), "cells": str(cells_csv),
        "fingerprints": {"cells": file_content_fingerprint(cells_csv)},
    }  # fmt: skip

    @flow(task_runner=runner)
    def density_and_summary(registered, out):
        density = density_table.submit(
            segmented, raw, str(atlas), DensityConfig(orientation="spl"), out, registered
        ).result()
        return summarize([registered, density], out)

    run = density_and_summary(record, str(tmp_path / "wrong"))
    quality = [w for w in record["warnings"] if "registration quality" in w]
    assert quality and all(w in run["warnings"] for w in quality), run["warnings"]
    assert all(f"**Warning:** {w}" in run["markdown"] for w in quality), run["markdown"]

    # elastix stopped before it finishes: the stage fails and writes nothing
    out = tmp_path / "crash"
    with pytest.raises(RegistrationError, match="did not finish"):
        register_only(config.model_copy(update={"timeout_s": 0.5}), "ipl", str(out))
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
