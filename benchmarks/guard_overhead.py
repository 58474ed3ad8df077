"""What ``serve``'s HTTP guard costs: the same requests through it and straight to Triton's own port, interleaved.

Starts ``ats-deploy serve MODEL --profile P`` on free loopback ports, reads Triton's private HTTP port from its
command line, and sends ``--rounds`` rounds of one request each way (binary tensors, batch 1, concurrency 1,
the order alternating per round), after a warm-up. Prints each path's p50/p90 and the median of the paired
per-round differences (guard minus direct), which cancels the drift a shared machine adds.

    .venv/bin/python benchmarks/guard_overhead.py deit_t.onnx --profile cpu --rounds 300
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http
from rich.console import Console
from rich.table import Table

from ats_deploy.serving.repository import default_name

sys.path.insert(0, str(Path(__file__).parent))
from soak import comm, free_ports, ready, tree  # the soak's process helpers

WARMUP = 20


def triton_http_port(serve: subprocess.Popen) -> int:
    """Triton's own HTTP port, from its command line (``--http-port=N``)."""
    for pid in tree(serve.pid):
        if comm(pid) == "tritonserver":
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            return int(next(a for a in arguments if a.startswith("--http-port=")).split("=", 1)[1])
    raise SystemExit("no tritonserver below serve")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()

    ports = free_ports(3)
    log = Path(tempfile.mkdtemp(prefix="guard-")) / "serve.log"
    command = [str(Path(sys.executable).parent / "ats-deploy"), "serve", str(args.model), "--profile", args.profile,
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    with log.open("wb") as out:
        serve = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not ready(f"127.0.0.1:{ports[0]}"):
            if serve.poll() is not None:
                raise SystemExit(log.read_text()[-2000:])
            time.sleep(0.5)
        paths = {"guard": ports[0], "direct": triton_http_port(serve)}
        samples = measure(paths, default_name(args.model), args.rounds)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    table = Table(title=f"{args.model.name}, profile {args.profile}: batch 1, concurrency 1, {args.rounds} rounds")
    for column in ("path", "p50 ms", "p90 ms"):
        table.add_column(column, justify="right")
    for name, values in samples.items():
        table.add_row(name, *(f"{np.percentile(values, q):.2f}" for q in (50, 90)))
    Console().print(table)
    difference = np.array(samples["guard"]) - np.array(samples["direct"])
    Console().print(f"guard - direct, median of paired rounds: {np.median(difference):.2f} ms "
                    f"(p50 ratio {np.percentile(samples['guard'], 50) / np.percentile(samples['direct'], 50):.3f})")


def measure(paths: dict[str, int], name: str, rounds: int) -> dict[str, list[float]]:
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    clients = {path: triton_http.InferenceServerClient(f"127.0.0.1:{port}") for path, port in paths.items()}
    samples: dict[str, list[float]] = {path: [] for path in paths}
    try:
        for round_ in range(WARMUP + rounds):
            order = list(paths) if round_ % 2 else list(reversed(paths))
            for path in order:
                image = triton_http.InferInput("images", list(pixels.shape), "FP32")
                image.set_data_from_numpy(pixels)
                start = time.perf_counter()
                clients[path].infer(name, [image])
                if round_ >= WARMUP:
                    samples[path].append((time.perf_counter() - start) * 1e3)
    finally:
        for client in clients.values():
            client.close()
    return samples


if __name__ == "__main__":
    main()
