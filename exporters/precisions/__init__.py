"""The precisions a model is built or run in: what each converts, what stays float32, and its CPU check.

``ATS_SPEC.md`` section 5: a reduced-precision model keeps the budget, quantiles, cdf and
sampling in float32 and is compared with the float32 reference by agreement, not bit for
bit. A precision is a line in :data:`_REGISTERED` and, when it converts the exported file,
a module here with ``convert(model) -> model`` (:mod:`.fp16`). Profiles validate their
``precision:`` against these names; which backends run a precision stays each backend's
own declaration (:attr:`ats_deploy.backends.Backend.precisions`).

Module-level imports stay light (no onnx or numpy): the profile loader reads the names.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ats_deploy.errors import UserError

if TYPE_CHECKING:
    import onnx

    from .agreement import Agreement

# The parts of an ATS stage that stay float32 in every precision (ATS_SPEC.md section 5).
ATS_FLOAT32 = ("budget K", "quantiles", "cdf", "sampling")


@dataclass(frozen=True)
class Precision:
    """One precision: how the exported float32 file becomes a file of it, and how far it may disagree."""

    name: str
    converts: str  # what the conversion changes, for people
    keeps_float32: tuple[str, ...]  # what stays float32 after it
    module: str | None = None  # the module here whose ``convert`` makes the copy; None: the file as exported
    # TensorRT 10's weak-typing builder flag (BuilderFlag.<flag>, trtexec --<flag in lower case>): the DLA's
    # recipe before 11.4.1, which lets TensorRT pick the precision per layer (exporters/tensorrt/plan.py).
    tensorrt_flag: str | None = None
    # The least share of images that must keep the float32 top-1 with every token kept (keep 1.0), and below
    # keep 1.0, where the sampling turns small score changes into other tokens. 1.0: compared exactly instead
    # (fp32 matches patch for patch, exporters/validate.py). Judged by :func:`.agreement.top1_agreement`.
    min_top1_agreement: float = 1.0
    min_top1_agreement_sampled: float | None = None  # None: the same bar below keep 1.0
    # The export itself carries the precision (Q/DQ pairs): TensorRT builds it as it is, strongly typed, with no
    # precision flag (explicit quantization, exporters/tensorrt/plan.py).
    explicit: bool = False

    @property
    def exact(self) -> bool:
        """Whether a file of this precision must match the float32 reference patch for patch (fp32 only)."""
        return self.min_top1_agreement >= 1.0

    def required(self, keep_rows: Sequence[Sequence[float]]) -> float:
        """The least top-1 agreement for images run at ``keep_rows``: the sampled bar if any keep is below 1."""
        sampled = any(value < 1.0 for row in keep_rows for value in row)
        if sampled and self.min_top1_agreement_sampled is not None:
            return self.min_top1_agreement_sampled
        return self.min_top1_agreement

    @property
    def converted(self) -> bool:
        """Whether the precision runs a converted copy of the exported file rather than the file itself."""
        return self.module is not None

    def convert(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` in this precision (``model`` itself for fp32); the converting module loads on use."""
        if self.module is None:
            return model
        return importlib.import_module(f"{__name__}.{self.module}").convert(model)

    def agreement(
        self, reference: Path, converted: Path, batch: int, keep: Sequence[float] | None = None
    ) -> Agreement:
        """``converted`` against the float32 ``reference`` in onnxruntime on the CPU (:mod:`.agreement`)."""
        from .agreement import measure

        return measure(self, reference, converted, batch, keep)

    def backends(self) -> tuple[str, ...]:
        """The backends that run this precision, as each one declares it."""
        from ats_deploy import backends

        return tuple(backend.name for backend in backends.all_backends() if self.name in backend.precisions)


FP32 = Precision("fp32", converts="nothing: the exported file runs as it is", keeps_float32=("everything",))
FP16 = Precision(
    "fp16",
    converts="weights, constants and every op whose ONNX schema allows float16; graph inputs and outputs stay float32",
    keeps_float32=ATS_FLOAT32,
    module="fp16",
    tensorrt_flag="FP16",
    min_top1_agreement=0.5,
)

# INT8 is calibrated at export (`ats-deploy export --precision int8 --calibration DIR`, :mod:`.int8`): the
# file already holds its Q/DQ pairs, so nothing converts it. TensorRT 10 and 11 build explicit quantization
# from them; their docs ("Explicit Quantization") ask for strong typing and no precision-control flag.
INT8 = Precision(
    "int8",
    converts="nothing at build: export quantizes the matrix work (patch embedding, qkv, proj, MLP, head) with Q/DQ",
    keeps_float32=(*ATS_FLOAT32, "class-token attention row", "||V||", "compaction"),
    # Measured on the real DeiT-Tiny, 100 imagenet-sample-dev images calibrating, 400 held out (bench/RESULTS.md,
    # "INT8"): top-1 agreement 91.2% at keep 1.0, 86.2% at 0.72, 77.8% at 0.5, with the same top-1 accuracy (within
    # 1 point) at each. The bars sit well under those; a broken calibration drops agreement towards chance.
    min_top1_agreement=0.8,
    min_top1_agreement_sampled=0.6,
    explicit=True,
)

_REGISTERED: tuple[Precision, ...] = (FP32, FP16, INT8)
_BY_NAME = {precision.name: precision for precision in _REGISTERED}


def names() -> tuple[str, ...]:
    """Every precision's name, in registry order (fp32 first: what every backend runs)."""
    return tuple(_BY_NAME)


def get(name: str) -> Precision:
    """The precision called ``name``; an unknown name fails listing the known ones."""
    if name not in _BY_NAME:
        raise UserError(f"unknown precision '{name}'; choose one of: {', '.join(names())}.")
    return _BY_NAME[name]
