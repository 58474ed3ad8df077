"""float32 ONNX -> float16 ONNX that keeps the ATS budget, quantiles, cdf and sampling in float32.

The registry's fp16 conversion (:mod:`ats_deploy.precision`, made at build): TensorRT builds its fp16
engines as strongly typed networks from this copy, and onnxruntime's CUDA provider runs it.
NVIDIA's own converter is ModelOpt AutoCast; this one knows which parts of an ATS stage
docs/ATS.md requires in float32 (:mod:`.float32`, the rule int8 keeps too).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from ats_deploy.errors import UserError
from ats_deploy.sampler_op import kept_masks, kept_name

from .float32 import cdf_inputs, sampling_path

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_DTYPE_ATTRIBUTES = ("to", "dtype")  # Cast.to; EyeLike/Random*/Bernoulli.dtype


def _saturate_fp16(array: np.ndarray) -> np.ndarray:
    """float32 -> float16 without turning large values into inf or tiny guards into 0.

    Magnitudes above fp16's maximum become the maximum (a mask of -3.4e38 stays a
    mask); non-zero magnitudes below its smallest subnormal become that subnormal,
    so a ``max(x, tiny)`` guard against division by zero stays positive. inf and
    NaN are kept.
    """
    info = np.finfo(np.float16)
    finite = np.isfinite(array)
    clipped = np.where(finite, np.clip(array, -info.max, info.max), array)
    tiny = finite & (clipped != 0) & (np.abs(clipped) < info.smallest_subnormal)
    clipped = np.where(tiny, np.sign(clipped) * info.smallest_subnormal, clipped)
    return clipped.astype(np.float16)


def _fp16_tensor(tensor: TensorProto, name: str) -> TensorProto:
    return numpy_helper.from_array(_saturate_fp16(numpy_helper.to_array(tensor)), name)


class _Names:
    """Fresh tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {init.name for init in graph.initializer}
        self.used.update(v.name for v in [*graph.input, *graph.output])
        for node in graph.node:
            self.used.update([node.name, *node.input, *node.output])

    def fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self.used:
            name, index = f"{base}_{index}", index + 1
        self.used.add(name)
        return name


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor, from ONNX's own shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError, or ValueError for models over 2 GB
        raise UserError(f"cannot convert to fp16: ONNX type inference failed: {exc}") from None
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        for output in node.output:
            if output and output not in types:
                raise UserError(
                    f"cannot convert to fp16: ONNX could not infer the type of '{output}' "
                    f"({node.op_type} node '{node.name}')."
                )
    return types


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Turn float ``Constant`` nodes into initializers, so both are converted the same way."""
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attribute = node.attribute[0]
        if attribute.name == "value" and attribute.t.data_type == FLOAT:
            value = numpy_helper.to_array(attribute.t)
        elif attribute.name in ("value_float", "value_floats"):
            value = np.asarray(helper.get_attribute_value(attribute), dtype=np.float32)
        else:
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        del graph.node[index]


class _Fp16Plan:
    """Which nodes (by index) compute in fp16, and the type each float tensor ends up with."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        opset: int,
        types: dict[str, int],
        fp32_inputs: set[str],
        pinned: set[int],
    ) -> None:
        self.types = types
        self.schemas = [_schema(node, opset) for node in graph.node]
        self.fp16_nodes: set[int] = set()
        self.actual: dict[str, int] = {name: FLOAT for name, t in types.items() if t == FLOAT}
        tainted = set(fp32_inputs)
        for index, node in enumerate(graph.node):
            floats = [name for name in node.input if self.is_float(name)]
            if self.schemas[index] is None or tainted.intersection(floats):
                tainted.update(name for name in node.output if self.is_float(name))
                continue
            if index in pinned:  # on a sampling path: float32; its fp16 readers after the mask read a cast
                continue
            self.fp16_nodes.add(index)
            for position, name in enumerate(node.output):
                if self.is_float(name) and self.allows_fp16(index, position, outputs=True):
                    self.actual[name] = FLOAT16

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def allows_fp16(self, index: int, position: int, outputs: bool = False) -> bool:
        """Whether node ``index``'s formal parameter at ``position`` accepts float16 (its type constraint)."""
        schema = self.schemas[index]
        params = schema.outputs if outputs else schema.inputs
        if position < len(params):
            param = params[position]
        elif params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            param = params[-1]
        else:
            return False
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        return "tensor(float16)" in allowed.get(param.type_str, {param.type_str})

    def wanted(self, index: int, position: int) -> int:
        if index in self.fp16_nodes and self.allows_fp16(index, position):
            return FLOAT16
        return FLOAT


def _schema(node: onnx.NodeProto, opset: int) -> onnx.defs.OpSchema | None:
    if node.op_type in _CONTROL_FLOW or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
        raise UserError(
            f"cannot convert to fp16: {node.op_type} node '{node.name}' has a subgraph; to_fp16 handles "
            "plain graphs only. Build in fp32, or convert with NVIDIA ModelOpt AutoCast."
        )
    if node.domain not in ("", "ai.onnx"):
        return None  # custom ops: their fp16 support is unknown, so they stay fp32
    try:
        return onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


class _Fp16Rewriter:
    """Rewrites the graph of a plan: converted constants, Casts where types change."""

    def __init__(self, graph: onnx.GraphProto, plan: _Fp16Plan) -> None:
        self.graph, self.plan = graph, plan
        self.names = _Names(graph)
        self.initializers = {init.name: init for init in graph.initializer if init.data_type == FLOAT}
        self.provided: dict[tuple[str, int], str] = {}
        self.new_initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def provide(self, name: str, wanted: int) -> str:
        """``name`` as a tensor of type ``wanted``: itself, a converted constant, or a Cast of it."""
        if self.plan.actual[name] == wanted:
            return name
        key = (name, wanted)
        if key not in self.provided:
            suffix = "fp16" if wanted == FLOAT16 else "fp32"
            converted = self.names.fresh(f"{name}_{suffix}")
            if name in self.initializers and wanted == FLOAT16:
                self.new_initializers.append(_fp16_tensor(self.initializers[name], converted))
            else:
                node_name = self.names.fresh(f"{converted}_cast")
                self.nodes.append(helper.make_node("Cast", [name], [converted], name=node_name, to=wanted))
            self.plan.actual[converted] = wanted
            self.provided[key] = converted
        return self.provided[key]

    def rename_fp16_outputs(self) -> list[tuple[str, str]]:
        """Graph outputs stay float32: an fp16 output is renamed and cast back at the end."""
        renames = []
        for output in self.graph.output:
            if self.plan.actual.get(output.name) == FLOAT16:
                inner = self.names.fresh(f"{output.name}_fp16")
                renames.append((output.name, inner))
                self.plan.actual[inner] = FLOAT16
                self.plan.types[inner] = FLOAT
                for node in self.graph.node:
                    node.input[:] = [inner if n == output.name else n for n in node.input]
                    node.output[:] = [inner if n == output.name else n for n in node.output]
        return renames

    def rewrite(self) -> None:
        renames = self.rename_fp16_outputs()
        for index, original in enumerate(self.graph.node):
            node = onnx.NodeProto()
            node.CopyFrom(original)
            for position, name in enumerate(node.input):
                if self.plan.is_float(name):
                    node.input[position] = self.provide(name, self.plan.wanted(index, position))
            if index in self.plan.fp16_nodes:
                _retype_attributes(node)
            self.nodes.append(node)
        for outer, inner in renames:
            self.nodes.append(
                helper.make_node("Cast", [inner], [outer], name=self.names.fresh(f"{outer}_cast"), to=FLOAT)
            )
        self.graph.initializer.extend(self.new_initializers)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        _drop_unused_initializers(self.graph)
        del self.graph.value_info[:]  # the float32 types recorded there are stale now


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Attributes that fix a float32 output type (Cast.to, ConstantOfShape.value, ...) -> float16."""
    for attribute in node.attribute:
        if attribute.name in _DTYPE_ATTRIBUTES and attribute.type == attribute.INT and attribute.i == FLOAT:
            attribute.i = FLOAT16
        elif attribute.name == "value" and attribute.type == attribute.TENSOR and attribute.t.data_type == FLOAT:
            attribute.t.CopyFrom(_fp16_tensor(attribute.t, attribute.t.name))


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used.update(output.name for output in graph.output)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def to_fp16(model: onnx.ModelProto, fp32_inputs: Iterable[str] = ("keep",)) -> onnx.ModelProto:
    """A float16 copy of ``model`` whose graph inputs and outputs stay float32.

    Float32 weights and constants become float16 (saturating, see
    :func:`_saturate_fp16`) and every op computes in float16 where its ONNX schema
    allows it, except:

    * everything computed from ``fp32_inputs`` through float tensors: the ATS budget
      ``K`` and the quantiles come from ``keep`` and must be float32 (docs/ATS.md, section 2);
    * each stage's sampling path from the cdf on (:func:`.float32.sampling_path` bounded by
      :func:`.float32.cdf_inputs`): the cdf, a prefix sum over a few hundred tokens that loses too
      much in fp16, its comparison with the quantiles and the sampling up to the kept-token mask;
    * ops outside the standard ONNX domain, whose fp16 support is unknown.

    Casts are inserted where a tensor changes type; graph inputs are cast once.
    ``model`` must have its weights loaded and be under 2 GB (ONNX shape inference
    serializes it). It is not modified.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result = onnx.inliner.inline_local_functions(result)
    _constants_to_initializers(result.graph)
    graph_inputs = {i.name for i in result.graph.input}
    opset = next((o.version for o in result.opset_import if o.domain in ("", "ai.onnx")), 1)
    fp32 = set(fp32_inputs) & graph_inputs
    pinned = _sampling_path(result)
    plan = _Fp16Plan(result.graph, opset, _elem_types(result), fp32, pinned)
    _Fp16Rewriter(result.graph, plan).rewrite()
    onnx.checker.check_model(result, full_check=True)
    return result


def _sampling_path(model: onnx.ModelProto) -> set[int]:
    """The nodes that stay float32 from each cdf on; a cdf without a named kept-token mask is refused."""
    cdfs = cdf_inputs(model)
    if cdfs and not kept_masks(model):
        raise UserError(
            "cannot convert to fp16: the graph computes a cdf (CumSum) but names no kept-token mask "
            f"({kept_name(0)}, ...), so the float32 sampling path cannot be found.",
            hint="Convert an ONNX file written by `ats-deploy export`.",
        )
    return sampling_path(model, cdfs)


def convert(model: onnx.ModelProto) -> onnx.ModelProto:
    """The registry's conversion: :func:`to_fp16` with the float32 inputs and ops of an ATS export."""
    return to_fp16(model)
