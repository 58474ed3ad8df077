"""Commands that write and check exported files: export, validate, check, build."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .. import precision as precisions
from ..errors import UserError
from ..exporters import compat
from .common import (
    AllowFailedOpt,
    ArchOpt,
    CheckpointArg,
    KeepOpt,
    ProfileOpt,
    ReferenceOpt,
    StagesOpt,
    TrustOpt,
    console,
    err_console,
    parse_keep,
    print_notes,
    require_onnx,
    user_errors,
)

FP32_TOLERANCE = precisions.get("fp32").tolerance  # --atol's default: float32 is compared patch for patch


@user_errors
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
    atol: Annotated[float, typer.Option("--atol", help="Largest accepted |logit difference|.")] = FP32_TOLERANCE,
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

    from ..exporters.onnx_export import export as run_export
    from ..exporters.request import ExportRequest, plan, validate_export
    from ..exporters.validate import check_validated
    from ..profiles import load_profile

    request = ExportRequest(
        checkpoint=checkpoint, output=output, dynamic=dynamic, keep=parse_keep(keep), batch=batch,
        exporter=exporter, arch=arch, stages=stages, img_size=img_size, ats_op=ats_op, opset=opset,
        trust_checkpoint=trust_checkpoint, profile=load_profile(profile) if profile else None,
        precision=precision, calibration=calibration, calibration_images=calibration_images,
        validation_data=validation_data,
    )
    planned = plan(request)
    print_notes(planned.notes)
    start = time.perf_counter()
    with console.status(f"exporting {planned.model.arch} with the {exporter} exporter"):
        path = run_export(planned.model, planned.output, planned.options)
    console.print(
        f"exported [bold]{escape(str(path))}[/] ({path.stat().st_size / 1e6:.1f} MB, {planned.kind}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if validate_:
        report = validate_export(request, planned, path, atol, err_console)
        _report_validation(report, path)
        check_validated(report, path, "Re-export with the other --exporter (int8: calibrate on more real images), "
                        "or report the mismatch with this output.")


def _report_validation(report, path: Path) -> None:
    from ..exporters.validate import render

    render(report, console)
    if report.ok:
        flips = f" ({len(report.flips)} float-tie flip(s), named above)" if report.flips else ""
        console.print(f"[green]validated[/]: {escape(str(path))} matches the PyTorch reference{flips}.")


@user_errors
def validate(
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
    atol: Annotated[float, typer.Option("--atol", help="Largest accepted |logit difference|.")] = FP32_TOLERANCE,
    checkpoint: ReferenceOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Check an exported model against the PyTorch reference; exit 1 on any difference that is not a float-tie flip.

    Compares logits, token counts and which patches every stage kept. A difference counts as a flip only when the
    reference, replayed with a near tie resolved the other way, reproduces it. An int8 export is judged by top-1
    agreement against its precision's bar instead (docs/ATS.md). A failed file is marked so that triton, serve and
    build refuse it. For CI pipelines: exit 0 means valid.
    """
    from ..exporters.validate import DEFAULT_BATCHES, check_validated, validate_file

    require_onnx(model)
    keeps = [parse_keep(text) for text in keep] if keep else None
    report = validate_file(
        model, data=data, limit=images, keeps=keeps, batches=batch or DEFAULT_BATCHES, atol=atol,
        checkpoint=checkpoint, trust=trust_checkpoint, console=err_console,
    )
    _report_validation(report, model)
    check_validated(report, model)


@user_errors
def check(
    model: Annotated[Path, typer.Argument(help="An exported ONNX file.", show_default=False)],
    target: Annotated[
        list[str],
        typer.Option(
            "--target", "-t", help=f"{', '.join(compat.names()[:-1])} or {compat.names()[-1]}; repeat for several."
        ),
    ] = ["tensorrt-10"],  # noqa: B006 - typer reads the default list, never mutates it
) -> None:
    """Static compatibility report (no GPU needed): ops, attributes, dtypes and shapes per target."""
    from ..exporters.compat.report import render as render_compat

    failed = []
    for name in target:
        report = compat.check_model(model, name)
        render_compat(report, console)
        if not report.ok:
            failed.append(name)
    if failed:
        raise UserError(f"{model} is not compatible with {', '.join(failed)} (offending nodes listed above).")


@user_errors
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
    from ..exporters.tensorrt.build import build_for_profile
    from ..profiles import load_profile

    require_onnx(model)
    engine = build_for_profile(model, load_profile(profile), output, console, workspace_mb=workspace_mb,
                               allow_failed=allow_failed)
    console.print(f"built [bold]{escape(str(engine))}[/]")
