"""ats-deploy: Vision Transformers with Adaptive Token Sampling, from PyTorch to ONNX and TensorRT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .model import ATSOutput, ATSVisionTransformer

__all__ = ["ATSOutput", "ATSVisionTransformer", "__version__", "load_model"]

# Loaded on first use: importing torch takes seconds, and `ats-deploy --help` needs none of it.
_LAZY = frozenset({"ATSOutput", "ATSVisionTransformer"})


def __getattr__(name: str) -> object:
    """``ats_deploy.ATSVisionTransformer`` and ``ats_deploy.ATSOutput``, imported from ``.model`` when asked for."""
    if name in _LAZY:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_model(checkpoint, arch=None, stages=None, keep=None, trust_code: bool = False) -> ATSVisionTransformer:
    """Load an ATS model from a checkpoint file or ``random:SEED`` (then ``arch`` is required).

    See :func:`ats_deploy.checkpoints.load_model` for the accepted formats.
    """
    from .checkpoints import load_model as _load

    return _load(checkpoint, arch=arch, stages=stages, keep=keep, trust_code=trust_code)
