"""How an exported graph writes each ATS stage's sampling, as runtimes read it.

Two forms (``ats-deploy export --ats-op``): the standard-op subgraph, whose kept-token mask
(bool ``[B, N, 1]``, the P prefix tokens first) carries the name :func:`kept_name`, or one
``ats_deploy::AdaptiveTokenSampler`` node per stage (``--ats-op custom``). The model writes both
as it is traced (:class:`ats_deploy.model.TokenSampler`); both kernels run :func:`sample_tokens`
(onnxruntime: :mod:`ats_deploy.backends.onnxruntime.kernel`; TensorRT:
:mod:`ats_deploy.backends.tensorrt.plugin`).

The node (domain ``ats_deploy``, version 5), for a model with ``P`` prefix tokens:

=========  ==================================  =================================================
inputs     ``scores`` float32 [B, N-P, 1]      significance of the patch tokens P..N-1
           ``clamp`` float32 [1 or B, N-P, 1]  ``-2`` from the last valid token on, else 0
           ``u`` float32 [B or 1, 1, G]        each image's quantiles (``+inf`` slots never count)
outputs    ``index`` int64 [B, m, 1]           kept tokens, prefix tokens first, padded
           ``mask`` float32 [B, m, 1]          key mask: 0 at kept tokens, ``-inf`` in padded slots
           ``n_kept`` float32 [B, 1]           tokens each image kept (K' + P), whole numbers
           ``length`` int32 []                 m, the plugin's size tensor in TensorRT
attribute  ``length`` int                      static m, or -1: m = most tokens kept in the batch
           ``prefix`` int                      P, the prefix tokens kept first and never sampled
=========  ==================================  =================================================

Its semantics are :func:`sample_tokens`, i.e. ``ats.compact(ats.sample(...))``. The
last output exists because TensorRT requires a plugin's size tensors (here m, a
data-dependent dimension) to be plugin outputs, and its ONNX parser requires the
node to have as many outputs as the plugin; nothing consumes it. The string
attributes ``plugin_namespace`` / ``plugin_version`` are how the TensorRT ONNX parser
(before 10.10) finds the plugin: it looks plugins up by op type, ``plugin_version``
(default "1") and ``plugin_namespace`` (default ""), not by the node's domain.

Module-level imports stay light (numpy only): onnx and torch load when a function needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

DOMAIN = "ats_deploy"
OP_TYPE = "AdaptiveTokenSampler"
# 1: (scores, last, u, quantile_count) -> (index, valid, n_kept), tokens on the last dim;
# 2: scores [B, N-1] and u [G]; 3: scores [B, N-1, 1] and u [1, G], as the reference's sampler takes them;
# 4: n_kept float32 (TensorRT 8.6 reduces only floats, so the subgraph counts in float32);
# 5: u [B, 1, G], one row of quantiles per image (docs/ATS.md, interface version 2), and the prefix attribute.
OP_VERSION = 5
DYNAMIC = -1  # the ``length`` attribute of a stage whose kept count is known only at run time

# (name, dtype, rank) of the node's outputs, in its order; ``length``, the size tensor, comes after them (int32 []).
OUTPUTS = (
    ("index", np.dtype(np.int64), 3),
    ("mask", np.dtype(np.float32), 3),
    ("n_kept", np.dtype(np.float32), 2),
)

# Each ATS stage's kept-token mask in a subgraph export carries this name, so that validation can compare
# which patches were kept.
KEPT = "ats_kept_{}"


def kept_name(stage: int) -> str:
    """The name of ATS stage ``stage``'s kept-token mask in an exported graph."""
    return KEPT.format(stage)


def kept_masks(model: onnx.ModelProto) -> list[str]:
    """The kept-token masks of a subgraph export, in stage order (none in a custom-op export).

    The model names them as it is traced (:func:`ats_deploy.lowering.named_greater`).
    """
    produced = {name for node in model.graph.node for name in node.output}
    found: list[str] = []
    while kept_name(len(found)) in produced:
        found.append(kept_name(len(found)))
    return found


def sample_tokens(
    scores: torch.Tensor, clamp: torch.Tensor, u: torch.Tensor, length: int, prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one ``AdaptiveTokenSampler`` node computes: the reference's ``TokenSampler``."""
    from .ats import compact, sample

    kept, count = sample(scores, clamp, u, prefix)
    # Counts never exceed the K-P quantiles drawn: K bounds them as the model's n0 does.
    return compact(kept, count, u.shape[-1] + 1, None if length < 0 else length)


def uses_custom_op(model: onnx.ModelProto | str | Path) -> bool:
    """Whether the model (or the ONNX file) imports the ``ats_deploy`` domain, i.e. needs the op's kernel."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(op.domain == DOMAIN for op in model.opset_import)
