"""Terminal output of the diagnostics (Rich): the probe report and error advice."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from postroom.commands.views import print_advice as print_advice
from postroom.diagnostics.probe import probe_sync
from postroom.diagnostics.report import ProbeReport, Verdict

_STYLE = {
    Verdict.OK: "green", Verdict.CERTIFICATE: "yellow", Verdict.NO_TLS: "yellow",
    Verdict.TIMEOUT: "yellow",
}


def probe_command(host: str, ports: Sequence[int], *, as_json: bool, console: Console,
                  **options: Any) -> int:
    """`postroom probe`: run, print, and return the exit code (0: a port is usable)."""
    report = probe_sync(host, ports, **options)
    if as_json:
        console.out(json.dumps(report.to_dict(), indent=2), highlight=False)
    else:
        print_report(report, console)
    return 0 if report.recommendation else 1


def _connect_cell(r: Any) -> str:
    if r.tcp == "open":
        return f"open {r.connect_ms:.0f} ms" if r.connect_ms is not None else "open"
    return str(r.tcp or "-")


def _tls_cell(r: Any) -> str:
    if r.security == "none":
        return "[yellow]none[/]"
    if r.tls is None:
        return "-"
    kind = "implicit" if r.security == "smtps" else "STARTTLS"
    return f"{kind} {escape(r.tls.version or '')}"


def _cert_cell(r: Any) -> str:
    tls = r.tls
    if tls is None or tls.certificate is None:
        return "-"
    cert = tls.certificate
    names = escape(", ".join((cert.dns_names + cert.ip_addresses)[:3] or cert.common_names))
    if tls.ok:
        return f"[green]trusted[/] {names}, {tls.days_left} days left"
    return "[yellow]" + escape("; ".join(tls.problems)) + "[/]"


def print_report(report: ProbeReport, console: Console) -> None:
    addresses = ", ".join(report.addresses) or "no address"
    console.print(f"[bold]{escape(report.host)}[/] ({escape(addresses)}), "
                  f"{len(report.ports)} port(s) in {report.elapsed_ms / 1000:.1f} s "
                  f"(deadline {report.timeout:g} s)")
    table = Table(title_justify="left")
    for col in ("port", "connect", "greeting", "TLS", "certificate", "AUTH", "verdict"):
        table.add_column(col, overflow="fold")
    for r in report.ports:
        style = _STYLE.get(r.verdict, "red")
        greeting = f"{r.banner[:3]} in {r.banner_ms:.0f} ms" if r.banner and r.banner_ms else "-"
        table.add_row(str(r.port), escape(_connect_cell(r)), escape(greeting), _tls_cell(r),
                      _cert_cell(r), escape(" ".join(r.auth)) or "-",
                      f"[{style}]{r.verdict}[/]")
    console.print(table)
    for r in report.ports:
        console.print(f"  [bold]{r.port}[/]: {escape(r.summary())}", soft_wrap=True)
    if report.https is not None:
        https = Table("provider", "endpoint", "HTTPS", title_justify="left",
                      title="HTTPS APIs" + (f" via proxy {report.proxy}" if report.proxy else ""))
        for e in report.https:
            ok = e.reachable
            what = (f"reachable, HTTP {e.http_status}, {e.ms:.0f} ms" if ok and e.ms is not None
                    else f"{e.status}: {e.error or ''}")
            https.add_row(escape(e.provider), escape(e.host),
                          f"[{'green' if ok else 'red'}]{escape(what)}[/]")
        console.print(https)
    for i, line in enumerate(report.summary):
        style = "bold green" if i == 0 and report.recommendation else "bold" if i == 0 else ""
        text = escape(line)
        console.print(f"[{style}]{text}[/]" if style else text, soft_wrap=True)


def ca_file_option(value: Path | None) -> Path | None:
    """--ca-file must name a readable file (the probe's SSL context reads it)."""
    from postroom.exceptions import ConfigError

    if value is not None and not value.is_file():
        raise ConfigError(f"--ca-file {value}: no such file", code="config.ca_file")
    return value
