"""The model-family registry: which models the reference runs, and one clear refusal for the others."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from ats_deploy.errors import UserError
from ats_deploy.families import FAMILIES, VIT, family_of


def test_the_vit_family_runs_deit_and_vit(random_deit_tiny):
    assert family_of(random_deit_tiny) is VIT and VIT.prefix_tokens(random_deit_tiny) == 1
    assert VIT.pools_class_token(random_deit_tiny)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_the_vit_head_is_timms_head(pool):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool=pool).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = vit.forward_features(images)
        torch.testing.assert_close(VIT.head(vit, features, None), vit.forward_head(features), rtol=0, atol=1e-6)
    assert VIT.pools_class_token(vit) is (pool == "token")


def test_a_model_no_family_runs_is_refused_with_the_reason_and_the_list():
    vit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    with pytest.raises(UserError) as caught:
        family_of(vit)
    message = caught.value.message
    assert "has 2 prefix tokens" in message and "Supported model families: vit: timm VisionTransformer" in message


def test_a_new_family_is_one_entry(monkeypatch):
    """Registering a family is all it takes for family_of to pick it."""

    class Toy(nn.Module):
        pass

    toy = dataclasses.replace(
        VIT, name="toy", covers="toys", refusal=lambda m: None if isinstance(m, Toy) else "not a toy."
    )
    monkeypatch.setitem(FAMILIES, "toy", toy)
    assert family_of(Toy()) is toy
    with pytest.raises(UserError, match=r"not a toy\. Supported model families: vit: .*; toy: toys"):
        family_of(nn.Linear(1, 1))
