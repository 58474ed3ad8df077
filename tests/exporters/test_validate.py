"""Validation (docs/ATS.md section 6) cannot be fooled: broken exports fail, a real float-tie flip is named.

Every broken export here is the tiny random DeiT-Tiny's own export with one
thing wrong, validated against the correct reference on real photos.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from ats_deploy import ats
from ats_deploy.artifact import read
from ats_deploy.backends.onnxruntime.session import TappedSession
from ats_deploy.backends.samples import kept_positions
from ats_deploy.checkpoints import load_model
from ats_deploy.exporters.compare import TIE_TOL, Probe, reference_samples
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.validate import validate
from ats_deploy.images import data_config, preprocess, random_images
from ats_deploy.model import build

KEEPS = ([1.0] * 9, [0.5] * 9)


@pytest.fixture(scope="module")
def model():
    """The reference of the ``tiny_ats_onnx`` fixture (``random:0``)."""
    return load_model("random:0", arch="deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def inputs(model, photos):
    names, pictures = photos
    config = data_config(model.vit)
    images = torch.cat([preprocess(pictures, config), random_images(4, config, seed=3)])
    return [*names, "random-0", "random-1", "random-2", "random-3"], images


def _edited(source: Path, tmp_path: Path, edit) -> str:
    """A copy of ``source`` with ``edit(model)`` applied to its graph."""
    graph = onnx.load(str(source))
    edit(graph)
    path = tmp_path / "edited.onnx"
    onnx.save(graph, str(path))
    return str(path)


def _add_to_initializer(name: str, index: tuple, delta: float):
    def edit(graph: onnx.ModelProto) -> None:
        tensor = next(t for t in graph.graph.initializer if t.name == name)
        values = numpy_helper.to_array(tensor).copy()
        values[index] += delta
        tensor.CopyFrom(numpy_helper.from_array(values, name))

    return edit


def test_the_correct_export_passes_on_real_photos(tiny_ats_onnx, model, inputs):
    names, images = inputs
    report = validate(str(tiny_ats_onnx), model, names, images, KEEPS, batches=(1, 4))
    assert report.ok, report.failures
    for case in report.cases:
        assert case.positions and case.images == 8 and case.stage_total == 72
        assert case.stage_matches >= case.stage_total - 9 * len(case.flips)


def test_kept_patches_are_compared_not_only_counted(tiny_ats_onnx, model, inputs):
    """The tapped masks give each stage's original positions, equal to the reference's."""
    _, images = inputs
    keep = torch.full((9,), 0.5)
    observed = TappedSession(str(tiny_ats_onnx))(images[:4].numpy(), keep.numpy())
    expected = reference_samples(model, images[:4], keep)
    for got, want in zip(observed, expected, strict=True):
        assert [len(k) - 1 for k in got.kept] == got.tokens.tolist()
        for stage_got, stage_want in zip(got.kept, want.kept, strict=True):
            np.testing.assert_array_equal(stage_got, stage_want)


def test_kept_positions_compose_through_the_stages():
    """Stage 2 keeps rows 0 and 2 of stage 1's output, i.e. original tokens 0 and 7; a padded row is -1."""
    first = np.zeros((1, 10, 1), bool)
    first[0, [0, 3, 7]] = True
    second = np.zeros((1, 4, 1), bool)
    second[0, [0, 2, 3]] = True  # row 3 is padding after stage 1 (it kept 3 tokens)
    kept = kept_positions([(first,), (second,)], 0)
    assert kept[0].tolist() == [0, 3, 7] and kept[1].tolist() == [0, 7, -1]


def test_a_perturbed_head_bias_fails_with_its_true_maximum(tiny_ats_onnx, model, inputs, tmp_path):
    names, images = inputs
    path = _edited(tiny_ats_onnx, tmp_path, _add_to_initializer("vit.head.bias", (7,), 0.5))
    report = validate(path, model, names, images, KEEPS[:1], batches=(1,))
    assert not report.ok
    assert report.cases[0].max_logit_diff >= 0.49
    assert all("logits differ" in failure for failure in report.failures)
    assert len(report.failures) == 8 and not report.flips  # no image is excused as a flip


def test_a_perturbed_attention_weight_fails_at_its_block(tiny_ats_onnx, model, inputs, tmp_path):
    names, images = inputs
    path = _edited(tiny_ats_onnx, tmp_path, _add_to_initializer("vit.blocks.5.attn.qkv.weight", (0, 0), 0.5))
    report = validate(path, model, names, images, KEEPS[1:], batches=(4,))
    assert not report.ok and not report.cases[0].flips
    assert any("block 5 " in failure for failure in report.failures)


def test_a_wrong_budget_rule_fails(model, inputs, tmp_path, monkeypatch):
    """An export whose K is computed from n0 - 1 tokens (one quantile fewer at keep 1.0)."""
    names, images = inputs
    right = ats.budget
    monkeypatch.setattr(ats, "budget", lambda keep, n0, prefix=1: right(keep, n0 - 1, prefix))
    path = export(model, tmp_path / "wrong-budget.onnx", ExportOptions(dynamic=True))
    monkeypatch.setattr(ats, "budget", right)
    report = validate(str(path), model, names, images, KEEPS[:1], batches=(1,))
    assert not report.ok and not report.flips
    assert any("block 3 " in failure for failure in report.failures)


def test_an_export_with_a_dropped_stage_fails(model, inputs, tmp_path):
    names, images = inputs
    dropped = build(model.vit, model.arch, stages=range(4, 12))
    path = export(dropped, tmp_path / "dropped.onnx", ExportOptions(dynamic=True))
    report = validate(str(path), model, names, images, KEEPS[:1], batches=(1,))
    assert not report.ok
    assert report.failures == [
        "keep 1, batch 1: the exported model reports 8 ATS stages (8 kept-token masks), the reference has 9 "
        "(blocks 3, 4, 5, 6, 7, 8, 9, 10, 11): it was exported from another model"
    ]


def _tie_that_moves_a_patch(model, images: torch.Tensor, keep: torch.Tensor):
    """An image and a near tie of the first ATS stage whose other resolution keeps other patches."""
    for b in range(len(images)):
        probe = Probe()
        with torch.inference_mode():
            model.forward_details(images[b : b + 1], keep, hook=probe)
        expected = reference_samples(model, images[b : b + 1], keep)[0]
        for tie in probe.ties(0)[0]:
            replayed = reference_samples(model, images[b : b + 1], keep, [tie])[0]
            if not np.array_equal(replayed.kept[0], expected.kept[0]):
                below = probe.quantiles[0][0, tie.quantile] <= probe.cdfs[0][0, tie.position]
                return b, tie, below
    raise AssertionError("no near tie in these images")


def _edit_cdf(op: str, operand: np.ndarray):
    """``op`` (Add, Mul) the first ATS stage's cdf with ``operand``: a runtime that computes it apart."""

    def edit(graph: onnx.ModelProto) -> None:
        cumsum = next(n for n in graph.graph.node if n.name == "/samplers.0/CumSum")
        graph.graph.initializer.append(numpy_helper.from_array(operand.astype(np.float32), "cdf_operand"))
        edited = "/samplers.0/CumSum_edited"
        for node in graph.graph.node:
            node.input[:] = [edited if name == cumsum.output[0] else name for name in node.input]
        graph.graph.node.append(helper.make_node(op, [cumsum.output[0], "cdf_operand"], [edited], name="/edit"))
        _toposort(graph)

    return edit


def _shift_at(position: int, delta: float) -> np.ndarray:
    shift = np.zeros((1, 196, 1), np.float32)
    shift[0, position, 0] = delta
    return shift


def _toposort(graph: onnx.ModelProto) -> None:
    import onnx_graphsurgeon as gs

    sorted_graph = gs.export_onnx(gs.import_onnx(graph).toposort())
    graph.graph.CopyFrom(sorted_graph.graph)


def test_a_genuine_tie_flip_is_named_and_a_skewed_cdf_fails(tiny_ats_onnx, model, tmp_path):
    config = data_config(model.vit)
    images = random_images(24, config, seed=11)
    keep = torch.ones(9)
    b, tie, below = _tie_that_moves_a_patch(model, images, keep)
    assert tie.margin <= TIE_TOL
    # The runtime's cdf lands just on the other side of that quantile (1e-6 past it: far above float noise).
    delta = -(tie.margin + 1e-6) if below else tie.margin + 1e-6
    path = _edited(tiny_ats_onnx, tmp_path, _edit_cdf("Add", _shift_at(tie.position, delta)))
    report = validate(path, model, [f"random-{b}"], images[b : b + 1], [[1.0] * 9], batches=(1,))
    assert report.ok, report.failures
    (flip,) = report.flips
    assert flip.image == f"random-{b}" and flip.blocks == [3] and flip.ties[0].position == tie.position
    # cdf position p is token p + 1 (patch p); the quantile moves between patches p and p + 1
    assert "block 3: quantile" in flip.describe()
    assert f"patch {tie.position}" in flip.describe() or f"patch {tie.position + 1}" in flip.describe()

    # A cdf 1% off moves many samples, which no near tie explains.
    shutil.copy(tiny_ats_onnx, tmp_path / "copy.onnx")
    wrong = _edited(tmp_path / "copy.onnx", tmp_path, _edit_cdf("Mul", np.array(0.99)))
    report = validate(wrong, model, [f"random-{b}"], images[b : b + 1], [[1.0] * 9], batches=(1,))
    assert not report.ok and not report.flips
    assert "block 3 " in report.failures[0]


# --------------------------------------------------------------------------- the CLI


def test_validate_command_passes_the_export_and_fails_a_broken_one(exported, tmp_path):
    from cli_helpers import invoke, plain

    result = invoke("validate", exported, "--keep", "0.5", "--batch", "2", "--images", "4")
    assert result.exit_code == 0, result.output
    assert "validated" in plain(result.output) and "4/4" in plain(result.output)

    broken = _edited(exported, tmp_path, _add_to_initializer("vit.head.bias", (3,), 0.5))
    result = invoke("validate", broken, "--keep", "0.5", "--batch", "2", "--images", "4", "--checkpoint", "random:0")
    assert result.exit_code == 1, result.output
    text = plain(result.output)
    assert "mismatch" in text and "logits differ" in text and "disagrees with the PyTorch reference" in text


def test_validate_command_takes_real_photos_from_a_folder(exported, tmp_path, photos):
    from cli_helpers import invoke, plain

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, picture in zip(*photos, strict=True):
        picture.save(folder / f"{name}.png")
    result = invoke("validate", exported, "--data", folder, "--keep", "0.72", "--batch", "1")
    assert result.exit_code == 0, result.output
    assert "0.72" in plain(result.output) and "36/36" in plain(result.output)


def test_ctrl_c_during_validation_says_the_file_is_not_validated(here, monkeypatch):
    from cli_helpers import invoke, plain

    from ats_deploy.exporters import validate as validate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate_module, "validate", interrupted)
    result = invoke("export", "random:0", "--arch", "deit_tiny_patch16_224", "--dynamic")
    assert result.exit_code == 130
    text = plain(result.output)
    assert "written in full but NOT validated" in text and "ats-deploy validate deit_tiny_patch16_224_ats.onnx" in text
    assert (here / "deit_tiny_patch16_224_ats.onnx").is_file()


def test_a_failed_validation_keeps_the_file_and_says_so(here, monkeypatch):
    from cli_helpers import invoke, plain

    right = ats.budget
    monkeypatch.setattr(ats, "budget", lambda keep, n0, prefix=1: right(keep, n0 - 1, prefix))
    real_validate = __import__("ats_deploy.exporters.validate", fromlist=["validate"]).validate

    def with_right_budget(*args, **kwargs):  # the export traced the wrong rule; the reference uses the right one
        monkeypatch.setattr(ats, "budget", right)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr("ats_deploy.exporters.validate.validate", with_right_budget)
    result = invoke("export", "random:0", "--arch", "deit_tiny_patch16_224", "--dynamic")
    assert result.exit_code == 1, result.output
    assert "The file is kept for inspection and marked as failed" in plain(result.output)
    assert read(here / "deit_tiny_patch16_224_ats.onnx").validation_failed, "marked, so deploying it is refused"


def test_the_real_deit_tiny_export_passes_on_real_imagenet_photos(real_deit_tiny, imagenet_sample, tmp_path):
    """The real weights' export against their reference on 24 held-out ImageNet photos; a broken copy fails."""
    from rich.console import Console

    from ats_deploy.exporters.validate import folder_inputs

    path = export(real_deit_tiny, tmp_path / "real.onnx", ExportOptions(dynamic=True))
    names, images = folder_inputs(real_deit_tiny, imagenet_sample, 24, Console(quiet=True))
    report = validate(str(path), real_deit_tiny, names, images, [[1.0] * 9, [0.72] * 9, [0.5] * 9], batches=(1, 4))
    assert report.ok, report.failures
    assert all(case.images == 24 and case.positions for case in report.cases)
    broken = _edited(path, tmp_path, _add_to_initializer("vit.blocks.4.attn.qkv.weight", (0, 0), 0.5))
    report = validate(broken, real_deit_tiny, names, images, [[0.72] * 9], batches=(4,))
    assert not report.ok


# --------------------------------------------------------------------------- thousands of tokens

MANY_PX = 512  # 1024 patches: a 4-block DeiT-Tiny with ATS at blocks 1-3 (random weights), fast at this size


@pytest.fixture(scope="module")
def many_tokens():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=4, img_size=MANY_PX).eval()
    return build(vit, "deit_tiny_patch16_224", stages=[1, 2, 3]).eval()


def test_sub_resolution_ties_resolved_together_are_one_flip_at_a_thousand_tokens(many_tokens, photos):
    """Several quantiles of one stage within float32 resolution of the cdf, resolved the other way together.

    No single tie replayed alone reproduces it (what one-tie-at-a-time replay could not explain); replaying
    every tie the export's kept patches point to, with the other sub-resolution ties pinned, does.
    """
    from itertools import combinations

    from ats_deploy.exporters.compare import FLOAT_RESOLUTION, Case, Judge, _first_difference

    image = preprocess(photos[1][:1], data_config(many_tokens.vit))[0]
    keep = torch.full((1, 3), 0.7)
    judge = Judge(many_tokens, 1e-3)
    expected = judge.replay(image, keep[0], [])
    assert sum(t.margin <= FLOAT_RESOLUTION for t in expected.ties[0]) >= 2, "many tokens, several sub-resolution ties"
    for pair in combinations(expected.ties[0][:10], 2):
        observed = judge.replay(image, keep[0], pair)
        alone = [_first_difference(observed, judge.replay(image, keep[0], [tie])) for tie in pair]
        if _first_difference(observed, expected) == 0 and None not in alone:
            break
    else:
        raise AssertionError("no pair of ties whose joint resolution only a joint replay reproduces")
    case = Case([0.7] * 3, 1)
    judge.compare(case, "photo", observed, expected, lambda force, pin=(): judge.replay(image, keep[0], force, pin))
    assert not case.failures, case.failures
    (flip,) = case.flips
    assert {(t.position, t.quantile) for t in pair} <= {(t.position, t.quantile) for t in flip.ties}


def test_an_export_at_a_thousand_tokens_passes_and_a_skewed_cdf_still_fails(many_tokens, photos, tmp_path):
    names, pictures = photos
    images = preprocess(pictures[:2], data_config(many_tokens.vit))
    path = export(many_tokens, tmp_path / "many.onnx", ExportOptions(dynamic=True))
    keeps = [[0.7] * 3]
    report = validate(str(path), many_tokens, names[:2], images, keeps, batches=(1,))
    assert report.ok, report.failures
    shutil.copy(path, tmp_path / "copy.onnx")
    wrong = _edited(tmp_path / "copy.onnx", tmp_path, _edit_cdf("Mul", np.array(0.999)))
    report = validate(wrong, many_tokens, names[:2], images, keeps, batches=(1,))
    assert not report.ok and "block 1 " in report.failures[0]
