"""``ats-deploy tune``: a device profile's keep values, chosen from measurements on the device itself.

ATS adapts one trained model to a device at inference time only; tune turns that into a profile. On the
profile's backend and batch (bench's rules: :func:`bench.run.plan`) it measures each keep setting the way bench
measures a variant, with bench's functions (:mod:`.measure`): the top-1 accuracy on ``--data``, with
validation's comparison of the export against the PyTorch reference, the p50 latency (interleaved with the
dense export so that drift hits both, warm-up excluded: :func:`bench.timing.interleaved`) and the mean GFLOPs.
It then picks the fastest setting within ``--max-drop`` points of the dense model's top-1, or the most accurate
setting with p50 <= ``--latency-ms`` (by default the profile's ``latency_budget_ms``, when it has one and no
objective is given). Class folders are labels (ImageNet wnids, ``--class-map`` or the sorted folder order: top-1
accuracy); a flat folder of images has none, and every setting is then scored by top-1 agreement with the
PyTorch dense model.

The search (:mod:`.search`) measures at most ``len(COARSE) + 2 * ROUNDS * S`` settings for a model with S ATS
stages:

1. one keep for every stage, from :data:`.search.COARSE`: 1.0 (the paper's K = n0) down to 0.3 in steps of 0.1,
   fractions of the model's tokens (docs/ATS.md section 2); lower budgets are left to the refinement, which starts
   next to the best of these;
2. a coordinate search from the best of those: each stage in turn tries its value +- :data:`.search.STEP` with
   the other stages fixed and keeps a change that ranks better (:meth:`.search.Objective.rank`: meeting the
   constraint first, then the objective); at most :data:`.search.ROUNDS` rounds, fewer when a round changes
   nothing. A neighbour that keeps the same tokens as the current setting (a later stage cannot keep more than
   an earlier one passes on) computes the same, so it is never moved to on a latency difference, which can only
   be noise.

The chosen setting is the best-ranked of every setting measured for this model under these conditions (this
run's and those the log already held, which an earlier run with another objective may have found off this run's
search path); the closest one when none meets the constraint.

Two keep values that give the same integer budgets are one setting, measured once. Every finished measurement
is appended to a JSON-lines log (:mod:`ats_deploy.tune_log`) as it completes; a rerun under the same conditions
(model file, reference, backend, profile timing settings, images) replays the search from it and measures only
what is missing. What is reported and written (table, tuned profile, Pareto plot) is :mod:`.report`'s.

Precision is a dimension too (``--precision fp32 --precision int8``): each precision is searched in turn, with
its own log and its own dense model timed alongside, on the same images (int8's calibration images, from
``--calibration`` or the first ones of ``--data``, are measured by none), against one objective: the dense
model of the first precision sets the accuracy ``--max-drop`` counts from. The choice is the best-ranked setting
of every precision, and the tuned profile gets its precision as well as its keep.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ats_deploy import precision as precisions
from ats_deploy.atomic import check_folder
from ats_deploy.errors import UserError
from ats_deploy.exported import Exported
from ats_deploy.exporters.onnx_export import check_output_path
from ats_deploy.plots import save
from ats_deploy.profiles import LOCAL_DIR, load_profile
from ats_deploy.tune_log import SUFFIX, KeepValues, Log, Measurement, budgets, header

from .. import machine, run
from .measure import Device, conditions
from .report import BudgetNotMet, Outcome, paired_difference, pareto_figure, render, told_apart, write_profile
from .search import Objective, check_objective, choose, coordinate_search, pareto_front

__all__ = [
    "BudgetNotMet",
    "Device",
    "Objective",
    "Outcome",
    "Request",
    "paired_difference",
    "pareto_front",
    "render",
    "told_apart",
    "tune",
]


@dataclass(frozen=True, kw_only=True)
class Request(run.Inputs):
    """What the user asked for on the command line: bench's inputs (the model, images, calibration), and what to
    choose for."""

    profile: str | None
    max_drop: float | None = None
    latency_ms: float | None = None
    output: Path | None = None
    log: Path | None = None
    fresh: bool = False
    backend: str | None = None
    precisions: tuple[str, ...] = ()  # --precision, once or more: tune chooses among them; (): the profile's


def require_dynamic(exported: Exported) -> None:
    """tune varies keep at run time, so keep must be an input of the model."""
    if not exported.dynamic:
        raise UserError(
            f"{exported.path} is a static export: its keep is baked in, so tune cannot vary it.",
            hint="Export with `ats-deploy export CHECKPOINT --dynamic` (keep and batch become run-time inputs) "
            "and tune that file.",
        )


def latency_budget(request: Request) -> tuple[float | None, str | None]:
    """``--latency-ms``; with no objective given, the profile's ``latency_budget_ms`` and the profile's name.

    A profile that states a latency budget says what the device must meet, which is what tune's latency
    objective chooses for.
    """
    if request.max_drop is not None or request.latency_ms is not None or request.profile is None:
        return request.latency_ms, None
    profile = load_profile(request.profile)
    if profile.latency_budget_ms is None:
        return None, None
    return profile.latency_budget_ms, profile.name


def _check_request(request: Request, latency_ms: float | None) -> None:
    check_objective(request.max_drop, latency_ms)
    if request.profile is None:
        raise UserError("tune needs a device profile: --profile NAME (list them with `ats-deploy profiles`).")
    if request.data is None:
        raise UserError(
            "tune needs images to measure accuracy on: --data DIR in ImageFolder layout (DIR/<class>/<image>).",
            hint="Use images like the device will see; a few hundred give a standard error of about 2 points.",
        )
    if request.output is not None:
        check_output_path(request.output)
        if request.output.suffix != ".yaml":
            raise UserError(f"-o {request.output} must be a .yaml file (a profile that --profile reads).")
    if request.log is not None:
        check_output_path(request.log)


def _arguments(plan: run.Plan, request: Request) -> dict[str, Any]:
    """The run's arguments, for the log's header (people read them; resuming compares the conditions only)."""
    return {
        "model": str(plan.exported.path),
        "profile": request.profile,
        "profile_file": str(plan.profile.path) if plan.profile.path else "built-in",
        "data": str(request.data),
        "images": request.images,
        "backend": request.backend,
        "class_map": str(request.class_map) if request.class_map else None,
        "checkpoint": request.checkpoint,
        "max_drop": request.max_drop,
        "latency_ms": request.latency_ms,
    }


def tune(request: Request, status: Console) -> Outcome:
    """Measure, search, choose; write the log, the plot and (when the constraint is met) the tuned profile."""
    latency_ms, budget_from = latency_budget(request)
    _check_request(request, latency_ms)
    names = list(dict.fromkeys(request.precisions)) or [None]
    plans = [run.plan(_bench_request(request, name, len(names) > 1), check_model=require_dynamic) for name in names]
    lanes: list[Outcome] = []
    for plan, name in zip(plans, names, strict=True):
        common = lanes[0].objective if lanes else None
        lanes.append(_search(request, plan, name if len(names) > 1 else None, latency_ms, budget_from, common, status))
    outcome = lanes[0]
    if len(lanes) > 1:
        chosen = min(lanes, key=lambda lane: lane.objective.rank(lane.best))
        outcome = replace(chosen, precision=chosen.plan.target.precision, lanes=lanes)
    elif request.precisions:  # one --precision: the tuned profile runs the precision it was measured at
        outcome = replace(outcome, precision=outcome.plan.target.precision)
    save(pareto_figure(outcome), outcome.plot)
    if outcome.met:
        write_profile(outcome)
    return outcome


def _bench_request(request: Request, precision: str | None, several: bool) -> run.Request:
    """Bench's request for one precision; with several, each keeps int8's calibration images out of its measures."""
    return run.Request(
        **request.given(),
        profile=request.profile,
        backends=[request.backend] if request.backend else None,
        precisions=[precision] if precision else None,
        reserve_calibration=several and any(precisions.get(name).made_at_export for name in request.precisions),
    )


def _search(
    request: Request,
    plan: run.Plan,
    precision: str | None,
    latency_ms: float | None,
    budget_from: str | None,
    common: Objective | None,
    status: Console,
) -> Outcome:
    """The search of one precision (``None``: the only one), with its own log; ``common``: the objective to share."""
    output = request.output or Path(LOCAL_DIR) / f"{plan.profile.name}-tuned.yaml"
    log_path = request.log or output.with_suffix(SUFFIX)
    if precision is not None:
        log_path = log_path.with_name(f"{log_path.name.split('.')[0]}.{precision}{SUFFIX}")
    check_folder(output.parent, "-o")  # the default ./profiles/ too, before the log's first line
    check_folder(log_path.parent, "--log")
    run.print_warnings(plan.warnings, status)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    n0, prefix = plan.exported.artifact.n0, plan.exported.artifact.prefix_tokens
    settled = conditions(plan, request.checkpoint)
    log = Log.open(log_path, header(settled, _arguments(plan, request), created), n0, prefix, request.fresh)
    if log.settings:
        status.print(f"resuming from {log_path}: {len(log.settings)} settings already measured", highlight=False)
    before = len(log.settings)
    threads = plan.profile.threads or torch.get_num_threads()
    with run.torch_threads(threads), contextlib.ExitStack() as stack:
        device = Device(plan, request.checkpoint, request.trust_checkpoint, status, stack)
        if log.dense is None:
            log.add_dense(device.dense())
        objective = common or Objective(request.max_drop, latency_ms, log.dense.accuracy, budget_from)

        def measure(keep: KeepValues) -> Measurement:
            device.visited()
            key = budgets(keep, n0, prefix)
            if key not in log.settings:
                log.add(device.setting(keep))
            return log.settings[key]

        coordinate_search(measure, objective.rank, len(plan.exported.stages))
        environment = machine.describe(plan.profile.threads, [plan.target.backend])
    settings = list(log.settings.values())
    return Outcome(
        plan=plan,
        objective=objective,
        dense=log.dense,
        settings=settings,
        best=choose(settings, objective.rank),
        measured_now=len(settings) - before,
        created=created,
        environment=environment,
        model_sha256=settled["model_sha256"],
        output=output,
        log=log_path,
    )
