"""Reading, identifying and writing ViT/DeiT checkpoints for the ATS reference.

Accepted files (all read with ``torch.load(..., weights_only=True)`` unless the
user trusts the file):

* DeiT release files ``{'model': state_dict}``;
* plain timm state_dicts and ``.safetensors`` files;
* timm training checkpoints ``{'state_dict': ..., 'arch': ...}``;
* the ATS authors' training checkpoints ``{'model_state': state_dict, ...}``,
  whose ``out_zero_mask`` buffers are not part of the network;
* PyTorch Lightning checkpoints ``{'state_dict': {'model.…': ...}, 'pytorch-lightning_version': ...}``;
* this project's own self-describing checkpoint (:func:`save_checkpoint`).

A ``module.`` prefix (DistributedDataParallel) is stripped everywhere, and so is
the one prefix a training wrapper puts before a whole ViT (PyTorch Lightning's
``model.``), with a note. When a file does not name its architecture,
:func:`infer_arch` finds the timm architecture whose every tensor has the
checkpoint's shape; where several build the same network with different
pre-processing (``deit_*`` and ``vit_*``), only the file's format can settle it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import resolve_model_data_config
from torch import nn

from ._version import __version__
from .atomic import atomic_output
from .errors import UserError
from .filekinds import expect_checkpoint
from .model import ATSVisionTransformer, build, parse_stages

if TYPE_CHECKING:
    from .artifact import Artifact

FORMAT_NAME = "ats-deploy"
FORMAT_VERSION = 1
TRUST_FLAG = "--trust-checkpoint"
ARCH_FLAG = "--arch"
_LISTED = 5  # how many keys an error message lists before counting the rest
_LIGHTNING_KEY = "pytorch-lightning_version"  # in every PyTorch Lightning checkpoint
# Formats whose wrapper settles which of same-shaped deit_* / vit_* names the weights are: (name prefix, evidence).
_FORMAT_FAMILY = {
    "deit-release": ("deit_", "the file is in the DeiT repository's release format ({'model': ...})"),
    "ats-authors": ("deit_", "the file is an ATS authors' training checkpoint ({'model_state': ...}), and their ViTs "
                    "are DeiTs"),
}


@dataclass
class Checkpoint:
    """The weights of a file, with whatever the file says about its model."""

    state_dict: dict[str, torch.Tensor]
    arch: str | None
    stages: list[int] | None
    keep: list[float] | None
    format: str
    path: Path
    notes: list[str] = field(default_factory=list)  # what reading it decided that the user should hear


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike[str], trust_code: bool = False) -> Checkpoint:
    """Read a checkpoint file in any accepted format; every problem is a :class:`UserError`."""
    path = _existing_file(Path(path))
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); re-download or re-save it.")
    expect_checkpoint(path)
    if _is_safetensors(path):
        ckpt = Checkpoint(_load_safetensors(path), None, None, None, "safetensors", path)
    else:
        ckpt = _interpret(_torch_load(path, trust_code), path)
    return _unwrapped(ckpt)


def _unwrapped(ckpt: Checkpoint) -> Checkpoint:
    """The ViT's own keys when a training wrapper holds it under one prefix (Lightning: ``model.patch_embed...``).

    Tensors outside that prefix (a loss's buffers, an EMA copy under another name) are not the ViT's: left out, and
    said so in the note.
    """
    state_dict = ckpt.state_dict
    if "patch_embed.proj.weight" in state_dict:
        return ckpt
    prefixes = [k.removesuffix("patch_embed.proj.weight") for k in state_dict if k.endswith(".patch_embed.proj.weight")]
    if len(prefixes) != 1:
        return ckpt  # no ViT, or several (a model and its EMA copy): the fit check lists the keys
    prefix = prefixes[0]
    inner = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    others = [k for k in state_dict if not k.startswith(prefix)]
    left_out = f"; left out {len(others)} tensors outside it ({_listing('keys', others)})" if others else ""
    note = f"the checkpoint holds the ViT under the key prefix '{prefix}' (a training wrapper's): loaded without it"
    ckpt.state_dict, ckpt.notes = inner, [*ckpt.notes, note + left_out]
    return ckpt


def _existing_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".safetensors"))
        found = f" (it holds {', '.join(inside[:_LISTED])})" if inside else ""
        raise UserError(f"{path} is a directory{found}; pass the checkpoint file itself.")
    return path


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: a little-endian header length, then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return _normalise(load_file(path, device="cpu"))
    except SafetensorError as e:
        raise _corrupt(path, e) from None


def _torch_load(path: Path, trust_code: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_code)
    except pickle.UnpicklingError as e:
        needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if needed and not trust_code:
            raise UserError(
                f"{path} stores Python objects ({needed.group(1)}) besides tensors, and a safe load refuses "
                f"them because unpickling them can run arbitrary code. If the file comes from a source you "
                f"trust, rerun with {TRUST_FLAG} (only use it for files from a trusted source), or re-save "
                "just the state_dict."
            ) from None
        raise _corrupt(path, e) from None
    except (ImportError, AttributeError) as e:  # a trusted pickle whose classes are not importable here
        raise UserError(
            f"{path} needs Python code that is not importable here ({e}); load it where it was written "
            "and save only its state_dict."
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}; check its permissions.") from None
    except Exception as e:  # torch.load of a damaged file raises many types (EOF, zip, key errors)
        raise _corrupt(path, e) from None


def _corrupt(path: Path, error: Exception) -> UserError:
    # torch's safe unpickler puts the actual problem after its generic preamble.
    text = str(error).split("WeightsUnpickler error:")[-1].strip()
    detail = text.splitlines()[0].split(". ")[0][:200] if text else "no detail"
    return UserError(
        f"cannot read {path}: it is truncated, corrupt or not a PyTorch/safetensors checkpoint "
        f"({type(error).__name__}: {detail}); re-download or re-save it."
    )


def _interpret(obj: Any, path: Path) -> Checkpoint:
    """Find the state_dict (and any model description) in what ``torch.load`` returned."""
    if isinstance(obj, Mapping):
        if obj.get("format") == FORMAT_NAME:
            return _own_format(obj, path)
        for key, fmt in (("model_state", "ats-authors"), ("model", "deit-release"), ("state_dict", "timm-train")):
            state_dict = _as_state_dict(obj.get(key))
            if state_dict is not None:
                arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
                fmt = "lightning" if _LIGHTNING_KEY in obj else fmt
                return Checkpoint(state_dict, arch, None, None, fmt, path)
    state_dict = _as_state_dict(obj)
    if state_dict is not None and isinstance(obj, nn.Module):
        return Checkpoint(state_dict, _module_arch(obj), None, None, "pickled-module", path)
    if state_dict is not None:
        return Checkpoint(state_dict, None, None, None, "timm-state-dict", path)
    seen = (
        f"top-level keys {', '.join(map(repr, list(obj)[:10]))}"
        if isinstance(obj, Mapping) and obj
        else f"a {type(obj).__name__}"
    )
    raise UserError(
        f"{path} holds no recognisable state_dict: it has {seen}. Expected a state_dict of tensors, or a "
        "dict with one under 'model', 'model_state' or 'state_dict'; re-save the model's state_dict()."
    )


def _module_arch(module: nn.Module) -> str | None:
    """The name a pickled timm model was created as (its ``pretrained_cfg`` records it), if it is one."""
    config = getattr(module, "pretrained_cfg", None)
    name = config.get("architecture") if isinstance(config, Mapping) else None
    return name if isinstance(name, str) and timm.is_model(name) else None


def _as_state_dict(value: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if not isinstance(value, Mapping) or not value:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return None
    return _normalise(value)


def _normalise(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's ``module.`` prefix; drop the ATS authors' ``out_zero_mask`` buffers."""
    return {k.removeprefix("module."): v for k, v in state_dict.items() if "out_zero_mask" not in k}


def _own_format(obj: Mapping[str, Any], path: Path) -> Checkpoint:
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path} is an ats-deploy checkpoint of format version {version!r}; this ats-deploy "
            f"({__version__}) reads version {FORMAT_VERSION}. Upgrade ats-deploy."
        )
    state_dict = _as_state_dict(obj.get("model"))
    if state_dict is None:
        raise UserError(f"{path} is an ats-deploy checkpoint without weights under 'model'; re-save it.")
    stages, keep = obj.get("stages"), obj.get("keep")
    return Checkpoint(
        state_dict,
        obj.get("arch"),
        [int(s) for s in stages] if stages is not None else None,
        [float(k) for k in keep] if keep is not None else None,
        FORMAT_NAME,
        path,
    )


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Inferred:
    """The architecture settled from a checkpoint's tensors, and what the user should hear about how (or None)."""

    arch: str
    note: str | None = None


def infer_arch(state_dict: Mapping[str, torch.Tensor], checkpoint_format: str | None = None) -> Inferred:
    """The timm architecture whose every tensor (key set and shapes) matches ``state_dict``.

    Candidates are timm's ViT and DeiT models with the checkpoint's patch size,
    distilled DeiTs when it has a distillation token (register tokens show in
    the shapes), built on the meta device: first those named for its resolution,
    then (for a model fine-tuned at another size) the others. Matches that differ
    where shapes cannot tell (number of heads, activation) are ambiguous and need
    ``--arch``. Matches that build the same network but pre-process differently
    (``deit_small_patch16_224``: ImageNet mean/std; ``vit_small_patch16_224``: 0.5)
    are settled only by the file's format (:data:`_FORMAT_FAMILY`), said in the
    note; otherwise they are ambiguous too: the export records the pre-processing, and
    a wrong one costs accuracy that validation cannot see.
    """
    patch = _patch_size(state_dict)
    img_size = _image_size(state_dict, patch)
    num_classes = _head_classes(state_dict)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    matches: dict[str, tuple[tuple, tuple]] = {}
    for names in _candidates(patch, img_size or 224, distilled="dist_token" in state_dict):
        for name in names:
            profile = _meta_profile(name, num_classes, img_size)
            if profile is not None and profile[0] == shapes:
                matches[name] = profile[1:]
        if matches:
            break
    if not matches:
        raise UserError(
            f"no timm ViT/DeiT architecture has exactly this checkpoint's tensors ({_describe(state_dict)}); "
            f"pass {ARCH_FLAG} with the timm model name it was trained as."
        )
    if len({structure for structure, _ in matches.values()}) > 1:
        raise UserError(
            f"the checkpoint's tensor shapes fit several timm architectures that differ in what shapes "
            f"cannot show (number of heads, activation, ...): {', '.join(sorted(matches))}; "
            f"pass {ARCH_FLAG} with the one it was trained as."
        )
    return _settle({name: preprocessing for name, (_, preprocessing) in matches.items()}, checkpoint_format)


def _settle(preprocessing: dict[str, tuple], checkpoint_format: str | None) -> Inferred:
    """One name among matches that build the same network (``name -> pre-processing``); never a silent guess."""
    shortest = partial(min, key=lambda n: (len(n), n))
    if len(set(preprocessing.values())) == 1:
        return Inferred(shortest(preprocessing))  # any of them: the same network, fed the same pixels
    prefix, evidence = _FORMAT_FAMILY.get(checkpoint_format or "", (None, None))
    named = [n for n in preprocessing if prefix and n.startswith(prefix)]
    if named and len({preprocessing[n] for n in named}) == 1:
        arch = shortest(named)
        others = sorted(n for n in preprocessing if preprocessing[n] != preprocessing[arch])
        return Inferred(
            arch,
            f"architecture {arch} ({_preprocessing_text(preprocessing[arch])}) because {evidence}; "
            f"{', '.join(others)} {'has' if len(others) == 1 else 'have'} the same tensors with other pre-processing: "
            f"pass {ARCH_FLAG} {others[0] if len(others) == 1 else 'NAME'} if the weights were trained as that.",
        )
    groups: dict[tuple, list[str]] = {}
    for name in sorted(preprocessing):
        groups.setdefault(preprocessing[name], []).append(name)
    listed = "; ".join(f"{', '.join(names)}: {_preprocessing_text(p)}" for p, names in groups.items())
    raise UserError(
        f"the checkpoint's tensors fit timm architectures that build the same network but pre-process images "
        f"differently, and the file does not say which it is: {listed}. The export records the pre-processing and "
        "every prediction uses it, so a wrong guess would cost accuracy silently.",
        hint=f"Pass {ARCH_FLAG} with the architecture the weights were trained as (the name given to "
        f"timm.create_model); `ats-deploy convert ... {ARCH_FLAG} NAME -o FILE` records it in the checkpoint.",
    )


def _preprocessing_text(preprocessing: tuple) -> str:
    mean, std, crop_pct, interpolation = preprocessing
    return f"mean {_joined(mean)}, std {_joined(std)}, crop {crop_pct:g}, {interpolation}"


def _joined(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _patch_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is None or weight.dim() != 4:
        some = ", ".join(list(state_dict)[:_LISTED])
        raise UserError(
            f"the checkpoint has no patch_embed.proj.weight (keys start {some}), so it is not a timm "
            f"ViT/DeiT state_dict; convert it to timm's key names or pass {ARCH_FLAG}."
        )
    return int(weight.shape[-1])


def _image_size(state_dict: Mapping[str, torch.Tensor], patch: int) -> int | None:
    """The square input size implied by ``pos_embed``; None when it cannot tell.

    ``pos_embed`` covers the patch grid, plus the class/distillation/register tokens unless
    the model adds those without position embedding (``no_embed_class``).
    """
    pos = state_dict.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return None
    tokens = pos.shape[1]
    prefix = int("cls_token" in state_dict) + int("dist_token" in state_dict)
    if "reg_token" in state_dict:
        prefix += state_dict["reg_token"].shape[1]
    for grid_tokens in (tokens - prefix, tokens):
        side = round(grid_tokens**0.5)
        if side > 0 and side * side == grid_tokens:
            return side * patch
    return None


def _head_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def _describe(state_dict: Mapping[str, torch.Tensor]) -> str:
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    dim = state_dict["patch_embed.proj.weight"].shape[0]
    return (
        f"patch {_patch_size(state_dict)}, embed dim {dim}, depth {depth}, "
        f"{_head_classes(state_dict)} classes, {len(state_dict)} tensors"
    )


@lru_cache(maxsize=1)
def _timm_vits() -> tuple[str, ...]:
    return tuple(sorted(set(timm.list_models(module="vision_transformer")) | set(timm.list_models("deit*"))))


def _candidates(patch: int, img_size: int, distilled: bool) -> tuple[list[str], list[str]]:
    """Names with this patch size: those for this resolution (no suffix means 224), and the rest.

    Only distilled DeiTs have a distillation token, so the others are not built for such a checkpoint (and vice versa).
    """
    names = [n for n in _timm_vits() if ("distilled" in n) == distilled]
    with_patch = [n for n in names if re.search(rf"patch{patch}(?!\d)", n)]
    at_size = [n for n in with_patch if _resolution(n) == img_size]
    return at_size, [n for n in with_patch if n not in at_size]


def _resolution(name: str) -> int:
    suffix = re.search(r"_(\d+)$", name)
    return int(suffix.group(1)) if suffix else 224


@lru_cache(maxsize=512)
def _meta_profile(name: str, num_classes: int, img_size: int | None) -> tuple[dict[str, tuple], tuple, tuple] | None:
    """Tensor shapes, hyperparameters and pre-processing of a timm model built on the meta device (no memory)."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "weight_init": "skip"}
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # a candidate that cannot take these arguments is simply not a match
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = resolve_model_data_config(model)
    preprocessing = (tuple(config["mean"]), tuple(config["std"]), config["crop_pct"], config["interpolation"])
    return shapes, _structure(model), preprocessing


def _structure(model: nn.Module) -> tuple:
    """Module types and their plain attributes (heads, eps, pooling, ...), which shapes do not show."""
    plain = (bool, int, float, str, tuple, type(None))
    return tuple(
        (
            name,
            type(module).__name__,
            tuple(sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, plain))),
        )
        for name, module in model.named_modules()
    )


# --------------------------------------------------------------------------- model


def load_model(
    source: str | os.PathLike[str],
    arch: str | None = None,
    stages: str | Sequence[int] | None = None,
    keep: Sequence[float] | None = None,
    trust_code: bool = False,
) -> ATSVisionTransformer:
    """An ATS model, in eval mode, from a checkpoint file or ``random:SEED`` (then ``arch`` is required).

    ``stages``/``keep`` default to the checkpoint's own when it records them,
    else to the paper's stages and keep 1.0. The model records the file it was read
    from (``source``, None for random weights) and its ``checkpoint_format``.
    """
    if isinstance(source, str) and source.startswith("random:"):
        vit, ckpt = _random_vit(source, arch), None
    else:
        ckpt = read_checkpoint(source, trust_code=trust_code)
        how = f"given with {ARCH_FLAG}" if arch else "recorded in the checkpoint" if ckpt.arch else "inferred"
        if not (arch or ckpt.arch):
            inferred = infer_arch(ckpt.state_dict, ckpt.format)
            arch = inferred.arch
            ckpt.notes.extend(filter(None, [inferred.note]))
        arch = arch or ckpt.arch
        vit = _timm_model(arch, ckpt.state_dict)
        _check_fit(vit, ckpt.state_dict, arch, how)
        vit.load_state_dict(ckpt.state_dict, strict=True)
    stage_list = parse_stages(stages, len(vit.blocks))
    if ckpt is not None and stage_list is None:
        stage_list = ckpt.stages
    if ckpt is not None and keep is None and ckpt.stages is not None and stage_list == ckpt.stages:
        keep = ckpt.keep
    path, fmt, notes = (ckpt.path, ckpt.format, ckpt.notes) if ckpt is not None else (None, "random", [])
    return build(vit, arch, stage_list, keep, source=path, checkpoint_format=fmt, load_notes=notes).eval()


def load_reference(artifact: Artifact, checkpoint: str | None, trust: bool, exported: str) -> ATSVisionTransformer:
    """The PyTorch ATS model an export came from: ``checkpoint``, else the one its metadata records, built with the
    export's architecture and stages. ``exported`` names the export in errors (its path, the served model).

    Bench, ``validate`` and ``loadtest --verify`` all compare with this one model, so they judge alike.
    """
    source = checkpoint or artifact.source_checkpoint
    if not source:
        raise UserError(
            f"{exported} does not record the checkpoint it was exported from.",
            hint="Pass --checkpoint PATH with the weights it was exported from (or random:SEED for random weights).",
        )
    if not source.startswith("random:") and not Path(source).is_file():
        raise UserError(
            f"the checkpoint {exported} was exported from is gone: {source}.",
            hint="Pass --checkpoint PATH with the same weights (the PyTorch reference needs them).",
        )
    return load_model(source, arch=artifact.arch, stages=list(artifact.stages), trust_code=trust)


def _random_vit(source: str, arch: str | None) -> nn.Module:
    seed_text = source.removeprefix("random:")
    if not seed_text.isdigit():
        raise UserError(f"'{source}' needs an integer seed, e.g. random:0.")
    if arch is None:
        raise UserError(f"random weights ('{source}') need {ARCH_FLAG}, e.g. {ARCH_FLAG} deit_tiny_patch16_224.")
    _check_name(arch)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(int(seed_text))
        return _create(arch)


def _timm_model(arch: str, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """timm's ``arch`` with the checkpoint's class count and input size.

    Its random initialisation is skipped: the strict load overwrites every tensor.
    """
    _check_name(arch)
    kwargs: dict[str, Any] = {"num_classes": _head_classes(state_dict), "weight_init": "skip"}
    weight = state_dict.get("patch_embed.proj.weight")
    size = _image_size(state_dict, int(weight.shape[-1])) if weight is not None and weight.dim() == 4 else None
    if size is not None:
        kwargs["img_size"] = size
    return _create(arch, **kwargs)


def _check_name(arch: str) -> None:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        suggestion = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')."
        raise UserError(f"unknown timm architecture '{arch}'{suggestion}")


def _create(arch: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(
            f"cannot build {arch} as a ViT ({e}); ATS needs a timm VisionTransformer such as deit_small_patch16_224."
        ) from None


def _check_fit(vit: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, how: str) -> None:
    """Explain, before ``load_state_dict`` would, every key and shape that does not fit."""
    expected = vit.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(expected[k].shape)})"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k].shape
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
    problems = [_listing(label, items) for label, items in found.items() if items]
    if problems:
        fix = f"pass {ARCH_FLAG} with the architecture the checkpoint was trained as"
        if how.startswith("given"):
            fix += f", or leave {ARCH_FLAG} out to infer it from the tensor shapes"
        raise UserError(f"the checkpoint does not fit {arch} ({how}): {'; '.join(problems)}. To fix: {fix}.")


def _listing(label: str, items: list[str]) -> str:
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"{label} ({len(items)}): {', '.join(items[:_LISTED])}{more}"


# --------------------------------------------------------------------------- writing


def save_checkpoint(model: ATSVisionTransformer, path: str | os.PathLike[str]) -> Path:
    """Write the self-describing checkpoint atomically: a temp file in the same folder, then rename."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name such as {path / 'model.pth'}.")
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "stages": list(model.stages),
        "keep": list(model.default_keep),
        "img_size": list(model.vit.patch_embed.img_size),
        "num_classes": model.num_classes,
        "ats_deploy_version": __version__,
        "model": model.vit.state_dict(),
    }
    # Through a Python file: torch's own writer reports a full disk as an opaque RuntimeError, a file as OSError.
    with atomic_output(path) as temporary, temporary.open("wb") as file:
        torch.save(payload, file)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks so big checkpoints need little memory."""
    digest = hashlib.sha256()
    with _existing_file(Path(path)).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
