"""What an exported model says about itself: one schema for the metadata every command writes and reads.

``ats-deploy export`` builds an :class:`Artifact` from the model and its options and
writes :meth:`Artifact.to_metadata` into the ONNX ``metadata_props``; ``ats-deploy
build`` copies the same strings into ``<engine>.json``. bench, the runtime and
validation read them back through :func:`read`, so each key is parsed, and each
missing or bad key refused, in this one place (docs/ATS.md, section 5).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import filekinds
from .errors import UserError
from .filekinds import ENGINE_SUFFIXES

if TYPE_CHECKING:
    import onnx

# <engine>.json keeps the exported file's metadata under this key, beside the build settings.
SIDECAR_KEY = "onnx_metadata"
REEXPORT = "`ats-deploy export CHECKPOINT --dynamic`"
EXPORT_HINT = f"Export the model with {REEXPORT}, which records what running it needs."
# The interface (docs/ATS.md section 4): 2 since keep became one row per image, [batch, S].
INTERFACE_VERSION = 2
# What files exported before these keys existed implicitly were.
FIRST_INTERFACE_VERSION = 1
PRECISION = "fp32"
PREFIX_TOKENS = 1
SUBGRAPH = "subgraph"


def _text(text: str) -> str:
    if not isinstance(text, str):  # a hand-edited <engine>.json can hold any JSON value
        raise TypeError(text)
    return text


def _bool(text: str) -> bool:
    value = json.loads(text)
    if not isinstance(value, bool):
        raise ValueError(text)
    return value


def _numbers(kind: type) -> Callable[[str], tuple]:
    """A parser of a JSON list of ints (``kind`` int) or of numbers read as floats (``kind`` float).

    The list may be empty: a dense model (``--stages none``) has no stages, keep or budget.
    """
    accepted = (int,) if kind is int else (int, float)

    def parse(text: str) -> tuple:
        values = json.loads(text)
        if not isinstance(values, list):
            raise ValueError(text)
        if any(isinstance(v, bool) or not isinstance(v, accepted) for v in values):
            raise ValueError(text)
        return tuple(kind(v) for v in values)

    return parse


# key (= field) -> (parser, what a good value is): the keys every export has written since the first version.
REQUIRED: dict[str, tuple[Callable[[str], Any], str]] = {
    "arch": (_text, "a timm architecture name"),
    "stages": (_numbers(int), "a JSON list of block indices"),
    "n0": (int, "a whole number of tokens"),
    "num_classes": (int, "a whole number of classes"),
    "input_size": (_numbers(int), "a JSON list [channels, height, width]"),
    "mean": (_numbers(float), "a JSON list of numbers"),
    "std": (_numbers(float), "a JSON list of numbers"),
    "interpolation": (_text, "a resize filter name"),
    "crop_pct": (float, "a number"),
    "keep": (_numbers(float), "a JSON list of numbers, one per stage"),
    "dynamic": (_bool, "true or false"),
    "exporter": (_text, "an exporter name"),
    "source_checkpoint": (_text, "a path"),
    "source_sha256": (_text, "a hash"),
    "ats_deploy_version": (_text, "a version"),
}
# Written only by static exports, where they are required.
STATIC: dict[str, tuple[Callable[[str], Any], str]] = {
    "batch": (int, "a whole number"),
    "budget": (_numbers(int), "a JSON list of budgets, one per stage"),
}
# Keys added later (or written only sometimes): a file without them gets the field's default.
OPTIONAL: dict[str, tuple[Callable[[str], Any], str]] = {
    "interface_version": (int, "a whole number"),
    "precision": (_text, "a precision name"),
    "prefix_tokens": (int, "a whole number of tokens"),
    "ats_op": (_text, "subgraph or custom"),
    "head": (_bool, "true or false"),
    "validation_failed": (_text, "why the file failed validation"),
}
# The flag of `triton`, `serve` and `build` that deploys a file marked as failed (:func:`refuse_failed`).
ALLOW_FAILED = "--allow-failed-validation"


@dataclass(frozen=True)
class Artifact:
    """An exported ATS model's description: architecture, ATS stages, pre-processing, interface and provenance."""

    arch: str
    stages: tuple[int, ...]  # the ATS blocks, in the order of `keep` and `tokens`
    n0: int  # tokens at the input, class token included
    num_classes: int
    input_size: tuple[int, ...]  # (channels, height, width) of `images`
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    keep: tuple[float, ...]  # the default keep (dynamic) or the keep baked in (static)
    dynamic: bool
    exporter: str
    source_checkpoint: str  # a path or `random:SEED`; "" when not recorded
    source_sha256: str
    ats_deploy_version: str
    batch: int | None = None  # static exports only
    budget: tuple[int, ...] | None = None  # static exports only: K of every stage
    ats_op: str = SUBGRAPH
    precision: str = PRECISION
    prefix_tokens: int = PREFIX_TOKENS
    interface_version: int = INTERFACE_VERSION
    head: bool = True  # False: a feature extractor, whose `logits` are the pooled feature (num_classes its width)
    # Why validation against the PyTorch reference failed ("" when it never did): such a file is kept for
    # inspection, and the commands that deploy it refuse it unless told otherwise (:func:`refuse_failed`).
    validation_failed: str = ""

    def to_metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` (all strings, lists as JSON) that :meth:`from_metadata` reads back."""
        props = {
            "ats_deploy_version": self.ats_deploy_version,
            "arch": self.arch,
            "stages": json.dumps(list(self.stages)),
            "input_size": json.dumps(list(self.input_size)),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "interpolation": self.interpolation,
            "crop_pct": str(self.crop_pct),
            "num_classes": str(self.num_classes),
            "n0": str(self.n0),
            "dynamic": json.dumps(self.dynamic),
            "exporter": self.exporter,
            "keep": json.dumps(list(self.keep)),
            "source_checkpoint": self.source_checkpoint,
            "source_sha256": self.source_sha256,
            "interface_version": str(self.interface_version),
            "precision": self.precision,
            "prefix_tokens": str(self.prefix_tokens),
            "head": json.dumps(self.head),
        }
        if not self.dynamic:
            props["batch"] = str(self.batch)
            props["budget"] = json.dumps(list(self.budget or ()))
        if self.ats_op != SUBGRAPH:
            props["ats_op"] = self.ats_op
        if self.validation_failed:
            props["validation_failed"] = self.validation_failed
        return props

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str, hint: str = EXPORT_HINT) -> Artifact:
        """Parse ``meta`` (the metadata of ``where``), or one :class:`UserError` naming the missing or bad key.

        Keys added after the first version (:data:`OPTIONAL`) take their defaults when absent.
        """
        expected = {**REQUIRED, **STATIC} if meta.get("dynamic") == "false" else REQUIRED
        missing = [key for key in expected if key not in meta]
        if missing:
            raise UserError(f"{where} was not exported by ats-deploy: its metadata lacks {', '.join(missing)}.", hint)
        specs = {**expected, **{key: spec for key, spec in OPTIONAL.items() if key in meta}}
        values = {key: _parse(meta, key, *spec, where, hint) for key, spec in specs.items()}
        artifact = cls(**{"interface_version": FIRST_INTERFACE_VERSION, **values})
        artifact._check(where, hint)
        return artifact

    def _check(self, where: str, hint: str) -> None:
        """Values that parse but do not fit together (a keep per stage, three input dimensions), or an old interface."""
        if self.interface_version != INTERFACE_VERSION:
            raise OutdatedInterface(
                f"{where} has interface version {self.interface_version}; this ats-deploy runs version "
                f"{INTERFACE_VERSION} (keep is one row per image, [batch, S]; docs/ATS.md section 4).",
                f"Re-export it from its checkpoint with this version: {REEXPORT}"
                + (" (then rebuild the engine with `ats-deploy build`)." if "engine" in where else "."),
            )
        per_stage = {"keep": self.keep, **({"budget": self.budget} if self.budget is not None else {})}
        for key, values in per_stage.items():
            if len(values) != len(self.stages):
                raise _bad(where, key, json.dumps(list(values)), f"one value per stage ({len(self.stages)})", hint)
        if len(self.input_size) != 3:
            raise _bad(where, "input_size", json.dumps(list(self.input_size)), "[channels, height, width]", hint)

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config as recorded at export: what :func:`ats_deploy.images.preprocess` needs."""
        return {
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


def _parse(meta: dict[str, str], key: str, parse: Callable[[str], Any], what: str, where: str, hint: str) -> Any:
    try:
        return parse(meta[key])
    except (ValueError, TypeError):
        raise _bad(where, key, meta[key], what, hint) from None


def _bad(where: str, key: str, value: str, what: str, hint: str) -> UserError:
    return UserError(f"{where} has a bad '{key}' in its metadata: {value!r} is not {what}.", hint)


class OutdatedInterface(UserError):
    """An export of another interface version (docs/ATS.md section 4): its inputs are not what this version feeds."""


class Unreadable(UserError):
    """A file that does not parse as an ONNX model: corrupt, truncated, or not ONNX at all."""


def load(path: Path) -> onnx.ModelProto:
    """The ONNX model in ``path`` (weights left on disk), or :class:`Unreadable`.

    A file that does not parse is called corrupt, not "not exported by ats-deploy": that
    would send the user looking for the wrong problem.
    """
    import onnx

    def unreadable(why: str) -> Unreadable:
        return Unreadable(f"{path} is corrupt or not an ONNX file: {why}.", hint=f"Re-export it with {REEXPORT}.")

    filekinds.expect_exported(Path(path))  # a sound file of the other kind is not "corrupt": say what it is
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise unreadable(f"it does not parse as an ONNX model ({exc})") from None
    if not model.ir_version or not model.HasField("graph"):  # some garbage parses as an empty message
        raise unreadable("it parses to no IR version or graph")
    return model


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """An ONNX model's ``metadata_props`` as a dict, as they are (any producer's)."""
    return {p.key: p.value for p in model.metadata_props}


def of_onnx(model: onnx.ModelProto, where: str) -> Artifact:
    """The artifact of an ONNX model already loaded (``where`` names it in errors)."""
    return Artifact.from_metadata(read_metadata(model), where)


def read(path: str | Path) -> Artifact:
    """The artifact of an exported ``.onnx`` file, or of a TensorRT engine (from its ``<engine>.json``)."""
    path = Path(path)
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return read_engine(path)[0]
    return of_onnx(load(path), str(path))


def engine_info_path(engine: Path) -> Path:
    """The JSON written beside an engine: ONNX metadata, TensorRT version, GPU, build settings."""
    return engine.with_name(f"{engine.name}.json")


def read_engine(engine: Path) -> tuple[Artifact, dict[str, Any]]:
    """An engine's artifact and the whole ``<engine>.json`` ``ats-deploy build`` wrote beside it (build settings)."""
    sidecar = engine_info_path(engine)
    rebuild = "Rebuild the engine with `ats-deploy build MODEL.onnx --profile NAME`."
    if not sidecar.is_file():
        raise UserError(
            f"{sidecar} is missing: ats-deploy reads an engine's model description from the file "
            "`ats-deploy build` writes beside it.",
            rebuild,
        )
    try:
        info = json.loads(sidecar.read_text())
        meta = info[SIDECAR_KEY]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read {sidecar} ({exc!r}): it is not the file `ats-deploy build` writes.", rebuild) \
            from None
    if not isinstance(meta, dict):
        raise UserError(f"cannot read {sidecar}: its '{SIDECAR_KEY}' is not a mapping.", rebuild)
    hint = f"Build engines from a file {REEXPORT} wrote: `ats-deploy build MODEL.onnx --profile NAME`."
    return Artifact.from_metadata(meta, f"engine {engine}", hint), info


def maybe_of_onnx(model: onnx.ModelProto) -> Artifact | None:
    """The artifact of an ats-deploy export; ``None`` for any other ONNX file with the interface.

    ``ats-deploy build`` and ``check`` take such files too, with timm's defaults where the metadata is silent.
    """
    try:
        return of_onnx(model, "the ONNX file")
    except OutdatedInterface:
        raise  # an ats-deploy export after all: running it as a foreign file would feed it the wrong keep
    except UserError:
        return None


def sidecar_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """What ``<engine>.json`` records of the ONNX file an engine is built from, under :data:`SIDECAR_KEY`.

    An ats-deploy export's artifact, with the keys that files from older versions lack
    filled in; any other ONNX file keeps its own metadata as is.
    """
    artifact = maybe_of_onnx(model)
    return artifact.to_metadata() if artifact is not None else read_metadata(model)


def refuse_failed(artifact: Artifact | None, where: str | Path, allow: bool) -> None:
    """Refuse to deploy a file (or an engine built from one) that failed validation, unless ``allow``."""
    if artifact is None or not artifact.validation_failed or allow:
        return
    raise UserError(
        f"{where} failed validation against the PyTorch reference ({artifact.validation_failed}); it was kept "
        "for inspection, not for deployment.",
        hint=f"Re-export it and validate it with `ats-deploy validate`, or pass {ALLOW_FAILED} to deploy it anyway.",
    )


def mark_failed(path: Path, why: str) -> None:
    """Record in the ONNX file at ``path`` that it failed validation (``why``), rewriting it atomically.

    The weights stay where they are: a file with external data keeps its references beside it.
    """
    import onnx

    from .atomic import atomic_output

    model = load(path)
    props = {**read_metadata(model), "validation_failed": why}
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    with atomic_output(path) as temporary:
        onnx.save(model, str(temporary))
