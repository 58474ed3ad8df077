"""TensorRT engines, through :class:`ats_deploy.exporters.tensorrt.runner.TensorRTRunner`.

The engine of an ONNX file is the one ``ats-deploy build FILE --profile NAME`` wrote (a build
takes minutes and has options of its own); bench builds only its dense baseline, reusing the
ATS engine's timing cache. Engines report token counts, not kept patches.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ats_deploy.keep import keep_rows

from .base import Backend, Outputs, RunOptions, installed_version

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from ats_deploy.profiles import Profile


class TensorRT(Backend):
    name = "tensorrt"
    label = "TensorRT"
    runtime = "tensorrt"
    precisions = ("fp16", "fp32", "int8")  # int8: explicit quantization of the Q/DQ export (exporters/tensorrt/plan.py)
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
        return EngineRunner(path)

    def prepare(self, onnx_path: Path, profile: Profile, like: Path, workdir: Path, status: Console) -> Path:
        from ats_deploy.exporters.tensorrt.build import build_engine
        from ats_deploy.exporters.tensorrt.plan import spec_from

        cache = like.with_name(f"{profile.name}.timing.cache")  # the engine ``like``'s kernel timings
        spec = replace(spec_from(onnx_path, profile, output=workdir, allow_failed=True), timing_cache=cache)
        return build_engine(spec, status)


class EngineRunner:
    """A TensorRT engine file: numpy through the engine, torch tensors in and numpy out like every runner."""

    label = TensorRT.label

    def __init__(self, path: Path) -> None:
        from ats_deploy.exporters.tensorrt.runner import TensorRTRunner

        self.runner = TensorRTRunner(path)

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        out = self.runner.run(images.numpy(), keep_rows(keep, len(images)))
        return out["logits"], out["tokens"]


BACKEND = TensorRT()
