"""`ats-deploy serve`: a real Triton Inference Server (PyTriton's) serving the tiny random-weight export on onnxruntime.

One server is shared by the request tests (starting one costs seconds); its dynamic batcher waits long enough
that concurrent requests share a batch, which Triton's own metrics confirm. Answers are compared with the same
file run in-process; start-up refusals run the CLI in-process, before any server starts. The fault tests (a
killed model instance, a killed Triton, a killed `serve`) each start a short-lived server of their own.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_helpers import free_ports, invoke, plain

from ats_deploy import backends
from ats_deploy.backends import RunOptions

tritonclient_http = pytest.importorskip("tritonclient.http")
pytest.importorskip("pytriton")

STAGES = 9  # the tiny export's ATS blocks, 3 to 11
PROFILE_KEEP = 0.5
QUEUE_DELAY_US = 300_000  # long enough for concurrent requests to meet in one batch
QUEUE_SIZE = 12  # requests that may wait; the queue test sends more at once
PROFILE = f"""\
description: onnxruntime on 1 thread, batches of up to 8 for the serve tests.
source: tests/serving/test_serve.py
backend: onnxruntime
precision: fp32
keep: {PROFILE_KEEP}
batch: 1
shapes: {{min: 1, opt: 1, max: 8}}
threads: 1
warmup: 1
iterations: 1
serving: {{max_batch_size: 8, max_queue_delay_us: {QUEUE_DELAY_US}, max_queue_size: {QUEUE_SIZE}}}
"""
START_TIMEOUT_S = 120


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

    def metric(self, name: str, **labels: str) -> float:
        """One sample of Triton's Prometheus metrics (0 when not exported yet)."""
        import urllib.request

        text = urllib.request.urlopen(f"http://localhost:{self.metrics}/metrics", timeout=5).read().decode()
        wanted = {"model": self.name, **labels}
        for row in text.splitlines():
            if row.startswith(name + "{"):
                found = dict(pair.split("=", 1) for pair in row[len(name) + 1 : row.rindex("}")].split(","))
                if all(found.get(k) == f'"{v}"' for k, v in wanted.items()):
                    return float(row.split()[-1])
        return 0.0

    def processes(self) -> set[int]:
        """Every running process below `serve` (Triton, its stubs, the watchdog)."""
        return {pid for pid in descendants(self.process.pid) if running(pid)}

    def leftovers(self) -> list[Path]:
        """The run's temp folder and shared-memory segments, named after `serve`'s PID."""
        prefix = f"ats-deploy-serve-{self.process.pid}-"
        return [*Path(tempfile.gettempdir()).glob(prefix + "*"), *Path("/dev/shm").glob(prefix + "*")]

    def pids(self, comm: str) -> list[int]:
        return [pid for pid in self.processes() if comm_of(pid).startswith(comm)]

    def ready(self) -> bool:
        try:
            with self.client() as client:
                return client.is_model_ready(self.name)
        except Exception:  # refused while Triton restarts
            return False


def comm_of(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def wait_for(condition, timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def outside_address() -> str | None:
    """An address of this machine other than loopback (its route to the outside; no packet is sent), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def accepts(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=3).close()
    except OSError:
        return False
    return True


def start_server(model: Path, folder: Path, *options: str) -> Server:
    """`ats-deploy serve MODEL` with the test profile on free ports, once the model is ready."""
    profile = folder / "serve-test.yaml"
    profile.write_text(PROFILE)
    http, grpc, metrics = free_ports(3)
    log = folder / "serve.log"
    command = [Path(sys.executable).parent / "ats-deploy", "serve", model, "--profile", profile,
               "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics, *options]
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
        url = f"http://127.0.0.1:{server.http}/v2/models/sigterm_model/infer"
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


# --------------------------------------------------------------------------- hostile requests, exposure, metrics


def post(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A raw HTTP POST to the server's HTTP port: the status and the body."""
    connection = http.client.HTTPConnection("localhost", server.http, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


def assert_still_serves(server: Server, runner) -> None:
    pixels = images(1, seed=7)
    with server.client() as client:
        assert_same(client.infer(server.name, inputs(pixels)), alone(runner, pixels, [PROFILE_KEEP] * STAGES))
    assert server.process.poll() is None


@pytest.mark.slow
def test_a_json_request_declaring_a_huge_shape_is_refused_and_the_server_stays_up(server, runner):
    """Triton 2.51 allocates a JSON tensor's declared bytes first: this 100-byte request used to abort it."""
    bomb = {"inputs": [{"name": "images", "shape": [1_000_000_000, 3, 224, 224], "datatype": "FP32", "data": [1]}]}
    status, body = post(server, f"/v2/models/{server.name}/infer", json.dumps(bomb).encode())
    assert status == 400
    assert "input 'images' declares shape [1000000000, 3, 224, 224]" in body
    negative = {"inputs": [{"name": "images", "shape": [-1, 3, 224, 224], "datatype": "FP32", "data": [1]}]}
    assert post(server, f"/v2/models/{server.name}/infer", json.dumps(negative).encode())[0] == 400
    assert_still_serves(server, runner)


@pytest.mark.slow
def test_a_gzip_body_that_inflates_past_the_limit_is_refused(server, runner):
    from ats_deploy.serving.guard import MAX_BODY

    body = gzip.compress(b'{"inputs": [' + b" " * (MAX_BODY + 1024) + b"]}", compresslevel=1)
    assert len(body) < MAX_BODY // 100
    status, answer = post(server, f"/v2/models/{server.name}/infer", body, {"Content-Encoding": "gzip"})
    assert status == 413 and "inflates to more than" in answer
    pixels = images(1, seed=8)  # a gzip body within the limit still serves
    with server.client() as client:
        result = client.infer(server.name, inputs(pixels), request_compression_algorithm="gzip")
    assert_same(result, alone(runner, pixels, [PROFILE_KEEP] * STAGES))
    assert_still_serves(server, runner)


@pytest.mark.slow
def test_by_default_it_listens_on_loopback_only_and_says_so(server):
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    for port in (server.http, server.grpc, server.metrics):
        assert accepts("127.0.0.1", port)
        assert not accepts(address, port), f"port {port} answers on {address}"
    printed = plain(server.output())
    assert f"http://127.0.0.1:{server.http}/v2/models/{server.name}/infer" in printed
    assert "127.0.0.1" in next(line for line in printed.splitlines() if "listens on" in line)


@pytest.mark.slow
def test_no_secret_on_a_command_line_and_the_model_cannot_be_swapped(server, runner):
    """PyTriton put its access token in tritonserver's arguments; serve needs none: loading is off, and the APIs
    no client needs (shared memory, trace, logging) are closed with a lock no request can open."""
    grpc = pytest.importorskip("tritonclient.grpc")
    for pid in server.processes():
        try:
            command = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").lower()
        except OSError:
            continue
        assert "token" not in command, command
    status, body = post(server, f"/v2/repository/models/{server.name}/load", b"{}")
    assert status != 200 and "not allowed" in body
    status, _ = post(server, f"/v2/repository/models/{server.name}/unload", b"{}")
    assert status != 200
    status, _ = post(server, "/v2/systemsharedmemory/region/x/register", b'{"key": "/x", "byte_size": 8}')
    assert status == 403
    for header in ({"ats-deploy-closed": "no key"}, {"ats-deploy-closed": "no\\nkey"}):
        status, _ = post(server, "/v2/logging", b'{"log_verbose_level": 9}', header)
        assert status == 403
    with grpc.InferenceServerClient(f"localhost:{server.grpc}") as client:
        for header in (None, {"triton-grpc-protocol-ats-deploy-closed": "no-key"}):
            with pytest.raises(Exception, match="restricted"):
                client.get_system_shared_memory_status(headers=header)
    assert_still_serves(server, runner)


@pytest.mark.slow
def test_past_the_queue_bound_requests_are_refused_at_once_with_503(server):
    pixels = images(1, seed=9)
    with tritonclient_http.InferenceServerClient(f"localhost:{server.http}", concurrency=64) as client:
        pending = [client.async_infer(server.name, inputs(pixels)) for _ in range(64)]
        outcomes = []
        for request in pending:
            try:
                request.get_result()
                outcomes.append("ok")
            except Exception as err:
                outcomes.append(f"{err.status()} {err.message()}")
    refused = [o for o in outcomes if o != "ok"]
    assert refused and all(o.startswith("503") and "Exceeds maximum queue size" in o for o in refused), refused
    assert outcomes.count("ok") >= QUEUE_SIZE


@pytest.mark.slow
def test_refused_requests_count_as_failures_in_the_metrics(server):
    from ats_deploy.serving.python_model import FAILURE, SUCCESS

    before = server.metric(SUCCESS), server.metric(FAILURE, reason="invalid_argument")
    good, bad = images(1, seed=11), np.zeros((1, STAGES), np.float32)
    with server.client() as client:
        for _ in range(3):
            client.infer(server.name, inputs(good))
        for _ in range(2):
            with pytest.raises(Exception, match=r"keep value 0\.0 is invalid"):
                client.infer(server.name, inputs(good, bad))
    after = server.metric(SUCCESS), server.metric(FAILURE, reason="invalid_argument")
    assert (after[0] - before[0], after[1] - before[1]) == (3, 2)


@pytest.mark.slow
def test_a_request_without_images_or_with_nan_pixels_is_refused_naming_why(server, runner):
    keep_only = tritonclient_http.InferInput("keep", [1, STAGES], "FP32")
    keep_only.set_data_from_numpy(np.full((1, STAGES), 0.7, np.float32))
    with server.client() as client:
        with pytest.raises(Exception) as caught:
            client.infer(server.name, [keep_only])
        assert caught.value.status() == "400"
        assert "no input 'images'" in caught.value.message() and ".py" not in caught.value.message()
        for value in (np.nan, np.inf):
            pixels = images(2, seed=12)
            pixels[1, 0, 5, 5] = value
            with pytest.raises(Exception) as caught:
                client.infer(server.name, inputs(pixels))
            assert caught.value.status() == "400" and "NaN or infinite" in caught.value.message()
    assert_still_serves(server, runner)


@pytest.mark.slow
def test_the_log_has_no_gpu_lines_on_a_cpu_profile(server):
    from ats_deploy.serving.server import GPU_NOISE

    printed = server.output()
    assert not [line for line in printed.splitlines() if any(noise in line for noise in GPU_NOISE)]
    assert "serving" in printed


# --------------------------------------------------------------------------- faults: each its own server


@pytest.mark.slow
def test_a_killed_model_instance_makes_it_unready_then_it_serves_again(tiny_ats_onnx, tmp_path, runner):
    """Triton 2.51 neither restarts a dead stub nor reports the model unready; serve does both. Then a stop that
    cannot finish (a stopped stub holding a request) exits non-zero, leaving nothing behind."""
    server = start_server(tiny_ats_onnx, tmp_path)
    try:
        (stub,) = server.pids("triton_python")
        os.kill(stub, signal.SIGKILL)
        assert wait_for(lambda: not server.ready(), 10), "still ready with its model instance dead"
        assert wait_for(server.ready, START_TIMEOUT_S), plain(server.output())[-2000:]
        assert "a model instance died" in plain(server.output())
        assert_still_serves(server, runner)
        (stub,) = server.pids("triton_python")
        os.kill(stub, signal.SIGSTOP)  # a model that hangs: the request below never finishes
        client = server.client()
        client.async_infer(server.name, inputs(images(1, seed=13)))
        time.sleep(0.5)
        below = server.processes()
        assert server.stop() == 1
        client.close()
        assert "did not stop cleanly" in plain(server.output())
        assert wait_for(lambda: not any(running(pid) for pid in below), 10)
        assert not server.leftovers()
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.mark.slow
def test_a_killed_triton_takes_its_stub_and_shared_memory_and_serve_exits_non_zero(tiny_ats_onnx, tmp_path):
    server = start_server(tiny_ats_onnx, tmp_path)
    try:
        (triton,) = server.pids("tritonserver")
        stubs = server.pids("triton_python")
        assert stubs and [p for p in server.leftovers() if p.parent == Path("/dev/shm")]
        os.kill(triton, signal.SIGKILL)
        assert server.process.wait(timeout=30) == 1
        assert "Triton Inference Server stopped unexpectedly (signal SIGKILL)" in plain(server.output())
        assert not any(running(pid) for pid in stubs)
        assert not server.leftovers()
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.mark.slow
def test_with_host_0000_it_listens_everywhere_and_a_killed_serve_leaves_nothing(tiny_ats_onnx, tmp_path):
    address = outside_address()
    server = start_server(tiny_ats_onnx, tmp_path, "--host", "0.0.0.0")
    try:
        if address is not None:
            assert all(accepts(address, port) for port in (server.http, server.grpc, server.metrics))
        assert "every interface (0.0.0.0)" in plain(server.output())
        below = server.processes()
        assert {comm_of(pid)[:12] for pid in below} >= {"tritonserver", "triton_pytho"}
        server.process.kill()  # SIGKILL: serve runs no code of its own any more
        server.process.wait()
        assert wait_for(lambda: not any(running(pid) for pid in below), 10), "processes outlived serve"
        assert wait_for(lambda: not server.leftovers(), 10), server.leftovers()
        for port in (server.http, server.grpc, server.metrics):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("0.0.0.0", port))  # free again
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_the_start_up_sweep_removes_only_what_dead_runs_left(tmp_path):
    from ats_deploy.serving.watchdog import PREFIX, sweep

    dead = subprocess.Popen(["true"])
    dead.wait()
    temp, shm = tmp_path / "tmp", tmp_path / "shm"
    temp.mkdir()
    shm.mkdir()
    left = [temp / f"{PREFIX}{dead.pid}-abc", shm / f"{PREFIX}{dead.pid}-abc-segment"]
    alive = [temp / f"{PREFIX}{os.getppid()}-def", shm / f"{PREFIX}{os.getppid()}-def-segment", temp / "other"]
    for path in (left[0], alive[0], alive[2]):
        path.mkdir()
    for path in (left[1], alive[1]):
        path.write_bytes(b"x")
    assert sorted(sweep(temp, shm)) == sorted(left)
    assert all(path.exists() for path in alive) and not any(path.exists() for path in left)


def test_the_banner_says_int8_for_an_int8_file(tiny_ats_onnx):
    import dataclasses
    import io

    from rich.console import Console

    from ats_deploy.serving.server import Ports, _banner, plan

    checked = plan(tiny_ats_onnx, "cpu", Ports(*free_ports(3)))
    int8 = dataclasses.replace(checked.source, artifact=dataclasses.replace(checked.source.artifact, precision="int8"))
    for served, expected in ((checked, "onnxruntime CPU, fp32"), (dataclasses.replace(checked, source=int8),
                                                                  "onnxruntime CPU, int8")):
        console = Console(file=io.StringIO(), width=200)
        _banner(served, console)
        assert expected in console.file.getvalue()


def test_serve_writes_the_python_backends_config_for_the_file(tiny_ats_onnx, tmp_path):
    """What ``serve`` writes is the Python backend's config (:data:`repository.PYTHON`), with the instances' settings
    (the file, the profile's keep, the version folder) in its parameter: nothing of the native config left over."""
    from ats_deploy.profiles import load_profile
    from ats_deploy.serving import repository
    from ats_deploy.serving.python_model import PARAMETER, Settings
    from ats_deploy.serving.server import Ports, plan, write_repository

    checked = plan(tiny_ats_onnx, "cpu", Ports(*free_ports(3)))
    write_repository(checked, tmp_path)
    written = repository.read_config(tmp_path / checked.name)
    settings = Settings(**json.loads(written.parameters[PARAMETER].string_value))
    assert settings.model == str(tiny_ats_onnx.resolve()) and settings.keep == [0.6] * STAGES
    assert settings.workdir == str(tmp_path / checked.name / repository.VERSION) and settings.threads == 4
    del written.parameters[PARAMETER]
    expected = repository.build_config(checked.source, load_profile("cpu"), checked.name, repository.PYTHON)
    assert written == expected and written.backend == "python" and not written.platform
    assert {t.name: t.optional for t in written.input} == {"images": False, "keep": True}
    assert sorted(written.parameters) == sorted(checked.source.artifact.to_metadata())  # no intra_op_thread_count


def test_the_guard_refuses_what_triton_cannot_parse_safely():
    from ats_deploy.serving.guard import MAX_BODY, Refused, checked, inflate

    checked(json.dumps({"inputs": [{"name": "images", "shape": [2, 3, 224, 224], "datatype": "FP32"}]}).encode(), 0)
    for shape in ([10**9, 3, 224, 224], [-1, 3], "3", [2.5]):
        with pytest.raises(Refused) as caught:
            checked(json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32"}]}).encode(), 0)
        assert caught.value.status == 400 and "input 'x'" in caught.value.message
    for unparsable in (b"[" * 100_000, b'{"inputs": []', b'{"inputs": []} {}', b'{["inputs"]: []}', b"\xff"):
        with pytest.raises(Refused, match="cannot be parsed"):
            checked(unparsable, 0)
    with pytest.raises(Refused, match="repeats the key 'parameters'"):  # which one would Triton read?
        checked(b'{"parameters": {}, "inputs": [], "parameters": {"ats_received_ns": 1}}', 0)
    # Python keeps the last of two keys, Triton reads the first: a huge shape first would pass a check of the last
    with pytest.raises(Refused, match="repeats the key 'shape'"):
        checked(b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1000000000, 3, 224, 224], '
                b'"shape": [1, 3, 224, 224], "data": [0]}]}', 0)
    with pytest.raises(Refused, match="repeats the key 'a'"):
        checked(b'[{"a": 1, "a": 2}]', 0)
    assert inflate(gzip.compress(b"abc"), "gzip") == b"abc"
    with pytest.raises(Refused) as caught:
        inflate(gzip.compress(b"\0" * (MAX_BODY + 1)), "gzip")
    assert caught.value.status == 413
    with pytest.raises(Refused) as caught:
        inflate(b"abc", "br")
    assert caught.value.status == 415


@pytest.fixture
def stamping_guard() -> Iterator[tuple[int, list]]:
    """A guard in front of a stand-in for Triton that keeps each request it is passed: (guard port, requests)."""
    import http.server
    import threading

    from ats_deploy.serving.guard import Guard

    passed: list[tuple[dict[str, str], bytes]] = []

    class Upstream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # http.server's name
            passed.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    guard = Guard("127.0.0.1", free_ports(1)[0], upstream.server_address[1], "deit")
    guard.ready.set()
    guard.start()
    try:
        yield guard.port, passed
    finally:
        guard.close()
        upstream.shutdown()
        upstream.server_close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_the_guard_stamps_when_it_received_a_request_over_what_the_client_sent(stamping_guard, binary, encoding):
    from ats_deploy.serving.front_model import RECEIVED

    port, passed = stamping_guard
    pixels = images(1, seed=3)
    sent = tritonclient_http.InferInput("images", list(pixels.shape), "FP32")
    sent.set_data_from_numpy(pixels, binary_data=binary)
    asked = [tritonclient_http.InferRequestedOutput("logits", binary_data=binary)]
    # a forged arrival (beside the client's binary_data_output), and a request without "parameters" at all
    for parameters, outputs in (({RECEIVED: 1}, None), (None, asked)):
        body, json_size = tritonclient_http.InferenceServerClient.generate_request_body(
            [sent], outputs, parameters=parameters)
        headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
        if encoding:
            body, headers["Content-Encoding"] = gzip.compress(body), encoding
        before = time.monotonic_ns()
        assert post(SimpleNamespace(http=port), "/v2/models/deit/infer", body, headers)[0] == 200
        after = time.monotonic_ns()
        forwarded, data = passed.pop()
        length = forwarded.get("Inference-Header-Content-Length")
        assert (length is None) == (not binary)
        request = json.loads(data if length is None else data[: int(length)])
        assert before <= request["parameters"][RECEIVED] <= after
        if binary:
            assert np.array_equal(np.frombuffer(data[int(length):], np.float32).reshape(pixels.shape), pixels)
        else:
            assert np.array_equal(np.asarray(request["inputs"][0]["data"], np.float32).reshape(pixels.shape), pixels)
        assert request["parameters"].get("binary_data_output") is (True if outputs is None else None)  # kept as sent


def _raw(port: int, data: bytes) -> bytes:
    """What the guard answers to the bytes ``data`` sent as they are (b"" when it closes without an answer)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        (b"Content-Length: \xb2", b"", b"413"),  # a digit that int() refuses
        (b"Content-Length: 2\r\nInference-Header-Content-Length: \xb2", b"{}", b"400"),
        (b"Transfer-Encoding: chunked", b"-5\r\nabc", b"400"),
    ],
    ids=["content-length", "inference-header-length", "negative-chunk"],
)
def test_the_guard_answers_malformed_lengths_and_keeps_serving(stamping_guard, headers, body, status):
    port, passed = stamping_guard
    head = b"POST /v2/models/deit/infer HTTP/1.1\r\nConnection: close\r\n"
    assert _raw(port, head + headers + b"\r\n\r\n" + body).startswith(b"HTTP/1.1 " + status)
    good = b'{"inputs": []}'
    answer = _raw(port, head + b"Content-Length: " + str(len(good)).encode() + b"\r\n\r\n" + good)
    assert answer.startswith(b"HTTP/1.1 200") and len(passed) == 1


def test_a_client_that_stalls_in_its_body_gets_408(stamping_guard, monkeypatch):
    from ats_deploy.serving import guard

    monkeypatch.setattr(guard, "READ_TIMEOUT", 0.5)
    port, passed = stamping_guard
    answer = _raw(port, b"POST /v2/models/deit/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer and not passed


def test_the_guard_rewrites_only_the_parameters_of_a_json_request():
    """A JSON body of pixels is not serialized again (that costs more than parsing it): its bytes stay as sent."""
    from ats_deploy.serving.guard import checked

    pixels = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.50, -0.0]}]'
    forged = b' ' + pixels + b', "parameters" : {"ats_received_ns": 1, "x": "y"}}\n'
    assert b"".join(checked(forged, 5)) == b' ' + pixels + b', "parameters" : {"ats_received_ns":5,"x":"y"}}\n'
    assert b"".join(checked(pixels + b"}", 5)) == b'{"parameters":{"ats_received_ns":5},' + pixels[1:] + b"}"
    accented = '{"id": "é", "parameters": {}}'.encode()  # offsets in bytes, not characters
    assert b"".join(checked(accented, 5)) == '{"id": "é", "parameters": {"ats_received_ns":5}}'.encode()
