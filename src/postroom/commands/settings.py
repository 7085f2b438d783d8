"""`postroom settings [show SECTION]` and `postroom settings set SECTION KEY=VALUE...`: the
retention and message-policy keys the web admin's Settings page stores in the database
(postroom.ops.settings: what postroom.toml or a POSTROOM_* variable sets is locked there,
and refused here with the same words; every change is audited)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, fail, guard, instance
from postroom.commands.registry import help_of
from postroom.exceptions import MessageError

cli = typer.Typer(help=help_of("settings"), invoke_without_command=True)
SECTION_NAMES = ("retention", "policy")


@cli.callback(invoke_without_command=True)
def settings_cmd(ctx: typer.Context, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Both sections in force (as `postroom settings show`)."""
    if ctx.invoked_subcommand is None:
        show(config, SECTION_NAMES, as_json=as_json)


@cli.command("show")
def show_cmd(section: Annotated[str | None, typer.Argument(
                 help="retention or policy (default: both)", show_default=False)] = None,
             as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Each key in force, and where it comes from: postroom.toml or the environment
    (locked), the database (set here or in the web admin), or the default."""
    show(config, (section,) if section else SECTION_NAMES, as_json=as_json)


def show(config: Path | None, sections: Sequence[str], *, as_json: bool) -> None:
    from postroom.audit import Actor
    from postroom.ops import settings as ops

    inst = instance(config)
    views = [guard(functools.partial(ops.view, inst, Actor.cli(), s)) for s in sections]
    if as_json:
        print(json.dumps({v.kind.value: {k: {"value": v.values[k],
                                             "origin": v.origins[k].value}
                                         for k in v.values} for v in views}, indent=2))
        return
    con = console()
    for v in views:
        con.print(f"[{v.kind.value}]", markup=False)
        for key, value in v.values.items():
            con.print(f"  {key} = {json.dumps(value)}  ({v.origins[key].value})",
                      markup=False)


@cli.command("set")
def set_cmd(section: Annotated[str, typer.Argument(help="retention or policy")],
            pairs: Annotated[list[str] | None, typer.Argument(
                metavar="KEY=VALUE...", help="e.g. keep_rows_days=30 max_size=\"2GB\"",
                show_default=False)] = None,
            unset: Annotated[list[str] | None, typer.Option(
                "--unset", help="KEY back to its default (repeat)", show_default=False)]
            = None,
            config: ConfigOpt = None) -> None:
    """Store keys of SECTION in the database (the others stored stay); every process uses
    them within seconds."""
    from postroom.audit import Actor
    from postroom.config_load import value_from_text
    from postroom.ops import settings as ops

    changes: dict[str, Any] = {}
    for item in pairs or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            fail(MessageError(f"{item!r}: write it as KEY=VALUE (e.g. keep_rows_days=30)",
                              code="cli.usage"))
        changes[key.strip()] = value_from_text(raw.strip())
    if not changes and not unset:
        fail(MessageError("nothing to change: give KEY=VALUE or --unset KEY", code="cli.usage"))
    inst = instance(config)
    stored = dict(guard(lambda: ops.view(inst, Actor.cli(), section)).stored)
    for key in unset or []:
        stored.pop(key, None)
    view = guard(lambda: ops.change(inst, Actor.cli(), section, {**stored, **changes}))
    for key in [*changes, *(unset or [])]:
        if key in view.values:
            console().print(f"{section}.{key} = {json.dumps(view.values[key])}  "
                            f"({view.origins[key].value})", markup=False)
