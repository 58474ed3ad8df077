"""What to build: an engine plan from the ONNX file's interface and a device profile.

How a reduced precision is built (NVIDIA TensorRT docs, "Migrating from TensorRT 10.x to 11.x",
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x.html):

* TensorRT 11 removed weak typing (``BuilderFlag.FP16``, ``trtexec --fp16``): every
  network is strongly typed and precision comes from the ONNX tensor types.
* TensorRT 10.x offers both. Weak typing (the float32 ONNX plus ``BuilderFlag.FP16``)
  lets TensorRT pick fp16 for any layer, including the ATS budget and the sampling
  cdf that ``docs/ATS.md`` section 2 requires in float32; it is also deprecated
  since 10.12. Strong typing (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``,
  ``trtexec --stronglyTyped``) is "required on 10.x, harmless on 11.x".

So a reduced-precision GPU engine is built from the ONNX its precision converts
(:mod:`ats_deploy.exporters.precisions`, which keeps those parts in float32) as a
strongly typed network, on 10.x and 11 alike. The exception is the DLA on 10.x:
its documented recipe is weak typing (``trtexec --useDLACore=0 --fp16
--allowGPUFallback``, docs "Building and Launching the Loadable"), strongly typed
DLA builds being documented only from 11.4.1; there the budget may run in fp16 on
the GPU fallback, which ``ats-deploy validate`` would show as token flips.
JetPack 6 ships TensorRT 10.x; DLA is supported up to 10.7 and again from 11.4.1
with JetPack 7.2.2 (docs "Working with DLA", 11.4.1).

INT8 is explicit quantization: the ``--precision int8`` export holds its Q/DQ pairs, and
"explicit quantization [is used] with Strong Typing. Precision-control build flags are not
required and should not be specified" (docs "Explicit Quantization",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html).
So a Q/DQ file is built as it is, strongly typed, with no INT8 flag and no calibrator, under
any profile: its Q/DQ pairs and float32 tensors fix every layer's precision, and the engine
is an int8 one (the build says so when the profile asked for another precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from ats_deploy import precision as precisions
from ats_deploy.artifact import maybe_of_onnx, refuse_failed
from ats_deploy.errors import UserError
from ats_deploy.exporters.precisions import int8
from ats_deploy.profiles import Profile

DEFAULT_WORKSPACE_MB = 2048
WEAK_TYPING_REMOVED = 11  # first TensorRT major without weak typing (no BuilderFlag.FP16)


@dataclass
class EngineSpec:
    """Everything a TensorRT build needs, decided from the ONNX file and a device profile.

    ``batch`` is (min, opt, max) of the batch dimension; equal for a static export.
    ``keep_len`` is S, the number of ATS stages (``keep`` is ``[batch, S]``: its batch range
    follows the images'), or ``None`` for a static export whose budget is baked in.
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
    """The parts of the ONNX interface (``docs/ATS.md`` section 4) a build depends on."""

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
            "build engines from files written by `ats-deploy export` (docs/ATS.md section 4)."
        )
    images = _dims(inputs["images"])
    if len(images) != 4 or None in images[1:]:
        shown = "x".join("?" if d is None else str(d) for d in images)
        raise UserError(f"{path}: 'images' must be [batch, 3, H, W] with fixed channels, H and W, got {shown}.")
    keep_len = None
    if "keep" in inputs:
        keep = _dims(inputs["keep"])
        if len(keep) != 2 or keep[1] is None:
            raise UserError(
                f"{path}: 'keep' must be [batch, S], one row per image with S (the ATS stages) fixed, as "
                "`ats-deploy export` writes it since interface version 2 (docs/ATS.md section 4).",
                hint="Export the model again with `ats-deploy export CHECKPOINT --dynamic`.",
            )
        keep_len = keep[1]
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


def _precision(model: onnx.ModelProto, profile: Profile, path: Path) -> str:
    """The precision the engine is built in: the file's own when it holds Q/DQ, else the profile's."""
    if int8.quantized(model):
        return precisions.explicit().name
    if precisions.get(profile.precision).explicit:
        raise UserError(
            f"profile '{profile.name}' asks for {profile.precision}, and {path} holds no QuantizeLinear/"
            "DequantizeLinear pairs: TensorRT builds int8 from a calibrated Q/DQ export (explicit quantization).",
            hint="Export it with `ats-deploy export CHECKPOINT --dynamic --precision int8 --calibration DIR` "
            "(DIR: a few hundred real images) and build the .int8.onnx file it writes.",
        )
    return profile.precision


def spec_from(
    onnx_path: Path | str,
    profile: Profile,
    output: Path | str | None = None,
    *,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    allow_failed: bool = False,
) -> EngineSpec:
    """Plan an engine build for ``profile`` from the ONNX file's interface.

    A file marked as having failed validation is refused unless ``allow_failed`` (bench, which judges the
    engine against the reference itself, allows it).

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
    graph = _load_graph(onnx_path)
    refuse_failed(maybe_of_onnx(graph), onnx_path, allow_failed)
    io = _interface(graph, onnx_path)
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
        precision=_precision(graph, profile, onnx_path),
        batch=batch,
        image_shape=io.image_shape,
        keep_len=io.keep_len,
        static=static,
        dla_core=profile.dla_core,
        gpu_fallback=profile.gpu_fallback,
        timing_cache=engine.with_name(f"{profile.name}.timing.cache"),
        workspace_mb=workspace_mb,
    )


def converted_onnx_path(spec: EngineSpec) -> Path:
    """Where a strongly typed build reads its converted ONNX from: ``<engine stem>.<precision>.onnx``."""
    return spec.engine.with_name(f"{spec.engine.stem}.{spec.precision}.onnx")


def uses_strong_typing(spec: EngineSpec, tensorrt_major: int) -> bool:
    """Whether the network is strongly typed: a Q/DQ file, or a converted precision's ONNX (module docstring)."""
    precision = precisions.get(spec.precision)
    if precision.explicit:
        return True
    if precision.stage != "build":
        return False
    return spec.dla_core is None or tensorrt_major >= WEAK_TYPING_REMOVED


def needs_conversion(spec: EngineSpec, tensorrt_major: int) -> bool:
    """Whether the build reads a converted copy of the ONNX file (:func:`converted_onnx_path`) rather than the file."""
    return uses_strong_typing(spec, tensorrt_major) and precisions.get(spec.precision).stage == "build"


def source_onnx(spec: EngineSpec, tensorrt_major: int) -> Path:
    """The ONNX file TensorRT parses: the converted copy where the precision converts, else the export itself."""
    return converted_onnx_path(spec) if needs_conversion(spec, tensorrt_major) else spec.onnx


def weak_typing_flag(spec: EngineSpec, tensorrt_major: int) -> str | None:
    """The builder flag (``BuilderFlag.<flag>``, ``trtexec --<flag>``) of a weakly typed build, else ``None``."""
    if uses_strong_typing(spec, tensorrt_major):
        return None
    return precisions.get(spec.precision).tensorrt_flag


def needs_shapes(spec: EngineSpec) -> bool:
    """Whether some input has a dynamic dimension (the batch), which needs an optimization profile."""
    return not spec.static
