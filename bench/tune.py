"""``ats-deploy tune``: a device profile's keep values, chosen from measurements on the device itself.

ATS adapts one trained model to a device at inference time only; tune turns that into a profile. On the
profile's backend and batch (bench's rules: :func:`bench.run.plan`) it measures, for each keep setting, the top-1
accuracy on ``--data``, the p50 latency (interleaved with the dense export so that drift hits both, warm-up
excluded: :func:`bench.timing.interleaved`) and the mean GFLOPs, then picks the fastest setting within
``--max-drop`` points of the dense model's top-1, or the most accurate setting with p50 <= ``--latency-ms``.
Class folders are labels (ImageNet wnids, ``--class-map`` or the sorted folder order: top-1 accuracy); a flat
folder of images has none, and every setting is then scored by top-1 agreement with the dense model.

The search measures at most ``len(COARSE) + 2 * ROUNDS * S`` settings for a model with S ATS stages:

1. one keep for every stage, from :data:`COARSE`: 1.0 (the paper's K = n0) down to 0.3 in steps of 0.1, fractions
   of the model's tokens (ATS_SPEC section 2); lower budgets are left to the refinement, which starts next to
   the best of these;
2. a coordinate search from the best of those: each stage in turn tries its value +- :data:`STEP` with the
   other stages fixed and keeps a change that ranks better (:meth:`Objective.rank`: meeting the constraint first,
   then the objective); at most :data:`ROUNDS` rounds, fewer when a round changes nothing. A neighbour that keeps
   the same tokens as the current setting (a later stage cannot keep more than an earlier one passes on) computes
   the same, so it is never moved to on a latency difference, which can only be noise.

The chosen setting is the best-ranked of every setting measured for this model under these conditions (this
run's and those the log already held, which an earlier run with another objective may have found off this run's
search path); the closest one when none meets the constraint.

Two keep values that give the same integer budgets are one setting, measured once. Every finished measurement
is appended to a JSON-lines log as it completes; a rerun under the same conditions (model file, reference,
backend, profile timing settings, images) replays the search from it and measures only what is missing. The
objective is not a condition: ``--max-drop 1`` then ``--latency-ms 20`` reuse the same measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ats_deploy.atomic import write_atomic
from ats_deploy.ats import budget_int
from ats_deploy.backends import Runner
from ats_deploy.backends.pytorch_cpu import TorchRunner
from ats_deploy.checkpoints import sha256_file
from ats_deploy.errors import UserError
from ats_deploy.exporters.onnx_export import check_output_path
from ats_deploy.flops import CostModel
from ats_deploy.images import data_config
from ats_deploy.model import build, format_keep
from ats_deploy.profiles import LOCAL_DIR, dump_profile

from . import machine, run
from .data import ImageFolder, Skipped, folder_batches
from .evaluate import TIMING_BATCHES, pad
from .plots import save
from .source import Exported, reference
from .timing import interleaved, paired_ratio

COARSE = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
STEP = 0.05  # half the coarse step: the refinement looks between the coarse values
MIN_KEEP = 0.1
ROUNDS = 3
SEPARABLE = 2.0  # differences within this many standard errors are reported as not told apart by the data
LOG_VERSION = 1

Keep = tuple[float, ...]


class BudgetNotMet(UserError):
    """No measured setting meets the constraint: the closest is reported; the log and a ``.failed`` plot are kept."""

    exit_code = 1


@dataclass(frozen=True)
class Request:
    """What the user asked for on the command line."""

    profile: str | None
    data: Path | None
    max_drop: float | None = None
    latency_ms: float | None = None
    model: Path | None = None
    output: Path | None = None
    log: Path | None = None
    fresh: bool = False
    images: int | None = None
    backend: str | None = None
    class_map: Path | None = None
    checkpoint: str | None = None
    trust_checkpoint: bool = False


# --------------------------------------------------------------------------- measurements


def _bits(correct: np.ndarray) -> str:
    return "".join("1" if c else "0" for c in correct)


def _unbits(text: str) -> np.ndarray:
    return np.array([c == "1" for c in text], dtype=bool)


@dataclass(frozen=True)
class Dense:
    """The dense export on the images: which it gets right, and its cost."""

    correct: np.ndarray  # [images] bool
    gflops: float
    skipped: list[tuple[str, str]]  # unreadable files: name, reason

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def to_record(self) -> dict[str, Any]:
        return {"kind": "dense", "correct": _bits(self.correct), "gflops": self.gflops, "skipped": self.skipped}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Dense:
        skipped = [(name, reason) for name, reason in record["skipped"]]
        return cls(_unbits(record["correct"]), float(record["gflops"]), skipped)


@dataclass(frozen=True)
class Measurement:
    """One keep setting: per-image correctness, mean GFLOPs, and p50 latencies from the same interleaved rounds."""

    keep: Keep
    correct: np.ndarray  # [images] bool
    gflops: float
    p50_ms: float
    dense_p50_ms: float  # the dense export, timed in the same rounds
    tokens: list[float]  # mean kept tokens per ATS stage
    # The dense export's time over this setting's, round by round (timing.paired_ratio), so that drift cancels.
    speedup: float

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def to_record(self, n0: int) -> dict[str, Any]:
        return {
            "kind": "setting",
            "keep": list(self.keep),
            "budgets": list(budgets(self.keep, n0)),
            "correct": _bits(self.correct),
            "gflops": self.gflops,
            "p50_ms": self.p50_ms,
            "dense_p50_ms": self.dense_p50_ms,
            "tokens": self.tokens,
            "speedup": self.speedup,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Measurement:
        return cls(
            keep=tuple(float(v) for v in record["keep"]),
            correct=_unbits(record["correct"]),
            gflops=float(record["gflops"]),
            p50_ms=float(record["p50_ms"]),
            dense_p50_ms=float(record["dense_p50_ms"]),
            tokens=[float(v) for v in record["tokens"]],
            # logs written before the paired speedup: the ratio of the two medians
            speedup=float(record.get("speedup", record["dense_p50_ms"] / record["p50_ms"])),
        )


def budgets(keep: Keep, n0: int) -> tuple[int, ...]:
    """The integer budget K of every stage: what identifies a setting (ATS_SPEC section 2)."""
    return tuple(budget_int(k, n0) for k in keep)


# --------------------------------------------------------------------------- statistics and choice


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over the same images, in points, and its standard error std(diff) / sqrt(n).

    ``a`` and ``b`` are per-image correctness; the sample standard deviation is used, so the SE is nan for
    fewer than two images.
    """
    diff = a.astype(np.float64) - b.astype(np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return 100.0 * float(diff.mean()), 100.0 * se


def told_apart(difference: float, se: float) -> bool:
    """Whether the data resolves a difference: more than :data:`SEPARABLE` standard errors from zero."""
    return abs(difference) > SEPARABLE * se  # False for a nan SE: too few images to tell


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates, by increasing cost.

    A point is ``(cost, value)``: lower cost and higher value are better. ``a`` dominates ``b`` when it is no
    worse in both and differs from it, so identical points are all kept.
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def check_objective(max_drop: float | None, latency_ms: float | None) -> None:
    """Exactly one of --max-drop / --latency-ms, with a usable value."""
    choices = (
        "--max-drop POINTS (the fastest setting within POINTS of the dense model's top-1) or "
        "--latency-ms MS (the most accurate setting with p50 <= MS)"
    )
    if max_drop is None and latency_ms is None:
        raise UserError(f"tune needs an objective: {choices}.")
    if max_drop is not None and latency_ms is not None:
        raise UserError(f"give one objective, not both: {choices}.")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise UserError(f"--max-drop must be a number of points >= 0, got {max_drop}.")
    if latency_ms is not None and not (math.isfinite(latency_ms) and latency_ms > 0):
        raise UserError(f"--latency-ms must be a number of milliseconds > 0, got {latency_ms}.")


@dataclass(frozen=True)
class Objective:
    """Fastest within ``max_drop`` points of dense top-1, or most accurate with p50 <= ``latency_ms``."""

    max_drop: float | None
    latency_ms: float | None
    dense_accuracy: float

    def meets(self, m: Measurement) -> bool:
        if self.max_drop is not None:
            return self.drop(m) <= self.max_drop + 1e-9
        return m.p50_ms <= self.latency_ms

    def drop(self, m: Measurement) -> float:
        """Points of top-1 below the dense model."""
        return 100.0 * (self.dense_accuracy - m.accuracy)

    def rank(self, m: Measurement) -> tuple[float, ...]:
        """Lower is better: settings that meet the constraint by the objective, then the others by closeness.

        Ties go to the cheaper setting (GFLOPs for the fastest, p50 for the most accurate).
        """
        if self.max_drop is not None:
            if self.meets(m):
                return (0, m.p50_ms, m.gflops)
            return (1, self.drop(m) - self.max_drop, m.p50_ms)
        if self.meets(m):
            return (0, -m.accuracy, m.p50_ms)
        return (1, m.p50_ms - self.latency_ms, -m.accuracy)

    def describe(self) -> str:
        if self.max_drop is not None:
            return f"the fastest setting (p50) within {self.max_drop:g} points of the dense model's top-1"
        return f"the most accurate setting (top-1) with p50 <= {self.latency_ms:g} ms"


# --------------------------------------------------------------------------- search


def neighbours(keep: Keep, stage: int) -> list[Keep]:
    """``keep`` with ``stage`` one :data:`STEP` lower and higher, within [MIN_KEEP, 1]."""
    result = []
    for value in (keep[stage] - STEP, keep[stage] + STEP):
        value = round(value, 4)
        if MIN_KEEP - 1e-9 <= value <= 1.0 + 1e-9:
            result.append((*keep[:stage], value, *keep[stage + 1 :]))
    return result


def evaluations_bound(stages: int) -> int:
    return len(COARSE) + 2 * ROUNDS * stages


def search(
    measure: Callable[[Keep], Measurement], rank: Callable[[Measurement], tuple[float, ...]], stages: int
) -> Measurement:
    """The coarse uniform grid, then the coordinate refinement around its best; returns where the search ends.

    A neighbour that keeps the same tokens as the current setting computes the same, so a latency difference
    between them is noise: it is measured but never moved to. ``measure`` is called at most
    :func:`evaluations_bound` times.
    """
    best = min((measure((value,) * stages) for value in COARSE), key=rank)
    for _ in range(ROUNDS):
        start = best
        for stage in range(stages):
            candidates = [measure(keep) for keep in neighbours(best.keep, stage)]
            moves = [m for m in candidates if m.tokens != best.tokens]
            best = min([best, *moves], key=rank)  # min keeps the first of equals: only a gain moves
        if best is start:
            break
    return best


def choose(settings: Sequence[Measurement], rank: Callable[[Measurement], tuple[float, ...]]) -> Measurement:
    """The best-ranked of ``settings``: every measurement, not only the search's path, which depends on the objective.

    Settings that keep the same tokens compute the same, so only the first measured of them competes: as in the
    search, a latency difference between them is noise and never decides.
    """
    first: dict[tuple[float, ...], Measurement] = {}
    for m in settings:
        first.setdefault(tuple(m.tokens), m)
    return min(first.values(), key=rank)


# --------------------------------------------------------------------------- the log


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Log:
    """The JSON-lines record of a tune: a header with the conditions, then one line per finished measurement."""

    def __init__(self, path: Path, n0: int) -> None:
        self.path = path
        self.n0 = n0
        self.dense: Dense | None = None
        self.settings: dict[tuple[int, ...], Measurement] = {}

    @classmethod
    def open(cls, path: Path, header: dict[str, Any], n0: int, fresh: bool) -> Log:
        """Resume the log at ``path`` when it was written under ``header``'s conditions, else start one."""
        log = cls(path, n0)
        if fresh or not path.exists():
            write_atomic(path, (json.dumps(header) + "\n").encode("utf-8"))
            return log
        records = log._read()
        first = records[0] if records and isinstance(records[0], dict) else {}
        log._check_header(first, header["conditions"])
        for record in records[1:]:
            log._load(record)
        return log

    def _refuse(self, problem: str) -> UserError:
        return UserError(
            f"log {self.path} {problem}",
            hint="Pass --fresh to discard it and measure again, or --log FILE to keep it and write another log.",
        )

    def _read(self) -> list[dict[str, Any]]:
        """The log's records; an unfinished last line (a run killed while writing) is dropped from the file."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as err:
            raise self._refuse(f"cannot be read: {err}.") from None
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise self._refuse(f"is damaged at line {number}.") from None
        if lines and (len(records) < len(lines) or not lines[-1].endswith("\n")):
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
        return records

    def _check_header(self, first: dict[str, Any], conditions: dict[str, Any]) -> None:
        if first.get("kind") != "header" or first.get("version") != LOG_VERSION:
            raise self._refuse("is not a log of this version of `ats-deploy tune`.")
        logged = first.get("conditions", {})
        if logged != conditions:
            differ = sorted(k for k in {*logged, *conditions} if logged.get(k) != conditions.get(k))
            raise self._refuse(
                f"holds measurements taken under other conditions (they differ in: {', '.join(differ)}); "
                "tune does not mix them."
            )

    def _load(self, record: dict[str, Any]) -> None:
        try:
            if record["kind"] == "dense":
                self.dense = Dense.from_record(record)
            else:
                m = Measurement.from_record(record)
                self.settings[budgets(m.keep, self.n0)] = m
        except (KeyError, TypeError, ValueError, AttributeError):
            raise self._refuse(f"has a record tune cannot read: {json.dumps(record)[:80]}...") from None

    def add_dense(self, dense: Dense) -> None:
        _append_line(self.path, dense.to_record())
        self.dense = dense

    def add(self, m: Measurement) -> None:
        if self.dense is not None and len(m.correct) != len(self.dense.correct):
            raise self._refuse(
                f"was measured on {len(self.dense.correct)} readable images, and {len(m.correct)} read now: "
                "the images changed."
            )
        _append_line(self.path, m.to_record(self.n0))
        self.settings[budgets(m.keep, self.n0)] = m


# --------------------------------------------------------------------------- measuring on the device


@dataclass
class _Rig:
    """Everything a measurement needs, set up once: runtimes, images (padded to the batch) and the cost model."""

    ats: Runner
    dense: Runner
    batches: list[tuple[torch.Tensor, int]]  # images padded to the profile's batch, and how many are real
    labels: np.ndarray | None  # None for a flat folder: then the dense model's top-1 is the truth
    cost: CostModel
    skipped: Skipped


class Device:
    """Measures settings on this machine, with progress bars.

    The set-up (reference, dense export, runtimes, images) waits for the first new measurement, so a resumed
    run that finds everything in its log loads nothing.
    """

    def __init__(self, plan: run.Plan, request: Request, status: Console, stack: contextlib.ExitStack) -> None:
        self.plan, self.request, self.status, self.stack = plan, request, status, stack
        self.progress = Progress(console=status, transient=True)
        bound = evaluations_bound(len(plan.exported.stages))
        self.sweep = self.progress.add_task(f"settings (at most {bound})", total=bound)
        self.current = self.progress.add_task("", total=None)

    def visited(self) -> None:
        self.progress.advance(self.sweep)

    @cached_property
    def rig(self) -> _Rig:
        plan = self.plan
        with self.status.status("loading the PyTorch reference"):
            model = reference(plan.exported, self.request.checkpoint, self.request.trust_checkpoint, plan.warnings)
        dense = build(model.vit, model.arch, stages=[])
        if not plan.target.backend.exports:
            ats, baseline = TorchRunner(model), TorchRunner(dense)
        else:
            workdir = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="ats-tune-")))
            dense_onnx = run.dense_export(plan, dense, workdir, self.status)
            ats, baseline = run.exported_runners(plan, plan.target, dense_onnx, workdir, self.status)
        assert isinstance(plan.data, ImageFolder)  # tune requires --data
        skipped, size, batches, labels = Skipped(), plan.profile.batch, [], []
        with self.status.status(f"reading {len(plan.data.files)} images"):
            for batch in folder_batches(plan.data, data_config(model.vit), size, skipped):
                batches.append((pad(batch.images, size), len(batch.names)))
                if batch.labels is not None:
                    labels.append(batch.labels.numpy())
        self.progress.start()
        self.stack.callback(self.progress.stop)
        truth = np.concatenate(labels) if labels else None
        return _Rig(ats, baseline, batches, truth, CostModel.of(model), skipped)

    @cached_property
    def truth(self) -> np.ndarray:
        """The labels, or for unlabelled data the dense model's own top-1 (scores become agreement)."""
        rig = self.rig
        return rig.labels if rig.labels is not None else self._predict(rig.dense, torch.zeros(0), "dense model")[0]

    def _predict(self, runner: Runner, keep: torch.Tensor, title: str) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 and kept tokens of every image."""
        rig = self.rig
        total = sum(count for _, count in rig.batches)
        self.progress.reset(self.current, total=total, description=f"{title}: accuracy")
        top1, tokens = [], []
        for images, count in rig.batches:
            logits, kept = runner(images, keep)
            top1.append(logits[:count].argmax(axis=-1))
            tokens.append(kept[:count])
            self.progress.advance(self.current, count)
        return np.concatenate(top1), np.concatenate(tokens)

    def dense(self) -> Dense:
        rig = self.rig
        top1, _ = self._predict(rig.dense, torch.zeros(0), "dense model")
        return Dense(top1 == self.truth, rig.cost.dense_gflops(), list(rig.skipped.files))

    def setting(self, keep: Keep) -> Measurement:
        rig, profile = self.rig, self.plan.profile
        title = f"keep {format_keep(keep)}"
        values = torch.tensor(keep, dtype=torch.float32)
        top1, tokens = self._predict(rig.ats, values, title)
        inputs = [images for images, _ in rig.batches[:TIMING_BATCHES]]
        none = torch.zeros(0)
        calls = {
            "dense": lambda round_: rig.dense(inputs[round_ % len(inputs)], none),
            "ats": lambda round_: rig.ats(inputs[round_ % len(inputs)], values),
        }
        rounds = profile.warmup + profile.iterations
        self.progress.reset(self.current, total=rounds, description=f"{title}: latency, interleaved with dense")
        latency = interleaved(
            calls, profile.batch, profile.warmup, profile.iterations, lambda: self.progress.advance(self.current)
        )
        return Measurement(
            keep=keep,
            correct=top1 == self.truth,
            gflops=float(rig.cost.gflops(tokens).mean()),
            p50_ms=latency["ats"].p50,
            dense_p50_ms=latency["dense"].p50,
            tokens=[float(v) for v in tokens.mean(axis=0)],
            speedup=paired_ratio(latency["dense"], latency["ats"]),
        )


# --------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """Every measured setting, the choice, and where the results went."""

    plan: run.Plan
    objective: Objective
    dense: Dense
    settings: list[Measurement]
    best: Measurement  # the best-ranked of all settings: the chosen one, or the closest when none meets the constraint
    measured_now: int
    created: str
    environment: dict[str, Any]
    model_sha256: str
    output: Path
    log: Path

    @property
    def met(self) -> bool:
        return self.objective.meets(self.best)

    @property
    def plot(self) -> Path:
        """The Pareto plot: beside the profile it explains, or, for a failed run, named so (no profile matches it)."""
        return self.output.with_suffix(".pareto.png" if self.met else ".failed.pareto.png")

    @property
    def runner_up(self) -> Measurement | None:
        """The best-ranked setting that computes something else than the chosen one (other kept tokens)."""
        others = [m for m in self.settings if m.tokens != self.best.tokens]
        return min(others, key=self.objective.rank) if others else None

    @property
    def dense_p50_ms(self) -> float:
        """Median of the dense export's p50 over every interleaved run."""
        return float(np.median([m.dense_p50_ms for m in self.settings]))

    @property
    def images(self) -> int:
        return len(self.dense.correct)

    @property
    def backend_label(self) -> str:
        plan = self.plan
        if plan.backend != plan.profile.backend:
            return f"{plan.backend} (overridden; profile says {plan.profile.backend})"
        return plan.backend

    def check_met(self) -> None:
        """Raise :class:`BudgetNotMet`, naming the closest setting, when no setting meets the constraint."""
        if self.met:
            return
        if self.objective.max_drop is not None:
            problem = (
                f"no measured setting is within {self.objective.max_drop:g} points of the dense model's top-1 "
                f"({100 * self.dense.accuracy:.1f}%)"
            )
            hint = "Allow a larger --max-drop, or measure on more images (see the standard errors above)."
        else:
            problem = f"no measured setting runs at p50 <= {self.objective.latency_ms:g} ms"
            hint = (
                f"The dense model runs at {self.dense_p50_ms:.2f} ms here; raise --latency-ms, or use a profile "
                "with a smaller batch or a faster backend."
            )
        raise BudgetNotMet(f"{problem}. The closest: {describe(self.best, self.dense)}.", hint=hint)


def describe(m: Measurement, dense: Dense) -> str:
    drop = 100.0 * (m.accuracy - dense.accuracy)
    return (
        f"keep {format_keep(m.keep)}: top-1 {100 * m.accuracy:.1f}% ({drop:+.1f} points vs dense), "
        f"p50 {m.p50_ms:.2f} ms ({m.speedup:.2f}x dense), {m.gflops:.3f} GFLOPs"
    )


def require_dynamic(exported: Exported) -> None:
    """tune varies keep at run time, so keep must be an input of the model."""
    if not exported.dynamic:
        raise UserError(
            f"{exported.path} is a static export: its keep is baked in, so tune cannot vary it.",
            hint="Export with `ats-deploy export CHECKPOINT --dynamic` (keep and batch become run-time inputs) "
            "and tune that file.",
        )


def _check_request(request: Request) -> None:
    check_objective(request.max_drop, request.latency_ms)
    if request.profile is None:
        raise UserError("tune needs a device profile: --profile NAME (list them with `ats-deploy profiles`).")
    if request.data is None:
        raise UserError(
            "tune needs images to measure accuracy on: --data DIR in ImageFolder layout (DIR/<class>/<image>).",
            hint="Use images like the device will see; a few hundred give a standard error of about 2 points.",
        )
    if request.output is not None:
        check_output_path(request.output)
        if request.output.suffix != ".yaml":
            raise UserError(f"-o {request.output} must be a .yaml file (a profile that --profile reads).")
    if request.log is not None:
        check_output_path(request.log)


def conditions(plan: run.Plan, request: Request) -> dict[str, Any]:
    """What the measurements depend on; a log is only resumed under the same."""
    data = plan.data
    assert isinstance(data, ImageFolder)
    listing = "\n".join(f"{path.relative_to(data.root)}\t{label}" for path, label in data.files)
    profile = plan.profile
    return {
        "model_sha256": sha256_file(plan.measured),
        "reference": request.checkpoint or plan.exported.artifact.source_checkpoint,
        "backend": plan.backend,
        "precision": plan.precision,
        "batch": profile.batch,
        "warmup": profile.warmup,
        "iterations": profile.iterations,
        "threads": profile.threads,
        "data": str(data.root.resolve()),
        "images": len(data.files),
        "files_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
    }


def _header(plan: run.Plan, request: Request, created: str) -> dict[str, Any]:
    arguments = {
        "model": str(plan.exported.path),
        "profile": request.profile,
        "profile_file": str(plan.profile.path) if plan.profile.path else "built-in",
        "data": str(request.data),
        "images": request.images,
        "backend": request.backend,
        "class_map": str(request.class_map) if request.class_map else None,
        "checkpoint": request.checkpoint,
        "max_drop": request.max_drop,
        "latency_ms": request.latency_ms,
    }
    return {
        "kind": "header",
        "version": LOG_VERSION,
        "created": created,
        "conditions": conditions(plan, request),
        "arguments": arguments,
    }


def tune(request: Request, status: Console) -> Outcome:
    """Measure, search, choose; write the log, the plot and (when the constraint is met) the tuned profile."""
    _check_request(request)
    bench_request = run.Request(
        profile=request.profile,
        model=request.model,
        data=request.data,
        images=request.images,
        backends=[request.backend] if request.backend else None,
        class_map=request.class_map,
        checkpoint=request.checkpoint,
        trust_checkpoint=request.trust_checkpoint,
    )
    plan = run.plan(bench_request, check_model=require_dynamic)
    output = request.output or Path(LOCAL_DIR) / f"{plan.profile.name}-tuned.yaml"
    log_path = request.log or output.with_suffix(".log.jsonl")
    run.check_folder(output.parent, "-o")  # the default ./profiles/ too, before the log's first line
    run.check_folder(log_path.parent, "--log")
    run.print_warnings(plan.warnings, status)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    n0 = plan.exported.artifact.n0
    header = _header(plan, request, created)
    log = Log.open(log_path, header, n0, request.fresh)
    if log.settings:
        status.print(f"resuming from {log_path}: {len(log.settings)} settings already measured", highlight=False)
    before = len(log.settings)
    threads = plan.profile.threads or torch.get_num_threads()
    with run.torch_threads(threads), contextlib.ExitStack() as stack:
        device = Device(plan, request, status, stack)
        if log.dense is None:
            log.add_dense(device.dense())
        objective = Objective(request.max_drop, request.latency_ms, log.dense.accuracy)

        def measure(keep: Keep) -> Measurement:
            device.visited()
            key = budgets(keep, n0)
            if key not in log.settings:
                log.add(device.setting(keep))
            return log.settings[key]

        search(measure, objective.rank, len(plan.exported.stages))
        environment = machine.describe(plan.profile.threads, [plan.target.backend])
    settings = list(log.settings.values())
    best = choose(settings, objective.rank)
    outcome = Outcome(
        plan=plan,
        objective=objective,
        dense=log.dense,
        settings=settings,
        best=best,
        measured_now=len(settings) - before,
        created=created,
        environment=environment,
        model_sha256=header["conditions"]["model_sha256"],
        output=output,
        log=log_path,
    )
    save(pareto_figure(outcome), outcome.plot)
    if outcome.met:
        write_profile(outcome)
    return outcome


# --------------------------------------------------------------------------- reporting


def _plus_minus(se: float) -> str:
    return f"± {se:.2f}" if math.isfinite(se) else "(no standard error from a single image)"


def limits(outcome: Outcome) -> list[str]:
    """What the measurements can and cannot tell: printed with the result and written into the profile."""
    n, dense, best = outcome.images, outcome.dense, outcome.best
    role = "chosen" if outcome.met else "closest"
    diff, se = paired_difference(best.correct, dense.correct)
    lines = [
        f"{n} images: one image is {100 / n:.3g} points of top-1.",
        f"{role} - dense top-1: {diff:+.2f} {_plus_minus(se)} points (paired standard error over the same images).",
    ]
    if not told_apart(diff, se):
        lines.append(f"The data cannot tell the {role} setting's top-1 from the dense model's (within 2 SE).")
    runner_up = outcome.runner_up
    if runner_up is not None:
        diff, se = paired_difference(best.correct, runner_up.correct)
        text = (
            f"{role} - runner-up (keep {format_keep(runner_up.keep)}, p50 {runner_up.p50_ms:.2f} ms) top-1: "
            f"{diff:+.2f} {_plus_minus(se)} points"
        )
        apart = told_apart(diff, se)
        lines.append(text + ("." if apart else "; the data cannot tell them apart in top-1 (within 2 SE)."))
    dense_p50 = [m.dense_p50_ms for m in outcome.settings]
    if len(dense_p50) > 1:
        spread = 100.0 * float(np.std(dense_p50, ddof=1)) / outcome.dense_p50_ms
        lines.append(
            f"The dense model's p50 varied by {spread:.1f}% (std) over the {len(dense_p50)} interleaved runs: "
            "latency differences below that are timing noise."
        )
    lines.append(
        "Latency holds for this machine, its runtime versions and its load at the time; top-1 for images like these."
    )
    return lines


def _dense_text(outcome: Outcome) -> str:
    return (
        f"top-1 {100 * outcome.dense.accuracy:.1f}%, p50 {outcome.dense_p50_ms:.2f} ms (median over "
        f"{len(outcome.settings)} interleaved runs), {outcome.dense.gflops:.3f} GFLOPs"
    )


def header_comments(outcome: Outcome) -> list[str]:
    """The measurements behind the choice, for the top of the tuned profile."""
    plan, env = outcome.plan, outcome.environment
    profile, exported = plan.profile, plan.exported
    runtimes = ", ".join(f"{name} {version or 'not installed'}" for name, version in env["runtimes"].items())
    gpu = f"GPU {env['gpu']}" if env["gpu"] else "no GPU"
    skipped = len(outcome.dense.skipped)
    unreadable = f", {skipped} unreadable files skipped" if skipped else ""
    lines = [
        f"keep tuned by `ats-deploy tune` on {outcome.created}, from profile '{profile.name}' "
        f"({profile.path or 'built-in'}); every other field is the profile's.",
        f"Model: {exported.path} ({exported.arch}, ATS stages {','.join(map(str, exported.stages))}), "
        f"measured file sha256 {outcome.model_sha256[:16]}...",
        f"Device: {env['cpu']} ({env['cores']} cores), {gpu}; {env['platform']}.",
        f"Runtimes: {runtimes}.",
        f"Measured on: {outcome.backend_label}, {plan.precision}, batch {profile.batch}; p50 over "
        f"{profile.iterations} timed rounds after {profile.warmup} warm-up rounds, interleaved with the dense export.",
        f"Images: {outcome.images} from {plan.data.describe()}{unreadable}; accuracy: {plan.data.metric}.",
        f"Objective: {outcome.objective.describe()}.",
        f"Chosen: {describe(outcome.best, outcome.dense)}.",
        f"Dense: {_dense_text(outcome)}.",
        f"Search: {len(outcome.settings)} settings measured (one keep for all stages from {COARSE[0]:g} to "
        f"{COARSE[-1]:g}, then per-stage steps of {STEP:g}); log {outcome.log}, plot {outcome.plot}.",
        "Limits:",
        *(f"  {line}" for line in limits(outcome)),
    ]
    if plan.backend != profile.backend:
        lines.append(
            f"Measured with --backend {plan.backend}, not on the profile's {profile.backend}: tune again on "
            f"{profile.backend} before relying on these values there."
        )
    return lines


def write_profile(outcome: Outcome) -> None:
    """The source profile with the chosen keep (one value when all stages share it), named after the file."""
    keep = outcome.best.keep
    value: float | tuple[float, ...] = keep[0] if len(set(keep)) == 1 else keep
    profile = replace(outcome.plan.profile, name=outcome.output.stem, keep=value, path=outcome.output)
    dump_profile(profile, outcome.output, header_comments(outcome))


def pareto_figure(outcome: Outcome) -> Figure:
    """Accuracy against latency and against GFLOPs: every measured setting, the Pareto front, chosen and dense."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    plan, objective, best = outcome.plan, outcome.objective, outcome.best
    panels = (
        (f"latency p50 (ms, batch {plan.profile.batch})", lambda m: m.p50_ms, outcome.dense_p50_ms),
        ("GFLOPs per image", lambda m: m.gflops, outcome.dense.gflops),
    )
    for axes, (label, x_of, dense_x) in zip(figure.subplots(1, 2), panels, strict=True):
        points = [(x_of(m), 100.0 * m.accuracy) for m in outcome.settings]
        everything = [*points, (dense_x, 100.0 * outcome.dense.accuracy)]
        front = [everything[i] for i in pareto_front(everything)]
        axes.scatter(*zip(*points, strict=True), s=18, color="tab:blue", alpha=0.6, label="measured settings")
        axes.plot(*zip(*front, strict=True), drawstyle="steps-post", color="tab:blue", linewidth=1,
                  label="Pareto front")
        axes.scatter([dense_x], [everything[-1][1]], marker="s", s=70, color="black", label="dense", zorder=3)
        role = "chosen" if outcome.met else "closest"
        axes.scatter([x_of(best)], [100.0 * best.accuracy], marker="*", s=240, color="tab:red", zorder=4,
                     label=f"{role}: keep {format_keep(best.keep)}")
        if objective.max_drop is not None:
            axes.axhline(100.0 * objective.dense_accuracy - objective.max_drop, color="tab:red", linestyle="--",
                         linewidth=1, label=f"dense - {objective.max_drop:g} points")
        elif x_of is panels[0][1]:
            axes.axvline(objective.latency_ms, color="tab:red", linestyle="--", linewidth=1,
                         label=f"budget {objective.latency_ms:g} ms")
        axes.set_xlabel(label)
        axes.set_ylabel(f"{plan.data.metric} (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    failed = "" if outcome.met else "; failed: no setting meets the objective (the star is the closest)"
    figure.suptitle(
        f"tune {plan.exported.arch}: {len(outcome.settings)} settings on {outcome.backend_label}, "
        f"{outcome.images} images{failed}",
        fontsize=10,
    )
    return figure


def _row(keep: str, accuracy: float, delta: str, gflops: float, p50: float, speedup: float) -> list[str]:
    return [keep, f"{100 * accuracy:.1f}%", delta, f"{gflops:.3f}", f"{p50:.2f}", f"{speedup:.2f}x"]


def render(outcome: Outcome, console: Console) -> None:
    """Every measured setting sorted by latency, the chosen one highlighted; then the choice and its limits."""
    plan, objective, dense = outcome.plan, outcome.objective, outcome.dense
    table = Table(
        title=f"tune {plan.exported.path} | profile {plan.profile.name} | backend: {outcome.backend_label} | "
        f"{plan.precision} | batch {plan.profile.batch} | {outcome.images} images",
        title_justify="left",
    )
    table.add_column("keep", overflow="fold")
    for column in ("top-1", "Δ top-1", "GFLOPs", "p50 ms", "speedup", "meets", "front"):
        table.add_column(column, justify="right")
    points = [(m.p50_ms, m.accuracy) for m in outcome.settings] + [(outcome.dense_p50_ms, dense.accuracy)]
    front = set(pareto_front(points))
    rows: list[tuple[float, list[str], str | None]] = []
    for i, m in enumerate(outcome.settings):
        delta = f"{100 * (m.accuracy - dense.accuracy):+.1f}"
        cells = _row(format_keep(m.keep), m.accuracy, delta, m.gflops, m.p50_ms, m.speedup)
        cells += ["yes" if objective.meets(m) else "no", "•" if i in front else ""]
        style = None
        if m is outcome.best:
            cells[0] = f"{'chosen' if outcome.met else 'closest'}: {cells[0]}"
            style = "bold green" if outcome.met else "bold yellow"
        rows.append((m.p50_ms, cells, style))
    dense_cells = _row("dense", dense.accuracy, "", dense.gflops, outcome.dense_p50_ms, 1.0)
    rows.append((outcome.dense_p50_ms, [*dense_cells, "", "•" if len(points) - 1 in front else ""], "dim"))
    for _, cells, style in sorted(rows, key=lambda row: row[0]):
        table.add_row(*cells, style=style)
    console.print(table)
    console.print(
        f"top-1: {plan.data.metric}; Δ: points vs dense; speedup: the dense export's time / the setting's, median "
        "over the interleaved rounds; front: on the accuracy-latency Pareto front",
        style="dim",
        highlight=False,
    )
    twins = sum(m is not outcome.best and m.tokens == outcome.best.tokens for m in outcome.settings)
    if twins:
        console.print(
            f"{twins} other settings keep the same tokens as the {'chosen' if outcome.met else 'closest'} one: "
            "they compute the same, and their latency differences are noise.",
            style="dim",
            highlight=False,
        )
    console.print(f"objective: {objective.describe()}", highlight=False)
    if outcome.met:
        console.print(f"[bold green]chosen[/] {describe(outcome.best, dense)}", highlight=False)
    for line in limits(outcome):
        console.print(f"  {line}", highlight=False)
    for name, reason in dense.skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if outcome.met:
        written = f"{outcome.output}, {outcome.plot}"
    else:
        kept = f"{outcome.output} is left as it was" if outcome.output.exists() else "no profile written"
        written = f"{outcome.plot} (the plot of this failed run; {kept}: see below)"
    console.print(
        f"wrote {written}; log {outcome.log} ({len(outcome.settings)} settings, {outcome.measured_now} measured now)",
        highlight=False,
    )
