"""What bench measures: the exported file (given, or found in the current directory) and its PyTorch reference.

``ats-deploy export`` records in the ONNX metadata the checkpoint it exported
(a path or ``random:SEED``) with its sha256, the architecture and the ATS
stages; ``ats-deploy build`` copies that metadata into ``<engine>.json``. From
them bench rebuilds the reference the exported model must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ats_deploy.artifact import ENGINE_SUFFIXES, REEXPORT, Artifact, read, read_engine
from ats_deploy.ats import budget_int
from ats_deploy.checkpoints import load_model, sha256_file
from ats_deploy.errors import UserError
from ats_deploy.keep import format_keep
from ats_deploy.model import ATSVisionTransformer
from ats_deploy.profiles import Profile

# `ats-deploy build` writes <engine>.fp16.onnx for strongly typed fp16 builds: a build input, not an export.
BUILD_INTERMEDIATE = ".fp16.onnx"


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


def _exported_by_us(path: Path) -> bool:
    """Whether ``path`` is an ONNX file exported by ats-deploy; an unreadable one is not, when searching."""
    try:
        read(path)
    except UserError:  # Unreadable, or another producer's metadata
        return False
    return True


def find_model(directory: Path) -> Path:
    """The only ONNX file in ``directory`` exported by ats-deploy."""
    onnx_files = sorted(p for p in directory.glob("*.onnx") if not p.name.endswith(BUILD_INTERMEDIATE))
    ours = [p for p in onnx_files if _exported_by_us(p)]
    if len(ours) == 1:
        return ours[0]
    if not ours:
        others = f" (.onnx files without it: {', '.join(p.name for p in onnx_files)})" if onnx_files else ""
        raise UserError(
            f"no MODEL given, and {directory} has no ONNX file exported by ats-deploy: looked for *.onnx "
            f"files with the metadata `ats-deploy export` writes{others}.",
            hint=f"Export one first with {REEXPORT}, or pass MODEL.",
        )
    names = ", ".join(p.name for p in ours)
    raise UserError(
        f"no MODEL given, and {directory} has {len(ours)} ONNX files exported by ats-deploy: {names}.",
        hint="Say which one to bench: `ats-deploy bench MODEL --profile NAME`.",
    )


def open_model(path: Path) -> Exported:
    """Read an exported ONNX file or a TensorRT engine (with its ``<engine>.json``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MODEL {path} does not exist; export one with {REEXPORT}.")
    if path.suffix in ENGINE_SUFFIXES:
        return Exported(path, *read_engine(path))
    return Exported(path, read(path))


def engine_for(exported: Exported, profile: Profile) -> Path:
    """The engine ``ats-deploy build MODEL --profile NAME`` writes for an ONNX file; it must exist and be current.

    bench does not build engines itself: a build takes minutes and has options of its own.
    """
    from ats_deploy.exporters.tensorrt.plan import spec_from

    engine = spec_from(exported.path, profile, allow_failed=True).engine  # bench judges the file itself
    build = f"ats-deploy build {exported.path} --profile {profile.name}"
    if not engine.is_file():
        raise UserError(
            f"backend tensorrt runs a TensorRT engine, and {exported.path} has none for profile "
            f"'{profile.name}' (looked for {engine}).",
            hint=f"Build it first with `{build}`, then run bench again.",
        )
    if engine.stat().st_mtime < exported.path.stat().st_mtime:
        raise UserError(f"engine {engine} is older than {exported.path}.", hint=f"Rebuild it with `{build}`.")
    return engine


def check_engine(exported: Exported, profile: Profile) -> None:
    """An engine runs at the precision and within the batch range it was built for."""
    info = exported.engine_info or {}
    built = info.get("precision")
    if built is not None and built != profile.precision:
        raise UserError(
            f"engine {exported.path} was built for {built}, but profile '{profile.name}' says {profile.precision}.",
            hint=f"Build an engine for this profile with `ats-deploy build ONNX --profile {profile.name}`.",
        )
    low, _, high = info.get("batch", (profile.batch,) * 3)
    if not low <= profile.batch <= high:
        raise UserError(
            f"engine {exported.path} takes batches {low} to {high}; profile '{profile.name}' asks for "
            f"batch {profile.batch}.",
            hint=f"Build an engine for this profile with `ats-deploy build ONNX --profile {profile.name}`.",
        )


def check_static(exported: Exported, keep: list[float], keep_origin: str, profile: Profile) -> None:
    """A static export has batch and keep baked in: they must be the ones asked for."""
    if exported.dynamic:
        return
    n0 = exported.artifact.n0
    problems = []
    if exported.batch != profile.batch:
        problems.append(f"batch {exported.batch} (profile '{profile.name}' asks for batch {profile.batch})")
    prefix = exported.artifact.prefix_tokens
    if [budget_int(k, n0, prefix) for k in exported.keep] != [budget_int(k, n0, prefix) for k in keep]:
        problems.append(f"keep {format_keep(exported.keep)} ({keep_origin} asks for keep {format_keep(keep)})")
    if problems:
        raise UserError(
            f"{exported.path} is a static export with {' and '.join(problems)} baked in.",
            hint=f"Export again with `ats-deploy export CHECKPOINT --profile {profile.name}` (a static export takes "
            "batch and keep from the profile), pass the baked-in --keep, or export with --dynamic so that one "
            "file serves every batch and keep.",
        )


def reference(exported: Exported, checkpoint: str | None, trust: bool) -> ATSVisionTransformer:
    """The PyTorch ATS model ``exported`` came from (or ``checkpoint``); :func:`changed_source` says if it moved."""
    source = checkpoint or exported.artifact.source_checkpoint
    if not source:
        raise UserError(
            f"{exported.path} does not record the checkpoint it was exported from.",
            hint="Pass --checkpoint PATH with the weights it was exported from.",
        )
    random = source.startswith("random:")
    if not random and not Path(source).is_file():
        raise UserError(
            f"the checkpoint {exported.path} was exported from is gone: {source}.",
            hint="Pass --checkpoint PATH with the same weights (bench needs them for the PyTorch reference).",
        )
    return load_model(source, arch=exported.arch, stages=exported.stages, trust_code=trust)


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
