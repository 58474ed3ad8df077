"""The ``ats-deploy`` command line: checkpoint -> model -> ONNX -> engine -> bench report.

Every command is a thin layer over a library function; user errors
(:class:`~ats_deploy.errors.UserError`) end in one red line naming the fix and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__, backends
from .console import OutputConsole
from .errors import UserError

if TYPE_CHECKING:
    from .serving import adaptive as serving_adaptive
    from .serving import kserve as serving_kserve

app = typer.Typer(
    name="ats-deploy",
    help=(
        "Deploy Vision Transformers with Adaptive Token Sampling (ATS): export one ONNX file that "
        "serves every token budget K, validate it against PyTorch, build TensorRT engines, "
        "benchmark and tune K per device.\n\n"
        "Typical flow: **inspect** a checkpoint, **export** it with --dynamic, "
        "**bench** it with a device --profile, **tune** keep for that device."
    ),
    rich_markup_mode="markdown",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# No emoji codes: user text such as "skimage:coffee: ..." must print as written, never as an emoji. Not wrapped
# when not a terminal (a pipe, a log, CI): ats_deploy/console.py.
console = OutputConsole(emoji=False)
err_console = OutputConsole(stderr=True, emoji=False)

CheckpointArg = Annotated[
    str,
    typer.Argument(
        help="Checkpoint file (.pth/.pt/.safetensors: DeiT release, timm, ATS authors', ats-deploy's own) "
        "or random:SEED for random weights (needs --arch).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="timm architecture, e.g. deit_small_patch16_224 (inferred when unambiguous)."),
]
StagesOpt = Annotated[
    str | None,
    typer.Option("--stages", help="ATS blocks, e.g. '3-11' or '3,5,7' (default: 3 to the last block)."),
]
KeepOpt = Annotated[
    str | None,
    typer.Option(
        "--keep",
        help="Token budget per ATS stage: one value for all stages or a comma list. "
        "(0, 1]: fraction of the model's tokens; > 1: absolute K.",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow checkpoints that need code to unpickle. Only for files from a source you trust.",
    ),
]


def command(*args, **kwargs) -> Callable:
    """``app.command`` whose user errors print one clear message and exit non-zero."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            except UserError as err:  # messages quote user text (paths, names): never markup
                err_console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False)
                if err.hint:
                    err_console.print(Text(err.hint), highlight=False)
                raise typer.Exit(err.exit_code) from None
            except KeyboardInterrupt:  # inside a command click would print "Aborted!" and exit 1
                _interrupted()

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def parse_keep(text: str | None) -> list[float] | None:
    """``--keep`` text -> checked floats (:class:`~ats_deploy.keep.Keep`; the stage count is checked later)."""
    from .keep import Keep

    return None if text is None else list(Keep.parse(text).values)


def _version(value: bool) -> None:
    if value:
        console.print(f"ats-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Deploy ViTs with Adaptive Token Sampling."""


def _load(checkpoint: str, arch: str | None, stages: str | None, keep: str | None, trust: bool):
    from .checkpoints import load_model

    model = load_model(checkpoint, arch=arch, stages=stages, keep=parse_keep(keep), trust_code=trust)
    _notes(model.load_notes)
    return model


def _notes(notes: Iterable[str]) -> None:
    """What loading or planning decided that the user should hear, before the work starts."""
    for note in notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


@command()
def inspect(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Show a checkpoint's architecture, family, prefix tokens, parameters, stages, default keep and dense GFLOPs."""
    from .flops import CostModel
    from .keep import format_keep

    model = _load(checkpoint, arch, stages, None, trust_checkpoint)
    cost = CostModel.of(model)
    table = Table(title=Text(checkpoint), show_header=False)
    rows = [
        ("architecture", model.arch),
        ("model family", model.family.name),
        ("prefix tokens (P)", str(model.prefix_tokens)),
        ("checkpoint format", model.checkpoint_format),
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"),
        ("input size", "x".join(str(v) for v in model.input_size)),
        ("classes", str(model.num_classes)),
        ("tokens (n0)", str(model.n0)),
        ("depth / heads / dim", f"{cost.depth} / {model.vit.blocks[0].attn.num_heads} / {cost.dim}"),
        ("ATS stages", ",".join(map(str, model.stages)) or "none (dense)"),
        ("default keep", format_keep(model.default_keep)),
        ("dense GFLOPs", f"{cost.dense_gflops():.2f}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@command()
def convert(
    checkpoint: CheckpointArg,
    output: Annotated[str, typer.Option("-o", "--output", help="The ats-deploy checkpoint file to write.")],
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    keep: KeepOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Write a self-describing ats-deploy checkpoint (arch, stages, default keep, weights)."""
    from .atomic import output_path
    from .checkpoints import save_checkpoint
    from .keep import format_keep

    target = output_path(output, None)  # a folder is refused before the checkpoint is loaded
    model = _load(checkpoint, arch, stages, keep, trust_checkpoint)
    path = save_checkpoint(model, target)
    console.print(
        f"wrote [bold]{escape(str(path))}[/]: {model.arch}, stages {','.join(map(str, model.stages)) or 'none'}, "
        f"keep {format_keep(model.default_keep)}"
    )


def _predictor(checkpoint: str, keep: str | None, arch: str | None, stages: str | None, trust: bool):
    """What predict runs, and the keep to run it with.

    An exported file runs through :mod:`ats_deploy.runtime`; a checkpoint runs as its PyTorch reference, whose
    default keep is then ``--keep``.
    """
    from . import runtime

    if not runtime.is_exported_model(checkpoint):
        return runtime.ReferenceModel(_load(checkpoint, arch, stages, keep, trust)), None
    given = [flag for flag, value in (("--arch", arch), ("--stages", stages), ("--trust-checkpoint", trust)) if value]
    if given:
        flags = " and ".join(given)
        raise UserError(f"{flags} apply only to checkpoints; {checkpoint} records its own model: drop {flags}.")
    model = runtime.open(checkpoint)
    return model, model.keep_for(parse_keep(keep))


@command()
def predict(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="Checkpoint (.pth/.pt/.safetensors, or random:SEED with --arch), or a model exported by ats-deploy: "
            "an ONNX file (.onnx) or a TensorRT engine (.plan/.engine).",
            show_default=False,
        ),
    ],
    images: Annotated[
        list[str],
        typer.Argument(help="Image files, or skimage:NAME for a photo shipped with scikit-image (chelsea, ...)."),
    ],
    keep: KeepOpt = None,
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many classes to show.")] = 5,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Classify images with the PyTorch ATS model or an exported one: top classes, kept tokens per stage, GFLOPs.

    An exported model runs as `ats_deploy.runtime` runs it, with the pre-processing its metadata records.
    """
    from .images import load_image, sample_images

    model, keep_values = _predictor(checkpoint, keep, arch, stages, trust_checkpoint)
    pil = []
    for item in images:
        if item.startswith("skimage:"):
            name = item.split(":", 1)[1]
            try:
                pil.append(sample_images([name])[name])
            except AttributeError:
                raise UserError(f"scikit-image has no photo '{name}'; try skimage:chelsea or skimage:coffee.") from None
        else:
            pil.append(load_image(item))
    result = model.predict(pil, keep=keep_values, top=top)
    gflops = model.gflops(result.tokens)
    for i, item in enumerate(images):
        table = Table(title=Text(f"{item}  ({gflops[i]:.2f} GFLOPs)"), title_justify="left")  # names: not markup
        table.add_column("rank", justify="right")
        table.add_column("class", justify="right")
        table.add_column("probability", justify="right")
        table.add_column("name")
        ranked = zip(result.probabilities[i].tolist(), result.classes[i].tolist(), result.labels[i], strict=True)
        for rank, (p, c, name) in enumerate(ranked, 1):
            table.add_row(str(rank), str(c), f"{p:.3f}", Text(name))
        console.print(table)
        if model.stages:
            kept = ", ".join(f"{s}:{t}" for s, t in zip(model.stages, result.tokens[i].tolist(), strict=True))
            console.print(f"kept tokens per stage (block:K'): {kept}")


ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile", help="Device profile: a built-in name (see `ats-deploy profiles`), ./profiles/NAME.yaml or a path."
    ),
]


@command()
def export(
    checkpoint: CheckpointArg,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="ONNX file to write, or a folder to write it in (an existing one, or a path ending in /). "
            "Default: the checkpoint's stem + .onnx for --dynamic, "
            "+ .static-b<batch>-k<keep>.onnx for a static export, + .custom-op before .onnx with --ats-op custom, "
            "+ .int8 before .onnx with --precision int8.",
        ),
    ] = None,
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic/--static",
            help="--dynamic: keep and batch are run-time inputs (one file for every K). "
            "--static: batch and keep baked in, every shape constant (TensorRT < 8.6, DLA).",
        ),
    ] = False,
    keep: KeepOpt = None,
    profile: ProfileOpt = None,
    batch: Annotated[
        int | None, typer.Option("--batch", help="Static export: the fixed batch size (default 1).")
    ] = None,
    exporter: Annotated[
        str, typer.Option("--exporter", help="torchscript (default: fast, see README) or dynamo.")
    ] = "torchscript",
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    img_size: Annotated[
        int | None,
        typer.Option("--img-size", help="Export at another square input size (a multiple of the patch size)."),
    ] = None,
    ats_op: Annotated[
        str,
        typer.Option(
            "--ats-op",
            help="subgraph: ATS as standard ONNX ops (default, runs everywhere); custom: one "
            "ats_deploy::AdaptiveTokenSampler node per stage (onnxruntime-extensions kernel, TensorRT plugin).",
        ),
    ] = "subgraph",
    validate_: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Compare with the PyTorch reference after export.")
    ] = True,
    atol: Annotated[float, typer.Option("--atol", help="Largest accepted |logit difference|.")] = 1e-3,
    opset: Annotated[
        int,
        typer.Option("--opset", min=17, max=18, help="ONNX opset: 18 (default) or 17 (TensorRT 8.6's parser)."),
    ] = 18,
    trust_checkpoint: TrustOpt = False,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp32 (default) or int8: Q/DQ around the matrix work, calibrated on --calibration; "
            "the ATS sampling stays float32. int8 needs --dynamic.",
        ),
    ] = "fp32",
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="INT8: a folder of real images to calibrate on (ImageFolder or flat)."),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", help="INT8: how many images of --calibration to calibrate on.")
    ] = 100,
    validation_data: Annotated[
        Path | None,
        typer.Option(
            "--validation-data",
            help="Validate on up to 100 images of this folder (ImageFolder or flat). Default: for int8, the "
            "--calibration images after the calibrated ones; for fp32, the scikit-image photos.",
        ),
    ] = None,
) -> None:
    """Export to ONNX and validate against the PyTorch reference.

    With --dynamic one file serves every batch size and every keep (K is an input);
    without it, batch and keep come from --batch/--keep or --profile and are baked in.
    """
    import time

    from .exporters.onnx_export import export as run_export
    from .exporters.request import ExportRequest, plan

    request = ExportRequest(
        checkpoint=checkpoint, output=output, dynamic=dynamic, keep=parse_keep(keep), batch=batch,
        exporter=exporter, arch=arch, stages=stages, img_size=img_size, ats_op=ats_op, opset=opset,
        trust_checkpoint=trust_checkpoint, profile=_profile(profile) if profile else None,
        precision=precision, calibration=calibration, calibration_images=calibration_images,
        validation_data=validation_data,
    )
    planned = plan(request)
    _notes(planned.notes)
    start = time.perf_counter()
    with console.status(f"exporting {planned.model.arch} with the {exporter} exporter"):
        path = run_export(planned.model, planned.output, planned.options)
    console.print(
        f"exported [bold]{escape(str(path))}[/] ({path.stat().st_size / 1e6:.1f} MB, {planned.kind}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if validate_:
        _validate(path, planned.model, request.profile, atol, planned.options.calibration, validation_data)


def _profile(name: str):
    from .profiles import load_profile

    return load_profile(name)


def _validate(path: Path, model, prof, atol: float, calibration, data: Path | None) -> None:
    """Validate right after export; the file stays on disk either way, and the message says in what state.

    int8 (``calibration`` set) is judged by agreement on held-out images, fp32 patch for patch (docs/ATS.md).
    """
    from .errors import Interrupted
    from .exporters import validate as checks

    stages = len(model.stages)
    if calibration is not None:
        names, images = checks.held_out_inputs(model, calibration, data, err_console)
        keeps = [[k] * stages for k in checks.REDUCED_KEEPS]
        batches = tuple(b for b in checks.REDUCED_BATCHES if b <= len(images)) or (1,)  # every case sees images
    else:
        if data is not None:
            names, images = checks.folder_inputs(model, data, checks.HELD_OUT_IMAGES, err_console)
        else:
            names, images = checks.default_inputs(model)
        keeps = [prof.keep_for(stages)] if prof is not None else [[k] * stages for k in checks.DEFAULT_KEEPS]
        batches = checks.DEFAULT_BATCHES
    try:
        report = checks.validate(str(path), model, names, images, keeps, batches, atol=atol, console=err_console)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during validation: {path} is written in full but NOT validated.",
            f"Validate it with `ats-deploy validate {path}` before you use it, or export again.",
        ) from None
    _report_validation(report, path)
    _fail_and_mark(report, path, "Re-export with the other --exporter (int8: calibrate on more real images), or "
                   "report the mismatch with this output.")


def _fail_and_mark(report, path: Path, hint: str | None = None) -> None:
    """A failed validation marks the file (artifact key ``validation_failed``) so that deploying it is refused."""
    from .artifact import ALLOW_FAILED, mark_failed
    from .errors import ValidationFailed

    if report.ok:
        return
    first = report.failures[0]
    mark_failed(path, f"{len(report.failures)} mismatch(es); the first: {first[:300]}")
    raise ValidationFailed(
        f"{path} disagrees with the PyTorch reference (see above). The file is kept for inspection and marked as "
        f"failed: `ats-deploy triton`, `serve` and `build` refuse it unless given {ALLOW_FAILED}. Do not deploy it.",
        hint,
    )


def _report_validation(report, path: Path) -> None:
    from .exporters.validate import render

    render(report, console)
    if report.ok:
        flips = f" ({len(report.flips)} float-tie flip(s), named above)" if report.flips else ""
        console.print(f"[green]validated[/]: {escape(str(path))} matches the PyTorch reference{flips}.")


@command()
def check(
    model: Annotated[Path, typer.Argument(help="An exported ONNX file.", show_default=False)],
    target: Annotated[
        list[str],
        typer.Option("--target", "-t", help="tensorrt-8.6, tensorrt-10, dla or onnxruntime; repeat for several."),
    ] = ["tensorrt-10"],  # noqa: B006 - typer reads the default list, never mutates it
) -> None:
    """Static compatibility report (no GPU needed): ops, attributes, dtypes and shapes per target."""
    from .exporters.compat import check_model
    from .exporters.compat import render as render_compat

    failed = []
    for name in target:
        report = check_model(model, name)
        render_compat(report, console)
        if not report.ok:
            failed.append(name)
    if failed:
        raise UserError(f"{model} is not compatible with {', '.join(failed)} (offending nodes listed above).")


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
ReferenceOpt = Annotated[
    str | None,
    typer.Option("--checkpoint", help="Checkpoint for the PyTorch reference, when the one MODEL records has moved."),
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
BenchCalibrationOpt = Annotated[
    Path | None, typer.Option("--calibration", help="int8: a folder of real images to calibrate on, not measured.")
]
BenchCalibrationImagesOpt = Annotated[
    int, typer.Option("--calibration-images", min=1, help="int8: how many images calibrate.")
]
DATA_HELP = (
    "Images in ImageFolder layout (`DIR/<class>/<image>`) for top-1 accuracy, or a flat folder of images (no labels: "
    "scored by agreement with the PyTorch dense model). Files that cannot be decoded are skipped and counted."
)


@command("bench")
def bench_command(
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
    calibration: BenchCalibrationOpt = None,
    calibration_images: BenchCalibrationImagesOpt = 100,
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
    from .bench.report import render
    from .bench.run import Request
    from .bench.run import bench as run_bench

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
    if any(not case.ok for case in result.cases.values()):
        from .errors import ValidationFailed

        raise ValidationFailed(
            "the exported model disagrees with the PyTorch reference beyond float-tie flips (mismatches above); "
            "its figures are written but do not describe a correct export.",
            "Check it with `ats-deploy validate MODEL` and re-export.",
        )


@command("validate")
def validate_command(
    model: Annotated[Path, typer.Argument(help="An ONNX file written by `ats-deploy export`.", show_default=False)],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Images in ImageFolder layout or a flat folder. Default: the scikit-image photos and random images.",
        ),
    ] = None,
    images: Annotated[
        int | None, typer.Option("--images", min=1, help="At most N images (taken in turn from each class).")
    ] = None,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            help="A keep to validate (one value or a per-stage list); repeat for several. "
            "Default: 1.0, 0.87, 0.72, 0.5. A static export is validated at its own keep and batch.",
        ),
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option("--batch", min=1, help="Batch sizes to run; repeat for several (default 1 and 4)."),
    ] = None,
    atol: Annotated[float, typer.Option("--atol", help="Largest accepted |logit difference|.")] = 1e-3,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Check an exported model against the PyTorch reference; exit 1 on any difference that is not a float-tie flip.

    Compares logits, token counts and which patches every stage kept. A difference counts as a flip only when the
    reference, replayed with a near tie resolved the other way, reproduces it. An int8 export is judged by top-1
    agreement against its precision's bar instead (docs/ATS.md). A failed file is marked so that triton, serve and
    build refuse it. For CI pipelines: exit 0 means valid.
    """
    from .exporters.validate import DEFAULT_BATCHES, validate_file

    if not model.is_file():
        raise UserError(f"ONNX file not found: {model}; export one with `ats-deploy export CHECKPOINT --dynamic`.")
    keeps = [parse_keep(text) for text in keep] if keep else None
    report = validate_file(
        model, data=data, limit=images, keeps=keeps, batches=batch or DEFAULT_BATCHES, atol=atol,
        checkpoint=checkpoint, trust=trust_checkpoint, console=err_console,
    )
    _report_validation(report, model)
    _fail_and_mark(report, model)


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


@command("profiles")
def profiles_command() -> None:
    """List the device profiles for --profile: the built-in ones and ./profiles/*.yaml (which win on a name clash).

    A ./profiles/*.yaml file that cannot be read is left out and named in a warning with its problem; the other
    profiles are still listed and the exit status stays 0 (--profile with that name fails with the same message).
    """
    from . import profiles as profiles_package
    from .profiles import scan_profiles

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


@command()
def visualize(
    checkpoint: CheckpointArg,
    image: Annotated[
        str,
        typer.Argument(help="An image file, or skimage:NAME (a scikit-image photo).", show_default=False),
    ],
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            help="Token budget, as elsewhere: one value for all stages or a comma list per stage. Repeat it for "
            "one row per budget: --keep 0.9 --keep 0.5. Default: the checkpoint's keep.",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "-o", "--output", help="PNG to write, or a folder to write it in.", show_default="<image name>-tokens.png"
        ),
    ] = None,
    arch: ArchOpt = None,
    stages: StagesOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Draw which tokens each ATS stage kept (the ATS paper's Fig. 2): rows are keep values, columns ATS stages."""
    from .atomic import output_path
    from .exporters.onnx_export import check_output_path
    from .visualize import figure, open_image, save_png, token_grid

    name = image.split(":", 1)[1] if image.startswith("skimage:") else Path(image).stem
    target = check_output_path(output_path(output, f"{name}-tokens.png"))
    if target.suffix.lower() != ".png":
        raise UserError(f"output {target} must be a .png file.")
    picture = open_image(image)
    model = _load(checkpoint, arch, stages, None, trust_checkpoint)
    keeps = [parse_keep(text) for text in keep] if keep else [model.default_keep]
    grid = token_grid(model, picture, keeps)
    path = save_png(figure(grid, f"{model.arch}: tokens kept per ATS stage, {image}"), target)
    rows, cols = grid.shape
    console.print(f"wrote [bold]{escape(str(path))}[/] ({rows} x {cols} panels: keep values x ATS stages)")


@command()
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
    calibration: BenchCalibrationOpt = None,
    calibration_images: BenchCalibrationImagesOpt = 100,
    class_map: ClassMapOpt = None,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Choose a device's keep values from measurements: a tuned profile, a Pareto plot and a resumable log.

    On the profile's backend and batch, measures top-1 on --data, p50 latency (interleaved with the dense export)
    and GFLOPs for one keep for all stages (1.0 to 0.3), then refines stage by stage around the best. Needs a
    --dynamic export, where keep is an input.
    """
    from .bench.tune import Request, render
    from .bench.tune import tune as run_tune

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


@command()
def build(
    model: Annotated[Path, typer.Argument(help="An ONNX file written by `ats-deploy export`.", show_default=False)],
    profile: Annotated[
        str, typer.Option("--profile", help="A TensorRT profile: jetson, jetson-dla, desktop-gpu, server-gpu, a file.")
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Engine file (default: MODEL stem + .PROFILE.plan).")
    ] = None,
    workspace_mb: Annotated[int, typer.Option("--workspace-mb", min=64, help="Builder workspace in MiB.")] = 2048,
    allow_failed: AllowFailedOpt = False,
) -> None:
    """Build a TensorRT engine (needs TensorRT and an NVIDIA GPU); prints the equivalent trtexec command.

    The batch range (min/opt/max) and precision come from the profile. On a machine
    without TensorRT the trtexec command is still printed, for use on the device. An fp16
    build first writes the fp16 ONNX beside the engine (`<engine stem>.fp16.onnx`, which the
    trtexec command reads) and prints how it agrees with the fp32 ONNX on the CPU. An int8 export
    (`export --precision int8`) is built as it is: explicit quantization from its Q/DQ pairs, strongly typed.
    """
    from .exporters.custom_op import uses_custom_op
    from .exporters.onnx_export import check_output_path
    from .exporters.tensorrt.build import build_engine, write_converted_onnx
    from .exporters.tensorrt.plan import needs_conversion, spec_from
    from .exporters.tensorrt.trtexec import trtexec_command

    if not model.is_file():
        raise UserError(f"ONNX file not found: {model}; export one with `ats-deploy export CHECKPOINT --dynamic`.")
    prof = _profile(profile)
    spec = spec_from(model, prof, output, workspace_mb=workspace_mb, allow_failed=allow_failed)
    check_output_path(spec.engine)
    if spec.precision != prof.precision:
        console.print(f"{escape(str(model))} holds int8 Q/DQ pairs: building an int8 engine from them (strongly "
                      f"typed, float32 elsewhere) rather than profile '{prof.name}''s {prof.precision}; bench it "
                      "under a profile that says `precision: int8`.")
    converted = None
    if uses_custom_op(model):
        console.print("this model holds ats-deploy's AdaptiveTokenSampler nodes: their TensorRT plugin is "
                      "Python (TensorRT >= 10.6), which `ats-deploy build` registers and plain trtexec cannot load.")
    else:
        if needs_conversion(spec, 10):
            keep = prof.keep_for(spec.keep_len) if spec.keep_len else None
            converted = write_converted_onnx(spec, console, keep)
        console.print("[bold]equivalent trtexec command[/] (TensorRT 10):")
        console.print(Text(trtexec_command(spec)), soft_wrap=True, highlight=False)
    engine = build_engine(spec, console, converted)
    console.print(f"built [bold]{escape(str(engine))}[/]")


AllowFailedOpt = Annotated[
    bool,
    typer.Option("--allow-failed-validation", help="Deploy MODEL even though its validation against the PyTorch "
                 "reference failed (the file is marked so; refused otherwise)."),
]
SloMsOpt = Annotated[
    float | None,
    typer.Option("--slo-ms", help="Latency target per request (ms): a front model lowers keep for a while when the "
                 "load would break it and raises it back when the load falls; requests that send keep get theirs."),
]
MinKeepOpt = Annotated[
    float | None, typer.Option("--min-keep", help="With --slo-ms: the lowest keep it may use (default 0.5).")
]
MaxDropOpt = Annotated[
    float | None,
    typer.Option("--max-drop", help="With --slo-ms: the lowest setting is the tune log's cheapest within POINTS of "
                 "the dense model's top-1 (needs a tune log)."),
]
TuneLogOpt = Annotated[
    Path | None,
    typer.Option("--tune-log", help="With --slo-ms: the tune log whose Pareto front is the keep ladder (default: "
                 "the one beside a -tuned profile)."),
]


@command()
def triton(
    model: Annotated[
        Path,
        typer.Argument(
            help="An ONNX file from `ats-deploy export --dynamic`, or a TensorRT engine (.plan/.engine) from "
            "`ats-deploy build` (with the ENGINE.json beside it).",
            show_default=False,
        ),
    ],
    profile: Annotated[
        str, typer.Option("--profile", help="Device profile: its serving section sets batching and instances.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The model repository folder (created if missing).")
    ] = Path("model_repository"),
    name: Annotated[
        str | None, typer.Option("--name", help="Model name in the repository (default: MODEL's file stem).")
    ] = None,
    slo_ms: SloMsOpt = None,
    min_keep: MinKeepOpt = None,
    max_drop: MaxDropOpt = None,
    tune_log: TuneLogOpt = None,
    kserve: Annotated[
        bool, typer.Option("--kserve", help="Also write REPO-kserve/: KServe InferenceService, ServingRuntime (for an "
                           "engine), HPA on Triton's queue time; checked against their schemas.")
    ] = False,
    storage_uri: Annotated[
        str | None, typer.Option("--storage-uri", help="With --kserve: where the repository is uploaded (s3://, "
                                 "gs://, pvc://CLAIM/PATH, ...).", show_default="pvc://NAME-repository")
    ] = None,
    min_replicas: Annotated[int, typer.Option("--min-replicas", min=1, help="With --kserve: fewest replicas.")] = 1,
    max_replicas: Annotated[int, typer.Option("--max-replicas", min=1, help="With --kserve: most replicas.")] = 4,
    allow_failed: AllowFailedOpt = False,
) -> None:
    """Write a Triton Inference Server model repository: NAME/config.pbtxt and NAME/1/model.onnx or model.plan.

    With --slo-ms, NAME is a front model (Python backend) that picks each batch's keep to hold the latency
    target and calls the model, written as NAME_inner (README: "Load-adaptive budgets").

    With --kserve, REPO-kserve/ beside the repository deploys it on Kubernetes (README: "Deploying on
    Kubernetes"); --name then also names the InferenceService, so it must be a Kubernetes name.

    Triton batches requests up to the profile's serving.max_batch_size; keep is an input with one row per
    image, so requests with different budgets share a batch. An existing NAME folder is never overwritten.
    """
    from .serving.repository import docker_command, write
    from .serving.triton_releases import known_release

    prof = _profile(profile)
    slo = _slo(slo_ms, min_keep, max_drop, tune_log)
    deployment = None
    if kserve:  # every object built and checked before anything is written
        from .serving import kserve as deploy

        options = deploy.Options(name, storage_uri, min_replicas, max_replicas)
        deployment = deploy.plan(model, prof, output, options, front=slo is not None, allow_failed=allow_failed)
    if slo is not None:
        from .serving.adaptive import front_shm_flag, write_repository_with_front

        written, front = write_repository_with_front(model, prof, output, name, slo, allow_failed)
        console.print(Text(f"front model {front.name}: SLO {slo.slo_ms:g} ms, keep ladder {front.describe()}"))
        console.print(Text(f"add {front_shm_flag()} to tritonserver's options: the front passes whole batches "
                           "of images to the model (README, \"Load-adaptive budgets\")."), soft_wrap=True)
    else:
        with console.status(f"writing the model repository {escape(str(output))}"):
            written = write(model, prof, output, name, allow_failed)
    config = written.config
    batching = f"batches up to {config.max_batch_size}" if config.max_batch_size else "no batching (static export)"
    console.print(f"wrote [bold]{escape(str(written.folder))}[/]: {config.platform}, {batching}, "
                  f"{config.instance_group[0].count} instance(s) on the {'GPU' if written.on_gpu else 'CPU'}")
    release = known_release(written.source.tensorrt_version)
    if written.source.tensorrt_version:
        console.print(f"the engine needs TensorRT {written.source.tensorrt_version}: " + (
            f"Triton {release} ships it." if release else
            "pick the Triton release that ships it (NVIDIA's frameworks support matrix) for <yy.mm>."))
    console.print("[bold]serve it[/] with NVIDIA's Triton container:")
    console.print(Text(docker_command(output, written.on_gpu, release or "<yy.mm>")), soft_wrap=True, highlight=False)
    if deployment is not None:
        _write_kserve(deployment, output)


def _write_kserve(deployment: serving_kserve.Deployment, repository: Path) -> None:
    """Write ``REPO-kserve/`` and print how to deploy it and reach the endpoint."""
    from .serving import kserve

    folder = kserve.write(deployment)
    console.print(Text(f"wrote {folder}: {', '.join(deployment.files)}; checked against "
                       f"{' and '.join(deployment.checked_against)}"), soft_wrap=True, highlight=False)
    if deployment.triton_release:
        console.print(f"the engine runs in Triton {deployment.triton_release} "
                      f"(nvcr.io/nvidia/tritonserver:{deployment.triton_release}-py3), whose TensorRT built it")
    upload = kserve.upload_hint(deployment.storage_uri, repository)
    steps = [f"upload {repository} to {deployment.storage_uri}: {upload}",
             f"install prometheus-adapter with the rule in {folder / kserve.ADAPTER_FILE}",
             f"kubectl apply -f {folder}",
             f"kubectl port-forward service/{deployment.name}{kserve.PREDICTOR} 8000:80, then ats-deploy loadtest "
             f"localhost:8000 --model-name {deployment.entry_model} --data IMAGES"]
    console.print("[bold]deploy it[/] on Kubernetes:")
    for number, step in enumerate(steps, 1):
        console.print(Text(f"{number}. {step}"), soft_wrap=True, highlight=False)


@command()
def serve(
    model: Annotated[
        Path,
        typer.Argument(help="An ONNX file from `ats-deploy export --dynamic`, or a TensorRT engine from "
                       "`ats-deploy build` (for a TensorRT profile).", show_default=False),
    ],
    profile: Annotated[
        str, typer.Option("--profile", help="Device profile: backend, precision, threads, default keep, batching.")
    ],
    http_port: Annotated[int, typer.Option("--http-port", min=1, max=65535, help="Triton's HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", min=1, max=65535, help="Triton's gRPC port.")] = 8001,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=1, max=65535, help="Triton's Prometheus metrics port.")
    ] = 8002,
    slo_ms: SloMsOpt = None,
    min_keep: MinKeepOpt = None,
    max_drop: MaxDropOpt = None,
    tune_log: TuneLogOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="The address all three ports listen on: 127.0.0.1 serves this machine "
                          "only, 0.0.0.0 every network interface (anyone who reaches a port can run the model).")
    ] = "127.0.0.1",
    allow_failed: AllowFailedOpt = False,
) -> None:
    """Serve MODEL with NVIDIA Triton Inference Server (PyTriton's) until Ctrl-C or SIGTERM.

    Inputs: images FP32 [3, H, W] and, optional, keep FP32 [S] (default: the profile's); outputs logits and
    tokens. Triton's dynamic batcher batches requests with different keep rows together; a request with a bad
    keep gets its own error without failing the others; past the profile's queue bound (serving.max_queue_size,
    serving.queue_timeout_ms) requests are refused at once with 503. Health, readiness and metrics are Triton's.
    """
    from .serving.server import Ports
    from .serving.server import serve as run_server

    run_server(model, profile, Ports(http_port, grpc_port, metrics_port), console,
               _slo(slo_ms, min_keep, max_drop, tune_log), host=host, allow_failed=allow_failed)


def _slo(
    slo_ms: float | None, min_keep: float | None, max_drop: float | None, tune_log: Path | None
) -> serving_adaptive.SloOptions | None:
    """``--slo-ms`` and its floor options as the serving layer's options; None without --slo-ms."""
    from .serving.adaptive import SloOptions

    if slo_ms is None:
        given = [flag for flag, value in (("--min-keep", min_keep), ("--max-drop", max_drop),
                                          ("--tune-log", tune_log)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} sets the load-adaptive keep, which needs --slo-ms.",
                            hint="Add --slo-ms MS (the latency target), e.g. --slo-ms 100.")
        return None
    return SloOptions(slo_ms, min_keep, max_drop, tune_log)


@command()
def loadtest(
    url: Annotated[
        str,
        typer.Argument(help="The Triton server: host:port (HTTP, e.g. localhost:8000) or grpc://host:port.",
                       show_default=False),
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="Images in ImageFolder layout (`DIR/<class>/<image>`, wnid folders map to "
                     "ImageNet indices) for top-1 accuracy, or a flat folder of images (no accuracy)."),
    ],
    concurrency: Annotated[
        str | None,
        typer.Option("--concurrency", help="Closed loop: requests in flight, one level each, e.g. 1,4,16."),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option("--rate", help="Open loop: Poisson arrivals per second, one level each, e.g. 20,40. Latency "
                     "runs from each request's scheduled arrival, so overload shows as growing latency."),
    ] = None,
    duration: Annotated[float, typer.Option("--duration", help="Seconds per level.")] = 10.0,
    keep: Annotated[
        str | None,
        typer.Option("--keep", help="Keeps to mix, comma-separated (each request picks one), e.g. 0.5,0.7,1.0; a "
                     "per-stage keep joins its values with ':'. Default: none sent (the server's default)."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per request.")] = 1,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds after which a request counts as timed out.")
    ] = 10.0,
    images: Annotated[int | None, typer.Option("--images", min=1, help="At most N images of --data.")] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="The served model (default: the server's only model).")
    ] = None,
    model_file: Annotated[
        Path | None,
        typer.Option("--model", help="The exported file the server serves, for its pre-processing and --verify "
                     "(default: the server's model config, else timm's defaults)."),
    ] = None,
    verify: Annotated[
        int, typer.Option("--verify", min=0, help="Compare N answers with the PyTorch reference; exit 1 on a "
                          "mismatch that is not a float-tie flip.")
    ] = 0,
    step_seconds: Annotated[
        float | None,
        typer.Option("--step-seconds", help="The --rate values become one schedule: each rate for this many "
                     "seconds, in turn, repeated to fill --duration (bursts: --rate 40,110 --step-seconds 10 "
                     "--duration 60); reported per step."),
    ] = None,
    trace: Annotated[
        Path | None,
        typer.Option("--trace", help="Send at the arrival times in FILE (seconds from the start, one per line); "
                     "reported in windows of --step-seconds (default 10)."),
    ] = None,
    slo_ms: Annotated[
        float | None,
        typer.Option("--slo-ms", help="Report SLO attainment: the share of requests sent answered without error "
                     "within MS of their scheduled arrival, per step and overall (errors and refusals miss)."),
    ] = None,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Folder for results.json, results.csv and the latency-throughput plot.",
                     show_default="./results/<time>-loadtest/"),
    ] = None,
    max_error_rate: Annotated[
        float, typer.Option("--max-error-rate", help="Exit 1 when a larger share of requests fails (errors, not "
                            "timeouts), e.g. 0.05; the figures are printed and written first.")
    ] = 0.01,
) -> None:
    """Load a Triton server serving an ATS model: throughput, latency percentiles, errors, kept tokens, top-1.

    Closed loop (--concurrency) and open loop (--rate) levels run for --duration seconds each, on the images of
    --data pre-processed as the export says, with keep mixed per request (--keep).
    """
    from .serving.loadtest import Request, check_errors
    from .serving.loadtest import loadtest as run_loadtest
    from .serving.loadtest_report import render

    request = Request(
        url=url, data=data, concurrency=concurrency, rate=rate, duration=duration, keep=keep, batch=batch,
        timeout=timeout, images=images, model_name=model_name, model_file=model_file, verify=verify,
        checkpoint=checkpoint, trust_checkpoint=trust_checkpoint, output=output,
        step_seconds=step_seconds, trace=trace, slo_ms=slo_ms, max_error_rate=max_error_rate,
    )
    result, files = run_loadtest(request, err_console, show=lambda measured: render(measured, console))
    console.print(Text(f"wrote {files[0].parent}/: {', '.join(p.name for p in files)}"), highlight=False)
    check_errors(result, max_error_rate)
    if result.verification is not None and not result.verification.ok:
        from .errors import ValidationFailed

        raise ValidationFailed("the served model disagrees with the PyTorch reference beyond float-tie flips "
                               "(mismatches above).", "Check the served file with `ats-deploy validate MODEL`.")


def _interrupted() -> NoReturn:
    """Ctrl-C: one line and the shell's exit status for SIGINT (128 + 2), no traceback."""
    err_console.print("[yellow]interrupted[/]")
    raise SystemExit(130)


def main() -> None:
    """The ``ats-deploy`` entry point: Ctrl-C outside a command (typer building the CLI, say) is one line too."""
    try:
        app()
    except KeyboardInterrupt:
        _interrupted()
