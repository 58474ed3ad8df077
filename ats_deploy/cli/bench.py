"""Commands that measure on a device profile: bench, tune, and the profiles they take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import backends
from ..errors import UserError
from .common import (
    KeepOpt,
    ProfileOpt,
    ReferenceOpt,
    TrustOpt,
    console,
    err_console,
    parse_keep,
    user_errors,
)

BenchModelArg = Annotated[
    Path | None,
    typer.Argument(
        help="Exported ONNX file, or a TensorRT engine (.plan/.engine) from `ats-deploy build`. Default: the only "
        "ONNX file in the current directory exported by ats-deploy (as `ats-deploy export CHECKPOINT --dynamic` "
        "writes it).",
        show_default=False,
    ),
]
BackendOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backend",
        help=f"Run on this backend instead of the profile's ({', '.join(backends.names())}); the results then say "
        "the backend was overridden. Repeat it to measure several side by side (--backend onnxruntime --backend "
        "openvino): each one's exported ATS and dense models get their own rows.",
        metavar="NAME",
        show_default=False,
    ),
]
ClassMapOpt = Annotated[
    Path | None,
    typer.Option(
        "--class-map",
        help="JSON or YAML file mapping class folder name -> class index. Default: ImageNet indices when the "
        "folders are wnids (n01440764, ...) and the model has 1000 classes, else the sorted folder order.",
    ),
]
PrecisionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--precision",
        help="Run at this precision instead of the profile's (fp32, int8); repeat it to measure several side by side "
        "(--precision fp32 --precision int8): bench quantizes the fp32 export and its dense baseline to int8 the same "
        "way, on --calibration DIR or else on the first --calibration-images of --data, which are then not measured.",
        metavar="NAME",
        show_default=False,
    ),
]
CalibrationOpt = Annotated[
    Path | None, typer.Option("--calibration", help="int8: a folder of real images to calibrate on, not measured.")
]
CalibrationImagesOpt = Annotated[
    int, typer.Option("--calibration-images", min=1, help="int8: how many images calibrate.")
]
DATA_HELP = (
    "Images in ImageFolder layout (`DIR/<class>/<image>`) for top-1 accuracy, or a flat folder of images (no labels: "
    "scored by agreement with the PyTorch dense model). Files that cannot be decoded are skipped and counted."
)


@user_errors
def bench(
    model: BenchModelArg = None,
    profile: ProfileOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help=DATA_HELP + " Without --data: the scikit-image photos plus random images, scored by agreement.",
        ),
    ] = None,
    images: Annotated[
        int | None,
        typer.Option(
            "--images", min=1, help="At most N images, taken in turn from each class (without --data: N, default 16)."
        ),
    ] = None,
    keep: KeepOpt = None,
    backend: BackendOpt = None,
    precision: PrecisionOpt = None,
    calibration: CalibrationOpt = None,
    calibration_images: CalibrationImagesOpt = 100,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for results.json, results.csv and the plots.",
            show_default="./results/<time>-<profile>/",
        ),
    ] = None,
    class_map: ClassMapOpt = None,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Benchmark an exported model on a device profile: accuracy, GFLOPs, kept tokens and latency.

    Compares, on the same images, the PyTorch reference (dense and ATS) with the exported model (ATS, and a dense
    export of the same network that speedups are quoted against), on the profile's backend. On the tensorrt
    backend an ONNX MODEL runs as the engine `ats-deploy build MODEL --profile NAME` wrote; build it first.
    """
    from ..bench.report import render
    from ..bench.run import Request
    from ..bench.run import bench as run_bench

    if profile is None:
        raise UserError("bench needs a device profile: --profile NAME (list them with `ats-deploy profiles`).")
    request = Request(
        profile=profile,
        model=model,
        data=data,
        images=images,
        keep=parse_keep(keep),
        backends=backend,
        precisions=precision,
        calibration=calibration,
        calibration_images=calibration_images,
        out=out,
        class_map=class_map,
        checkpoint=checkpoint,
        trust_checkpoint=trust_checkpoint,
    )
    result, files = run_bench(request, err_console)
    render(result, console)
    console.print(Text(f"wrote {files[0].parent}/: {', '.join(p.name for p in files)}"), highlight=False)
    result.check_agreed()


@user_errors
def tune(
    model: BenchModelArg = None,
    profile: ProfileOpt = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help=DATA_HELP + " They are held in memory (about 0.6 MB per image at 224 x 224).",
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop", metavar="POINTS", help="Choose the fastest setting within POINTS of the dense model's top-1."
        ),
    ] = None,
    latency_ms: Annotated[
        float | None,
        typer.Option(
            "--latency-ms",
            metavar="MS",
            help="Choose the most accurate setting with p50 <= MS at the profile's batch. Without --max-drop or "
            "--latency-ms, the profile's `latency_budget_ms:` is MS.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="The tuned profile (.yaml); the Pareto plot is written beside it as `<name>.pareto.png` (as "
            "`<name>.failed.pareto.png`, and no profile, when no setting meets the objective).",
            show_default="profiles/<profile>-tuned.yaml",
        ),
    ] = None,
    log: Annotated[
        Path | None,
        typer.Option(
            "--log",
            help="JSON-lines log of every finished measurement; a rerun under the same conditions resumes from it.",
            show_default="beside the output: <name>.log.jsonl",
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Discard the log and measure everything again instead of resuming.")
    ] = False,
    images: Annotated[
        int | None, typer.Option("--images", min=1, help="At most N images, taken in turn from each class.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help=f"Run on this backend instead of the profile's ({', '.join(backends.names())}); the tuned profile "
            "then says it was measured there.",
        ),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(
            "--precision",
            help="Search at this precision instead of the profile's; repeat it (--precision fp32 --precision int8) "
            "to choose among precisions too: the tuned profile then gets the chosen precision. int8 calibrates on "
            "--calibration DIR or else on the first --calibration-images of --data, which no precision measures.",
            metavar="NAME",
            show_default=False,
        ),
    ] = None,
    calibration: CalibrationOpt = None,
    calibration_images: CalibrationImagesOpt = 100,
    class_map: ClassMapOpt = None,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Choose a device's keep values from measurements: a tuned profile, a Pareto plot and a resumable log.

    On the profile's backend and batch, measures top-1 on --data, p50 latency (interleaved with the dense export)
    and GFLOPs for one keep for all stages (1.0 to 0.3), then refines stage by stage around the best. Needs a
    --dynamic export, where keep is an input.
    """
    from ..bench.tune import Request, render
    from ..bench.tune import tune as run_tune

    request = Request(
        profile=profile,
        data=data,
        max_drop=max_drop,
        latency_ms=latency_ms,
        model=model,
        output=output,
        log=log,
        fresh=fresh,
        images=images,
        backend=backend,
        precisions=tuple(precision or ()),
        calibration=calibration,
        calibration_images=calibration_images,
        class_map=class_map,
        checkpoint=checkpoint,
        trust_checkpoint=trust_checkpoint,
    )
    outcome = run_tune(request, err_console)
    render(outcome, console)
    outcome.check_met()


def _profile_origin(profile, builtin_dir: Path) -> str:
    """``built-in``, or the file a profile was read from (noting when it overrides a built-in)."""
    if profile.path is None or profile.path.parent.resolve() == builtin_dir.resolve():
        return "built-in"
    try:
        where = f"./{profile.path.relative_to(Path.cwd())}"
    except ValueError:
        where = str(profile.path)
    overrides = (builtin_dir / profile.path.name).is_file()
    return f"{where}\n(overrides built-in)" if overrides else where


@user_errors
def profiles() -> None:
    """List the device profiles for --profile: the built-in ones and ./profiles/*.yaml (which win on a name clash).

    A ./profiles/*.yaml file that cannot be read is left out and named in a warning with its problem; the other
    profiles are still listed and the exit status stays 0 (--profile with that name fails with the same message).
    """
    from .. import profiles as profiles_package
    from ..profiles import scan_profiles

    builtin_dir = Path(profiles_package.__file__).parent
    found, problems = scan_profiles()
    table = Table(title="device profiles (use as --profile NAME)", title_justify="left")
    for column in ("name", "backend"):  # never cut: they are what the user types
        table.add_column(column, min_width=max(len(getattr(p, column)) for p in found))
    table.add_column("precision")
    table.add_column("batch", justify="right")
    table.add_column("keep")
    table.add_column("from", overflow="fold")
    for p in found:
        keep = ",".join(f"{v:g}" for v in p.keep) if isinstance(p.keep, tuple) else f"{p.keep:g}"
        static = " (static)" if p.static else ""
        table.add_row(p.name, p.backend, p.precision, f"{p.batch}{static}", keep, _profile_origin(p, builtin_dir))
    console.print(table)
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {escape(str(problem))}", highlight=False)
