"""float32 dynamic ATS export -> INT8 export with explicit QuantizeLinear/DequantizeLinear pairs (QDQ).

TensorRT 10 builds INT8 engines from Q/DQ placed in the file (explicit quantization) and
onnxruntime runs the same file on the CPU, so the calibration happens once, here, on real
images. Only the matrix work is quantized: the Conv of the patch embedding and every
MatMul/Gemm with a weight (qkv, proj, MLP, head). ``docs/ATS.md`` section 6 keeps the
budget, quantiles, cdf and sampling in float32, and the scores they rank come from the
class-token attention row and ``||V||``: so every node from an ATS stage's last weighted
matrix product to its kept-token mask (and everything computed from ``keep``) stays
float32 (:func:`sampling_nodes`). Activations depend on K (fewer, different tokens), so
calibration runs every image at several keeps; one file still serves every K and batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ats_deploy.errors import UserError

from .float32 import sampling_path

DEFAULT_IMAGES = 100
DEFAULT_KEEPS = (1.0, 0.5)  # activations at full and half budget: what K does to the token statistics
CALIBRATION_BATCH = 8
MATRIX_OPS = frozenset({"Conv", "Gemm", "MatMul"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def quantized(model: onnx.ModelProto | str | Path) -> bool:
    """Whether the model (or ONNX file) holds DequantizeLinear nodes: an ``ats-deploy export --precision int8`` file."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(node.op_type == "DequantizeLinear" for node in model.graph.node)


@dataclass(frozen=True)
class Calibration:
    """Where the calibration images come from and how the ranges are chosen.

    ``attention`` also quantizes the activation-by-activation products (Q·K^T, A·V) outside the
    sampling path; off by default: bench/RESULTS.md records what it costs and gains.
    """

    folder: Path
    images: int = DEFAULT_IMAGES
    per_channel: bool = True
    attention: bool = False
    keeps: tuple[float, ...] = DEFAULT_KEEPS

    def check(self) -> None:
        """Refuse a bad count before any export work."""
        if self.images < 1:
            raise UserError(f"--calibration-images must be at least 1, got {self.images}.")


def _folder_files(calibration: Calibration, num_classes: int) -> list[Path]:
    """The image files of the calibration folder (ImageFolder or flat), classes interleaved; checked to exist."""
    from ats_deploy.data import image_folder

    folder = Path(calibration.folder)
    if not folder.exists():
        raise UserError(f"calibration folder {folder} does not exist; give --calibration a folder of real images.")
    if folder.is_dir() and not any(folder.iterdir()):
        raise UserError(f"calibration folder {folder} is empty; put at least {calibration.images} real images in it.")
    return [path for path, _ in image_folder(folder, num_classes).files]


def _too_few(calibration: Calibration, found: str) -> UserError:
    return UserError(
        f"calibration folder {calibration.folder} holds {found}, fewer than the {calibration.images} asked for.",
        hint="Add images, or lower --calibration-images (a few hundred real images calibrate best).",
    )


def calibration_files(calibration: Calibration, num_classes: int) -> list[Path]:
    """The first ``calibration.images`` image files of the folder, checked before any work to be enough.

    A cheap check on file names: :func:`read_calibration` then decodes the folder's files, skipping and
    counting unreadable ones until it has as many readable images.
    """
    files = _folder_files(calibration, num_classes)
    if len(files) < calibration.images:
        raise _too_few(calibration, f"{len(files)} image file(s)")
    return files[: calibration.images]


@dataclass(frozen=True)
class CalibrationImages:
    """The readable images calibration runs on, what was skipped on the way, and the files after them."""

    pixels: np.ndarray  # [N, 3, H, W] float32, preprocessed
    skipped: list[tuple[str, str]]  # (file, why) of each unreadable file met, skipped as ats_deploy.data skips
    rest: list[Path]  # the folder's files after the last one read: images calibration never saw

    def describe(self) -> str:
        if not self.skipped:
            return f"{len(self.pixels)} images"
        name, why = self.skipped[0]
        return f"{len(self.pixels)} readable image(s) ({len(self.skipped)} unreadable file(s) skipped; {name}: {why})"


@dataclass(frozen=True)
class ReadImages:
    """The readable ones of some image files, preprocessed, and what was skipped on the way."""

    pixels: np.ndarray  # [N, 3, H, W] float32
    names: list[str]  # of the N images, relative to the files' common folder
    skipped: list[tuple[str, str]]  # (file, why) of each unreadable file met
    read: int  # files read to find them, unreadable ones included


def read_images(files: Sequence[Path], config: dict, want: int | None = None) -> ReadImages:
    """The first ``want`` readable ``files`` (all of them without it), preprocessed.

    Read by the image-folder reader (:mod:`ats_deploy.data`): an unreadable file is skipped and listed, not fatal.
    """
    from ats_deploy.data import ImageFolder, Skipped, folder_batches

    files = [Path(path) for path in files]
    root = Path(os.path.commonpath([path.parent for path in files])) if files else Path()
    folder = ImageFolder(root, [(path, -1) for path in files], 0, "none", labelled=False)
    skipped = Skipped()
    batch = next(folder_batches(folder, config, want or max(len(files), 1), skipped), None)
    if batch is None:
        return ReadImages(np.zeros((0, *config["input_size"]), np.float32), [], skipped.files, len(skipped))
    return ReadImages(batch.images.numpy(), batch.names, skipped.files, len(batch.names) + len(skipped))


def read_calibration(calibration: Calibration, num_classes: int, config: dict) -> CalibrationImages:
    """The first ``calibration.images`` readable images of the folder; refused when it holds fewer readable ones."""
    files = _folder_files(calibration, num_classes)
    read = read_images(files, config, calibration.images)
    found = CalibrationImages(read.pixels, read.skipped, files[read.read :])
    if len(read.pixels) < calibration.images:
        raise _too_few(calibration, found.describe())
    return found


class _Reader:
    """onnxruntime's CalibrationDataReader: every image batch at every calibration keep.

    ``stages`` is None for a model without a ``keep`` input (a dense ViT, quantized the same way for comparison).
    """

    def __init__(self, images: np.ndarray, keeps: Sequence[float], stages: int | None) -> None:
        self._feeds = iter(self._all(images, keeps if stages else (1.0,), stages))

    @staticmethod
    def _all(images: np.ndarray, keeps: Sequence[float], stages: int | None) -> Iterator[dict[str, np.ndarray]]:
        for keep in keeps:
            for start in range(0, len(images), CALIBRATION_BATCH):
                feed = {"images": images[start : start + CALIBRATION_BATCH]}
                if stages is None:
                    yield feed
                else:
                    yield {**feed, "keep": np.full((len(feed["images"]), stages), keep, np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _weights(graph: onnx.GraphProto) -> set[str]:
    """Initializers and what a DequantizeLinear makes of one: the tensors a weighted product multiplies by."""
    initializers = {init.name for init in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
    return initializers | dequantized


def _is_weighted(node: onnx.NodeProto, weights: set[str]) -> bool:
    return node.op_type in MATRIX_OPS and any(name in weights for name in node.input[1:2])


def sampling_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes of every ATS stage's sampling path, which stay float32 (docs/ATS.md).

    The one rule of :func:`.float32.sampling_path`, bounded by the weighted matrix products (the stage's
    qkv and everything before it): the class-token attention row, ``||V||``, the scores, the budget from
    ``keep``, the quantiles, cdf and sampling. The compaction after the mask holds no matrix product, so no
    Q/DQ can reach it.
    """
    graph = model.graph
    weights = _weights(graph)
    weighted = [node.output[0] for node in graph.node if _is_weighted(node, weights)]
    return {graph.node[index].name for index in sampling_path(model, weighted)}


def matrix_nodes(model: onnx.ModelProto, attention: bool = False) -> list[str]:
    """The nodes to quantize: weighted Conv/Gemm/MatMul; with ``attention``, the other MatMuls off the sampling path."""
    weights = _weights(model.graph)
    sampling = sampling_nodes(model)
    chosen = []
    for node in model.graph.node:
        if node.op_type not in MATRIX_OPS or node.name in sampling:
            continue
        if _is_weighted(node, weights) or (attention and node.op_type == "MatMul"):
            chosen.append(node.name)
    return chosen


def quantize(source: Path, output: Path, images: np.ndarray, calibration: Calibration) -> None:
    """Write the QDQ INT8 copy of the float32 export ``source`` to ``output``, calibrated on ``images``.

    MinMax ranges: onnxruntime's Entropy/Percentile calibrators stack every batch of a tensor into
    one array, which fails on ATS tensors, whose kept-token count differs per image and per keep
    ("inhomogeneous shape", bench/RESULTS.md). Symmetric int8 activations and weights (zero point
    0: what TensorRT accepts), per-channel weights unless turned off, float32 biases. Only inputs
    are quantized: a qkv output feeds the class-token row and ``||V||``, which stay float32. Each
    quantized tensor gets its own Q/DQ pair per consumer, so a tensor shared with the sampling
    path stays float32 there.
    """
    model = bias_apart(onnx.load(str(source)))
    keep_input = next((i for i in model.graph.input if i.name == "keep"), None)
    stages = keep_input.type.tensor_type.shape.dim[1].dim_value if keep_input is not None else None
    reader = _Reader(images, calibration.keeps, stages)
    logging.disable(logging.WARNING)  # onnxruntime logs advice to "pre-process" on the root logger: not the user's
    try:
        _quantize_static(model, output, reader, calibration)
    finally:
        logging.disable(logging.NOTSET)


def _quantize_static(model: onnx.ModelProto, output: Path, reader: _Reader, calibration: Calibration) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        model, output, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=sorted(MATRIX_OPS),
        per_channel=calibration.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=matrix_nodes(model, calibration.attention), calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True, "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": sorted(MATRIX_OPS),
        },
    )


def bias_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each ``Gemm`` with a weight and a bias -> the same ``Gemm`` without its bias, then an ``Add`` of it; names kept.

    onnxruntime's default CPU optimizer runs DequantizeLinear -> Gemm as its integer ``QGemm`` only
    when every Gemm input is dequantized; a float bias leaves a float Gemm that dequantizes its
    weight on every call. With the bias in an ``Add`` after it the product becomes ``QGemm`` (the
    Add stays float32, or joins a following Gelu). A ``MatMul`` + ``Add`` would not do: onnxruntime's
    ``MatMulAddFusion`` turns it back into a float Gemm with a bias (bench/RESULTS.md, "INT8"). TensorRT
    takes either form.
    """
    from onnx import helper

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        if node.op_type != "Gemm" or node.input[1] not in initializers or len(node.input) < 3 or beta != 1.0:
            continue
        bias, output = node.input[2], node.output[0]
        if not bias:
            continue
        del node.input[2]
        node.output[0] = f"{output}_nobias"
        nodes.append(helper.make_node("Add", [node.output[0], bias], [output], name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def placement_problems(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node, op, why) for each Q/DQ TensorRT 10 would refuse or docs/ATS.md section 6 forbids; [] for fp32.

    TensorRT's quantization is symmetric: float32 scales above 0, int8 zero points of 0; a
    per-channel scale belongs on weights only, along an axis whose length it matches.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    problems = []
    for node in (n for n in graph.node if n.op_type in QDQ_OPS):
        problems += [(node.name, node.op_type, why) for why in _qdq_problems(node, initializers)]
    problems += [(name, "", "Q/DQ on an ATS sampling path, which stays float32 (docs/ATS.md section 6)")
                 for name in sorted(sampling_nodes(model) & {n.name for n in graph.node if n.op_type in QDQ_OPS})]
    return problems


def _qdq_problems(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> list[str]:
    from onnx import TensorProto, numpy_helper

    scale = initializers.get(node.input[1])
    if scale is None:
        return ["its scale is not a constant initializer"]
    values, problems = numpy_helper.to_array(scale), []
    if scale.data_type != TensorProto.FLOAT or not (values > 0).all():
        problems.append("scales must be float32 and above 0")
    zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and (zero.data_type != TensorProto.INT8 or numpy_helper.to_array(zero).any()):
        problems.append("zero points must be int8 0 (TensorRT quantizes symmetrically)")
    if values.size > 1:
        weight = initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if weight is None:
            problems.append("a per-channel scale on an activation; TensorRT takes per-channel scales on weights only")
        elif weight.dims[axis] != values.size:
            problems.append(f"{values.size} scales for axis {axis} of a weight of shape {list(weight.dims)}")
    return problems
