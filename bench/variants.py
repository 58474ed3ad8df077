"""The models one bench compares: dense and ATS, as the PyTorch reference and as exported.

Speedups are quoted against the exported dense model (the same runtime without
token sampling); the PyTorch variants show what the export itself gains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ats_deploy.exporters.validate import Sample, samples
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

Runner = Callable[[torch.Tensor, torch.Tensor], tuple[np.ndarray, np.ndarray]]


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
        return TITLES[self.key]

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.runner(images, self.keep)

    def samples(self, images: torch.Tensor) -> list[Sample]:
        """Per-image outputs for validation: with the kept patches where the runner can tap them."""
        tapped = getattr(self.runner, "samples", None)
        if tapped is not None:
            return tapped(images, self.keep)
        return samples(*self(images))
