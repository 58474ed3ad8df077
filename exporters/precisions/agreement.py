"""A converted model against the float32 reference in onnxruntime on the CPU (ATS_SPEC.md section 5).

Reduced precision is judged by agreement, not bit for bit: the same top-1 and the same kept
tokens per stage, image by image, on the sample photos and a few random images. onnxruntime's
CPU kernels are not a GPU's, so agreement here does not promise agreement on the device; a
conversion that already disagrees here is caught before minutes of engine build.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ats_deploy.artifact import Artifact
from ats_deploy.errors import UserError
from ats_deploy.keep import keep_rows

if TYPE_CHECKING:
    from . import Precision

RANDOM_IMAGES = 4
CONFIDENCE_Z = 1.645  # one-sided 95%: the bound a reduced-precision verdict is decided by


@dataclass(frozen=True)
class TopOneAgreement:
    """How many of ``images`` kept the float32 reference's top-1, against the precision's bar.

    The one verdict on a reduced-precision file (export, validate, bench, loadtest --verify): it fails
    only when the agreement is below the bar beyond sampling error, that is when the one-sided 95%
    Wilson upper bound of the agreement rate is below it. 3 of 4 agreeing is no evidence against an
    80% bar; 26 of 40 is. A broken file (agreement towards chance) fails on a handful of images.
    """

    agree: int
    images: int
    bar: float

    @property
    def rate(self) -> float:
        return self.agree / self.images if self.images else 1.0

    @property
    def upper(self) -> float:
        """The one-sided 95% Wilson upper bound of the agreement rate (1.0 with no image)."""
        n, z = self.images, CONFIDENCE_Z
        if n == 0:
            return 1.0
        p = self.rate
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return min(1.0, (centre + spread) / (1 + z * z / n))

    @property
    def ok(self) -> bool:
        return self.upper >= self.bar

    def describe(self) -> str:
        verdict = "at or above" if self.rate >= self.bar else ("within sampling error of" if self.ok else "below")
        return (
            f"top-1 agreement {self.agree}/{self.images} = {self.rate:.1%} (95% upper bound {self.upper:.1%}), "
            f"{verdict} the {self.bar:.0%} bar"
        )


def top1_agreement(
    precision: Precision, keep_rows: Sequence[Sequence[float]], agree: int, images: int
) -> TopOneAgreement:
    """The verdict on ``agree`` of ``images`` top-1s kept at ``keep_rows``, against ``precision``'s bar for them."""
    return TopOneAgreement(agree, images, precision.required(keep_rows))


@dataclass(frozen=True)
class Agreement:
    """The converted ONNX against the fp32 one, image by image, and the share of top-1s it must keep."""

    precision: str
    required: float  # below this share of images with the fp32 top-1, the conversion is refused
    photos: int
    images: int  # photos, then random images
    keep: list[float] | None
    top1: int  # images with the same top-1 class
    tokens: int  # images that keep the same number of tokens at every ATS stage
    max_logit_diff: float

    def describe(self) -> str:
        keep = "" if self.keep is None else f" at keep {','.join(f'{v:g}' for v in self.keep)}"
        return (
            f"{self.precision} vs fp32 ONNX in onnxruntime (CPU), {self.photos} photos + {self.images - self.photos} "
            f"random images{keep}: same top-1 for {self.top1}/{self.images}, same kept tokens at every stage for "
            f"{self.tokens}/{self.images}, max |logit difference| {self.max_logit_diff:.3g}."
        )

    def check(self, source: Path) -> None:
        """Refuse a conversion of ``source`` that changes the prediction of most images."""
        if self.top1 < self.required * self.images:
            raise UserError(
                f"the {self.precision} conversion of {source} changes the top-1 class of {self.images - self.top1} of "
                f"{self.images} images (at least {self.required:.0%} must agree); no engine was built.",
                hint="Build for a profile with precision fp32, or report this output.",
            )


def _artifact(session) -> Artifact | None:
    """The export's recorded description; ``None`` for another producer's file with the interface."""
    try:
        return Artifact.from_metadata(session.get_modelmeta().custom_metadata_map, "the ONNX file")
    except UserError:
        return None


def _image_config(artifact: Artifact | None, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The preprocessing ``ats-deploy export`` recorded in the metadata; timm's ImageNet defaults otherwise."""
    from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if artifact is not None:
        return {**artifact.data_config, "input_size": image_shape}
    return {
        "input_size": image_shape,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic",
        "crop_pct": DEFAULT_CROP_PCT,
    }


def _keep(artifact: Artifact | None, keep_len: int | None, keep: Sequence[float] | None) -> list[float] | None:
    """``keep``, else the export's recorded keep, else 1.0 per stage; ``None`` when keep is baked in."""
    if keep_len is None:
        return None
    if keep is not None:
        return list(keep)
    recorded = list(artifact.keep) if artifact is not None else []
    return recorded if len(recorded) == keep_len else [1.0] * keep_len


def _run_all(session, images: np.ndarray, keep: list[float] | None, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and tokens of every image, ``batch`` at a time (the last batch padded with its last image)."""
    logits, tokens = [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        feeds = {"images": padded} if keep is None else {"images": padded, "keep": keep_rows(keep, batch)}
        out_logits, out_tokens = session.run(["logits", "tokens"], feeds)
        logits.append(out_logits[: len(chunk)])
        tokens.append(out_tokens[: len(chunk)])
    return np.concatenate(logits), np.concatenate(tokens)


def measure(
    precision: Precision, reference: Path, converted: Path, batch: int, keep: Sequence[float] | None = None
) -> Agreement:
    """Run ``converted`` and the fp32 ``reference`` (files with the exported interface) ``batch`` images at a time.

    ``keep`` defaults to the keep the export recorded. The image size and the length of ``keep`` come from the
    reference's inputs, which ``ats-deploy build`` has checked (ATS_SPEC.md section 4).
    """
    import onnxruntime as ort

    from ats_deploy.images import preprocess, random_images, sample_images

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (reference, converted)]
    inputs = {i.name: i.shape for i in sessions[0].get_inputs()}
    artifact = _artifact(sessions[0])
    config = _image_config(artifact, tuple(inputs["images"][1:]))
    photos = sample_images()
    pictures = [preprocess(list(photos.values()), config), random_images(RANDOM_IMAGES, config)]
    images = np.concatenate([pixels.numpy() for pixels in pictures])
    values = _keep(artifact, inputs["keep"][1] if "keep" in inputs else None, keep)
    (ref_logits, ref_tokens), (logits, tokens) = (_run_all(s, images, values, batch) for s in sessions)
    return Agreement(
        precision=precision.name,
        required=precision.min_top1_agreement,
        photos=len(photos),
        images=len(images),
        keep=values,
        top1=int((ref_logits.argmax(axis=-1) == logits.argmax(axis=-1)).sum()),
        tokens=int((ref_tokens == tokens).all(axis=-1).sum()),
        max_logit_diff=float(np.abs(ref_logits - logits).max()),
    )
