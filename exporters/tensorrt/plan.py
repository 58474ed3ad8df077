"""What to build: an engine plan from the ONNX file's interface and a device profile.

How a reduced precision is built (NVIDIA TensorRT docs, "Migrating from TensorRT 10.x to 11.x",
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x.html):

* TensorRT 11 removed weak typing (``BuilderFlag.FP16``, ``trtexec --fp16``): every
  network is strongly typed and precision comes from the ONNX tensor types.
* TensorRT 10.x offers both. Weak typing (the float32 ONNX plus ``BuilderFlag.FP16``)
  lets TensorRT pick fp16 for any layer, including the ATS budget and the sampling
  cdf that ``ATS_SPEC.md`` section 2 requires in float32; it is also deprecated
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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from ats_deploy.errors import UserError
from ats_deploy.exporters import precisions
from ats_deploy.profiles import Profile

DEFAULT_WORKSPACE_MB = 2048
WEAK_TYPING_REMOVED = 11  # first TensorRT major without weak typing (no BuilderFlag.FP16)


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


def converted_onnx_path(spec: EngineSpec) -> Path:
    """Where a strongly typed build reads its converted ONNX from: ``<engine stem>.<precision>.onnx``."""
    return spec.engine.with_name(f"{spec.engine.stem}.{spec.precision}.onnx")


def engine_info_path(engine: Path) -> Path:
    """The JSON written beside an engine: ONNX metadata, TensorRT version, GPU, build settings."""
    return engine.with_name(f"{engine.name}.json")


def uses_strong_typing(spec: EngineSpec, tensorrt_major: int) -> bool:
    """Whether the build reads the precision's converted ONNX as a strongly typed network (module docstring)."""
    if not precisions.get(spec.precision).converted:
        return False
    return spec.dla_core is None or tensorrt_major >= WEAK_TYPING_REMOVED


def weak_typing_flag(spec: EngineSpec, tensorrt_major: int) -> str | None:
    """The builder flag (``BuilderFlag.<flag>``, ``trtexec --<flag>``) of a weakly typed build, else ``None``."""
    if uses_strong_typing(spec, tensorrt_major):
        return None
    return precisions.get(spec.precision).tensorrt_flag


def needs_shapes(spec: EngineSpec) -> bool:
    """Whether some input has a dynamic dimension (the batch), which needs an optimization profile."""
    return not spec.static
