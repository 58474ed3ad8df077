"""The model-family registry: which models the reference runs, and one clear refusal for the others.

Every family's small random-weight model conforms to the float64 yardstick (docs/ATS.md sections
1-3, P prefix tokens) and exports ``--dynamic`` and validates against the reference; a distilled and a
register model also go from a timm state dict through the CLI's export, validate, bench and tune.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import timm
import torch
import yardstick
from cli_helpers import fast_profile, invoke
from PIL import Image
from safetensors.torch import save_file
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ats_deploy import ats
from ats_deploy.artifact import read
from ats_deploy.bench.tune import search
from ats_deploy.errors import UserError
from ats_deploy.exporters.onnx_export import ExportOptions, export
from ats_deploy.exporters.validate import validate
from ats_deploy.families import DEIT_DISTILLED, FAMILIES, VIT, VIT_REGISTERS, family_of
from ats_deploy.images import data_config, random_images
from ats_deploy.model import ATSVisionTransformer, build
from ats_deploy.profiles import load_profile
from ats_deploy.tune_log import budgets

# Fractions, absolute budgets and the floors (P + 7, P + 1): 3.0 draws a single quantile.
KEEPS = (1.0, 0.6, 0.3, 20.0, 3.0)


def _small(arch: str, **kwargs) -> VisionTransformer:
    """A random-weight (seed 0) timm model in eval mode.

    Layer scales (DeiT-III, DINOv2) start near 0 (timm's ``init_values``), which would make every block almost the
    identity and hide a reference that skipped them: they are drawn around 1 instead.
    """
    torch.manual_seed(0)
    vit = timm.create_model(arch, pretrained=False, **kwargs).eval()
    for module in vit.modules():
        if isinstance(module, LayerScale):
            nn.init.uniform_(module.gamma, 0.5, 1.5)
    return vit


def _conforms(model: ATSVisionTransformer, images: torch.Tensor, keep: float) -> None:
    """Batch 1 and a batch of mixed keep rows (image ``b`` > 0 gets ``KEEPS[b]``) vs the per-image float64
    yardstick: same tokens and kept patches, close logits (spec sections 1-4)."""
    rows = [[keep if b == 0 else KEEPS[b % len(KEEPS)]] * len(model.stages) for b in range(images.shape[0])]
    with torch.no_grad():
        batch = model.forward_details(images, torch.tensor(rows))
        for b in range(images.shape[0]):
            alone = model.forward_details(images[b : b + 1], torch.tensor(rows[b]))
            expected = yardstick.run(model.vit, images[b], rows[b], model.stages)
            for run, out, row in (("batch 1", alone, 0), ("mixed batch", batch, b)):
                assert out.tokens[row].tolist() == expected.tokens, f"image {b}, keep {rows[b]}, {run}"
                for s, positions in enumerate(out.positions):
                    kept = positions[row][positions[row] >= 0].tolist()
                    assert kept == _original(model, expected.kept)[s], f"image {b}, keep {rows[b]}, {run}, stage {s}"
                np.testing.assert_allclose(out.logits[row].numpy(), expected.logits, atol=1e-4, rtol=0, err_msg=run)


def _original(model: ATSVisionTransformer, kept: list[list[int]]) -> list[list[int]]:
    """The yardstick's kept rows of each stage's input as original token indices, prefix tokens first."""
    prefix = list(range(model.prefix_tokens))
    current, original = list(range(model.n0)), []
    for rows in kept:
        current = [current[r] for r in prefix + rows]
        original.append(current)
    return original


# One small model per family and shape the issue names: P = 1, 2, 5; ViT-B and ViT-L (their width and heads, fewer
# blocks and pixels); /32; 384 pixels; DeiT-III's layer scale; a feature extractor.
MODELS = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 112}),
    "vit_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "num_classes": 10, "depth": 4}),
    "vit_registers_features": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 4}),
    "vit_base": ("vit_base_patch16_224", {"img_size": 96, "depth": 3}),
    "vit_large": ("vit_large_patch16_224", {"img_size": 64, "depth": 3}),
    "vit_patch32": ("vit_small_patch32_224", {"depth": 3}),
    "vit_384": ("vit_tiny_patch16_384", {"depth": 3}),
    "deit3_layer_scale": ("deit3_small_patch16_224", {"img_size": 112, "depth": 4}),
}


HEAVY = {"vit_base", "vit_large", "vit_384", "deit3_layer_scale"}  # the widest or longest of the shapes: slow


@pytest.fixture(
    scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(MODELS)]
)
def family_model(request) -> ATSVisionTransformer:
    arch, kwargs = MODELS[request.param]
    vit = _small(arch, **kwargs)
    return build(vit, arch, stages=list(range(1, len(vit.blocks))))


def test_every_family_model_matches_the_yardstick(family_model):
    images = random_images(2, data_config(family_model.vit), seed=3)
    for keep in KEEPS:
        _conforms(family_model, images, keep)


def test_every_registered_family_has_a_model_in_the_yardstick_test():
    """A new family cannot go untested: MODELS, which the yardstick test runs, holds a model of each one."""
    covered = set()
    for arch, kwargs in MODELS.values():
        with torch.device("meta"):  # the registry reads the structure only: no weights needed
            covered.add(family_of(timm.create_model(arch, pretrained=False, **kwargs)).name)
    assert covered == set(FAMILIES)


def test_the_families_and_their_prefix_tokens():
    cases = {
        "deit_tiny_distilled_patch16_224": (DEIT_DISTILLED, 2),
        "vit_small_patch14_reg4_dinov2": (VIT_REGISTERS, 5),
        "deit3_small_patch16_224": (VIT, 1),
        "vit_base_patch16_224": (VIT, 1),
        "vit_large_patch16_224": (VIT, 1),
        "vit_base_patch32_224": (VIT, 1),
        "vit_small_patch32_224": (VIT, 1),
        "vit_small_patch16_384": (VIT, 1),
        "deit_base_patch16_384": (VIT, 1),
        "deit_base_distilled_patch16_384": (DEIT_DISTILLED, 2),
        "vit_base_patch14_reg4_dinov2": (VIT_REGISTERS, 5),
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


def test_a_non_standard_block_is_refused_with_the_reason_and_the_list():
    with torch.device("meta"):
        vit = timm.create_model("vit_small_patch16_18x2_224", pretrained=False)  # two attentions side by side
    with pytest.raises(UserError) as caught:
        build(vit, "vit_small_patch16_18x2_224")
    message = caught.value.message
    assert "block 0 is a ParallelThingsBlock; ATS supports timm's standard ViT Block" in message
    assert all(f"{name}: " in message for name in FAMILIES)


def test_layer_scale_is_applied_as_timm_applies_it():
    """DeiT-III without ATS stages is timm's forward: both multiply each branch by its layer scale (drawn around 1)."""
    arch, kwargs = MODELS["deit3_layer_scale"]
    vit = _small(arch, **kwargs)
    images = random_images(2, data_config(vit), seed=6)
    with torch.no_grad():
        logits, _ = build(vit, arch, stages=[])(images, [])
        torch.testing.assert_close(logits, vit(images), rtol=0, atol=1e-4)


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


def test_every_family_model_exports_dynamic_and_validates(family_model, tmp_path):
    """At batch 1 and in a batch of two images that keep different tokens, for fractions and the budget floors.

    A feature extractor's logits are its pooled feature: validation compares them with the reference's, whose head
    is timm's (test_the_families_heads_are_timms_eval_heads).
    """
    model, vit = family_model, family_model.vit
    path = export(model, tmp_path / "model.onnx", ExportOptions(dynamic=True, source="random:0"))
    artifact = read(str(path))
    assert (artifact.arch, artifact.prefix_tokens) == (model.arch, vit.num_prefix_tokens)
    assert artifact.num_classes == (vit.num_classes or vit.num_features)
    images = random_images(2, data_config(vit), seed=4)
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


@pytest.mark.parametrize("name", ["deit_distilled", "vit_registers"])
def test_a_prefix_token_family_exports_with_the_one_node_sampler_and_validates(name, tmp_path):
    """``--ats-op custom`` with P > 1: the node's ``prefix`` attribute keeps the P prefix tokens first."""
    arch, kwargs = MODELS[name]
    vit = _small(arch, **kwargs)
    model = build(vit, arch, stages=[1, len(vit.blocks) - 1])
    path = export(model, tmp_path / "custom.onnx", ExportOptions(dynamic=True, ats_op="custom", source="random:0"))
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "AdaptiveTokenSampler"]
    assert [onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "prefix"] == [
        vit.num_prefix_tokens
    ] * 2
    images = random_images(4, data_config(vit), seed=6)
    keeps = [[k] * 2 for k in (1.0, 0.5, 3.0)]
    report = validate(str(path), model, [f"image {i}" for i in range(4)], images, keeps, batches=(1, 2))
    assert report.ok and all(case.positions for case in report.cases), report.failures


# --------------------------------------------------------------------------- bench and tune, through the CLI


def test_tune_budgets_use_the_models_prefix_tokens():
    """The floor of a fraction is P + 7 (docs/ATS.md section 2): 0.1 of 51 tokens asks for 5, P = 2 gets 9."""
    assert budgets((0.1, 0.5), n0=51, prefix=2) == (9, 26)
    assert budgets((0.1, 0.12), n0=54, prefix=5) == (12, 12)  # one setting: tune measures it once


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "kwargs", "checkpoint"),
    [
        ("deit_tiny_distilled_patch16_224", {"img_size": 112}, "release.pth"),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "num_classes": 10}, "model.safetensors"),
    ],
)
def test_export_bench_and_tune_run_on_a_prefix_token_model(arch, kwargs, checkpoint, here):
    """From timm's state dict (a DeiT release file, safetensors), its architecture inferred, through export, validate,
    bench and tune (on a fast copy of the cpu profile), each on a couple of images."""
    vit = _small(arch, **kwargs)
    if checkpoint.endswith(".safetensors"):
        save_file(vit.state_dict(), here / checkpoint)
    else:
        torch.save({"model": vit.state_dict()}, here / checkpoint)
    result = invoke("export", checkpoint, "--dynamic", "--stages", "4,8", "--no-validate")
    assert result.exit_code == 0, result.output
    exported = next(here.glob("*.onnx"))
    artifact = read(str(exported))
    assert (artifact.arch, artifact.prefix_tokens) == (arch, vit.num_prefix_tokens)
    result = invoke("validate", exported, "--keep", "0.5", "--batch", "2", "--images", "2")
    assert result.exit_code == 0 and "matches the PyTorch reference" in result.output, result.output
    prefix, n0 = artifact.prefix_tokens, artifact.n0
    fast_profile("cpu")
    result = invoke("bench", "--profile", "cpu", "--images", "2", "--keep", "0.5", "--out", "bench")
    assert result.exit_code == 0, result.output
    variants = {v["key"]: v for v in json.loads((here / "bench" / "results.json").read_text())["variants"]}
    assert variants["exported_ats"]["gflops"] < variants["exported_dense"]["gflops"]

    (here / "data").mkdir()  # a flat folder: scored by agreement with the dense model
    rng = np.random.default_rng(7)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)).save(here / "data" / f"{i}.png")
    result = invoke("tune", "--profile", "cpu", "--data", "data", "--max-drop", "100")
    assert result.exit_code == 0, result.output
    settings = [json.loads(line) for line in (here / "profiles/cpu-tuned.log.jsonl").read_text().splitlines()][2:]
    assert len(settings) >= len(search.COARSE) and all(s["failures"] == [] for s in settings)
    for setting in settings:
        assert setting["budgets"] == [ats.budget_int(k, n0, prefix) for k in setting["keep"]]
        assert max(setting["tokens"]) <= n0 - prefix  # K' counts patches, never the prefix tokens
    assert load_profile("profiles/cpu-tuned.yaml").keep is not None


def test_a_feature_extractor_export_says_it_has_no_head_and_counts_no_head_flops(tmp_path):
    """``head: false`` in the metadata: the runtime's GFLOPs of a head-less export equal the reference's."""
    from ats_deploy import runtime
    from ats_deploy.flops import CostModel

    arch = "vit_small_patch14_reg4_dinov2"
    model = build(_small(arch, img_size=98, num_classes=0), arch, stages=[4, 8])
    path = export(model, tmp_path / "features.onnx", ExportOptions(dynamic=True, keep=[0.5]))
    artifact = read(str(path))
    assert not artifact.head and artifact.num_classes == model.vit.num_features
    exported = runtime.open(path, threads=1)
    tokens = exported.run(random_images(2, data_config(model.vit), seed=7).numpy())[1]
    expected = CostModel.of(model).gflops(torch.as_tensor(tokens)).numpy()
    np.testing.assert_allclose(exported.gflops(tokens), expected, rtol=1e-9)


def test_a_static_one_node_sampler_export_pads_each_stage_to_its_budget_with_prefix_tokens(tmp_path):
    """Static ``--ats-op custom`` with P = 5: every node's static length is ``min(K, tokens reaching it)``, K
    counting the prefix tokens (the last stage, which has no TopK to read it from, included), and it validates."""
    arch, kwargs = MODELS["vit_registers"]
    vit = _small(arch, **kwargs)
    model = build(vit, arch, stages=[1, len(vit.blocks) - 1])
    options = ExportOptions(dynamic=False, batch=2, keep=[0.5, 12.0], ats_op="custom", source="random:0")
    path = export(model, tmp_path / "static-custom.onnx", options)
    budget = read(str(path)).budget
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "AdaptiveTokenSampler"]
    lengths = [onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "length"]
    assert lengths == [min(budget[0], model.n0), min(budget[1], budget[0])]
    images = random_images(2, data_config(vit), seed=8)
    report = validate(str(path), model, ["image 0", "image 1"], images, [])
    assert report.ok, report.failures
