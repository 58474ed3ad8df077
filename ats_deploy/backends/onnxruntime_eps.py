"""onnxruntime on its CPU, CUDA and TensorRT execution providers: one ONNX file, three backends.

The CPU backend taps every stage's kept-token mask (a second session with extra outputs,
:class:`~ats_deploy.exporters.validate.TappedSession`), so validation compares kept patches;
the GPU providers report token counts. fp16 is the TensorRT provider's flag, or (CUDA) the
fp16 copy of the ONNX file that :mod:`ats_deploy.exporters.precisions` converts.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ats_deploy.errors import BackendUnavailable
from ats_deploy.keep import keep_rows

from .base import Backend, Outputs, RunOptions, installed_version

if TYPE_CHECKING:
    import torch

    from ats_deploy.exporters.validate import Sample, TappedSession


class OnnxRuntime(Backend):
    """One onnxruntime execution provider."""

    runtime = "onnxruntime"

    def __init__(
        self, name: str, label: str, provider: str, precisions: tuple[str, ...], fp16: dict[str, Any] | None = None
    ) -> None:
        self.name, self.label, self.provider, self.precisions = name, label, provider, precisions
        self.fp16 = fp16  # provider settings that run fp16; None: convert the ONNX file to fp16 instead
        self.on_cpu = provider == "CPUExecutionProvider"
        self.default_threads = "default (one per physical core)" if self.on_cpu else None

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
        return OnnxRuntimeRunner(path, self, options)


class OnnxRuntimeRunner:
    """An ONNX file in onnxruntime, on the execution provider of ``backend``."""

    def __init__(self, path: Path, backend: OnnxRuntime, options: RunOptions) -> None:
        from ats_deploy.exporters.validate import session

        self.label, self.backend = backend.label, backend
        if backend.on_cpu:
            self.session = session(str(path), options.threads)
        else:
            self.session = _gpu_session(path, backend, options)
        self.takes_keep = any(i.name == "keep" for i in self.session.get_inputs())
        self.path, self.threads = path, options.threads

    @functools.cached_property
    def tapped(self) -> TappedSession:
        """A second CPU session that also outputs the kept masks (made on first use: only the ATS model needs it)."""
        from ats_deploy.exporters.validate import TappedSession

        return TappedSession(str(self.path), self.threads)

    def samples(self, images: torch.Tensor, keep: torch.Tensor) -> list[Sample]:
        """Validation's per-image outputs; with the kept patches on the CPU provider."""
        from ats_deploy.exporters.validate import samples

        if not self.backend.on_cpu:
            return samples(*self(images, keep))
        return self.tapped(images.numpy(), keep_rows(keep, len(images)))

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        feeds = {"images": images.numpy()}
        if self.takes_keep:
            feeds["keep"] = keep_rows(keep, len(images))
        logits, tokens = self.session.run(["logits", "tokens"], feeds)
        return logits, tokens


def _gpu_session(path: Path, backend: OnnxRuntime, options: RunOptions):
    """A CUDA or TensorRT provider session; fp16 by the provider's settings or by ONNX conversion."""
    import onnx
    import onnxruntime as ort

    from ats_deploy.exporters import custom_op, precisions

    settings: dict[str, Any] = {}
    precision = precisions.get(options.precision)
    if precision.name == "fp16" and backend.fp16 is not None:
        settings.update(backend.fp16)
    elif precision.converted:
        converted = (options.workdir or path.parent) / f"{path.stem}.{precision.name}.onnx"
        onnx.save(precision.convert(onnx.load(str(path))), str(converted))
        path = converted
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    if custom_op.uses_custom_op(path):  # the sampler node runs on the CPU provider
        custom_op.register(session_options)
    providers = [(backend.provider, settings), "CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), session_options, providers=providers)
    if backend.provider not in sess.get_providers():
        raise BackendUnavailable(f"onnxruntime could not create a {backend.provider} session for {path}.")
    return sess


# int8: the Q/DQ file `ats-deploy export --precision int8` writes, run as it is (integer MatMul kernels on the CPU).
CPU = OnnxRuntime("onnxruntime", "onnxruntime CPU", "CPUExecutionProvider", ("fp32", "int8"))
CUDA = OnnxRuntime("onnxruntime-cuda", "onnxruntime CUDA", "CUDAExecutionProvider", ("fp32", "fp16"))
TENSORRT_EP = OnnxRuntime(
    "onnxruntime-tensorrt",
    "onnxruntime TensorRT EP",
    "TensorrtExecutionProvider",
    ("fp32", "fp16"),
    fp16={"trt_fp16_enable": True},
)
