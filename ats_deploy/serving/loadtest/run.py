"""The whole load test in order: plan and check, warm up, drive every level, verify, report."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from ats_deploy.errors import UserError

from ..triton_client import Endpoint
from . import report
from .drive import Answer, Sender, closed_loop, open_loop, quiet_collector, warm_up
from .plan import (
    Images,
    Level,
    Request,
    check_batch,
    check_request,
    load_images,
    parse_levels,
    parse_mix,
    plan_output,
    planned_schedule,
    target,
)
from .statistics import LevelStats, LoadTest, level_stats, slo_summary
from .verify import reference_model, verify


def run_levels(sender: Sender, levels: list[Level], duration: float, images: Images, console: Console) -> tuple[
    list[LevelStats], list[Answer]
]:
    """Every level in turn, with a progress bar each; the answers that kept their logits, for --verify."""
    stats, kept = [], []
    with Progress(console=console, transient=True) as progress:
        for level in levels:
            task = progress.add_task(level.label, total=duration)
            start = time.perf_counter()
            tick = lambda elapsed, task=task: progress.update(task, completed=min(elapsed, duration))  # noqa: E731
            if level.mode == "closed":
                answers = closed_loop(sender, int(level.load), duration, tick)
            else:
                answers = open_loop(sender, level.load, duration, tick)
            progress.remove_task(task)
            stats.append(level_stats(level, answers, start, images, sender.mix))
            kept.extend(sorted((a for a in answers if a.logits is not None), key=lambda a: a.index))
    return stats, kept


def run_schedule(sender: Sender, schedule: Any, images: Images, console: Console) -> tuple[
    list[LevelStats], list[Answer], list[Answer]
]:
    """The whole schedule as one open-loop level; its figures, the answers kept for --verify, and every answer."""
    level = Level("open", schedule.mean_rate)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(schedule.origin, total=schedule.duration)
        start = time.perf_counter()
        answers = open_loop(sender, level.load, schedule.duration,
                            lambda elapsed: progress.update(task, completed=min(elapsed, schedule.duration)),
                            times=schedule.times)
    answers.sort(key=lambda a: a.index)
    kept = [a for a in answers if a.logits is not None]
    return [level_stats(level, answers, start, images, sender.mix)], kept, answers


def loadtest(request: Request, console: Console, show: Callable[[LoadTest], None] | None = None) -> tuple[
    LoadTest, list[Path]
]:
    """Check everything a user can get wrong first (levels, output, server, keep, data), then load and report.

    ``show`` gets the results before they are written, so a write that fails (a full disk) loses no figures.
    """
    check_request(request)
    schedule = planned_schedule(request)
    levels = [Level("open", schedule.mean_rate)] if schedule else parse_levels(request.concurrency, request.rate)
    folder = plan_output(request)
    target_, warnings = target(request, Endpoint.parse(request.url))
    check_batch(request.batch, target_.served)
    mix = parse_mix(request.keep, target_.served, target_.default_keep)
    model = reference_model(request, target_) if request.verify else None
    images = load_images(request.data, request.images, target_, console)
    quota = math.ceil(request.verify / len(levels)) if request.verify else 0
    sender = Sender(target_, images, mix, request.batch, request.timeout, quota)
    warm_up(sender)
    quiet_collector()
    if schedule is not None:
        stats, kept, answers = run_schedule(sender, schedule, images, console)
    else:
        stats, kept = run_levels(sender, levels, request.duration, images, console)
    result = LoadTest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target=target_.summary(),
        data={"source": images.source, "images": len(images.names), "labelled": images.labelled,
              "skipped_corrupt": len(images.skipped)},
        keep_mix=list(mix.labels),
        batch=request.batch,
        duration_s=request.duration,
        timeout_s=request.timeout,
        levels=stats,
        warnings=warnings,
    )
    if model is not None:
        result.verification = verify(kept, request.verify, model, sender)
    if schedule is not None:
        result.slo = slo_summary(answers, schedule, images, request.slo_ms)
    if show is not None:
        show(result)
    try:
        files = report.write(result, folder)
        if schedule is not None:
            files.append(report.slo_plot(answers, schedule, images, request.slo_ms, folder))
        return result, files
    except OSError as exc:
        raise UserError(f"cannot write the results to {folder}: {exc.strerror or exc}.",
                        hint="The figures are above; free some space or pass --output with another folder.") from None
