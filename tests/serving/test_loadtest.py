"""``ats-deploy loadtest`` against ``ats-deploy serve`` (Triton, started by PyTriton) serving the tiny export.

The server runs the ``random:0`` DeiT-Tiny export with the cpu profile on one thread; its model config carries
the export's metadata, which the load test reads for the pre-processing and ``--verify``. The labelled folder
holds the scikit-image photos under the wnid of the class the model predicts at keep 1.0, so
the top-1 the load test reports at keep 1.0 is known: every answer is right.
"""

from __future__ import annotations

import csv
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import invoke, plain

from ats_deploy.ats import budget_int
from ats_deploy.errors import UserError
from ats_deploy.serving.loadtest.plan import Request
from ats_deploy.serving.loadtest.run import loadtest

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_ats_onnx, tmp_path_factory) -> Iterator[dict[str, str]]:
    """``ats-deploy serve`` of the tiny export (profile cpu, one thread) on free ports: the URL of each protocol."""
    import dataclasses

    from ats_deploy.profiles import dump_profile, load_profile
    from ats_deploy.serving.triton_client import Client, Endpoint

    folder = tmp_path_factory.mktemp("serve")
    profile = folder / "cpu-one-thread.yaml"
    dump_profile(dataclasses.replace(load_profile("cpu"), threads=1), profile, ["cpu with one thread, for tests"])
    http, grpc, metrics = (_free_port() for _ in range(3))
    log = folder / "serve.log"
    command = [sys.executable, "-c", "from ats_deploy.cli import main; main()", "serve", str(tiny_ats_onnx),
               "--profile", str(profile), "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics)]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(Client(Endpoint.parse(f"localhost:{http}"), 1.0), tiny_ats_onnx.stem):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ats-deploy serve did not start; its log ends:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"http": f"localhost:{http}", "grpc": f"grpc://localhost:{grpc}", "name": tiny_ats_onnx.stem}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def _ready(client, name: str) -> bool:
    try:
        with client:
            return client.ready(name)
    except Exception:  # not listening yet
        return False


@pytest.fixture(scope="module")
def labelled(tiny_ats_onnx, tmp_path_factory) -> Path:
    """The 4 photos in wnid folders, each under the class the model predicts for it at keep 1.0."""
    from timm.data import ImageNetInfo

    from ats_deploy.artifact import read
    from ats_deploy.backends.onnxruntime.session import session
    from ats_deploy.images import load_image, preprocess, sample_images

    root = tmp_path_factory.mktemp("labelled")
    flat = tmp_path_factory.mktemp("photos")
    for name, image in sample_images().items():
        image.save(flat / f"{name}.png")
    files = sorted(flat.iterdir())
    pixels = preprocess([load_image(f) for f in files], read(tiny_ats_onnx).data_config).numpy()
    keep = np.ones((len(files), 9), np.float32)
    predicted = session(tiny_ats_onnx).run(["logits"], {"images": pixels, "keep": keep})[0].argmax(-1)
    wnids = ImageNetInfo().label_names()
    for file, label in zip(files, predicted, strict=True):
        folder = root / wnids[label]
        folder.mkdir(exist_ok=True)
        (folder / file.name).write_bytes(file.read_bytes())
    return root


@pytest.mark.slow
def test_closed_loop_reports_throughput_latency_tokens_and_top1(server, labelled, tmp_path):
    """Concurrency 1 and 2 with keep 0.5 and 1.0 mixed: every request answered, percentiles ordered, fewer tokens
    at keep 0.5 within its budget, top-1 100% at keep 1.0, the answers match the reference, files written."""
    request = Request(
        url=server["http"], data=labelled, concurrency="1,2", duration=1.5, keep="0.5,1.0",
        model_name=server["name"], verify=6, output=tmp_path / "out",
    )
    from rich.console import Console

    result, files = loadtest(request, Console(stderr=True))
    assert [s.level.label for s in result.levels] == ["concurrency 1", "concurrency 2"]
    for s in result.levels:
        assert s.requests == s.ok > 2 and s.errors == s.timeouts == 0
        assert 0 < s.latency_ms["p50"] <= s.latency_ms["p90"] <= s.latency_ms["p99"]
        assert s.requests_per_s == pytest.approx(s.ok / s.wall_s)
        half, full = s.per_keep
        assert (half.label, full.label) == ("0.5", "1")
        assert half.requests + full.requests == s.ok and half.requests and full.requests
        budget = budget_int(0.5, 197) - 1  # K counts the class token; tokens count patches (spec section 1)
        assert max(half.mean_tokens) <= budget and (np.array(half.mean_tokens) < np.array(full.mean_tokens)).all()
        share = half.requests / s.ok
        mixed = share * np.array(half.mean_tokens) + (1 - share) * np.array(full.mean_tokens)
        assert s.mean_tokens == pytest.approx(mixed.tolist())
        assert full.accuracy == 1.0  # the labels are the model's own predictions at keep 1.0
        assert s.distinct_images == 4 and s.accuracy_se == pytest.approx(np.sqrt(s.accuracy * (1 - s.accuracy) / 4))
    assert result.target["preprocessing_from"] == f"the config of model '{server['name']}' at http://{server['http']}"
    verification = result.verification  # against the checkpoint the config names: random:0
    assert verification.ok and verification.answers == 6 and verification.compared == 6

    assert [f.name for f in files] == ["results.json", "results.csv", "latency_vs_throughput.png"]
    data = json.loads(files[0].read_text())
    assert [level["requests"] for level in data["levels"]] == [s.requests for s in result.levels]
    assert data["data"]["labelled"] and data["verification"]["ok"]
    rows = list(csv.DictReader(files[1].open()))
    assert [float(r["p99_ms"]) for r in rows] == pytest.approx([s.latency_ms["p99"] for s in result.levels], abs=1e-3)
    assert files[2].read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_open_loop_overload_shows_as_growing_latency(server, labelled, tmp_path):
    """Poisson arrivals far above what the server answers: latency from the scheduled arrival grows with the queue."""
    from rich.console import Console

    request = Request(url=server["http"], data=labelled, rate="3,400", duration=1.5, timeout=1.0,
                      model_name=server["name"], output=tmp_path / "out")
    result, _ = loadtest(request, Console(stderr=True))
    low, high = result.levels
    assert low.errors == high.errors == 0 and low.timeouts == 0
    assert high.timeouts > 0  # arrivals that waited past --timeout: the server answers far fewer than 400/s
    assert high.latency_ms["p99"] > 3 * low.latency_ms["p99"]
    assert result.keep_mix == ["server default (0.6)"]  # no --keep: the profile's keep, as the config says


@pytest.mark.slow
def test_verify_fails_against_another_model_over_grpc(server, labelled, tiny_ats_onnx, tmp_path):
    """The random:0 export served, random:1 as the reference: mismatches named, exit 1 (gRPC; --model names it)."""
    out = tmp_path / "out"
    result = invoke(
        "loadtest", server["grpc"], "--data", labelled, "--model", tiny_ats_onnx, "--concurrency", "1",
        "--duration", "0.5", "--keep", "0.7", "--verify", "2", "--checkpoint", "random:1", "--output", out,
    )
    text = plain(result.output)
    assert result.exit_code == 1, text
    assert "mismatch" in text and "disagrees with the PyTorch reference" in text
    assert json.loads((out / "results.json").read_text())["verification"]["ok"] is False


@pytest.mark.slow
def test_refusals_name_the_fix(server, labelled, tmp_path):
    """Unreachable server, unknown model, bad levels, keep and data: one UserError each, naming the fix."""
    from rich.console import Console

    console = Console(stderr=True)
    base = {"url": server["http"], "data": labelled, "output": tmp_path / "out", "duration": 0.2,
            "model_name": server["name"]}
    cases = [
        ({"url": f"localhost:{_free_port()}"}, "ats-deploy serve MODEL --profile cpu"),
        ({"url": "ftp://localhost:1"}, "http:// or grpc://"),
        ({"model_name": "nope"}, "model 'nope' is not ready"),
        # no --model-name: `serve` lists its one model (its index is open), so the load test finds it
        ({"batch": 9}, "batches of 1 to 8 images"),
        ({"concurrency": "0,4"}, "--concurrency"),
        ({"concurrency": "two"}, "--concurrency"),
        ({"rate": "-5"}, "--rate"),
        ({"keep": "0.5,x"}, "cannot read --keep"),
        ({"keep": "0.9:0.8"}, "9 ATS stages"),
        ({"data": tmp_path / "missing"}, "does not exist"),
        ({"data": tmp_path}, "is empty"),
    ]
    for change, expected in cases:
        with pytest.raises(UserError) as caught:
            loadtest(Request(**{**base, **change}), console)
        assert expected in str(caught.value), (change, str(caught.value))
    assert not (tmp_path / "out").exists()


def test_urls_keep_mix_and_arrivals():
    """The protocol from the URL, per-stage keeps with ':', and Poisson arrivals at the asked rate."""
    from ats_deploy.serving.loadtest.drive import arrivals
    from ats_deploy.serving.loadtest.plan import parse_mix
    from ats_deploy.serving.triton_client import Endpoint, ServedModel

    assert Endpoint.parse("localhost:8000") == Endpoint("http", "localhost:8000")
    assert Endpoint.parse("grpc://server") == Endpoint("grpc", "server:8001")
    assert str(Endpoint.parse("HTTP://server:9000/")) == "http://server:9000"
    served = ServedModel("m", (3, 224, 224), 3, 1000, takes_keep=True, keep_required=False, max_batch_size=8,
                         parameters={})
    mix = parse_mix("0.9:0.8:0.7,0.5", served, None)
    assert mix.rows == ((0.9, 0.8, 0.7), (0.5, 0.5, 0.5)) and mix.labels == ("0.9:0.8:0.7", "0.5")
    picks = [mix.pick(i) for i in range(400)]
    assert 150 < picks.count(0) < 250  # each request draws a keep: about half each
    assert parse_mix(None, served, [0.6] * 3).labels == ("server default (0.6)",)
    times = arrivals(50.0, 20.0)
    assert np.all(np.diff(times) > 0) and times[-1] < 20.0
    assert abs(len(times) - 1000) < 4 * np.sqrt(1000)  # a Poisson count: mean rate x duration


@pytest.mark.slow
def test_a_full_disk_prints_the_table_first_then_one_message(server, labelled, tmp_path, monkeypatch):
    import errno

    from ats_deploy.serving.loadtest import report

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write", full)
    result = invoke("loadtest", server["http"], "--data", labelled, "--concurrency", "1", "--duration", "0.3",
                    "--model-name", server["name"], "--output", tmp_path / "out")
    printed = plain(result.output)
    assert result.exit_code == 2 and "Traceback" not in printed, printed
    assert "p50 ms" in printed and "No space left on device" in printed
    assert printed.index("p50 ms") < printed.index("cannot write the results")


def test_a_dead_server_ends_the_run_after_backing_off_with_one_line_and_exit_1():
    """Senders that find no server wait, doubling, instead of failing thousands of requests a second; the run then
    fails on --max-error-rate, naming the first error."""
    from contextlib import nullcontext

    from ats_deploy.serving.loadtest import drive, plan, statistics

    class NoServer:  # what closed_loop needs of a Sender
        def client(self):
            return nullcontext()

        def __call__(self, client, index, scheduled):
            return drive.Answer(index, 0, np.array([0]), "error", 0.1, time.perf_counter(),
                                error="ConnectionRefusedError: [Errno 111] Connection refused", unreachable=True)

    answers = drive.closed_loop(NoServer(), concurrency=2, duration=0.5, tick=lambda elapsed: None)
    assert 2 <= len(answers) <= 2 * 6  # 0.05 + 0.1 + 0.2 + 0.4 s of back-off fill the 0.5 s
    images = plan.Images(np.zeros((1, 3, 2, 2)), ["a"], None, "x", [])
    level = statistics.level_stats(plan.Level("closed", 2), answers, 0.0, images,
                                   plan.Mix((None,), ("server default",)))
    result = statistics.LoadTest("now", {}, {}, [], 1, 0.5, 1.0, [level])
    with pytest.raises(statistics.TooManyErrors) as caught:
        statistics.check_errors(result, 0.01)
    assert caught.value.exit_code == 1 and "Connection refused" in caught.value.message
    assert f"{len(answers)} of {len(answers)} requests failed" in caught.value.message
    statistics.check_errors(result, 1.0)  # a threshold the run is within passes


def test_only_a_missing_server_counts_as_unreachable():
    from tritonclient.utils import InferenceServerException

    from ats_deploy.serving.triton_client import is_unreachable

    assert is_unreachable(ConnectionRefusedError(111, "Connection refused"))
    assert is_unreachable(ConnectionResetError(104, "Connection reset by peer"))
    assert not is_unreachable(TimeoutError("timed out"))
    assert not is_unreachable(InferenceServerException("Exceeds maximum queue size", status="503"))
    assert not is_unreachable(ValueError("a bad answer"))
