"""Behaviour of the static compatibility report (``ats-deploy check``) on tiny ONNX graphs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from ats_deploy.errors import UserError
from ats_deploy.exporters.compat import check_model, names
from ats_deploy.exporters.compat.report import CompatReport, render

TRT = tuple(name for name in names() if name.startswith("tensorrt-"))  # every TensorRT parser version registered


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8  # what opset 17 shipped with; onnxruntime loads it
    return model


def _tensor(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _errors_at(report: CompatReport, node: str) -> list[str]:
    return [f.message for f in report.errors if f.node == node]


def _matmul_softmax(batch: int | str = 1) -> onnx.ModelProto:
    weights = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    return _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1),
        ],
        [_tensor("x", TensorProto.FLOAT, [batch, 8])],
        [_tensor("y", TensorProto.FLOAT, [batch, 4])],
        [weights],
    )


def _topk(k_input: bool, k_value: int = 4, width: int = 16) -> onnx.ModelProto:
    inputs = [_tensor("x", TensorProto.FLOAT, [1, width])]
    inits = []
    if k_input:
        inputs.append(_tensor("k", TensorProto.INT64, [1]))
    else:
        inits.append(_const("k", [k_value]))
    return _model(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="select", axis=-1)],
        inputs,
        [_tensor("values", TensorProto.FLOAT, [1, None]), _tensor("indices", TensorProto.INT64, [1, None])],
        inits,
    )


def _cumsum(dtype: int, axis_is_constant: bool = True) -> onnx.ModelProto:
    inputs = [_tensor("x", dtype, [2, 5])]
    inits = []
    if axis_is_constant:
        inits.append(_const("axis", 1))
    else:
        inputs.append(_tensor("axis", TensorProto.INT64, []))
    return _model(
        [helper.make_node("CumSum", ["x", "axis"], ["y"], name="cdf")], inputs, [_tensor("y", dtype, [2, 5])], inits
    )


@pytest.mark.parametrize("target", TRT)
def test_unique_is_rejected_naming_the_node(target):
    model = _model(
        [helper.make_node("Unique", ["x"], ["y"], name="dedup")],
        [_tensor("x", TensorProto.FLOAT, [6])],
        [_tensor("y", TensorProto.FLOAT, [None])],
    )
    report = check_model(model, target)
    assert not report.ok
    assert _errors_at(report, "dedup") and report.errors[0].op == "Unique"


def test_nodes_inside_subgraphs_are_checked():
    branch = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["u"], name="dedup")],
        "branch",
        [],
        [_tensor("u", TensorProto.FLOAT, [None])],
    )
    node = helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=branch, else_branch=branch)
    model = _model(
        [node],
        [_tensor("cond", TensorProto.BOOL, []), _tensor("x", TensorProto.FLOAT, [6])],
        [_tensor("y", TensorProto.FLOAT, [None])],
    )
    assert _errors_at(check_model(model, "tensorrt-10"), "gate/dedup")


@pytest.mark.parametrize("target", TRT)
def test_topk_with_run_time_k_parses_but_warns_about_the_k_limit(target):
    report = check_model(_topk(k_input=True), target)
    assert report.ok
    assert any(f.node == "select" and "3840" in f.message for f in report.warnings)


@pytest.mark.parametrize("target", TRT)
def test_topk_with_constant_k_over_the_limit_fails(target):
    assert check_model(_topk(k_input=False, k_value=4, width=5000), target).ok
    report = check_model(_topk(k_input=False, k_value=4000, width=5000), target)
    assert any("3840" in m for m in _errors_at(report, "select"))


@pytest.mark.parametrize("target", TRT)
def test_cumsum_needs_float_data_and_a_constant_axis(target):
    assert check_model(_cumsum(TensorProto.FLOAT), target).ok
    int_report = check_model(_cumsum(TensorProto.INT64), target)
    assert any("INT64" in m for m in _errors_at(int_report, "cdf"))
    axis_report = check_model(_cumsum(TensorProto.FLOAT, axis_is_constant=False), target)
    assert any("axis" in m for m in _errors_at(axis_report, "cdf"))


@pytest.mark.parametrize("target", TRT)
def test_double_tensors_fail_tensorrt(target):
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="act")],
        [_tensor("x", TensorProto.DOUBLE, [4])],
        [_tensor("y", TensorProto.DOUBLE, [4])],
    )
    assert any("DOUBLE" in m for m in _errors_at(check_model(model, target), "act"))


def test_int64_io_warns_only_on_tensorrt_8_6():
    model = _model(
        [helper.make_node("Identity", ["k"], ["y"], name="copy")],
        [_tensor("k", TensorProto.INT64, [1])],
        [_tensor("y", TensorProto.INT64, [1])],
    )
    old, new = check_model(model, "tensorrt-8.6"), check_model(model, "tensorrt-10")
    assert old.ok and any("INT32" in f.message for f in old.warnings)
    assert new.ok and not any("INT32" in f.message for f in new.warnings)


@pytest.mark.parametrize("target", TRT)
def test_bicubic_resize_fails_tensorrt(target):
    model = _model(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="upsample", mode="cubic")],
        [_tensor("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [_tensor("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [_const("scales", [1, 1, 2, 2], np.float32)],
    )
    assert any("cubic" in m for m in _errors_at(check_model(model, target), "upsample"))


def test_dynamic_batch_fails_dla_but_not_tensorrt_10():
    dynamic = _matmul_softmax(batch="N")
    assert check_model(dynamic, "tensorrt-10").ok
    report = check_model(dynamic, "dla")
    assert any("'x'" in f.message for f in report.errors if f.node == "")
    assert check_model(_matmul_softmax(batch=1), "dla").ok


def test_run_time_reshape_fails_dla_even_with_static_inputs():
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="fold")],
        [_tensor("x", TensorProto.FLOAT, [2, 6]), _tensor("shape", TensorProto.INT64, [2])],
        [_tensor("y", TensorProto.FLOAT, [None, None])],
    )
    assert _errors_at(check_model(model, "dla"), "fold")


def test_dla_unsupported_layers_fall_back_to_gpu_as_warnings():
    model = _model(
        [helper.make_node("Erf", ["x"], ["y"], name="erf")],
        [_tensor("x", TensorProto.FLOAT, [1, 8])],
        [_tensor("y", TensorProto.FLOAT, [1, 8])],
    )
    report = check_model(model, "dla")
    assert report.ok
    assert any(f.node == "erf" and "GPU fallback" in f.message for f in report.warnings)


def test_custom_domain_node_fails_onnxruntime():
    model = _model(
        [helper.make_node("Mystery", ["x"], ["y"], name="custom", domain="acme.ops")],
        [_tensor("x", TensorProto.FLOAT, [4])],
        [_tensor("y", TensorProto.FLOAT, [4])],
        opsets=(("", 17), ("acme.ops", 1)),
    )
    report = check_model(model, "onnxruntime")
    assert any("acme.ops" in m for m in _errors_at(report, "custom"))


def test_op_onnxruntime_cannot_load_is_reported():
    model = _model(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="bogus")],
        [_tensor("x", TensorProto.FLOAT, [4])],
        [_tensor("y", TensorProto.FLOAT, [4])],
    )
    report = check_model(model, "onnxruntime")
    assert any("NoSuchOp" in m for m in _errors_at(report, "bogus"))


@pytest.mark.parametrize("target", names())
def test_plain_matmul_softmax_passes_every_target(target):
    report = check_model(_matmul_softmax(), target)
    assert report.ok, report.errors
    assert report.ops == {"MatMul": 1, "Softmax": 1}


def test_reads_a_model_from_a_path(tmp_path: Path):
    path = tmp_path / "model.onnx"
    onnx.save(_topk(k_input=False, k_value=4000, width=5000), path)
    assert not check_model(path, "tensorrt-10").ok


def test_corrupt_file_is_a_user_error(tmp_path: Path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx model\x00\xff\xfe")
    with pytest.raises(UserError, match="is not a valid ONNX model"):
        check_model(path, "tensorrt-10")


def test_unknown_target_is_a_user_error_listing_the_targets():
    with pytest.raises(UserError, match=re.escape(", ".join(names()))):
        check_model(_matmul_softmax(), "tensorrt-7")


def test_render_names_the_offending_node_and_gives_a_verdict():
    console = Console(record=True, width=200)
    render(check_model(_topk(k_input=False, k_value=4000, width=5000), "tensorrt-10"), console)
    text = console.export_text()
    assert "select" in text and "1 incompatible node for tensorrt-10" in text
    console = Console(record=True, width=200)
    render(check_model(_matmul_softmax(), "tensorrt-10"), console)
    assert "compatible with tensorrt-10" in console.export_text()


def _sampler_model() -> onnx.ModelProto:
    """One ``--ats-op custom`` node, as the export writes it (spec: ats_deploy/sampler_op.py)."""
    from ats_deploy.sampler_op import DOMAIN, OP_TYPE, OP_VERSION

    node = helper.make_node(
        OP_TYPE, ["scores", "clamp", "u"], ["index", "mask", "n_kept", "length"], name="sampler", domain=DOMAIN,
        length=-1, prefix=1,
    )
    return _model(
        [node],
        [_tensor("scores", TensorProto.FLOAT, [1, 8, 1]), _tensor("clamp", TensorProto.FLOAT, [1, 8, 1]),
         _tensor("u", TensorProto.FLOAT, [1, 1, 4])],
        [_tensor("index", TensorProto.INT64, None), _tensor("mask", TensorProto.FLOAT, None),
         _tensor("n_kept", TensorProto.FLOAT, None), _tensor("length", TensorProto.INT32, None)],
        opsets=(("", 17), (DOMAIN, OP_VERSION)),
    )


def test_project_op_in_onnxruntime_states_how_to_register_it():
    """A plain session refuses the node; the report says so and names the registration call."""
    report = check_model(_sampler_model(), "onnxruntime")
    assert report.ok  # it loads once registered, as every ats-deploy command does
    [warning] = report.warnings
    assert "plain InferenceSession cannot load" in warning.message
    assert "kernel.register(session_options)" in warning.message and "onnxruntime-extensions" in warning.message


def test_project_op_without_onnxruntime_extensions_fails_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails
    report = check_model(_sampler_model(), "onnxruntime")
    assert any("pip install onnxruntime-extensions" in f.message for f in report.errors)


def _reduce_max(opset: int) -> onnx.ModelProto:
    """ReduceMax over axis 1: the axes are an attribute up to opset 17 and an input from 18 on."""
    axes = [_const("axes", [1])] if opset >= 18 else []
    node = helper.make_node(
        "ReduceMax", ["x", "axes"] if axes else ["x"], ["y"], name="max", **({} if axes else {"axes": [1]})
    )
    return _model(
        [node], [_tensor("x", TensorProto.FLOAT, [1, 8])], [_tensor("y", TensorProto.FLOAT, [1, 1])], axes,
        opsets=(("", opset),),
    )


def test_opset_above_tensorrt_8_6_names_the_redefined_ops_and_a_fix_that_exists():
    [message] = [f.message for f in check_model(_reduce_max(18), "tensorrt-8.6").warnings if "opset" in f.message]
    assert "documents (1-17)" in message and "ReduceMax" in message
    assert "ats-deploy export CHECKPOINT --opset 17" in message and "tensorrt-10" in message
    assert "re-export with an opset in that range" not in message
    assert not [f for f in check_model(_reduce_max(17), "tensorrt-8.6").warnings if "opset" in f.message]


def test_opset_above_tensorrt_8_6_with_unchanged_ops_says_they_read_as_meant():
    model = _matmul_softmax()
    model.opset_import[0].version = 18
    [message] = [f.message for f in check_model(model, "tensorrt-8.6").warnings if "opset" in f.message]
    assert "every op it uses is defined as at opset 17" in message


def _dla_mix() -> onnx.ModelProto:
    """A MatMul with constant weights (DLA) feeding one with a run-time second input (GPU fallback)."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("MatMul", ["h", "v"], ["y"], name="mix"),
        ],
        [_tensor("x", TensorProto.FLOAT, [1, 64]), _tensor("v", TensorProto.FLOAT, [64, 192])],
        [_tensor("y", TensorProto.FLOAT, [1, 192])],
        [numpy_helper.from_array(np.ones((64, 64), np.float32), "w")],
    )


def test_dla_report_gives_the_share_on_the_dla_and_not_a_plain_compatible():
    report = check_model(_dla_mix(), "dla")
    assert report.ok  # TensorRT builds it with GPU fallback
    assert (report.dla.dla_macs, report.dla.macs) == (64 * 64, 64 * 64 + 64 * 192)
    assert (report.dla.dla_layers, report.dla.layers) == (1, 2)
    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    assert "runs on dla with GPU fallback: 25.0% of MACs, 1 of 2 layers on the DLA" in text
    assert "compatible with dla" not in text


def test_dla_subgraphs_beyond_the_per_core_limit_fall_back_to_the_gpu():
    """Relu (DLA) and Erf (GPU) alternate: 17 DLA subgraphs, TensorRT keeps 16 on the DLA."""
    nodes, previous = [], "x"
    for i in range(17):
        nodes += [
            helper.make_node("Relu", [previous], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Erf", [f"r{i}"], [f"e{i}"], name=f"erf{i}"),
        ]
        previous = f"e{i}"
    model = _model(nodes, [_tensor("x", TensorProto.FLOAT, [1, 8])], [_tensor(previous, TensorProto.FLOAT, [1, 8])])
    report = check_model(model, "dla")
    assert (report.dla.subgraphs, report.dla.dla_layers, report.dla.layers) == (17, 16, 34)
    assert any("at most 16 per DLA core" in f.message for f in report.warnings)


def test_a_model_all_on_the_dla_is_plainly_compatible():
    report = check_model(_matmul_softmax(), "dla")
    assert not report.dla.fallback
    console = Console(record=True, width=200)
    render(report, console)
    assert "compatible with dla" in console.export_text()


def test_cli_target_help_lists_the_registry():
    """``check --target`` offers the registry's targets: one added there shows up without a CLI edit."""
    script = (
        "import typer.main\n"
        "from ats_deploy.exporters import compat\n"
        "compat.names = lambda: ('tensorrt-10', 'new-target')\n"
        "from ats_deploy.cli import app\n"
        "check = typer.main.get_command(app).commands['check']\n"
        "print(next(p.help for p in check.params if p.name == 'target'))\n"
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "tensorrt-10 or new-target; repeat for several."
