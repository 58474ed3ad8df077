"""Images in, normalised tensors out: the preprocessing every command shares.

Preprocessing is timm's own evaluation transform for the model (resize, centre
crop, mean/std), so the PyTorch reference, the exported model and the bench see
the same pixels. Real photos for demos and validation come from scikit-image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config

from .errors import UserError

SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def data_config(vit: torch.nn.Module) -> dict:
    """timm's data config of the model: input_size, mean, std, interpolation, crop_pct.

    The input size is the model's own (timm's pretrained config says 224 even for a
    model created with another ``img_size``).
    """
    config = dict(resolve_model_data_config(vit))
    config["input_size"] = (3, *vit.patch_embed.img_size)
    return config


def sample_images(names: Sequence[str] = SAMPLE_PHOTOS) -> dict[str, Image.Image]:
    """Real photos shipped inside scikit-image (no download)."""
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in names}


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with one clear message for each way it can fail."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give image files (JPEG, PNG, ...).")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}. Is it a valid JPEG/PNG file?") from None


def preprocess(images: Sequence[Image.Image], config: dict) -> torch.Tensor:
    """``[B, 3, H, W]`` float32, as the model's evaluation transform makes it."""
    transform = create_transform(**config, is_training=False)
    return torch.stack([transform(image) for image in images])


def random_images(count: int, config: dict, seed: int = 0) -> torch.Tensor:
    """Normalised random images, for validation beyond the real photos."""
    generator = np.random.default_rng(seed)
    shape = (count, *config["input_size"])
    return torch.from_numpy(generator.standard_normal(shape).astype(np.float32))
