"""TIFF tiles: header inspection and lazy, region-wise reading.

Microscope tiles are often several GB each (a 2000×2000×500 uint16 stack is 4 GB), so a tile
is never read whole: `TiffRegion` reads exactly the z-slices and rows a dask chunk needs,
through a read-only memory map when the pixel data is contiguous and uncompressed (the
usual case for acquisition software), or through tifffile's zarr view otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightsheet.errors import InputFilesError


@dataclass(frozen=True)
class TiffInfo:
    """What the header says about one TIFF file."""

    path: str
    shape: tuple[int, int, int]
    dtype: str
    data_offset: int | None
    size_bytes: int
    mtime_ns: int


def inspect_tiff(path: str | Path) -> TiffInfo:
    """Read a TIFF's header and check that its pixel data is all there.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    info : TiffInfo
        Shape as (Z, Y, X) (a 2-D image has Z = 1), dtype, and where contiguous data starts.

    Raises
    ------
    InputFilesError
        The file is not a readable TIFF, has more than 3 non-singleton axes, or is truncated.
    """
    import tifffile

    path = Path(path)
    try:
        stat = path.stat()
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape = tuple(int(s) for s in series.shape)
            dtype = np.dtype(series.dtype)
            offset = series.dataoffset
            if offset is None:
                # compressed or scattered: every strip/tile must lie inside the file
                end = max(
                    (
                        o + n
                        for p in tf.pages
                        for o, n in zip(p.dataoffsets, p.databytecounts, strict=True)
                    ),
                    default=0,
                )
            else:
                end = offset + series.nbytes
    except InputFilesError:
        raise
    except Exception as exc:  # any parser failure is reported with the file name
        raise InputFilesError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if end > stat.st_size:
        raise InputFilesError(
            f"{path}: truncated TIFF: pixel data needs {end} bytes but the file has {stat.st_size}"
        )
    squeezed = tuple(s for s in shape if s != 1)
    if len(squeezed) > 3:
        raise InputFilesError(
            f"{path}: image has shape {shape}; expected a 2-D (Y, X) or 3-D (Z, Y, X) stack"
        )
    zyx = (1,) * (3 - len(squeezed)) + squeezed
    # keep Y, X when a 2-D image has a singleton side
    if len(squeezed) < 2:
        zyx = (1, *shape[-2:])
    return TiffInfo(str(path), zyx, dtype.str, offset, stat.st_size, stat.st_mtime_ns)


class TiffRegion:
    """An array-like view of one TIFF that dask can slice chunk by chunk.

    Only the requested region is read. Used with ``dask.array.from_array``; it pickles as
    its path and header, so workers open the file themselves.
    """

    def __init__(self, info: TiffInfo):
        self.info = info
        self.shape = info.shape
        self.dtype = np.dtype(info.dtype)
        self.ndim = 3

    def __dask_tokenize__(self) -> tuple:
        i = self.info
        return ("TiffRegion", i.path, i.mtime_ns, i.size_bytes, i.shape, i.dtype)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        info = self.info
        st = os.stat(info.path)
        if st.st_mtime_ns != info.mtime_ns or st.st_size != info.size_bytes:
            raise InputFilesError(
                f"{info.path}: file changed while the run was reading it "
                f"(size {info.size_bytes} → {st.st_size}); inputs must not change during a run"
            )
        if info.data_offset is not None:
            mm = np.memmap(
                info.path, dtype=self.dtype, mode="r", offset=info.data_offset, shape=self.shape
            )
            return np.array(mm[key])
        import tifffile
        import zarr

        with tifffile.imread(info.path, aszarr=True) as store:
            arr = zarr.open_array(store, mode="r")
            if arr.ndim == 3:
                return np.asarray(arr[key])
            # 2-D or singleton-padded images are small: read whole, then slice
            return np.asarray(arr[...]).reshape(self.shape)[key]
