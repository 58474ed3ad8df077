"""PyTorch ATS model -> one ONNX file (docs/ATS.md section 4).

Dynamic export: ``images [batch, 3, H, W]`` and ``keep [batch, S]`` are inputs, so one
file serves every batch size and every budget, each image with its own row of budgets
(interface version 2), which lets a serving engine batch requests with different budgets.
Static export: batch and keep are baked in and every stage is padded to its budget, so that every shape is a
constant (TensorRT before 8.6, DLA).

The graph is cleaned with onnx-graphsurgeon (constant folding, dead-node removal,
topological sort), checked with ``onnx.checker`` and full shape inference, given
the metadata later commands rely on, and written atomically: a failure at any
step leaves no ``.onnx`` behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch

from ats_deploy import __version__, sampler_op
from ats_deploy.artifact import Artifact, read_metadata
from ats_deploy.atomic import atomic_output
from ats_deploy.ats import budget_int
from ats_deploy.errors import UserError
from ats_deploy.images import data_config
from ats_deploy.keep import per_stage
from ats_deploy.lowering import NAME, sampler_as_node
from ats_deploy.model import ATSVisionTransformer
from ats_deploy.sampler_op import DOMAIN, DYNAMIC, OP_TYPE, OP_VERSION

if TYPE_CHECKING:
    from .precisions.int8 import Calibration

EXPORTERS = ("torchscript", "dynamo")
# How each ATS stage's sampling is written (sampler_op.py): standard ops, or one ats_deploy node (TorchScript only).
ATS_OPS = ("subgraph", "custom")
OPSET = 18
INPUTS = ("images", "keep")
OUTPUTS = ("logits", "tokens")


@dataclass
class ExportOptions:
    """How to export. ``keep`` is baked in for static exports, the default otherwise."""

    dynamic: bool = True
    exporter: str = "torchscript"
    batch: int = 1
    keep: list[float] | None = None
    opset: int = OPSET
    source: str = ""
    source_sha256: str = ""
    ats_op: str = "subgraph"
    calibration: Calibration | None = None  # INT8: quantize the float32 export on these images

    @property
    def precision(self) -> str:
        return "fp32" if self.calibration is None else "int8"


class StaticATS(torch.nn.Module):
    """``images -> (logits, tokens)`` with ``keep`` a constant and every length static.

    Passes each stage's budget to the model as a Python int, so that every sequence
    length traces as a constant (TensorRT before 8.6, DLA).
    """

    def __init__(self, model: ATSVisionTransformer, keep: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.float32))
        self.budget = [budget_int(k, model.n0, model.prefix_tokens) for k in keep]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images, self.keep, static_budget=self.budget)


def check_output_path(path: Path) -> Path:
    """Fail before any work when the output cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name such as {path / 'model.onnx'}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output directory {parent} does not exist; create it or choose another -o.")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: permission denied; choose another -o.")
    return path


def metadata(model: ATSVisionTransformer, options: ExportOptions) -> dict[str, str]:
    """The ``metadata_props`` of spec section 4: the :class:`Artifact` of this export, written once here."""
    cfg = data_config(model.vit)
    keep = per_stage(options.keep or model.default_keep, len(model.stages))
    artifact = Artifact(
        arch=model.arch,
        stages=tuple(model.stages),
        n0=model.n0,
        num_classes=model.num_classes,
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=str(cfg["interpolation"]),
        crop_pct=float(cfg["crop_pct"]),
        keep=tuple(keep),
        dynamic=options.dynamic,
        exporter=options.exporter,
        source_checkpoint=options.source,
        source_sha256=options.source_sha256,
        ats_deploy_version=__version__,
        batch=None if options.dynamic else options.batch,
        budget=None if options.dynamic else tuple(budget_int(k, model.n0, model.prefix_tokens) for k in keep),
        ats_op=options.ats_op,
        precision=options.precision,
        prefix_tokens=model.prefix_tokens,
        head=model.vit.num_classes > 0,
    )
    return artifact.to_metadata()


def _trace(model: ATSVisionTransformer, options: ExportOptions, path: Path) -> None:
    """Run the chosen torch exporter into ``path``."""
    _, height, width = model.input_size
    images = torch.randn(max(options.batch, 2) if options.dynamic else options.batch, 3, height, width)
    if options.dynamic:
        module: torch.nn.Module = model
        args: tuple = (images, model.default_keep_tensor(images.shape[0]).clone())
        input_names = list(INPUTS)
    else:
        keep = per_stage(options.keep or model.default_keep, len(model.stages))
        module = StaticATS(model, keep)
        args = (images,)
        input_names = ["images"]
    module.eval()
    kwargs: dict = {"input_names": input_names, "output_names": list(OUTPUTS), "opset_version": options.opset}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if options.exporter == "torchscript":
            if options.dynamic:
                kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (*INPUTS, *OUTPUTS)}
            if options.ats_op == "custom":
                kwargs["custom_opsets"] = {DOMAIN: OP_VERSION}
            with sampler_as_node() if options.ats_op == "custom" else contextlib.nullcontext():
                torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
        else:
            if options.dynamic:
                batch = torch.export.Dim("batch", min=1, max=4096)
                kwargs["dynamic_shapes"] = ({0: batch}, {0: batch})
            with torch.fx.traceback.preserve_node_meta():  # keeps the names the model gives (lowering.NAME)
                program = _quietly(lambda: torch.onnx.export(module, args, dynamo=True, verbose=False, **kwargs))
            _give_names(program)
            program.save(str(path))


def _give_names(program: torch.onnx.ONNXProgram) -> None:
    """Name the tensors the model named while torch.export traced it (:func:`ats_deploy.lowering.named_greater`).

    The dynamo exporter names each tensor after the FX node that computes it (``gt_3``); the
    model's names ride on those nodes as the annotation :data:`ats_deploy.lowering.NAME`.
    """
    names = {}
    for node in program.exported_program.graph.nodes:
        name = (node.meta.get("custom") or {}).get(NAME)
        if name is not None:
            names[node.name] = name
    for node in program.model.graph:
        for value in node.outputs:
            value.name = names.get(value.name, value.name)


def _quietly(run):
    """``run()`` with what it prints held back: torch.export prints its whole traced graph (hundreds of lines).

    If ``run`` fails, the held-back text is attached to the error, where it helps.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            return run()
    except Exception as err:
        err.add_note(held.getvalue()[-4000:])
        raise


def clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes and sort with onnx-graphsurgeon."""
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # fold_constants runs onnxruntime; keep its warnings quiet
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    cleaned.ir_version = model.ir_version
    return cleaned


def declare_outputs(graph: onnx.ModelProto, model: ATSVisionTransformer, options: ExportOptions) -> onnx.ModelProto:
    """Declare the output shapes of spec section 4: ``logits [batch, classes]``, ``tokens [batch, S]``.

    The tracer's own shape inference loses the static ``S`` where the token
    counts pass through reductions over run-time axes.
    """
    batch: str | int = "batch" if options.dynamic else options.batch
    dims = {"logits": (batch, model.num_classes), "tokens": (batch, len(model.stages))}
    for output in graph.graph.output:
        shape = output.type.tensor_type.shape
        del shape.dim[:]
        for size in dims[output.name]:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    return graph


def declare_sampler_outputs(model: onnx.ModelProto, options: ExportOptions) -> onnx.ModelProto:
    """Declare each sampler node's output shapes (docs/ATS.md section 4), as ``declare_outputs`` does the graph's.

    The tracer cannot infer through a node it does not know, and a static export's consumers of ``index`` and
    ``mask`` need static shapes (TensorRT's parser, the DLA): ``[batch, m, 1]`` and ``[batch, 1]``, with ``m``
    the node's static length or, where it is only known at run time, the dimension ``ats_tokens_<stage>``.
    """
    batch: str | int = "batch" if options.dynamic else options.batch
    nodes = [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == OP_TYPE]
    declared: dict[str, onnx.ValueInfoProto] = {}
    for stage, node in enumerate(nodes):
        length = next(attribute.i for attribute in node.attribute if attribute.name == "length")
        kept = f"ats_tokens_{stage}" if length == DYNAMIC else length
        shapes = {"index": [batch, kept, 1], "mask": [batch, kept, 1], "n_kept": [batch, 1]}
        for (name, dtype, _), output in zip(sampler_op.OUTPUTS, node.output, strict=False):
            element = onnx.helper.np_dtype_to_tensor_dtype(dtype)
            declared[output] = onnx.helper.make_tensor_value_info(output, element, shapes[name])
        size = node.output[len(sampler_op.OUTPUTS)]
        declared[size] = onnx.helper.make_tensor_value_info(size, onnx.TensorProto.INT32, [])
    kept_infos = [info for info in model.graph.value_info if info.name not in declared]
    del model.graph.value_info[:]
    model.graph.value_info.extend([*kept_infos, *declared.values()])
    return model


def finalize(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """Attach metadata and check the graph (checker + strict full shape inference)."""
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "ats-deploy"
    model.producer_version = __version__
    onnx.checker.check_model(model, full_check=True)
    return model


def export(model: ATSVisionTransformer, output: Path, options: ExportOptions) -> Path:
    """Export ``model`` to ``output`` atomically; returns the path written."""
    if options.exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{options.exporter}'; choose one of {', '.join(EXPORTERS)}.")
    if options.ats_op not in ATS_OPS:
        raise UserError(f"unknown --ats-op '{options.ats_op}'; choose one of {', '.join(ATS_OPS)}.")
    if options.ats_op == "custom" and options.exporter != "torchscript":
        raise UserError(
            f"--ats-op custom cannot be written by the {options.exporter} exporter.",
            hint="Export with --exporter torchscript (the default): the node is written by its tracing.",
        )
    if options.batch < 1:
        raise UserError(f"--batch must be at least 1, got {options.batch}.")
    output = check_output_path(output)
    with atomic_output(output) as tmp:
        _trace(model, options, tmp)
        graph = declare_outputs(clean(declare_sampler_outputs(onnx.load(str(tmp)), options)), model, options)
        graph = finalize(graph, metadata(model, options))
        onnx.save(graph, str(tmp))
        if options.calibration is not None:
            _quantize(model, tmp, options.calibration, read_metadata(graph))
    return output


def _quantize(model: ATSVisionTransformer, path: Path, calibration: Calibration, props: dict[str, str]) -> None:
    """Replace the float32 export at ``path`` by its INT8 QDQ copy with the metadata ``props`` (precisions/int8.py)."""
    import tempfile

    from .precisions import int8

    images = int8.read_calibration(calibration, model.num_classes, data_config(model.vit)).pixels
    with tempfile.TemporaryDirectory() as work:
        quantized = Path(work) / "int8.onnx"
        int8.quantize(path, quantized, images, calibration)
        graph = onnx.load(str(quantized))
    onnx.save(finalize(graph, props), str(path))
