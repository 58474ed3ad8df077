"""SLO attainment of a load test, per step of its schedule and overall, and the plot of latency and keep over time.

Attainment is SuperServe's measure: the share of the requests *sent* that were answered without
error within the SLO, the time running from each request's scheduled arrival. Errors, timeouts and
requests the server refused (over capacity, dropped) all count as misses. Plain arrays in, so the
figures do not depend on how the requests were sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from ats_deploy.atomic import write_atomic

from .schedule import Step

REJECTED = "rejected"  # a status: the server refused the request at once (503 / UNAVAILABLE)
PLOT = "slo_over_time.png"
FULL = 1.0 - 1e-6  # a served keep this high is keep 1.0
RATE_BIN_S = 1.0  # the plot's arrival rate: requests scheduled per second, in bins this wide


@dataclass(frozen=True)
class Outcomes:
    """Every request sent, in arrival order: when it was due, how it ended, its keep, whether it was right."""

    scheduled: np.ndarray  # seconds from the start
    latency_ms: np.ndarray  # from the scheduled arrival to the answer (or the failure)
    status: np.ndarray  # "ok", "error", "timeout" or "rejected"
    keep: np.ndarray  # mean served keep of each answered request; NaN where the server did not say
    correct: np.ndarray | None  # top-1 right (1.0) or wrong (0.0) per answered request, NaN otherwise; None: no labels


@dataclass(frozen=True)
class Row:
    """The figures of one step (or of the whole run)."""

    label: str
    sent: int
    attained: float | None  # share of ``sent`` answered within the SLO; None without an SLO
    p50_ms: float | None
    p99_ms: float | None
    answered_per_s: float
    errors: int
    rejected: int
    mean_keep: float | None
    full_keep: float | None  # share of the answered requests that ran at keep 1.0 (every stage)
    top1: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def row(label: str, o: Outcomes, mask: np.ndarray, seconds: float, slo_ms: float | None) -> Row:
    ok = mask & (o.status == "ok")
    latency = o.latency_ms[ok]
    keep = o.keep[ok]
    correct = None if o.correct is None else o.correct[ok]
    sent = int(mask.sum())
    return Row(
        label=label,
        sent=sent,
        attained=None if slo_ms is None or not sent else float((latency <= slo_ms).sum() / sent),
        p50_ms=float(np.percentile(latency, 50)) if len(latency) else None,
        p99_ms=float(np.percentile(latency, 99)) if len(latency) else None,
        answered_per_s=float(ok.sum() / seconds) if seconds > 0 else 0.0,
        errors=int((mask & np.isin(o.status, ["error", "timeout"])).sum()),
        rejected=int((mask & (o.status == REJECTED)).sum()),
        mean_keep=float(np.nanmean(keep)) if len(keep) and not np.isnan(keep).all() else None,
        full_keep=float(np.mean(keep[~np.isnan(keep)] >= FULL)) if (~np.isnan(keep)).any() else None,
        top1=float(np.mean(correct)) if correct is not None and len(correct) else None,
    )


def summarize(o: Outcomes, steps: list[Step], slo_ms: float | None) -> dict[str, Any]:
    """Per step and overall: attainment, p50/p99, answered per second, errors, rejections, mean keep, top-1."""
    rows = [row(s.label, o, (o.scheduled >= s.start) & (o.scheduled < s.end), s.end - s.start, slo_ms)
            for s in steps]
    total = steps[-1].end - steps[0].start if steps else 0.0
    overall = row("overall", o, np.ones(len(o.scheduled), dtype=bool), total, slo_ms)
    return {"slo_ms": slo_ms, "steps": [r.to_dict() for r in rows], "overall": overall.to_dict(),
            "attainment": "answered without error within the SLO from the scheduled arrival, over requests sent"}


def render(summary: dict[str, Any], console: Console) -> None:
    """The per-step table, the overall row last."""
    slo = summary["slo_ms"]
    title = f"SLO {slo:g} ms: attainment per step" if slo is not None else "per step"
    table = Table(title=title)
    for name in ("step", "sent", "attained", "p50 ms", "p99 ms", "answered/s", "errors", "rejected", "keep",
                 "top-1"):
        table.add_column(name, justify="left" if name == "step" else "right")
    for r in [*summary["steps"], summary["overall"]]:
        table.add_row(
            r["label"], str(r["sent"]), _pct(r["attained"]), _num(r["p50_ms"], 1), _num(r["p99_ms"], 1),
            _num(r["answered_per_s"], 1), str(r["errors"]), str(r["rejected"]), _num(r["mean_keep"], 2),
            _pct(r["top1"]),
        )
    console.print(table)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def plot(o: Outcomes, slo_ms: float | None, path: Path) -> Path:
    """Latency of each request, the keep it ran with, and the arrival rate, against the scheduled arrival time."""
    figure = Figure(figsize=(9, 7), layout="constrained")
    top, middle, bottom = figure.subplots(3, 1, sharex=True)
    ok = o.status == "ok"
    top.scatter(o.scheduled[ok], o.latency_ms[ok], s=3, label="answered")
    failed = ~ok
    if failed.any():
        top.scatter(o.scheduled[failed], np.zeros(failed.sum()), s=6, marker="x", color="tab:red",
                    label="error or refused")
    if slo_ms is not None:
        top.axhline(slo_ms, color="tab:red", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    top.set_ylabel("latency (ms)")
    top.legend(loc="upper right", fontsize="small")
    known = ok & ~np.isnan(o.keep)
    middle.scatter(o.scheduled[known], o.keep[known], s=3, color="tab:green")
    middle.set_ylabel("keep served")
    middle.set_ylim(0, 1.05)
    end = float(o.scheduled.max()) if len(o.scheduled) else RATE_BIN_S
    edges = np.arange(0.0, end + RATE_BIN_S, RATE_BIN_S)
    counts, _ = np.histogram(o.scheduled, bins=edges)
    bottom.step(edges[:-1], counts / RATE_BIN_S, where="post", color="tab:orange")
    bottom.set_ylabel("arrivals / s")
    bottom.set_xlabel("scheduled arrival (s from the start)")
    buffer = _png(figure)
    write_atomic(path, buffer)
    return path


def _png(figure: Figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
