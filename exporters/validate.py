"""Validate an exported model against the PyTorch reference (ATS_SPEC.md section 5).

Like Optimum's post-export validation, with Polygraphy's plainness: the same
images and ``keep`` go through the runtime and the reference; one table says, per
``keep`` and batch size, the largest logit difference over all images, how many
stages kept exactly the reference's patches, and top-1 agreement.

What counts as equal is strict. The exported graph names each stage's kept-token
mask (``ats_kept_<s>``, see :mod:`.onnx_export`), so validation compares which
patches were kept, not only how many. A difference is a *flip* only when
replaying the reference with one near tie (a quantile within :data:`TIE_TOL` of
the cdf) resolved the other way reproduces the exported result: the same kept
patches, and logits within ``atol``. Every other difference fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from ats_deploy import ats
from ats_deploy.artifact import read
from ats_deploy.errors import UserError
from ats_deploy.keep import format_keep, keep_rows, per_stage
from ats_deploy.model import ATSVisionTransformer

from . import custom_op
from .onnx_export import kept_name
from .precisions import Precision
from .precisions.agreement import TopOneAgreement, top1_agreement

DEFAULT_KEEPS = (1.0, 0.87, 0.72, 0.5)
DEFAULT_BATCHES = (1, 4)
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


@dataclass(frozen=True)
class Tie:
    """Quantile ``quantile`` of ATS stage ``stage`` within ``margin`` of the cdf at position ``position``."""

    stage: int
    position: int  # index into the stage's cdf: token ``position + P`` of the stage's input (P prefix tokens)
    quantile: int
    margin: float
    below: bool = True  # the quantile is at or below the cdf there: it picks that token, the other way the next


@dataclass
class Sample:
    """One image as some model computed it: logits, tokens, kept positions, near ties."""

    logits: np.ndarray
    tokens: np.ndarray
    # Per stage, the original token indices kept, the P prefix tokens (0..P-1) first; None when
    # the runtime cannot say (an engine without the kept-mask outputs).
    kept: list[np.ndarray] | None = None
    ties: list[list[Tie]] = field(default_factory=list)


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
    bar (ATS_SPEC.md section 5), not image by image; see :func:`compare_batch`.
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


# --------------------------------------------------------------------------- the runtime side


def _kept_rows(outputs: Sequence[np.ndarray], image: int) -> np.ndarray:
    """Rows of a stage's input that it kept, in order: from its kept mask ``[B, N, 1]``, or the custom op's
    ``index [B, m, 1]`` and key mask (0 at kept tokens)."""
    if len(outputs) == 1:
        return np.flatnonzero(outputs[0][image].reshape(-1))
    index, mask = outputs
    return index[image, mask[image, :, 0] == 0, 0]


def kept_positions(stages: Sequence[Sequence[np.ndarray]], image: int) -> list[np.ndarray]:
    """Original token indices each stage kept, for one image, from every stage's tapped outputs.

    A stage's input is the previous stage's kept tokens in order, then padding, so
    the positions compose stage by stage. A padded slot kept is position -1, which
    never matches the reference.
    """
    current: np.ndarray | None = None
    kept = []
    for outputs in stages:
        rows = _kept_rows(outputs, image)
        if current is not None:
            rows = np.where(rows < len(current), current[np.minimum(rows, len(current) - 1)], -1)
        current = rows
        kept.append(current)
    return kept


def taps(model: onnx.ModelProto) -> list[tuple[tuple[str, int], ...]]:
    """Per ATS stage, the (name, element type) of the tensors saying which tokens it kept.

    The subgraph export's kept mask (``ats_kept_<s>``), or a custom op's index and key mask.
    """
    samplers = [n for n in model.graph.node if n.op_type == custom_op.OP_TYPE]
    if samplers:
        return [((n.output[0], onnx.TensorProto.INT64), (n.output[1], onnx.TensorProto.FLOAT)) for n in samplers]
    produced = {o for n in model.graph.node for o in n.output}
    found: list[tuple[tuple[str, int], ...]] = []
    while kept_name(len(found)) in produced:
        found.append(((kept_name(len(found)), onnx.TensorProto.BOOL),))
    return found


class TappedSession:
    """An onnxruntime CPU session of an exported file that also returns every stage's kept tokens.

    The kept-token tensors become extra graph outputs; no node changes.
    """

    def __init__(self, path: str, threads: int | None = None) -> None:
        model = onnx.load(path)
        self.taps = taps(model)
        for tensors in self.taps:
            for name, dtype in tensors:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
        self.session = session(model, threads)
        self.takes_keep = any(i.name == "keep" for i in self.session.get_inputs())
        tokens = next(o for o in self.session.get_outputs() if o.name == "tokens")
        self.stages = tokens.shape[-1]  # static in every export (spec section 4)

    def __call__(self, images: np.ndarray, keep: np.ndarray) -> list[Sample]:
        feeds = {"images": images}
        if self.takes_keep:
            feeds["keep"] = keep_rows(keep, len(images))
        names = [name for tensors in self.taps for name, _ in tensors]
        logits, tokens, *tapped = self.session.run(["logits", "tokens", *names], feeds)
        stages, at = [], 0
        for tensors in self.taps:
            stages.append(tapped[at : at + len(tensors)])
            at += len(tensors)
        return [Sample(logits[b], tokens[b], kept_positions(stages, b)) for b in range(len(images))]


def session(model: onnx.ModelProto | str | Path, threads: int | None = None):
    """An onnxruntime CPU session of a file or a loaded model that does not spin idle threads.

    The graph is read once (no external data) to see whether it needs the custom op's kernel.
    Every other setting is onnxruntime's default, so that an int8 file is validated, benched and
    served under the optimizer that runs it in a user's own session or Triton's onnxruntime backend.
    """
    import onnxruntime as ort

    loaded = isinstance(model, onnx.ModelProto)
    graph = model if loaded else onnx.load(str(model), load_external_data=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if custom_op.uses_custom_op(graph):
        custom_op.register(options)
    source = model.SerializeToString() if loaded else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


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
        diff = _logit_diff(observed, expected)
        case.images += 1
        case.max_logit_diff = max(case.max_logit_diff, diff)
        case.top1_matches += int(observed.logits.argmax() == expected.logits.argmax())
        case.positions = case.positions and observed.kept is not None
        stages = len(expected.tokens)
        case.stage_total += stages
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


# --------------------------------------------------------------------------- running it


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


def samples(logits: np.ndarray, tokens: np.ndarray) -> list[Sample]:
    """A runtime's batched outputs as per-image samples (token counts only, no kept positions)."""
    return [Sample(logits[b], tokens[b]) for b in range(len(logits))]


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


def count_agreement(case: Case, observed: Sample, expected: Sample) -> None:
    """Add one image of a reduced-precision case: its top-1 and per-stage token counts against the reference.

    No image fails on its own: the case's verdict is :attr:`Case.agreement` over all of them.
    """
    case.images += 1
    case.max_logit_diff = max(case.max_logit_diff, _logit_diff(observed, expected))
    case.top1_matches += int(observed.logits.argmax() == expected.logits.argmax())
    case.positions = False
    case.stage_total += len(expected.tokens)
    case.stage_matches += int((np.asarray(observed.tokens) == np.asarray(expected.tokens)).sum())


def run_case(
    run: Callable[[np.ndarray, np.ndarray], list[Sample]],
    judge: Judge,
    names: Sequence[str],
    images: torch.Tensor,
    case: Case,
) -> Case:
    """Fill ``case``: its keep rows at its batch size over every whole batch of ``images``."""
    batch = case.batch
    for start in range(0, len(images) - batch + 1, batch):
        chunk = images[start : start + batch]
        rows = case.rows(batch)
        observed = run(chunk.numpy(), rows.numpy())
        expected = reference_samples(judge.model, chunk, rows)
        compare_batch(case, judge, names[start : start + batch], chunk, rows, observed, expected)
    return case


def cases(
    keeps: Sequence[list[float]], batches: Sequence[int], dynamic: bool, precision: Precision | None = None
) -> list[Case]:
    """Every keep at every batch size; a dynamic file also runs every keep mixed in one batch (spec section 5).

    ``precision``: a reduced precision, whose cases are judged by agreement (:func:`judged_by_agreement`).
    """
    uniform = [Case(list(keep), batch, precision=precision) for keep in keeps for batch in batches]
    if not dynamic or len(keeps) < 2:
        return uniform
    mixed = [list(keep) for keep in keeps]
    return uniform + [Case([], batch, mixed, precision=precision) for batch in batches if batch > 1]


def judged_by_agreement(precision: str) -> Precision | None:
    """The registry entry of a file's precision when it is judged by agreement (int8); None for fp32 (exact)."""
    from . import precisions

    entry = precisions.get(precision)
    return None if entry.exact else entry


def validate(
    onnx_path: str,
    model: ATSVisionTransformer,
    names: Sequence[str],
    images: torch.Tensor,
    keeps: Sequence[list[float]],
    batches: Sequence[int] = DEFAULT_BATCHES,
    atol: float = 1e-3,
    console: Console | None = None,
) -> Report:
    """Run ``onnx_path`` (onnxruntime CPU) and ``model`` on ``images`` for every keep and batch size.

    An int8 file is judged by agreement per case (ATS_SPEC.md section 5), a float32 one patch for patch.
    """
    artifact = read(onnx_path)
    if not artifact.dynamic:
        keeps = [list(artifact.keep)]
        batches = [artifact.batch]
    tapped = TappedSession(onnx_path)
    todo = cases(keeps, batches, artifact.dynamic, judged_by_agreement(artifact.precision))
    mismatch = interface_mismatch(model, tapped.stages, len(tapped.taps))
    if mismatch is not None:  # its keep input would not even take the reference's rows
        for case in todo:
            case.failures.append(mismatch)
        return Report(todo, atol)
    judge = Judge(model, atol)
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("validating against PyTorch", total=len(todo))
        for case in todo:
            run_case(tapped, judge, names, images, case)
            progress.advance(task)
    return Report(todo, atol)


def render(report: Report, console: Console, title: str = "ONNX (onnxruntime CPU) vs PyTorch reference") -> None:
    """The comparison table, then every flip and failure by name."""
    table = Table(title=title, title_justify="left")
    for column in ("keep", "batch", "images", "max |Δlogit|", "stages kept same", "top-1 agree", "flips", "result"):
        table.add_column(column, justify="right" if column not in ("keep", "result") else "left")
    for c in report.cases:
        table.add_row(
            c.keep_label,
            str(c.batch),
            str(c.images),
            f"{c.max_logit_diff:.1e}",
            f"{c.stage_matches}/{c.stage_total}" + ("" if c.positions else " (counts)"),
            f"{c.top1_matches}/{c.images}",
            str(len(c.flips)),
            "[green]ok[/]" if c.ok else "[red]FAIL[/]",
        )
    console.print(table)
    reduced = [case for case in report.cases if case.agreement is not None]
    if len(reduced) < len(report.cases):
        console.print(
            f"max |Δlogit| is over every image, flips included; an image passes with |Δlogit| <= {report.atol:.0e} "
            "and the reference's kept patches at every stage, or as a flip: the reference replayed with near ties "
            f"(a quantile within {TIE_TOL:.0e} of the cdf) resolved the other way reproduces it.",
            highlight=False,
        )
    if reduced:
        console.print(
            f"{reduced[0].precision.name} is judged by top-1 agreement with the float32 reference, not image by image "
            "(ATS_SPEC.md section 5): a case fails when its agreement is below the bar beyond sampling error (its "
            "one-sided 95% upper bound under the bar); stages kept same counts equal token counts.",
            highlight=False,
        )
        for case in (c for c in reduced if c.ok):
            console.print(f"keep {case.keep_label}, batch {case.batch}: {case.agreement.describe()}", highlight=False)
    for case in report.cases:
        for flip in case.flips:
            where = f"keep {case.keep_label}, batch {case.batch}"
            console.print(f"[yellow]flip at a float tie[/] ({where}) {escape(flip.describe())}", highlight=False)
    for failure in report.failures:
        console.print(f"[red]mismatch[/] {escape(failure)}", highlight=False)


def default_inputs(model: ATSVisionTransformer, count: int = 8) -> tuple[list[str], torch.Tensor]:
    """The scikit-image photos, then seeded random images: real pictures without any download."""
    from ats_deploy.images import data_config, preprocess, random_images, sample_images

    config = data_config(model.vit)
    photos = list(sample_images().items())[:count]
    images = preprocess([image for _, image in photos], config)
    extra = count - len(photos)
    if extra > 0:
        images = torch.cat([images, random_images(extra, config)])
    return [f"skimage:{name}" for name, _ in photos] + [f"random-{i}" for i in range(extra)], images


def folder_inputs(
    model: ATSVisionTransformer, data: Path, limit: int | None, console: Console
) -> tuple[list[str], torch.Tensor]:
    """Readable images of an ImageFolder or flat folder (bench's reader), unreadable ones skipped and said."""
    from ats_deploy.bench.data import Skipped, folder_batches, image_folder
    from ats_deploy.images import data_config

    folder = image_folder(data, model.num_classes, limit=limit)
    skipped = Skipped()
    batches = list(folder_batches(folder, data_config(model.vit), 32, skipped))
    if skipped:
        console.print(f"skipped {len(skipped)} unreadable file(s) of {escape(str(data))}", highlight=False)
    if not batches:
        raise UserError(f"no readable image in {data}; give a folder of JPEG/PNG images (ImageFolder or flat).")
    return [n for b in batches for n in b.names], torch.cat([b.images for b in batches])


def validate_file(
    path: Path,
    *,
    data: Path | None = None,
    limit: int | None = None,
    keeps: Sequence[list[float]] | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    atol: float = 1e-3,
    checkpoint: str | None = None,
    trust: bool = False,
    console: Console,
) -> Report:
    """``ats-deploy validate``: an exported ONNX file against the reference its metadata names."""
    from ats_deploy.bench.source import changed_source, open_model, reference

    exported = open_model(path)
    if exported.is_engine:
        raise UserError(
            f"{path} is a TensorRT engine; validate checks ONNX files (the engine's kept patches are not visible).",
            hint="Validate the ONNX it was built from, then `ats-deploy bench --backend tensorrt` compares the engine.",
        )
    model = reference(exported, checkpoint, trust)
    warning = changed_source(exported, checkpoint)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    names, images = folder_inputs(model, data, limit, console) if data else default_inputs(model, limit or 8)
    stages = len(model.stages)
    keeps = [per_stage(k, stages) for k in keeps] if keeps else [[k] * stages for k in DEFAULT_KEEPS]
    return validate(str(path), model, names, images, keeps, batches, atol, console)


# A reduced-precision export is validated by agreement (ATS_SPEC.md section 5; the bars are on the precision's
# registry entry) on images it was not calibrated on, at full budget and two sampled ones.
REDUCED_KEEPS = (1.0, 0.72, 0.5)
REDUCED_BATCHES = (1, 8)
HELD_OUT_IMAGES = 100  # at most; fewer are said, and the verdict's bound allows for them


def held_out_inputs(
    model: ATSVisionTransformer, calibration, data: Path | None, console: Console, count: int = HELD_OUT_IMAGES
) -> tuple[list[str], torch.Tensor]:
    """The images an int8 export is validated on, said on ``console``: up to ``count`` readable images of ``data``
    (``--validation-data``), else of the calibration folder after the calibrated ones, else the scikit-image photos.
    """
    from ats_deploy.images import SAMPLE_PHOTOS, data_config

    from .precisions import int8

    if data is not None:
        names, images = folder_inputs(model, data, count, console)
        where = f"--validation-data {data}"
    else:
        calibrated = int8.read_calibration(calibration, model.num_classes, data_config(model.vit))
        console.print(f"calibrated on {calibrated.describe()} of {calibration.folder}", highlight=False, markup=False)
        held = int8.read_images(calibrated.rest, data_config(model.vit), count)
        if held.skipped:
            console.print(f"skipped {len(held.skipped)} unreadable held-out file(s)", highlight=False)
        names, images = held.names, torch.from_numpy(held.pixels)
        where = f"{calibration.folder} after the calibrated images"
        if not names:
            names, images = default_inputs(model, count=len(SAMPLE_PHOTOS))
            where = "the scikit-image photos: the calibration folder has no image left over"
    console.print(f"validating on {len(names)} held-out images ({where})", highlight=False, markup=False)
    if len(names) < count:
        console.print(
            f"note: only {len(names)} held-out images, fewer than the {count} validation asks for: each verdict "
            "allows for sampling error at this size (the agreement's 95% upper bound against the bar), so only a "
            "clear shortfall fails. Give --validation-data DIR with more images for a sharper verdict.",
            highlight=False, markup=False,
        )
    return names, images
