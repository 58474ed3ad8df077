"""A load test's table on screen, its ``results.json`` / ``results.csv`` and its latency-throughput plot.

Files are written atomically (:mod:`ats_deploy.atomic`); the plot is drawn on matplotlib's
``Figure`` directly, as bench's plots are (no pyplot state, no display needed).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ats_deploy.atomic import write_atomic

from .drive import Answer
from .plan import Images
from .statistics import LevelStats, LoadTest, outcomes
from .verify import ATOL

CSV_COLUMNS = (
    "mode",
    "load",
    "requests",
    "ok",
    "errors",
    "timeouts",
    "requests_per_s",
    "images_per_s",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "mean_tokens_per_stage",
    "accuracy",
    "accuracy_se",
    "keep_mix",
    "batch",
    "model",
    "url",
)
STYLES = {"closed": ("tab:blue", "concurrency"), "open": ("tab:orange", "rate")}
LOG_SPREAD = 10  # a latency axis spanning more than this factor is drawn on a log scale (as bench's plots)


def _optional(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def csv_text(result: LoadTest) -> str:
    """One row per level; the conditions (keep mix, batch, model, URL) repeated on every row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in result.levels:
        writer.writerow(
            {
                "mode": s.level.mode,
                "load": f"{s.level.load:g}",
                "requests": s.requests,
                "ok": s.ok,
                "errors": s.errors,
                "timeouts": s.timeouts,
                "requests_per_s": f"{s.requests_per_s:.3f}",
                "images_per_s": f"{s.images_per_s:.3f}",
                **{f"{q}_ms": _optional(s.latency_ms[q], 3) for q in ("p50", "p90", "p99", "mean")},
                "mean_tokens_per_stage": " ".join(f"{t:.1f}" for t in s.mean_tokens),
                "accuracy": _optional(s.accuracy, 6),
                "accuracy_se": _optional(s.accuracy_se, 6),
                "keep_mix": " ".join(result.keep_mix),
                "batch": result.batch,
                "model": result.target["name"],
                "url": result.target["url"],
            }
        )
    return buffer.getvalue()


def latency_vs_throughput(result: LoadTest) -> Figure:
    """p50 (solid) and p99 (dashed) latency against answered requests per second, one line per loop kind."""
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    for mode, (colour, word) in STYLES.items():
        levels = [s for s in result.levels if s.level.mode == mode and s.ok]
        if not levels:
            continue
        x = [s.requests_per_s for s in levels]
        axes.plot(x, [s.latency_ms["p50"] for s in levels], "o-", color=colour, label=f"{word}: p50")
        axes.plot(x, [s.latency_ms["p99"] for s in levels], "^--", color=colour, label=f"{word}: p99")
        for s in levels:
            axes.annotate(f"{s.level.load:g}", (s.requests_per_s, s.latency_ms["p99"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    latencies = [s.latency_ms[q] for s in result.levels if s.ok for q in ("p50", "p99")]
    if latencies and min(latencies) > 0 and max(latencies) / min(latencies) > LOG_SPREAD:
        axes.set_yscale("log")
    axes.set_xlabel(f"throughput (answered requests/s, {result.batch} image(s) each)")
    axes.set_ylabel("latency (ms)")
    axes.set_title(f"{result.target['name']} at {result.target['url']}, keep {', '.join(result.keep_mix)}",
                   fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def write(result: LoadTest, folder: Path) -> list[Path]:
    """``results.json``, ``results.csv`` and ``latency_vs_throughput.png`` in ``folder``, each whole or not at all."""
    from ats_deploy.plots import save

    folder.mkdir(parents=True, exist_ok=True)
    plot = save(latency_vs_throughput(result), folder / "latency_vs_throughput.png")
    data = result.to_dict()
    data["files"] = [plot.name, "results.csv"]
    write_atomic(folder / "results.csv", csv_text(result).encode("utf-8"))
    write_atomic(folder / "results.json", (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return [folder / "results.json", folder / "results.csv", plot]


def _tokens(mean: list[float]) -> str:
    if not mean:
        return "-"
    return f"{mean[0]:.0f} -> {mean[-1]:.0f}" if len(mean) > 1 else f"{mean[0]:.0f}"


def _accuracy(s: LevelStats) -> str:
    if s.accuracy is None:
        return "-"
    return f"{100 * s.accuracy:.1f} ± {100 * s.accuracy_se:.1f}%"


def render(result: LoadTest, console: Console) -> None:
    """The table (one row per level), then the data, failures, the --verify verdict and any warnings."""
    table = Table(title=Text(result.title), title_justify="left")
    columns = ("level", "requests", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors", "timeouts", "tokens")
    for column in (*columns, "top-1"):
        table.add_column(column, justify="left" if column == "level" else "right")
    for s in result.levels:
        table.add_row(
            s.level.label,
            str(s.requests),
            f"{s.requests_per_s:.1f}",
            f"{s.images_per_s:.1f}",
            *(_optional(s.latency_ms[q], 1) or "-" for q in ("p50", "p90", "p99")),
            Text(str(s.errors), style="red" if s.errors else ""),
            Text(str(s.timeouts), style="yellow" if s.timeouts else ""),
            _tokens(s.mean_tokens),
            _accuracy(s),
        )
    console.print(table)
    if result.slo is not None:
        from ..slo_report import render as render_slo

        render_slo(result.slo, console)
    console.print(
        Text(
            "latency: of answered requests, from the send (closed loop) or the scheduled arrival (open loop); "
            "tokens: mean kept at the first -> last ATS stage; top-1 ± its standard error over the distinct images",
            style="dim",
        ),
        highlight=False,
    )
    data = result.data
    skipped = f", {data['skipped_corrupt']} unreadable skipped" if data["skipped_corrupt"] else ""
    console.print(Text(f"data: {data['images']} images from {data['source']}{skipped}"), highlight=False)
    for s in result.levels:
        for example in s.error_examples:
            console.print(Text.assemble(("failed", "red"), f" ({s.level.label}) {example}"), highlight=False)
    _render_verification(result, console)
    for warning in result.warnings:
        console.print(Text.assemble(("warning:", "yellow"), " ", warning), highlight=False)


def _render_verification(result: LoadTest, console: Console) -> None:
    from ats_deploy.exporters.compare import Report
    from ats_deploy.exporters.validate import render as render_cases

    verification = result.verification
    if verification is None:
        return
    render_cases(Report(verification.cases, ATOL), console, title="served answers vs PyTorch reference (--verify)")
    if verification.answers < verification.asked:
        console.print(
            Text(f"--verify {verification.asked}: only {verification.answers} answers came back to compare",
                 style="yellow"),
            highlight=False,
        )


def slo_plot(answers: list[Answer], schedule: Any, images: Images, slo_ms: float | None, folder: Path) -> Path:
    from ..slo_report import PLOT, plot

    return plot(outcomes(answers, schedule, images), slo_ms, folder / PLOT)
