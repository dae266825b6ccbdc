"""An atlas's volumes as lazy dask arrays: TIFF read by chunk, OME-Zarr annotations, checks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from lightsheet.errors import AtlasError

__all__ = ["DEFAULT_CHUNK_BYTES"]

#: Default size of one annotation chunk read at a time.
DEFAULT_CHUNK_BYTES = 32 * 2**20

_ANNOTATION_NAMES = ("annotation.tiff", "annotation.tif", "annotation.ome.zarr", "annotation.zarr")
_HEMISPHERE_NAMES = (
    "hemispheres.tiff",
    "hemispheres.tif",
    "hemispheres.ome.zarr",
    "hemispheres.zarr",
)
_UNIT_TO_UM = {
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "millimeter": 1e3,
    "mm": 1e3,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "meter": 1e6,
    "m": 1e6,
}


class _LazyTiff:
    """Picklable array-like reading regions of a TIFF through tifffile's zarr store."""

    def __init__(self, path: Path):
        import tifffile
        import zarr

        self.path = str(path)
        try:
            with tifffile.imread(self.path, aszarr=True) as store:
                arr = zarr.open_array(store, mode="r")
                self.shape = tuple(int(s) for s in arr.shape)
                self.dtype = np.dtype(arr.dtype)
                self.store_chunks = tuple(int(c) for c in arr.chunks)
        except Exception as exc:  # any decoder failure is reported with the file name
            raise AtlasError(f"{path}: cannot read as TIFF: {exc}") from exc
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        import tifffile
        import zarr

        with tifffile.imread(self.path, aszarr=True) as store:
            return np.asarray(zarr.open_array(store, mode="r")[key])


def _open_tiff(path: Path, chunk_bytes: int) -> da.Array:
    lazy = _LazyTiff(path)
    shape = lazy.shape
    if len(shape) != 3:
        squeezed = tuple(s for s in shape if s != 1)
        raise AtlasError(
            f"{path}: a {len(shape)}-D image of shape {shape}; expected a 3-D volume"
            + (" (drop singleton axes)" if len(squeezed) == 3 else "")
        )
    chunks = _chunks_for(shape, lazy.store_chunks, lazy.dtype.itemsize, chunk_bytes)
    stat = path.stat()
    name = (
        "atlas-" + path.stem + "-" + tokenize(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    )
    return da.from_array(
        lazy,
        chunks=chunks,
        name=name,
        lock=False,
        fancy=False,
        asarray=True,
        meta=np.empty((0, 0, 0), lazy.dtype),
    )


def _open_omezarr(path: Path, chunk_bytes: int) -> tuple[da.Array, tuple[float, float, float]]:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # report the store with the reason
        raise AtlasError(f"{path}: cannot open as an OME-Zarr group: {exc}") from exc
    attrs = dict(group.attrs)
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        raise AtlasError(f"{path}: no 'multiscales' metadata; expected an OME-Zarr image")
    ms = multiscales[0]
    axes = [a["name"] if isinstance(a, Mapping) else str(a) for a in ms.get("axes", [])]
    units = [a.get("unit") if isinstance(a, Mapping) else None for a in ms.get("axes", [])]
    level = ms["datasets"][0]
    arr = group[level["path"]]
    if len(axes) != arr.ndim:
        raise AtlasError(f"{path}: {len(axes)} axes in the metadata for a {arr.ndim}-D array")
    scale = [1.0] * arr.ndim
    for tr in level.get("coordinateTransformations", []) + ms.get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = [s * float(t) for s, t in zip(scale, tr["scale"], strict=True)]
    spatial = [i for i, a in enumerate(axes) if a in ("z", "y", "x")]
    if len(spatial) != 3 or any(arr.shape[i] != 1 for i in range(arr.ndim) if i not in spatial):
        raise AtlasError(
            f"{path}: axes {axes} with shape {arr.shape}; expected z, y, x (other axes of size 1)"
        )
    res = []
    for i in spatial:
        unit = (units[i] or "micrometer").lower()
        if unit not in _UNIT_TO_UM:
            raise AtlasError(f"{path}: axis {axes[i]!r} has unit {unit!r}; expected a length unit")
        res.append(scale[i] * _UNIT_TO_UM[unit])
    data = da.from_zarr(arr)
    data = data[tuple(slice(None) if i in spatial else 0 for i in range(arr.ndim))]
    chunks = _chunks_for(data.shape, data.chunksize, data.dtype.itemsize, chunk_bytes)
    return data.rechunk(chunks), _resolution(res, f"{path} scale")


def _chunks_for(shape, store_chunks, itemsize, chunk_bytes) -> tuple[int, ...]:
    """Multiples of the stored chunks, growing the last axes first, up to ~chunk_bytes."""
    chunks = [min(int(c), int(s)) for c, s in zip(store_chunks, shape, strict=True)]
    budget = max(1, chunk_bytes // itemsize)
    for ax in reversed(range(len(shape))):
        others = math.prod(c for i, c in enumerate(chunks) if i != ax)
        fit = max(1, budget // max(1, others)) // chunks[ax]
        chunks[ax] = min(int(shape[ax]), chunks[ax] * max(1, fit))
    return tuple(chunks)


def _as_dask(array, chunks, name) -> da.Array:
    if isinstance(array, da.Array):
        out = array
    else:
        arr = np.asarray(array)
        if chunks is None:
            chunks = _chunks_for(
                arr.shape, (1,) * arr.ndim, arr.dtype.itemsize, DEFAULT_CHUNK_BYTES
            )
        out = da.from_array(arr, chunks=chunks)
    if out.ndim != 3:
        raise AtlasError(f"{name}: shape {out.shape}; expected a 3-D (A0, A1, A2) volume")
    return out


def _check_label_dtype(dtype, where: str) -> None:
    if not np.issubdtype(dtype, np.integer):
        raise AtlasError(f"{where}: dtype {dtype}; expected an integer label volume")


# -- metadata -----------------------------------------------------------------------------


def _metadata_resolution(meta, meta_path, zarr_res, annotation_path) -> tuple[float, float, float]:
    if "resolution" not in meta:
        if zarr_res is None:
            raise AtlasError(
                f"{meta_path}: no 'resolution'; expected the voxel size per axis in µm"
            )
        return zarr_res
    res = _resolution(meta["resolution"], f"{meta_path} 'resolution'")
    if zarr_res is not None and not np.allclose(res, zarr_res, rtol=1e-6):
        raise AtlasError(
            f"{annotation_path}: scale {zarr_res} µm differs from metadata.json 'resolution' "
            f"{res}; expected them to agree"
        )
    return res


def _resolution(values, where: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise AtlasError(f"{where}: got {values!r}; expected three positive numbers (µm per axis)")
    return vals  # type: ignore[return-value]
