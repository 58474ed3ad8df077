"""The runtimes bench measures: onnxruntime (CPU, CUDA and TensorRT providers), TensorRT engines, PyTorch.

Every runner takes torch tensors (``images [B, 3, H, W]``, ``keep [S]``) and
returns numpy ``(logits, tokens)``, so timing and accuracy code treat them alike.
A model without a ``keep`` input (a static or a dense export) is simply not fed one.
GPU runners are timed with their host/device copies, as an application sees them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import torch

from ats_deploy.errors import BackendUnavailable
from ats_deploy.exporters import custom_op
from ats_deploy.exporters.validate import Sample, TappedSession, samples, session
from ats_deploy.model import ATSVisionTransformer

PROVIDERS = {
    "onnxruntime": "CPUExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
}
LABELS = {
    "onnxruntime": "onnxruntime CPU",
    "onnxruntime-cuda": "onnxruntime CUDA",
    "onnxruntime-tensorrt": "onnxruntime TensorRT EP",
    "tensorrt": "TensorRT",
    "pytorch": "PyTorch CPU",
}
Outputs = tuple[np.ndarray, np.ndarray]


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or ``None`` when it can."""
    if backend in PROVIDERS:
        import onnxruntime as ort

        provider = PROVIDERS[backend]
        if provider not in ort.get_available_providers():
            return f"onnxruntime here has no {provider} (install onnxruntime-gpu on a machine with CUDA)"
        return None
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except (ImportError, OSError):
            return "TensorRT is not installed"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    return None


def require(backend: str, profile_name: str, overridden: bool) -> None:
    """Refuse, naming ``--backend onnxruntime``, a backend this machine cannot run."""
    reason = unavailable(backend)
    if reason is None:
        return
    asked = f"--backend {backend}" if overridden else f"profile '{profile_name}' runs on {backend}, which"
    raise BackendUnavailable(
        f"{asked} is not available here: {reason}.",
        hint="bench and tune never measure another backend under a profile's name. To measure on this machine's CPU "
        "instead, pass --backend onnxruntime (the results then say that the backend was overridden).",
    )


class TorchRunner:
    """The PyTorch reference (ATS or dense) on the CPU."""

    label = LABELS["pytorch"]

    def __init__(self, model: ATSVisionTransformer) -> None:
        self.model = model

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        with torch.inference_mode():
            logits, tokens = self.model(images, keep)
        return logits.numpy(), tokens.numpy()


class OnnxRuntimeRunner:
    """An ONNX file in onnxruntime, on the execution provider of ``backend``."""

    def __init__(self, path: Path, backend: str, precision: str, threads: int | None, workdir: Path) -> None:
        self.label = LABELS[backend]
        if backend == "onnxruntime":
            self.session = session(str(path), threads)
        else:
            self.session = _gpu_session(path, backend, precision, workdir)
        self.takes_keep = any(i.name == "keep" for i in self.session.get_inputs())
        self.path, self.threads, self.on_cpu = path, threads, backend == "onnxruntime"

    @functools.cached_property
    def tapped(self) -> TappedSession:
        """A second CPU session that also outputs the kept masks (made on first use: only the ATS model needs it)."""
        return TappedSession(str(self.path), self.threads)

    def samples(self, images: torch.Tensor, keep: torch.Tensor) -> list[Sample]:
        """Validation's per-image outputs; with the kept patches on the CPU provider."""
        if not self.on_cpu:
            return samples(*self(images, keep))
        return self.tapped(images.numpy(), keep.numpy())

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        feeds = {"images": images.numpy()}
        if self.takes_keep:
            feeds["keep"] = keep.numpy()
        logits, tokens = self.session.run(["logits", "tokens"], feeds)
        return logits, tokens


def _gpu_session(path: Path, backend: str, precision: str, workdir: Path):
    """A CUDA or TensorRT provider session; fp16 by ONNX conversion (CUDA) or the provider's flag (TensorRT)."""
    import onnxruntime as ort

    provider = PROVIDERS[backend]
    settings: dict[str, object] = {}
    if precision == "fp16" and backend == "onnxruntime-tensorrt":
        settings["trt_fp16_enable"] = True
    elif precision == "fp16":
        from ats_deploy.exporters.tensorrt import to_fp16

        converted = workdir / f"{path.stem}.fp16.onnx"
        onnx.save(to_fp16(onnx.load(str(path))), str(converted))
        path = converted
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if custom_op.uses_custom_op(path):  # the sampler node runs on the CPU provider
        custom_op.register(options)
    sess = ort.InferenceSession(str(path), options, providers=[(provider, settings), "CPUExecutionProvider"])
    if provider not in sess.get_providers():
        raise BackendUnavailable(f"onnxruntime could not create a {provider} session for {path}.")
    return sess


class EngineRunner:
    """A TensorRT engine, through :class:`ats_deploy.exporters.tensorrt.TensorRTRunner`."""

    label = LABELS["tensorrt"]

    def __init__(self, path: Path) -> None:
        from ats_deploy.exporters.tensorrt import TensorRTRunner

        self.runner = TensorRTRunner(path)

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        out = self.runner.run(images.numpy(), keep.numpy())
        return out["logits"], out["tokens"]
