"""The model families the ATS reference supports, one entry each (timm's ``@register_model`` idea).

A family says which timm models it covers, why it refuses one it cannot run
faithfully, how many prefix tokens the model has (docs/ATS.md section 1: always
kept, never sampled) and how its head turns the last tokens into logits. The
reference (:mod:`ats_deploy.model`) asks the family instead of testing model
classes itself, so a new family is one entry here plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
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
    raise UserError(f"{' '.join(dict.fromkeys(reasons))} Supported model families: {supported}.")  # each reason once


def _name(vit: nn.Module) -> str:
    return getattr(vit, "default_cfg", {}).get("architecture", type(vit).__name__)


# --------------------------------------------------------------------------- what every timm ViT family shares


def _vit_structure_refusal(vit: nn.Module) -> str | None:
    """Why the reference cannot run this timm ViT at all, whatever its prefix tokens: else None."""
    if not isinstance(vit, VisionTransformer):
        return f"{type(vit).__name__} is not a timm VisionTransformer; ATS needs a ViT/DeiT with a class token."
    name = _name(vit)
    if vit.cls_token is None:
        return f"{name} has no class token; ATS scores tokens by the class token's attention."
    if vit.global_pool not in ("token", "avg"):
        return f"{name} pools with '{vit.global_pool}'; supported: class token or average pooling."
    if vit.global_pool == "avg" and getattr(vit, "pool_include_prefix", False):
        return f"{name} averages the prefix tokens too; supported: average pooling of the patch tokens."
    if getattr(vit, "dynamic_img_size", False):
        return f"{name} uses dynamic image size; export needs a fixed input size."
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            return f"{name} block {i} is a {type(block).__name__}; ATS supports timm's standard ViT Block."
    return None


def _vit_head(vit: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """timm's classifier head; average pooling counts only valid patch tokens (not the prefix tokens)."""
    if vit.global_pool == "avg":
        prefix = vit.num_prefix_tokens
        weight = torch.ones_like(x[:, :, :1]) if valid is None else valid.unsqueeze(-1).to(x.dtype)
        weight = F.pad(weight[:, prefix:], (0, 0, prefix, 0))
        pooled = (x * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
    else:
        pooled = x[:, 0]
    return vit.head(vit.head_drop(vit.fc_norm(pooled)))


# --------------------------------------------------------------------------- timm ViT / DeiT, one class token


def _vit_refusal(vit: nn.Module) -> str | None:
    reason = _vit_structure_refusal(vit)
    if reason is None and vit.num_prefix_tokens != 1:
        reason = (
            f"{_name(vit)} has {vit.num_prefix_tokens} prefix tokens (distillation or register tokens); "
            "this family is defined for exactly one class token."
        )
    return reason


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


# --------------------------------------------------------------------------- distilled DeiT: class + distillation token


def _distilled_refusal(vit: nn.Module) -> str | None:
    if not isinstance(vit, VisionTransformerDistilled):
        return f"{type(vit).__name__} is not a timm VisionTransformerDistilled (distilled DeiT)."
    reason = _vit_structure_refusal(vit)
    if reason is None and vit.num_prefix_tokens != 2:
        reason = f"{_name(vit)} has {vit.num_prefix_tokens} prefix tokens; distilled DeiT has exactly 2."
    return reason


def _distilled_head(vit: nn.Module, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """timm's eval-mode head: the mean of the class head on token 0 and the distillation head on token 1."""
    return (vit.head(vit.head_drop(x[:, 0])) + vit.head_dist(vit.head_drop(x[:, 1]))) / 2


DEIT_DISTILLED = register(
    Family(
        name="deit_distilled",
        covers="timm VisionTransformerDistilled (distilled DeiT: class and distillation tokens, P = 2)",
        refusal=_distilled_refusal,
        prefix_tokens=lambda vit: 2,
        head=_distilled_head,
        # The head reads two tokens; the last block computes every row (the one-row shortcut reads token 0 only).
        pools_class_token=lambda vit: False,
    )
)


# --------------------------------------------------------------------------- ViT with registers and a class token


def _registers_refusal(vit: nn.Module) -> str | None:
    if type(vit) is not VisionTransformer or not getattr(vit, "num_reg_tokens", 0):
        return f"{type(vit).__name__} is not a timm VisionTransformer with register tokens."
    return _vit_structure_refusal(vit)


VIT_REGISTERS = register(
    Family(
        name="vit_registers",
        covers="timm VisionTransformer with register tokens and a class token (P = 1 + registers, e.g. DINOv2-reg)",
        refusal=_registers_refusal,
        prefix_tokens=lambda vit: vit.num_prefix_tokens,
        head=_vit_head,
        pools_class_token=lambda vit: vit.global_pool == "token",
    )
)
