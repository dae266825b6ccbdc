"""What every stage task shares: cache checks, lineage, progress and artifacts.

Each task module describes its stage with a ``*_spec`` function returning a `StageSpec`
(name, outputs, parameters, input fingerprints). The spec's cache key decides whether the
output on disk can be reused; otherwise the task computes and writes with the lineage
record, and `Stage.finish` returns the small record that flows pass on (paths,
fingerprints, timings — never arrays). The flow uses the same specs to see, before it
starts a cluster, whether every stage is up to date.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask
from prefect import get_run_logger, runtime
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from lightsheet.access import check_output_location, literal_root
from lightsheet.clusters import release_freed_memory, stage_resources
from lightsheet.errors import InputFilesError
from lightsheet.io.atomic import check_replaceable, claim_folder, output_lock
from lightsheet.lineage import (
    CONTENT_MAX_BYTES,
    INPUT_FILES_SUFFIX,
    SIDECAR_SUFFIX,
    cache_key,
    check_output,
    describe_files,
    input_files_ref,
    make_record,
    read_lineage,
    write_input_files,
)
from lightsheet.plots import mip_png

#: Stage output names, in pipeline order: a reader of the output folder sees the pipeline.
OUTPUTS = {
    "stitch": "raw.ome.zarr",
    "deconvolve": "deconvolved.ome.zarr",
    "featurize": "features.ome.zarr",
    "segment": "labels.ome.zarr",
    "segment_table": "cells_segmented.csv",
    "register": "registration.json",
    "register_atlas": "registered_atlas.ome.zarr",
    "register_hemispheres": "registered_hemispheres.ome.zarr",
    "register_downsampled": "downsampled.ome.zarr",
    "density": "density.csv",
    "density_cells": "cells.csv",
}


#: Other files a run writes in its output folder (plots of the density stage).
OTHER_FILES = ("density_top_regions.png", "density_slice.png")


def run_files() -> list[str]:
    """Every name a run may write in its output folder (outputs, records, lists, plots)."""
    names = set(OUTPUTS.values()) | set(OTHER_FILES)
    names |= {n + SIDECAR_SUFFIX for n in OUTPUTS.values() if not n.endswith(".zarr")}
    names |= {n + INPUT_FILES_SUFFIX for n in OUTPUTS.values()}
    names |= {str(Path(n).with_suffix(".parquet")) for n in OUTPUTS.values() if n.endswith(".csv")}
    return sorted(names)


@contextmanager
def output_claimed(config: Any, run: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Hold a run's output folder: checked, created or adopted, marked and locked.

    Before anything is computed: the output may not lie inside the tiles' folder or the
    atlas (`lightsheet.access.check_output_location`), no name the run writes may be a file
    lightsheet did not write (`lightsheet.io.atomic.claim_folder`), and no other run may
    hold the folder (`lightsheet.io.atomic.output_lock`; ``run`` names this one in the
    lock, by default the current Prefect flow run).
    """
    out = Path(config.output)
    check_output_location(out, tiles=literal_root(config.input), atlas=config.atlas)
    claim_folder(out, run_files())
    if run is None:
        run = {"flow_run_id": _str(runtime.flow_run.id), "flow_run_name": runtime.flow_run.name}
    with output_lock(out, run):
        yield out


@contextmanager
def dask_client() -> Iterator[Any]:
    """The flow's Dask client inside a task, seceding from the worker's thread pool.

    The stage task waits while its chunk tasks run; seceding frees its worker thread for
    them (a one-thread SLURM worker would otherwise deadlock). Every worker in a process of
    its own first returns the memory the previous stage freed
    (`lightsheet.clusters.release_freed_memory`), so a stage's peak is its own.
    """
    from distributed import get_worker, worker_client

    try:
        get_worker()
        connect = worker_client
    except ValueError:  # not on a Dask worker: library use or another task runner
        from prefect_dask import get_dask_client as connect

    with connect() as client:
        client.run(release_freed_memory)
        yield client


def compute_with_progress(
    collection: Any, level: int = 0, *, description: str, stage: str | None = None
) -> Any:
    """Compute on the current Dask client, moving a Prefect progress artifact as chunks finish.

    ``collection`` is anything ``dask.compute`` takes (an array, lists of delayed values);
    every output key counts as one step. ``level`` is the pyramid level being written (see
    `lightsheet.io.omezarr.write_image`): level 0 holds the stage's work and gets the
    progress artifact; lower levels are logged. On a mixed cluster a GPU stage's chunks ask
    for a GPU worker (`stage_resources`). Falls back to ``dask.compute`` when no distributed
    client is active (library use).
    """
    from dask.base import unpack_collections
    from distributed import as_completed, futures_of, get_client

    try:
        client = get_client()
    except ValueError:
        return dask.compute(collection)[0]
    logger = get_run_logger()
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    resources = stage_resources(stage, workers) if stage and not level else None
    collections, repack = unpack_collections(collection, traverse=True)
    persisted = client.persist(list(collections), resources=resources)
    futures = futures_of(persisted)
    total = len(futures)
    if level:
        description = f"{description} (pyramid level s{level})"
    artifact = None if level else create_progress_artifact(0.0, description=description)
    last_report, done = time.monotonic(), 0
    for future in as_completed(futures):
        done += 1
        if future.status == "error":
            # stop the other chunks before the error unwinds the output's partial write
            client.cancel([f for f in futures if f is not future])
            future.result()  # re-raises the chunk's error with its traceback
        now = time.monotonic()
        if now - last_report > 2.0 or done == total:
            pct = 100.0 * done / total
            if artifact is not None:
                update_progress_artifact(artifact, pct)
            logger.info("%s: %d/%d chunks (%.0f%%)", description, done, total, pct)
            last_report = now
    return repack(dask.compute(*persisted))[0]


def check_unchanged(inp: Mapping[str, Any], used: str) -> None:
    """Fail unless ``used`` (fingerprint of the bytes a task loaded) is the input's key.

    The cache key and lineage hold the fingerprint taken when the stage was planned; a file
    rewritten before the task loaded it would otherwise be recorded under the old one.
    """
    if used != inp["fingerprint"]:
        raise InputFilesError(
            f"{inp['path']}: file changed while the run read it (fingerprint {used}, expected "
            f"{inp['fingerprint']} from when the stage started); re-run once it is final"
        )


def check_camera_offset(path: str, channels: Any, camera_offset: float) -> None:
    """Refuse a ``camera_offset`` above 90 % of any of ``channels`` of the image at ``path``.

    Read on the image's coarsest pyramid level (`lightsheet.deconvolve.check_background`),
    and only when the offset is not 0.
    """
    from lightsheet.deconvolve import check_background
    from lightsheet.io.omezarr import read_image

    if not camera_offset:
        return
    coarsest = read_image(path, level=-1)[0]
    for c in channels:
        where = f"{path} channel {c} (its coarsest level)"
        check_background(coarsest[:, c], camera_offset, where=where)


def output_input(record: Mapping[str, Any], path_key: str = "path") -> dict[str, Any]:
    """How a stage names an upstream stage's output among its inputs."""
    return {
        "kind": "output",
        "stage": record["stage"],
        "path": record[path_key],
        "fingerprint": record["fingerprints"][path_key],
    }


@dataclass
class StageSpec:
    """What a stage makes from what: enough for its cache key and the reuse check.

    Built by each task module's ``*_spec`` function from the task's own arguments, so the
    task and the flow's up-front reuse check (`flows.pipeline.first_stale_stage`) agree. Needs no
    Prefect run context and no heavy imports.

    Parameters
    ----------
    name : str
        Stage name (``stitch``, ``deconvolve``, ...).
    outputs : mapping of str to Path
        The files or folders the stage writes, by role (the first is the main output).
    params : mapping
        JSON-serialisable parameters that shape the result.
    inputs : mapping
        Each input's description with at least ``fingerprint`` (see `lightsheet.lineage`).
    related : mapping, optional
        Outputs of the same run shown in the lineage but not part of the cache key.
    files : sequence of path-like, optional
        The files read from outside the pipeline (tiles, PSF, model, atlas), listed beside
        the output (`lightsheet.lineage.write_input_files`). Default: the ``path`` of every
        input that is a file or folder outside the pipeline's outputs.
    files_by_content : bool
        Fingerprint the listed files up to 16 MiB by content (False: by path, size and
        modification time only, as raw tiles are).
    """

    name: str
    outputs: Mapping[str, Path]
    params: Mapping[str, Any]
    inputs: Mapping[str, Mapping[str, Any]]
    related: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    files: list[str] | None = None
    files_by_content: bool = True

    def __post_init__(self) -> None:
        self.outputs = {k: Path(v) for k, v in self.outputs.items()}
        self.params, self.inputs, self.related = (
            dict(self.params),
            dict(self.inputs),
            dict(self.related),
        )
        self.key = cache_key(self.name, self.params, self.inputs)

    def reusable(self) -> dict[str, str] | None:
        """Output fingerprints by role if every output on disk was made under this key."""
        return self.reuse_check()[0]

    def reuse_check(self) -> tuple[dict[str, str] | None, list[str]]:
        """(output fingerprints or None, damage found).

        Outputs made under this key are reused only when intact: every file of an image's
        manifest present with its size, every table's bytes equal to its record's
        fingerprint (`lightsheet.lineage.check_output`). Damage is returned (to warn about)
        and makes the stage recompute.
        """
        records = [read_lineage(p) for p in self.outputs.values()]
        if not all(
            r is not None and r.get("cache_key") == self.key and r.get("output_fingerprint")
            for r in records
        ):
            return None, []
        damage = [problem for p in self.outputs.values() for problem in check_output(p)]
        if damage:
            return None, damage
        fps = {role: r["output_fingerprint"] for role, r in zip(self.outputs, records, strict=True)}
        return fps, []  # type: ignore[index]

    def input_files(self) -> list[str]:
        """The files this stage reads from outside the pipeline (see ``files``)."""
        if self.files is not None:
            return list(self.files)
        found: list[str] = []
        for inp in self.inputs.values():
            where = Path(str(inp.get("path", "")))
            if inp.get("kind") == "output" or not inp.get("path"):
                continue
            if where.is_file():
                found.append(str(where))
            elif where.is_dir():
                found += [str(p) for p in sorted(where.rglob("*")) if p.is_file()]
        return found

    def record(self, fingerprints: Mapping[str, str], **extra: Any) -> dict[str, Any]:
        """The small record a stage hands downstream (paths, fingerprints; never arrays)."""
        fps = dict(fingerprints)
        return {
            "stage": self.name,
            **{role: str(p) for role, p in self.outputs.items()},
            "path": str(next(iter(self.outputs.values()))),
            "fingerprints": {**fps, "path": next(iter(fps.values()), None)},
            "cache_key": self.key,
            **extra,
        }


class Stage:
    """One stage's run inside its task: reuse decision, lineage record, progress, record.

    Parameters
    ----------
    spec : StageSpec
        The stage's outputs, parameters and inputs.
    """

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.name = spec.name
        self.outputs = spec.outputs
        self.started = time.time()
        self.logger = get_run_logger()
        self.reused, self.damage = spec.reuse_check()
        for problem in self.damage:
            self.logger.warning("%s: output damaged, recomputing it: %s", self.name, problem)
        if not self.reused:  # refuse before computing, not when the result is renamed in
            for path in self.outputs.values():
                check_replaceable(path)
        if self.reused:
            self.logger.info(
                "%s: reusing %s (same inputs, parameters and code)",
                self.name,
                ", ".join(str(p) for p in self.outputs.values()),
            )

    def lineage(self) -> dict[str, Any]:
        """The lineage record to store with each output (lists the input files beside it)."""
        spec = self.spec
        main = next(iter(self.outputs.values()))
        record = make_record(
            spec.name,
            params=spec.params,
            inputs=spec.inputs,
            key=spec.key,
            started=self.started,
            related=spec.related,
            run={
                "flow_run_id": _str(runtime.flow_run.id),
                "flow_run_name": runtime.flow_run.name,
                "task_run_id": _str(runtime.task_run.id),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            },
        )
        files = spec.input_files()
        if not files:  # nothing read from outside the pipeline: nothing to list
            return record
        maximum = CONTENT_MAX_BYTES if spec.files_by_content else 0
        rows = describe_files(files, content_max_bytes=maximum)
        self._input_rows = rows  # written by `finish`, once the outputs are
        return {**record, "input_files": input_files_ref(main, rows)}

    def progress(self, description: str | None = None):
        """The ``compute`` callable for `write_image`: progress artifact + log lines."""
        return partial(compute_with_progress, description=description or self.name, stage=self.name)

    def finish(self, fingerprints: Mapping[str, str] | None = None, **extra: Any) -> dict:
        """The stage's record. ``fingerprints``: of the new outputs (None when reused).

        Writes the list of input files beside the new main output: after the outputs, so a
        failed stage leaves nothing beside them.
        """
        rows = getattr(self, "_input_rows", None)
        if fingerprints is not None and rows is not None:
            write_input_files(next(iter(self.outputs.values())), rows)
        return self.spec.record(
            self.reused or fingerprints or {},
            reused=self.reused is not None,
            seconds=round(time.time() - self.started, 3),
            **extra,
        )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


#: Characters a Prefect asset key may not hold (`prefect.types.names`), and the escape.
_ASSET_UNSAFE = set("\n\r\t\0 #?&%\"'<>[]{}|\\^`~")
#: Prefect's longest asset key.
ASSET_KEY_MAX = 512


def asset_key(path: str | Path) -> str:
    """The Prefect asset key of an output file: ``file://`` and its real absolute path.

    Prefect forbids ``%`` in keys, so the usual percent-encoding (``Path.as_uri``) fails for
    any path with a space or a non-ASCII letter. Instead each forbidden character (space,
    ``[``, ``]``, ``#``, ``%``, ...) and ``~`` itself become ``~`` and two hex digits per
    UTF-8 byte, reversibly; other characters (``ü`` included) stay as written. A key over
    Prefect's 512 characters keeps its start and ends in ``~~`` and a hash of the path.

    Examples
    --------
    >>> asset_key("/data/brain [1]/Müller out/raw.ome.zarr")
    'file:///data/brain~20~5B1~5D/Müller~20out/raw.ome.zarr'
    """
    path = os.path.realpath(path)
    body = "".join(
        "".join(f"~{b:02X}" for b in c.encode()) if c in _ASSET_UNSAFE else c for c in path
    )
    key = "file://" + body
    if len(key) > ASSET_KEY_MAX:
        import hashlib

        digest = hashlib.blake2b(path.encode(), digest_size=16).hexdigest()
        key = key[: ASSET_KEY_MAX - len(digest) - 2] + "~~" + digest
    return key


def describe_image(path: Path) -> dict[str, Any]:
    """Shape, chunks, dtype, bytes and voxel size of a stored image (metadata only)."""
    from lightsheet.io.omezarr import read_image

    image, voxel, _ = read_image(path)
    return {
        "shape": list(image.shape),
        "chunks": list(image.chunksize),
        "dtype": str(image.dtype),
        "bytes": int(image.nbytes),
        "voxel_size_um": list(voxel),
    }


def publish_image(record: Mapping[str, Any], *, channel: int = 0) -> dict[str, Any]:
    """Artifacts of an image stage, keyed by stage so they group across runs.

    A table (shape, chunks, dtype, bytes, voxel size, duration, throughput), a
    maximum-intensity thumbnail and a link to the output. Returns the description.
    """
    stage, path = record["stage"], Path(record["path"])
    info = describe_image(path)
    seconds = record["seconds"]
    rows = {
        **info,
        "seconds": seconds,
        "throughput_mb_per_s": None
        if record["reused"]
        else round(info["bytes"] / 1e6 / max(seconds, 1e-9), 1),
        "reused": record["reused"],
        "path": str(path),
    }
    create_table_artifact(
        key=f"{stage}-output",
        table=[{"field": k, "value": str(v)} for k, v in rows.items()],
        description=f"{stage} output {path.name}",
    )
    thumbnail = png_markdown(mip_png(path, channel=channel), "MIP")
    create_markdown_artifact(
        key=f"{stage}-thumbnail",
        markdown=f"### {stage}: {path.name}\n\n{thumbnail}",
        description=f"{stage}: maximum-intensity projection along z",
    )
    create_link_artifact(
        key=f"{stage}-link",
        link=path.resolve().as_uri(),
        link_text=str(path),
        description=f"{stage} output on disk",
    )
    return info


def png_markdown(png: bytes | Path, alt: str) -> str:
    """A PNG (bytes or file) embedded in markdown, so an artifact shows it without a server."""
    data = png.read_bytes() if isinstance(png, Path) else png
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"


def markdown_table(table) -> str:
    """A pandas DataFrame as a GitHub-flavoured markdown table."""
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])
