"""What a tune reports: the outcome, its statistics, the tuned profile's YAML, the Pareto plot and the table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from ats_deploy.errors import UserError
from ats_deploy.keep import format_keep
from ats_deploy.profiles import dump_profile
from ats_deploy.tune_log import Dense, Measurement

from .. import run
from .search import COARSE, STEP, Objective, pareto_front

OTHER_PRECISION_COLOURS = ("tab:orange", "tab:green", "tab:purple")  # the precisions tune did not choose
SEPARABLE = 2.0  # differences within this many standard errors are reported as not told apart by the data


class BudgetNotMet(UserError):
    """No measured setting meets the constraint: the closest is reported; the log and a ``.failed`` plot are kept."""

    exit_code = 1


@dataclass
class Outcome:
    """Every measured setting, the choice, and where the results went."""

    plan: run.Plan
    objective: Objective
    dense: Dense
    settings: list[Measurement]
    best: Measurement  # the best-ranked of all settings: the chosen one, or the closest when none meets the constraint
    measured_now: int
    created: str
    environment: dict[str, Any]
    model_sha256: str
    output: Path
    log: Path
    # tune --precision, repeated: the chosen precision (written into the profile) and every precision's own outcome
    precision: str | None = None
    lanes: list[Outcome] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.objective.meets(self.best)

    @property
    def plot(self) -> Path:
        """The Pareto plot: beside the profile it explains, or, for a failed run, named so (no profile matches it)."""
        return self.output.with_suffix(".pareto.png" if self.met else ".failed.pareto.png")

    @property
    def runner_up(self) -> Measurement | None:
        """The best-ranked setting that computes something else than the chosen one (other kept tokens)."""
        others = [m for m in self.settings if m.tokens != self.best.tokens]
        return min(others, key=self.objective.rank) if others else None

    @property
    def dense_p50_ms(self) -> float:
        """Median of the dense export's p50 over every interleaved run."""
        return float(np.median([m.dense_p50_ms for m in self.settings]))

    @property
    def images(self) -> int:
        return len(self.dense.correct)

    def front(self) -> list[tuple[str, Measurement]]:
        """The accuracy-latency Pareto front over every precision's settings: (precision, setting), fastest first."""
        points = [(lane.plan.target.precision, m) for lane in self.lanes for m in lane.settings]
        return [points[i] for i in pareto_front([(m.p50_ms, m.accuracy) for _, m in points])]

    @property
    def backend_label(self) -> str:
        plan = self.plan
        if plan.backend != plan.profile.backend:
            return f"{plan.backend} (overridden; profile says {plan.profile.backend})"
        return plan.backend

    def check_met(self) -> None:
        """Raise :class:`BudgetNotMet`, naming the closest setting, when no setting meets the constraint."""
        if self.met:
            return
        if self.objective.max_drop is not None:
            problem = (
                f"no measured setting is within {self.objective.max_drop:g} points of the dense model's top-1 "
                f"({100 * self.dense.accuracy:.1f}%)"
            )
            hint = "Allow a larger --max-drop, or measure on more images (see the standard errors above)."
        else:
            problem = f"no measured setting runs at p50 <= {self.objective.latency_ms:g} ms"
            budget = "--latency-ms" if self.objective.budget_from is None else "the budget (--latency-ms)"
            hint = (
                f"The dense model runs at {self.dense_p50_ms:.2f} ms here; raise {budget}, or use a profile "
                "with a smaller batch or a faster backend."
            )
        raise BudgetNotMet(f"{problem}. The closest: {describe(self.best, self.dense)}.", hint=hint)


def describe(m: Measurement, dense: Dense) -> str:
    drop = 100.0 * (m.accuracy - dense.accuracy)
    return (
        f"keep {format_keep(m.keep)}: top-1 {100 * m.accuracy:.1f}% ({drop:+.1f} points vs dense), "
        f"p50 {m.p50_ms:.2f} ms ({m.speedup:.2f}x dense), {m.gflops:.3f} GFLOPs"
    )


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over the same images, in points, and its standard error std(diff) / sqrt(n).

    ``a`` and ``b`` are per-image correctness; the sample standard deviation is used, so the SE is nan for
    fewer than two images.
    """
    diff = a.astype(np.float64) - b.astype(np.float64)
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
    return 100.0 * float(diff.mean()), 100.0 * se


def told_apart(difference: float, se: float) -> bool:
    """Whether the data resolves a difference: more than :data:`SEPARABLE` standard errors from zero."""
    return abs(difference) > SEPARABLE * se  # False for a nan SE: too few images to tell


def _plus_minus(se: float) -> str:
    return f"± {se:.2f}" if math.isfinite(se) else "(no standard error from a single image)"


def limits(outcome: Outcome) -> list[str]:
    """What the measurements can and cannot tell: printed with the result and written into the profile."""
    n, dense, best = outcome.images, outcome.dense, outcome.best
    role = "chosen" if outcome.met else "closest"
    diff, se = paired_difference(best.correct, dense.correct)
    lines = [
        f"{n} images: one image is {100 / n:.3g} points of top-1.",
        f"{role} - dense top-1: {diff:+.2f} {_plus_minus(se)} points (paired standard error over the same images).",
    ]
    if not told_apart(diff, se):
        lines.append(f"The data cannot tell the {role} setting's top-1 from the dense model's (within 2 SE).")
    runner_up = outcome.runner_up
    if runner_up is not None:
        diff, se = paired_difference(best.correct, runner_up.correct)
        text = (
            f"{role} - runner-up (keep {format_keep(runner_up.keep)}, p50 {runner_up.p50_ms:.2f} ms) top-1: "
            f"{diff:+.2f} {_plus_minus(se)} points"
        )
        apart = told_apart(diff, se)
        lines.append(text + ("." if apart else "; the data cannot tell them apart in top-1 (within 2 SE)."))
    dense_p50 = [m.dense_p50_ms for m in outcome.settings]
    if len(dense_p50) > 1:
        spread = 100.0 * float(np.std(dense_p50, ddof=1)) / outcome.dense_p50_ms
        lines.append(
            f"The dense model's p50 varied by {spread:.1f}% (std) over the {len(dense_p50)} interleaved runs: "
            "latency differences below that are timing noise."
        )
    lines.append(
        "Latency holds for this machine, its runtime versions and its load at the time; top-1 for images like these."
    )
    disagreement = _disagreement(outcome)
    if disagreement is not None:
        lines.append(disagreement)
    return lines


def _disagreement(outcome: Outcome) -> str | None:
    """What validation's comparison with the PyTorch reference found wrong at the chosen keep; None when nothing."""
    best, plan = outcome.best, outcome.plan
    if not best.failures:
        return None
    more = f" (and {len(best.failures) - 1} more)" if len(best.failures) > 1 else ""
    return (
        f"At keep {format_keep(best.keep)} the export disagrees with the PyTorch reference: {best.failures[0]}{more}. "
        f"Look into it with `ats-deploy validate {plan.exported.path} --data {plan.data.root} "
        f"--keep {format_keep(best.keep)}` before relying on this profile."
    )


def _dense_text(outcome: Outcome) -> str:
    return (
        f"top-1 {100 * outcome.dense.accuracy:.1f}%, p50 {outcome.dense_p50_ms:.2f} ms (median over "
        f"{len(outcome.settings)} interleaved runs), {outcome.dense.gflops:.3f} GFLOPs"
    )


def header_comments(outcome: Outcome) -> list[str]:
    """The measurements behind the choice, for the top of the tuned profile."""
    plan, env = outcome.plan, outcome.environment
    profile, exported = plan.profile, plan.exported
    runtimes = ", ".join(f"{name} {version or 'not installed'}" for name, version in env["runtimes"].items())
    gpu = f"GPU {env['gpu']}" if env["gpu"] else "no GPU"
    skipped = len(outcome.dense.skipped)
    unreadable = f", {skipped} unreadable files skipped" if skipped else ""
    lines = [
        f"keep tuned by `ats-deploy tune` on {outcome.created}, from profile '{profile.name}' "
        f"({profile.path or 'built-in'}); every other field is the profile's.",
        f"Model: {exported.path} ({exported.arch}, ATS stages {','.join(map(str, exported.stages))}), "
        f"measured file sha256 {outcome.model_sha256[:16]}...",
        f"Device: {env['cpu']} ({env['cores']} cores), {gpu}; {env['platform']}.",
        f"Runtimes: {runtimes}.",
        f"Measured on: {outcome.backend_label}, {plan.precision}, batch {profile.batch}; p50 over "
        f"{profile.iterations} timed rounds after {profile.warmup} warm-up rounds, interleaved with the dense export.",
        f"Images: {outcome.images} from {plan.data.describe()}{unreadable}; accuracy: {plan.data.metric}.",
        f"Objective: {outcome.objective.describe()}.",
        f"Chosen: {describe(outcome.best, outcome.dense)}.",
        f"Dense: {_dense_text(outcome)}.",
        f"Search: {len(outcome.settings)} settings measured (one keep for all stages from {COARSE[0]:g} to "
        f"{COARSE[-1]:g}, then per-stage steps of {STEP:g}); log {outcome.log}, plot {outcome.plot}.",
        "Limits:",
        *(f"  {line}" for line in limits(outcome)),
    ]
    if plan.backend != profile.backend:
        lines.append(
            f"Measured with --backend {plan.backend}, not on the profile's {profile.backend}: tune again on "
            f"{profile.backend} before relying on these values there."
        )
    return lines + _precision_comments(outcome)


def _precision_comments(outcome: Outcome) -> list[str]:
    """With several precisions: which was chosen, each one's best setting, and the front over all of them."""
    if not outcome.lanes:
        return []
    names = [_precision(lane) for lane in outcome.lanes]
    lines = [f"Precision: {outcome.precision}, chosen among {', '.join(names)} (each searched with its own dense "
             f"model timed alongside; Δ and speedup are against that dense model; the objective counts from the "
             f"{names[0]} dense model's top-1):"]
    for lane in outcome.lanes:
        lines.append(f"  {_precision(lane)}: dense {_dense_text(lane)}; best {describe(lane.best, lane.dense)}.")
    front = ", ".join(f"{name} keep {format_keep(m.keep)} ({100 * m.accuracy:.1f}%, {m.p50_ms:.2f} ms)"
                      for name, m in outcome.front())
    lines.append(f"  Pareto front over (precision, keep), fastest first: {front}.")
    return lines


def _precision(lane: Outcome) -> str:
    return lane.plan.target.precision


def write_profile(outcome: Outcome) -> None:
    """The source profile with the chosen keep (one value when all stages share it), named after the file."""
    keep = outcome.best.keep
    value: float | tuple[float, ...] = keep[0] if len(set(keep)) == 1 else keep
    profile = replace(
        outcome.plan.profile, name=outcome.output.stem, keep=value, path=outcome.output, source=measured_source(outcome)
    )
    if outcome.precision is not None:  # tune --precision: the profile runs the precision chosen (or the one asked)
        profile = replace(profile, precision=outcome.precision)
    dump_profile(profile, outcome.output, header_comments(outcome))


def measured_source(outcome: Outcome) -> str:
    """The tuned profile's ``source``: what was measured, in place of the source profile's reasons for its guess
    ("a starting point ... not measured"), which no longer hold for the keep and precision tune chose."""
    plan, profile = outcome.plan, outcome.plan.profile
    precision, chosen = outcome.precision or plan.precision, describe(outcome.best, outcome.dense)
    what = "keep and precision" if outcome.lanes else "keep"  # lanes: several precisions searched
    return (
        f"{what} measured by `ats-deploy tune` on {outcome.created}: {chosen}; on "
        f"{outcome.backend_label}, {precision}, batch {profile.batch}, {outcome.images} images of "
        f"{plan.data.describe()}; objective: {outcome.objective.describe()}. Every other field is profile "
        f"'{profile.name}''s; the measurements behind the choice are in the comments above."
    )


def pareto_figure(outcome: Outcome) -> Figure:
    """Accuracy against latency and against GFLOPs: every measured setting, the Pareto front, chosen and dense."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    plan, objective, best = outcome.plan, outcome.objective, outcome.best
    panels = (
        (f"latency p50 (ms, batch {plan.profile.batch})", lambda m: m.p50_ms, outcome.dense_p50_ms),
        ("GFLOPs per image", lambda m: m.gflops, outcome.dense.gflops),
    )
    for axes, (label, x_of, dense_x) in zip(figure.subplots(1, 2), panels, strict=True):
        points = [(x_of(m), 100.0 * m.accuracy) for m in outcome.settings]
        everything = [*points, (dense_x, 100.0 * outcome.dense.accuracy)]
        front = [everything[i] for i in pareto_front(everything)]
        measured = f"{outcome.precision} settings" if outcome.lanes else "measured settings"
        axes.scatter(*zip(*points, strict=True), s=18, color="tab:blue", alpha=0.6, label=measured)
        others = [lane for lane in outcome.lanes if lane.plan is not plan]
        for lane, color in zip(others, OTHER_PRECISION_COLOURS, strict=False):
            drawn = [(x_of(m), 100.0 * m.accuracy) for m in lane.settings]
            axes.scatter(*zip(*drawn, strict=True), s=18, color=color, alpha=0.6, label=f"{_precision(lane)} settings")
        axes.plot(*zip(*front, strict=True), drawstyle="steps-post", color="tab:blue", linewidth=1,
                  label="Pareto front")
        axes.scatter([dense_x], [everything[-1][1]], marker="s", s=70, color="black", label="dense", zorder=3)
        role = "chosen" if outcome.met else "closest"
        axes.scatter([x_of(best)], [100.0 * best.accuracy], marker="*", s=240, color="tab:red", zorder=4,
                     label=f"{role}: keep {format_keep(best.keep)}")
        if objective.max_drop is not None:
            axes.axhline(100.0 * objective.dense_accuracy - objective.max_drop, color="tab:red", linestyle="--",
                         linewidth=1, label=f"dense - {objective.max_drop:g} points")
        elif x_of is panels[0][1]:
            axes.axvline(objective.latency_ms, color="tab:red", linestyle="--", linewidth=1,
                         label=f"budget {objective.latency_ms:g} ms")
        axes.set_xlabel(label)
        axes.set_ylabel(f"{plan.data.metric} (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    failed = "" if outcome.met else "; failed: no setting meets the objective (the star is the closest)"
    figure.suptitle(
        f"tune {plan.exported.arch}: {len(outcome.settings)} settings on {outcome.backend_label}, "
        f"{outcome.images} images{failed}",
        fontsize=10,
    )
    return figure


def _row(keep: str, accuracy: float, delta: str, gflops: float, p50: float, speedup: float) -> list[str]:
    return [keep, f"{100 * accuracy:.1f}%", delta, f"{gflops:.3f}", f"{p50:.2f}", f"{speedup:.2f}x"]


def render(outcome: Outcome, console: Console) -> None:
    """Every measured setting sorted by latency, the chosen one highlighted; then the choice and its limits."""
    plan, objective, dense = outcome.plan, outcome.objective, outcome.dense
    table = Table(
        title=f"tune {plan.exported.path} | profile {plan.profile.name} | backend: {outcome.backend_label} | "
        f"{plan.precision} | batch {plan.profile.batch} | {outcome.images} images",
        title_justify="left",
    )
    table.add_column("keep", overflow="fold")
    for column in ("top-1", "Δ top-1", "GFLOPs", "p50 ms", "speedup", "meets", "front"):
        table.add_column(column, justify="right")
    points = [(m.p50_ms, m.accuracy) for m in outcome.settings] + [(outcome.dense_p50_ms, dense.accuracy)]
    front = set(pareto_front(points))
    rows: list[tuple[float, list[str], str | None]] = []
    for i, m in enumerate(outcome.settings):
        delta = f"{100 * (m.accuracy - dense.accuracy):+.1f}"
        cells = _row(format_keep(m.keep), m.accuracy, delta, m.gflops, m.p50_ms, m.speedup)
        cells += ["yes" if objective.meets(m) else "no", "•" if i in front else ""]
        style = None
        if m is outcome.best:
            cells[0] = f"{'chosen' if outcome.met else 'closest'}: {cells[0]}"
            style = "bold green" if outcome.met else "bold yellow"
        rows.append((m.p50_ms, cells, style))
    dense_cells = _row("dense", dense.accuracy, "", dense.gflops, outcome.dense_p50_ms, 1.0)
    rows.append((outcome.dense_p50_ms, [*dense_cells, "", "•" if len(points) - 1 in front else ""], "dim"))
    for _, cells, style in sorted(rows, key=lambda row: row[0]):
        table.add_row(*cells, style=style)
    console.print(table)
    console.print(
        f"top-1: {plan.data.metric}; Δ: points vs dense; speedup: the dense export's time / the setting's, median "
        "over the interleaved rounds; front: on the accuracy-latency Pareto front",
        style="dim",
        highlight=False,
    )
    twins = sum(m is not outcome.best and m.tokens == outcome.best.tokens for m in outcome.settings)
    if twins:
        console.print(
            f"{twins} other settings keep the same tokens as the {'chosen' if outcome.met else 'closest'} one: "
            "they compute the same, and their latency differences are noise.",
            style="dim",
            highlight=False,
        )
    console.print(f"objective: {objective.describe()}", highlight=False)
    if outcome.met:
        console.print(f"[bold green]chosen[/] {describe(outcome.best, dense)}", highlight=False)
    for line in limits(outcome):
        console.print(f"  {line}", highlight=False)
    for line in _precision_comments(outcome):
        console.print(line, highlight=False)
    for name, reason in dense.skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}", highlight=False)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if outcome.met:
        written = f"{outcome.output}, {outcome.plot}"
    else:
        kept = f"{outcome.output} is left as it was" if outcome.output.exists() else "no profile written"
        written = f"{outcome.plot} (the plot of this failed run; {kept}: see below)"
    console.print(
        f"wrote {written}; log {outcome.log} ({len(outcome.settings)} settings, {outcome.measured_now} measured now)",
        highlight=False,
    )
