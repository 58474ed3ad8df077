"""``ats-deploy bench``: find the model, rebuild its reference, run every variant on the same images, report.

:func:`plan` settles everything a user can get wrong (profile, backends, output
folder, model, keep, data) in seconds, before :func:`bench` loads the reference,
exports the dense baseline or times anything. Backends come from the registry
(:mod:`ats_deploy.backends`); with several (``--backend`` repeated) each one's
exported ATS and dense variants are measured side by side on the same images.
Precisions likewise (``--precision fp32 --precision int8``): bench quantizes the
fp32 ATS export and its dense baseline the same way (:mod:`ats_deploy.exporters.precisions.int8`),
on calibration images that are never measured.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ats_deploy import backends
from ats_deploy import precision as precision_registry
from ats_deploy.atomic import check_folder, output_folder
from ats_deploy.backends import Backend, Runner, RunOptions
from ats_deploy.backends.pytorch_cpu import TorchRunner
from ats_deploy.checkpoints import load_reference
from ats_deploy.console import counted, step
from ats_deploy.data import ImageFolder, SampleImages, Skipped, folder_batches, image_folder, sample_batches
from ats_deploy.errors import UserError
from ats_deploy.exported import Exported, changed_source, open_model
from ats_deploy.exporters import precisions, prepare
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.precisions import int8
from ats_deploy.flops import CostModel
from ats_deploy.images import data_config
from ats_deploy.keep import per_stage
from ats_deploy.model import ATSVisionTransformer, build
from ats_deploy.profiles import Profile, load_profile

from . import machine, report
from .evaluate import Evaluation, evaluate, reduced_agreement
from .results import BenchResult, VariantResult
from .source import check_engine, check_static, engine_for, find_model
from .timing import Latency, cycling, interleaved
from .variants import EXPORTED_ATS, EXPORTED_DENSE, PYTORCH_ATS, PYTORCH_DENSE, Variant, exported_key, kind_of

DEFAULT_SAMPLE_IMAGES = 16


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """What bench and tune measure with, given alike to both: the model and the checkpoint of its reference, the
    images, and int8's calibration images. Tune hands them to bench's :class:`Request` as they are (:meth:`given`)."""

    model: Path | None = None
    data: Path | None = None
    images: int | None = None
    class_map: Path | None = None
    calibration: Path | None = None  # int8: a folder of images to calibrate on; None: the first ones of --data
    calibration_images: int = int8.DEFAULT_IMAGES
    checkpoint: str | None = None
    trust_checkpoint: bool = False

    def given(self) -> dict[str, Any]:
        """These fields by name, to build another command's request from."""
        return {f.name: getattr(self, f.name) for f in fields(Inputs)}


@dataclass(frozen=True, kw_only=True)
class Request(Inputs):
    """What the user asked for on the command line."""

    profile: str
    keep: list[float] | None = None
    backends: list[str] | None = None  # --backend, once or more; None: the profile's
    precisions: list[str] | None = None  # --precision, once or more; None: the profile's (an int8 export's: int8)
    # Keep int8's calibration images out of the measured ones even where nothing runs int8 (tune measures each
    # precision in a plan of its own, all on the same images).
    reserve_calibration: bool = False
    out: Path | None = None


@dataclass(frozen=True)
class Target:
    """One backend bench measures, the file its exported variants run and the precision it runs them at."""

    backend: Backend
    measured: Path  # the model, or the engine built from it
    precision: str  # the profile's where the backend runs it, else the backend's own (fp32 on a CPU)
    tags: tuple[str, ...] = ()  # what tells its variants apart: the backend and/or precision, when several
    quantize: bool = False  # int8 of an fp32 export: bench quantizes the ATS export (the dense baseline always)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def made_at_export(self) -> bool:
        """Whether its precision's files are written at export (int8: calibrated), so bench makes them itself."""
        return precision_registry.get(self.precision).made_at_export

    @property
    def tag(self) -> str:
        return "/".join(self.tags)

    @property
    def label(self) -> str:
        """What tables call the runtime: the backend's label, with the precision when several are benched."""
        several = self.precision in self.tags
        return f"{self.backend.label} {self.precision}" if several else self.backend.label

    def key(self, kind: str) -> str:
        """The key of this target's exported variant of ``kind``: ``exported_ats:openvino:int8``."""
        return exported_key(kind, *self.tags)


@dataclass(frozen=True)
class CalibrationImages:
    """The real images int8 variants are calibrated on, and where they come from (none of them is measured)."""

    folder: Path
    files: list[Path]
    source: str


@dataclass
class Plan:
    """What will be measured, where, on which images, and where the results go: all checked."""

    request: Request
    profile: Profile
    targets: list[Target]
    folder: Path
    exported: Exported
    keep: list[float]
    keep_origin: str
    data: ImageFolder | SampleImages
    warnings: list[str] = field(default_factory=list)
    calibration: CalibrationImages | None = None

    @property
    def target(self) -> Target:
        """The first (for tune: the only) backend measured."""
        return self.targets[0]

    @property
    def backend(self) -> str:
        """The backends' names, each once (a backend benched at two precisions is two targets), joined by ", "."""
        return ", ".join(dict.fromkeys(t.name for t in self.targets))

    @property
    def precision(self) -> str:
        """The precisions the backends run, each once, joined by ", "."""
        return ", ".join(dict.fromkeys(t.precision for t in self.targets))

    @property
    def measured(self) -> Path:
        return self.target.measured


def resolve_backends(overrides: list[str] | None, profile: Profile) -> list[str]:
    """``--backend`` values (each once, in order), or the profile's backend; unknown names fail listing the known."""
    names = list(dict.fromkeys(overrides)) if overrides else [profile.backend]
    for name in names:
        backends.get(name, "--backend")
    return names


def _keep(request: Request, profile: Profile, stages: int) -> tuple[list[float], str]:
    if request.keep is not None:
        return per_stage(request.keep, stages), "--keep"
    return profile.keep_for(stages), f"profile '{profile.name}'"


def _measured_file(exported: Exported, profile: Profile, backend: Backend) -> Path:
    """The file the exported variants run: the model itself, or (an engine backend, ONNX model) its built engine."""
    if exported.is_engine:
        if not backend.engines:
            owners = " or ".join(b.name for b in backends.all_backends() if b.engines)
            raise UserError(
                f"{exported.path} is a TensorRT engine, which only the {owners} backend runs (not {backend.name}).",
                hint="Bench the ONNX file it was built from for other backends.",
            )
        check_engine(exported, profile)
        return exported.path
    if backend.engines:
        return engine_for(exported, profile)
    return exported.path


def resolve_precisions(request: Request, profile: Profile, exported: Exported) -> list[str]:
    """``--precision`` values (each once, in order), else the profile's; an int8 export runs int8 only."""
    own = exported.artifact.precision
    if not request.precisions:
        return [precision_registry.running(own, profile.precision)]
    names = list(dict.fromkeys(request.precisions))
    for name in names:
        precision_registry.get(name)
    if precision_registry.get(own).made_at_export and names != [own]:
        raise UserError(
            f"{exported.path} is an {own} export: it cannot run {', '.join(n for n in names if n != own)}.",
            hint=f"Bench the fp32 export it was quantized from with --precision fp32 --precision {own}: bench "
            "quantizes it and the dense baseline the same way.",
        )
    return names


def _targets(
    chosen: list[Backend], names: list[str], explicit: bool, exported: Exported, profile: Profile
) -> list[Target]:
    """Every backend at every precision (a backend that exports nothing once); tagged when there are several."""
    several_backends, several_precisions = len(chosen) > 1, len(names) > 1
    targets = []
    for backend in chosen:
        for name in names if backend.exports else names[:1]:
            precision = _runs(backend, name, explicit, exported)
            tags = (backend.name,) * several_backends + (precision,) * several_precisions
            made_at_export = precision_registry.get(precision).made_at_export
            quantize = made_at_export and exported.artifact.precision != precision and backend.exports
            measured = _measured_file(exported, profile, backend)
            targets.append(Target(backend, measured, precision, tags, quantize))
    return targets


def _runs(backend: Backend, name: str, explicit: bool, exported: Exported) -> str:
    """The precision ``backend`` runs for ``name``: as asked with --precision, else :meth:`Backend.precision`'s."""
    if not explicit or not backend.exports:
        return backend.precision(name)
    if name not in backend.precisions:
        owners = ", ".join(precision_registry.get(name).backends())
        raise UserError(
            f"--precision {name}: the {backend.label} backend does not run {name} (it runs "
            f"{', '.join(backend.precisions)}); {name} runs on: {owners}."
        )
    if precision_registry.get(name).made_at_export and backend.engines and exported.artifact.precision != name:
        raise UserError(
            f"--precision {name} on {backend.name} runs the engine built from an {name} export, and {exported.path} "
            f"is {exported.artifact.precision}.",
            hint=f"Export with --precision {name} --calibration DIR, build that file with `ats-deploy build`, "
            "bench it.",
        )
    return name


def _calibration(request: Request, num_classes: int) -> tuple[CalibrationImages, int]:
    """int8's calibration images, and how many of the first images of --data they take (0: a folder of their own).

    Calibration and measured images never overlap: with --calibration DIR (another folder than --data) all of
    --data is measured; otherwise the first ``--calibration-images`` of --data (classes in turn) calibrate and
    only the images after them are measured.
    """
    count = request.calibration_images
    folder = request.calibration
    if folder is None or (request.data is not None and folder.resolve() == request.data.resolve()):
        if request.data is None:
            raise UserError(
                "int8 is calibrated on real images: give --calibration DIR, or --data DIR (its first "
                f"{count} images then calibrate and only the others are measured)."
            )
        files = [path for path, _ in image_folder(request.data, num_classes, request.class_map).files]
        if len(files) <= count:
            raise UserError(
                f"--data {request.data} holds {len(files)} images: int8 calibrates on the first {count} of them and "
                "measures the others, so none would be left to measure.",
                hint="Lower --calibration-images, add images, or give --calibration DIR a folder of its own.",
            )
        source = f"the first {count} images of --data {request.data}, not measured"
        return CalibrationImages(request.data, files[:count], source), count
    files = int8.calibration_files(int8.Calibration(folder, count), num_classes)
    return CalibrationImages(folder, files, f"{count} images of --calibration {folder}"), 0


def _data(request: Request, num_classes: int, skip: int = 0) -> ImageFolder | SampleImages:
    """The measured images: --data (less the first ``skip``, which calibrate int8), else the sample photos."""
    if request.data is not None and skip:
        folder = image_folder(request.data, num_classes, request.class_map)
        rest = folder.files[skip:]
        return replace(folder, files=rest[: request.images] if request.images else rest)
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
    names = resolve_backends(request.backends, profile)
    chosen = [backends.require(name, profile.name, overridden=bool(request.backends)) for name in names]
    folder = output_folder(request.out, profile.name)
    exported = open_model(request.model or find_model(Path.cwd()))
    if check_model is not None:
        check_model(exported)
    names = resolve_precisions(request, profile, exported)
    targets = _targets(chosen, names, bool(request.precisions), exported, profile)
    keep, keep_origin = _keep(request, profile, len(exported.stages))
    check_static(exported, keep, keep_origin, profile)
    calibration, skip = None, 0
    if request.reserve_calibration or any(t.made_at_export and t.backend.exports for t in targets):
        calibration, skip = _calibration(request, exported.num_classes)
    data = _data(request, exported.num_classes, skip)
    result = Plan(request, profile, targets, folder, exported, keep, keep_origin, data, calibration=calibration)
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


def dense_export(plan: Plan, dense: ATSVisionTransformer, workdir: Path, status: Console) -> Path:
    """The dense baseline exported the way the model was (dynamic, or static at its batch)."""
    exported = plan.exported
    options = ExportOptions(dynamic=exported.dynamic, batch=exported.batch or 1)
    with step(status, "exporting the dense baseline (the same network without token sampling)"):
        return export(dense, workdir / "dense.onnx", options)


def quantize(
    plan: Plan,
    model: ATSVisionTransformer,
    precision: str,
    sources: dict[str, Path],
    workdir: Path,
    status: Console,
) -> dict[str, Path]:
    """The ``precision`` copy (one made at export: int8) of each fp32 ONNX file of ``sources`` (name -> file).

    All are calibrated on the same images, by the precision's own module (:mod:`ats_deploy.exporters.precisions`).
    """
    calibration = plan.calibration
    assert calibration is not None  # plan() settles it for every target whose precision is made at export
    quantizer = precisions.module(precision_registry.get(precision))
    read = quantizer.read_images(calibration.files, data_config(model.vit), plan.request.calibration_images)
    if read.skipped:
        name, why = read.skipped[0]
        status.print(f"skipped {len(read.skipped)} unreadable calibration file(s); the first: {name}: {why}",
                     highlight=False, markup=False)
    pixels = read.pixels
    settings = quantizer.Calibration(calibration.folder, images=len(pixels))
    quantized = {}
    with step(status, f"quantizing {', '.join(sources)} to {precision} on {calibration.source}"):
        for name, source in sources.items():
            quantized[name] = workdir / f"{name}.{precision}.onnx"
            quantizer.quantize(source, quantized[name], pixels, settings)
    return quantized


def exported_runners(
    plan: Plan, target: Target, files: tuple[Path, Path], workdir: Path, status: Console
) -> tuple[Runner, Runner]:
    """Runners of the exported ATS model and of the dense baseline (``files``) on ``target``, prepared alike."""
    backend = target.backend
    ats_file, dense_onnx = files
    options = RunOptions(precision=target.precision, threads=plan.profile.threads)
    dense_file = prepare.baseline(backend, dense_onnx, plan.profile, target.measured, workdir, status)
    with step(status, f"opening the exported ATS and dense models on {target.label}"):
        ats = prepare.open_runner(backend, ats_file, options, workdir)
        return ats, prepare.open_runner(backend, dense_file, options, workdir)


def build_variants(plan: Plan, model: ATSVisionTransformer, workdir: Path, status: Console) -> dict[str, Variant]:
    """PyTorch dense and ATS, and each exporting target's exported dense and ATS models, at the plan's keep.

    Bench measures them all once; tune measures the same variants, its ATS ones at each keep it tries.
    """
    dense = build(model.vit, model.arch, stages=[])
    cost, dense_cost = CostModel.of(model), CostModel.of(dense)
    keep, none = torch.tensor(plan.keep, dtype=torch.float32), torch.zeros(0)
    torch_label = TorchRunner.label
    variants = {
        PYTORCH_DENSE: Variant(PYTORCH_DENSE, TorchRunner(dense), torch_label, none, dense_cost),
        PYTORCH_ATS: Variant(PYTORCH_ATS, TorchRunner(model), torch_label, keep, cost),
    }
    targets = [t for t in plan.targets if t.backend.exports]
    if not targets:
        return variants
    dense_onnx = dense_export(plan, dense, workdir, status)
    quantized: dict[str, dict[str, Path]] = {}  # precision -> name -> its file, for precisions made at export
    for precision in dict.fromkeys(t.precision for t in targets if t.made_at_export):
        ats = {"ats": plan.exported.path} if any(t.quantize and t.precision == precision for t in targets) else {}
        quantized[precision] = quantize(plan, model, precision, {"dense": dense_onnx, **ats}, workdir, status)
    for target in targets:
        files = (target.measured, dense_onnx)
        if target.made_at_export:
            made = quantized[target.precision]
            files = (made["ats"] if target.quantize else target.measured, made["dense"])
        ats, baseline = exported_runners(plan, target, files, workdir, status)
        dense_key, ats_key = target.key(EXPORTED_DENSE), target.key(EXPORTED_ATS)
        variants[dense_key] = Variant(dense_key, baseline, target.label, none, dense_cost)
        variants[ats_key] = Variant(ats_key, ats, target.label, keep, cost)
    return variants


def compared(plan: Plan, variants: dict[str, Variant]) -> dict[str, float]:
    """The exported ATS variants compared with the reference patch for patch, and each one's logit tolerance.

    A precision with no tolerance on its registry entry (int8) is compared by agreement instead (docs/ATS.md
    section 6): :func:`agreements`.
    """
    tolerances = {t.key(EXPORTED_ATS): precision_registry.get(t.precision).tolerance for t in plan.targets}
    return {key: atol for key, atol in tolerances.items() if atol is not None and key in variants}


def agreements(plan: Plan, evaluation: Evaluation) -> dict[str, dict]:
    """Each ATS variant without a tolerance (int8) against the float32 PyTorch ATS reference, by agreement."""
    return {
        t.key(EXPORTED_ATS): reduced_agreement(evaluation, t.key(EXPORTED_ATS), t.label, plan.keep, entry)
        for t, entry in ((t, precision_registry.get(t.precision)) for t in plan.targets)
        if entry.tolerance is None and t.key(EXPORTED_ATS) in evaluation.tallies
    }


def _accuracy_pass(
    plan: Plan, model: ATSVisionTransformer, variants: dict[str, Variant], skipped: Skipped, status: Console
) -> Evaluation:
    config, batch, data = data_config(model.vit), plan.profile.batch, plan.data
    if isinstance(data, ImageFolder):
        total, batches = len(data.files), folder_batches(data, config, batch, skipped)
    else:
        total, batches = data.count, sample_batches(data, config, batch)
    with counted(status, f"accuracy: {len(variants)} variants on {total} images", total) as progress:
        seen = [0]  # skipped files counted so far, so that progress covers them too

        def advance(images: int) -> None:
            progress(images + len(skipped) - seen[0])
            seen[0] = len(skipped)

        return evaluate(batches, model, variants, batch, compared(plan, variants), advance)


def _latency_pass(
    plan: Plan, variants: dict[str, Variant], evaluation: Evaluation, status: Console
) -> dict[str, Latency]:
    calls, profile = cycling(variants, evaluation.timing_inputs), plan.profile
    rounds = profile.warmup + profile.iterations
    text = f"latency: {len(calls)} variants interleaved, batch {profile.batch}, {rounds} rounds"
    with counted(status, text, rounds) as progress:
        return interleaved(calls, profile.batch, profile.warmup, profile.iterations, lambda: progress(1))


def _variant_results(
    variants: dict[str, Variant], evaluation: Evaluation, latencies: dict[str, Latency]
) -> list[VariantResult]:
    results = []
    for key, variant in variants.items():
        tokens = evaluation.tallies[key].all_tokens()
        gflops = float(variant.cost.gflops(tokens).mean())
        own = exported_key(EXPORTED_DENSE, *key.split(":")[1:]) if kind_of(key) == EXPORTED_ATS else None
        results.append(
            VariantResult(key, variant.runtime, evaluation.accuracy(key), gflops, tokens, latencies[key],
                          evaluation.images, own if own in variants else None)
        )
    return results


def _data_summary(plan: Plan, evaluation: Evaluation, skipped: Skipped) -> dict:
    data, calibration = plan.data, plan.calibration
    return {
        "source": data.describe(),
        "int8_calibration": None if calibration is None else calibration.source,
        "labelled": isinstance(data, ImageFolder),
        "labels": data.labelling if isinstance(data, ImageFolder) else None,
        "images": evaluation.images,
        "skipped_corrupt": len(skipped),
        "skipped_files": [{"file": name, "reason": reason} for name, reason in skipped.files],
    }


def _described(target: Target) -> str:
    return f"{target.measured}, quantized to {target.precision} by bench" if target.quantize else str(target.measured)


def _measured_files(plan: Plan) -> dict[str, object]:
    """The file the exported variants ran; with several backends or precisions, each one's too."""
    files: dict[str, object] = {"measured_file": _described(plan.target)}
    if len(plan.targets) > 1:
        files["measured_files"] = {t.tag: _described(t) for t in plan.targets}
    return files


def bench(request: Request, status: Console) -> tuple[BenchResult, list[Path]]:
    """Run the bench of ``request``; progress and notices go to ``status``. Returns the result and files written."""
    checked = plan(request)
    check_folder(checked.folder, "--out")  # here, not in plan: tune plans too, and writes no results folder
    print_warnings(checked.warnings, status)
    with step(status, "loading the PyTorch reference"):
        exported = checked.exported
        model = load_reference(exported.artifact, request.checkpoint, request.trust_checkpoint, str(exported.path))
        checked.warnings.extend(filter(None, [changed_source(checked.exported, request.checkpoint)]))
    skipped = Skipped()
    threads = checked.profile.threads or torch.get_num_threads()
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="ats-bench-") as workdir:
        variants = build_variants(checked, model, Path(workdir), status)
        evaluation = _accuracy_pass(checked, model, variants, skipped, status)
        latencies = _latency_pass(checked, variants, evaluation, status)
        environment = machine.describe(checked.profile.threads, list(dict.fromkeys(t.backend for t in checked.targets)))
    source = request.checkpoint or checked.exported.artifact.source_checkpoint
    result = BenchResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={**checked.exported.summary(), **_measured_files(checked), "reference_checkpoint": source},
        profile=checked.profile,
        backend=checked.backend,
        precision=checked.precision,
        keep=checked.keep,
        keep_origin=checked.keep_origin,
        data=_data_summary(checked, evaluation, skipped),
        accuracy_metric=checked.data.metric,
        variants=_variant_results(variants, evaluation, latencies),
        comparison=next(iter(evaluation.cases.values()), None),
        environment=environment,
        warnings=checked.warnings,
        comparisons=evaluation.cases if len(checked.targets) > 1 else {},  # tagged keys: several backends or precisions
        agreements=agreements(checked, evaluation),
    )
    return result, report.write(result, checked.folder)
