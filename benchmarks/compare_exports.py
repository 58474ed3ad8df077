"""Two exports of the same model, timed interleaved in onnxruntime CPU: medians and paired ratios.

Made to price a change of the exported graph (interface version 1 against 2: ``keep [S]``
against ``keep [batch, S]``), so each file is fed ``keep`` in the rank its own ``keep`` input
has. Export the older file with the older checkout, then:

    .venv/bin/python benchmarks/compare_exports.py old.onnx new.onnx --keep 1.0 --keep 0.5 --batch 1 --batch 8

Each round runs every file once on the same random images (spinning threads off, so the
sessions do not steal each other's cores); the ratio is taken round by round, then its median.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ats_deploy.backends.onnxruntime.session import session


def feeds(sess, images: np.ndarray, keep: float) -> dict[str, np.ndarray]:
    """The inputs of one call: ``keep`` as ``[S]`` or ``[batch, S]``, whichever the file's input is."""
    inputs = {i.name: i for i in sess.get_inputs()}
    shape = inputs["keep"].shape
    stages = shape[-1]
    rows = (stages,) if len(shape) == 1 else (len(images), stages)
    return {"images": images, "keep": np.full(rows, keep, np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs=2)
    parser.add_argument("--keep", type=float, action="append")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    sessions = [session(str(path), args.threads) for path in args.files]
    table = Table(title=f"onnxruntime CPU, {args.threads} threads, {args.rounds} interleaved rounds")
    for column in ("batch", "keep", f"{args.files[0].name} ms", f"{args.files[1].name} ms", "second / first"):
        table.add_column(column, justify="right")
    rng = np.random.default_rng(0)
    for batch in args.batch or [1, 8]:
        images = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for keep in args.keep or [1.0, 0.5]:
            inputs = [feeds(sess, images, keep) for sess in sessions]
            times: list[list[float]] = [[], []]
            for round_ in range(args.warmup + args.rounds):
                for i, (sess, feed) in enumerate(zip(sessions, inputs, strict=True)):
                    start = time.perf_counter()
                    sess.run(None, feed)
                    if round_ >= args.warmup:
                        times[i].append((time.perf_counter() - start) * 1e3)
            first, second = (np.array(t) for t in times)
            table.add_row(str(batch), f"{keep:g}", f"{np.median(first):.2f}", f"{np.median(second):.2f}",
                          f"{np.median(second / first):.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
