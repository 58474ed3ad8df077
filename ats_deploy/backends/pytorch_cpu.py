"""The PyTorch reference on the CPU: what every bench compares against, and a backend of its own.

As a backend (``--backend pytorch``) it runs no exported file: bench then measures the
reference variants only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend, Outputs, installed_version

if TYPE_CHECKING:
    import torch

    from ats_deploy.model import ATSVisionTransformer


class PyTorch(Backend):
    name = "pytorch"
    label = "PyTorch CPU"
    runtime = "torch"
    device = "cpu"
    exports = False

    def version(self) -> str | None:
        return installed_version("torch")


class TorchRunner:
    """A PyTorch model (ATS or dense) on the CPU, in inference mode."""

    label = PyTorch.label

    def __init__(self, model: ATSVisionTransformer) -> None:
        self.model = model

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        import torch

        with torch.inference_mode():
            logits, tokens = self.model(images, keep)
        return logits.numpy(), tokens.numpy()


BACKEND = PyTorch()
