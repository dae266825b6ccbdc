"""Which acquisitions in a landing folder are complete, and the run config of each.

The scanner behind the watch-incoming flow (`flows.watch`, which `tasks.watch` serves); no
Prefect here. An acquisition (a sub-folder of the landing folder) is complete when

* ``marker`` is set (default ``acquisition.done``, the file the microscope writes last) and
  the file exists, and
* nothing in the folder was created, renamed or rewritten for ``settle_seconds`` (inode change
  times, which copies cannot back-date, unlike modification times kept by ``rsync -a`` or
  ``cp -p``; this also covers a marker that an alphabetical copy delivers first).

With ``marker`` empty, the settle time alone decides.

Each acquisition's run config is its own ``config.yaml`` (relative paths relative to it), or
else ``template``: a run config whose relative paths are taken relative to the acquisition
folder. ``output_root`` (when set) puts the outputs in ``output_root/<acquisition name>``.
A complete acquisition carries an idempotency key derived from its input files
(`fingerprint`), so the server never starts it twice. Whatever goes wrong with one folder
makes it invalid, never the scan fail.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lightsheet.access import check_within_roots, config_paths
from lightsheet.config import PipelineConfig, load_config, read_yaml, resolve_paths
from lightsheet.errors import AcquisitionError, InputFilesError, LightsheetError

__all__ = [
    "CONFIG_NAME",
    "AcquisitionError",
    "acquisition_config",
    "classify",
    "fingerprint",
    "last_change",
    "scan",
]

#: The acquisition's own run config.
CONFIG_NAME = "config.yaml"


def acquisition_config(
    folder: Path, *, template: Path | None = None, output_root: Path | None = None
) -> PipelineConfig:
    """The run config of one acquisition folder.

    Parameters
    ----------
    folder : Path
        The acquisition.
    template : Path, optional
        Run config used when the folder has no ``config.yaml``; its relative paths are taken
        relative to ``folder``.
    output_root : Path, optional
        Outputs go to ``output_root / folder.name`` instead of the config's ``output``.

    Raises
    ------
    AcquisitionError
        No config and no template, or a config that does not validate.
    """
    own = folder / CONFIG_NAME
    try:
        if own.exists():  # a folder or an unreadable file is reported as such
            config = load_config(own)
        elif template is not None:
            raw = read_yaml(template) or {}
            if not isinstance(raw, dict):
                raise AcquisitionError(f"template {template}: expected a mapping of parameters")
            config = PipelineConfig.model_validate(resolve_paths(raw, folder))
        else:
            raise AcquisitionError(
                f"acquisition {folder}: no {CONFIG_NAME} in the folder and no `template` "
                "parameter; expected one of them"
            )
    except ValidationError as exc:
        source = own if own.exists() else template
        message = f"acquisition {folder}: invalid run config {source}:\n{exc}"
        raise AcquisitionError(message) from exc
    except (LightsheetError, OSError) as exc:  # unreadable, not YAML, an alias bomb, ...
        raise AcquisitionError(f"acquisition {folder}: {exc}") from exc
    if output_root is not None:
        config = config.model_copy(update={"output": Path(output_root) / folder.name})
    return config


def _inputs(folder: Path, config: PipelineConfig) -> list[Path]:
    """The files a run of ``config`` reads from the acquisition folder."""
    files = [Path(p) for p in glob.glob(config.input, recursive=True)]
    files += [*config.psf_paths(), folder / CONFIG_NAME]
    return sorted({p for p in files if p.is_file()})


def fingerprint(folder: Path, config: PipelineConfig) -> str:
    """Identity of an acquisition: its path and the names and sizes of the files a run reads.

    The run's own outputs (even inside the folder) do not change it; re-copied identical
    files keep it; changed inputs (or config) make a new acquisition.
    """
    h = hashlib.sha256(str(folder.resolve()).encode())
    for p in _inputs(folder, config):
        rel = os.path.relpath(p.resolve(), folder.resolve())
        h.update(json.dumps([rel, p.stat().st_size]).encode())
    return h.hexdigest()[:32]


def last_change(folder: Path, *, exclude: Path | None = None) -> float:
    """Newest inode change time (s since the epoch) in ``folder``, ``exclude`` left out."""
    newest = folder.stat().st_ctime
    skip = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(folder):
        if skip is not None:
            dirs[:] = [d for d in dirs if (Path(root) / d).resolve() != skip]
        for name in dirs + files:
            try:
                newest = max(newest, (Path(root) / name).lstat().st_ctime)
            except FileNotFoundError:  # removed while scanning (a temporary copy file)
                newest = time.time()
    return newest


def scan(
    landing: Path,
    *,
    marker: str | None = "acquisition.done",
    settle_seconds: float = 60.0,
    template: Path | None = None,
    output_root: Path | None = None,
    now: float | None = None,
    data_roots: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Classify every acquisition (sub-folder) of ``landing``.

    ``data_roots`` (a deployment's): an acquisition whose config reads or writes elsewhere
    is invalid. Whatever goes wrong with one folder makes it invalid, never the scan fail.

    Returns
    -------
    list of dict
        One record per sub-folder (sorted by name): ``name``, ``path``, ``status``
        (``complete``, ``waiting`` or ``invalid``), ``reason``; complete ones also carry
        ``config`` (JSON-ready) and ``idempotency_key``.

    Raises
    ------
    FileNotFoundError
        ``landing`` is not a folder.
    """
    landing = Path(landing)
    if not landing.is_dir():
        raise InputFilesError(f"landing folder {landing} does not exist or is not a folder")
    now = time.time() if now is None else now
    records = []
    for folder in sorted(p for p in landing.iterdir() if p.is_dir()):
        if folder.name.startswith((".", "_")):  # temporary or hidden folders of copy tools
            continue
        rec: dict[str, Any] = {"name": folder.name, "path": str(folder)}
        try:
            records.append(
                {
                    **rec,
                    **classify(
                        folder, marker, settle_seconds, template, output_root, now, data_roots
                    ),
                }
            )
        except (AcquisitionError, LightsheetError, OSError) as exc:
            records.append({**rec, "status": "invalid", "reason": str(exc)})
    return records


def classify(
    folder: Path,
    marker: str | None,
    settle_seconds: float,
    template: Path | None,
    output_root: Path | None,
    now: float,
    data_roots: list[str] | None,
) -> dict[str, Any]:
    """Status (and, when complete, config and idempotency key) of one acquisition folder."""
    if marker and not (folder / marker).is_file():
        return {"status": "waiting", "reason": f"no {marker} yet"}
    config = acquisition_config(folder, template=template, output_root=output_root)
    age = now - last_change(folder, exclude=config.output)
    if age < settle_seconds:
        reason = f"changed {age:.0f} s ago; waiting until unchanged for {settle_seconds:g} s"
        return {"status": "waiting", "reason": reason}
    if not glob.glob(config.input, recursive=True):
        reason = f"acquisition {folder}: no file matches input {config.input}"
        return {"status": "invalid", "reason": reason}
    if data_roots is not None:
        check_within_roots(config_paths(config), data_roots)
    return {
        "status": "complete",
        "reason": "",
        "config": config.model_dump(mode="json"),
        "idempotency_key": f"lightsheet-acquisition-{fingerprint(folder, config)}",
    }
