"""ONNX -> TensorRT engine, by concern: what to build, building it, the trtexec line, running it.

* :mod:`.plan`: the build a device profile asks for (shapes, precision, DLA, timing cache) and
  whether it is strongly typed; pure Python.
* :mod:`.trtexec`: the equivalent ``trtexec`` command line; pure Python.
* :mod:`.build`: the engine build with TensorRT's Python API, and the converted ONNX it reads.
* :mod:`.runner`: :class:`~.runner.TensorRTRunner`, numpy in and out of a saved engine.

The conversion to a reduced precision and its CPU agreement check are not TensorRT's: they
are :mod:`ats_deploy.exporters.precisions`. Everything that needs TensorRT imports it
through :func:`import_tensorrt` when called, so every module here imports on machines
without a GPU.
"""

from __future__ import annotations

from ats_deploy.errors import BackendUnavailable

INSTALL_HINT = (
    "`ats-deploy build` needs an NVIDIA GPU with TensorRT. On a GPU machine install it with "
    "`pip install tensorrt` (NVIDIA publishes the wheels; see NVIDIA's TensorRT installation guide); "
    "on a Jetson, JetPack already ships TensorRT and its Python bindings. Without a GPU, run the "
    "ONNX model with onnxruntime, or build later on the target with the trtexec command."
)


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`BackendUnavailable` saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the package is there but libnvinfer is not
        raise BackendUnavailable(f"TensorRT is not installed here ({exc}).", hint=INSTALL_HINT) from None
    return tensorrt
