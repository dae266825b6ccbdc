"""Finding a BrainGlobe atlas on disk and reading its metadata.json (no volume read)."""

from __future__ import annotations

import configparser
import json
import os
import re
from pathlib import Path

from lightsheet.config import is_orientation
from lightsheet.errors import AtlasError

__all__ = ["atlas_metadata", "brainglobe_dir", "resolve_atlas", "validate_orientation"]

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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasError(f"{path}: cannot read as JSON: {exc}") from exc


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zattrs").exists()
