"""A plain, per-image, float64 reading of docs/ATS.md sections 1-2 (P prefix tokens): the tests' yardstick.

Deliberately unbatched and unoptimised: NumPy ``searchsorted`` and ``unique``,
one image at a time, so that it reads like the spec. Attention and the MLP run in
float64; the budget, quantiles and cdf are float32 because the spec says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class YardstickResult:
    logits: np.ndarray
    tokens: list[int]
    kept: list[list[int]]
    # Smallest |u_i - cdf_p| met at each stage: how close the sample came to a float tie.
    margins: list[float]


def budget(keep: float, n0: int, prefix: int = 1) -> int:
    keep32 = np.float32(keep)
    if keep32 <= 1:
        product = np.float32(keep32 * np.float32(n0))
        return int(np.clip(np.floor(np.float32(product + np.float32(0.5))), prefix + 7, n0))
    return int(np.clip(np.floor(keep32), prefix + 1, n0))


def prefix_tokens(vit: torch.nn.Module) -> int:
    """``P``: the class token, then any distillation or register tokens (timm counts them all)."""
    return vit.num_prefix_tokens


def sample(cls_attention: np.ndarray, values: np.ndarray, k: int, prefix: int = 1) -> tuple[list[int], float]:
    """Steps 2-6 for one image: ``cls_attention [H, n]``, ``values [n, D]``; kept token indices (>= P)."""
    n = values.shape[0]
    s = cls_attention[:, prefix:].sum(axis=0) * np.linalg.norm(values[prefix:], axis=1)
    big_s = (s / max(s.sum(), np.finfo(np.float32).tiny)).astype(np.float32)
    cdf = np.cumsum(big_s, dtype=np.float32)
    draws = k - prefix
    u = np.arange(1, draws + 1, dtype=np.float32) / np.float32(draws)
    last = n - prefix - 1
    t = np.minimum(np.searchsorted(cdf, u, side="left"), last)
    # A tie with cdf_p for p >= n-P-1 cannot matter: the clamp sends both sides there.
    margin = float(np.min(np.abs(u[:, None] - cdf[None, :last]))) if last > 0 else float("inf")
    return [int(j) for j in np.unique(t + prefix)], margin


def head(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own head on the final tokens ``x [n, C]``, as timm computes it in eval mode."""
    prefix = prefix_tokens(vit)
    if hasattr(vit, "head_dist"):  # distilled DeiT: the mean of the class and distillation heads
        return (vit.head(x[0]) + vit.head_dist(x[1])) / 2
    pooled = x[prefix:].mean(0) if vit.global_pool == "avg" else x[0]
    return vit.head(vit.fc_norm(pooled))


def run(vit: torch.nn.Module, image: torch.Tensor, keep: list[float], stages: list[int]) -> YardstickResult:
    vit = copy.deepcopy(vit).double().eval()
    prefix = prefix_tokens(vit)
    n0 = vit.patch_embed.num_patches + prefix
    tokens, kept_all, margins = [], [], []
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image[None].double())))[0]
        for i, block in enumerate(vit.blocks):
            attn = block.attn
            n = x.shape[0]
            h = block.norm1(x)
            qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
            a = torch.softmax(q @ k.transpose(-2, -1) / np.sqrt(attn.head_dim), dim=-1)
            rows = list(range(n))
            if i in stages:
                s = stages.index(i)
                values = v.permute(1, 0, 2).reshape(n, -1).numpy()
                keep_idx, margin = sample(a[:, 0].numpy(), values, budget(keep[s], n0, prefix), prefix)
                rows = [*range(prefix), *keep_idx]
                tokens.append(len(keep_idx))
                kept_all.append(keep_idx)
                margins.append(margin)
            o = (a[:, rows] @ v).permute(1, 0, 2).reshape(len(rows), -1)
            y = x[rows] + block.ls1(attn.proj(attn.norm(o)))
            x = y + block.ls2(block.mlp(block.norm2(y)))
        logits = head(vit, vit.norm(x))
    return YardstickResult(logits.numpy(), tokens, kept_all, margins)
