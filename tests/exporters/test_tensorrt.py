"""TensorRT engine planning, the trtexec command, the fp16 conversion it reads, and (on a GPU) a real build."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_helpers import invoke, plain
from onnx import TensorProto, helper, numpy_helper
from probes import needs_tensorrt, without_tensorrt

from ats_deploy.artifact import engine_info_path
from ats_deploy.backends.tensorrt.runner import TensorRTRunner
from ats_deploy.errors import BackendUnavailable, UserError
from ats_deploy.exporters import validate
from ats_deploy.exporters.compare import Agreement, top1_agreement
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.precisions import fp16 as fp16_conversion
from ats_deploy.exporters.precisions.fp16 import to_fp16
from ats_deploy.exporters.tensorrt import build as trt_build
from ats_deploy.exporters.tensorrt.build import build_engine, write_converted_onnx
from ats_deploy.exporters.tensorrt.plan import EngineSpec, converted_onnx_path, spec_from
from ats_deploy.exporters.tensorrt.trtexec import trtexec_command
from ats_deploy.model import build
from ats_deploy.precision import FP16
from ats_deploy.profiles import list_profiles, load_profile, parse_profile
from ats_deploy.sampler_op import kept_name

STAGES, SIZE, CLASSES, N0 = 3, 32, 10, 65
# The built-in profiles by backend (read from the package, so a new profile is tested without a new line here).
DYNAMIC_TENSORRT_PROFILES = [p.name for p in list_profiles() if p.backend == "tensorrt" and not p.static]
OTHER_BACKEND_PROFILES = [p.name for p in list_profiles() if p.backend != "tensorrt"]


def ats_like_model(batch: int | None = None, keep_input: bool = True, keep_len: int | None = STAGES) -> onnx.ModelProto:
    """A tiny model with the exported interface (docs/ATS.md section 4).

    ``logits = flatten(images) @ W + b``; ``tokens[b, s] = floor(keep[b, s] * n0 + 0.5)``.
    ``batch=None`` gives a dynamic batch; ``keep_input=False`` bakes keep in, as a
    static export does; ``keep_len=None`` leaves the length of ``keep`` open.
    """
    rng = np.random.default_rng(0)
    features = 3 * SIZE * SIZE
    batch_dim = "batch" if batch is None else batch
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch_dim, 3, SIZE, SIZE])]
    initializers = [
        numpy_helper.from_array((rng.standard_normal((features, CLASSES)) * 0.02).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([N0], np.float32), "n0"),
        numpy_helper.from_array(np.array([0.5], np.float32), "half"),
    ]
    if keep_input:
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.FLOAT, [batch_dim, keep_len or "stages"]))
    else:
        initializers.append(numpy_helper.from_array(np.full((batch or 1, STAGES), 0.7, np.float32), "keep"))
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], ["logits"]),
        helper.make_node("Mul", ["keep", "n0"], ["scaled"]),
        helper.make_node("Add", ["scaled", "half"], ["rounded"]),
        helper.make_node("Floor", ["rounded"], ["budget"]),
        helper.make_node("Cast", ["budget"], ["tokens"], to=TensorProto.INT64),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, CLASSES]),
        helper.make_tensor_value_info("tokens", TensorProto.INT64, [batch_dim, STAGES]),
    ]
    graph = helper.make_graph(nodes, "ats_like", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="stages", value=json.dumps(list(range(3, 3 + STAGES))))
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def dynamic_onnx(tmp_path) -> Path:
    return save(ats_like_model(), tmp_path / "model.onnx")


@pytest.fixture
def static_onnx(tmp_path) -> Path:
    """Batch 1, keep baked in: what `ats-deploy export` writes without --dynamic."""
    return save(ats_like_model(batch=1, keep_input=False), tmp_path / "static.onnx")


# --------------------------------------------------------------------------- spec_from


@pytest.mark.parametrize(
    ("profile", "batch"), [("jetson", (1, 1, 4)), ("desktop-gpu", (1, 8, 32)), ("server-gpu", (1, 32, 64))]
)
def test_spec_from_dynamic_export(dynamic_onnx, profile, batch):
    spec = spec_from(dynamic_onnx, load_profile(profile))
    assert spec.batch == batch
    assert (spec.static, spec.keep_len) == (False, STAGES)
    assert spec.image_shape == (3, SIZE, SIZE)
    assert (spec.precision, spec.dla_core, spec.gpu_fallback) == ("fp16", None, False)
    assert spec.engine == dynamic_onnx.with_name(f"model.{profile}.plan")
    assert spec.timing_cache == dynamic_onnx.with_name(f"{profile}.timing.cache")


def test_spec_from_static_export_for_dla(static_onnx):
    spec = spec_from(static_onnx, load_profile("jetson-dla"))
    assert (spec.static, spec.batch, spec.keep_len) == (True, (1, 1, 1), None)
    assert (spec.dla_core, spec.gpu_fallback, spec.precision) == (0, True, "fp16")


def test_spec_from_static_export_with_a_keep_input(tmp_path):
    path = save(ats_like_model(batch=1, keep_input=True), tmp_path / "static_keep.onnx")
    spec = spec_from(path, load_profile("jetson-dla"))
    assert (spec.static, spec.keep_len) == (True, STAGES)


def test_an_open_keep_length_is_refused(tmp_path):
    """Exports give ``keep`` its fixed length S; a file that leaves it open was not written by ``ats-deploy export``."""
    path = save(ats_like_model(keep_len=None), tmp_path / "open.onnx")
    with pytest.raises(UserError, match=r"'keep' must be \[batch, S\], one row per image with S .* fixed"):
        spec_from(path, load_profile("jetson"))


def test_dla_profile_needs_a_static_export(dynamic_onnx):
    with pytest.raises(UserError, match=r"profile 'jetson-dla' needs a static export \(the DLA runs static") as caught:
        spec_from(dynamic_onnx, load_profile("jetson-dla"))
    assert "without --dynamic" in str(caught.value)


@pytest.mark.parametrize("profile", DYNAMIC_TENSORRT_PROFILES)
def test_static_export_needs_a_static_profile(static_onnx, profile):
    with pytest.raises(UserError, match=r"is a static export for batch 1, but profile") as caught:
        spec_from(static_onnx, load_profile(profile))
    assert "--dynamic" in str(caught.value)


def test_static_export_batch_must_match_the_profile(tmp_path):
    path = save(ats_like_model(batch=2, keep_input=False), tmp_path / "static2.onnx")
    with pytest.raises(UserError, match=r"static export for batch 2, but profile 'jetson-dla' asks for batch 1"):
        spec_from(path, load_profile("jetson-dla"))


@pytest.mark.parametrize("profile", OTHER_BACKEND_PROFILES)
def test_non_tensorrt_profiles_are_refused(dynamic_onnx, profile):
    with pytest.raises(UserError, match=rf"uses the {load_profile(profile).backend} backend"):
        spec_from(dynamic_onnx, load_profile(profile))


def test_output_file_and_directory(dynamic_onnx, tmp_path):
    profile = load_profile("jetson")
    assert spec_from(dynamic_onnx, profile, tmp_path / "custom.engine").engine == tmp_path / "custom.engine"
    (tmp_path / "engines").mkdir()
    spec = spec_from(dynamic_onnx, profile, tmp_path / "engines")
    assert spec.engine == tmp_path / "engines" / "model.jetson.plan"
    assert spec.timing_cache == tmp_path / "engines" / "jetson.timing.cache"


def test_bad_onnx_files(tmp_path):
    profile = load_profile("jetson")
    with pytest.raises(UserError, match=r"does not exist; export a model first"):
        spec_from(tmp_path / "missing.onnx", profile)
    (tmp_path / "junk.onnx").write_text("not a model")
    with pytest.raises(UserError, match=r"cannot read .*junk.onnx as an ONNX model"):
        spec_from(tmp_path / "junk.onnx", profile)
    model = ats_like_model()
    model.graph.input[0].name = "pixels"
    with pytest.raises(UserError, match=r"has no input named 'images' \(its inputs: pixels, keep\)"):
        spec_from(save(model, tmp_path / "renamed.onnx"), profile)


# --------------------------------------------------------------------------- trtexec


def flags(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "trtexec"
    return words[1:]


def test_trtexec_for_jetson(dynamic_onnx):
    """fp16 on the GPU: the converted ONNX as a strongly typed network (module docstring)."""
    spec = spec_from(dynamic_onnx, load_profile("jetson"))
    args = flags(trtexec_command(spec))
    assert args[:2] == [f"--onnx={converted_onnx_path(spec)}", f"--saveEngine={spec.engine}"]
    assert converted_onnx_path(spec) == dynamic_onnx.with_name("model.jetson.fp16.onnx")
    # keep [batch, S] shares the images' batch range (interface version 2)
    assert "--minShapes=images:1x3x32x32,keep:1x3" in args
    assert "--optShapes=images:1x3x32x32,keep:1x3" in args
    assert "--maxShapes=images:4x3x32x32,keep:4x3" in args
    assert "--stronglyTyped" in args and "--fp16" not in args
    assert f"--timingCacheFile={spec.timing_cache}" in args
    assert "--memPoolSize=workspace:2048M" in args
    assert "--skipInference" in args
    assert not any(a.startswith(("--useDLACore", "--allowGPUFallback")) for a in args)


def test_trtexec_for_desktop_gpu(dynamic_onnx):
    args = flags(trtexec_command(spec_from(dynamic_onnx, load_profile("desktop-gpu"), workspace_mb=4096)))
    assert [a for a in args if "Shapes=" in a] == [
        "--minShapes=images:1x3x32x32,keep:1x3",
        "--optShapes=images:8x3x32x32,keep:8x3",
        "--maxShapes=images:32x3x32x32,keep:32x3",
    ]
    assert "--stronglyTyped" in args and "--memPoolSize=workspace:4096M" in args


def test_trtexec_for_jetson_dla(static_onnx):
    """The DLA on TensorRT 10: the documented weak-typing recipe, on the export itself."""
    args = flags(trtexec_command(spec_from(static_onnx, load_profile("jetson-dla"))))
    assert args[0] == f"--onnx={static_onnx}"
    assert not any("Shapes=" in a for a in args), "a static export takes no shape flags"
    assert {"--useDLACore=0", "--allowGPUFallback", "--fp16"} <= set(args)
    assert "--stronglyTyped" not in args


@pytest.mark.parametrize("profile", ["jetson", "jetson-dla"])
def test_trtexec_for_tensorrt_11(dynamic_onnx, static_onnx, profile):
    """TensorRT 11 has no --fp16, and strong typing is always on."""
    spec = spec_from(static_onnx if profile == "jetson-dla" else dynamic_onnx, load_profile(profile))
    args = flags(trtexec_command(spec, tensorrt_major=11))
    assert "--fp16" not in args and "--stronglyTyped" not in args
    assert args[0] == f"--onnx={converted_onnx_path(spec)}"


def test_trtexec_fp32_and_quoting(tmp_path):
    folder = tmp_path / "with space"
    folder.mkdir()
    path = save(ats_like_model(), folder / "model.onnx")
    data = {
        "description": "fp32 GPU",
        "source": "test",
        "backend": "tensorrt",
        "precision": "fp32",
        "keep": 0.7,
        "batch": 2,
        "shapes": {"min": 1, "opt": 2, "max": 2},
        "warmup": 1,
        "iterations": 1,
    }
    args = flags(trtexec_command(spec_from(path, parse_profile(data, "fp32-gpu", None))))
    assert "--fp16" not in args and "--stronglyTyped" not in args
    assert args[0] == f"--onnx={path}"


def test_write_converted_onnx_in_fp16(dynamic_onnx):
    spec = spec_from(dynamic_onnx, load_profile("desktop-gpu"))
    written = write_converted_onnx(spec)
    assert written == converted_onnx_path(spec) == dynamic_onnx.with_name("model.desktop-gpu.fp16.onnx")
    model = onnx.load(str(written))
    assert {init.data_type for init in model.graph.initializer if init.name.startswith("w")} == {TensorProto.FLOAT16}
    assert spec_from(written, load_profile("desktop-gpu")).image_shape == (3, SIZE, SIZE), "same interface"


def test_the_conversion_check_opens_both_files_through_the_one_session_factory(dynamic_onnx, monkeypatch):
    """The CPU agreement before a build runs under the optimizer settings every other check and run uses."""
    opened, factory = [], validate.session
    monkeypatch.setattr(validate, "session", lambda path, *args: opened.append(Path(path)) or factory(path, *args))
    written = write_converted_onnx(spec_from(dynamic_onnx, load_profile("desktop-gpu")))
    assert opened[0] == dynamic_onnx and len(opened) == 2
    assert opened[1].parent == written.parent, "the converted copy, checked before it is moved into place"


def test_an_fp16_conversion_that_changes_most_predictions_is_not_written(dynamic_onnx, monkeypatch):
    spec = spec_from(dynamic_onnx, load_profile("desktop-gpu"))
    poor = Agreement(
        precision="fp16", top1=top1_agreement(FP16, [[1.0]], 1, 8), photos=4, keep=None, tokens=8, max_logit_diff=9.0
    )
    monkeypatch.setattr(validate, "measure_conversion", lambda *_args: poor)
    refused = r"changes the top-1 class of 7 of 8 images \(top-1 agreement 1/8 .* below the 50% bar\)"
    with pytest.raises(UserError, match=refused):
        write_converted_onnx(spec)
    assert sorted(p.name for p in dynamic_onnx.parent.iterdir()) == [dynamic_onnx.name], "nothing half-written"


class _TensorRTThatStopsAtTheNetwork:
    """Stands in for TensorRT 10 up to the first call into it: what `ats-deploy build` does before a device works."""

    __version__ = "10.8.0"

    def __getattr__(self, name: str):
        raise BackendUnavailable(f"the stand-in TensorRT stops at {name}")


def test_build_converts_once_beside_the_engine_and_reports_agreement_first(exported, monkeypatch):
    conversions: list[str] = []
    convert = fp16_conversion.to_fp16

    def counted(model: onnx.ModelProto) -> onnx.ModelProto:
        conversions.append(model.graph.name)
        return convert(model)

    monkeypatch.setattr(fp16_conversion, "to_fp16", counted)
    monkeypatch.setattr(trt_build, "import_tensorrt", _TensorRTThatStopsAtTheNetwork)
    Path("engines").mkdir()
    result = invoke("build", exported.name, "--profile", "jetson", "-o", "engines")
    assert result.exit_code == 3, result.output
    output = plain(result.output)
    assert "the stand-in TensorRT stops at Logger" in output, "the build got as far as TensorRT itself"
    assert len(conversions) == 1, "converted once, by the CLI, and the build read that file"
    fp16 = Path("engines") / f"{exported.stem}.jetson.fp16.onnx"
    assert fp16.is_file() and f"wrote {fp16}: the fp16 copy of {exported.name}" in output
    agreement = re.search(r"4 photos \+ 4 random images at keep 0\.7(,0\.7){8}: same top-1 for (\d)/8, "
                          r"same kept tokens at every stage for (\d)/8, max \|logit difference\| \S+", output)
    assert agreement is not None, output
    assert int(agreement[2]) >= 4, "the tiny export's fp16 copy agrees on most images"
    assert output.index("same top-1") < output.index("trtexec --onnx") and f"--onnx={fp16}" in output


def test_build_into_an_unwritable_folder_is_refused_before_converting(exported, read_only_dir, monkeypatch):
    def refuse(*_args):
        raise AssertionError("converted to fp16")

    monkeypatch.setattr(fp16_conversion, "to_fp16", refuse)
    result = invoke("build", exported, "--profile", "jetson", "-o", read_only_dir / "model.plan")
    assert result.exit_code == 2, result.output
    assert "permission denied; choose another -o" in plain(result.output) and "Traceback" not in result.output
    assert list(read_only_dir.iterdir()) == []


# --------------------------------------------------------------------------- fp16 conversion


def ats_sampling_model() -> onnx.ModelProto:
    """The float parts of an ATS stage in miniature: layer norm, GELU, softmax scores,
    a normalised cdf (CumSum) compared with quantiles computed from ``keep``.
    """
    rng = np.random.default_rng(1)
    tokens, width = 16, 12

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    def ints(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)

    initializers = [
        const("w1", rng.standard_normal((width, width)) * 0.3),
        const("b1", rng.standard_normal(width) * 0.1),
        const("ln_scale", 1 + rng.standard_normal(width) * 0.1),
        const("ln_bias", rng.standard_normal(width) * 0.1),
        const("ws", rng.standard_normal((width, 1))),
        const("w2", rng.standard_normal((width, CLASSES)) * 0.3),
        const("b2", rng.standard_normal(CLASSES) * 0.1),
        const("sqrt2", np.sqrt(2.0)),
        const("one", 1.0),
        const("tiny", np.finfo(np.float32).tiny),
        const("grid", float(tokens)),
        const("point", 0.001),
        ints("shape", [0, tokens, width]),
        ints("last", [2]),
        ints("axis1", [1]),
        ints("axis0", [0]),
        ints("axes02", [0, 2]),
        ints("scalar_axis", 1),
    ]
    nodes = [
        helper.make_node("Reshape", ["images", "shape"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["xw"]),
        helper.make_node("Add", ["xw", "b1"], ["h0"]),
        helper.make_node("LayerNormalization", ["h0", "ln_scale", "ln_bias"], ["h"], axis=-1),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Div", ["h", "sqrt2"], ["hs"]),
        helper.make_node("Erf", ["hs"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf1"]),
        helper.make_node("Mul", ["h", "erf1"], ["gh"]),
        helper.make_node("Mul", ["gh", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "ws"], ["s3"]),
        helper.make_node("Squeeze", ["s3", "last"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("ReduceSum", ["p", "axis1"], ["total"], keepdims=1),
        helper.make_node("Max", ["total", "tiny"], ["guarded"]),
        helper.make_node("Div", ["p", "guarded"], ["normalised"]),
        helper.make_node("CumSum", ["normalised", "scalar_axis"], ["cdf"]),
        # The budget path of spec section 2, from `keep`: must stay float32.
        helper.make_node("Mul", ["keep", "grid"], ["kg"]),
        helper.make_node("Floor", ["kg"], ["kf"]),
        helper.make_node("Div", ["kf", "grid"], ["quantile"]),
        helper.make_node("Unsqueeze", ["cdf", "axis1"], ["cdf3"]),
        helper.make_node("Unsqueeze", ["quantile", "axes02"], ["q3"]),
        # The kept-token mask, named as an export names it: the float32 rule walks back from it.
        helper.make_node("Less", ["cdf3", "q3"], [kept_name(0)]),
        helper.make_node("Cast", [kept_name(0)], ["below_int"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["below_int", "last"], ["tokens"], keepdims=0),
        helper.make_node("ReduceMean", ["g", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w2"], ["lw"]),
        helper.make_node("Add", ["lw", "b2"], ["l0"]),
        helper.make_node("ReduceSum", ["tokens", "axis1"], ["kept"], keepdims=1),
        helper.make_node("Cast", ["kept"], ["kept_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["kept_float", "point"], ["bonus"]),
        helper.make_node("Add", ["l0", "bonus"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ats_sampling",
        [
            helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            helper.make_tensor_value_info("keep", TensorProto.FLOAT, [STAGES]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", STAGES]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output}


def test_to_fp16_matches_fp32_in_onnxruntime():
    model = ats_sampling_model()
    before = model.SerializeToString()
    converted = to_fp16(model)
    assert model.SerializeToString() == before, "the input model is not modified"
    rng = np.random.default_rng(2)
    feeds = {
        "images": rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
        "keep": np.array([0.3, 0.55, 0.8], np.float32),
    }
    reference = run_onnx(model, feeds)
    result = run_onnx(converted, feeds)
    assert result["logits"].dtype == np.float32 and result["tokens"].dtype == np.int64
    np.testing.assert_allclose(result["logits"], reference["logits"], rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(result["tokens"], reference["tokens"])
    assert not np.array_equal(result["logits"], reference["logits"]), "the converted model really computes in fp16"


def test_to_fp16_graph_types():
    converted = to_fp16(ats_sampling_model())
    graph = converted.graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [TensorProto.FLOAT, TensorProto.INT64]
    initializers = {init.name: init for init in graph.initializer}
    assert initializers["w1_fp16"].data_type == TensorProto.FLOAT16
    assert "w1" not in initializers, "the float32 weights are dropped once converted"
    assert initializers["grid"].data_type == TensorProto.FLOAT, "the keep path keeps its float32 constant"
    made = producers(converted)
    # From the cdf on, the path to the kept-token mask is float32 (docs/ATS.md); S = s / max(sum(s), tiny) before it
    # is fp16 work, as on every real export (the clamp's Sub sits between it and the cdf there).
    assert made["cdf"].op_type == "CumSum" and made["cdf"].input[0] == "normalised_fp32"
    assert (made["normalised_fp32"].op_type, made["normalised_fp32"].attribute[0].i) == ("Cast", TensorProto.FLOAT)
    assert list(made["normalised"].input) == ["p", "guarded"] and list(made["guarded"].input) == ["total", "tiny_fp16"]
    assert list(made["kg"].input) == ["keep", "grid"], "the budget is computed in float32 from keep"
    assert list(made["quantile"].input) == ["kf", "grid"]
    assert list(made[kept_name(0)].input) == ["cdf3", "q3"], "cdf and quantiles are compared in float32"
    assert made["kept_float"].attribute[0].i == TensorProto.FLOAT16, "Cast to float is retyped in fp16 code"
    assert made["logits"].op_type == "Cast", "an fp16 graph output is cast back to float32"
    assert not any(node.op_type == "Constant" for node in graph.node)


def test_to_fp16_saturates_constants():
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "big"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(np.array([1e6, -np.inf, 1e-30, -1e-30, 0], np.float32), "big")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    converted = to_fp16(model)
    big = numpy_helper.to_array({i.name: i for i in converted.graph.initializer}["big_fp16"])
    smallest = float(np.finfo(np.float16).smallest_subnormal)
    assert big.tolist() == [65504.0, -np.inf, smallest, -smallest, 0.0], "saturated, and tiny guards stay non-zero"
    result = run_onnx(converted, {"x": np.ones(5, np.float32)})["y"]
    assert result.tolist() == [65504.0, -np.inf, smallest, -smallest, 0.0]


def test_to_fp16_refuses_control_flow():
    branch = helper.make_graph([], "branch", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "flow",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UserError, match=r"If node .* has a subgraph"):
        to_fp16(model)


def test_to_fp16_of_the_interface_model_keeps_the_budget_exact():
    model = ats_like_model()
    keep = np.array([[0.7, 0.45, 12.0], [0.3, 1.0, 5.0]], np.float32)  # a row per image
    feeds = {"images": np.ones((2, 3, SIZE, SIZE), np.float32), "keep": keep}
    np.testing.assert_array_equal(run_onnx(to_fp16(model), feeds)["tokens"], run_onnx(model, feeds)["tokens"])


# --------------------------------------------------------------------------- TensorRT itself


@without_tensorrt
def test_build_engine_without_tensorrt(dynamic_onnx):
    spec = spec_from(dynamic_onnx, load_profile("jetson"))
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed here") as caught:
        build_engine(spec)
    hint = caught.value.hint
    assert "pip install tensorrt" in hint and "JetPack" in hint and "NVIDIA GPU" in hint
    assert caught.value.exit_code == 3
    assert not spec.engine.exists()


@without_tensorrt
def test_runner_without_tensorrt(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed here"):
        TensorRTRunner(engine)


def test_runner_needs_an_existing_engine(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; build it with `ats-deploy build`"):
        TensorRTRunner(tmp_path / "missing.plan")


@pytest.mark.slow
@needs_tensorrt
@pytest.mark.parametrize("profile", ["desktop-gpu", "jetson"])
def test_build_and_run_an_engine(dynamic_onnx, profile):
    spec: EngineSpec = spec_from(dynamic_onnx, load_profile(profile))
    engine = build_engine(spec)
    assert engine == spec.engine and engine.stat().st_size > 0
    assert spec.timing_cache.is_file()
    info = json.loads(engine_info_path(engine).read_text())
    assert info["onnx_metadata"]["stages"] == json.dumps([3, 4, 5])
    assert info["tensorrt_version"] and info["batch"] == list(spec.batch)
    runner = TensorRTRunner(engine)
    rng = np.random.default_rng(3)
    for batch in sorted({spec.batch[0], spec.batch[2]}):
        feeds = {
            "images": rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32),
            "keep": np.tile(np.array([0.7, 0.45, 12.0], np.float32), (batch, 1)),
        }
        result = runner(**feeds)
        reference = run_onnx(ats_like_model(), feeds)
        np.testing.assert_array_equal(result["tokens"], reference["tokens"])
        np.testing.assert_allclose(result["logits"], reference["logits"], rtol=2e-2, atol=2e-2)
    with pytest.raises(UserError, match=r"was built for shapes"):
        too_many = spec.batch[2] + 1
        runner(np.zeros((too_many, 3, SIZE, SIZE), np.float32), np.ones((too_many, STAGES), np.float32))


@pytest.mark.slow
def test_to_fp16_of_a_real_ats_export(random_deit_tiny, tmp_path):
    """The converted export of a (random) DeiT-Tiny agrees with fp32 in onnxruntime.

    Tokens may flip at a quantile boundary (spec section 5), hence the tolerance of one.
    """
    model = build(random_deit_tiny, "deit_tiny_patch16_224").eval()
    path = export(model, tmp_path / "deit.onnx", ExportOptions(dynamic=True))
    fp32 = onnx.load(str(path))
    fp16 = to_fp16(fp32)
    images = np.random.default_rng(4).standard_normal((2, 3, 224, 224)).astype(np.float32)
    feeds = {"images": images, "keep": np.full((2, len(model.stages)), 0.7, np.float32)}
    reference, result = run_onnx(fp32, feeds), run_onnx(fp16, feeds)
    np.testing.assert_allclose(result["logits"], reference["logits"], atol=1e-2)
    assert np.abs(result["tokens"] - reference["tokens"]).max() <= 1
