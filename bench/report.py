"""The bench's table on screen and its ``results.json`` / ``results.csv``, written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ats_deploy.profiles import write_atomic
from rich.console import Console
from rich.table import Table

from .plots import write_plots
from .results import BenchResult

CSV_COLUMNS = (
    "variant",
    "runtime",
    "backend",
    "precision",
    "profile",
    "keep",
    "batch",
    "images",
    "accuracy_metric",
    "accuracy",
    "gflops",
    "mean_tokens_per_stage",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "throughput_images_per_s",
    "speedup",
)


def csv_text(result: BenchResult) -> str:
    """One row per variant; the conditions (backend, profile, keep, ...) repeated on every row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    baseline = result.baseline
    for v in result.variants:
        latency = v.latency.summary()
        writer.writerow(
            {
                "variant": v.title,
                "runtime": v.runtime,
                "backend": result.backend_label,
                "precision": result.precision_label,
                "profile": result.profile.name,
                "keep": result.keep_text,
                "batch": result.profile.batch,
                "images": result.data["images"],
                "accuracy_metric": result.accuracy_metric,
                "accuracy": f"{v.accuracy:.6f}",
                "gflops": f"{v.gflops:.4f}",
                "mean_tokens_per_stage": " ".join(f"{t:.1f}" for t in v.mean_tokens),
                "p50_ms": f"{latency['p50_ms']:.4f}",
                "p90_ms": f"{latency['p90_ms']:.4f}",
                "p99_ms": f"{latency['p99_ms']:.4f}",
                "throughput_images_per_s": f"{latency['throughput_images_per_s']:.3f}",
                "speedup": f"{baseline.latency.p50 / v.latency.p50:.3f}",
            }
        )
    return buffer.getvalue()


def write(result: BenchResult, folder: Path) -> list[Path]:
    """``results.json``, ``results.csv`` and the plots in ``folder``; each file appears whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(result, folder)
    data = result.to_dict()
    data["files"] = [p.name for p in plots] + ["results.csv"]
    write_atomic(folder / "results.csv", csv_text(result).encode("utf-8"))
    write_atomic(folder / "results.json", (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return [folder / "results.json", folder / "results.csv", *plots]


def _tokens(mean: list[float]) -> str:
    if not mean:
        return "all"
    return f"{mean[0]:.0f} -> {mean[-1]:.0f}" if len(mean) > 1 else f"{mean[0]:.0f}"


def render(result: BenchResult, console: Console) -> None:
    """The results table, then the data, the exported-vs-reference check, and any warnings."""
    table = Table(title=result.title, title_justify="left")
    metric = "top-1" if result.data["labelled"] else "agree w/ dense"
    columns = ("variant", "runtime", metric, "GFLOPs", "tokens (first -> last stage)", "p50 ms", "p90 ms", "p99 ms")
    for column in (*columns, "images/s", f"x vs {result.baseline.title}"):
        table.add_column(column, justify="left" if column in ("variant", "runtime") else "right")
    for v in result.variants:
        table.add_row(
            v.title,
            v.runtime,
            f"{100 * v.accuracy:.2f}%",
            f"{v.gflops:.2f}",
            _tokens(v.mean_tokens),
            f"{v.latency.p50:.2f}",
            f"{v.latency.p90:.2f}",
            f"{v.latency.p99:.2f}",
            f"{v.latency.throughput:.1f}",
            f"{result.baseline.latency.p50 / v.latency.p50:.2f}",
        )
    console.print(table)
    data = result.data
    skipped = f", {data['skipped_corrupt']} unreadable files skipped" if data["skipped_corrupt"] else ""
    console.print(f"data: {data['images']} images from {data['source']}{skipped}", highlight=False)
    for name, reason in (tuple(item.values()) for item in data["skipped_files"]):
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    _render_comparison(result, console)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _render_comparison(result: BenchResult, console: Console) -> None:
    case = result.comparison
    if case is None:
        return
    verdict = "[green]ok[/]" if case.ok else f"[red]{len(case.failures)} mismatches[/]"
    console.print(
        f"exported ATS vs PyTorch ATS: max |Δlogit| {case.max_logit_diff:.1e}, tokens agree "
        f"{case.token_matches}/{case.token_total}, top-1 agree {case.top1_matches}/{case.images}, "
        f"flips {len(case.flips)}: {verdict}",
        highlight=False,
    )
    for flip in case.flips:
        console.print(f"[yellow]flip at a float tie[/] {flip.describe()}", highlight=False)
    for failure in case.failures:
        console.print(f"[red]mismatch[/] {failure}", highlight=False)
