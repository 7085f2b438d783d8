"""The serve chore that emails the summary reports once per period, at the configured local
time (``[reports] at``, ``timezone``; zoneinfo, so summer time moves nothing by an hour).

Several nodes (and a restart) run it at once: before sending, a node claims the period in
the ``control`` table with a conditional UPDATE (``value < key``: the period's key sorts
after every earlier one), or the first INSERT of the row; only the one whose statement
changed a row sends. If building or queueing the report fails, the claim is given back so
the next tick (on any node) tries again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError

from postroom.reports.config import WEEKDAYS, ReportsSettings
from postroom.store.db import write_transaction
from postroom.store.schema import control

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from postroom.envelope import Envelope
    from postroom.runtime import Instance
    from postroom.settings import Settings

log = logging.getLogger("postroom.reports")
INTERVAL = 60.0  # seconds between two looks: a report goes out within a minute of its time
CONTROL_PREFIX = "reports.last."  # + kind: the key of the last period sent


def last_due(kind: str, config: ReportsSettings, now: float) -> dt.datetime:
    """The latest moment at or before ``now`` a ``kind`` report was due, in local time."""
    zone = config.zone
    local = dt.datetime.fromtimestamp(now, zone)
    hour, minute = (int(p) for p in config.at.split(":"))
    day = local.date()
    if kind == "week":
        day -= dt.timedelta(days=(day.weekday() - WEEKDAYS.index(config.weekday)) % 7)
    step = dt.timedelta(days=7 if kind == "week" else 1)
    due = dt.datetime.combine(day, dt.time(hour, minute), zone)
    return due if due.timestamp() <= now else dt.datetime.combine(day - step,
                                                                  dt.time(hour, minute), zone)


def key(due: dt.datetime) -> str:
    """The period's name in ``control``: digits only (a collation may skip punctuation),
    which sort as the periods follow each other."""
    return due.strftime("%Y%m%d%H%M")


def claim(engine: Engine, kind: str, period_key: str, now: float) -> bool:
    """True for the one caller that moves the kind's last sent period to ``period_key``."""
    name = CONTROL_PREFIX + kind
    c = control.c
    with write_transaction(engine) as conn:
        if conn.execute(update(control).where(c.name == name, c.value < period_key)
                        .values(value=period_key, updated_at=now)).rowcount:
            return True
    try:
        with write_transaction(engine) as conn:
            conn.execute(insert(control).values(name=name, value=period_key, updated_at=now))
    except IntegrityError:  # the row exists: this period (or a later one) was claimed
        return False
    return True


def release(engine: Engine, kind: str, period_key: str, previous: str) -> None:
    """Give a claim back (the report could not be queued), unless a later one was made."""
    c = control.c
    with write_transaction(engine) as conn:
        conn.execute(update(control).where(c.name == CONTROL_PREFIX + kind,
                                           c.value == period_key)
                     .values(value=previous, updated_at=time.time()))


def prepare(inst: Instance, kind: str, config: ReportsSettings, *,
            end: float | None = None, shared: bool = True) -> Envelope:
    """The ``kind`` report for the period ending at ``end`` (now), as the email to queue
    (blocking: the doctor waits up to ``config.dns_wait`` for DNS; ``shared``: see
    postroom.reports.build.doctor_part)."""
    from postroom.reports import build, render

    doctor = build.doctor_part(inst, wait=config.dns_wait, dns_server=config.dns_server,
                               shared=shared)
    report = build.build(inst, kind, end=end, doctor=doctor)
    env = render.envelope(report, inst.settings, config)
    inst.intake.check(env)
    return env


async def send_report(inst: Instance, kind: str, config: ReportsSettings, *,
                      end: float | None = None) -> str:
    """Queue the ``kind`` report's email; returns the message id."""
    env = await asyncio.to_thread(prepare, inst, kind, config, end=end)
    return await inst.queue.enqueue(env)


async def tick(inst: Instance, config: ReportsSettings, now: float) -> list[str]:
    """Send every report due and not sent yet by any node; returns the queued ids."""
    sent: list[str] = []
    if not config.to:
        return sent
    for kind in config.periods:
        due = last_due(kind, config, now)
        period_key = key(due)
        if not await asyncio.to_thread(claim, inst.engine, kind, period_key, now):
            continue
        try:
            sent.append(await send_report(inst, kind, config, end=due.timestamp()))
        except Exception as err:  # any failure gives the period back: retried next tick
            await asyncio.to_thread(release, inst.engine, kind, period_key, "")
            log.warning("the %s report of %s could not be queued (tried again in %.0f s): %s",
                        kind, period_key, INTERVAL, err)
        else:
            log.info("queued the %s report of %s: message %s", kind, period_key, sent[-1])
    return sent


async def report_loop(inst: Instance, settings: Callable[[], Settings], *,
                      interval: float = INTERVAL, clock: Callable[[], float] = time.time
                      ) -> None:
    """The chore: look every ``interval`` seconds, until cancelled. ``settings`` is read at
    each tick, so a configuration reload applies to the next one."""
    while True:
        config = settings().section(ReportsSettings)
        try:
            await tick(inst, config, clock())
        except Exception as err:  # a chore must outlive a database hiccup
            log.warning("summary reports: %s (tried again in %.0f s)", err, interval)
        await asyncio.sleep(interval)
