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
                         "Connections: health, pause and resume, rate limits in use; add, edit "
                         "and remove the database's. Without a sub-command: the list."),
    "settings": Entry("postroom.commands.settings:cli",
                      "Retention and message-policy keys stored in the database (the web "
                      "admin's Settings). Without a sub-command: what is in force."),
    "routes": Entry("postroom.commands.routes:cli",
                    "Routes: which connections carry which mail; replace the database's. "
                    "Without a sub-command: the list."),
    "oauth": Entry("postroom.commands.oauth:cli",
                   "OAuth 2.0 sign-in for connections that log in without a password."),
    "config": Entry("postroom.commands.config:cli",
                    "Check a configuration file, show the effective configuration and where "
                    "each value\ncomes from, copy it (connections, routes, policy, apps) to "
                    "another instance."),
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
    "wordpress-plugin": Entry("postroom.commands.wordpress:wordpress_plugin_cmd",
                              "Print a WordPress must-use plugin that hands wp_mail() to "
                              "Postroom (HTTP API or SMTP)\nand reports a refusal back to "
                              "wp_mail(): > wp-content/mu-plugins/postroom.php"),
    "reload": Entry("postroom.commands.config:reload_cmd",
                    "Validate postroom.toml, then make the running `postroom serve` read it "
                    "again (SIGHUP)\nwithout dropping mail; prints what changed, or the error "
                    "(exit 1, old one kept)."),
    "wizard": Entry("postroom.commands.wizard:wizard",
                    "Set up a connection for ADDRESS: find the provider's server (built-in table, "
                    "MX, SRV,\nautoconfig), probe and rank the candidates, ask for the password "
                    "only if the server\nneeds one, check it, store it encrypted, write the "
                    "connection to postroom.toml and send\na test message."),
    "backup": Entry("postroom.commands.backup:backup_cmd",
                    "Back up this instance while it runs: the database (a consistent SQLite "
                    "copy), the instance key and postroom.toml, in one file encrypted with a "
                    "passphrase. PostgreSQL: says what to run."),
    "restore": Entry("postroom.commands.backup:restore_cmd",
                     "Restore a `postroom backup` file into this instance's data folder "
                     "(Postroom stopped; --force replaces a database that holds data, kept "
                     "aside)."),
    "doctor": Entry("postroom.commands.doctor:doctor",
                    "Will your mail be accepted? MX, SPF (evaluated for each connection's "
                    "servers, with\nthe 10-lookup limit), DKIM keys and sizes, DMARC policy and "
                    "alignment, each with the\nrecord to publish; then each connection's health "
                    "and login. Local DNS queries only.\nExit 1 when something fails."),
    "install-service": Entry(
        "postroom.commands.system:install_service",
        "Run Postroom as a systemd service: write postroom.service (Type=notify, watchdog, "
        "hardened)\nand postroom-worker@.service, make the system user, "
        "/etc/postroom/postroom.toml and\n/var/lib/postroom. Only what is missing; "
        "--dry-run shows it all first."),
    "install-sendmail": Entry(
        "postroom.commands.system:install_sendmail",
        "Make postroom-sendmail the system's /usr/sbin/sendmail (update-alternatives, the "
        "MTA's one\nkept restorable); --undo puts the old one back."),
}


def help_of(name: str) -> str:
    return COMMANDS[name].help
