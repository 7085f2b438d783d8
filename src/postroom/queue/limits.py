"""Per-connection rate limits and session limits that hold across every worker and node.

A send on a limited connection first reserves a slot in the database, in one transaction
that locks the connection's ``connection_state`` row (PostgreSQL: ``FOR UPDATE``; SQLite
has a single writer anyway), so two workers cannot both take the last slot:

- rates (``rate_limit = ["50/minute", "2000/day"]``) are sliding windows over ``send_log``:
  at most COUNT sends in any PERIOD, not per calendar minute (which would allow 2×COUNT
  across a minute boundary);
- ``max_sessions`` counts leases in ``session_leases``, each held for one send and given
  back after it (or expiring, if its worker died).

Over a limit, nothing fails: the caller gets the time a slot frees and the mail waits in the
queue until then. Connections without limits never touch these tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, delete, func, insert, select

from postroom.queue.sql import Queue
from postroom.routing.health import ensure_state
from postroom.settings import ConnectionBase
from postroom.store.schema import send_log, session_leases

_SESSION_RETRY = 1.0  # all sessions busy: look again this much later


def limited(conn: ConnectionBase) -> bool:
    return bool(conn.rate_limit) or conn.max_sessions is not None


class Limiter:
    def __init__(self, queue: Queue, *, lease: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.lease = lease
        self.clock = clock

    async def acquire(self, conn: ConnectionBase, holder: str) -> float | None:
        """Reserve one send on ``conn`` for ``holder``. None: go ahead (then call
        :meth:`release`). A number: the epoch time at which to try again."""
        now = self.clock()
        name, rates, sessions, lease = conn.name, conn.rates, conn.max_sessions, self.lease

        def op(db: Connection) -> float | None:
            ensure_state(db, name, now)  # locks the connection's row: one reservation at a time
            retry: float | None = None
            for count, period in rates:
                used = db.execute(select(func.count()).select_from(send_log).where(
                    send_log.c.connection == name, send_log.c.at > now - period)).scalar_one()
                if used >= count:
                    # The window frees a slot when its (used - count + 1)-th oldest send
                    # leaves it.
                    oldest = db.execute(
                        select(send_log.c.at)
                        .where(send_log.c.connection == name, send_log.c.at > now - period)
                        .order_by(send_log.c.at).offset(used - count).limit(1)
                    ).scalar_one()
                    retry = max(retry or 0.0, oldest + period)
            if sessions is not None:
                busy = db.execute(select(func.count()).select_from(session_leases).where(
                    session_leases.c.connection == name, session_leases.c.until > now)
                ).scalar_one()
                if busy >= sessions:
                    retry = max(retry or 0.0, now + _SESSION_RETRY)
            if retry is not None:
                return retry
            if rates:
                db.execute(insert(send_log).values(connection=name, at=now))
            if sessions is not None:
                db.execute(delete(session_leases).where(
                    session_leases.c.connection == name, session_leases.c.until <= now))
                db.execute(insert(session_leases).values(holder=holder, connection=name,
                                                         until=now + lease))
            return None

        result: float | None = await self.queue.writer.submit(op)
        return result

    async def release(self, conn: ConnectionBase, holder: str) -> None:
        if conn.max_sessions is None:
            return
        await self.queue.writer.submit(
            lambda db: db.execute(delete(session_leases).where(session_leases.c.holder == holder)))

    def purge(self, db: Connection, connections: Sequence[ConnectionBase]) -> int:
        """Forget sends that no window can count any more (run by the retention job)."""
        now = self.clock()
        keep = {c.name: max(p for _, p in c.rates) for c in connections if c.rate_limit}
        n = db.execute(delete(send_log).where(send_log.c.connection.not_in(list(keep)))).rowcount
        for name, longest in keep.items():
            n += db.execute(delete(send_log).where(send_log.c.connection == name,
                                                   send_log.c.at <= now - longest)).rowcount
        return int(n)
