"""Load-adaptive budgets against fixed ones, as SuperServe compares them: SLO attainment and top-1 on one bursty trace.

Servers run one after another on this machine (loopback only), each driven by ``ats-deploy loadtest`` with the
same seeded arrival schedule and image sequence:

1. capacity C: a fixed keep-1.0 server's answered requests per second at concurrency 1;
2. the bursty trace (0.5xC and 1.3xC alternating every ``--step`` s for ``--duration`` s, SLO ``--slo-ms``)
   against fixed keeps (one ``serve`` without --slo-ms; each request carries the keep) and ``serve --slo-ms``;
3. the adaptive server at a constant 0.5xC (the share of requests at keep 1.0), and on a ramp up and down;
4. the same bursty trace through the front model ``ats-deploy triton --slo-ms`` writes, in the bundled
   tritonserver (its inner model ``serve``'s Python-backend model: the wheel has no onnxruntime backend);
5. the policy's own cost per request: admit + decide on the bursty trace's arrivals, in process.

    .venv/bin/python benchmarks/adaptive_serving.py deit_t.onnx --data ../shared/data/imagenet-sample-dev

A short check of the adaptive servers alone (C given, no fixed keeps, no 0.5xC or ramp runs):

    .venv/bin/python benchmarks/adaptive_serving.py deit_t.onnx --data ../shared/data/imagenet-sample-dev \
        --capacity 62.8 --fixed "" --bursty-only

Writes ``<out>/summary.json`` and each run's loadtest folder (results.json, slo_over_time.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ATS = str(Path(sys.executable).parent / "ats-deploy")
PORTS = {"http": 19110, "grpc": 19111, "metrics": 19112}
PROFILE = """\
description: onnxruntime CPU, fp32, full keep, 2 threads (this machine's cores), Triton batches up to 8.
source: benchmarks/adaptive_serving.py
backend: onnxruntime
precision: fp32
keep: 1.0
batch: 1
shapes: {min: 1, opt: 1, max: 8}
threads: 2
warmup: 5
iterations: 20
serving: {max_batch_size: 8, preferred_batch_sizes: [4, 8], max_queue_delay_us: 0, max_queue_size: 0,
          queue_timeout_ms: 0}
"""
# No queue policy for the fixed-keep servers: with Triton's default_queue_policy set (a queue bound), calls through
# its dynamic batcher took +0.5 s now and then (4 in 60 sequential requests, none in 120 without it), which would
# make the baseline look worse than it is. The --slo-ms front and the model behind it have no batcher at all.


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout} s")


def metrics_ready(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


class Serve:
    """``ats-deploy serve`` (optionally with --slo-ms) for the length of a ``with`` block."""

    def __init__(self, model: Path, profile: Path, log: Path, *options: str) -> None:
        self.command = [ATS, "serve", str(model), "--profile", str(profile), *(
            f"--{k}-port={v}" for k, v in PORTS.items()), *options]
        self.log = log

    def __enter__(self) -> Serve:
        print("$", " ".join(self.command), flush=True)
        self.out = self.log.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while b"Ctrl-C" not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.out.close()


class FrontInTriton:
    """``ats-deploy triton --slo-ms`` in the bundled tritonserver, its inner model ``serve``'s Python model."""

    def __init__(self, model: Path, profile: Path, folder: Path, slo_ms: float, floor: list[str]) -> None:
        self.model, self.profile, self.folder, self.slo_ms, self.floor = model, profile, folder, slo_ms, floor

    def __enter__(self) -> FrontInTriton:
        from ats_deploy.serving import adaptive, server

        repo = self.folder / "repo"
        run([ATS, "triton", str(self.model), "--profile", str(self.profile), "-o", str(repo), "--slo-ms",
             f"{self.slo_ms:g}", "--name", "deit_t", *self.floor], stdout=subprocess.DEVNULL)
        plan = server.plan(self.model, str(self.profile), server.Ports(19120, 19121, 19122))
        plan.config.name = "deit_t_inner"
        plan.config.ClearField("dynamic_batching")  # as `triton --slo-ms` writes the model behind the front
        server.write_repository(plan, self.folder / "python-inner")
        shutil.rmtree(repo / "deit_t_inner")
        shutil.move(str(self.folder / "python-inner" / "deit_t_inner"), repo / "deit_t_inner")
        tritonserver, environment = server.bundled_triton(self.folder / "backends")
        command = [str(tritonserver), f"--model-repository={repo}",
                   f"--backend-directory={self.folder / 'backends'}", "--allow-gpu-metrics=false",
                   "--log-info=false", adaptive.front_shm_flag(),
                   *(f"--{k}-address=127.0.0.1" for k in PORTS),
                   *(f"--{k}-port={v}" for k, v in PORTS.items())]
        print("$", " ".join(command), flush=True)
        self.out = (self.folder / "triton.log").open("wb")
        self.process = subprocess.Popen(command, stdout=self.out, stderr=subprocess.STDOUT,
                                        env=environment, start_new_session=True)
        deadline = time.monotonic() + 240
        while not _front_ready(PORTS["metrics"]):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("tritonserver did not serve the front model")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: Triton and its Python-backend stubs
        self.process.wait()
        self.out.close()


def _front_ready(port: int) -> bool:
    try:
        text = urllib.request.urlopen(metrics_ready(port), timeout=2).read().decode()
    except OSError:
        return False
    return any(line.startswith("ats_slo_ready{") and line.endswith(" 1") for line in text.splitlines())


def loadtest(out: Path, data: Path, *options: str) -> dict:
    run([ATS, "loadtest", f"127.0.0.1:{PORTS['http']}", "--model-name", "deit_t", "--data", str(data),
         "--output", str(out), "--max-error-rate", "1", *options], stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def figures(result: dict) -> dict:
    """The overall row of a schedule run (attainment, p50/p99, errors, rejections, keep, top-1)."""
    return result["schedule"]["overall"]


def policy_cost(times: np.ndarray, capacity: float, slo_ms: float) -> dict:
    """Microseconds of admit + decide per request on ``times`` (the trace), in process.

    The latency table is C's: batch b at keep k takes about b * k / C seconds (the cost does not hinge on it:
    the work is a loop over rungs and waiting requests).
    """
    from ats_deploy.serving.policy import LatencyModel, RateMeter, Rung, Settings, SlackFit

    keeps = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    table = LatencyModel([{b: b * k / capacity for b in (1, 2, 4, 8)} for k in keeps])
    slack = SlackFit([Rung((k,)) for k in keeps], table, Settings(slo_ms / 1e3, 8))
    meter, waiting, spent, decisions = RateMeter(), [], 0.0, 0
    busy_until = 0.0
    for now in times:
        start = time.perf_counter()
        meter.add(now)
        if slack.admit(now, len(waiting), busy_until):
            waiting.append(now)
        if now >= busy_until and waiting:
            decision = slack.decide(now, waiting, meter.rate(now))
            del waiting[: decision.expired + decision.batch]
            busy_until = now + table.seconds(decision.rung, max(decision.batch, 1))
            decisions += 1
        spent += time.perf_counter() - start
    return {"requests": len(times), "decisions": decisions, "us_per_request": 1e6 * spent / len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--slo-ms", type=float, default=100.0)
    parser.add_argument("--step", type=float, default=10.0, help="seconds per burst step")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the bursty trace")
    parser.add_argument("--min-keep", type=float, default=None, help="the adaptive servers' floor (default: serve's)")
    parser.add_argument("--fixed", default="1.0,0.85,0.72,0.6,0.5", help="fixed keeps to compare (\"\": none)")
    parser.add_argument("--capacity", type=float, default=None,
                        help="C in requests/s, from an earlier run, instead of measuring it")
    parser.add_argument("--bursty-only", action="store_true", help="skip the adaptive server's 0.5xC and ramp runs")
    parser.add_argument("--port", type=int, default=PORTS["http"], help="the servers' HTTP port (gRPC and metrics: "
                        "the next two)")
    parser.add_argument("--out", type=Path, default=Path("results/adaptive-serving"))
    args = parser.parse_args()
    PORTS.update(http=args.port, grpc=args.port + 1, metrics=args.port + 2)
    fixed = [k for k in args.fixed.split(",") if k]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ats-adaptive-"))
    profile = work / "cpu-full.yaml"
    profile.write_text(PROFILE)
    model = work / "deit_t.onnx"
    shutil.copyfile(args.model, model)
    summary: dict = {"slo_ms": args.slo_ms, "min_keep": args.min_keep, "uptime_before": _uptime()}
    slo = ["--slo-ms", f"{args.slo_ms:g}"]
    floor = [] if args.min_keep is None else ["--min-keep", f"{args.min_keep:g}"]
    runs: dict = {}
    try:
        c = args.capacity
        if c is None or fixed:
            with Serve(model, profile, work / "fixed.log"):
                if c is None:
                    capacity = loadtest(args.out / "capacity", args.data, "--concurrency", "1", "--duration", "15")
                    c = capacity["levels"][0]["requests_per_s"]
                for keep in fixed:
                    result = loadtest(args.out / f"fixed-{keep}", args.data, *_bursty(c, args.step, args.duration, slo),
                                      "--keep", keep)
                    runs[f"fixed keep {keep}"] = figures(result)
        summary["capacity_rps"] = c
        summary["bursty"] = {"rates": [0.5 * c, 1.3 * c], "step_s": args.step, "duration_s": args.duration}
        bursty = _bursty(c, args.step, args.duration, slo)
        with Serve(model, profile, work / "adaptive.log", *slo, *floor):
            result = loadtest(args.out / "adaptive", args.data, *bursty)
            runs["adaptive (serve --slo-ms)"] = figures(result)
            summary["adaptive_steps"] = result["schedule"]["steps"]
            if not args.bursty_only:
                light = loadtest(args.out / "adaptive-half-c", args.data, "--rate", f"{0.5 * c:.1f}", "--duration",
                                 "20", *slo)
                summary["half_c"] = figures(light)
                ramp = [f"{f * c:.1f}" for f in (0.3, 0.6, 0.9, 1.2, 1.5, 1.2, 0.9, 0.6, 0.3)]
                ramp_run = loadtest(args.out / "ramp", args.data, "--rate", ",".join(ramp), "--step-seconds", "5",
                                    *slo)
                summary["ramp"], summary["ramp_steps"] = figures(ramp_run), ramp_run["schedule"]["steps"]
        with FrontInTriton(model, profile, work / "front", args.slo_ms, floor):
            runs["adaptive (triton --slo-ms front, bundled Triton)"] = figures(
                loadtest(args.out / "triton-front", args.data, *bursty))
        summary["runs"] = runs
        from ats_deploy.serving.schedule import from_rates

        trace = from_rates([0.5 * c, 1.3 * c], args.step, args.duration).times
        summary["policy_cost"] = policy_cost(trace, c, args.slo_ms)
    finally:
        summary["uptime_after"] = _uptime()
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    _print(summary)


def _bursty(capacity: float, step: float, duration: float, slo: list[str]) -> list[str]:
    """loadtest's options for the bursty trace: 0.5xC and 1.3xC alternating every ``step`` s."""
    return ["--rate", f"{0.5 * capacity:.1f},{1.3 * capacity:.1f}", "--step-seconds", f"{step:g}", "--duration",
            f"{duration:g}", *slo]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _print(summary: dict) -> None:
    print(f"capacity C (fixed keep 1.0, concurrency 1): {summary.get('capacity_rps', 0):.1f} requests/s")
    print("| server | attained | errors | rejected | p50 ms | p99 ms | mean keep | top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in summary.get("runs", {}).items():
        print(f"| {name} | {_pct(r['attained'])} | {r['errors']} | {r['rejected']} | {_n(r['p50_ms'])} | "
              f"{_n(r['p99_ms'])} | {_n(r['mean_keep'], 2)} | {_pct(r['top1'])} |")
    for key in ("half_c", "ramp"):
        if key in summary:
            r = summary[key]
            print(f"{key}: attained {_pct(r['attained'])}, mean keep {_n(r['mean_keep'], 2)}, at keep 1.0 "
                  f"{_pct(r['full_keep'])}, top-1 {_pct(r['top1'])}")
    for key in ("adaptive_steps", "ramp_steps"):
        print(f"{key}:")
        for r in summary.get(key, []):
            print(f"| {r['label']} | {_pct(r['attained'])} | {r['rejected']} | {_n(r['p99_ms'])} | "
                  f"{_n(r['mean_keep'], 2)} | {_pct(r['full_keep'])} |")
    if "policy_cost" in summary:
        print(f"policy: {summary['policy_cost']['us_per_request']:.1f} us per request (admit + decide, in process)")
    print(summary["uptime_before"], "|", summary["uptime_after"])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
