"""ImageNet-1k class names and wnid indices, from the mapping timm ships (no download)."""

from __future__ import annotations

from functools import cache

from timm.data import ImageNetInfo

IMAGENET_CLASSES = 1000


@cache
def _info() -> ImageNetInfo:
    return ImageNetInfo()


def class_name(index: int, num_classes: int) -> str:
    """Human-readable name of class ``index``; plain ``class N`` for non-ImageNet heads."""
    if num_classes != IMAGENET_CLASSES:
        return f"class {index}"
    return _info().index_to_description(index)


def wnid_index(wnid: str) -> int | None:
    """The standard ImageNet-1k index of a wnid folder name (``n01440764`` -> 0), or None."""
    return _wnid_indices().get(wnid)


@cache
def _wnid_indices() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(_info().label_names())}
