"""The ``lightsheet`` command: the top of the stack (the one module that imports flows).

Subcommands::

    lightsheet sample DIR [--size tiny|small|medium|large] [--seed N] [--misaligned]
                      [--overlap F] [--stage-error-um UM [UM UM]] [--grid Z Y X]
                      [--realistic [--cells nuclei|somata]] [--voxel-size-um Z Y X]
                      [--sheet-fwhm-um F]
    lightsheet sample DIR --background PLANES_DIR --voxel-size-um Z Y X [--n-cells N]
    lightsheet run CONFIG.yaml [--summary-json PATH]
    lightsheet demo [DIR] [--size tiny|small|medium|large] [--cells nuclei|somata]
    lightsheet psf OUT.tif --na NA --wavelength-nm NM --refractive-index N --voxel-size-um Z Y X
    lightsheet psf OUT.tif --beads BEADS.tif [--channel K] [--voxel-size-um Z Y X]
    lightsheet train CONFIG.yaml --out CHECKPOINT [--data-root DIR] [--steps N] [--device D]
    lightsheet lineage OUTPUT [--json]
    lightsheet verify OUTPUT [--quick]

Expected failures (bad input or settings, a damaged or busy output) print one line and
exit with status 2; unexpected ones keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "EXPECTED_ERRORS",
    "SIZES",
    "build_parser",
    "cmd_demo",
    "cmd_lineage",
    "cmd_psf",
    "cmd_run",
    "cmd_sample",
    "cmd_train",
    "cmd_verify",
    "format_lineage_step",
    "main",
    "one_line",
    "print_summary",
    "print_truth_comparison",
    "run_config",
    "up_to_date_summary",
]

SIZES = ("tiny", "small", "medium", "large")


def _prefect_defaults() -> None:
    """Settings that make Prefect's local default work on machines without internet."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    # expected errors (bad input, a busy output...) print one line on the console, not a
    # traceback, here and in the Dask workers (which inherit the setting)
    os.environ.setdefault(
        "PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "flows._console.OneLineConsoleHandler"
    )


def _progress_bar(description: str):
    """A rich progress bar and the ``progress(done, total, what)`` callback that moves it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[what]}"),
        transient=False,
    )
    task = bar.add_task(description, total=None, what="")

    def progress(done: int, total: int, what: str = "") -> None:
        bar.update(task, completed=done, total=total, what=what)

    return bar, progress


def cmd_sample(args: argparse.Namespace) -> int:
    """`lightsheet sample`: write a sample acquisition with ground truth."""
    from lightsheet.errors import SampleError
    from lightsheet.sample import generate
    from lightsheet.sample.overlap import generate_overlapping

    if args.background:
        return _sample_planted(args)
    if args.n_cells:
        raise SampleError("--n-cells goes with --background; expected it")
    common = {"size": args.size, "seed": args.seed, "channels": args.channels}
    overlapping = args.overlap or args.stage_error_um or args.grid
    if overlapping and args.misaligned:
        raise SampleError(
            "--misaligned cannot be combined with --overlap/--stage-error-um/--grid; "
            "expected one of them"
        )
    if (args.voxel_size_um or args.sheet_fwhm_um) and (overlapping or args.misaligned):
        raise SampleError(
            "--voxel-size-um and --sheet-fwhm-um cannot be combined with --overlap/"
            "--stage-error-um/--grid or --misaligned (they image at the default optics and "
            "voxel size)"
        )
    if args.cells and not args.realistic:
        raise SampleError("--cells goes with --realistic; expected --realistic --cells ...")
    common.update(realistic=args.realistic, cells=args.cells or "nuclei")
    bar, progress = _progress_bar(f"sample ({args.size})")
    with bar:
        if overlapping:
            info = generate_overlapping(
                args.dir, **common, timepoints=args.timepoints, progress=progress,
                overlap=args.overlap or 0.0, stage_error_um=args.stage_error_um or 0.0,
                grid=args.grid,
            )  # fmt: skip
        else:
            info = generate(
                args.dir, **common, timepoints=args.timepoints, progress=progress,
                misaligned=args.misaligned, voxel_size_um=args.voxel_size_um,
                sheet_fwhm_um=args.sheet_fwhm_um,
            )  # fmt: skip
    gb = info.get("bytes_written", 0) / 1e9
    print(f"sample written to {args.dir} ({gb:.2f} GB raw); run it with:")
    print(f"  lightsheet run {Path(args.dir) / 'config.yaml'}")
    print(
        "(with psf.tif, the PSF the tiles were blurred with; to measure it from the beads "
        "beside it, as for a microscope: lightsheet psf OUT.tif --beads "
        f"{Path(args.dir) / 'beads.tif'}, then psf: OUT.tif)"
    )
    return 0


def _sample_planted(args: argparse.Namespace) -> int:
    """`lightsheet sample --background`: somata planted into a real background."""
    from lightsheet.errors import SampleError
    from lightsheet.sample.planted import generate_planted

    others = [f for f in ("realistic", "cells", "misaligned", "overlap", "stage_error_um", "grid",
                          "sheet_fwhm_um") if getattr(args, f)]  # fmt: skip
    others += [f for f, default in (("size", "tiny"), ("channels", 2), ("timepoints", 1))
               if getattr(args, f) != default]  # fmt: skip
    if others:
        raise SampleError(
            f"--background cannot be combined with --{others[0].replace('_', '-')} (it writes "
            "the background's own shape, two channels, one time point)"
        )
    if not args.voxel_size_um:
        raise SampleError(
            "--background needs --voxel-size-um Z Y X (single-plane TIFFs do not record the z step)"
        )
    info = generate_planted(
        args.dir, args.background, voxel_size_um=args.voxel_size_um, n=args.n_cells,
        seed=args.seed,
    )  # fmt: skip
    print(
        f"{info['n_cells']} somata planted into {args.background}; written to {args.dir} "
        f"(ch0 signal, ch1 background channel, truth/cells.csv; pattern {info['pattern']!r})"
    )
    return 0


def run_config(config, *, record: bool = False) -> dict:
    """Run the pipeline on a validated config and return its summary.

    The inputs and settings are checked first (`tasks.ingest.check_inputs`), so a bad one
    is reported before Prefect starts. Unless ``record``, staleness is checked next: when
    every stage's outputs are up to date and intact, nothing runs and the summary is read
    from them (`up_to_date_summary`); Prefect then records no flow run. The output folder is held
    (`tasks._common.output_claimed`) from the check to the end of the run, so a second run
    on it is refused at once.
    """
    _prefect_defaults()
    from tasks._common import output_claimed
    from tasks.ingest import check_inputs

    with output_claimed(config, run={"command": " ".join(sys.argv[:3])}):
        # bad inputs or settings: one line now, before Prefect starts (the atlas's labels,
        # read whole, are left to the ingest task)
        manifest = check_inputs(config, atlas_labels=False).to_dict()
        summary = None if record else up_to_date_summary(config, manifest)
        if summary is not None:
            return summary
        from flows.pipeline import pipeline

        return pipeline(config)


def up_to_date_summary(config, manifest: dict | None = None) -> dict | None:
    """The run summary read from the outputs, when every stage is up to date and intact.

    Uses the flow's own check (`flows.pipeline.first_stale_stage`: cache keys, every file
    of every image present with its size, every table re-hashed) without starting Prefect's
    server or a flow run. None when anything must be computed.
    """
    import time

    import pandas as pd

    from flows.pipeline import STAGES, first_stale_stage
    from lightsheet.lineage import read_lineage
    from tasks._common import OTHER_FILES, OUTPUTS
    from tasks.density import top_regions

    start = time.monotonic()
    if first_stale_stage(config, manifest) is not None:
        return None
    out = Path(config.output)
    density = read_lineage(out / OUTPUTS["density"]) or {}
    made_by = (density.get("run") or {}).get("flow_run_name")
    enabled = {
        "deconvolve": config.deconvolve.enabled,
        "featurize": config.featurize.enabled,
        "register": config.register.enabled,
    }
    stages = [
        {"stage": name, "seconds": 0.0, "reused": True, "output": str(out / OUTPUTS[roles[0]])}
        for name, (_, _, roles) in STAGES.items()
        if enabled.get(name, True)
    ]
    table = pd.read_csv(out / OUTPUTS["density"])
    n_cells = int(
        table.loc[table["depth"] == 0, "total_cells"].sum()
        + table.loc[table["structure_id"] <= 0, "total_cells"].sum()
    )
    return {
        "flow_run_name": None,
        "up_to_date": True,
        "made_by": made_by,
        "output": str(out),
        "stages": stages,
        "n_cells": n_cells,
        "density": str(out / OUTPUTS["density"]),
        "cells": str(out / OUTPUTS["density_cells"]),
        "plots": [str(out / p) for p in OTHER_FILES if (out / p).is_file()],
        "top_regions": top_regions(table).to_dict(orient="records"),
        "warnings": density.get("warnings", []),
        "flow_seconds": round(time.monotonic() - start, 3),
    }


def print_summary(summary: dict) -> None:
    """Readable end-of-run report: where outputs are, the densest regions."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if summary.get("up_to_date"):
        console.print(
            f"\n[bold]Up to date:[/bold] every output checked intact and reused "
            f"({summary['flow_seconds']:.1f} s); no Prefect flow run was started (the outputs "
            f"were made by flow run {summary.get('made_by')}; `--record` runs the flow anyway)"
        )
    else:
        console.print(
            f"\n[bold]Prefect flow run:[/bold] {summary['flow_run_name']} "
            f"({summary['flow_seconds']:.1f} s)"
        )
    stages = Table(title="stages")
    for col in ("stage", "seconds", "reused", "output"):
        stages.add_column(col)
    for s in summary["stages"]:
        reused = "yes" if s["reused"] else "no"
        stages.add_row(s["stage"], f"{s['seconds']:.1f}", reused, str(s["output"]))
    console.print(stages)
    console.print(f"cells: {summary['n_cells']} → {summary['cells']}")
    console.print(f"densities: {summary['density']}")
    console.print("plots: " + ", ".join(summary["plots"]))
    top = Table(title="densest regions")
    columns = {
        "acronym": ("region", str),
        "left_cells_per_mm3": ("left /mm³", "{:,.0f}".format),
        "right_cells_per_mm3": ("right /mm³", "{:,.0f}".format),
        "total_cells_per_mm3": ("total /mm³", "{:,.0f}".format),
        "total_cells": ("cells", "{:,.0f}".format),
        "total_volume_mm3": ("volume mm³", "{:.4g}".format),
    }
    for title, _ in columns.values():
        top.add_column(title, justify="left" if title == "region" else "right")
    for row in summary["top_regions"]:
        top.add_row(*(fmt(row[key]) for key, (_, fmt) in columns.items()))
    console.print(top)
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")


def cmd_run(args: argparse.Namespace) -> int:
    """`lightsheet run`: validate a YAML config and run the pipeline."""
    from lightsheet.config import load_config

    config = load_config(args.config)
    summary = run_config(config, record=args.record)
    print_summary(summary)
    if args.summary_json:
        keep = {k: v for k, v in summary.items() if k != "markdown"}
        Path(args.summary_json).write_text(json.dumps(keep, indent=1, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`lightsheet demo`: realistic sample (reused when present), PSF from its beads, run."""
    from lightsheet.beads import measure_psf
    from lightsheet.config import load_config
    from lightsheet.sample import generate

    sample_dir = Path(args.dir) / f"sample-{args.size}"
    meta = sample_dir / "sample.json"
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    realistic = info.get("realistic") or {}
    reuse = (
        info.get("seed") == args.seed
        and realistic.get("cells") == args.cells
        and (sample_dir / "beads.tif").is_file()
    )
    if reuse:
        print(f"reusing the sample acquisition in {sample_dir}")
    else:
        bar, progress = _progress_bar(f"generating the realistic {args.size} sample")
        with bar:
            info = generate(
                sample_dir, size=args.size, seed=args.seed, progress=progress, realistic=True,
                cells=args.cells,
            )  # fmt: skip
    print(
        "measuring the PSF from the sample's bead stack, as for your own microscope "
        f"(lightsheet psf OUT.tif --beads {sample_dir / 'beads.tif'}); the optics' FWHM "
        + ", ".join(f"{f:.2f}" for f in info["beads"]["fwhm_um"])
        + " µm"
    )
    psf = Path(args.dir) / "psf-from-beads.tif"
    print("\n".join(measure_psf(sample_dir / "beads.tif", psf)))
    config = load_config(sample_dir / "config.yaml").model_copy(update={"psf": psf.resolve()})
    summary = run_config(config)
    print_summary(summary)
    print_truth_comparison(Path(summary["density"]), sample_dir / "truth" / "density.csv")
    return 0


def print_truth_comparison(found_csv: Path, truth_csv: Path) -> None:
    """Cells found vs the sample's ground truth, per leaf region."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    found = pd.read_csv(found_csv).set_index("structure_id")
    truth = pd.read_csv(truth_csv).set_index("structure_id")
    parents = set(truth["parent_structure_id"].dropna().astype(int))
    leaves = truth[(truth.index > 0) & ~truth.index.isin(parents)]
    table = Table(title=f"found vs ground truth ({truth_csv})")
    for col in ("region", "true cells", "found", "error", "true /mm³", "found /mm³"):
        table.add_column(col, justify="left" if col == "region" else "right")
    for sid, row in leaves.iterrows():
        got = found.loc[sid] if sid in found.index else None
        n = 0 if got is None else int(got["total_cells"])
        err = f"{100 * (n / row['total_cells'] - 1):+.1f}%" if row["total_cells"] else "n/a"
        table.add_row(
            row["acronym"],
            str(int(row["total_cells"])),
            str(n),
            err,
            f"{row['total_cells_per_mm3']:,.0f}",
            "n/a" if got is None else f"{got['total_cells_per_mm3']:,.0f}",
        )
    Console().print(table)


def cmd_psf(args: argparse.Namespace) -> int:
    """`lightsheet psf`: write a PSF generated from the optics, or distilled from beads."""
    from lightsheet.errors import ConfigError
    from lightsheet.psf import psf_from_optics, write_psf

    if args.beads is not None:
        return _psf_from_beads(args)
    if args.channel is not None:
        raise ConfigError("--channel picks the channel of --beads; a PSF from the optics has none")
    missing = [f"--{a.replace('_', '-')}" for a in ("na", "wavelength_nm", "voxel_size_um")
               if getattr(args, a) is None]  # fmt: skip
    if missing:
        raise ConfigError(f"{', '.join(missing)} needed (or --beads FILE)")
    psf = psf_from_optics(
        na=args.na,
        wavelength_nm=args.wavelength_nm,
        refractive_index=args.refractive_index,
        voxel_size_um=args.voxel_size_um,
        sheet_fwhm_um=args.sheet_fwhm_um,
    )
    write_psf(args.out, psf, args.voxel_size_um)
    print(f"PSF {psf.shape} (z, y, x) written to {args.out}")
    return 0


def _psf_from_beads(args: argparse.Namespace) -> int:
    """`lightsheet psf OUT --beads FILE`: the PSF, its beads (CSV) and a figure (PNG)."""
    from lightsheet.beads import measure_psf
    from lightsheet.errors import ConfigError

    if args.na is not None or args.wavelength_nm is not None:
        raise ConfigError("--beads measures the PSF; drop --na and --wavelength-nm")
    print("\n".join(measure_psf(args.beads, args.out, args.voxel_size_um, channel=args.channel)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`lightsheet train`: train the UNet on annotated volumes and write a checkpoint."""
    from lightsheet.train import load_train_config, train

    config, base = load_train_config(args.config, data_root=args.data_root)
    update = {
        k: v
        for k, v in {
            "steps": args.steps,
            "seed": args.seed,
            "device": args.device,
            "threads": args.threads,
        }.items()
        if v is not None
    }
    if update:
        config = config.model_validate({**config.model_dump(), **update})
    bar, progress = _progress_bar("training")
    command = f"lightsheet train {args.config} --out {args.out}" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in (("data_root", args.data_root), *update.items())
        if v is not None
    )
    with bar:
        record = train(
            config,
            args.out,
            base=base,
            progress=lambda step, steps, loss: progress(step, steps, f"loss {loss:.4f}"),
            command=command,
        )
    val = record["validation"]
    print(f"checkpoint written to {args.out} (record: {Path(args.out).with_suffix('.json')})")
    print(
        f"  held out {len(val['volumes'])} volumes: F1 {val['f1']:.3f} (precision "
        f"{val['precision']:.3f}, recall {val['recall']:.3f}) at threshold {val['threshold']}"
    )
    classifier = record["detection"].get("classifier")
    if classifier is not None:
        print(
            f"  candidates at probability {classifier['candidate_threshold']} sorted by a "
            f"classifier fitted on them: F1 {classifier['f1']:.3f} there (the model path's "
            "default)"
        )
    else:
        print(f"  no candidates' classifier: {record['detection']['classifier_fitted']}")
    print(f"  voxel size {record['voxel_size_um']} µm, {record['duration_s']:.0f} s")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    """`lightsheet lineage`: the chain from an output back to the raw tiles."""
    from lightsheet.errors import InputFilesError
    from lightsheet.lineage import lineage_chain

    chain = lineage_chain(args.path)
    if not chain:
        raise InputFilesError(
            f"{args.path} has no lineage record; expected an output lightsheet wrote"
        )
    if args.json:
        print(json.dumps(chain, indent=2, default=str))
        return 0
    for step in chain:
        print(format_lineage_step(step["path"], step["record"]))
    return 0


def format_lineage_step(path: str, rec: dict) -> str:
    """One stage of a lineage chain, readable."""
    run = rec.get("run", {})
    code = rec.get("code_version", {})
    lines = [
        f"{path}",
        f"  made by stage '{rec['stage']}' in flow run {run.get('flow_run_name')} "
        f"({run.get('flow_run_id')}), task run {run.get('task_run_id')}",
        f"  {rec.get('started')} → {rec.get('ended')} on {rec.get('host')}; lightsheet "
        f"{code.get('package')} (git {code.get('git') or 'n/a'})",
        f"  output fingerprint {rec.get('output_fingerprint')}, cache key {rec.get('cache_key')}",
        "  parameters: " + ", ".join(f"{k}={v}" for k, v in rec.get("params", {}).items()),
    ]
    listed = rec.get("input_files")
    if listed:
        lines.append(f"  input files: {listed['n_files']} listed in {listed['path']}")
    for name, inp in rec.get("inputs", {}).items():
        if inp.get("kind") == "output":
            what = f"{inp['path']} (from stage '{inp['stage']}')"
        elif inp.get("kind") == "raw tiles":
            what = (
                f"{inp['n_files']} raw TIFF tiles matching {inp['glob']!r}, pattern "
                f"{inp['pattern']!r}, grid (t, c, z, y, x) {inp['grid_shape']}"
            )
        else:
            what = f"{inp.get('kind', 'input')} {inp.get('path')}"
        lines.append(f"  input {name}: {what} [fingerprint {inp.get('fingerprint')}]")
        if inp.get("record"):  # how a model was made: data, licence, voxel size, scores
            from lightsheet.models import describe_record

            lines += [f"    {line}" for line in describe_record(inp["record"])]
    for name, rel in rec.get("related", {}).items():
        lines.append(f"  same run, not an input: {name} {rel['path']} (stage '{rel['stage']}')")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    """`lightsheet verify`: re-hash an output (or every output of a folder) on demand."""
    from lightsheet.lineage import check_output, read_lineage
    from tasks._common import OUTPUTS

    path = Path(args.path)
    if not path.exists():
        from lightsheet.errors import InputFilesError

        raise InputFilesError(f"no such file or folder {path}; expected a run's output")
    if read_lineage(path) is None and path.is_dir():
        targets = [path / n for n in OUTPUTS.values() if (path / n).exists()]
        if not targets:
            print(f"lightsheet verify: {path} holds no lightsheet output", file=sys.stderr)
            return 2
    else:
        targets = [path]
    damaged = 0
    for target in targets:
        problems = check_output(target, deep=not args.quick)
        damaged += bool(problems)
        print(f"{'DAMAGED' if problems else 'ok':8}{target}")
        for problem in problems:
            print(f"          {problem}")
    return 1 if damaged else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightsheet`` command."""
    parser = argparse.ArgumentParser(
        prog="lightsheet",
        description="Light-sheet microscopy: raw TIFF tiles to cell densities per brain region.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate a sample acquisition with ground truth")
    p.add_argument("dir", help="output folder (created; must be empty or a previous sample)")
    p.add_argument("--size", choices=SIZES, default="tiny", help="default: tiny")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--channels", type=int, default=2, help="channels (default 2: nuclei, autofl.)")
    p.add_argument("--timepoints", type=int, default=1, help="time points (default 1)")
    p.add_argument(
        "--overlap",
        type=float,
        metavar="F",
        help="tiles overlap their neighbours by this fraction of a side (e.g. 0.15); "
        "the config then registers and fuses them",
    )
    p.add_argument(
        "--stage-error-um",
        type=float,
        nargs="+",
        metavar="UM",
        help="tiles sit at their nominal stage position plus an error up to this (one value, "
        "or z y x); truth/tiles.csv records every tile's true position",
    )
    p.add_argument(
        "--grid", type=int, nargs=3, metavar=("Z", "Y", "X"), help="tiles per axis (overlap only)"
    )
    p.add_argument(
        "--misaligned",
        action="store_true",
        help="rotate, scale and warp the brain against its atlas (the config registers it); "
        "with --realistic, the textured tissue is what the registration sees",
    )
    p.add_argument(
        "--realistic",
        action="store_true",
        help="image textured tissue: autofluorescence varying several-fold, a dark outside, "
        "vessels and debris in every channel, light-sheet decay and stripes (the config then "
        "sets segment.background_channel: 1); with --overlap each tile has its own sheet",
    )
    p.add_argument(
        "--cells",
        choices=("nuclei", "somata"),
        help="with --realistic: dense nuclei of 6-12 um (default) or sparse somata of 12-18 um",
    )
    p.add_argument(
        "--background",
        metavar="DIR",
        help="plant somata with known centres into a real background: a folder of "
        "single-plane TIFFs (e.g. an autofluorescence channel); needs --voxel-size-um",
    )
    p.add_argument(
        "--voxel-size-um",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="with --background: its voxel size in um; otherwise the voxel size to image "
        "the generated sample at (default 2 1 1; the brain keeps its size in um)",
    )
    p.add_argument(
        "--sheet-fwhm-um",
        type=float,
        metavar="F",
        help="the light sheet's thickness (FWHM, um) the sample is imaged with (default 7)",
    )
    p.add_argument(
        "--n-cells",
        type=int,
        metavar="N",
        help="with --background: somata to plant (default 3,000 per mm3 of the volume)",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("run", help="run the pipeline on a YAML run config")
    p.add_argument("config", help="YAML file with the pipeline's parameters (see README)")
    p.add_argument(
        "--summary-json",
        metavar="PATH",
        help="also write the run summary (stages, timings) as JSON",
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="start the Prefect flow even when every output is up to date (the UI then records "
        "a run whose stages are all reused); by default such a re-run only checks the outputs, "
        "starts no flow run and prints the stored summary",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "demo", help="generate a sample, measure its PSF from its beads, run, print densities"
    )
    p.add_argument("dir", nargs="?", default="lightsheet-demo", help="default: ./lightsheet-demo")
    p.add_argument("--size", choices=SIZES, default="small", help="default: small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cells",
        choices=("nuclei", "somata"),
        default="nuclei",
        help="the realistic sample's cells: dense nuclei (default) or sparse somata",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("lineage", help="print what made an output, back to the raw tiles")
    p.add_argument("path", help="an output: density.csv, cells.csv or a .ome.zarr folder")
    p.add_argument("--json", action="store_true", help="machine-readable JSON")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser(
        "verify",
        help="re-hash an output (or all outputs in a folder) against what was written",
        description="Check every file an output's manifest lists (present, same size), re-read "
        "every chunk against its digest, and re-hash tables against their lineage records. "
        "Exit status: 0 intact, 1 damage found (listed), 2 not a lightsheet output.",
    )
    p.add_argument("path", help="an output (.ome.zarr folder or table) or an output folder")
    p.add_argument(
        "--quick", action="store_true", help="only check files and sizes (what reuse checks)"
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "psf",
        help="write a PSF TIFF generated from the optics, or measured from a stack of beads",
        description="From the optics (--na, --wavelength-nm, --voxel-size-um): a Gaussian "
        "approximation. From beads (--beads FILE): every isolated single bead of the stack "
        "centred on its light and summed (lightsheet.beads), at the stack's voxel size (its "
        "metadata's, or --voxel-size-um); also writes OUT's beads (.beads.csv: each bead "
        "found, used or why not) and a figure of the PSF (.png).",
    )
    p.add_argument("out", help="output TIFF")
    p.add_argument(
        "--beads", default=None, metavar="STACK",
        help="TIFF stack of beads, or a folder or quoted glob of its single-plane TIFFs",
    )  # fmt: skip
    p.add_argument(
        "--channel", type=int, default=None, metavar="K",
        help="--beads: the channel measured, where the stack holds several (default: each, "
        "into OUT_c0.tif, OUT_c1.tif, ...)",
    )  # fmt: skip
    p.add_argument("--na", type=float, default=None, help="detection numerical aperture")
    p.add_argument("--wavelength-nm", type=float, default=None, help="emission wavelength")
    p.add_argument("--refractive-index", type=float, default=1.45, help="default 1.45")
    p.add_argument("--voxel-size-um", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--sheet-fwhm-um", type=float, default=None, help="light-sheet FWHM")
    p.set_defaults(func=cmd_psf)

    p = sub.add_parser(
        "train",
        help="train the UNet on annotated volumes (images + masks or points)",
        description="Train the UNet on the annotated volumes a training config (YAML, "
        "lightsheet.config.TrainConfig) lists, hold some volumes out, choose the probability "
        "threshold on them, and write a safetensors checkpoint with its record. The same "
        "command runs on a CPU or a GPU.",
    )
    p.add_argument("config", help="training config (YAML); see README 'Training a model'")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder that the config's relative paths start from (default: the config's folder)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: config)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: config)")
    p.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda (default: CUDA if present)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: config)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightsheet`` console script.

    Expected failures print one line, ``lightsheet COMMAND: error: ...``, and exit 2.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        print(f"lightsheet {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from lightsheet.errors import LightsheetError

    # OSError: files and folders that are missing, unreadable, full, or not what was named
    return (LightsheetError, OSError, ValidationError)


#: What `main` reports in one line (everything else keeps its traceback: a bug).
EXPECTED_ERRORS = _expected_errors()


def one_line(exc: BaseException) -> str:
    """An expected error as one line; a config's validation errors joined with ``;``."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "config"
            got = f" (got {err['input']!r})" if not isinstance(err["input"], dict) else ""
            parts.append(f"{where}: {err['msg']}{got}")
        return f"invalid run config: {'; '.join(parts)}"
    if isinstance(exc, OSError) and exc.filename and exc.strerror and exc.args[1:]:
        return f"{exc.filename}: {exc.strerror}"  # the OS's own error, e.g. a missing file
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
