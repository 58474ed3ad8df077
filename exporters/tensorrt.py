"""ONNX -> TensorRT engine, the equivalent ``trtexec`` command, and a runner for the engine.

Everything that needs TensorRT imports it lazily, so this module imports (and its
planning half, :func:`spec_from`, :func:`trtexec_command` and :func:`to_fp16`,
works) on machines without a GPU.

How fp16 is built (NVIDIA TensorRT docs, "Migrating from TensorRT 10.x to 11.x",
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x.html):

* TensorRT 11 removed weak typing (``BuilderFlag.FP16``, ``trtexec --fp16``): every
  network is strongly typed and precision comes from the ONNX tensor types.
* TensorRT 10.x offers both. Weak typing (the float32 ONNX plus ``BuilderFlag.FP16``)
  lets TensorRT pick fp16 for any layer, including the ATS budget and the sampling
  cdf that ``ATS_SPEC.md`` section 2 requires in float32; it is also deprecated
  since 10.12. Strong typing (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``,
  ``trtexec --stronglyTyped``) is "required on 10.x, harmless on 11.x".

So an fp16 GPU engine is built from the ONNX converted by :func:`to_fp16` (which
keeps those parts in float32; NVIDIA's own converter is ModelOpt AutoCast) as a
strongly typed network, on 10.x and 11 alike. The exception is the DLA on 10.x:
its documented recipe is weak typing (``trtexec --useDLACore=0 --fp16
--allowGPUFallback``, docs "Building and Launching the Loadable"), strongly typed
DLA builds being documented only from 11.4.1; there the budget may run in fp16 on
the GPU fallback, which ``ats-deploy validate`` would show as token flips.
JetPack 6 ships TensorRT 10.x; DLA is supported up to 10.7 and again from 11.4.1
with JetPack 7.2.2 (docs "Working with DLA", 11.4.1).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from ..artifact import SIDECAR_KEY, maybe_of_onnx, sidecar_metadata
from ..atomic import atomic_output, write_atomic
from ..errors import BackendUnavailable, UserError
from ..profiles import Profile
from .custom_op import uses_custom_op
from .trt_plugin import register_plugin

if TYPE_CHECKING:
    from rich.console import Console

MIB = 1 << 20
DEFAULT_WORKSPACE_MB = 2048
WEAK_TYPING_REMOVED = 11  # first TensorRT major without weak typing (no BuilderFlag.FP16)
DEFAULT_TRTEXEC_MAJOR = 10  # what JetPack 6 ships

INSTALL_HINT = (
    "`ats-deploy build` needs an NVIDIA GPU with TensorRT. On a GPU machine install it with "
    "`pip install tensorrt` (NVIDIA publishes the wheels; see NVIDIA's TensorRT installation guide); "
    "on a Jetson, JetPack already ships TensorRT and its Python bindings. Without a GPU, run the "
    "ONNX model with onnxruntime, or build later on the target with the trtexec command."
)


# --------------------------------------------------------------------------- what to build


@dataclass
class EngineSpec:
    """Everything a TensorRT build needs, decided from the ONNX file and a device profile.

    ``batch`` is (min, opt, max) of the batch dimension; equal for a static export.
    ``keep_len`` is S, the number of ATS stages (length of the ``keep`` input), or
    ``None`` for a static export whose budget is baked in.
    """

    onnx: Path
    engine: Path
    profile: str
    precision: str
    batch: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    keep_len: int | None
    static: bool
    dla_core: int | None
    gpu_fallback: bool
    timing_cache: Path
    workspace_mb: int = DEFAULT_WORKSPACE_MB


@dataclass(frozen=True)
class _Interface:
    """The parts of the ONNX interface (``ATS_SPEC.md`` section 4) a build depends on."""

    batch: int | None  # None: dynamic
    image_shape: tuple[int, int, int]
    keep_len: int | None  # None: no `keep` input (baked in)


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """A tensor's dimensions, ``None`` for a symbolic or unknown one."""
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim
    ]


def _load_graph(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise UserError(f"{path} does not exist; export a model first with `ats-deploy export`.")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError; any failure means "not an ONNX file"
        raise UserError(f"cannot read {path} as an ONNX model: {exc}") from None


def _interface(model: onnx.ModelProto, path: Path) -> _Interface:
    initializers = {init.name for init in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    if "images" not in inputs:
        raise UserError(
            f"{path} has no input named 'images' (its inputs: {', '.join(inputs) or 'none'}); "
            "build engines from files written by `ats-deploy export` (ATS_SPEC.md section 4)."
        )
    images = _dims(inputs["images"])
    if len(images) != 4 or None in images[1:]:
        shown = "x".join("?" if d is None else str(d) for d in images)
        raise UserError(f"{path}: 'images' must be [batch, 3, H, W] with fixed channels, H and W, got {shown}.")
    keep_len = None
    if "keep" in inputs:
        keep = _dims(inputs["keep"])
        if len(keep) != 1 or keep[0] is None:
            raise UserError(
                f"{path}: 'keep' must be a 1-D tensor [S] of fixed length S (the ATS stages), as "
                "`ats-deploy export` writes it (ATS_SPEC.md section 4); export the model again."
            )
        keep_len = keep[0]
    return _Interface(batch=images[0], image_shape=(images[1], images[2], images[3]), keep_len=keep_len)


def _static_batch(profile: Profile, fixed: int, path: Path) -> tuple[int, int, int]:
    shapes = profile.shapes
    if not profile.batch == shapes.min == shapes.opt == shapes.max == fixed:
        raise UserError(
            f"{path} is a static export for batch {fixed}, but profile '{profile.name}' asks for batch "
            f"{profile.batch} with shapes min {shapes.min}, opt {shapes.opt}, max {shapes.max}.",
            hint="Export with --dynamic to build for a range of batches, or use a profile whose batch and "
            f"shapes min, opt and max are all {fixed}, such as jetson-dla for batch 1.",
        )
    return (fixed, fixed, fixed)


def _dynamic_batch(profile: Profile, path: Path) -> tuple[int, int, int]:
    if profile.dla_core is not None or profile.static:
        why = " (the DLA runs static shapes only)" if profile.dla_core is not None else ""
        raise UserError(
            f"profile '{profile.name}' needs a static export{why}, but {path} has a dynamic batch.",
            hint=f"Export again without --dynamic, with --batch {profile.batch}.",
        )
    return (profile.shapes.min, profile.shapes.opt, profile.shapes.max)


def spec_from(
    onnx_path: Path | str,
    profile: Profile,
    output: Path | str | None = None,
    *,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
) -> EngineSpec:
    """Plan an engine build for ``profile`` from the ONNX file's interface.

    The engine goes to ``output`` (a file, or a directory to put the default name
    in), by default ``<onnx stem>.<profile>.plan`` beside the ONNX. The timing cache
    is ``<profile>.timing.cache`` beside the engine, shared by the engines of one
    profile in that directory.
    """
    onnx_path = Path(onnx_path)
    if profile.backend != "tensorrt":
        raise UserError(
            f"profile '{profile.name}' uses the {profile.backend} backend; TensorRT engines are built for "
            "profiles with backend tensorrt, such as jetson or desktop-gpu."
        )
    io = _interface(_load_graph(onnx_path), onnx_path)
    static = io.batch is not None
    batch = _static_batch(profile, io.batch, onnx_path) if static else _dynamic_batch(profile, onnx_path)
    default_name = f"{onnx_path.stem}.{profile.name}.plan"
    engine = onnx_path.with_name(default_name) if output is None else Path(output)
    if engine.is_dir():
        engine = engine / default_name
    return EngineSpec(
        onnx=onnx_path,
        engine=engine,
        profile=profile.name,
        precision=profile.precision,
        batch=batch,
        image_shape=io.image_shape,
        keep_len=io.keep_len,
        static=static,
        dla_core=profile.dla_core,
        gpu_fallback=profile.gpu_fallback,
        timing_cache=engine.with_name(f"{profile.name}.timing.cache"),
        workspace_mb=workspace_mb,
    )


def fp16_onnx_path(spec: EngineSpec) -> Path:
    """Where a strongly typed fp16 build reads its converted ONNX from (see :func:`write_fp16_onnx`)."""
    return spec.engine.with_name(f"{spec.engine.stem}.fp16.onnx")


def engine_info_path(engine: Path) -> Path:
    """The JSON written beside an engine: ONNX metadata, TensorRT version, GPU, build settings."""
    return engine.with_name(f"{engine.name}.json")


def uses_strong_typing(spec: EngineSpec, tensorrt_major: int) -> bool:
    """Whether an fp16 build goes through :func:`to_fp16` and a strongly typed network (module docstring)."""
    if spec.precision != "fp16":
        return False
    return spec.dla_core is None or tensorrt_major >= WEAK_TYPING_REMOVED


def _needs_shapes(spec: EngineSpec) -> bool:
    """Whether some input has a dynamic dimension (the batch), which needs an optimization profile."""
    return not spec.static


# --------------------------------------------------------------------------- trtexec


def _shapes_flag(spec: EngineSpec, batch: int) -> str:
    channels, height, width = spec.image_shape
    # `keep` is an execution tensor of static length S (float inputs cannot be shape
    # tensors); trtexec only wants shapes for inputs with a dynamic dimension.
    return f"images:{batch}x{channels}x{height}x{width}"


def trtexec_command(spec: EngineSpec, tensorrt_major: int = DEFAULT_TRTEXEC_MAJOR) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`.

    Flags as documented for trtexec 10.x (``--memPoolSize=workspace:<size>M``
    replaced ``--workspace`` in 10.0; docs "Migrating trtexec Usage from TensorRT 8.x
    to 10.x") and 11 (no ``--fp16``; ``--stronglyTyped`` always on). A strongly typed
    fp16 build reads the converted ONNX: create it first with :func:`write_fp16_onnx`
    (pure Python, no GPU needed). A static export takes no shape flags.
    """
    strong = uses_strong_typing(spec, tensorrt_major)
    args = ["trtexec", f"--onnx={fp16_onnx_path(spec) if strong else spec.onnx}", f"--saveEngine={spec.engine}"]
    if _needs_shapes(spec):
        for which, batch in zip(("min", "opt", "max"), spec.batch, strict=True):
            args.append(f"--{which}Shapes={_shapes_flag(spec, batch)}")
    if strong and tensorrt_major < WEAK_TYPING_REMOVED:
        args.append("--stronglyTyped")
    if spec.precision == "fp16" and not strong:
        args.append("--fp16")
    args.append(f"--timingCacheFile={spec.timing_cache}")
    if spec.dla_core is not None:
        args.append(f"--useDLACore={spec.dla_core}")
        if spec.gpu_fallback:
            args.append("--allowGPUFallback")
    args.append(f"--memPoolSize=workspace:{spec.workspace_mb}M")
    args.append("--skipInference")
    return shlex.join(args)


# --------------------------------------------------------------------------- fp16 conversion

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
# Prefix sums over a few hundred tokens lose too much in fp16 for the sampling's cdf.
FP32_OPS = frozenset({"CumSum"})
# Ops that normalise what such a sum adds up (S = s / max(sum(s), tiny), spec section 1
# step 3): an fp16 sum(s) is off by up to 2**-11, which shifts the whole cdf. Emulating
# fp16 tensors on a random-weight DeiT-Tiny export, fp32 here gave 5x fewer quantile
# flips than in fp16. (onnxruntime's CPU provider hides this: its results for this chain
# in fp16 are as exact as fp32, as if it ran them in fp32 behind casts of its own.)
_NORMALISING_OPS = frozenset({"Div", "Clip", "Max", "ReduceSum"})
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
        fp32_ops: frozenset[str],
    ) -> None:
        self.types = types
        self.schemas = [_schema(node, opset) for node in graph.node]
        self.fp16_nodes: set[int] = set()
        self.actual: dict[str, int] = {name: FLOAT for name, t in types.items() if t == FLOAT}
        pinned = self._pinned(graph, fp32_ops)
        tainted = set(fp32_inputs)
        for index, node in enumerate(graph.node):
            floats = [name for name in node.input if self.is_float(name)]
            if self.schemas[index] is None or index in pinned or tainted.intersection(floats):
                tainted.update(name for name in node.output if self.is_float(name))
                continue
            self.fp16_nodes.add(index)
            for position, name in enumerate(node.output):
                if self.is_float(name) and self.allows_fp16(index, position, outputs=True):
                    self.actual[name] = FLOAT16

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == FLOAT

    def _pinned(self, graph: onnx.GraphProto, fp32_ops: frozenset[str]) -> set[int]:
        """Nodes of ``fp32_ops`` and, walking back from them, the ops normalising their inputs."""
        producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
        pinned = {index for index, node in enumerate(graph.node) if node.op_type in fp32_ops}
        todo = list(pinned)
        while todo:
            for name in graph.node[todo.pop()].input:
                index = producer.get(name)
                if index in pinned or index is None or not self.is_float(name):
                    continue
                if graph.node[index].op_type in _NORMALISING_OPS:
                    pinned.add(index)
                    todo.append(index)
        return pinned

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


def to_fp16(
    model: onnx.ModelProto,
    fp32_inputs: Iterable[str] = ("keep",),
    fp32_ops: Iterable[str] = FP32_OPS,
) -> onnx.ModelProto:
    """A float16 copy of ``model`` whose graph inputs and outputs stay float32.

    Float32 weights and constants become float16 (saturating, see
    :func:`_saturate_fp16`) and every op computes in float16 where its ONNX schema
    allows it, except:

    * everything computed from ``fp32_inputs`` through float tensors: the ATS budget
      ``K`` and the quantiles come from ``keep`` and must be float32 (spec section 2);
    * ``fp32_ops`` (CumSum: the sampling cdf), the Div/Clip/Max/ReduceSum chain that
      normalises their input, and everything computed from them;
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
    plan = _Fp16Plan(result.graph, opset, _elem_types(result), fp32, frozenset(fp32_ops))
    _Fp16Rewriter(result.graph, plan).rewrite()
    onnx.checker.check_model(result, full_check=True)
    return result


# --------------------------------------------------------------------------- building


def _import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the package is there but libnvinfer is not
        raise BackendUnavailable(f"TensorRT is not installed here ({exc}).", hint=INSTALL_HINT) from None
    return tensorrt


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(text)


def write_fp16_onnx(spec: EngineSpec, console: Console | None = None, keep: Sequence[float] | None = None) -> Path:
    """Convert ``spec.onnx`` with :func:`to_fp16`, check it on the CPU, and save it at :func:`fp16_onnx_path`.

    Before any device sees the converted file, :func:`fp16_agreement` compares it with ``spec.onnx`` in
    onnxruntime at ``keep`` (default: the keep the export recorded); the figures are printed, and a conversion
    that changes the top-1 of most images is refused (:data:`MIN_TOP1_AGREEMENT`) and not written.
    """
    target = fp16_onnx_path(spec)
    source = onnx.load(str(spec.onnx))
    converted = to_fp16(source)
    with atomic_output(target) as temporary:
        temporary.write_bytes(converted.SerializeToString())
        agreement = fp16_agreement(spec, source, temporary, keep)
        _say(console, agreement.describe(spec))
        agreement.check(spec)
    _say(console, f"wrote {target}: the fp16 copy of {spec.onnx} that a strongly typed build reads")
    return target


# --------------------------------------------------------------------------- fp16 agreement on the CPU

RANDOM_IMAGES = 4
# Below this share of images with the fp32 model's top-1, the fp16 file is refused rather than reported.
MIN_TOP1_AGREEMENT = 0.5


@dataclass(frozen=True)
class Fp16Agreement:
    """The fp16 ONNX against the fp32 one in onnxruntime on the CPU, image by image."""

    photos: int
    images: int  # photos, then random images
    keep: list[float] | None
    top1: int  # images with the same top-1 class
    tokens: int  # images that keep the same number of tokens at every ATS stage
    max_logit_diff: float

    def describe(self, spec: EngineSpec) -> str:
        keep = "" if self.keep is None else f" at keep {','.join(f'{v:g}' for v in self.keep)}"
        return (
            f"fp16 vs fp32 ONNX in onnxruntime (CPU), {self.photos} photos + {self.images - self.photos} random "
            f"images{keep}: same top-1 for {self.top1}/{self.images}, same kept tokens at every stage for "
            f"{self.tokens}/{self.images}, max |logit difference| {self.max_logit_diff:.3g}. A GPU rounds fp16 "
            f"differently: check the engine on the device with `ats-deploy bench {spec.engine} --profile "
            f"{spec.profile}`."
        )

    def check(self, spec: EngineSpec) -> None:
        """Refuse a conversion that changes the prediction of most images."""
        if self.top1 < MIN_TOP1_AGREEMENT * self.images:
            raise UserError(
                f"the fp16 conversion of {spec.onnx} changes the top-1 class of {self.images - self.top1} of "
                f"{self.images} images (at least {MIN_TOP1_AGREEMENT:.0%} must agree); no engine was built.",
                hint="Build for a profile with precision fp32, or report this output.",
            )


def _image_config(model: onnx.ModelProto, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The preprocessing ``ats-deploy export`` recorded in the metadata; timm's ImageNet defaults otherwise."""
    from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    artifact = maybe_of_onnx(model)
    if artifact is not None:
        return {**artifact.data_config, "input_size": image_shape}
    return {
        "input_size": image_shape,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic",
        "crop_pct": DEFAULT_CROP_PCT,
    }


def _agreement_keep(model: onnx.ModelProto, spec: EngineSpec, keep: Sequence[float] | None) -> list[float] | None:
    """``keep``, else the export's recorded keep, else 1.0 per stage; ``None`` when keep is baked in."""
    if spec.keep_len is None:
        return None
    if keep is not None:
        return list(keep)
    artifact = maybe_of_onnx(model)
    recorded = list(artifact.keep) if artifact is not None else []
    return recorded if len(recorded) == spec.keep_len else [1.0] * spec.keep_len


def _run_all(session, images: np.ndarray, keep: list[float] | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and tokens of every image, ``batch`` at a time (the last batch padded with its last image)."""
    logits, tokens = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        feeds = {"images": padded} if keep is None else {"images": padded, "keep": np.asarray(keep, np.float32)}
        out_logits, out_tokens = session.run(["logits", "tokens"], feeds)
        logits.append(out_logits[: len(chunk)])
        tokens.append(out_tokens[: len(chunk)])
    return np.concatenate(logits), np.concatenate(tokens)


def fp16_agreement(
    spec: EngineSpec, fp32: onnx.ModelProto, fp16: Path, keep: Sequence[float] | None = None
) -> Fp16Agreement:
    """Run ``fp16`` and the fp32 model ``spec.onnx`` on the sample photos and a few random images.

    onnxruntime's CPU kernels are not a GPU's, so agreement here does not promise agreement on the device; a
    conversion that already disagrees here is caught before minutes of engine build.
    """
    import onnxruntime as ort

    from ..images import preprocess, random_images, sample_images

    config = _image_config(fp32, spec.image_shape)
    photos = sample_images()
    pictures = [preprocess(list(photos.values()), config), random_images(RANDOM_IMAGES, config)]
    images = np.concatenate([batch.numpy() for batch in pictures])
    values = _agreement_keep(fp32, spec, keep)
    results = []
    for path in (spec.onnx, fp16):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results.append(_run_all(session, images, values, spec.batch[0]))
    (ref_logits, ref_tokens), (logits, tokens) = results
    return Fp16Agreement(
        photos=len(photos),
        images=len(images),
        keep=values,
        top1=int((ref_logits.argmax(axis=-1) == logits.argmax(axis=-1)).sum()),
        tokens=int((ref_tokens == tokens).all(axis=-1).sum()),
        max_logit_diff=float(np.abs(ref_logits - logits).max()),
    )


def _parse(trt, network, logger, source: Path):
    """Parse ``source`` into ``network``; the parser is returned because it owns the weights."""
    # OnnxParser.parse_from_file resolves external weights relative to the file; each
    # error has desc(), node(), node_name() and node_operator() (Python API "Onnx Parser",
    # C++ IParserError in TensorRT 10).
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(source)):
        return parser
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = f" at node {error.node()} ({error.node_operator()} '{error.node_name()}')" if error.node() >= 0 else ""
        errors.append(f"  - {error.desc()}{where}")
    raise UserError(
        f"TensorRT could not parse {source}:\n" + "\n".join(errors),
        hint="Export with the default opset, and check the TensorRT version supports every op "
        "(`trtexec --onnx=... --verbose` prints the full log).",
    )


def _add_optimization_profile(builder, config, spec: EngineSpec) -> None:
    """Batch range of ``images``; static engines need none."""
    if not _needs_shapes(spec):
        return
    profile = builder.create_optimization_profile()
    channels, height, width = spec.image_shape
    low, opt, high = ((batch, channels, height, width) for batch in spec.batch)
    profile.set_shape("images", low, opt, high)
    config.add_optimization_profile(profile)


def _use_dla(trt, config, spec: EngineSpec) -> None:
    # IBuilderConfig.default_device_type / DLA_core and BuilderFlag.GPU_FALLBACK
    # (Python API "IBuilderConfig"; docs "Working with DLA": GPU fallback).
    if spec.dla_core is None:
        return
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = spec.dla_core
    if spec.gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def _use_timing_cache(config, path: Path, console: Console | None) -> None:
    """Reuse kernel timings of earlier builds (IBuilderConfig.create_timing_cache / set_timing_cache)."""
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused, not trusted.
    if not config.set_timing_cache(cache, False):
        _say(console, f"timing cache {path} is from another GPU or TensorRT version; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _engine_info(spec: EngineSpec, trt, strong: bool) -> dict[str, Any]:
    model = onnx.load(str(spec.onnx), load_external_data=False)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(spec).items()}
    return {
        SIDECAR_KEY: sidecar_metadata(model),
        "tensorrt_version": trt.__version__,
        "gpu": _gpu_name(),
        "strongly_typed": strong,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **settings,
    }


def _create_network(trt, builder, strong: bool, major: int):
    # Networks are always explicit-batch since TensorRT 10 (EXPLICIT_BATCH is deprecated and
    # ignored) and always strongly typed since 11 (STRONGLY_TYPED is deprecated and ignored);
    # 10.x opts into strong typing with 1 << STRONGLY_TYPED (Python API "Builder").
    flags = 0
    if strong and major < WEAK_TYPING_REMOVED:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def _configure(trt, builder, spec: EngineSpec, strong: bool, console: Console | None):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb * MIB)
    if spec.precision == "fp16" and not strong:
        _say(console, "fp16 by builder flag (weak typing, the DLA recipe of TensorRT 10): validate the engine")
        config.set_flag(trt.BuilderFlag.FP16)
    _add_optimization_profile(builder, config, spec)
    _use_dla(trt, config, spec)
    _use_timing_cache(config, spec.timing_cache, console)
    return config


def _save(spec: EngineSpec, trt, strong: bool, config, serialized) -> None:
    write_atomic(spec.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    write_atomic(spec.engine, bytes(memoryview(serialized)))
    info = _engine_info(spec, trt, strong)
    write_atomic(engine_info_path(spec.engine), (json.dumps(info, indent=2) + "\n").encode("utf-8"))


def build_engine(spec: EngineSpec, console: Console | None = None, fp16_onnx: Path | None = None) -> Path:
    """Build and save the TensorRT engine of ``spec``; returns the engine path.

    Follows the TensorRT 10/11 Python build flow (docs "Migrating Python Code from
    TensorRT 10.x to 11.x"): Builder -> network -> OnnxParser -> builder config ->
    ``build_serialized_network``. The engine, the timing cache and ``<engine>.json``
    (ONNX metadata, TensorRT version, GPU, settings) are written atomically. A strongly
    typed build reads ``fp16_onnx`` when the caller has already written it with
    :func:`write_fp16_onnx`, so that the model is converted once; else it converts here.
    """
    trt = _import_tensorrt()
    major = _major(trt)
    strong = uses_strong_typing(spec, major)
    source = spec.onnx
    if strong:
        if fp16_onnx is None:
            _say(console, f"converting {spec.onnx} to fp16 for a strongly typed build")
        source = fp16_onnx or write_fp16_onnx(spec, console)
    if uses_custom_op(spec.onnx):
        register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _create_network(trt, builder, strong, major)
    parser = _parse(trt, network, logger, source)
    config = _configure(trt, builder, spec, strong, console)
    _say(console, f"building {spec.engine} with TensorRT {trt.__version__} (this can take minutes)")
    serialized = builder.build_serialized_network(network, config)
    del parser  # it owns the weights, so it had to live until the build was done
    if serialized is None:
        raise UserError(
            f"TensorRT could not build an engine from {source}; its log above names the failing layer.",
            hint=f"The same build from the command line: {trtexec_command(spec, major)}",
        )
    _save(spec, trt, strong, config, serialized)
    _say(console, f"wrote {spec.engine}")
    return spec.engine


# --------------------------------------------------------------------------- running


def _import_cuda_torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("PyTorch is not installed; the TensorRT runner uses its CUDA memory.") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA device is visible to PyTorch; the TensorRT runner needs an NVIDIA GPU and a CUDA build of torch."
        )
    return torch


def _output_allocator(trt, torch):
    """An ``IOutputAllocator`` handing out torch CUDA memory, for data-dependent output shapes."""

    # Python API "IExecutionContext": subclass trt.IOutputAllocator, call its __init__,
    # implement reallocate_output_async and notify_shape (as NVIDIA's dds_faster_rcnn sample).
    class TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                # torch's CUDA caching allocator aligns blocks to 512 bytes, more than TensorRT asks for.
                buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return TorchOutputAllocator()


class TensorRTRunner:
    """Runs a saved engine: numpy in, numpy out, device memory from torch on one CUDA stream.

    Uses the name-based I/O API of TensorRT 10+ (``set_input_shape``,
    ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``; docs
    "Migrating Python Code from TensorRT 8.x to 10.x").
    """

    def __init__(self, engine_path: Path | str) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"engine {self.path} does not exist; build it with `ats-deploy build`.")
        trt = self._trt = _import_tensorrt()
        torch = self._torch = _import_cuda_torch()
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        self._runtime = trt.Runtime(self._logger)
        if self._built_for().get(SIDECAR_KEY, {}).get("ats_op") == "custom":
            register_plugin()
        dla_core = self._built_for().get("dla_core")
        if dla_core is not None:
            self._runtime.DLA_core = dla_core
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise UserError(
                f"TensorRT {trt.__version__} could not load the engine {self.path}.",
                hint="An engine runs only with the TensorRT version and GPU model it was built with; "
                "rebuild it on this machine with `ats-deploy build`.",
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._stream = torch.cuda.Stream()
        self._allocator = _output_allocator(trt, torch)

    def _built_for(self) -> dict[str, Any]:
        info = engine_info_path(self.path)
        return json.loads(info.read_text()) if info.is_file() else {}

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))

    def _accepted(self, name: str) -> str:
        shape = tuple(self._engine.get_tensor_shape(name))
        if -1 not in shape:
            return f"shape {shape}"
        low, _, high = self._engine.get_tensor_profile_shape(name, 0)
        return f"shapes {tuple(low)} to {tuple(high)}"

    def _bind_input(self, name: str, value: np.ndarray):
        array = np.ascontiguousarray(value, dtype=self._dtype(name))
        if not self._context.set_input_shape(name, array.shape):
            raise UserError(
                f"input '{name}' has shape {array.shape}, but engine {self.path} was built for {self._accepted(name)}."
            )
        tensor = self._torch.from_numpy(array).to("cuda")
        self._context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def _bind_output(self, name: str):
        """A buffer of the output's shape, or ``None`` when it is only known after running."""
        shape = tuple(self._context.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            self._context.set_output_allocator(name, self._allocator)
            return None
        dtype = self._torch.from_numpy(np.empty(0, self._dtype(name))).dtype
        tensor = self._torch.empty(shape, dtype=dtype, device="cuda")
        self._context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def _fetch(self, name: str, tensor) -> np.ndarray:
        if tensor is not None:
            return tensor.cpu().numpy()
        shape = self._allocator.shapes[name]
        dtype = self._dtype(name)
        data = self._allocator.buffers[name][: math.prod(shape) * dtype.itemsize]
        return data.cpu().numpy().view(dtype).reshape(shape)

    def run(self, images: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
        """``{"logits": [batch, classes], "tokens": [batch, S]}`` for ``images`` and ``keep``.

        ``keep`` is ignored by a static engine, whose budget is baked in.
        """
        feeds = {"images": images, "keep": keep}
        unknown = [name for name in self.inputs if name not in feeds]
        if unknown:
            raise UserError(f"engine {self.path} has inputs {unknown} that ats-deploy does not know.")
        torch = self._torch
        with torch.cuda.stream(self._stream):
            bound = [self._bind_input(name, feeds[name]) for name in self.inputs]
            outputs = {name: self._bind_output(name) for name in self.outputs}
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path}; see the TensorRT log above.")
            self._stream.synchronize()  # data-dependent shapes are final once the work is done
            result = {name: self._fetch(name, tensor) for name, tensor in outputs.items()}
        del bound  # the inputs' device memory must live until the stream is done
        return result

    __call__ = run
