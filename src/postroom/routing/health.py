"""Connection health, shared by every worker and node through the database: the pause
switch, the circuit breaker, and the events alerts are made from.

Circuit breaker: each connection-level failure (see ``chain.counts_against_connection``)
adds one to the connection's consecutive-failure count and makes it *degraded*; at
``delivery.breaker_failures`` it is *down*: skipped for ``delivery.breaker_cooldown``
seconds, so its messages go straight to the next connection in their chain instead of
waiting for a timeout each. When the cool-down is over, the next message probes it: success
makes it *up* again, failure opens the circuit for another cool-down.

Hold (Retry-After): a provider that answers 429 or 503 with ``Retry-After`` (RFC 9110
section 10.2.3) asks to be left alone that long. The connection is then *held* until that
moment (``held_until``) for every worker and node, without counting more than the one
failure against the breaker; its messages fall back along their chain meanwhile
(postroom.routing.walk).

Reads are cached for a second: a pause given with the CLI on one node takes effect on every
node within about a second, without a database read per message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, insert, or_, select, update

from postroom import events
from postroom.events import Kind
from postroom.queue.commit import Write
from postroom.queue.sql import Queue
from postroom.store.schema import connection_state, control

log = logging.getLogger(__name__)
UP, DEGRADED, DOWN = "up", "degraded", "down"
QUEUE_PAUSED = "queue_paused"
_CACHE_SECONDS = 1.0
PAUSED_RECHECK = 15.0  # a message whose connections are all paused looks again this late


@dataclass(slots=True)
class State:
    name: str
    paused: bool = False
    health: str = UP
    failures: int = 0
    since: float = 0.0
    open_until: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_success_at: float | None = None
    held_until: float | None = None  # the provider asked to wait until then (Retry-After)

    def held(self, now: float) -> bool:
        return self.held_until is not None and now < self.held_until

    def blocked(self, now: float) -> str | None:
        """Why this connection must be skipped now, or None."""
        if self.paused:
            return "paused"
        if self.open_until is not None and now < self.open_until:
            return f"circuit open after {self.failures} failures: {self.last_error or ''}"
        if self.held_until is not None and now < self.held_until:
            return f"held until {_hms(self.held_until)} at the provider's request (Retry-After)"
        return None

    def usable_at(self, now: float) -> float:
        """When a skipped connection is worth looking at again: a paused one a little
        later (it is resumed by hand), one with its circuit open or held when that ends."""
        if self.paused:
            return now + PAUSED_RECHECK
        ends = [t for t in (self.open_until, self.held_until) if t is not None and t > now]
        return max(ends, default=now + PAUSED_RECHECK)


def _hms(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S UTC")


def ensure_state(conn: Connection, name: str, now: float) -> State:
    row = conn.execute(
        select(connection_state).where(connection_state.c.name == name).with_for_update()
    ).first()
    if row is None:
        conn.execute(insert(connection_state).values(
            name=name, paused=False, health=UP, failures=0, since=now))
        return State(name=name, since=now)
    return State(**row._mapping)


_FAILED = (update(connection_state).where(connection_state.c.name == bindparam("b_name"))
           .values(failures=bindparam("failures"), health=bindparam("health"),
                   last_error=bindparam("last_error"), last_error_at=bindparam("last_error_at"),
                   since=bindparam("since"), open_until=bindparam("open_until")))


class Health:
    def __init__(self, queue: Queue, failures: int, cooldown: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self._cache: dict[str, State] = {}
        self._queue_paused = False
        self._read_at = -1e9
        self._pending: set[asyncio.Future[Any]] = set()
        self._skip_noted: dict[str, float] = {}
        # connection -> (failures not yet written, last error, when); shared with the writer
        # thread that runs the queued write
        self._failing: dict[str, tuple[int, str, float]] = {}
        self._lock = threading.Lock()

    def _background(self, op: Write, then: Callable[[Any], None] | None = None) -> None:
        """Write without making the delivery wait for the commit: health and events are
        bookkeeping, and each awaited commit is an fsync on the delivery path (with the
        breaker open, 0.47x the plain rate). Errors are logged, never raised."""

        def done(fut: asyncio.Future[Any]) -> None:
            self._pending.discard(fut)
            if fut.cancelled():
                return
            if (err := fut.exception()) is not None:  # bookkeeping never stops a delivery
                log.error("recording connection health failed: %s", err)
            elif then is not None:
                then(fut.result())

        # Queued at once, ahead of the delivery's result: committed with it or before it.
        fut = self.queue.writer.enqueue(op)
        self._pending.add(fut)
        fut.add_done_callback(done)

    async def flush(self) -> None:
        """Wait for the writes still in flight (worker shutdown, tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def skipped_once(self, names: Sequence[str]) -> bool:
        """True the first time in a cool-down that mail goes around these (open or paused)
        connections: one ``fallback_used`` event per outage, not one per message."""
        now = time.monotonic()
        fresh = [n for n in names if now - self._skip_noted.get(n, -1e9) >= self.cooldown]
        for n in fresh:
            self._skip_noted[n] = now
        return bool(fresh)

    # -- reads (cached) ------------------------------------------------------------------
    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < _CACHE_SECONDS:
            return
        with self.queue.engine.connect() as conn:
            rows = conn.execute(select(connection_state)).all()
            paused = conn.execute(
                select(control.c.value).where(control.c.name == QUEUE_PAUSED)).scalar()
        self._cache = {r.name: State(**r._mapping) for r in rows}
        self._queue_paused = paused == "1"
        self._read_at = now

    def state(self, name: str) -> State:
        self._refresh()
        return self._cache.get(name) or State(name=name)

    def queue_paused(self) -> bool:
        self._refresh()
        return self._queue_paused

    def all(self, names: Sequence[str]) -> list[State]:
        self._read_at = -1e9  # the CLI and the API want it fresh
        self._refresh()
        return [self._cache.get(n) or State(name=n) for n in names]

    # -- writes ----------------------------------------------------------------------------
    async def succeeded(self, name: str) -> None:
        """Cheap on the hot path: writes only when the connection was not already up."""
        st = self.state(name)
        if st.health == UP and st.failures == 0 and st.open_until is None:
            return
        now = self.clock()

        def op(conn: Connection) -> None:
            cur = ensure_state(conn, name, now)
            if cur.health == DOWN:
                events.record(conn, Kind.CONNECTION_UP, at=now, connection=name,
                              detail=f"delivering again after {cur.failures} failures")
            conn.execute(update(connection_state).where(connection_state.c.name == name)
                         .values(health=UP, failures=0, open_until=None, last_success_at=now,
                                 since=now if cur.health != UP else cur.since))

        self._cache[name] = State(name=name, paused=st.paused, since=now, last_success_at=now,
                                  held_until=st.held_until)
        self._background(op)

    async def failed(self, name: str, error: str) -> None:
        """Count a connection-level failure. Failures that come while one write for this
        connection is still queued join it: with the breaker kept closed, every message
        of a batch failing on the same connection is one statement, not one each."""
        with self._lock:
            count, _, _ = self._failing.get(name, (0, "", 0.0))
            self._failing[name] = (count + 1, error, self.clock())
            if count:
                return  # the queued write takes this one too
        limit, cooldown = self.failures, self.cooldown

        taken: list[tuple[int, str, float]] = []  # kept if the write is tried again alone

        def op(conn: Connection) -> State:
            if not taken:
                with self._lock:
                    taken.append(self._failing.pop(name))
            n, error, now = taken[0]
            cur = ensure_state(conn, name, now)
            failures = cur.failures + n
            health = DOWN if failures >= limit else DEGRADED
            since = now if health != cur.health else cur.since
            open_until = now + cooldown if health == DOWN else cur.open_until
            if health == DOWN and cur.health != DOWN:
                events.record(conn, Kind.CONNECTION_DOWN, at=now, connection=name,
                              detail=f"{failures} failures in a row; last: {error}")
            conn.execute(_FAILED, {"b_name": name, "failures": failures, "health": health,
                                   "last_error": error[:2000], "last_error_at": now,
                                   "since": since, "open_until": open_until})
            return dataclasses.replace(cur, failures=failures, health=health, since=since,
                                       open_until=open_until, last_error=error[:2000],
                                       last_error_at=now)

        self._background(op, then=lambda st: self._cache.__setitem__(name, st))

    async def hold(self, name: str, until: float, why: str) -> None:
        """Leave connection ``name`` alone until ``until`` (epoch seconds), on every worker
        and node: its upstream asked so (Retry-After). A longer hold already in place stays;
        a ``connection_held`` event is recorded when a hold starts."""
        st = self.state(name)
        if st.held_until is not None and st.held_until >= until:
            return
        now = self.clock()
        self._cache[name] = dataclasses.replace(st, held_until=until)  # this worker at once

        def op(conn: Connection) -> None:
            cur = ensure_state(conn, name, now)
            if cur.held_until is not None and cur.held_until >= until:
                return  # another worker's hold is as long
            conn.execute(update(connection_state).where(
                connection_state.c.name == name,
                or_(connection_state.c.held_until.is_(None),
                    connection_state.c.held_until < until)).values(held_until=until))
            if not cur.held(now):
                events.record(conn, Kind.CONNECTION_HELD, at=now, connection=name,
                              detail=f"held until {_hms(until)} ({until - now:.0f} s): {why}")

        self._background(op)

    async def event(self, kind: Kind, *, message_id: str | None = None,
                    connection: str | None = None, detail: str = "") -> None:
        self._background(events.queued(kind, at=self.clock(), message_id=message_id,
                                       connection=connection, detail=detail))

    def set_paused(self, name: str | None, paused: bool) -> None:
        """Pause or resume one connection, or (``name=None``) the whole queue. For the CLI
        and the API: synchronous."""
        now = self.clock()

        def op(conn: Connection) -> None:
            if name is None:
                conn.execute(control.delete().where(control.c.name == QUEUE_PAUSED))
                conn.execute(insert(control).values(name=QUEUE_PAUSED, value="1" if paused
                                                    else "0", updated_at=now))
                events.record(conn, Kind.QUEUE_PAUSED if paused else Kind.QUEUE_RESUMED,
                              at=now)
                return
            ensure_state(conn, name, now)
            conn.execute(update(connection_state).where(connection_state.c.name == name)
                         .values(paused=paused))
            events.record(conn, Kind.CONNECTION_PAUSED if paused else Kind.CONNECTION_RESUMED,
                          at=now, connection=name)

        self.queue.writer.run_sync(op)
        self._read_at = -1e9

