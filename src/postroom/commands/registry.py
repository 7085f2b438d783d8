"""The `postroom` commands that live in their own module: where each one's code is, and its
help. `postroom --help` lists them from here without importing a single command module (each
pulls in its own share of the database, the settings models and Rich), and each module takes
its help from here, so there is one copy of every text (postroom.commands.lazy loads them).

Imports nothing: it is read on every start of the command.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    target: str  # "module:attribute": a typer.Typer (a command group) or a command function
    help: str


COMMANDS: dict[str, Entry] = {
    # groups
    "app": Entry("postroom.commands.apps:cli",
                 "Apps: the credentials they hand mail in with (SMTP AUTH, API key) and their "
                 "limits."),
    "queue": Entry("postroom.commands.queue:cli",
                   "The delivery queue: what waits, retry, purge, pause and resume."),
    "connections": Entry("postroom.commands.connections:cli",
                         "Connections: health, pause and resume, rate limits in use. Without a "
                         "sub-command: the list."),
    "oauth": Entry("postroom.commands.oauth:cli",
                   "OAuth 2.0 sign-in for connections that log in without a password."),
    "config": Entry("postroom.commands.config:cli",
                    "Copy this instance's configuration (connections, routes, policy, apps) to "
                    "another one."),
    "admin": Entry("postroom.commands.admin:cli",
                   "Web admin accounts (roles, passwords, TOTP) and their API tokens."),
    "suppressions": Entry("postroom.commands.suppressions:cli",
                          "The suppression list: addresses no mail is sent to (hard bounces, "
                          "complaints, added by hand)."),
    "alerts": Entry("postroom.commands.alerts:cli",
                    "Alerts: the alerts rules of postroom.toml, their channels, what was sent."),
    "dkim": Entry("postroom.commands.dkim:cli",
                  "DKIM signing keys: make one, print its DNS record."),
    # commands; a line break is kept in the help as written (Typer's Rich mode)
    "audit": Entry("postroom.commands.admin:audit",
                   "The audit log, newest first: who did what, when, to which object."),
    "events": Entry("postroom.commands.events:events_cmd",
                    "Events, oldest first: connections down and up, fallbacks used, OAuth grants "
                    "dying,\nleases expired... (--json: one JSON object per line)."),
    "report": Entry("postroom.commands.report:report_cmd",
                    "Summary report: totals and failure rates per connection and app with the "
                    "trend,\ntop failure causes with advice, OAuth grants, suppressions, "
                    "deliverability findings."),
    "wizard": Entry("postroom.commands.wizard:wizard",
                    "Set up a connection for ADDRESS: find the provider's server (built-in table, "
                    "MX, SRV,\nautoconfig), probe and rank the candidates, ask for the password "
                    "only if the server\nneeds one, check it, store it encrypted, write the "
                    "connection to postroom.toml and send\na test message."),
    "doctor": Entry("postroom.commands.doctor:doctor",
                    "Will your mail be accepted? MX, SPF (evaluated for each connection's "
                    "servers, with\nthe 10-lookup limit), DKIM keys and sizes, DMARC policy and "
                    "alignment, each with the\nrecord to publish; then each connection's health "
                    "and login. Local DNS queries only.\nExit 1 when something fails."),
}


def help_of(name: str) -> str:
    return COMMANDS[name].help
