"""``ats-deploy bench``: find the model, rebuild its reference, run every variant on the same images, report.

The order is chosen so that every mistake a user can make (profile, backend,
output folder, model, keep, data) fails in seconds, before the reference is
loaded, a dense baseline exported or anything timed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.profiles import BACKENDS, Profile, load_profile
from rich.console import Console
from rich.progress import Progress

from ats_deploy.errors import UserError
from ats_deploy.flops import CostModel
from ats_deploy.images import data_config
from ats_deploy.model import ATSVisionTransformer, build, validate_keep

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


def resolve_backend(override: str | None, profile: Profile) -> str:
    if override is None:
        return profile.backend
    if override not in BACKENDS:
        raise UserError(f"unknown --backend '{override}'; choose one of: {', '.join(BACKENDS)}.")
    return override


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


def _precision(backend: str, profile: Profile) -> str:
    """The profile's precision on GPU backends; the CPU and PyTorch paths run fp32."""
    return profile.precision if backend in GPU_BACKENDS else "fp32"


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _measured_file(exported: Exported, profile: Profile, backend: str) -> Path:
    """The file the exported variant runs: the model itself, or (tensorrt, ONNX model) its built engine."""
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


def _exported_variants(
    dense: ATSVisionTransformer, exported: Exported, measured: Path, profile: Profile, backend: str,
    precision: str, workdir: Path, status: Console,
) -> tuple[runners.Runner, runners.Runner]:
    """Runners of the exported ATS model and of the dense baseline, exported (and built) the same way."""
    options = ExportOptions(dynamic=exported.dynamic, batch=exported.batch or 1)
    with status.status("exporting the dense baseline (the same network without token sampling)"):
        dense_onnx = export(dense, workdir / "dense.onnx", options)
    if backend == "tensorrt":
        from ats_deploy.exporters.tensorrt import build_engine, spec_from

        # The ATS engine's timing cache makes the dense build reuse its kernel timings.
        cache = measured.with_name(f"{profile.name}.timing.cache")
        spec = replace(spec_from(dense_onnx, profile, output=workdir), timing_cache=cache)
        dense_engine = build_engine(spec, status)
        return runners.EngineRunner(measured), runners.EngineRunner(dense_engine)
    ats = runners.OnnxRuntimeRunner(measured, backend, precision, profile.threads, workdir)
    return ats, runners.OnnxRuntimeRunner(dense_onnx, backend, precision, profile.threads, workdir)


def _variants(
    model: ATSVisionTransformer, keep: list[float], exported: Exported, measured: Path, profile: Profile,
    backend: str, precision: str, workdir: Path, status: Console,
) -> dict[str, Variant]:
    dense = build(model.vit, model.arch, stages=[])
    cost, dense_cost = CostModel.of(model), CostModel.of(dense)
    keep_t, none = torch.tensor(keep, dtype=torch.float32), torch.zeros(0)
    torch_label = runners.TorchRunner.label
    variants = {
        PYTORCH_DENSE: Variant(PYTORCH_DENSE, runners.TorchRunner(dense), torch_label, none, dense_cost),
        PYTORCH_ATS: Variant(PYTORCH_ATS, runners.TorchRunner(model), torch_label, keep_t, cost),
    }
    if backend == "pytorch":
        return variants
    ats, baseline = _exported_variants(dense, exported, measured, profile, backend, precision, workdir, status)
    variants[EXPORTED_DENSE] = Variant(EXPORTED_DENSE, baseline, runners.LABELS[backend], none, dense_cost)
    variants[EXPORTED_ATS] = Variant(EXPORTED_ATS, ats, runners.LABELS[backend], keep_t, cost)
    return variants


def _data(request: Request, num_classes: int) -> ImageFolder | SampleImages:
    if request.data is not None:
        return image_folder(request.data, num_classes, request.class_map, request.images)
    if request.class_map is not None:
        raise UserError("--class-map maps the class folders of --data; give --data DIR too.")
    return SampleImages(request.images or DEFAULT_SAMPLE_IMAGES)


def _accuracy_pass(
    data: ImageFolder | SampleImages, model: ATSVisionTransformer, variants: dict[str, Variant],
    profile: Profile, precision: str, skipped: Skipped, status: Console,
) -> Evaluation:
    config = data_config(model.vit)
    if isinstance(data, ImageFolder):
        total, batches = len(data.files), folder_batches(data, config, profile.batch, skipped)
    else:
        total, batches = data.count, sample_batches(data, config, profile.batch)
    with Progress(console=status, transient=True) as progress:
        task = progress.add_task(f"accuracy: {len(variants)} variants", total=total)
        seen = [0]

        def advance(count: int) -> None:
            progress.advance(task, count + len(skipped) - seen[0])
            seen[0] = len(skipped)

        evaluation = evaluate(batches, model, variants, profile.batch, ATOL[precision], advance)
    if evaluation.images == 0:
        first = f" (first: {skipped.files[0][0]}: {skipped.files[0][1]})" if len(skipped) else ""
        raise UserError(f"none of the {total} image files of {data.describe()} could be read{first}.")
    return evaluation


def _latency_pass(
    variants: dict[str, Variant], evaluation: Evaluation, profile: Profile, status: Console
) -> dict[str, Latency]:
    inputs = evaluation.timing_inputs
    calls: dict[str, Callable[[int], object]] = {
        key: (lambda round_, v=variant: v(inputs[round_ % len(inputs)])) for key, variant in variants.items()
    }
    with Progress(console=status, transient=True) as progress:
        rounds = profile.warmup + profile.iterations
        task = progress.add_task(f"latency: {len(calls)} variants interleaved, batch {profile.batch}", total=rounds)
        return interleaved(calls, profile.batch, profile.warmup, profile.iterations, lambda: progress.advance(task))


def _data_summary(data: ImageFolder | SampleImages, evaluation: Evaluation, skipped: Skipped) -> dict:
    labelled = isinstance(data, ImageFolder)
    return {
        "source": data.describe(),
        "labelled": labelled,
        "labels": data.labelling if labelled else None,
        "images": evaluation.images,
        "skipped_corrupt": len(skipped),
        "skipped_files": [{"file": name, "reason": reason} for name, reason in skipped.files],
    }


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


def bench(request: Request, status: Console) -> tuple[BenchResult, list[Path]]:
    """Run the bench of ``request``; progress and notices go to ``status``. Returns the result and files written."""
    profile = load_profile(request.profile)
    backend = resolve_backend(request.backend, profile)
    runners.require(backend, profile.name, overridden=request.backend is not None)
    folder = output_folder(request.out, profile.name)
    exported = open_model(request.model or find_model(Path.cwd()))
    measured = _measured_file(exported, profile, backend)
    keep, keep_origin = _keep(request, profile, len(exported.stages))
    check_static(exported, keep, keep_origin, profile)
    data = _data(request, exported.num_classes)
    warnings: list[str] = []
    if profile.threads and profile.threads > (os.cpu_count() or 1):
        cores = os.cpu_count()
        warnings.append(f"profile '{profile.name}' asks for {profile.threads} threads; this machine has {cores} cores.")
    with status.status("loading the PyTorch reference"):
        model = reference(exported, request.checkpoint, request.trust_checkpoint, warnings)
    precision = _precision(backend, profile)
    skipped = Skipped()
    with _torch_threads(profile.threads or torch.get_num_threads()), tempfile.TemporaryDirectory() as workdir:
        variants = _variants(model, keep, exported, measured, profile, backend, precision, Path(workdir), status)
        evaluation = _accuracy_pass(data, model, variants, profile, precision, skipped, status)
        latencies = _latency_pass(variants, evaluation, profile, status)
        environment = machine.describe(profile.threads)
    result = BenchResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={
            **exported.summary(),
            "measured_file": str(measured),
            "reference_checkpoint": request.checkpoint or exported.meta.get("source_checkpoint", ""),
        },
        profile=profile,
        backend=backend,
        precision=precision,
        keep=keep,
        keep_origin=keep_origin,
        data=_data_summary(data, evaluation, skipped),
        accuracy_metric="top-1 accuracy" if isinstance(data, ImageFolder) else "top-1 agreement with PyTorch dense",
        variants=_variant_results(variants, evaluation, latencies),
        comparison=evaluation.case,
        environment=environment,
        warnings=warnings,
    )
    return result, report.write(result, folder)

