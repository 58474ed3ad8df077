"""Every image mode Pillow opens reaches the model as the right 8-bit RGB, or is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ats_deploy.errors import UserError
from ats_deploy.images import data_config, load_image, preprocess, to_rgb

# A gray picture: a horizontal ramp over every 8-bit value, four rows high.
RAMP = np.tile(np.arange(256, dtype=np.uint8), (4, 1))


def _rgb(image: Image.Image) -> np.ndarray:
    rgb = to_rgb(image, "test")
    assert rgb.mode == "RGB"
    return np.asarray(rgb).astype(int)


def _as_mode(mode: str) -> Image.Image:
    """RAMP in ``mode``, each at its own depth (16-bit and 32-bit integers span 0..65535, floats 0..1)."""
    if mode in ("I;16", "I"):
        wide = Image.fromarray(RAMP.astype(np.uint16) * 257)  # 8-bit v is 16-bit v * 257
        return wide.convert(mode)
    if mode == "I;16B":
        return Image.frombytes(mode, RAMP.shape[::-1], (RAMP.astype(">u2") * 257).tobytes())
    if mode == "F":
        return Image.fromarray(RAMP.astype(np.float32) / 255)
    gray = Image.fromarray(RAMP)
    if mode in ("RGBa", "La"):  # Pillow makes them only from RGB
        return gray.convert("RGB").convert(mode)
    return gray.convert(mode)


@pytest.mark.parametrize(
    "mode",
    ["L", "P", "RGB", "RGBX", "RGBA", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV",
     "I;16", "I;16B", "I", "F"],
)
def test_every_mode_gives_the_same_gray_picture(mode):
    image = _as_mode(mode)
    assert image.mode == mode
    rgb = _rgb(image)
    assert np.abs(rgb - RAMP[..., None]).max() <= 2, mode  # two 8-bit roundings (LAB: to it and back)


def test_a_16_bit_png_reads_as_its_8_bit_version(tmp_path: Path):
    """The issue: a 16-bit grayscale PNG read as all white."""
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "wide.png")
    Image.fromarray(np.rint(gradient / 257).astype(np.uint8)).save(tmp_path / "narrow.png")
    with Image.open(tmp_path / "wide.png") as opened:
        assert opened.mode == "I;16"
    wide, narrow = (np.asarray(load_image(tmp_path / n)).astype(int) for n in ("wide.png", "narrow.png"))
    assert np.abs(wide - narrow).max() <= 1 and wide.min() == 0 and wide.max() == 255


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_tiffs_read_as_their_8_bit_version(tmp_path: Path, mode):
    _as_mode(mode).save(tmp_path / "wide.tif")
    assert np.abs(np.asarray(load_image(tmp_path / "wide.tif")).astype(int) - RAMP[..., None]).max() <= 1


def test_the_bench_sees_the_same_pixels_for_16_and_8_bit(tmp_path: Path, random_deit_tiny):
    """ats_deploy/data.py reads files through load_image: the tensors match too."""
    from ats_deploy.data import Skipped, folder_batches, image_folder

    (tmp_path / "cls").mkdir()
    ramp = Image.fromarray(RAMP).resize((224, 224))
    Image.fromarray(np.asarray(ramp).astype(np.uint16) * 257).save(tmp_path / "cls" / "a-wide.png")
    ramp.save(tmp_path / "cls" / "b-narrow.png")
    folder = image_folder(tmp_path, random_deit_tiny.num_classes)
    [batch] = folder_batches(folder, data_config(random_deit_tiny), 2, Skipped())
    assert batch.names == ["cls/a-wide.png", "cls/b-narrow.png"]
    assert (batch.images[0] - batch.images[1]).abs().max() < 1e-6


def test_transparent_pixels_are_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest is transparent black
    assert _rgb(Image.fromarray(rgba, "RGBA"))[0].tolist() == [[255, 0, 0], [255, 255, 255]]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert _rgb(la)[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 0
    assert _rgb(palette)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_one_bit_images_are_black_and_white():
    bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1", dither=Image.Dither.NONE)
    assert _rgb(bits)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.fromarray(np.array([[0.0, 2.0]], np.float32)), "float pixels from 0 to 2"),
        (Image.fromarray(np.array([[0.0, np.nan]], np.float32)), "float pixels"),
        (Image.fromarray(np.array([[-5, 70000]], np.int32)), "I integer pixels from -5 to 70000"),
    ],
)
def test_pixels_outside_the_read_range_are_refused_by_name(image, message):
    with pytest.raises(UserError, match=message):
        to_rgb(image, "odd.tif")


def test_the_model_sees_a_16_bit_photo_as_its_8_bit_version(random_deit_tiny):
    from skimage import data

    photo = data.camera()  # 8-bit grayscale
    wide = Image.fromarray(photo.astype(np.uint16) * 257)
    config = data_config(random_deit_tiny)
    narrow = preprocess([to_rgb(Image.fromarray(photo), "narrow")], config)
    assert (preprocess([to_rgb(wide, "wide")], config) - narrow).abs().max() < 1e-6
