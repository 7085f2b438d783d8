"""`postroom connections [--json]`, `postroom connections pause|resume NAME`: each configured
connection's health, pause switch, limits and their current use (postroom.queue.status);
`postroom connections add|edit|remove NAME`: the ones stored in the database, through the
web admin's own functions (postroom.ops.connections)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from postroom.commands._common import (
    ConfigOpt,
    JsonOpt,
    confirm_or_fail,
    console,
    fail,
    guard,
    instance,
    relative,
    when,
)
from postroom.commands.registry import help_of
from postroom.exceptions import MessageError

cli = typer.Typer(help=help_of("connections"), invoke_without_command=True)
_HEALTH_STYLE = {"up": "green", "degraded": "yellow", "down": "red"}


@cli.callback(invoke_without_command=True)
def connections(ctx: typer.Context, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Each configured connection: transport, health (up / degraded / down), failures in a
    row, last error and since when, paused or held (the provider's Retry-After), rate
    limits with their current use."""
    if ctx.invoked_subcommand is None:
        show(config, as_json=as_json)


def show(config: Path | None, *, as_json: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    from postroom.queue.status import connection_status, connections_report

    inst = instance(config)
    if as_json:
        print(json.dumps(guard(lambda: connections_report(inst.queue, inst.settings)),
                         indent=2))
        return
    now = time.time()
    paused, conns = guard(lambda: connection_status(inst.queue, inst.settings, now))
    con = console()
    if paused:
        con.print("[bold yellow]the whole queue is paused[/]: `postroom queue resume`")
    if not conns:
        con.print("no connections configured; add a [[connections]] entry to postroom.toml",
                  markup=False)
        return
    table = Table("name", "transport", "server", "health", "since", "failures", "last error",
                  "limits (used)")
    for c in conns:
        style = _HEALTH_STYLE.get(c.health, "white")
        health = f"[{style}]{c.health}[/]"
        if c.circuit_open_until and c.circuit_open_until > now:
            health += f" (skipped, retried {relative(c.circuit_open_until, now)})"
        if c.held_until and c.held_until > now:  # the provider's Retry-After
            health += (f" [yellow]held[/] until {when(c.held_until)} "
                       f"({relative(c.held_until, now)}): the provider asked to wait")
        if c.paused:
            health += " [bold yellow]paused[/]"
        err = ""
        if c.last_error:
            err = f"{escape(c.last_error[:100])} [dim]({when(c.last_error_at)})[/]"
        limits = [f"{r.used} of {r.limit}" for r in c.rates]
        if c.max_sessions is not None:
            limits.append(f"{c.sessions_in_use} of {c.max_sessions} sessions")
        table.add_row(c.name, c.transport, escape(c.server or "-"), health, when(c.since),
                      str(c.failures), err, ", ".join(limits) or "-")
    con.print(table)


def _set_paused(name: str, config: Path | None, paused: bool) -> None:
    from postroom.audit import Actor
    from postroom.ops import queue as queue_ops

    inst = instance(config)
    switch = queue_ops.pause if paused else queue_ops.resume
    # An unknown name is an error listing the known ones.
    guard(lambda: switch(inst, Actor.cli(), name))
    if paused:
        console().print(f"connection {name} paused: within about a second no worker uses it; "
                        "its mail goes to the next connection of its route's chain, or waits. "
                        f"`postroom connections resume {name}` to use it again.", markup=False)
    else:
        console().print(f"connection {name} resumed", markup=False)


@cli.command("pause")
def pause_cmd(name: Annotated[str, typer.Argument(help="Connection name")],
              config: ConfigOpt = None) -> None:
    """Stop using connection NAME (every worker, every node) until resumed."""
    _set_paused(name, config, True)


@cli.command("resume")
def resume_cmd(name: Annotated[str, typer.Argument(help="Connection name")],
               config: ConfigOpt = None) -> None:
    """Use connection NAME again."""
    _set_paused(name, config, False)


# -- connections stored in the database (the web admin's Add / Edit / Delete) ----------------
# Their secrets never come on the command line (shell history, `ps`): a prompt, stdin or an
# environment variable. ops.connections validates, encrypts, audits and refuses a connection
# postroom.toml defines.
SECRET_KEYS = ("password", "api_key", "webhook_key", "client_secret", "oauth.client_secret")
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="KEY=VALUE of the [[connections]] table (repeat): host=smtp.example.com, "
    "port=587, security=starttls, username=... (numbers and true/false as in TOML)",
    show_default=False)]
PasswordEnvOpt = Annotated[str | None, typer.Option(
    "--password-env", help="Store the password (or api key) found in this environment "
    "variable", show_default=False)]
PasswordStdinOpt = Annotated[bool, typer.Option(
    "--password-stdin", help="Read the password (or api key) from stdin's first line")]
AskOpt = Annotated[bool, typer.Option("--ask-password", help="Prompt for the password")]


def _pairs(items: list[str]) -> dict[str, Any]:
    from postroom.config_load import value_from_text

    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            fail(MessageError(f"--set {item!r}: write it as KEY=VALUE (e.g. port=587)",
                              code="cli.usage"))
        if key in SECRET_KEYS:
            fail(MessageError(f"--set {key}=...: a secret is never given on the command line; "
                              "use --password-env VAR, --password-stdin or --ask-password",
                              code="cli.secret"))
        out[key] = value_from_text(raw.strip())
    return out


def _secret(name: str, env: str | None, stdin: bool, ask: bool) -> str | None:
    """The password given one of the three ways, or None (keep the stored one)."""
    import os
    import sys

    if sum((env is not None, stdin, ask)) > 1:
        fail(MessageError("give the password one way: --password-env, --password-stdin or "
                          "--ask-password", code="cli.usage"))
    if env is not None:
        value = os.environ.get(env)
        if not value:
            fail(MessageError(f"--password-env {env}: that variable is not set or empty",
                              code="cli.secret"))
        return value
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if ask:
        import getpass

        return getpass.getpass(f"password for {name}: ")
    return None


@cli.command("add")
def add_cmd(name: Annotated[str, typer.Argument(help="Connection name")],
            transport: Annotated[str, typer.Option(
                "--transport", help="smtp, sendgrid, mailgun, ses, gmail_api... (as in "
                "postroom.toml)")] = "smtp",
            values: SetOpt = None, password_env: PasswordEnvOpt = None,
            password_stdin: PasswordStdinOpt = False, ask_password: AskOpt = False,
            config: ConfigOpt = None) -> None:
    """Add connection NAME to the database (as the web admin's Add): used by every process
    within seconds, no restart. `postroom test NAME --to ADDRESS` then checks it."""
    from postroom.audit import Actor
    from postroom.ops import connections as ops

    entry = {**_pairs(values or []), "name": name, "transport": transport}
    secret = _secret(name, password_env, password_stdin, ask_password)
    inst = instance(config)
    guard(lambda: ops.save_connection(inst, Actor.cli(), entry, secret=secret, new=True))
    console().print(f"connection {name} added" + (" (password stored encrypted)"
                                                    if secret else ""), markup=False)


@cli.command("edit")
def edit_cmd(name: Annotated[str, typer.Argument(help="Connection name")],
             values: SetOpt = None,
             unset: Annotated[list[str] | None, typer.Option(
                 "--unset", help="KEY to remove, back to its default (repeat)",
                 show_default=False)] = None,
             password_env: PasswordEnvOpt = None, password_stdin: PasswordStdinOpt = False,
             ask_password: AskOpt = False, config: ConfigOpt = None) -> None:
    """Change keys of connection NAME, one made with `add` or in the web admin (one that
    postroom.toml defines is changed there). The password stays unless a new one is given."""
    from postroom.audit import Actor
    from postroom.ops import connections as ops

    changes = _pairs(values or [])
    if "name" in changes:
        fail(MessageError("a connection is not renamed: add the new one, then remove the "
                          "old one", code="cli.usage"))
    secret = _secret(name, password_env, password_stdin, ask_password)
    if not changes and not unset and secret is None:
        fail(MessageError("nothing to change: give --set KEY=VALUE, --unset KEY or a new "
                          "password", code="cli.usage"))
    inst = instance(config)
    entry = dict(guard(lambda: ops.entry_of(inst, Actor.cli(), name)))
    for key in unset or []:
        if key in ("name", "transport") or entry.pop(key, None) is None:
            fail(MessageError(f"--unset {key}: connection {name} has no such key of its own",
                              code="cli.usage"))
    entry.update(changes)
    guard(lambda: ops.save_connection(inst, Actor.cli(), entry, secret=secret))
    console().print(f"connection {name} changed", markup=False)


@cli.command("remove")
def remove_cmd(name: Annotated[str, typer.Argument(help="Connection name")],
               yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False,
               config: ConfigOpt = None) -> None:
    """Delete connection NAME from the database, with its secrets and OAuth grant (refused
    while a route uses it; one that postroom.toml defines is removed there)."""
    from postroom.audit import Actor
    from postroom.ops import connections as ops

    inst = instance(config)
    guard(lambda: ops.entry_of(inst, Actor.cli(), name))  # exists and is not the file's
    confirm_or_fail(f"Delete connection {name} and its stored secrets?", yes=yes,
                    refusal=f"not deleting connection {name} without confirmation: stdin is "
                    "not a terminal; add --yes")
    guard(lambda: ops.delete_connection(inst, Actor.cli(), name))
    console().print(f"connection {name} removed", markup=False)
