"""What every backend declares, and the runner contract bench, tune and validation rely on.

A runner takes torch tensors (``images [B, 3, H, W]``, ``keep [B, S]``, or ``[S]`` for one
row serving every image: :func:`ats_deploy.keep.keep_rows`) and returns numpy
``(logits, tokens)``; a model without a ``keep`` input (a static or a dense export) is
simply not fed one. A runner may also offer ``samples(images, keep)``: validation's
per-image :class:`~ats_deploy.backends.samples.Sample` with the patches every stage
kept, where the runtime can report them.

A backend opens the file it is given: the engine or the converted copy a profile's precision
needs is made beforehand by the exporters (:mod:`ats_deploy.exporters.prepare`).

Module-level imports stay light (no torch, onnx or runtime): the profile loader and the
CLI's ``--help`` read the registry, and a missing runtime must only make its backend
unavailable, never the registry unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

Outputs = tuple["np.ndarray", "np.ndarray"]


class Runner(Protocol):
    """One model opened on one runtime."""

    label: str

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs: ...


@dataclass(frozen=True)
class RunOptions:
    """How to open a runner: a profile's precision (for a backend's own settings, :attr:`Backend.native`) and
    threads."""

    precision: str = "fp32"
    threads: int | None = None


class Backend:
    """A runtime bench, tune and validation can run an exported model on.

    Subclasses set the class attributes and override :meth:`unavailable`, :meth:`version` and :meth:`open`.
    """

    name: str
    label: str  # what tables and plots call the runtime
    runtime: str  # the package whose version results record
    precisions: tuple[str, ...] = ("fp32",)  # the first is what it runs when a profile asks for another
    device: str  # where it runs, "cpu" or "gpu": whether threads apply, Triton's instance kind
    # Converted precisions (fp16) it runs from the float32 file by a setting of its own (a provider flag);
    # for the others it opens the converted copy :mod:`ats_deploy.exporters.prepare` writes.
    native: tuple[str, ...] = ()
    # What `threads: null` means on this backend; None where threads do not apply (a GPU).
    default_threads: str | None = None
    engines: bool = False  # runs the engine `ats-deploy build` wrote for the ONNX file, not the file itself
    exports: bool = True  # False: runs the PyTorch reference only, no exported file
    profile_keys: tuple[str, ...] = ()  # backend-specific profile keys it accepts (dla_core, ...)

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine (a missing package, no device), or ``None`` when it can."""
        return None

    def version(self) -> str | None:
        """The runtime's version string, or ``None`` when it is not installed."""
        return None

    def precision(self, asked: str) -> str:
        """The precision it runs for a profile asking ``asked``: a CPU backend runs fp32 whatever a GPU profile says."""
        return asked if asked in self.precisions else self.precisions[0]

    def open(self, path: Path, options: RunOptions) -> Runner:
        """A runner of the exported file (or engine) ``path``, as given."""
        raise NotImplementedError(f"backend {self.name} runs no exported file")


def installed_version(module: str) -> str | None:
    """``module.__version__``, or ``None`` when it cannot be imported (absent, or its native library missing)."""
    import importlib

    try:
        return importlib.import_module(module).__version__
    except (ImportError, OSError):
        return None
