"""``ats-deploy loadtest``: drive a Triton server serving an ATS model, closed and open loop, and report.

Closed loop (``--concurrency``): N senders, each sending its next request as soon as
its last one is answered, for ``--duration`` seconds. Open loop (``--rate``): requests
arrive at Poisson times, R per second, whatever the server does; latency is measured
from each request's scheduled arrival, so a server that cannot keep up shows latency
growing with its backlog instead of a sender that quietly slows down (coordinated
omission). Each request carries ``--batch`` images of DIR, pre-processed as the
export's metadata says, and one keep of the ``--keep`` mix. ``--verify N`` compares N
answers with the PyTorch reference as ``ats-deploy validate`` does: float-tie flips are
named, anything else is a mismatch.
"""

from __future__ import annotations

import itertools
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from ats_deploy.errors import UserError
from ats_deploy.keep import format_keep

from .triton_client import (
    Client,
    Endpoint,
    ServedModel,
    connect,
    describe_error,
    is_rejection,
    is_timeout,
    is_unreachable,
)

OPEN_LOOP_SENDERS = 32  # requests in flight at most in open loop; later arrivals wait on the client, timed
WARMUP_PER_KEEP = 2  # untimed requests per keep before the first level: connections, the server's first runs
MIX_SEED = 0  # the keep each request picks and the open loop's arrival times are reproducible
DEFAULT_MAX_ERROR_RATE = 0.01  # past this share of failed requests the run exits 1: a healthy server fails none
BACKOFF_S = (0.05, 2.0)  # a sender's wait after its request found no server: first, and at most (doubling)
ATOL = 1e-3  # largest |logit difference| of a token-identical answer (fp32, as bench and validate)
KEEP_USAGE = (
    "give the keeps to mix, comma-separated (--keep 0.5,0.7,1.0); a per-stage keep joins its stage values "
    "with ':' (--keep 1:0.9:0.8:0.7:0.7:0.7:0.6:0.6:0.5)"
)


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
    from ats_deploy.keep import Keep

    if text is None:
        if served.keep_required:
            raise UserError(
                f"model '{served.name}' needs a keep with every request (its config makes keep required).",
                hint="Pass --keep, e.g. --keep 0.7 or a mix: --keep 0.5,0.7,1.0.",
            )
        label = "server default" if default is None else f"server default ({format_keep(default)})"
        return Mix((None,), (label.replace(",", ":"),))
    if not served.takes_keep:
        raise UserError(
            f"model '{served.name}' has no keep input (a static export: its keep is baked in); drop --keep.",
            hint="Serve a --dynamic export to mix keeps.",
        )
    rows, labels = [], []
    for item in (part.strip() for part in text.split(",")):
        try:
            values = tuple(float(v) for v in item.split(":"))
        except ValueError:
            raise UserError(f"cannot read --keep '{text}'.", hint=KEEP_USAGE.capitalize() + ".") from None
        keep = Keep(values)
        rows.append(tuple(keep.per_stage(served.stages)))
        labels.append(str(keep).replace(",", ":"))
    return Mix(tuple(rows), tuple(labels))


# --------------------------------------------------------------------------- what the server serves


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
        from .python_model import PARAMETER

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

    from .repository import default_name

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


# --------------------------------------------------------------------------- the images


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
    """Every readable image of ``data`` (bench's ImageFolder reader: wnid folders map to ImageNet indices)."""
    import torch

    from ats_deploy.bench.data import Skipped, folder_batches, image_folder

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


# --------------------------------------------------------------------------- sending requests


@dataclass
class Answer:
    """One request: what it carried, how it ended, and what came back."""

    index: int
    keep: int  # index into the mix
    images: np.ndarray  # indices into Images
    status: str  # "ok", "error" or "timeout"
    latency_ms: float  # from the scheduled arrival (open loop) or the send (closed loop) to the answer
    finished: float  # time.perf_counter() at the answer
    top1: np.ndarray | None = None
    tokens: np.ndarray | None = None  # [batch, S]
    logits: np.ndarray | None = None  # kept only for answers --verify compares
    error: str | None = None
    served_keep: float | None = None  # the mean keep the server says it ran (a --slo-ms front model's served_keep)
    unreachable: bool = False  # the error was no connection at all: the sender backs off before its next request


@dataclass
class Sender:
    """Builds request ``i`` (its images in turn, its keep from the mix) and sends it; failures are answers too."""

    target: Target
    images: Images
    mix: Mix
    batch: int
    timeout_s: float
    keep_logits: int  # answers to requests 0..keep_logits-1 keep their logits, for --verify

    def client(self) -> Client:
        return Client(self.target.endpoint, self.timeout_s)

    def inputs(self, index: int) -> tuple[np.ndarray, int, np.ndarray | None]:
        """The image indices, the keep's index in the mix and the ``[batch, S]`` keep rows of request ``index``."""
        from ats_deploy.keep import keep_rows

        chosen = (index * self.batch + np.arange(self.batch)) % len(self.images.names)
        keep = self.mix.pick(index)
        row = self.mix.rows[keep]
        return chosen, keep, None if row is None else keep_rows(row, self.batch)

    def __call__(self, client: Client, index: int, scheduled: float) -> Answer:
        chosen, keep, rows = self.inputs(index)
        extra = ("served_keep",) if "served_keep" in self.target.served.outputs else ()
        try:
            logits, tokens, *served = client.infer(self.target.served.name, self.images.pixels[chosen], rows, extra)
        except Exception as err:  # every failure is counted, none stops the run
            finished = time.perf_counter()
            status = "timeout" if is_timeout(err) else "rejected" if is_rejection(err) else "error"
            latency_ms = (finished - scheduled) * 1e3
            return Answer(index, keep, chosen, status, latency_ms, finished, error=describe_error(err),
                          unreachable=is_unreachable(err))
        finished = time.perf_counter()
        latency_ms = (finished - scheduled) * 1e3
        status = "timeout" if latency_ms > self.timeout_s * 1e3 else "ok"
        kept = logits if index < self.keep_logits else None
        served_keep = float(np.mean(served[0])) if served else None
        return Answer(index, keep, chosen, status, latency_ms, finished, logits.argmax(-1), tokens, kept,
                      served_keep=served_keep)

    def expired(self, index: int, scheduled: float) -> Answer:
        """An open-loop arrival that waited on the client past the timeout: never sent, counted as a timeout."""
        chosen, keep, _ = self.inputs(index)
        now = time.perf_counter()
        return Answer(index, keep, chosen, "timeout", (now - scheduled) * 1e3, now, error="waited past --timeout")


def warm_up(sender: Sender) -> None:
    """A few untimed requests of every keep; the first failure stops the run with the server's own message."""
    with sender.client() as client:
        for index in range(WARMUP_PER_KEEP * len(sender.mix.rows)):
            answer = sender(client, index, time.perf_counter())
            if answer.status == "error":
                raise UserError(
                    f"the server refused a request to model '{sender.target.served.name}': {answer.error}",
                    hint="Is it an ATS export served with `ats-deploy serve`? Check the server's log.",
                )


class Backoff:
    """A sender's wait after a request that found no server, doubling up to a limit, reset by any answer.

    Without it a dead server costs thousands of failed connections a second and nothing is learnt from them.
    """

    def __init__(self) -> None:
        self.wait = 0.0

    def after(self, answer: Answer) -> None:
        if not answer.unreachable:
            self.wait = 0.0
            return
        first, most = BACKOFF_S
        self.wait = min(most, self.wait * 2 or first)
        time.sleep(self.wait)


def closed_loop(sender: Sender, concurrency: int, duration: float, tick: Callable[[float], None]) -> list[Answer]:
    """``concurrency`` senders, each sending its next request when its last is answered, for ``duration`` s."""
    answers: list[Answer] = []
    counter = itertools.count()
    start = time.perf_counter()

    def run() -> None:
        backoff = Backoff()
        with sender.client() as client:
            while time.perf_counter() - start < duration:
                answers.append(sender(client, next(counter), time.perf_counter()))
                backoff.after(answers[-1])

    threads = [threading.Thread(target=run, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    _join(threads, start, tick)
    return answers


def _join(threads: list[threading.Thread], start: float, tick: Callable[[float], None]) -> None:
    """Wait for every thread, ticking the progress bar meanwhile."""
    for thread in threads:
        while thread.is_alive():
            tick(time.perf_counter() - start)
            thread.join(0.1)


def arrivals(rate: float, duration: float) -> np.ndarray:
    """Poisson arrival times in ``[0, duration)``: exponential gaps of mean ``1/rate`` (seeded)."""
    generator = np.random.default_rng(MIX_SEED)
    gaps = generator.exponential(1.0 / rate, size=int(rate * duration * 2 + 20))
    times = np.cumsum(gaps)
    while times[-1] < duration:  # rare: the draw ran short
        times = np.concatenate([times, times[-1] + np.cumsum(generator.exponential(1.0 / rate, size=len(gaps)))])
    return times[times < duration]


def open_loop(sender: Sender, rate: float, duration: float, tick: Callable[[float], None],
              times: np.ndarray | None = None) -> list[Answer]:
    """Requests at Poisson arrival times (or at ``times``, s from the start); each one's latency runs from its
    scheduled arrival, queueing included."""
    answers: list[Answer] = []
    pending: queue.Queue[tuple[int, float] | None] = queue.Queue()
    schedule = arrivals(rate, duration) if times is None else times

    def run() -> None:
        backoff = Backoff()
        with sender.client() as client:
            while (item := pending.get()) is not None:
                index, scheduled = item
                if time.perf_counter() - scheduled > sender.timeout_s:
                    answers.append(sender.expired(index, scheduled))
                else:
                    answers.append(sender(client, index, scheduled))
                    backoff.after(answers[-1])

    threads = [threading.Thread(target=run, daemon=True) for _ in range(min(OPEN_LOOP_SENDERS, len(schedule) or 1))]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    for index, due in enumerate(schedule):
        wait = start + due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        pending.put((index, start + due))
        tick(due)
    for _ in threads:
        pending.put(None)
    _join(threads, start, tick)
    return answers


# --------------------------------------------------------------------------- one level's figures


@dataclass
class KeepStats:
    """The answers of one keep of the mix within a level."""

    label: str
    requests: int
    mean_tokens: list[float]  # per stage, over the images answered
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.label, "requests": self.requests, "mean_tokens_per_stage": self.mean_tokens,
                "accuracy": self.accuracy}


@dataclass
class LevelStats:
    """What one level measured: throughput, latency of the answered requests, failures, tokens and accuracy."""

    level: Level
    wall_s: float
    requests: int
    ok: int
    errors: int
    timeouts: int
    error_examples: list[str]
    latency_ms: dict[str, float | None]  # p50, p90, p99, mean over the answered requests (None: none answered)
    requests_per_s: float
    images_per_s: float
    mean_tokens: list[float]  # per stage
    accuracy: float | None  # top-1 over the answered images; None without labels
    accuracy_se: float | None  # its standard error over the distinct images answered
    distinct_images: int
    per_keep: list[KeepStats]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.level.mode,
            "load": self.level.load,
            "label": self.level.label,
            "wall_s": self.wall_s,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "error_examples": self.error_examples,
            "latency_ms": self.latency_ms,
            "requests_per_s": self.requests_per_s,
            "images_per_s": self.images_per_s,
            "mean_tokens_per_stage": self.mean_tokens,
            "accuracy": self.accuracy,
            "accuracy_se": self.accuracy_se,
            "distinct_images": self.distinct_images,
            "per_keep": [k.to_dict() for k in self.per_keep],
        }


def level_stats(level: Level, answers: list[Answer], start: float, images: Images, mix: Mix) -> LevelStats:
    """The figures of one level; throughput counts answered requests over the time to the last answer."""
    ok = [a for a in answers if a.status == "ok"]
    wall = max((a.finished for a in answers), default=start) - start
    latencies = np.array([a.latency_ms for a in ok])
    percentiles = {f"p{q}": float(np.percentile(latencies, q)) if ok else None for q in (50, 90, 99)}
    examples = list(dict.fromkeys(a.error for a in answers if a.error))[:3]
    accuracy, se, distinct = _accuracy(ok, images)
    return LevelStats(
        level=level,
        wall_s=wall,
        requests=len(answers),
        ok=len(ok),
        errors=sum(a.status == "error" for a in answers),
        timeouts=sum(a.status == "timeout" for a in answers),
        error_examples=examples,
        latency_ms={**percentiles, "mean": float(latencies.mean()) if ok else None},
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        images_per_s=sum(len(a.images) for a in ok) / wall if wall > 0 else 0.0,
        mean_tokens=_mean_tokens(ok),
        accuracy=accuracy,
        accuracy_se=se,
        distinct_images=distinct,
        per_keep=[_keep_stats(label, [a for a in ok if a.keep == k], images) for k, label in enumerate(mix.labels)],
    )


def _mean_tokens(answers: list[Answer]) -> list[float]:
    if not answers:
        return []
    return [float(v) for v in np.concatenate([a.tokens for a in answers]).mean(axis=0)]


def _accuracy(answers: list[Answer], images: Images) -> tuple[float | None, float | None, int]:
    """Top-1 over every answered image, and its standard error over the distinct images (repeats are not new data)."""
    if not answers:
        return None, None, 0
    chosen = np.concatenate([a.images for a in answers])
    distinct = len(np.unique(chosen))
    if images.labels is None:
        return None, None, distinct
    correct = np.concatenate([a.top1 for a in answers]) == images.labels[chosen]
    p = float(correct.mean())
    return p, math.sqrt(p * (1 - p) / distinct), distinct


def _keep_stats(label: str, answers: list[Answer], images: Images) -> KeepStats:
    return KeepStats(label, len(answers), _mean_tokens(answers), _accuracy(answers, images)[0])


# --------------------------------------------------------------------------- --verify


@dataclass
class Verification:
    """``--verify``: answers compared with the PyTorch reference, one validation case per keep of the mix."""

    asked: int  # answers asked for (--verify N)
    answers: int  # answers compared: fewer when fewer came back
    cases: list[Any]  # ats_deploy.exporters.validate.Case

    @property
    def compared(self) -> int:
        return sum(c.images for c in self.cases)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "answers": self.answers,
            "images": self.compared,
            "ok": self.ok,
            "cases": [{"keep": c.keep_label, **c.to_dict()} for c in self.cases],
        }


def reference_model(request: Request, target_: Target) -> Any:
    """The PyTorch reference ``--verify`` compares with: ``--checkpoint`` (or the export's own), its arch and stages."""
    from ats_deploy.checkpoints import load_model

    artifact = target_.artifact
    if artifact is None:
        raise UserError(
            "--verify needs the served export's architecture and ATS stages, and the server does not give them.",
            hint="Pass --model FILE with the exported file the server serves.",
        )
    source = request.checkpoint or artifact.source_checkpoint
    if not source:
        raise UserError("--verify needs the checkpoint the served model was exported from.",
                        hint="Pass --checkpoint PATH (or random:SEED).")
    return load_model(source, arch=artifact.arch, stages=list(artifact.stages), trust_code=request.trust_checkpoint)


def verify(answers: list[Answer], count: int, model: Any, sender: Sender) -> Verification:
    """Compare ``count`` answers (those that kept their logits) with the reference on the same pixels and keep rows.

    An int8 export is judged by top-1 agreement against its precision's bar, as export and bench judge it.
    """
    import torch

    from ats_deploy.exporters import validate

    judge = validate.Judge(model, ATOL)
    default = sender.target.default_keep
    precision = validate.judged_by_agreement(sender.target.artifact.precision)
    cases = [validate.Case(keep=list(row) if row else default, batch=sender.batch, precision=precision)
             for row in sender.mix.rows]
    chosen = [a for a in answers if a.logits is not None][:count]
    for answer in chosen:
        case = cases[answer.keep]
        pixels = torch.from_numpy(sender.images.pixels[answer.images])
        keep = case.rows(len(answer.images))
        observed = validate.samples(answer.logits, answer.tokens)
        expected = validate.reference_samples(model, pixels, keep)
        names = [f"request {answer.index}: {sender.images.names[i]}" for i in answer.images]
        validate.compare_batch(case, judge, names, pixels, keep, observed, expected)
    return Verification(count, len(chosen), [c for c in cases if c.images or c.failures])


# --------------------------------------------------------------------------- the whole run


@dataclass
class LoadTest:
    """Everything a load test measured and the conditions it ran under."""

    created: str
    target: dict[str, Any]
    data: dict[str, Any]
    keep_mix: list[str]
    batch: int
    duration_s: float
    timeout_s: float
    levels: list[LevelStats]
    verification: Verification | None = None
    warnings: list[str] = field(default_factory=list)
    slo: dict[str, Any] | None = None  # a schedule's per-step figures and SLO attainment (slo_report.summarize)

    @property
    def title(self) -> str:
        t = self.target
        return (
            f"loadtest {t['url']} model '{t['name']}' | keep {', '.join(self.keep_mix)} | batch {self.batch} | "
            f"{self.duration_s:g} s per level"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "created": self.created,
            "model": self.target,
            "data": self.data,
            "keep_mix": self.keep_mix,
            "batch": self.batch,
            "duration_s": self.duration_s,
            "timeout_s": self.timeout_s,
            "latency_from": "the send (closed loop) or the scheduled Poisson arrival (open loop)",
            "levels": [level.to_dict() for level in self.levels],
            "verification": None if self.verification is None else self.verification.to_dict(),
            "schedule": self.slo,
            "warnings": self.warnings,
        }


def _check_request(request: Request) -> None:
    for value, option in ((request.duration, "--duration"), (request.timeout, "--timeout")):
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{option} {value:g} is not a positive number of seconds.")
    if request.verify and request.verify < 0:
        raise UserError(f"--verify {request.verify}: give a number of answers to compare, e.g. --verify 50.")
    if not 0 <= request.max_error_rate <= 1:
        raise UserError(f"--max-error-rate {request.max_error_rate:g} is not a share between 0 and 1, e.g. 0.01.")


class TooManyErrors(UserError):
    """More requests failed than --max-error-rate allows: the figures measured a broken server, not a model."""

    exit_code = 1


def check_errors(result: LoadTest, max_rate: float) -> None:
    """Refuse a run whose share of failed requests (errors, not timeouts) is over ``max_rate``, naming the first."""
    sent = sum(level.requests for level in result.levels)
    failed = sum(level.errors for level in result.levels)
    if sent and failed / sent > max_rate:
        first = next((e for level in result.levels for e in level.error_examples), "no message")
        raise TooManyErrors(
            f"{failed} of {sent} requests failed ({100 * failed / sent:.1f}%, more than --max-error-rate "
            f"{100 * max_rate:g}%); the first: {first}",
            hint="Check that the server is up and serves this model (its log says why it refused them).",
        )


def _check_batch(batch: int, served: ServedModel) -> None:
    if batch < 1 or (served.max_batch_size and batch > served.max_batch_size):
        limit = f"1 to {served.max_batch_size}" if served.max_batch_size else "at least 1"
        raise UserError(f"--batch {batch}: model '{served.name}' takes batches of {limit} images per request.")


def plan_output(request: Request) -> Path:
    """``--output``, or a new ``./results/<timestamp>-loadtest/`` (bench's naming), checked writable now."""
    from ats_deploy.bench.run import check_folder, output_folder

    folder = output_folder(request.output, "loadtest", "--output")
    check_folder(folder, "--output")
    return folder


def run_levels(sender: Sender, levels: list[Level], duration: float, images: Images, console: Console) -> tuple[
    list[LevelStats], list[Answer]
]:
    """Every level in turn, with a progress bar each; the answers that kept their logits, for --verify."""
    stats, kept = [], []
    with Progress(console=console, transient=True) as progress:
        for level in levels:
            task = progress.add_task(level.label, total=duration)
            start = time.perf_counter()
            tick = lambda elapsed, task=task: progress.update(task, completed=min(elapsed, duration))  # noqa: E731
            if level.mode == "closed":
                answers = closed_loop(sender, int(level.load), duration, tick)
            else:
                answers = open_loop(sender, level.load, duration, tick)
            progress.remove_task(task)
            stats.append(level_stats(level, answers, start, images, sender.mix))
            kept.extend(sorted((a for a in answers if a.logits is not None), key=lambda a: a.index))
    return stats, kept


def loadtest(request: Request, console: Console, show: Callable[[LoadTest], None] | None = None) -> tuple[
    LoadTest, list[Path]
]:
    """Check everything a user can get wrong first (levels, output, server, keep, data), then load and report.

    ``show`` gets the results before they are written, so a write that fails (a full disk) loses no figures.
    """
    from .loadtest_report import write

    _check_request(request)
    schedule = _schedule(request)
    levels = [Level("open", schedule.mean_rate)] if schedule else parse_levels(request.concurrency, request.rate)
    folder = plan_output(request)
    target_, warnings = target(request, Endpoint.parse(request.url))
    _check_batch(request.batch, target_.served)
    mix = parse_mix(request.keep, target_.served, target_.default_keep)
    model = reference_model(request, target_) if request.verify else None
    images = load_images(request.data, request.images, target_, console)
    quota = math.ceil(request.verify / len(levels)) if request.verify else 0
    sender = Sender(target_, images, mix, request.batch, request.timeout, quota)
    warm_up(sender)
    _quiet_collector()
    if schedule is not None:
        stats, kept, answers = run_schedule(sender, schedule, images, console)
    else:
        stats, kept = run_levels(sender, levels, request.duration, images, console)
    result = LoadTest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target=target_.summary(),
        data={"source": images.source, "images": len(images.names), "labelled": images.labelled,
              "skipped_corrupt": len(images.skipped)},
        keep_mix=list(mix.labels),
        batch=request.batch,
        duration_s=request.duration,
        timeout_s=request.timeout,
        levels=stats,
        warnings=warnings,
    )
    if model is not None:
        result.verification = verify(kept, request.verify, model, sender)
    if schedule is not None:
        result.slo = _slo_summary(answers, schedule, images, request.slo_ms)
    if show is not None:
        show(result)
    try:
        files = write(result, folder)
        if schedule is not None:
            files.append(_slo_plot(answers, schedule, images, request.slo_ms, folder))
        return result, files
    except OSError as exc:
        raise UserError(f"cannot write the results to {folder}: {exc.strerror or exc}.",
                        hint="The figures are above; free some space or pass --output with another folder.") from None


# --------------------------------------------------------------------------- schedules and SLO attainment


def _quiet_collector() -> None:
    """Exempt what is loaded by now (torch, the images: ~400k objects) from Python's garbage collector.

    Its full collections took ~0.3-0.5 s on a loaded 2-core machine, during which no answer is read, so every
    request in flight showed that much more latency than the server gave it.
    """
    import gc

    gc.collect()
    gc.freeze()


def _schedule(request: Request) -> Any:
    """The open-loop schedule of ``--step-seconds``, ``--trace`` or ``--slo-ms`` (schedule.py), else None."""
    if not request.scheduled:
        return None
    from . import schedule

    return schedule.plan(request.rate, request.concurrency, request.step_seconds, request.trace, request.duration,
                         request.slo_ms)


def run_schedule(sender: Sender, schedule: Any, images: Images, console: Console) -> tuple[
    list[LevelStats], list[Answer], list[Answer]
]:
    """The whole schedule as one open-loop level; its figures, the answers kept for --verify, and every answer."""
    level = Level("open", schedule.mean_rate)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(schedule.origin, total=schedule.duration)
        start = time.perf_counter()
        answers = open_loop(sender, level.load, schedule.duration,
                            lambda elapsed: progress.update(task, completed=min(elapsed, schedule.duration)),
                            times=schedule.times)
    answers.sort(key=lambda a: a.index)
    kept = [a for a in answers if a.logits is not None]
    return [level_stats(level, answers, start, images, sender.mix)], kept, answers


def _outcomes(answers: list[Answer], schedule: Any, images: Images) -> Any:
    from .slo_report import Outcomes

    correct = None
    if images.labels is not None:
        correct = np.array([float(np.mean(a.top1 == images.labels[a.images])) if a.top1 is not None else np.nan
                            for a in answers])
    return Outcomes(
        scheduled=np.array([schedule.times[a.index] for a in answers]),
        latency_ms=np.array([a.latency_ms for a in answers]),
        status=np.array([a.status for a in answers]),
        keep=np.array([np.nan if a.served_keep is None else a.served_keep for a in answers]),
        correct=correct,
    )


def _slo_summary(answers: list[Answer], schedule: Any, images: Images, slo_ms: float | None) -> dict[str, Any]:
    from .slo_report import summarize

    return {"origin": schedule.origin, **summarize(_outcomes(answers, schedule, images), schedule.steps, slo_ms)}


def _slo_plot(answers: list[Answer], schedule: Any, images: Images, slo_ms: float | None, folder: Path) -> Path:
    from .slo_report import PLOT, plot

    return plot(_outcomes(answers, schedule, images), slo_ms, folder / PLOT)
