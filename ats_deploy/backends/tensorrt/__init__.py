"""TensorRT engines: the backend entry.

The engine of an ONNX file is the one ``ats-deploy build FILE --profile NAME`` wrote (a build
takes minutes and has options of its own); bench builds only its dense baseline, reusing the
ATS engine's timing cache (:mod:`ats_deploy.exporters.prepare`). Engines report token counts,
not kept patches. :mod:`.runner` runs a saved engine (:class:`~.runner.TensorRTRunner`) and
holds :func:`~.runner.import_tensorrt`, through which everything that needs TensorRT imports it
when called, so every module here imports on machines without a GPU; :mod:`.plugin` registers
the ``--ats-op custom`` node's kernel with TensorRT. Module-level imports stay light here: the
registry reads this.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..base import Backend, RunOptions, installed_version

if TYPE_CHECKING:
    from .runner import EngineRunner


class TensorRT(Backend):
    name = "tensorrt"
    label = "TensorRT"
    runtime = "tensorrt"
    precisions = ("fp16", "fp32", "int8")  # int8: explicit quantization of the Q/DQ export (exporters/tensorrt/plan.py)
    device = "gpu"
    engines = True
    profile_keys = ("dla_core", "gpu_fallback")

    def unavailable(self) -> str | None:
        if installed_version("tensorrt") is None:
            return "TensorRT is not installed"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None

    def version(self) -> str | None:
        return installed_version("tensorrt")

    def open(self, path: Path, options: RunOptions) -> EngineRunner:
        from .runner import EngineRunner

        return EngineRunner(path, self.label)


BACKEND = TensorRT()
