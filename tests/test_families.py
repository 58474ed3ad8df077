"""The model-family registry: which models the reference runs, and one clear refusal for the others.

Every family's small random-weight model conforms to the float64 yardstick (ATS_SPEC.md sections
1-3, P prefix tokens), and the families with P > 1 export ``--dynamic`` and validate against the reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
import yardstick
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ats_deploy.artifact import read
from ats_deploy.errors import UserError
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.validate import validate
from ats_deploy.families import DEIT_DISTILLED, FAMILIES, VIT, VIT_REGISTERS, family_of
from ats_deploy.images import data_config, random_images
from ats_deploy.model import ATSVisionTransformer, build

# Fractions, absolute budgets and the floors (P + 7, P + 1): 3.0 draws a single quantile.
KEEPS = (1.0, 0.6, 0.3, 20.0, 3.0)


def _small(arch: str, **kwargs) -> VisionTransformer:
    """A random-weight (seed 0) timm model in eval mode."""
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


def _conforms(model: ATSVisionTransformer, images: torch.Tensor, keep: float) -> None:
    """Batch 1 and a mixed batch vs the per-image float64 yardstick: same tokens and kept patches, close logits."""
    keep_list = [keep] * len(model.stages)
    with torch.no_grad():
        batch = model.forward_details(images, torch.tensor(keep_list))
        for b in range(images.shape[0]):
            expected = yardstick.run(model.vit, images[b], keep_list, model.stages)
            alone = model.forward_details(images[b : b + 1], torch.tensor(keep_list))
            for run, out, row in (("batch 1", alone, 0), ("mixed batch", batch, b)):
                assert out.tokens[row].tolist() == expected.tokens, f"image {b}, keep {keep}, {run}"
                for s, positions in enumerate(out.positions):
                    kept = positions[row][positions[row] >= 0].tolist()
                    assert kept == _original(model, expected.kept)[s], f"image {b}, keep {keep}, {run}, stage {s}"
                np.testing.assert_allclose(out.logits[row].numpy(), expected.logits, atol=1e-4, rtol=0, err_msg=run)


def _original(model: ATSVisionTransformer, kept: list[list[int]]) -> list[list[int]]:
    """The yardstick's kept rows of each stage's input as original token indices, prefix tokens first."""
    prefix = list(range(model.prefix_tokens))
    current, original = list(range(model.n0)), []
    for rows in kept:
        current = [current[r] for r in prefix + rows]
        original.append(current)
    return original


# One small model per family and shape the issue names: P = 1, 2, 5; /32; 384 pixels; a feature extractor.
MODELS = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 112}),
    "vit_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "num_classes": 10, "depth": 6}),
    "vit_registers_features": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 6}),
    "vit_patch32": ("vit_tiny_patch16_224", {"patch_size": 32, "img_size": 160, "depth": 4}),
    "vit_384": ("vit_tiny_patch16_384", {"depth": 3}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def family_model(request) -> ATSVisionTransformer:
    arch, kwargs = MODELS[request.param]
    vit = _small(arch, **kwargs)
    return build(vit, arch, stages=list(range(1, len(vit.blocks))))


def test_every_family_model_matches_the_yardstick(family_model):
    images = random_images(2, data_config(family_model.vit), seed=3)
    for keep in KEEPS:
        _conforms(family_model, images, keep)


def test_the_families_and_their_prefix_tokens():
    cases = {
        "deit_tiny_distilled_patch16_224": (DEIT_DISTILLED, 2),
        "vit_small_patch14_reg4_dinov2": (VIT_REGISTERS, 5),
        "deit3_small_patch16_224": (VIT, 1),
        "vit_base_patch16_224": (VIT, 1),
        "vit_large_patch16_224": (VIT, 1),
        "vit_base_patch32_224": (VIT, 1),
    }
    for arch, (family, prefix) in cases.items():
        with torch.device("meta"):  # the registry reads the structure only: no weights needed
            vit = timm.create_model(arch, pretrained=False)
        assert family_of(vit) is family and family.prefix_tokens(vit) == prefix, arch


def test_the_vit_family_runs_deit_and_vit(random_deit_tiny):
    assert family_of(random_deit_tiny) is VIT and VIT.prefix_tokens(random_deit_tiny) == 1
    assert VIT.pools_class_token(random_deit_tiny)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_the_vit_head_is_timms_head(pool):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool=pool).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = vit.forward_features(images)
        torch.testing.assert_close(VIT.head(vit, features, None), vit.forward_head(features), rtol=0, atol=1e-6)
    assert VIT.pools_class_token(vit) is (pool == "token")


@pytest.mark.parametrize(
    ("family", "arch", "kwargs"),
    [
        (DEIT_DISTILLED, "deit_tiny_distilled_patch16_224", {"img_size": 112}),
        (VIT_REGISTERS, "vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 2, "num_classes": 10}),
        (VIT_REGISTERS, "vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 2}),  # features, no head
    ],
)
def test_the_families_heads_are_timms_eval_heads(family, arch, kwargs):
    vit = _small(arch, **kwargs)
    with torch.no_grad():
        features = vit.forward_features(torch.randn(2, *data_config(vit)["input_size"]))
        torch.testing.assert_close(family.head(vit, features, None), vit.forward_head(features), rtol=0, atol=1e-6)


def test_a_model_no_family_runs_is_refused_with_the_reason_and_the_list():
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False)
    with pytest.raises(UserError) as caught:
        family_of(vit)
    message = caught.value.message
    assert message.count("has no class token; ATS scores tokens by the class token's attention") == 1
    assert "Supported model families: vit: timm VisionTransformer" in message
    assert "deit_distilled: " in message and "vit_registers: " in message


def test_a_new_family_is_one_entry(monkeypatch):
    """Registering a family is all it takes for family_of to pick it."""

    class Toy(nn.Module):
        pass

    toy = dataclasses.replace(
        VIT, name="toy", covers="toys", refusal=lambda m: None if isinstance(m, Toy) else "not a toy."
    )
    monkeypatch.setitem(FAMILIES, "toy", toy)
    assert family_of(Toy()) is toy
    with pytest.raises(UserError, match=r"not a toy\. Supported model families: vit: .*; toy: toys"):
        family_of(nn.Linear(1, 1))


@pytest.mark.parametrize("name", ["deit_distilled", "vit_registers"])
def test_prefix_token_families_export_dynamic_and_validate(name, tmp_path):
    arch, kwargs = MODELS[name]
    vit = _small(arch, **kwargs)
    model = build(vit, arch, stages=list(range(1, len(vit.blocks))))
    path = export(model, tmp_path / f"{name}.onnx", ExportOptions(dynamic=True, source="random:0"))
    assert read(str(path)).prefix_tokens == model.prefix_tokens > 1
    images = random_images(4, data_config(vit), seed=4)
    names = [f"image {i}" for i in range(len(images))]
    keeps = [[k] * len(model.stages) for k in (1.0, 0.5, 3.0)]
    report = validate(str(path), model, names, images, keeps, batches=(1, 2))
    assert report.ok, report.failures


def test_a_prefix_token_family_exports_static_and_validates(tmp_path):
    arch, kwargs = MODELS["deit_distilled"]
    vit = _small(arch, **kwargs)
    model = build(vit, arch, stages=[1, 5, 9])
    options = ExportOptions(dynamic=False, batch=2, keep=[0.5, 12.0, 3.0], source="random:0")
    path = export(model, tmp_path / "static.onnx", options)
    artifact = read(str(path))
    assert (artifact.prefix_tokens, artifact.budget) == (2, (26, 12, 3))  # floors: P + 7 and P + 1
    images = random_images(4, data_config(vit), seed=5)
    report = validate(str(path), model, [f"image {i}" for i in range(4)], images, [])
    assert report.ok, report.failures


def test_the_one_node_sampler_refuses_prefix_tokens_with_the_fix(tmp_path):
    arch, kwargs = MODELS["deit_distilled"]
    model = build(_small(arch, **kwargs), arch, stages=[10, 11])
    with pytest.raises(UserError, match="one class token; this one has 2 prefix tokens") as caught:
        export(model, tmp_path / "custom.onnx", ExportOptions(ats_op="custom"))
    assert "--ats-op subgraph" in caught.value.hint
    assert not (tmp_path / "custom.onnx").exists()
