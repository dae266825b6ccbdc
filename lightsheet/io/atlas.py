"""Brain atlases on disk: a BrainGlobe-layout folder or an OME-Zarr annotation, opened lazily.

A BrainGlobe atlas folder holds::

    metadata.json      {"name", "resolution": [r0, r1, r2] (µm per axis), "orientation": "asr",
                        "shape": [n0, n1, n2], ...}
    structures.json    [{"id", "acronym", "name", "structure_id_path": [root, ..., id]}, ...]
    annotation.tiff    integer (A0, A1, A2) array of structure ids, 0 outside the brain
    hemispheres.tiff   optional uint8 (A0, A1, A2): 0 outside the brain, 1 left, 2 right

``annotation.ome.zarr`` (an OME-Zarr image or label, full resolution used) may replace
``annotation.tiff``. An atlas is named by its folder, or by its BrainGlobe name
(``allen_mouse_25um``), found as ``<brainglobe_dir>/<name>_v<version>/`` the way
brainglobe-atlasapi keeps downloaded atlases (`resolve_atlas`). The volumes are dask
arrays read chunk by chunk on demand: a 10 µm mouse annotation is ~5 GB as uint32 and is
never loaded whole. ``reference.tiff`` (the template the registration stage aligns) is
read by `read_reference`.

Orientation strings follow BrainGlobe: one letter per array axis naming the side the axis
*starts* at (its origin), one letter from each pair a/p, s/i, l/r. ``"asr"``: axis 0 runs
anterior → posterior, axis 1 superior → inferior, axis 2 right → left.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
from dask.base import tokenize

from lightsheet.config import is_orientation
from lightsheet.errors import AtlasError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Atlas",
    "atlas_metadata",
    "brainglobe_dir",
    "load_atlas",
    "read_reference",
    "read_structures",
    "resolve_atlas",
    "split_hemispheres",
    "validate_orientation",
    "write_atlas",
]

#: Hemisphere values (BrainGlobe).
HEMISPHERE_NONE, HEMISPHERE_LEFT, HEMISPHERE_RIGHT = 0, 1, 2

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


#: A BrainGlobe atlas name: letters, digits and underscores, e.g. ``allen_mouse_25um``.
_ATLAS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def brainglobe_dir() -> tuple[Path, str]:
    """The folder BrainGlobe keeps atlases in, and where that setting came from.

    As brainglobe-atlasapi: the ``brainglobe_dir`` of ``[default_dirs]`` in
    ``bg_config.conf`` of the config folder (``$BRAINGLOBE_CONFIG_DIR``, default
    ``~/.config/brainglobe``), else ``~/.brainglobe``. Nothing is written (atlasapi writes
    a default config file on first use; reading does not need one).

    Returns
    -------
    folder : Path
    source : str
        The config file it was read from, or ``"default"``.
    """
    config_dir = Path(
        os.environ.get("BRAINGLOBE_CONFIG_DIR") or Path.home() / ".config" / "brainglobe"
    )
    conf_path = config_dir / "bg_config.conf"
    if conf_path.is_file():
        conf = configparser.ConfigParser()
        try:
            conf.read(conf_path)
        except configparser.Error as exc:
            raise AtlasError(f"{conf_path}: cannot read the BrainGlobe config: {exc}") from exc
        folder = conf.get("default_dirs", "brainglobe_dir", fallback=None)
        if folder:
            return Path(folder).expanduser(), str(conf_path)
    return Path.home() / ".brainglobe", "default"


def resolve_atlas(atlas: str | Path) -> Path:
    """The folder of an atlas given by path or by BrainGlobe name.

    An existing path is returned as it is. A bare name such as ``allen_mouse_25um`` is
    looked up as ``<name>_v*`` in `brainglobe_dir`, where ``brainglobe install -a NAME``
    (brainglobe-atlasapi 2.x) puts it.

    Parameters
    ----------
    atlas : str or Path
        Atlas folder (or OME-Zarr annotation), or a BrainGlobe atlas name.

    Returns
    -------
    Path

    Raises
    ------
    AtlasError
        Nothing by that path or name, or several versions of the named atlas.
    """
    path = Path(atlas).expanduser()
    if path.exists():
        return path
    name = str(atlas)
    if not _ATLAS_NAME.match(name):
        raise AtlasError(
            f"atlas: no such file or folder {path}; expected a BrainGlobe atlas folder "
            "(metadata.json, structures.json, annotation.tiff), an OME-Zarr annotation, or a "
            "BrainGlobe atlas name such as allen_mouse_25um"
        )
    folder, source = brainglobe_dir()
    found = sorted(p for p in folder.glob(f"{name}_v*") if p.is_dir())
    if len(found) > 1:
        raise AtlasError(
            f"atlas {name!r}: several versions in {folder}: {[p.name for p in found]}; "
            "expected one (give the folder's path to choose)"
        )
    if not found:
        raise AtlasError(
            f"atlas {name!r}: not found. Looked for the folder {path.resolve()} and for "
            f"{folder / (name + '_v*')} (BrainGlobe atlas folder, from {source}; set "
            "BRAINGLOBE_CONFIG_DIR to use another BrainGlobe config). Get it with "
            f"`brainglobe install -a {name}` (pip install 'brainglobe-atlasapi<3'), or give "
            "the path of a BrainGlobe-layout atlas folder"
        )
    return found[0]


def atlas_metadata(atlas: str | Path) -> dict:
    """Name, version, resolution and orientation from an atlas's ``metadata.json``.

    Parameters
    ----------
    atlas : str or Path
        Atlas folder, OME-Zarr annotation or BrainGlobe name (`resolve_atlas`).

    Returns
    -------
    dict
        ``path`` (resolved), ``name``, ``version`` (None when absent), ``resolution_um``,
        ``orientation``.
    """
    path = resolve_atlas(atlas)
    folder = path.parent if _is_zarr(path) else path
    meta = _read_json(folder / "metadata.json")
    if not isinstance(meta, dict):
        raise AtlasError(f"{folder / 'metadata.json'}: expected a JSON object")
    return {
        "path": str(path),
        "name": str(meta.get("name", folder.name)),
        "version": None if meta.get("version") is None else str(meta["version"]),
        "resolution_um": meta.get("resolution"),
        "orientation": meta.get("orientation"),
    }


def validate_orientation(orientation: str, *, name: str = "orientation") -> str:
    """Return a BrainGlobe orientation string in lower case, or raise `AtlasError`.

    Parameters
    ----------
    orientation : str
        Three letters, one from each pair a/p, s/i, l/r, e.g. ``"asr"``.
    name : str
        What to call it in the error message.
    """
    v = str(orientation).lower()
    if not is_orientation(v):
        raise AtlasError(
            f"{name}: invalid orientation {orientation!r}; expected three letters, one from "
            "each pair a/p, s/i, l/r naming where each axis starts (e.g. 'asr')"
        )
    return v


@dataclass(frozen=True, eq=False)
class Atlas:
    """A labelled reference volume with its region hierarchy.

    Attributes
    ----------
    annotation : (A0, A1, A2) dask array of unsigned int
        Structure id of each atlas voxel; 0 is outside the brain.
    hemispheres : (A0, A1, A2) dask array of uint8
        0 outside the brain, 1 left, 2 right.
    resolution_um : (3,) tuple of float
        Voxel size along the atlas axes in µm.
    orientation : str
        BrainGlobe orientation of the atlas axes, e.g. ``"asr"``.
    structures : pandas.DataFrame
        Indexed by ``structure_id``; columns ``acronym``, ``structure_name``,
        ``parent_structure_id`` (nullable Int64, missing for roots), ``depth`` (root 0) and
        ``structure_id_path`` (tuple of ids, root first, the structure last). Rows in the
        order of ``structures.json``.
    name : str
        Atlas name from the metadata.
    path : Path or None
        Where it was read from.
    hemispheres_from_file : bool
        False when the hemispheres were generated by splitting the left–right axis.
    """

    annotation: da.Array
    hemispheres: da.Array
    resolution_um: tuple[float, float, float]
    orientation: str
    structures: pd.DataFrame
    name: str = ""
    path: Path | None = None
    hemispheres_from_file: bool = True
    _ancestors: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(A0, A1, A2)`` of the annotation."""
        return tuple(int(n) for n in self.annotation.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one atlas voxel in mm³."""
        return math.prod(self.resolution_um) * 1e-9

    @classmethod
    def from_arrays(
        cls,
        annotation: np.ndarray | da.Array,
        structures: Sequence[Mapping] | pd.DataFrame,
        *,
        resolution_um: Sequence[float],
        orientation: str,
        hemispheres: np.ndarray | da.Array | None = None,
        name: str = "",
        chunks: int | tuple | str | None = None,
    ) -> Atlas:
        """Build an atlas from arrays in memory (or dask arrays) and a structure list.

        Parameters
        ----------
        annotation : (A0, A1, A2) array of int
            Structure ids, 0 outside the brain.
        structures : list of dict or DataFrame
            Records in the ``structures.json`` layout (``id``, ``acronym``, ``name``,
            ``structure_id_path``), or a DataFrame returned by `read_structures`.
        resolution_um : (3,) sequence of float
            Atlas voxel size per axis in µm.
        orientation : str
            BrainGlobe orientation string of the atlas axes.
        hemispheres : (A0, A1, A2) array of int, optional
            0/1/2 per voxel; default: split along the l/r axis (see `split_hemispheres`).
        name : str
            Atlas name.
        chunks : optional
            Dask chunks for in-memory arrays; default ~32 MiB chunks.
        """
        orientation = validate_orientation(orientation, name="orientation")
        res = _resolution(resolution_um, "resolution_um")
        ann = _as_dask(annotation, chunks, "annotation")
        _check_label_dtype(ann.dtype, "annotation")
        table = (
            structures
            if isinstance(structures, pd.DataFrame)
            else _structures_frame(list(structures), "structures")
        )
        if hemispheres is None:
            hemi, from_file = split_hemispheres(ann, orientation), False
        else:
            hemi = _as_dask(hemispheres, ann.chunks, "hemispheres")
            if hemi.shape != ann.shape:
                raise AtlasError(
                    f"hemispheres: shape {hemi.shape} differs from the annotation's "
                    f"{ann.shape}; expected the same shape"
                )
            hemi, from_file = hemi.rechunk(ann.chunks), True
        return cls(ann, hemi, res, orientation, table, name, None, from_file)

    def ancestor_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Row positions ``(descendant, ancestor)`` in `structures`, each structure its own too.

        Every structure contributes one pair per entry of its ``structure_id_path``, so
        ``np.add.at(total, ancestor, own[descendant])`` rolls values up the hierarchy.
        """
        if "pairs" not in self._ancestors:
            pos = {sid: i for i, sid in enumerate(self.structures.index)}
            desc, anc = [], []
            for i, path in enumerate(self.structures["structure_id_path"]):
                for a in path:
                    desc.append(i)
                    anc.append(pos[a])
            self._ancestors["pairs"] = (np.asarray(desc, np.intp), np.asarray(anc, np.intp))
        return self._ancestors["pairs"]


def load_atlas(path: str | Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Atlas:
    """Open a BrainGlobe-layout atlas folder (or an OME-Zarr annotation) lazily.

    Parameters
    ----------
    path : str or Path
        The atlas folder (``metadata.json``, ``structures.json``, ``annotation.tiff`` or
        ``annotation.ome.zarr``, optional ``hemispheres.tiff``), an OME-Zarr annotation
        whose folder holds ``metadata.json`` and ``structures.json``, or a BrainGlobe atlas
        name such as ``allen_mouse_25um`` (`resolve_atlas`).
    chunk_bytes : int
        Approximate size of one dask chunk of the annotation.

    Returns
    -------
    Atlas
        Annotation and hemispheres as dask arrays; nothing of the volume is read yet.

    Raises
    ------
    AtlasError
        Missing files, unreadable or inconsistent metadata, an invalid orientation, a
        structure hierarchy that references unknown ids, a hemisphere volume whose shape
        differs from the annotation's, or no hemisphere volume in an atlas whose
        ``metadata.json`` does not declare it ``"symmetric": true`` (BrainGlobe splits only
        a symmetric atlas at its midline). (Annotation ids missing from ``structures.json`` are
        found when the annotation is counted, see `lightsheet.density.region_voxel_counts`.)

    Examples
    --------
    >>> atlas = load_atlas("sample/atlas")  # doctest: +SKIP
    >>> atlas.shape, atlas.resolution_um, atlas.orientation  # doctest: +SKIP
    ((40, 32, 32), (20.0, 20.0, 20.0), 'asr')
    """
    path = resolve_atlas(path)
    if _is_zarr(path):
        folder, annotation_path = path.parent, path
    else:
        folder = path
        annotation_path = next(
            (folder / n for n in _ANNOTATION_NAMES if (folder / n).exists()), None
        )
    missing = [n for n in ("metadata.json", "structures.json") if not (folder / n).is_file()]
    if annotation_path is None:
        missing.append("annotation.tiff")
    if missing:
        raise AtlasError(
            f"atlas folder {folder}: missing {', '.join(missing)}; expected metadata.json, "
            "structures.json and annotation.tiff (or annotation.ome.zarr), optionally "
            "hemispheres.tiff"
        )
    meta = _read_json(folder / "metadata.json")
    if not isinstance(meta, dict):
        raise AtlasError(f"{folder / 'metadata.json'}: expected a JSON object")
    orientation = validate_orientation(
        meta.get("orientation", ""), name=f"{folder / 'metadata.json'} 'orientation'"
    )
    structures = read_structures(folder / "structures.json")

    if _is_zarr(annotation_path):
        annotation, zarr_res = _open_omezarr(annotation_path, chunk_bytes)
    else:
        annotation, zarr_res = _open_tiff(annotation_path, chunk_bytes), None
    _check_label_dtype(annotation.dtype, str(annotation_path))
    res = _metadata_resolution(meta, folder / "metadata.json", zarr_res, annotation_path)
    if "shape" in meta and tuple(int(s) for s in meta["shape"]) != annotation.shape:
        raise AtlasError(
            f"{annotation_path}: shape {annotation.shape} differs from metadata.json 'shape' "
            f"{tuple(meta['shape'])}; expected them to agree"
        )

    hemi_path = next((folder / n for n in _HEMISPHERE_NAMES if (folder / n).exists()), None)
    if hemi_path is None:
        # BrainGlobe's rule: without a hemispheres file, only a symmetric atlas is split at
        # its midline (any other split would put cells in the wrong hemisphere silently)
        if meta.get("symmetric") is not True:
            raise AtlasError(
                f"atlas folder {folder}: no hemispheres.tiff, and metadata.json does not declare "
                f"the atlas symmetric (symmetric: {meta.get('symmetric')!r}); expected "
                'hemispheres.tiff, or "symmetric": true when a midline split is right'
            )
        hemispheres, from_file = split_hemispheres(annotation, orientation), False
    else:
        if _is_zarr(hemi_path):
            hemispheres, _ = _open_omezarr(hemi_path, chunk_bytes)
        else:
            hemispheres = _open_tiff(hemi_path, chunk_bytes)
        if hemispheres.shape != annotation.shape:
            raise AtlasError(
                f"{hemi_path}: shape {hemispheres.shape} differs from the annotation's "
                f"{annotation.shape}; expected the same shape"
            )
        hemispheres, from_file = hemispheres.rechunk(annotation.chunks), True
    return Atlas(
        annotation=annotation,
        hemispheres=hemispheres,
        resolution_um=res,
        orientation=orientation,
        structures=structures,
        name=str(meta.get("name", folder.name)),
        path=path,
        hemispheres_from_file=from_file,
    )


def read_reference(atlas: str | Path, *, shape: Sequence[int] | None = None) -> np.ndarray:
    """The atlas's reference (template) image, ``reference.tiff``, in memory as float32.

    Parameters
    ----------
    atlas : str or Path
        Atlas folder or BrainGlobe name (`resolve_atlas`).
    shape : (3,) sequence of int, optional
        The annotation's shape, which the reference must have.

    Returns
    -------
    (A0, A1, A2) ndarray of float32

    Raises
    ------
    AtlasError
        No ``reference.tiff``, unreadable, not 3-D, or of another shape than ``shape``.
    """
    import tifffile

    path = resolve_atlas(atlas)
    folder = path.parent if _is_zarr(path) else path
    ref_path = next(
        (folder / n for n in ("reference.tiff", "reference.tif") if (folder / n).exists()), None
    )
    if ref_path is None:
        raise AtlasError(
            f"atlas folder {folder}: no reference.tiff; expected the atlas's reference "
            "(template) image, which registration aligns to the sample"
        )
    try:
        ref = tifffile.imread(ref_path)
    except Exception as exc:  # any decoder failure is reported with the file name
        raise AtlasError(f"{ref_path}: cannot read as TIFF: {exc}") from exc
    if ref.ndim != 3 or (shape is not None and tuple(ref.shape) != tuple(shape)):
        raise AtlasError(
            f"{ref_path}: shape {ref.shape}; expected a 3-D volume"
            + ("" if shape is None else f" of the annotation's shape {tuple(shape)}")
        )
    return ref.astype(np.float32, copy=False)


def read_structures(path: str | Path) -> pd.DataFrame:
    """Read and check a BrainGlobe ``structures.json``.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``structure_id``, see `Atlas.structures`.

    Raises
    ------
    AtlasError
        Not a list of records with ``id``, ``acronym``, ``name``, ``structure_id_path``;
        duplicate ids; ids ≤ 0 (reserved: 0 background, -1 outside the atlas); a path not
        ending with its own id or naming an id that is not listed.
    """
    path = Path(path)
    records = _read_json(path)
    if not isinstance(records, list):
        raise AtlasError(
            f"{path}: expected a JSON list of structures, got {type(records).__name__}"
        )
    return _structures_frame(records, str(path))


def write_atlas(
    path: str | Path,
    annotation: np.ndarray,
    structures: Sequence[Mapping],
    *,
    resolution_um: Sequence[float],
    orientation: str,
    hemispheres: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    name: str = "lightsheet_atlas",
    symmetric: bool = False,
) -> Path:
    """Write a BrainGlobe-layout atlas folder.

    Parameters
    ----------
    path : str or Path
        Folder to create (or fill).
    annotation : (A0, A1, A2) ndarray of unsigned int
        Structure ids, 0 outside the brain.
    structures : list of dict
        ``id``, ``acronym``, ``name``, ``structure_id_path`` (root first), optional
        ``rgb_triplet``.
    resolution_um : (3,) sequence of float
        Voxel size per axis in µm.
    orientation : str
        BrainGlobe orientation of the axes.
    hemispheres : (A0, A1, A2) ndarray of uint8, optional
        Written as ``hemispheres.tiff`` when given.
    reference : (A0, A1, A2) ndarray, optional
        Written as ``reference.tiff`` when given.
    name : str
        Atlas name in the metadata.
    symmetric : bool
        ``metadata.json``'s ``symmetric``: without ``hemispheres``, `load_atlas` splits a
        symmetric atlas at its midline and refuses any other.

    Returns
    -------
    Path
        The folder.
    """
    import tifffile

    path = Path(path)
    orientation = validate_orientation(orientation)
    res = _resolution(resolution_um, "resolution_um")
    annotation = np.asarray(annotation)
    _check_label_dtype(annotation.dtype, "annotation")
    _structures_frame(list(structures), "structures")  # validate before writing anything
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": name,
        "citation": "unpublished",
        "atlas_link": "",
        "species": "",
        "symmetric": bool(symmetric),
        "resolution": list(res),
        "orientation": orientation,
        "version": "0.1",
        "shape": list(annotation.shape),
        "additional_references": [],
    }
    (path / "metadata.json").write_text(json.dumps(meta, indent=2))
    (path / "structures.json").write_text(json.dumps([dict(s) for s in structures], indent=1))
    tifffile.imwrite(path / "annotation.tiff", annotation)
    if hemispheres is not None:
        tifffile.imwrite(path / "hemispheres.tiff", np.asarray(hemispheres, dtype=np.uint8))
    if reference is not None:
        tifffile.imwrite(path / "reference.tiff", np.asarray(reference))
    return path


def split_hemispheres(annotation: da.Array, orientation: str) -> da.Array:
    """Hemispheres by splitting the left–right axis at its midpoint, 0 outside the brain.

    The l/r letter of ``orientation`` names the axis and the side its index 0 lies on.
    Voxel ``i`` of ``n`` along that axis is in the first half when its centre ``i + 0.5``
    is at most ``n / 2`` (an odd axis gives its middle plane to the first half).

    Parameters
    ----------
    annotation : (A0, A1, A2) dask array
        Structure ids; voxels with id 0 get hemisphere 0.
    orientation : str
        BrainGlobe orientation, e.g. ``"asr"`` (axis 2 starts at the right).

    Returns
    -------
    (A0, A1, A2) dask array of uint8
    """
    orientation = validate_orientation(orientation)
    axis = next(i for i, c in enumerate(orientation) if c in "lr")
    first = HEMISPHERE_RIGHT if orientation[axis] == "r" else HEMISPHERE_LEFT
    second = HEMISPHERE_LEFT if first == HEMISPHERE_RIGHT else HEMISPHERE_RIGHT
    return da.map_blocks(
        _split_block,
        annotation,
        axis=axis,
        n=annotation.shape[axis],
        first=first,
        second=second,
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), np.uint8),
    )


def _split_block(block, *, axis, n, first, second, block_info=None):
    start = block_info[0]["array-location"][axis][0]
    idx = np.arange(start, start + block.shape[axis])
    side = np.where(2 * idx + 1 <= n, first, second).astype(np.uint8)
    shape = [1, 1, 1]
    shape[axis] = -1
    return np.where(block != 0, side.reshape(shape), np.uint8(HEMISPHERE_NONE)).astype(np.uint8)


# -- structures ---------------------------------------------------------------------------


def _structures_frame(records: list, where: str) -> pd.DataFrame:
    if not records:
        raise AtlasError(f"{where}: no structures; expected at least one region")
    ids, acronyms, names, paths = [], [], [], []
    for k, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise AtlasError(f"{where}: entry {k} is {type(rec).__name__}; expected an object")
        lacking = [key for key in ("id", "acronym", "name", "structure_id_path") if key not in rec]
        if lacking:
            raise AtlasError(
                f"{where}: entry {k} ({rec.get('acronym', '?')}) lacks {lacking}; expected id, "
                "acronym, name and structure_id_path"
            )
        sid = int(rec["id"])
        path = tuple(int(p) for p in rec["structure_id_path"])
        if sid <= 0:
            raise AtlasError(
                f"{where}: structure {rec['acronym']!r} has id {sid}; expected a positive id "
                "(0 is background and -1 outside the atlas)"
            )
        if not path or path[-1] != sid:
            raise AtlasError(
                f"{where}: structure {sid} ({rec['acronym']}) has structure_id_path {list(path)}; "
                "expected the path from the root ending with its own id"
            )
        ids.append(sid)
        acronyms.append(str(rec["acronym"]))
        names.append(str(rec["name"]))
        paths.append(path)
    seen: set[int] = set()
    dupes = sorted({i for i in ids if i in seen or seen.add(i)})
    if dupes:
        raise AtlasError(f"{where}: duplicate structure ids {dupes[:10]}; expected unique ids")
    known = set(ids)
    for sid, path in zip(ids, paths, strict=True):
        unknown = [p for p in path if p not in known]
        if unknown:
            raise AtlasError(
                f"{where}: structure {sid} has ancestors {unknown} in its structure_id_path "
                "that are not listed; expected every ancestor to be a structure"
            )
    parents = pd.array([p[-2] if len(p) > 1 else pd.NA for p in paths], dtype="Int64")
    frame = pd.DataFrame(
        {
            "acronym": acronyms,
            "structure_name": names,
            "parent_structure_id": parents,
            "depth": np.array([len(p) - 1 for p in paths], dtype=np.int64),
            "structure_id_path": paths,
        },
        index=pd.Index(np.array(ids, dtype=np.int64), name="structure_id"),
    )
    return frame


# -- volumes ------------------------------------------------------------------------------


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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasError(f"{path}: cannot read as JSON: {exc}") from exc


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


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zattrs").exists()
