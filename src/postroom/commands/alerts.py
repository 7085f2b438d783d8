"""`postroom alerts list|test CHANNEL|history|enable CHANNEL`: the [[alerts]] rules, their
channels and what was sent (postroom.alerts)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from postroom.commands._common import ConfigOpt, JsonOpt, console, fail, guard, instance, when
from postroom.commands.registry import help_of
from postroom.exceptions import ConfigError, PostroomError

if TYPE_CHECKING:
    from postroom.alerts.config import AlertRule, AlertsSettings
    from postroom.runtime import Instance

cli = typer.Typer(help=help_of("alerts"), no_args_is_help=True)
ChannelArg = Annotated[str, typer.Argument(help="A channel id as `postroom alerts list` shows "
                                           "it (ops#1), or a rule's name for all its channels")]


def _config(inst: Instance) -> AlertsSettings:
    from postroom.alerts.config import AlertsSettings

    return inst.settings.section(AlertsSettings)


def _pick(cfg: AlertsSettings, name: str) -> dict[str, tuple[AlertRule, str]]:
    known = cfg.channel_ids()
    picked = {k: v for k, v in known.items() if k == name or v[0].name == name}
    if not picked:
        fail(ConfigError(f"no alert channel or rule named {name!r}; known: "
                         f"{', '.join(known) or 'none: add an [[alerts]] table'}",
                         code="alerts.unknown_channel"))
    return picked


@cli.command("list")
def list_channels(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """The rules and their channels (tokens in URLs are not shown), on or disabled."""
    from rich.markup import escape
    from rich.table import Table

    from postroom.alerts import display
    from postroom.alerts.outbox import disabled

    inst = instance(config)
    cfg = _config(inst)
    off = guard(lambda: disabled(inst.engine))
    rows = [{"channel": cid, "rule": rule.name, "url": display(url),
             "kinds": [k.value for k in rule.kinds], "disabled": off.get(cid)}
            for cid, (rule, url) in cfg.channel_ids().items()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console().print("no alerts configured: add an [[alerts]] table with channels = [...] "
                        "to postroom.toml")
        return
    table = Table("channel", "rule", "url", "state")
    for r in rows:
        state = f"[red]disabled[/]: {escape(str(r['disabled']))}" if r["disabled"] else "on"
        table.add_row(str(r["channel"]), str(r["rule"]), escape(str(r["url"])), state)
    console().print(table)


@cli.command("test")
def test(channel: ChannelArg, config: ConfigOpt = None) -> None:
    """Send a test alert to CHANNEL now (not through the outbox) and say how it went."""
    from postroom.alerts import Alert, Change
    from postroom.alerts.dispatcher import channel_for

    inst = instance(config)
    picked = _pick(_config(inst), channel)
    now = time.time()
    bad = 0
    for cid, (rule, url) in picked.items():
        alert = Alert(f"test:{cid}:{now:.3f}", rule.name, Change.TEST, "info", "test",
                      "test alert", f"A test of alert channel {cid} from `postroom alerts "
                      "test`: it works.", now)
        try:
            asyncio.run(channel_for(rule, url, inst.settings, inst.engine).send(alert))
        except PostroomError as err:
            bad += 1
            console(stderr=True).print(f"{cid}: failed: {err}", markup=False, soft_wrap=True)
            continue
        console().print(f"{cid}: sent", markup=False)
    if bad:
        raise typer.Exit(1)


@cli.command("history")
def history(
    channel: Annotated[str | None, typer.Option("--channel", help="Only this channel id",
                                                show_default=False)] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: JsonOpt = False, config: ConfigOpt = None,
) -> None:
    """The alerts sent, waiting and failed, newest first."""
    from rich.markup import escape
    from rich.table import Table

    from postroom.alerts.outbox import history as rows_of

    inst = instance(config)
    rows = guard(lambda: rows_of(inst.engine, limit=limit, channel=channel))
    if as_json:
        print(json.dumps([{"id": r.id, "channel": r.channel, "status": r.status,
                           "attempts": r.attempts, "created_at": r.created_at,
                           "sent_at": r.sent_at, "last_error": r.last_error,
                           "alert": r.alert.as_dict()} for r in rows], indent=2))
        return
    if not rows:
        console().print("no alert yet")
        return
    table = Table("when", "channel", "status", "tries", "alert", "error")
    for r in rows:
        table.add_row(when(r.created_at), r.channel, r.status, str(r.attempts),
                      escape(f"{r.alert.change.value}: {r.alert.title}"), escape(r.last_error))
    console().print(table)


@cli.command("enable")
def enable(channel: ChannelArg, config: ConfigOpt = None) -> None:
    """Turn a disabled channel on again (after fixing what disabled it)."""
    from postroom.alerts.outbox import enable as turn_on

    inst = instance(config)
    for cid in _pick(_config(inst), channel):
        done = guard(lambda cid=cid: turn_on(inst.engine, cid))  # type: ignore[misc]
        console().print(f"{cid}: {'enabled again' if done else 'was not disabled'}",
                        markup=False)
