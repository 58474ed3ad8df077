"""A soak of ``ats-deploy serve``: mixed good and hostile requests at moderate load, with faults, then a clean stop.

Starts ``ats-deploy serve MODEL --profile P`` on free loopback ports and, for ``--duration`` seconds:

- good requests at ``--rate`` per second (Poisson, over two sender threads), half with the profile's keep, half
  with keep 0.7, each answer compared with the same file run in this process (tokens equal, top-1 equal);
- hostile requests at ``--bad-rate`` per second, in turn: the JSON tensor declaring ``[1e9, 3, 224, 224]``
  (issue 24 case 1), a gzip body inflating past 64 MiB, NaN keep, zero keep, wrong keep length, a missing
  ``images``, NaN pixels, a wrong image shape, an oversized batch, garbage bytes, a model-load request; each
  must be refused with a 4xx or 503, never crash anything;
- ``--kills`` times, evenly spaced, the model instance's stub process gets SIGKILL (case 4). Its fault window
  runs from the kill until readiness is back, plus a second; a good request overlapping a window may fail;

and samples the resident memory of ``serve``'s whole process tree every ``--sample-s`` seconds. Then SIGTERM, and
the checks: zero lost good answers outside the fault windows, every hostile request refused, the server answered
throughout (the readiness probe), memory bounded (the last sample within ``--memory-slack`` of the first after
warm-up), exit 0, and no process, shared-memory segment or temp folder left. Exit 1 if a check fails.

Loopback only; bounded in time (``--duration`` plus start and stop). Prints a table and writes ``--output`` JSON.

    .venv/bin/python benchmarks/soak.py deit_t.onnx --profile cpu --duration 600 --output soak.json
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tritonclient.http as triton_http
from rich.console import Console
from rich.table import Table

from ats_deploy import backends
from ats_deploy.artifact import read
from ats_deploy.exporters import prepare
from ats_deploy.profiles import load_profile
from ats_deploy.serving.repository import default_name

START_TIMEOUT_S = 180
GRACE_S = 1.0  # after readiness is back, requests already queued behind the restart may still fail
NOTICE_S = 5.0  # a fault window whose server never reported unready closes after this (the check then fails)
IMAGES = 16  # distinct seeded images the good requests cycle through


@dataclass
class Record:
    """One request: what it was, when it ran, how it ended."""

    kind: str
    sent: float
    done: float
    outcome: str  # "ok", "refused <status>", "wrong answer", "error <text>"


@dataclass
class Soak:
    base: str
    name: str
    records: list[Record] = field(default_factory=list)
    windows: list[list[float]] = field(default_factory=list)  # [kill, ready again + grace]
    noticed: list[bool] = field(default_factory=list)  # per window: readiness went down after the kill
    unready: list[float] = field(default_factory=list)  # probe times readiness was down outside the windows
    memory: list[tuple[float, int]] = field(default_factory=list)  # (time, RSS bytes of serve's tree)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)

    def in_window(self, start: float, end: float) -> bool:
        return any(start <= w_end and end >= w_start for w_start, w_end in self.windows)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tree(pid: int) -> list[int]:
    """``pid`` and every running process below it."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = {pid}, {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(p for p in found if p in parents)


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def ready(base: str) -> bool:
    try:
        connection = http.client.HTTPConnection(*base.split(":"), timeout=2)
        connection.request("GET", "/v2/health/ready")
        status = connection.getresponse().status
        connection.close()
        return status == 200
    except OSError:
        return False


def post(base: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection(*base.split(":"), timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> triton_http.InferInput:
    item = triton_http.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def hostile(soak: Soak, pixels: np.ndarray, stages: int) -> list[tuple[str, object]]:
    """Each hostile request: a name and a callable returning its HTTP status."""
    path = f"/v2/models/{soak.name}/infer"
    bomb = json.dumps({"inputs": [{"name": "images", "shape": [1_000_000_000, 3, 224, 224], "datatype": "FP32",
                                   "data": [1]}]}).encode()
    inflating = gzip.compress(b'{"inputs": [' + b" " * (65 * 2**20) + b"]}", compresslevel=1)
    one = pixels[:1]
    nan_pixels = one.copy()
    nan_pixels[0, 0, 0, 0] = np.nan

    def infer(inputs: list) -> int:
        with triton_http.InferenceServerClient(soak.base, network_timeout=30) as client:
            try:
                client.infer(soak.name, inputs)
            except Exception as err:
                status = getattr(err, "status", lambda: None)()
                return int(status) if status and str(status).isdigit() else 599
        return 200

    keep = np.full((1, stages), 0.7, np.float32)
    return [
        ("json shape 1e9 (case 1)", lambda: post(soak.base, path, bomb)),
        ("gzip inflating past 64 MiB", lambda: post(soak.base, path, inflating, {"Content-Encoding": "gzip"})),
        ("NaN keep", lambda: infer([tensor("images", one), tensor("keep", np.full_like(keep, np.nan))])),
        ("zero keep", lambda: infer([tensor("images", one), tensor("keep", np.zeros_like(keep))])),
        ("keep length", lambda: infer([tensor("images", one), tensor("keep", np.full((1, stages + 2), 0.7,
                                                                                     np.float32))])),
        ("no images", lambda: infer([tensor("keep", keep)])),
        ("NaN pixels", lambda: infer([tensor("images", nan_pixels)])),
        ("image shape", lambda: infer([tensor("images", one[:, :, :100, :100])])),
        ("batch 64", lambda: infer([tensor("images", np.repeat(one, 64, axis=0))])),
        ("garbage", lambda: post(soak.base, path, os.urandom(4096))),
        ("load another model", lambda: post(soak.base, f"/v2/repository/models/{soak.name}/load", b"{}")),
    ]


def good_sender(soak: Soak, pixels: np.ndarray, expected: dict, rows: list, rate: float, stop: threading.Event,
                seed: int) -> None:
    rng = np.random.default_rng(seed)
    with triton_http.InferenceServerClient(soak.base, network_timeout=30, connection_timeout=10) as client:
        index = 0
        while not stop.wait(rng.exponential(1.0 / rate)):
            image, which = index % len(pixels), index % len(rows)
            index += 1
            inputs = [tensor("images", pixels[image : image + 1])]
            if rows[which] is not None:
                inputs.append(tensor("keep", np.asarray([rows[which]], np.float32)))
            sent = time.monotonic()
            try:
                result = client.infer(soak.name, inputs)
                tokens, top1 = expected[(image, which)]
                same = np.array_equal(result.as_numpy("tokens")[0], tokens) and \
                    int(result.as_numpy("logits")[0].argmax()) == top1
                outcome = "ok" if same else "wrong answer"
            except Exception as err:
                outcome = f"error {str(err)[:120]}"
            soak.add(Record("good", sent, time.monotonic(), outcome))


def bad_sender(soak: Soak, requests: list, rate: float, stop: threading.Event) -> None:
    index = 0
    while not stop.wait(1.0 / rate):
        kind, send = requests[index % len(requests)]
        index += 1
        sent = time.monotonic()
        try:
            status = send()
            outcome = f"refused {status}" if 400 <= status < 600 else f"accepted {status}"
        except Exception as err:
            outcome = f"error {str(err)[:120]}"
        soak.add(Record(kind, sent, time.monotonic(), outcome))


def monitor(soak: Soak, serve: subprocess.Popen, sample_s: float, stop: threading.Event) -> None:
    """Readiness every 0.2 s, memory every ``sample_s``.

    A fault window closes once readiness, having gone down after the kill (serve notices within its poll),
    is back; one whose server never reported unready closes after :data:`NOTICE_S`, unnoticed.
    """
    last_sample = 0.0
    while not stop.wait(0.2):
        now = time.monotonic()
        up = ready(soak.base)
        with soak.lock:
            open_window = soak.windows and soak.windows[-1][1] == float("inf")
            if open_window and not up:
                soak.noticed[-1] = True
            elif open_window and (soak.noticed[-1] or now - soak.windows[-1][0] > NOTICE_S):
                soak.windows[-1][1] = now + GRACE_S
            elif not up and not open_window and not soak.in_window(now, now):
                soak.unready.append(now)
        if now - last_sample >= sample_s:
            soak.memory.append((now, rss(tree(serve.pid))))
            last_sample = now


def kill_stub(soak: Soak, serve: subprocess.Popen) -> int | None:
    stubs = [pid for pid in tree(serve.pid) if comm(pid).startswith("triton_python")]
    if not stubs:
        return None
    with soak.lock:
        soak.windows.append([time.monotonic(), float("inf")])
        soak.noticed.append(False)
    os.kill(stubs[0], signal.SIGKILL)
    return stubs[0]


def references(model: Path, profile_name: str, pixels: np.ndarray, rows: list) -> dict:
    """Tokens and top-1 of each (image, keep) alone, in this process, as the server's model instances open the file."""
    profile = load_profile(profile_name)
    backend = backends.get(profile.backend)
    stages = len(read(model).stages)
    with tempfile.TemporaryDirectory() as workdir:
        options = backends.RunOptions(backend.precision(profile.precision), profile.threads)
        runner = prepare.open_runner(backend, model, options, Path(workdir))
        expected = {}
        for image in range(len(pixels)):
            for which, row in enumerate(rows):
                keep = row if row is not None else profile.keep_for(stages)
                logits, tokens = runner(torch.from_numpy(pixels[image : image + 1]), torch.tensor(keep))
                expected[(image, which)] = (np.asarray(tokens)[0], int(np.asarray(logits)[0].argmax()))
    return expected


def photos(model: Path, data: Path) -> np.ndarray:
    """The first :data:`IMAGES` images of ``data``, pre-processed as the export's metadata says."""
    from ats_deploy.data import Skipped, folder_batches, image_folder

    artifact = read(model)
    folder = image_folder(data, artifact.num_classes, limit=IMAGES)
    return torch.cat([b.images for b in folder_batches(folder, artifact.data_config, IMAGES, Skipped())]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--rate", type=float, default=8.0, help="good requests per second (moderate: the 2-core "
                        "machine serves DeiT-Tiny at about 80)")
    parser.add_argument("--bad-rate", type=float, default=1.0, help="hostile requests per second")
    parser.add_argument("--kills", type=int, default=2, help="stub kills, evenly spaced")
    parser.add_argument("--sample-s", type=float, default=10.0, help="memory sampling period")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="memory is compared from this time on")
    parser.add_argument("--memory-slack", type=float, default=1.25, help="last sample / first after warm-up")
    parser.add_argument("--data", type=Path, default=None, help="an ImageFolder: its first 16 images, pre-processed "
                        "as the export says (default: seeded random pixels)")
    parser.add_argument("--output", type=Path, default=None, help="the summary as JSON")
    args = parser.parse_args()
    console = Console()

    stages = len(read(args.model).stages)
    pixels = photos(args.model, args.data) if args.data else \
        np.random.default_rng(0).standard_normal((IMAGES, 3, 224, 224)).astype(np.float32)
    rows = [None, [0.7] * stages]
    expected = references(args.model, args.profile, pixels, rows)
    http_port, grpc_port, metrics_port = free_ports(3)
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    log = folder / "serve.log"
    command = [str(Path(sys.executable).parent / "ats-deploy"), "serve", str(args.model), "--profile", args.profile,
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    with log.open("wb") as out:
        serve = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    soak = Soak(f"127.0.0.1:{http_port}", default_name(args.model))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready(soak.base):
            if serve.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        summary = run(soak, serve, args, pixels, expected, rows, stages, console)
    finally:
        if serve.poll() is None:
            serve.kill()
    summary["serve_log_tail"] = log.read_text(errors="replace")[-1500:]
    report(summary, console)
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(0 if all(summary["checks"].values()) else 1)


def run(soak: Soak, serve: subprocess.Popen, args: argparse.Namespace, pixels: np.ndarray, expected: dict,
        rows: list, stages: int, console: Console) -> dict:
    stop = threading.Event()
    threads = [threading.Thread(target=good_sender, args=(soak, pixels, expected, rows, args.rate / 2, stop, seed))
               for seed in (1, 2)]
    threads.append(threading.Thread(target=bad_sender, args=(soak, hostile(soak, pixels, stages), args.bad_rate,
                                                             stop)))
    watcher = threading.Thread(target=monitor, args=(soak, serve, args.sample_s, stop))
    start = time.monotonic()
    for thread in [*threads, watcher]:
        thread.start()
    kills = [start + args.duration * (i + 1) / (args.kills + 1) for i in range(args.kills)]
    killed = []
    with console.status("soaking") as status:
        while (elapsed := time.monotonic() - start) < args.duration and serve.poll() is None:
            if kills and time.monotonic() >= kills[0]:
                kills.pop(0)
                killed.append(kill_stub(soak, serve))
            status.update(f"soaking: {elapsed:.0f}/{args.duration:.0f} s, {len(soak.records)} requests")
            time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    watcher.join(timeout=10)
    below = tree(serve.pid)
    serve.send_signal(signal.SIGTERM)
    try:
        code = serve.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    time.sleep(1.0)  # the kernel reaps orphans asynchronously
    left = [pid for pid in below if pid != serve.pid and Path(f"/proc/{pid}").exists() and comm(pid)]
    prefix = f"ats-deploy-serve-{serve.pid}-"
    files = [str(p) for p in [*Path(tempfile.gettempdir()).glob(prefix + "*"), *Path("/dev/shm").glob(prefix + "*")]]
    return summarize(soak, start, args, killed, code, left, files)


def summarize(soak: Soak, start: float, args: argparse.Namespace, killed: list, code: int | None, left: list,
              files: list) -> dict:
    good = [r for r in soak.records if r.kind == "good"]
    lost = [r for r in good if r.outcome != "ok" and not soak.in_window(r.sent, r.done)]
    in_windows = [r for r in good if r.outcome != "ok" and soak.in_window(r.sent, r.done)]
    bad = [r for r in soak.records if r.kind != "good"]
    not_refused = [r for r in bad if not r.outcome.startswith("refused")]
    after_warmup = [m for t, m in soak.memory if t - start >= args.warmup_s]
    memory_ok = len(after_warmup) >= 2 and after_warmup[-1] <= args.memory_slack * after_warmup[0]
    kinds: dict[str, dict[str, int]] = {}
    for record in bad:
        kinds.setdefault(record.kind, {}).setdefault(record.outcome, 0)
        kinds[record.kind][record.outcome] += 1
    latencies = np.array([r.done - r.sent for r in good if r.outcome == "ok"]) * 1e3
    return {
        "duration_s": args.duration,
        "rate": args.rate,
        "bad_rate": args.bad_rate,
        "good": {"sent": len(good), "ok": sum(r.outcome == "ok" for r in good), "lost_outside_faults": len(lost),
                 "failed_in_fault_windows": len(in_windows),
                 "wrong_answers": sum(r.outcome == "wrong answer" for r in good),
                 "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
                 "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
                 "lost_examples": [r.outcome for r in lost[:5]]},
        "hostile": {"sent": len(bad), "not_refused": [f"{r.kind}: {r.outcome}" for r in not_refused[:10]],
                    "by_kind": kinds},
        "faults": {"stubs_killed": killed, "windows_s": [[round(a - start, 1), round(b - start, 1)]
                                                          for a, b in soak.windows]},
        "unready_outside_faults": len(soak.unready),
        "memory_mb": [[round(t - start), round(m / 2**20)] for t, m in soak.memory],
        "stop": {"exit_code": code, "processes_left": left, "files_left": files},
        "checks": {
            "no lost good answer outside fault windows": not lost,
            "every hostile request refused": not not_refused,
            "ready outside fault windows": not soak.unready,
            "memory bounded": memory_ok,
            "stubs killed, reported unready, recovered": len(killed) == args.kills and all(killed)
            and all(soak.noticed) and all(b != float("inf") for _, b in soak.windows),
            "clean stop (exit 0)": code == 0,
            "no process, shm or temp folder left": not left and not files,
        },
    }


def report(summary: dict, console: Console) -> None:
    good, hostile = summary["good"], summary["hostile"]
    table = Table(title=f"soak: {summary['duration_s']:.0f} s, {summary['rate']:g} good + {summary['bad_rate']:g} "
                  "hostile requests/s")
    table.add_column("what")
    table.add_column("figure", justify="right")
    rows = [
        ("good requests sent / answered right", f"{good['sent']} / {good['ok']}"),
        ("good lost outside fault windows", str(good["lost_outside_faults"])),
        ("good failed inside fault windows", str(good["failed_in_fault_windows"])),
        ("wrong answers (tokens or top-1 differ)", str(good["wrong_answers"])),
        ("good p50 / p99 ms", f"{good['p50_ms']:.1f} / {good['p99_ms']:.1f}" if good["p50_ms"] else "-"),
        ("hostile requests sent / not refused", f"{hostile['sent']} / {len(hostile['not_refused'])}"),
        ("fault windows (s from start)", str(summary["faults"]["windows_s"])),
        ("memory of serve's tree, MB (first, max, last)", _memory(summary["memory_mb"])),
        ("exit code; processes, files left", f"{summary['stop']['exit_code']}; {summary['stop']['processes_left']}, "
         f"{summary['stop']['files_left']}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for check, ok in summary["checks"].items():
        console.print(f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {check}")


def _memory(samples: list) -> str:
    if not samples:
        return "-"
    values = [m for _, m in samples]
    return f"{values[0]}, {max(values)}, {values[-1]}"


if __name__ == "__main__":
    main()
