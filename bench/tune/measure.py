"""What tune measures of a keep setting, and the measuring itself: bench's passes, one setting at a time.

A setting is measured the way bench measures a variant, with bench's own functions: the variants
(:func:`bench.run.build_variants`, the profile's backend from the registry), the accuracy pass with validation's
comparison of the exported model against the PyTorch reference (:func:`bench.evaluate.evaluate`) and the latency
pass interleaved with the dense export (:func:`bench.timing.interleaved`, speedups paired round by round).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from ats_deploy.images import data_config
from ats_deploy.keep import Keep, format_keep
from ats_deploy.model import ATSVisionTransformer

from .. import run
from ..data import Batch, ImageFolder, Skipped, folder_batches
from ..evaluate import Evaluation, evaluate
from ..source import changed_source, reference
from ..timing import Latency, cycling, interleaved, paired_ratio
from ..variants import EXPORTED_ATS, EXPORTED_DENSE, PYTORCH_ATS, PYTORCH_DENSE, Variant
from .search import evaluations_bound

KeepValues = tuple[float, ...]  # one keep value per ATS stage


def budgets(keep: KeepValues, n0: int, prefix: int) -> tuple[int, ...]:
    """The integer budget K of every stage: what identifies a setting (ATS_SPEC section 2).

    ``prefix`` is the model's ``P``: the budget's floors (``P + 7``, ``P + 1``) depend on it.
    """
    return tuple(Keep(keep).budgets(len(keep), n0, prefix))


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

    keep: KeepValues
    correct: np.ndarray  # [images] bool
    gflops: float
    p50_ms: float
    dense_p50_ms: float  # the dense export, timed in the same rounds
    tokens: list[float]  # mean kept tokens per ATS stage
    # The dense export's time over this setting's, round by round (timing.paired_ratio), so that drift cancels.
    speedup: float
    # Validation's comparison of the export with the PyTorch reference at this keep: what failed ([]: it agrees).
    # None where nothing was compared: the PyTorch backend, or a log line written before tune compared.
    failures: list[str] | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def to_record(self, n0: int, prefix: int) -> dict[str, Any]:
        return {
            "kind": "setting",
            "keep": list(self.keep),
            "budgets": list(budgets(self.keep, n0, prefix)),
            "correct": _bits(self.correct),
            "gflops": self.gflops,
            "p50_ms": self.p50_ms,
            "dense_p50_ms": self.dense_p50_ms,
            "tokens": self.tokens,
            "speedup": self.speedup,
            "failures": self.failures,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Measurement:
        """A log line; the fields added since tune's first logs fall back, so older logs still resume."""
        failures = record.get("failures")
        return cls(
            keep=Keep(tuple(float(v) for v in record["keep"])).values,  # a damaged value fails as a bad record
            correct=_unbits(record["correct"]),
            gflops=float(record["gflops"]),
            p50_ms=float(record["p50_ms"]),
            dense_p50_ms=float(record["dense_p50_ms"]),
            tokens=[float(v) for v in record["tokens"]],
            # logs written before the paired speedup: the ratio of the two medians
            speedup=float(record.get("speedup", record["dense_p50_ms"] / record["p50_ms"])),
            failures=None if failures is None else [str(f) for f in failures],
        )


@dataclass
class _Rig:
    """What every measurement shares, set up once: the reference, bench's variants and the images, read once."""

    reference: ATSVisionTransformer
    variants: dict[str, Variant]
    batches: list[Batch]
    skipped: Skipped

    @property
    def dense_key(self) -> str:
        """The dense model timed and scored: the export, or on the PyTorch backend the reference's dense model."""
        return EXPORTED_DENSE if EXPORTED_DENSE in self.variants else PYTORCH_DENSE

    @property
    def ats_key(self) -> str:
        return EXPORTED_ATS if EXPORTED_ATS in self.variants else PYTORCH_ATS


class Device:
    """Measures settings on this machine through bench's passes, with progress bars.

    The set-up (reference, dense export, runners, images) waits for the first new measurement, so a resumed
    run that finds everything in its log loads nothing.
    """

    def __init__(
        self,
        plan: run.Plan,
        checkpoint: str | None,
        trust_checkpoint: bool,
        status: Console,
        stack: contextlib.ExitStack,
    ) -> None:
        self.plan, self.status, self.stack = plan, status, stack
        self.checkpoint, self.trust_checkpoint = checkpoint, trust_checkpoint
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
            model = reference(plan.exported, self.checkpoint, self.trust_checkpoint)
            plan.warnings.extend(filter(None, [changed_source(plan.exported, self.checkpoint)]))
        workdir = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="ats-tune-")))
        variants = run.build_variants(plan, model, workdir, self.status)
        assert isinstance(plan.data, ImageFolder)  # tune requires --data
        skipped = Skipped()
        with self.status.status(f"reading {len(plan.data.files)} images"):
            batches = list(folder_batches(plan.data, data_config(model.vit), plan.profile.batch, skipped))
        self.progress.start()
        self.stack.callback(self.progress.stop)
        return _Rig(model, variants, batches, skipped)

    @cached_property
    def truth(self) -> np.ndarray | None:
        """Unlabelled images: the PyTorch dense model's top-1, which everything is scored against; None with labels."""
        assert isinstance(self.plan.data, ImageFolder)
        if self.plan.data.labelled:
            return None
        variants = {PYTORCH_DENSE: self.rig.variants[PYTORCH_DENSE]}
        return self._evaluate(variants, "PyTorch dense model").truth()

    def _evaluate(self, variants: dict[str, Variant], title: str) -> Evaluation:
        """Bench's accuracy pass over the images, the exported ATS model compared with the reference."""
        rig = self.rig
        total = sum(len(batch.names) for batch in rig.batches)
        self.progress.reset(self.current, total=total, description=f"{title}: accuracy")
        atols = run.compared(self.plan, variants)
        advance = functools.partial(self.progress.advance, self.current)  # by the images of each batch
        return evaluate(rig.batches, rig.reference, variants, self.plan.profile.batch, atols, advance)

    def _latency(self, variants: dict[str, Variant], evaluation: Evaluation, title: str) -> dict[str, Latency]:
        """Bench's latency pass: the variants interleaved round by round on the accuracy pass's first batches."""
        profile = self.plan.profile
        rounds = profile.warmup + profile.iterations
        self.progress.reset(self.current, total=rounds, description=f"{title}: latency, interleaved with dense")
        calls = cycling(variants, evaluation.timing_inputs)
        advance = functools.partial(self.progress.advance, self.current)  # by one round
        return interleaved(calls, profile.batch, profile.warmup, profile.iterations, advance)

    def dense(self) -> Dense:
        rig = self.rig
        key = rig.dense_key
        variant = rig.variants[key]
        evaluation = self._evaluate({key: variant}, "dense model")
        gflops = float(variant.cost.gflops(evaluation.tallies[key].all_tokens()).mean())
        return Dense(evaluation.correct(key, self.truth), gflops, list(rig.skipped.files))

    def setting(self, keep: KeepValues) -> Measurement:
        rig, title = self.rig, f"keep {format_keep(keep)}"
        values = torch.tensor(keep, dtype=torch.float32)
        ats = {key: replace(rig.variants[key], keep=values) for key in dict.fromkeys((PYTORCH_ATS, rig.ats_key))}
        evaluation = self._evaluate(ats, title)
        dense, chosen = rig.dense_key, rig.ats_key
        latency = self._latency({dense: rig.variants[dense], chosen: ats[chosen]}, evaluation, title)
        tokens = evaluation.tallies[chosen].all_tokens()
        case = evaluation.cases.get(chosen)
        return Measurement(
            keep=keep,
            correct=evaluation.correct(chosen, self.truth),
            gflops=float(ats[chosen].cost.gflops(tokens).mean()),
            p50_ms=latency[chosen].p50,
            dense_p50_ms=latency[dense].p50,
            tokens=[float(v) for v in tokens.mean(axis=0)],
            speedup=paired_ratio(latency[dense], latency[chosen]),
            failures=None if case is None else list(case.failures),
        )
