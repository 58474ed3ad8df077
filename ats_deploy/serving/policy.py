"""Load-adaptive budgets: which keep the next batch runs with, so that requests meet a latency target (SLO).

An ATS model takes its compute budget (``keep``) as a run-time input, so a server can trade tokens
for time when arrivals outrun what it serves at full budget, and take them back when the load falls.
This module decides how, as SuperServe's SlackFit does (NSDI 2025): from the slack left to the most
urgent waiting request and from the recent arrival rate, pick the most accurate operating point
(a *rung* of a ladder of keep rows, full budget first) whose predicted batch latency fits.

It is pure: numpy and the standard library, no Triton, no clock of its own (every call takes
``now``), so tests drive it on a simulated clock and Triton's Python backend can carry the file
(the front model, :mod:`.front_model`) without an ats-deploy install. docs/ATS.md describes the
policy for users; the README's "Load-adaptive budgets" section, the commands.

A request's deadline is its arrival plus the SLO *less the time it spends outside the model*: the
batch still has to be prepared and the answers sent, so a plan that ends the model run at exactly
arrival + SLO answers late (seen: p99 105-109 ms at an SLO of 100 ms, bench/RESULTS.md). That
overhead is a running estimate of what the caller observes (:meth:`SlackFit.observe_overhead`:
the front model reports, per batch, the time from its decision to the model call plus the time
from the model's end to the last answer sent), not a fixed share: it changes with the load on the
machine and the size of the answers. Every decision below uses that deadline.

Decisions, per batch (:meth:`SlackFit.decide`):

1. requests whose deadline cannot be met even alone at the floor are dropped (answered at once with
   an error: serving them late would only make the ones behind them late too);
2. the batch is every waiting request, up to the largest batch the model takes (fewer where the
   oldest would miss its deadline in a batch that large);
3. the rung *needed* is the most accurate one at which (a) every waiting request, batch after batch,
   finishes before its deadline less a ``margin`` for the latency model's error (the slack), and (b)
   the server keeps up with the arrival rate with a steady-state latency within that budget;
4. the level drops to the needed rung at once; it rises one rung per ``raise_after_s`` spent at the
   current level (several after a quiet spell), and only when the rung above fits with
   ``raise_margin`` to spare (hysteresis: under a constant load the level settles and stays).

Admission (:meth:`SlackFit.admit`): a request that could not meet its deadline even if every
request ahead of it ran at the floor is refused on arrival, instead of timing out later.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_FLOOR = 0.5  # the lowest keep without --min-keep/--max-drop: about half the tokens of every stage
CORRECTION_WEIGHT = 0.25  # how fast observed batch times correct the latency model (exponential average)
CORRECTION_LIMITS = (0.1, 10.0)  # the correction factor stays within these
OBSERVATION_LIMITS = (0.5, 2.0)  # one batch's observed / predicted is clipped to these: one stall never rules
OVERHEAD_WEIGHT = 0.25  # how fast observed overheads outside the model move the running estimate
OVERHEAD_LIMIT = 0.25  # one observed overhead counts at most this share of the SLO: one stall never rules


@dataclass(frozen=True)
class Rung:
    """One operating point of the ladder: the keep row (one value per ATS stage) and its top-1 if measured."""

    keep: tuple[float, ...]
    accuracy: float | None = None  # top-1 (0-1) from a tune log; None where not measured

    @property
    def label(self) -> str:
        values = sorted(set(self.keep))
        return f"{values[0]:g}" if len(values) == 1 else ":".join(f"{v:g}" for v in self.keep)


class LatencyModel:
    """Seconds per batch on this device at each rung and batch size, from measured points.

    Between measured batch sizes the time is interpolated linearly, beyond the largest it is
    extrapolated with the last two points' slope. Observed batch times correct every prediction by
    one factor (an exponential average of observed / predicted): what else runs on the machine
    slows every rung alike.
    """

    def __init__(self, points: Sequence[dict[int, float]]) -> None:
        if not points or any(not p for p in points):
            raise ValueError("a latency model needs at least one measured batch size per rung")
        self._sizes = [np.array(sorted(p), dtype=float) for p in points]
        self._times = [np.array([p[b] for b in sorted(p)], dtype=float) for p in points]
        self.correction = 1.0

    @property
    def rungs(self) -> int:
        return len(self._sizes)

    def measured(self, rung: int, batch: int) -> float:
        """The model's time for ``batch`` at ``rung``, without the correction."""
        sizes, times = self._sizes[rung], self._times[rung]
        if len(sizes) == 1:
            return float(times[0] * batch / sizes[0])
        if batch <= sizes[-1]:
            return float(np.interp(batch, sizes, times))
        slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
        return float(times[-1] + slope * (batch - sizes[-1]))

    def seconds(self, rung: int, batch: int) -> float:
        """The predicted time of a batch of ``batch`` requests at ``rung``."""
        return self.measured(rung, batch) * self.correction

    def observe(self, rung: int, batch: int, seconds: float) -> None:
        """Fold one observed batch time into the correction factor."""
        ratio = min(max(seconds / max(self.measured(rung, batch), 1e-9), OBSERVATION_LIMITS[0]), OBSERVATION_LIMITS[1])
        blended = (1 - CORRECTION_WEIGHT) * self.correction + CORRECTION_WEIGHT * ratio
        self.correction = min(max(blended, CORRECTION_LIMITS[0]), CORRECTION_LIMITS[1])

    def to_dict(self) -> list[dict[str, float]]:
        return [{str(int(b)): float(t) for b, t in zip(s, ts, strict=True)} for s, ts in zip(
            self._sizes, self._times, strict=True)]

    @classmethod
    def from_dict(cls, data: Sequence[dict[str, float]]) -> LatencyModel:
        return cls([{int(b): float(t) for b, t in rung.items()} for rung in data])


class RateMeter:
    """Arrivals per second over the last ``window_s`` seconds, from the arrival times it is given."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def add(self, when: float) -> None:
        self._times.append(when)

    def rate(self, now: float) -> float:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        return len(self._times) / self.window_s


@dataclass(frozen=True)
class Settings:
    """What the policy holds to: the SLO, the largest batch, and its safety margins."""

    slo_s: float
    max_batch: int
    margin: float = 0.2  # the share of the deadline kept, when choosing the rung, for the latency model's error
    raise_after_s: float = 0.5  # time at a level before rising one rung
    raise_margin: float = 0.25  # the rung above must fit with its times and the arrival rate this much higher


@dataclass(frozen=True)
class Decision:
    """What to do now: drop the ``expired`` oldest requests, then run the next ``batch`` ones at ``rung``."""

    rung: int
    batch: int
    expired: int


class SlackFit:
    """The policy's state (the current level, rung 0 = full budget) and its two questions: admit? which rung?"""

    def __init__(self, ladder: Sequence[Rung], latency: LatencyModel, settings: Settings) -> None:
        if latency.rungs != len(ladder):
            raise ValueError(f"the latency model has {latency.rungs} rungs, the ladder {len(ladder)}")
        self.ladder = list(ladder)
        self.latency = latency
        self.settings = settings
        self.level = 0
        self.overhead_s = 0.0  # running estimate of a request's time outside the model (observe_overhead)
        self._overhead_seen = False
        self._changed = -math.inf

    @property
    def floor(self) -> int:
        return len(self.ladder) - 1

    @property
    def deadline_s(self) -> float:
        """The time from a request's arrival by which its model run must end: the SLO less the overhead after it."""
        return self.settings.slo_s - self.overhead_s

    @property
    def budget_s(self) -> float:
        """The deadline less the margin: what the rung is chosen to fit, so that the model's error still fits."""
        return self.deadline_s * (1 - self.settings.margin)

    def observe_overhead(self, seconds: float) -> None:
        """Fold in one batch's observed time outside the model: from the decision to its last answer sent, less the
        model run.

        The first observation is taken as it is (nothing to average it with yet: the first batches would otherwise
        plan with too little room), later ones enter an exponential average; each is clipped to ``OVERHEAD_LIMIT``
        of the SLO, so that one stall of the machine cannot make the policy drop everything for a while.
        """
        seen = min(max(seconds, 0.0), OVERHEAD_LIMIT * self.settings.slo_s)
        weight = OVERHEAD_WEIGHT if self._overhead_seen else 1.0
        self.overhead_s = (1 - weight) * self.overhead_s + weight * seen
        self._overhead_seen = True

    def admit(self, now: float, waiting: int, busy_until: float, arrival: float | None = None) -> bool:
        """Whether a request arriving ``now`` behind ``waiting`` others can meet its deadline at the floor.

        ``arrival``: when it reached the server, where that is earlier than ``now`` (the front model sees a
        request only after the hop to Triton and Triton's queue); its deadline counts from there.
        ``busy_until``: when the batch running now is predicted to end (``now`` or earlier when idle). An idle
        server admits every request, even where the model says the floor alone misses the SLO: its answer is
        the measurement that corrects the model if it is wrong.
        """
        if waiting == 0 and busy_until <= now:
            return True
        start = max(now, busy_until)
        done = start + self._drain(self.floor, waiting + 1)
        return done <= (now if arrival is None else arrival) + self.deadline_s

    def decide(self, now: float, arrivals: Sequence[float], rate: float) -> Decision:
        """The rung of the next batch for requests that arrived at ``arrivals`` (oldest first), ``rate`` per s."""
        expired = self._expired(now, arrivals)
        waiting = arrivals[expired:]
        if not waiting:
            return Decision(self.level, 0, expired)
        need = self._needed(now, waiting, rate)
        if need > self.level:
            self.level, self._changed = need, now
        elif need < self.level and now - self._changed >= self.settings.raise_after_s:
            spare = 1.0 + self.settings.raise_margin
            steps = int((now - self._changed) / self.settings.raise_after_s)  # after a quiet spell, several
            while steps and self.level > need and self._fits(self.level - 1, now, waiting, rate * spare, spare):
                self.level, steps = self.level - 1, steps - 1
            self._changed = now
        return Decision(self.level, self._batch(now, waiting), expired)

    def _batch(self, now: float, waiting: Sequence[float]) -> int:
        """Every waiting request up to the largest batch, fewer where the oldest would otherwise miss its deadline."""
        size = min(len(waiting), self.settings.max_batch)
        while size > 1 and now + self.latency.seconds(self.level, size) > waiting[0] + self.deadline_s:
            size -= 1
        return size

    def _expired(self, now: float, arrivals: Sequence[float]) -> int:
        """How many of the oldest requests cannot finish by their deadline even alone at the floor.

        Where the model says even a lone request at the floor misses the SLO, a lone request is dropped only
        once its deadline has passed: served, it costs nobody else, and its time corrects a model that is wrong.
        """
        alone = self.latency.seconds(self.floor, 1)
        hopeless = alone > self.deadline_s
        count = 0
        for arrival in arrivals:
            lone = count == len(arrivals) - 1
            if arrival + self.deadline_s >= now + (0.0 if lone and hopeless else alone):
                break
            count += 1
        return count

    def _needed(self, now: float, waiting: Sequence[float], rate: float) -> int:
        """The most accurate rung that fits the waiting requests and the arrival rate; the floor when none does."""
        for rung in range(len(self.ladder)):
            if self._fits(rung, now, waiting, rate, 1.0):
                return rung
        return self.floor

    def _fits(self, rung: int, now: float, waiting: Sequence[float], rate: float, spare: float) -> bool:
        return self._meets_deadlines(rung, now, waiting, spare) and self._keeps_up(rung, rate, spare)

    def _meets_deadlines(self, rung: int, now: float, waiting: Sequence[float], spare: float) -> bool:
        """Whether every waiting request, served batch after batch at ``rung``, ends within its budget.

        Between two model runs the overhead passes too: the answers of one are sent and the next is prepared.
        """
        clock, largest = now, self.settings.max_batch
        for start in range(0, len(waiting), largest):
            size = min(largest, len(waiting) - start)
            clock += self.latency.seconds(rung, size) * spare
            if clock > waiting[start] + self.budget_s:
                return False
            clock += self.overhead_s
        return True

    def _keeps_up(self, rung: int, rate: float, spare: float) -> bool:
        """Whether arrivals at ``rate`` settle into batches at ``rung`` that answer within the budget.

        With greedy batching a batch holds the requests that arrived during the one before, whose cycle
        is its model run plus the overhead around it: the steady batch ``b`` is the smallest with
        ``b >= rate * cycle(b)``, and a request waits at most one cycle, so its model run ends within
        a cycle and a model run.
        """
        for size in range(1, self.settings.max_batch + 1):
            seconds = self.latency.seconds(rung, size) * spare
            cycle = seconds + self.overhead_s
            if size >= rate * cycle:
                return cycle + seconds <= self.budget_s
        return False

    def _drain(self, rung: int, requests: int) -> float:
        """The time until the model run of the last of ``requests`` at ``rung`` ends, in batches as large as the
        model takes, the overhead passing between two runs."""
        largest, total = self.settings.max_batch, 0.0
        while requests > 0:
            size = min(largest, requests)
            total += self.latency.seconds(rung, size)
            requests -= size
            if requests:
                total += self.overhead_s
        return total


def uniform_ladder(top: Sequence[float], floor: float, step: float = 0.1) -> list[Rung]:
    """The profile's keep row, then one keep for all stages in ``step``s below its smallest value, down to ``floor``.

    Used where no tune log says which settings are best at each cost.
    """
    rungs = [Rung(tuple(float(v) for v in top))]
    value = round(min(top) - step, 6)
    while value > floor + 1e-9:
        rungs.append(Rung((value,) * len(top)))
        value = round(value - step, 6)
    if floor < min(top) - 1e-9:
        rungs.append(Rung((float(floor),) * len(top)))
    return rungs


def pareto_ladder(top: Rung, settings: Sequence[tuple[Rung, float]], floor_accuracy: float | None,
                  min_keep: float | None) -> list[Rung]:
    """The profile's setting, then the tune log's Pareto front below its cost: each rung the most accurate at its cost.

    ``settings``: measured (rung, p50 seconds) pairs, ``top`` among them or not; rungs under the floor
    (top-1 below ``floor_accuracy``, or a keep value below ``min_keep``) are left out.
    """
    top_time = min((t for r, t in settings if r.keep == top.keep), default=math.inf)
    cheaper = sorted(((t, r) for r, t in settings if t < top_time and r.keep != top.keep),
                     key=lambda item: (item[0], -(item[1].accuracy or 0.0)))
    front: list[Rung] = []
    best = -math.inf
    for _, rung in cheaper:  # fastest first: a point is on the front when it beats every faster one's top-1
        if (rung.accuracy or 0.0) > best:
            best = rung.accuracy or 0.0
            front.append(rung)
    front.reverse()  # most expensive first, below the top
    allowed = [r for r in front if (floor_accuracy is None or (r.accuracy or 0.0) >= floor_accuracy)
               and (min_keep is None or min(r.keep) >= min_keep - 1e-9)]
    return [top, *allowed]
