"""The precisions a model is built or run in: the registry entries, data only.

docs/ATS.md: a reduced-precision model keeps the budget, quantiles, cdf and sampling in float32
and is compared with the float32 reference by agreement, not bit for bit. A precision is an
entry in :data:`_REGISTERED`, the module ``exporters/precisions/<module>.py`` that converts
(``stage="build"``) or quantizes (``stage="export"``) a file into it, and the backends that
declare it (:attr:`ats_deploy.backends.Backend.precisions`). The entry lives in core so that
profiles, exporters, bench and serving all read the same facts; :mod:`ats_deploy.exporters.precisions`
resolves its module.

Module-level imports stay light (no onnx or numpy): the profile loader reads the names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import UserError

# The parts of an ATS stage that stay float32 in every precision (docs/ATS.md).
ATS_FLOAT32 = ("budget K", "quantiles", "cdf", "sampling")

# When a precision's module makes its file: "export" writes it already in the precision (calibrated at export,
# ``ats-deploy export --precision``), "build" converts the float32 export when an engine or a backend's file is
# built. None: the float32 export runs as it is.
Stage = Literal["export", "build"]


@dataclass(frozen=True)
class Precision:
    """One precision: when its file is made, what stays float32, and how far it may disagree with float32."""

    name: str
    converts: str  # what the precision changes, for people
    keeps_float32: tuple[str, ...]  # what stays float32 in it
    stage: Stage | None = None
    module: str | None = None  # exporters/precisions/<module>.py, which makes the file at ``stage``
    # TensorRT 10's weak-typing builder flag (BuilderFlag.<flag>, trtexec --<flag in lower case>): the DLA's
    # recipe before 11.4.1, which lets TensorRT pick the precision per layer (exporters/tensorrt/plan.py).
    tensorrt_flag: str | None = None
    # The least share of images that must keep the float32 top-1 with every token kept (keep 1.0), and below
    # keep 1.0, where the sampling turns small score changes into other tokens. 1.0: compared exactly instead
    # (fp32 matches patch for patch).
    min_top1_agreement: float = 1.0
    min_top1_agreement_sampled: float | None = None  # None: the same bar below keep 1.0
    # The largest |logit difference| an image with the reference's kept patches may show when compared patch for
    # patch; None: compared by agreement only.
    tolerance: float | None = None
    # The export itself carries the precision (Q/DQ pairs): TensorRT builds it as it is, strongly typed, with no
    # precision flag (explicit quantization, exporters/tensorrt/plan.py).
    explicit: bool = False

    @property
    def made_at_export(self) -> bool:
        """Whether export writes the precision into the file (int8's Q/DQ pairs): it then runs as it was written."""
        return self.stage == "export"

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

    def backends(self) -> tuple[str, ...]:
        """The backends that run this precision, as each one declares it."""
        from . import backends

        return tuple(backend.name for backend in backends.all_backends() if self.name in backend.precisions)


FP32 = Precision(
    "fp32", converts="nothing: the exported file runs as it is", keeps_float32=("everything",), tolerance=1e-3
)
FP16 = Precision(
    "fp16",
    converts="weights, constants and every op whose ONNX schema allows float16; graph inputs and outputs stay float32",
    keeps_float32=ATS_FLOAT32,
    stage="build",
    module="fp16",
    tensorrt_flag="FP16",
    min_top1_agreement=0.5,
    tolerance=5e-2,
)

# INT8 is calibrated at export (`ats-deploy export --precision int8 --calibration DIR`): the file already holds
# its Q/DQ pairs, so nothing converts it at build. TensorRT 10 and 11 build explicit quantization from them; their
# docs ("Explicit Quantization") ask for strong typing and no precision-control flag.
INT8 = Precision(
    "int8",
    converts="nothing at build: export quantizes the matrix work (patch embedding, qkv, proj, MLP, head) with Q/DQ",
    keeps_float32=(*ATS_FLOAT32, "class-token attention row", "||V||", "compaction"),
    stage="export",
    module="int8",
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


def explicit() -> Precision:
    """The precision whose files carry it as Q/DQ pairs (explicit quantization): what a Q/DQ file is built in."""
    return next(precision for precision in _REGISTERED if precision.explicit)


def running(written: str, asked: str) -> str:
    """The precision a file written in ``written`` runs in when ``asked`` is wanted.

    A precision made at export (``stage="export"``: int8's Q/DQ pairs) is the file's own whatever is asked; a
    float32 file runs in ``asked``, converted at build where that precision converts.
    """
    return written if get(written).made_at_export else asked
