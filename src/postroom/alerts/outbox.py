"""The alerts' outbox: one row per alert and channel (table ``alert_outbox``), retried with
backoff like mail (postroom.queue.backoff), so an alert survives a restart and a channel that
is down for a while. A channel that fails for good (a permanent error: 404/410, an unusable
URL; or MAX_ATTEMPTS tries of one alert) is disabled (a ``control`` row says so, until
`postroom alerts enable CHANNEL`), and the dispatcher reports that on the other channels.
A row is claimed before it is sent; a node that dies while sending frees it after CLAIM
seconds, so that alert may be sent twice, never lost. Each channel's alerts sent are also
counted in a ``control`` row (SENT_COUNT + channel id), in the transaction that marks the row
sent: /metrics reads the total from there (:func:`figures`), as the outbox's rows are pruned.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    String,
    cast,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from postroom.alerts import Alert
from postroom.queue.backoff import backoff
from postroom.store.db import write_transaction
from postroom.store.schema import alert_outbox as table
from postroom.store.schema import control

PENDING, SENT, FAILED = "pending", "sent", "failed"
MIN_BACKOFF, MAX_BACKOFF = 30.0, 3600.0
CLAIM = 120.0  # seconds a sender holds a row while it sends (a crash frees it then)
DISABLED = "alerts.disabled:"  # control row name prefix + channel id; value: why
SENT_COUNT = "alerts.sent:"  # control row name prefix + channel id; value: alerts sent
MAX_ERROR = 500


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    channel: str
    status: str
    attempts: int
    created_at: float
    sent_at: float | None
    last_error: str
    alert: Alert


def _row(r: object) -> Row:
    return Row(r.id, r.channel, r.status, r.attempts, r.created_at,  # type: ignore[attr-defined]
               r.sent_at, r.last_error, Alert.from_dict(json.loads(r.payload)))  # type: ignore[attr-defined]


def add(conn: Connection, alerts: Iterable[Alert], channels: Sequence[str], now: float) -> int:
    """Queue each alert for each channel, in ``conn``'s transaction; one already written
    (same key and channel) is left alone. How many rows were written."""
    n = 0
    for alert in alerts:
        have = set(conn.execute(select(table.c.channel).where(
            table.c.alert_key == alert.key)).scalars())
        rows = [{"alert_key": alert.key, "channel": ch, "created_at": now, "status": PENDING,
                 "attempts": 0, "next_at": now, "last_error": "",
                 "payload": json.dumps(alert.as_dict())} for ch in channels if ch not in have]
        if rows:
            conn.execute(insert(table), rows)
            n += len(rows)
    return n


def claim_due(engine: Engine, now: float, limit: int = 50) -> list[Row]:
    """Pending rows due now, each claimed for CLAIM seconds by a conditional update (two
    nodes never send the same row at once)."""
    t = table.c
    with engine.connect() as conn:
        found = conn.execute(select(table).where(t.status == PENDING, t.next_at <= now)
                             .order_by(t.next_at, t.id).limit(limit)).all()
    out = []
    for r in found:
        with write_transaction(engine) as conn:
            got = conn.execute(update(table).where(t.id == r.id, t.status == PENDING,
                                                   t.next_at == r.next_at)
                               .values(next_at=now + CLAIM)).rowcount
        if got:
            out.append(_row(r))
    return out


def sent(engine: Engine, row: Row, now: float) -> None:
    with write_transaction(engine) as conn:
        conn.execute(update(table).where(table.c.id == row.id).values(
            status=SENT, sent_at=now, attempts=table.c.attempts + 1, last_error=""))
        _count_sent(conn, row.channel, now)


def _count_sent(conn: Connection, channel: str, now: float) -> None:
    name = SENT_COUNT + channel
    bump = (update(control).where(control.c.name == name)
            .values(value=cast(cast(control.c.value, Integer) + 1, String), updated_at=now))
    if conn.execute(bump).rowcount:
        return
    try:  # the channel's first alert; another node may be writing the row at the same time
        with conn.begin_nested():
            conn.execute(insert(control).values(name=name, value="1", updated_at=now))
    except IntegrityError:
        conn.execute(bump)


def failed(engine: Engine, row: Row, error: str, now: float, *, final: bool) -> None:
    """A try failed: due again after the backoff, or (``final``) failed for good."""
    tries = row.attempts + 1
    values = {"attempts": tries, "last_error": error[:MAX_ERROR],
              "next_at": now + backoff(tries, MIN_BACKOFF, MAX_BACKOFF)}
    if final:
        values["status"] = FAILED
    with write_transaction(engine) as conn:
        conn.execute(update(table).where(table.c.id == row.id).values(**values))


def disable(conn: Connection, channel: str, why: str, now: float) -> bool:
    """Disable ``channel`` and fail its pending rows; False when it already was."""
    name = DISABLED + channel
    if conn.execute(select(control.c.name).where(control.c.name == name)).first():
        return False
    conn.execute(insert(control).values(name=name, value=why[:MAX_ERROR], updated_at=now))
    conn.execute(update(table).where(table.c.channel == channel, table.c.status == PENDING)
                 .values(status=FAILED, last_error=f"channel disabled: {why}"[:MAX_ERROR]))
    return True


def enable(engine: Engine, channel: str) -> bool:
    with write_transaction(engine) as conn:
        return bool(conn.execute(delete(control).where(
            control.c.name == DISABLED + channel)).rowcount)


def disabled(engine: Engine) -> dict[str, str]:
    """Disabled channel id -> why."""
    with engine.connect() as conn:
        rows = conn.execute(select(control.c.name, control.c.value).where(
            control.c.name.like(DISABLED + "%"))).all()
    return {r.name[len(DISABLED):]: r.value for r in rows}


def history(engine: Engine, *, limit: int = 100, channel: str | None = None) -> list[Row]:
    """The newest rows first."""
    q = select(table).order_by(table.c.id.desc()).limit(max(1, min(limit, 1000)))
    if channel:
        q = q.where(table.c.channel == channel)
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(q).all()]


def prune(engine: Engine, before: float) -> int:
    """Delete sent and failed rows created before ``before`` (the log's keep_rows_days)."""
    with write_transaction(engine) as conn:
        return int(conn.execute(delete(table).where(
            table.c.status != PENDING, table.c.created_at < before)).rowcount)


@dataclass(frozen=True)
class Figures:
    """What /metrics reports of the alerts, per channel id."""

    sent: dict[str, int]  # alerts sent, ever (the control counters)
    waiting: dict[tuple[str, bool], int]  # (channel, tried before) -> pending rows
    failed: dict[str, int]  # rows that failed for good, among those kept
    disabled: set[str]


def figures(conn: Connection) -> Figures:
    """The outbox's figures: counters from ``control``, the pending and failed rows by
    their (status, next_at) index (the sent rows, nearly all of them, are not read)."""
    t, c = table.c, control.c
    sent_rows = conn.execute(select(c.name, c.value).where(c.name.like(SENT_COUNT + "%")))
    sent = {n[len(SENT_COUNT):]: int(v) for n, v in sent_rows}
    waiting: dict[tuple[str, bool], int] = {}
    failed: dict[str, int] = {}
    tried = (t.attempts > 0).label("tried")
    for channel, status, was_tried, n in conn.execute(
            select(t.channel, t.status, tried, func.count())
            .where(t.status.in_((PENDING, FAILED))).group_by(t.channel, t.status, tried)):
        if status == PENDING:
            waiting[(channel, bool(was_tried))] = int(n)
        else:
            failed[channel] = int(n)
    off = {n[len(DISABLED):] for n in conn.execute(
        select(c.name).where(c.name.like(DISABLED + "%"))).scalars()}
    return Figures(sent, waiting, failed, off)
