"""The ``trtexec`` command line that builds the same engine as :func:`.build.build_engine`.

Pure Python: ``ats-deploy build`` prints it on machines without TensorRT, for use on the device.
"""

from __future__ import annotations

import shlex

from .plan import (
    WEAK_TYPING_REMOVED,
    EngineSpec,
    needs_shapes,
    source_onnx,
    uses_strong_typing,
    weak_typing_flag,
)

DEFAULT_TRTEXEC_MAJOR = 10  # what JetPack 6 ships


def _shapes_flag(spec: EngineSpec, batch: int) -> str:
    channels, height, width = spec.image_shape
    # `keep [batch, S]` shares the images' batch (docs/ATS.md section 4): both get the same range.
    images = f"images:{batch}x{channels}x{height}x{width}"
    return images if spec.keep_len is None else f"{images},keep:{batch}x{spec.keep_len}"


def trtexec_command(spec: EngineSpec, tensorrt_major: int = DEFAULT_TRTEXEC_MAJOR) -> str:
    """The ``trtexec`` command line for ``spec``.

    Flags as documented for trtexec 10.x (``--memPoolSize=workspace:<size>M``
    replaced ``--workspace`` in 10.0; docs "Migrating trtexec Usage from TensorRT 8.x
    to 10.x") and 11 (no ``--fp16``; ``--stronglyTyped`` always on). A strongly typed
    fp16 build reads the converted ONNX: create it first with
    :func:`.build.write_converted_onnx` (pure Python, no GPU needed); an int8 (Q/DQ)
    build reads the export itself, with ``--stronglyTyped`` and no ``--int8``. A static
    export takes no shape flags.
    """
    strong = uses_strong_typing(spec, tensorrt_major)
    args = ["trtexec", f"--onnx={source_onnx(spec, tensorrt_major)}", f"--saveEngine={spec.engine}"]
    if needs_shapes(spec):
        for which, batch in zip(("min", "opt", "max"), spec.batch, strict=True):
            args.append(f"--{which}Shapes={_shapes_flag(spec, batch)}")
    if strong and tensorrt_major < WEAK_TYPING_REMOVED:
        args.append("--stronglyTyped")
    flag = weak_typing_flag(spec, tensorrt_major)
    if flag is not None:
        args.append(f"--{flag.lower()}")
    args.append(f"--timingCacheFile={spec.timing_cache}")
    if spec.dla_core is not None:
        args.append(f"--useDLACore={spec.dla_core}")
        if spec.gpu_fallback:
            args.append("--allowGPUFallback")
    args.append(f"--memPoolSize=workspace:{spec.workspace_mb}M")
    args.append("--skipInference")
    return shlex.join(args)
