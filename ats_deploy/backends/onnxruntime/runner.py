"""An ONNX file in onnxruntime: the CPU provider through the session factory, a GPU provider with its settings."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ats_deploy.errors import BackendUnavailable
from ats_deploy.keep import keep_rows
from ats_deploy.sampler_op import uses_custom_op

from ..base import Outputs, RunOptions
from ..samples import Sample, samples
from .session import TappedSession, session

if TYPE_CHECKING:
    import torch

    from . import OnnxRuntime


class OnnxRuntimeRunner:
    """An ONNX file in onnxruntime, on the execution provider of ``backend``."""

    def __init__(self, path: Path, backend: OnnxRuntime, options: RunOptions) -> None:
        self.label, self.backend = backend.label, backend
        if backend.device == "cpu":
            self.session = session(str(path), options.threads)
        else:
            self.session = _gpu_session(path, backend, options)
        self.takes_keep = any(i.name == "keep" for i in self.session.get_inputs())
        self.path, self.threads = path, options.threads

    @functools.cached_property
    def tapped(self) -> TappedSession:
        """A second CPU session that also outputs the kept masks (made on first use: only the ATS model needs it)."""
        return TappedSession(str(self.path), self.threads)

    def samples(self, images: torch.Tensor, keep: torch.Tensor) -> list[Sample]:
        """Validation's per-image outputs; with the kept patches on the CPU provider."""
        if self.backend.device != "cpu":
            return samples(*self(images, keep))
        return self.tapped(images.numpy(), keep_rows(keep, len(images)))

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        feeds = {"images": images.numpy()}
        if self.takes_keep:
            feeds["keep"] = keep_rows(keep, len(images))
        logits, tokens = self.session.run(["logits", "tokens"], feeds)
        return logits, tokens


def _gpu_session(path: Path, backend: OnnxRuntime, options: RunOptions):
    """A CUDA or TensorRT provider session of ``path`` as given, with the provider's settings for the precision."""
    import onnxruntime as ort

    from .kernel import register

    settings: dict[str, Any] = dict(backend.settings.get(options.precision, {}))
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    if uses_custom_op(path):  # the sampler node runs on the CPU provider
        register(session_options)
    providers = [(backend.provider, settings), "CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), session_options, providers=providers)
    if backend.provider not in sess.get_providers():
        raise BackendUnavailable(f"onnxruntime could not create a {backend.provider} session for {path}.")
    return sess
