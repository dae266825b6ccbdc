"""Which paths a run may touch: data roots, and outputs kept apart from inputs.

Two rules, both checked before any compute (the ingest task, and a deployment's runs as they
start):

* **Data roots.** A deployment declares the folders its API-triggered runs may read and write
  (`check_within_roots`). Every path of the run config (the tiles' folder and each tile, the
  PSF, the atlas and its files, the model, the output) must lie beneath one of them once
  symbolic links and ``..`` are resolved, so a link or a ``../..`` cannot lead out.
* **Outputs apart from inputs** (`check_output_location`). The output folder may not be the
  tiles' folder, the atlas folder, or inside either: a run writes and replaces files in its
  output folder, and must never do so among its inputs.

Nothing here imports Prefect; the deployment's settings are read in `flows.deployment`.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightsheet.errors import AtlasError, PathNotAllowedError

if TYPE_CHECKING:
    from lightsheet.config import ClusterConfig, PipelineConfig

__all__ = [
    "check_cluster",
    "check_output_location",
    "check_within_roots",
    "config_paths",
    "is_within",
    "literal_root",
    "real",
]

#: ``glob.escape`` writes a literal ``*``, ``?`` or ``[`` as a one-character class.
_ESCAPED = re.compile(r"\[([*?\[])\]")


def literal_root(input_glob: str) -> Path:
    """The longest leading folder of a glob that holds no wildcard (escapes undone).

    Unlike a plain ``glob.has_magic`` walk, parts escaped by ``glob.escape`` (``brain[[]1]``)
    count as the literal folder they name (``brain[1]``).

    Examples
    --------
    >>> literal_root("/data/brain[[]1]/tiles/*.tif").as_posix()
    '/data/brain[1]/tiles'
    >>> literal_root("/data/b*/tiles/*.tif").as_posix()
    '/data'
    """
    parts = Path(input_glob).parent.parts
    kept: list[str] = []
    for part in parts:
        if glob.has_magic(_ESCAPED.sub("", part)):
            break
        kept.append(_ESCAPED.sub(r"\1", part))
    return Path(*kept) if kept else Path(".")


def real(path: str | Path) -> Path:
    """``path`` with symbolic links and ``..`` resolved (as far as it exists)."""
    return Path(os.path.realpath(os.fspath(path)))


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True when the real ``path`` is the real ``folder`` or lies beneath it."""
    p, f = real(path), real(folder)
    return p == f or f in p.parents


def check_within_roots(
    paths: Mapping[str, str | Path | Iterable[str | Path] | None], roots: Sequence[str | Path]
) -> None:
    """Refuse any path that does not resolve to somewhere beneath one of ``roots``.

    Parameters
    ----------
    paths : mapping
        Parameter name (``"output"``, ``"psf"``, ...) to a path, several paths, or None.
    roots : sequence of path-like
        The allowed data roots (a deployment setting). Empty: nothing is allowed.

    Raises
    ------
    PathNotAllowedError
        Naming the parameter, the path and where it resolves to, and the roots.
    """
    allowed = [real(r) for r in roots]
    for name, value in paths.items():
        if value is None:
            continue
        values = [value] if isinstance(value, str | os.PathLike) else list(value)
        for p in values:
            where = real(p)
            if not any(where == r or r in where.parents for r in allowed):
                via = "" if str(where) == os.fspath(p) else f" (resolves to {where})"
                raise PathNotAllowedError(
                    f"{name}: {p}{via} is outside the data roots this deployment allows "
                    f"({', '.join(map(str, roots)) or 'none declared'}); expected a path "
                    "beneath one of them"
                )


def check_output_location(
    output: str | Path, *, tiles: str | Path | None = None, atlas: str | Path | None = None
) -> None:
    """Refuse an output folder that is, or lies inside, the tiles' folder or the atlas.

    Parameters
    ----------
    output : path-like
        The run's output folder (need not exist yet).
    tiles : path-like, optional
        The folder the tiles are found in (`literal_root` of the input glob).
    atlas : path-like, optional
        The atlas folder.

    Raises
    ------
    PathNotAllowedError
        Naming the output and the input folder it would write into.
    """
    for name, folder in (("the tiles' folder", tiles), ("the atlas folder", atlas)):
        if folder is not None and is_within(output, folder):
            raise PathNotAllowedError(
                f"output: {output} is inside {name} {folder}; a run writes and replaces files "
                "in its output folder, so it must not be among its inputs: choose a folder "
                "outside it"
            )


def config_paths(config: PipelineConfig) -> dict[str, list[Path]]:
    """Every path a run of ``config`` reads or writes, by parameter (tiles one by one).

    The input glob contributes its literal folder and each file it matches (a tile may be a
    link to elsewhere); the atlas its folder and every file in it (a BrainGlobe atlas name,
    such as ``allen_mouse_25um``, is the folder it resolves to, `resolve_atlas`).
    """
    from lightsheet.io.atlas import resolve_atlas

    tiles = [Path(p) for p in glob.glob(config.input, recursive=True)]
    try:
        atlas = resolve_atlas(config.atlas)
    except AtlasError:  # checked as given; the run fails on it with the loader's message
        atlas = Path(config.atlas)
    atlas_files = sorted(p for p in atlas.rglob("*")) if atlas.is_dir() else []
    found = {
        "input": [literal_root(config.input), *tiles],
        "psf": config.psf_paths(),
        "atlas": [atlas, *atlas_files],
        "output": [Path(config.output)],
        "featurize.model": [Path(config.featurize.model)] if config.featurize.model else [],
        "cluster.jobqueue": [Path(config.cluster.jobqueue)] if config.cluster.jobqueue else [],
    }
    return {k: v for k, v in found.items() if v}


def check_cluster(
    cluster: ClusterConfig, *, address: str | None = None, jobqueue: str | Path | None = None
) -> None:
    """Refuse a scheduler address or jobqueue file other than the deployment's own.

    A caller of the API must not point the run's workers at a scheduler of its choosing
    (which could then run code in them), nor at a jobqueue file of its choosing (which
    says what SLURM runs). Both may only be left empty or equal the deployment's values.

    Raises
    ------
    PathNotAllowedError
        Naming the parameter, what was asked and what the deployment allows.
    """
    asked = {"cluster.address": cluster.address, "cluster.jobqueue": cluster.jobqueue}
    allowed = {"cluster.address": address, "cluster.jobqueue": jobqueue}
    for name, value in asked.items():
        if value is None:
            continue
        own = allowed[name]
        same = own is not None and (
            str(value) == str(own) if name == "cluster.address" else real(value) == real(own)
        )
        if not same:
            raise PathNotAllowedError(
                f"{name}: {value!s} is not this deployment's setting ({own or 'none'}); "
                "the scheduler and the jobqueue file come from the deployment, never from "
                "the caller: leave it empty" + ("" if own is None else f" or set it to {own}")
            )
