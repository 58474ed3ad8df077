"""Latency of several variants, measured interleaved so that they share the machine's state.

Timing one variant after another lets a change in the machine (another process,
thermal throttling, a frequency step) land on one variant only. Here every round
runs each variant once, the order rotating from round to round, and percentiles
are taken per variant over the rounds, warm-up rounds excluded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from .variants import Variant


@dataclass
class Latency:
    """Per-call latencies of one variant, each call processing ``batch`` images."""

    samples_ms: list[float]
    batch: int

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def throughput(self) -> float:
        """Images per second over all timed calls."""
        return self.batch * len(self.samples_ms) / (sum(self.samples_ms) / 1000.0)

    def summary(self) -> dict[str, float | int]:
        return {
            "p50_ms": self.p50,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "mean_ms": float(np.mean(self.samples_ms)),
            "throughput_images_per_s": self.throughput,
            "iterations": len(self.samples_ms),
            "batch": self.batch,
        }


def interleaved(
    calls: Mapping[str, Callable[[int], object]],
    batch: int,
    warmup: int,
    iterations: int,
    on_round: Callable[[], None] | None = None,
) -> dict[str, Latency]:
    """Run ``warmup + iterations`` rounds of every call; time the last ``iterations``.

    Each call receives the round number (to pick its input). ``on_round`` is called
    after every round, for progress.
    """
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + iterations):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name](round_)
            elapsed = (time.perf_counter() - start) * 1000.0
            if round_ >= warmup:
                samples[name].append(elapsed)
        if on_round is not None:
            on_round()
    return {name: Latency(values, batch) for name, values in samples.items()}


def cycling(variants: Mapping[str, Variant], inputs: Sequence[torch.Tensor]) -> dict[str, Callable[[int], object]]:
    """:func:`interleaved`'s calls for ``variants``: round ``r`` runs each one on ``inputs[r % len(inputs)]``.

    Cycling through a few batches (the accuracy pass's first ones) lets latency see several images' token counts.
    """
    return {key: (lambda round_, v=variant: v(inputs[round_ % len(inputs)])) for key, variant in variants.items()}


def paired_ratio(numerator: Latency, denominator: Latency) -> float:
    """Median over the timed rounds of ``numerator / denominator``, each round's two calls paired.

    Both must come from the same :func:`interleaved` run. The machine's speed
    drifts between rounds (by a third on a shared VM) but hardly within one, so
    the ratio of two calls of the same round cancels the drift that the ratio of
    two separate medians keeps.
    """
    if len(numerator.samples_ms) != len(denominator.samples_ms):
        raise ValueError("paired latencies need the same rounds")
    return float(np.median(np.divide(numerator.samples_ms, denominator.samples_ms)))
