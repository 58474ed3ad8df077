"""``ats-deploy bench``: find the model, rebuild its reference, run every variant on the same images, report.

:func:`plan` settles everything a user can get wrong (profile, backend, output
folder, model, keep, data) in seconds, before :func:`bench` loads the reference,
exports the dense baseline or times anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ats_deploy.errors import UserError
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.flops import CostModel
from ats_deploy.images import data_config
from ats_deploy.model import ATSVisionTransformer, build, validate_keep
from ats_deploy.profiles import BACKENDS, Profile, load_profile

from . import machine, report, runners
from .data import ImageFolder, SampleImages, Skipped, folder_batches, image_folder, sample_batches
from .evaluate import Evaluation, evaluate
from .results import BenchResult, VariantResult
from .source import Exported, check_engine, check_static, engine_for, find_model, open_model, reference
from .timing import Latency, interleaved
from .variants import EXPORTED_ATS, EXPORTED_DENSE, PYTORCH_ATS, PYTORCH_DENSE, Variant

DEFAULT_SAMPLE_IMAGES = 16
# Largest |logit difference| the exported model may show before a token-identical image counts as a mismatch.
ATOL = {"fp32": 1e-3, "fp16": 5e-2}
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt")


@dataclass
class Request:
    """What the user asked for on the command line."""

    profile: str
    model: Path | None = None
    data: Path | None = None
    images: int | None = None
    keep: list[float] | None = None
    backend: str | None = None
    out: Path | None = None
    class_map: Path | None = None
    checkpoint: str | None = None
    trust_checkpoint: bool = False


@dataclass
class Plan:
    """What will be measured, where, on which images, and where the results go: all checked."""

    request: Request
    profile: Profile
    backend: str
    folder: Path
    exported: Exported
    measured: Path  # the file the exported variants run: the model, or the engine built from it
    keep: list[float]
    keep_origin: str
    data: ImageFolder | SampleImages
    warnings: list[str] = field(default_factory=list)

    @property
    def precision(self) -> str:
        """The profile's precision on GPU backends; the CPU and PyTorch paths run fp32."""
        return self.profile.precision if self.backend in GPU_BACKENDS else "fp32"


def resolve_backend(override: str | None, profile: Profile) -> str:
    if override is None:
        return profile.backend
    if override not in BACKENDS:
        raise UserError(f"unknown --backend '{override}'; choose one of: {', '.join(BACKENDS)}.")
    return override


def check_folder(folder: Path, option: str) -> None:
    """Fail before any work when ``folder`` cannot be created or written in, as ``check_output_path`` does for files.

    The folder need not exist yet: its nearest existing ancestor must then be a folder we may write in.
    """
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: {existing} is a file, not a folder; choose another {option}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {existing}: permission denied; choose another {option}.")


def output_folder(out: Path | None, profile: str) -> Path:
    """``--out``, or a new ``./results/<timestamp>-<profile>/``."""
    if out is not None:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder for results.json, results.csv and the plots.")
        return out
    base = Path("results") / f"{time.strftime('%Y%m%d-%H%M%S')}-{profile}"
    folder, count = base, 1
    while folder.exists():
        count += 1
        folder = base.with_name(f"{base.name}-{count}")
    return folder


def _keep(request: Request, profile: Profile, stages: int) -> tuple[list[float], str]:
    if request.keep is not None:
        return validate_keep(request.keep, stages), "--keep"
    return validate_keep(profile.keep_for(stages), stages), f"profile '{profile.name}'"


def _measured_file(exported: Exported, profile: Profile, backend: str) -> Path:
    """The file the exported variants run: the model itself, or (tensorrt, ONNX model) its built engine."""
    if exported.is_engine:
        if backend != "tensorrt":
            raise UserError(
                f"{exported.path} is a TensorRT engine, which only the tensorrt backend runs (not {backend}).",
                hint="Bench the ONNX file it was built from for other backends.",
            )
        check_engine(exported, profile)
        return exported.path
    if backend == "tensorrt":
        return engine_for(exported, profile)
    return exported.path


def _data(request: Request, num_classes: int) -> ImageFolder | SampleImages:
    if request.data is not None:
        return image_folder(request.data, num_classes, request.class_map, request.images)
    if request.class_map is not None:
        raise UserError("--class-map maps the class folders of --data; give --data DIR too.")
    return SampleImages(request.images or DEFAULT_SAMPLE_IMAGES)


def plan(request: Request, check_model: Callable[[Exported], None] | None = None) -> Plan:
    """Check the request against the profile, the machine, the model and the data.

    ``check_model`` adds a caller's own checks of the model, run before bench's (tune needs a dynamic export).
    """
    profile = load_profile(request.profile)
    backend = resolve_backend(request.backend, profile)
    runners.require(backend, profile.name, overridden=request.backend is not None)
    folder = output_folder(request.out, profile.name)
    exported = open_model(request.model or find_model(Path.cwd()))
    if check_model is not None:
        check_model(exported)
    measured = _measured_file(exported, profile, backend)
    keep, keep_origin = _keep(request, profile, len(exported.stages))
    check_static(exported, keep, keep_origin, profile)
    data = _data(request, exported.num_classes)
    result = Plan(request, profile, backend, folder, exported, measured, keep, keep_origin, data)
    cores = usable_cores()
    if profile.threads and profile.threads > cores:
        result.warnings.append(
            f"profile '{profile.name}' asks for {profile.threads} threads, and this process may use {cores} CPU "
            "cores: the threads share cores and the latencies measure that. Set `threads:` in the profile to at "
            "most the core count."
        )
    return result


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container may limit), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def print_warnings(warnings: list[str], status: Console) -> None:
    """Say the plan's warnings before measuring, when the user can still stop and fix them; the report repeats them."""
    for warning in warnings:
        status.print(f"[yellow]warning:[/] {warning}", highlight=False)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def exported_runners(
    plan: Plan, dense: ATSVisionTransformer, workdir: Path, status: Console
) -> tuple[runners.Runner, runners.Runner]:
    """Runners of the exported ATS model and of the dense baseline, exported (and built) the same way."""
    exported = plan.exported
    options = ExportOptions(dynamic=exported.dynamic, batch=exported.batch or 1)
    with status.status("exporting the dense baseline (the same network without token sampling)"):
        dense_onnx = export(dense, workdir / "dense.onnx", options)
    if plan.backend == "tensorrt":
        from ats_deploy.exporters.tensorrt import build_engine, spec_from

        # The ATS engine's timing cache lets the dense build reuse its kernel timings.
        cache = plan.measured.with_name(f"{plan.profile.name}.timing.cache")
        spec = replace(spec_from(dense_onnx, plan.profile, output=workdir), timing_cache=cache)
        return runners.EngineRunner(plan.measured), runners.EngineRunner(build_engine(spec, status))
    threads = plan.profile.threads
    return (
        runners.OnnxRuntimeRunner(plan.measured, plan.backend, plan.precision, threads, workdir),
        runners.OnnxRuntimeRunner(dense_onnx, plan.backend, plan.precision, threads, workdir),
    )


def _variants(plan: Plan, model: ATSVisionTransformer, workdir: Path, status: Console) -> dict[str, Variant]:
    dense = build(model.vit, model.arch, stages=[])
    cost, dense_cost = CostModel.of(model), CostModel.of(dense)
    keep, none = torch.tensor(plan.keep, dtype=torch.float32), torch.zeros(0)
    torch_label = runners.TorchRunner.label
    variants = {
        PYTORCH_DENSE: Variant(PYTORCH_DENSE, runners.TorchRunner(dense), torch_label, none, dense_cost),
        PYTORCH_ATS: Variant(PYTORCH_ATS, runners.TorchRunner(model), torch_label, keep, cost),
    }
    if plan.backend == "pytorch":
        return variants
    ats, baseline = exported_runners(plan, dense, workdir, status)
    label = runners.LABELS[plan.backend]
    variants[EXPORTED_DENSE] = Variant(EXPORTED_DENSE, baseline, label, none, dense_cost)
    variants[EXPORTED_ATS] = Variant(EXPORTED_ATS, ats, label, keep, cost)
    return variants


def _accuracy_pass(
    plan: Plan, model: ATSVisionTransformer, variants: dict[str, Variant], skipped: Skipped, status: Console
) -> Evaluation:
    config, batch, data = data_config(model.vit), plan.profile.batch, plan.data
    if isinstance(data, ImageFolder):
        total, batches = len(data.files), folder_batches(data, config, batch, skipped)
    else:
        total, batches = data.count, sample_batches(data, config, batch)
    with Progress(console=status, transient=True) as progress:
        task = progress.add_task(f"accuracy: {len(variants)} variants", total=total)
        counted = [0]  # skipped files counted so far, so that progress covers them too

        def advance(images: int) -> None:
            progress.advance(task, images + len(skipped) - counted[0])
            counted[0] = len(skipped)

        return evaluate(batches, model, variants, batch, ATOL[plan.precision], advance)


def _latency_pass(
    plan: Plan, variants: dict[str, Variant], evaluation: Evaluation, status: Console
) -> dict[str, Latency]:
    inputs, profile = evaluation.timing_inputs, plan.profile
    calls: dict[str, Callable[[int], object]] = {
        key: (lambda round_, v=variant: v(inputs[round_ % len(inputs)])) for key, variant in variants.items()
    }
    with Progress(console=status, transient=True) as progress:
        rounds = profile.warmup + profile.iterations
        task = progress.add_task(f"latency: {len(calls)} variants interleaved, batch {profile.batch}", total=rounds)
        return interleaved(calls, profile.batch, profile.warmup, profile.iterations, lambda: progress.advance(task))


def _variant_results(
    variants: dict[str, Variant], evaluation: Evaluation, latencies: dict[str, Latency]
) -> list[VariantResult]:
    results = []
    for key, variant in variants.items():
        tally = evaluation.tallies[key]
        tokens = tally.all_tokens()
        gflops = float(variant.cost.gflops(tokens).mean())
        results.append(VariantResult(key, variant.runtime, tally.accuracy, gflops, tokens, latencies[key]))
    return results


def _data_summary(data: ImageFolder | SampleImages, evaluation: Evaluation, skipped: Skipped) -> dict:
    return {
        "source": data.describe(),
        "labelled": isinstance(data, ImageFolder),
        "labels": data.labelling if isinstance(data, ImageFolder) else None,
        "images": evaluation.images,
        "skipped_corrupt": len(skipped),
        "skipped_files": [{"file": name, "reason": reason} for name, reason in skipped.files],
    }


def bench(request: Request, status: Console) -> tuple[BenchResult, list[Path]]:
    """Run the bench of ``request``; progress and notices go to ``status``. Returns the result and files written."""
    checked = plan(request)
    check_folder(checked.folder, "--out")  # here, not in plan: tune plans too, and writes no results folder
    print_warnings(checked.warnings, status)
    with status.status("loading the PyTorch reference"):
        model = reference(checked.exported, request.checkpoint, request.trust_checkpoint, checked.warnings)
    skipped = Skipped()
    threads = checked.profile.threads or torch.get_num_threads()
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="ats-bench-") as workdir:
        variants = _variants(checked, model, Path(workdir), status)
        evaluation = _accuracy_pass(checked, model, variants, skipped, status)
        latencies = _latency_pass(checked, variants, evaluation, status)
        environment = machine.describe(checked.profile.threads)
    source = request.checkpoint or checked.exported.meta.get("source_checkpoint", "")
    result = BenchResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={**checked.exported.summary(), "measured_file": str(checked.measured), "reference_checkpoint": source},
        profile=checked.profile,
        backend=checked.backend,
        precision=checked.precision,
        keep=checked.keep,
        keep_origin=checked.keep_origin,
        data=_data_summary(checked.data, evaluation, skipped),
        accuracy_metric=checked.data.metric,
        variants=_variant_results(variants, evaluation, latencies),
        comparison=evaluation.case,
        environment=environment,
        warnings=checked.warnings,
    )
    return result, report.write(result, checked.folder)
