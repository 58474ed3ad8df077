"""Shared fixtures: small random models (never pretrained: the tests run offline)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope="session")
def random_deit_tiny() -> VisionTransformer:
    """A randomly initialised ``deit_tiny_patch16_224`` (seed 0), in eval mode. Do not modify it."""
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as other tests expect it
        torch.manual_seed(0)
        return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
