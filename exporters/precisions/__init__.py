"""The modules that make a file of each precision, resolved from its registry entry (:mod:`ats_deploy.precision`).

A precision's entry names its module here (``Precision.module``): a ``stage="build"`` precision's module
has ``convert(model) -> model`` (:mod:`.fp16`), run when an engine or a backend's file is built; a
``stage="export"`` one's module quantizes at export (:mod:`.int8`). What stays float32 in either is one
rule, :func:`.float32.sampling_path` (docs/ATS.md). The entry itself is core data, so profiles and
backends read it without importing the exporters.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ats_deploy.precision import Precision

if TYPE_CHECKING:
    import onnx


def module(precision: Precision) -> ModuleType:
    """The module that makes a file of ``precision``, imported on use: onnx and numpy are heavy."""
    if precision.module is None:
        raise ValueError(f"precision '{precision.name}' has no module: its file is the float32 export")
    return importlib.import_module(f"{__name__}.{precision.module}")


def convert(precision: Precision, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in ``precision`` made at build (``stage="build"``); ``model`` itself for any other stage."""
    if precision.stage != "build":
        return model
    return module(precision).convert(model)
