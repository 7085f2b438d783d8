"""`postroom connections [--json]`, `postroom connections pause|resume NAME`: each configured
connection's health, pause switch, limits and their current use (postroom.queue.status)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance, relative, when
from postroom.commands.registry import help_of

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
