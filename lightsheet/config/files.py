"""Reading a YAML run config: bounded, paths relative to the file."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from lightsheet.config.pipeline import PipelineConfig
from lightsheet.errors import ConfigError

__all__ = ["MAX_YAML_VALUES", "is_atlas_name", "load_config", "read_yaml", "resolve_paths"]


#: Most values (scalars, lists and mappings, counted after alias expansion) a config may hold.
MAX_YAML_VALUES = 100_000


def read_yaml(path: str | Path) -> Any:
    """Parse a (trusted or not) YAML file safely and within bounds.

    ``yaml.safe_load`` constructs no objects, but aliases let a few hundred bytes stand for
    billions of values, and everything that walks the result (validation, JSON) then hangs.
    The document is composed first, its size counted with aliases expanded (shared nodes
    counted once per use, without expanding them), and refused beyond `MAX_YAML_VALUES`.

    Raises
    ------
    ConfigError
        Not a file, not valid YAML (with line and column), recursive or too many values.
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML run config file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc}); expected a YAML run config") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, path)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{path}: not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _count_values(root: Any, path: Path) -> int:
    """Values in a composed YAML graph with aliases expanded; ConfigError beyond the bound."""
    import yaml

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{path}: a YAML alias refers to itself; expected a finite config")
        active.add(key)
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(v) for v in node.value)
        else:
            n = 1
        active.discard(key)
        if n > MAX_YAML_VALUES:
            raise ConfigError(
                f"{path}: YAML aliases expand it to more than {MAX_YAML_VALUES:,} values; "
                "expected a run config (a few dozen values)"
            )
        sizes[key] = n
        return n

    return size(root)


def is_atlas_name(value: str, base: Path) -> bool:
    """Whether a relative ``atlas`` value is a BrainGlobe atlas name, not a folder.

    A bare name (``allen_mouse_25um``) with no such folder in ``base`` is a name; relative
    paths are joined to ``base`` by the config's readers.
    """
    return "/" not in value and not (Path(base) / value).exists()


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML run config; relative paths are taken relative to the YAML file's folder.

    The YAML is read within bounds (`read_yaml`). A relative ``input`` glob is joined to
    the folder with the folder's own glob characters escaped, so a config in ``brain[1]/``
    reads its own tiles, not those of ``brain1/``.

    Raises
    ------
    ConfigError
        The file is not a readable, bounded YAML mapping.
    pydantic.ValidationError
        A value is invalid (named).
    """
    path = Path(path)
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters, got {type(raw).__name__}")
    return PipelineConfig.model_validate(resolve_paths(raw, path.resolve().parent))


def resolve_paths(raw: dict, base: Path) -> dict:
    """A raw run config's relative paths joined to ``base`` (a new dict).

    ``input`` with ``base``'s own glob characters escaped (so a config in ``brain[1]/``
    reads its own tiles, not those of ``brain1/``); ``psf`` (one file, or each of a
    per-channel mapping), ``output``, ``stitch.positions``, and ``atlas`` unless it is a
    BrainGlobe atlas name (`is_atlas_name`).
    """
    raw = dict(raw)

    def joined(value: Any) -> Any:
        relative = isinstance(value, str) and not Path(value).is_absolute()
        return str(Path(base) / value) if relative else value

    for key in ("psf", "atlas", "output"):
        if key == "atlas" and isinstance(raw.get(key), str) and is_atlas_name(raw[key], base):
            continue
        if key == "psf" and isinstance(raw.get(key), dict):
            raw[key] = {c: joined(p) for c, p in raw[key].items()}
        elif key in raw:
            raw[key] = joined(raw[key])
    if isinstance(raw.get("input"), str) and not Path(raw["input"]).is_absolute():
        raw["input"] = os.path.join(glob.escape(str(base)), raw["input"])
    stitch = raw.get("stitch")
    if isinstance(stitch, dict) and "positions" in stitch:
        raw["stitch"] = {**stitch, "positions": joined(stitch["positions"])}
    return raw
