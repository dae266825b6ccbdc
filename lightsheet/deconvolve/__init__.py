"""Richardson–Lucy deconvolution of a volume: the kernel lifted over halo-padded blocks.

The per-block kernel is `richardson_lucy` (`lightsheet.deconvolve.kernel`). `deconvolve`
lifts it over a ``(Z, Y, X)`` dask array or stored volume with
`lightsheet.regions.map_overlap`: every block is deconvolved together with a halo of its
neighbours (mirror-reflected at the volume edges, so the edges do not ring), and only its
interior is kept. With a halo several PSF half-sizes deep (`lightsheet.blocks.default_depth`),
the interior equals deconvolving the whole volume in one piece. On a worker with a CUDA GPU,
NumPy blocks move to CuPy and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import dask.array as da
import numpy as np

from lightsheet.blocks import (
    BLOCK_BYTES,
    check_iterations,
    choose_blocks,
    choose_chunks,
    default_depth,
)
from lightsheet.deconvolve.kernel import (
    _check_values,
    _cpu_count,
    _psf_half,
    _to_numpy,
    _triple_int,
    check_dark_level,
    clear_otf_cache,
    richardson_lucy,
)
from lightsheet.errors import ClusterError, ConfigError, ImageError
from lightsheet.psf import check_psf_fits, validate_psf
from lightsheet.regions import Region, is_stored, map_overlap

__all__ = [
    "check_background",
    "clear_otf_cache",
    "deconvolve",
    "deconvolve_volumes",
    "richardson_lucy",
]


def deconvolve(
    image: Any,
    psf: np.ndarray,
    *,
    iterations: int = 10,
    acceleration: bool = False,
    depth: int | Sequence[int] | None = None,
    chunks: Sequence[int] | str | None = None,
    eps: float | None = None,
    workers: int | None = None,
    gpu: bool | None = None,
    block_bytes: int = BLOCK_BYTES,
    background: float = 0.0,
) -> da.Array:
    """Deconvolve a ``(Z, Y, X)`` volume block by block with halos (lazy).

    Parameters
    ----------
    image : (Z, Y, X) dask.array.Array or stored array-like
        Non-negative intensities (any real dtype). A stored array (a `zarr.Array`, a
        `lightsheet.io.omezarr.StoredVolume`) is read block by block, each block with its
        halo straight from the store, so no block waits in memory for its neighbours'
        (`lightsheet.regions`); a dask array (NumPy- or CuPy-backed) gets its halos from
        its neighbouring chunks.
    psf : (z, y, x) ndarray
        Point-spread function at the image's voxel size (validated, normalised to sum 1).
    iterations : int
        Richardson–Lucy iterations, >= 1.
    acceleration : bool
        Biggs–Andrews extrapolation (`richardson_lucy`). Its step size is estimated per
        block, so blocks agree with a whole-volume run less tightly than plain RL does.
    depth : int or (3,) ints, optional
        Halo per side, at least the PSF's half-size; default `default_depth`.
    chunks : (3,) ints or "auto", optional
        The blocks deconvolved (and the result's chunks): "auto" uses `choose_chunks`
        (fast FFT sizes); None keeps a dask array's chunks, and for a stored array takes
        blocks of whole stored chunks (`choose_blocks`), so the result can be stored with
        the input's chunks.
    eps : float, optional
        Floor of the blurred estimate (see `richardson_lucy`).
    workers : int, optional
        CPU threads per block; default: the cores divided by the blocks the scheduler
        runs at once (a Dask worker's threads, or the local scheduler's).
    gpu : bool, optional
        Move NumPy blocks to a CUDA GPU with CuPy: None uses one when the worker has
        one, True requires it, False never.
    block_bytes : int
        Largest halo-padded float32 block for ``chunks=None`` on a stored array; the
        kernel's working set is about six times this per block running.
    background : float
        The image's reading with no light (a camera's offset), modelled as a background
        that is not light and kept in the result (`richardson_lucy`).

    Returns
    -------
    deconvolved : (Z, Y, X) dask.array.Array of float32
        Same shape; chunks are the blocks deconvolved.

    Raises
    ------
    PSFError
        Unusable PSF, or larger than the volume.
    ImageError
        ``image`` not 3-D; at compute time, a block with NaN, infinite or negative values.
    ValueError
        ``iterations`` < 1, ``depth`` below the PSF half-size, bad ``chunks``.

    Examples
    --------
    >>> from lightsheet.psf import gaussian_psf
    >>> psf = gaussian_psf((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    >>> image = da.ones((40, 40, 40), chunks=20, dtype=np.float32)
    >>> out = deconvolve(image, psf, iterations=3)
    >>> out.dtype, out.chunks[0]
    (dtype('float32'), (20, 20))
    >>> bool(abs(float(out.mean().compute()) - 1.0) < 1e-4)
    True
    """
    iterations = check_iterations(iterations)
    background = check_dark_level(background)
    stored = is_stored(image)
    if not stored and not isinstance(image, da.Array):
        raise ImageError(
            f"image: expected a dask.array.Array or a stored array; got {type(image).__name__} "
            "(use richardson_lucy for in-memory arrays)"
        )
    if len(image.shape) != 3:
        raise ImageError(f"image: expected a 3-D (Z, Y, X) array; got shape {image.shape}")
    if np.dtype(image.dtype).kind not in "uif":
        raise ImageError(f"image: expected real intensities; got dtype {image.dtype}")
    psf = validate_psf(_to_numpy(psf))
    check_psf_fits(psf.shape, image.shape, what="volume")
    half = _psf_half(psf.shape)
    d = default_depth(psf.shape, iterations) if depth is None else _triple_int(depth, "depth")
    if any(di < hi for di, hi in zip(d, half, strict=True)):
        raise ConfigError(f"depth {d} is smaller than the PSF's half-size {half}; expected >= it")
    # a halo cannot reach beyond the volume's other edge
    d = tuple(min(di, s) for di, s in zip(d, image.shape, strict=True))
    if gpu is True and not _cuda_available():
        raise ClusterError("deconvolve: gpu=True but CuPy with a CUDA device is not available")
    if isinstance(chunks, str):
        if chunks != "auto":
            raise ValueError(f"chunks must be 'auto', None or three ints; got {chunks!r}")
        blocks = choose_chunks(image.shape, psf.shape, depth=d)
    elif chunks is not None:
        blocks = tuple(int(c) for c in chunks)
    elif stored:
        blocks = choose_blocks(image.shape, image.chunks, d, target_bytes=block_bytes)
    else:
        blocks = image.chunks
    if stored:
        meta = np.empty((0, 0, 0), np.float32)
    else:
        meta = image._meta  # dask's array meta (NumPy or CuPy), as dask-image passes it
        meta = meta.astype(np.float32) if hasattr(meta, "astype") else np.empty((0,) * 3, "f4")
    return map_overlap(
        _deconvolve_block,
        image,
        depth=d,
        boundary="reflect",
        chunks=blocks,
        dtype=np.float32,
        meta=meta,
        name="deconvolve",
        psf=psf,
        iterations=iterations,
        acceleration=acceleration,
        eps=eps,
        workers=workers,
        gpu=gpu,
        background=background,
        # a stored volume names its image, time point and channel in a bad value's error
        source=str(image) if stored else "image",
    )


def check_background(image: Any, background: float, *, where: str) -> None:
    """Refuse a background (a camera's offset) that nearly all of ``image`` reads below.

    Where the offset is right, only the noise of voxels without light reads below it: about
    half of them, so at most half of any volume, however dark. Above nine tenths of the
    image (tiles rescaled, or their offset already subtracted), it is wrong, and
    Richardson–Lucy would take everything under it for no light: the deconvolved image would
    hold little but the brightest cells. ``image``: a small stand-in for the volume (its
    coarsest pyramid level, or a crop), read only when ``background`` is not 0 (a dask
    array is computed then); ``where`` names it in the `ConfigError`.

    >>> check_background(np.r_[np.full(50, 99.0), np.full(50, 120.0)], 100.0, where="raw")
    >>> check_background(np.full((2, 2, 2), 6.0), 100.0, where="raw")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lightsheet.errors.ConfigError: camera_offset: 100 is above 90 % of raw (...: 6); expected ...
    """
    if not background:
        return
    high = float(np.quantile(np.asarray(image), 0.9))
    if high < background:
        raise ConfigError(
            f"camera_offset: {background:g} is above 90 % of {where} (its 90th percentile: "
            f"{high:.4g}); expected what the camera reads with no light, below the tissue's "
            "level (0 where the tiles' 0 is no light)"
        )


def deconvolve_volumes(
    volumes: Sequence[Sequence[Any]],
    psf: np.ndarray | Mapping[int, np.ndarray],
    *,
    channels: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[da.Array, tuple[int, int, int]]:
    """Deconvolve the selected channels of stored volumes; the other channels pass through.

    Parameters
    ----------
    volumes : T rows of C stored (Z, Y, X) volumes
        One time point per row (`lightsheet.io.omezarr.stored_volume`), same shape and
        stored chunks throughout.
    psf : (z, y, x) ndarray, or a mapping of channel to one
        As for `deconvolve`: one for every channel, or each channel's own (every channel
        deconvolved needs one). Without a given ``depth``, every channel then gets the
        halo of the PSF that needs the widest (`lightsheet.blocks.default_depth`), so all
        are cut into the same blocks.
    channels : ints, optional
        Channels deconvolved; None: all.
    **kwargs
        Passed on to `deconvolve` (``iterations``, ``depth``, ``block_bytes``, ...).

    Returns
    -------
    image : (T, C, Z, Y, X) dask array of float32
        Every channel cut into the same blocks (`lightsheet.blocks.choose_blocks`: whole
        stored chunks, each block reading its halo from the store).
    chunks : (3,) ints
        The stored chunks of the input, which the blocks cover whole: the chunks to write
        the result with.
    """
    chunks = tuple(volumes[0][0].chunks)
    wanted = range(len(volumes[0])) if channels is None else channels
    psfs = psf if isinstance(psf, Mapping) else dict.fromkeys(wanted, psf)
    missing = [c for c in wanted if c not in psfs]
    if missing:
        raise ConfigError(f"psf: no PSF for channel(s) {missing}, which are deconvolved")
    if isinstance(psf, Mapping) and kwargs.get("depth") is None:
        iterations = check_iterations(kwargs.get("iterations", 10))
        depths = [default_depth(validate_psf(psfs[c]).shape, iterations) for c in wanted]
        kwargs["depth"] = tuple(int(d) for d in np.max(depths, axis=0))
    planes = [
        [deconvolve(v, psfs[c], **kwargs) if c in wanted else None for c, v in enumerate(row)]
        for row in volumes
    ]
    # channels passed through are cut into the same blocks
    blocks = next((p.chunks for row in planes for p in row if p is not None), chunks)
    image = da.stack(
        [
            da.stack(
                [
                    p if p is not None else da.from_array(v, blocks).astype(np.float32)
                    for p, v in zip(prow, vrow, strict=True)
                ]
            )
            for prow, vrow in zip(planes, volumes, strict=True)
        ]
    )
    return image, chunks  # type: ignore[return-value]


def _deconvolve_block(
    block: Any,
    *,
    region: Region,
    psf: np.ndarray,
    iterations: int,
    acceleration: bool,
    eps: float | None,
    workers: int | None,
    gpu: bool | None,
    background: float = 0.0,
    source: str = "image",
) -> Any:
    """One halo-padded block: check, move to the GPU if wanted, deconvolve, move back."""
    # check the block itself (not its halo) so the message names the right voxel and block
    where = f" (block {region.index})"
    _check_values(block[region.core], offset=region.start, where=where, name=source)
    # a bad voxel in the halo belongs to a neighbour: stop before FFTs spread it here
    _check_values(
        block,
        offset=region.origin,
        shape=region.shape,
        where=f" (in the halo of block {region.index})",
        name=source,
    )
    on_host = type(block).__module__.split(".")[0] == "numpy"
    use_gpu = on_host and gpu is not False and _cuda_available()
    if use_gpu:
        import cupy

        out = richardson_lucy(
            cupy.asarray(block),
            psf,
            iterations=iterations,
            acceleration=acceleration,
            pad_width=0,
            eps=eps,
            check=False,
            background=background,
        )
        return cupy.asnumpy(out)
    return richardson_lucy(
        block,
        psf,
        iterations=iterations,
        acceleration=acceleration,
        pad_width=0,
        eps=eps,
        workers=workers if workers is not None else _threads_per_block(),
        check=False,
        background=background,
    )


def _threads_per_block() -> int:
    """Cores per concurrently running block: cores // the scheduler's parallel tasks."""
    cores = _cpu_count()
    try:
        from distributed import get_worker

        tasks = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        import dask

        serial = dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded")
        tasks = 1 if serial else dask.config.get("num_workers", None) or cores
    return max(1, cores // max(1, int(tasks)))


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    """CuPy importable and at least one CUDA device visible (checked once per process)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no CuPy, no driver, or no device: all mean "CPU only"
        return False
