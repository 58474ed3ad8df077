"""The model families the ATS reference supports, one entry each (timm's ``@register_model`` idea).

A family says which timm models it covers, why it refuses one it cannot run
faithfully, how many prefix tokens the model has (ATS_SPEC.md section 1: always
kept, never sampled) and how its head turns the last tokens into logits. The
reference (:mod:`ats_deploy.model`) asks the family instead of testing model
classes itself, so a new family is one entry here plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Family:
    """One kind of model the reference runs: what it covers, why it refuses, its prefix tokens and head."""

    name: str
    covers: str  # for the list of supported families in a refusal
    refusal: Callable[[nn.Module], str | None]  # why this family cannot run the model, or None
    prefix_tokens: Callable[[nn.Module], int]
    head: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]
    # True when the head reads only the class token, so the last block need compute only its row.
    pools_class_token: Callable[[nn.Module], bool]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_of(model: nn.Module) -> Family:
    """The family that runs ``model``; else one UserError with each family's reason and the supported list."""
    reasons = []
    for family in FAMILIES.values():
        reason = family.refusal(model)
        if reason is None:
            return family
        reasons.append(reason)
    supported = "; ".join(f"{f.name}: {f.covers}" for f in FAMILIES.values())
    raise UserError(f"{' '.join(reasons)} Supported model families: {supported}.")


def _name(vit: nn.Module) -> str:
    return getattr(vit, "default_cfg", {}).get("architecture", type(vit).__name__)


# --------------------------------------------------------------------------- timm ViT / DeiT, one class token


def _vit_refusal(vit: nn.Module) -> str | None:
    if not isinstance(vit, VisionTransformer):
        return f"{type(vit).__name__} is not a timm VisionTransformer; ATS needs a ViT/DeiT with a class token."
    name = _name(vit)
    if vit.cls_token is None:
        return f"{name} has no class token; ATS scores tokens by the class token's attention."
    if vit.num_prefix_tokens != 1:
        return (
            f"{name} has {vit.num_prefix_tokens} prefix tokens (distillation or register tokens); "
            "this family is defined for exactly one class token."
        )
    if vit.global_pool not in ("token", "avg"):
        return f"{name} pools with '{vit.global_pool}'; supported: class token or average pooling."
    if getattr(vit, "dynamic_img_size", False):
        return f"{name} uses dynamic image size; export needs a fixed input size."
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            return f"{name} block {i} is a {type(block).__name__}; ATS supports timm's standard ViT Block."
    return None


def _vit_head(vit: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """timm's classifier head; average pooling counts only valid patch tokens."""
    if vit.global_pool == "avg":
        weight = torch.ones_like(x[:, :, :1]) if valid is None else valid.unsqueeze(-1).to(x.dtype)
        weight = F.pad(weight[:, 1:], (0, 0, 1, 0))
        pooled = (x * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    else:
        pooled = x[:, 0]
    return vit.head(vit.head_drop(vit.fc_norm(pooled)))


VIT = register(
    Family(
        name="vit",
        covers="timm VisionTransformer (ViT, DeiT, DeiT-III) with one class token, class-token or average pooling",
        refusal=_vit_refusal,
        prefix_tokens=lambda vit: 1,
        head=_vit_head,
        pools_class_token=lambda vit: vit.global_pool == "token",
    )
)
