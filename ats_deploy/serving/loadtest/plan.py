"""What a load test is asked to do, checked before any request: levels, keep mix, the served model, the images.

Everything a user can get wrong is refused here, with the fix, before the server sees a request.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from ats_deploy.errors import UserError
from ats_deploy.keep import Keep

from ..triton_client import Endpoint, ServedModel, connect

MIX_SEED = 0  # the keep each request picks and the open loop's arrival times are reproducible
DEFAULT_MAX_ERROR_RATE = 0.01  # past this share of failed requests the run exits 1: a healthy server fails none


@dataclass
class Request:
    """What the user asked for on the command line."""

    url: str
    data: Path
    concurrency: str | None = None
    rate: str | None = None
    duration: float = 10.0
    keep: str | None = None
    batch: int = 1
    timeout: float = 10.0
    images: int | None = None
    model_name: str | None = None
    model_file: Path | None = None
    verify: int = 0
    checkpoint: str | None = None
    trust_checkpoint: bool = False
    output: Path | None = None
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    step_seconds: float | None = None  # --rate values become steps of a schedule (ats_deploy/serving/schedule.py)
    trace: Path | None = None  # arrival times from a file
    slo_ms: float | None = None  # report SLO attainment (slo_report.py)

    @property
    def scheduled(self) -> bool:
        """Whether the run is one open-loop schedule, reported per step (steps, a trace, or an SLO to attain)."""
        return self.step_seconds is not None or self.trace is not None or self.slo_ms is not None


@dataclass(frozen=True)
class Level:
    """One load level: ``closed`` with ``load`` senders, or ``open`` at ``load`` requests per second."""

    mode: str
    load: float

    @property
    def label(self) -> str:
        return f"concurrency {int(self.load)}" if self.mode == "closed" else f"rate {self.load:g}/s"


def parse_levels(concurrency: str | None, rate: str | None) -> list[Level]:
    """``--concurrency 1,4,16`` then ``--rate 5,10``; concurrency 1 when neither is given."""
    if concurrency is None and rate is None:
        return [Level("closed", 1)]
    closed = [Level("closed", n) for n in _numbers(concurrency, "--concurrency", int)]
    opened = [Level("open", r) for r in _numbers(rate, "--rate", float)]
    return closed + opened


def _numbers(text: str | None, option: str, kind: type) -> list:
    if text is None:
        return []
    example = "1,4,16" if kind is int else "5,10.5"
    what = "whole numbers of requests in flight" if kind is int else "requests per second"
    items = [item.strip() for item in text.split(",")]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise UserError(
            f"cannot read {option} '{text}': give positive {what}, comma-separated, e.g. {option} {example}."
        )
    return values


@dataclass(frozen=True)
class Mix:
    """The keeps requests pick from (``None``: the server's default) and which one request ``i`` picks."""

    rows: tuple[tuple[float, ...] | None, ...]
    labels: tuple[str, ...]

    def pick(self, index: int) -> int:
        """The keep of request ``index``: a seeded draw, so runs and levels see the same sequence."""
        if len(self.rows) == 1:
            return 0
        return int(np.random.default_rng((MIX_SEED, index)).integers(len(self.rows)))


def parse_mix(text: str | None, served: ServedModel, default: list[float] | None) -> Mix:
    """``--keep`` as the rows requests send, each checked against the served model's S stages.

    Without it requests send no keep and the server runs its ``default`` (when it says which).
    """
    if text is None:
        if served.keep_required:
            raise UserError(
                f"model '{served.name}' needs a keep with every request (its config makes keep required).",
                hint="Pass --keep, e.g. --keep 0.7 or a mix: --keep 0.5,0.7,1.0.",
            )
        label = "server default" if not default else f"server default ({Keep(tuple(default)).mix_label})"
        return Mix((None,), (label,))
    if not served.takes_keep:
        raise UserError(
            f"model '{served.name}' has no keep input (a static export: its keep is baked in); drop --keep.",
            hint="Serve a --dynamic export to mix keeps.",
        )
    keeps = Keep.parse_mix(text)
    return Mix(tuple(tuple(k.per_stage(served.stages)) for k in keeps), tuple(k.mix_label for k in keeps))


@dataclass
class Target:
    """The served model, where its pre-processing came from, and its export's metadata if known."""

    endpoint: Endpoint
    served: ServedModel
    artifact: Any  # ats_deploy.artifact.Artifact, or None: the server and --model say nothing
    config: dict[str, Any]  # timm's data config the images are pre-processed with
    origin: str  # where `config` came from

    @property
    def default_keep(self) -> list[float] | None:
        """The keep the server runs a request without one with: ``ats-deploy serve``'s (its profile's), else the
        export's default; None when nothing says."""
        from ..python_model import PARAMETER

        settings = self.served.parameters.get(PARAMETER)
        if settings:
            return list(json.loads(settings)["keep"])
        return list(self.artifact.keep) if self.artifact is not None else None

    def summary(self) -> dict[str, Any]:
        artifact = self.artifact
        return {
            "name": self.served.name,
            "url": str(self.endpoint),
            "input_size": list(self.served.input_size),
            "stages": self.served.stages,
            "classes": self.served.classes,
            "max_batch_size": self.served.max_batch_size,
            "arch": artifact.arch if artifact else None,
            "source_checkpoint": artifact.source_checkpoint if artifact else None,
            "preprocessing_from": self.origin,
        }


def target(request: Request, endpoint: Endpoint) -> tuple[Target, list[str]]:
    """The served model and its pre-processing: ``--model FILE``, else the model config, else timm's defaults.

    ``ats-deploy serve`` and ``ats-deploy triton`` write the export's metadata into the model config's parameters
    (the keys of :meth:`~ats_deploy.artifact.Artifact.to_metadata`); a model served by other means has none, so
    its images get timm's defaults and a warning says so.
    """
    from ats_deploy.artifact import Artifact, read

    from ..repository import default_name

    guess = default_name(Path(request.model_file)) if request.model_file else None  # what `serve` names it
    served = connect(endpoint, request.model_name, guess)
    warnings = []
    if request.model_file is not None:
        if not Path(request.model_file).is_file():
            raise UserError(f"--model {request.model_file} does not exist; give the file the server serves.")
        artifact, origin = read(request.model_file), f"the metadata of {request.model_file}"
    elif "arch" in served.parameters:
        where = f"model '{served.name}' at {endpoint}"
        artifact, origin = Artifact.from_metadata(served.parameters, where), f"the config of {where}"
    else:
        artifact, origin = None, "timm's defaults (ImageNet mean/std, bicubic, crop 0.875)"
        warnings.append(
            f"model '{served.name}' does not say how its images are pre-processed; they get timm's defaults at "
            f"{served.input_size}. Pass --model FILE (the served export) to use its own."
        )
    if artifact is not None:
        _check_same(artifact, served, origin)
        config = artifact.data_config
    else:
        from timm.data import resolve_data_config

        config = resolve_data_config({"input_size": served.input_size})
    return Target(endpoint, served, artifact, config, origin), warnings


def _check_same(artifact: Any, served: ServedModel, origin: str) -> None:
    """The export described by ``origin`` must have the served model's interface."""
    ours = (tuple(artifact.input_size), len(artifact.stages), artifact.num_classes)
    theirs = (tuple(served.input_size), served.stages, served.classes)
    if ours != theirs:
        raise UserError(
            f"{origin} describes another model than '{served.name}': input {ours[0]}, {ours[1]} ATS stages, "
            f"{ours[2]} classes; the served one takes {theirs[0]} with {theirs[1]} stages and {theirs[2]} classes.",
            hint="Pass --model with the file the server serves.",
        )


@dataclass
class Images:
    """The pre-processed images requests carry, with their names and (ImageFolder) class indices."""

    pixels: np.ndarray  # [N, 3, H, W] float32
    names: list[str]
    labels: np.ndarray | None
    source: str
    skipped: list[tuple[str, str]]

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def load_images(data: Path, limit: int | None, target_: Target, console: Console) -> Images:
    """Every readable image of ``data`` (:mod:`ats_deploy.data`'s ImageFolder reader: wnid folders map to ImageNet
    indices)."""
    import torch

    from ats_deploy.data import Skipped, folder_batches, image_folder

    folder = image_folder(data, target_.served.classes, limit=limit)
    skipped = Skipped()
    batches = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"pre-processing {len(folder.files)} images", total=len(folder.files))
        for batch in folder_batches(folder, target_.config, 32, skipped):
            batches.append(batch)
            progress.advance(task, len(batch.names))
    pixels = torch.cat([b.images for b in batches]).numpy()
    labels = np.concatenate([b.labels.numpy() for b in batches]) if folder.labelled else None
    names = [n for b in batches for n in b.names]
    return Images(np.ascontiguousarray(pixels, dtype=np.float32), names, labels, folder.describe(), skipped.files)


def check_request(request: Request) -> None:
    """The numbers of the command line that no server is needed to refuse."""
    for value, option in ((request.duration, "--duration"), (request.timeout, "--timeout")):
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{option} {value:g} is not a positive number of seconds.")
    if request.verify and request.verify < 0:
        raise UserError(f"--verify {request.verify}: give a number of answers to compare, e.g. --verify 50.")
    if not 0 <= request.max_error_rate <= 1:
        raise UserError(f"--max-error-rate {request.max_error_rate:g} is not a share between 0 and 1, e.g. 0.01.")


def check_batch(batch: int, served: ServedModel) -> None:
    """``--batch`` within what the served model takes per request."""
    if batch < 1 or (served.max_batch_size and batch > served.max_batch_size):
        limit = f"1 to {served.max_batch_size}" if served.max_batch_size else "at least 1"
        raise UserError(f"--batch {batch}: model '{served.name}' takes batches of {limit} images per request.")


def plan_output(request: Request) -> Path:
    """``--output``, or a new ``./results/<timestamp>-loadtest/`` (bench's naming), checked writable now."""
    from ats_deploy.atomic import check_folder, output_folder

    folder = output_folder(request.output, "loadtest", "--output")
    check_folder(folder, "--output")
    return folder


def planned_schedule(request: Request) -> Any:
    """The open-loop schedule of ``--step-seconds``, ``--trace`` or ``--slo-ms`` (schedule.py), else None."""
    if not request.scheduled:
        return None
    from .. import schedule

    return schedule.plan(request.rate, request.concurrency, request.step_seconds, request.trace, request.duration,
                         request.slo_ms)
