"""GFLOPs (ats_deploy.flops) against the multiply-adds PyTorch counts on timm's own modules, for each prefix kind.

``FlopCounterMode`` counts 2 FLOPs per multiply-add; the project counts one, so its totals are halved here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from ats_deploy.flops import CostModel
from ats_deploy.model import build

MODELS = {
    "vit": ("deit_tiny_patch16_224", {"img_size": 112, "depth": 4}),
    "distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 112, "depth": 4}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 4, "num_classes": 10}),
    "registers_features": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 4}),
}


def macs(fn: Callable[[], object]) -> int:
    """Multiply-adds PyTorch counts while ``fn`` runs."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


@pytest.fixture(params=sorted(MODELS))
def vit(request) -> torch.nn.Module:
    arch, kwargs = MODELS[request.param]
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    for block in model.blocks:
        block.attn.fused_attn = False  # plain matmuls, which the counter sees (a CPU fused kernel it does not)
    return model


def test_dense_gflops_are_what_pytorch_counts_in_timms_forward(vit):
    images = torch.randn(1, 3, *vit.patch_embed.img_size)
    counted = macs(lambda: vit(images))
    for stages in ([], [1, 3]):  # at keep 1.0 every token survives: the dense cost either way
        cost = CostModel.of(build(vit, "arch", stages=stages))
        assert cost.dense_gflops() == pytest.approx(counted / 1e9, rel=1e-12)


def stage_macs(block: torch.nn.Module, n: int, m: int) -> int:
    """A block with ``n`` tokens in and ``m`` out, run on timm's modules: qkv of all, the m kept rows' attention."""
    attn, dim = block.attn, block.attn.qkv.in_features
    heads, head_dim = attn.num_heads, attn.head_dim

    def run() -> None:
        attn.qkv(torch.zeros(n, dim))
        scores = torch.zeros(heads, m, head_dim) @ torch.zeros(heads, head_dim, n)
        scores @ torch.zeros(heads, n, head_dim)
        block.mlp(attn.proj(torch.zeros(m, dim)))

    return macs(run)


def test_ats_gflops_count_the_prefix_tokens_and_every_head(vit):
    """Each stage outputs P + K' tokens (class, distillation, registers); the head count is the model's own."""
    model = build(vit, "arch", stages=[1, 3])
    prefix, n0 = vit.num_prefix_tokens, model.n0
    kept = [20, 9]  # K' patches per stage
    images = torch.randn(1, 3, *vit.patch_embed.img_size)
    expected = macs(lambda: vit.patch_embed(images))
    tokens = [n0, n0, prefix + kept[0], prefix + kept[0], prefix + kept[1]]  # into block i, and out of the last
    expected += sum(stage_macs(block, tokens[i], tokens[i + 1]) for i, block in enumerate(vit.blocks))
    expected += macs(lambda: vit.forward_head(torch.zeros(1, n0, vit.embed_dim)))
    assert CostModel.of(model).gflops(torch.tensor([kept]))[0].item() == pytest.approx(expected / 1e9, rel=1e-12)
