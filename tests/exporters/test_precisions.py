"""The precision registry: the names profiles accept, when each file is made, and which backends run it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ats_deploy import backends
from ats_deploy import precision as precisions
from ats_deploy.errors import UserError
from ats_deploy.exporters.precisions import convert
from ats_deploy.profiles import PRECISIONS, parse_profile


def test_the_registry_names_fp32_first_and_profiles_accept_exactly_its_names():
    assert precisions.names()[:2] == ("fp32", "fp16")
    assert precisions.names() == PRECISIONS


def test_an_unknown_precision_is_refused_listing_the_known_ones():
    with pytest.raises(UserError) as caught:
        precisions.get("bf16")
    assert "unknown precision 'bf16'" in str(caught.value)
    for name in precisions.names():
        assert name in str(caught.value)


def test_every_backend_runs_registered_precisions_only_and_fp32_everywhere():
    for backend in backends.all_backends():
        assert set(backend.precisions) <= set(precisions.names()), backend.name
    assert set(precisions.get("fp32").backends()) == set(backends.names())
    assert {"tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt"} <= set(precisions.get("fp16").backends())
    assert "onnxruntime" not in precisions.get("fp16").backends(), "the CPU provider runs fp32 only"


def test_fp32_is_the_identity_and_fp16_keeps_the_sampling_in_float32():
    fp32, fp16 = precisions.get("fp32"), precisions.get("fp16")
    marker = object()
    assert fp32.stage is None and convert(fp32, marker) is marker  # type: ignore[arg-type]
    assert fp32.tensorrt_flag is None
    assert fp16.stage == "build" and fp16.module == "fp16" and fp16.tensorrt_flag == "FP16"
    # docs/ATS.md: a reduced precision keeps the budget, quantiles, cdf and sampling in float32.
    assert set(precisions.ATS_FLOAT32) <= set(fp16.keeps_float32)
    assert 0 < fp16.min_top1_agreement <= 1


def test_only_a_precision_made_at_build_is_converted_there():
    """int8's file is written at export: a build leaves it as it is, like fp32's."""
    marker = object()
    assert precisions.get("int8").stage == "export"
    assert convert(precisions.get("int8"), marker) is marker  # type: ignore[arg-type]
    assert [name for name in precisions.names() if precisions.get(name).stage == "build"] == ["fp16"]


def test_a_file_made_at_export_runs_its_own_precision_whatever_is_asked():
    assert precisions.running("int8", "fp32") == "int8"
    assert precisions.running("fp32", "fp16") == "fp16"
    assert precisions.explicit().name == "int8"


def test_float32_is_compared_patch_for_patch_within_its_tolerance_and_int8_by_agreement():
    fp32, int8 = precisions.get("fp32"), precisions.get("int8")
    assert fp32.exact and fp32.tolerance == 1e-3
    assert not int8.exact and int8.tolerance is None
    assert int8.required([[1.0]]) == int8.min_top1_agreement
    assert int8.required([[1.0, 0.5]]) == int8.min_top1_agreement_sampled


def test_a_profile_precision_must_be_in_the_registry_and_run_by_its_backend():
    data = {
        "description": "t", "source": "t", "backend": "onnxruntime-cuda", "precision": "fp16", "keep": 0.7,
        "batch": 1, "shapes": {"min": 1, "opt": 1, "max": 1}, "warmup": 1, "iterations": 1,
    }
    assert parse_profile(data, "cuda-fp16", None).precision == "fp16"
    with pytest.raises(UserError, match=r"'precision' is 'fp8', which is not one of: fp32, fp16"):
        parse_profile({**data, "precision": "fp8"}, "cuda-fp8", None)
    with pytest.raises(UserError, match=r"'precision' fp16 is not useful on the onnxruntime CPU backend"):
        parse_profile({**data, "backend": "onnxruntime"}, "cpu-fp16", None)


def test_reading_profiles_does_not_load_a_converter():
    """The loader (and `ats-deploy --help`) read the registry's names without importing onnx."""
    code = "import sys, ats_deploy.profiles; print('onnx' in sys.modules, 'numpy' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert shown.split() == ["False", "False"]


def test_fp16_and_int8_keep_float32_by_one_rule_from_the_kept_masks(tiny_ats_onnx):
    """One graph walk back from each kept-token mask: int8 stops at the weighted products, fp16 at the cdf's input.

    So fp16's float32 part lies on int8's sampling path, holds each stage's cdf and no matrix work, and the
    converted file's cdfs sum a float32 cast.
    """
    import onnx

    from ats_deploy.exporters.precisions import int8
    from ats_deploy.exporters.precisions.float32 import cdf_inputs, sampling_path
    from ats_deploy.exporters.precisions.fp16 import to_fp16

    model = onnx.load(str(tiny_ats_onnx))
    nodes = [model.graph.node[index] for index in sampling_path(model, cdf_inputs(model))]
    stages = len(cdf_inputs(model))
    assert stages > 0 and [n.op_type for n in nodes].count("CumSum") == stages
    assert {n.name for n in nodes} < int8.sampling_nodes(model)
    assert not {n.op_type for n in nodes} & {"MatMul", "Gemm", "Softmax"}
    converted = to_fp16(model)
    made = {output: node for node in converted.graph.node for output in node.output}
    cdfs = [node for node in converted.graph.node if node.op_type == "CumSum"]
    assert len(cdfs) == stages
    for cdf in cdfs:
        cast = made[cdf.input[0]]
        assert (cast.op_type, cast.attribute[0].i) == ("Cast", onnx.TensorProto.FLOAT), cdf.name


def test_fp16_refuses_a_cdf_it_cannot_walk_back_to_from_a_kept_mask():
    """Without named masks the float32 path is unknown: converting would silently put the cdf in fp16."""
    import onnx
    from onnx import TensorProto, helper

    from ats_deploy.exporters.precisions.fp16 import to_fp16

    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["cdf"])],
        "cdf_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cdf", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("axis", TensorProto.INT64, [], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    with pytest.raises(UserError, match=r"names no kept-token mask \(ats_kept_0, \.\.\.\)") as caught:
        to_fp16(model)
    assert "ats-deploy export" in caught.value.hint
