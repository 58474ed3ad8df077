"""Export (docs/ATS.md section 4) and its validation (section 5) on a tiny model."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ats_deploy.artifact import read_metadata
from ats_deploy.backends.onnxruntime.session import session
from ats_deploy.errors import UserError
from ats_deploy.exporters import onnx_export
from ats_deploy.exporters.compat import check_model, names
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.images import data_config, preprocess, random_images
from ats_deploy.keep import keep_rows
from ats_deploy.model import build
from ats_deploy.sampler_op import kept_masks, kept_name

KEEPS = (1.0, 0.7, 0.5, 40.0)


@pytest.fixture(scope="module")
def tiny(random_deit_tiny):
    return build(random_deit_tiny, "deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def dynamic_onnx(tiny, tmp_path_factory) -> Path:
    return export(tiny, tmp_path_factory.mktemp("export") / "tiny.onnx", ExportOptions(dynamic=True, source="random:0"))


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _assert_matches_reference(path: Path, model, images: torch.Tensor, keep: list, dynamic: bool = True):
    """``keep``: one row for every image, or a row per image."""
    feeds = {"images": images.numpy()}
    if dynamic:
        feeds["keep"] = keep_rows(keep, len(images))
    logits, tokens = session(str(path)).run(["logits", "tokens"], feeds)
    with torch.no_grad():
        ref_logits, ref_tokens = model(images, torch.tensor(keep))
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=0)
    return tokens


def test_interface_is_the_spec(dynamic_onnx):
    graph = onnx.load(str(dynamic_onnx)).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    assert list(inputs) == ["images", "keep"] and list(outputs) == ["logits", "tokens"]
    assert _dims(inputs["images"]) == ["batch", 3, 224, 224]
    assert _dims(inputs["keep"]) == ["batch", 9]  # interface version 2: one row per image
    assert _dims(outputs["logits"]) == ["batch", 1000]
    assert _dims(outputs["tokens"]) == ["batch", 9]
    assert inputs["keep"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert outputs["tokens"].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_metadata(dynamic_onnx):
    meta = read_metadata(onnx.load(str(dynamic_onnx)))
    assert meta["arch"] == "deit_tiny_patch16_224"
    assert json.loads(meta["stages"]) == list(range(3, 12))
    assert json.loads(meta["input_size"]) == [3, 224, 224]
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert meta["ats_deploy_version"] and meta["source_checkpoint"] == "random:0"
    assert meta["dynamic"] == "true"


def test_one_file_serves_every_keep_and_batch(dynamic_onnx, tiny):
    images = random_images(3, data_config(tiny.vit), seed=3)
    counts = set()
    for keep in KEEPS:
        for batch in (1, 3):
            tokens = _assert_matches_reference(dynamic_onnx, tiny, images[:batch], [keep] * 9)
            counts.add(int(tokens[0, -1]))
    per_stage = [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 30.0, 20.0]
    _assert_matches_reference(dynamic_onnx, tiny, images, per_stage)
    assert len(counts) == len(KEEPS), "different keeps must keep different numbers of tokens"


def test_mixed_keep_rows_in_one_batch_equal_each_image_alone(dynamic_onnx, real_deit_tiny, photos, tmp_path):
    """Spec sections 4-5 on real photos: each image's tokens and logits follow its own keep row only,
    in the export as in the reference (so a server may batch requests with different budgets)."""
    real = export(real_deit_tiny, tmp_path / "real.onnx", ExportOptions(dynamic=True))
    images = preprocess(photos[1], data_config(real_deit_tiny.vit))
    rows = [[1.0] * 9, [0.5] * 9, [0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 30.0, 20.0], [40.0] * 9, [0.3] * 9]
    rows = [rows[b % len(rows)] for b in range(len(images))]
    sess = session(str(real))
    logits, tokens = sess.run(["logits", "tokens"], {"images": images.numpy(), "keep": keep_rows(rows, len(images))})
    assert len({tuple(t) for t in tokens.tolist()}) == len({tuple(r) for r in rows}), "rows must change the tokens"
    for b in range(len(images)):
        alone = sess.run(["logits", "tokens"], {"images": images[b : b + 1].numpy(), "keep": keep_rows(rows[b], 1)})
        np.testing.assert_array_equal(tokens[b], alone[1][0])
        np.testing.assert_allclose(logits[b], alone[0][0], atol=1e-4, rtol=0)
    _assert_matches_reference(real, real_deit_tiny, images, rows)


def test_graph_is_tensorrt_friendly(dynamic_onnx):
    model = onnx.load(str(dynamic_onnx))
    ops = Counter(node.op_type for node in model.graph.node)
    assert not {"Unique", "NonZero", "Loop", "If", "ScatterND", "ScatterElements"} & set(ops)
    # Every stage samples (a CumSum each); the last compacts nothing (no TopK): the head reads
    # the class token alone, so the last block computes only its row and just counts the kept tokens.
    assert ops["TopK"] == 8 and ops["CumSum"] == 9
    onnx.checker.check_model(model, full_check=True)
    for target in (name for name in names() if name != "dla"):  # every target but the static DLA
        report = check_model(model, target)
        assert report.ok, (target, [f.message for f in report.errors])
    assert not check_model(model, "dla").ok, "a dynamic export must not pass the static DLA check"


def test_linear_layers_export_as_gemm_with_their_bias(dynamic_onnx, tiny):
    """On 3-D dynamic-length input a linear layer would be MatMul + Add, which onnxruntime
    cannot fuse; every block's qkv, proj, fc1 and fc2 must be one Gemm carrying its bias."""
    graph = onnx.load(str(dynamic_onnx)).graph
    weights = {init.name for init in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 4 * len(tiny.vit.blocks) + 1  # and the classifier head
    assert all(len(n.input) == 3 and n.input[2] in weights for n in gemms)
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_every_reshape_reads_the_batch_size_from_one_tensor(dynamic_onnx):
    """The way back from 2-D token rows takes the batch size from one tensor (``lowering.reshape_rows``),
    so that onnxruntime merges every block's ``Shape`` + ``Concat`` into one of each."""
    graph = onnx.load(str(dynamic_onnx)).graph
    leading = [
        n for n in graph.node
        if n.op_type == "Shape" and {a.name: a.i for a in n.attribute} == {"end": 1}
    ]
    assert len(leading) > 1 and len({n.input[0] for n in leading}) == 1


def test_weights_are_stored_once(dynamic_onnx, random_deit_tiny, tmp_path):
    dense = export(build(random_deit_tiny, "deit_tiny", stages=[]), tmp_path / "dense.onnx", ExportOptions())
    assert dynamic_onnx.stat().st_size <= 1.01 * dense.stat().st_size


@pytest.mark.parametrize("keep", [1e-6, 0.01, 1.0, 1.0001, 2.0, 1e9])
def test_never_crashes_or_returns_nan_for_finite_positive_keep(dynamic_onnx, tiny, keep):
    images = random_images(2, data_config(tiny.vit), seed=4)
    feeds = {"images": images.numpy(), "keep": np.full((2, 9), keep, np.float32)}
    logits, tokens = session(str(dynamic_onnx)).run(None, feeds)
    assert np.isfinite(logits).all()
    assert (tokens >= 1).all() and (tokens <= 196).all()


def test_static_export_has_only_constant_shapes(tiny, tmp_path):
    path = export(tiny, tmp_path / "static.onnx", ExportOptions(dynamic=False, batch=2, keep=[0.6]))
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images"]
    assert _dims(model.graph.input[0]) == [2, 3, 224, 224]
    for target in ("dla", "tensorrt-8.6"):  # for TensorRT before dynamic shapes, and 8.6's parser
        assert check_model(model, target).ok, target
    meta = read_metadata(model)
    assert json.loads(meta["keep"]) == [0.6] * 9 and meta["batch"] == "2"
    _assert_matches_reference(path, tiny, random_images(2, data_config(tiny.vit), seed=5), [0.6] * 9, dynamic=False)


@pytest.mark.slow
def test_dynamo_exporter_matches_too(tiny, tmp_path):
    path = export(tiny, tmp_path / "dynamo.onnx", ExportOptions(dynamic=True, exporter="dynamo"))
    # the kept-token masks carry the names the model gives them while traced, as in TorchScript exports
    assert kept_masks(onnx.load(str(path))) == [kept_name(s) for s in range(len(tiny.stages))]
    images = random_images(2, data_config(tiny.vit), seed=6)
    for keep in (1.0, 0.5):
        for batch in (1, 2):
            _assert_matches_reference(path, tiny, images[:batch], [keep] * 9)


def test_a_failed_export_leaves_no_file(tiny, tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("simulated failure after tracing")

    monkeypatch.setattr(onnx_export, "clean", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export(tiny, tmp_path / "out.onnx", ExportOptions())
    assert list(tmp_path.iterdir()) == []


def test_exported_files_get_the_usual_permissions(dynamic_onnx):
    """Written through a private temporary file, but readable like any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dynamic_onnx.stat().st_mode) == 0o666 & ~umask


def test_unwritable_output_is_refused_before_work(tiny, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export(tiny, tmp_path / "missing" / "out.onnx", ExportOptions())
    with pytest.raises(UserError, match="is a directory"):
        export(tiny, tmp_path, ExportOptions())


def test_non_finite_and_non_positive_keep_have_defined_budgets(dynamic_onnx, tiny):
    """NaN counts as 1.0, +inf as n0, <= 0 and -inf as the fraction floor: never 0 tokens or NaN logits."""
    images = random_images(2, data_config(tiny.vit), seed=4)
    sess = session(str(dynamic_onnx))

    def run(value: float):
        return sess.run(None, {"images": images.numpy(), "keep": np.full((2, 9), value, np.float32)})

    for bad, same in ((float("nan"), 1.0), (float("inf"), 197.0), (0.0, 8.0), (-3.0, 8.0), (float("-inf"), 8.0)):
        logits, tokens = run(bad)
        want_logits, want_tokens = run(same)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(logits, want_logits)
        assert np.isfinite(logits).all() and (tokens >= 1).all()
    with torch.no_grad():
        _, ref_tokens = tiny(images, torch.full((9,), float("nan")).nan_to_num(1.0))
    np.testing.assert_array_equal(run(float("nan"))[1], ref_tokens.numpy())
