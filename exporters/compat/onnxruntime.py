"""Target ``onnxruntime``: an ``InferenceSession`` on the CPU provider is the authority; the report names the
node its load error names, and what ``--ats-op custom`` nodes need before a session can load them."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import onnxruntime as ort

from ats_deploy.errors import BackendUnavailable
from ats_deploy.sampler_op import OP_TYPE, uses_custom_op

from .graph import Facts
from .report import DlaShare, Finding
from .tables import ORT_DOMAINS, PROJECT_OPS

# How onnxruntime's load errors name the node: "... node with name 'n'" or "In Node, ("n", Op, ...".
_NODE_NAME = re.compile(r"node with name '([^']*)'|In Node, \(\"([^\"]*)\"")


def _project_op_finding(facts: Facts) -> Finding:
    """What running ``--ats-op custom`` nodes in onnxruntime takes: a warning, not an error.

    A plain ``InferenceSession`` refuses the model ("not a registered function/op"), but
    once :func:`~ats_deploy.backends.onnxruntime.kernel.register` has added onnxruntime-extensions' kernel it
    loads and runs it (ats-deploy's validate and bench do so): it is a requirement on the caller,
    as the TensorRT plugin is for TensorRT 10. The load below is made with it registered.
    """
    count = sum(1 for n in facts.nodes if (n.proto.domain, n.proto.op_type) in PROJECT_OPS)
    return Finding(
        "warning",
        "",
        OP_TYPE,
        f"{count} {OP_TYPE} nodes need ats-deploy's onnxruntime-extensions kernel; a plain InferenceSession "
        "cannot load the model. Call ats_deploy.backends.onnxruntime.kernel.register(session_options) before "
        "creating the session (pip install onnxruntime-extensions), as ats-deploy's commands do, or export with "
        "--ats-op subgraph",
    )


def _load_error(model: onnx.ModelProto, source: Path | None) -> str:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if uses_custom_op(model):
        from ats_deploy.backends.onnxruntime.kernel import register  # imports torch: only for such files

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


def check(model: onnx.ModelProto, facts: Facts, source: Path | None) -> tuple[list[Finding], DlaShare | None]:
    """Nodes of domains onnxruntime lacks; else whatever a CPU session fails to load, at the node it names."""
    findings = [
        Finding(
            "error",
            node.name,
            node.proto.op_type,
            f"domain '{node.proto.domain}' is not built into onnxruntime: register the custom-op library "
            "that implements it (SessionOptions.register_custom_ops_library)",
        )
        for node in facts.nodes
        if node.proto.domain not in ORT_DOMAINS
        and (node.proto.domain, node.proto.op_type) not in facts.functions | PROJECT_OPS
    ]
    if findings:
        return findings, None
    if uses_custom_op(model):
        findings.append(_project_op_finding(facts))
    error = _load_error(model, source)
    if not error:
        return findings, None
    match = _NODE_NAME.search(error)
    name = (match.group(1) or match.group(2)) if match else None
    node = next((n for n in facts.nodes if name and n.proto.name == name), None)
    return [
        *findings,
        Finding(
            "error",
            node.name if node else "",
            node.proto.op_type if node else "",
            f"onnxruntime (CPU) cannot load the model: {error}",
        ),
    ], None
