"""One bench's results, as the table, ``results.json``, ``results.csv`` and the plots read them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ats_deploy.errors import ValidationFailed
from ats_deploy.exporters.compare import Case
from ats_deploy.keep import format_keep
from ats_deploy.profiles import Profile

from .timing import Latency, paired_ratio
from .variants import EXPORTED_ATS, EXPORTED_DENSE, PYTORCH_DENSE, TITLES, kind_of


@dataclass
class VariantResult:
    """One variant's accuracy, cost and latency."""

    key: str
    runtime: str
    accuracy: float
    gflops: float
    tokens: np.ndarray  # [images, S] kept tokens per ATS stage
    latency: Latency
    images: int = 0  # how many images the accuracy is over (its standard error)
    dense_key: str | None = None  # an exported variant's own dense baseline: same backend, same precision

    @property
    def accuracy_se(self) -> float:
        """The standard error of the accuracy, a proportion over ``images`` images."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.images) if self.images else math.nan

    @property
    def title(self) -> str:
        return TITLES[self.kind]

    @property
    def kind(self) -> str:
        return kind_of(self.key)

    @property
    def mean_tokens(self) -> list[float]:
        return [float(v) for v in self.tokens.mean(axis=0)] if self.tokens.size else []

    def to_dict(self, baseline: VariantResult, own: VariantResult | None = None) -> dict[str, Any]:
        """``own``: its own dense baseline (the same backend and precision), whose speedup it also states."""
        return {
            "key": self.key,
            "title": self.title,
            "runtime": self.runtime,
            "accuracy": self.accuracy,
            "accuracy_se": self.accuracy_se,
            "gflops": self.gflops,
            "mean_tokens_per_stage": self.mean_tokens,
            "latency": self.latency.summary(),
            "speedup": self.speedup(baseline),
            **({"speedup_own_dense": self.speedup(own)} if own is not None else {}),
        }

    def speedup(self, baseline: VariantResult) -> float:
        """``baseline``'s time over this variant's, round by round (:func:`.timing.paired_ratio`), so drift cancels."""
        return paired_ratio(baseline.latency, self.latency)


@dataclass
class BenchResult:
    """Everything a bench measured and the conditions it measured them under."""

    created: str
    model: dict[str, Any]
    profile: Profile
    backend: str  # several backends (--backend repeated) joined by ", "
    precision: str  # likewise, each precision once
    keep: list[float]
    keep_origin: str
    data: dict[str, Any]
    accuracy_metric: str
    variants: list[VariantResult]
    comparison: Case | None  # the (first backend's) exported ATS model against the PyTorch reference
    environment: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    comparisons: dict[str, Case] = field(default_factory=dict)  # several backends: each one's, by variant key
    agreements: dict[str, dict] = field(default_factory=dict)  # int8 ATS variants: agreement with the reference

    @property
    def cases(self) -> dict[str, Case]:
        """Every exported ATS model's comparison with the reference, by variant key."""
        if self.comparisons:
            return self.comparisons
        return {EXPORTED_ATS: self.comparison} if self.comparison is not None else {}

    def check_agreed(self) -> None:
        """Raise :class:`~ats_deploy.errors.ValidationFailed` when an exported ATS model disagreed with the reference
        beyond float-tie flips: its figures are written, but do not describe a correct export.
        """
        if all(case.ok for case in self.cases.values()):
            return
        raise ValidationFailed(
            "the exported model disagrees with the PyTorch reference beyond float-tie flips (mismatches above); "
            "its figures are written but do not describe a correct export.",
            "Check it with `ats-deploy validate MODEL` and re-export.",
        )

    def runtime_of(self, key: str) -> str:
        return next(v.runtime for v in self.variants if v.key == key)

    @property
    def overridden(self) -> bool:
        return self.backend != self.profile.backend

    @property
    def backend_label(self) -> str:
        if self.overridden:
            return f"{self.backend} (overridden; profile says {self.profile.backend})"
        return self.backend

    @property
    def precision_label(self) -> str:
        if self.precision != self.profile.precision:
            return f"{self.precision} (profile says {self.profile.precision})"
        return self.precision

    @property
    def baseline(self) -> VariantResult:
        """What speedups are quoted against: the (first backend's) exported dense model, else the PyTorch dense one."""
        exported = [v for v in self.variants if v.kind == EXPORTED_DENSE]
        return exported[0] if exported else next(v for v in self.variants if v.key == PYTORCH_DENSE)

    @property
    def precisions(self) -> list[str]:
        return self.precision.split(", ")

    def own_baseline(self, variant: VariantResult) -> VariantResult | None:
        """The exported dense model of ``variant``'s backend and precision (dense int8 for int8), if any."""
        return next((v for v in self.variants if v.key == variant.dense_key), None)

    @property
    def keep_text(self) -> str:
        return format_keep(self.keep)

    @property
    def title(self) -> str:
        return (
            f"bench {self.model['path']} | profile {self.profile.name} | backend: {self.backend_label} | "
            f"{self.precision_label} | keep {self.keep_text} | batch {self.profile.batch}"
        )

    def to_dict(self) -> dict[str, Any]:
        baseline = self.baseline
        return {
            "title": self.title,
            "created": self.created,
            "model": self.model,
            "profile": _profile(self.profile),
            "backend": self.backend_label,
            "backend_name": self.backend,
            "backend_overridden": self.overridden,
            "precision": self.precision_label,
            "keep": self.keep,
            "keep_origin": self.keep_origin,
            "batch": self.profile.batch,
            "data": self.data,
            "accuracy_metric": self.accuracy_metric,
            "speedup_baseline": baseline.key,
            "variants": [v.to_dict(baseline, self.own_baseline(v)) for v in self.variants],
            "comparison": None if self.comparison is None else _comparison(self.comparison),
            **self._comparisons(),
            **({"agreements": self.agreements} if self.agreements else {}),
            "environment": self.environment,
            "warnings": self.warnings,
        }

    def _comparisons(self) -> dict[str, Any]:
        """With several backends, ``comparisons``: each exported ATS model's, by variant key."""
        if not self.comparisons:
            return {}
        named = {key: _comparison(case, self.runtime_of(key)) for key, case in self.comparisons.items()}
        return {"comparisons": named}


def _profile(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "path": str(profile.path) if profile.path else None,
        "backend": profile.backend,
        "precision": profile.precision,
        "keep": list(profile.keep) if isinstance(profile.keep, tuple) else profile.keep,
        "batch": profile.batch,
        "warmup": profile.warmup,
        "iterations": profile.iterations,
        "threads": profile.threads,
    }


def _comparison(case: Case, runtime: str | None = None) -> dict[str, Any]:
    return {
        "between": f"exported ATS ({runtime}) vs PyTorch ATS" if runtime else "exported ATS vs PyTorch ATS",
        "compared": "kept patches" if case.positions else "token counts",
        **case.to_dict(),
    }
