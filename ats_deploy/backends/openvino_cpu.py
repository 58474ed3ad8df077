"""OpenVINO on the CPU: runs the ``--dynamic`` ONNX export as it is (``Core.read_model`` reads ONNX).

Inference precision is pinned to f32: on CPUs with AMX or AVX512-BF16 OpenVINO's default
``INFERENCE_PRECISION_HINT`` is bf16, which would move the ATS quantiles (spec section 2) and
the logits far past validation's tolerance; the compiled model is asked back what it runs.
Validation's kept patches come from the same ``ats_kept_<s>`` tensors onnxruntime taps, added
as extra outputs of a second compiled model (``Model.add_outputs``); where that fails, token
counts are compared instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ats_deploy.errors import UserError
from ats_deploy.keep import keep_rows

from .base import Backend, Outputs, RunOptions, installed_version

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .samples import Sample

DEVICE = "CPU"


class OpenVINO(Backend):
    name = "openvino"
    label = "OpenVINO CPU"
    runtime = "openvino"
    # int8: the Q/DQ export as it is; OpenVINO runs its quantized products as i8 FullyConnected (bench/RESULTS.md).
    precisions = ("fp32", "int8")
    device = "cpu"
    default_threads = "default (OpenVINO's choice for this CPU)"

    def unavailable(self) -> str | None:
        if installed_version("openvino") is None:
            return "OpenVINO is not installed (pip install openvino)"
        return None

    def version(self) -> str | None:
        return installed_version("openvino")

    def open(self, path: Path, options: RunOptions) -> OpenVINORunner:
        return OpenVINORunner(path, options.threads)


def _compile(model: Any, threads: int | None, path: Path):
    """``model`` compiled for the CPU in f32, on ``threads`` threads (OpenVINO's default when ``None``)."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config: dict[Any, Any] = {hints.inference_precision: ov.Type.f32}
    if threads:
        config[props.inference_num_threads] = threads
    compiled = ov.Core().compile_model(model, DEVICE, config)
    runs = compiled.get_property(hints.inference_precision)
    if runs != ov.Type.f32:
        raise UserError(f"OpenVINO compiled {path} for {runs} instead of f32 on this CPU; bench compares f32 only.")
    return compiled


class OpenVINORunner:
    """An exported ONNX file compiled by OpenVINO for the CPU."""

    label = OpenVINO.label

    def __init__(self, path: Path, threads: int | None) -> None:
        from ats_deploy.sampler_op import uses_custom_op

        if uses_custom_op(path):
            raise UserError(
                f"{path} uses the ATS custom op, which OpenVINO does not know.",
                hint="Export with --ats-op subgraph (the default: standard ONNX ops) for OpenVINO.",
            )
        self.path, self.threads = path, threads
        self.compiled = _compile(self._read(), threads, path)
        self.request = self.compiled.create_infer_request()
        self.takes_keep = any("keep" in port.get_names() for port in self.compiled.inputs)

    def _read(self):
        import openvino as ov

        return ov.Core().read_model(str(self.path))

    def _feeds(self, images: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
        return {"images": images, "keep": keep} if self.takes_keep else {"images": images}

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        out = self.request.infer(self._feeds(images.numpy(), keep_rows(keep, len(images))))
        return out["logits"], out["tokens"]

    @functools.cached_property
    def tapped(self) -> tuple[Any, list[str]]:
        """A second compiled model that also outputs every stage's kept mask, and their names (none: counts only).

        Made on first use, so the timed model keeps its own outputs.
        """
        import onnx

        from .samples import taps

        names = [name for tensors in taps(onnx.load(str(self.path), load_external_data=False)) for name, _ in tensors]
        model = self._read()
        try:
            model.add_outputs(names)
        except RuntimeError:
            names = []
        return _compile(model, self.threads, self.path).create_infer_request(), names

    def samples(self, images: torch.Tensor, keep: torch.Tensor) -> list[Sample]:
        """Validation's per-image outputs, with the patches every stage kept."""
        from .samples import Sample, kept_positions, samples

        request, names = self.tapped
        out = request.infer(self._feeds(images.numpy(), keep_rows(keep, len(images))))
        if not names:
            return samples(out["logits"], out["tokens"])
        stages = [[out[name]] for name in names]
        logits, tokens = out["logits"], out["tokens"]
        return [Sample(logits[b], tokens[b], kept_positions(stages, b)) for b in range(len(logits))]


BACKEND = OpenVINO()
