"""`postroom doctor [--domain D]`: SPF, DKIM, DMARC and MX of the sending domains, judged
against the configured connections, plus each connection's health
(postroom.diagnostics.doctor)."""

from __future__ import annotations

import io
import json
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance

if TYPE_CHECKING:  # Rich's console and tables load when a report is printed, as elsewhere
    from rich.console import Console
    from rich.table import Table

_STYLE = {"ok": ("green", "ok"), "info": ("cyan", "info"), "warn": ("yellow", "warn"),
          "fail": ("bold red", "FAIL")}


def doctor(
    domain: Annotated[list[str] | None, typer.Option(
        "--domain", "-d", help="Sending domain to check (repeat; default: the domains of the "
        "connections' senders)")] = None,
    selector: Annotated[list[str] | None, typer.Option(
        "--selector", "-s", help="DKIM selector to look for too (repeat; common ones, the "
        "connections' and Postroom's own are always tried)")] = None,
    dns_server: Annotated[str | None, typer.Option(
        "--dns-server", help="DNS server to ask, IP[:PORT] (default: this machine's "
        "resolver)")] = None,
    connect: Annotated[bool, typer.Option(
        "--connect/--no-connect", help="Also log in to each connection (no mail is sent)")]
    = True,
    timeout: Annotated[float, typer.Option(min=0.5, max=300, help="Seconds per DNS lookup "
                                           "and per connection check")] = 10.0,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    # Its help, which `postroom --help` lists: postroom.commands.registry ("doctor").
    from postroom.diagnostics import doctor as doc
    from postroom.diagnostics.dns import Resolver
    from postroom.dkim import check_domain

    def domains() -> list[str]:
        out = []
        for d in domain or []:
            try:
                out.append(check_domain(d))
            except ValueError as err:
                from postroom.exceptions import ConfigError

                raise ConfigError(f"--domain: {err}", code="doctor.domain") from err
        return out

    wanted = guard(domains)
    inst = instance(config)
    resolver = guard(lambda: Resolver(dns_server, timeout=min(timeout, 10.0)))
    report = guard(lambda: doc.run(inst, resolver, wanted, connect=connect, timeout=timeout,
                                      selectors=selector or ()))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    raise typer.Exit(1 if report.failed else 0)


# Width when the output is not a terminal and COLUMNS is not set: a file or a log keeps
# each finding on one line instead of Rich's default 80 columns, which cut phrases mid-way.
_UNWRAPPED = 4096


def _console() -> Console:
    from rich.console import Console

    con = console()
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        return Console(highlight=False, width=_UNWRAPPED)
    return con


def _table(subject: str, findings: list[Any], below: dict[str, int]) -> Table:
    """One subject's findings; a record listed in ``below`` is referred to by its number
    instead of being shown in the cell."""
    from rich.markup import escape
    from rich.table import Table

    table = Table("check", "", "finding", title=subject, title_justify="left",
                  show_lines=False, expand=False)
    for f in findings:
        style, word = _STYLE.get(f.status, ("white", f.status))
        text = escape(f.summary)
        if f.fix:
            text += f"\n[bold]fix:[/] {escape(f.fix)}"
        if f.record is not None:
            zone = f.record.zone()
            text += (f"\n[bold]publish:[/] record {below[zone]}, printed whole below"
                     if zone in below else f"\n[bold]publish:[/] {escape(zone)}")
        table.add_row(f.check, f"[{style}]{word}[/]", text)
    return table


def _cut(table: Table, width: int, zones: list[str]) -> list[str]:
    """The records the table would wrap or cut at this width: each must be pasted whole."""
    from rich.console import Console

    buf = io.StringIO()
    Console(width=width, file=buf, color_system=None, highlight=False).print(table)
    lines = buf.getvalue().splitlines()
    return [z for z in zones if not any(z in line for line in lines)]


def print_report(report: Any) -> None:
    from rich.markup import escape

    con = _console()
    con.print(f"[bold]postroom doctor[/]: {escape(', '.join(report.domains) or 'no domain')} "
              f"[dim](DNS: {escape(report.resolver)})[/]", soft_wrap=True)
    groups: dict[str, list[Any]] = {}
    for f in report.findings:
        groups.setdefault(f.subject, []).append(f)
    records: dict[str, int] = {}  # every distinct record to publish, numbered in order
    for f in report.findings:
        if f.record is not None:
            records.setdefault(f.record.zone(), len(records) + 1)
    for subject, findings in groups.items():
        zones = [f.record.zone() for f in findings if f.record is not None]
        cut = _cut(_table(subject, findings, {}), con.width, zones)
        con.print(_table(subject, findings, {z: records[z] for z in cut}))
    if records:
        # One record per line, never wrapped (soft_wrap): the terminal may fold a long
        # DKIM key on screen, but what is copied or written to a file is the whole line.
        con.print(f"[bold]Publish[/] ({len(records)} record{'s' if len(records) > 1 else ''}, "
                  "one per line, exactly as shown):", soft_wrap=True)
        for zone, n in records.items():
            con.print(f"  {n}: {escape(zone)}", soft_wrap=True, highlight=False)
    counts = report.to_dict()["counts"]
    verdict = "[bold red]problems found[/]" if report.failed else (
        "[yellow]works, with warnings[/]" if counts["warn"] else "[bold green]all good[/]")
    con.print(f"{verdict}: {counts['ok']} ok, {counts['info']} info, {counts['warn']} "
              f"warnings, {counts['fail']} failures", soft_wrap=True)
