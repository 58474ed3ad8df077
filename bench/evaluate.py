"""The accuracy pass: every variant on every image, and the exported ATS model checked against the reference.

Every batch is padded to the bench batch size with copies of its last image (a
static export only takes that size; batch invariance, spec section 3, makes the
padding harmless) and the padded results are dropped. With labels a variant's
score is its top-1 accuracy; without, its top-1 agreement with the PyTorch dense
model. The comparison of each backend's exported ATS model with the reference is
validation's (:func:`ats_deploy.exporters.compare.compare_batch`): kept patches
where the runtime can report them, flips only where a replay confirms them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ats_deploy.backends.samples import Sample
from ats_deploy.data import Batch
from ats_deploy.exporters.compare import Case, Judge, compare_batch, reference_samples, top1_agreement
from ats_deploy.model import ATSVisionTransformer
from ats_deploy.precision import Precision

from .variants import PYTORCH_ATS, PYTORCH_DENSE, Variant

TIMING_BATCHES = 4  # latency cycles through the first few batches, so it sees several images' token counts


@dataclass
class Tally:
    """One variant's top-1 class and kept tokens of every image, in order."""

    top1: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        self.top1.append(logits.argmax(axis=-1))
        self.tokens.append(tokens)

    @property
    def images(self) -> int:
        return sum(len(top1) for top1 in self.top1)

    def predictions(self) -> np.ndarray:
        """``[images]`` top-1 class indices."""
        return np.concatenate(self.top1)

    def all_tokens(self) -> np.ndarray:
        """``[images, S]`` kept tokens per stage."""
        return np.concatenate(self.tokens)


@dataclass
class Evaluation:
    """What every variant predicted, kept and (the compared ones) how it compared with the reference.

    Scores are computed here, not while running, so that a caller that ran the PyTorch dense model in another pass
    (tune measures it once, then one keep setting at a time) scores against the same truth.
    """

    tallies: dict[str, Tally]
    cases: dict[str, Case]  # per compared variant key: its comparison with the reference
    timing_inputs: list[torch.Tensor]
    labels: np.ndarray | None  # None: unlabelled images, scored by agreement with the PyTorch dense model

    @property
    def images(self) -> int:
        return next(iter(self.tallies.values())).images

    def truth(self) -> np.ndarray:
        """The labels; for unlabelled images the PyTorch dense model's top-1, so that scores become agreement."""
        return self.labels if self.labels is not None else self.tallies[PYTORCH_DENSE].predictions()

    def correct(self, key: str, truth: np.ndarray | None = None) -> np.ndarray:
        """``[images]`` whether variant ``key`` got each image right, against ``truth`` (default: :meth:`truth`)."""
        return self.tallies[key].predictions() == (self.truth() if truth is None else truth)

    def accuracy(self, key: str) -> float:
        """Top-1 accuracy (or agreement) of variant ``key``."""
        return float(self.correct(key).mean())


def pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` followed by copies of its last image, ``size`` in all."""
    missing = size - len(images)
    return torch.cat([images, images[-1:].expand(missing, *images.shape[1:])]) if missing > 0 else images


def evaluate(
    batches: Iterable[Batch],
    reference: ATSVisionTransformer,
    variants: Mapping[str, Variant],
    batch_size: int,
    atols: Mapping[str, float],
    on_batch: Callable[[int], None],
) -> Evaluation:
    """Run ``variants`` on ``batches``; with comparisons, the PyTorch ATS outputs are validation's reference samples.

    ``atols`` names the variants compared with the reference (each backend's exported ATS model) and the largest
    |logit difference| each may show on an image that kept the reference's patches; comparing needs the
    PyTorch ATS variant, whose keep they run at. Without comparisons every variant simply runs.
    """
    keep = variants[PYTORCH_ATS].keep if atols else torch.zeros(0)
    cases = {key: Case(keep=keep.tolist(), batch=batch_size) for key in atols}
    judges = {key: Judge(reference, atol) for key, atol in atols.items()}
    tallies = {key: Tally() for key in variants}
    labels: list[np.ndarray] = []
    timing_inputs: list[torch.Tensor] = []
    for batch in batches:
        count = len(batch.names)
        images = pad(batch.images, batch_size)
        compared = {PYTORCH_ATS, *cases} if cases else set()
        outputs = {key: variant(images) for key, variant in variants.items() if key not in compared}
        if cases:
            expected = reference_samples(reference, images, keep)
            outputs[PYTORCH_ATS] = _stack(expected)
            for key, case in cases.items():
                observed = variants[key].samples(images)
                outputs[key] = _stack(observed)
                compare_batch(case, judges[key], batch.names, images, keep, observed, expected)
        for key, (logits, tokens) in outputs.items():
            tallies[key].add(logits[:count], tokens[:count])
        if batch.labels is not None:
            labels.append(batch.labels.numpy())
        if len(timing_inputs) < TIMING_BATCHES:
            timing_inputs.append(images)
        on_batch(count)
    return Evaluation(tallies, cases, timing_inputs, np.concatenate(labels) if labels else None)


def reduced_agreement(
    evaluation: Evaluation, key: str, runtime: str, keep: list[float], precision: Precision
) -> dict:
    """A reduced-precision ATS variant against the float32 PyTorch ATS model on the measured images.

    docs/ATS.md section 6 compares int8 by agreement (top-1, kept tokens), not patch for patch, with the
    one verdict that export, validate and loadtest --verify use (:func:`ats_deploy.exporters.compare.top1_agreement`).
    """
    reference, observed = evaluation.tallies[PYTORCH_ATS], evaluation.tallies[key]
    agree = int((observed.predictions() == reference.predictions()).sum())
    verdict = top1_agreement(precision, [keep], agree, observed.images)
    return {
        "between": f"exported ATS ({runtime}) vs PyTorch ATS (float32)",
        "images": observed.images,
        "top1_agree": verdict.rate,
        "top1_bar": verdict.bar,
        "top1_upper": verdict.upper,
        "ok": verdict.ok,
        "same_tokens_per_stage": (observed.all_tokens() == reference.all_tokens()).mean(axis=0).tolist(),
    }


def _stack(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image samples back to batched ``(logits, tokens)``."""
    return np.stack([s.logits for s in samples]), np.stack([s.tokens for s in samples])
