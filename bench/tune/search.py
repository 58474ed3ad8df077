"""The coordinate search over keep settings, the objective that ranks them, and the accuracy-cost Pareto front.

Pure functions of measurements: :func:`coordinate_search` calls ``measure`` for each setting it visits and never
touches a device, so the tests drive it with made-up measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ats_deploy.errors import UserError

if TYPE_CHECKING:
    from ats_deploy.tune_log import KeepValues, Measurement

COARSE = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
STEP = 0.05  # half the coarse step: the refinement looks between the coarse values
MIN_KEEP = 0.1
ROUNDS = 3

OBJECTIVES = (
    "--max-drop POINTS (the fastest setting within POINTS of the dense model's top-1) or "
    "--latency-ms MS (the most accurate setting with p50 <= MS)"
)


def check_objective(max_drop: float | None, latency_ms: float | None) -> None:
    """Exactly one of --max-drop / --latency-ms, with a usable value."""
    if max_drop is None and latency_ms is None:
        raise UserError(
            f"tune needs an objective: {OBJECTIVES}; or a profile with `latency_budget_ms:`, "
            "which then stands for --latency-ms."
        )
    if max_drop is not None and latency_ms is not None:
        raise UserError(f"give one objective, not both: {OBJECTIVES}.")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise UserError(f"--max-drop must be a number of points >= 0, got {max_drop}.")
    if latency_ms is not None and not (math.isfinite(latency_ms) and latency_ms > 0):
        raise UserError(f"--latency-ms must be a number of milliseconds > 0, got {latency_ms}.")


@dataclass(frozen=True)
class Objective:
    """Fastest within ``max_drop`` points of dense top-1, or most accurate with p50 <= ``latency_ms``.

    ``budget_from`` names the profile whose ``latency_budget_ms`` gave ``latency_ms`` (no objective on the command
    line), so that every report says where the budget came from.
    """

    max_drop: float | None
    latency_ms: float | None
    dense_accuracy: float
    budget_from: str | None = None

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
        origin = f" (latency_budget_ms of profile '{self.budget_from}')" if self.budget_from else ""
        return f"the most accurate setting (top-1) with p50 <= {self.latency_ms:g} ms{origin}"


def neighbours(keep: KeepValues, stage: int) -> list[KeepValues]:
    """``keep`` with ``stage`` one :data:`STEP` lower and higher, within [MIN_KEEP, 1]."""
    result = []
    for value in (keep[stage] - STEP, keep[stage] + STEP):
        value = round(value, 4)
        if MIN_KEEP - 1e-9 <= value <= 1.0 + 1e-9:
            result.append((*keep[:stage], value, *keep[stage + 1 :]))
    return result


def evaluations_bound(stages: int) -> int:
    """The most settings :func:`coordinate_search` measures for a model with ``stages`` ATS stages."""
    return len(COARSE) + 2 * ROUNDS * stages


def coordinate_search(
    measure: Callable[[KeepValues], Measurement], rank: Callable[[Measurement], tuple[float, ...]], stages: int
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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates, by increasing cost.

    A point is ``(cost, value)``: lower cost and higher value are better. ``a`` dominates ``b`` when it is no
    worse in both and differs from it, so identical points are all kept.
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))
