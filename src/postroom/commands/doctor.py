"""`postroom doctor [--domain D]`: SPF, DKIM, DMARC and MX of the sending domains, judged
against the configured connections, plus each connection's health
(postroom.diagnostics.doctor)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance

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
    """Will your mail be accepted? MX, SPF (evaluated for each connection's servers, with
    the 10-lookup limit), DKIM keys and sizes, DMARC policy and alignment, each with the
    record to publish; then each connection's health and login. Local DNS queries only.
    Exit 1 when something fails."""
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


def print_report(report: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    con.print(f"[bold]postroom doctor[/]: {escape(', '.join(report.domains) or 'no domain')} "
              f"[dim](DNS: {escape(report.resolver)})[/]", soft_wrap=True)
    groups: dict[str, list[Any]] = {}
    for f in report.findings:
        groups.setdefault(f.subject, []).append(f)
    for subject, findings in groups.items():
        table = Table("check", "", "finding", title=subject, title_justify="left",
                      show_lines=False, expand=False)
        for f in findings:
            style, word = _STYLE.get(f.status, ("white", f.status))
            text = escape(f.summary)
            if f.fix:
                text += f"\n[bold]fix:[/] {escape(f.fix)}"
            if f.record is not None:
                text += f"\n[bold]publish:[/] {escape(f.record.zone())}"
            table.add_row(f.check, f"[{style}]{word}[/]", text)
        con.print(table)
    counts = report.to_dict()["counts"]
    verdict = "[bold red]problems found[/]" if report.failed else (
        "[yellow]works, with warnings[/]" if counts["warn"] else "[bold green]all good[/]")
    con.print(f"{verdict}: {counts['ok']} ok, {counts['info']} info, {counts['warn']} "
              f"warnings, {counts['fail']} failures")
