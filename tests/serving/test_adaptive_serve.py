"""Load-adaptive budgets in a real Triton: the front model `ats-deploy triton --slo-ms` writes, in the bundled
tritonserver, with the tiny random-weight export behind it as `ats-deploy serve`'s Python-backend model (the
native onnxruntime backend is not in the wheel). `serve --slo-ms` writes the very same front files
(checked below); its start-up refusals run the CLI in-process, before any server starts.

One server for the module. Its SLO is generous for one request and far too short for a burst of 48
sent at once, so a burst drives keep down and the excess is refused at once; nothing here times the machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import filecmp
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import free_ports, invoke, plain

tritonclient_http = pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

STAGES = 9  # the tiny export's ATS blocks
SLO_MS = 1500  # one request alone takes far less; a burst of BURST takes far more
BURST = 48
FLOOR = 0.8  # three rungs (1.0, 0.9, 0.8): a short start-up measurement
PROFILE = """\
description: onnxruntime on 1 thread, full keep, batches of up to 8, for the --slo-ms tests.
source: tests/serving/test_adaptive_serve.py
backend: onnxruntime
precision: fp32
keep: 1.0
batch: 1
shapes: {min: 1, opt: 1, max: 8}
threads: 1
warmup: 1
iterations: 1
serving: {max_batch_size: 8, max_queue_delay_us: 0}
"""
START_TIMEOUT_S = 180


@dataclass
class Triton:
    process: subprocess.Popen
    http: int
    metrics: int
    name: str
    log: Path

    def client(self):
        return tritonclient_http.InferenceServerClient(f"127.0.0.1:{self.http}", concurrency=BURST)

    def metric(self, name: str, **labels: str) -> float | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        wanted = [f'{k}="{v}"' for k, v in {"model": self.name, **labels}.items()]
        for row in text.splitlines():
            if row.startswith(name + "{") and all(w in row for w in wanted):
                return float(row.split()[-1])
        return None


def inner_python_model(model: Path, profile: Path, repo: Path, name: str) -> None:
    """``repo/<name>``: `serve`'s Python-backend model of ``model`` (what the native backend would run)."""
    from ats_deploy.serving import server

    plan = server.plan(model, str(profile), server.Ports(*free_ports(3)))
    plan.config.name = name
    plan.config.ClearField("dynamic_batching")  # as `triton --slo-ms` writes the model behind the front
    staging = repo.parent / "python-inner"
    server.write_repository(plan, staging)
    shutil.rmtree(repo / name)
    shutil.move(str(staging / name), repo / name)


@pytest.fixture(scope="module")
def triton(tiny_ats_onnx, tmp_path_factory) -> Iterator[Triton]:
    from ats_deploy.serving import adaptive, server

    folder = tmp_path_factory.mktemp("slo")
    profile = folder / "slo-test.yaml"
    profile.write_text(PROFILE)
    repo = folder / "repo"
    result = invoke("triton", tiny_ats_onnx, "--profile", profile, "-o", repo, "--slo-ms", SLO_MS,
                    "--min-keep", FLOOR)
    assert result.exit_code == 0, result.output
    name = tiny_ats_onnx.stem
    inner_python_model(tiny_ats_onnx, profile, repo, f"{name}_inner")
    tritonserver, environment = server.bundled_triton(folder / "backends")

    http, grpc, metrics = free_ports(3)
    log = folder / "triton.log"
    command = [tritonserver, f"--model-repository={repo}",
               f"--backend-directory={folder / 'backends'}", "--http-address=127.0.0.1", f"--http-port={http}",
               "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--metrics-address=127.0.0.1",
               f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
               adaptive.front_shm_flag()]
    with log.open("wb") as out:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True)
    running = Triton(process, http, metrics, name, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready(running):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"tritonserver did not serve the front model:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    yield running
    stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to tritonserver, then SIGKILL to its whole process group (its Python-backend stubs) if need be."""
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session (start_new_session): Triton and its stubs only
    process.wait()


def ready(running: Triton) -> bool:
    """Whether the front model measured the model and serves (its metric), False while Triton starts."""
    try:
        return running.metric("ats_slo_ready") == 1
    except OSError:
        return False


def infer(client, name: str, pixels: np.ndarray, keep: np.ndarray | None = None):
    tensors = [tritonclient_http.InferInput("images", list(pixels.shape), "FP32")]
    tensors[0].set_data_from_numpy(pixels)
    if keep is not None:
        tensors.append(tritonclient_http.InferInput("keep", list(keep.shape), "FP32"))
        tensors[1].set_data_from_numpy(keep)
    return client.infer(name, tensors)


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224)).astype(np.float32)


def test_a_lone_request_runs_at_full_keep_and_says_so(triton):
    with triton.client() as client:
        result = infer(client, triton.name, pixels(1))
    assert result.as_numpy("served_keep").tolist() == [[1.0] * STAGES]
    assert triton.metric("ats_slo_keep") == 1.0


def test_a_request_that_carries_keep_is_served_with_it_exactly(triton):
    keep = np.full((2, STAGES), 0.7, dtype=np.float32)
    with triton.client() as client:
        through_front = infer(client, triton.name, pixels(2, 1), keep)
        direct = infer(client, f"{triton.name}_inner", pixels(2, 1), keep)
    assert np.array_equal(through_front.as_numpy("served_keep"), keep)
    assert np.array_equal(through_front.as_numpy("tokens"), direct.as_numpy("tokens"))
    assert np.allclose(through_front.as_numpy("logits"), direct.as_numpy("logits"), atol=1e-4)


def test_a_burst_lowers_keep_never_below_the_floor_and_the_excess_is_refused_at_once(triton):
    images = pixels(1, 2)

    def one(_: int):
        with tritonclient_http.InferenceServerClient(f"127.0.0.1:{triton.http}") as client:
            try:
                return infer(client, triton.name, images).as_numpy("served_keep")[0]
            except Exception as err:  # tritonclient's InferenceServerException
                return err

    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        outcomes = list(pool.map(one, range(BURST)))
    served = [o for o in outcomes if isinstance(o, np.ndarray)]
    refused = [o for o in outcomes if not isinstance(o, np.ndarray)]
    assert served, refused[:3]
    means = [float(keep.mean()) for keep in served]
    assert min(means) < 1.0, means  # the burst ran at a lower keep for a while...
    assert min(means) >= FLOOR  # ...never below the floor
    for err in refused:  # refused at once with a status that says why, never a failure of the model
        assert err.status() == "503" and ("over capacity" in str(err) or "dropped" in str(err)), err
    assert triton.metric("ats_slo_requests", outcome="met") >= 1
    overhead = triton.metric("ats_slo_overhead_seconds")  # what the front spent outside the model, fed to the policy
    assert overhead is not None and 0 < overhead < SLO_MS / 1e3


def test_bad_requests_are_refused_alone(triton):
    keep = np.full((1, STAGES), np.nan, dtype=np.float32)
    with triton.client() as client:
        with pytest.raises(Exception, match="keep value"):
            infer(client, triton.name, pixels(1), keep)
        assert infer(client, triton.name, pixels(1)).as_numpy("logits").shape == (1, 1000)
    assert triton.metric("ats_slo_requests", outcome="invalid") >= 1


def test_the_front_model_counts_the_deadline_from_the_guards_stamp(triton):
    """A stamp of the front's own clock (CLOCK_MONOTONIC, one for the machine) from an SLO ago: the request has
    no time left and is dropped; stamped now, or not at all (Triton without the guard), it is served."""
    from ats_deploy.serving.front_model import RECEIVED

    tensor = tritonclient_http.InferInput("images", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(pixels(1, 5))
    with triton.client() as client:
        with pytest.raises(Exception, match="waited past its"):
            client.infer(triton.name, [tensor], parameters={RECEIVED: time.monotonic_ns() - SLO_MS * 10**6})
        for parameters in ({RECEIVED: time.monotonic_ns()}, None):
            assert client.infer(triton.name, [tensor], parameters=parameters).as_numpy("logits").shape == (1, 1000)


def test_keep_rises_back_to_full_once_the_load_is_gone(triton):
    from ats_deploy.serving.policy import Settings

    rungs = 3  # 1.0 down to the floor
    time.sleep(Settings.raise_after_s * rungs + 0.5)  # quiet for longer than the dwells of every rise together
    with triton.client() as client:
        result = infer(client, triton.name, pixels(1, 3))
    assert result.as_numpy("served_keep").mean() == 1.0


def test_serve_writes_the_same_front_model_as_triton(tiny_ats_onnx, tmp_path):
    from ats_deploy.serving import adaptive, server

    profile = tmp_path / "slo-test.yaml"
    profile.write_text(PROFILE)
    plan = server.plan(tiny_ats_onnx, str(profile), server.Ports(*free_ports(3)),
                       slo=adaptive.SloOptions(SLO_MS))
    server.write_repository(plan, tmp_path / "served")
    assert invoke("triton", tiny_ats_onnx, "--profile", profile, "-o", tmp_path / "repo", "--slo-ms",
                  SLO_MS).exit_code == 0
    name = tiny_ats_onnx.stem
    for filename in adaptive.FRONT_FILES:
        assert filecmp.cmp(tmp_path / "served" / name / "1" / filename, tmp_path / "repo" / name / "1" / filename,
                           shallow=False)
    assert (tmp_path / "served" / f"{name}_inner").is_dir() and (tmp_path / "repo" / f"{name}_inner").is_dir()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--slo-ms", "0"], "--slo-ms 0 is not a positive number of milliseconds"),
        (["--slo-ms", "-5"], "--slo-ms -5 is not a positive number of milliseconds"),
        (["--slo-ms", "100", "--min-keep", "0.9"], "--min-keep 0.9 is above the keep of profile"),
        (["--slo-ms", "100", "--max-drop", "1"], "--max-drop needs the accuracy a tune log measured"),
        (["--min-keep", "0.5"], "--min-keep sets the load-adaptive keep, which needs --slo-ms"),
    ],
)
def test_bad_slo_options_end_in_one_message_before_anything_starts(tiny_ats_onnx, here, options, message):
    (here / "cpu-half.yaml").write_text(PROFILE.replace("keep: 1.0", "keep: 0.6"))
    for command in ("serve", "triton"):
        result = invoke(command, tiny_ats_onnx, "--profile", here / "cpu-half.yaml", *options)
        assert result.exit_code != 0 and message in plain(result.output), (command, result.output)
        assert "Traceback" not in result.output
    assert not (here / "model_repository").exists()  # triton wrote nothing


def test_an_slo_below_the_models_own_latency_is_refused_before_triton_starts(tiny_ats_onnx, here):
    (here / "p.yaml").write_text(PROFILE)
    result = invoke("serve", tiny_ats_onnx, "--profile", here / "p.yaml", "--slo-ms", "0.001",
                    "--http-port", free_ports(1)[0])
    assert result.exit_code != 0
    assert "--slo-ms 0.001 is below what the model takes for one image alone at its lowest keep" in plain(
        result.output)


# --------------------------------------------------------------------------- loadtest's schedules and attainment


def test_steps_repeat_to_fill_the_duration_with_the_same_arrivals_every_run():
    from ats_deploy.serving.schedule import plan

    first = plan("10,40", None, 5.0, None, 20.0, 100.0)
    again = plan("10,40", None, 5.0, None, 20.0, 100.0)
    assert np.array_equal(first.times, again.times)
    assert [(s.start, s.end, s.rate) for s in first.steps] == [(0, 5, 10), (5, 10, 40), (10, 15, 10), (15, 20, 40)]
    counts = [int(((first.times >= s.start) & (first.times < s.end)).sum()) for s in first.steps]
    assert counts[1] > 2 * counts[0] and counts[3] > 2 * counts[2]  # the heavy steps carry the load
    assert plan("20,60,20", None, 20.0, None, 10.0, None).duration == 60  # one pass when --duration is shorter


def test_a_trace_file_is_sent_as_written_and_a_bad_one_refused(tmp_path):
    from ats_deploy.errors import UserError
    from ats_deploy.serving.schedule import plan

    trace = tmp_path / "trace.txt"
    trace.write_text("# seconds\n0.0\n0.5\n0.75\n12.0\n")
    schedule = plan(None, None, None, trace, 10.0, 100.0)
    assert schedule.times.tolist() == [0.0, 0.5, 0.75, 12.0] and len(schedule.steps) == 2
    trace.write_text("0.5\n0.1\n")
    with pytest.raises(UserError, match="increasing order"):
        plan(None, None, None, trace, 10.0, 100.0)
    with pytest.raises(UserError, match="--concurrency is closed loop"):
        plan("10", "4", 5.0, None, 10.0, 100.0)
    with pytest.raises(UserError, match="drop --rate"):
        plan("10", None, None, trace, 10.0, 100.0)


def test_attainment_counts_errors_and_refusals_as_misses_per_step():
    from ats_deploy.serving.schedule import Step
    from ats_deploy.serving.slo_report import Outcomes, summarize

    outcomes = Outcomes(
        scheduled=np.array([0.1, 0.2, 0.3, 0.4, 1.1, 1.2]),
        latency_ms=np.array([50.0, 150.0, 5.0, 2.0, 80.0, 90.0]),
        status=np.array(["ok", "ok", "error", "rejected", "ok", "ok"]),
        keep=np.array([1.0, 0.7, np.nan, np.nan, 1.0, 1.0]),
        correct=np.array([1.0, 0.0, np.nan, np.nan, 1.0, 0.0]),
    )
    summary = summarize(outcomes, [Step(0, 1, 4), Step(1, 2, 2)], slo_ms=100)
    first, second = summary["steps"]
    assert first["sent"] == 4 and first["attained"] == 0.25  # one of four within the SLO; late, error, refused miss
    assert first["errors"] == 1 and first["rejected"] == 1
    assert first["mean_keep"] == pytest.approx(0.85) and first["full_keep"] == 0.5 and first["top1"] == 0.5
    assert second["attained"] == 1.0
    assert summary["overall"]["attained"] == pytest.approx(3 / 6)


def test_a_tune_log_gives_the_ladder_its_pareto_front_and_max_drop_its_floor(tiny_ats_onnx, here):
    """Settings measured by tune (here written by hand): the ladder keeps the front, --max-drop cuts it."""
    import json

    from ats_deploy.checkpoints import sha256_file
    from ats_deploy.tune_log import Dense, Measurement

    def setting(keep: float, right: int, p50_ms: float) -> dict:
        correct = np.arange(100) < right
        return Measurement((keep,), correct, 1.0, p50_ms, 20.0, [1.0] * STAGES, 20.0 / p50_ms).to_record(197, 1)

    log = here / "cpu-tuned.log.jsonl"
    records = [{"kind": "header", "version": 1, "conditions": {"model_sha256": sha256_file(tiny_ats_onnx)}},
               Dense(np.arange(100) < 80, 1.0, []).to_record(),
               setting(1.0, 80, 20.0), setting(0.9, 79, 18.0), setting(0.8, 75, 17.0), setting(0.85, 78, 16.0),
               setting(0.6, 74, 12.0), setting(0.5, 65, 10.0)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    (here / "p.yaml").write_text(PROFILE)
    result = invoke("triton", tiny_ats_onnx, "--profile", here / "p.yaml", "-o", here / "repo", "--slo-ms", "100",
                    "--tune-log", log, "--max-drop", "7")
    assert result.exit_code == 0, result.output
    # 0.8 is slower and less accurate than 0.85: off the front; 0.5 is 15 points below dense: under the floor
    assert "keep ladder 1 (80.0%) > 0.9 (79.0%) > 0.85 (78.0%) > 0.6 (74.0%) (from tune log" in plain(result.output)
    records[0]["conditions"]["model_sha256"] = "0" * 64  # a log of another file
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke("triton", tiny_ats_onnx, "--profile", here / "p.yaml", "-o", here / "repo2", "--slo-ms", "100",
                    "--tune-log", log)
    assert result.exit_code != 0 and "measured another model file" in plain(result.output)
