"""Validate an exported ONNX file against the PyTorch reference (ATS_SPEC.md section 5).

Like Optimum's post-export validation, with Polygraphy's plainness: the same
images and ``keep`` go through onnxruntime and the reference; one table says, per
``keep`` and batch size, the largest logit difference, token agreement and top-1
agreement. A token mismatch where the reference came within ``tie_tol`` of a
quantile boundary is a *flip*, reported by image, stage, patch and margin; any
other mismatch fails validation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ats_deploy.model import ATSVisionTransformer

from . import custom_op
from .onnx_export import read_metadata

DEFAULT_KEEPS = (1.0, 0.87, 0.72, 0.5)
DEFAULT_BATCHES = (1, 4)
# Runtimes round the cdf differently by ~1e-7; a quantile this close to a cdf
# value may land on either side of it.
TIE_TOL = 1e-5


@dataclass
class Flip:
    """One sampled token that moved between runtimes at a float tie."""

    image: str
    stage: int
    token: int
    margin: float

    def describe(self) -> str:
        where = "class token" if self.token == 0 else f"patch {self.token - 1}"
        return f"{self.image}: block {self.stage}, {where}, quantile {self.margin:.1e} from the cdf"


@dataclass
class Case:
    """One ``keep`` at one batch size over all images."""

    keep: list[float]
    batch: int
    images: int = 0
    max_logit_diff: float = 0.0
    token_matches: int = 0
    token_total: int = 0
    top1_matches: int = 0
    flips: list[Flip] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def keep_label(self) -> str:
        values = sorted(set(self.keep))
        return f"{values[0]:g}" if len(values) == 1 else ",".join(f"{v:g}" for v in self.keep)


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
        return [f"keep {c.keep_label}, batch {c.batch}: {msg}" for c in self.cases for msg in c.failures]


def session(path: str, threads: int | None = None):
    """An onnxruntime CPU session that does not spin idle threads (fair timings, quiet logs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if custom_op.uses_custom_op(path):
        custom_op.register(options)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_image(
    case: Case, name: str, ref, b: int, logits: np.ndarray, tokens: np.ndarray, model: ATSVisionTransformer, atol: float
) -> None:
    ref_logits = ref.logits[b].numpy()
    ref_tokens = ref.tokens[b].numpy()
    same_tokens = ref_tokens == tokens
    case.images += 1
    case.token_total += same_tokens.size
    case.token_matches += int(same_tokens.sum())
    case.top1_matches += int(ref_logits.argmax() == logits.argmax())
    diff = float(np.abs(ref_logits - logits).max())
    if same_tokens.all() and diff <= atol:
        case.max_logit_diff = max(case.max_logit_diff, diff)
        return
    margins = [float(m[b]) for m in ref.tie_margins]
    first = int(np.argmin(same_tokens)) if not same_tokens.all() else int(np.argmin(margins))
    candidates = range(first + 1)
    stage = min(candidates, key=lambda s: margins[s])
    if margins[stage] <= TIE_TOL:
        case.flips.append(Flip(name, model.stages[stage], int(ref.tie_tokens[stage][b]), margins[stage]))
        return
    case.max_logit_diff = max(case.max_logit_diff, diff)
    if not same_tokens.all():
        case.failures.append(
            f"{name}: block {model.stages[first]} kept {tokens[first]} tokens, the reference {ref_tokens[first]} "
            f"(closest tie {margins[stage]:.1e} > {TIE_TOL:.0e}: not a rounding flip)"
        )
    else:
        case.failures.append(f"{name}: logits differ by {diff:.2e} > atol {atol:.0e} with identical tokens")


def _run_case(
    sess, model: ATSVisionTransformer, names: Sequence[str], images: torch.Tensor, keep: list[float],
    batch: int, dynamic: bool, atol: float,
) -> Case:
    case = Case(keep=keep, batch=batch)
    keep_t = torch.tensor(keep, dtype=torch.float32)
    for start in range(0, len(images) - batch + 1, batch):
        chunk = images[start : start + batch]
        feeds = {"images": chunk.numpy()}
        if dynamic:
            feeds["keep"] = keep_t.numpy()
        logits, tokens = sess.run(["logits", "tokens"], feeds)
        with torch.no_grad():
            ref = model.forward_details(chunk, keep_t, probe=True)
        for b in range(batch):
            compare_image(case, names[start + b], ref, b, logits[b], tokens[b], model, atol)
    return case


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
    """Run ``onnx_path`` and ``model`` on ``images`` for every keep and batch size."""
    meta = read_metadata(onnx.load(onnx_path, load_external_data=False))
    dynamic = meta.get("dynamic", "true") == "true"
    if not dynamic:
        keeps = [[float(v) for v in json.loads(meta["keep"])]]
        batches = [int(meta["batch"])]
    sess = session(onnx_path)
    cases = []
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("validating against PyTorch", total=len(keeps) * len(batches))
        for keep in keeps:
            for batch in batches:
                cases.append(_run_case(sess, model, names, images, list(keep), batch, dynamic, atol))
                progress.advance(task)
    return Report(cases, atol)


def render(report: Report, console: Console) -> None:
    """The comparison table, then every flip and failure by name."""
    table = Table(title="ONNX (onnxruntime CPU) vs PyTorch reference", title_justify="left")
    for column in ("keep", "batch", "images", "max |Δlogit|", "tokens agree", "top-1 agree", "flips", "result"):
        table.add_column(column, justify="right" if column not in ("keep", "result") else "left")
    for c in report.cases:
        table.add_row(
            c.keep_label,
            str(c.batch),
            str(c.images),
            f"{c.max_logit_diff:.1e}",
            f"{c.token_matches}/{c.token_total}",
            f"{c.top1_matches}/{c.images}",
            str(len(c.flips)),
            "[green]ok[/]" if c.ok else "[red]FAIL[/]",
        )
    console.print(table)
    for flip in report.flips:
        console.print(f"[yellow]flip at a float tie[/] {flip.describe()}")
    for failure in report.failures:
        console.print(f"[red]mismatch[/] {failure}")
