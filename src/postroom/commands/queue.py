"""`postroom queue list | retry | purge | pause | resume` (postroom.queue.maintenance and
postroom.queue.retention do the work; this module parses, asks and prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from postroom.commands._common import (
    ConfigOpt,
    JsonOpt,
    confirm_or_fail,
    console,
    fail,
    guard,
    instance,
    parse_time,
    progress,
    when,
)
from postroom.commands.registry import help_of
from postroom.commands.views import PRIORITY, json_lines, queue_table
from postroom.exceptions import MessageError

if TYPE_CHECKING:
    from postroom.runtime import Instance

cli = typer.Typer(help=help_of("queue"), no_args_is_help=True)

StatusOpt = Annotated[list[str] | None, typer.Option(
    "--status", help="queued|sending|deferred|sent|partial|failed (repeat)", show_default=False)]
AppOpt = Annotated[str | None, typer.Option("--app", help="Handed in by this app")]
ToOpt = Annotated[str | None, typer.Option("--to", help="A recipient contains")]
FromOpt = Annotated[str | None, typer.Option("--from", help="Sender contains")]


def _paused_note(inst: Instance) -> None:
    from postroom.routing.health import Health

    d = inst.settings.delivery
    if Health(inst.queue, d.breaker_failures, d.breaker_cooldown).queue_paused():
        console(stderr=True).print("[yellow]the queue is paused[/]: nothing is delivered until "
                                   "`postroom queue resume`")


@cli.command("list")
def list_cmd(
    status: StatusOpt = None,
    app: AppOpt = None,
    to: ToOpt = None,
    sender: FromOpt = None,
    priority: Annotated[str | None, typer.Option(help="high|normal|low")] = None,
    due: Annotated[bool, typer.Option("--due", help="Only messages due now")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100000)] = 100,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Messages waiting or being sent (default: queued, sending, deferred), in the order the
    workers take them: higher priority first, then the earliest due."""
    import time

    from postroom.control import queue_data
    from postroom.queue.maintenance import Filter

    if priority is not None and priority not in PRIORITY:
        fail(MessageError(f"--priority {priority!r}: use high, normal or low",
                          code="cli.priority"))
    now = time.time()
    flt = guard(lambda: Filter(statuses=tuple(status or ()), app=app, to=to, sender=sender,
                               priority=PRIORITY.get(priority or ""),
                               due_by=now if due else None))
    inst = instance(config)
    # postroom.control: what a running `postroom serve` answers these with, when it runs
    found = guard(lambda: queue_data(inst, flt, limit, table=not as_json))
    if as_json:
        json_lines(found["rows"])
        return
    queue_table(found["rows"], found["counts"], found["paused"], now)


@cli.command("retry")
def retry_cmd(
    msg_id: Annotated[str | None, typer.Argument(
        metavar="[ID]", help="Message id (or a unique prefix)", show_default=False)] = None,
    all_failed: Annotated[bool, typer.Option(
        "--all-failed", help="Every failed message (narrow with --since, --app)")] = False,
    since: Annotated[str | None, typer.Option(
        help="With --all-failed: failed within 30m, 2h, 7d... or since a date")] = None,
    app: AppOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Deliver a message now: a deferred one at once; a failed or partial one to the
    recipients that failed (never again to those already delivered; `postroom resend` sends
    a full copy). `--all-failed` does it for every failed message."""
    from postroom.queue import maintenance

    if (msg_id is None) == (not all_failed):
        fail(MessageError("give a message ID or --all-failed (not both)", code="cli.usage"))
    if msg_id is not None and (since or app):
        fail(MessageError("--since and --app go with --all-failed", code="cli.usage"))
    since_ts = guard(lambda: parse_time(since, "--since")) if since else None
    inst = instance(config)
    con = console()
    if msg_id is not None:
        done = guard(lambda: maintenance.retry(inst.queue, msg_id))
        to = ", ".join(done.recipients) or "-"
        con.print(f"{done.id} (was {done.was}): due now for {len(done.recipients)} "
                  f"recipient(s): {to}", markup=False, soft_wrap=True)
    else:
        from postroom.queue.maintenance import Filter

        flt = guard(lambda: Filter(statuses=("failed",), app=app))
        total = guard(lambda: maintenance.count(inst.queue, flt)) if since is None else None
        with progress("retrying failed messages", total) as advance:
            retried, skipped = guard(lambda: maintenance.retry_failed(
                inst.queue, since=since_ts, app=app, progress=advance))
        con.print(f"{retried} failed message(s) due again now"
                  + (f"; {skipped} skipped: body purged by retention" if skipped else ""))
    _paused_note(inst)


@cli.command("purge")
def purge_cmd(
    status: StatusOpt = None,
    before: Annotated[str | None, typer.Option(
        help="Created before: an age (30d, 12h, 4w) or a date (2026-11-21)")] = None,
    app: AppOpt = None,
    to: ToOpt = None,
    sender: FromOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count")] = False,
    retention: Annotated[bool, typer.Option(
        "--retention", help="Apply the retention settings of postroom.toml now instead")] = False,
    config: ConfigOpt = None,
) -> None:
    """Delete messages (with their attempts) matching every filter given. Without --status
    only finished ones (sent, partial, failed); name queued/deferred to cancel waiting mail.
    A message being sent is never deleted. Asks first unless --yes."""
    from postroom.queue import maintenance

    filtered = bool(status or before or app or to or sender)
    if retention:
        if filtered or dry_run:
            fail(MessageError("--retention takes no filter: it applies [retention] from "
                              "postroom.toml", code="cli.usage"))
        _retention_now(config)
        return
    if not filtered:
        fail(MessageError("say what to purge: --status, --before, --app, --to or --from "
                          "(e.g. --status failed --before 30d)", code="cli.usage"))
    before_ts = guard(lambda: parse_time(before, "--before")) if before else None
    flt = guard(lambda: maintenance.Filter(
        statuses=tuple(status or maintenance.FINAL), app=app, to=to, sender=sender,
        before=before_ts))
    inst = instance(config)
    if "sending" in flt.statuses:
        fail(MessageError("messages being sent are never purged; pause the queue "
                          "(`postroom queue pause`) and purge them once they are back in it",
                          code="queue.purge.sending"))
    n = guard(lambda: maintenance.count(inst.queue, flt, exclude_sending=True))
    what = f"{n} message(s) ({', '.join(flt.statuses)}" + (
        f", created before {when(before_ts)}" if before_ts else "") + ")"
    con = console()
    if n == 0 or dry_run:
        con.print(f"{'would delete' if dry_run else 'nothing to purge:'} {what}"
                  if n else "nothing to purge", markup=False)
        return
    confirm_or_fail(f"Delete {what} and their attempts? This cannot be undone.", yes=yes,
                    refusal=f"not deleting {what} without confirmation: stdin is not a "
                    "terminal; add --yes (or --dry-run to only count)")
    with progress("purging", n) as advance:
        counts = guard(lambda: maintenance.purge(inst.queue, flt, progress=advance))
    con.print(f"deleted {counts['messages']} message(s) and {counts['attempts']} attempt(s)")


def _retention_now(config: Any) -> None:
    from postroom.queue.retention import retention_sync

    inst = instance(config)
    r = inst.settings.retention
    with progress("retention", None) as advance:
        counts = guard(lambda: retention_sync(inst.queue, inst.settings, force=True,
                                              progress=lambda _what, n: advance(n)))
    con = console()
    if counts["skipped"]:
        fail(MessageError("retention is running on another node or process right now; try "
                          "again when it is done", code="retention.busy"))
    bodies = f"{r.keep_bodies_days:g} days" if r.keep_bodies_days else "forever"
    rows = f"{r.keep_rows_days:g} days" if r.keep_rows_days else "forever"
    labels = {"idempotency_keys": "idempotency keys", "send_log": "rate-limit log entries"}
    con.print(f"retention (bodies kept {bodies}, rows {rows}) removed: "
              + ", ".join(f"{v} {labels.get(k, k)}" for k, v in counts.items()
                          if k != "skipped"), markup=False, soft_wrap=True)


def _set_paused(config: Any, paused: bool) -> None:
    from postroom.audit import Actor
    from postroom.ops import queue as queue_ops
    from postroom.queue.maintenance import waiting_counts

    inst = instance(config)
    switch = queue_ops.pause if paused else queue_ops.resume
    guard(lambda: switch(inst, Actor.cli()))
    c = guard(lambda: waiting_counts(inst.queue))
    waiting = c["queued"] + c["deferred"]
    if paused:
        console().print(f"queue paused: every worker stops taking mail within about a second "
                        f"(messages being sent finish; {waiting} waiting). Mail is still "
                        "accepted. `postroom queue resume` to deliver again.")
    else:
        console().print(f"queue resumed: {waiting} message(s) waiting")


@cli.command("pause")
def pause_cmd(config: ConfigOpt = None) -> None:
    """Stop delivering (every worker, every node); mail is still accepted and kept."""
    _set_paused(config, True)


@cli.command("resume")
def resume_cmd(config: ConfigOpt = None) -> None:
    """Deliver again after `postroom queue pause`."""
    _set_paused(config, False)
