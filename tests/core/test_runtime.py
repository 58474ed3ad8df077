"""The Python API for exported models (ats_deploy.runtime) and `ats-deploy predict` on an exported file.

An exported model opened with the API must see the pixels the PyTorch reference
sees and give its tokens and logits, whichever way the images and keep are given.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from cli_helpers import invoke, plain
from onnx import TensorProto, helper

from ats_deploy import artifact, runtime
from ats_deploy.errors import BackendUnavailable, UserError
from ats_deploy.images import data_config, preprocess

RANDOM = ["random:0", "--arch", "deit_tiny_patch16_224"]
ATOL = 1e-3


@pytest.fixture(scope="module")
def reference():
    """The PyTorch reference that ``tiny_ats_onnx`` was exported from."""
    from ats_deploy.checkpoints import load_model

    return load_model("random:0", arch="deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def static_onnx(reference, tmp_path_factory):
    """A static export of the reference: batch 2, keep 0.6 baked in."""
    from ats_deploy.exporters.onnx_export import ExportOptions, export

    path = tmp_path_factory.mktemp("static") / "static.onnx"
    return export(reference, path, ExportOptions(dynamic=False, batch=2, keep=[0.6], source="random:0"))


def reference_outputs(reference, photos, keep: list[float]) -> tuple[np.ndarray, np.ndarray]:
    pixels = preprocess(photos, data_config(reference.vit))
    with torch.no_grad():
        logits, tokens = reference(pixels, torch.tensor(keep, dtype=torch.float32))
    return logits.numpy(), tokens.numpy()


def test_preprocessing_from_the_metadata_is_the_references(tiny_ats_onnx, reference, photos):
    _, images = photos
    model = runtime.open(tiny_ats_onnx)
    expected = preprocess(images, data_config(reference.vit)).numpy()
    np.testing.assert_array_equal(model.preprocess(images), expected)


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_predict_equals_the_reference(tiny_ats_onnx, reference, photos, keep):
    _, images = photos
    model = runtime.open(tiny_ats_onnx)
    result = model.predict(images, keep=keep, top=3)
    logits, tokens = reference_outputs(reference, images, [keep] * len(model.stages))
    np.testing.assert_array_equal(result.tokens, tokens)
    np.testing.assert_allclose(result.logits, logits, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(result.classes[:, 0], logits.argmax(1))
    assert result.classes.shape == result.probabilities.shape == (len(images), 3)
    assert (np.diff(result.probabilities, axis=1) <= 0).all(), "top classes come best first"
    assert len(result.labels) == len(images) and all(len(row) == 3 for row in result.labels)


def test_keep_as_a_float_a_per_stage_list_or_the_files_default(tiny_ats_onnx, reference, photos):
    _, images = photos
    model = runtime.open(tiny_ats_onnx)
    stages = len(model.stages)
    per_stage = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    assert stages == len(per_stage)
    _, tokens = reference_outputs(reference, images, per_stage)
    np.testing.assert_array_equal(model.predict(images, keep=per_stage).tokens, tokens)
    np.testing.assert_array_equal(model.predict(images, keep=np.array(per_stage)).tokens, tokens)
    as_float = model.predict(images, keep=0.7).tokens
    np.testing.assert_array_equal(as_float, model.predict(images, keep=[0.7] * stages).tokens)
    assert model.default_keep == [1.0] * stages
    np.testing.assert_array_equal(model.predict(images).tokens, model.predict(images, keep=1.0).tokens)


def test_images_as_paths_pil_or_uint8_arrays(tiny_ats_onnx, photos, tmp_path):
    _, images = photos
    model = runtime.open(tiny_ats_onnx)
    path = tmp_path / "cat.png"
    images[0].save(path)  # lossless: the file holds the photo's pixels
    by_pil = model.predict(images[0], keep=0.7)
    for given in (path, str(path), np.asarray(images[0]), [np.asarray(images[0])]):
        result = model.predict(given, keep=0.7)
        np.testing.assert_array_equal(result.tokens, by_pil.tokens)
        np.testing.assert_allclose(result.logits, by_pil.logits, atol=1e-6, rtol=0)
    gray = np.asarray(images[0].convert("L"))
    assert model.predict(gray).logits.shape == (1, model.num_classes)


def test_static_export_pads_to_its_batch_and_refuses_another_keep(static_onnx, reference, photos):
    _, images = photos
    model = runtime.open(static_onnx)
    assert model.batch == 2
    three = images[:3]  # one full batch of 2, then one image padded to 2
    logits, tokens = reference_outputs(reference, three, [0.6] * len(model.stages))
    for keep in (None, 0.6):
        result = model.predict(three, keep=keep)
        np.testing.assert_array_equal(result.tokens, tokens)
        np.testing.assert_allclose(result.logits, logits, atol=ATOL, rtol=0)
    with pytest.raises(UserError, match=r"static export with keep 0.6 baked in.*--dynamic"):
        model.predict(three, keep=0.9)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (0.0, "keep value 0.0 is invalid"),
        (-1, "keep value -1.0 is invalid"),
        (float("nan"), "is invalid"),
        ([0.5, 0.5], "2 values but the model has 9 ATS stages"),
        ("most", "keep must be a number"),
    ],
)
def test_bad_keep_is_refused(tiny_ats_onnx, photos, keep, message):
    _, images = photos
    with pytest.raises(UserError, match=message):
        runtime.open(tiny_ats_onnx).predict(images[:1], keep=keep)


def test_bad_images_are_refused(tiny_ats_onnx, tmp_path):
    model = runtime.open(tiny_ats_onnx)
    with pytest.raises(UserError, match="image not found"):
        model.predict(tmp_path / "nosuch.jpg")
    with pytest.raises(UserError, match=r"uint8 \[H, W\]"):
        model.predict(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(UserError, match="no images given"):
        model.predict([])


def not_ats_onnx(path):
    """A valid ONNX file that ats-deploy did not write (one Identity node, no metadata)."""
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [value], [out])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_files_that_cannot_be_run_are_refused_by_name(tmp_path):
    with pytest.raises(UserError, match=r"model file not found: .*nosuch\.onnx"):
        runtime.open(tmp_path / "nosuch.onnx")
    with pytest.raises(UserError, match=r"plain\.onnx was not exported by ats-deploy: its metadata lacks arch"):
        runtime.open(not_ats_onnx(tmp_path / "plain.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx file at all\xff\xff")
    with pytest.raises(UserError, match=r"(?s)corrupt\.onnx is corrupt or not an ONNX file: .*Re-export it with"):
        runtime.open(corrupt)
    with pytest.raises(UserError, match="is a directory"):
        runtime.open(tmp_path)


@pytest.mark.parametrize("name", ["deit_t.pth", "mistaken.onnx"])
def test_a_checkpoint_given_to_runtime_open_is_named_as_one(name, tmp_path):
    """Recognised by its content, whatever its name, with the command that makes what open() runs."""
    path = tmp_path / name
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}}, path)
    with pytest.raises(UserError, match=rf"{name} is a PyTorch checkpoint, not an exported model") as info:
        runtime.open(path)
    assert "ats-deploy export CHECKPOINT --dynamic" in str(info.value) and "ReferenceModel" in str(info.value)
    result = invoke("check", path)  # every reader of exported files says the same
    assert result.exit_code == 2 and f"{name} is a PyTorch checkpoint, not an exported model" in plain(result.output)


@pytest.mark.parametrize("shape", [(1, 3, 112, 112), (3, 224, 224), (1, 224, 224, 3)])
def test_run_refuses_pixels_of_the_wrong_shape_naming_the_expected_one(tiny_ats_onnx, shape):
    model = runtime.open(tiny_ats_onnx, threads=1)
    got = ", ".join(map(str, shape))
    with pytest.raises(UserError, match=rf"pixels must be float32 \[N, 3, 224, 224\] .* got \[{got}\]"):
        model.run(np.zeros(shape, dtype=np.float32))


def test_engine_needs_its_build_record_and_tensorrt(tiny_ats_onnx, tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not really an engine")
    with pytest.raises(UserError, match=r"model\.plan\.json is missing.*ats-deploy build"):
        runtime.open(engine)
    meta = artifact.read(tiny_ats_onnx).to_metadata()
    (tmp_path / "model.plan.json").write_text(json.dumps({"onnx_metadata": meta}))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
            runtime.open(engine)
    else:
        pytest.skip("TensorRT is installed here: the refusal without it cannot be seen")


def kept_and_top1(output: str) -> tuple[list[str], list[str]]:
    """Each image's kept-token line and rank-1 class index from predict's output."""
    text = plain(output)
    kept = re.findall(r"kept tokens per stage \(block:K'\): ((?:\d+:\d+,? ?)+)", text)
    top1 = re.findall(r"\b1 \S (\d+) \S 0\.\d{3}", text)
    return kept, top1


def test_predict_on_an_onnx_file_matches_predict_on_the_checkpoint(tiny_ats_onnx):
    photos = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut"]
    on_onnx = invoke("predict", tiny_ats_onnx, *photos, "--keep", "0.5")
    assert on_onnx.exit_code == 0, on_onnx.output
    on_checkpoint = invoke("predict", *RANDOM, *photos, "--keep", "0.5")
    assert on_checkpoint.exit_code == 0, on_checkpoint.output
    kept, top1 = kept_and_top1(on_onnx.stdout)
    assert len(kept) == len(top1) == len(photos)
    assert (kept, top1) == kept_and_top1(on_checkpoint.stdout)
    assert "GFLOPs" in on_onnx.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "deit_tiny_patch16_224"], "--arch apply only to checkpoints"),
        (["--keep", "0.5,0.5"], "2 values but the model has 9 ATS stages"),
    ],
)
def test_predict_on_an_onnx_file_refuses_checkpoint_flags_and_bad_keep(tiny_ats_onnx, args, message):
    result = invoke("predict", tiny_ats_onnx, "skimage:chelsea", *args)
    assert result.exit_code != 0
    assert message in plain(result.output) and "Traceback" not in result.output


def test_predict_on_an_ats_onnx_not_found(tmp_path):
    result = invoke("predict", tmp_path / "nosuch.onnx", "skimage:chelsea")
    assert result.exit_code != 0 and "model file not found" in plain(result.output)


def test_one_keep_serves_every_image_and_rows_give_each_its_own(tiny_ats_onnx, photos):
    """Interface version 2 (``keep [batch, S]``): one keep is repeated as every image's row; an
    ``[images, S]`` array gives each image its own row, each checked, and the result equals each image alone."""
    _, images = photos
    model = runtime.open(tiny_ats_onnx, threads=1)
    assert model.keep_rows(0.7, 3).tolist() == np.full((3, 9), 0.7, np.float32).tolist()
    rows = np.array([[1.0] * 9, [0.5] * 9, [40.0] * 9], np.float32)
    mixed = model.predict(images[:3], keep=rows)
    for b in range(3):
        alone = model.predict(images[b], keep=rows[b])
        np.testing.assert_array_equal(mixed.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(mixed.logits[b], alone.logits[0], atol=1e-4, rtol=0)
    assert len({tuple(t) for t in mixed.tokens.tolist()}) == 3
    with pytest.raises(UserError, match=r"keep has 2 rows for 3 images"):
        model.predict(images[:3], keep=rows[:2])
    with pytest.raises(UserError, match=r"keep value -1.0 is invalid"):
        model.predict(images[:3], keep=np.array([[0.5] * 9, [-1.0] * 9, [0.5] * 9], np.float32))
