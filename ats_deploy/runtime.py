"""Run an exported ATS model in your own application: images in, classes and kept tokens out.

    from ats_deploy import runtime

    model = runtime.open("deit_s_ats.onnx")         # or a TensorRT engine from `ats-deploy build`
    result = model.predict(["cat.jpg"], keep=0.7)   # file paths, PIL images or uint8 HWC arrays
    print(result.labels[0][0], result.probabilities[0][0], result.tokens[0])

The pre-processing (resize, centre crop, mean/std) is the one the file's metadata
records, applied by the transform the PyTorch reference uses
(:func:`ats_deploy.images.preprocess`), so the exported model sees the reference's
pixels. ``keep`` is checked and shaped as the file's ``keep [batch, S]`` input wants
it: one value or one row serves every image, an ``[images, S]`` array gives each image its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import backends
from .artifact import ENGINE_SUFFIXES, EXPORT_HINT, Artifact, load, of_onnx, read_engine
from .backends import Runner, RunOptions
from .errors import UserError
from .keep import keep_rows

if TYPE_CHECKING:
    import torch

    from .flops import CostModel
    from .model import ATSVisionTransformer

MODEL_SUFFIXES = (".onnx", *ENGINE_SUFFIXES)

ImageLike = Image.Image | str | Path | np.ndarray
KeepLike = float | Sequence[float] | np.ndarray | None
# The registry's backends that ``open`` runs a file on: an engine on TensorRT, ONNX on onnxruntime's CPU provider.
ENGINE_BACKEND, ONNX_BACKEND = "tensorrt", "onnxruntime"


@dataclass(frozen=True)
class Prediction:
    """What the model says about each image: logits, kept tokens per ATS stage and the top classes.

    Row ``i`` of every field belongs to the ``i``-th image given; top classes come best first.
    """

    logits: np.ndarray  # float32 [images, classes]
    tokens: np.ndarray  # int64 [images, S]: K' at each ATS stage
    classes: np.ndarray  # int64 [images, top]
    probabilities: np.ndarray  # float32 [images, top]: softmax of the logits
    labels: list[list[str]]  # class names of `classes` (ImageNet names for 1000-class heads)


def is_exported_model(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (ONNX or TensorRT engine) rather than a checkpoint."""
    return Path(path).suffix.lower() in MODEL_SUFFIXES


def open(path: str | Path, threads: int | None = None) -> ExportedModel:
    """Open an ONNX file written by ``ats-deploy export`` (onnxruntime, CPU) or an engine from ``ats-deploy build``.

    ``threads`` caps onnxruntime's intra-op threads (default: onnxruntime's choice).
    An engine needs TensorRT and a CUDA GPU; without them this raises
    :class:`~ats_deploy.errors.BackendUnavailable`.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}. {EXPORT_HINT}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the .onnx file (or .plan/.engine) ats-deploy wrote.")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        artifact, _ = read_engine(path)
        return ExportedModel(path, artifact, _engine_runner(path), artifact.dynamic)
    return _open_onnx(path, threads)


def _open_onnx(path: Path, threads: int | None) -> ExportedModel:
    """Check the file is an ats-deploy export, then open it on the onnxruntime CPU backend."""
    graph = load(path)
    artifact = of_onnx(graph, str(path))
    inputs = {value.name: value for value in graph.graph.input}
    if "images" not in inputs:
        raise UserError(f"{path} has no 'images' input, so it was not exported by ats-deploy. {EXPORT_HINT}")
    try:
        runner = backends.get(ONNX_BACKEND).open(path, RunOptions(threads=threads))
    except UserError:  # ours already names the fix (a missing onnxruntime-extensions for a custom-op file)
        raise
    except Exception as exc:  # onnxruntime's own exception types: the graph cannot run here
        raise UserError(f"onnxruntime cannot load {path}: {exc}. Re-export it with `ats-deploy export`.") from None
    return ExportedModel(path, artifact, runner, "keep" in inputs)


def _engine_runner(path: Path) -> Runner:
    """An engine on the TensorRT backend, which runs it as it was built."""
    return backends.get(ENGINE_BACKEND).open(path, RunOptions())


class ExportedModel:
    """An exported ATS model and the metadata that says how to feed it. Make one with :func:`open`."""

    def __init__(self, path: Path, artifact: Artifact, runner: Runner, takes_keep: bool) -> None:
        self.path = path
        self.artifact = artifact
        self._runner = runner
        self._takes_keep = takes_keep  # False: a static export, keep baked in

    @property
    def arch(self) -> str:
        return self.artifact.arch

    @property
    def stages(self) -> list[int]:
        """The blocks that sample tokens, in the order of ``tokens``' columns."""
        return list(self.artifact.stages)

    @property
    def num_classes(self) -> int:
        return self.artifact.num_classes

    @property
    def default_keep(self) -> list[float]:
        """The keep the file was exported with (baked in, for a static export)."""
        return list(self.artifact.keep)

    @property
    def batch(self) -> int | None:
        """The fixed batch of a static export; ``None`` when the batch is dynamic."""
        return self.artifact.batch

    @property
    def data_config(self) -> dict:
        """timm's data config as recorded at export: input_size, mean, std, interpolation, crop_pct."""
        return self.artifact.data_config

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """``float32 [N, 3, H, W]``: the pixels the PyTorch reference sees for the same images."""
        from .images import preprocess

        return preprocess([as_rgb(image) for image in images], self.data_config).numpy()

    def keep_rows(self, keep: KeepLike, count: int) -> np.ndarray:
        """float32 ``[count, S]``: one checked row per image (spec section 4).

        ``None`` is the file's default, a float serves every stage, a list one row for every
        image, an ``[count, S]`` array each image its own row.
        """
        if isinstance(keep, np.ndarray) and keep.ndim == 2:
            if len(keep) != count:
                raise UserError(f"keep has {len(keep)} rows for {count} images; give one row per image or one row.")
            distinct, which = np.unique(keep, axis=0, return_inverse=True)  # each distinct row checked once
            checked = np.array([self.keep_for(row) for row in distinct], dtype=np.float32)
            return checked[which.reshape(-1)]
        return keep_rows(self.keep_for(keep), count)

    def keep_for(self, keep: KeepLike = None) -> list[float]:
        """One checked keep value per ATS stage: ``None`` is the file's default, a float serves every stage.

        A static export runs only the keep baked into it: any other is refused by name.
        """
        from .keep import format_keep, per_stage

        if keep is None:
            return self.default_keep
        values = per_stage(_numbers(keep), len(self.stages))
        if not self._takes_keep and self._budgets(values) != self._budgets(self.default_keep):
            raise UserError(
                f"{self.path} is a static export with keep {format_keep(self.default_keep)} baked in; it cannot run "
                f"keep {format_keep(values)}. Drop keep, or re-export with `ats-deploy export CHECKPOINT --dynamic`."
            )
        return values

    def _budgets(self, keep: Sequence[float]) -> list[int]:
        from .ats import budget_int

        return [budget_int(k, self.artifact.n0, self.artifact.prefix_tokens) for k in keep]

    def run(self, pixels: np.ndarray, keep: KeepLike = None) -> tuple[np.ndarray, np.ndarray]:
        """``(logits [N, classes], tokens [N, S])`` for ``pixels [N, 3, H, W]`` (``keep``: :meth:`keep_rows`).

        A static export runs in chunks of its batch, the last one padded.
        """
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        self._check_pixels(pixels)
        count = len(pixels)
        rows = self.keep_rows(keep, count)
        chunk = self.batch or count
        outputs = [
            self._run_chunk(pixels[start : start + chunk], rows[start : start + chunk], chunk)
            for start in range(0, count, chunk)
        ]
        logits, tokens = (np.concatenate(parts)[:count] for parts in zip(*outputs, strict=True))
        return logits, tokens

    def _check_pixels(self, pixels: np.ndarray) -> None:
        """``[N, 3, H, W]`` at the recorded input size, before onnxruntime would refuse it in its own words."""
        expected = tuple(self.data_config["input_size"])
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise UserError(
                f"pixels must be float32 [N, {', '.join(map(str, expected))}] for {self.path}, got "
                f"{list(pixels.shape)}.",
                hint="model.preprocess(images) makes them from images (resize, centre crop, mean/std as recorded).",
            )
        if len(pixels) == 0:
            raise UserError("no images given; pass at least one image.")

    def _run_chunk(self, pixels: np.ndarray, keep: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        padding = size - len(pixels)
        if padding:
            pixels = np.concatenate([pixels, np.zeros((padding, *pixels.shape[1:]), dtype=np.float32)])
            keep = np.concatenate([keep, np.repeat(keep[-1:], padding, axis=0)])
        logits, tokens = self._runner(_tensor(pixels), _tensor(keep))
        return np.asarray(logits), np.asarray(tokens)

    def predict(self, images: Sequence[ImageLike] | ImageLike, keep: KeepLike = None, top: int = 5) -> Prediction:
        """Pre-process ``images`` as the metadata says, run them with ``keep`` and rank the classes."""
        images = _as_list(images)
        _check_top(top)
        logits, tokens = self.run(self.preprocess(images), keep)
        return rank(logits, tokens, top)

    def gflops(self, tokens: np.ndarray) -> np.ndarray:
        """GFLOPs of each image from its ``tokens`` (:class:`ats_deploy.flops.CostModel`), float64 ``[N]``."""
        import torch

        return self._cost.gflops(torch.as_tensor(tokens)).numpy()

    @functools.cached_property
    def _cost(self) -> CostModel:
        """The cost model of the recorded architecture, from its layer sizes alone."""
        import types

        import timm
        import torch

        from .flops import CostModel

        _, height, width = self.data_config["input_size"]
        with torch.device("meta"):  # no weights are allocated
            classes = self.num_classes if self.artifact.head else 0  # a feature extractor has no head to count
            vit = timm.create_model(self.arch, pretrained=False, img_size=(height, width), num_classes=classes)
        return CostModel.of(types.SimpleNamespace(vit=vit, n0=self.artifact.n0, stages=self.stages))


class ReferenceModel:
    """The PyTorch reference behind the calls of :class:`ExportedModel`, so a checkpoint and an export compare alike."""

    def __init__(self, model: ATSVisionTransformer) -> None:
        self.model = model
        self.stages = list(model.stages)
        self.num_classes = model.num_classes

    def predict(self, images: Sequence[ImageLike] | ImageLike, keep: KeepLike = None, top: int = 5) -> Prediction:
        """As :meth:`ExportedModel.predict`; ``keep=None`` is the checkpoint's default keep."""
        import torch

        from .images import data_config, preprocess
        from .keep import per_stage

        images = _as_list(images)
        _check_top(top)
        values = per_stage(self.model.default_keep if keep is None else _numbers(keep), len(self.stages))
        pixels = preprocess([as_rgb(image) for image in images], data_config(self.model.vit))
        with torch.no_grad():
            logits, tokens = self.model(pixels, torch.tensor(values, dtype=torch.float32))
        return rank(logits.numpy(), tokens.numpy(), top)

    def gflops(self, tokens: np.ndarray) -> np.ndarray:
        """GFLOPs of each image from its ``tokens``, float64 ``[N]``."""
        import torch

        from .flops import CostModel

        return CostModel.of(self.model).gflops(torch.as_tensor(tokens)).numpy()


@dataclass(frozen=True)
class Predictor:
    """What ``ats-deploy predict`` runs, the keep to run it with, and what loading it noted for the user."""

    model: ExportedModel | ReferenceModel
    keep: list[float] | None  # None: the checkpoint's default keep, already set on its reference
    notes: list[str]


def predictor(
    path: str, keep: Sequence[float] | None = None, *, arch: str | None = None, stages: str | None = None,
    trust_code: bool = False,
) -> Predictor:
    """An exported file runs as :func:`open` runs it, at ``keep`` settled by its metadata; a checkpoint runs as its
    PyTorch reference, whose default keep is then ``keep`` (``arch``, ``stages`` and ``trust_code`` are for
    checkpoints only: an exported file records its own model, so they are refused there).
    """
    if not is_exported_model(path):
        from .checkpoints import load_model

        model = load_model(path, arch=arch, stages=stages, keep=None if keep is None else list(keep),
                           trust_code=trust_code)
        return Predictor(ReferenceModel(model), None, list(model.load_notes))
    given = [flag for flag, value in (("--arch", arch), ("--stages", stages), ("--trust-checkpoint", trust_code))
             if value]
    if given:
        flags = " and ".join(given)
        raise UserError(f"{flags} apply only to checkpoints; {path} records its own model: drop {flags}.")
    exported = open(path)
    return Predictor(exported, exported.keep_for(keep), [])


def _tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as the CPU tensor a runner takes, without copying it unless it is read-only (a broadcast row)."""
    import torch

    return torch.from_numpy(array if array.flags.writeable else array.copy())


def rank(logits: np.ndarray, tokens: np.ndarray, top: int) -> Prediction:
    """The :class:`Prediction` of ``logits [N, classes]``: softmax, the ``top`` classes best first, their names."""
    from .imagenet import class_name

    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    classes = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(top, logits.shape[1])]
    return Prediction(
        logits=logits,
        tokens=tokens,
        classes=classes,
        probabilities=np.take_along_axis(probabilities, classes, axis=1),
        labels=[[class_name(int(c), logits.shape[1]) for c in row] for row in classes],
    )


def _numbers(keep: float | Sequence[float]) -> list[float]:
    """``keep`` (a number, a list, a numpy array) as a list of floats, for :func:`ats_deploy.keep.per_stage`."""
    try:
        return [float(v) for v in np.atleast_1d(np.asarray(keep, dtype=np.float64))]
    except (TypeError, ValueError):
        raise UserError(f"keep must be a number or one number per ATS stage, got {keep!r}.") from None


def _as_list(images: Sequence[ImageLike] | ImageLike) -> list[ImageLike]:
    """One image (a path, PIL image or array) stands for a list of one."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if not images:
        raise UserError("no images given; pass at least one image.")
    return list(images)


def _check_top(top: int) -> None:
    if top < 1:
        raise UserError(f"top must be at least 1, got {top}.")


def as_rgb(image: ImageLike) -> Image.Image:
    """A PIL RGB image from a file path, a PIL image or a uint8 array ``[H, W]`` / ``[H, W, 3 or 4]``."""
    from .images import load_image, to_rgb

    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image, "the PIL image")
    if isinstance(image, np.ndarray):
        channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        if image.dtype != np.uint8 or not channels_ok:
            raise UserError(
                f"an image array must be uint8 [H, W] or [H, W, 3] (RGB), got {image.dtype} {list(image.shape)}."
            )
        return to_rgb(Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image), "array")
    raise UserError(f"cannot use a {type(image).__name__} as an image: give a file path, a PIL image or a uint8 array.")
