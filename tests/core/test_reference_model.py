"""The PyTorch reference against docs/ATS.md: the float64 yardstick, timm, batch invariance."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
import yardstick

from ats_deploy import ats
from ats_deploy.errors import UserError
from ats_deploy.images import data_config, preprocess, random_images
from ats_deploy.keep import per_stage
from ats_deploy.model import (
    ATSVisionTransformer,
    TokenSampler,
    ats_block,
    build,
    dense_block,
    parse_stages,
)

SPEC_KEEPS = (1.0, 0.87, 0.72, 0.5, 50.0, 120.0)


def _mixed_rows(keep: float, images: int, stages: int) -> list[list[float]]:
    """One keep row per image, each its own: image ``b``, stage ``s`` takes value ``b + s`` of ``keep, *SPEC_KEEPS``."""
    values = [keep, *(k for k in SPEC_KEEPS if k != keep)]
    return [[values[(b + s) % len(values)] for s in range(stages)] for b in range(images)]


def _conforms(model: ATSVisionTransformer, images: torch.Tensor, keep: float) -> None:
    """The model at batch 1 and in a batch of mixed keep rows vs the per-image float64 yardstick.

    Identical tokens, logits within 1e-4 (docs/ATS.md sections 1-3; section 4: each image its own row).
    """
    keep_list = [keep] * len(model.stages)
    rows = _mixed_rows(keep, images.shape[0], len(model.stages))
    with torch.no_grad():
        logits, tokens = model(images, torch.tensor(rows))
        for b in range(images.shape[0]):
            alone_logits, alone_tokens = model(images[b : b + 1], torch.tensor(keep_list))
            runs = {
                "batch 1": (keep_list, alone_logits[0], alone_tokens[0]),
                "mixed rows": (rows[b], logits[b], tokens[b]),
            }
            for run, (row, got_logits, got_tokens) in runs.items():
                expected = yardstick.run(model.vit, images[b], row, model.stages)
                assert got_tokens.tolist() == expected.tokens, f"image {b}, keep {row}, {run}"
                np.testing.assert_allclose(got_logits.numpy(), expected.logits, atol=1e-4, rtol=0, err_msg=run)


@pytest.mark.parametrize("keep", SPEC_KEEPS)
def test_real_weights_match_the_yardstick_on_photos(real_deit_tiny, photos, keep):
    images = preprocess(photos[1], data_config(real_deit_tiny.vit))
    _conforms(real_deit_tiny, images, keep)


@pytest.mark.parametrize("keep", SPEC_KEEPS)
def test_random_weights_match_the_yardstick(random_deit_tiny, keep):
    model = build(random_deit_tiny, "deit_tiny_patch16_224")
    _conforms(model, random_images(3, data_config(random_deit_tiny), seed=1), keep)


def test_real_weights_classify_the_photos(real_deit_tiny, photos):
    """PROVENANCE.txt: chelsea is a cat (281-287), coffee an espresso (967); dense and ATS agree."""
    images = preprocess(photos[1][:2], data_config(real_deit_tiny.vit))
    with torch.no_grad():
        logits, tokens = real_deit_tiny(images, torch.full((9,), 0.72))
    assert 281 <= logits[0].argmax() <= 287
    assert logits[1].argmax() == 967
    assert (tokens < 196).all()


@pytest.mark.parametrize("mixed", [False, True], ids=["one row", "a row per image"])
def test_per_stage_keep_and_batch_invariance(real_deit_tiny, photos, mixed):
    """Spec sections 3 and 4: an image's result depends only on itself and its own keep row."""
    images = preprocess(photos[1], data_config(real_deit_tiny.vit))
    keep = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 40.0, 30.0])
    rows = torch.stack([keep.roll(b) if mixed else keep for b in range(images.shape[0])])
    with torch.no_grad():
        batched = real_deit_tiny.forward_details(images, rows)
        for b in range(images.shape[0]):
            alone = real_deit_tiny.forward_details(images[b : b + 1], rows[b])
            assert torch.equal(alone.tokens[0], batched.tokens[b])
            torch.testing.assert_close(alone.logits[0], batched.logits[b], atol=1e-5, rtol=0)
            for s, positions in enumerate(alone.positions):
                kept = positions[0][positions[0] >= 0]
                assert torch.equal(batched.positions[s][b][: kept.numel()], kept)
                assert kept.numel() == alone.tokens[0, s] + 1 and kept[0] == 0
    assert len({int(t) for t in batched.tokens[:, -1]}) > 1, "images should keep different numbers of tokens"


def test_positions_are_ascending_patches_and_shrink(real_deit_tiny, photos):
    images = preprocess(photos[1][:1], data_config(real_deit_tiny.vit))
    with torch.no_grad():
        out = real_deit_tiny.forward_details(images, torch.full((9,), 0.5))
    previous = set(range(197))
    for positions in out.positions:
        kept = positions[0].tolist()
        assert kept == sorted(kept) and kept[0] == 0
        assert set(kept) <= previous
        previous = set(kept)


def test_no_stages_equals_timm(random_deit_tiny):
    images = random_images(2, data_config(random_deit_tiny))
    model = build(random_deit_tiny, "deit_tiny_patch16_224", stages=[])
    with torch.no_grad():
        logits, tokens = model(images, torch.zeros(0))
        torch.testing.assert_close(logits, random_deit_tiny(images), atol=1e-5, rtol=0)
    assert tokens.shape == (2, 0)


@pytest.mark.parametrize("all_rows", [False, True])
def test_a_stage_that_keeps_every_token_equals_the_dense_block(random_deit_tiny, all_rows):
    block = random_deit_tiny.blocks[5]
    x = torch.randn(2, 197, 192)

    def keep_all(scores, clamp, u):
        index = torch.arange(197).expand(2, -1).unsqueeze(-1)
        return index, torch.zeros(2, 197, 1), torch.full((2, 1), 197)

    with torch.no_grad():
        dense = dense_block(block, x, None, x)
        clamp = ats.clamp_bias(None, 197)
        sampled, mask, _, _ = ats_block(block, x, None, clamp, torch.zeros(1, 196), keep_all, x, all_rows=all_rows)
    assert (mask == 0).all()
    torch.testing.assert_close(sampled, dense, atol=1e-5, rtol=0)


def test_both_ways_of_computing_the_kept_rows_agree_on_a_padded_batch(random_deit_tiny):
    """``all_rows`` (every attention row, then gather) is an optimisation: same tokens, same outputs."""
    torch.manual_seed(0)
    block = random_deit_tiny.blocks[6]
    x = torch.randn(2, 40, 192)
    valid = torch.arange(40).expand(2, -1) < torch.tensor([[40], [31]])  # image 1 padded after 31 tokens
    k = ats.budget(torch.tensor([20.0]), 197)
    u = ats.quantiles(k, 196)[:, : int(k[0]) - 1]
    mask = torch.where(valid, 0.0, float("-inf")).unsqueeze(-1)
    stage = (ats.key_bias(mask), ats.clamp_bias(mask, 40), u, functools.partial(TokenSampler(197), length=None), x)
    with torch.no_grad():
        rows = ats_block(block, x, *stage, all_rows=False)
        every = ats_block(block, x, *stage, all_rows=True)
    assert torch.equal(rows[1], every[1]) and torch.equal(rows[2], every[2]) and torch.equal(rows[3], every[3])
    assert rows[3].tolist() != [[40], [31]] and (rows[3] > 1).all()  # sampling dropped tokens, kept some
    kept = rows[1][..., 0] == 0
    torch.testing.assert_close(rows[0][kept], every[0][every[1][..., 0] == 0], atol=1e-5, rtol=0)


def test_sampling_a_padded_batch_is_clamped_searchsorted_then_unique():
    """Spec steps 4-7 per image from the same float32 cdf: the clamp (``ats.clamp_bias`` makes the
    cdf ``+inf`` from the last valid token on), the count's adjacent difference and the compaction."""
    lengths = [40, 23, 9, 2]  # tokens of each image, class token included; padding after
    n = max(lengths)
    valid = torch.arange(n) < torch.tensor(lengths)[:, None]
    scores = torch.rand(len(lengths), n - 1, 1, generator=torch.Generator().manual_seed(1)) ** 4  # skewed: repeats
    scores = torch.where(valid[:, 1:, None], scores, 0.0)
    clamp = ats.clamp_bias(torch.where(valid, 0.0, float("-inf")).unsqueeze(-1), n)
    cdf = ats.cdf(scores)[..., 0].numpy()
    clamped = 0
    for k in (3, 8, 30, 197):
        u = ats.quantiles(torch.tensor([float(k)]), 196)[:, : k - 1]
        index, mask, n_kept = ats.compact(*ats.sample(scores, clamp, u), 197)
        for b, length in enumerate(lengths):
            t = np.searchsorted(cdf[b, : length - 1], u[0].numpy(), side="left")
            clamped += int((t > length - 2).any())
            expected = [0, *np.unique(np.minimum(t, length - 2) + 1).tolist()]
            assert index[b, :, 0][mask[b, :, 0] == 0].tolist() == expected, (k, b)
            assert n_kept[b, 0] == len(expected) and (mask[b, len(expected) :] == float("-inf")).all()
    assert clamped  # some image's float cdf ends below u = 1, so the clamp decided its last token


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("stages", ["3-11", "3,7"])  # the last block an ATS stage, or dense
def test_the_last_block_computes_only_the_rows_the_head_reads(pool, stages):
    """A head that pools the class token reads one row of the last block, so that block
    computes one row an image; average pooling reads them all. Same logits as the yardstick."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, global_pool=pool).eval()
    model = build(vit, "deit_tiny", stages=parse_stages(stages, 12))
    rows: list[int] = []
    vit.blocks[-1].mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    images, keep = random_images(2, data_config(vit), seed=3), [0.5] * len(model.stages)
    with torch.no_grad():
        logits, tokens = model(images, torch.tensor(keep))
    assert rows == [2] if pool == "token" else rows[0] > 2 * 50
    for b in range(2):
        expected = yardstick.run(vit, images[b], keep, model.stages)
        assert tokens[b].tolist() == expected.tokens
        np.testing.assert_allclose(logits[b].numpy(), expected.logits, atol=1e-4, rtol=0)


def test_a_static_budget_pads_every_stage_to_it_and_changes_nothing_else(random_deit_tiny):
    """Static exports pass each stage's K as an int: every stage is then min(K, its input) tokens
    long, padded, with the same kept tokens and logits as the run-time budget."""
    model = build(random_deit_tiny, "deit_tiny_patch16_224")
    images, keep = random_images(2, data_config(random_deit_tiny), seed=4), [0.5] * len(model.stages)
    budgets = [ats.budget_int(k, model.n0) for k in keep]
    with torch.no_grad():
        dynamic = model.forward_details(images, keep)
        static = model.forward_details(images, keep, static_budget=budgets)
        static_logits, static_tokens = model(images, keep, static_budget=budgets)
    assert budgets == [99] * 9 and [p.shape[1] for p in static.positions] == budgets
    assert torch.equal(static.tokens, dynamic.tokens) and torch.equal(static_tokens, dynamic.tokens)
    torch.testing.assert_close(static.logits, dynamic.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(static_logits, static.logits, atol=0, rtol=0)
    for padded, compact in zip(static.positions, dynamic.positions, strict=True):
        assert torch.equal(padded[:, : compact.shape[1]], compact) and (padded[:, compact.shape[1] :] == -1).all()


def test_keep_one_without_duplicates_equals_dense_model(monkeypatch):
    """Spec section 5: when no stage draws a duplicate, keep = 1.0 is the dense model.

    With 64 patches and equal scores the cdf is exactly i/64 in float32, so each
    of the 64 quantiles lands on its own token and every token is kept.
    """
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=128).eval()
    images = random_images(2, data_config(vit))
    model, dense = build(vit, "deit_tiny", stages=[3, 7, 11]), build(vit, "deit_tiny", stages=[])
    monkeypatch.setattr(ats, "significance", lambda attention, values: torch.ones(values.shape[0], values.shape[1], 1))
    with torch.no_grad():
        logits, tokens = model(images, torch.ones(3))
        torch.testing.assert_close(logits, dense(images, torch.zeros(0))[0], atol=1e-5, rtol=0)
    assert tokens.tolist() == [[64, 64, 64], [64, 64, 64]]


@pytest.mark.parametrize(
    ("keep", "k"),
    [
        (1.0, 197),
        (0.5, 99),  # 98.5 + 0.5 = 99 exactly
        (0.01, 8),  # fraction floor of 8 tokens
        (1e-9, 8),
        (1.5, 2),  # absolute budgets are floored, at least 2
        (50.9, 50),
        (500.0, 197),  # never more than the model's tokens
    ],
)
def test_budget_rule(keep, k):
    assert ats.budget_int(keep, 197) == k == yardstick.budget(keep, 197)


def test_budget_is_float32_at_its_ties():
    """Find keeps whose float32 budget differs from the float64 one; the model must follow float32."""
    keeps = np.float32(np.arange(1, 197) - 0.5) / np.float32(197)
    keeps = np.concatenate([np.nextafter(keeps, np.float32(0)), keeps, np.nextafter(keeps, np.float32(1))])
    float32 = ats.budget(torch.from_numpy(keeps.astype(np.float32)), 197).numpy().astype(int)
    float64 = np.clip(np.floor(keeps.astype(np.float64) * 197 + 0.5), 8, 197).astype(int)
    expected = np.array([yardstick.budget(float(k), 197) for k in keeps])
    assert (float32 == expected).all()
    assert (float32 != float64).any(), "the grid should contain keeps where float32 and float64 round apart"


@pytest.mark.parametrize("arch", ["deit3_small_patch16_224", "vit_tiny_patch16_224"])
def test_other_timm_variants(arch):
    """Layer scale and no_embed_class (DeiT-III), average pooling, and another image size."""
    torch.manual_seed(0)
    kwargs = {"global_pool": "avg"} if arch.startswith("vit_tiny") else {"img_size": 160}
    vit = timm.create_model(arch, pretrained=False, **kwargs).eval()
    model = build(vit, arch)
    _conforms(model, random_images(2, data_config(vit), seed=2), 0.6)


@pytest.mark.parametrize(
    ("arch", "kwargs", "reason"),
    [
        # Distilled DeiT and register tokens with a class token are families of their own (tests/core/test_families.py).
        ("deit_tiny_distilled_patch16_224", {"dynamic_img_size": True}, "dynamic image size"),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, "no class token"),
        ("vit_tiny_patch16_224", {"reg_tokens": 4, "class_token": False, "global_pool": "avg"}, "no class token"),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(arch, kwargs, reason):
    vit = timm.create_model(arch, pretrained=False, **kwargs)
    with pytest.raises(UserError, match=reason):
        build(vit, arch)


def test_stages_outside_the_depth_are_refused(random_deit_tiny):
    with pytest.raises(UserError, match="outside the model's blocks 0-11"):
        build(random_deit_tiny, "deit_tiny_patch16_224", stages=[3, 12])


def test_stage_lists():
    assert parse_stages("3-11", 12) == list(range(3, 12))
    assert parse_stages("3,5,7", 12) == [3, 5, 7]
    assert parse_stages("2-4,9", 12) == [2, 3, 4, 9]
    assert parse_stages("none", 12) == []
    with pytest.raises(UserError, match="cannot read stages"):
        parse_stages("3..5", 12)


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [0.0], [-0.5], [0.5, 0.5]])
def test_bad_keep_values_are_refused(bad):
    with pytest.raises(UserError, match="keep"):
        per_stage(bad, 3)


def test_default_stages_are_the_papers(random_deit_tiny):
    assert build(random_deit_tiny, "deit_tiny_patch16_224").stages == list(range(3, 12))
