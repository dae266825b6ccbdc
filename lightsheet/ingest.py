"""Ingest: find the raw tiles, parse their names into a grid, and check every file.

Everything that can be wrong with the input is found here, before any compute: no
files, names the pattern does not parse, two files for one grid position, holes in the
grid, tiles of different shapes or dtypes, unreadable, undecodable or truncated TIFFs,
tiles larger than a limit.

A tile is one file (or one channel of a file that holds several), or, where the pattern has
a ``plane`` group, the files that differ only in it: one file per z plane (e.g. LaVision
UltraMicroscope's ``…[00 x 01]_C00_xyz-Table Z0123.ome.tif``), stacked in plane order.

Examples
--------
>>> from lightsheet.config import DEFAULT_PATTERN
>>> from lightsheet.ingest import discover
>>> manifest = discover("sample/tiles/*.tif", DEFAULT_PATTERN)  # doctest: +SKIP
>>> manifest.grid_shape  # (T, C, tiles in z, y, x)  # doctest: +SKIP
(1, 2, 1, 2, 2)
"""

from __future__ import annotations

import glob
import itertools
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lightsheet.access import literal_root
from lightsheet.config import compile_pattern, search_name
from lightsheet.errors import InputFilesError, TileGridError
from lightsheet.io.tiff import MAX_TILE_BYTES, PlaneStack, TiffInfo, TiffRegion, inspect_tiff

__all__ = [
    "GROUPS",
    "PLANE",
    "Manifest",
    "Tile",
    "discover",
    "find_files",
    "glob_root",
    "parse_names",
    "voxel_size_mismatch",
]

GROUPS = ("t", "c", "z", "y", "x")
#: The group naming a file's z plane within its tile (one file per plane).
PLANE = "plane"


@dataclass(frozen=True)
class Tile:
    """One tile and its position: time point, channel and tile grid indices.

    ``info`` describes the whole tile; a tile stored one file per z plane also lists the
    planes' files, in order, in ``planes`` (``path`` is then the first plane's).
    """

    path: str
    index: tuple[int, int, int, int, int]  # (t, c, z, y, x), 0-based
    info: TiffInfo
    planes: tuple[TiffInfo, ...] = ()

    def region(self) -> TiffRegion | PlaneStack:
        """The tile as an array-like that reads only the region sliced."""
        return PlaneStack(self.planes) if self.planes else TiffRegion(self.info)

    @property
    def paths(self) -> list[str]:
        """Every file of the tile."""
        return [p.path for p in self.planes] if self.planes else [self.path]


@dataclass
class Manifest:
    """The checked set of tiles of one acquisition; small and JSON-serialisable."""

    input: str
    pattern: str
    grid_shape: tuple[int, int, int, int, int]  # (T, C, NZ, NY, NX)
    tile_shape: tuple[int, int, int]  # (Z, Y, X) voxels of every tile
    dtype: str
    tiles: list[Tile]
    values: dict[str, list[str]] = field(default_factory=dict)  # name value of each index

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """Shape (T, C, Z, Y, X) of the stitched volume."""
        t, c, nz, ny, nx = self.grid_shape
        z, y, x = self.tile_shape
        return (t, c, nz * z, ny * y, nx * x)

    @property
    def nbytes(self) -> int:
        """Bytes of raw pixel data over all tiles."""
        import numpy as np

        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def channel_names(self) -> list[str]:
        """Channel labels as they appear in the file names (e.g. ``ch0``)."""
        return [f"ch{v}" for v in self.values.get("c", ["0"])]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, for passing between tasks and for lineage records."""
        return asdict(self)

    @property
    def paths(self) -> list[str]:
        """Every input file, in tile order (once, though it holds several channels)."""
        return list(dict.fromkeys(p for t in self.tiles for p in t.paths))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Inverse of `to_dict`."""

        def info(i: dict) -> TiffInfo:
            size = i.get("voxel_size_um")
            return TiffInfo(
                **{**i, "shape": tuple(i["shape"]), "voxel_size_um": size and tuple(size)}
            )

        tiles = [
            Tile(
                path=t["path"],
                index=tuple(t["index"]),
                info=info(t["info"]),
                planes=tuple(info(p) for p in t.get("planes", ())),
            )
            for t in d["tiles"]
        ]
        return cls(
            input=d["input"],
            pattern=d["pattern"],
            grid_shape=tuple(d["grid_shape"]),
            tile_shape=tuple(d["tile_shape"]),
            dtype=d["dtype"],
            tiles=tiles,
            values={k: list(v) for k, v in d["values"].items()},
        )


def glob_root(input_glob: str) -> Path:
    """The folder a glob's first wildcard part starts from (its fixed root).

    Parts escaped by ``glob.escape`` count as the literal folder they name
    (`lightsheet.access.literal_root`).

    Examples
    --------
    >>> glob_root("/data/brain1/ch*/*.tif").as_posix()
    '/data/brain1'
    >>> glob_root("/data/brain[[]1]/ch*/*.tif").as_posix()
    '/data/brain[1]'
    """
    return literal_root(input_glob)


def find_files(input_glob: str) -> list[Path]:
    """Files matching a glob (``**`` recurses), sorted; an error when there are none."""
    paths = sorted(Path(p) for p in glob.glob(str(input_glob), recursive=True))
    files = [p for p in paths if p.is_file()]
    if not files:
        where = glob_root(input_glob)
        if not where.is_dir():
            found = f"folder {where} does not exist"
        else:
            n = sum(1 for p in where.iterdir() if not p.name.startswith("."))
            found = f"folder {where} is empty" if n == 0 else f"{n} entries in {where}, none match"
        raise InputFilesError(
            f"input: no files match {input_glob!r} ({found}); expected the acquisition's TIFF tiles"
        )
    return files


def _sort_key(value: str) -> tuple[int, Any]:
    # numeric values sort as numbers (ch2 before ch10), others as text
    return (0, int(value)) if value.isdigit() else (1, value)


def parse_names(
    files: list[Path], pattern: str, *, root: Path | None = None
) -> dict[Path, dict[str, str]]:
    r"""Match each file's name (or path) against ``pattern`` and return its named groups.

    A pattern without ``/`` is searched in the file name. A pattern with ``/`` is searched
    in the file's path relative to ``root`` (the glob's fixed root, :func:`glob_root`),
    written with ``/``, so folder-per-channel layouts parse: ``ch(?P<c>\d+)/`` matches
    ``ch1/ch10000.tif``.

    Raises
    ------
    TileGridError
        Some names do not match (listed), or the pattern has no usable groups.
    """
    rx = compile_pattern(pattern)
    by_path = "/" in pattern
    parsed, unmatched = {}, []
    for f in files:
        key = f.relative_to(root).as_posix() if by_path and root is not None else f.name
        m = search_name(rx, key, pattern=pattern)
        if m is None:
            unmatched.append(key)
        else:
            parsed[f] = {
                k: v for k, v in m.groupdict().items() if k in (*GROUPS, PLANE) and v is not None
            }
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        where = f" (searched in paths relative to {root})" if by_path and root is not None else ""
        raise TileGridError(
            f"pattern: {len(unmatched)} of {len(files)} files match the input glob but not the "
            f"pattern {pattern!r}{where}: {shown}; narrow the glob or fix the pattern"
        )
    return parsed


def discover(
    input_glob: str,
    pattern: str,
    *,
    max_workers: int = 8,
    max_tile_bytes: int = MAX_TILE_BYTES,
) -> Manifest:
    r"""Find, parse and check every tile; nothing is computed and nothing is modified.

    Parameters
    ----------
    input_glob : str
        Glob of the raw TIFF files.
    pattern : str
        Regex searched in each file name, or, when it contains ``/``, in each file's path
        relative to the glob's fixed root (``ch(?P<c>\d+)/.*_(?P<z>\d+)\.tif`` for one
        folder per channel). Named groups among ``t, c, z, y, x`` give the time point,
        channel and tile grid position. A missing group means a single one; a missing ``c``
        where every file holds a ``C`` axis (ImageJ ``ZCYX``, OME ``CZYX``) gives the files'
        channels, each its own tile (with a ``c`` group too, refused). Group values
        are ordered numerically when they are digits, else as text. A ``plane`` group
        makes the files that differ only in it one tile, their planes stacked along z.
    max_workers : int
        Threads reading headers (I/O bound).
    max_tile_bytes : int
        Largest file accepted, in bytes of pixel data its header declares (refused before
        any read).

    Returns
    -------
    manifest : Manifest

    Raises
    ------
    InputFilesError
        No files, or a file that is not a readable, complete TIFF (named).
    TileGridError
        Names that do not parse, two files for one position, a missing tile, tiles whose
        shape, dtype or number of channels differs from the others (named, with what was
        expected), or channels both in the names and inside the files.
    """
    files = find_files(input_glob)
    parsed = parse_names(files, pattern, root=glob_root(input_glob))
    values = {g: sorted({p[g] for p in parsed.values() if g in p}, key=_sort_key) for g in GROUPS}
    values = {g: (v if v else ["0"]) for g, v in values.items()}
    index_of = {g: {v: i for i, v in enumerate(vals)} for g, vals in values.items()}

    by_index: dict[tuple[int, ...], dict[str, Path]] = {}
    for f, groups in parsed.items():
        idx = tuple(index_of[g][groups.get(g, "0")] for g in GROUPS)
        planes = by_index.setdefault(idx, {})
        plane = groups.get(PLANE, "")
        if plane in planes:
            what = f"plane {plane} of " if plane else ""
            raise TileGridError(
                f"tile grid: two files map to {what}the same tile {_describe(idx, values)}: "
                f"{planes[plane].name} and {f.name}; expected one file per position"
            )
        planes[plane] = f

    grid_shape = tuple(len(values[g]) for g in GROUPS)
    missing = [i for i in itertools.product(*(range(n) for n in grid_shape)) if i not in by_index]
    if missing:
        shown = "; ".join(_describe(i, values) for i in missing[:5])
        raise TileGridError(
            f"tile grid: {len(missing)} of {len(list(itertools.product(*map(range, grid_shape))))} "
            f"tiles missing from the {'x'.join(map(str, grid_shape))} (t, c, z, y, x) grid "
            f"matching {input_glob!r}: no file for {shown}"
        )
    plane_values = sorted({p for planes in by_index.values() for p in planes}, key=_sort_key)
    for idx, planes in by_index.items():
        if len(planes) != len(plane_values):
            gone = [p for p in plane_values if p not in planes]
            raise TileGridError(
                f"tile grid: tile {_describe(idx, values)} has {len(planes)} of the "
                f"{len(plane_values)} planes the other tiles have: no file for plane "
                f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}"
            )

    files = [f for planes in by_index.values() for f in planes.values()]

    def inspect(path: Path) -> TiffInfo:
        return inspect_tiff(path, max_bytes=max_tile_bytes, channels=True)

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        infos = dict(zip(files, pool.map(inspect, files), strict=True))

    kinds = {f: (i.shape, i.dtype, i.channels) for f, i in infos.items()}
    expected, _ = Counter(kinds.values()).most_common(1)[0]
    for f, got in kinds.items():
        if got != expected:
            raise TileGridError(
                f"{infos[f].path}: tile has {_kind(*got)}; expected {_kind(*expected)} like the "
                "other tiles"
            )
    shape, dtype, n_channels = expected
    if n_channels > 1:  # the channels come from inside the files
        if grid_shape[1] > 1:
            raise TileGridError(
                f"pattern: its c group names {grid_shape[1]} channels ({', '.join(values['c'])}) "
                f"and each file holds {n_channels} (e.g. {files[0]}); expected the channels "
                "in the file names or inside the files, not both"
            )
        values["c"] = [str(k) for k in range(n_channels)]
        grid_shape = (grid_shape[0], n_channels, *grid_shape[2:])
    tiles = []
    for (t, named, *zyx), planes in by_index.items():
        for c in range(n_channels):  # named is 0 where the files hold the channels
            ordered = [infos[planes[p]].for_channel(c) for p in plane_values]
            tiles.append(_tile((t, named + c, *zyx), ordered, plane_values))
    tiles.sort(key=lambda tile: tile.index)
    tile_shape = tiles[0].info.shape
    return Manifest(
        input=str(input_glob),
        pattern=pattern,
        grid_shape=grid_shape,  # type: ignore[arg-type]
        tile_shape=tile_shape,
        dtype=dtype,
        tiles=tiles,
        values=values,
    )


def voxel_size_mismatch(manifest: Manifest, voxel_size_um, *, rtol: float = 0.02) -> str | None:
    """A warning when the tiles' own metadata declare another voxel size than the run's.

    The first tile's file (its first plane's) is read for what its OME or ImageJ metadata
    declare in a length unit (`lightsheet.io.tiff.TiffInfo.voxel_size_um`); each axis it
    declares is compared with ``voxel_size_um`` (z, y, x), within ``rtol``. None when they
    agree or nothing is declared: the run's value is what the stages use either way.

    Examples
    --------
    >>> from lightsheet.io.tiff import TiffInfo
    >>> info = TiffInfo("t.tif", (4, 8, 8), "<u2", 0, 512, 0, voxel_size_um=(5.0, 2.0, 2.0))
    >>> m = Manifest("*.tif", "", (1,) * 5, (4, 8, 8), "<u2", [Tile("t.tif", (0,) * 5, info)])
    >>> voxel_size_mismatch(m, (5.0, 2.0, 2.0)) is None
    True
    >>> voxel_size_mismatch(m, (2.0, 1.0, 1.0))  # doctest: +ELLIPSIS
    "voxel_size_um: the run says (z, y, x) = (2, 1, 1) µm, but t.tif declares (5, 2, 2) µm..."
    """
    tile = manifest.tiles[0]
    info = tile.planes[0] if tile.planes else tile.info
    declared = info.voxel_size_um or (None, None, None)
    if not any(
        d is not None and abs(d - float(v)) > rtol * float(v)
        for d, v in zip(declared, voxel_size_um, strict=True)
    ):
        return None

    def show(values) -> str:
        return "(" + ", ".join("?" if v is None else f"{float(v):g}" for v in values) + ")"

    return (
        f"voxel_size_um: the run says (z, y, x) = {show(voxel_size_um)} µm, but {info.path} "
        f"declares {show(declared)} µm in its metadata; the stages use the run's value: "
        "check which one is right"
    )


def _tile(index: tuple[int, ...], planes: list[TiffInfo], plane_values: list[str]) -> Tile:
    """One tile: a file, or (with a ``plane`` group) its files in plane order, stacked."""
    if len(planes) == 1 and not plane_values[0]:
        return Tile(planes[0].path, index, planes[0])
    first = planes[0]
    stacked = replace(
        first,
        shape=(first.shape[0] * len(planes), *first.shape[1:]),
        data_offset=None,
        size_bytes=sum(p.size_bytes for p in planes),
        mtime_ns=max(p.mtime_ns for p in planes),
    )
    return Tile(first.path, index, stacked, tuple(planes))


def _kind(shape: tuple[int, ...], dtype: str, channels: int) -> str:
    import numpy as np

    held = f" in each of {channels} channels" if channels > 1 else ""
    return f"shape {shape}{held} and dtype {np.dtype(dtype).name}"


def _describe(idx: tuple[int, ...], values: dict[str, list[str]]) -> str:
    return "(" + ", ".join(f"{g}={values[g][i]}" for g, i in zip(GROUPS, idx, strict=True)) + ")"
