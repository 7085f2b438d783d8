"""`postroom log ... --retry | --resend | --delete`: the web admin's bulk actions (Log page,
POST /log/bulk) from the command line, on every match of the log's filters or on the
messages named with ``--id``. postroom.ops.bulk does the work and writes the audit entry,
as for the admin; this module counts, asks and prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import typer

from postroom.commands._common import confirm_or_fail, console, fail, guard
from postroom.exceptions import MessageError

if TYPE_CHECKING:
    from postroom.runtime import Instance
    from postroom.store.log import LogFilter

_DOING = {"retry": "retry", "resend": "resend a copy of", "delete": "delete"}
_DONE = {"retry": "due again now", "resend": "copied into the queue",
         "delete": "deleted with their attempts"}


def chosen_action(*, retry: bool, resend: bool, delete: bool) -> str | None:
    """The one action flag given, or None (listing); two of them are refused."""
    given = [name for name, on in (("retry", retry), ("resend", resend), ("delete", delete))
             if on]
    if len(given) > 1:
        fail(MessageError(f"--{given[0]} and --{given[1]}: choose one action",
                          code="cli.usage"))
    return given[0] if given else None


def act(inst: Instance, action: str, flt: LogFilter, ids: Sequence[str], *,
        filtered: bool, yes: bool) -> None:
    """Count what ``action`` would touch, say it, ask (or require ``yes`` without a
    terminal), then do it through postroom.ops.bulk and report."""
    from postroom.audit import Actor
    from postroom.ops import bulk

    what = guard(lambda: bulk.parse_action(action))
    if ids and filtered:
        fail(MessageError("--id names the messages: give no other filter with it",
                          code="cli.usage"))
    if not ids and not filtered:
        fail(MessageError(f"--{action} on the whole log: give a filter (e.g. --status failed "
                          "--since 1d) or the messages with --id", code="cli.usage"))
    if ids:
        n, more = len(set(ids)), False
    else:
        inst.queue.log.catch_up()  # address and text filters read the search index
        n = guard(lambda: bulk.count(inst, Actor.cli(), flt, cap=bulk.COUNT_CAP + 1))
        more = n > bulk.COUNT_CAP
        n = min(n, bulk.COUNT_CAP)
    con = console()
    con.print(f"{'more than ' if more else ''}{n} message(s) match", markup=False)
    if n == 0:
        return
    count_text = f"{'more than ' if more else ''}{n} message(s)"
    confirm_or_fail(f"{_DOING[action].capitalize()} {count_text}?", yes=yes,
                    refusal=f"not going to {_DOING[action]} {count_text} without "
                    "confirmation: stdin is not a terminal; add --yes")
    result = guard(lambda: bulk.run(inst, Actor.cli(), what, ids=list(ids) or None,
                                    flt=None if ids else flt))
    con.print(f"{result.done} message(s) {_DONE[action]}"
              + (f"; {result.skipped} skipped" if result.skipped else ""), markup=False)
    for reason in result.errors:
        con.print(f"  skipped {reason}", markup=False, soft_wrap=True)
    if result.skipped and not result.done:
        raise typer.Exit(1)
