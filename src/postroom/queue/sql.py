"""The queue on SQL: enqueue (group commit), claim with a lease, finish, release. The log's
reads (search, one message, counts) are postroom.store.log's: ``Queue.log``.

Writes from one process go through one :class:`GroupCommitter`: every write that arrives
while a commit is in progress is folded into the next transaction, so many concurrent SMTP
sessions share one fsync, and nobody is told "accepted" before their row is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    union_all,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from postroom import events, maillog
from postroom.envelope import Envelope, new_id
from postroom.events import Event, Kind
from postroom.exceptions import MessageError, StoreError
from postroom.store.attempts import messages_for_provider_ids
from postroom.store.db import is_postgresql, write_transaction
from postroom.store.log import Log
from postroom.store.pending import insert_messages
from postroom.store.rows import message_row as message_row
from postroom.store.schema import (
    DEFERRED,
    PARTIAL,
    PRIORITIES,
    QUEUED,
    SENDING,
    SENT,
    WAITING,
    attempts,
    idempotency,
    messages,
    workers,
)

T = TypeVar("T")
Op = Callable[[Connection], Any]


@dataclass(frozen=True, slots=True)
class RowInsert:
    """One row to INSERT. All rows for the same statement in a batch go in one executemany,
    which costs a fraction of one execute per row (the hot path of accepting mail)."""

    stmt: Executable
    row: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FinishRow:
    """A delivery run's result: its message's new state (applied only while the lease is
    still ours) and its attempt rows. A batch's results are written together: one SELECT of
    the leases and two executemany, instead of two statements per message (the worker's
    hot path)."""

    params: dict[str, Any]  # the bind parameters of _FINISH
    attempts: list[dict[str, Any]]


Write = Op | RowInsert | FinishRow


def _run(conn: Connection, ops: Sequence[Write]) -> list[Any]:
    results: list[Any] = [None] * len(ops)
    groups: dict[int, list[int]] = {}
    finishes: list[int] = []
    for i, op in enumerate(ops):
        if isinstance(op, RowInsert):
            groups.setdefault(id(op.stmt), []).append(i)
        elif isinstance(op, FinishRow):
            finishes.append(i)
    for idxs in groups.values():
        first = ops[idxs[0]]
        assert isinstance(first, RowInsert)
        rows = [ops[i].row for i in idxs]  # type: ignore[union-attr]
        if first.stmt is _INSERT_MESSAGE and conn.dialect.name == "postgresql":
            insert_messages(conn, first.stmt, rows)  # the log's pending ids: store/pending.py
        else:
            conn.execute(first.stmt, rows)
    if finishes:
        fins: list[FinishRow] = [ops[i] for i in finishes]  # type: ignore[misc]
        finish = _finish_pg if conn.dialect.name == "postgresql" else _finish_any
        for i, ok in zip(finishes, finish(conn, fins), strict=True):
            results[i] = ok
    for i, op in enumerate(ops):
        if not isinstance(op, RowInsert | FinishRow):
            results[i] = op(conn)
    return results


def _finish_any(conn: Connection, fins: list[FinishRow]) -> list[bool]:
    """A batch of results: whose lease is still ours (one SELECT), then two executemany."""
    ids = [f.params["b_id"] for f in fins]
    held = {(r[0], r[1]) for r in conn.execute(_LEASES, {"ids": ids})}
    mine = [(f.params["b_id"], f.params["b_token"]) in held for f in fins]
    if any(mine):
        conn.execute(_FINISH, [f.params for f, ok in zip(fins, mine, strict=True) if ok])
    # Attempts are recorded even with a lost lease: they happened, the log tells it.
    rows = [row for f in fins for row in f.attempts]
    if rows:
        conn.execute(_INSERT_ATTEMPT, rows)
    return mine


def _finish_pg(conn: Connection, fins: list[FinishRow]) -> list[bool]:
    """The same on PostgreSQL in one statement (one round trip, one prepared plan whatever
    the batch size): the rows go as two JSON documents, which json.dumps writes at C speed
    and json_to_recordset() turns back into rows."""
    dumps = functools.partial(json.dumps, ensure_ascii=False)
    results = [{"id": p["b_id"], "token": p["b_token"], "status": p["status"],
                "next_attempt_at": p["next_attempt_at"], "rcpt_status": p["rcpt_status"],
                "last_error": p["last_error"], "counted": p["counted"],
                "updated_at": p["updated_at"], "copy_due": p["copy_due"], "via": p["via"]}
               for p in (f.params for f in fins)]
    tried = [row for f in fins for row in f.attempts]
    done = conn.exec_driver_sql(_FINISH_PG, {"results": dumps(results),
                                             "attempts": dumps(tried)})
    held = {row[0] for row in done}
    return [r["id"] in held for r in results]


# Attempts are recorded even with a lost lease (they happened; the log tells it), so the
# INSERT does not depend on the UPDATE. Both see the same snapshot and run once each.
# A forced copy's run (a finished message, not 'sending') keeps the message's status and
# error: those belong to its own recipients (postroom.policy).
_FINISH_PG = """
WITH v AS (
  SELECT * FROM json_to_recordset(%(results)s::json)
    AS v(id text, token text, status text, next_attempt_at float8, rcpt_status json,
         last_error text, counted int, updated_at float8, copy_due float8, via text)
), done AS (
  UPDATE messages AS m
  SET status = CASE WHEN m.status = 'sending' THEN v.status ELSE m.status END,
    next_attempt_at = v.next_attempt_at,
    lease_owner = NULL, lease_until = NULL, attempt_count = m.attempt_count + v.counted,
    rcpt_status = v.rcpt_status,
    last_error = CASE WHEN m.status = 'sending' THEN v.last_error ELSE m.last_error END,
    updated_at = v.updated_at, copy_due = v.copy_due, via = coalesce(v.via, m.via)
  FROM v WHERE m.id = v.id AND m.lease_owner = v.token
  RETURNING m.id
), tried AS (
  INSERT INTO attempts (message_id, connection, started_at, ended_at, outcome, reply_code,
                        reply_text, error_code, permanent, recipients, transcript,
                        provider_id)
  SELECT a.message_id, a.connection, a.started_at, a.ended_at, a.outcome, a.reply_code,
         a.reply_text, a.error_code, coalesce(a.permanent, false), a.recipients,
         coalesce(a.transcript, ''), a.provider_id
  FROM json_to_recordset(%(attempts)s::json)
    AS a(message_id text, connection text, started_at float8, ended_at float8,
         outcome text, reply_code int, reply_text text, error_code text, permanent bool,
         recipients json, transcript text, provider_id text)
)
SELECT id FROM done
"""

# Statements built once: SQLAlchemy then only looks up their compiled form.
_INSERT_MESSAGE = insert(messages)
_INSERT_ATTEMPT = insert(attempts)
_OWN_RUN = messages.c.status == SENDING  # not a forced copy's run (see _FINISH_PG)
_FINISH = (
    update(messages)
    .where(messages.c.id == bindparam("b_id"), messages.c.lease_owner == bindparam("b_token"))
    .values(
        status=case((_OWN_RUN, bindparam("status")), else_=messages.c.status),
        next_attempt_at=bindparam("next_attempt_at"),
        lease_owner=None,
        lease_until=None,
        attempt_count=messages.c.attempt_count + bindparam("counted"),
        rcpt_status=bindparam("rcpt_status", type_=messages.c.rcpt_status.type),
        last_error=case((_OWN_RUN, bindparam("last_error")), else_=messages.c.last_error),
        updated_at=bindparam("updated_at"),
        copy_due=bindparam("copy_due"),
        # the connection of the last attempt, for the log's connection filter
        via=func.coalesce(bindparam("via", type_=messages.c.via.type), messages.c.via),
    )
)
# Who holds these messages' leases (locked on PostgreSQL until the batch commits).
_LEASES = (
    select(messages.c.id, messages.c.lease_owner)
    .where(messages.c.id.in_(bindparam("ids", expanding=True)))
    .with_for_update()
)
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
# A claim reads a body only up to this size. A worker holds what it claimed in memory until
# each result is recorded (its `concurrency`, 100 by default): bigger bodies are read when
# their delivery starts, a few at a time (Worker), so claiming 100 messages of 20 MB each
# does not take 2 GB.
BODY_WITH_CLAIM = 256 * 1024
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
# Messages whose lease ran out (their worker died or hung) become due again.
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
EXPIRE_EVERY = 1.0  # seconds between two checks for run-out leases by one queue


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


def worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GroupCommitter:
    """Runs write operations in as few transactions as possible, on one writer thread.

    ``await submit(op)`` returns op's result after the transaction that ran it committed.
    A failing op is retried alone so that one bad row cannot fail its neighbours.
    """

    def __init__(self, engine: Engine, max_batch: int = 256, *, inline: bool = False) -> None:
        """``inline``: commit on the event loop's own thread instead of a worker thread. Only
        for a loop that does nothing but write (postroom.Mailer's private one): it saves two
        thread hand-offs per commit, which on a busy 2-core box cost more than the commit."""
        self._engine = engine
        self._max_batch = max_batch
        self._inline = inline
        self._pending: list[tuple[Write, asyncio.Future[Any]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    def enqueue(self, op: Write) -> asyncio.Future[Any]:
        """Queue ``op`` now, in call order, for the next transaction; its future gets the
        result after the commit. (Writes queued before another are never committed after
        it: a delivery's events are on disk no later than its result.)"""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(), name="postroom-group-commit")
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, fut))
        assert self._wake is not None
        self._wake.set()
        return fut

    async def submit(self, op: Write) -> Any:
        return await self.enqueue(op)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                ops = [op for op, _ in batch]
                results = (self._commit(ops) if self._inline
                           else await asyncio.to_thread(self._commit, ops))
                for (_, fut), (ok, value) in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)

    def _commit(self, ops: list[Write]) -> list[tuple[bool, Any]]:
        with self._lock:
            try:
                with write_transaction(self._engine) as conn:
                    return [(True, r) for r in _run(conn, ops)]
            except Exception:
                if len(ops) == 1:
                    return [self._one(ops[0])]
            return [self._one(op) for op in ops]

    def _one(self, op: Write) -> tuple[bool, Any]:
        try:
            with write_transaction(self._engine) as conn:
                return True, _run(conn, [op])[0]
        except SQLAlchemyError as err:
            return False, StoreError(f"database write failed: {err}", code="store.write")
        except Exception as err:
            return False, err

    def run_sync(self, op: Write) -> Any:
        """The same, for callers outside the event loop (CLI)."""
        ok, value = self._one(op)
        if not ok:
            raise value
        return value

    async def aclose(self) -> None:
        if self._task is not None:
            while self._pending:
                await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


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




@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An app's ``Idempotency-Key`` and a hash of the request it came with."""

    app: str
    key: str
    request_hash: str


class Queue:
    """Queue operations on one database; async methods are for the event loop, the
    ``*_sync`` twins for the CLI. Both run the same operation functions."""

    def __init__(
        self, engine: Engine, *, lifetime: float = 5 * 86400, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.lifetime = lifetime
        self.clock = clock
        self.writer = GroupCommitter(engine)
        self._postgresql = is_postgresql(engine)
        self.log = Log(engine)  # the email log's reads, on the same database
        self._expired_at = float("-inf")  # when leases were last checked (claims)

    # -- enqueue -------------------------------------------------------------------------
    def _enqueue_op(
        self, env: Envelope, hold: float = 0.0, idem: IdempotencyKey | None = None
    ) -> Write:
        row = message_row(env, self.clock(), self.lifetime, hold)
        if idem is None:
            return RowInsert(_INSERT_MESSAGE, row)

        def op(conn: Connection) -> str:
            # In the same transaction as the insert: two requests with one key cannot both
            # enqueue (in one batch they run in order; across processes the primary key of
            # `idempotency` makes the second transaction fail and be retried alone).
            found = conn.execute(
                select(idempotency.c.message_id, idempotency.c.request_hash).where(
                    idempotency.c.app == idem.app, idempotency.c.key == idem.key
                )
            ).first()
            if found is not None:
                if found.request_hash != idem.request_hash:
                    raise MessageError(
                        f"Idempotency-Key {idem.key!r} was already used for a different "
                        f"request (message {found.message_id}); use a new key for a new "
                        "message",
                        code="idempotency.conflict",
                    )
                return str(found.message_id)
            conn.execute(_INSERT_MESSAGE, row)
            conn.execute(
                insert(idempotency).values(
                    app=idem.app, key=idem.key, message_id=env.id,
                    request_hash=idem.request_hash, created_at=row["created_at"],
                )
            )
            return env.id

        return op

    async def enqueue(self, env: Envelope, *, idempotency: IdempotencyKey | None = None) -> str:
        """Store the message durably; returns its id once the commit is on disk. With an
        idempotency key already used by that app for the same request, nothing is stored
        and the first message's id is returned (compare it with ``env.id``)."""
        result = await self.writer.submit(self._enqueue_op(env, idem=idempotency))
        return self._accepted(env, result)

    def enqueue_sync(
        self, env: Envelope, *, hold: float = 0.0, idempotency: IdempotencyKey | None = None
    ) -> str:
        """``hold``: not due for workers before that many seconds, for a caller that claims
        it at once with ``claim(only=...)`` (`send --now`): a running worker cannot take it
        first, and it is still delivered if that caller dies before claiming."""
        result = self.writer.run_sync(self._enqueue_op(env, hold, idempotency))
        return self._accepted(env, result)

    @staticmethod
    def _accepted(env: Envelope, result: Any) -> str:
        """The stored message's id; its "accepted" log line (none for a repeated
        idempotency key: the first request's message was logged then)."""
        if result is None or result == env.id:
            maillog.accepted(env)
            return env.id
        return str(result)

    # -- claim / finish / release ----------------------------------------------------------
    def _claim_op(self, owner: str, limit: int, lease: float, only: str | None = None) -> Op:
        def op(conn: Connection) -> list[Claimed]:
            now = self.clock()
            if not 0 <= now - self._expired_at < EXPIRE_EVERY:
                # Cheap (the index's status prefix limits it to the few rows being sent),
                # but a statement: once a second is soon enough for leases of minutes.
                self._expire_leases(conn, now)
                self._expired_at = now
            token = f"{owner}:{next(_claim_seq)}"[:64]
            lease_args = {"token": token, "until": now + lease, "now": now}
            rows: Sequence[Any] = []
            if only is None and self._postgresql:
                rows = conn.execute(_CLAIM_PG, {"lim": limit, **lease_args}).all()
            elif ids := [only] if only is not None else _due_ids(conn, now, limit):
                # "only": deliver this one now, whatever its retry time
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

        return op

    def _expire_leases(self, conn: Connection, now: float) -> int:
        """Messages whose lease ran out (their worker died or hung) become due again, each
        with a ``lease_expired`` event (a possible duplicate)."""
        ids = [r[0] for r in conn.execute(_EXPIRE, {"now": now})]
        if ids:
            events.record_all(conn, [Event(Kind.LEASE_EXPIRED, now, message_id=i,
                                           detail=_LEASE_EXPIRED) for i in ids])
        return len(ids)

    async def claim(
        self, owner: str, limit: int, lease: float, only: str | None = None
    ) -> list[Claimed]:
        """Lease up to ``limit`` due messages (or the one message ``only``) to ``owner``."""
        result: list[Claimed] = await self.writer.submit(
            self._claim_op(owner, limit, lease, only)
        )
        return result

    def _finish_op(
        self,
        msg: Claimed,
        *,
        status: str,
        next_attempt_at: float,
        last_error: str | None,
        attempts: Sequence[dict[str, Any]],
        copy_due: float | None = None,
    ) -> FinishRow:
        return FinishRow(
            {
                "b_id": msg.id,
                "b_token": msg.token,
                "status": status,
                "next_attempt_at": next_attempt_at,
                "rcpt_status": msg.rcpt_status,
                "last_error": last_error,
                "counted": 1 if attempts else 0,
                "updated_at": self.clock(),
                "copy_due": copy_due,
                "via": attempts[-1]["connection"] if attempts else None,
            },
            [{"message_id": msg.id, **a} for a in attempts],
        )

    async def finish(
        self,
        msg: Claimed,
        *,
        status: str,
        next_attempt_at: float,
        last_error: str | None,
        attempts: Sequence[dict[str, Any]],
        copy_due: float | None = None,
    ) -> bool:
        """Record the attempts (one per connection tried; none when the message only waited
        for a limit) and the message's next state; ``copy_due``: when its forced copies
        still pending are tried on their own. False if the lease was lost (another worker
        reclaimed the message after our lease ran out)."""
        ok: bool = await self.writer.submit(
            self._finish_op(
                msg, status=status, next_attempt_at=next_attempt_at, last_error=last_error,
                attempts=attempts, copy_due=copy_due,
            )
        )
        if ok and msg.status == SENDING:  # not a run of forced copies alone (the worker's)
            maillog.finished(msg.id, app=msg.app, recipients=msg.recipients, status=status,
                             attempts=attempts, last_error=last_error,
                             tries=msg.attempt_count + (1 if attempts else 0))
        return ok

    async def reclaim_dead_local(self) -> int:
        """Expire the leases of workers on this host whose process is gone (kill -9, crash),
        so a restarted server delivers their mail now rather than after lease_seconds.
        Workers on other hosts cannot be checked: their leases simply run out."""
        host = socket.gethostname()[:40]

        def op(conn: Connection) -> int:
            rows = conn.execute(
                select(messages.c.id, messages.c.lease_owner).where(
                    messages.c.status == SENDING, messages.c.lease_owner.like(f"{host}:%")
                )
            ).all()
            dead = []
            for r in rows:
                pid = r.lease_owner.split(":")[1] if r.lease_owner.count(":") >= 2 else ""
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    dead.append(r.id)
            if dead:
                conn.execute(
                    update(messages)
                    .where(messages.c.id.in_(dead), messages.c.status == SENDING)
                    .values(lease_until=0.0)
                )
                self._expire_leases(conn, self.clock())  # due now, not at the next check
            return len(dead)

        n: int = await self.writer.submit(op)
        return n

    async def release(self, msgs: Sequence[Claimed]) -> None:
        """Give leased messages back (graceful shutdown): due again at once."""

        def op(conn: Connection) -> None:
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

        if msgs:
            await self.writer.submit(op)

    async def body(self, msg_id: str) -> bytes:
        """A message's body (for one claimed with ``body_later``)."""

        def read() -> bytes:
            with self.engine.connect() as conn:
                raw = conn.execute(select(messages.c.raw).where(messages.c.id == msg_id)).scalar()
            return bytes(raw or b"")

        try:
            return await asyncio.to_thread(read)
        except SQLAlchemyError as err:
            raise StoreError(f"reading message {msg_id} failed: {err}", code="store.read") from err

    async def renew(self, tokens: Sequence[str], lease: float) -> int:
        """Extend the leases taken under these claim tokens (messages still being sent), so
        that no other worker takes mail this one is still working on."""

        def op(conn: Connection) -> int:
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

        n: int = await self.writer.submit(op)
        return n

    # -- workers ---------------------------------------------------------------------------
    async def heartbeat(self, owner: str, started_at: float, *, gone: bool = False) -> None:
        """Say that worker ``owner`` is alive (or, with ``gone``, that it stopped)."""
        now = self.clock()

        def op(conn: Connection) -> None:
            conn.execute(delete(workers).where(workers.c.id == owner))
            if not gone:
                conn.execute(insert(workers).values(id=owner, started_at=started_at, seen_at=now))

        await self.writer.submit(op)

    def workers_seen(self, since: float) -> list[dict[str, Any]]:
        """Workers that reported in at or after ``since``."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(workers).where(workers.c.seen_at >= since))
            return [dict(r._mapping) for r in rows]

    def resend_sync(self, msg_id: str, to: list[str] | None = None) -> str:
        """Queue a copy of a logged message (to its recipients, or to ``to``): a new log entry."""
        orig = self.log.get(msg_id)
        if orig is None or orig["raw"] is None:
            raise MessageError(f"no message {msg_id!r} with a stored body", code="message.unknown")
        env = Envelope(
            sender=orig["sender"],
            recipients=to or list(orig["recipients"]),
            raw=orig["raw"],
            source=f"resend:{orig['id']}",
            app=orig["app"],  # an operator's resend stays visible to the app it belongs to
            connection=orig["connection"],
            id=new_id(),
            tags=list(orig.get("tags") or []),
            metadata=dict(orig.get("meta") or {}),
        )
        return self.enqueue_sync(env)

    def message_for_provider_id(self, connection: str, provider_id: str) -> str | None:
        """The message that connection ``connection`` delivered under the provider's id
        ``provider_id`` (delivery events, postroom.webhooks), or None."""
        return messages_for_provider_ids(self.engine, connection, [provider_id]).get(
            provider_id)

    def delete_sync(self, msg_id: str) -> bool:
        def op(conn: Connection) -> bool:
            conn.execute(delete(attempts).where(attempts.c.message_id == msg_id))
            return bool(conn.execute(delete(messages).where(messages.c.id == msg_id)).rowcount)

        ok: bool = self.writer.run_sync(op)
        return ok
