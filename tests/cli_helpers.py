"""What the CLI tests share: running a command, reading its output, fast profiles."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path
from unittest import mock

import typer.rich_utils
from typer.testing import CliRunner

from ats_deploy.cli import app
from ats_deploy.profiles import dump_profile, load_profile

# typer draws --help as boxed panels at COLUMNS (its layout wraps inside them, whatever ats-deploy's consoles do):
# tests draw them this wide, so that no test depends on the terminal width.
HELP_WIDTH = 200


def invoke(*args: object):
    with mock.patch.object(typer.rich_utils, "MAX_WIDTH", HELP_WIDTH):
        return CliRunner().invoke(app, [str(a) for a in args])


def plain(text: str) -> str:
    """Output without colour codes, its whitespace (table padding, line ends) collapsed to single spaces.

    Output that is not a terminal is never wrapped (ats_deploy/console.py), so this does not depend on COLUMNS.
    """
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def fast_profile(name: str) -> None:
    """./profiles/NAME.yaml: the built-in with 1 warm-up round, 2 timed rounds and 1 thread."""
    profile = dataclasses.replace(load_profile(name), warmup=1, iterations=2, threads=1)
    dump_profile(profile, Path("profiles") / f"{name}.yaml", ["fast copy for tests"])


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the kernel's ephemeral picks, released again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
