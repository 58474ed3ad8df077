"""Target ``dla``: TensorRT 10's checks (DLA engines are built by TensorRT), the DLA's own, and where each layer
runs: a DLA build with GPU fallback puts a layer on the DLA only when the DLA implements it with static shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from .graph import Facts, Node, attribute, fmt_shape, input_name
from .report import DlaShare, Finding
from .tables import (
    DATA_DEPENDENT,
    DLA_CONSTANT_WEIGHTS,
    DLA_MAX_SUBGRAPHS,
    DLA_NATIVE,
    DLA_RECONSTRUCTION,
    SHAPE_INPUTS,
)
from .tensorrt import check_parser
from .tensorrt10 import PARSER

_MAC_OPS = frozenset({"MatMul", "Gemm", "Conv"})


def _dynamic_shape_reason(proto: onnx.NodeProto, facts: Facts) -> str:
    if proto.op_type in DATA_DEPENDENT:
        return f"{proto.op_type}'s output shape depends on the data"
    runtime = [
        name for i in SHAPE_INPUTS.get(proto.op_type, ()) if (name := input_name(proto, i)) and name not in facts.folded
    ]
    if runtime:
        return f"run-time input(s) {', '.join(map(repr, runtime))} set the output shape"
    ins = [i for i in proto.input if i]
    outs = [o for o in proto.output if o]
    if all(facts.static(i) for i in ins) and not all(facts.static(o) for o in outs):
        shapes = ", ".join(fmt_shape(facts.shapes.get(o)) for o in outs)
        return f"output shape {shapes} is not static although every input shape is"
    return ""


def _input_findings(facts: Facts) -> Iterator[Finding]:
    for name in facts.graph_inputs:
        if not facts.static(name):
            yield Finding(
                "error",
                "",
                "",
                f"graph input '{name}' has shape {fmt_shape(facts.shapes.get(name))}: "
                "DLA needs every dimension fixed; export with static shapes",
            )


def _node_findings(node: Node, facts: Facts) -> Iterator[Finding]:
    proto = node.proto
    reason = _dynamic_shape_reason(proto, facts)
    if reason:
        yield Finding("error", node.name, proto.op_type, f"{reason}; DLA needs static shapes")
    if proto.op_type in DLA_CONSTANT_WEIGHTS and input_name(proto, 1) not in facts.folded:
        yield Finding(
            "warning", node.name, proto.op_type, "DLA needs a constant second input (weights); runs on GPU fallback"
        )
    elif proto.op_type not in DLA_NATIVE:
        rewrite = (
            " or rewrite it into DLA ops (DLA-SW operators/op_reconstruction)"
            if proto.op_type in DLA_RECONSTRUCTION
            else ""
        )
        yield Finding(
            "warning",
            node.name,
            proto.op_type,
            f"no DLA implementation in TensorRT: runs on GPU fallback (build with GPU_FALLBACK{rewrite})",
        )


def _macs(proto: onnx.NodeProto, facts: Facts) -> int:
    """Multiply-accumulates of a MatMul/Gemm/Conv with static shapes, else 0."""
    if proto.op_type not in _MAC_OPS or not facts.static(proto.output[0]):
        return 0
    out = int(np.prod(facts.shapes[proto.output[0]]))
    operand = input_name(proto, 1 if proto.op_type == "Conv" else 0)
    if not facts.static(operand):
        return 0
    shape = facts.shapes[operand]
    if proto.op_type == "Conv":  # weights [C_out, C_in / group, *kernel]
        return out * int(np.prod(shape[1:]))
    transposed = proto.op_type == "Gemm" and attribute(proto, "transA", 0)
    return out * int(shape[0] if transposed else shape[-1])


def _subgraphs(on_dla: list[Node]) -> list[list[Node]]:
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
    groups: dict[int, list[Node]] = {}
    for i, node in enumerate(on_dla):
        groups.setdefault(root(i), []).append(node)
    return list(groups.values())  # ordered by each group's first layer


def check(model: onnx.ModelProto, facts: Facts, source: Path | None) -> tuple[list[Finding], DlaShare | None]:
    """TensorRT 10's checks (DLA engines are built by TensorRT), the DLA's own, and where each layer runs."""
    findings = check_parser(facts, PARSER)
    refused = {f.node for f in findings if f.severity == "error"}
    findings += _input_findings(facts)
    share, on_dla = DlaShare(), []
    for node in facts.nodes:
        if node.proto.output and all(o in facts.folded for o in node.proto.output if o):
            continue  # computed at build time: runs nowhere
        own = list(_node_findings(node, facts))
        findings += own
        share.layers += 1
        share.macs += _macs(node.proto, facts)
        if not own and node.name not in refused:
            on_dla.append(node)
    subgraphs = _subgraphs(on_dla)
    share.subgraphs = len(subgraphs)
    if len(subgraphs) > DLA_MAX_SUBGRAPHS:
        findings.append(
            Finding(
                "warning",
                "",
                "",
                f"the DLA layers form {len(subgraphs)} subgraphs between GPU layers; TensorRT builds at most "
                f"{DLA_MAX_SUBGRAPHS} per DLA core and runs the other {len(subgraphs) - DLA_MAX_SUBGRAPHS} "
                "on the GPU",
            )
        )
    for node in (n for g in subgraphs[:DLA_MAX_SUBGRAPHS] for n in g):
        share.dla_layers += 1
        share.dla_macs += _macs(node.proto, facts)
    return findings, share
