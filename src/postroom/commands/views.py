"""How `postroom log`, `show` and `queue list` print what they read, from plain rows (the
dicts the store returns, or the same rows as JSON from a running `postroom serve`,
postroom.control). One copy of the output for both ways, so that it is the same byte for
byte whichever answered.

Imports neither Typer, nor SQLAlchemy, nor pydantic: the answer from a running server is
printed by a process that loads Rich and this module, nothing more. Rich is imported in
the functions (`--json` needs none of it).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from postroom.exceptions import MessageError

if TYPE_CHECKING:
    from rich.console import Console

STATUS_STYLE = {"sent": "green", "partial": "yellow", "deferred": "yellow", "failed": "red",
                "queued": "cyan", "sending": "cyan", "suppressed": "magenta"}
EVENT_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}  # events.Severity values
PRIORITY = {"high": 1, "normal": 0, "low": -1}  # `queue list --priority`
PRIORITY_NAME = {v: k for k, v in PRIORITY.items()}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}  # ages: 30m, 2h, 7d


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def relative(ts: float | None, now: float) -> str:
    """"due", "in 4m", "in 2h 5m", "3m ago"."""
    if ts is None:
        return "-"
    delta = ts - now
    if -1 < delta <= 0:
        return "due"
    secs = int(abs(delta))
    text = (f"{secs}s" if secs < 60 else f"{secs // 60}m" if secs < 3600
            else f"{secs // 3600}h {secs % 3600 // 60}m" if secs < 86400
            else f"{secs // 86400}d {secs % 86400 // 3600}h")
    return f"in {text}" if delta > 0 else f"due ({text} ago)"


def parse_since(value: str) -> float:
    """`log --since/--until`: 30m, 2h, 7d ago, or a date."""
    m = re.fullmatch(r"(\d+)([smhdw])", value.strip())
    if m:
        return time.time() - int(m.group(1)) * UNITS[m.group(2)]
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError as err:
        raise MessageError(f"--since {value!r}: use 30m, 2h, 7d or a date like 2026-11-21",
                           code="cli.since") from err


def json_lines(rows: Sequence[Mapping[str, Any]]) -> None:
    for r in rows:
        print(json.dumps(r, default=str))


def log_table(rows: Sequence[Mapping[str, Any]]) -> None:
    """`postroom log`: the page as a table."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(rows)} message(s)", title_justify="left")
    for col in ("id", "created", "status", "from", "to", "subject", "tries", "last error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        style = STATUS_STYLE.get(r["status"], "white")
        # Cells are markup: escape what comes from mail (a Subject like "[URGENT] ... [/]").
        table.add_row(r["id"][:12], when(r["created_at"]), f"[{style}]{r['status']}[/]",
                      escape(r["sender"] or "<>"), escape(", ".join(r["recipients"])),
                      escape(r["subject"]), str(r["attempt_count"]),
                      escape((r["last_error"] or "")[:80]))
    console().print(table)


def queue_table(rows: Sequence[Mapping[str, Any]], counts: Mapping[str, int], paused: bool,
                now: float) -> None:
    """`postroom queue list`: the waiting messages in the order the workers take them."""
    from rich.markup import escape
    from rich.table import Table

    title = (f"{len(rows)} shown · {counts['queued']} queued, {counts['sending']} sending, "
             f"{counts['deferred']} deferred" + (" · [bold yellow]PAUSED[/]" if paused else ""))
    table = Table(title=title, title_justify="left")
    for col in ("id", "status", "prio", "next attempt", "tries", "from", "to", "subject",
                "last error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        style = STATUS_STYLE.get(r["status"], "white")
        nxt = "-" if r["status"] == "sending" else relative(r["next_attempt_at"], now)
        # Cells are markup: escape what comes from mail (a Subject like "[URGENT] ... [/]").
        table.add_row(r["id"][:12], f"[{style}]{r['status']}[/]",
                      PRIORITY_NAME.get(r["priority"], str(r["priority"])), nxt,
                      str(r["attempt_count"]), escape(r["sender"] or "<>"),
                      escape(", ".join(r["recipients"])), escape(r["subject"]),
                      escape((r["last_error"] or "")[:80]))
    console().print(table)


def print_advice(con: Console, advice: Mapping[str, Any] | None, indent: str = "  ") -> None:
    """One advice entry (diagnostics.advice.Advice.to_dict()) under an attempt or an error."""
    from rich.markup import escape

    if not advice:
        return
    who = f" ({escape(str(advice['recipient']))})" if advice.get("recipient") else ""
    con.print(f"{indent}[bold yellow]why[/]{who}: {escape(str(advice['cause']))}",
              soft_wrap=True)
    con.print(f"{indent}[bold green]fix[/]: {escape(str(advice['fix']))}", soft_wrap=True)
    for url in advice.get("docs") or ():
        con.print(f"{indent}[dim]see {escape(str(url))}[/]", soft_wrap=True)


def print_attempt(a: Mapping[str, Any], advice: Mapping[str, Any] | None = None) -> None:
    """One delivery attempt with its transcript, and what its failure means (``advice``,
    diagnostics.advice.advice_for_attempt)."""
    from rich.markup import escape

    con = console()
    style = STATUS_STYLE.get(a["outcome"], "white")
    con.print(f"[bold]attempt[/] via [bold]{a['connection']}[/] {when(a['started_at'])} "
              f"({(a['ended_at'] - a['started_at']) * 1000:.0f} ms): [{style}]{a['outcome']}[/]")
    if a.get("error_code"):
        con.print(f"  error [dim]({escape(a['error_code'])})[/]: "
                  f"{escape(a.get('reply_text') or '')}")
    if a.get("provider_id"):  # what the provider's delivery events and support call it
        con.print(f"  provider id: {a['provider_id']}", markup=False)
    for rcpt, r in (a.get("recipients") or {}).items():
        con.print(f"  {rcpt}: {r.get('code')} {r.get('reply', '')} → {r.get('state')}",
                  markup=False)
    if a.get("transcript"):
        con.print("  [dim]transcript:[/]")
        for line in a["transcript"].splitlines():
            con.print(f"    {line}", markup=False, highlight=False)
    print_advice(con, advice)


def event_line(con: Console, ev: Mapping[str, Any]) -> None:
    """One event (postroom.events.Event.as_dict()) on one line."""
    from rich.text import Text

    about = ev["connection"] or ""
    if ev["message_id"]:
        about = f"{about} {ev['message_id']}".strip()
    line = Text(f"{when(ev['at'])}  ")
    line.append(f"{ev['severity']:<7}  {ev['kind']}", style=EVENT_STYLE[ev["severity"]])
    line.append(f"  {about}  {ev['detail']}" if about else f"  {ev['detail']}")
    con.print(line, soft_wrap=True)


def show_message(found: Mapping[str, Any], as_json: bool) -> None:
    """`postroom show`: ``found`` as postroom.control.show_data made it."""
    m = found["message"]
    if as_json:
        print(json.dumps(m, default=str, indent=2))
        return
    con = console()
    style = STATUS_STYLE.get(m["status"], "white")
    con.print(f"[bold]{m['id']}[/]  [{style}]{m['status']}[/]  queued {when(m['created_at'])}"
              f"  from {m['source']}")
    con.print(f"Message-ID {m['message_id']}  Subject: {m['subject']}", markup=False)
    con.print(f"envelope: <{m['sender']}> → {', '.join(m['recipients'])}  ({m['size']} bytes)",
              markup=False)
    for rcpt, st in m["rcpt_status"].items():
        forced = ""
        if st.get("forced"):  # a copy the policy added: retried on its own (postroom.policy)
            forced = f" (added by the message policy: {st['forced']}"
            if st.get("state") == "pending" and m.get("copy_due"):
                forced += f"; retried on its own, next try {when(m['copy_due'])}"
            forced += ")"
        con.print(f"  {rcpt}: {st.get('state')} {st.get('code', '')} {st.get('reply', '')}"
                  f"{forced}", markup=False)
    if m["status"] == "deferred":
        con.print(f"next attempt {when(m['next_attempt_at'])}")
    for a, advice in zip(m["attempts"], found["advice"], strict=True):
        print_attempt(a, advice)
    if found["reported"]:  # what the provider (webhooks) or a DSN said happened after it left
        con.print("[bold]Delivery events[/]")
        for ev in found["reported"]:
            hard = {True: " (hard)", False: " (soft)"}.get(ev["permanent"], "")
            con.print(f"  {when(ev['at'])}  {ev['kind']}{hard}  {ev['recipient'] or ''}  "
                      f"{ev['detail']}  [{ev['connection']}]", markup=False)
    if found["events"]:
        con.print("[bold]Events[/]")
        for item in found["events"]:
            event_line(con, item)
