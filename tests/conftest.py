"""Shared fixtures: small random models (never pretrained: the tests run offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope="session")
def random_deit_tiny() -> VisionTransformer:
    """A randomly initialised ``deit_tiny_patch16_224`` (seed 0), in eval mode. Do not modify it."""
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as other tests expect it
        torch.manual_seed(0)
        return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


REPO = Path(__file__).resolve().parents[1]  # the tests sit in subfolders of tests/: they find files from here
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224_wvfunc_bittrue_reconstructed.pth"
SHARED_IMAGES = SHARED / "data" / "imagenet-sample-dev"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 500 real ImageNet photos of ../shared/data (ImageFolder, one per class; skipped when absent)."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"real ImageNet photos not found at {SHARED_IMAGES} (they ship in ../shared/data)")
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """Exactly the scikit-image photos as a flat folder of JPEGs (int8 calibration, held-out validation); read only."""
    from ats_deploy.images import sample_images

    folder = tmp_path_factory.mktemp("photos")
    for name, image in sample_images().items():
        image.save(folder / f"{name}.jpg")
    return folder


@pytest.fixture(scope="session")
def photos() -> tuple[list[str], list]:
    """The real photos shipped inside scikit-image, as PIL images."""
    from ats_deploy.images import sample_images

    images = sample_images()
    return list(images), list(images.values())


@pytest.fixture(scope="session")
def real_deit_tiny():
    """The ATS reference on the real DeiT-Tiny weights of ../shared/weights (skipped when absent)."""
    if not SHARED_WEIGHTS.exists():
        pytest.skip(f"real DeiT-Tiny weights not found at {SHARED_WEIGHTS} (they ship in ../shared/weights)")
    from ats_deploy.checkpoints import load_model

    return load_model(SHARED_WEIGHTS)


@pytest.fixture(scope="session")
def tiny_ats_onnx(tmp_path_factory) -> Path:
    """``random:0`` DeiT-Tiny exported with --dynamic, its source recorded as ``ats-deploy export`` does."""
    from ats_deploy.checkpoints import load_model
    from ats_deploy.exporters.onnx_export import ExportOptions, export

    model = load_model("random:0", arch="deit_tiny_patch16_224")
    path = tmp_path_factory.mktemp("tiny-onnx") / "deit_tiny_patch16_224_ats.onnx"
    return export(model, path, ExportOptions(dynamic=True, source="random:0"))


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """A fresh, empty current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def exported(here, tiny_ats_onnx) -> Path:
    """The tiny export copied into the (empty) current directory."""
    return Path(shutil.copy(tiny_ats_onnx, here / tiny_ats_onnx.name))


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """An empty folder this process cannot write in: mode 0555, plus ``chattr +i`` for root, who ignores modes."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.access(folder, os.W_OK) and shutil.which("chattr") is not None
    if immutable:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if os.access(folder, os.W_OK):
        pytest.skip("cannot make a read-only folder here (root, and chattr +i not supported)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)
