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

    return {name: to_rgb(Image.fromarray(getattr(data, name)()), f"skimage:{name}") for name in names}


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MAX = 65535
_EIGHT_BIT_MAX = 255


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB as the model expects it, from any mode Pillow opens, or a UserError naming the mode.

    Pillow's own ``convert("RGB")`` clips 16/32-bit integer and float pixels at 255 (a
    16-bit PNG turns white), so those are scaled here: integers from the 16-bit range,
    floats from [0, 1]. Transparent pixels are composited over white: the colour stored
    under them is arbitrary (often black) and not what a viewer shows.
    """
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return Image.fromarray(_to_8_bit(np.asarray(image), image.mode, name)).convert("RGB")
    try:
        if image.mode not in _ALPHA and "transparency" not in image.info:
            return image.convert("RGB")
        # Pillow converts premultiplied La only to LA.
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    except ValueError:
        raise UserError(
            f"cannot read image {name}: Pillow mode {image.mode} has no RGB conversion; "
            "save it as 8-bit RGB or grayscale."
        ) from None


def _to_8_bit(pixels: np.ndarray, mode: str, name: str) -> np.ndarray:
    """Grayscale uint8 from integer pixels in the 16-bit range or float pixels in [0, 1]."""
    high = 1.0 if mode == "F" else float(_SIXTEEN_BIT_MAX)
    values = pixels.astype(np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= high):
        kind, limits = ("float", "[0, 1]") if mode == "F" else (f"{mode} integer", "0..65535 (16 bits)")
        raise UserError(
            f"cannot read image {name}: {kind} pixels from {values.min():g} to {values.max():g}; ats-deploy reads "
            f"them in {limits}. Save it as an 8- or 16-bit image."
        )
    return np.rint(values * (_EIGHT_BIT_MAX / high)).astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (see :func:`to_rgb`), with one clear message for each way it can fail."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give image files (JPEG, PNG, ...).")
    try:
        with Image.open(path) as image:
            return to_rgb(image, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}. Is it a valid JPEG/PNG file?") from None


def open_image(item: str) -> Image.Image:
    """An image file, or ``skimage:NAME`` for a photo shipped with scikit-image."""
    if not item.startswith("skimage:"):
        return load_image(item)
    name = item.split(":", 1)[1]
    try:
        return sample_images([name])[name]
    except AttributeError:
        raise UserError(f"scikit-image has no photo '{name}'; try skimage:chelsea or skimage:coffee.") from None

def preprocess(images: Sequence[Image.Image], config: dict) -> torch.Tensor:
    """``[B, 3, H, W]`` float32, as the model's evaluation transform makes it."""
    transform = create_transform(**config, is_training=False)
    return torch.stack([transform(image) for image in images])


def random_images(count: int, config: dict, seed: int = 0) -> torch.Tensor:
    """Normalised random images, for validation beyond the real photos."""
    generator = np.random.default_rng(seed)
    shape = (count, *config["input_size"])
    return torch.from_numpy(generator.standard_normal(shape).astype(np.float32))
