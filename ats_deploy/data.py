"""Images to run a model on: an ImageFolder tree with its class indices, or unlabelled sample photos.

Bench and tune measure on them, int8 calibrates and ``validate`` compares on them, ``loadtest`` sends them.

An ImageFolder is ``ROOT/<class>/<image>``. Class indices come, in this order of
preference, from ``--class-map`` (a JSON or YAML mapping of folder name to index),
from the ImageNet wnid of each folder when the model has 1000 classes (so any
subset of an ImageNet val tree works), or from the sorted folder order.

Images are read lazily, a batch at a time. A file that cannot be decoded is
skipped and counted rather than stopping a long run; only when no image at all
can be read is that an error.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import yaml
from PIL import Image

from ats_deploy.errors import UserError
from ats_deploy.imagenet import IMAGENET_CLASSES, wnid_index
from ats_deploy.images import SAMPLE_PHOTOS, load_image, preprocess, random_images, sample_images

# The extensions torchvision's ImageFolder accepts; other files (README, .DS_Store) are ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
LAYOUT = "expected ImageFolder layout: DIR/<class>/<image>.jpg"


@dataclass
class Batch:
    """Preprocessed images with their names and, for an ImageFolder, their class indices."""

    images: torch.Tensor
    names: list[str]
    labels: torch.Tensor | None


@dataclass
class Skipped:
    """Files that could not be decoded, with the reason, in the order met."""

    files: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.files.append((name, reason))

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class ImageFolder:
    """The image files of an ImageFolder tree, classes interleaved, and how they were labelled.

    A flat folder of images (no class subfolders) is unlabelled: scored by agreement
    with the PyTorch dense model, like the sample images.
    """

    root: Path
    files: list[tuple[Path, int]]
    classes: int
    labelling: str
    labelled: bool = True

    @property
    def metric(self) -> str:
        return "top-1 accuracy" if self.labelled else SampleImages.metric

    def describe(self) -> str:
        if not self.labelled:
            return f"{self.root} ({len(self.files)} images, no labels)"
        return f"{self.root} ({self.classes} classes, labels from {self.labelling})"


@dataclass
class SampleImages:
    """The scikit-image photos plus random images: no labels, only agreement with the reference."""

    count: int
    metric: ClassVar[str] = "top-1 agreement with PyTorch dense"

    def describe(self) -> str:
        photos = min(self.count, len(SAMPLE_PHOTOS))
        extra = f" + {self.count - photos} random images" if self.count > photos else ""
        return f"{photos} scikit-image photos{extra} (no labels)"


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except PermissionError:
        raise UserError(f"cannot read folder {folder}: permission denied.") from None
    except OSError as err:
        raise UserError(f"cannot read folder {folder}: {err.strerror or err}.") from None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def image_folder(root: Path, num_classes: int, class_map: Path | None = None, limit: int | None = None) -> ImageFolder:
    """The files of ``root`` in ImageFolder layout, at most ``limit``, taken in turn from each class."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist; {LAYOUT}.")
    if not root.is_dir():
        raise UserError(f"--data {root} is a file, not a folder; {LAYOUT}.")
    entries = _listdir(root)
    if not entries:
        raise UserError(f"data folder {root} is empty; {LAYOUT}.")
    folders = [p for p in entries if p.is_dir()]
    if not folders:
        return _flat_folder(root, entries, class_map, limit)
    indices, labelling = class_indices([p.name for p in folders], num_classes, class_map)
    per_class = [[(f, indices[folder.name]) for f in _listdir(folder) if _is_image(f)] for folder in folders]
    files = [item for item in itertools.chain(*itertools.zip_longest(*per_class)) if item is not None]
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UserError(f"no image files ({suffixes}) in the {len(folders)} class folders of {root}; {LAYOUT}.")
    folder = ImageFolder(root, files[:limit] if limit else files, len(folders), labelling)
    _check_readable(folder)
    return folder


def _flat_folder(root: Path, entries: list[Path], class_map: Path | None, limit: int | None) -> ImageFolder:
    """Images directly in ``root``: no labels, so scores are agreement with the dense model."""
    if class_map is not None:
        raise UserError(f"--class-map maps class folders, but {root} has none; {LAYOUT}.")
    images = [(path, -1) for path in entries if _is_image(path)]
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UserError(f"data folder {root} holds neither class folders nor image files ({suffixes}); {LAYOUT}.")
    folder = ImageFolder(root, images[:limit] if limit else images, 0, "none", labelled=False)
    _check_readable(folder)
    return folder


def _check_readable(folder: ImageFolder) -> None:
    """Fail now, not after the models are loaded, when not one file decodes."""
    reasons = []
    for path, _ in folder.files:
        try:
            load_image(path)
            return
        except UserError as err:
            reasons.append(err.message)
    raise UserError(f"none of the {len(reasons)} image files of {folder.root} could be read; the first: {reasons[0]}")


def class_indices(folders: list[str], num_classes: int, class_map: Path | None) -> tuple[dict[str, int], str]:
    """Class index of every folder name, and a phrase saying where the indices came from."""
    if class_map is not None:
        mapping = read_class_map(class_map, num_classes)
        missing = [name for name in folders if name not in mapping]
        if missing:
            raise UserError(f"class map {class_map} has no entry for the folders: {', '.join(missing)}.")
        return {name: mapping[name] for name in folders}, f"class map {class_map}"
    if num_classes == IMAGENET_CLASSES:
        wnids = {name: wnid_index(name) for name in folders}
        if all(index is not None for index in wnids.values()):
            return wnids, "ImageNet wnids"
    if len(folders) > num_classes:
        raise UserError(
            f"the data has {len(folders)} class folders but the model has {num_classes} classes.",
            hint="Pass --class-map FILE mapping each folder name to a class index of the model.",
        )
    return {name: i for i, name in enumerate(sorted(folders))}, "sorted folder order"


def read_class_map(path: Path, num_classes: int) -> dict[str, int]:
    """A JSON (``.json``) or YAML file mapping folder name -> class index, checked against the model."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read class map {path}: {err.strerror or err}.") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise UserError(f"class map {path} is not valid {kind}: {err}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"class map {path} must be a non-empty mapping of folder name to class index.")
    for name, index in data.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_classes:
            raise UserError(
                f"class map {path}: '{name}' maps to {index!r}; class indices must be integers "
                f"from 0 to {num_classes - 1} (the model has {num_classes} classes)."
            )
    return {str(name): index for name, index in data.items()}


def folder_batches(folder: ImageFolder, config: dict, batch: int, skipped: Skipped) -> Iterator[Batch]:
    """Readable images of ``folder`` in batches of ``batch`` (the last may be short); bad files go to ``skipped``."""
    pending: list[tuple[Image.Image, str, int]] = []
    for path, label in folder.files:
        name = str(path.relative_to(folder.root))
        try:
            pending.append((load_image(path), name, label))
        except UserError as err:
            skipped.add(name, err.message)
            continue
        if len(pending) == batch:
            yield _batch(pending, config)
            pending = []
    if pending:
        yield _batch(pending, config)


def _batch(items: list[tuple[Image.Image, str, int]], config: dict) -> Batch:
    images, names, labels = zip(*items, strict=True)
    known = torch.tensor(labels) if min(labels) >= 0 else None  # -1: a flat, unlabelled folder
    return Batch(preprocess(images, config), list(names), known)


def sample_batches(samples: SampleImages, config: dict, batch: int) -> Iterator[Batch]:
    """The scikit-image photos, then seeded random images, up to ``samples.count``, in batches."""
    photos = list(sample_images().items())[: samples.count]
    images = preprocess([image for _, image in photos], config)
    extra = samples.count - len(photos)
    images = torch.cat([images, random_images(extra, config)]) if extra > 0 else images
    names = [f"skimage:{name}" for name, _ in photos] + [f"random-{i}" for i in range(extra)]
    for start in range(0, samples.count, batch):
        yield Batch(images[start : start + batch], names[start : start + batch], None)
