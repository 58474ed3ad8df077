"""INT8 exports that stay ATS: Q/DQ around the matrix work only, the sampling path float32 (docs/ATS.md section 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import invoke, plain
from conftest import SHARED_IMAGES

from ats_deploy.artifact import read
from ats_deploy.exporters.precisions import int8
from ats_deploy.images import data_config, sample_images

QDQ = {"QuantizeLinear", "DequantizeLinear"}
TINY = ("random:0", "--arch", "deit_tiny_patch16_224")
REAL_CALIBRATION = 12  # imagenet-sample-dev images added to the 4 photos where ../shared is present


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory) -> Path:
    """A flat folder of real photos: the scikit-image ones, plus a few ImageNet photos where present."""
    folder = tmp_path_factory.mktemp("calibration")
    for name, image in sample_images().items():
        image.save(folder / f"{name}.jpg")
    if SHARED_IMAGES.is_dir():
        for path in sorted(SHARED_IMAGES.glob("*/*"))[:REAL_CALIBRATION]:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def quantized(tiny_ats_onnx, calibration_folder, tmp_path_factory) -> Path:
    from ats_deploy.checkpoints import load_model

    model = load_model("random:0", arch="deit_tiny_patch16_224")
    calibration = int8.Calibration(calibration_folder, images=4)
    pixels = int8.read_calibration(calibration, model.num_classes, data_config(model.vit)).pixels
    output = tmp_path_factory.mktemp("int8") / "tiny.int8.onnx"
    int8.quantize(tiny_ats_onnx, output, pixels, calibration)
    return output


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in model.graph.node for name in node.output}


def test_every_weighted_matrix_product_reads_dequantized_int8_and_nothing_else_is_quantized(tiny_ats_onnx, quantized):
    fp32, q = onnx.load(str(tiny_ats_onnx)), onnx.load(str(quantized))
    chosen = int8.matrix_nodes(fp32)
    kinds = {node.name: node.op_type for node in fp32.graph.node if node.name in chosen}
    assert sorted(set(kinds.values())) == ["Conv", "Gemm"]  # patch embedding; qkv, proj, MLP, head
    assert len(chosen) == 1 + 12 * 4 + 1
    producers = _producers(q)
    for node in q.graph.node:
        if node.name in chosen:
            assert all(producers[name].op_type == "DequantizeLinear" for name in node.input[:2]), node.name
    consumers = {name for node in q.graph.node if node.op_type not in QDQ for name in node.input}
    quantizing = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in consumers]
    assert {c.name for c in q.graph.node if set(c.input) & {d.output[0] for d in quantizing}} == set(chosen)


def test_no_quantize_or_dequantize_touches_the_sampling_path(tiny_ats_onnx, quantized):
    fp32, q = onnx.load(str(tiny_ats_onnx)), onnx.load(str(quantized))
    sampling = int8.sampling_nodes(fp32)
    ops = {node.op_type for node in fp32.graph.node if node.name in sampling}
    assert {"CumSum", "Greater", "Softmax", "MatMul", "ReduceSum"} <= ops  # cdf, sampling, class row, ||V||
    producers = _producers(q)
    tensors = {name for node in q.graph.node if node.name in sampling for name in [*node.input, *node.output]}
    for node in q.graph.node:
        if node.op_type in QDQ:
            assert not set(node.input) & tensors and not set(node.output) & tensors, node.name
    for node in q.graph.node:
        if node.name in sampling:
            assert all(producers[n].op_type not in QDQ for n in node.input if n in producers), node.name
    assert all(node.name in {n.name for n in q.graph.node} for node in fp32.graph.node if node.name in sampling)
    # Compaction (TopK, GatherND after the mask) holds no matrix product: what is quantized comes from elsewhere.
    quantized_from = {producers[n.input[0]].op_type for n in q.graph.node if n.op_type == "QuantizeLinear"
                      and n.input[0] in producers}
    assert quantized_from <= {"LayerNormalization", "Reshape", "Mul", "Gather"}, quantized_from


def test_one_int8_file_serves_every_keep_and_batch(quantized):
    session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    config = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bicubic", "crop_pct": 0.875}
    from ats_deploy.images import preprocess

    images = preprocess(list(sample_images().values())[:3], config).numpy()
    previous = None
    for keep in (1.0, 0.5, 0.3):
        feeds = {"images": images, "keep": np.full((len(images), 9), keep, np.float32)}
        logits, tokens = session.run(["logits", "tokens"], feeds)
        assert logits.shape == (3, 1000) and tokens.shape == (3, 9)
        alone = session.run(["logits", "tokens"], {"images": images[1:2], "keep": feeds["keep"][1:2]})
        np.testing.assert_array_equal(alone[1][0], tokens[1])
        np.testing.assert_allclose(alone[0][0], logits[1], atol=1e-3)
        if previous is not None:
            assert (tokens[:, 0] < previous).all(), "a smaller keep keeps fewer tokens"
        previous = tokens[:, 0]


def test_export_int8_records_the_precision_and_names_the_file(here, calibration_folder):
    result = invoke("export", *TINY, "--dynamic", "--precision", "int8", "--calibration", calibration_folder,
                    "--calibration-images", 4, "--no-validate")
    assert result.exit_code == 0, result.output
    path = here / "deit_tiny_patch16_224_ats.int8.onnx"
    assert read(path).precision == "int8"
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--calibration", "missing"), "calibration folder missing does not exist"),
        (("--calibration", "empty"), "calibration folder empty is empty"),
        (("--calibration", "few", "--calibration-images", 5), "holds 1 image file(s), fewer than the 5 asked for"),
        (("--calibration", "few", "--static"), "quantizes the --dynamic export only"),
        (("--calibration", "few", "--ats-op", "custom"), "--precision int8 needs --ats-op subgraph"),
        ((), "--precision int8 needs --calibration DIR"),
        (("--calibration", "few", "--validation-data", "missing"), "--validation-data missing is not a folder"),
    ],
)
def test_a_bad_int8_request_gives_one_message_and_no_file(here, extra, message):
    (here / "empty").mkdir()
    (here / "few").mkdir()
    next(iter(sample_images().values())).save(here / "few" / "one.jpg")
    dynamic = () if "--static" in extra else ("--dynamic",)
    result = invoke("export", *TINY, *dynamic, "--precision", "int8", *extra, "-o", "out.onnx")
    assert result.exit_code != 0
    assert message in plain(result.output), result.output
    assert "Traceback" not in result.output
    assert not list(here.glob("*.onnx")) and not list(here.glob(".*.tmp"))


def test_int8_agrees_with_the_fp32_reference_on_held_out_real_images(real_deit_tiny, imagenet_sample, tmp_path):
    from rich.console import Console

    from ats_deploy.data import image_folder
    from ats_deploy.exporters import validate
    from ats_deploy.exporters.onnx_export import ExportOptions, export

    calibration = int8.Calibration(imagenet_sample, images=24)
    options = ExportOptions(dynamic=True, calibration=calibration)
    path = export(real_deit_tiny, tmp_path / "real.int8.onnx", options)
    console = Console(record=True, width=200)
    names, images = validate.held_out_inputs(real_deit_tiny, calibration, None, console, count=24)
    files = [path for path, _ in image_folder(imagenet_sample, 1000).files]
    assert not set(names) & {str(path.relative_to(imagenet_sample)) for path in files[:24]}, "never calibrated on"
    assert set(names) <= {str(path.relative_to(imagenet_sample)) for path in files[24:48]}
    keeps = [[k] * len(real_deit_tiny.stages) for k in (1.0, 0.5)]
    report = validate.validate(str(path), real_deit_tiny, names, images, keeps, batches=(8,))
    assert "validating on 24 held-out images" in console.export_text()
    assert report.ok, report.failures
    assert all(case.agreement is not None and case.images == 24 for case in report.cases)
    assert report.cases[0].max_logit_diff > 0  # quantized for real, not the float32 file


def test_check_tensorrt_10_passes_the_int8_export_and_names_each_misplaced_or_asymmetric_qdq(quantized):
    from onnx import helper, numpy_helper

    from ats_deploy.exporters.compat import check_model

    assert check_model(quantized, "tensorrt-10").ok
    model = onnx.load(str(quantized))
    inits = {init.name: init for init in model.graph.initializer}
    scale = next(n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear")
    inits[scale].CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(inits[scale]), scale))
    cumsum = next(n for n in model.graph.node if n.op_type == "CumSum")
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.1), "s"),
                                    numpy_helper.from_array(np.int8(3), "z")])
    model.graph.node.extend([helper.make_node("QuantizeLinear", [cumsum.input[0], "s", "z"], ["q"], name="bad_q"),
                             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="bad_dq")])
    cumsum.input[0] = "dq"
    report = check_model(model, "tensorrt-10")
    messages = {(f.node, f.message.split(" (")[0].split(";")[0]) for f in report.errors}
    assert ("bad_q", "Q/DQ on an ATS sampling path, which stays float32") in messages
    assert ("bad_dq", "zero points must be int8 0") in messages
    assert any("scales must be float32 and above 0" in f.message for f in report.errors)


def test_the_registry_names_int8_as_calibrated_at_export_with_the_sampling_in_float32():
    from ats_deploy import precision as precisions

    entry = precisions.get("int8")
    assert entry.stage == "export", "the int8 export already holds its Q/DQ: nothing converts it at build"
    assert set(precisions.ATS_FLOAT32) <= set(entry.keeps_float32)
    assert "class-token attention row" in entry.keeps_float32 and "||V||" in entry.keeps_float32


def test_default_onnxruntime_runs_every_quantized_product_as_an_integer_kernel(quantized, tmp_path):
    """As a user's own session or Triton's onnxruntime backend opens it: onnxruntime's defaults, no option of ours.

    No float Gemm or MatMul may read a dequantized tensor in the graph onnxruntime optimizes and runs.
    """
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    producers = _producers(optimized)
    float_products = [
        node.name for node in optimized.graph.node
        if node.op_type in {"Gemm", "MatMul", "FusedMatMul"}
        and any(producers[n].op_type == "DequantizeLinear" for n in node.input if n in producers)
    ]
    assert not float_products, f"float products behind dequantized weights: {float_products}"
    assert sum(node.op_type == "QGemm" for node in optimized.graph.node) == 12 * 4 + 1  # qkv, proj, MLP; head
