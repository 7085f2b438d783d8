"""`postroom events`: what happened that is worth knowing (connections down and up, fallbacks,
OAuth grants dying...), oldest first; ``--follow`` keeps printing new ones (postroom.events)."""

from __future__ import annotations

import functools
import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from postroom import events
from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance, parse_time
from postroom.commands.views import event_line

if TYPE_CHECKING:
    from rich.console import Console

FOLLOW_EVERY = 1.0  # seconds between two looks for new events with --follow


def show(ev: events.Event, con: Console, as_json: bool) -> None:
    """One event on one line (JSON Lines with ``as_json``)."""
    if as_json:
        print(json.dumps(ev.as_dict(), ensure_ascii=False), flush=True)
        return
    event_line(con, ev.as_dict())


def events_cmd(
    since: Annotated[str | None, typer.Option(
        "--since", help="Newer than: 30m, 1h, 7d, or a date/time (2026-11-21T08:00)",
        show_default=False)] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Only this kind (repeat it, or separate with commas): "
        "connection_down, fallback_used, oauth_grant_dead...", show_default=False)] = None,
    connection: Annotated[str | None, typer.Option(
        "--connection", help="Only about this connection (or its OAuth grant)",
        show_default=False)] = None,
    message: Annotated[str | None, typer.Option(
        "--message", help="Only about this message id", show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=events.READ_LIMIT,
                                       help="The last this many")] = 50,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new events as they come (Ctrl-C stops)")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("events").
    kinds = guard(lambda: events.parse_kinds(kind or [], "--kind"))
    since_ts = guard(lambda: parse_time(since, "--since")) if since else None
    inst = instance(config)
    con = console()
    fetch = functools.partial(events.read, inst.engine, kinds=kinds, connection=connection,
                              message_id=message)
    # Following goes on after the newest event now, taken before the first read: nothing
    # recorded in between is missed, nothing printed twice.
    last = events.last_id(inst.engine) if follow else 0
    found = fetch(since=since_ts, limit=limit)
    for ev in found:
        show(ev, con, as_json)
    if not follow:
        if not found and not as_json:
            con.print("no event matches" if kind or connection or message or since
                      else "no event recorded yet")
        return
    last = max([last, *(ev.id or 0 for ev in found)])
    try:
        while True:
            time.sleep(FOLLOW_EVERY)
            for ev in fetch(after_id=last, limit=events.READ_LIMIT):
                show(ev, con, as_json)
                last = ev.id or last
    except KeyboardInterrupt:  # Ctrl-C ends following: not an error
        return
