"""What the CLI tests share: running a command, reading its output, fast profiles."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.profiles import dump_profile, load_profile


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def plain(text: str) -> str:
    """Output without colour codes, with rich's line wrapping undone."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def fast_profile(name: str) -> None:
    """./profiles/NAME.yaml: the built-in with 1 warm-up round, 2 timed rounds and 1 thread."""
    profile = dataclasses.replace(load_profile(name), warmup=1, iterations=2, threads=1)
    dump_profile(profile, Path("profiles") / f"{name}.yaml", ["fast copy for tests"])
