"""What TensorRT's ONNX parser rejects or warns about, for any release: the checks its targets share.

A TensorRT target (:mod:`.tensorrt8`, :mod:`.tensorrt10`, and :mod:`.dla`, whose engines TensorRT
builds) is a :class:`Parser`: its release's table (:mod:`.tables`) and the per-operator rules
built here that encode the table's "Restrictions" column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import defs

from .graph import DEFAULT_DOMAINS, Facts, Node, attribute, input_name
from .report import Finding, Severity
from .tables import (
    PLUGIN_TRT_MAJOR,
    PROJECT_OPS,
    RESIZE_ALLOWED,
    RESIZE_NEAREST_MODES,
    TOPK_MAX_K,
    TYPED_SLOTS,
    ParserTable,
)

Rule = Callable[[onnx.NodeProto, Facts], Iterable[tuple[Severity, str]]]


@dataclass(frozen=True)
class Parser:
    """One TensorRT release's ONNX parser: its table, and the rules per operator beyond the types."""

    table: ParserTable
    rules: dict[str, tuple[Rule, ...]]


# --------------------------------------------------------------------------- rules


def topk_k(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
    k_name = input_name(node, 1)  # opset >= 10; before that K is the attribute `k`
    k_value = facts.value(k_name) if k_name else np.asarray(attribute(node, "k", 0))
    if k_value is None:
        why = f"TensorRT takes a dynamic K from 8.6 on, and every K fed at run time must be < {TOPK_MAX_K}"
        yield "warning", f"K ('{k_name}') is a run-time input: {why}"
        return
    k = int(k_value.reshape(-1)[0])
    if k >= TOPK_MAX_K:
        yield "error", f"K = {k}, but TensorRT's TopK needs K < {TOPK_MAX_K}; lower K or select in chunks"


def topk_sorted(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
    if attribute(node, "sorted", 1) == 0:
        yield "error", "sorted=0 is not supported (the table requires sorted=1); export TopK with sorted=True"


def weights_input(index: int, what: str, *, foldable: bool = False) -> Rule:
    """Input ``index`` must be an initializer/Constant (or, if ``foldable``, resolvable to one)."""
    need = "resolvable to a constant" if foldable else "an initializer or a Constant"

    def rule(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
        name = input_name(node, index)
        if name and name not in (facts.folded if foldable else facts.weights):
            fix = "fold constants (onnx-graphsurgeon fold_constants) or bake it in at export"
            yield "error", f"`{what}` ('{name}') must be {need}, not computed at run time; {fix}"

    return rule


def only_first_output(what: str) -> Rule:
    def rule(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
        if any(node.output[1:]):
            yield "error", f"only the first output is supported ({what} unsupported); drop the other outputs"

    return rule


def resize_modes(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
    checks = list(RESIZE_ALLOWED)
    if attribute(node, "mode", "nearest") == "nearest":
        checks.append(("nearest_mode", "round_prefer_floor", RESIZE_NEAREST_MODES))
    for name, default, allowed in checks:
        value = attribute(node, name, default)
        if value not in allowed:
            yield (
                "error",
                (
                    f"{name}='{value}' is not supported (supported: {', '.join(sorted(allowed))}); "
                    "e.g. resample position embeddings with 'linear', or before export"
                ),
            )


def resize_10(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
    if attribute(node, "antialias", 0):
        yield "error", "antialiasing is not supported; export Resize with antialias=0"
    policy = attribute(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        yield "error", f"keep_aspect_ratio_policy='{policy}' is not supported (only 'stretch')"


def einsum_plain(severity: Severity, why: str) -> Rule:
    """No ellipsis and no diagonal (an index repeated within one operand)."""

    def rule(node: onnx.NodeProto, facts: Facts) -> Iterator[tuple[Severity, str]]:
        equation = str(attribute(node, "equation", "")).replace(" ", "")
        operands = equation.split("->")[0].split(",")
        if "..." in equation or any(len(set(t)) < len(t) for t in operands):
            yield severity, f"equation '{equation}' uses an ellipsis or a diagonal: {why}"

    return rule


# --------------------------------------------------------------------------- checks


def _typed_tensors(node: onnx.NodeProto) -> Iterator[str]:
    for kind, index in TYPED_SLOTS.get(node.op_type, (("in", 0),)):
        names = node.input if kind == "in" else node.output
        if index < len(names) and names[index]:
            yield names[index]


def _redefined_ops(facts: Facts, opset: int) -> list[str]:
    """Operators of the model whose definition at the model's opset differs from the one at ``opset``."""
    used = {n.proto.op_type for n in facts.nodes if n.proto.domain in DEFAULT_DOMAINS}
    changed = []
    for op in sorted(used):
        try:
            if defs.get_schema(op, facts.opset).since_version != defs.get_schema(op, opset).since_version:
                changed.append(op)
        except defs.SchemaError:  # not an ONNX operator at one of the two opsets: the op rules report it
            continue
    return changed


def _opset_message(facts: Facts, trt: ParserTable) -> str:
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


def _graph_findings(facts: Facts, trt: ParserTable) -> Iterator[Finding]:
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


def _project_op_findings(trt: ParserTable) -> Iterator[tuple[Severity, str]]:
    if int(trt.version.split(".")[0]) < PLUGIN_TRT_MAJOR:
        yield ("error", f"needs ats-deploy's TensorRT Python plugin, which needs TensorRT >= 10.6, not {trt.version}")
    else:
        yield (
            "warning",
            "runs as ats-deploy's Python plugin (TensorRT >= 10.6): `ats-deploy build` registers it; "
            "plain trtexec cannot load it",
        )


def _node_findings(node: Node, facts: Facts, parser: Parser) -> Iterator[tuple[Severity, str]]:
    trt = parser.table
    proto, label = node.proto, f"TensorRT {trt.version}"
    if (proto.domain, proto.op_type) in PROJECT_OPS:
        yield from _project_op_findings(trt)
        return
    if proto.domain not in DEFAULT_DOMAINS:
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
    types = trt.types.get(proto.op_type)
    if types is None:
        yield (
            "error",
            (
                f"{proto.op_type} is not supported by the {label} ONNX parser (onnx-tensorrt operator "
                "table); replace it or implement a plugin"
            ),
        )
        return
    since = trt.since.get(proto.op_type)
    if since:
        yield "warning", f"{proto.op_type} is parsed only from TensorRT {since} on"
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
        if seen not in types:
            fix = "cast it to float32 before the node (and back after)" if "FP32" in types else "cast it"
            yield (
                "error",
                (
                    f"{proto.op_type} on {dtype} ('{tensor}') is not supported by {label} "
                    f"(types: {', '.join(sorted(types))}); {fix}"
                ),
            )
    for rule in parser.rules.get(proto.op_type, ()):
        yield from rule(proto, facts)


def check_parser(facts: Facts, parser: Parser) -> list[Finding]:
    """Everything ``parser`` would reject or warn about: the graph's opset and INT64 tensors, then node by node."""
    findings = list(_graph_findings(facts, parser.table))
    for node in facts.nodes:
        findings += [
            Finding(sev, node.name, node.proto.op_type, msg) for sev, msg in _node_findings(node, facts, parser)
        ]
    return findings
