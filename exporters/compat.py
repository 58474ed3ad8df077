"""Static compatibility report of an ONNX model for a deployment target, without a GPU.

``check_model(model, target)`` walks every node (subgraphs of ``If``/``Loop``/``Scan``
included) after ``onnx.shape_inference`` and reports, per node, what the target's ONNX
parser or runtime would reject (errors) or accept with a caveat (warnings).

Where the tables come from (read in the public sources; nothing below is guessed
beyond what the comments say):

* ``tensorrt-10``: onnx/onnx-tensorrt ``docs/operators.md`` as of TensorRT 10.15
  ("supports operators in the inclusive range of opset 9 to opset 24"), with the
  operators added after 10.0 dated from ``docs/Changelog.md`` (10.1 DeformConv,
  10.4 windows, 10.5 STFT, 10.12 Einsum ellipsis/diagonal, 10.14 Attention,
  10.15 RMSNormalization/RotaryEmbedding/TensorScatter): those give a warning
  naming the first 10.x release that parses them.
* ``tensorrt-8.6``: the release/8.6 copy of ``docs/operators.md`` was not available;
  the table is the TensorRT 8.5 GA one (onnx/onnx-tensorrt@6d0ab7be, "up to Opset
  17", INT64 cast down to INT32) plus the "TensorRT 8.6 EA Release" changelog entry:
  GroupNormalization, LayerNormalization and IsInf added, INT32 for ArgMin/ArgMax/TopK,
  TopK with a dynamic K. Local functions only from 9.0 ("9.0 EA Release"). One
  deviation: ConstantOfShape takes any value type, as the 8.x importer
  (``builtin_op_importers.cpp``) does, where the table says FP32 only.
* TopK's K limit: "`K` input must be less than 3840" (10.x table); the TensorRT
  operator reference gives ``k <= 3840`` for ITopKLayer.
* ``dla``: NVIDIA/Deep-Learning-Accelerator-SW ``operators/README.md`` (column "Orin
  DLA support through TensorRT"), and the TensorRT guide "DLA Supported Layers and
  Restrictions" ("DLA does not support dynamic dimensions") and "GPU Fallback Mode".
  DLA engines are built by TensorRT, so the ``tensorrt-10`` checks apply too.
* ``onnxruntime``: an ``InferenceSession`` on the CPU provider is the authority.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, defs, helper, numpy_helper
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ats_deploy.errors import BackendUnavailable, UserError
from ats_deploy.filekinds import expect_exported

from .custom_op import DOMAIN, OP_TYPE, register, uses_custom_op

TARGETS = ("tensorrt-8.6", "tensorrt-10", "dla", "onnxruntime")

Severity = Literal["error", "warning"]


@dataclass
class Finding:
    severity: Severity
    node: str  # node name ("parent/child" inside subgraphs), "" for the graph itself
    op: str
    message: str


@dataclass
class CompatReport:
    target: str
    findings: list[Finding] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    dla: DlaShare | None = None  # target "dla": where the layers would run

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------- model facts

_DEFAULT_DOMAINS = ("", "ai.onnx")
# ONNX element type name -> the short names the onnx-tensorrt tables use.
_SHORT_DTYPE = {
    "FLOAT": "FP32",
    "FLOAT16": "FP16",
    "BFLOAT16": "BF16",
    "FLOAT8E4M3FN": "FP8",
    "FLOAT4E2M1": "FP4",
}

Shape = tuple[int | str | None, ...]


@dataclass
class _Node:
    proto: onnx.NodeProto
    name: str


@dataclass
class _Facts:
    """What the rules read: every node, and tensor types/shapes after shape inference."""

    nodes: list[_Node]
    dtypes: dict[str, str]
    shapes: dict[str, Shape | None]
    # Initializers and Constant outputs: what the TensorRT parser treats as weights.
    weights: dict[str, TensorProto | np.ndarray]
    graph_inputs: list[str]
    graph_outputs: list[str]
    opset: int | None
    functions: set[tuple[str, str]]
    # Weights plus whatever the builder can compute from them and from static shapes.
    folded: set[str] = field(default_factory=set)

    def value(self, name: str) -> np.ndarray | None:
        weight = self.weights.get(name)
        if isinstance(weight, TensorProto):
            return numpy_helper.to_array(weight)
        return weight

    def static(self, name: str) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _dtype_name(elem_type: int) -> str:
    name = TensorProto.DataType.Name(elem_type)
    return _SHORT_DTYPE.get(name, name)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _graphs(sub)


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[_Node]:
    for i, node in enumerate(graph.node):
        name = prefix + (node.name or f"<{node.op_type} #{i}>")
        yield _Node(node, name)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _walk(sub, f"{name}/")


def _declared(vi: onnx.ValueInfoProto) -> tuple[str, Shape | None] | None:
    """A value's declared dtype and shape (None: rank unknown), or None when it declares no tensor type."""
    tensor = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or tensor.elem_type == TensorProto.UNDEFINED:
        return None
    shape = (
        tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        if tensor.HasField("shape")
        else None
    )
    return _dtype_name(tensor.elem_type), shape


def _constant_value(node: onnx.NodeProto) -> TensorProto | np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attr))
    return None  # sparse or string constants: never shape inputs


# Ops with no data inputs whose output is still not a build-time constant.
_NOT_FOLDABLE = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
)


def _fold(graph: onnx.GraphProto, facts: _Facts) -> set[str]:
    """Tensors the builder can compute once shapes are fixed (nodes are topologically sorted)."""
    folded = set(facts.weights)
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            foldable = facts.static(inputs[0])
        else:
            foldable = bool(inputs) and node.op_type not in _NOT_FOLDABLE and all(i in folded for i in inputs)
        if foldable:
            folded.update(o for o in node.output if o)
    return folded


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Finding]]:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True), []
    except Exception as exc:  # onnx raises several types (InferenceError, ValueError over 2 GB...)
        return model, [
            Finding(
                "warning",
                "",
                "",
                f"ONNX shape inference failed ({exc}); type and shape checks only see the declared types",
            )
        ]


def _facts(model: onnx.ModelProto) -> tuple[_Facts, list[Finding]]:
    inferred, findings = _infer(model)
    dtypes: dict[str, str] = {}
    shapes: dict[str, Shape | None] = {}
    weights: dict[str, TensorProto | np.ndarray] = {}
    for graph in _graphs(inferred.graph):
        for vi in (*graph.input, *graph.output, *graph.value_info):
            declared = _declared(vi)
            if declared is not None:
                dtypes[vi.name], shapes[vi.name] = declared
        for init in graph.initializer:
            dtypes[init.name] = _dtype_name(init.data_type)
            shapes[init.name] = tuple(init.dims)
            weights[init.name] = init
    nodes = list(_walk(inferred.graph))
    for node in nodes:
        if node.proto.op_type == "Constant" and node.proto.domain in _DEFAULT_DOMAINS:
            value = _constant_value(node.proto)
            if value is not None:
                weights[node.proto.output[0]] = value
    initializers = {i.name for i in inferred.graph.initializer}
    facts = _Facts(
        nodes=nodes,
        dtypes=dtypes,
        shapes=shapes,
        weights=weights,
        graph_inputs=[vi.name for vi in inferred.graph.input if vi.name not in initializers],
        graph_outputs=[vi.name for vi in inferred.graph.output],
        opset=next((o.version for o in inferred.opset_import if o.domain in _DEFAULT_DOMAINS), None),
        functions={(f.domain, f.name) for f in inferred.functions},
    )
    facts.folded = _fold(inferred.graph, facts)
    return facts, findings


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _fmt_shape(shape: Shape | None) -> str:
    if shape is None:
        return "unknown"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- TensorRT rules

Rule = Callable[[onnx.NodeProto, _Facts], Iterable[tuple[Severity, str]]]

_TOPK_MAX_K = 3840  # "`K` input must be less than 3840" (onnx-tensorrt 10.x table)


def _topk_k(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
    k_name = _input(node, 1)  # opset >= 10; before that K is the attribute `k`
    k_value = facts.value(k_name) if k_name else np.asarray(_attr(node, "k", 0))
    if k_value is None:
        why = f"TensorRT takes a dynamic K from 8.6 on, and every K fed at run time must be < {_TOPK_MAX_K}"
        yield "warning", f"K ('{k_name}') is a run-time input: {why}"
        return
    k = int(k_value.reshape(-1)[0])
    if k >= _TOPK_MAX_K:
        yield "error", f"K = {k}, but TensorRT's TopK needs K < {_TOPK_MAX_K}; lower K or select in chunks"


def _topk_sorted(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
    if _attr(node, "sorted", 1) == 0:
        yield "error", "sorted=0 is not supported (the table requires sorted=1); export TopK with sorted=True"


def _weights_input(index: int, what: str, *, foldable: bool = False) -> Rule:
    """Input ``index`` must be an initializer/Constant (or, if ``foldable``, resolvable to one)."""
    need = "resolvable to a constant" if foldable else "an initializer or a Constant"

    def rule(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
        name = _input(node, index)
        if name and name not in (facts.folded if foldable else facts.weights):
            fix = "fold constants (onnx-graphsurgeon fold_constants) or bake it in at export"
            yield "error", f"`{what}` ('{name}') must be {need}, not computed at run time; {fix}"

    return rule


def _only_first_output(what: str) -> Rule:
    def rule(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
        if any(node.output[1:]):
            yield "error", f"only the first output is supported ({what} unsupported); drop the other outputs"

    return rule


_RESIZE_ALLOWED = (
    (
        "coordinate_transformation_mode",
        "half_pixel",
        frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}),
    ),
    ("mode", "nearest", frozenset({"nearest", "linear"})),
)
_RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})


def _resize_modes(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
    checks = list(_RESIZE_ALLOWED)
    if _attr(node, "mode", "nearest") == "nearest":
        checks.append(("nearest_mode", "round_prefer_floor", _RESIZE_NEAREST_MODES))
    for name, default, allowed in checks:
        value = _attr(node, name, default)
        if value not in allowed:
            yield (
                "error",
                (
                    f"{name}='{value}' is not supported (supported: {', '.join(sorted(allowed))}); "
                    "e.g. resample position embeddings with 'linear', or before export"
                ),
            )


def _resize_10(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
    if _attr(node, "antialias", 0):
        yield "error", "antialiasing is not supported; export Resize with antialias=0"
    policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        yield "error", f"keep_aspect_ratio_policy='{policy}' is not supported (only 'stretch')"


def _einsum_plain(severity: Severity, why: str) -> Rule:
    """No ellipsis and no diagonal (an index repeated within one operand)."""

    def rule(node: onnx.NodeProto, facts: _Facts) -> Iterator[tuple[Severity, str]]:
        equation = str(_attr(node, "equation", "")).replace(" ", "")
        operands = equation.split("->")[0].split(",")
        if "..." in equation or any(len(set(t)) < len(t) for t in operands):
            yield severity, f"equation '{equation}' uses an ellipsis or a diagonal: {why}"

    return rule


# --------------------------------------------------------------------------- TensorRT tables


@dataclass(frozen=True)
class _OpSpec:
    types: frozenset[str]
    rules: tuple[Rule, ...] = ()
    since: str = ""  # first release of the series whose parser has the op ("" = all of them)


@dataclass(frozen=True)
class _TrtTarget:
    version: str
    ops: dict[str, _OpSpec]
    tensor_types: frozenset[str]  # every type a TensorRT tensor may have
    opsets: tuple[int, int]
    int64_cast_down: bool  # TensorRT < 9: INT64 becomes INT32 (clamped)
    local_functions: bool


def _types(*names: str) -> frozenset[str]:
    return frozenset(names)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _table(
    groups: dict[frozenset[str], str], rules: dict[str, tuple[Rule, ...]], since: dict[str, str]
) -> dict[str, _OpSpec]:
    """``{types: "Op Op ..."}`` -> ``{op: _OpSpec}``: one line per "Supported Types" cell."""
    return {
        op: _OpSpec(types, rules.get(op, ()), since.get(op, ""))
        for types, names in groups.items()
        for op in names.split()
    }


_REDUCE_OPS = (
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare"
)
_MAXPOOL_RULE = _only_first_output("the `Indices` output")

# TensorRT 8.6: the 8.5 GA table plus the 8.6 EA changelog. Ops absent (Unique, Hardmax,
# sequences, Optional, CastLike, BitShift...) are "N" or unlisted there. The types of the
# three ops added in 8.6 are not in the changelog: FP32/FP16 as for every 8.x float op.
# ConstantOfShape: the table says FP32 only, but the 8.x importer (builtin_op_importers.cpp)
# converts a `value` of any type, so it shares Constant's types here.
_TRT86 = _TrtTarget(
    version="8.6",
    ops=_table(
        {
            _types("FP32", "FP16"): (
                "Acos Acosh Asin Asinh Atan Atanh BatchNormalization Ceil Celu Cos Cosh CumSum Dropout "
                "Einsum Erf Exp Floor GridSample GRU ImageScaler InstanceNormalization Log LogSoftmax LRN "
                "LSTM LpNormalization MatMul MeanVarianceNormalization NonMaxSuppression NonZero Pow "
                "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal "
                f"{_REDUCE_OPS} Resize ReverseSequence RNN RoiAlign Scan Sin Sinh Softmax Sqrt Tan Upsample "
                "GroupNormalization IsInf LayerNormalization"
            ),
            _types("FP32", "FP16", "INT8"): (
                "Clip Conv ConvTranspose Elu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool HardSigmoid "
                "HardSwish LeakyRelu LpPool MaxPool ParametricSoftplus PRelu Relu Round ScaledTanh Selu "
                "Sigmoid Softplus Softsign Tanh ThresholdedRelu"
            ),
            _types("FP32", "FP16", "INT32"): (
                "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual "
                "Max Mean Min Mod Mul Neg Range Shrink SpaceToDepth Sub Sum TopK"
            ),
            _types("FP32", "FP16", "INT8", "INT32"): "AveragePool Pad Scatter ScatterElements ScatterND Sign",
            _types("FP32", "FP16", "INT32", "BOOL"): "Expand EyeLike Flatten If Loop OneHot Split Tile Where",
            _types("FP32", "FP16", "INT32", "INT8", "BOOL"): (
                "Cast Concat Constant ConstantOfShape Gather GatherElements GatherND Identity Reshape Shape Size Slice "
                "Squeeze Transpose Trilu Unsqueeze"
            ),
            _types("BOOL"): "And Not Or Xor",
            _types("INT8"): "DequantizeLinear",
        },
        rules={
            "TopK": (_topk_k,),
            "CumSum": (_weights_input(1, "axis"),),
            "Slice": (_weights_input(3, "axes"),),
            "Squeeze": (_weights_input(1, "axes"),),
            "Unsqueeze": (_weights_input(1, "axes"),),
            "Resize": (_resize_modes,),
            "Einsum": (_einsum_plain("error", "not supported by TensorRT 8.6; write it out with MatMul"),),
            "MaxPool": (_MAXPOOL_RULE,),
        },
        since={},
    ),
    tensor_types=_types("FP32", "FP16", "INT8", "INT32", "INT64", "UINT8", "BOOL"),
    opsets=(1, 17),
    int64_cast_down=True,
    local_functions=False,
)

_F10 = ("FP32", "FP16", "BF16")
_I10 = ("INT32", "INT64")
_TRT10 = _TrtTarget(
    version="10",
    ops=_table(
        {
            _types(*_F10): (
                "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv "
                "ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool "
                "GlobalLpPool GlobalMaxPool GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler "
                "InstanceNormalization IsInf LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM "
                "LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
                "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal "
                "Resize RMSNormalization RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
                "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"
            ),
            _types("FP32", "FP16"): (
                "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero RoiAlign"
            ),
            _types(*_F10, *_I10): (
                "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual "
                f"Max Min Mod Mul Neg Pad Pow Range {_REDUCE_OPS} Relu Scatter ScatterElements ScatterND "
                "Shrink Sign SpaceToDepth Sub Sum TopK"
            ),
            _types(*_F10, *_I10, "BOOL"): (
                "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot "
                "Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where"
            ),
            _types(*_F10, *_I10, "UINT8", "BOOL"): "Cast CastLike",
            _types(*_F10, *_I10, "FP8", "FP4", "INT4", "BOOL"): "Constant ConstantOfShape",
            _types("BOOL"): "And Not Or Xor",
            _types("INT8", "FP8", "FP4", "INT4"): "DequantizeLinear",
            _types(*_F10, "INT8", "FP8"): "Attention",
            _types(*_F10, "INT8", *_I10): "Gelu",
            _types(*_F10, "FP8", *_I10): "Mean",
            _types(*_F10, "INT32"): "TensorScatter",
            _types("FP32"): "STFT",
        },
        rules={
            "TopK": (_topk_k, _topk_sorted),
            "CumSum": (_weights_input(1, "axis", foldable=True),),
            "Squeeze": (_weights_input(1, "axes", foldable=True),),
            "Unsqueeze": (_weights_input(1, "axes", foldable=True),),
            **{op: (_weights_input(1, "axes"),) for op in _REDUCE_OPS.split()},
            "Resize": (_resize_modes, _resize_10),
            "Einsum": (_einsum_plain("warning", "parsed only from TensorRT 10.12 on"),),
            "MaxPool": (_MAXPOOL_RULE,),
            "LayerNormalization": (_only_first_output("`Mean` and `InvStdDev`"),),
        },
        since={
            "DeformConv": "10.1",
            "BlackmanWindow": "10.4",
            "HammingWindow": "10.4",
            "HannWindow": "10.4",
            "STFT": "10.5",
            "Attention": "10.14",
            "RMSNormalization": "10.15",
            "RotaryEmbedding": "10.15",
            "TensorScatter": "10.15",
        },
    ),
    tensor_types=_types(*_F10, *_I10, "FP8", "FP4", "INT4", "INT8", "UINT8", "BOOL"),
    opsets=(9, 24),
    int64_cast_down=False,
    local_functions=True,
)

_TRT = {"tensorrt-8.6": _TRT86, "tensorrt-10": _TRT10}

# Which tensors carry an op's type T (the "Supported Types" column); default: input 0.
_TYPED_SLOTS: dict[str, tuple[tuple[str, int], ...]] = {
    "Cast": (("in", 0), ("out", 0)),
    "CastLike": (("in", 0), ("out", 0)),
    "Where": (("in", 1),),
    "Constant": (("out", 0),),
    "ConstantOfShape": (("out", 0),),
    "RandomNormal": (("out", 0),),
    "RandomUniform": (("out", 0),),
}


def _typed_tensors(node: onnx.NodeProto) -> Iterator[str]:
    for kind, index in _TYPED_SLOTS.get(node.op_type, (("in", 0),)):
        names = node.input if kind == "in" else node.output
        if index < len(names) and names[index]:
            yield names[index]


def _redefined_ops(facts: _Facts, opset: int) -> list[str]:
    """Operators of the model whose definition at the model's opset differs from the one at ``opset``."""
    used = {n.proto.op_type for n in facts.nodes if n.proto.domain in _DEFAULT_DOMAINS}
    changed = []
    for op in sorted(used):
        try:
            if defs.get_schema(op, facts.opset).since_version != defs.get_schema(op, opset).since_version:
                changed.append(op)
        except defs.SchemaError:  # not an ONNX operator at one of the two opsets: the op rules report it
            continue
    return changed


def _opset_message(facts: _Facts, trt: _TrtTarget) -> str:
    """Why the model's opset is outside what ``trt`` parses, and a fix that exists.

    The parser refuses no opset (onnx-tensorrt ``ModelImporter``: only a warning below 7): it
    reads every node with the importers of its release, written for the definitions up to
    its highest documented opset. Above it, what
    matters are the ops redefined since; ``ats-deploy export --opset 17`` writes the file
    that parser reads, while onnx's version converter cannot go down (it has no 18 -> 17
    adapter for Split, for one). Below the range, the converter can go up.
    """
    low, high = trt.opsets
    where = f"model opset {facts.opset} is outside the opsets TensorRT {trt.version} documents ({low}-{high})"
    if facts.opset < low:
        return f"{where}; upgrade it: onnx.version_converter.convert_version(model, {low})"
    changed = _redefined_ops(facts, high)
    risk = (
        f"it uses ops redefined after opset {high}, which that parser may read by their older definition: "
        f"{', '.join(changed)}"
        if changed
        else f"every op it uses is defined as at opset {high}, so the parser reads them as meant"
    )
    return (
        f"{where}; {risk}. Re-export with `ats-deploy export CHECKPOINT --opset {high}` "
        "(or build with TensorRT 10: check --target tensorrt-10)"
    )


def _trt_graph_findings(facts: _Facts, trt: _TrtTarget) -> Iterator[Finding]:
    low, high = trt.opsets
    if facts.opset is not None and not low <= facts.opset <= high:
        yield Finding("warning", "", "", _opset_message(facts, trt))
    if not trt.int64_cast_down:
        return
    io = set(facts.graph_inputs) | set(facts.graph_outputs)
    for name in sorted(io):
        if facts.dtypes.get(name) == "INT64":
            yield Finding(
                "warning",
                "",
                "",
                f"graph input/output '{name}' is INT64: TensorRT {trt.version} casts "
                "it down to INT32, so bind an int32 buffer (values clamped to ±INT_MAX)",
            )
    internal = sum(1 for name, dtype in facts.dtypes.items() if dtype == "INT64" and name not in io)
    if internal:
        yield Finding(
            "warning",
            "",
            "",
            f"{internal} internal INT64 tensors are cast down to INT32 by "
            f"TensorRT {trt.version} (values clamped to ±INT_MAX)",
        )


# This project's own op (``--ats-op custom``): a TensorRT Python plugin (exporters/trt_plugin.py;
# ``tensorrt.plugin`` exists from TensorRT 10.6) and an onnxruntime-extensions kernel.
_PROJECT_OPS = frozenset({(DOMAIN, OP_TYPE)})
_PLUGIN_TRT_MAJOR = 10


def _project_op_findings(trt: _TrtTarget) -> Iterator[tuple[Severity, str]]:
    if int(trt.version.split(".")[0]) < _PLUGIN_TRT_MAJOR:
        yield ("error", f"needs ats-deploy's TensorRT Python plugin, which needs TensorRT >= 10.6, not {trt.version}")
    else:
        yield (
            "warning",
            "runs as ats-deploy's Python plugin (TensorRT >= 10.6): `ats-deploy build` registers it; "
            "plain trtexec cannot load it",
        )


def _trt_node_findings(node: _Node, facts: _Facts, trt: _TrtTarget) -> Iterator[tuple[Severity, str]]:
    proto, label = node.proto, f"TensorRT {trt.version}"
    if (proto.domain, proto.op_type) in _PROJECT_OPS:
        yield from _project_op_findings(trt)
        return
    if proto.domain not in _DEFAULT_DOMAINS:
        if (proto.domain, proto.op_type) in facts.functions:
            if not trt.local_functions:
                yield (
                    "error",
                    (
                        f"calls the model-local function '{proto.domain}.{proto.op_type}', which the "
                        f"parser reads from TensorRT 9.0 on; inline it (onnx.inliner.inline_local_functions)"
                    ),
                )
            return
        yield (
            "error",
            (
                f"'{proto.domain}.{proto.op_type}' is not an ONNX operator: {label} needs a plugin "
                f"registered as '{proto.op_type}' (load it before parsing) or the node replaced"
            ),
        )
        return
    spec = trt.ops.get(proto.op_type)
    if spec is None:
        yield (
            "error",
            (
                f"{proto.op_type} is not supported by the {label} ONNX parser (onnx-tensorrt operator "
                "table); replace it or implement a plugin"
            ),
        )
        return
    if spec.since:
        yield "warning", f"{proto.op_type} is parsed only from TensorRT {spec.since} on"
    tensors = [t for t in (*proto.input, *proto.output) if t and t in facts.dtypes]
    foreign = {t: facts.dtypes[t] for t in tensors if facts.dtypes[t] not in trt.tensor_types}
    if foreign:
        listed = ", ".join(f"'{t}' ({d})" for t, d in foreign.items())
        yield "error", f"{listed}: not a {label} tensor type; compute in float32/int32 instead"
    for tensor in _typed_tensors(proto):
        dtype = facts.dtypes.get(tensor)
        if dtype is None or dtype in foreign.values():
            continue
        seen = "INT32" if trt.int64_cast_down and dtype == "INT64" else dtype
        if seen not in spec.types:
            fix = "cast it to float32 before the node (and back after)" if "FP32" in spec.types else "cast it"
            yield (
                "error",
                (
                    f"{proto.op_type} on {dtype} ('{tensor}') is not supported by {label} "
                    f"(types: {', '.join(sorted(spec.types))}); {fix}"
                ),
            )
    for rule in spec.rules:
        yield from rule(proto, facts)


def _check_trt(facts: _Facts, trt: _TrtTarget) -> list[Finding]:
    findings = list(_trt_graph_findings(facts, trt))
    for node in facts.nodes:
        findings += [
            Finding(sev, node.name, node.proto.op_type, msg) for sev, msg in _trt_node_findings(node, facts, trt)
        ]
    return findings


# --------------------------------------------------------------------------- DLA

# Output shape depends on tensor values, whatever the input shapes.
_DATA_DEPENDENT = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})
# Inputs that set the output shape: run-time values there make the shape dynamic.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "TopK": (1,),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "OneHot": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
}
# "Orin DLA support through TensorRT" = Native (Constant, Shape, ConstantOfShape are folded
# at build time); "Reconstruction" ops can be rewritten into native ones.
_DLA_NATIVE = _names(
    "Abs Add AveragePool BatchNormalization Clip Concat Constant ConstantOfShape Conv ConvTranspose Equal "
    "Gemm LeakyRelu LRN MatMul Max MaxPool Mul PRelu Relu Reshape Resize Shape Sigmoid Slice Softmax Split "
    "Sub Sum Tanh Transpose Upsample"
)
_DLA_RECONSTRUCTION = _names(
    "And CumSum DepthToSpace DequantizeLinear Gather GatherElements GatherND GRU Identity LSTM Neg Not Or "
    "QuantizeLinear ReduceMax ReduceSum RNN Scatter ScatterElements SpaceToDepth Where Xor"
)
_DLA_CONSTANT_WEIGHTS = frozenset({"MatMul", "Gemm"})  # "The second input must be a constant"


def _dynamic_shape_reason(proto: onnx.NodeProto, facts: _Facts) -> str:
    if proto.op_type in _DATA_DEPENDENT:
        return f"{proto.op_type}'s output shape depends on the data"
    runtime = [
        name for i in _SHAPE_INPUTS.get(proto.op_type, ()) if (name := _input(proto, i)) and name not in facts.folded
    ]
    if runtime:
        return f"run-time input(s) {', '.join(map(repr, runtime))} set the output shape"
    ins = [i for i in proto.input if i]
    outs = [o for o in proto.output if o]
    if all(facts.static(i) for i in ins) and not all(facts.static(o) for o in outs):
        shapes = ", ".join(_fmt_shape(facts.shapes.get(o)) for o in outs)
        return f"output shape {shapes} is not static although every input shape is"
    return ""


def _dla_input_findings(facts: _Facts) -> Iterator[Finding]:
    for name in facts.graph_inputs:
        if not facts.static(name):
            yield Finding(
                "error",
                "",
                "",
                f"graph input '{name}' has shape {_fmt_shape(facts.shapes.get(name))}: "
                "DLA needs every dimension fixed; export with static shapes",
            )


def _dla_node_findings(node: _Node, facts: _Facts) -> Iterator[Finding]:
    proto = node.proto
    reason = _dynamic_shape_reason(proto, facts)
    if reason:
        yield Finding("error", node.name, proto.op_type, f"{reason}; DLA needs static shapes")
    if proto.op_type in _DLA_CONSTANT_WEIGHTS and _input(proto, 1) not in facts.folded:
        yield Finding(
            "warning", node.name, proto.op_type, "DLA needs a constant second input (weights); runs on GPU fallback"
        )
    elif proto.op_type not in _DLA_NATIVE:
        rewrite = (
            " or rewrite it into DLA ops (DLA-SW operators/op_reconstruction)"
            if proto.op_type in _DLA_RECONSTRUCTION
            else ""
        )
        yield Finding(
            "warning",
            node.name,
            proto.op_type,
            f"no DLA implementation in TensorRT: runs on GPU fallback (build with GPU_FALLBACK{rewrite})",
        )


# TensorRT's builder log: "DLA supports only 16 subgraphs per DLA core. Switching to GPU for layer ...".
_DLA_MAX_SUBGRAPHS = 16
_MAC_OPS = frozenset({"MatMul", "Gemm", "Conv"})


@dataclass
class DlaShare:
    """Where a TensorRT DLA build (with GPU fallback) would run the model's layers.

    A layer is a node left after constant folding; MACs are those of MatMul, Gemm and
    Conv where shapes are known, the bulk of a ViT's work. A static estimate: TensorRT
    decides per layer when it builds, and may refuse more (DLA-specific limits on sizes).
    """

    layers: int = 0
    dla_layers: int = 0
    macs: int = 0
    dla_macs: int = 0
    subgraphs: int = 0  # DLA subgraphs the DLA layers form, before the per-core limit

    @property
    def fallback(self) -> bool:
        return self.dla_layers < self.layers

    def summary(self) -> str:
        """``"3.1% of MACs, 40 of 500 layers on the DLA"``."""
        macs = f"{100 * self.dla_macs / self.macs:.1f}% of MACs, " if self.macs else ""
        return f"{macs}{self.dla_layers} of {self.layers} layers on the DLA"


def _macs(proto: onnx.NodeProto, facts: _Facts) -> int:
    """Multiply-accumulates of a MatMul/Gemm/Conv with static shapes, else 0."""
    if proto.op_type not in _MAC_OPS or not facts.static(proto.output[0]):
        return 0
    out = int(np.prod(facts.shapes[proto.output[0]]))
    operand = _input(proto, 1 if proto.op_type == "Conv" else 0)
    if not facts.static(operand):
        return 0
    shape = facts.shapes[operand]
    if proto.op_type == "Conv":  # weights [C_out, C_in / group, *kernel]
        return out * int(np.prod(shape[1:]))
    transposed = proto.op_type == "Gemm" and _attr(proto, "transA", 0)
    return out * int(shape[0] if transposed else shape[-1])


def _dla_subgraphs(on_dla: list[_Node]) -> list[list[_Node]]:
    """DLA layers joined by tensors, in graph order: the DLA subgraphs TensorRT would build."""
    parent = list(range(len(on_dla)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    producer = {out: i for i, node in enumerate(on_dla) for out in node.proto.output if out}
    for i, node in enumerate(on_dla):
        for name in node.proto.input:
            if name in producer:
                parent[root(producer[name])] = root(i)
    groups: dict[int, list[_Node]] = {}
    for i, node in enumerate(on_dla):
        groups.setdefault(root(i), []).append(node)
    return list(groups.values())  # ordered by each group's first layer


def _check_dla(facts: _Facts) -> tuple[list[Finding], DlaShare]:
    """TensorRT 10's checks (DLA engines are built by TensorRT), the DLA's own, and where each layer runs."""
    findings = _check_trt(facts, _TRT10)
    refused = {f.node for f in findings if f.severity == "error"}
    findings += _dla_input_findings(facts)
    share, on_dla = DlaShare(), []
    for node in facts.nodes:
        if node.proto.output and all(o in facts.folded for o in node.proto.output if o):
            continue  # computed at build time: runs nowhere
        own = list(_dla_node_findings(node, facts))
        findings += own
        share.layers += 1
        share.macs += _macs(node.proto, facts)
        if not own and node.name not in refused:
            on_dla.append(node)
    subgraphs = _dla_subgraphs(on_dla)
    share.subgraphs = len(subgraphs)
    if len(subgraphs) > _DLA_MAX_SUBGRAPHS:
        findings.append(
            Finding(
                "warning",
                "",
                "",
                f"the DLA layers form {len(subgraphs)} subgraphs between GPU layers; TensorRT builds at most "
                f"{_DLA_MAX_SUBGRAPHS} per DLA core and runs the other {len(subgraphs) - _DLA_MAX_SUBGRAPHS} "
                "on the GPU",
            )
        )
    for node in (n for g in subgraphs[:_DLA_MAX_SUBGRAPHS] for n in g):
        share.dla_layers += 1
        share.dla_macs += _macs(node.proto, facts)
    return findings, share


# --------------------------------------------------------------------------- onnxruntime

_ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# How onnxruntime's load errors name the node: "... node with name 'n'" or "In Node, ("n", Op, ...".
_ORT_NODE_NAME = re.compile(r"node with name '([^']*)'|In Node, \(\"([^\"]*)\"")


def _project_op_ort_finding(facts: _Facts) -> Finding:
    """What running ``--ats-op custom`` nodes in onnxruntime takes: a warning, not an error.

    A plain ``InferenceSession`` refuses the model ("not a registered function/op"), but
    once :func:`~.custom_op.register` has added onnxruntime-extensions' kernel it loads and
    runs it (ats-deploy's validate and bench do so): it is a requirement on the caller,
    as the TensorRT plugin is for TensorRT 10. The load below is made with it registered.
    """
    count = sum(1 for n in facts.nodes if (n.proto.domain, n.proto.op_type) in _PROJECT_OPS)
    return Finding(
        "warning",
        "",
        OP_TYPE,
        f"{count} {OP_TYPE} nodes need ats-deploy's onnxruntime-extensions kernel; a plain InferenceSession "
        "cannot load the model. Call ats_deploy.exporters.custom_op.register(session_options) before creating "
        "the session (pip install onnxruntime-extensions), as ats-deploy's commands do, or export with "
        "--ats-op subgraph",
    )


def _ort_load_error(model: onnx.ModelProto, source: Path | None) -> str:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if uses_custom_op(model):
        try:
            register(options)
        except BackendUnavailable as err:
            return f"{err.message} {err.hint}"
    try:
        # The path when there is one: external weights resolve next to it, and no 2 GB limit.
        ort.InferenceSession(
            str(source) if source else model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        return str(exc)
    return ""


def _ort_findings(model: onnx.ModelProto, facts: _Facts, source: Path | None) -> list[Finding]:
    findings = [
        Finding(
            "error",
            node.name,
            node.proto.op_type,
            f"domain '{node.proto.domain}' is not built into onnxruntime: register the custom-op library "
            "that implements it (SessionOptions.register_custom_ops_library)",
        )
        for node in facts.nodes
        if node.proto.domain not in _ORT_DOMAINS
        and (node.proto.domain, node.proto.op_type) not in facts.functions | _PROJECT_OPS
    ]
    if findings:
        return findings
    if uses_custom_op(model):
        findings.append(_project_op_ort_finding(facts))
    error = _ort_load_error(model, source)
    if not error:
        return findings
    match = _ORT_NODE_NAME.search(error)
    name = (match.group(1) or match.group(2)) if match else None
    node = next((n for n in facts.nodes if name and n.proto.name == name), None)
    return [
        *findings,
        Finding(
            "error",
            node.name if node else "",
            node.proto.op_type if node else "",
            f"onnxruntime (CPU) cannot load the model: {error}",
        )
    ]


# --------------------------------------------------------------------------- entry points


def _load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if path.is_file():
        expect_exported(path)
    try:
        proto = onnx.load(path)
    except Exception as exc:  # missing file, protobuf DecodeError, missing external data...
        raise UserError(f"{path} is not a valid ONNX model ({exc}); re-export it") from exc
    if not proto.ir_version or not proto.HasField("graph"):
        # Some garbage parses as an empty protobuf message.
        raise UserError(f"{path} is not a valid ONNX model (no IR version or graph); re-export it")
    return proto, path


def _qdq_findings(model: onnx.ModelProto) -> list[Finding]:
    """Q/DQ placement of an INT8 export: what TensorRT 10's explicit quantization takes, the sampling path float32."""
    from .precisions.int8 import placement_problems

    return [Finding("error", node, op, why) for node, op, why in placement_problems(model)]


def check_model(model: onnx.ModelProto | str | Path, target: str) -> CompatReport:
    """Report which nodes of ``model`` ``target`` cannot run (errors) or runs with caveats (warnings)."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}'; valid targets: {', '.join(TARGETS)}")
    proto, source = _load(model)
    facts, findings = _facts(proto)
    dla = None
    if target == "onnxruntime":
        findings += _ort_findings(proto, facts, source)
    elif target == "dla":
        dla_findings, dla = _check_dla(facts)
        findings += dla_findings
    else:
        findings += _check_trt(facts, _TRT[target])
        findings += _qdq_findings(proto) if target == "tensorrt-10" else []
    ops = Counter(
        n.proto.op_type if n.proto.domain in _DEFAULT_DOMAINS else f"{n.proto.domain}.{n.proto.op_type}"
        for n in facts.nodes
    )
    return CompatReport(target, findings, dict(ops), dla)


def render(report: CompatReport, console: Console) -> None:
    """Print the findings, errors first, then a one-line verdict."""
    if report.findings:
        table = Table(title=f"{report.target}: {len(report.errors)} errors, {len(report.warnings)} warnings")
        for column in ("severity", "node", "op", "message"):
            table.add_column(column, overflow="fold")
        for f in sorted(report.findings, key=lambda f: f.severity != "error"):
            style = "bold red" if f.severity == "error" else "yellow"
            table.add_row(Text(f.severity, style=style), Text(f.node or "(graph)"), Text(f.op), Text(f.message))
        console.print(table)
    text, style = _verdict(report)
    console.print(Text(text, style=style))


def _verdict(report: CompatReport) -> tuple[str, str]:
    """One line and its style; a DLA build that falls back to the GPU says how much stays on the DLA."""
    if not report.ok:
        count = len({f.node for f in report.errors})
        noun = "node" if count == 1 else "nodes"
        return f"{count} incompatible {noun} for {report.target}", "bold red"
    count = len(report.warnings)
    suffix = f" ({count} warning{'' if count == 1 else 's'})" if count else ""
    if report.dla is not None and report.dla.fallback:
        return f"runs on {report.target} with GPU fallback: {report.dla.summary()}{suffix}", "bold yellow"
    return f"compatible with {report.target}{suffix}", "bold green"
