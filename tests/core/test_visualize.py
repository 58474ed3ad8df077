"""`ats-deploy visualize`: which patches each ATS stage kept, one row per keep and one column per stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ats_deploy.checkpoints import load_model
from ats_deploy.cli import app
from ats_deploy.errors import UserError
from ats_deploy.images import data_config, preprocess
from ats_deploy.visualize import figure, masked, token_grid

RANDOM = ["random:0", "--arch", "deit_tiny_patch16_224"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:0", arch="deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def cat(photos):
    names, images = photos
    return images[names.index("chelsea")]


def test_the_grid_has_a_row_per_keep_and_a_column_per_stage(tiny, cat):
    grid = token_grid(tiny, cat, [[0.9], [0.5]])
    assert grid.shape == (2, 9)
    assert grid.kept.shape == (2, 9, 14, 14)
    assert grid.image.shape == (224, 224, 3) and grid.image.min() >= 0.0 and grid.image.max() <= 1.0
    fig = figure(grid, "title")
    assert len(fig.axes) == 18
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 9)


def test_the_masks_are_the_tokens_the_model_kept(tiny, cat):
    grid = token_grid(tiny, cat, [[0.5]])
    with torch.inference_mode():
        _, tokens = tiny(preprocess([cat], data_config(tiny.vit)), torch.tensor([0.5] * 9))
    assert grid.kept[0].sum(axis=(1, 2)).tolist() == tokens[0].tolist()
    assert grid.kept[0, -1].sum() < grid.kept[0, 0].sum() <= 196


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 4}),
])
def test_with_prefix_tokens_the_masks_are_the_patches_the_model_kept(cat, arch, kwargs):
    """P > 1: token ``j >= P`` is patch ``j - P``; the prefix tokens mark no patch."""
    import timm

    from ats_deploy.model import build

    torch.manual_seed(0)
    model = build(timm.create_model(arch, pretrained=False, **kwargs).eval(), arch)
    grid = token_grid(model, cat, [[0.5]])
    with torch.inference_mode():
        out = model.forward_details(preprocess([cat], data_config(model.vit)), 0.5)
    prefix = model.prefix_tokens
    for s, positions in enumerate(out.positions):
        patches = sorted((positions[0][positions[0] >= prefix] - prefix).tolist())
        assert np.flatnonzero(grid.kept[0, s].reshape(-1)).tolist() == patches
        assert len(patches) == out.tokens[0, s]


def test_dropped_patches_are_darkened_and_kept_ones_untouched():
    image = np.full((4, 4, 3), 0.8)
    kept = np.array([[True, False], [False, True]])
    out = masked(image, kept)
    assert np.allclose(out[:2, :2], 0.8) and np.allclose(out[2:, 2:], 0.8)
    assert (out[:2, 2:] < 0.2).all() and (out[2:, :2] < 0.2).all()


def test_a_dense_model_has_nothing_to_show(cat):
    dense = load_model("random:0", arch="deit_tiny_patch16_224", stages="none")
    with pytest.raises(UserError, match="no ATS stages"):
        token_grid(dense, cat, [[0.5]])


def test_cli_writes_the_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["visualize", *RANDOM, "skimage:chelsea", "--stages", "9-11", "--keep", "0.9", "--keep", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 x 3 panels" in result.output
    with Image.open(tmp_path / "chelsea-tokens.png") as png:
        width, height = png.size
    assert width > height  # three stage columns, two keep rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["skimage:chelsea", "--keep", "0.9,0.5"], "keep has 2 values but the model has 9 ATS stages"),
        (["skimage:chelsea", "--keep", "abc"], "cannot read --keep 'abc'"),
        (["skimage:nosuch"], "scikit-image has no photo 'nosuch'"),
        (["missing.jpg"], "image not found"),
        (["skimage:chelsea", "-o", "out.jpg"], "must be a .png file"),
    ],
)
def test_cli_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["visualize", *RANDOM, *args])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not list(tmp_path.glob("*.png"))
