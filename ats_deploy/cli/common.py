"""What every command shares: the Typer app, the consoles, the user-error wrapper and the common options.

User errors (:class:`~ats_deploy.errors.UserError`) end in one red line naming the fix and a non-zero exit,
never a traceback; Ctrl-C ends in one line and exit status 130.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape
from rich.text import Text

from ..console import OutputConsole
from ..errors import UserError

app = typer.Typer(
    name="ats-deploy",
    help=(
        "Deploy Vision Transformers with Adaptive Token Sampling (ATS): export one ONNX file that "
        "serves every token budget K, validate it against PyTorch, build TensorRT engines, "
        "benchmark and tune K per device.\n\n"
        "Typical flow: **inspect** a checkpoint, **export** it with --dynamic, "
        "**bench** it with a device --profile, **tune** keep for that device."
    ),
    rich_markup_mode="markdown",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# No emoji codes: user text such as "skimage:coffee: ..." must print as written, never as an emoji. Not wrapped
# when not a terminal (a pipe, a log, CI): ats_deploy/console.py.
console = OutputConsole(emoji=False)
err_console = OutputConsole(stderr=True, emoji=False)

CheckpointArg = Annotated[
    str,
    typer.Argument(
        help="Checkpoint file (.pth/.pt/.safetensors: DeiT release, timm, ATS authors', ats-deploy's own) "
        "or random:SEED for random weights (needs --arch).",
        show_default=False,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="timm architecture, e.g. deit_small_patch16_224 (inferred when unambiguous)."),
]
StagesOpt = Annotated[
    str | None,
    typer.Option("--stages", help="ATS blocks, e.g. '3-11' or '3,5,7' (default: 3 to the last block)."),
]
KeepOpt = Annotated[
    str | None,
    typer.Option(
        "--keep",
        help="Token budget per ATS stage: one value for all stages or a comma list. "
        "(0, 1]: fraction of the model's tokens; > 1: absolute K.",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow checkpoints that need code to unpickle. Only for files from a source you trust.",
    ),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile", help="Device profile: a built-in name (see `ats-deploy profiles`), ./profiles/NAME.yaml or a path."
    ),
]
ReferenceOpt = Annotated[
    str | None,
    typer.Option("--checkpoint", help="Checkpoint for the PyTorch reference, when the one MODEL records has moved."),
]
AllowFailedOpt = Annotated[
    bool,
    typer.Option("--allow-failed-validation", help="Deploy MODEL even though its validation against the PyTorch "
                 "reference failed (the file is marked so; refused otherwise)."),
]


def user_errors(fn: Callable) -> Callable:
    """A command whose user errors print one clear message and exit non-zero, and whose Ctrl-C is one line."""

    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except UserError as err:  # messages quote user text (paths, names): never markup
            err_console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False)
            if err.hint:
                err_console.print(Text(err.hint), highlight=False)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:  # inside a command click would print "Aborted!" and exit 1
            interrupted()

    return wrapper


def interrupted() -> NoReturn:
    """Ctrl-C: one line and the shell's exit status for SIGINT (128 + 2), no traceback."""
    err_console.print("[yellow]interrupted[/]")
    raise SystemExit(130)


def parse_keep(text: str | None) -> list[float] | None:
    """``--keep`` text -> checked floats (:class:`~ats_deploy.keep.Keep`; the stage count is checked later)."""
    from ..keep import Keep

    return None if text is None else list(Keep.parse(text).values)


def print_notes(notes: Iterable[str]) -> None:
    """What loading or planning decided that the user should hear, before the work starts."""
    for note in notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def load(checkpoint: str, arch: str | None, stages: str | None, keep: str | None, trust: bool):
    """The checkpoint's ATS model, its loading notes said."""
    from ..checkpoints import load_model

    model = load_model(checkpoint, arch=arch, stages=stages, keep=parse_keep(keep), trust_code=trust)
    print_notes(model.load_notes)
    return model


def require_onnx(model: Path) -> None:
    """Refuse a MODEL argument that names no file, before any work."""
    if not model.is_file():
        raise UserError(f"ONNX file not found: {model}; export one with `ats-deploy export CHECKPOINT --dynamic`.")
