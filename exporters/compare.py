"""What an exported model's answers are judged by: the reference replay, the verdicts and their result types.

Like Polygraphy's comparator, apart from the runners: whatever ran the export (onnxruntime in
``ats-deploy validate``, any backend in bench, a server under ``loadtest --verify``) hands in one
:class:`~ats_deploy.backends.samples.Sample` per image, and this module says how it compares with
the PyTorch reference (docs/ATS.md section 6).

What counts as equal is strict for a precision compared exactly (fp32): the exported graph names
each stage's kept-token mask (``ats_kept_<s>``, see :mod:`ats_deploy.sampler_op`), so the kept
patches are compared, not only how many. A difference is a *flip* only when replaying the reference
with one near tie (a quantile within :data:`TIE_TOL` of the cdf) resolved the other way reproduces
the exported result: the same kept patches, and logits within the precision's tolerance. Every other
difference fails. A reduced precision (int8, fp16) is judged by top-1 agreement against its bar
instead: :class:`TopOneAgreement`, the one agreement verdict.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ats_deploy import ats
from ats_deploy import precision as precisions
from ats_deploy.backends.samples import Sample, Tie
from ats_deploy.errors import UserError
from ats_deploy.keep import format_keep
from ats_deploy.model import ATSVisionTransformer
from ats_deploy.precision import Precision

# Runtimes round the cdf differently by ~1e-7 (a float32 cumsum of ~200 terms can
# drift by ~1e-6); a quantile this close to a cdf value may land on either side of
# it. Only a candidate: a replay decides whether the difference is that flip.
TIE_TOL = 1e-5
# Closer than this, float32 does not resolve a quantile from the cdf (a few ulps at 1, the drift of a float32
# cumsum of thousands of tokens): such ties are resolved by rounding alone, differently in a batch of one.
FLOAT_RESOLUTION = 1e-6
# A flip changes every later stage's input, so a second tie may follow; more than
# this many in one image is no rounding accident (ties within FLOAT_RESOLUTION not counted).
MAX_TIES = 3
MAX_REPLAYS = 24  # per image: bounds the search when a broken export meets many near ties
CONFIDENCE_Z = 1.645  # one-sided 95%: the bound a reduced-precision verdict is decided by


# --------------------------------------------------------------------------- the agreement verdict


@dataclass(frozen=True)
class TopOneAgreement:
    """How many of ``images`` kept the float32 reference's top-1, against the precision's bar.

    The one verdict on a reduced-precision file (export, validate, build, bench, loadtest --verify): it
    fails only when the agreement is below the bar beyond sampling error, that is when the one-sided 95%
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


def judged_by_agreement(name: str) -> Precision | None:
    """The registry entry of a file's precision when it is judged by agreement (int8); None for fp32 (exact)."""
    entry = precisions.get(name)
    return None if entry.exact else entry


@dataclass(frozen=True)
class Agreement:
    """A converted ONNX file against the float32 one it was converted from, image by image, before an engine build.

    ``top1`` is :class:`TopOneAgreement` against the precision's bar for the images' keep.
    """

    precision: str
    top1: TopOneAgreement
    photos: int
    keep: list[float] | None
    tokens: int  # images that keep the same number of tokens at every ATS stage
    max_logit_diff: float

    def describe(self) -> str:
        keep = "" if self.keep is None else f" at keep {','.join(f'{v:g}' for v in self.keep)}"
        images = self.top1.images
        return (
            f"{self.precision} vs fp32 ONNX in onnxruntime (CPU), {self.photos} photos + {images - self.photos} "
            f"random images{keep}: same top-1 for {self.top1.agree}/{images}, same kept tokens at every stage for "
            f"{self.tokens}/{images}, max |logit difference| {self.max_logit_diff:.3g}."
        )

    def check(self, source: Path) -> None:
        """Refuse a conversion of ``source`` whose top-1 agreement is below its precision's bar."""
        if not self.top1.ok:
            raise UserError(
                f"the {self.precision} conversion of {source} changes the top-1 class of "
                f"{self.top1.images - self.top1.agree} of {self.top1.images} images ({self.top1.describe()}); "
                "no engine was built.",
                hint="Build for a profile with precision fp32, or report this output.",
            )


# --------------------------------------------------------------------------- the result types


@dataclass
class Flip:
    """A difference explained by near ties resolved the other way (``ties``), named patch by patch."""

    image: str
    blocks: list[int]
    ties: list[Tie]
    moved: list[str]
    logit_diff: float  # against the reference; against the replay it is within atol

    def describe(self) -> str:
        ties = "; ".join(
            f"block {b}: quantile {t.quantile + 1} {t.margin:.1e} from the cdf, {m}"
            for b, t, m in zip(self.blocks, self.ties, self.moved, strict=True)
        )
        return f"{self.image}: {ties} (|Δlogit| {self.logit_diff:.1e} against the unreplayed reference)"


@dataclass
class Case:
    """One ``keep`` row at one batch size over all images; with ``mixed``, those rows cycled over each batch.

    A mixed case runs images with different budgets in one batch, as a serving engine
    batches requests (interface version 2); ``keep`` is then empty. With a reduced
    ``precision`` (int8) the case is judged by top-1 agreement against that precision's
    bar (docs/ATS.md section 6), not image by image; see :func:`compare_batch`.
    """

    keep: list[float]
    batch: int
    mixed: list[list[float]] = field(default_factory=list)
    images: int = 0
    max_logit_diff: float = 0.0
    stage_matches: int = 0
    stage_total: int = 0
    positions: bool = True  # False: only the token counts could be compared
    top1_matches: int = 0
    flips: list[Flip] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    precision: Precision | None = None  # a reduced precision: judged by agreement; None: patch for patch

    @property
    def agreement(self) -> TopOneAgreement | None:
        """The agreement verdict of a reduced-precision case; None for an exact one."""
        if self.precision is None:
            return None
        return top1_agreement(self.precision, self.mixed or [self.keep], self.top1_matches, self.images)

    @property
    def problems(self) -> list[str]:
        """The failures, and a reduced-precision case's agreement verdict when it fails."""
        verdict = self.agreement
        return self.failures + ([verdict.describe()] if verdict is not None and not verdict.ok else [])

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def keep_label(self) -> str:
        if self.mixed:
            return "mixed " + " | ".join(format_keep(row) for row in self.mixed)
        return format_keep(self.keep)

    def to_dict(self) -> dict[str, Any]:
        """What results files (bench, loadtest --verify) record of the comparison."""
        return {
            "images": self.images,
            "max_logit_diff": self.max_logit_diff,
            "stages_agree": self.stage_matches,
            "stages_total": self.stage_total,
            "top1_agree": self.top1_matches,
            "flips": [flip.describe() for flip in self.flips],
            "mismatches": self.problems,
            **({} if self.agreement is None else {"top1_bar": self.agreement.bar, "top1_upper": self.agreement.upper}),
        }

    def rows(self, images: int) -> torch.Tensor:
        """The float32 ``[images, S]`` keep rows of one batch."""
        rows = [self.mixed[i % len(self.mixed)] for i in range(images)] if self.mixed else [self.keep] * images
        return torch.tensor(rows, dtype=torch.float32)


@dataclass
class Report:
    """Every case of one comparison, and the |logit difference| an exactly compared image was allowed."""

    cases: list[Case]
    atol: float

    @property
    def ok(self) -> bool:
        return all(case.ok for case in self.cases)

    @property
    def flips(self) -> list[Flip]:
        return [flip for case in self.cases for flip in case.flips]

    @property
    def failures(self) -> list[str]:
        return [f"keep {c.keep_label}, batch {c.batch}: {msg}" for c in self.cases for msg in c.problems]


# --------------------------------------------------------------------------- the reference side


class Probe:
    """A :data:`~ats_deploy.model.QuantileHook` that records each stage's cdf and quantiles.

    With ``force``, it first resolves those ties the other way from how they were found
    (``Tie.below``), with ``pin`` the way they were found: a quantile at or below ``cdf_p``
    sits on it, one above it just past it, in this forward's own float arithmetic.
    """

    def __init__(self, force: Sequence[Tie] = (), pin: Sequence[Tie] = ()) -> None:
        self.resolve = [(tie, not tie.below) for tie in force] + [(tie, tie.below) for tie in pin]
        self.cdfs: list[np.ndarray] = []
        self.quantiles: list[np.ndarray] = []

    def __call__(self, stage: int, scores: torch.Tensor, clamp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``u``: ``[B, 1, D]``, each image's quantiles; ties are resolved in a replay of one image (row 0)."""
        cdf = ats.cdf(scores, clamp)[..., 0]
        resolved = [(tie, below) for tie, below in self.resolve if tie.stage == stage]
        if resolved:
            u = u.clone()
            for tie, below in resolved:
                value = cdf[0, tie.position]
                u[0, 0, tie.quantile] = value if below else torch.nextafter(value, value.new_tensor(float("inf")))
        self.cdfs.append(cdf.numpy())
        self.quantiles.append(u[:, 0].expand(len(cdf), -1).numpy())
        return u

    def ties(self, image: int) -> list[list[Tie]]:
        """Every (position, quantile) pair of ``image`` within :data:`TIE_TOL`, per stage, nearest first."""
        found = []
        for stage, (cdf, u) in enumerate(zip(self.cdfs, self.quantiles, strict=True)):
            distance = np.abs(cdf[image][:, None] - u[image][None, :])  # +inf from the last valid token on
            positions, quantiles = np.nonzero(distance <= TIE_TOL)
            pairs = zip(positions, quantiles, strict=True)
            below = u[image][None, :] <= cdf[image][:, None]
            ties = [Tie(stage, int(p), int(i), float(distance[p, i]), bool(below[p, i])) for p, i in pairs]
            found.append(sorted(ties, key=lambda t: t.margin))
        return found


def reference_samples(
    model: ATSVisionTransformer,
    images: torch.Tensor,
    keep: torch.Tensor,
    force: Sequence[Tie] = (),
    pin: Sequence[Tie] = (),
) -> list[Sample]:
    """The reference's :class:`Sample` of every image, near ties included (``force``, ``pin``: :class:`Probe`)."""
    probe = Probe(force, pin)
    with torch.inference_mode():
        out = model.forward_details(images, keep, hook=probe)
    samples = []
    for b in range(len(images)):
        kept = [p[b][p[b] >= 0].numpy() for p in out.positions]
        samples.append(Sample(out.logits[b].numpy(), out.tokens[b].numpy(), kept, probe.ties(b)))
    return samples


# --------------------------------------------------------------------------- the verdict


def _unresolved(current: Sample, last: int, forced: Sequence[Tie]) -> list[Tie]:
    """The ties of stages up to ``last`` closer to the cdf than float32 resolves (:data:`FLOAT_RESOLUTION`),
    but those ``forced``: a replay pins them as ``current`` resolved them, since its own arithmetic (one image,
    not a batch) may resolve them either way."""
    key = {(t.stage, t.position, t.quantile) for t in forced}
    return [
        tie for ties in current.ties[: last + 1] for tie in ties
        if tie.margin <= FLOAT_RESOLUTION and (tie.stage, tie.position, tie.quantile) not in key
    ]


def _pointed_to(observed: Sample, current: Sample, stage: int, prefix: int) -> list[Tie]:
    """The near ties of ``stage`` whose other resolution moves a kept patch the way ``observed`` differs.

    A tie's quantile picks token ``position + P`` of the stage's input when at or below the cdf there,
    the next one otherwise; resolved the other way it drops the one and keeps the other. The stage's
    input is the previous stage's kept tokens, the same in both (this is the first difference).
    """
    if observed.kept is None or current.kept is None:
        return []
    seen, expected = set(observed.kept[stage].tolist()), set(current.kept[stage].tolist())
    rows = current.kept[stage - 1] if stage > 0 else None

    def original(row: int) -> int | None:
        if rows is None:
            return row
        return int(rows[row]) if row < len(rows) else None

    pointed = []
    for tie in current.ties[stage]:
        here, after = original(tie.position + prefix), original(tie.position + prefix + 1)
        dropped, kept = (here, after) if tie.below else (after, here)
        moved = (dropped in expected and dropped not in seen) or (kept in seen and kept not in expected)
        if moved:
            pointed.append(tie)
    return pointed


def _first_difference(observed: Sample, expected: Sample) -> int | None:
    """The first stage whose kept patches (or, without positions, counts) differ; None when none do."""
    for s in range(len(expected.tokens)):
        if observed.tokens[s] != expected.tokens[s]:
            return s
        if observed.kept is not None and not np.array_equal(observed.kept[s], expected.kept[s]):
            return s
    return None


def _logit_diff(observed: Sample, expected: Sample) -> float:
    return float(np.abs(observed.logits - expected.logits).max())


def _moved(replayed: Sample, expected: Sample, stage: int, prefix: int) -> str:
    """What a stage kept differently: ``kept patch 17 instead of patch 16``, ``dropped patch 9``, ...

    Token ``p`` is patch ``p - P`` (``prefix``: the model's ``P`` prefix tokens come first).
    """
    if replayed.kept is None or expected.kept is None:
        return f"kept {replayed.tokens[stage]} patches instead of {expected.tokens[stage]}"
    added = ", ".join(str(p - prefix) for p in sorted(set(replayed.kept[stage]) - set(expected.kept[stage])))
    dropped = ", ".join(str(p - prefix) for p in sorted(set(expected.kept[stage]) - set(replayed.kept[stage])))
    if added and dropped:
        return f"kept patch {added} instead of patch {dropped}"
    if dropped:
        return f"dropped patch {dropped}"
    return f"also kept patch {added}" if added else "kept the same patches"


@dataclass
class Judge:
    """Compares what a runtime returned for one image with the reference, replaying near ties."""

    model: ATSVisionTransformer
    atol: float

    def replay(self, image: torch.Tensor, keep: torch.Tensor, force: Sequence[Tie], pin: Sequence[Tie] = ()) -> Sample:
        return reference_samples(self.model, image[None], keep, force, pin)[0]

    def explain(
        self, observed: Sample, expected: Sample, replay: Callable[[Sequence[Tie]], Sample]
    ) -> tuple[list[Tie], Sample] | None:
        """The near ties whose other resolution reproduces ``observed``, with that replay; None if none do.

        Depth first: at the first differing stage, every near tie there that the export's kept
        patches point to (:func:`_pointed_to`) resolved the other way at once, then each near
        tie alone; when a replay agrees further but not everywhere, the same at its own first
        difference. With thousands of tokens several quantiles of one stage sit closer to the
        cdf than float32 resolves, and runtimes resolve them differently together; a replay
        that forces them all must still reproduce the export exactly, logits within ``atol``.
        """
        budget = [MAX_REPLAYS]

        def search(forced: list[Tie], current: Sample, depth: int) -> tuple[list[Tie], Sample] | None:
            stage = _first_difference(observed, current)
            if stage is None:  # same tokens everywhere, logits not: a flip with no trace in the counts
                singles = sorted((t for ties in current.ties for t in ties), key=lambda t: t.margin)
                tries = [[tie] for tie in singles]
            else:
                group = _pointed_to(observed, current, stage, self.model.prefix_tokens)
                tries = ([group] if len(group) > 1 else []) + [[tie] for tie in current.ties[stage]]
            last = len(current.ties) - 1 if stage is None else stage
            for ties in tries:
                if budget[0] == 0:
                    return None
                budget[0] -= 1
                replayed = replay([*forced, *ties], _unresolved(current, last, [*forced, *ties]))
                later = _first_difference(observed, replayed)
                if later is None and _logit_diff(observed, replayed) <= self.atol:
                    return [*forced, *ties], replayed
                # Ties float32 cannot resolve chain freely (each stage at most once); others count.
                deeper = depth + int(any(tie.margin > FLOAT_RESOLUTION for tie in ties))
                if later is not None and (stage is None or later > stage) and deeper < MAX_TIES:
                    found = search([*forced, *ties], replayed, deeper)
                    if found:
                        return found
            return None

        return search([], expected, 0)

    def compare(
        self, case: Case, name: str, observed: Sample, expected: Sample, replay: Callable[[Sequence[Tie]], Sample]
    ) -> None:
        """Add one image to ``case``: a match, a named flip, or a failure that says what differs."""
        diff = _count(case, observed, expected)
        case.positions = case.positions and observed.kept is not None
        stages = len(expected.tokens)
        same = [
            observed.tokens[s] == expected.tokens[s]
            and (observed.kept is None or np.array_equal(observed.kept[s], expected.kept[s]))
            for s in range(stages)
        ]
        case.stage_matches += int(sum(same))
        if all(same) and diff <= self.atol:
            return
        if all(same) and observed.kept is not None:
            case.failures.append(
                f"{name}: logits differ by {diff:.2e} > atol {self.atol:.0e} with the same kept patches at every stage"
            )
            return
        found = self.explain(observed, expected, replay)
        if found is not None:
            ties, replayed = found
            blocks = [self.model.stages[t.stage] for t in ties]
            moved = [_moved(replayed, expected, t.stage, self.model.prefix_tokens) for t in ties]
            case.flips.append(Flip(name, blocks, ties, moved, diff))
            return
        case.failures.append(self._failure(name, observed, expected, diff))

    def _failure(self, name: str, observed: Sample, expected: Sample, diff: float) -> str:
        stage = _first_difference(observed, expected)
        if stage is None:
            return (
                f"{name}: logits differ by {diff:.2e} > atol {self.atol:.0e} with the same token counts, and no "
                "near tie replayed the other way explains it"
            )
        block = self.model.stages[stage]
        nearest = min((t.margin for t in expected.ties[stage]), default=None)
        why = (
            f"no quantile within {TIE_TOL:.0e} of the cdf there"
            if nearest is None
            else "replaying the reference with its near ties resolved the other way does not reproduce it"
        )
        if observed.tokens[stage] != expected.tokens[stage]:
            what = f"kept {observed.tokens[stage]} patches, the reference {expected.tokens[stage]}"
        else:
            what = _moved(observed, expected, stage, self.model.prefix_tokens)
        return f"{name}: block {block} {what} ({why}; |Δlogit| {diff:.1e})"



# --------------------------------------------------------------------------- comparing a batch


def interface_mismatch(model: ATSVisionTransformer, stages: int, masks: int | None = None) -> str | None:
    """Why a runtime reporting ``stages`` ATS stages (and ``masks`` kept masks) is not ``model``'s export; or None."""
    masks = stages if masks is None else masks
    expected = len(model.stages)
    if stages == expected and masks == expected:
        return None
    return (
        f"the exported model reports {stages} ATS stages ({masks} kept-token masks), the reference has "
        f"{expected} (blocks {', '.join(map(str, model.stages))}): it was exported from another model"
    )


def check_interface(case: Case, model: ATSVisionTransformer, samples: Sequence[Sample]) -> bool:
    """Fail the case (once) when the runtime reports another number of ATS stages than the reference has."""
    for sample in samples:
        message = interface_mismatch(model, len(sample.tokens), None if sample.kept is None else len(sample.kept))
        if message is not None:
            if message not in case.failures:
                case.failures.append(message)
            return False
    return True


def compare_batch(
    case: Case,
    judge: Judge,
    names: Sequence[str],
    images: torch.Tensor,
    keep: torch.Tensor,
    observed: Sequence[Sample],
    expected: Sequence[Sample],
) -> None:
    """Add the first ``len(names)`` images of a batch to ``case`` (``expected``: :func:`reference_samples`).

    ``keep``: ``[S]``, or ``[B, S]`` one row per image; a replay runs the image alone with its own row.
    """
    if not check_interface(case, judge.model, observed):
        return
    for b, name in enumerate(names):
        if case.precision is not None:
            count_agreement(case, observed[b], expected[b])
            continue
        replay = functools.partial(judge.replay, images[b], keep if keep.ndim == 1 else keep[b])
        judge.compare(case, name, observed[b], expected[b], replay)


def _count(case: Case, observed: Sample, expected: Sample) -> float:
    """Count one image into ``case`` (images, top-1 matches, stages, largest logit difference); its difference."""
    diff = _logit_diff(observed, expected)
    case.images += 1
    case.max_logit_diff = max(case.max_logit_diff, diff)
    case.top1_matches += int(observed.logits.argmax() == expected.logits.argmax())
    case.stage_total += len(expected.tokens)
    return diff


def count_agreement(case: Case, observed: Sample, expected: Sample) -> None:
    """Add one image of a reduced-precision case: its top-1 and per-stage token counts against the reference.

    No image fails on its own: the case's verdict is :attr:`Case.agreement` over all of them.
    """
    _count(case, observed, expected)
    case.positions = False
    case.stage_matches += int((np.asarray(observed.tokens) == np.asarray(expected.tokens)).sum())

