"""The token budget ``keep`` (docs/ATS.md section 2), parsed, checked, broadcast and formatted in one place.

A user gives keep as text (``--keep 0.7``, ``--keep 0.9,0.8,0.7``), a profile as a
number or a list, Python as a float or a sequence; every one of them becomes a
:class:`Keep`, so the rules (finite, positive, no fractional absolute budget, one
value or one per stage) and the way keep is printed and named exist once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import numpy as np

USAGE = "give a fraction in (0, 1] of the model's tokens (e.g. 0.7) or a whole number of tokens (e.g. 98)"
MIX_USAGE = (
    "Give the keeps to mix, comma-separated (--keep 0.5,0.7,1.0); a per-stage keep joins its stage values "
    "with ':' (--keep 1:0.9:0.8:0.7:0.7:0.7:0.6:0.6:0.5)."
)


@dataclass(frozen=True)
class Keep:
    """One keep value for every ATS stage, or one per stage; every value checked on creation."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise UserError(f"keep is empty: {USAGE}.")
        for value in self.values:
            _check(value)

    @classmethod
    def parse(cls, keep: Keep | str | float | Sequence[float]) -> Keep:
        """``"0.7"``, ``"0.9,0.8,0.7"``, ``0.7``, ``[0.9, 0.8]`` or a :class:`Keep`."""
        if isinstance(keep, Keep):
            return keep
        if isinstance(keep, str):
            try:
                values = [float(v) for v in keep.split(",") if v.strip()]
            except ValueError:
                raise UserError(
                    f"cannot read --keep '{keep}': give numbers, e.g. --keep 0.7 or --keep 0.9,0.8,0.7."
                ) from None
            return cls(tuple(values))
        if isinstance(keep, int | float):
            return cls((float(keep),))
        return cls(tuple(float(v) for v in keep))

    def per_stage(self, stages: int, owner: str | None = None) -> list[float]:
        """One value per ATS stage: a single value applies to all. ``owner`` (a profile) is named in the error."""
        if len(self.values) == 1:
            return list(self.values) * stages
        if len(self.values) != stages:
            given = f"{owner} gives {len(self.values)} keep values" if owner else f"keep has {len(self.values)} values"
            raise UserError(
                f"{given} but the model has {stages} ATS stages; give one value for all stages or one per stage."
            )
        return list(self.values)

    def budgets(self, stages: int, n0: int, prefix: int = 1) -> list[int]:
        """The per-stage budget K of spec section 2 (``prefix``: P), computed in float32 as an exported graph does."""
        from .ats import budget_int

        return [budget_int(v, n0, prefix) for v in self.per_stage(stages)]

    def notes(self, n0: int, prefix: int = 1) -> list[str]:
        """Values that the budget floors of spec section 2 give more tokens than they ask for."""
        from .ats import budget_int

        notes = []
        for value in sorted(set(self.values)):
            asked = math.floor(value * n0 + 0.5) if value <= 1 else math.floor(value)
            k = budget_int(value, n0, prefix)
            if k > asked:
                notes.append(f"keep {value:g} gives K = {k} tokens, the floor of spec section 2 (it asks for {asked})")
        return notes

    @classmethod
    def parse_mix(cls, text: str) -> list[Keep]:
        """A mix of keeps (``loadtest --keep 0.5,0.7,1.0``): comma-separated, a per-stage one joined with ``:``.

        Commas already separate the keeps, so the stage values of one take ``:``; each keep is checked as any other.
        """
        try:
            return [cls(tuple(float(v) for v in item.split(":"))) for item in text.split(",")]
        except ValueError:
            raise UserError(f"cannot read --keep '{text}'.", hint=MIX_USAGE) from None

    @property
    def mix_label(self) -> str:
        """How :meth:`parse_mix` reads it back: ``0.7``, or ``0.9:0.8:0.7`` per stage."""
        return str(self).replace(",", ":")

    def __str__(self) -> str:
        """``0.7`` when every stage has it, else ``0.9,0.8,0.7``: for reports and file names alike."""
        return f"{self.values[0]:g}" if len(set(self.values)) == 1 else ",".join(f"{v:g}" for v in self.values)


def _check(value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"keep value {value} is invalid: {USAGE}.")
    if value > 1 and value != int(value):
        floored = math.floor(value)
        # What the budget rule (docs/ATS.md section 2) would make of it: floored, then clamped to [P + 1, n0].
        tokens = (
            f"{floored} tokens (for a model of at least {floored})"
            if floored >= 2
            else "2 tokens (the floor P + 1, for a model with one class token)"
        )
        raise UserError(
            f"keep value {value:g} is above 1, so it is an absolute budget, which counts whole tokens: the budget "
            f"rule would take clamp(floor({value:g}), P + 1, n0) = {tokens}, not {value:g}: {USAGE}."
        )


def per_stage(keep: Keep | str | float | Sequence[float], stages: int) -> list[float]:
    """Shorthand for ``Keep.parse(keep).per_stage(stages)``: the checked per-stage list (none without stages)."""
    if stages == 0 and not isinstance(keep, str | int | float | Keep) and not len(keep):
        return []  # a model without ATS stages has no budget
    return Keep.parse(keep).per_stage(stages)


def keep_rows(keep: Sequence[float] | np.ndarray, batch: int) -> np.ndarray:
    """The float32 ``[batch, S]`` an exported file's ``keep`` input takes (interface version 2, spec section 4).

    One row ``[S]`` (a list, a numpy array or a CPU tensor) is repeated for every image;
    ``[batch, S]`` rows pass as they are, so callers that run one budget need not build rows.
    """
    import numpy as np

    values = np.asarray(keep, dtype=np.float32)
    if values.ndim == 2:
        return np.ascontiguousarray(values)
    return np.ascontiguousarray(np.broadcast_to(values, (batch, values.shape[-1])))


def format_keep(keep: Sequence[float]) -> str:
    """``str(Keep)`` of a per-stage list; ``-`` for a model without ATS stages."""
    return str(Keep(tuple(keep))) if keep else "-"
