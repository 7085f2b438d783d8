"""`postroom suppressions list|add|remove|import`: the addresses no mail is sent to
(postroom.suppression; the actions in postroom.ops.suppressions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from postroom.audit import Actor
from postroom.commands._common import ConfigOpt, JsonOpt, console, fail, guard, instance, when
from postroom.commands.registry import help_of
from postroom.exceptions import MessageError
from postroom.ops import suppressions as ops
from postroom.suppression import GLOBAL

cli = typer.Typer(help=help_of("suppressions"), no_args_is_help=True)

ScopeOpt = Annotated[str, typer.Option(
    "--scope", help="* (every sender) or a sender domain, e.g. shop.example.com")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (shown in the log of each "
                                        "message not sent)")]


@cli.command("list")
def list_entries(
    contains: Annotated[str | None, typer.Option(
        "--contains", help="Part of the address", show_default=False)] = None,
    scope: Annotated[str | None, typer.Option(
        "--scope", help="Only this scope: * or a sender domain", show_default=False)] = None,
    source: Annotated[str | None, typer.Option(
        "--source", help="bounce, complaint, unsubscribe, manual or import",
        show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List suppressed addresses, newest first."""
    from rich.markup import escape
    from rich.table import Table

    inst = instance(config)
    rows = guard(lambda: ops.list_entries(inst, Actor.cli(), contains=contains, scope=scope,
                                          source=source, limit=limit))
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], ensure_ascii=False, indent=2))
        return
    if not rows:
        console().print("the suppression list is empty" if not (contains or scope or source)
                        else "no entry matches")
        return
    table = Table("address", "scope", "source", "added", "reason")
    for r in rows:
        table.add_row(escape(r.address), escape(r.scope), r.source, when(r.created_at),
                      escape(r.reason))
    console().print(table)


@cli.command("add")
def add(address: str, scope: ScopeOpt = GLOBAL, reason: ReasonOpt = "",
        config: ConfigOpt = None) -> None:
    """Stop sending to ADDRESS (for every sender, or one sender domain with --scope)."""
    inst = instance(config)
    entry = guard(lambda: ops.add_entry(inst, Actor.cli(), address, scope, reason))
    console().print(f"{entry.address} suppressed for {entry.scope}", soft_wrap=True,
                    markup=False)


@cli.command("remove")
def remove(
    address: str, scope: ScopeOpt = GLOBAL,
    all_scopes: Annotated[bool, typer.Option(
        "--all-scopes", help="Remove it from every scope")] = False,
    config: ConfigOpt = None,
) -> None:
    """Send to ADDRESS again (its entry for --scope, or every one with --all-scopes)."""
    inst = instance(config)
    gone = guard(lambda: ops.remove_entry(inst, Actor.cli(), address,
                                          None if all_scopes else scope))
    console().print(f"{address} removed from the suppression list ({gone} "
                    f"entr{'y' if gone == 1 else 'ies'})", soft_wrap=True, markup=False)


def read_bounded(path: Path, limit: int) -> bytes:
    """The file (``-``: standard input), refused once it is over ``limit`` bytes without
    reading the rest."""
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with path.open("rb") as f:
                data = f.read(limit + 1)
    except OSError as err:
        fail(MessageError(f"cannot read {path}: {err.strerror or err}",
                          code="suppression.import_file"))
    if len(data) > limit:
        fail(ops.too_big(None))
    return data


@cli.command("import")
def import_file(
    file: Annotated[Path, typer.Argument(help="CSV (address[,scope[,reason]]) or one address "
                                         "per line; - for standard input")],
    scope: ScopeOpt = GLOBAL, reason: ReasonOpt = "", config: ConfigOpt = None,
) -> None:
    """Add every address of a file; bad lines are reported and skipped."""
    data = read_bounded(file, ops.MAX_IMPORT_BYTES)
    inst = instance(config)
    done = guard(lambda: ops.import_entries(inst, Actor.cli(), data, scope=scope,
                                            reason=reason))
    con = console()
    con.print(f"{done.added} added, {done.existing} listed already, {done.bad_lines} bad "
              f"line{'' if done.bad_lines == 1 else 's'}", markup=False)
    err = console(stderr=True)
    for number, why in done.errors:
        err.print(f"line {number}: {why}", soft_wrap=True, markup=False)
    if done.bad_lines > len(done.errors):
        err.print(f"... and {done.bad_lines - len(done.errors)} more bad lines", markup=False)
    if done.bad_lines:
        raise typer.Exit(1)
