"""What bench measures: the exported file (given, or found in the current directory) and its PyTorch reference.

``ats-deploy export`` records in the ONNX metadata the checkpoint it exported
(a path or ``random:SEED``) with its sha256, the architecture and the ATS
stages; ``ats-deploy build`` copies that metadata into ``<engine>.json``. From
them bench rebuilds the reference the exported model must match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ats_deploy.ats import budget_int
from ats_deploy.checkpoints import load_model, sha256_file
from ats_deploy.errors import UserError
from ats_deploy.exporters.onnx_export import read_metadata
from ats_deploy.model import ATSVisionTransformer, format_keep
from ats_deploy.profiles import Profile

ENGINE_SUFFIXES = (".plan", ".engine")
REQUIRED_KEYS = ("arch", "stages")
# `ats-deploy build` writes <engine>.fp16.onnx for strongly typed fp16 builds: a build input, not an export.
BUILD_INTERMEDIATE = ".fp16.onnx"
REEXPORT = "`ats-deploy export CHECKPOINT --dynamic`"


@dataclass
class Exported:
    """An exported model file and the ONNX metadata that describes it."""

    path: Path
    meta: dict[str, str]
    engine_info: dict[str, Any] | None = None

    @property
    def is_engine(self) -> bool:
        return self.engine_info is not None

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def stages(self) -> list[int]:
        return [int(s) for s in json.loads(self.meta["stages"])]

    @property
    def dynamic(self) -> bool:
        return bool(json.loads(self.meta.get("dynamic", "true")))

    @property
    def batch(self) -> int | None:
        return None if self.dynamic else int(self.meta["batch"])

    @property
    def keep(self) -> list[float]:
        return [float(v) for v in json.loads(self.meta["keep"])]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": "tensorrt engine" if self.is_engine else "onnx",
            "arch": self.arch,
            "stages": self.stages,
            "n0": int(self.meta["n0"]),
            "dynamic": self.dynamic,
            "exported_batch": self.batch,
            "source_checkpoint": self.meta.get("source_checkpoint", ""),
            "exporter": self.meta.get("exporter"),
            "ats_deploy_version": self.meta.get("ats_deploy_version"),
        }


class Unreadable(UserError):
    """A file that does not parse as an ONNX model: corrupt, truncated, or not ONNX at all."""


def _ats_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of an ONNX file exported by ats-deploy; ``None`` for a readable ONNX file of anyone else.

    A file that does not parse raises :class:`Unreadable`: calling it "not exported by ats-deploy" would send
    the user looking for the wrong problem.
    """
    def unreadable(why: str) -> Unreadable:
        return Unreadable(f"{path} is corrupt or not an ONNX file: {why}.", hint=f"Re-export it with {REEXPORT}.")

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise unreadable(f"it does not parse as an ONNX model ({exc})") from None
    if not model.ir_version or not model.HasField("graph"):  # some garbage parses as an empty message
        raise unreadable("it parses to no IR version or graph")
    meta = read_metadata(model)
    return meta if all(key in meta for key in REQUIRED_KEYS) else None


def _exported_by_us(path: Path) -> bool:
    """Whether ``path`` is an ONNX file exported by ats-deploy; an unreadable file is not, when searching."""
    try:
        return _ats_metadata(path) is not None
    except Unreadable:
        return False


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
            f"files whose metadata records 'arch' and 'stages'{others}.",
            hint="Export one first with `ats-deploy export CHECKPOINT --dynamic`, or pass MODEL.",
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
        raise UserError(f"MODEL {path} does not exist; export one with `ats-deploy export CHECKPOINT --dynamic`.")
    if path.suffix in ENGINE_SUFFIXES:
        return _open_engine(path)
    meta = _ats_metadata(path)
    if meta is None:
        raise UserError(
            f"{path} is not an ONNX file exported by ats-deploy (its metadata lacks 'arch' and 'stages').",
            hint="bench needs the metadata to rebuild the PyTorch reference: export with `ats-deploy export`.",
        )
    return Exported(path, meta)


def _open_engine(path: Path) -> Exported:
    from ats_deploy.exporters.tensorrt import engine_info_path

    info_path = engine_info_path(path)
    try:
        info = json.loads(info_path.read_text())
        meta = info["onnx_metadata"]
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"engine {path} has no readable {info_path.name} beside it; bench reads the model's "
            "architecture and source checkpoint from it.",
            hint="Build engines with `ats-deploy build`, which writes that file.",
        ) from None
    if not all(key in meta for key in REQUIRED_KEYS):
        raise UserError(f"engine {path} was not built from an ONNX file exported by ats-deploy.")
    return Exported(path, meta, info)


def engine_for(exported: Exported, profile: Profile) -> Path:
    """The engine ``ats-deploy build MODEL --profile NAME`` writes for an ONNX file; it must exist and be current.

    bench does not build engines itself: a build takes minutes and has options of its own.
    """
    from ats_deploy.exporters.tensorrt import spec_from

    engine = spec_from(exported.path, profile).engine
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
    n0 = int(exported.meta["n0"])
    problems = []
    if exported.batch != profile.batch:
        problems.append(f"batch {exported.batch} (profile '{profile.name}' asks for batch {profile.batch})")
    if [budget_int(k, n0) for k in exported.keep] != [budget_int(k, n0) for k in keep]:
        problems.append(f"keep {format_keep(exported.keep)} ({keep_origin} asks for keep {format_keep(keep)})")
    if problems:
        raise UserError(
            f"{exported.path} is a static export with {' and '.join(problems)} baked in.",
            hint=f"Export again with `ats-deploy export CHECKPOINT --profile {profile.name}` (a static export takes "
            "batch and keep from the profile), pass the baked-in --keep, or export with --dynamic so that one "
            "file serves every batch and keep.",
        )


def reference(exported: Exported, checkpoint: str | None, trust: bool, warnings: list[str]) -> ATSVisionTransformer:
    """The PyTorch ATS model ``exported`` came from (or ``checkpoint``), warning when its file has changed."""
    source = checkpoint or exported.meta.get("source_checkpoint", "")
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
    model = load_model(source, arch=exported.arch, stages=exported.stages, trust_code=trust)
    expected = exported.meta.get("source_sha256", "")
    if expected and not random:
        actual = sha256_file(source)
        if actual != expected:
            warnings.append(
                f"{source} is not the file {exported.path} was exported from (sha256 {actual[:12]}..., "
                f"recorded {expected[:12]}...): the reference may differ from the exported model."
            )
    return model
