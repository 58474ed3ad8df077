"""The models one bench compares: dense and ATS, as the PyTorch reference and as exported.

Speedups are quoted against the exported dense model (the same runtime without
token sampling; the first backend's when several are benched); the PyTorch variants
show what the export itself gains. With several backends each backend's exported
variants are keyed ``<kind>:<backend>`` (``exported_ats:openvino``); with one, by kind.
Several precisions add the precision likewise (``exported_ats:int8``, ``exported_ats:openvino:int8``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ats_deploy.backends import Runner
from ats_deploy.backends.samples import Sample, samples
from ats_deploy.flops import CostModel

PYTORCH_DENSE = "pytorch_dense"
PYTORCH_ATS = "pytorch_ats"
EXPORTED_DENSE = "exported_dense"
EXPORTED_ATS = "exported_ats"
TITLES = {
    PYTORCH_DENSE: "PyTorch dense",
    PYTORCH_ATS: "PyTorch ATS",
    EXPORTED_DENSE: "exported dense",
    EXPORTED_ATS: "exported ATS",
}


def kind_of(key: str) -> str:
    """The kind of a variant key (``exported_ats:openvino`` -> ``exported_ats``)."""
    return key.split(":", 1)[0]


def exported_key(kind: str, *tags: str) -> str:
    """The key of an exported variant: its kind, then what tells it apart (backend, precision) when several are."""
    return ":".join((kind, *tags))


@dataclass
class Variant:
    """One model on one runtime, with the budget it runs at and its cost model."""

    key: str
    runner: Runner
    runtime: str
    keep: torch.Tensor
    cost: CostModel

    @property
    def title(self) -> str:
        return TITLES[kind_of(self.key)]

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.runner(images, self.keep)

    def samples(self, images: torch.Tensor) -> list[Sample]:
        """Per-image outputs for validation: with the kept patches where the runner can tap them."""
        tapped = getattr(self.runner, "samples", None)
        if tapped is not None:
            return tapped(images, self.keep)
        return samples(*self(images))
