"""Point-spread functions: generated from the optics, or read from a TIFF and checked.

A PSF here is a float32 ``(Z, Y, X)`` array with odd size in every axis, its peak at the
centre voxel, non-negative and summing to 1, sampled at the image's voxel size.

A measured PSF (a bead's image) comes as the camera recorded it: on the camera's level and
noise, and often at a finer z step than the sample. `validate_psf` takes the level of the
crop's border off and zeroes what is within the border's noise; `load_psf` resamples a PSF
whose TIFF declares another voxel size (ImageJ or OME metadata) to the image's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightsheet.errors import PSFError

__all__ = [
    "FWHM_PER_SIGMA",
    "MAX_PSF_BYTES",
    "axis_moments",
    "border_light",
    "check_psf_fits",
    "gaussian_psf",
    "load_psf",
    "optics_sigma_um",
    "psf_from_optics",
    "psf_grid_note",
    "psf_sigma_um",
    "resample_psf",
    "validate_psf",
    "write_psf",
]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def gaussian_psf(
    sigma_um: Sequence[float], voxel_size_um: Sequence[float], *, truncate: float = 3.0
) -> np.ndarray:
    """Sample an anisotropic 3-D Gaussian PSF on the voxel grid.

    Parameters
    ----------
    sigma_um : (3,) sequence of float
        Standard deviation along ``(z, y, x)`` in µm.
    voxel_size_um : (3,) sequence of float
        Voxel size along ``(z, y, x)`` in µm.
    truncate : float
        Half-size of the kernel in standard deviations.

    Returns
    -------
    psf : (Z, Y, X) ndarray of float32
        Odd-sized, centred, summing to 1.

    Examples
    --------
    >>> psf = gaussian_psf((2.0, 0.8, 0.8), (2.0, 1.0, 1.0))
    >>> psf.shape, round(float(psf.sum()), 6)
    ((7, 7, 7), 1.0)
    """
    sigma_um = _triple(sigma_um, "sigma_um")
    voxel_size_um = _triple(voxel_size_um, "voxel_size_um")
    sigma_vox = [s / v for s, v in zip(sigma_um, voxel_size_um, strict=True)]
    half = [max(1, math.ceil(truncate * s)) for s in sigma_vox]
    grids = np.meshgrid(*[np.arange(-h, h + 1, dtype=np.float64) for h in half], indexing="ij")
    r2 = sum((g / s) ** 2 for g, s in zip(grids, sigma_vox, strict=True))
    psf = np.exp(-0.5 * r2)
    return (psf / psf.sum()).astype(np.float32)


def optics_sigma_um(
    *,
    na: float,
    wavelength_nm: float,
    refractive_index: float,
    sheet_fwhm_um: float | None = None,
) -> tuple[float, float, float]:
    """The ``(z, y, x)`` standard deviations in µm of a light-sheet microscope's PSF.

    Lateral and axial widths of the detection objective follow the paraxial Gaussian
    fits of Zhang, Zerubia & Olivo-Marin (Appl. Opt. 2007): ``sigma_xy = 0.21 λ / NA`` and
    ``sigma_z = 0.66 λ n / NA²``. A light sheet of the given FWHM confines the axial extent;
    the two axial profiles multiply, so their inverse variances add. Parameters as for
    `psf_from_optics`.

    Examples
    --------
    >>> [round(s, 3) for s in optics_sigma_um(na=0.16, wavelength_nm=600, refractive_index=1.45)]
    [22.43, 0.787, 0.787]
    """
    if not 0 < na < refractive_index:
        raise PSFError(f"na must be in (0, refractive_index={refractive_index}); got {na}")
    if wavelength_nm <= 0:
        raise PSFError(f"wavelength_nm must be positive; got {wavelength_nm}")
    lam_um = wavelength_nm / 1000.0
    sigma_xy = 0.21 * lam_um / na
    sigma_z = 0.66 * lam_um * refractive_index / na**2
    if sheet_fwhm_um is not None:
        if sheet_fwhm_um <= 0:
            raise PSFError(f"sheet_fwhm_um must be positive; got {sheet_fwhm_um}")
        sigma_sheet = sheet_fwhm_um / FWHM_PER_SIGMA
        sigma_z = 1.0 / math.sqrt(1.0 / sigma_z**2 + 1.0 / sigma_sheet**2)
    return (sigma_z, sigma_xy, sigma_xy)


def psf_from_optics(
    *,
    na: float,
    wavelength_nm: float,
    refractive_index: float,
    voxel_size_um: Sequence[float],
    sheet_fwhm_um: float | None = None,
    truncate: float = 3.0,
) -> np.ndarray:
    """Gaussian approximation of a light-sheet microscope's PSF from its optics.

    Its widths are `optics_sigma_um`'s (paraxial Gaussian fits to the detection objective,
    confined axially by the light sheet), sampled at the voxel centres (`gaussian_psf`).

    Parameters
    ----------
    na : float
        Numerical aperture of the detection objective, in ``(0, refractive_index)``.
    wavelength_nm : float
        Emission wavelength in nm.
    refractive_index : float
        Refractive index of the immersion medium.
    voxel_size_um : (3,) sequence of float
        Voxel size ``(z, y, x)`` in µm.
    sheet_fwhm_um : float, optional
        Full width at half maximum of the illumination sheet in µm; None for widefield.
    truncate : float
        Half-size of the kernel in standard deviations.

    Returns
    -------
    psf : (Z, Y, X) ndarray of float32

    Examples
    --------
    >>> psf = psf_from_optics(na=0.2, wavelength_nm=560, refractive_index=1.45,
    ...                       voxel_size_um=(2.0, 1.0, 1.0), sheet_fwhm_um=6.0)
    >>> psf.shape[0] > 1 and psf.shape[0] % 2 == 1
    True
    """
    sigma = optics_sigma_um(
        na=na, wavelength_nm=wavelength_nm, refractive_index=refractive_index,
        sheet_fwhm_um=sheet_fwhm_um,
    )  # fmt: skip
    return gaussian_psf(sigma, voxel_size_um, truncate=truncate)


def validate_psf(psf: np.ndarray, *, name: str = "psf") -> np.ndarray:
    """Check a PSF and return it as a centred, odd-sized float32 array summing to 1.

    A bead's image sits on the camera's level, with noise, and would otherwise add a flat
    box the size of the crop to the PSF. Where the crop's outermost voxels (its border)
    hold a level above zero (their median, more than 3 robust SDs: 1.4826 × their median
    absolute deviation) or negative values (a level already subtracted), that level comes
    off, every voxel within 3 SDs of it is zeroed, and of the rest only what is connected to
    the brightest voxel is kept, cut to its bounding box (so a crop of a bead field gives
    its brightest bead, not a PSF the size of the field). A generated PSF's border holds
    its tails, smooth and above zero, and is kept as it is; so is a border above half the
    peak (a crop too tight to tell a level from the PSF's own spread).

    Parameters
    ----------
    psf : (Z, Y, X) ndarray
        Candidate PSF.
    name : str
        What to call it in error messages (e.g. its file name).

    Returns
    -------
    psf : (Z, Y, X) ndarray of float32

    Raises
    ------
    PSFError
        Not 3-D, not finite, negative values (a negative level), or all zeros.

    Examples
    --------
    A bead 5,000 counts bright on a camera level of 100 with noise of SD 5:

    >>> true = gaussian_psf((2.0, 1.0, 1.0), (1.0, 0.5, 0.5), truncate=4)
    >>> bead = np.random.default_rng(0).normal(100 + 5000 * true / true.max(), 5)
    >>> [round(s, 2) for s in psf_sigma_um(validate_psf(bead), (1.0, 0.5, 0.5))]
    [1.97, 0.98, 0.99]
    """
    psf = np.asarray(psf)
    if psf.ndim != 3:
        raise PSFError(f"{name}: a PSF must be a 3-D (Z, Y, X) array; got shape {psf.shape}")
    if not np.all(np.isfinite(psf)):
        raise PSFError(f"{name}: PSF contains NaN or infinite values; expected finite values")
    psf = _level_removed(psf.astype(np.float64), name)
    if np.any(psf < 0):
        raise PSFError(
            f"{name}: PSF has negative values (min {float(psf.min()):.3g}); expected >= 0"
        )
    total = float(psf.sum(dtype=np.float64))
    if total <= 0:
        raise PSFError(f"{name}: PSF sums to {total}; expected a positive sum (all zeros?)")
    psf = _recentre(psf)
    return (psf / psf.sum()).astype(np.float32)


def _level_removed(psf: np.ndarray, name: str) -> np.ndarray:
    """``psf`` less its border's level, what is within the border's noise zeroed.

    See `validate_psf`; unchanged where the border holds no level. Of what stands above the
    noise, only the part connected to the brightest voxel is kept (`border_light`): the
    noise's own specks (and another bead in the crop) are not the PSF, and far from the
    centre they would widen it most.
    """
    level, sd, light = border_light(psf)
    if level < -3 * sd or (level < 0 and sd == 0):
        raise PSFError(
            f"{name}: PSF has negative values (its border's level is {level:.3g}); expected "
            ">= 0 (a level under zero: signed data read as unsigned, or too much subtracted?)"
        )
    has_level = level > 3 * sd or float(psf[_border(psf.shape)].min()) < 0
    if not has_level or level + 3 * sd >= 0.5 * float(psf.max()):
        return psf
    from scipy import ndimage

    box = ndimage.find_objects(light.astype(np.int8))[0]  # a field of beads: this bead's box
    return np.where(light[box], psf[box] - level, 0.0)


def border_light(array: np.ndarray) -> tuple[float, float, np.ndarray]:
    """The level of an array's outermost voxels, their noise, and the light above them.

    The level is the border's median, the noise SD 1.4826 × its median absolute deviation;
    the light is the voxels more than 3 SDs above the level that connect to the brightest
    voxel (a boolean mask).
    """
    from scipy import ndimage

    border = array[_border(array.shape)]
    level = float(np.median(border))
    sd = 1.4826 * float(np.median(np.abs(border - level)))
    labels, _ = ndimage.label(array > level + 3 * sd)
    return level, sd, labels == labels.flat[np.argmax(array)]


def _border(shape: Sequence[int]) -> np.ndarray:
    """Mask of an array's outermost voxels (all of a side 2 or fewer voxels thick)."""
    mask = np.ones(shape, bool)
    mask[tuple(slice(1, -1) if n > 2 else slice(0, 0) for n in shape)] = False
    return mask


def resample_psf(psf: np.ndarray, from_um: Sequence[float], to_um: Sequence[float]) -> np.ndarray:
    """A PSF sampled at voxel size ``from_um`` resampled to ``to_um`` (z, y, x in µm).

    Each axis whose size differs, separately, as the image samples the light along it:

    - **z, point-sampled**: a light-sheet plane is the sheet's light at that depth, not
      its average over the step to the next plane (the PSF's axial profile already holds
      the sheet), so the new planes take the profile's values at their depths (Keys' cubic
      interpolation between the old planes), as `psf_from_optics` samples the optics' PSF;
    - **y and x, integrated** (conservatively: each new voxel holds the PSF's mass over its
      extent, each old voxel's mass spread evenly over its own), as a camera's pixels
      integrate the light.

    The new centre voxel is centred on the PSF's centroid along that axis (a bead stack's
    noise can make a plane a few fine steps off its brightest). The result covers at least
    the input's extent, odd-sized, validated (summing to 1).

    Examples
    --------
    >>> fine = gaussian_psf((2.0, 1.0, 1.0), (0.5, 0.25, 0.25), truncate=4)
    >>> coarse = resample_psf(fine, (0.5, 0.25, 0.25), (2.0, 1.0, 1.0))
    >>> coarse.shape, [round(s, 2) for s in psf_sigma_um(coarse, (2.0, 1.0, 1.0))]
    ((9, 9, 9), [2.0, 1.05, 1.05])

    (along y and x, integrated over the coarser pixels: the variance grows by about a
    pixel's width squared over 12; along z, the point samples' 2.0.)
    """
    out = validate_psf(psf).astype(np.float64)
    # resampling one axis keeps the others' profiles (it moves mass along that axis only)
    centroid = axis_moments(out)[0]
    pairs = zip(_triple(from_um, "from_um"), _triple(to_um, "to_um"), strict=True)
    for axis, (old, new) in enumerate(pairs):
        if old == new:
            continue
        offset = (centroid[axis] - out.shape[axis] // 2) * old
        weights = (_sample if axis == 0 else _remap)(out.shape[axis], old, new, offset)
        out = np.moveaxis(np.tensordot(weights, out, (1, axis)), 0, axis)
    return validate_psf(np.clip(out, 0.0, None))  # (the cubic's small lobes below zero)


def _new_count(n: int, old: float, new: float, centre: float) -> int:
    """Odd count of voxels of size ``new``, centred on ``centre``, covering ``n`` of ``old``."""
    return 2 * math.ceil((n * old / 2 + abs(centre)) / new - 0.5) + 1


def _sample(n: int, old: float, new: float, centre: float) -> np.ndarray:
    """(m, n) weights from ``n`` point samples ``old`` apart to ``m`` ``new`` apart.

    Keys' cubic convolution (a = -0.5) at the new points (centred on ``centre``, µm; the old
    ones on 0), which covers the old ones' extent; zero beyond the old samples.
    """
    m = _new_count(n, old, new, centre)
    points = ((np.arange(m) - m // 2) * new + centre) / old + n // 2
    t = np.abs(points[:, None] - np.arange(n)[None, :])
    near = 1.5 * t**3 - 2.5 * t**2 + 1
    far = -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _remap(n: int, old: float, new: float, centre: float) -> np.ndarray:
    """(m, n) weights from ``n`` voxels of size ``old`` to ``m`` of size ``new``.

    The share of each old voxel (centred on 0) that falls in each new one (centred on
    ``centre``, µm); the new voxels cover the old ones' extent.
    """
    half = n * old / 2
    m = _new_count(n, old, new, centre)
    old_edges = np.arange(n + 1) * old - half
    new_edges = (np.arange(m + 1) - m / 2) * new + centre
    lo = np.maximum(new_edges[:-1, None], old_edges[None, :-1])
    hi = np.minimum(new_edges[1:, None], old_edges[None, 1:])
    return np.clip(hi - lo, 0, None) / old


def psf_sigma_um(psf: np.ndarray, voxel_size_um: Sequence[float]) -> tuple[float, float, float]:
    """Standard deviation (µm) of a PSF along each axis: the root of its second central moment.

    A measured PSF need not be Gaussian: this is the width of the Gaussian that blurs as
    much (variances add under convolution).

    Examples
    --------
    >>> [round(s, 3) for s in psf_sigma_um(gaussian_psf((2.0, 0.8, 0.8), (1, 0.5, 0.5),
    ...     truncate=6), (1, 0.5, 0.5))]
    [2.0, 0.8, 0.8]
    """
    sd = axis_moments(validate_psf(psf))[1]
    voxel = _triple(voxel_size_um, "voxel_size_um")
    return tuple(float(s * v) for s, v in zip(sd, voxel, strict=True))  # type: ignore[return-value]


def axis_moments(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and standard deviation along each axis of a non-negative array's mass.

    Both in voxels, the centroid counted from index 0: the first and the root of the
    second central moment of the array summed over the other axes.

    Examples
    --------
    >>> centroid, sd = axis_moments(np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 2.0]]))
    >>> centroid.tolist(), sd.tolist()
    ([0.5, 1.75], [0.5, 0.4330127018922193])
    """
    a = np.asarray(array, np.float64)
    total = a.sum()
    centroid, sd = [], []
    for axis, n in enumerate(a.shape):
        profile = a.sum(axis=tuple(b for b in range(a.ndim) if b != axis)) / total
        x = np.arange(n)
        centroid.append(float(profile @ x))
        sd.append(math.sqrt(max(float(profile @ (x - centroid[-1]) ** 2), 0.0)))
    return np.array(centroid), np.array(sd)


def check_psf_fits(
    psf_shape: Sequence[int], shape: Sequence[int], *, what: str = "volume", name: str = "psf"
) -> None:
    """Raise `PSFError` if a PSF is larger than the data it is applied to in any axis.

    Parameters
    ----------
    psf_shape : (3,) sequence of int
        PSF shape (Z, Y, X).
    shape : (3,) sequence of int
        Shape (Z, Y, X) of the data: the volume, or one chunk plus its halo.
    what : str
        What ``shape`` is, for the message.
    name : str
        What to call the PSF in the message (e.g. its file name).

    Examples
    --------
    >>> check_psf_fits((7, 5, 5), (64, 64, 64))
    >>> try:
    ...     check_psf_fits((71, 5, 5), (64, 64, 64))
    ... except PSFError as err:
    ...     print(str(err)[:52])
    psf: shape (71, 5, 5) is larger than the volume (64,
    """
    psf_shape = tuple(int(s) for s in psf_shape)
    shape = tuple(int(s) for s in shape)
    axes = [a for a, p, s in zip("zyx", psf_shape, shape, strict=True) if p > s]
    if axes:
        raise PSFError(
            f"{name}: shape {psf_shape} is larger than the {what} {shape} along "
            f"{', '.join(axes)}; expected a PSF no larger than the data (crop it, or check "
            "its voxel size: psf_voxel_size_um, or its file's metadata)"
        )


def _recentre(psf: np.ndarray) -> np.ndarray:
    """Pad to odd sizes with the intensity peak at the centre voxel.

    An odd-sized PSF whose centre voxel already holds the maximum (a flat top, or ties)
    is kept as it is; otherwise the maximum nearest the intensity centroid is the peak.
    """
    centre = tuple(n // 2 for n in psf.shape)
    top = psf.max()
    if all(n % 2 == 1 for n in psf.shape) and psf[centre] == top:
        return psf
    peaks = np.argwhere(psf == top)
    grids = np.indices(psf.shape, dtype=np.float64).reshape(psf.ndim, -1)
    centroid = grids @ psf.reshape(-1) / psf.sum()
    peak = peaks[np.argmin(((peaks - centroid) ** 2).sum(axis=1))]
    pads = []
    for p, n in zip(peak, psf.shape, strict=True):
        before, after = int(p), int(n - 1 - p)
        half = max(before, after)
        pads.append((half - before, half - after))
    return np.pad(psf, pads) if any(a or b for a, b in pads) else psf


#: Largest PSF file accepted (bytes of pixel data its header declares): 64 Mi float32 voxels,
#: far above any PSF a block-wise deconvolution can use.
MAX_PSF_BYTES = 256 << 20


def load_psf(
    path: str | Path,
    voxel_size_um: Sequence[float] | None = None,
    *,
    psf_voxel_size_um: Sequence[float] | None = None,
    max_bytes: int = MAX_PSF_BYTES,
) -> np.ndarray:
    """Read a PSF TIFF, validate it (see `validate_psf`), at the image's voxel size.

    The file is checked like a tile first (`lightsheet.io.tiff.inspect_tiff`: layout,
    decodability, declared size against the stored bytes and against ``max_bytes``), so a
    header claiming a huge image is refused before anything is allocated.

    ``voxel_size_um``: the image's (z, y, x) µm. Where the file's ImageJ or OME metadata
    declare another (by more than 1 % on an axis; `psf_grid_note` says which), the PSF is
    resampled to it (`resample_psf`): a bead stack taken at a finer z step serves as it is.
    An axis the file declares nothing for is taken at the image's. None: the PSF as stored.
    ``psf_voxel_size_um`` (the run's ``psf_voxel_size_um``): the file's own voxel size,
    instead of what its metadata declare.
    """
    data, declared = _read_psf(path, max_bytes)
    psf = validate_psf(data, name=str(path))
    if voxel_size_um is None:
        return psf
    own, image = _placement(declared, voxel_size_um, psf_voxel_size_um)
    return psf if own == image else resample_psf(psf, own, image)


def psf_grid_note(
    path: str | Path,
    voxel_size_um: Sequence[float],
    *,
    psf_voxel_size_um: Sequence[float] | None = None,
) -> str:
    """How `load_psf` places the PSF file on the image's grid, in words (for the run's log).

    Examples
    --------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "psf.tif")
    ...     _ = write_psf(path, gaussian_psf((2, 1, 1), (1, 0.5, 0.5)), (1, 0.5, 0.5))
    ...     print(psf_grid_note(path, (2, 1, 1)))
    declares (1, 0.5, 0.5) µm: resampled to the image's (2, 1, 1) µm
    """
    declared = _read_psf(path, MAX_PSF_BYTES, pixels=False)[1]
    own, image = _placement(declared, voxel_size_um, psf_voxel_size_um)
    says = "declares" if psf_voxel_size_um is None else "given (psf_voxel_size_um) at"
    if own != image:
        return f"{says} {_um(own)} µm: resampled to the image's {_um(image)} µm"
    if psf_voxel_size_um is None and all(d is None for d in declared):
        return f"declares no voxel size: taken at the image's {_um(image)} µm"
    return f"at the image's voxel size {_um(image)} µm"


def _um(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _read_psf(path: str | Path, max_bytes: int, *, pixels: bool = True):
    from lightsheet.errors import InputFilesError
    from lightsheet.io.tiff import TiffRegion, inspect_tiff

    path = Path(path)
    if not path.is_file():
        raise PSFError(f"psf: no such file {path}; expected a (Z, Y, X) TIFF")
    try:
        info = inspect_tiff(path, max_bytes=max_bytes)
        data = np.squeeze(TiffRegion(info)[(slice(None),) * 3]) if pixels else None
    except InputFilesError as exc:
        raise PSFError(f"psf: cannot read {exc}") from exc
    return data, info.voxel_size_um or (None, None, None)


def _placement(declared, voxel_size_um, given) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(the PSF file's own voxel size, the image's), as `load_psf` places it.

    Its own: ``given`` (the run's ``psf_voxel_size_um``), else per axis what its metadata
    declare where that differs from the image's by over 1 %, else the image's.
    """
    image = _triple(voxel_size_um, "voxel_size_um")
    if given is not None:
        declared = _triple(given, "psf_voxel_size_um")
    own = tuple(
        v if d is None or abs(d / v - 1) <= 0.01 else d
        for d, v in zip(declared, image, strict=True)
    )
    return own, image


def write_psf(
    path: str | Path, psf: np.ndarray, voxel_size_um: Sequence[float], *, dtype=np.float32
) -> Path:
    """Write a PSF (float32) or a bead stack (its camera's ``dtype``) as an ImageJ TIFF.

    The TIFF carries its voxel size as Fiji writes it: what `load_psf` and
    `lightsheet psf --beads` read.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vz, vy, vx = _triple(voxel_size_um, "voxel_size_um")
    tifffile.imwrite(
        path,
        np.asarray(psf, dtype=dtype),
        imagej=True,
        resolution=(1.0 / vx, 1.0 / vy),
        metadata={"spacing": vz, "unit": "um", "axes": "ZYX"},
    )
    return path


def _triple(values: Sequence[float], name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3 or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise PSFError(f"{name} must be three positive numbers (z, y, x); got {values!r}")
    return vals  # type: ignore[return-value]
