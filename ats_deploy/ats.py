"""The ATS math of ``docs/ATS.md``, written once for whole batches.

In the spec's order: the budget ``K`` (section 2), the quantiles (step 4), the
significance scores (step 2), the cdf (step 3), the sampling (steps 5-6), the
compaction of the kept tokens (step 7, section 3), the key bias of the padding
(section 3) and the clamp of step 5. Section numbers below refer to ``docs/ATS.md``.

The math is batched with static-rank tensors and no data-dependent op:
``searchsorted`` is a count ``#{i : u_i <= cdf_p}``, ``unique`` of the
nondecreasing sample indices is an adjacent difference of those counts, and the
compaction is a top-k over keys that sort the kept tokens first, in order. How
each piece becomes graph ops (the run-time lengths, the reshapes, the row
gathers) is :mod:`ats_deploy.lowering`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lowering import l2_norm, leading, named_greater, reshape_tail, top_rows

# Smallest normal float32: the spec's ``tiny`` guard against an all-zero score row.
TINY = float(torch.finfo(torch.float32).tiny)
# Section 2's budget floors are ``P + 7`` (fraction) and ``P + 1`` (absolute): these
# are the patch-token parts, the draws ``D = K - P`` a floor leaves.
MIN_FRACTION_DRAWS = 7
MIN_ABSOLUTE_DRAWS = 1
# The class token's count in :func:`sample`: above the ``c_{-1} = 0`` it is compared
# with, and below every count of a kept patch token (>= 1), so that the counts of
# the kept tokens, class token included, strictly increase with the position.
# With ``P`` prefix tokens, prefix token ``i`` counts ``(i + 1) / (P + 1)`` (0.5 for P = 1).
CLASS_TOKEN_COUNT = 0.5
# What :func:`clamp_bias` lifts the cdf by from the last valid token on: above every
# quantile (``u_i <= 1``) yet finite, below the ``+inf`` of the slots past an image's
# own draws, so those slots are never counted, not even by the last valid token.
CDF_LIFT = 2.0


def budget(keep: torch.Tensor, n0: int, prefix: int = 1) -> torch.Tensor:
    """Section 2: the number of tokens ``K`` (the ``prefix`` tokens included) per stage.

    ``keep`` is float32 ``[B, S]`` (one row per image) or ``[S]``; values in ``(0, 1]``
    are fractions of ``n0``, values above 1 absolute counts. Every step is float32, as
    in an exported graph. Returns float32 of ``keep``'s shape holding whole numbers in ``[P + 1, n0]``.

    Every float has a defined budget, so a bad value from a caller never reaches
    the sampler: values <= 0 (and ``-inf``) get the fraction floor, ``+inf`` the
    full ``n0``, and NaN counts as 1.0 (the full budget: a bad value costs speed,
    never accuracy). ``keep == keep`` is the NaN test both exporters and TensorRT's
    parser know (``Equal`` + ``Where``).
    """
    keep = keep.to(torch.float32)
    keep = torch.where(keep == keep, keep, torch.ones_like(keep))
    fraction = torch.floor(keep * float(n0) + 0.5).clamp(prefix + MIN_FRACTION_DRAWS, n0)
    absolute = torch.floor(keep).clamp(prefix + MIN_ABSOLUTE_DRAWS, n0)
    return torch.where(keep <= 1.0, fraction, absolute)


def budget_int(keep: float, n0: int, prefix: int = 1) -> int:
    """:func:`budget` for one Python float (static exports, reports)."""
    return int(budget(torch.tensor([keep], dtype=torch.float32), n0, prefix)[0])


def quantiles(k: torch.Tensor, grid: int, prefix: int = 1) -> torch.Tensor:
    """Section 1, step 4 for every image and stage at once: ``u_i = i / D``, ``i = 1..D``, ``D = K - P`` draws.

    ``k``: float32 ``[B, S]`` budgets. Returns ``[B, S, grid]``; slots past an image's
    ``D`` hold ``+inf`` so that no cdf value reaches them. Computed once per forward, so
    each stage only reads its column.
    """
    slots = torch.arange(1, grid + 1, device=k.device, dtype=torch.float32)
    q = (k - float(prefix)).unsqueeze(-1)
    return torch.where(slots <= q, slots / q, torch.full_like(slots, float("inf")))


def most_draws(k: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """int64 ``[S]``: per stage, the most draws ``D = K - P`` of any image of the batch (``k``: ``[B, S]``).

    A stage compares every cdf with that many quantile slots; an image with a smaller
    budget holds ``+inf`` in its extra slots. The maximum is taken in float32 (TensorRT
    8.6 reduces only floats), then cast.
    """
    return (k.amax(dim=0) - float(prefix)).to(torch.int64)


def drawn_quantiles(u: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A stage's quantiles ``[B, G]`` (a column of :func:`quantiles`) cut to ``count`` slots, as ``[B, 1, D]``.

    ``count``: int64 ``[1]``, the batch's most draws (:func:`most_draws`). The slots
    past ``D`` hold ``+inf`` and never count; cutting them off shrinks the
    ``[B, N-P, G]`` comparison of :func:`sample` to ``[B, N-P, D]``. The middle axis
    lets the rows broadcast against the cdf ``[B, N-P, 1]``.
    """
    return leading(u, count).unsqueeze(1)


def significance(cls_attention: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Section 1, step 2: ``s_j = (sum_h A[h, 0, j]) * ||V_j||_2`` for every token ``j``.

    ``cls_attention``: ``[B, H, 1, N]``, the class token's attention row per head
    (zero at padded keys). ``tokens``: the values ``[B, N, C]`` with all heads
    concatenated, as the qkv projection lays them out (before the split into
    heads), so the norm reduces a contiguous last axis. Returns ``[B, N, 1]``
    (tokens on dim 1, as :func:`sample` wants them; the prefix tokens included:
    callers drop them).
    """
    heads = reshape_tail(cls_attention.sum(dim=1), 1, -1, 1)
    return heads * l2_norm(tokens)


def cdf(scores: torch.Tensor, clamp: torch.Tensor | None = None) -> torch.Tensor:
    """Section 1, step 3: normalised scores ``[B, N-P, 1]`` cumulated in token order (float32, dim 1).

    With ``clamp`` (:func:`clamp_bias`) subtracted before cumulating, the cdf is
    at least :data:`CDF_LIFT` from the last valid token on and unchanged before it.
    """
    total = scores.sum(dim=1, keepdim=True).clamp_min(TINY)
    normalised = scores / total
    if clamp is not None:
        normalised = normalised - clamp
    return torch.cumsum(normalised, dim=1)


def sample(
    scores: torch.Tensor, clamp: torch.Tensor, u: torch.Tensor, prefix: int = 1, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 1, steps 3-6: which tokens the inverse-transform sampling keeps.

    ``scores``: ``[B, N-P, 1]`` significance of the patch tokens ``P..N-1`` (zero at padding).
    ``clamp``: ``[1 or B, N-P, 1]``, ``-CDF_LIFT`` from the last valid token on (:func:`clamp_bias`).
    ``u``: ``[B or 1, 1, D]`` quantiles of this stage, one row per image
    (:func:`drawn_quantiles`; slots holding ``+inf`` never count).
    Returns ``(kept, count)``, both ``[B, N, 1]`` over all tokens (tokens on dim 1, as :func:`compact` wants them):
    ``kept`` the bool mask (the ``P`` prefix tokens are always kept) and ``count`` the
    number of quantiles at or below each token's cdf, which strictly increases
    along the kept tokens (:data:`CLASS_TOKEN_COUNT` for the prefix tokens).

    Token at position ``p`` (token ``p+P``) is the sample of quantile ``u_i`` iff
    ``cdf_{p-1} < u_i <= cdf_p`` (``searchsorted_left``), so with
    ``c_p = #{i : u_i <= cdf_p}`` it is kept iff ``c_p > c_{p-1}`` (``c_{-1} = 0``).
    The clamp of step 5 sends every quantile above ``cdf_{n-P-2}`` to the last valid
    token: its clamped cdf is above 1, so ``c_{n-P-1} = D`` (finite: the ``+inf`` slots of an
    image that draws fewer than the batch's most are counted nowhere). Both sides of the
    comparison are the counts shifted by one ``Pad`` each (with ``P > 1``, the
    prefix counts are a constant concatenated in front instead). ``name``: what exported graphs call
    the ``kept`` mask (:func:`ats_deploy.sampler_op.kept_name`).
    """
    counts = (u <= cdf(scores, clamp)).to(torch.float32).sum(dim=-1, keepdim=True)
    current = _with_prefix_counts(counts, prefix)
    previous = F.pad(counts, (0, 0, prefix + 1, -1), value=0.0)
    return named_greater(current, previous, name), current


def _with_prefix_counts(counts: torch.Tensor, prefix: int) -> torch.Tensor:
    """``counts [B, N-P, 1]`` behind the prefix tokens' counts ``(i + 1) / (P + 1)``: distinct, increasing, in (0, 1).

    Distinct counts keep the prefix tokens in order through :func:`compact`'s top-k.
    One token is one ``Pad``; more are a constant ``[1, P, 1]``, broadcast to the
    batch through ``counts[:, :1] * 0``, and one ``Concat``.
    """
    if prefix == 1:
        return F.pad(counts, (0, 0, 1, 0), value=CLASS_TOKEN_COUNT)
    steps = torch.arange(1, prefix + 1, dtype=torch.float32, device=counts.device) / (prefix + 1)
    return torch.cat([counts[:, :1] * 0.0 + steps.reshape(1, prefix, 1), counts], dim=1)


def compact(
    kept: torch.Tensor, count: torch.Tensor, upper: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Section 1, step 7 and section 3: indices of the kept tokens, ascending, padded.

    ``kept``, ``count``: ``[B, N, 1]`` from :func:`sample`; ``upper`` exceeds every
    count (the model's token count, ``n0 >= K``), fixed when the graph is built.
    Returns ``(index [B, m, 1], mask [B, m, 1], n_kept [B, 1])`` where ``m`` is the
    largest number of kept tokens in the batch (or the static ``length``) and
    ``mask`` the key mask of the result: 0 at kept tokens, ``-inf`` in padded slots
    (``mask == 0`` is the valid flag). ``n_kept`` is float32, whole numbers: the
    count and its maximum over the batch are reductions, which TensorRT 8.6 runs
    only on floats (an int64 sum would be a node its parser lacks).
    A kept token ranks ``upper - count > 0``, strictly decreasing with its position,
    a dropped one ``-inf``: the ``m`` largest ranks are the kept tokens in order,
    then (in padded slots) some dropped ones, so the key mask is ``min(rank, 0)``.
    """
    key = torch.where(kept, upper - count, float("-inf"))
    n_kept = kept.to(torch.float32).sum(dim=1)
    if length is None:
        rank, index = top_rows(key, n_kept)
    else:
        rank, index = torch.topk(key, length, dim=1, largest=True, sorted=True)
    return index, rank.clamp_max(0.0), n_kept


def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """Section 3: the key mask ``[B, m, 1]`` of :func:`compact` as the additive ``[B, 1, 1, m]`` attention bias."""
    return reshape_tail(mask, 1, 1, 1, -1)


def clamp_bias(
    mask: torch.Tensor | None, n: int, device: torch.device | None = None, prefix: int = 1
) -> torch.Tensor:
    """Float ``[B or 1, n-P, 1]`` over the patch tokens ``P..n-1``: ``-CDF_LIFT`` from the last valid token on, else 0.

    :func:`cdf` subtracts it, so the cdf exceeds 1 there and every quantile is
    counted by the last valid token: step 5's clamp ``min(t_i, n-P-1)``. Position
    ``p`` (token ``p+P``) is the last valid token or later iff token ``p+P+1`` is
    padding or past the end: the stage's key mask (from :func:`compact`, 0 or ``-inf``)
    floored at ``-CDF_LIFT``, shifted left by ``P+1`` and padded, one ``Max`` and one ``Pad``.
    ``mask`` is ``None`` while nothing is padded (``n`` is then the model's constant token
    count): only the last token.
    """
    if mask is None:
        clamp = torch.zeros(1, int(n) - prefix, 1, device=device)
        clamp[:, -1] = -CDF_LIFT
        return clamp
    return F.pad(mask.clamp_min(-CDF_LIFT), (0, 0, -(prefix + 1), 1), value=-CDF_LIFT)
