"""``--ats-op custom``: one AdaptiveTokenSampler node per stage, run in onnxruntime and (on a GPU) TensorRT."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from probes import needs_tensorrt, without_tensorrt
from timm.models.vision_transformer import VisionTransformer

from ats_deploy import ats, sampler_op
from ats_deploy.artifact import read_metadata
from ats_deploy.backends.onnxruntime import kernel
from ats_deploy.backends.onnxruntime.session import TappedSession
from ats_deploy.backends.samples import samples
from ats_deploy.backends.tensorrt import plugin as trt_plugin
from ats_deploy.backends.tensorrt.runner import TensorRTRunner
from ats_deploy.errors import BackendUnavailable, UserError
from ats_deploy.exporters.compare import Case, Judge, compare_batch, reference_samples
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.tensorrt.build import build_engine
from ats_deploy.exporters.tensorrt.plan import spec_from
from ats_deploy.keep import keep_rows
from ats_deploy.model import build
from ats_deploy.profiles import Profile, Shapes, load_profile

ARCH = "deit_tiny_patch16_224"
STATIC_KEEP, STATIC_BATCH = 0.7, 2
ATOL = 1e-4
TRT_ATOL = 2e-2  # TensorRT runs fp32 matmuls in TF32 unless told otherwise


@pytest.fixture(scope="module")
def model(random_deit_tiny):
    return build(random_deit_tiny, ARCH).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory) -> dict[str, str]:
    """The dynamic export as a subgraph and as custom ops, and a static custom export."""
    folder = tmp_path_factory.mktemp("custom_op")
    options = {
        "subgraph": ExportOptions(dynamic=True),
        "custom": ExportOptions(dynamic=True, ats_op="custom"),
        "static": ExportOptions(dynamic=False, keep=[STATIC_KEEP], batch=STATIC_BATCH, ats_op="custom"),
    }
    return {name: str(export(model, folder / f"{name}.onnx", option)) for name, option in options.items()}


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if sampler_op.uses_custom_op(path):
        kernel.register(options)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions(exports) -> dict[str, ort.InferenceSession]:
    return {name: session(path) for name, path in exports.items()}


def sampler_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if "samplers." in node.name]


# --------------------------------------------------------------------------- the rewritten graph


@pytest.mark.parametrize("name", ["custom", "static"])
def test_one_custom_node_per_stage_and_nothing_else_in_the_sampler_scopes(exports, model, name):
    rewritten = onnx.load(exports[name])
    nodes = sampler_nodes(rewritten)
    assert [(n.op_type, n.domain) for n in nodes] == [(sampler_op.OP_TYPE, sampler_op.DOMAIN)] * len(model.stages)
    assert [n.name.rsplit("/", 2)[-2] for n in nodes] == [f"samplers.{s}" for s in range(len(model.stages))]
    assert not [n for n in rewritten.graph.node if n.op_type in ("TopK", "CumSum")]
    assert (sampler_op.DOMAIN, sampler_op.OP_VERSION) in {(op.domain, op.version) for op in rewritten.opset_import}
    props = {p.key: p.value for p in rewritten.metadata_props}
    assert props["ats_op"] == "custom" and json.loads(props["stages"]) == model.stages
    assert props["arch"] == ARCH


def test_subgraph_export_is_unchanged(exports, model):
    graph = onnx.load(exports["subgraph"])
    assert not sampler_op.uses_custom_op(graph) and "ats_op" not in {p.key for p in graph.metadata_props}
    assert {n.op_type for n in sampler_nodes(graph)} >= {"TopK", "CumSum"}
    assert sampler_op.kept_masks(graph) == [sampler_op.kept_name(s) for s in range(len(model.stages))]


def _lengths(path: str) -> list[int]:
    nodes = sampler_nodes(onnx.load(path))
    return [helper.get_attribute_value(a) for node in nodes for a in node.attribute if a.name == "length"]


def test_static_nodes_carry_the_baked_length(exports, model):
    """Stage s keeps min(budget, tokens reaching it), as the static reference pads to."""
    budget = json.loads(read_metadata(onnx.load(exports["static"]))["budget"])
    assert _lengths(exports["static"]) == list(itertools.accumulate(budget, min, initial=model.n0))[1:]
    assert _lengths(exports["custom"]) == [sampler_op.DYNAMIC] * len(model.stages)


def _dims(tensor: onnx.TypeProto.Tensor) -> list[int | str]:
    return [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]


@pytest.mark.parametrize("name", ["custom", "static"])
def test_custom_export_passes_the_checker_and_shape_inference(exports, name):
    rewritten = onnx.load(exports[name])
    onnx.checker.check_model(rewritten, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(rewritten, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    batch = STATIC_BATCH if name == "static" else "batch"
    for stage, (node, length) in enumerate(zip(sampler_nodes(rewritten), _lengths(exports[name]), strict=True)):
        declared = [(types[output].elem_type, _dims(types[output])) for output in node.output]
        kept = f"ats_tokens_{stage}" if length == sampler_op.DYNAMIC else length
        assert declared == [  # a static export's consumers need static shapes (TensorRT's parser, the DLA)
            (TensorProto.INT64, [batch, kept, 1]),
            (TensorProto.FLOAT, [batch, kept, 1]),
            (TensorProto.FLOAT, [batch, 1]),
            (TensorProto.INT32, []),
        ]
    logits = {o.name: o.type.tensor_type for o in inferred.graph.output}["logits"]
    assert logits.elem_type == TensorProto.FLOAT and len(logits.shape.dim) == 2


# --------------------------------------------------------------------------- onnxruntime vs PyTorch


def against_reference(model, images, keep: torch.Tensor, observed, atol: float = ATOL) -> Case:
    """Validation's comparison (docs/ATS.md section 6): equal, or a flip that a replay of the reference confirms."""
    case = Case(keep=keep.tolist() if keep.ndim == 1 else keep[0].tolist(), batch=len(observed))
    expected = reference_samples(model, images, keep)
    names = [f"image {b}" for b in range(len(observed))]
    compare_batch(case, Judge(model, atol), names, images, keep, observed, expected)
    return case


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("keep", [1.0, 0.7, 0.5, 40.0, "mixed"])
def test_custom_op_matches_reference_and_subgraph(model, sessions, images, keep, batch):
    """Same tokens and logits as the reference and the subgraph export, except where a runtime flipped a tie.

    This random model has exact float ties at keep 1.0 (a quantile equal to a cdf
    value), where onnxruntime's CumSum and torch's cumsum may round apart. ``mixed``:
    every image its own keep row (interface version 2).
    """
    chunk = images[:batch]
    if keep == "mixed":
        keep_t = torch.tensor([[(1.0, 0.5, 40.0)[b % 3]] * len(model.stages) for b in range(batch)])
    else:
        keep_t = torch.full((batch, len(model.stages)), keep)
    feeds = {"images": chunk.numpy(), "keep": keep_t.numpy()}
    logits, tokens = sessions["custom"].run(["logits", "tokens"], feeds)
    sub_logits, sub_tokens = sessions["subgraph"].run(["logits", "tokens"], feeds)
    custom = against_reference(model, chunk, keep_t, samples(logits, tokens))
    subgraph = against_reference(model, chunk, keep_t, samples(sub_logits, sub_tokens))
    assert custom.ok and subgraph.ok, custom.failures + subgraph.failures
    flipped = {flip.image for flip in custom.flips + subgraph.flips}
    for b in range(batch):
        if f"image {b}" not in flipped:
            np.testing.assert_array_equal(tokens[b], sub_tokens[b])
            np.testing.assert_allclose(logits[b], sub_logits[b], rtol=0, atol=ATOL)


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_custom_op_keeps_the_reference_patches(model, exports, images, keep):
    """Validation reads which patches each stage kept from the custom node's index and key mask."""
    chunk = images[:3]
    keep_t = torch.full((len(model.stages),), keep)
    for name in ("custom", "subgraph"):
        observed = TappedSession(str(exports[name]))(chunk.numpy(), keep_t.numpy())
        assert all(len(sample.kept) == len(model.stages) for sample in observed)
        case = against_reference(model, chunk, keep_t, observed)
        assert case.ok and case.positions, (name, case.failures)
        assert case.stage_matches + sum(len(f.ties) for f in case.flips) >= case.stage_total - 2 * len(case.flips) * 9


def test_static_custom_op_matches_reference(model, sessions, images):
    chunk = images[:STATIC_BATCH]
    keep_t = torch.full((len(model.stages),), STATIC_KEEP)
    logits, tokens = sessions["static"].run(["logits", "tokens"], {"images": chunk.numpy()})
    case = against_reference(model, chunk, keep_t, samples(logits, tokens))
    assert case.ok and not case.flips, case.failures


def test_kernel_is_the_reference_sampler():
    """The op on its own: the broadcast ``clamp`` of a first stage, a padded image and a static length."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 9, 1, generator=generator)
    scores[1, 6:] = 0.0  # padding scores zero
    clamp = ats.clamp_bias(None, 10)
    u = torch.tensor([[[0.25, 0.5, 0.75, float("inf")]]])  # one row for every image
    for length in (sampler_op.DYNAMIC, 5):
        *results, size = kernel._onnxruntime_kernel(scores.numpy(), clamp.numpy(), u.numpy(), length=length)
        reference = sampler_op.sample_tokens(scores, clamp, u, length)
        for result, expected in zip(results, reference, strict=True):
            np.testing.assert_array_equal(result, expected.numpy())
        assert size.dtype == np.int32 and size.shape == () and int(size) == results[0].shape[1]
        assert int(size) == (5 if length == 5 else results[2].max())


def test_register_without_onnxruntime_extensions(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    with pytest.raises(BackendUnavailable, match=r"needs onnxruntime-extensions") as caught:
        kernel.register(ort.SessionOptions())
    assert "--ats-op subgraph" in caught.value.hint


# --------------------------------------------------------------------------- what cannot be rewritten


def test_unknown_ats_op(model, tmp_path):
    with pytest.raises(UserError, match=r"unknown --ats-op 'plugin'; choose one of subgraph, custom"):
        export(model, tmp_path / "plugin.onnx", ExportOptions(ats_op="plugin"))


def test_dynamo_export_asks_for_torchscript(tmp_path):
    """The dynamo exporter cannot write the node: refused with the fix named, before work, and nothing is written."""
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    small = build(vit.eval(), "small_vit", stages=[1])
    output = tmp_path / "dynamo.onnx"
    with pytest.raises(UserError, match=r"cannot be written by the dynamo exporter") as caught:
        export(small, output, ExportOptions(exporter="dynamo", ats_op="custom"))
    assert "--exporter torchscript" in caught.value.hint
    assert not output.exists()


# --------------------------------------------------------------------------- TensorRT


@without_tensorrt
def test_trt_plugin_without_tensorrt():
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed here") as caught:
        trt_plugin.register_plugin()
    assert "NVIDIA GPU" in caught.value.hint and "--ats-op subgraph" in caught.value.hint


def gpu_profile(batch: int) -> Profile:
    """desktop-gpu in fp32 for exactly ``batch`` images (a static export accepts no other)."""
    profile = load_profile("desktop-gpu")
    return dataclasses.replace(profile, precision="fp32", batch=batch, shapes=Shapes(batch, batch, batch))


@pytest.mark.slow
@needs_tensorrt
@pytest.mark.parametrize("name", ["custom", "static"])
def test_trt_plugin_engine_matches_reference(model, exports, images, name):
    """Parse, build and run the custom export with the plugin; compare with the reference (TF32 tolerance)."""
    trt_plugin.register_plugin()
    trt_plugin.register_plugin()  # idempotent
    batch = STATIC_BATCH if name == "static" else 3
    runner = TensorRTRunner(build_engine(spec_from(exports[name], gpu_profile(batch))))
    keep_t = torch.full((len(model.stages),), STATIC_KEEP)
    result = runner.run(images[:batch].numpy(), keep_rows(keep_t.numpy(), batch))
    case = against_reference(model, images[:batch], keep_t, samples(result["logits"], result["tokens"]), atol=TRT_ATOL)
    assert case.ok, case.failures


def test_compatibility_report_knows_the_project_op(exports):
    """The custom node is ours: TensorRT 10 runs it as our plugin, 8.6 cannot, onnxruntime has its kernel."""
    from ats_deploy.exporters.compat import check_model

    trt10 = check_model(exports["custom"], "tensorrt-10")
    assert trt10.ok and sum("Python plugin" in f.message for f in trt10.warnings) == 9
    trt86 = check_model(exports["custom"], "tensorrt-8.6")
    assert not trt86.ok and all(f.op == "AdaptiveTokenSampler" for f in trt86.errors)
    assert check_model(exports["custom"], "onnxruntime").ok
