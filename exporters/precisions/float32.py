"""What stays float32 in every reduced precision: one graph rule, read back from each stage's kept-token mask.

docs/ATS.md: a reduced-precision model keeps the budget, quantiles, cdf and sampling in float32. Each stage's
kept-token mask is named in the graph as it is traced (:func:`ats_deploy.sampler_op.kept_masks`), so the
sampling path is found by walking back from it: :func:`sampling_path` is the nodes a mask is computed from,
back to where a precision's own boundary says its reduced part ends (int8: the stage's weighted matrix
products, :func:`.int8.sampling_nodes`; fp16: what the cdf sums, :func:`cdf_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from ats_deploy.sampler_op import kept_masks

CDF_OP = "CumSum"  # the cdf is a prefix sum over the tokens (docs/ATS.md, section 1), ONNX's only one


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """The index of the node that computes each tensor."""
    return {name: index for index, node in enumerate(graph.node) for name in node.output if name}


def ancestors(graph: onnx.GraphProto, tensors: Iterable[str], made_by: dict[str, int]) -> set[int]:
    """Indices of the nodes that compute any of ``tensors``, directly or through others."""
    found: set[int] = set()
    todo = [made_by[name] for name in tensors if name in made_by]
    while todo:
        index = todo.pop()
        if index in found:
            continue
        found.add(index)
        todo.extend(made_by[name] for name in graph.node[index].input if name in made_by)
    return found


def sampling_path(model: onnx.ModelProto, boundary: Iterable[str]) -> set[int]:
    """Indices of the nodes each kept-token mask is computed from, less those its ``boundary`` tensors are.

    The budget and quantiles from ``keep`` are always on it; how far back towards the stage's tokens it reaches
    is the ``boundary`` tensors' choice (their own producers are left off too). A mask's boundary is those of
    ``boundary`` it is computed from, so an earlier stage's never cuts a later stage's path short. A graph
    without named masks (a dense model, a custom-op export) has none.
    """
    graph = model.graph
    made_by = producers(graph)
    stops = [name for name in boundary if name in made_by]
    path: set[int] = set()
    for mask in kept_masks(model):
        upstream = ancestors(graph, [mask], made_by)
        path |= upstream - ancestors(graph, [name for name in stops if made_by[name] in upstream], made_by)
    return path


def cdf_inputs(model: onnx.ModelProto) -> list[str]:
    """What each stage's cdf sums (``S``, docs/ATS.md section 1 step 3): fp16's boundary, the cdf on stays float32."""
    return [node.input[0] for node in model.graph.node if node.op_type == CDF_OP]
