"""onnxruntime on its CPU, CUDA and TensorRT execution providers: one ONNX file, three backends.

The CPU backend taps every stage's kept-token mask (a second session with extra outputs,
:class:`.session.TappedSession`), so validation compares kept patches; the GPU providers
report token counts. fp16 is the TensorRT provider's own setting; the CUDA provider runs the
fp16 copy of the ONNX file it is given (:mod:`ats_deploy.exporters.prepare` converts it).

Module-level imports stay light (the registry reads this): the runner, the session factory
(:mod:`.session`) and the custom op's kernel (:mod:`.kernel`) load when a file is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import Backend, RunOptions, installed_version

if TYPE_CHECKING:
    from .runner import OnnxRuntimeRunner


class OnnxRuntime(Backend):
    """One onnxruntime execution provider."""

    runtime = "onnxruntime"

    def __init__(
        self,
        name: str,
        label: str,
        provider: str,
        precisions: tuple[str, ...],
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.name, self.label, self.provider, self.precisions = name, label, provider, precisions
        # Provider settings per precision it runs from the float32 file itself (the others run a converted copy).
        self.settings = settings or {}
        self.native = tuple(self.settings)
        self.device = "cpu" if provider == "CPUExecutionProvider" else "gpu"
        self.default_threads = "default (one per physical core)" if self.device == "cpu" else None

    def unavailable(self) -> str | None:
        try:
            import onnxruntime as ort
        except (ImportError, OSError):
            return "onnxruntime is not installed (pip install onnxruntime)"
        if self.provider not in ort.get_available_providers():
            return f"onnxruntime here has no {self.provider} (install onnxruntime-gpu on a machine with CUDA)"
        return None

    def version(self) -> str | None:
        return installed_version("onnxruntime")

    def open(self, path: Path, options: RunOptions) -> OnnxRuntimeRunner:
        from .runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, self, options)


# int8: the Q/DQ file `ats-deploy export --precision int8` writes, run as it is (integer MatMul kernels on the CPU).
CPU = OnnxRuntime("onnxruntime", "onnxruntime CPU", "CPUExecutionProvider", ("fp32", "int8"))
CUDA = OnnxRuntime("onnxruntime-cuda", "onnxruntime CUDA", "CUDAExecutionProvider", ("fp32", "fp16"))
TENSORRT_EP = OnnxRuntime(
    "onnxruntime-tensorrt",
    "onnxruntime TensorRT EP",
    "TensorrtExecutionProvider",
    ("fp32", "fp16"),
    settings={"fp16": {"trt_fp16_enable": True}},
)
