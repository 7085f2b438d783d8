"""Connection health, shared by every worker and node through the database: the pause
switch, the circuit breaker, and the events alerts are made from.

Circuit breaker: each connection-level failure (see ``chain.counts_against_connection``)
adds one to the connection's consecutive-failure count and makes it *degraded*; at
``delivery.breaker_failures`` it is *down*: skipped for ``delivery.breaker_cooldown``
seconds, so its messages go straight to the next connection in their chain instead of
waiting for a timeout each. When the cool-down is over, the next message probes it: success
makes it *up* again, failure opens the circuit for another cool-down.

Reads are cached for a second: a pause given with the CLI on one node takes effect on every
node within about a second, without a database read per message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from postroom.queue.sql import Queue
from postroom.store.schema import connection_state, control, events

log = logging.getLogger(__name__)
UP, DEGRADED, DOWN = "up", "degraded", "down"
QUEUE_PAUSED = "queue_paused"
_CACHE_SECONDS = 1.0


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

    def blocked(self, now: float) -> str | None:
        """Why this connection must be skipped now, or None."""
        if self.paused:
            return "paused"
        if self.open_until is not None and now < self.open_until:
            return f"circuit open after {self.failures} failures: {self.last_error or ''}"
        return None


def _ensure(conn: Connection, name: str, now: float) -> State:
    row = conn.execute(
        select(connection_state).where(connection_state.c.name == name).with_for_update()
    ).first()
    if row is None:
        conn.execute(insert(connection_state).values(
            name=name, paused=False, health=UP, failures=0, since=now))
        return State(name=name, since=now)
    return State(**row._mapping)


def record_event(conn: Connection, now: float, kind: str, *, message_id: str | None = None,
                 connection: str | None = None, detail: str = "") -> None:
    conn.execute(insert(events).values(at=now, kind=kind, message_id=message_id,
                                       connection=connection, detail=detail[:2000]))


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
        self._pending: set[asyncio.Task[Any]] = set()
        self._skip_noted: dict[str, float] = {}

    def _background(self, op: Callable[[Connection], Any],
                    then: Callable[[Any], None] | None = None) -> None:
        """Write without making the delivery wait for the commit: health and events are
        bookkeeping, and each awaited commit is an fsync on the delivery path (with the
        breaker open, 0.47x the plain rate). Errors are logged, never raised."""

        async def run() -> None:
            try:
                result = await self.queue.writer.submit(op)
            except Exception as err:  # bookkeeping must never stop a delivery
                log.error("recording connection health failed: %s", err)
                return
            if then is not None:
                then(result)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

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
            cur = _ensure(conn, name, now)
            if cur.health == DOWN:
                record_event(conn, now, "connection_up", connection=name,
                             detail=f"delivering again after {cur.failures} failures")
            conn.execute(update(connection_state).where(connection_state.c.name == name)
                         .values(health=UP, failures=0, open_until=None, last_success_at=now,
                                 since=now if cur.health != UP else cur.since))

        self._cache[name] = State(name=name, paused=st.paused, since=now, last_success_at=now)
        self._background(op)

    async def failed(self, name: str, error: str) -> None:
        now = self.clock()
        limit, cooldown = self.failures, self.cooldown

        def op(conn: Connection) -> State:
            cur = _ensure(conn, name, now)
            failures = cur.failures + 1
            health = DOWN if failures >= limit else DEGRADED
            values: dict[str, Any] = dict(failures=failures, health=health, last_error=error[:2000],
                                          last_error_at=now)
            if health != cur.health:
                values["since"] = now
            if health == DOWN:
                values["open_until"] = now + cooldown
                if cur.health != DOWN:
                    record_event(conn, now, "connection_down", connection=name,
                                 detail=f"{failures} failures in a row; last: {error}")
            conn.execute(update(connection_state).where(connection_state.c.name == name)
                         .values(**values))
            return dataclasses.replace(cur, **values)

        self._background(op, then=lambda st: self._cache.__setitem__(name, st))

    async def event(self, kind: str, *, message_id: str | None = None,
                    connection: str | None = None, detail: str = "") -> None:
        now = self.clock()
        self._background(lambda conn: record_event(conn, now, kind, message_id=message_id,
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
                record_event(conn, now, "queue_paused" if paused else "queue_resumed")
                return
            _ensure(conn, name, now)
            conn.execute(update(connection_state).where(connection_state.c.name == name)
                         .values(paused=paused))
            record_event(conn, now, "connection_paused" if paused else "connection_resumed",
                         connection=name)

        self.queue.writer.run_sync(op)
        self._read_at = -1e9

