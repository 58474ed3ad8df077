"""Deploying an INT8 export: profiles, the CPU backends that run it, its TensorRT build, validation's verdict."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from cli_helpers import invoke, plain
from onnx import numpy_helper
from probes import without_tensorrt

from ats_deploy import backends
from ats_deploy.backends import RunOptions
from ats_deploy.errors import UserError
from ats_deploy.exporters.precisions import int8
from ats_deploy.exporters.tensorrt.plan import needs_conversion, source_onnx, spec_from, uses_strong_typing
from ats_deploy.exporters.tensorrt.trtexec import trtexec_command
from ats_deploy.images import data_config
from ats_deploy.profiles import parse_profile

GPU = {
    "description": "a GPU", "source": "test", "backend": "tensorrt", "precision": "int8", "keep": 0.7, "batch": 8,
    "shapes": {"min": 1, "opt": 8, "max": 32}, "warmup": 1, "iterations": 1,
}
# The registry says which backends run int8: a new backend joins these tests without a line here.
INT8_BACKENDS = [b.name for b in backends.all_backends() if "int8" in b.precisions]
NO_INT8_BACKENDS = [b.name for b in backends.all_backends() if "int8" not in b.precisions]


@pytest.fixture(scope="module")
def reference():
    from ats_deploy.checkpoints import load_model

    return load_model("random:0", arch="deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def quantized(tiny_ats_onnx, photo_folder, reference, tmp_path_factory) -> Path:
    """The tiny random-weight export quantized as `export --precision int8` does, on 4 photos."""
    calibration = int8.Calibration(photo_folder, images=4)
    pixels = int8.read_calibration(calibration, reference.num_classes, data_config(reference.vit)).pixels
    output = tmp_path_factory.mktemp("int8") / "tiny.int8.onnx"
    int8.quantize(tiny_ats_onnx, output, pixels, calibration)
    model = onnx.load(str(output))
    next(prop for prop in model.metadata_props if prop.key == "precision").value = "int8"  # as export records it
    onnx.save(model, str(output))
    return output


# --------------------------------------------------------------------------- profiles and backends


@pytest.mark.parametrize("backend", INT8_BACKENDS)
def test_a_profile_may_ask_int8_of_a_backend_that_runs_it(backend):
    cpu = {"backend": backend, "batch": 1, "shapes": {"min": 1, "opt": 1, "max": 1}}
    profile = parse_profile({**GPU, **cpu}, "x", None)
    assert profile.precision == "int8"


@pytest.mark.parametrize("backend", NO_INT8_BACKENDS)
def test_int8_on_a_backend_that_cannot_run_it_is_one_message_naming_those_that_can(backend):
    with pytest.raises(UserError, match=r"'precision' int8 is not useful on the .* backend; use fp32") as caught:
        parse_profile({**GPU, "backend": backend}, "x", None)
    assert f"int8 runs on: {', '.join(INT8_BACKENDS)}" in str(caught.value)


def test_an_int8_profile_on_a_backend_that_cannot_run_it_fails_the_cli(here):
    (here / "profiles").mkdir()
    (here / "profiles" / "torch-int8.yaml").write_text(yaml.safe_dump({**GPU, "backend": "pytorch"}))
    result = invoke("bench", "--profile", "torch-int8")
    assert result.exit_code != 0
    assert "int8 is not useful on the PyTorch CPU backend" in plain(result.output), result.output
    assert "Traceback" not in result.output


def _run(backend: str, path: Path, images: torch.Tensor, keep: torch.Tensor):
    return backends.get(backend).open(path, RunOptions(precision="int8", threads=1))(images, keep)


def test_openvino_runs_the_int8_export_with_integer_products_like_onnxruntime(quantized, reference):
    pytest.importorskip("openvino")
    import openvino as ov

    from ats_deploy.exporters.validate import default_inputs

    _, images = default_inputs(reference, 4)
    keep = torch.full((len(images), len(reference.stages)), 0.7)
    ort_logits, ort_tokens = _run("onnxruntime", quantized, images, keep)
    ov_logits, ov_tokens = _run("openvino", quantized, images, keep)
    assert (ort_logits.argmax(-1) == ov_logits.argmax(-1)).all()
    # Each runtime rounds its int8 products its own way, which moves a sampled token now and then: agreement, not
    # equality (docs/ATS.md section 6); a float run of the products would not be int8 at all (below).
    assert (np.abs(ort_tokens - ov_tokens) <= 0.05 * ort_tokens).all()
    runner = backends.get("openvino").open(quantized, RunOptions(precision="int8"))
    kinds = {(op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
             for op in runner.compiled.get_runtime_model().get_ordered_ops()}
    assert ("FullyConnected", "i8") in kinds, "OpenVINO ran the Q/DQ products in float"
    assert ov.__version__


# --------------------------------------------------------------------------- TensorRT: explicit quantization


def test_an_int8_export_builds_strongly_typed_from_the_file_itself_with_no_int8_flag(quantized, tmp_path):
    spec = spec_from(quantized, parse_profile(GPU, "gpu-int8", None), tmp_path)
    assert spec.precision == "int8"
    assert uses_strong_typing(spec, 10) and uses_strong_typing(spec, 11)
    assert not needs_conversion(spec, 10) and source_onnx(spec, 10) == quantized
    line = trtexec_command(spec)
    assert f"--onnx={quantized}" in line and "--stronglyTyped" in line
    assert "--int8" not in line and "--fp16" not in line and "calib" not in line.lower()
    assert "--stronglyTyped" not in trtexec_command(spec, 11)  # always strongly typed in 11


@pytest.mark.parametrize("precision", [p for p in backends.get("tensorrt").precisions if p != "int8"])
def test_an_int8_export_under_a_float_profile_still_builds_its_qdq_strongly_typed(quantized, tmp_path, precision):
    spec = spec_from(quantized, parse_profile({**GPU, "precision": precision}, "gpu", None), tmp_path)
    assert spec.precision == "int8" and source_onnx(spec, 10) == quantized
    assert "--stronglyTyped" in trtexec_command(spec) and "--fp16" not in trtexec_command(spec)


def test_an_int8_profile_refuses_an_export_without_qdq_naming_the_export_that_has_them(tiny_ats_onnx, tmp_path):
    with pytest.raises(UserError, match="holds no QuantizeLinear/DequantizeLinear pairs") as caught:
        spec_from(tiny_ats_onnx, parse_profile(GPU, "gpu-int8", None), tmp_path)
    assert "--precision int8 --calibration DIR" in caught.value.hint


@without_tensorrt
def test_build_of_an_int8_export_prints_the_strongly_typed_trtexec_line_then_asks_for_tensorrt(here, quantized):
    model = Path(shutil.copy(quantized, here / quantized.name))
    (here / "gpu-int8.yaml").write_text(yaml.safe_dump({**GPU, "precision": "fp16"}))
    result = invoke("build", model, "--profile", str(here / "gpu-int8.yaml"))
    output = plain(result.output)
    assert result.exit_code != 0
    assert "building an int8 engine from them" in output
    assert "--stronglyTyped" in output and f"--onnx={model.name}" in output.replace(str(here) + "/", "")
    assert "TensorRT is not installed" in output and "Traceback" not in output
    assert sorted(p.name for p in here.iterdir()) == ["gpu-int8.yaml", model.name]  # no engine, no fp16 copy


# --------------------------------------------------------------------------- validation catches a broken int8 file


def _scaled(source: Path, target: Path, weight: str, factor: float) -> Path:
    """A copy of ``source`` whose DequantizeLinear scale of the initializer ``weight`` is multiplied by ``factor``."""
    model = onnx.load(str(source))
    initializers = {init.name: init for init in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight)
    scale = initializers[node.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
    onnx.save(model, str(target))
    return target


@pytest.mark.slow
def test_int8_validation_fails_a_file_with_one_wrong_mlp_weight_scale(quantized, reference, tmp_path):
    """Judged by agreement (docs/ATS.md section 6) under onnxruntime's default optimizer: sound passes, broken fails."""
    from ats_deploy.exporters.validate import default_inputs, validate

    names, images = default_inputs(reference, count=16)
    keeps = [[k] * len(reference.stages) for k in (1.0, 0.5)]
    sound = validate(str(quantized), reference, names, images, keeps, batches=(8,))
    assert sound.ok, sound.failures
    weights = [n.input[0] for n in onnx.load(str(quantized)).graph.node
               if n.op_type == "DequantizeLinear" and "mlp.fc1" in n.input[0]]
    broken = validate(str(_scaled(quantized, tmp_path / "broken.int8.onnx", weights[0], 16.0)), reference, names,
                      images, keeps, batches=(8,))
    assert not broken.ok
    assert broken.cases[0].max_logit_diff > sound.cases[0].max_logit_diff
    assert "below the 80% bar" in broken.failures[0] and "95% upper bound" in broken.failures[0]
