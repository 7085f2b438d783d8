"""What /metrics reports, read from the database (blocking: run it in a thread).

Every process and node writes the same database, so these figures are the instance's, not
one process's. Each read is bounded: message counts come from the log's hourly rollups
(finished mail) and the queue index (waiting mail, few rows); the breaker and the OAuth
grants have one row per connection; attempts and events are read once each, in id order,
at most :data:`BATCH` rows per scrape (:class:`Tail`), and kept as running totals here,
counted from this process's first scrape on. The alerts' figures (postroom.alerts.outbox:
the counters of alerts sent, the rows waiting or failed, the disabled channels) are read
only when [[alerts]] has rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Connection, Table, func, select

from postroom import events
from postroom.alerts.outbox import Figures as AlertFigures
from postroom.alerts.outbox import figures as alert_figures
from postroom.queue.sql import Queue
from postroom.routing.health import DOWN, Health
from postroom.settings import Settings
from postroom.store.schema import attempts, log_rollups, messages, oauth_grants
from postroom.store.states import SENDING, WAITING

BATCH = 20_000  # attempt or event rows read per scrape at most (a first scrape catches up)
# Rows younger than this are left for the next scrape: ids are given at insert and rows
# become visible at commit, so on PostgreSQL a row with a lower id may appear a moment after
# one with a higher id; reading only settled rows keeps the running totals from skipping it.
SETTLE = 2.0
# Attempt durations (seconds): an API call or SMTP session is ~0.1-2 s, a slow server's
# DATA reply can take a minute (RFC 5321 4.5.3.2.6 allows 10 minutes).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STATES = ("up", "degraded", "down", "held")


class Tail:
    """An append-only table read once each row, in id order: ``read`` returns the rows
    after the last one seen, at most ``batch`` of them, up to the first that is not settled
    (its ``at`` within :data:`SETTLE` of now): it and those after it wait for the next read,
    so a row written with an older time after a newer one is not skipped. (A node whose
    clock runs ahead delays the rows after its own by as much.)"""

    def __init__(self, table: Table, at: Column[Any], columns: Sequence[Column[Any]],
                 batch: int = BATCH) -> None:
        self.table = table
        self.at = at
        self.columns = tuple(columns)
        self.batch = batch
        self.last: int | None = None  # the id read last; None before the first read

    def read(self, conn: Connection, now: float) -> list[Any]:
        """Rows with ``id``, ``settled_at`` (the ``at`` column) and the columns asked for."""
        idc = self.table.c.id
        if self.last is None:
            # Counted from the first read on, not over the table's past: counters that start
            # at zero when a server does are what Prometheus expects (rate() sees a reset),
            # whereas catching up on history would look like a burst of new failures.
            self.last = int(conn.execute(select(func.max(idc))).scalar() or 0)
            return []
        rows = []
        for row in conn.execute(select(idc, self.at.label("settled_at"), *self.columns)
                                .where(idc > self.last).order_by(idc).limit(self.batch)):
            if row.settled_at > now - SETTLE:
                break
            rows.append(row)
        if rows:
            self.last = int(rows[-1].id)
        return rows


class EventTail:
    """The events followed like :class:`Tail`, through their one reader (postroom.events):
    from the newest at the first read on, then each settled event once, in id order."""

    def __init__(self, engine: Any, batch: int = BATCH) -> None:
        self.engine = engine
        self.batch = batch
        self.last: int | None = None

    def read(self, now: float) -> list[events.Event]:
        if self.last is None:
            self.last = events.last_id(self.engine)
            return []
        out: list[events.Event] = []
        while len(out) < self.batch:
            page = events.read(self.engine, after_id=self.last, limit=events.READ_LIMIT)
            for ev in page:
                if ev.at > now - SETTLE or ev.id is None:
                    return out
                out.append(ev)
                self.last = ev.id
            if len(page) < events.READ_LIMIT:
                break
        return out


@dataclass
class Histogram:
    """Cumulative counts per bucket upper bound (the last is +Inf), and the sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.total += value
        for i, bound in enumerate((*BUCKETS, float("inf"))):
            if value <= bound:
                self.counts[i] += 1


@dataclass(frozen=True)
class Breaker:
    connection: str
    state: str  # one of STATES
    paused: bool
    failures: int


@dataclass(frozen=True)
class Grant:
    connection: str
    access_expires: float | None
    refresh_expires: float | None
    dead: bool


@dataclass
class Snapshot:
    """The figures of one scrape."""

    at: float
    messages: dict[tuple[str, str, str], int]  # (status, connection, app) -> count
    queue: dict[str, int]  # waiting or sending status -> count
    oldest_age: float  # seconds since the oldest waiting message came in; 0 when none
    oldest_due: float  # seconds the longest-overdue due message has waited; 0 when none
    queue_paused: bool
    breakers: list[Breaker]
    grants: list[Grant]
    events: dict[str, int]  # kind -> running total
    durations: dict[tuple[str, str], Histogram]  # (connection, outcome) -> histogram
    alerts: AlertFigures | None = None  # the alerts' outbox (none read: no [[alerts]])
    alert_channels: tuple[str, ...] = ()  # the channel ids [[alerts]] configures


class Collector:
    """Reads a :class:`Snapshot`; keeps the running totals of attempts and events."""

    def __init__(self, queue: Queue, settings: Callable[[], Settings]) -> None:
        self.queue = queue
        self.settings = settings
        self.events: dict[str, int] = {k.value: 0 for k in events.Kind}
        self.durations: dict[tuple[str, str], Histogram] = {}
        a = attempts.c
        self._attempts = Tail(attempts, a.ended_at, (a.connection, a.outcome, a.started_at))
        self._events = EventTail(queue.engine)

    def snapshot(self) -> Snapshot:
        now = time.time()
        settings = self.settings()
        with self.queue.engine.connect() as conn:
            counts = self._messages(conn)
            oldest_due = self._overdue(conn, now)
            for row in self._attempts.read(conn, now):
                hist = self.durations.setdefault((row.connection, row.outcome), Histogram())
                hist.observe(max(0.0, float(row.settled_at) - float(row.started_at)))
            for ev in self._events.read(now):
                self.events[ev.kind.value] = self.events.get(ev.kind.value, 0) + 1
            channels = alert_channels(settings)
            alerts = alert_figures(conn) if channels else None
            grants = [Grant(r.connection, r.expires_at, r.refresh_expires_at, r.state == "dead")
                      for r in conn.execute(select(
                          oauth_grants.c.connection, oauth_grants.c.expires_at,
                          oauth_grants.c.refresh_expires_at, oauth_grants.c.state))]
        depth = self.queue.log.queue_depth()
        queue = {s: int(depth[s]) for s in (*WAITING, SENDING)}
        d = settings.delivery
        health = Health(self.queue, d.breaker_failures, d.breaker_cooldown)
        names = [c.name for c in settings.connections]
        breakers = []
        for st in health.all(names):
            state = "held" if st.held(now) and st.health != DOWN else st.health
            breakers.append(Breaker(st.name, state, st.paused, st.failures))
        return Snapshot(at=now, messages=counts, queue=queue,
                        oldest_age=float(depth["oldest_age"] or 0.0),
                        oldest_due=oldest_due, queue_paused=health.queue_paused(),
                        breakers=breakers, grants=grants, events=dict(self.events),
                        durations={k: Histogram(list(h.counts), h.total)
                                   for k, h in self.durations.items()},
                        alerts=alerts, alert_channels=channels)

    @staticmethod
    def _messages(conn: Connection) -> dict[tuple[str, str, str], int]:
        """Every message in the log by (status, connection that last tried it, app):
        finished ones from the hourly rollups, the rest from the queue index."""
        r, m = log_rollups.c, messages.c
        out: dict[tuple[str, str, str], int] = {}
        for status, conn_name, app, n in conn.execute(
                select(r.status, r.connection, r.app, func.sum(r.count))
                .group_by(r.status, r.connection, r.app)):
            if n:
                out[(status, conn_name or "", app or "")] = int(n)
        for status, via, app, n in conn.execute(
                select(m.status, m.via, m.app, func.count())
                .where(m.status.in_((*WAITING, SENDING))).group_by(m.status, m.via, m.app)):
            out[(status, via or "", app or "")] = int(n)
        return out

    @staticmethod
    def _overdue(conn: Connection, now: float) -> float:
        """Seconds the longest-overdue waiting message has been due (0 when none is): mail
        that should be going and is not. One min() per status on the (status, ...) index."""
        m = messages.c
        due = [conn.execute(select(func.min(m.next_attempt_at)).where(
            m.status == s, m.next_attempt_at <= now)).scalar() for s in WAITING]
        return max(0.0, now - min((float(d) for d in due if d is not None), default=now))


def alert_channels(settings: Settings) -> tuple[str, ...]:
    """The alert channel ids of the settings' [[alerts]] rules (none without the section:
    then neither the rules' module nor the outbox is read)."""
    if not any(name == "alerts" for name, _ in settings.features):
        return ()
    from postroom.alerts.config import AlertsSettings

    return tuple(settings.section(AlertsSettings).channel_ids())
