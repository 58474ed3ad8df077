"""TensorRT plugin for ``ats_deploy::AdaptiveTokenSampler`` (the ``--ats-op custom`` node).

UNVERIFIED: written against the documented API, never run (no GPU or TensorRT where
it was written). It is a TensorRT "quickly deployable plugin" (``tensorrt.plugin``,
TensorRT >= 10.6; release notes 10.6.0, and "Adding Custom Layers using the Python
API (TensorRT >= 10.6)" in the developer guide), whose kernel is the reference's
own ATS math run by torch on TensorRT's CUDA stream (:func:`ats_deploy.sampler_op.sample_tokens`).

Docs relied on:

* "Writing custom operators with TensorRT Python plugins" (Python API docs,
  ``pluginGuide``) and ``tensorrt.plugin.register`` / ``impl`` / ``size_tensor`` /
  ``from_shape_expr``: the register function's signature declares inputs and
  attributes, its tuple return annotation the number of outputs; ``impl`` receives
  ``(inputs..., attributes..., outputs, stream)``.
* The same guide's non-zero sample (data-dependent shapes): a data-dependent
  dimension is a size tensor ``trtp.size_tensor(opt, upper_bound)`` that must also
  be an output of the plugin; ``impl`` writes its value.
* onnx-tensorrt ``FallbackPluginImporter``: an ONNX node of unknown op type is looked
  up as a plugin by op type, ``plugin_version`` (default "1") and ``plugin_namespace``
  attributes (10.10+ also reads the namespace from the node's domain); its INT
  attributes become INT32 plugin fields; the node must have exactly as many
  outputs as the plugin (ModelImporter ``parseNode``).

The plugin is Python code: engines that contain it need :func:`register_plugin`
called in every process that builds or deserializes them, and ``trtexec`` cannot
build them. The dynamic path reads m back to the host (``.item()``), so the plugin
synchronises its stream once per stage and cannot be captured in a CUDA graph.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` inspects the
annotations of the decorated functions as classes (``issubclass``), not strings.
"""

import functools
from types import SimpleNamespace

import numpy as np

from ats_deploy.errors import BackendUnavailable
from ats_deploy.sampler_op import DOMAIN, OP_TYPE, sample_tokens

PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"
MIN_VERSION = "10.6"  # first TensorRT with tensorrt.plugin
INSTALL_HINT = (
    "The AdaptiveTokenSampler TensorRT plugin needs an NVIDIA GPU, a CUDA build of PyTorch and TensorRT >= "
    f"{MIN_VERSION} (`pip install tensorrt`). Without one, run the model in onnxruntime (validate, bench), "
    "or export with --ats-op subgraph."
)


@functools.cache
def register_plugin() -> None:
    """Register the plugin with TensorRT's plugin registry (once per process).

    Call before parsing an ``--ats-op custom`` ONNX file and before deserializing
    an engine built from one. Raises :class:`BackendUnavailable` where TensorRT,
    ``tensorrt.plugin`` or CUDA is missing.
    """
    trt, trtp, torch = _import_backend()
    _define(trt, trtp, torch)


def _import_backend():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the package is there but libnvinfer is not
        raise BackendUnavailable(f"TensorRT is not installed here ({exc}).", hint=INSTALL_HINT) from None
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} has no tensorrt.plugin (Python plugins need TensorRT >= {MIN_VERSION}).",
            hint=INSTALL_HINT,
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is visible to PyTorch; the plugin runs its kernel with torch.")
    return trt, trtp, torch


def _device_tensor(torch, pointer: int, shape: tuple[int, ...], dtype):
    """A torch view of TensorRT memory, C-contiguous.

    Built from the pointer rather than through ``trtp.Tensor.__cuda_array_interface__``,
    whose strides describe the upper-bound shape of a data-dependent output, not the
    ``[B, m]`` that the plugin writes and the next layer reads.
    """

    interface = {
        "shape": shape,
        "typestr": np.dtype(dtype).str,
        "data": (pointer, False),
        "strides": None,
        "version": 3,
        "stream": None,  # producer and consumer share TensorRT's stream: no synchronisation needed
    }
    return torch.as_tensor(SimpleNamespace(__cuda_array_interface__=interface), device="cuda")


def _define(trt, trtp, torch) -> None:
    """Declare the plugin's shapes and its implementation with ``tensorrt.plugin``."""

    @trtp.register(PLUGIN_ID)
    def _shapes(
        scores: trtp.TensorDesc,
        clamp: trtp.TensorDesc,
        u: trtp.TensorDesc,
        length: int,
        prefix: int,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        batch = scores.shape_expr[0]
        tokens = scores.shape_expr[1] + prefix  # N: m <= N, the P prefix tokens and tokens P..N-1
        if length >= 0:
            # min() rather than a bare int: ShapeExpr(int) would use the expression builder
            # outside a shape calculation; the static length is already <= N.
            kept, size = trtp.min(tokens, length), trtp.from_shape_expr((), dtype=trt.int32)
        else:
            size = trtp.size_tensor(tokens, tokens)
            kept = size.expr()
        index = trtp.from_shape_expr((batch, kept, 1), dtype=trt.int64)
        mask = trtp.from_shape_expr((batch, kept, 1), dtype=trt.float32)
        n_kept = trtp.from_shape_expr((batch, 1), dtype=trt.float32)
        return index, mask, n_kept, size

    @trtp.impl(PLUGIN_ID)
    def _run(scores, clamp, u, length: int, prefix: int, outputs, stream) -> None:
        def view(tensor, shape=None):
            shape = tuple(tensor.shape) if shape is None else tuple(shape)
            return _device_tensor(torch, tensor.data_ptr, shape, trt.nptype(tensor.dtype))

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            results = sample_tokens(view(scores), view(clamp), view(u), length, prefix)
            for output, result in zip(outputs[:-1], results, strict=True):
                view(output, result.shape).copy_(result)
            view(outputs[-1], ()).fill_(results[0].shape[1])
