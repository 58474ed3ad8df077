"""Which tokens each ATS stage kept, drawn on the image (the ATS paper's Fig. 2 and 7).

The image is the model's own preprocessed crop, de-normalised. In the panel of a
stage, the patches that stage dropped are darkened; the kept ones show the image.
One row per ``keep`` value, one column per ATS stage.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .atomic import write_atomic
from .errors import UserError
from .images import data_config, preprocess
from .keep import per_stage
from .model import ATSVisionTransformer

DROPPED_BRIGHTNESS = 0.15  # what is left of a dropped patch: dark, yet the image stays recognisable
PANEL_INCHES = 1.7


@dataclass
class TokenGrid:
    """The crop, and per keep (row) and ATS stage (column) the mask of kept patches."""

    image: np.ndarray  # [H, W, 3] floats in [0, 1]
    keeps: list[list[float]]
    stages: list[int]
    kept: np.ndarray  # bool [rows, stages, grid_h, grid_w]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.keeps), len(self.stages)


def denormalise(image: torch.Tensor, config: dict) -> np.ndarray:
    """A normalised ``[3, H, W]`` tensor back to ``[H, W, 3]`` pixels in [0, 1]."""
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def kept_patches(model: ATSVisionTransformer, image: torch.Tensor, keep: Sequence[float]) -> np.ndarray:
    """Bool ``[stages, grid_h, grid_w]``: the patches each ATS stage kept for one image ``[1, 3, H, W]``."""
    grid_h, grid_w = model.vit.patch_embed.grid_size
    with torch.inference_mode():
        positions = model.forward_details(image, torch.tensor(keep, dtype=torch.float32)).positions
    masks = np.zeros((len(positions), grid_h * grid_w), dtype=bool)
    prefix = model.prefix_tokens
    for s, stage_positions in enumerate(positions):
        tokens = stage_positions[0]
        masks[s, (tokens[tokens >= prefix] - prefix).numpy()] = True  # token j >= P is patch j - P in raster order
    return masks.reshape(len(positions), grid_h, grid_w)


def token_grid(model: ATSVisionTransformer, image: Image.Image, keeps: Sequence[Sequence[float]]) -> TokenGrid:
    """Run ``model`` on ``image`` at every keep; ``keeps`` are checked against the model's stages."""
    if not model.stages:
        raise UserError(f"{model.arch} has no ATS stages, so no tokens are dropped; load it with --stages.")
    checked = [per_stage(keep, len(model.stages)) for keep in keeps]
    config = data_config(model.vit)
    batch = preprocess([image], config)
    kept = np.stack([kept_patches(model, batch, keep) for keep in checked])
    return TokenGrid(denormalise(batch[0], config), checked, list(model.stages), kept)


def masked(image: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``image`` with the patches not in ``kept`` (a ``[grid_h, grid_w]`` mask) darkened."""
    height, width = image.shape[:2]
    rows, cols = kept.shape
    pixels = np.repeat(np.repeat(kept, height // rows, axis=0), width // cols, axis=1)
    return np.where(pixels[..., None], image, image * DROPPED_BRIGHTNESS)


def _keep_label(keep: list[float]) -> str:
    values = sorted(set(keep))
    return f"keep {values[0]:g}" if len(values) == 1 else "keep " + ",".join(f"{v:g}" for v in keep)


def figure(grid: TokenGrid, title: str) -> Figure:
    """The grid of panels: rows are keep values, columns ATS stages, each titled with the tokens kept."""
    rows, cols = grid.shape
    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows + 0.5), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for s, block in enumerate(grid.stages):
            ax = axes[r, s]
            ax.imshow(masked(grid.image, grid.kept[r, s]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"block {block}: {int(grid.kept[r, s].sum())} kept", fontsize=8)
        axes[r, 0].set_ylabel(_keep_label(grid.keeps[r]), fontsize=9)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def draw(model: ATSVisionTransformer, picture: Image.Image, title: str, keeps: Sequence[Sequence[float]] | None,
         target: Path) -> tuple[Path, TokenGrid]:
    """``ats-deploy visualize``: the token grid of ``picture`` at each of ``keeps`` (default: the model's keep),
    drawn under ``title`` and written as a PNG to ``target``.
    """
    grid = token_grid(model, picture, keeps or [model.default_keep])
    return save_png(figure(grid, title), target), grid
