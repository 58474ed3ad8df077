"""Build and save a TensorRT engine with the official Python API, and the converted ONNX it reads.

Follows the TensorRT 10/11 Python build flow (docs "Migrating Python Code from TensorRT 10.x
to 11.x"): Builder -> network -> OnnxParser -> builder config -> ``build_serialized_network``.
Which precision, and whether the network is strongly typed, is :mod:`.plan`'s decision.
:func:`build_for_profile` is ``ats-deploy build`` from the ONNX file to the engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from ats_deploy import precision as precisions
from ats_deploy.artifact import SIDECAR_KEY, engine_info_path, sidecar_metadata
from ats_deploy.atomic import atomic_output, write_atomic
from ats_deploy.backends.tensorrt.plugin import register_plugin
from ats_deploy.backends.tensorrt.runner import import_tensorrt
from ats_deploy.errors import UserError
from ats_deploy.exporters.precisions import convert
from ats_deploy.sampler_op import uses_custom_op

from .plan import (
    WEAK_TYPING_REMOVED,
    EngineSpec,
    converted_onnx_path,
    needs_conversion,
    needs_shapes,
    spec_from,
    uses_strong_typing,
    weak_typing_flag,
)
from .trtexec import trtexec_command

if TYPE_CHECKING:
    from rich.console import Console

    from ats_deploy.profiles import Profile

MIB = 1 << 20


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _say(console: Console | None, text: str) -> None:
    if console is not None:
        console.print(text)


def write_converted_onnx(spec: EngineSpec, console: Console | None = None, keep: Sequence[float] | None = None) -> Path:
    """Convert ``spec.onnx`` to ``spec.precision``, check it on the CPU, save it at :func:`.plan.converted_onnx_path`.

    Before any device sees the converted file, its precision's agreement check compares it with ``spec.onnx``
    in onnxruntime at ``keep`` (default: the keep the export recorded); the figures are printed, and a
    conversion that changes the top-1 of too many images is refused and not written.
    """
    from ..validate import measure_conversion

    precision = precisions.get(spec.precision)
    target = converted_onnx_path(spec)
    converted = convert(precision, onnx.load(str(spec.onnx)))
    with atomic_output(target) as temporary:
        temporary.write_bytes(converted.SerializeToString())
        agreement = measure_conversion(precision, spec.onnx, temporary, spec.batch[0], keep)
        _say(
            console,
            f"{agreement.describe()} A GPU rounds {precision.name} differently: check the engine on the device "
            f"with `ats-deploy bench {spec.engine} --profile {spec.profile}`.",
        )
        agreement.check(spec.onnx)
    _say(console, f"wrote {target}: the {precision.name} copy of {spec.onnx} that a strongly typed build reads")
    return target


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
    """Batch range of ``images`` and of ``keep``, which shares their batch; static engines need none."""
    if not needs_shapes(spec):
        return
    profile = builder.create_optimization_profile()
    channels, height, width = spec.image_shape
    low, opt, high = ((batch, channels, height, width) for batch in spec.batch)
    profile.set_shape("images", low, opt, high)
    if spec.keep_len is not None:
        low, opt, high = ((batch, spec.keep_len) for batch in spec.batch)
        profile.set_shape("keep", low, opt, high)
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


def _configure(trt, builder, spec: EngineSpec, major: int, console: Console | None):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb * MIB)
    flag = weak_typing_flag(spec, major)
    if flag is not None:
        _say(
            console,
            f"{spec.precision} by builder flag (weak typing, the DLA recipe of TensorRT 10): validate the engine",
        )
        config.set_flag(getattr(trt.BuilderFlag, flag))
    _add_optimization_profile(builder, config, spec)
    _use_dla(trt, config, spec)
    _use_timing_cache(config, spec.timing_cache, console)
    return config


def _save(spec: EngineSpec, trt, strong: bool, config, serialized) -> None:
    write_atomic(spec.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    write_atomic(spec.engine, bytes(memoryview(serialized)))
    info = _engine_info(spec, trt, strong)
    write_atomic(engine_info_path(spec.engine), (json.dumps(info, indent=2) + "\n").encode("utf-8"))


def build_engine(spec: EngineSpec, console: Console | None = None, converted: Path | None = None) -> Path:
    """Build and save the TensorRT engine of ``spec``; returns the engine path.

    Follows the TensorRT 10/11 Python build flow (docs "Migrating Python Code from
    TensorRT 10.x to 11.x"): Builder -> network -> OnnxParser -> builder config ->
    ``build_serialized_network``. The engine, the timing cache and ``<engine>.json``
    (ONNX metadata, TensorRT version, GPU, settings) are written atomically. A strongly
    typed fp16 build reads ``converted`` when the caller has already written it with
    :func:`write_converted_onnx`, so that the model is converted once; else it converts here.
    An int8 (Q/DQ) build parses the export itself into a strongly typed network, with no
    precision flag and no calibrator (explicit quantization, :mod:`.plan`).
    """
    trt = import_tensorrt()
    major = _major(trt)
    strong = uses_strong_typing(spec, major)
    source = spec.onnx
    if needs_conversion(spec, major):
        if converted is None:
            _say(console, f"converting {spec.onnx} to {spec.precision} for a strongly typed build")
        source = converted or write_converted_onnx(spec, console)
    if uses_custom_op(spec.onnx):
        register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _create_network(trt, builder, strong, major)
    parser = _parse(trt, network, logger, source)
    config = _configure(trt, builder, spec, major, console)
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


def build_for_profile(
    model: Path, profile: Profile, output: Path | None, console: Console, *, workspace_mb: int, allow_failed: bool
) -> Path:
    """``ats-deploy build``: plan the engine of ``model`` for ``profile``, convert its ONNX when the precision is
    converted at build time, print the equivalent trtexec command (TensorRT 10), build; returns the engine path.

    An int8 export is built as it is (explicit quantization from its Q/DQ pairs) whatever the profile's precision,
    and a custom-op model has no trtexec command (its plugin is Python): ``console`` says either before the build.
    """
    from rich.markup import escape
    from rich.text import Text

    from ats_deploy.exporters.onnx_export import check_output_path

    spec = spec_from(model, profile, output, workspace_mb=workspace_mb, allow_failed=allow_failed)
    check_output_path(spec.engine)
    if spec.precision != profile.precision:
        console.print(f"{escape(str(model))} holds {spec.precision} Q/DQ pairs: building an {spec.precision} engine "
                      f"from them (strongly typed, float32 elsewhere) rather than profile '{profile.name}''s "
                      f"{profile.precision}; bench it under a profile that says `precision: {spec.precision}`.")
    converted = None
    if uses_custom_op(model):
        console.print("this model holds ats-deploy's AdaptiveTokenSampler nodes: their TensorRT plugin is "
                      "Python (TensorRT >= 10.6), which `ats-deploy build` registers and plain trtexec cannot load.")
    else:
        if needs_conversion(spec, 10):
            keep = profile.keep_for(spec.keep_len) if spec.keep_len else None
            converted = write_converted_onnx(spec, console, keep)
        console.print("[bold]equivalent trtexec command[/] (TensorRT 10):")
        console.print(Text(trtexec_command(spec)), soft_wrap=True, highlight=False)
    return build_engine(spec, console, converted)
