"""The ``ats_deploy::AdaptiveTokenSampler`` kernel for onnxruntime: a Python op of onnxruntime-extensions.

The op's contract and the math it runs are :mod:`ats_deploy.sampler_op`; :func:`register` makes
it runnable in a session (the session factory, :mod:`.session`, calls it for ``--ats-op custom``
files).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ats_deploy.errors import BackendUnavailable
from ats_deploy.sampler_op import DOMAIN, DYNAMIC, OP_TYPE, sample_tokens


def register(options) -> None:
    """Make ``AdaptiveTokenSampler`` runnable in sessions created with ``options`` (an ``ort.SessionOptions``).

    onnxruntime-extensions runs Python functions as ops ("PyOp"); an ``op_type`` of
    the form ``domain::name`` registers the op in that domain, so the model keeps
    its own ``ats_deploy`` domain (onnxruntime-extensions ``pyop/pyfunc.cc``,
    ``PyCustomOpDef::AddOp``). The Python ops reach the session together with the
    extension library (``register_custom_ops_library``).
    """
    extensions = _import_extensions()
    _declare_onnxruntime_op(extensions)
    options.register_custom_ops_library(extensions.get_library_path())


def _import_extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        raise BackendUnavailable(
            "running an --ats-op custom model in onnxruntime needs onnxruntime-extensions, which is not installed.",
            hint="pip install onnxruntime-extensions, or export with --ats-op subgraph.",
        ) from None
    return onnxruntime_extensions


@functools.cache
def _declare_onnxruntime_op(extensions) -> None:
    """Declare the Python op once per process: each declaration adds one more kernel to the domain."""
    types = extensions.PyCustomOpDef
    extensions.onnx_op(
        op_type=f"{DOMAIN}::{OP_TYPE}",
        inputs=[types.dt_float, types.dt_float, types.dt_float],
        outputs=[types.dt_int64, types.dt_float, types.dt_float, types.dt_int32],
        attrs={"length": types.dt_int64, "prefix": types.dt_int64},
    )(_onnxruntime_kernel)


def _onnxruntime_kernel(
    scores: np.ndarray, clamp: np.ndarray, u: np.ndarray, length: int = DYNAMIC, prefix: int = 1
) -> tuple[np.ndarray, ...]:
    """The PyOp body: onnxruntime passes numpy arrays and the attributes as keywords."""
    arrays = (scores, clamp, u)
    index, mask, n_kept = sample_tokens(*(torch.from_numpy(a) for a in arrays), length, prefix)
    return index.numpy(), mask.numpy(), n_kept.numpy(), np.array(index.shape[1], dtype=np.int32)
