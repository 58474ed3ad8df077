"""What the answers of a level add up to (throughput, latency percentiles, tokens, top-1) and the whole run's
result, with the error-rate check that refuses a run against a broken server."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ats_deploy.errors import UserError

from .drive import Answer
from .plan import Images, Level, Mix

if TYPE_CHECKING:
    from .verify import Verification


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


def outcomes(answers: list[Answer], schedule: Any, images: Images) -> Any:
    from ..slo_report import Outcomes

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


def slo_summary(answers: list[Answer], schedule: Any, images: Images, slo_ms: float | None) -> dict[str, Any]:
    from ..slo_report import summarize

    return {"origin": schedule.origin, **summarize(outcomes(answers, schedule, images), schedule.steps, slo_ms)}
