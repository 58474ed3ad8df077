"""What a runner reports per image for validation: logits, tokens and the patches each ATS stage kept.

A runtime that can say which tokens a stage kept reads them from the graph tensors :func:`taps`
names (added as extra outputs; no node changes) and turns them into original token indices with
:func:`kept_positions`. The judging of these samples against the reference is
:mod:`ats_deploy.exporters.compare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ats_deploy.sampler_op import OP_TYPE, kept_masks

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class Tie:
    """Quantile ``quantile`` of ATS stage ``stage`` within ``margin`` of the cdf at position ``position``."""

    stage: int
    position: int  # index into the stage's cdf: token ``position + P`` of the stage's input (P prefix tokens)
    quantile: int
    margin: float
    below: bool = True  # the quantile is at or below the cdf there: it picks that token, the other way the next


@dataclass
class Sample:
    """One image as some model computed it: logits, tokens, kept positions, near ties."""

    logits: np.ndarray
    tokens: np.ndarray
    # Per stage, the original token indices kept, the P prefix tokens (0..P-1) first; None when
    # the runtime cannot say (an engine without the kept-mask outputs).
    kept: list[np.ndarray] | None = None
    ties: list[list[Tie]] = field(default_factory=list)  # the reference's only (exporters/compare.py)


def samples(logits: np.ndarray, tokens: np.ndarray) -> list[Sample]:
    """A runtime's batched outputs as per-image samples (token counts only, no kept positions)."""
    return [Sample(logits[b], tokens[b]) for b in range(len(logits))]


def taps(model: onnx.ModelProto) -> list[tuple[tuple[str, int], ...]]:
    """Per ATS stage, the (name, element type) of the tensors saying which tokens it kept.

    The subgraph export's kept mask (``ats_kept_<s>``), or a custom op's index and key mask.
    """
    import onnx

    samplers = [n for n in model.graph.node if n.op_type == OP_TYPE]
    if samplers:
        return [((n.output[0], onnx.TensorProto.INT64), (n.output[1], onnx.TensorProto.FLOAT)) for n in samplers]
    return [((name, onnx.TensorProto.BOOL),) for name in kept_masks(model)]


def _kept_rows(outputs: Sequence[np.ndarray], image: int) -> np.ndarray:
    """Rows of a stage's input that it kept, in order: from its kept mask ``[B, N, 1]``, or the custom op's
    ``index [B, m, 1]`` and key mask (0 at kept tokens)."""
    if len(outputs) == 1:
        return np.flatnonzero(outputs[0][image].reshape(-1))
    index, mask = outputs
    return index[image, mask[image, :, 0] == 0, 0]


def kept_positions(stages: Sequence[Sequence[np.ndarray]], image: int) -> list[np.ndarray]:
    """Original token indices each stage kept, for one image, from every stage's tapped outputs.

    A stage's input is the previous stage's kept tokens in order, then padding, so
    the positions compose stage by stage. A padded slot kept is position -1, which
    never matches the reference.
    """
    current: np.ndarray | None = None
    kept = []
    for outputs in stages:
        rows = _kept_rows(outputs, image)
        if current is not None:
            rows = np.where(rows < len(current), current[np.minimum(rows, len(current) - 1)], -1)
        current = rows
        kept.append(current)
    return kept
