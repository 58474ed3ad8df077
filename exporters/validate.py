"""Validate an exported model against the PyTorch reference: run it on images, show the comparison (docs/ATS.md).

Like Optimum's post-export validation, with Polygraphy's plainness: the same
images and ``keep`` go through the runtime and the reference; one table says, per
``keep`` and batch size, the largest logit difference over all images, how many
stages kept exactly the reference's patches, and top-1 agreement. How each image
is judged (patch for patch with flips replayed, or by agreement for a reduced
precision) is :mod:`.compare`'s; this module chooses the inputs, runs the cases
and renders them. A converted copy (fp16 at build) is checked here against the
float32 file it came from before any engine is built (:func:`measure_conversion`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ats_deploy import precision as precisions
from ats_deploy.artifact import Artifact, read
from ats_deploy.backends.onnxruntime.session import TappedSession, session
from ats_deploy.backends.samples import Sample
from ats_deploy.errors import UserError
from ats_deploy.keep import keep_rows, per_stage
from ats_deploy.model import ATSVisionTransformer
from ats_deploy.precision import Precision

from .compare import (
    TIE_TOL,
    Agreement,
    Case,
    Judge,
    Report,
    compare_batch,
    interface_mismatch,
    judged_by_agreement,
    reference_samples,
    top1_agreement,
)

DEFAULT_KEEPS = (1.0, 0.87, 0.72, 0.5)
DEFAULT_BATCHES = (1, 4)
FP32_TOLERANCE = precisions.get("fp32").tolerance  # validate's default: float32 is compared patch for patch
RANDOM_IMAGES = 4  # a conversion's check: the scikit-image photos, then this many random images


# --------------------------------------------------------------------------- running it


def run_case(
    run: Callable[[np.ndarray, np.ndarray], list[Sample]],
    judge: Judge,
    names: Sequence[str],
    images: torch.Tensor,
    case: Case,
) -> Case:
    """Fill ``case``: its keep rows at its batch size over every whole batch of ``images``."""
    batch = case.batch
    for start in range(0, len(images) - batch + 1, batch):
        chunk = images[start : start + batch]
        rows = case.rows(batch)
        observed = run(chunk.numpy(), rows.numpy())
        expected = reference_samples(judge.model, chunk, rows)
        compare_batch(case, judge, names[start : start + batch], chunk, rows, observed, expected)
    return case


def cases(
    keeps: Sequence[list[float]], batches: Sequence[int], dynamic: bool, precision: Precision | None = None
) -> list[Case]:
    """Every keep at every batch size; a dynamic file also runs every keep mixed in one batch (docs/ATS.md section 6).

    ``precision``: a reduced precision, whose cases are judged by agreement (:func:`.compare.judged_by_agreement`).
    """
    uniform = [Case(list(keep), batch, precision=precision) for keep in keeps for batch in batches]
    if not dynamic or len(keeps) < 2:
        return uniform
    mixed = [list(keep) for keep in keeps]
    return uniform + [Case([], batch, mixed, precision=precision) for batch in batches if batch > 1]


def validate(
    onnx_path: str,
    model: ATSVisionTransformer,
    names: Sequence[str],
    images: torch.Tensor,
    keeps: Sequence[list[float]],
    batches: Sequence[int] = DEFAULT_BATCHES,
    atol: float = FP32_TOLERANCE,
    console: Console | None = None,
) -> Report:
    """Run ``onnx_path`` (onnxruntime CPU) and ``model`` on ``images`` for every keep and batch size.

    An int8 file is judged by agreement per case (docs/ATS.md section 6), a float32 one patch for patch.
    """
    artifact = read(onnx_path)
    if not artifact.dynamic:
        keeps = [list(artifact.keep)]
        batches = [artifact.batch]
    tapped = TappedSession(onnx_path)
    todo = cases(keeps, batches, artifact.dynamic, judged_by_agreement(artifact.precision))
    mismatch = interface_mismatch(model, tapped.stages, len(tapped.taps))
    if mismatch is not None:  # its keep input would not even take the reference's rows
        for case in todo:
            case.failures.append(mismatch)
        return Report(todo, atol)
    judge = Judge(model, atol)
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("validating against PyTorch", total=len(todo))
        for case in todo:
            run_case(tapped, judge, names, images, case)
            progress.advance(task)
    return Report(todo, atol)


def render(report: Report, console: Console, title: str = "ONNX (onnxruntime CPU) vs PyTorch reference") -> None:
    """The comparison table, then every flip and failure by name."""
    table = Table(title=title, title_justify="left")
    for column in ("keep", "batch", "images", "max |Δlogit|", "stages kept same", "top-1 agree", "flips", "result"):
        table.add_column(column, justify="right" if column not in ("keep", "result") else "left")
    for c in report.cases:
        table.add_row(
            c.keep_label,
            str(c.batch),
            str(c.images),
            f"{c.max_logit_diff:.1e}",
            f"{c.stage_matches}/{c.stage_total}" + ("" if c.positions else " (counts)"),
            f"{c.top1_matches}/{c.images}",
            str(len(c.flips)),
            "[green]ok[/]" if c.ok else "[red]FAIL[/]",
        )
    console.print(table)
    reduced = [case for case in report.cases if case.agreement is not None]
    if len(reduced) < len(report.cases):
        console.print(
            f"max |Δlogit| is over every image, flips included; an image passes with |Δlogit| <= {report.atol:.0e} "
            "and the reference's kept patches at every stage, or as a flip: the reference replayed with near ties "
            f"(a quantile within {TIE_TOL:.0e} of the cdf) resolved the other way reproduces it.",
            highlight=False,
        )
    if reduced:
        console.print(
            f"{reduced[0].precision.name} is judged by top-1 agreement with the float32 reference, not image by image "
            "(docs/ATS.md section 6): a case fails when its agreement is below the bar beyond sampling error (its "
            "one-sided 95% upper bound under the bar); stages kept same counts equal token counts.",
            highlight=False,
        )
        for case in (c for c in reduced if c.ok):
            console.print(f"keep {case.keep_label}, batch {case.batch}: {case.agreement.describe()}", highlight=False)
    for case in report.cases:
        for flip in case.flips:
            where = f"keep {case.keep_label}, batch {case.batch}"
            console.print(f"[yellow]flip at a float tie[/] ({where}) {escape(flip.describe())}", highlight=False)
    for failure in report.failures:
        console.print(f"[red]mismatch[/] {escape(failure)}", highlight=False)


# --------------------------------------------------------------------------- the images it runs on


def default_inputs(model: ATSVisionTransformer, count: int = 8) -> tuple[list[str], torch.Tensor]:
    """The scikit-image photos, then seeded random images: real pictures without any download."""
    from ats_deploy.images import data_config, preprocess, random_images, sample_images

    config = data_config(model.vit)
    photos = list(sample_images().items())[:count]
    images = preprocess([image for _, image in photos], config)
    extra = count - len(photos)
    if extra > 0:
        images = torch.cat([images, random_images(extra, config)])
    return [f"skimage:{name}" for name, _ in photos] + [f"random-{i}" for i in range(extra)], images


def folder_inputs(
    model: ATSVisionTransformer, data: Path, limit: int | None, console: Console
) -> tuple[list[str], torch.Tensor]:
    """Readable images of an ImageFolder or flat folder (:mod:`ats_deploy.data`), unreadable ones skipped and said."""
    from ats_deploy.data import Skipped, folder_batches, image_folder
    from ats_deploy.images import data_config

    folder = image_folder(data, model.num_classes, limit=limit)
    skipped = Skipped()
    batches = list(folder_batches(folder, data_config(model.vit), 32, skipped))
    if skipped:
        console.print(f"skipped {len(skipped)} unreadable file(s) of {escape(str(data))}", highlight=False)
    if not batches:
        raise UserError(f"no readable image in {data}; give a folder of JPEG/PNG images (ImageFolder or flat).")
    return [n for b in batches for n in b.names], torch.cat([b.images for b in batches])


# A reduced-precision export is validated by agreement (docs/ATS.md section 6; the bars are on the precision's
# registry entry) on images it was not calibrated on, at full budget and two sampled ones.
REDUCED_KEEPS = (1.0, 0.72, 0.5)
REDUCED_BATCHES = (1, 8)
HELD_OUT_IMAGES = 100  # at most; fewer are said, and the verdict's bound allows for them


def held_out_inputs(
    model: ATSVisionTransformer, calibration, data: Path | None, console: Console, count: int = HELD_OUT_IMAGES
) -> tuple[list[str], torch.Tensor]:
    """The images an int8 export is validated on, said on ``console``: up to ``count`` readable images of ``data``
    (``--validation-data``), else of the calibration folder after the calibrated ones, else the scikit-image photos.
    """
    from ats_deploy.images import SAMPLE_PHOTOS, data_config

    from .precisions import int8

    if data is not None:
        names, images = folder_inputs(model, data, count, console)
        where = f"--validation-data {data}"
    else:
        calibrated = int8.read_calibration(calibration, model.num_classes, data_config(model.vit))
        console.print(f"calibrated on {calibrated.describe()} of {calibration.folder}", highlight=False, markup=False)
        held = int8.read_images(calibrated.rest, data_config(model.vit), count)
        if held.skipped:
            console.print(f"skipped {len(held.skipped)} unreadable held-out file(s)", highlight=False)
        names, images = held.names, torch.from_numpy(held.pixels)
        where = f"{calibration.folder} after the calibrated images"
        if not names:
            names, images = default_inputs(model, count=len(SAMPLE_PHOTOS))
            where = "the scikit-image photos: the calibration folder has no image left over"
    console.print(f"validating on {len(names)} held-out images ({where})", highlight=False, markup=False)
    if len(names) < count:
        console.print(
            f"note: only {len(names)} held-out images, fewer than the {count} validation asks for: each verdict "
            "allows for sampling error at this size (the agreement's 95% upper bound against the bar), so only a "
            "clear shortfall fails. Give --validation-data DIR with more images for a sharper verdict.",
            highlight=False, markup=False,
        )
    return names, images


# --------------------------------------------------------------------------- the verdict on a file


def validate_file(
    path: Path,
    *,
    data: Path | None = None,
    limit: int | None = None,
    keeps: Sequence[list[float]] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    atol: float = FP32_TOLERANCE,
    checkpoint: str | None = None,
    trust: bool = False,
    console: Console,
) -> Report:
    """``ats-deploy validate``: an exported ONNX file against the reference its metadata names."""
    from ats_deploy.checkpoints import load_reference
    from ats_deploy.exported import changed_source, open_model

    exported = open_model(path)
    if exported.is_engine:
        raise UserError(
            f"{path} is a TensorRT engine; validate checks ONNX files (the engine's kept patches are not visible).",
            hint="Validate the ONNX it was built from, then `ats-deploy bench --backend tensorrt` compares the engine.",
        )
    model = load_reference(exported.artifact, checkpoint, trust, str(path))
    warning = changed_source(exported, checkpoint)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    names, images = folder_inputs(model, data, limit, console) if data else default_inputs(model, limit or 8)
    stages = len(model.stages)
    keeps = [per_stage(k, stages) for k in keeps] if keeps else [[k] * stages for k in DEFAULT_KEEPS]
    return validate(str(path), model, names, images, keeps, batches, atol, console)


def check_validated(report: Report, path: Path, hint: str | None = None) -> None:
    """Raise :class:`~ats_deploy.errors.ValidationFailed` when ``report`` failed, after marking ``path`` (artifact
    key ``validation_failed``) so that deploying it is refused; the file stays on disk for inspection.
    """
    from ats_deploy.artifact import ALLOW_FAILED, mark_failed
    from ats_deploy.errors import ValidationFailed

    if report.ok:
        return
    first = report.failures[0]
    mark_failed(path, f"{len(report.failures)} mismatch(es); the first: {first[:300]}")
    raise ValidationFailed(
        f"{path} disagrees with the PyTorch reference (see above). The file is kept for inspection and marked as "
        f"failed: `ats-deploy triton`, `serve` and `build` refuse it unless given {ALLOW_FAILED}. Do not deploy it.",
        hint,
    )


# --------------------------------------------------------------------------- a converted copy before a build


def _artifact(opened) -> Artifact | None:
    """The export's recorded description; ``None`` for another producer's file with the interface."""
    try:
        return Artifact.from_metadata(opened.get_modelmeta().custom_metadata_map, "the ONNX file")
    except UserError:
        return None


def _image_config(artifact: Artifact | None, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The preprocessing ``ats-deploy export`` recorded in the metadata; timm's ImageNet defaults otherwise."""
    from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if artifact is not None:
        return {**artifact.data_config, "input_size": image_shape}
    return {
        "input_size": image_shape,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic",
        "crop_pct": DEFAULT_CROP_PCT,
    }


def _keep(artifact: Artifact | None, keep_len: int | None, keep: Sequence[float] | None) -> list[float] | None:
    """``keep``, else the export's recorded keep, else 1.0 per stage; ``None`` when keep is baked in."""
    if keep_len is None:
        return None
    if keep is not None:
        return list(keep)
    recorded = list(artifact.keep) if artifact is not None else []
    return recorded if len(recorded) == keep_len else [1.0] * keep_len


def _run_all(opened, images: np.ndarray, keep: list[float] | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and tokens of every image, ``batch`` at a time (the last batch padded with its last image)."""
    logits, tokens = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        feeds = {"images": padded} if keep is None else {"images": padded, "keep": keep_rows(keep, batch)}
        out_logits, out_tokens = opened.run(["logits", "tokens"], feeds)
        logits.append(out_logits[: len(chunk)])
        tokens.append(out_tokens[: len(chunk)])
    return np.concatenate(logits), np.concatenate(tokens)


def measure_conversion(
    precision: Precision, reference: Path, converted: Path, batch: int, keep: Sequence[float] | None = None
) -> Agreement:
    """Run ``converted`` and the fp32 ``reference`` (files with the exported interface) ``batch`` images at a time.

    Both open through the one onnxruntime session factory, as every other check and run does. ``keep``
    defaults to the keep the export recorded. The image size and the length of ``keep`` come from the
    reference's inputs, which ``ats-deploy build`` has checked (docs/ATS.md section 4).
    """
    from ats_deploy.images import preprocess, random_images, sample_images

    sessions = [session(path) for path in (reference, converted)]
    inputs = {i.name: i.shape for i in sessions[0].get_inputs()}
    artifact = _artifact(sessions[0])
    config = _image_config(artifact, tuple(inputs["images"][1:]))
    photos = sample_images()
    pictures = [preprocess(list(photos.values()), config), random_images(RANDOM_IMAGES, config)]
    images = np.concatenate([pixels.numpy() for pixels in pictures])
    values = _keep(artifact, inputs["keep"][1] if "keep" in inputs else None, keep)
    (ref_logits, ref_tokens), (logits, tokens) = (_run_all(s, images, values, batch) for s in sessions)
    agree = int((ref_logits.argmax(axis=-1) == logits.argmax(axis=-1)).sum())
    return Agreement(
        precision=precision.name,
        top1=top1_agreement(precision, [values or [1.0]], agree, len(images)),
        photos=len(photos),
        keep=values,
        tokens=int((ref_tokens == tokens).all(axis=-1).sum()),
        max_logit_diff=float(np.abs(ref_logits - logits).max()),
    )
