"""What tune measures of a keep setting, and the measuring itself: bench's passes, one setting at a time.

A setting is measured the way bench measures a variant, with bench's own functions: the variants
(:func:`bench.run.build_variants`, the profile's backend from the registry), the accuracy pass with validation's
comparison of the exported model against the PyTorch reference (:func:`bench.evaluate.evaluate`) and the latency
pass interleaved with the dense export (:func:`bench.timing.interleaved`, speedups paired round by round).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import tempfile
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from ats_deploy.checkpoints import load_reference, sha256_file
from ats_deploy.data import Batch, ImageFolder, Skipped, folder_batches
from ats_deploy.exported import changed_source
from ats_deploy.images import data_config
from ats_deploy.keep import format_keep
from ats_deploy.model import ATSVisionTransformer
from ats_deploy.tune_log import Dense, KeepValues, Measurement

from .. import run
from ..evaluate import Evaluation, evaluate
from ..timing import Latency, cycling, interleaved, paired_ratio
from ..variants import EXPORTED_ATS, EXPORTED_DENSE, PYTORCH_ATS, PYTORCH_DENSE, Variant
from .search import evaluations_bound


def conditions(plan: run.Plan, checkpoint: str | None) -> dict[str, Any]:
    """What the measurements depend on; a log is only resumed under the same."""
    data = plan.data
    assert isinstance(data, ImageFolder)
    listing = "\n".join(f"{path.relative_to(data.root)}\t{label}" for path, label in data.files)
    profile = plan.profile
    return {
        "model_sha256": sha256_file(plan.measured),
        "reference": checkpoint or plan.exported.artifact.source_checkpoint,
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
            exported = plan.exported
            model = load_reference(exported.artifact, self.checkpoint, self.trust_checkpoint, str(exported.path))
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
