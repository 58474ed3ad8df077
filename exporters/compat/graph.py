"""What the compatibility checks read from an ONNX model: every node (subgraphs included) and, after
``onnx.shape_inference``, tensor types and shapes, weights, and what the builder can compute from them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ats_deploy.errors import UserError
from ats_deploy.filekinds import expect_exported

from .report import Finding

DEFAULT_DOMAINS = ("", "ai.onnx")
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
class Node:
    proto: onnx.NodeProto
    name: str


@dataclass
class Facts:
    """What the rules read: every node, and tensor types/shapes after shape inference."""

    nodes: list[Node]
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

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op (``domain.Op`` outside the default domain) the model has."""
        return dict(
            Counter(
                n.proto.op_type if n.proto.domain in DEFAULT_DOMAINS else f"{n.proto.domain}.{n.proto.op_type}"
                for n in self.nodes
            )
        )


def _dtype_name(elem_type: int) -> str:
    name = TensorProto.DataType.Name(elem_type)
    return _SHORT_DTYPE.get(name, name)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _graphs(sub)


def _walk(graph: onnx.GraphProto, prefix: str = "") -> Iterator[Node]:
    for i, node in enumerate(graph.node):
        name = prefix + (node.name or f"<{node.op_type} #{i}>")
        yield Node(node, name)
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


def _fold(graph: onnx.GraphProto, facts: Facts) -> set[str]:
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


def read_facts(model: onnx.ModelProto) -> tuple[Facts, list[Finding]]:
    """The model's facts, and a warning when shape inference fails (the checks then see declared types only)."""
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
        if node.proto.op_type == "Constant" and node.proto.domain in DEFAULT_DOMAINS:
            value = _constant_value(node.proto)
            if value is not None:
                weights[node.proto.output[0]] = value
    initializers = {i.name for i in inferred.graph.initializer}
    facts = Facts(
        nodes=nodes,
        dtypes=dtypes,
        shapes=shapes,
        weights=weights,
        graph_inputs=[vi.name for vi in inferred.graph.input if vi.name not in initializers],
        graph_outputs=[vi.name for vi in inferred.graph.output],
        opset=next((o.version for o in inferred.opset_import if o.domain in DEFAULT_DOMAINS), None),
        functions={(f.domain, f.name) for f in inferred.functions},
    )
    facts.folded = _fold(inferred.graph, facts)
    return facts, findings


def load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, Path | None]:
    """The model, and its file when given one (onnxruntime resolves external weights next to it)."""
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


def input_name(node: onnx.NodeProto, index: int) -> str:
    """The node's input ``index``, "" when absent."""
    return node.input[index] if index < len(node.input) else ""


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    """The node's attribute ``name`` (strings decoded), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def fmt_shape(shape: Shape | None) -> str:
    """``(1, ?, 8)``, or ``unknown`` when the rank is."""
    if shape is None:
        return "unknown"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
