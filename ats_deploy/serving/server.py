"""``ats-deploy serve``: an exported model behind NVIDIA Triton Inference Server, run here as a process of its own.

PyTriton brings Triton's server binary (2.51 in PyTriton 0.7.0) and its Python backend; the model
is a Python-backend model (:mod:`.python_model`) in a model repository written to a temporary
folder, its config built by the same writer as ``ats-deploy triton``'s (:mod:`.repository`: the ATS
interface, the profile's dynamic batcher, queue bound and instances, the export's metadata) for the
Python backend (:data:`.repository.PYTHON`: ``keep`` optional, instances on the CPU for Triton).
Readiness and Prometheus metrics are Triton's own, on the chosen ports.

``serve`` starts ``tritonserver`` itself rather than through PyTriton's ``Triton`` class, because
a server left running needs what that class does not give:

- it listens on ``--host`` (loopback by default), HTTP through :mod:`.guard`, which refuses the
  requests that crash Triton 2.51 and answers readiness with 503 while the model cannot answer;
- no secret on a command line: PyTriton passes its access token in tritonserver's arguments, which
  every local user can read. Here the model repository is loaded at start (model control ``none``),
  so Triton refuses every load and unload through its API, and the APIs no client needs are closed
  by a lock without a key (:data:`CLOSED_APIS`), so nothing needs a token;
- Triton runs in a process group of its own with its Python-backend stubs, dies with ``serve``
  (``PR_SET_PDEATHSIG``), and a watchdog process (:mod:`.watchdog`) kills the group and removes the
  shared memory and the temp folder if ``serve`` is killed; each start sweeps what killed runs left;
- a stub that dies (Triton 2.51 neither restarts it nor reports the model unready) makes ``serve``
  report unready and restart Triton; a server that cannot stop cleanly exits non-zero;
- Triton's log keeps its warnings and errors, without the start-up lines that only say this machine
  has no GPU.

Everything that can be checked before Triton starts is (file, profile, backend, ports), so a
mistake ends in one message, not in a server log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .. import backends
from .. import precision as precisions
from ..errors import UserError
from ..keep import format_keep
from . import repository, watchdog
from .guard import Guard
from .python_model import PARAMETER, Settings

if TYPE_CHECKING:
    from rich.console import Console
    from tritonclient.grpc import model_config_pb2

    from ..profiles import Profile
    from .adaptive import Front, SloOptions

MODEL_FILE = "model.py"
# Triton's Python backend imports model.py from the model's version folder; the model itself is this package's.
MODEL_SOURCE = (
    '"""Written by `ats-deploy serve`: Triton\'s Python backend loads the model from here."""\n\n'
    "from ats_deploy.serving.python_model import TritonPythonModel  # noqa: F401\n"
)
POLL_S = 0.2  # how often start-up and serving check that Triton and its model instances are still running
EXIT_TIMEOUT_S = 10  # how long Triton may finish the requests in flight at a stop before it is killed
LOOPBACK = "127.0.0.1"
STUB = "triton_python_b"  # the Python backend's stub process, as /proc/PID/comm names it (15 characters)
# Start-up lines of Triton's log that only say this machine has no GPU (shown where the profile runs on one).
GPU_NOISE = ("Unable to allocate pinned system memory", "CudaDriverHelper has not been initialized",
             "Failed to initialize NVML", "DCGM unable to start")
_PR_SET_PDEATHSIG = 1
# Triton's APIs that no client of `serve` needs (registering shared-memory regions the server then reads and
# writes, trace and log settings), closed by a restriction whose header no request can carry, so there is no
# secret to keep: an HTTP header value cannot hold a line break, and gRPC metadata keys are lowercase only
# (Triton expects the gRPC header 'triton-grpc-protocol-<key>').
CLOSED_APIS = "shared-memory,trace,logging"
CLOSED_HTTP = f"{CLOSED_APIS}:ats-deploy-closed=no\nkey"
CLOSED_GRPC = f"{CLOSED_APIS}:Ats-Deploy-Closed=no-key"


class ServerFailed(UserError):
    """Triton stopped unexpectedly, could not be restarted, or could not be stopped cleanly."""

    exit_code = 1


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
    host: str = LOOPBACK  # the address every port listens on: loopback, one interface, or 0.0.0.0 for all
    front: Front | None = None  # --slo-ms: the front model, served as ``name`` (the ATS model as config.name)

    @property
    def precision(self) -> str:
        """The precision served: an INT8 file's own (its metadata), else what the backend runs for the profile."""
        return precisions.running(self.source.artifact.precision, self.settings.precision)


def check_ports(ports: Ports, host: str = LOOPBACK) -> None:
    """Refuse a port given twice, or one some other process listens on, naming the flag that changes it."""
    flags = ports.flags()
    if len(set(flags.values())) != len(flags):
        given = ", ".join(f"{flag} {port}" for flag, port in flags.items())
        raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {given}.")
    for flag, port in flags.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise UserError(f"--host {host} is not an address of this machine.",
                                    hint="Pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).",
                                    ) from None
                why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be opened ({exc.strerror})"
                raise UserError(
                    f"port {port} ({flag}) {why}.",
                    hint=f"Pass {flag} with a free port, or stop the server that listens on {port}.",
                ) from None


def check_host(host: str) -> str:
    """``host`` as an IPv4 address (a name is resolved), or one message saying what to pass."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise UserError(f"--host '{host}' is not an IPv4 address or a name this machine resolves.",
                        hint="Pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).") from None


def plan(model: Path, profile_name: str, ports: Ports, host: str = LOOPBACK, allow_failed: bool = False,
         slo: SloOptions | None = None) -> Plan:
    """Check everything ``serve`` needs before anything starts; one :class:`UserError` for the first problem."""
    from ..profiles import load_profile

    profile = load_profile(profile_name)
    backend = backends.require(
        profile.backend, profile.name, overridden=False,
        hint="Serve with a profile whose backend runs on this machine, e.g. --profile cpu.",
    )
    # refuses interface version 1, files Triton cannot batch and files that failed validation (unless allowed)
    source = repository.open_source(Path(model), allow_failed)
    if backend.engines and source.engine_batch is None:
        raise UserError(
            f"profile '{profile.name}' runs TensorRT engines, and {source.path} is an ONNX file.",
            hint=f"Build the engine first: `ats-deploy build {source.path} --profile {profile.name}`, then serve it.",
        )
    name = repository.default_name(source.path)
    config = repository.build_config(source, profile, name, repository.PYTHON)
    front = None
    if slo is not None:  # the front model takes the name clients call; the ATS model moves beside it
        from .adaptive import behind_front, plan_front

        front = plan_front(source, profile, name, slo, config.max_batch_size)
        behind_front(config, front)
    address = check_host(host)
    check_ports(ports, address)
    artifact = source.artifact
    settings = Settings(
        model=str(source.path.resolve()),
        backend=backend.name,
        precision=backend.precision(profile.precision),
        threads=profile.threads,
        keep=profile.keep_for(len(artifact.stages)) if artifact.dynamic else list(artifact.keep),
        workdir="",
    )
    if front is not None:
        from .adaptive import check_latency, floor_alone_s

        check_latency(front, floor_alone_s(settings, front), "on this machine")
    return Plan(name, source, profile, backend, settings, config, ports, address, front)


def write_repository(plan: Plan, folder: Path) -> Path:
    """``folder/<name>/config.pbtxt`` and ``1/model.py``: the model repository Triton serves; returns ``folder``.

    With ``--slo-ms`` the front model's folder goes beside it (:func:`.adaptive.write_front`).
    """
    config = type(plan.config)()
    config.CopyFrom(plan.config)
    workdir = folder / config.name / repository.VERSION
    workdir.mkdir(parents=True)
    config.parameters[PARAMETER].string_value = replace(plan.settings, workdir=str(workdir)).to_json()
    (folder / config.name / repository.CONFIG).write_text(repository.render(config), encoding="utf-8")
    (workdir / MODEL_FILE).write_text(MODEL_SOURCE, encoding="utf-8")
    if plan.front is not None:
        from .adaptive import write_front

        write_front(folder, plan.front, config)
    return folder


# --------------------------------------------------------------------------- Triton's process


@dataclass(frozen=True)
class _Run:
    """One ``serve`` run's temporary folder (model repository, Triton's backend folder) and shared-memory prefix.

    Both are named after ``serve``'s PID, so that a later run can tell the leftovers of a killed one.
    """

    folder: Path
    shm_prefix: str
    internal_http: int  # Triton's own HTTP port, on loopback, behind the guard

    @classmethod
    def create(cls, plan: Plan) -> _Run:
        folder = Path(tempfile.mkdtemp(prefix=f"{watchdog.PREFIX}{os.getpid()}-"))
        try:
            write_repository(plan, folder / "models")
            _link_python_backend(folder / "backends" / "python")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, f"{folder.name}-", _free_loopback_port())

    def command(self, plan: Plan) -> list[str]:
        """tritonserver's arguments: no secret among them (every local user can read them in /proc)."""
        from pytriton.triton import TRITONSERVER_DIST_DIR

        ports, host = plan.ports, plan.host
        flags = {
            "model-repository": self.folder / "models",
            "backend-directory": self.folder / "backends",
            "model-control-mode": "none",  # loaded at start; Triton refuses every load/unload request
            "strict-readiness": "true",
            "exit-timeout-secs": EXIT_TIMEOUT_S,
            "http-address": LOOPBACK,
            "http-port": self.internal_http,
            "grpc-address": host,
            "grpc-port": ports.grpc,
            "metrics-address": host,
            "metrics-port": ports.metrics,
            "allow-gpu-metrics": str(bool(plan.backend.engines)).lower(),
            "log-info": "false",  # warnings and errors only; the banner says what is served
            "http-restricted-api": CLOSED_HTTP,
            "grpc-restricted-protocol": CLOSED_GRPC,
            "backend-config": f"python,shm-region-prefix-name={self.shm_prefix}",
        }
        from .adaptive import front_shm_flag  # room for a batch of images in each Python-backend process

        return [str(TRITONSERVER_DIST_DIR / "bin" / "tritonserver"), *(f"--{k}={v}" for k, v in flags.items()),
                front_shm_flag()]


def bundled_triton(backends: Path) -> tuple[Path, dict[str, str]]:
    """The tritonserver PyTriton bundles, ready to run a model repository by hand: its executable and environment.

    Links Triton's Python backend under ``backends`` (pass ``--backend-directory=<backends>``), as ``serve`` does
    for its own run; for tests and benchmarks that serve what ``ats-deploy triton`` wrote (its ``--slo-ms`` front
    model, say) in the Triton the wheel ships.
    """
    from pytriton.triton import TRITONSERVER_DIST_DIR

    _link_python_backend(backends / "python")
    return TRITONSERVER_DIST_DIR / "bin" / "tritonserver", _environment()


def _link_python_backend(folder: Path) -> None:
    """Triton's Python backend as its backend directory expects it, with the stub for this Python (links, no copy)."""
    from pytriton.triton import TRITONSERVER_DIST_DIR
    from pytriton.utils.distribution import get_stub_path

    folder.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (folder / name).symlink_to(TRITONSERVER_DIST_DIR / "backends" / "python" / name)
    (folder / "triton_python_backend_stub").symlink_to(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"))


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _environment() -> dict[str, str]:
    """tritonserver's environment: PyTriton's libraries, and this interpreter's ``libpython`` first.

    The backend's stub process loads ``libpython3.X.so`` by name. Under a pyenv (or any non-system)
    Python the loader otherwise finds the distribution's libpython of the same minor version, a
    different patch release, and the stub fails on the venv's modules (seen here: Debian's 3.11.2 under
    pyenv's 3.11.7, "'_thread.RLock' object has no attribute '_recursion_count'").
    """
    from pytriton.utils.distribution import get_libs_path

    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    first = [libdir] if libdir and Path(libdir).is_dir() else []
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*first, *paths, str(get_libs_path())])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In Triton's process, before it runs: SIGKILL when ``serve`` dies (its watchdog then takes the stubs)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Triton:
    """One tritonserver process, leader of a process group that its Python-backend stubs join."""

    def __init__(self, command: list[str], out: IO[bytes], quiet: tuple[str, ...]) -> None:
        self.process = subprocess.Popen(
            command, env=_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.group = self.process.pid
        self.stubs: set[int] = set()  # the model instances' stub processes, once the model is ready
        self._log = threading.Thread(target=_copy_log, args=(self.process.stdout, out, quiet), daemon=True)
        self._log.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def find_stubs(self) -> None:
        self.stubs = {pid for pid, parent, comm in _processes() if parent == self.group and comm == STUB}

    def dead_stub(self) -> int | None:
        """A stub process that is gone (or a zombie: Triton does not reap it) since the model became ready, if any.

        Reads only the stubs' own /proc entries: this runs every :data:`POLL_S` beside the HTTP guard's thread.
        """
        return next((pid for pid in self.stubs if not _alive(pid)), None)

    def stop(self) -> bool:
        """SIGINT, then SIGKILL to the group if it has not exited after the exit timeout; whether it stopped cleanly."""
        clean = True
        if self.alive():
            self.process.send_signal(signal.SIGINT)  # Triton finishes what is in flight, unloads the model
            try:
                self.process.wait(timeout=EXIT_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                clean = False
        self.kill()
        self._log.join(timeout=5)
        return clean and self.process.returncode == 0

    def kill(self) -> None:
        watchdog.kill_group(self.group)
        self.process.wait()


def _processes() -> list[tuple[int, int, str]]:
    """``(pid, parent, comm)`` of every running process (zombies left out: they are dead)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, parent = stat.rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                found.append((int(entry.name), int(parent), comm))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _copy_log(pipe: IO[bytes], out: IO[bytes], quiet: tuple[str, ...]) -> None:
    for line in pipe:
        if any(noise.encode() in line for noise in quiet):
            continue
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):  # our output is gone (a closed pipe): keep draining Triton's
            continue


# --------------------------------------------------------------------------- serve


class _Signals:
    """SIGINT and SIGTERM set ``stop``; ``install`` returns the handlers it replaced, to restore."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        self.stop.set()

    def install(self) -> dict:
        return {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}


class _Server:
    """Triton for one plan, behind its guard, with the watchdog that cleans up if ``serve`` is killed."""

    def __init__(self, plan: Plan, run: _Run, stop: threading.Event, console: Console) -> None:
        self.plan, self.run, self.stop, self.console = plan, run, stop, console
        self.quiet = () if plan.backend.engines else GPU_NOISE
        self.guard = Guard(plan.host, plan.ports.http, run.internal_http, plan.name)
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "ats_deploy.serving.watchdog", str(run.folder), run.shm_prefix],
            stdin=subprocess.PIPE, start_new_session=True,
        )
        self.triton: _Triton | None = None

    def start(self) -> bool:
        """Start Triton and wait until the model is ready; False if a signal stopped the start."""
        try:
            self.guard.start()
        except OSError as exc:
            raise UserError(f"port {self.plan.ports.http} (--http-port) cannot be opened ({exc.strerror}).") from None
        return self._start_triton()

    def _start_triton(self) -> bool:
        self.triton = _Triton(self.run.command(self.plan), _stdout(), self.quiet)
        assert self.watchdog.stdin is not None
        self.watchdog.stdin.write(f"{self.triton.group}\n".encode())
        self.watchdog.stdin.flush()
        url = f"http://{LOOPBACK}:{self.run.internal_http}/v2/models/{self.plan.name}/ready"
        while not self.stop.is_set():
            if not self.triton.alive():
                raise ServerFailed(f"Triton Inference Server did not start: it exited with {_status(self.triton)}.",
                                   hint="Its log above says why (the model's errors are on its lines marked E).")
            if _ready(url) and self._front_ready():
                self.triton.find_stubs()
                self.guard.ready.set()
                return True
            time.sleep(POLL_S)
        return False

    def _front_ready(self) -> bool:
        """With ``--slo-ms``: whether the front model has measured the device and serves (it says so in metrics)."""
        if self.plan.front is None:
            return True
        from .adaptive import READY_TIMEOUT_S, wait_ready

        assert self.triton is not None
        metrics = f"http://{_local(self.plan.host)}:{self.plan.ports.metrics}/metrics"
        if not wait_ready(metrics, READY_TIMEOUT_S, self.triton.alive):
            raise ServerFailed(f"the --slo-ms front model did not report ready within {READY_TIMEOUT_S:.0f} s.",
                               hint="Triton's log above says why.")
        return True

    def serve_until_stopped(self) -> None:
        """Watch Triton until SIGINT or SIGTERM; restart it if a model instance dies; fail if it exits."""
        while not self.stop.wait(POLL_S):
            assert self.triton is not None
            if not self.triton.alive():
                self.guard.ready.clear()
                raise ServerFailed(f"Triton Inference Server stopped unexpectedly ({_status(self.triton)}).",
                                   hint="Its log above says why.")
            stub = self.triton.dead_stub()
            if stub is not None:
                self._restart(stub)

    def _restart(self, stub: int) -> None:
        """A model instance's stub died: readiness goes false, and a new Triton replaces the broken one."""
        assert self.triton is not None
        self.guard.ready.clear()
        self._say(f"a model instance died (stub process {stub}); restarting Triton, not ready meanwhile.")
        self.triton.kill()
        watchdog.remove_segments(self.run.shm_prefix)
        if self._start_triton():
            self._say("ready again.")

    def close(self) -> bool:
        """Stop Triton, the guard and the watchdog, remove what the run wrote; whether Triton stopped cleanly."""
        self.guard.ready.clear()
        clean = self.triton.stop() if self.triton is not None else True
        self.guard.close()
        watchdog.cleanup([], self.run.folder, self.run.shm_prefix)
        if self.watchdog.stdin is not None:
            self.watchdog.stdin.close()  # end of input: it finds nothing left and exits
        self.watchdog.wait(timeout=30)
        return clean

    def _say(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/]", highlight=False)
        self.console.file.flush()


def _stdout() -> IO[bytes]:
    return getattr(sys.stdout, "buffer", sys.stdout)


def _status(triton: _Triton) -> str:
    code = triton.process.returncode
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _local(host: str) -> str:
    """An address of ``host`` to connect to from this machine."""
    return LOOPBACK if host == "0.0.0.0" else host


def _where(host: str) -> str:
    """How the banner names ``host`` in URLs: every interface listens on 0.0.0.0, reachable as this machine's name."""
    return socket.gethostname() if host == "0.0.0.0" else host


def _banner(plan: Plan, console: Console) -> None:
    """What is served, how it batches and where: printed once the model is ready."""
    from rich.table import Table
    from rich.text import Text

    config, ports = plan.config, plan.ports
    batcher = config.dynamic_batching
    policy = batcher.default_queue_policy
    table = Table(title=f"serving [bold]{plan.name}[/] on Triton Inference Server", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    where = _where(plan.host)
    listens = "every interface (0.0.0.0)" if plan.host == "0.0.0.0" else plan.host
    rows = {
        "model file": str(plan.source.path),
        "profile": plan.profile.name,
        "backend": f"{plan.backend.label}, {plan.precision}, instances {config.instance_group[0].count}",
        "batching": (
            f"up to {config.max_batch_size} images, preferred {list(batcher.preferred_batch_size) or 'any'}, "
            f"queue delay {batcher.max_queue_delay_microseconds} us"
            if config.max_batch_size
            else f"none: a static export, {plan.source.artifact.batch} images per request"
        ),
        "queue": (
            f"at most {policy.max_queue_size or 'unbounded'} waiting, each at most "
            f"{policy.default_timeout_microseconds // 1000 or 'unlimited'} ms; more are refused (503)"
            if config.max_batch_size else "none"
        ),
        "default keep": format_keep(plan.settings.keep),
        **({"load-adaptive": plan.front.describe()} if plan.front is not None else {}),
        "listens on": listens,
        "HTTP": f"http://{where}:{ports.http}/v2/models/{plan.name}/infer  (health: /v2/health/ready)",
        "gRPC": f"{where}:{ports.grpc}",
        "metrics": f"http://{where}:{ports.metrics}/metrics",
    }
    for key, value in rows.items():
        table.add_row(key, Text(value))  # paths and names are user text, never markup
    console.print(table)
    console.print("Ctrl-C or SIGTERM stops the server.")
    console.file.flush()  # a server's output often goes to a file or a pipe, which Python buffers


def serve(
    model: Path, profile_name: str, ports: Ports, console: Console, slo: SloOptions | None = None, *,
    host: str = LOOPBACK, allow_failed: bool = False,
) -> None:
    """Serve ``model`` with the profile's backend and batching until SIGINT or SIGTERM, then stop Triton cleanly."""
    checked = plan(model, profile_name, ports, host, allow_failed, slo)
    watchdog.sweep()
    signals = _Signals()
    previous = signals.install()
    server: _Server | None = None
    clean = False
    try:
        server = _Server(checked, _Run.create(checked), signals.stop, console)
        if server.start():
            _banner(checked, console)
            server.serve_until_stopped()
    finally:
        if server is not None:
            clean = server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not clean:
        raise ServerFailed(f"Triton Inference Server did not stop cleanly within {EXIT_TIMEOUT_S} s; it was killed, "
                           "with the requests it still had.", hint="Its log above says why.")
    console.print("stopped.")
