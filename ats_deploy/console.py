"""The CLI's rich consoles, and progress that shows on a terminal and in a log alike.

Output to a pipe, a log file or CI is searched and parsed, and there rich would wrap at
``COLUMNS`` (80 when unset), splitting paths and sentences across lines. When not writing to a
terminal, lines are as long as their text, tables take the width their cells need, and a table's
title (often a path) prints whole.

rich's spinners and progress bars draw nothing off a terminal, so a long run logged to a file
was silent for minutes: :func:`step` and :func:`counted` print plain lines there instead.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator

from rich.console import Console, ConsoleDimensions, ConsoleRenderable, RenderHook
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

# Width of a console that is not a terminal: wider than any line ats-deploy prints, so none wraps.
UNWRAPPED = 100_000


class _WholeTitles(RenderHook):
    """Off a terminal, a table's title is not wrapped to the table's width (rich wraps it there)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        if self.console.is_terminal:
            return renderables
        return [self._whole_title(r) if isinstance(r, Table) and r.title else r for r in renderables]

    def _whole_title(self, table: Table) -> Table:
        title = self.console.render_str(table.title) if isinstance(table.title, str) else table.title.copy()
        title.no_wrap, title.overflow = True, "ignore"
        table = copy.copy(table)  # the caller's table is left as it was
        table.title = title
        return table


class OutputConsole(Console):
    """A rich console that wraps lines only when it writes to a terminal (decided at each print)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.push_render_hook(_WholeTitles(self))

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED, size.height)


@contextlib.contextmanager
def step(console: Console, text: str) -> Iterator[None]:
    """A long step without a count: a spinner on a terminal; elsewhere a line when it starts and one when it ends."""
    if console.is_terminal:
        with console.status(escape(text)):
            yield
        return
    start = time.perf_counter()
    console.print(f"{escape(text)} ...", highlight=False)
    yield
    console.print(f"{escape(text)}: done in {time.perf_counter() - start:.1f} s", highlight=False)


LOGGED_STEPS = 10  # off a terminal, a counted pass prints a line at each tenth of its total


@contextlib.contextmanager
def counted(console: Console, text: str, total: int) -> Iterator[Callable[[int], None]]:
    """A pass over ``total`` items, advanced by the callable it yields: a progress bar on a terminal; elsewhere a line
    when it starts, at each tenth and when it ends, with the time taken so far."""
    if console.is_terminal:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(escape(text), total=total)
            yield lambda count: progress.advance(task, count)
        return
    start, done, logged = time.perf_counter(), [0], [0]

    def say(what: str) -> None:
        console.print(f"{escape(text)}: {what}, {time.perf_counter() - start:.1f} s", highlight=False)

    def advance(count: int) -> None:
        done[0] += count
        tenth = done[0] * LOGGED_STEPS // max(total, 1)
        if tenth > logged[0] and done[0] < total:
            logged[0] = tenth
            say(f"{done[0]}/{total}")

    say(f"0/{total}")
    yield advance
    say(f"done ({done[0]}/{total})")
