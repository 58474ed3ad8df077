"""The bench's PNG plots: accuracy against latency and against GFLOPs, and kept tokens per stage.

Figures are drawn on matplotlib's ``Figure`` directly (the Agg renderer, no pyplot
state, no display needed) and written by :func:`ats_deploy.plots.save`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ats_deploy.ats import budget_int
from ats_deploy.plots import save

from .results import BenchResult, VariantResult
from .variants import EXPORTED_ATS, PYTORCH_ATS

MARKERS = {"pytorch_dense": "s", "pytorch_ats": "o", "exported_dense": "D", "exported_ats": "^"}
LOG_SPREAD = 10  # a latency axis spanning more than this factor is drawn on a log scale


def _accuracy_against(result: BenchResult, x_label: str, x_of: Callable[[VariantResult], float]) -> Figure:
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    for variant in result.variants:
        label = f"{variant.title} ({variant.runtime})"
        axes.scatter([x_of(variant)], [100.0 * variant.accuracy], marker=MARKERS[variant.kind], s=60, label=label)
    xs = [x_of(v) for v in result.variants]
    if min(xs) > 0 and max(xs) / min(xs) > LOG_SPREAD:
        axes.set_xscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"{result.accuracy_metric} (%)")
    axes.set_title(f"{result.model['arch']}, keep {result.keep_text}, {result.backend_label}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def accuracy_vs_latency(result: BenchResult) -> Figure:
    return _accuracy_against(result, f"latency p50 (ms, batch {result.profile.batch})", lambda v: v.latency.p50)


def accuracy_vs_gflops(result: BenchResult) -> Figure:
    return _accuracy_against(result, "GFLOPs per image", lambda v: v.gflops)


def kept_tokens(result: BenchResult) -> Figure:
    """Histograms of the tokens each ATS stage kept over the images (the ATS paper's Fig. 6).

    One integer bin per token count on a shared axis; the dashed line is the stage's budget ``K - 1``. With several
    backends, the first one's exported ATS model.
    """
    exported = [v for v in result.variants if v.kind == EXPORTED_ATS]
    variant = exported[0] if exported else next(v for v in result.variants if v.key == PYTORCH_ATS)
    stages, n0, prefix = result.model["stages"], result.model["n0"], result.model.get("prefix_tokens", 1)
    columns = min(len(stages), 3)
    rows = math.ceil(len(stages) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows), layout="constrained")
    figure.suptitle(f"tokens kept per ATS stage: {variant.title} ({variant.runtime}), keep {result.keep_text}")
    low, high = int(variant.tokens.min()), int(variant.tokens.max())
    bins = np.arange(low, high + 2) - 0.5
    for s, block in enumerate(stages):
        axes = figure.add_subplot(rows, columns, s + 1)
        axes.hist(variant.tokens[:, s], bins=bins, color="tab:blue")
        budget = budget_int(result.keep[s], n0, prefix) - prefix  # the most patch tokens the stage can keep
        if low <= budget <= high:
            axes.axvline(budget, color="tab:red", linestyle="--", linewidth=1)
        axes.set_title(f"block {block}", fontsize=9)
        axes.set_xlabel("tokens kept", fontsize=8)
        axes.set_ylabel("images", fontsize=8)
        axes.tick_params(labelsize=7)
    return figure


def write_plots(result: BenchResult, folder: Path) -> list[Path]:
    plots = {
        "accuracy_vs_latency.png": accuracy_vs_latency(result),
        "accuracy_vs_gflops.png": accuracy_vs_gflops(result),
        "kept_tokens.png": kept_tokens(result),
    }
    return [save(figure, folder / name) for name, figure in plots.items()]
