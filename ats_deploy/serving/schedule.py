"""Arrival schedules for ``loadtest``: rates that change in steps, alternating bursts, or a trace of arrival times.

``--rate 20,60,20 --step-seconds 20``: 20 requests/s for 20 s, then 60, then 20 (Poisson arrivals
within each step, seeded, so every run sends the same sequence). With ``--duration`` longer than
the steps, they repeat: ``--rate 42,109 --step-seconds 10 --duration 60`` alternates a light and a
heavy load every 10 s (a bursty trace). ``--trace FILE``: one arrival time per line, in seconds from
the start; the report groups it in windows of ``--step-seconds`` (default 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

SEED = 0  # the schedule's arrivals are reproducible
TRACE_WINDOW_S = 10.0  # a trace's report windows when --step-seconds is not given


@dataclass(frozen=True)
class Step:
    """One window of the schedule: when it starts and ends (seconds from the start), its rate if it was set."""

    start: float
    end: float
    rate: float | None  # None: a trace's window

    @property
    def label(self) -> str:
        window = f"{self.start:g}-{self.end:g} s"
        return f"{window} @ {self.rate:g}/s" if self.rate is not None else window


@dataclass(frozen=True)
class Schedule:
    """Arrival times (seconds from the start, increasing) and the steps the report is broken into."""

    times: np.ndarray
    steps: list[Step]
    origin: str  # how it was given, for the report

    @property
    def duration(self) -> float:
        return self.steps[-1].end if self.steps else 0.0

    @property
    def mean_rate(self) -> float:
        return len(self.times) / self.duration if self.duration else 0.0


def plan(rate: str | None, concurrency: str | None, step_s: float | None, trace: Path | None, duration: float,
         slo_ms: float | None) -> Schedule:
    """The schedule ``loadtest`` asked for, or one message saying what does not go together.

    Rates run ``step_s`` each (default: ``duration``), repeated to fill ``duration`` when that is longer.
    """
    if slo_ms is not None and (not math.isfinite(slo_ms) or slo_ms <= 0):
        raise UserError(f"--slo-ms {slo_ms:g} is not a positive number of milliseconds.")
    if concurrency is not None:
        raise UserError("--step-seconds, --trace and --slo-ms run an open-loop schedule; --concurrency is closed loop.",
                        hint="Give arrival rates (--rate 20,60,20) or --trace FILE instead of --concurrency.")
    if trace is not None:
        if rate is not None:
            raise UserError("--trace gives the arrival times itself; drop --rate.")
        return from_trace(trace, step_s)
    if rate is None:
        raise UserError("a schedule needs arrival rates or a trace.", hint="Pass --rate 20,60,20 or --trace FILE.")
    rates = _rates(rate)
    step = step_s if step_s is not None else duration
    return from_rates(rates, step, max(duration, step * len(rates)))


def _rates(text: str) -> list[float]:
    try:
        rates = [float(item) for item in text.split(",")]
    except ValueError:
        rates = []
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise UserError(f"cannot read --rate '{text}': give positive requests per second, comma-separated, e.g. "
                        "--rate 20,60,20.")
    return rates


def from_rates(rates: list[float], step_s: float, duration: float | None) -> Schedule:
    """``rates`` in turn, ``step_s`` each, repeated to fill ``duration`` (default: each rate once)."""
    if not math.isfinite(step_s) or step_s <= 0:
        raise UserError(f"--step-seconds {step_s:g} is not a positive number of seconds.")
    total = duration if duration is not None else step_s * len(rates)
    count = max(1, math.ceil(total / step_s - 1e-9))
    steps, times = [], []
    generator = np.random.default_rng(SEED)
    for index in range(count):
        start, end, rate = index * step_s, min((index + 1) * step_s, total), rates[index % len(rates)]
        gaps = generator.exponential(1.0 / rate, size=int(rate * (end - start) * 2 + 20))
        arrivals = start + np.cumsum(gaps)
        times.append(arrivals[arrivals < end])
        steps.append(Step(start, end, rate))
    label = ",".join(f"{r:g}" for r in rates)
    return Schedule(np.concatenate(times), steps, f"--rate {label} --step-seconds {step_s:g} over {total:g} s")


def from_trace(path: Path, window_s: float | None) -> Schedule:
    """Arrival times read from ``path`` (seconds, one per line, increasing), reported in windows of ``window_s``."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        times = np.array([float(line) for line in lines if line and not line.startswith("#")])
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read --trace {path}: {exc}.",
                        hint="Give one arrival time per line, in seconds from the start (e.g. 0.013).") from None
    if not len(times) or not np.isfinite(times).all() or (times < 0).any() or (np.diff(times) < 0).any():
        raise UserError(f"--trace {path} must list at least one arrival time, in seconds >= 0, in increasing order.")
    window = window_s if window_s is not None else TRACE_WINDOW_S
    if not math.isfinite(window) or window <= 0:
        raise UserError(f"--step-seconds {window:g} is not a positive number of seconds.")
    end = float(times[-1]) + 1e-6
    steps = [Step(start, min(start + window, end), None) for start in np.arange(0.0, end, window)]
    return Schedule(times, steps, f"--trace {path} ({len(times)} arrivals)")
