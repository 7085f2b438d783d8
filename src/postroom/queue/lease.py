"""The lease protocol: a worker claims due messages under a lease, renews it while it sends,
and gives them back (release) or records a result (postroom.queue.finish). A lease that
runs out (its worker died or hung) makes the message due again: another worker may then
deliver it a second time, which the log says.

A claim's lease is a token (the worker's id and a sequence number) in ``lease_owner`` and
an end time in ``lease_until``. Every function here runs inside the caller's write
transaction (postroom.queue.commit).
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, select, union_all, update

from postroom import events
from postroom.events import Event, Kind
from postroom.queue.workers import dead_local_owners
from postroom.store.schema import (
    DEFERRED,
    PARTIAL,
    PRIORITIES,
    QUEUED,
    SENDING,
    SENT,
    WAITING,
    messages,
)

# A claim reads a body only up to this size. A worker holds what it claimed in memory until
# each result is recorded (its `concurrency`, 100 by default): bigger bodies are read when
# their delivery starts, a few at a time (Worker), so claiming 100 messages of 20 MB each
# does not take 2 GB.
BODY_WITH_CLAIM = 256 * 1024
EXPIRE_EVERY = 1.0  # seconds between two checks for run-out leases by one queue


@dataclass(slots=True)
class Claimed:
    """A message leased to one worker for one delivery attempt."""

    id: str
    token: str
    sender: str
    recipients: list[str]
    rcpt_status: dict[str, dict[str, Any]]
    raw: bytes
    connection: str | None
    attempt_count: int
    expires_at: float
    source: str = ""
    app: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # the app's key/values ("meta")
    priority: int = 0
    body_later: bool = False  # a big body, not read with the claim: Queue.body() reads it
    # As claimed: 'sending' for a delivery of the message, or 'sent' / 'partial' for a run
    # of its forced copies alone (postroom.policy).
    status: str = SENDING
    # Why this try is the message's only one (a test send): what is not sent now fails
    # with this reason instead of waiting for a retry. None: retried until it expires.
    no_retry: str | None = None

    @property
    def pending(self) -> list[str]:
        """Recipients still to deliver: never tried, transiently refused, or with an unknown
        outcome (retried on the connection that may have delivered, see rcpt_status "via")."""
        return [r for r in self.recipients
                if self.rcpt_status[r]["state"] in ("pending", "unknown")]


class Leases:
    """The lease protocol on one database; ``clock`` is the queue's."""

    def __init__(self, clock: Callable[[], float], *, postgresql: bool) -> None:
        self.clock = clock
        self._postgresql = postgresql
        self._expired_at = float("-inf")  # when run-out leases were last looked for

    def claim(self, conn: Connection, owner: str, limit: int, lease: float,
              only: str | None = None) -> list[Claimed]:
        """Lease up to ``limit`` due messages (or the one message ``only``, whatever its
        retry time) to ``owner``, highest priority first, then oldest due first."""
        now = self.clock()
        if not 0 <= now - self._expired_at < EXPIRE_EVERY:
            # Cheap (the index's status prefix limits it to the few rows being sent), but a
            # statement: once a second is soon enough for leases of minutes.
            self.expire(conn, now)
            self._expired_at = now
        token = f"{owner}:{next(_claim_seq)}"[:64]
        lease_args = {"token": token, "until": now + lease, "now": now}
        rows: Sequence[Any] = []
        if only is None and self._postgresql:
            rows = conn.execute(_CLAIM_PG, {"lim": limit, **lease_args}).all()
        elif ids := [only] if only is not None else _due_ids(conn, now, limit):
            rows = conn.execute(_CLAIM, {"ids": ids, **lease_args}).all()
        if only is None and len(rows) < limit and (copies := [r[0] for r in conn.execute(
                _COPIES_DUE, {"now": now, "lim": limit - len(rows)})]):
            rows = [*rows, *conn.execute(_CLAIM_COPIES, {"ids": copies, **lease_args})]
        return [
            Claimed(
                id=r.id,
                token=token,
                sender=r.sender,
                recipients=list(r.recipients),
                rcpt_status=dict(r.rcpt_status),
                raw=r.raw or b"",
                body_later=r.raw is None and r.size > BODY_WITH_CLAIM,
                connection=r.connection,
                attempt_count=r.attempt_count,
                expires_at=r.expires_at,
                source=r.source,
                app=r.app,
                tags=list(r.tags or []),
                metadata=dict(r.meta or {}),
                priority=r.priority,
                status=r.status,
            )
            for r in sorted(rows, key=lambda r: (-r.priority, r.next_attempt_at))
        ]

    def expire(self, conn: Connection, now: float) -> int:
        """Messages whose lease ran out become due again, each with a ``lease_expired``
        event (a possible duplicate)."""
        ids = [r[0] for r in conn.execute(_EXPIRE, {"now": now})]
        if ids:
            events.record_all(conn, [Event(Kind.LEASE_EXPIRED, now, message_id=i,
                                           detail=_LEASE_EXPIRED) for i in ids])
        return len(ids)

    def renew(self, conn: Connection, tokens: Sequence[str], lease: float) -> int:
        """Extend the leases taken under these claim tokens (messages still being sent)."""
        until = self.clock() + lease
        res = conn.execute(
            update(messages)
            .where(messages.c.status == SENDING, messages.c.lease_owner.in_(list(tokens)))
            .values(lease_until=until)
        )
        copies = conn.execute(  # forced copies' runs: their lease ends at copy_due
            update(messages)
            .where(messages.c.status.in_((SENT, PARTIAL)), messages.c.copy_due.is_not(None),
                   messages.c.lease_owner.in_(list(tokens)))
            .values(lease_until=until, copy_due=until)
        )
        return int(res.rowcount) + int(copies.rowcount)

    def release(self, conn: Connection, msgs: Sequence[Claimed]) -> None:
        """Give leased messages back: due again at once."""
        for m in msgs:
            if m.status != SENDING:  # a forced copy's run: the message keeps its status
                conn.execute(
                    update(messages)
                    .where(messages.c.id == m.id, messages.c.lease_owner == m.token)
                    .values(lease_owner=None, lease_until=None, copy_due=self.clock())
                )
                continue
            conn.execute(
                update(messages)
                .where(messages.c.id == m.id, messages.c.lease_owner == m.token)
                .values(
                    status=DEFERRED if m.attempt_count else QUEUED,
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=self.clock(),
                )
            )

    def reclaim_dead_local(self, conn: Connection) -> int:
        """Expire the leases of workers on this host whose process is gone (kill -9, crash):
        due now, not at the next check nor when the lease runs out. Workers on other hosts
        cannot be checked: their leases simply run out."""
        host = socket.gethostname()[:40]
        rows = conn.execute(
            select(messages.c.id, messages.c.lease_owner).where(
                messages.c.status == SENDING, messages.c.lease_owner.like(f"{host}:%")
            )
        ).all()
        gone = dead_local_owners({r.lease_owner for r in rows}, os.getpid())
        dead = [r.id for r in rows if r.lease_owner in gone]
        if dead:
            conn.execute(
                update(messages)
                .where(messages.c.id.in_(dead), messages.c.status == SENDING)
                .values(lease_until=0.0)
            )
            self.expire(conn, self.clock())
        return len(dead)


def _due_ids(conn: Connection, now: float, limit: int) -> list[str]:
    """Up to ``limit`` due message ids, highest priority first, then oldest due first."""
    ids: list[str] = []
    for i in range(0, len(_DUE), len(WAITING)):  # one priority level at a time
        found: list[tuple[float, str, int]] = []
        for stmt in _DUE[i:i + len(WAITING)]:
            found += conn.execute(stmt, {"now": now, "lim": limit - len(ids)}).all()
        ids += [mid for _, mid, _ in sorted(found)[:limit - len(ids)]]
        if len(ids) >= limit:
            break
    return ids


# One query per waiting status and priority level, each walking the
# (status, priority, next_attempt_at) index in order and stopping after `lim` rows; one
# query with `status IN (...)` or ORDER BY priority would sort every due row first (7 ms at
# 20k queued). Highest priority first: the claim stops once it has enough. On PostgreSQL,
# FOR UPDATE SKIP LOCKED lets workers that claim at the same moment take different rows
# instead of queueing behind each other's locks (SQLite has one writer and ignores it).
_DUE = [
    select(messages.c.next_attempt_at, messages.c.id, messages.c.priority)
    .where(
        messages.c.status == status,
        messages.c.priority == level,
        messages.c.next_attempt_at <= bindparam("now"),
    )
    .order_by(messages.c.next_attempt_at)
    .limit(bindparam("lim"))
    .with_for_update(skip_locked=True)
    for level in sorted(PRIORITIES.values(), reverse=True)
    for status in WAITING
]
_CLAIMED = (  # what a claim reads back (Claimed)
    messages.c.id, messages.c.sender, messages.c.recipients, messages.c.rcpt_status,
    case((messages.c.size <= BODY_WITH_CLAIM, messages.c.raw)).label("raw"), messages.c.size,
    messages.c.connection, messages.c.attempt_count, messages.c.expires_at,
    messages.c.next_attempt_at, messages.c.priority, messages.c.source, messages.c.app,
    messages.c.tags, messages.c.meta, messages.c.status,
)
# Re-checking the status skips rows another worker claimed since the SELECT. It is wrapped
# in coalesce() so that it cannot match an index: SQLite would otherwise walk the
# (status, ...) index over every waiting row instead of looking up these few ids by primary
# key (6 ms instead of 0.2 ms at 20k queued). RETURNING (SQLite >= 3.35, PostgreSQL) hands
# back the rows in the same query.
_LEASED = dict(status=SENDING, lease_owner=bindparam("token"), lease_until=bindparam("until"),
               updated_at=bindparam("now"))
_CLAIM = (
    update(messages)
    .where(
        messages.c.id.in_(bindparam("ids", expanding=True)),
        func.coalesce(messages.c.status, "").in_(WAITING),
    )
    .values(**_LEASED)
    .returning(*_CLAIMED)
)
# PostgreSQL: the same claim in one statement (one round trip instead of one per query
# above): each (status, priority) arm is a CTE of its own, since FOR UPDATE is not allowed
# in a UNION; the arms lock at most `lim` rows each, and the ones not picked are unlocked at
# commit. FOR UPDATE re-checks each row's WHERE against its newest committed version, so
# what it returns is still waiting.
_ARMS = [q.cte(f"due_{i}") for i, q in enumerate(_DUE)]
_DUE_ALL = union_all(*(select(a.c.id, a.c.priority, a.c.next_attempt_at)
                       for a in _ARMS)).subquery("due")
_PICK = (select(_DUE_ALL.c.id)
         .order_by(_DUE_ALL.c.priority.desc(), _DUE_ALL.c.next_attempt_at)
         .limit(bindparam("lim")).subquery("pick"))
_CLAIM_PG = (
    update(messages)
    .where(messages.c.id == _PICK.c.id, messages.c.status.in_(WAITING))
    .values(**_LEASED)
    .returning(*_CLAIMED)
)
# Finished messages with a forced copy due (postroom.policy): the message keeps its status;
# the lease is the claim token plus copy_due pushed to the lease's end, so the copy of a
# worker that died is simply due again then (no 'sending' row for _EXPIRE to reset).
_COPIES_DUE = (
    select(messages.c.id)
    .where(messages.c.copy_due <= bindparam("now"))
    .order_by(messages.c.copy_due)
    .limit(bindparam("lim"))
    .with_for_update(skip_locked=True)
)
_CLAIM_COPIES = (
    update(messages)
    .where(
        messages.c.id.in_(bindparam("ids", expanding=True)),
        messages.c.copy_due <= bindparam("now"),
        messages.c.status.in_((SENT, PARTIAL)),
    )
    .values(lease_owner=bindparam("token"), lease_until=bindparam("until"),
            copy_due=bindparam("until"))
    .returning(*_CLAIMED)
)
_EXPIRE = (
    update(messages)
    .where(messages.c.status == SENDING, messages.c.lease_until < bindparam("now"))
    .values(
        status=case((messages.c.attempt_count > 0, DEFERRED), else_=QUEUED),
        lease_owner=None,
        lease_until=None,
        next_attempt_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    .returning(messages.c.id)
)
_LEASE_EXPIRED = (  # the event for each: the log must say a duplicate is possible
    "the worker that was sending it stopped answering (died or hung) before recording a "
    "result; it is due again, and if that worker had already handed it to the server, the "
    "next delivery is a duplicate")
_claim_seq = itertools.count()
