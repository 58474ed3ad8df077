"""The PyTorch ATS reference: a timm VisionTransformer whose chosen blocks sample tokens.

``ATSVisionTransformer`` wraps a timm ``VisionTransformer`` and reuses its own
parts (patch embedding, position embedding, qkv, q/k norms, proj, layer scale,
MLP, norms, head), so timm's ViT variants keep working. Only the attention is
rewritten, to mask padded keys (``docs/ATS.md`` section 3) and, in an ATS stage,
to score and sample tokens with :mod:`ats_deploy.ats`. Reshapes, row gathers and
linear layers go through :mod:`ats_deploy.lowering`, which fixes the graph ops they export as.

``forward(images, keep) -> (logits, tokens)`` is exactly the exported interface
(spec section 4); :meth:`ATSVisionTransformer.forward_details` also returns the
original patch positions of the kept tokens, for plots. Which timm models it runs,
with how many prefix tokens and which head, is :mod:`ats_deploy.families`'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from . import ats, lowering
from .errors import UserError
from .families import Family, family_of
from .keep import per_stage
from .sampler_op import DOMAIN, DYNAMIC, OP_TYPE, OP_VERSION, kept_name, sample_tokens


@dataclass
class ATSOutput:
    """Everything one forward computes.

    ``positions[s]`` is ``[B, P + max K']``: the original token index (``0..P-1`` the
    prefix tokens, ``j >= P`` patch ``j - P`` in raster order) of every token
    that stage ``s`` kept, ``-1`` in padded slots.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    positions: list[torch.Tensor]


# Called by an ATS stage once its significance scores are known, with
# ``(stage, scores [B, N-P, 1], clamp, u [B, 1, D])`` (``D`` the batch's most draws); returns the quantiles the
# stage draws. Validation uses it to see how close each sample came to a float
# tie and to replay the reference with one tie resolved the other way.
QuantileHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TokenSampler(nn.Module):
    """Steps 3-7 of ATS stage ``stage``: significance scores in, kept token indices out.

    A module of its own so that exported graphs scope its nodes (``/samplers.N/...``). Traced
    under :func:`lowering.sampler_as_node` (``--ats-op custom``), it is one
    ``ats_deploy::AdaptiveTokenSampler`` node (:class:`_SamplerNode`); else its kept-token mask
    is the tensor :func:`~ats_deploy.sampler_op.kept_name` of its stage.
    """

    def __init__(self, n0: int, prefix: int = 1, stage: int = 0) -> None:
        super().__init__()
        self.n0 = n0
        self.prefix = prefix
        self.stage = stage

    def forward(
        self, scores: torch.Tensor, clamp: torch.Tensor, u: torch.Tensor, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if lowering.traces_sampler_as_node():
            index, mask, n_kept, _ = _SamplerNode.apply(scores, clamp, u, DYNAMIC if length is None else length,
                                                        self.prefix)
            return index, mask, n_kept
        kept, count = ats.sample(scores, clamp, u, self.prefix, kept_name(self.stage))
        return ats.compact(kept, count, self.n0, length)


class _SamplerNode(torch.autograd.Function):
    """One stage's sampling (:func:`~ats_deploy.sampler_op.sample_tokens`) as one ``AdaptiveTokenSampler`` node.

    Its inputs, outputs and attributes are :mod:`ats_deploy.sampler_op`'s contract; the last
    output is the kept length ``m``, TensorRT's size tensor, which nothing reads.
    """

    @staticmethod
    def forward(
        ctx, scores: torch.Tensor, clamp: torch.Tensor, u: torch.Tensor, length: int, prefix: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if length == DYNAMIC:  # the kept length as a number: the tracer cannot nest lowering.top_rows in here
            kept, _ = ats.sample(scores, clamp, u, prefix)
            length = int(kept.sum(dim=1).max())
        index, mask, n_kept = sample_tokens(scores, clamp, u, length, prefix)
        return index, mask, n_kept, torch._shape_as_tensor(index)[1].to(torch.int32)

    @staticmethod
    def symbolic(g, scores, clamp, u, length: int, prefix: int):
        outputs = g.op(
            f"{DOMAIN}::{OP_TYPE}",
            scores,
            clamp,
            u,
            length_i=length,
            prefix_i=prefix,
            plugin_namespace_s=DOMAIN,
            plugin_version_s=str(OP_VERSION),
            outputs=4,
        )
        sizes = scores.type().varyingSizes()
        batch, kept = sizes[0] if sizes else None, None if length == DYNAMIC else length
        shapes = ((torch.int64, [batch, kept, 1]), (torch.float32, [batch, kept, 1]), (torch.float32, [batch, 1]))
        for output, (dtype, shape) in zip(outputs[:3], shapes, strict=True):
            output.setType(scores.type().with_dtype(dtype).with_sizes(shape))
        outputs[3].setType(scores.type().with_dtype(torch.int32).with_sizes([]))
        return outputs


class ATSVisionTransformer(nn.Module):
    """A timm ViT with Adaptive Token Sampling in the blocks listed in ``stages``.

    ``source`` and ``checkpoint_format`` say where the weights came from (the
    checkpoint file and its format, :mod:`ats_deploy.checkpoints`): ``None`` and
    ``"random"`` for random weights or a ViT built in code. ``load_notes`` are what
    loading decided that the user should hear (how the architecture was settled, a
    key prefix stripped), said by the commands that load it.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        stages: Sequence[int],
        arch: str,
        default_keep: Sequence[float] | None = None,
        *,
        source: Path | None = None,
        checkpoint_format: str = "random",
        load_notes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.family = family_of(vit)  # refuses, with the reason, a model no family runs faithfully
        depth = len(vit.blocks)
        stages = sorted(set(int(s) for s in stages))
        bad = [s for s in stages if not 0 <= s < depth]
        if bad:
            raise UserError(f"ATS stages {bad} are outside the model's blocks 0-{depth - 1}.")
        self.vit = vit.eval()
        self.arch = arch
        self.stages = stages
        self.prefix_tokens = self.family.prefix_tokens(vit)
        self.n0 = vit.patch_embed.num_patches + self.prefix_tokens
        self.samplers = nn.ModuleList(TokenSampler(self.n0, self.prefix_tokens, s) for s in range(len(stages)))
        keep = list(default_keep) if default_keep is not None else [1.0] * len(stages)
        self.default_keep = per_stage(keep, len(stages))
        self.source = source
        self.checkpoint_format = checkpoint_format
        self.load_notes = tuple(load_notes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, *self.vit.patch_embed.img_size)

    @property
    def num_classes(self) -> int:
        """The width of ``logits``: the classes, or the pooled feature of a model without a head (num_classes=0)."""
        return self.vit.num_classes or self.vit.num_features

    def default_keep_tensor(self, batch: int = 1) -> torch.Tensor:
        """The default keep as the ``[batch, S]`` rows the exported interface takes (spec section 4)."""
        return self.keep_rows(self.default_keep, batch)

    def keep_rows(self, keep: torch.Tensor | float | Sequence[float], batch: int) -> torch.Tensor:
        """``keep`` as the float32 ``[batch, S]`` the stages read: one row per image (spec section 4).

        A float applies to every stage of every image, a list (or ``[S]`` tensor) is one row
        repeated for every image, a ``[batch, S]`` tensor passes as it is (exporters trace it
        as the ``keep`` input).
        """
        if isinstance(keep, torch.Tensor) and keep.ndim == 2:
            if keep.shape != (batch, len(self.stages)):
                raise UserError(
                    f"keep has shape {list(keep.shape)}, but {batch} images on a model with {len(self.stages)} "
                    f"ATS stages need [{batch}, {len(self.stages)}]: one row per image, one value per stage."
                )
            return keep.to(torch.float32)
        values = keep.tolist() if isinstance(keep, torch.Tensor) else keep
        values = [values] if isinstance(values, int | float) else list(values)
        row = torch.tensor(per_stage(values, len(self.stages)), dtype=torch.float32)
        return row.reshape(1, -1).expand(batch, -1)

    def forward(
        self,
        images: torch.Tensor,
        keep: torch.Tensor | float | Sequence[float],
        static_budget: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, classes], tokens [B, S])``, the exported interface (spec section 4).

        ``static_budget``: see :meth:`forward_details`. It is not keyword-only because the
        TorchScript exporter passes every parameter it is not given positionally, as its default.
        """
        out = self.forward_details(images, keep, static_budget=static_budget)
        return out.logits, out.tokens

    def forward_details(
        self,
        images: torch.Tensor,
        keep: torch.Tensor | float | Sequence[float],
        hook: QuantileHook | None = None,
        *,
        static_budget: Sequence[int] | None = None,
    ) -> ATSOutput:
        """:meth:`forward` plus the kept positions of every stage.

        ``hook`` sees, and may replace, each stage's quantiles (:data:`QuantileHook`).
        ``static_budget`` is every stage's ``K`` (spec section 2) as a Python int, given
        by static exports: each stage then pads to ``min(K, its input)`` tokens, so every
        length is a constant (TensorRT < 8.6, DLA). ``keep`` must give those budgets.
        """
        vit = self.vit
        keep = self.keep_rows(keep, images.shape[0])
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        images_in = x.shape[0]
        positions = torch.arange(self.n0, device=x.device).unsqueeze(0).expand(images_in, -1)
        prefix = self.prefix_tokens
        k = ats.budget(keep.to(x.device), self.n0, prefix)  # [B, S]: each image its own budget
        u = ats.quantiles(k, self.n0 - prefix, prefix)
        drawn = ats.most_draws(k, prefix)
        mask: torch.Tensor | None = None
        bias: torch.Tensor | None = None
        kept, kept_positions = [], []
        batch = x  # every block reads the batch size from this one tensor (see lowering.reshape_rows)
        last = class_only_block(vit, self.family)
        for i, block in enumerate(vit.blocks):
            if i not in self.stages:
                x = dense_block(block, x, bias, batch, rows=1 if i == last else None)
                continue
            s = self.stages.index(i)
            if static_budget is None:
                length, u_s = None, ats.drawn_quantiles(u[:, s], drawn[s : s + 1])
            else:
                length, u_s = min(static_budget[s], x.shape[1]), u[:, s, None, : static_budget[s] - prefix]
            sampler = functools.partial(self.samplers[s], length=length)
            clamp = ats.clamp_bias(mask, x.shape[1], x.device, prefix)
            stage_hook = None if hook is None else functools.partial(hook, s)
            x, mask, index, n_kept = ats_block(
                block, x, bias, clamp, u_s, sampler, batch, stage_hook,
                all_rows=s > 0, class_only=i == last, prefix=prefix,
            )
            bias = ats.key_bias(mask)
            kept.append(n_kept)
            positions = torch.where(mask[..., 0] == 0, torch.gather(positions, 1, index[..., 0]), -1)
            kept_positions.append(positions)
        logits = self.family.head(vit, vit.norm(x), None if mask is None else mask[..., 0] == 0)
        if kept:
            token_counts = (torch.cat(kept, dim=1) - float(prefix)).to(torch.int64)  # K' counts patches only
        else:
            token_counts = torch.zeros((images_in, 0), dtype=torch.int64, device=x.device)
        return ATSOutput(logits, token_counts, kept_positions)


def class_only_block(vit: VisionTransformer, family: Family) -> int | None:
    """The block that computes only the class token's row: the last, when the head reads just that token."""
    return len(vit.blocks) - 1 if family.pools_class_token(vit) else None


def _qkv_tokens(
    attn: Attention, h: torch.Tensor, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The qkv projection of ``h [B, N, C]`` as ``q, k, v``, each ``[B, N, C]`` (heads concatenated).

    ``batch``: see :func:`lowering.reshape_rows`. One ``Split`` along the last axis; an
    ATS stage reads the value norms and the query rows it needs in this layout.
    """
    width = attn.num_heads * attn.head_dim
    qkv = lowering.reshape_rows(attn.qkv(lowering.flatten_tokens(h, attn.qkv.in_features)), batch, 3 * width)
    return qkv.split(width, dim=-1)


def _heads(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` from :func:`_qkv_tokens` (``q`` may hold only the rows needed) as normed per-head tensors."""
    return attn.q_norm(_per_head(attn, q)), attn.k_norm(_per_head(attn, k)), _per_head(attn, v)


def _per_head(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` as ``[B, H, N, dh]``."""
    return lowering.reshape_tail(x, 2, attn.num_heads, attn.head_dim).transpose(1, 2)


def _attention(q: torch.Tensor, k_t: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities of the query rows ``q`` over all keys (``k_t`` is ``K^T``), padded keys masked."""
    logits = (q * scale) @ k_t
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def _attend(
    q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of the query rows ``q`` over all keys, padded keys masked."""
    return _attention(q, k_t, scale, bias) @ v


def _merge_heads(attn: Attention, o: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, dh]`` attention output as 2-D token rows ``[B*N, C]``."""
    return lowering.reshape_tail(o.transpose(1, 2), 0, -1, attn.num_heads * attn.head_dim)


def _finish(
    block: Block, x_rows: torch.Tensor, h_rows: torch.Tensor, o: torch.Tensor, batch: torch.Tensor
) -> torch.Tensor:
    """Output projection, residual and MLP of a block for the rows ``x_rows`` (all on 2-D token rows).

    ``o`` is the attention output of those rows with the heads merged, ``[B*m, C]``;
    ``batch`` gives the batch size for the way back to ``[B, m, C]`` (:func:`lowering.reshape_rows`).
    """
    return _mlp(block, _attention_residual(block, x_rows, h_rows, o), batch)


def _attention_residual(block: Block, x: torch.Tensor, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``x + proj(o)`` as 2-D token rows ``[B*m, C]`` (``x``, ``h``: ``[B, m, C]``; ``o``: ``[B*m, C]``)."""
    attn = block.attn
    o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(lowering.flatten_tokens(h, attn.gate.in_features)).sigmoid()
    return lowering.flatten_tokens(x, attn.proj.out_features) + block.ls1(attn.proj(o))


def _mlp(block: Block, y: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The MLP half of a block on 2-D token rows ``y [B*m, C]``, returned as ``[B, m, C]``."""
    y = y + block.ls2(block.mlp(block.norm2(y)))
    return lowering.reshape_rows(y, batch, block.attn.proj.out_features)


def dense_block(
    block: Block, x: torch.Tensor, bias: torch.Tensor | None, batch: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """A standard transformer block whose attention ignores padded keys.

    ``batch``: any tensor whose first dim is the batch size, the same for every
    block (:func:`lowering.reshape_rows`). ``rows``: compute only the first ``rows``
    output rows, over all keys (1: the class token's, in the last block when the
    head reads just that token; the ceiling bench truncates ATS stages this way).
    """
    h = block.norm1(x)
    q, k, v = _qkv_tokens(block.attn, h, batch)
    if rows is not None:
        q, x, h = q[:, :rows], x[:, :rows], h[:, :rows]
    q, k, v = _heads(block.attn, q, k, v)
    o = _attend(q, k.transpose(-2, -1), v, block.attn.scale, bias)
    return _finish(block, x, h, _merge_heads(block.attn, o), batch)


def ats_block(
    block: Block,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    clamp: torch.Tensor,
    u: torch.Tensor,
    sampler: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    batch: torch.Tensor,
    hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    all_rows: bool = False,
    class_only: bool = False,
    prefix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ATS stage (spec section 1). Returns ``(tokens, mask, index, n_kept)`` (see :func:`ats.compact`).

    ``bias``: the key bias of the input's padding (:func:`ats.key_bias`), ``clamp``
    its :func:`ats.clamp_bias`, ``u`` the stage's drawn quantiles, ``batch`` as in
    :func:`dense_block`. ``hook(scores, clamp, u)``, when given, returns the quantiles to draw instead of ``u``.
    ``prefix``: the model's ``P`` prefix tokens, kept first and never scored (spec section 1).

    Only the kept tokens' attention rows are needed (prefix tokens first). With
    ``all_rows=False`` only they are computed: the class token's row first, for
    the scores, then the kept rows. That is what makes the cost follow the
    budget when a stage drops many of its tokens. A stage whose input was
    already cut to about its budget by an earlier stage drops few; there
    ``all_rows=True`` computes every row's attention, output projection and
    residual, then gathers the kept rows once, for the MLP: a few more FLOPs, but
    no separate class-token row and one gather instead of three (query rows,
    input rows, attention outputs), each a copy that costs more than those FLOPs.
    ``class_only`` (the last block when the head reads just the class token)
    samples as usual, for the token counts, but outputs only the class token's row.
    """
    attn = block.attn
    h = block.norm1(x)
    q_tokens, k_tokens, v_tokens = _qkv_tokens(attn, h, batch)
    class_row = class_only or not all_rows  # the attention computes just the class token's row
    q, k, v = _heads(attn, q_tokens[:, :1] if class_row else q_tokens, k_tokens, v_tokens)
    k_t = k.transpose(-2, -1)  # shared by the class-token row and the kept rows
    probs = _attention(q, k_t, attn.scale, bias)
    scores = ats.significance(probs if class_row else probs[:, :, :1], v_tokens)[:, prefix:]
    if hook is not None:
        u = hook(scores, clamp, u)
    rows, mask, n_kept = sampler(scores, clamp, u)
    if class_only:
        return _finish(block, x[:, :1], h[:, :1], _merge_heads(attn, probs @ v), batch), mask, rows, n_kept
    if all_rows:
        y = _attention_residual(block, x, h, _merge_heads(attn, probs @ v))
        width = attn.proj.out_features
        y = lowering.flatten_tokens(lowering.gather_rows(lowering.reshape_rows(y, batch, width), rows), width)
        return _mlp(block, y, batch), mask, rows, n_kept
    q_rows = attn.q_norm(_per_head(attn, lowering.gather_rows(q_tokens, rows)))
    o = _merge_heads(attn, _attend(q_rows, k_t, v, attn.scale, bias))
    h_rows = lowering.gather_rows(h, rows) if getattr(attn, "gate", None) is not None else h
    return _finish(block, lowering.gather_rows(x, rows), h_rows, o, batch), mask, rows, n_kept


def build(
    vit: VisionTransformer,
    arch: str,
    stages: Sequence[int] | None = None,
    keep: Sequence[float] | None = None,
    *,
    source: Path | None = None,
    checkpoint_format: str = "random",
    load_notes: Sequence[str] = (),
) -> ATSVisionTransformer:
    """Wrap a timm ViT; default stages are the paper's: block 3 to the last."""
    if stages is None:
        stages = default_stages(len(vit.blocks))
    return ATSVisionTransformer(
        vit, stages, arch, keep, source=source, checkpoint_format=checkpoint_format, load_notes=load_notes
    )


def with_input_size(model: ATSVisionTransformer, img_size: int) -> ATSVisionTransformer:
    """The same weights at another square input size (position embeddings resampled by timm)."""
    patch = model.vit.patch_embed.patch_size[0]
    if img_size <= 0 or img_size % patch:
        raise UserError(
            f"image size {img_size} is not a positive multiple of the patch size {patch}; "
            f"use e.g. {max(patch, img_size // patch * patch)} or {(img_size // patch + 1) * patch}."
        )
    if (img_size, img_size) == tuple(model.vit.patch_embed.img_size):
        return model
    model.vit.set_input_size(img_size=(img_size, img_size))
    return ATSVisionTransformer(
        model.vit,
        model.stages,
        model.arch,
        model.default_keep,
        source=model.source,
        checkpoint_format=model.checkpoint_format,
        load_notes=model.load_notes,
    )


def default_stages(depth: int) -> list[int]:
    return list(range(3, depth)) if depth > 3 else list(range(depth))


def parse_stages(text: str | Sequence[int] | None, depth: int) -> list[int] | None:
    """``"3-11"``, ``"3,5,7"``, ``"3-5,9"`` or a list of ints; ``"none"`` (said in full) for a dense model."""
    if text is None:
        return None
    if not isinstance(text, str):
        return [int(s) for s in text]
    if text.strip().lower() == "none":
        return []
    usage = f"use block indices like '3-{depth - 1}' or '3,5,7' (or 'none' for a model without ATS stages)."
    stages: list[int] = []
    for part in text.split(","):
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                if lo > hi:
                    raise UserError(f"stage range '{part.strip()}' runs backwards; did you mean '{hi}-{lo}'?")
                stages.extend(range(lo, hi + 1))
            else:
                stages.append(int(part))
        except ValueError:
            raise UserError(f"cannot read stages '{text}': {usage}") from None
    return stages
