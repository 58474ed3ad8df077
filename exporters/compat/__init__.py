"""Static compatibility report of an ONNX model for a deployment target, without a GPU.

``check_model(model, target)`` walks every node (subgraphs of ``If``/``Loop``/``Scan``
included) after ``onnx.shape_inference`` and reports, per node, what the target's ONNX
parser or runtime would reject (errors) or accept with a caveat (warnings).

Where things are: :mod:`.tables` holds the facts the checks rest on (operator tables, types,
opsets, limits, with their sources), :mod:`.graph` what a check reads from the model,
:mod:`.report` the findings and how they print. A target is a line in :data:`_REGISTERED` and
a module here with ``check(model, facts, source)``: :mod:`.tensorrt8`, :mod:`.tensorrt10`,
:mod:`.dla`, :mod:`.onnxruntime` (the first three share the TensorRT parser checks of
:mod:`.tensorrt`). ``ats-deploy check --target`` offers these names.

Module-level imports stay light (no onnx or numpy): the command line reads the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ats_deploy.errors import UserError

if TYPE_CHECKING:
    import onnx

    from .graph import Facts
    from .report import CompatReport, DlaShare, Finding


@dataclass(frozen=True)
class Target:
    """One deployment target: its name and the module here that checks a model for it (loaded on use)."""

    name: str
    module: str

    def check(
        self, model: onnx.ModelProto, facts: Facts, source: Path | None
    ) -> tuple[list[Finding], DlaShare | None]:
        """The target's findings for ``model`` (``source``: its file, if any) and, for the DLA, where layers run."""
        return importlib.import_module(f"{__name__}.{self.module}").check(model, facts, source)


_REGISTERED: tuple[Target, ...] = (
    Target("tensorrt-8.6", "tensorrt8"),
    Target("tensorrt-10", "tensorrt10"),
    Target("dla", "dla"),
    Target("onnxruntime", "onnxruntime"),
)
_BY_NAME = {target.name: target for target in _REGISTERED}


def names() -> tuple[str, ...]:
    """Every target's name, in registry order."""
    return tuple(_BY_NAME)


def get(name: str) -> Target:
    """The target called ``name``; an unknown name fails listing the known ones."""
    if name not in _BY_NAME:
        raise UserError(f"unknown target '{name}'; valid targets: {', '.join(names())}")
    return _BY_NAME[name]


def check_model(model: onnx.ModelProto | str | Path, target: str) -> CompatReport:
    """Report which nodes of ``model`` ``target`` cannot run (errors) or runs with caveats (warnings)."""
    from .graph import load, read_facts
    from .report import CompatReport

    entry = get(target)
    proto, source = load(model)
    facts, findings = read_facts(proto)
    found, dla = entry.check(proto, facts, source)
    return CompatReport(target, findings + found, facts.op_counts(), dla)
