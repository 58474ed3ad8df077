"""The model Triton's Python backend runs for ``ats-deploy serve``: an export on a backend of the registry.

Triton's Python backend imports :class:`TritonPythonModel` (through the ``model.py`` that
:mod:`.server` writes into the model folder) in a process of its own per instance. Each
``execute`` gets the requests the dynamic batcher put together. Every request's ``keep`` is
checked on its own and a bad one gets its own error (``InferenceResponse(error=...)``), so it
never fails the requests it was batched with; the good ones run as one batch, each with its
own keep row (docs/ATS.md section 4). PyTriton's inference callables cannot do this: a callable
answers a whole batch or raises, and the raise fails every request in it.

Triton 2.51 (PyTriton 0.7.0) counts a request answered with an error response as a success in
``nv_inference_request_success`` (triton-inference-server/server#7713); only a raise counts as a
failure, and a raise fails the whole batch. So the model keeps its own counters beside Triton's
(:data:`SUCCESS`, :data:`FAILURE`, by reason), which count each request as its client saw it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ats_deploy.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from ats_deploy.backends import Runner

PARAMETER = "ats_deploy_serve"  # the model config parameter that carries the Settings, as JSON
SUCCESS = "ats_inference_request_success"  # Prometheus counters on Triton's metrics port, per model
FAILURE = "ats_inference_request_failure"  # ... and per reason: INVALID_ARG (HTTP 400) or INTERNAL (500)


@dataclass(frozen=True)
class Settings:
    """What a model instance opens: the exported file, on which backend, and the keep a request without one gets."""

    model: str
    backend: str
    precision: str
    threads: int | None
    keep: list[float]
    workdir: str  # where the converted copy a precision needs is written (ats_deploy.exporters.prepare)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_config(cls, model_config: dict[str, Any]) -> Settings:
        """The settings in a model config as Triton hands it to ``initialize`` (parsed JSON)."""
        return cls(**json.loads(model_config["parameters"][PARAMETER]["string_value"]))


def open_runner(settings: Settings) -> Runner:
    """The settings' exported file opened on their backend, as bench opens it."""
    from ats_deploy import backends
    from ats_deploy.exporters import prepare

    options = backends.RunOptions(settings.precision, settings.threads)
    return prepare.open_runner(backends.get(settings.backend), Path(settings.model), options, Path(settings.workdir))


def keep_problem(keep: np.ndarray, images: int) -> str | None:
    """Why a request's keep rows ``[n, S]`` cannot run (the rules of spec section 2), or ``None`` when they can.

    Triton has already checked the dtype and the row length against the model config.
    """
    from ats_deploy.keep import Keep

    if len(keep) != images:
        return f"keep has {len(keep)} rows for {images} images: send one row per image (or no keep)"
    for row in keep.tolist():
        try:
            Keep(tuple(row))
        except UserError as err:
            return f"keep row {row}: {err.message}"
    return None


def images_problem(images: np.ndarray | None, dims: list[int]) -> str | None:
    """Why a request's images cannot run, or ``None``: missing (``keep`` being optional, Triton no longer checks
    that the required input is there), or pixels that are NaN or infinite (the model would answer garbage).
    """
    import numpy as np

    if images is None:
        return f"the request has no input 'images': send FP32 images [batch, {', '.join(map(str, dims))}]"
    if not np.isfinite(images).all():
        return "input 'images' holds NaN or infinite pixel values: send finite FP32 pixels"
    return None


def freeze_heap() -> None:
    """Exempt what start-up loaded (~400k objects: torch, onnx, the runtime) from Python's garbage collector.

    A full collection walks every tracked object: ~300 ms here, and the collector starts one on its own now
    and then, stalling whichever request is running (measured: 1 call in 40-80 took +0.5 s on a loaded 2-core
    machine). Objects created while serving are still collected.
    """
    import gc

    gc.collect()
    gc.freeze()


def run_batch(runner: Runner, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run several requests' ``(images, keep rows)`` as one batch; each request's ``(logits, tokens)`` in order."""
    import numpy as np
    import torch

    images = np.concatenate([pixels for pixels, _ in requests])
    keep = np.concatenate([rows for _, rows in requests])
    logits, tokens = runner(torch.from_numpy(images), torch.from_numpy(keep))
    ends = np.cumsum([len(pixels) for pixels, _ in requests])[:-1]
    return list(zip(np.split(np.asarray(logits), ends), np.split(np.asarray(tokens), ends), strict=True))


class TritonPythonModel:
    """The Python backend's model interface: ``initialize`` once per instance, ``execute`` per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        import numpy as np
        import triton_python_backend_utils as pb_utils

        config = json.loads(args["model_config"])
        settings = Settings.from_config(config)
        self.image_dims = next(list(map(int, t["dims"])) for t in config["input"] if t["name"] == "images")
        self.runner = open_runner(settings)
        self.default_keep = np.asarray(settings.keep, dtype=np.float32)
        self.counters = _Counters(pb_utils, config["name"])
        freeze_heap()

    def execute(self, requests: list) -> list:
        """One response per request, in order: the bad ones answered with their error, the good ones run together."""
        import triton_python_backend_utils as pb_utils

        parsed = [self._parse(pb_utils, request) for request in requests]
        answers: dict[int, Any] = {
            i: self._error(pb_utils, item, pb_utils.TritonError.INVALID_ARG) for i, item in enumerate(parsed)
            if isinstance(item, str)
        }
        good = [i for i in range(len(requests)) if i not in answers]
        if good:
            answers.update(self._run(pb_utils, good, [parsed[i] for i in good]))
        return [answers[i] for i in range(len(requests))]

    def _parse(self, pb_utils: Any, request: Any) -> tuple[np.ndarray, np.ndarray] | str:
        """A request's ``(images, keep rows)``, its keep the profile's when it sent none; or what is wrong with it."""
        import numpy as np

        sent_images = pb_utils.get_input_tensor_by_name(request, "images")
        images = None if sent_images is None else sent_images.as_numpy()
        problem = images_problem(images, self.image_dims)
        if problem:
            return problem
        sent = pb_utils.get_input_tensor_by_name(request, "keep")
        if sent is None:
            return images, np.tile(self.default_keep, (len(images), 1))
        keep = sent.as_numpy()
        problem = keep_problem(keep, len(images))
        return problem if problem else (images, keep)

    def _run(self, pb_utils: Any, indices: list[int], requests: list) -> dict[int, Any]:
        try:
            outputs = run_batch(self.runner, requests)
        except Exception as exc:  # the runtime failed the whole batch: every request in it learns why
            return {i: self._error(pb_utils, f"the model failed on this batch: {exc}", pb_utils.TritonError.INTERNAL)
                    for i in indices}
        self.counters.success.increment(len(indices))
        return {
            i: pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("logits", logits), pb_utils.Tensor("tokens", tokens.astype("int64"))]
            )
            for i, (logits, tokens) in zip(indices, outputs, strict=True)
        }

    def _error(self, pb_utils: Any, message: str, code: int) -> Any:
        self.counters.failure(code).increment(1)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class _Counters:
    """The model's own request counters on Triton's metrics port (see the module's docstring for why)."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        counter = pb_utils.MetricFamily.COUNTER
        successes = pb_utils.MetricFamily(
            name=SUCCESS, description="Requests the ATS model answered with outputs", kind=counter
        )
        self.success = successes.Metric(labels={"model": model})
        failures = pb_utils.MetricFamily(
            name=FAILURE, description="Requests the ATS model answered with an error, by reason", kind=counter
        )
        self._families = (successes, failures)  # a family deleted before its metrics fails every update
        self._failure = {
            getattr(pb_utils.TritonError, code): failures.Metric(labels={"model": model, "reason": reason})
            for code, reason in (("INVALID_ARG", "invalid_argument"), ("INTERNAL", "internal"))
        }

    def failure(self, code: int) -> Any:
        return self._failure[code]
