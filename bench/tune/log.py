"""The resumable JSON-lines log of a tune: a header with the conditions, then one line per finished measurement.

Every measurement is appended (and synced) as it completes, so a killed run loses at most the one in progress;
a rerun under the same conditions reads the log back and measures only what is missing. The objective is not a
condition: ``--max-drop 1`` then ``--latency-ms 20`` reuse the same measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ats_deploy.atomic import write_atomic
from ats_deploy.checkpoints import sha256_file
from ats_deploy.errors import UserError

from .. import run
from ..data import ImageFolder
from .measure import Dense, Measurement, budgets

LOG_VERSION = 1


def conditions(plan: run.Plan, checkpoint: str | None) -> dict[str, Any]:
    """What the measurements depend on; a log is only resumed under the same."""
    data = plan.data
    assert isinstance(data, ImageFolder)
    listing = "\n".join(f"{path.relative_to(data.root)}\t{label}" for path, label in data.files)
    profile = plan.profile
    return {
        "model_sha256": sha256_file(plan.measured),
        "reference": checkpoint or plan.exported.artifact.source_checkpoint,
        "backend": plan.backend,
        "precision": plan.precision,
        "batch": profile.batch,
        "warmup": profile.warmup,
        "iterations": profile.iterations,
        "threads": profile.threads,
        "data": str(data.root.resolve()),
        "images": len(data.files),
        "files_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
    }


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
        self.n0, self.prefix = n0, prefix  # the budget rule's n0 and P (measure.budgets)
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
