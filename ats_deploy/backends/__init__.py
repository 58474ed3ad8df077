"""The registry of backends: every runtime bench, tune and validation can run an exported model on.

A backend is one module (or a package, with its runner and runtime code) here declaring its
name, label, precisions, device, runtime version, why it cannot run on this machine (``None``
when it can: a missing dependency keeps the backend listed, with its reason) and how to open a
runner for an exported file and a profile (:mod:`.base`). Adding a runtime is a module, its line
in :data:`_REGISTERED`, a built-in profile and its tests; profiles, bench and tune read
everything else from here.
"""

from __future__ import annotations

from ats_deploy.errors import BackendUnavailable, UserError

from . import onnxruntime, openvino_cpu, pytorch_cpu, tensorrt
from .base import Backend, Outputs, Runner, RunOptions

__all__ = ["Backend", "Outputs", "RunOptions", "Runner", "all_backends", "get", "names", "require"]

_REGISTERED: tuple[Backend, ...] = (
    tensorrt.BACKEND,
    onnxruntime.CPU,
    onnxruntime.CUDA,
    onnxruntime.TENSORRT_EP,
    pytorch_cpu.BACKEND,
    openvino_cpu.BACKEND,
)
_BY_NAME = {backend.name: backend for backend in _REGISTERED}


def names() -> tuple[str, ...]:
    """Every backend's name, in registry order."""
    return tuple(_BY_NAME)


def all_backends() -> tuple[Backend, ...]:
    """Every backend, in registry order (results record each one's runtime version)."""
    return _REGISTERED


def get(name: str, option: str = "backend") -> Backend:
    """The backend called ``name``; an unknown name fails listing the known ones (``option``: how the user gave it)."""
    if name not in _BY_NAME:
        raise UserError(f"unknown {option} '{name}'; choose one of: {', '.join(names())}.")
    return _BY_NAME[name]


MEASURE_ELSEWHERE = (
    "bench and tune never measure another backend under a profile's name. To measure on this machine's CPU "
    "instead, pass --backend onnxruntime (the results then say that the backend was overridden)."
)


def require(name: str, profile_name: str, overridden: bool, hint: str = MEASURE_ELSEWHERE) -> Backend:
    """The backend ``name``, refused with ``hint`` (by default: how bench and tune measure elsewhere) when this
    machine cannot run it."""
    backend = get(name)
    reason = backend.unavailable()
    if reason is None:
        return backend
    asked = f"--backend {name}" if overridden else f"profile '{profile_name}' runs on {name}, which"
    raise BackendUnavailable(f"{asked} is not available here: {reason}.", hint=hint)
