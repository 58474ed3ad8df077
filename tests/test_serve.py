"""`ats-deploy serve`: a real Triton Inference Server (PyTriton) serving the tiny random-weight export on onnxruntime.

One server is shared by the request tests (starting one costs seconds); its dynamic batcher waits long enough
that concurrent requests share a batch, which Triton's own metrics confirm. Answers are compared with the same
file run in-process; start-up refusals run the CLI in-process, before any server starts.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, plain

from ats_deploy import backends
from ats_deploy.backends import RunOptions

tritonclient_http = pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

STAGES = 9  # the tiny export's ATS blocks, 3 to 11
PROFILE_KEEP = 0.5
QUEUE_DELAY_US = 300_000  # long enough for concurrent requests to meet in one batch
PROFILE = f"""\
description: onnxruntime on 1 thread, batches of up to 8 for the serve tests.
source: tests/test_serve.py
backend: onnxruntime
precision: fp32
keep: {PROFILE_KEEP}
batch: 1
shapes: {{min: 1, opt: 1, max: 8}}
threads: 1
warmup: 1
iterations: 1
serving: {{max_batch_size: 8, max_queue_delay_us: {QUEUE_DELAY_US}}}
"""
START_TIMEOUT_S = 120


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the kernel's ephemeral picks, released again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, grandchildren...), read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Server:
    """An `ats-deploy serve` process and where it listens."""

    process: subprocess.Popen
    http: int
    grpc: int
    metrics: int
    name: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self):
        return tritonclient_http.InferenceServerClient(f"localhost:{self.http}", concurrency=8)

    def executions(self) -> int:
        """Triton's count of model executions (batches run) so far, from its Prometheus metrics."""
        import urllib.request

        text = urllib.request.urlopen(f"http://localhost:{self.metrics}/metrics", timeout=5).read().decode()
        line = next(row for row in text.splitlines() if row.startswith(f'nv_inference_exec_count{{model="{self.name}"'))
        return int(float(line.split()[-1]))

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)


def start_server(model: Path, folder: Path) -> Server:
    """`ats-deploy serve MODEL` with the test profile on free ports, once the model is ready."""
    profile = folder / "serve-test.yaml"
    profile.write_text(PROFILE)
    http, grpc, metrics = free_ports(3)
    log = folder / "serve.log"
    command = [Path(sys.executable).parent / "ats-deploy", "serve", model, "--profile", profile,
               "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics]
    with log.open("wb") as out:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, http, grpc, metrics, model.stem, log)
    client = tritonclient_http.InferenceServerClient(f"localhost:{http}")
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{server.output()[-3000:]}")
            try:
                if client.is_model_ready(server.name):
                    return server
            except Exception:  # not listening yet
                pass
            time.sleep(0.3)
    finally:
        client.close()
    process.kill()
    pytest.fail(f"serve was not ready after {START_TIMEOUT_S} s:\n{server.output()[-3000:]}")


@pytest.fixture(scope="module")
def server(tiny_ats_onnx, tmp_path_factory) -> Iterator[Server]:
    running_server = start_server(tiny_ats_onnx, tmp_path_factory.mktemp("serve"))
    yield running_server
    if running_server.process.poll() is None:
        running_server.stop()


@pytest.fixture(scope="module")
def runner(tiny_ats_onnx):
    """The served file opened in this process, as the server opens it."""
    return backends.get("onnxruntime").open(tiny_ats_onnx, RunOptions("fp32", 1))


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224)).astype(np.float32)


def inputs(pixels: np.ndarray, keep: np.ndarray | None = None, image_type: str = "FP32") -> list:
    tensors = [tritonclient_http.InferInput("images", list(pixels.shape), image_type)]
    tensors[0].set_data_from_numpy(pixels)
    if keep is not None:
        tensors.append(tritonclient_http.InferInput("keep", list(keep.shape), "FP32"))
        tensors[1].set_data_from_numpy(keep)
    return tensors


def alone(runner, pixels: np.ndarray, keep_row: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """What the runner gives for these images with this keep row, in this process."""
    return runner(torch.from_numpy(pixels), torch.tensor(keep_row, dtype=torch.float32))


def assert_same(result, expected: tuple[np.ndarray, np.ndarray]) -> None:
    logits, tokens = expected
    np.testing.assert_array_equal(result.as_numpy("tokens"), tokens)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-4, rtol=0)


def assert_same_row(result, row: int, expected: tuple[np.ndarray, np.ndarray]) -> None:
    logits, tokens = expected
    np.testing.assert_array_equal(result.as_numpy("tokens")[row], tokens[0])
    np.testing.assert_allclose(result.as_numpy("logits")[row], logits[0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_request_equals_the_runner_in_process(server, runner):
    pixels = images(2, seed=1)
    keep = np.array([[0.7] * STAGES, [0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5]], dtype=np.float32)
    with server.client() as client:
        result = client.infer(server.name, inputs(pixels, keep))
    assert result.as_numpy("logits").shape == (2, 1000)
    assert result.as_numpy("tokens").dtype == np.int64
    for i in range(2):
        assert_same_row(result, i, alone(runner, pixels[i : i + 1], keep[i].tolist()))


@pytest.mark.slow
def test_a_request_without_keep_gets_the_profile_keep(server, runner):
    pixels = images(1, seed=2)
    with server.client() as client:
        result = client.infer(server.name, inputs(pixels))
    assert_same(result, alone(runner, pixels, [PROFILE_KEEP] * STAGES))
    other = alone(runner, pixels, [1.0] * STAGES)[1]
    assert not np.array_equal(result.as_numpy("tokens"), other)  # the keep made a difference


@pytest.mark.slow
def test_requests_with_different_keep_rows_share_a_batch(server, runner):
    rows = [[0.5] * STAGES, [0.7] * STAGES, [1.0] * STAGES, [0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5]]
    pixels = [images(1, seed=10 + i) for i in range(len(rows))]
    before = server.executions()
    with server.client() as client:
        pending = [
            client.async_infer(server.name, inputs(p, np.array([row], dtype=np.float32)))
            for p, row in zip(pixels, rows, strict=True)
        ]
        results = [request.get_result() for request in pending]
    assert server.executions() - before < len(rows)  # at least two of them ran as one batch
    for result, p, row in zip(results, pixels, rows, strict=True):
        assert_same(result, alone(runner, p, row))


@pytest.mark.slow
def test_bad_requests_fail_alone_while_the_good_ones_batched_with_them_succeed(server, runner):
    good = images(1, seed=3)
    good_keep = np.array([[0.7] * STAGES], dtype=np.float32)
    bad = {
        "nan": (inputs(good, np.full((1, STAGES), np.nan, np.float32)), "keep value nan is invalid"),
        "zero": (inputs(good, np.zeros((1, STAGES), np.float32)), "keep value 0.0 is invalid"),
        "negative": (inputs(good, np.full((1, STAGES), -0.5, np.float32)), "keep value -0.5 is invalid"),
        "keep length": (inputs(good, np.full((1, STAGES + 2), 0.7, np.float32)), "unexpected shape for input 'keep'"),
        "image shape": (inputs(images(1, seed=4)[:, :, :200, :200]), "unexpected shape for input 'images'"),
        "image dtype": (inputs(good.astype(np.float64), image_type="FP64"), "data-type is 'FP64'"),
    }
    before = server.executions()
    with server.client() as client:
        goods = [client.async_infer(server.name, inputs(good, good_keep)) for _ in range(2)]
        bads = {what: client.async_infer(server.name, tensors) for what, (tensors, _) in bad.items()}
        good_results = [request.get_result() for request in goods]
        errors = {}
        for what, request in bads.items():
            with pytest.raises(Exception) as caught:
                request.get_result()
            errors[what] = str(caught.value)
    for what, (_, message) in bad.items():
        assert message in errors[what], what
    expected = alone(runner, good, good_keep[0].tolist())
    for result in good_results:
        assert_same(result, expected)
    # Two good and three bad-valued requests reached the model: fewer runs than requests means they shared batches.
    assert server.executions() - before < 5


def test_keep_rows_are_checked_one_request_at_a_time():
    from ats_deploy.serving.python_model import keep_problem

    assert keep_problem(np.array([[0.7, 0.5], [1.0, 98.0]], np.float32), images=2) is None
    assert "keep value nan is invalid" in keep_problem(np.array([[0.7, np.nan]], np.float32), images=1)
    assert "keep value 0.0 is invalid" in keep_problem(np.array([[0.0, 0.5]], np.float32), images=1)
    assert "above 1" in keep_problem(np.array([[2.5, 0.5]], np.float32), images=1)
    assert "1 rows for 2 images" in keep_problem(np.array([[0.7, 0.5]], np.float32), images=2)


def test_a_batch_of_requests_runs_once_and_each_gets_its_own_rows_back():
    from ats_deploy.serving.python_model import run_batch

    calls = []

    def runner(pixels: torch.Tensor, keep: torch.Tensor):  # logits: the first pixel plus keep; tokens: keep * 10
        calls.append(len(pixels))
        return (pixels.flatten(1)[:, :1] + keep).numpy(), (keep * 10).long().numpy()

    requests = [
        (images(count, seed=count), np.full((count, 2), 0.1 * (i + 1), np.float32))
        for i, count in enumerate((1, 3, 2))
    ]
    answers = run_batch(runner, requests)
    assert calls == [6]
    for (pixels, keep), (logits, tokens) in zip(requests, answers, strict=True):
        expected = runner(torch.from_numpy(pixels), torch.from_numpy(keep))
        np.testing.assert_array_equal(logits, expected[0])
        np.testing.assert_array_equal(tokens, expected[1])


def test_a_port_in_use_is_refused_before_anything_starts(tiny_ats_onnx, here):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http, metrics = free_ports(2)
        result = invoke("serve", tiny_ats_onnx, "--profile", "cpu", "--http-port", http, "--grpc-port", port,
                        "--metrics-port", metrics)
    assert result.exit_code == 2
    assert f"port {port} (--grpc-port) is in use" in plain(result.output)


def test_an_interface_version_1_file_is_refused(tiny_ats_onnx, here):
    import onnx

    model = onnx.load(str(tiny_ats_onnx))
    for prop in model.metadata_props:
        if prop.key == "interface_version":
            prop.value = "1"
    old = here / "old.onnx"
    onnx.save(model, str(old))
    result = invoke("serve", old, "--profile", "cpu")
    assert result.exit_code != 0
    assert "interface version 1" in plain(result.output)


def test_an_unknown_profile_and_an_unavailable_backend_are_refused(tiny_ats_onnx, here):
    result = invoke("serve", tiny_ats_onnx, "--profile", "no-such-profile")
    assert result.exit_code == 2 and "unknown profile 'no-such-profile'" in plain(result.output)
    if backends.get("tensorrt").unavailable() is None:
        pytest.skip("TensorRT is installed here: no unavailable backend to refuse")
    result = invoke("serve", tiny_ats_onnx, "--profile", "server-gpu")
    assert result.exit_code == 3
    assert "profile 'server-gpu' runs on tensorrt, which is not available here" in plain(result.output)


@pytest.mark.slow
def test_sigterm_stops_triton_and_its_python_backend(tiny_ats_onnx, tmp_path):
    model = Path(shutil.copy(tiny_ats_onnx, tmp_path / "sigterm_model.onnx"))
    server = start_server(model, tmp_path)
    try:
        below = descendants(server.process.pid)
        names = {(Path("/proc") / str(pid) / "comm").read_text().strip() for pid in below if running(pid)}
        assert "tritonserver" in names and any(name.startswith("triton_python") for name in names), names
        url = f"http://localhost:{server.http}/v2/models/sigterm_model/infer"
        deadline = time.monotonic() + 10  # printed once the model is ready, just after Triton says so
        while url not in plain(server.output()) and time.monotonic() < deadline:
            time.sleep(0.2)
        printed = plain(server.output())
        assert url in printed
        assert "onnxruntime CPU, fp32" in printed and "up to 8 images" in printed
        assert server.stop() == 0
        assert "stopped." in plain(server.output())
        deadline = time.monotonic() + 10  # the kernel reaps orphans asynchronously
        while any(running(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert not [pid for pid in below if running(pid)], "processes left behind after SIGTERM"


@pytest.mark.slow
def test_grpc_serves_too_and_names_a_bad_keep_as_an_invalid_argument(server):
    grpc = pytest.importorskip("tritonclient.grpc")
    pixels = images(1, seed=5)
    tensors = [grpc.InferInput("images", list(pixels.shape), "FP32"), grpc.InferInput("keep", [1, STAGES], "FP32")]
    tensors[0].set_data_from_numpy(pixels)
    tensors[1].set_data_from_numpy(np.full((1, STAGES), np.nan, np.float32))
    with grpc.InferenceServerClient(f"localhost:{server.grpc}") as client:
        with pytest.raises(Exception) as caught:
            client.infer(server.name, tensors)
        assert str(caught.value.status()) == "StatusCode.INVALID_ARGUMENT"
        assert "keep value nan is invalid" in caught.value.message()
        result = client.infer(server.name, tensors[:1])
    assert result.as_numpy("tokens").shape == (1, STAGES)
