"""The resumable JSON-lines log of a tune: a header with the conditions, then one line per finished measurement.

``ats-deploy tune`` writes it, under the conditions its measuring depends on (``bench/tune/measure.py``);
``serve --slo-ms`` reads its settings back as a keep ladder (:func:`read_log`). The record types (:class:`Dense`,
:class:`Measurement`) are the file's format, so they live here, below both.

Every measurement is appended (and synced) as it completes, so a killed run loses at most the one in progress;
a rerun under the same conditions reads the log back and measures only what is missing. The objective is not a
condition: ``--max-drop 1`` then ``--latency-ms 20`` reuse the same measurements.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic
from .errors import UserError
from .keep import Keep

LOG_VERSION = 1
SUFFIX = ".log.jsonl"  # tune writes its log beside the tuned profile: cpu-tuned.yaml -> cpu-tuned.log.jsonl

KeepValues = tuple[float, ...]  # one keep value per ATS stage


def budgets(keep: KeepValues, n0: int, prefix: int) -> tuple[int, ...]:
    """The integer budget K of every stage: what identifies a setting (docs/ATS.md section 2).

    ``prefix`` is the model's ``P``: the budget's floors (``P + 7``, ``P + 1``) depend on it.
    """
    return tuple(Keep(keep).budgets(len(keep), n0, prefix))


def _bits(correct: np.ndarray) -> str:
    return "".join("1" if c else "0" for c in correct)


def _unbits(text: str) -> np.ndarray:
    return np.array([c == "1" for c in text], dtype=bool)


@dataclass(frozen=True)
class Dense:
    """The dense export on the images: which it gets right, and its cost."""

    correct: np.ndarray  # [images] bool
    gflops: float
    skipped: list[tuple[str, str]]  # unreadable files: name, reason

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def to_record(self) -> dict[str, Any]:
        return {"kind": "dense", "correct": _bits(self.correct), "gflops": self.gflops, "skipped": self.skipped}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Dense:
        skipped = [(name, reason) for name, reason in record["skipped"]]
        return cls(_unbits(record["correct"]), float(record["gflops"]), skipped)


@dataclass(frozen=True)
class Measurement:
    """One keep setting: per-image correctness, mean GFLOPs, and p50 latencies from the same interleaved rounds."""

    keep: KeepValues
    correct: np.ndarray  # [images] bool
    gflops: float
    p50_ms: float
    dense_p50_ms: float  # the dense export, timed in the same rounds
    tokens: list[float]  # mean kept tokens per ATS stage
    # The dense export's time over this setting's, round by round (timing.paired_ratio), so that drift cancels.
    speedup: float
    # Validation's comparison of the export with the PyTorch reference at this keep: what failed ([]: it agrees).
    # None where nothing was compared: the PyTorch backend, or a log line written before tune compared.
    failures: list[str] | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def to_record(self, n0: int, prefix: int) -> dict[str, Any]:
        return {
            "kind": "setting",
            "keep": list(self.keep),
            "budgets": list(budgets(self.keep, n0, prefix)),
            "correct": _bits(self.correct),
            "gflops": self.gflops,
            "p50_ms": self.p50_ms,
            "dense_p50_ms": self.dense_p50_ms,
            "tokens": self.tokens,
            "speedup": self.speedup,
            "failures": self.failures,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Measurement:
        """A log line; the fields added since tune's first logs fall back, so older logs still resume."""
        failures = record.get("failures")
        return cls(
            keep=Keep(tuple(float(v) for v in record["keep"])).values,  # a damaged value fails as a bad record
            correct=_unbits(record["correct"]),
            gflops=float(record["gflops"]),
            p50_ms=float(record["p50_ms"]),
            dense_p50_ms=float(record["dense_p50_ms"]),
            tokens=[float(v) for v in record["tokens"]],
            # logs written before the paired speedup: the ratio of the two medians
            speedup=float(record.get("speedup", record["dense_p50_ms"] / record["p50_ms"])),
            failures=None if failures is None else [str(f) for f in failures],
        )


def read_log(path: Path) -> tuple[dict[str, Any], Dense, list[Measurement]]:
    """A log read as it is, never repaired: its header, the dense model's record and every measured setting.

    For readers other than tune (``serve --slo-ms`` takes its keep ladder from the settings). A file that is not
    such a log raises what parsing it raised (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration,
    UserError); the reader says what it needed the log for.
    """
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = records[0]
    dense = next(Dense.from_record(r) for r in records if r.get("kind") == "dense")
    return header, dense, [Measurement.from_record(r) for r in records if r.get("kind") == "setting"]


def header(conditions: dict[str, Any], arguments: dict[str, Any], created: str) -> dict[str, Any]:
    """The log's first line: the conditions it is resumed under, and (for people) the arguments of the run."""
    return {
        "kind": "header",
        "version": LOG_VERSION,
        "created": created,
        "conditions": conditions,
        "arguments": arguments,
    }


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Log:
    """The JSON-lines record of a tune: a header with the conditions, then one line per finished measurement."""

    def __init__(self, path: Path, n0: int, prefix: int) -> None:
        self.path = path
        self.n0, self.prefix = n0, prefix  # the budget rule's n0 and P (budgets)
        self.dense: Dense | None = None
        self.settings: dict[tuple[int, ...], Measurement] = {}
    @classmethod
    def open(cls, path: Path, header: dict[str, Any], n0: int, prefix: int, fresh: bool) -> Log:
        """Resume the log at ``path`` when it was written under ``header``'s conditions, else start one."""
        log = cls(path, n0, prefix)
        if fresh or not path.exists():
            write_atomic(path, (json.dumps(header) + "\n").encode("utf-8"))
            return log
        records = log._read()
        first = records[0] if records and isinstance(records[0], dict) else {}
        log._check_header(first, header["conditions"])
        for record in records[1:]:
            log._load(record)
        return log

    def _refuse(self, problem: str) -> UserError:
        return UserError(
            f"log {self.path} {problem}",
            hint="Pass --fresh to discard it and measure again, or --log FILE to keep it and write another log.",
        )

    def _read(self) -> list[dict[str, Any]]:
        """The log's records; an unfinished last line (a run killed while writing) is dropped from the file."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as err:
            raise self._refuse(f"cannot be read: {err}.") from None
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise self._refuse(f"is damaged at line {number}.") from None
        if lines and (len(records) < len(lines) or not lines[-1].endswith("\n")):
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
        return records

    def _check_header(self, first: dict[str, Any], conditions: dict[str, Any]) -> None:
        if first.get("kind") != "header" or first.get("version") != LOG_VERSION:
            raise self._refuse("is not a log of this version of `ats-deploy tune`.")
        logged = first.get("conditions", {})
        if logged != conditions:
            differ = sorted(k for k in {*logged, *conditions} if logged.get(k) != conditions.get(k))
            raise self._refuse(
                f"holds measurements taken under other conditions (they differ in: {', '.join(differ)}); "
                "tune does not mix them."
            )

    def _load(self, record: dict[str, Any]) -> None:
        try:
            if record["kind"] == "dense":
                self.dense = Dense.from_record(record)
            else:
                m = Measurement.from_record(record)
                self.settings[budgets(m.keep, self.n0, self.prefix)] = m
        except (KeyError, TypeError, ValueError, AttributeError, UserError):
            raise self._refuse(f"has a record tune cannot read: {json.dumps(record)[:80]}...") from None

    def add_dense(self, dense: Dense) -> None:
        _append_line(self.path, dense.to_record())
        self.dense = dense

    def add(self, m: Measurement) -> None:
        if self.dense is not None and len(m.correct) != len(self.dense.correct):
            raise self._refuse(
                f"was measured on {len(self.dense.correct)} readable images, and {len(m.correct)} read now: "
                "the images changed."
            )
        _append_line(self.path, m.to_record(self.n0, self.prefix))
        self.settings[budgets(m.keep, self.n0, self.prefix)] = m
