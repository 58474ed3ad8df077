"""An exported model file (ONNX, or a TensorRT engine with its ``<engine>.json``) and the checkpoint it came from.

``ats-deploy export`` records in the ONNX metadata the checkpoint it exported (a path or ``random:SEED``) with its
sha256, the architecture and the ATS stages; ``ats-deploy build`` copies that metadata into ``<engine>.json``.
Bench, tune and ``validate`` open the file here and rebuild its reference from that record
(:func:`ats_deploy.checkpoints.load_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ats_deploy.artifact import ENGINE_SUFFIXES, REEXPORT, Artifact, read, read_engine
from ats_deploy.checkpoints import sha256_file
from ats_deploy.errors import UserError


@dataclass
class Exported:
    """An exported model file and the :class:`Artifact` that describes it (with an engine's build record)."""

    path: Path
    artifact: Artifact
    engine_info: dict[str, Any] | None = None

    @property
    def is_engine(self) -> bool:
        return self.engine_info is not None

    @property
    def arch(self) -> str:
        return self.artifact.arch

    @property
    def stages(self) -> list[int]:
        return list(self.artifact.stages)

    @property
    def dynamic(self) -> bool:
        return self.artifact.dynamic

    @property
    def batch(self) -> int | None:
        return self.artifact.batch

    @property
    def keep(self) -> list[float]:
        return list(self.artifact.keep)

    @property
    def num_classes(self) -> int:
        return self.artifact.num_classes

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": "tensorrt engine" if self.is_engine else "onnx",
            "arch": self.arch,
            "stages": self.stages,
            "n0": self.artifact.n0,
            "prefix_tokens": self.artifact.prefix_tokens,
            "dynamic": self.dynamic,
            "exported_batch": self.batch,
            "source_checkpoint": self.artifact.source_checkpoint,
            "exporter": self.artifact.exporter,
            "ats_deploy_version": self.artifact.ats_deploy_version,
        }


def open_model(path: Path) -> Exported:
    """Read an exported ONNX file or a TensorRT engine (with its ``<engine>.json``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MODEL {path} does not exist; export one with {REEXPORT}.")
    if path.suffix in ENGINE_SUFFIXES:
        return Exported(path, *read_engine(path))
    return Exported(path, read(path))


def changed_source(exported: Exported, checkpoint: str | None) -> str | None:
    """A warning when the reference's checkpoint is not the file ``exported`` was exported from (by sha256)."""
    source = checkpoint or exported.artifact.source_checkpoint
    expected = exported.artifact.source_sha256
    if not expected or source.startswith("random:") or not Path(source).is_file():
        return None
    actual = sha256_file(source)
    if actual == expected:
        return None
    return (
        f"{source} is not the file {exported.path} was exported from (sha256 {actual[:12]}..., "
        f"recorded {expected[:12]}...): the reference may differ from the exported model."
    )
