"""The cost of one image, from the tokens each ATS stage kept.

One multiply-add counts as one FLOP (the convention under which dense DeiT-S at
224 is 4.6 GFLOPs and DeiT-Ti 1.3). A block with ``n`` tokens in and ``m`` out
costs ``3nD^2`` (qkv) ``+ 2mnD`` (attention rows of the kept tokens over all keys)
``+ mD^2`` (proj) ``+ 2mDh`` (MLP with hidden size ``h``; ``8mD^2`` for ``h = 4D``).
``n`` and ``m`` count the ``P`` prefix tokens (class, distillation and register tokens:
a stage keeping ``K'`` patches outputs ``m = P + K'``), and the head counts every
classifier the model has (two for distilled DeiT, none for a feature extractor).
This is the algorithm's cost, in the paper's convention. The exported graph differs in
two places: it computes all ``n`` attention rows in the stages after the first (see
:func:`ats_deploy.model.ats_block`), ``2(n-m)nD`` more, under 0.1% of the total when
those stages drop a few tokens each; and when the head pools the class token, its last
block computes only that token's row (the queries, projection and MLP of the others
would be read by nothing), some 3-6% less at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CostModel:
    depth: int
    dim: int
    hidden: int
    n0: int
    patch_macs: int
    head_macs: int
    stages: tuple[int, ...]
    prefix: int = 1  # P prefix tokens: a stage outputs P + K' tokens

    @classmethod
    def of(cls, model) -> CostModel:
        """From an :class:`~ats_deploy.model.ATSVisionTransformer`."""
        vit = model.vit
        proj = vit.patch_embed.proj
        patches = vit.patch_embed.num_patches
        patch_macs = patches * proj.weight[0].numel() * proj.out_channels
        return cls(
            depth=len(vit.blocks),
            dim=vit.embed_dim,
            hidden=vit.blocks[0].mlp.fc1.out_features,
            n0=model.n0,
            patch_macs=patch_macs,
            head_macs=_head_macs(vit),
            stages=tuple(model.stages),
            prefix=vit.num_prefix_tokens,  # timm counts the prefix tokens as the families do
        )

    def block_macs(self, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        d = self.dim
        return 3 * n * d * d + 2 * m * n * d + m * d * d + 2 * m * d * self.hidden

    def gflops(self, tokens: torch.Tensor) -> torch.Tensor:
        """GFLOPs of each image from ``tokens`` ``[B, S]`` (K' per stage); ``[B]`` float64."""
        tokens = torch.as_tensor(tokens, dtype=torch.float64)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        n = torch.full(tokens.shape[:1], float(self.n0), dtype=torch.float64)
        total = torch.full_like(n, float(self.patch_macs + self.head_macs))
        for i in range(self.depth):
            m = tokens[:, self.stages.index(i)] + self.prefix if i in self.stages else n
            total += self.block_macs(n, m)
            n = m
        return total / 1e9

    def dense_gflops(self) -> float:
        return float(self.gflops(torch.zeros((1, len(self.stages))) + self.n0 - self.prefix)[0])


def _head_macs(vit: nn.Module) -> int:
    """The classifier's multiply-adds: distilled DeiT has a second head; a feature extractor (no head) none."""
    heads = (vit.head, getattr(vit, "head_dist", None))
    return sum(head.weight.numel() for head in heads if isinstance(head, nn.Linear))
