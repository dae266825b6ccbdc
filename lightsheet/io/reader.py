"""Reading the OME-Zarr images lightsheet writes: whole levels lazily, or one volume by region.

`read_image` gives a level as a dask array with its voxel size and lineage; `stored_volume`
gives one ``(Z, Y, X)`` volume that reads only what is sliced (`lightsheet.regions` reads
each block's halo-padded region straight from it). Images lightsheet wrote whole are read
through `lightsheet.io.manifest.CompleteStore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from lightsheet.errors import ImageError, InputFilesError
from lightsheet.io.manifest import _open_group
from lightsheet.lineage import ATTRS_KEY

__all__ = ["StoredVolume", "read_image", "stored_volume"]


@dataclass(frozen=True, eq=False)
class StoredVolume:
    """The ``(Z, Y, X)`` volume ``array[t, c]`` of a stored ``(T, C, Z, Y, X)`` level.

    Reads only the region it is sliced with (`lightsheet.regions` gives each block its
    halo this way). Pickles small (the store's path), so workers open it themselves.
    """

    array: zarr.Array
    t: int
    c: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        return tuple(int(s) for s in self.array.shape[2:])  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype."""
        return np.dtype(self.array.dtype)

    @property
    def ndim(self) -> int:
        """3."""
        return 3

    @property
    def chunks(self) -> tuple[int, int, int]:
        """The stored chunk shape (z, y, x): the shard shape of a sharded array."""
        grid = self.array.shards or self.array.chunks
        return tuple(int(c) for c in grid[2:])  # type: ignore[return-value]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.array[(self.t, self.c, *key)])

    @property
    def path(self) -> str:
        """The stored level's path (the image's folder and the level in it)."""
        return str(self.array.store_path).removeprefix("file://")

    def __str__(self) -> str:
        """What an error names: the image's level, time point and channel."""
        return f"{self.path}, time point {self.t}, channel {self.c}"

    def __dask_tokenize__(self) -> tuple:
        meta = Path(self.path) / "zarr.json"
        try:
            stamp = meta.stat().st_mtime_ns
        except OSError:
            stamp = None
        return (str(self.array.store_path), self.t, self.c, self.array.shape, stamp)


def stored_volume(path: str | Path, t: int = 0, c: int = 0, level: int = 0) -> StoredVolume:
    """Open the ``(Z, Y, X)`` volume of time point ``t`` and channel ``c`` for region reads."""
    root, ds, _ = _open_multiscale(path, level)
    arr = root[ds["path"]]
    if arr.ndim != 5:
        raise ImageError(f"{path}: expected a (t, c, z, y, x) image; got {arr.ndim} axes")
    return StoredVolume(arr, int(t), int(c))


def _open_multiscale(path: str | Path, level: int) -> tuple[zarr.Group, dict, dict]:
    path = Path(path)
    if not (path / "zarr.json").is_file() and not (path / ".zattrs").is_file():
        raise InputFilesError(f"{path}: not an OME-Zarr image (no zarr.json or .zattrs)")
    root = _open_group(path)
    meta = root.attrs.get("ome", root.attrs)
    ms = meta["multiscales"][0]
    return root, ms["datasets"][level], ms


def read_image(
    path: str | Path, level: int = 0
) -> tuple[da.Array, tuple[float, float, float], dict]:
    """Open an OME-Zarr image lazily.

    Parameters
    ----------
    path : path-like
        An ``.ome.zarr`` folder written by `write_image` (or any NGFF 0.4/0.5 image with
        ``t, c, z, y, x`` or ``z, y, x`` axes).
    level : int
        Pyramid level.

    Returns
    -------
    image : (T, C, Z, Y, X) dask.array.Array
    voxel_size_um : tuple of float
        (z, y, x) of that level.
    lineage : dict
        The ``lightsheet`` lineage record (empty when absent).
    """
    root, ds, ms = _open_multiscale(path, level)
    names = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
    scale = next(t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
    stored = root[ds["path"]]
    # a sharded array is read a shard per task (its inner chunks are for region reads)
    arr = da.from_zarr(stored, chunks=stored.shards or stored.chunks)
    while arr.ndim < 5:
        arr = arr[None]
    voxel = tuple(float(scale[names.index(a)]) for a in ("z", "y", "x"))
    return arr, voxel, dict(root.attrs.get(ATTRS_KEY, {}))
