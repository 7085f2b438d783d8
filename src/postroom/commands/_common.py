"""What the operator commands share: errors as one red line and an exit code, the instance,
time and duration formats, a progress bar that only draws on a terminal."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from postroom.commands.views import STATUS_STYLE as STATUS_STYLE
from postroom.commands.views import UNITS
from postroom.commands.views import console as console
from postroom.commands.views import relative as relative
from postroom.commands.views import when as when
from postroom.exceptions import ConfigError, MessageError, PostroomError

if TYPE_CHECKING:
    from postroom.runtime import Instance

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Configuration file (default: $POSTROOM_CONFIG or "
                 "./postroom.toml)", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]

def fail(err: PostroomError) -> NoReturn:
    """One line on stderr; exit 2 for configuration errors, 1 for the rest (as postroom.cli)."""
    from rich.markup import escape

    console(stderr=True).print(f"[bold red]error[/] [dim]({escape(err.code)})[/]: "
                               f"{escape(err.message)}", soft_wrap=True)
    raise typer.Exit(2 if isinstance(err, ConfigError) else 1)


def guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except PostroomError as err:
        fail(err)


def instance(config: Path | None) -> Instance:
    from postroom import settings as settings_mod
    from postroom.runtime import Instance

    return guard(lambda: Instance(settings_mod.load(config)))


def parse_time(value: str, option: str, now: float | None = None) -> float:
    """"30m", "2h", "7d", "4w" ago, or a date/time ("2026-11-21", "2026-11-21T08:00")."""
    m = re.fullmatch(r"(\d+)\s*([smhdw])", value.strip())
    if m:
        return (time.time() if now is None else now) - int(m.group(1)) * UNITS[m.group(2)]
    try:
        return dt.datetime.fromisoformat(value.strip()).timestamp()
    except ValueError as err:
        raise MessageError(f"{option} {value!r}: give an age like 30m, 2h, 30d or 4w, or a "
                           "date like 2026-11-21", code="cli.time") from err


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A Rich progress bar on stderr (a spinner when the total is unknown); yields
    ``advance(n)``. Nothing is drawn when stderr is not a terminal (scripts, logs)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    con = console(stderr=True)
    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    columns += [BarColumn(), MofNCompleteColumn()] if total is not None else [
        TextColumn("{task.completed}")]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=con, disable=not con.is_terminal, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def confirm_or_fail(question: str, *, yes: bool, refusal: str) -> None:
    """Ask on a terminal; without one, only ``--yes`` goes ahead (a script must say so)."""
    import sys

    if yes:
        return
    if not sys.stdin.isatty():
        fail(MessageError(refusal, code="cli.confirm"))
    if not typer.confirm(question, default=False):
        console(stderr=True).print("nothing done")
        raise typer.Exit(1)
