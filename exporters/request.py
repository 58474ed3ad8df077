"""What ``ats-deploy export`` will do, settled before any work: the model, the output file and the options.

Everything a user can get wrong (flag combinations, an unwritable output, a bad
keep, an unknown profile) fails here, before the checkpoint is traced; the CLI
only parses, calls :func:`plan`, :func:`~.onnx_export.export` and :func:`validate_export`, and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ats_deploy import precision as precisions
from ats_deploy.atomic import output_path
from ats_deploy.errors import UserError
from ats_deploy.keep import Keep, format_keep, per_stage

from .onnx_export import ATS_OPS, EXPORTERS, OPSET, ExportOptions, check_output_path
from .precisions.int8 import DEFAULT_IMAGES, Calibration

# What an export writes: float32, or a precision made at export (INT8 Q/DQ, calibrated); fp16 is converted at build.
EXPORT_PRECISIONS = tuple(name for name in precisions.names() if precisions.get(name).stage != "build")

if TYPE_CHECKING:
    from rich.console import Console

    from ats_deploy.model import ATSVisionTransformer
    from ats_deploy.profiles import Profile

    from .compare import Report


@dataclass
class ExportRequest:
    """What the user asked for; ``None`` means "from the profile, else the checkpoint's default"."""

    checkpoint: str
    output: str | Path | None = None  # as typed: "models/" (a folder) must keep its slash
    dynamic: bool = False
    keep: list[float] | None = None
    profile: Profile | None = None
    batch: int | None = None
    exporter: str = "torchscript"
    arch: str | None = None
    stages: str | None = None
    img_size: int | None = None
    ats_op: str = "subgraph"
    opset: int = OPSET
    trust_checkpoint: bool = False
    precision: str = "fp32"
    calibration: Path | None = None  # int8: the folder of real images to calibrate on
    calibration_images: int = DEFAULT_IMAGES
    validation_data: Path | None = None  # validate on this folder's images instead of the default ones


@dataclass
class ExportPlan:
    """The loaded model, the checked output path, the options, and notes worth saying before the export."""

    model: ATSVisionTransformer
    output: Path
    options: ExportOptions
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.options.dynamic:
            return "dynamic (batch and keep are inputs)"
        return f"static (batch {self.options.batch}, keep baked in)"


def check_flags(request: ExportRequest) -> None:
    """Refuse contradictory or unknown flags before anything is loaded."""
    if request.exporter not in EXPORTERS:
        raise UserError(f"unknown --exporter '{request.exporter}'; choose one of: {', '.join(EXPORTERS)}.")
    if request.ats_op not in ATS_OPS:
        raise UserError(f"unknown --ats-op '{request.ats_op}'; choose one of: {', '.join(ATS_OPS)}.")
    if request.ats_op == "custom" and request.exporter != "torchscript":
        raise UserError("--ats-op custom needs --exporter torchscript (its tracing writes the sampler node).")
    if request.batch is not None and request.batch < 1:
        raise UserError(f"--batch must be at least 1, got {request.batch}.")
    if request.batch is not None and request.dynamic:
        raise UserError("--batch fixes the batch of a static export; with --dynamic the batch is a run-time input.")
    check_precision(request)
    if request.validation_data is not None and not Path(request.validation_data).is_dir():
        raise UserError(
            f"--validation-data {request.validation_data} is not a folder; give a folder of real images "
            "(ImageFolder or flat)."
        )
    if request.output is not None:  # the file's own name, when output is a folder, is settled after loading
        check_output_path(output_path(request.output, "model.onnx"))


def check_precision(request: ExportRequest) -> None:
    """INT8 needs the dynamic subgraph export and real images to calibrate on; fp32 takes none."""
    if request.precision not in EXPORT_PRECISIONS:
        raise UserError(
            f"export writes --precision {' or '.join(EXPORT_PRECISIONS)}, not '{request.precision}'.",
            hint="fp16 is converted from the fp32 export by `ats-deploy build` (profile precision: fp16).",
        )
    name = request.precision
    if precisions.get(name).stage is None:
        if request.calibration is not None:
            calibrated = " or ".join(n for n in EXPORT_PRECISIONS if precisions.get(n).made_at_export)
            raise UserError(f"--calibration is for --precision {calibrated}; an {name} export needs no calibration "
                            "images.")
        return
    if not request.dynamic:
        raise UserError(f"--precision {name} quantizes the --dynamic export only; add --dynamic (not --static).")
    if request.ats_op == "custom":
        raise UserError(
            f"--precision {name} needs --ats-op subgraph: the custom sampler node would hide the sampling path "
            "that must stay float32."
        )
    if request.calibration is None:
        raise UserError(f"--precision {name} needs --calibration DIR: a folder of real images (ImageFolder or flat).")
    calibration_of(request).check()


def calibration_of(request: ExportRequest) -> Calibration | None:
    """The INT8 calibration the request asks for; ``None`` for fp32."""
    if not precisions.get(request.precision).made_at_export or request.calibration is None:
        return None
    return Calibration(Path(request.calibration), images=request.calibration_images)


def default_name(checkpoint: str, arch: str, options: ExportOptions) -> Path:
    """One name per export kind, so a static or custom-op export never replaces the dynamic one.

    ``deit_s_ats.onnx`` (dynamic), ``deit_s_ats.custom-op.onnx``, ``deit_s_ats.static-b1-k0.7.onnx``,
    ``deit_s_ats.int8.onnx``.
    """
    stem = f"{arch}_ats" if checkpoint.startswith("random:") else Path(checkpoint).stem
    kind = "" if options.dynamic else f".static-b{options.batch}-k{format_keep(options.keep or [])}"
    op = ".custom-op" if options.ats_op == "custom" else ""
    precision = "" if precisions.get(options.precision).stage is None else f".{options.precision}"
    return Path(f"{stem}{kind}{op}{precision}.onnx")


def source_of(model: ATSVisionTransformer, checkpoint: str) -> tuple[str, str]:
    """What export records so that bench can rebuild the reference: the checkpoint's path and sha256.

    Random weights (no file) are recorded as the ``random:SEED`` they were made from.
    """
    from ats_deploy.checkpoints import sha256_file

    if model.source is None:
        return checkpoint, ""
    path = model.source.resolve()
    return str(path), sha256_file(path)


def plan(request: ExportRequest) -> ExportPlan:
    """Load the model and settle keep, batch, options and the output path (checked for writing)."""
    from ats_deploy.checkpoints import load_model
    from ats_deploy.model import with_input_size

    check_flags(request)
    model = load_model(
        request.checkpoint, arch=request.arch, stages=request.stages, trust_code=request.trust_checkpoint
    )
    if request.img_size is not None:
        model = with_input_size(model, request.img_size)
    stages, profile = len(model.stages), request.profile
    keep = request.keep if request.keep is not None else profile.keep_for(stages) if profile else None
    keep = per_stage(keep or model.default_keep, stages)
    batch = request.batch or (profile.batch if profile is not None and not request.dynamic else 1)
    source, sha = source_of(model, request.checkpoint)
    options = ExportOptions(
        dynamic=request.dynamic, exporter=request.exporter, batch=batch, keep=keep, source=source,
        source_sha256=sha, ats_op=request.ats_op, opset=request.opset, calibration=calibration_of(request),
    )
    if options.calibration is not None:
        from .precisions.int8 import calibration_files

        calibration_files(options.calibration, model.num_classes)  # a missing or short folder fails before tracing
    output = check_output_path(output_path(request.output, default_name(request.checkpoint, model.arch, options)))
    notes = [*model.load_notes, *(Keep.parse(keep).notes(model.n0, model.prefix_tokens) if keep else [])]
    return ExportPlan(model, output, options, notes)


def validate_export(request: ExportRequest, planned: ExportPlan, path: Path, atol: float, console: Console) -> Report:
    """Validate ``path`` right after :func:`plan`'s export wrote it, on the inputs its precision is judged on.

    int8 (calibrated) is judged by agreement on held-out images at the reduced keeps and batches; fp32 patch for
    patch on ``--validation-data`` (else the scikit-image photos) at the profile's keep, else the default keeps
    (docs/ATS.md). The file stays on disk either way: an interrupt says that it is written but not validated.
    """
    from ats_deploy.errors import Interrupted

    from . import validate as checks

    model, data, profile = planned.model, request.validation_data, request.profile
    stages = len(model.stages)
    if planned.options.calibration is not None:
        names, images = checks.held_out_inputs(model, planned.options.calibration, data, console)
        keeps = [[k] * stages for k in checks.REDUCED_KEEPS]
        batches = tuple(b for b in checks.REDUCED_BATCHES if b <= len(images)) or (1,)  # every case sees images
    else:
        if data is not None:
            names, images = checks.folder_inputs(model, data, checks.HELD_OUT_IMAGES, console)
        else:
            names, images = checks.default_inputs(model)
        keeps = [profile.keep_for(stages)] if profile is not None else [[k] * stages for k in checks.DEFAULT_KEEPS]
        batches = checks.DEFAULT_BATCHES
    try:
        return checks.validate(str(path), model, names, images, keeps, batches, atol=atol, console=console)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during validation: {path} is written in full but NOT validated.",
            f"Validate it with `ats-deploy validate {path}` before you use it, or export again.",
        ) from None
