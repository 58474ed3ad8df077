"""The ATS math of ``ATS_SPEC.md``, written once, batched and exportable.

Every function here works on whole batches with static-rank tensors and only uses
ops that both ONNX exporters (TorchScript tracing and dynamo) turn into standard
ONNX that TensorRT's parser accepts:

* ``searchsorted`` becomes a count: ``#{i : u_i <= cdf_p}``, over a fixed-length
  quantile grid whose slots past ``K-1`` hold ``+inf``;
* ``unique`` of the nondecreasing sample indices becomes an adjacent difference of
  those counts (token ``p`` is sampled iff the count grows at ``p``);
* compaction of the kept tokens becomes another count over the cumulative sum of
  the keep mask, so no ``NonZero``, ``Unique``, ``TopK`` or scatter is needed;
* the only data-dependent size, ``max K' + 1``, reaches the graph through
  :func:`dynamic_length`, which each exporter sees in the form it can trace.

Section numbers below refer to ``ATS_SPEC.md``.
"""

from __future__ import annotations

import torch

# Smallest normal float32: the spec's ``tiny`` guard against an all-zero score row.
TINY = float(torch.finfo(torch.float32).tiny)
MIN_FRACTION_BUDGET = 8
MIN_ABSOLUTE_BUDGET = 2


def budget(keep: torch.Tensor, n0: int) -> torch.Tensor:
    """Section 2: the number of tokens ``K`` (class token included) per stage.

    ``keep`` is float32 ``[S]``; values in ``(0, 1]`` are fractions of ``n0``,
    values above 1 absolute counts. Every step is float32, as in an exported graph.
    Returns float32 ``[S]`` holding whole numbers in ``[2, n0]``.
    """
    keep = keep.to(torch.float32)
    fraction = torch.floor(keep * float(n0) + 0.5).clamp(MIN_FRACTION_BUDGET, n0)
    absolute = torch.floor(keep).clamp(MIN_ABSOLUTE_BUDGET, n0)
    return torch.where(keep <= 1.0, fraction, absolute)


def budget_int(keep: float, n0: int) -> int:
    """:func:`budget` for one Python float (static exports, reports)."""
    return int(budget(torch.tensor([keep], dtype=torch.float32), n0)[0])


def significance(cls_attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Section 1, step 2: ``s_j = (sum_h A[h, 0, j]) * ||V_j||_2`` for ``j >= 1``.

    ``cls_attention``: ``[B, H, N]``, the class token's attention row per head
    (zero at padded keys). ``values``: ``[B, N, D]``, all heads concatenated.
    Returns ``[B, N-1]``.
    """
    attention = cls_attention[:, :, 1:].sum(dim=1)
    norms = torch.sqrt((values[:, 1:] * values[:, 1:]).sum(dim=-1))
    return attention * norms


def sample(scores: torch.Tensor, n_valid: torch.Tensor, k: torch.Tensor, grid: int) -> torch.Tensor:
    """Section 1, steps 3-6: which tokens the inverse-transform sampling keeps.

    ``scores``: ``[B, N-1]`` significance of tokens ``1..N-1`` (zero at padding).
    ``n_valid``: ``[B]`` valid tokens per image, class token included.
    ``k``: float32 scalar budget ``K``. ``grid``: static quantile slots, ``>= K-1``.
    Returns a bool mask ``[B, N]``; the class token is always kept.

    Token at position ``p`` (token ``p+1``) is the sample of quantile ``u_i`` iff
    ``cdf_{p-1} < u_i <= cdf_p`` (``searchsorted_left``), so with
    ``c_p = #{i : u_i <= cdf_p}`` it is kept iff ``c_p > c_{p-1}``. The clamp of
    step 5 sends every quantile above ``cdf_{n-3}`` to the last valid token, which
    is ``c_p = K-1`` from position ``n-2`` on.
    """
    total = scores.sum(dim=-1, keepdim=True).clamp_min(TINY)
    cdf = torch.cumsum(scores / total, dim=-1)
    quantiles = k - 1.0
    slots = torch.arange(1, grid + 1, device=scores.device, dtype=torch.float32)
    u = torch.where(slots <= quantiles, slots / quantiles, torch.full_like(slots, float("inf")))
    counts = (u <= cdf.unsqueeze(-1)).to(torch.float32).sum(dim=-1)
    positions = torch.arange(scores.shape[1], device=scores.device)
    clamped = positions.unsqueeze(0) >= (n_valid - 2).unsqueeze(1)
    counts = torch.where(clamped, quantiles, counts)
    previous = torch.cat([torch.zeros_like(counts[:, :1]), counts[:, :-1]], dim=1)
    kept = counts > previous
    return torch.cat([torch.ones_like(kept[:, :1]), kept], dim=1)


def dynamic_length(length: torch.Tensor, upper: int) -> torch.Tensor | int:
    """A data-dependent length (a 0-d integer tensor) as each exporter can trace it.

    The TorchScript tracer records ``arange(tensor)`` as an ONNX ``Range`` on the
    tensor; ``.item()`` would freeze it into a constant. torch.export needs an
    unbacked integer bounded with ``torch._check`` instead. Eager mode takes either.
    """
    if torch.jit.is_tracing():
        return length
    value = int(length.item())
    torch._check(value >= 1)
    torch._check(value <= upper)
    return value


def compact(kept: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 1, step 7 and section 3: indices of the kept tokens, ascending, padded.

    ``kept``: bool ``[B, N]``. Returns ``(index [B, m], n_kept [B])`` where ``m`` is
    ``max n_kept`` (or the static ``length``) and padded slots point at token 0.
    Slot ``r`` holds the position of the ``(r+1)``-th kept token, which is the
    number of positions whose running count of kept tokens is still ``<= r``.
    """
    running = torch.cumsum(kept.to(torch.float32), dim=1)
    n_kept = running[:, -1]
    if length is None:
        m = dynamic_length(n_kept.max().to(torch.int64), kept.shape[1])
        slots = torch.arange(m, device=kept.device).to(torch.float32)
    else:
        slots = torch.arange(length, device=kept.device, dtype=torch.float32)
    index = (running.unsqueeze(1) <= slots.view(1, -1, 1)).to(torch.float32).sum(dim=-1)
    valid = slots.unsqueeze(0) < n_kept.unsqueeze(1)
    index = torch.where(valid, index, torch.zeros_like(index))
    return index.to(torch.int64), n_kept.to(torch.int64)


def key_bias(n_valid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Section 3: additive ``[B, 1, 1, m]`` attention bias, ``-inf`` on padded keys.

    ``tokens`` is the ``[B, m, D]`` sequence whose first ``n_valid`` rows are valid.
    """
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    valid = slots.unsqueeze(0) < n_valid.unsqueeze(1)
    zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
    bias = torch.where(valid, zero, torch.full_like(zero, float("-inf")))
    return bias[:, None, None, :]


def gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` restricted to rows ``index [B, m]`` along ``dim`` (the token axis)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(x.shape)
    expanded[dim] = index.shape[1]
    return torch.gather(x, dim, index.view(shape).expand(expanded))
