"""``--slo-ms``: the keep ladder, the checks made before anything starts, and the front model's folder.

``ats-deploy serve --slo-ms`` and ``ats-deploy triton --slo-ms`` put the ATS model under
``<name>_inner`` and, under the name clients call, a front model (:mod:`.front_model`, Triton's
Python backend) that applies the load-adaptive policy (:mod:`.policy`) and calls the model with
the keep it picks. The ladder it moves along runs from the profile's keep down to a floor: the
tune log's accuracy-latency Pareto front where a tune log exists (each lower rung the most
accurate measured setting at its cost), else one keep for all stages in steps of 0.1.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .. import tune_log
from ..errors import UserError
from ..keep import Keep, format_keep
from . import front_model, policy
from .policy import DEFAULT_FLOOR, Rung

if TYPE_CHECKING:
    from ..profiles import Profile
    from .python_model import Settings
    from .repository import Repository, Source

INNER_SUFFIX = "_inner"  # the ATS model's name beside the front model, which takes the name clients call
CALIBRATION_BATCHES = (1, 2, 4, 8, 16, 32)  # batch sizes the front model times at start-up, up to max_batch_size
FRONT_FILES = {"model.py": front_model, "slo_policy.py": policy}  # what the front's version folder holds
READY_TIMEOUT_S = 180.0  # how long `serve` waits for the front model's start-up measurement
ALONE_ROUNDS = 5  # timed single-image runs behind the check that the SLO is not below the floor's own latency
PYTHON_SHM_BYTES = 64 * 1024 * 1024  # each Python-backend process's shared memory for tensors (front_shm_flag)


@dataclass(frozen=True)
class SloOptions:
    """What the user asked for: the SLO and the floor (at most one of ``min_keep``, ``max_drop``)."""

    slo_ms: float
    min_keep: float | None = None
    max_drop: float | None = None
    tune_log: Path | None = None


@dataclass(frozen=True)
class Front:
    """The front model to write: its name, the model it calls, the ladder, and where the ladder came from."""

    name: str
    settings: front_model.FrontSettings
    ladder: list[Rung]
    origin: str  # "tune log PATH" or "one keep for all stages"

    def describe(self) -> str:
        labels = " > ".join(r.label if r.accuracy is None else f"{r.label} ({100 * r.accuracy:.1f}%)"
                            for r in self.ladder)
        return f"{labels}  (from {self.origin})"


def check_options(options: SloOptions) -> None:
    """The checks that need nothing but the numbers: one message each, before anything is read or started."""
    if not math.isfinite(options.slo_ms) or options.slo_ms <= 0:
        raise UserError(f"--slo-ms {options.slo_ms:g} is not a positive number of milliseconds.",
                        hint="Give the latency target per request, e.g. --slo-ms 100.")
    if options.min_keep is not None and options.max_drop is not None:
        raise UserError("--min-keep and --max-drop both set the lowest keep; give one of them.")
    if options.min_keep is not None and not 0 < options.min_keep <= 1:
        raise UserError(f"--min-keep {options.min_keep:g} is not a keep in (0, 1].", hint="For example --min-keep 0.5.")
    if options.max_drop is not None and (not math.isfinite(options.max_drop) or options.max_drop < 0):
        raise UserError(f"--max-drop {options.max_drop:g} is not a number of top-1 points >= 0.",
                        hint="For example --max-drop 2 (at most 2 points below the dense model's top-1).")


def plan_front(source: Source, profile: Profile, name: str, options: SloOptions, max_batch: int) -> Front:
    """The front model for ``source`` served with ``profile`` under the name ``name``; refuses what cannot work."""
    check_options(options)
    artifact = source.artifact
    if not artifact.dynamic:
        raise UserError(f"{source.path} is a static export: its keep is baked in, so there is no budget to move.",
                        hint="Export with --dynamic to serve with --slo-ms.")
    stages = len(artifact.stages)
    top = profile.keep_for(stages)
    log = _tune_log(options, profile)
    if options.min_keep is not None and options.min_keep > min(top) + 1e-9:
        raise UserError(
            f"--min-keep {options.min_keep:g} is above the keep of profile '{profile.name}' ({format_keep(top)}): "
            "the ladder runs from the profile's keep down to the floor.",
            hint=f"Give --min-keep at most {min(top):g}, or a profile with a higher keep.",
        )
    if log is None:
        if options.max_drop is not None:
            raise UserError(
                "--max-drop needs the accuracy a tune log measured on this device, and there is none"
                + (f" beside profile {profile.path}." if profile.path else f" for profile '{profile.name}'."),
                hint=f"Run `ats-deploy tune --profile {profile.name} --data DIR` first (then serve its -tuned "
                "profile, or pass --tune-log), or give the floor as a keep: --min-keep 0.5.",
            )
        floor = options.min_keep if options.min_keep is not None else min(DEFAULT_FLOOR, min(top))
        ladder, origin = policy.uniform_ladder(top, floor), "one keep for all stages"
    else:
        ladder, origin = _ladder_from_log(log, source, top, stages, options), f"tune log {log}"
    settings = front_model.FrontSettings(
        model=name + INNER_SUFFIX,
        slo_ms=float(options.slo_ms),
        max_batch=max_batch,
        ladder=[list(r.keep) for r in ladder],
        accuracy=[r.accuracy for r in ladder],
        input_shape=list(artifact.input_size),
        calibration_batches=[b for b in CALIBRATION_BATCHES if b <= max_batch] or [1],
    )
    return Front(name, settings, ladder, origin)


def _tune_log(options: SloOptions, profile: Profile) -> Path | None:
    """``--tune-log``, else the log tune wrote beside the profile (a ``-tuned`` profile's), else None."""
    if options.tune_log is not None:
        if not options.tune_log.is_file():
            raise UserError(f"--tune-log {options.tune_log} not found.", hint="Give the .log.jsonl tune wrote.")
        return options.tune_log
    if profile.path is not None:
        beside = Path(profile.path).with_suffix(tune_log.SUFFIX)
        if beside.is_file():
            return beside
    return None


def _ladder_from_log(log: Path, source: Source, top: list[float], stages: int, options: SloOptions) -> list[Rung]:
    """The profile's keep, then the log's Pareto front down to the floor (``--max-drop``, ``--min-keep``, default)."""
    from ..checkpoints import sha256_file

    try:
        header, dense, measured = tune_log.read_log(log)
    except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration, UserError) as exc:
        raise UserError(f"cannot read {log} as a tune log ({type(exc).__name__}).",
                        hint="Give the .log.jsonl `ats-deploy tune` wrote, or leave out --tune-log.") from None
    if header.get("conditions", {}).get("model_sha256") != sha256_file(source.path):
        raise UserError(f"tune log {log} measured another model file than {source.path}.",
                        hint="Tune this file (`ats-deploy tune`), or give the floor as a keep: --min-keep 0.5.")
    rungs = [(Rung(tuple(Keep(tuple(m.keep)).per_stage(stages)), m.accuracy), m.p50_ms / 1e3) for m in measured]
    accuracy = {r.keep: r.accuracy for r, _ in rungs}
    head = Rung(tuple(float(v) for v in top), accuracy.get(tuple(float(v) for v in top)))
    if options.max_drop is not None:
        floor_accuracy, min_keep = dense.accuracy - options.max_drop / 100, None
    else:
        floor_accuracy = None
        min_keep = options.min_keep if options.min_keep is not None else min(DEFAULT_FLOOR, min(top))
    return policy.pareto_ladder(head, rungs, floor_accuracy, min_keep)


def floor_alone_s(settings: Settings, front: Front) -> float:
    """The median time of one image at the floor's keep, on the backend ``serve`` runs (opened here, then closed)."""
    import time

    import numpy as np
    import torch

    from .python_model import open_runner

    with tempfile.TemporaryDirectory(prefix="ats-deploy-slo-") as workdir:
        runner = open_runner(replace(settings, workdir=workdir))
        images = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (1, *front.settings.input_shape)).astype(np.float32))
        keep = torch.tensor([front.settings.ladder[-1]], dtype=torch.float32)
        times = []
        for _ in range(ALONE_ROUNDS + 1):
            start = time.perf_counter()
            runner(images, keep)
            times.append(time.perf_counter() - start)
        del runner
    return float(np.median(times[1:]))


def check_latency(front: Front, seconds_alone: float, where: str) -> None:
    """Refuse an SLO below what the model takes alone at the floor (``seconds_alone``, measured ``where``)."""
    slo_ms = front.settings.slo_ms
    if seconds_alone * 1e3 > slo_ms:
        raise UserError(
            f"--slo-ms {slo_ms:g} is below what the model takes for one image alone at its lowest keep "
            f"({front.ladder[-1].label}): {seconds_alone * 1e3:.1f} ms {where}.",
            hint=f"Give --slo-ms of at least {math.ceil(2 * seconds_alone * 1e3)} (about twice the batch-1 time "
            "leaves room for queueing), or a lower floor (--min-keep).",
        )


def behind_front(inner: mc.ModelConfig, front: Front) -> None:
    """Make ``inner`` the model behind ``front``: its name, and no dynamic batcher of its own.

    The front sends one batch at a time, already formed. Triton's dynamic batcher thread waits up to 500 ms
    (``default_wait_microseconds``) on a condition it can miss under load: calls through it took +0.5 s now and
    then on this 2-core machine (1 in 40-80 under load), which breaks any SLO below a second.
    """
    inner.name = front.settings.model
    inner.ClearField("dynamic_batching")


def front_config(front: Front, inner: mc.ModelConfig) -> mc.ModelConfig:
    """The front's Triton config: the inner model's interface, keep optional, plus ``served_keep`` out."""
    # No dynamic batcher: the front only timestamps and queues (its policy forms the batches), and Triton's batcher
    # thread may sleep up to 500 ms before it looks at a new request (seen here, see behind_front).
    config = mc.ModelConfig(name=front.name, backend="python", max_batch_size=inner.max_batch_size)
    for tensor in inner.input:
        config.input.add().CopyFrom(tensor)
        config.input[-1].optional = tensor.name == "keep"
    for tensor in inner.output:
        config.output.add().CopyFrom(tensor)
    stages = next(t.dims[-1] for t in inner.input if t.name == "keep")
    config.output.add(name="served_keep", data_type=mc.TYPE_FP32, dims=[stages])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)  # one queue, one policy
    for key, value in inner.parameters.items():
        if key != "intra_op_thread_count":
            config.parameters[key].CopyFrom(value)
    config.parameters[front_model.PARAMETER].string_value = front.settings.to_json()
    return config


def write_front(repository: Path, front: Front, inner: mc.ModelConfig) -> Path:
    """Write ``repository/<front name>/``: config.pbtxt and ``1/`` with the front model and the policy.

    Built beside its place and renamed in, as the model's own folder is; an existing folder is refused.
    """
    folder = Path(repository) / front.name
    if folder.exists():
        raise UserError(f"{folder} already exists: a model repository holds one folder per model name.",
                        hint="Choose another name with --name, or remove that folder first.")
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        (staging / "config.pbtxt").write_text(text_format.MessageToString(front_config(front, inner)),
                                              encoding="utf-8")
        (staging / "1").mkdir()
        for filename, module in FRONT_FILES.items():
            shutil.copyfile(module.__file__, staging / "1" / filename)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        os.rename(staging, folder)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the front model {folder}: {exc.strerror or exc}.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def wait_ready(metrics_url: str, timeout_s: float, alive: object) -> bool:
    """Poll the metrics endpoint until the front model says it serves (``ats_slo_ready 1``); False when it says it
    failed (-1) or on timeout.

    ``alive``: a callable, False when the server died meanwhile (then stop waiting at once).
    """
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():  # type: ignore[operator]
        try:
            with urllib.request.urlopen(metrics_url, timeout=2) as answer:
                text = answer.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        states = [line.rsplit(" ", 1)[-1] for line in text.splitlines() if line.startswith("ats_slo_ready{")]
        if states and states[0] in ("1", "-1"):
            return states[0] == "1"
        time.sleep(0.2)
    return False


def front_shm_flag() -> str:
    """tritonserver's option that gives each Python-backend process room for a batch of images from the start.

    Triton's default region (1 MiB, grown 1 MiB at a time) is smaller than one batch of 8 images (4.8 MB) that
    the front passes on to the model.
    """
    return f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}"


def write_repository_with_front(model: Path, profile: Profile, repository: Path, name: str | None,
                                options: SloOptions, allow_failed: bool = False) -> tuple[Repository, Front]:
    """``ats-deploy triton --slo-ms``: the model as ``<name>_inner`` and the front model as ``<name>``.

    Everything is checked before the first folder is written; the model's folder is removed again when the
    front's cannot be written, so the repository never holds half of the pair.
    """
    from . import repository as repo

    check_options(options)
    source = repo.open_source(Path(model), allow_failed)
    name = repo.default_name(source.path) if name is None else repo.check_name(name)
    front = plan_front(source, profile, name, options, repo.build_config(source, profile, name).max_batch_size)
    for folder in (Path(repository) / name, Path(repository) / front.settings.model):
        if folder.exists():
            raise UserError(f"{folder} already exists: a model repository holds one folder per model name.",
                            hint="Choose another name with --name, or remove that folder first.")
    planned = repo.plan(source.path, profile, repository, front.settings.model, allow_failed)
    behind_front(planned.config, front)
    written = repo.commit(planned)
    try:
        write_front(repository, front, written.config)
    except BaseException:
        shutil.rmtree(written.folder, ignore_errors=True)
        raise
    return written, front
