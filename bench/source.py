"""What bench measures: the exported file, found in the current directory when not given, and whether it fits the
profile (an engine built for it, a static export's baked-in batch and keep).

Opening the file and its checkpoint record is :mod:`ats_deploy.exported`'s.
"""

from __future__ import annotations

from pathlib import Path

from ats_deploy import precision
from ats_deploy.artifact import REEXPORT, read
from ats_deploy.ats import budget_int
from ats_deploy.errors import UserError
from ats_deploy.exported import Exported
from ats_deploy.keep import format_keep
from ats_deploy.profiles import Profile

# `ats-deploy build` writes <engine>.<precision>.onnx for strongly typed builds of a precision converted at build
# (fp16): a build input, not an export.
BUILD_INTERMEDIATES = tuple(f".{name}.onnx" for name in precision.names() if precision.get(name).stage == "build")


def _exported_by_us(path: Path) -> bool:
    """Whether ``path`` is an ONNX file exported by ats-deploy; an unreadable one is not, when searching."""
    try:
        read(path)
    except UserError:  # Unreadable, or another producer's metadata
        return False
    return True


def find_model(directory: Path) -> Path:
    """The only ONNX file in ``directory`` exported by ats-deploy."""
    onnx_files = sorted(p for p in directory.glob("*.onnx") if not p.name.endswith(BUILD_INTERMEDIATES))
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
