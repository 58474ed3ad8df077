"""Run a saved TensorRT engine: numpy in, numpy out, device memory from torch on one CUDA stream.

:class:`TensorRTRunner` is the engine itself (numpy in and out, as the tests drive it); :class:`EngineRunner` is the
backend's runner around it (``runtime.open``, bench), torch tensors in like every runner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ats_deploy.artifact import SIDECAR_KEY, engine_info_path
from ats_deploy.errors import BackendUnavailable, UserError
from ats_deploy.keep import keep_rows

from ..base import Outputs
from .plugin import register_plugin

if TYPE_CHECKING:
    import torch

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


def _import_cuda_torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("PyTorch is not installed; the TensorRT runner uses its CUDA memory.") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "no CUDA device is visible to PyTorch; the TensorRT runner needs an NVIDIA GPU and a CUDA build of torch."
        )
    return torch


def _output_allocator(trt, torch):
    """An ``IOutputAllocator`` handing out torch CUDA memory, for data-dependent output shapes."""

    # Python API "IExecutionContext": subclass trt.IOutputAllocator, call its __init__,
    # implement reallocate_output_async and notify_shape (as NVIDIA's dds_faster_rcnn sample).
    class TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                # torch's CUDA caching allocator aligns blocks to 512 bytes, more than TensorRT asks for.
                buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return TorchOutputAllocator()


class TensorRTRunner:
    """Runs a saved engine: numpy in, numpy out, device memory from torch on one CUDA stream.

    Uses the name-based I/O API of TensorRT 10+ (``set_input_shape``,
    ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``; docs
    "Migrating Python Code from TensorRT 8.x to 10.x").
    """

    def __init__(self, engine_path: Path | str) -> None:
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"engine {self.path} does not exist; build it with `ats-deploy build`.")
        trt = self._trt = import_tensorrt()
        torch = self._torch = _import_cuda_torch()
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        self._runtime = trt.Runtime(self._logger)
        built_for = self._built_for()
        if built_for.get(SIDECAR_KEY, {}).get("ats_op") == "custom":
            register_plugin()
        dla_core = built_for.get("dla_core")
        if dla_core is not None:
            self._runtime.DLA_core = dla_core
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise UserError(
                f"TensorRT {trt.__version__} could not load the engine {self.path}.",
                hint="An engine runs only with the TensorRT version and GPU model it was built with; "
                "rebuild it on this machine with `ats-deploy build`.",
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._stream = torch.cuda.Stream()
        self._allocator = _output_allocator(trt, torch)

    def _built_for(self) -> dict[str, Any]:
        info = engine_info_path(self.path)
        return json.loads(info.read_text()) if info.is_file() else {}

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))

    def _accepted(self, name: str) -> str:
        shape = tuple(self._engine.get_tensor_shape(name))
        if -1 not in shape:
            return f"shape {shape}"
        low, _, high = self._engine.get_tensor_profile_shape(name, 0)
        return f"shapes {tuple(low)} to {tuple(high)}"

    def _bind_input(self, name: str, value: np.ndarray):
        array = np.ascontiguousarray(value, dtype=self._dtype(name))
        if not self._context.set_input_shape(name, array.shape):
            raise UserError(
                f"input '{name}' has shape {array.shape}, but engine {self.path} was built for {self._accepted(name)}."
            )
        tensor = self._torch.from_numpy(array).to("cuda")
        self._context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def _bind_output(self, name: str):
        """A buffer of the output's shape, or ``None`` when it is only known after running."""
        shape = tuple(self._context.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            self._context.set_output_allocator(name, self._allocator)
            return None
        dtype = self._torch.from_numpy(np.empty(0, self._dtype(name))).dtype
        tensor = self._torch.empty(shape, dtype=dtype, device="cuda")
        self._context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def _fetch(self, name: str, tensor) -> np.ndarray:
        if tensor is not None:
            return tensor.cpu().numpy()
        shape = self._allocator.shapes[name]
        dtype = self._dtype(name)
        data = self._allocator.buffers[name][: math.prod(shape) * dtype.itemsize]
        return data.cpu().numpy().view(dtype).reshape(shape)

    def run(self, images: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
        """``{"logits": [batch, classes], "tokens": [batch, S]}`` for ``images`` and ``keep``.

        ``keep`` is ignored by a static engine, whose budget is baked in.
        """
        feeds = {"images": images, "keep": keep}
        unknown = [name for name in self.inputs if name not in feeds]
        if unknown:
            raise UserError(f"engine {self.path} has inputs {unknown} that ats-deploy does not know.")
        torch = self._torch
        with torch.cuda.stream(self._stream):
            bound = [self._bind_input(name, feeds[name]) for name in self.inputs]
            outputs = {name: self._bind_output(name) for name in self.outputs}
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path}; see the TensorRT log above.")
            self._stream.synchronize()  # data-dependent shapes are final once the work is done
            result = {name: self._fetch(name, tensor) for name, tensor in outputs.items()}
        del bound  # the inputs' device memory must live until the stream is done
        return result

    __call__ = run


class EngineRunner:
    """A TensorRT engine file as a backend's runner: torch tensors in, numpy out like every runner."""

    def __init__(self, path: Path, label: str) -> None:
        self.runner, self.label = TensorRTRunner(path), label

    def __call__(self, images: torch.Tensor, keep: torch.Tensor) -> Outputs:
        out = self.runner.run(images.numpy(), keep_rows(keep, len(images)))
        return out["logits"], out["tokens"]
