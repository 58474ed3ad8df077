"""The bench's table on screen and its ``results.json`` / ``results.csv``, written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ats_deploy.atomic import write_atomic
from ats_deploy.exporters.compare import Case

from .plots import write_plots
from .results import BenchResult, VariantResult

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
    "accuracy_se",
    "speedup_own_dense",
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
                "speedup": f"{v.speedup(baseline):.3f}",
                "accuracy_se": f"{v.accuracy_se:.6f}",
                "speedup_own_dense": _own_speedup(result, v, "{:.3f}"),
            }
        )
    return buffer.getvalue()


def _own_speedup(result: BenchResult, variant: VariantResult, form: str) -> str:
    """The speedup over its own dense baseline (same backend and precision); empty for the others."""
    own = result.own_baseline(variant)
    return "" if own is None else form.format(variant.speedup(own))


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
    """The results table, then the data, the exported-vs-reference check, and any warnings.

    p90, throughput and the per-stage tokens are in results.json and results.csv. Everything
    printed is :class:`~rich.text.Text`: file and image names (``skimage:coffee: ...``, ``[1].jpg``)
    are never read as markup or emoji codes.
    """
    table = Table(title=Text(result.title), title_justify="left")
    metric = "top-1" if result.data["labelled"] else "agree"
    several = len(result.precisions) > 1  # precisions side by side: standard errors, and each one's own dense
    columns = ("variant", metric, "GFLOPs", "tokens", "p50 ms", "p99 ms", "speedup", *(("vs own dense",) * several))
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    baseline = result.baseline
    for v in result.variants:
        error = f" ±{100 * v.accuracy_se:.1f}" if several else ""
        table.add_row(
            Text.assemble(v.title, " ", (v.runtime, "dim")),
            f"{100 * v.accuracy:.1f}%{error}",
            f"{v.gflops:.2f}",
            _tokens(v.mean_tokens),
            f"{v.latency.p50:.2f}",
            f"{v.latency.p99:.2f}",
            f"{v.speedup(baseline):.2f}x",
            *((_own_speedup(result, v, "{:.2f}x"),) * several),
        )
    console.print(table)
    console.print(
        Text(
            f"{metric}: {result.accuracy_metric}; tokens: mean kept at the first -> last ATS stage; "
            f"speedup: time of {baseline.title} ({baseline.runtime}) / time, median over the interleaved rounds"
            + ("; ± one standard error; vs own dense: over the dense model of the same backend and precision"
               if several else ""),
            style="dim",
        ),
        highlight=False,
    )
    data = result.data
    count = data["skipped_corrupt"]
    skipped = f", {count} unreadable file{'s' if count > 1 else ''} skipped" if count else ""
    console.print(Text(f"data: {data['images']} images from {data['source']}{skipped}"), highlight=False)
    for item in data["skipped_files"]:
        _line(console, "skipped", "yellow", f"{item['file']}: {item['reason']}")
    _render_comparison(result, console)
    for warning in result.warnings:
        _line(console, "warning:", "yellow", str(warning))


def _line(console: Console, label: str, style: str, text: str) -> None:
    """``label`` in ``style``, then ``text`` exactly as it is."""
    console.print(Text.assemble((label, style), " ", text), highlight=False)


def _render_comparison(result: BenchResult, console: Console) -> None:
    """One line per exported ATS model compared with the reference (naming its runtime when there are several)."""
    for key, case in result.cases.items():
        runtime = f" ({result.runtime_of(key)})" if result.comparisons else ""
        _render_case(f"exported ATS{runtime} vs PyTorch ATS", case, console)
    for agreement in result.agreements.values():
        tokens = " ".join(f"{share:.2f}" for share in agreement["same_tokens_per_stage"])
        bar = f"below validation's bar of {agreement['top1_bar']:.0%} beyond sampling error"
        verdict = ("ok", "green") if agreement["ok"] else (bar, "red")
        summary = (
            f"{agreement['between']}: top-1 agree {agreement['top1_agree']:.1%} of {agreement['images']} images, "
            f"same kept-token count per stage {tokens}: "
        )
        console.print(Text.assemble(summary, verdict), highlight=False)


def _render_case(between: str, case: Case, console: Console) -> None:
    verdict = ("ok", "green") if case.ok else (f"{len(case.failures)} mismatches", "red")
    summary = (
        f"{between}: max |Δlogit| {case.max_logit_diff:.1e}, stages that kept the same "
        f"{'patches' if case.positions else 'token counts'} {case.stage_matches}/{case.stage_total}, "
        f"top-1 agree {case.top1_matches}/{case.images}, "
        f"flips {len(case.flips)}: "
    )
    console.print(Text.assemble(summary, verdict), highlight=False)
    for flip in case.flips:
        _line(console, "flip at a float tie", "yellow", flip.describe())
    for failure in case.failures:
        _line(console, "mismatch", "red", str(failure))
