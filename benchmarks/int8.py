"""INT8 ATS against fp32 ATS: top-1 on held-out real images, and onnxruntime CPU latency against dense models.

Accuracy: the real DeiT-Tiny (``--weights``), calibrated on the first ``--calibration-images`` of
imagenet-sample-dev (one image per class, so the first ~100 classes) and measured on the rest.
Latency: DeiT-S with random weights (FLOPs, not accuracy, set the time), dense fp32, dense
int8-dynamic (onnxruntime's ``quantize_dynamic``) and dense int8 (the plain timm ViT exported and
quantized the same way) against ATS int8 at keep 0.5 and 0.3, the variants interleaved round by
round; medians and paired ratios. Every latency session is opened as a user's application or
Triton's onnxruntime backend opens it: onnxruntime's default options, only the thread count set.

    .venv/bin/python benchmarks/int8.py --part accuracy
    .venv/bin/python benchmarks/int8.py --part latency
    .venv/bin/python benchmarks/int8.py --part dynamic

``--part dynamic`` weighs onnxruntime's dynamic quantization (``quantize_dynamic``: int8 weights,
activation ranges computed per call, no calibration) of the same matrix products against the
calibrated QDQ export: accuracy on the real DeiT-Tiny as above.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from ats_deploy.backends.onnxruntime.session import session
from ats_deploy.checkpoints import load_model
from ats_deploy.data import image_folder
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.precisions import int8
from ats_deploy.images import data_config

WEIGHTS = Path(__file__).resolve().parents[2] / "shared/weights/deit_tiny_patch16_224_wvfunc_bittrue_reconstructed.pth"
DATA = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample-dev"
ACCURACY_KEEPS = (1.0, 0.72, 0.5)


def user_session(path: Path, threads: int) -> ort.InferenceSession:
    """The file as a user's own application opens it: onnxruntime's default options but the thread count."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pixels(files, config: dict) -> np.ndarray:
    """Every one of ``files``, preprocessed: labels are paired with them, so an unreadable one stops the run."""
    read = int8.read_images(files, config)
    if read.skipped:
        raise SystemExit(f"unreadable image {read.skipped[0][0]}: {read.skipped[0][1]}")
    return read.pixels


def predict(sess: ort.InferenceSession, images: np.ndarray, keep: float | None, stages: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), 16):
        feed = {"images": images[start : start + 16]}
        if keep is not None:
            feed["keep"] = np.full((len(feed["images"]), stages), keep, np.float32)
        out.append(sess.run(["logits"], feed)[0].argmax(-1))
    return np.concatenate(out)


def accuracy(args: argparse.Namespace, work: Path, console: Console) -> None:
    model = load_model(args.weights)
    stages, config = len(model.stages), data_config(model.vit)
    folder = image_folder(args.data, model.num_classes)
    files, labels = zip(*folder.files, strict=True)
    cut = args.calibration_images
    held = _pixels(files[cut:], config)
    truth = np.asarray(labels[cut:])
    fp32 = export(model, work / "fp32.onnx", ExportOptions(dynamic=True))
    calibration = int8.Calibration(args.data, cut, per_channel=not args.per_tensor, attention=args.attention)
    int8.quantize(fp32, work / "int8.onnx", _pixels(files[:cut], config), calibration)
    sessions = {name: session(work / f"{name}.onnx", args.threads) for name in ("fp32", "int8")}
    table = Table(title=f"DeiT-Tiny ATS, {len(truth)} held-out images, calibration {calibration}")
    for column in ("keep", "fp32 top-1 %", "int8 top-1 %", "fp32 - int8 (points)", "top-1 agreement"):
        table.add_column(column, justify="right")
    losses = []
    for keep in ACCURACY_KEEPS:
        ref, out = (predict(sessions[n], held, keep, stages) for n in ("fp32", "int8"))
        a, b = (ref == truth), (out == truth)
        paired = (a.astype(float) - b.astype(float))
        losses.append(paired.mean())
        error = 100 * paired.std(ddof=1) / np.sqrt(len(a))
        table.add_row(
            f"{keep:g}", _pct(a), _pct(b), f"{100 * paired.mean():+.1f} ± {error:.1f}",
            f"{100 * (ref == out).mean():.1f}%",
        )
    console.print(table)
    console.print(f"mean top-1 loss over keeps {ACCURACY_KEEPS}: {100 * np.mean(losses):.2f} points")


def _pct(hits: np.ndarray) -> str:
    p = hits.mean()
    return f"{100 * p:.1f} ± {100 * np.sqrt(p * (1 - p) / len(hits)):.1f}"


def latency(args: argparse.Namespace, work: Path, console: Console) -> None:
    """Dense fp32, dense int8-dynamic and dense int8 against ATS int8 at keep 0.5 and 0.3, interleaved."""
    model = load_model("random:0", arch=args.arch)
    stages, config = len(model.stages), data_config(model.vit)
    files = [path for path, _ in image_folder(args.data, model.num_classes).files][: args.calibration_images]
    calib = _pixels(files, config)
    export(model, work / "ats.onnx", ExportOptions(dynamic=True))
    dense = model.vit.eval()
    torch.onnx.export(dense, (torch.randn(2, 3, 224, 224),), str(work / "dense.onnx"), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, dynamo=False)
    calibration = int8.Calibration(args.data, len(files))
    for name in ("ats", "dense"):
        int8.quantize(work / f"{name}.onnx", work / f"{name}.int8.onnx", calib, calibration)
    quantize_dynamic(work / "dense.onnx", work / "dense.int8-dynamic.onnx")
    variants = {"dense fp32": ("dense.onnx", None), "dense int8-dynamic": ("dense.int8-dynamic.onnx", None),
                "dense int8": ("dense.int8.onnx", None), "ATS int8 keep 0.5": ("ats.int8.onnx", 0.5),
                "ATS int8 keep 0.3": ("ats.int8.onnx", 0.3)}
    sessions = {file: user_session(work / file, args.threads) for file, _ in variants.values()}
    load = os.getloadavg()[0]
    table = Table(title=f"{args.arch} random weights, onnxruntime {ort.__version__} CPU, default session options, "
                  f"{args.threads} threads, {args.rounds} interleaved rounds; load average {load:.1f} before")
    for column in ("batch", "variant", "median ms", "x dense fp32", "x dense int8-dynamic", "x dense int8"):
        table.add_column(column, justify="right")
    for batch in (1, 8):
        t = _times(sessions, variants, calib, batch, stages, args.rounds)
        for name in variants:
            ratios = [np.median(t[base] / t[name]) for base in ("dense fp32", "dense int8-dynamic", "dense int8")]
            table.add_row(str(batch), name, f"{1000 * np.median(t[name]):.1f}", *(f"{r:.2f}" for r in ratios))
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f} after")


def _times(sessions: dict, variants: dict, calib: np.ndarray, batch: int, stages: int, rounds: int) -> dict:
    """Seconds per run of every variant, round by round (the first round, a warm-up, dropped)."""
    images = calib[:batch] if len(calib) >= batch else np.repeat(calib[:1], batch, 0)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (file, keep) in variants.items():
            feed = {"images": images}
            if keep is not None:
                feed["keep"] = np.full((len(images), stages), keep, np.float32)
            start = time.perf_counter()
            sessions[file].run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(v[1:]) for name, v in times.items()}


def quantize_dynamic(source: Path, output: Path) -> None:
    """onnxruntime's dynamic int8 of the products the QDQ export quantizes (weights per channel); the rest float32.

    Only MatMul (``quantize_dynamic`` quantizes no Gemm, so the ATS export's Gemms become MatMul + Add
    first): the dynamic ``ConvInteger`` of the patch embedding takes uint8 weights only, and one
    convolution is a small part of the work. The sampling path stays float32 as in the QDQ export.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as dynamic

    model = _gemm_as_matmul(onnx.load(str(source)))
    dynamic(model, output, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
            nodes_to_quantize=int8.matrix_nodes(model))


def _gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each ``Gemm`` with a weight and alpha = beta = 1, no transA -> ``MatMul`` (the weight transposed) + ``Add``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in initializers:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        name = f"{node.input[1]}_matmul"
        graph.initializer.append(numpy_helper.from_array(weight.T.copy() if attrs.get("transB", 0) else weight, name))
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_nobias"
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def dynamic(args: argparse.Namespace, work: Path, console: Console) -> None:
    """Dynamic int8 against the calibrated QDQ int8: held-out top-1 on the real DeiT-Tiny."""
    model = load_model(args.weights)
    stages, config = len(model.stages), data_config(model.vit)
    files, labels = zip(*image_folder(args.data, model.num_classes).files, strict=True)
    cut = args.calibration_images
    held, truth = _pixels(files[cut:], config), np.asarray(labels[cut:])
    fp32 = export(model, work / "fp32.onnx", ExportOptions(dynamic=True))
    int8.quantize(fp32, work / "int8.onnx", _pixels(files[:cut], config), int8.Calibration(args.data, cut))
    quantize_dynamic(fp32, work / "int8-dynamic.onnx")
    names = ("fp32", "int8", "int8-dynamic")
    sessions = {name: session(work / f"{name}.onnx", args.threads) for name in names}
    table = Table(title=f"DeiT-Tiny ATS, {len(truth)} held-out images (int8: calibrated on the first {cut})")
    for column in ("keep", *(f"{n} top-1 %" for n in names), "int8 agreement", "int8-dynamic agreement"):
        table.add_column(column, justify="right")
    for keep in ACCURACY_KEEPS:
        out = {name: predict(sessions[name], held, keep, stages) for name in names}
        table.add_row(f"{keep:g}", *(_pct(out[n] == truth) for n in names),
                      *(f"{100 * (out[n] == out['fp32']).mean():.1f}%" for n in names[1:]))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("accuracy", "latency", "dynamic"), required=True)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--calibration-images", type=int, default=100)
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per channel)")
    parser.add_argument("--attention", action="store_true", help="also quantize Q·K^T and A·V off the sampling path")
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    console = Console(width=140)
    with tempfile.TemporaryDirectory() as work:
        {"accuracy": accuracy, "latency": latency, "dynamic": dynamic}[args.part](args, Path(work), console)


if __name__ == "__main__":
    main()
