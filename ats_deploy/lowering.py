"""How the ATS math of :mod:`ats_deploy.ats` and the model's blocks become exportable graph ops.

The math is written once; these helpers decide the ONNX nodes it turns into, so
that both exporters (TorchScript tracing and dynamo) emit standard ONNX that
TensorRT's parser accepts and onnxruntime runs fast:

* data-dependent lengths (the ``K-1`` quantiles a stage draws, the ``max K' + 1``
  tokens it keeps) reach the graph as run-time inputs of one ``Slice`` or ``TopK``
  node under TorchScript tracing (:class:`_Leading`, :class:`_TopK`), and as
  bounded unbacked integers under torch.export (:func:`dynamic_length`);
* reshapes copy the leading dims with ONNX ``0`` or read the batch size from one
  shared tensor, so no traced ``Shape``/``Gather``/``Concat`` chains appear;
* linear layers run on 2-D token rows (``Gemm`` with its bias), row gathers copy
  whole rows (``GatherND``) and the value norm uses ``ReduceSum``;
* the graph names its ATS structure as it is traced, so no later pass looks for it:
  each stage's kept-token mask carries its name (:func:`named_greater`), and under
  :func:`sampler_as_node` each stage's sampler is traced as one node
  (:class:`ats_deploy.model.TokenSampler`, ``--ats-op custom``).

Each choice was measured against the alternative; bench/RESULTS.md ("Why the graph
looks like this") says where.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch.fx.traceback import annotate

# The FX node annotation (``node.meta["custom"]``) that gives a tensor its name under torch.export.
NAME = "onnx_name"


def dynamic_length(length: torch.Tensor, upper: int) -> int:
    """A data-dependent length (a 0-d integer tensor) as an int, outside TorchScript tracing.

    torch.export needs an unbacked integer bounded with ``torch._check``; eager mode
    just reads it. (The tracer would freeze ``.item()`` into a constant, so traced
    code passes the tensor itself to :class:`_Leading` or :class:`_TopK` instead.)
    """
    value = int(length.item())
    torch._check(value >= 1)
    torch._check(value <= upper)
    return value


class _Leading(torch.autograd.Function):
    """``x[:, :length]`` with ``length`` a run-time ``[1]`` int64 tensor: one ``Slice`` on axis 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return x[:, : int(length[0])]

    @staticmethod
    def symbolic(g, x, length):
        zero, one = g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([1]))
        return g.op("Slice", x, zero, length, one)


def leading(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``x[:, :length]`` for a data-dependent ``length`` (int64 ``[1]``): one ``Slice`` whose end is that tensor."""
    if torch.jit.is_tracing():
        return _Leading.apply(x, length)
    return x[:, : dynamic_length(length[0], x.shape[1])]


class _TopK(torch.autograd.Function):
    """``torch.topk`` along dim 1 with ``k`` a run-time int64 ``[1]`` tensor: one ``TopK`` node.

    The exporter's own ``topk`` reshapes a tensor ``k`` to ``[1]`` first, one more node.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(x, int(k[0]), dim=1, largest=True, sorted=True)

    @staticmethod
    def symbolic(g, x, k):
        return g.op("TopK", x, k, axis_i=1, largest_i=1, sorted_i=1, outputs=2)


def top_rows(key: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max(counts)`` largest ``key [B, N, 1]`` along dim 1, sorted (``counts``: float32 ``[B, 1]``).

    One ``TopK`` whose ``k`` is the batch's largest count, computed in the graph.
    """
    if torch.jit.is_tracing():
        return _TopK.apply(key, counts.amax(dim=0).to(torch.int64))
    return torch.topk(key, dynamic_length(counts.max(), key.shape[1]), dim=1, largest=True, sorted=True)


class _GatherRows(torch.autograd.Function):
    """``x [B, N, C]`` rows ``index [B, m, 1]`` -> ``[B, m, C]``.

    Exported by the TorchScript exporter as ``GatherND(batch_dims=1)``, which copies
    whole rows; ``torch.gather`` would export as ``GatherElements`` with an index
    expanded to every element.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, index.expand(-1, -1, x.shape[-1]))

    @staticmethod
    def symbolic(g, x, index):
        return g.op("GatherND", x, index, batch_dims_i=1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]`` restricted to the token rows ``index [B, m, 1]``."""
    return _GatherRows.apply(x, index)


class _ReshapeTail(torch.autograd.Function):
    """Reshape all but the first ``lead`` dims; exported as one ``Reshape`` to ``[0, .., 0, *tail]``.

    ONNX ``0`` copies a dimension, so the batch and token counts need no
    ``Shape``/``Gather``/``Concat`` chain, which the tracer would otherwise emit.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lead: int, tail: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(*x.shape[:lead], *tail)

    @staticmethod
    def symbolic(g, x, lead: int, tail: tuple[int, ...]):
        shape = [0] * lead + list(tail)
        if -1 not in tail:  # the last lead dim is then implied (and torch's shape inference wants a -1)
            shape[lead - 1] = -1
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape_tail(x: torch.Tensor, lead: int, *tail: int) -> torch.Tensor:
    """``x`` with its dims after the first ``lead`` reshaped to ``tail`` (one ``-1`` allowed)."""
    return _ReshapeTail.apply(x, lead, tail)


class _ReshapeRows(torch.autograd.Function):
    """Token rows ``y [B*n, ...]`` as ``[B, n, *tail]``, the batch size ``B`` read from ``batch``.

    Exported as ``Reshape(y, Concat(Shape(batch, end=1), [-1, *tail]))``: the way
    back from the 2-D rows a ``Gemm`` works on. When every block passes the same
    ``batch`` tensor, onnxruntime merges all those ``Shape`` and ``Concat`` nodes
    into one of each per ``tail``.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, batch: torch.Tensor, tail: tuple[int, ...]) -> torch.Tensor:
        return y.reshape(batch.shape[0], -1, *tail)

    @staticmethod
    def symbolic(g, y, batch, tail: tuple[int, ...]):
        rest = torch.tensor([-1, *tail], dtype=torch.int64)
        size = batch.type().varyingSizes()[0]
        if size is not None:  # a static export: the whole shape is a constant
            return g.op("Reshape", y, g.op("Constant", value_t=torch.cat([torch.tensor([size]), rest])))
        dims = g.op("Shape", batch, end_i=1)
        return g.op("Reshape", y, g.op("Concat", dims, g.op("Constant", value_t=rest), axis_i=0))


def reshape_rows(y: torch.Tensor, batch: torch.Tensor, *tail: int) -> torch.Tensor:
    """``y [B*n, ...]`` as ``[B, n, *tail]``, ``B = batch.shape[0]`` (pass one tensor everywhere)."""
    return _ReshapeRows.apply(y, batch, tail)


def flatten_tokens(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, N, width]`` as ``[B*N, width]``: linear layers on 2-D rows export as ``Gemm`` with its bias.

    On 3-D input of dynamic length they export as ``MatMul`` + ``Add``, which
    onnxruntime cannot fuse into ``Gemm``, and ``fc1``'s bias and GELU become ``BiasGelu``.
    """
    return reshape_tail(x, 0, -1, width)


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||_2`` over the last dim, kept as a dim of size 1.

    Written as ``Mul``, ``ReduceSum`` and ``Sqrt``: onnxruntime's ``ReduceSum`` over a
    contiguous last axis has a fast kernel that ``ReduceL2`` and ``ReduceSumSquare`` lack.
    """
    return (x * x).sum(dim=-1, keepdim=True).sqrt()


def named_greater(current: torch.Tensor, previous: torch.Tensor, name: str | None) -> torch.Tensor:
    """``current > previous``, its output named ``name`` in exported graphs (a kept-token mask).

    Under TorchScript tracing the traced value takes the name; the exporter renames every value
    made inside a module's scope after its node (``/samplers.0/Greater_output_0``), so the
    comparison is traced in a scope of its own, of no module, whose values keep their names.
    Under torch.export the node carries the annotation :data:`NAME`, which the dynamo exporter's
    caller gives its output as name.
    """
    if name is None:
        return current > previous
    if torch.jit.is_tracing():
        state = torch._C._get_tracing_state()
        state.push_scope(name)
        try:
            mask = current > previous
        finally:
            state.pop_scope()
        torch._C._get_value_trace(mask).setDebugName(name)
        return mask
    if torch.compiler.is_exporting():  # annotate() edits a global dict: only while torch.export traces
        with annotate({NAME: name}):
            return current > previous
    return current > previous


_SAMPLER_NODE = contextvars.ContextVar("sampler_node", default=False)


@contextlib.contextmanager
def sampler_as_node() -> Iterator[None]:
    """While active, TorchScript tracing writes each stage's sampler as one node (``--ats-op custom``).

    A switch around the export, as timm's ``set_exportable`` is: the model's forward stays the math.
    """
    token = _SAMPLER_NODE.set(True)
    try:
        yield
    finally:
        _SAMPLER_NODE.reset(token)


def traces_sampler_as_node() -> bool:
    """Whether the sampler being traced is to become one node (:func:`sampler_as_node`)."""
    return _SAMPLER_NODE.get() and torch.jit.is_tracing()
