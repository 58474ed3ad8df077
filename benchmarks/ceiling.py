"""How close the exported ATS graph comes to the speed its token counts allow.

A research benchmark, not part of the installed package: from the repository root,
``python benchmarks/ceiling.py --iterations 100`` (it imports the installed ``ats_deploy``).
It exports DeiT-S (random weights: speed does not depend on them) three ways and times
them in onnxruntime on the CPU:

* dense: no token sampling;
* ATS: the ``--dynamic`` export, one file for every ``keep``;
* ceiling: a static model that processes exactly the per-block token counts the
  ATS run produced, by truncation, with no scoring, sampling or compaction (and,
  like both others, only the class token's row in the last block).

For each target cost (GFLOPs per image) it picks ``keep`` by bisection, then
reports the speedups over dense and ``efficiency = ATS speedup / ceiling
speedup = ceiling time / ATS time``: what remains of the ideal after the overhead
of sampling. Variants are interleaved and the ratios taken round by round
(:func:`~ats_deploy.bench.timing.paired_ratio`, median over rounds), so that the
machine's drift cancels; the JSON also keeps ``efficiency_of_medians``, the
ratio of the two medians. Sessions never spin idle threads. Figures and how to read
them: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ats_deploy.backends.onnxruntime.session import session
from ats_deploy.bench.timing import interleaved, paired_ratio
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.flops import CostModel
from ats_deploy.images import data_config, preprocess, random_images, sample_images
from ats_deploy.model import ATSVisionTransformer, build, class_only_block, dense_block


class Ceiling(nn.Module):
    """The ATS model with sampling replaced by truncation to fixed per-stage lengths."""

    def __init__(self, model: ATSVisionTransformer, lengths: list[int]) -> None:
        super().__init__()
        self.model = model
        self.lengths = lengths

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.model.vit
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        batch = x
        family = self.model.family  # its head and last block, as in the ATS model
        last = class_only_block(vit, family)
        for i, block in enumerate(vit.blocks):
            if i == last:
                rows = 1
            elif i in self.model.stages:  # the stage's output tokens, by truncation
                rows = self.lengths[self.model.stages.index(i)]
            else:
                rows = None
            x = dense_block(block, x, None, batch, rows=rows)
        return family.head(vit, vit.norm(x), None)


def export_ceiling(model: ATSVisionTransformer, lengths: list[int], batch: int, path: Path) -> Path:
    images = torch.randn(batch, *model.input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Ceiling(model, lengths).eval(), (images,), str(path), dynamo=False,
                          input_names=["images"], output_names=["logits"], opset_version=18)
    return path


WARMUP = 3


def keep_for_gflops(sess, images: np.ndarray, cost: CostModel, target: float, stages: int) -> float:
    """Bisection on one keep fraction for all stages: mean GFLOPs per image ~ target."""
    lo, hi = 0.02, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        tokens = sess.run(["tokens"], {"images": images, "keep": np.full((len(images), stages), mid, np.float32)})[0]
        if float(cost.gflops(torch.from_numpy(tokens)).mean()) > target:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--gflops", type=float, nargs="+", default=[3.0, 2.2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    console = Console()
    torch.manual_seed(0)
    model = build(timm.create_model(args.arch, pretrained=False).eval(), args.arch)
    cost = CostModel.of(model)
    cfg = data_config(model.vit)
    photos = preprocess(list(sample_images().values()), cfg)
    pool = torch.cat([photos, random_images(max(args.batches), cfg)]).numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        export(model, tmp / "ats.onnx", ExportOptions(dynamic=True))
        export_s = time.perf_counter() - start
        onnx_ops = len(onnx.load(str(tmp / "ats.onnx")).graph.node)
        export(build(model.vit, args.arch, stages=[]), tmp / "dense.onnx", ExportOptions(dynamic=True))
        ats_s, dense_s = session(str(tmp / "ats.onnx"), args.threads), session(str(tmp / "dense.onnx"), args.threads)
        for target in args.gflops:
            keep = keep_for_gflops(ats_s, pool[: max(args.batches)], cost, target, len(model.stages))
            for batch in args.batches:
                images = pool[:batch]
                keep_in = np.full((batch, len(model.stages)), keep, np.float32)
                tokens = ats_s.run(["tokens"], {"images": images, "keep": keep_in})[0]
                lengths = [int(t) + 1 for t in tokens.max(axis=0)]
                ceiling_s = session(str(export_ceiling(model, lengths, batch, tmp / "ceiling.onnx")), args.threads)
                latency = interleaved(
                    {
                        "dense": lambda _, images=images: dense_s.run(None, {"images": images}),
                        "ats": lambda _, images=images, k=keep_in: ats_s.run(None, {"images": images, "keep": k}),
                        "ceiling": lambda _, images=images, s=ceiling_s: s.run(None, {"images": images}),
                    },
                    batch,
                    WARMUP,
                    args.iterations,
                )
                ms = {name: result.p50 for name, result in latency.items()}
                speedup_ats = paired_ratio(latency["dense"], latency["ats"])
                speedup_ceiling = paired_ratio(latency["dense"], latency["ceiling"])
                rows.append({
                    "target_gflops": target, "keep": round(keep, 4), "batch": batch,
                    "gflops": round(float(cost.gflops(torch.from_numpy(tokens)).mean()), 3),
                    "dense_ms": round(ms["dense"], 2), "ats_ms": round(ms["ats"], 2),
                    "ceiling_ms": round(ms["ceiling"], 2), "speedup_ats": round(speedup_ats, 3),
                    "speedup_ceiling": round(speedup_ceiling, 3),
                    "efficiency": round(paired_ratio(latency["ceiling"], latency["ats"]), 3),
                    "efficiency_of_medians": round(ms["ceiling"] / ms["ats"], 3),
                })
                console.print(rows[-1])
    render(rows, args, export_s, console)
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "threads": args.threads, "export_s": export_s,
                                         "onnx_ops": onnx_ops, "rows": rows}, indent=2))


def render(rows: list[dict], args: argparse.Namespace, export_s: float, console: Console) -> None:
    table = Table(title=f"{args.arch}, onnxruntime CPU, {args.threads} threads, medians of {args.iterations}")
    for column in ("GFLOPs", "keep", "batch", "dense ms", "ATS ms", "ceiling ms", "ATS speedup",
                   "ceiling speedup", "efficiency"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['gflops']:.2f}", f"{r['keep']:.3f}", str(r["batch"]), f"{r['dense_ms']:.1f}",
                      f"{r['ats_ms']:.1f}", f"{r['ceiling_ms']:.1f}", f"{r['speedup_ats']:.2f}x",
                      f"{r['speedup_ceiling']:.2f}x", f"{r['efficiency']:.3f}")
    console.print(table)
    console.print(f"ATS export of {args.arch} (torchscript exporter, without validation): {export_s:.1f} s")


if __name__ == "__main__":
    main()
