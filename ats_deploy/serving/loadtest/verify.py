"""``--verify``: served answers against the PyTorch reference, judged as ``ats-deploy validate`` and bench judge.

The reference is the one bench and validate build (:func:`ats_deploy.checkpoints.load_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ats_deploy import precision
from ats_deploy.checkpoints import load_reference
from ats_deploy.errors import UserError, ValidationFailed

from .drive import Answer, Sender
from .plan import Request, Target

# The largest |logit difference| of a token-identical answer: float32's tolerance, as bench and validate hold it.
ATOL = precision.get("fp32").tolerance


@dataclass
class Verification:
    """``--verify``: answers compared with the PyTorch reference, one validation case per keep of the mix."""

    asked: int  # answers asked for (--verify N)
    answers: int  # answers compared: fewer when fewer came back
    cases: list[Any]  # ats_deploy.exporters.compare.Case

    @property
    def compared(self) -> int:
        return sum(c.images for c in self.cases)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def check(self) -> None:
        """Raise :class:`~ats_deploy.errors.ValidationFailed` when an answer disagreed beyond float-tie flips."""
        if not self.ok:
            raise ValidationFailed("the served model disagrees with the PyTorch reference beyond float-tie flips "
                                   "(mismatches above).", "Check the served file with `ats-deploy validate MODEL`.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "answers": self.answers,
            "images": self.compared,
            "ok": self.ok,
            "cases": [{"keep": c.keep_label, **c.to_dict()} for c in self.cases],
        }


def reference_model(request: Request, target_: Target) -> Any:
    """The PyTorch reference ``--verify`` compares with: ``--checkpoint`` (or the export's own), its arch and stages."""
    artifact = target_.artifact
    if artifact is None:
        raise UserError(
            "--verify needs the served export's architecture and ATS stages, and the server does not give them.",
            hint="Pass --model FILE with the exported file the server serves.",
        )
    return load_reference(artifact, request.checkpoint, request.trust_checkpoint,
                          f"the served model '{target_.served.name}'")


def verify(answers: list[Answer], count: int, model: Any, sender: Sender) -> Verification:
    """Compare ``count`` answers (those that kept their logits) with the reference on the same pixels and keep rows.

    An int8 export is judged by top-1 agreement against its precision's bar, as export and bench judge it.
    """
    import torch

    from ats_deploy.backends.samples import samples
    from ats_deploy.exporters import compare

    judge = compare.Judge(model, ATOL)
    default = sender.target.default_keep
    reduced = compare.judged_by_agreement(sender.target.artifact.precision)
    cases = [compare.Case(keep=list(row) if row else default, batch=sender.batch, precision=reduced)
             for row in sender.mix.rows]
    chosen = [a for a in answers if a.logits is not None][:count]
    for answer in chosen:
        case = cases[answer.keep]
        pixels = torch.from_numpy(sender.images.pixels[answer.images])
        keep = case.rows(len(answer.images))
        observed = samples(answer.logits, answer.tokens)
        expected = compare.reference_samples(model, pixels, keep)
        names = [f"request {answer.index}: {sender.images.names[i]}" for i in answer.images]
        compare.compare_batch(case, judge, names, pixels, keep, observed, expected)
    return Verification(count, len(chosen), [c for c in cases if c.images or c.failures])
