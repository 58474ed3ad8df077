"""What serving costs: an export's in-process latency at batch 1, against ``ats-deploy loadtest`` at concurrency 1.

Opens the file as ``ats-deploy serve``'s model instances do (the backend registry's runner, with a profile's
backend, precision and threads) and runs it one image at a time, back to back, for ``--duration`` seconds after
a warm-up: the images of ``--data`` pre-processed as the export's metadata says, request ``i`` with the image
and the keep that the load test's request ``i`` carries (the same seeded mix). The served p50 over this p50 is
what HTTP, Triton's scheduler and the Python backend add.

    .venv/bin/python benchmarks/serving_overhead.py deit_t.onnx --profile cpu --data DIR --keep 0.5,0.7,1.0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ats_deploy import backends
from ats_deploy.artifact import read
from ats_deploy.exporters import prepare
from ats_deploy.keep import Keep, keep_rows
from ats_deploy.profiles import load_profile
from ats_deploy.serving.loadtest.plan import Mix

WARMUP_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--profile", default="cpu", help="backend, precision and threads, as `ats-deploy serve`")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--keep", default="0.5,0.7,1.0", help="the load test's --keep (':' between stage values)")
    parser.add_argument("--images", type=int, default=None, help="at most N images of --data")
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()

    from ats_deploy.data import Skipped, folder_batches, image_folder

    artifact = read(args.model)
    profile = load_profile(args.profile)
    folder = image_folder(args.data, artifact.num_classes, limit=args.images)
    pixels = torch.cat([b.images for b in folder_batches(folder, artifact.data_config, 32, Skipped())])
    keeps = Keep.parse_mix(args.keep)
    mix = Mix(tuple(tuple(k.per_stage(len(artifact.stages))) for k in keeps), tuple(k.mix_label for k in keeps))
    backend = backends.get(profile.backend)
    with tempfile.TemporaryDirectory() as workdir:
        options = backends.RunOptions(backend.precision(profile.precision), profile.threads)
        runner = prepare.open_runner(backend, args.model, options, Path(workdir))
        samples = _run(runner, pixels, mix, args.duration)
    title = f"{args.model} in process: {runner.label}, {profile.threads} threads, batch 1, keep {args.keep}"
    table = Table(title=title)
    for column in ("calls", "p50 ms", "p90 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right")
    table.add_row(str(len(samples)), *(f"{np.percentile(samples, q):.2f}" for q in (50, 90, 99)),
                  f"{np.mean(samples):.2f}")
    Console().print(table)


def _run(runner: backends.Runner, pixels: torch.Tensor, mix: Mix, duration: float) -> list[float]:
    """Milliseconds per call, call ``i`` on image ``i`` (cycling) with the mix's keep of request ``i``."""
    samples: list[float] = []
    start = time.perf_counter()
    index = 0
    while time.perf_counter() - start < WARMUP_S + duration:
        image = pixels[index % len(pixels)][None]
        keep = torch.tensor(keep_rows(mix.rows[mix.pick(index)], 1))
        began = time.perf_counter()
        runner(image, keep)
        if began - start >= WARMUP_S:
            samples.append((time.perf_counter() - began) * 1e3)
        index += 1
    return samples


if __name__ == "__main__":
    main()
