"""`postroom routes [--json]` and `postroom routes set FILE`: the routes in the order they are
tried, and replacing the ones stored in the database (the web admin's Routes page and
PUT /routes), through postroom.ops.connections, which validates and audits the change."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, guard, instance
from postroom.commands.registry import help_of
from postroom.exceptions import ConfigError

cli = typer.Typer(help=help_of("routes"), invoke_without_command=True)


@cli.callback(invoke_without_command=True)
def routes_cmd(ctx: typer.Context, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The routes: postroom.toml's (locked here) and the ones stored in the database."""
    if ctx.invoked_subcommand is not None:
        return
    from postroom.audit import Actor
    from postroom.ops import connections as ops

    inst = instance(config)
    found = guard(lambda: ops.routes(inst, Actor.cli()))
    if as_json:
        print(json.dumps(found, indent=2))
        return
    con = console()
    if not found["file"] and not found["stored"]:
        con.print("no routes: all mail goes to the first connection", markup=False)
    for origin in ("file", "stored"):
        for route in found[origin]:
            where = "postroom.toml" if origin == "file" else "database"
            match = ", ".join(f"{k}={v}" for k, v in (route.get("match") or {}).items())
            con.print(f"{route.get('name') or '-'}  [{where}]  {match or 'any mail'}  -> "
                      f"{' > '.join(route.get('chain') or [])}", markup=False,
                      soft_wrap=True)


def _read(source: str) -> list[dict[str, Any]]:
    """A routes list from a file (or - for stdin): JSON (a list, or {"stored": [...]} as
    `routes --json` prints), or TOML with [[routes]] tables."""
    import tomllib

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read {source}: {err.strerror}", code="cli.file") from err
    try:
        data: Any = json.loads(text)
    except ValueError:
        try:
            data = tomllib.loads(text).get("routes", [])
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: neither JSON nor TOML ({err})",
                              code="config.syntax") from err
    if isinstance(data, dict) and "stored" in data:
        data = data["stored"]
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected a list of routes (or [[routes]] tables)",
                          code="config.type")
    return data


@cli.command("set")
def set_cmd(source: Annotated[str, typer.Argument(
                metavar="FILE", help="JSON or TOML ([[routes]]) file; - for stdin")],
            config: ConfigOpt = None) -> None:
    """Replace the routes stored in the database with FILE's (an empty list removes them).
    Each chain must name known connections; postroom.toml's routes stay as they are."""
    from postroom.audit import Actor
    from postroom.ops import connections as ops

    stored = guard(lambda: _read(source))
    inst = instance(config)
    guard(lambda: ops.save_routes(inst, Actor.cli(), stored))
    console().print(f"{len(stored)} stored route(s) in force", markup=False)
