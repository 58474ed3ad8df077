"""``ats-deploy serve``: an exported model behind NVIDIA Triton Inference Server, started here by PyTriton.

PyTriton brings Triton's server binary and its Python backend; the model is a Python-backend
model (:mod:`.python_model`) in a model repository written to a temporary folder, its config
the one ``ats-deploy triton`` writes (:mod:`.repository`: the ATS interface, the profile's
dynamic batcher and instances, the export's metadata) with ``keep`` optional. Health,
readiness and Prometheus metrics are Triton's own, on the chosen ports.

Everything that can be checked before Triton starts is (file, profile, backend, ports), so a
mistake ends in one message, not in a server log.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import backends
from ..errors import UserError
from ..keep import format_keep
from . import repository
from .python_model import PARAMETER, Settings

if TYPE_CHECKING:
    from pytriton.triton import Triton
    from rich.console import Console
    from tritonclient.grpc import model_config_pb2

    from ..profiles import Profile

MODEL_FILE = "model.py"
# Triton's Python backend imports model.py from the model's version folder; the model itself is this package's.
MODEL_SOURCE = (
    '"""Written by `ats-deploy serve`: Triton\'s Python backend loads the model from here."""\n\n'
    "from ats_deploy.serving.python_model import TritonPythonModel  # noqa: F401\n"
)
POLL_S = 0.2  # how often start-up and serving check that Triton is still running


@dataclass(frozen=True)
class Ports:
    """The ports Triton listens on, each with the flag that sets it."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def flags(self) -> dict[str, int]:
        return {"--http-port": self.http, "--grpc-port": self.grpc, "--metrics-port": self.metrics}


@dataclass(frozen=True)
class Plan:
    """What ``serve`` starts, all of it checked: the model's config (with its settings) and where it listens."""

    name: str
    source: repository.Source
    profile: Profile
    backend: backends.Backend
    settings: Settings  # what the model instances open; ``workdir`` is set when the repository is written
    config: model_config_pb2.ModelConfig
    ports: Ports


def check_ports(ports: Ports) -> None:
    """Refuse a port given twice, or one some other process listens on, naming the flag that changes it."""
    flags = ports.flags()
    if len(set(flags.values())) != len(flags):
        given = ", ".join(f"{flag} {port}" for flag, port in flags.items())
        raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {given}.")
    for flag, port in flags.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be opened ({exc.strerror})"
                raise UserError(
                    f"port {port} ({flag}) {why}.",
                    hint=f"Pass {flag} with a free port, or stop the server that listens on {port}.",
                ) from None


def plan(model: Path, profile_name: str, ports: Ports) -> Plan:
    """Check everything ``serve`` needs before anything starts; one :class:`UserError` for the first problem."""
    from ..profiles import load_profile

    profile = load_profile(profile_name)
    backend = backends.require(
        profile.backend, profile.name, overridden=False,
        hint="Serve with a profile whose backend runs on this machine, e.g. --profile cpu.",
    )
    source = repository.open_source(Path(model))  # refuses interface version 1 and files Triton cannot batch
    if backend.engines and source.engine_batch is None:
        raise UserError(
            f"profile '{profile.name}' runs TensorRT engines, and {source.path} is an ONNX file.",
            hint=f"Build the engine first: `ats-deploy build {source.path} --profile {profile.name}`, then serve it.",
        )
    name = repository.default_name(source.path)
    config = repository.build_config(source, profile, name)
    _as_python_model(config)
    check_ports(ports)
    artifact = source.artifact
    settings = Settings(
        model=str(source.path.resolve()),
        backend=backend.name,
        precision=backend.precision(profile.precision),
        threads=profile.threads,
        keep=profile.keep_for(len(artifact.stages)) if artifact.dynamic else list(artifact.keep),
        workdir="",
    )
    return Plan(name, source, profile, backend, settings, config, ports)


def _as_python_model(config: model_config_pb2.ModelConfig) -> None:
    """Turn ``ats-deploy triton``'s config into the Python backend's, with ``keep`` optional.

    A request without keep gets the profile's; instances are the backend's processes, each on the CPU
    for Triton (the runtime inside picks its device).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    config.ClearField("platform")
    config.backend = "python"
    for tensor in config.input:
        tensor.optional = tensor.name == "keep"
    for group in config.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_CPU


def write_repository(plan: Plan, folder: Path) -> Path:
    """``folder/<name>/config.pbtxt`` and ``1/model.py``: the model repository Triton serves; returns ``folder``."""
    config = type(plan.config)()
    config.CopyFrom(plan.config)
    workdir = folder / plan.name / repository.VERSION
    workdir.mkdir(parents=True)
    config.parameters[PARAMETER].string_value = replace(plan.settings, workdir=str(workdir)).to_json()
    (folder / plan.name / repository.CONFIG).write_text(repository.render(config), encoding="utf-8")
    (workdir / MODEL_FILE).write_text(MODEL_SOURCE, encoding="utf-8")
    return folder


def _python_library_path() -> None:
    """Put this interpreter's own ``libpython`` first on ``LD_LIBRARY_PATH`` for Triton and its Python backend.

    The backend's stub process loads ``libpython3.X.so`` by name. Under a pyenv (or any non-system)
    Python the loader otherwise finds the distribution's libpython of the same minor version, a
    different patch release, and the stub fails on the venv's modules (seen here: Debian's 3.11.2 under
    pyenv's 3.11.7, "'_thread.RLock' object has no attribute '_recursion_count'"). PyTriton starts
    tritonserver with a copy of ``os.environ`` taken at start, so setting it before the start suffices.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not Path(libdir).is_dir():
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


class _Stopped(Exception):
    """Raised in the main thread to end Triton's start-up early: a signal arrived, or the server exited."""


@dataclass
class _Signals:
    """SIGINT and SIGTERM set ``stop``; while ``starting``, they also raise :class:`_Stopped` to cut the start short."""

    stop: threading.Event
    starting: threading.Event

    def __call__(self, signum: int, frame: object) -> None:
        self.stop.set()
        if self.starting.is_set():
            raise _Stopped

    def install(self) -> dict:
        """Install the handler; the handlers it replaced, to restore."""
        return {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}


def _start(triton: Triton, signals: _Signals) -> None:
    """Start Triton from this thread and wait until it serves the model; fail as soon as the server exits.

    PyTriton's ``run`` must be called from the thread that outlives the server: it starts
    tritonserver with ``PR_SET_PDEATHSIG``, which stops the server when the *thread* that started it
    ends. ``run`` waits up to two minutes for a server that already exited (a model that failed to
    load), so a watcher interrupts it (:func:`_thread.interrupt_main`) when the process goes away.
    """
    from pytriton.exceptions import PyTritonError

    died = threading.Event()
    watcher = threading.Thread(target=_watch_start, args=(triton, signals.starting, died), daemon=True)
    signals.starting.set()
    watcher.start()
    try:
        triton.run()
    except _Stopped:
        if not died.is_set():
            return  # SIGINT or SIGTERM during start-up
        raise _did_not_start("it exited while loading the model") from None
    except (TimeoutError, PyTritonError) as exc:
        raise _did_not_start(str(exc)) from None
    finally:
        signals.starting.clear()


def _watch_start(triton: Triton, starting: threading.Event, died: threading.Event) -> None:
    import _thread

    seen_alive = False
    while starting.is_set():
        alive = triton.is_alive()
        if seen_alive and not alive:
            died.set()
            _thread.interrupt_main(signal.SIGTERM)  # runs the handler of _Signals in the main thread
            return
        seen_alive |= alive
        time.sleep(POLL_S)


def _did_not_start(why: str) -> UserError:
    return UserError(
        f"Triton Inference Server did not start: {why}.",
        hint="Its log above says why (the model's errors are on its lines marked E).",
    )


def _banner(plan: Plan, console: Console) -> None:
    """What is served, how it batches and where: printed once the model is ready."""
    from rich.table import Table
    from rich.text import Text

    config, ports = plan.config, plan.ports
    batcher = config.dynamic_batching
    table = Table(title=f"serving [bold]{plan.name}[/] on Triton Inference Server", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "model file": str(plan.source.path),
        "profile": plan.profile.name,
        "backend": f"{plan.backend.label}, {plan.settings.precision}, instances {config.instance_group[0].count}",
        "batching": (
            f"up to {config.max_batch_size} images, preferred {list(batcher.preferred_batch_size) or 'any'}, "
            f"queue delay {batcher.max_queue_delay_microseconds} us"
            if config.max_batch_size
            else f"none: a static export, {plan.source.artifact.batch} images per request"
        ),
        "default keep": format_keep(plan.settings.keep),
        "HTTP": f"http://localhost:{ports.http}/v2/models/{plan.name}/infer  (health: /v2/health/ready)",
        "gRPC": f"localhost:{ports.grpc}",
        "metrics": f"http://localhost:{ports.metrics}/metrics",
    }
    for key, value in rows.items():
        table.add_row(key, Text(value))  # paths and names are user text, never markup
    console.print(table)
    console.print("Ctrl-C or SIGTERM stops the server.")
    console.file.flush()  # a server's output often goes to a file or a pipe, which Python buffers


def serve(model: Path, profile_name: str, ports: Ports, console: Console) -> None:
    """Serve ``model`` with the profile's backend and batching until SIGINT or SIGTERM, then stop Triton cleanly."""
    checked = plan(model, profile_name, ports)
    from pytriton.triton import Triton, TritonConfig

    _python_library_path()
    signals = _Signals(threading.Event(), threading.Event())
    previous = signals.install()
    try:
        with tempfile.TemporaryDirectory(prefix="ats-deploy-serve-") as folder:
            config = TritonConfig(
                model_repository=write_repository(checked, Path(folder) / "models"),
                http_port=ports.http,
                grpc_port=ports.grpc,
                metrics_port=ports.metrics,
            )
            triton = Triton(config=config, workspace=Path(folder) / "pytriton")
            try:
                _start(triton, signals)
                if not signals.stop.is_set():
                    _banner(checked, console)
                _serve_until(triton, signals.stop)
            finally:
                triton.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print("stopped.")


def _serve_until(triton: Triton, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        if not triton.is_alive():
            raise UserError("Triton Inference Server stopped unexpectedly.", hint="Its log above says why.")
