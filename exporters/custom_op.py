"""``--ats-op custom``: one ``ats_deploy::AdaptiveTokenSampler`` node per ATS stage.

The TorchScript exporter scopes the nodes of each stage's :class:`~ats_deploy.model.TokenSampler`
as ``/samplers.<s>/...`` (``/model/samplers.<s>/...`` in static exports).
:func:`replace_samplers` swaps each such subgraph for a single node, so a runtime
can run the sampling as one kernel (TensorRT: :mod:`.trt_plugin`; onnxruntime:
:func:`register`, a Python op of onnxruntime-extensions).

The node (domain ``ats_deploy``, version 5), for a model with ``P`` prefix tokens:

=========  ==================================  =================================================
inputs     ``scores`` float32 [B, N-P, 1]      significance of the patch tokens P..N-1
           ``clamp`` float32 [1 or B, N-P, 1]  ``-2`` from the last valid token on, else 0
           ``u`` float32 [B or 1, 1, G]        each image's quantiles (``+inf`` slots never count)
outputs    ``index`` int64 [B, m, 1]           kept tokens, prefix tokens first, padded
           ``mask`` float32 [B, m, 1]          key mask: 0 at kept tokens, ``-inf`` in padded slots
           ``n_kept`` float32 [B, 1]           tokens each image kept (K' + P), whole numbers
           ``length`` int32 []                 m, the plugin's size tensor in TensorRT
attribute  ``length`` int                      static m, or -1: m = most tokens kept in the batch
           ``prefix`` int                      P, the prefix tokens kept first and never sampled
=========  ==================================  =================================================

Its semantics are :func:`sample_tokens`, i.e. ``ats.compact(ats.sample(...))``. The
last output exists because TensorRT requires a plugin's size tensors (here m, a
data-dependent dimension) to be plugin outputs, and its ONNX parser requires the
node to have as many outputs as the plugin; nothing consumes it. The string
attributes ``plugin_namespace`` / ``plugin_version`` are how the TensorRT ONNX parser
(before 10.10) finds the plugin: it looks plugins up by op type, ``plugin_version``
(default "1") and ``plugin_namespace`` (default ""), not by the node's domain.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ats_deploy import ats
from ats_deploy.errors import BackendUnavailable, UserError

DOMAIN = "ats_deploy"
OP_TYPE = "AdaptiveTokenSampler"
# 1: (scores, last, u, quantile_count) -> (index, valid, n_kept), tokens on the last dim;
# 2: scores [B, N-1] and u [G]; 3: scores [B, N-1, 1] and u [1, G], as the reference's sampler takes them;
# 4: n_kept float32 (TensorRT 8.6 reduces only floats, so the subgraph counts in float32);
# 5: u [B, 1, G], one row of quantiles per image (ATS_SPEC version 2), and the prefix attribute.
OP_VERSION = 5
ATS_OPS = ("subgraph", "custom")
DYNAMIC = -1

# ``/samplers.3/TopK`` or ``/model/samplers.3/TopK``: group 1 is the stage.
_SCOPE = re.compile(r"(?:^|/)samplers\.(\d+)/")
# (name, dtype, rank) of the sampler's inputs and outputs, in the node's order. The inputs
# are also the order in which the sampler's nodes first read them (scores and clamp share
# a signature): scores by the total, clamp by the cdf, u by the count.
_INPUTS = (
    ("scores", np.dtype(np.float32), 3),
    ("clamp", np.dtype(np.float32), 3),
    ("u", np.dtype(np.float32), 3),
)
_OUTPUTS = (
    ("index", np.dtype(np.int64), 3),
    ("mask", np.dtype(np.float32), 3),
    ("n_kept", np.dtype(np.float32), 2),
)


def sample_tokens(
    scores: torch.Tensor, clamp: torch.Tensor, u: torch.Tensor, length: int, prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one ``AdaptiveTokenSampler`` node computes: the reference's ``TokenSampler``."""
    kept, count = ats.sample(scores, clamp, u, prefix)
    # Counts never exceed the K-P quantiles drawn: K bounds them as the model's n0 does.
    return ats.compact(kept, count, u.shape[-1] + 1, None if length < 0 else length)


# --------------------------------------------------------------------------- graph surgery


@dataclass
class _Stage:
    """The nodes of one ``TokenSampler`` call; ``prefix`` is their common name scope."""

    index: int
    prefix: str
    nodes: list


def apply_ats_op(model: onnx.ModelProto, ats_op: str) -> onnx.ModelProto:
    """The exported model with the sampling written as ``ats_op`` asks (see :data:`ATS_OPS`)."""
    if ats_op not in ATS_OPS:
        raise UserError(f"unknown --ats-op '{ats_op}'; choose one of {', '.join(ATS_OPS)}.")
    return replace_samplers(model) if ats_op == "custom" else model


def replace_samplers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every stage's sampling subgraph by one ``AdaptiveTokenSampler`` node.

    Keeps the opset, IR version and metadata (adding ``ats_op: custom``), and checks
    the result with ``onnx.checker`` (full check, which runs strict shape inference).
    """
    if uses_custom_op(model):
        return model  # already rewritten
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("exporter") == "dynamo":
        raise _needs_torchscript("it was exported with the dynamo exporter")
    prefix = int(props.get("prefix_tokens", "1"))
    graph = gs.import_onnx(model)
    stages = _find_stages(graph)
    _check_stage_count(stages, props, graph)
    if not stages:
        return model
    previous = None
    for stage in stages:
        previous = _replace(graph, stage, previous, prefix)
    graph.cleanup().toposort()
    return _finish(gs.export_onnx(graph), model)


def _needs_torchscript(reason: str) -> UserError:
    return UserError(
        f"--ats-op custom cannot rewrite this model: {reason}.",
        hint="Export with --exporter torchscript (the default): it scopes each sampler's nodes as "
        "/samplers.<s>/..., which the rewrite replaces. The dynamo exporter names nodes by ATen op and moves "
        "part of the sampler's shape arithmetic out of that scope.",
    )


def _find_stages(graph) -> list[_Stage]:
    stages: dict[int, _Stage] = {}
    for node in graph.nodes:
        match = _SCOPE.search(node.name)
        if match:
            index = int(match.group(1))
            stage = stages.setdefault(index, _Stage(index, node.name[: match.end()], []))
            stage.nodes.append(node)
    return [stages[index] for index in sorted(stages)]


def _check_stage_count(stages: list[_Stage], props: dict[str, str], graph) -> None:
    """Every ATS stage must have its scope: else the exporter named nodes another way."""
    expected = len(json.loads(props["stages"])) if "stages" in props else None
    if expected is not None and len(stages) != expected:
        raise _needs_torchscript(f"it has {expected} ATS stages but {len(stages)} /samplers.<s>/ node scopes")
    if not stages and any(node.op == "TopK" for node in graph.nodes):
        raise _needs_torchscript("its TopK nodes are outside any /samplers.<s>/ node scope")


def _boundary(graph, stage: _Stage) -> tuple[list, list]:
    """Tensors the stage reads from outside, and those it produces for outside (or as graph outputs)."""
    members = {id(node) for node in stage.nodes}
    produced = {id(t) for node in stage.nodes for t in node.outputs}
    graph_outputs = {id(t) for t in graph.outputs}
    inputs: dict[int, object] = {}
    for node in stage.nodes:
        for tensor in node.inputs:
            if id(tensor) not in produced and not tensor.is_empty():
                inputs.setdefault(id(tensor), tensor)
    outputs = [
        tensor
        for node in stage.nodes
        for tensor in node.outputs
        if id(tensor) in graph_outputs or any(id(consumer) not in members for consumer in tensor.outputs)
    ]
    return list(inputs.values()), outputs


def _signature(tensor) -> tuple[np.dtype | None, int | None]:
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype, tensor.values.ndim
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
    return dtype, (len(tensor.shape) if tensor.shape is not None else None)


def _is_parameter(tensor, stage: _Stage) -> bool:
    """A constant of the subgraph itself (axes, pads, ``tiny``), not one of its three inputs.

    The sampler's own constants are named inside its scope; the exporter's shared
    initializers (``onnx::ReduceSum_507``) are integer axes. The first stage's
    ``clamp`` and, in static exports, ``u`` are constants too, folded outside the
    scope, so they keep names from outside it and float types.
    """
    if not isinstance(tensor, gs.Constant):
        return False
    return tensor.name.startswith(stage.prefix) or not (
        np.issubdtype(tensor.values.dtype, np.floating) or tensor.values.dtype == np.bool_
    )


def _by_signature(tensors: list, wanted: tuple) -> list | None:
    """``tensors`` in the order of ``wanted`` (name, dtype, rank), None where one is missing.

    Returns None unless each tensor matches its own entry of ``wanted``.
    """
    found = {_signature(t): t for t in tensors}
    ordered = [found.get((dtype, rank)) for _, dtype, rank in wanted]
    return ordered if sum(t is not None for t in ordered) == len(tensors) else None


def _in_reading_order(tensors: list, stage: _Stage) -> list | None:
    """``tensors`` ordered by the first node of the stage that reads them, if they match :data:`_INPUTS`."""
    first = {id(t): min(i for i, node in enumerate(stage.nodes) if any(x is t for x in node.inputs)) for t in tensors}
    ordered = sorted(tensors, key=lambda t: first[id(t)])
    return ordered if [_signature(t) for t in ordered] == [(dtype, rank) for _, dtype, rank in _INPUTS] else None


def _interface(graph, stage: _Stage) -> tuple[list, list]:
    """The stage's inputs and outputs in the node's order, or a UserError naming what differs.

    An output nothing reads is None (the last stage's ``index`` and ``mask`` when the head pools
    the class token): the node still produces it, into a fresh tensor.
    """
    inputs, outputs = _boundary(graph, stage)
    data = [t for t in inputs if not _is_parameter(t, stage)]
    ordered_inputs, ordered_outputs = _in_reading_order(data, stage), _by_signature(outputs, _OUTPUTS)
    if ordered_inputs is None or ordered_outputs is None:
        raise UserError(
            f"the sampler scope {stage.prefix} reads {_list(data)} and hands on {_list(outputs)}; "
            f"the {OP_TYPE} op needs exactly {_list(_INPUTS)} in and {_list(_OUTPUTS)} out.",
            hint="Export with --ats-op subgraph: this model's sampler graph differs from the reference's.",
        )
    return ordered_inputs, ordered_outputs


def _list(items) -> str:
    """``name (dtype, rank r)`` of tensors or of (name, dtype, rank) specs."""
    described = [item if isinstance(item, tuple) else (item.name, *_signature(item)) for item in items]
    shown = [f"{name} ({'unknown type' if dtype is None else dtype}, rank {rank})" for name, dtype, rank in described]
    return f"{len(shown)} tensors: " + ", ".join(shown)


def _static_length(stage: _Stage, u, previous: int | None, prefix: int) -> int:
    """The stage's static token count, else :data:`DYNAMIC`.

    The k of its TopK when constant. A static export's last stage has no TopK when
    the head pools the class token (the last block computes only that token's row,
    so nothing is compacted); there it is ``min(K, tokens reaching the stage)``, as
    the static reference pads to: ``K - P`` is the static length of its quantile
    row ``u``, the tokens reaching it the static length of the stage before
    (``previous``; None for the first stage, which the model's ``n0 >= K`` feeds).
    """
    for node in stage.nodes:
        if node.op == "TopK" and isinstance(node.inputs[1], gs.Constant):
            return int(node.inputs[1].values.reshape(-1)[0])
    shape = u.values.shape if isinstance(u, gs.Constant) else u.shape
    drawn = shape[-1] if shape else None
    if not isinstance(drawn, int) or previous == DYNAMIC:
        return DYNAMIC
    return drawn + prefix if previous is None else min(drawn + prefix, previous)


def _replace(graph, stage: _Stage, previous: int | None, prefix: int) -> int:
    """Swap the stage's subgraph for one node; returns its static length (or :data:`DYNAMIC`)."""
    inputs, outputs = _interface(graph, stage)
    length = _static_length(stage, inputs[2], previous, prefix)
    for node in stage.nodes:  # detach the subgraph; cleanup() then drops it
        node.inputs.clear()
        node.outputs.clear()
    batch = inputs[0].shape[0] if inputs[0].shape else "batch"
    kept = length if length >= 0 else f"ats_tokens_{stage.index}"
    shapes = {"index": [batch, kept, 1], "mask": [batch, kept, 1], "n_kept": [batch, 1]}
    for i, (name, dtype, _) in enumerate(_OUTPUTS):
        if outputs[i] is None:
            outputs[i] = gs.Variable(f"{stage.prefix}{OP_TYPE}_{name}")
        outputs[i].dtype, outputs[i].shape = dtype.type, shapes[name]
    size = gs.Variable(f"{stage.prefix}{OP_TYPE}_length", dtype=np.int32, shape=[])
    graph.nodes.append(
        gs.Node(
            op=OP_TYPE,
            name=f"{stage.prefix}{OP_TYPE}",
            domain=DOMAIN,
            attrs={
                "length": length,
                "prefix": prefix,
                "plugin_namespace": DOMAIN,
                "plugin_version": str(OP_VERSION),
            },
            inputs=inputs,
            outputs=[*outputs, size],
        )
    )
    return length


def _finish(rewritten: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Carry over what graphsurgeon's export drops, declare the domain, and check."""
    del rewritten.opset_import[:]
    rewritten.opset_import.extend(original.opset_import)
    rewritten.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OP_VERSION))
    rewritten.ir_version = original.ir_version
    rewritten.producer_name, rewritten.producer_version = original.producer_name, original.producer_version
    props = {p.key: p.value for p in original.metadata_props} | {"ats_op": "custom"}
    del rewritten.metadata_props[:]
    for key, value in props.items():
        rewritten.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten


# --------------------------------------------------------------------------- onnxruntime


def uses_custom_op(model: onnx.ModelProto | str | Path) -> bool:
    """Whether the model (or the ONNX file) imports the ``ats_deploy`` domain, i.e. needs :func:`register`."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(op.domain == DOMAIN for op in model.opset_import)


def register(options) -> None:
    """Make ``AdaptiveTokenSampler`` runnable in sessions created with ``options`` (an ``ort.SessionOptions``).

    onnxruntime-extensions runs Python functions as ops ("PyOp"); an ``op_type`` of
    the form ``domain::name`` registers the op in that domain, so the model keeps
    its own ``ats_deploy`` domain (onnxruntime-extensions ``pyop/pyfunc.cc``,
    ``PyCustomOpDef::AddOp``). The Python ops reach the session together with the
    extension library (``register_custom_ops_library``).
    """
    extensions = _import_extensions()
    _declare_onnxruntime_op(extensions)
    options.register_custom_ops_library(extensions.get_library_path())


def _import_extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise BackendUnavailable(
            "running an --ats-op custom model in onnxruntime needs onnxruntime-extensions, which is not installed.",
            hint="pip install onnxruntime-extensions, or export with --ats-op subgraph.",
        ) from None
    return onnxruntime_extensions


@functools.cache
def _declare_onnxruntime_op(extensions) -> None:
    """Declare the Python op once per process: each declaration adds one more kernel to the domain."""
    types = extensions.PyCustomOpDef
    extensions.onnx_op(
        op_type=f"{DOMAIN}::{OP_TYPE}",
        inputs=[types.dt_float, types.dt_float, types.dt_float],
        outputs=[types.dt_int64, types.dt_float, types.dt_float, types.dt_int32],
        attrs={"length": types.dt_int64, "prefix": types.dt_int64},
    )(_onnxruntime_kernel)


def _onnxruntime_kernel(
    scores: np.ndarray, clamp: np.ndarray, u: np.ndarray, length: int = DYNAMIC, prefix: int = 1
) -> tuple[np.ndarray, ...]:
    """The PyOp body: onnxruntime passes numpy arrays and the attributes as keywords."""
    arrays = (scores, clamp, u)
    index, mask, n_kept = sample_tokens(*(torch.from_numpy(a) for a in arrays), length, prefix)
    return index.numpy(), mask.numpy(), n_kept.numpy(), np.array(index.shape[1], dtype=np.int32)
