"""Rendering for the CLI: a rich console, progress bars and tables."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # smlaas.profile loads onnx and ONNX Runtime: not for every command
    from smlaas.profile import ProgressCallback

# Off a terminal (pipes, CI logs) rich would wrap at 80 columns; tables need more.
console = Console(highlight=False, soft_wrap=True,
                  width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


@contextmanager
def progress_bar(*, enabled: bool = True) -> Iterator[ProgressCallback | None]:
    """A progress callback that draws one bar per phase on stderr, when it is a terminal."""
    if not enabled or not errors.is_terminal:
        yield None
        return
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=errors, transient=False)
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], completed=done, total=total)

    with progress:
        yield update


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    result = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        result.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        result.add_row(*[str(cell) for cell in row])
    return result


def stop_on_ctrl_c_and_sigterm() -> None:
    """For long-running commands: Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, even
    when the process inherited SIGINT ignored (started as a background job of a script)."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
