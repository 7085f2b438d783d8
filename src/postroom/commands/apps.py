"""`postroom app add|list|set|rotate|remove NAME`: the credentials apps hand mail in with, and
the limits each app works within (postroom.apps; enforced by postroom.ingress.accept)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from postroom.audit import Actor
from postroom.commands._common import ConfigOpt, console, fail, guard, instance, when
from postroom.commands.registry import help_of
from postroom.exceptions import MessageError
from postroom.ops import apps as ops

if TYPE_CHECKING:
    from postroom.ops.apps import Credentials

cli = typer.Typer(help=help_of("app"), no_args_is_help=True)

SenderOpt = Annotated[list[str] | None, typer.Option(
    "--sender", help="Address (shop@example.com) or domain (example.com) the app may send as: "
    "envelope sender and From (repeat; default: any)", show_default=False)]
ConnectionOpt = Annotated[list[str] | None, typer.Option(
    "--connection", help="Connection the app may pin and see the status of (repeat; default: "
    "any)", show_default=False)]
RateOpt = Annotated[str | None, typer.Option(
    "--rate", help="At most this many messages per period, e.g. 100/hour (default: no limit)",
    show_default=False)]


def _print_credentials(made: Credentials, what: str) -> None:
    name, secret, api_key = made.name, made.secret, made.api_key
    con = console()
    con.print(f"app [bold]{name}[/] {what} (shown only now, store them in the app):",
              soft_wrap=True)
    con.print(f"  SMTP AUTH: username [bold]{name}[/] password [bold]{secret}[/]",
              soft_wrap=True)
    con.print(f"  HTTP API:  Authorization: Bearer [bold]{api_key}[/]", soft_wrap=True)


@cli.command("add")
def add(name: str, sender: SenderOpt = None, connection: ConnectionOpt = None,
        rate: RateOpt = None, config: ConfigOpt = None) -> None:
    """Create an app; prints its SMTP AUTH secret and HTTP API key once."""
    inst = instance(config)
    made = guard(lambda: ops.add_app(inst, Actor.cli(), name, senders=sender or (),
                                     connections=connection or (), rate=rate))
    _print_credentials(made, "created")


@cli.command("rotate")
def rotate(name: str, config: ConfigOpt = None) -> None:
    """Give an app a new secret: the old one stops working, open SMTP sessions included
    (within two seconds on a running server)."""
    inst = instance(config)
    made = guard(lambda: ops.rotate_app(inst, Actor.cli(), name))
    _print_credentials(made, "has new credentials")


@cli.command("set")
def set_limits(
    name: str, sender: SenderOpt = None, connection: ConnectionOpt = None, rate: RateOpt = None,
    any_sender: Annotated[bool, typer.Option("--any-sender", help="Lift the sender limit")]
    = False,
    any_connection: Annotated[bool, typer.Option("--any-connection",
                                                 help="Lift the connection limit")] = False,
    no_rate: Annotated[bool, typer.Option("--no-rate", help="Lift the rate limit")] = False,
    config: ConfigOpt = None,
) -> None:
    """Change an app's limits (each option given replaces that limit)."""
    if (sender and any_sender) or (connection and any_connection) or (rate and no_rate):
        fail(MessageError("give a limit or lift it, not both", code="cli.usage"))
    inst = instance(config)
    guard(lambda: ops.set_limits(
        inst, Actor.cli(), name, senders=[] if any_sender else sender,
        connections=[] if any_connection else connection, rate=rate, clear_rate=no_rate))
    console().print(f"app {name} updated")


@cli.command("list")
def list_apps(config: ConfigOpt = None) -> None:
    """List apps with their limits."""
    from rich.markup import escape
    from rich.table import Table

    inst = instance(config)
    table = Table("name", "created", "last used", "rotated", "senders", "connections", "rate")
    for a in guard(lambda: ops.list_apps(inst, Actor.cli())):
        table.add_row(escape(str(a["name"])), when(a["created_at"]), when(a["last_used_at"]),
                      when(a["rotated_at"]), escape(", ".join(a["allowed_senders"] or ["any"])),
                      escape(", ".join(a["allowed_connections"] or ["any"])),
                      escape(a["rate_limit"] or "-"))
    console().print(table)


@cli.command("remove")
def remove(name: str, config: ConfigOpt = None) -> None:
    """Remove an app: its credentials stop working, open SMTP sessions included (within a
    second on a running server). Its messages stay in the log."""
    inst = instance(config)
    if not guard(lambda: ops.remove_app(inst, Actor.cli(), name)):
        fail(MessageError(f"no app named {name!r}", code="app.unknown"))
    console().print(f"app {name} removed")
