"""The ``ats-deploy`` command line: checkpoint -> model -> ONNX -> engine -> bench report.

One module per group of commands, each command parsing its options, calling one library function and printing
what it returns: :mod:`.models` (inspect, convert, predict, visualize), :mod:`.export` (export, validate, check,
build), :mod:`.bench` (bench, tune, profiles) and :mod:`.serving` (triton, serve, loadtest); what they share
(the app, the consoles, the common options, the user-error wrapper) is in :mod:`.common`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import bench, export, models, serving
from .common import app, console, interrupted

# In the order `ats-deploy --help` lists them: the typical flow first.
COMMANDS = (
    models.inspect, models.convert, models.predict, export.export, export.check, bench.bench, export.validate,
    bench.profiles, models.visualize, bench.tune, export.build, serving.triton, serving.serve, serving.loadtest,
)
for _command in COMMANDS:
    app.command()(_command)


def _version(value: bool) -> None:
    if value:
        console.print(f"ats-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Deploy ViTs with Adaptive Token Sampling."""


def main() -> None:
    """The ``ats-deploy`` entry point: Ctrl-C outside a command (typer building the CLI, say) is one line too."""
    try:
        app()
    except KeyboardInterrupt:
        interrupted()
