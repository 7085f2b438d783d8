"""The queue on SQL: enqueue, claim with a lease, finish, release; one :class:`Queue` per
database. The work is its modules': the group commit every write goes through
(postroom.queue.commit), the lease protocol (postroom.queue.lease), recording results
(postroom.queue.finish), the worker registry (postroom.queue.workers). The log's reads
(search, one message, counts) are postroom.store.log's: ``Queue.log``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy.exc import SQLAlchemyError

from postroom import maillog
from postroom.envelope import Envelope, new_id
from postroom.exceptions import MessageError, StoreError
from postroom.queue import workers as registry
from postroom.queue.commit import INSERT_MESSAGE, GroupCommitter, Op, Write
from postroom.queue.finish import FinishRow, finish_row
from postroom.queue.insert import RowInsert
from postroom.queue.lease import Claimed, Leases
from postroom.store.attempts import messages_for_provider_ids
from postroom.store.db import is_postgresql
from postroom.store.log import Log
from postroom.store.rows import message_row
from postroom.store.schema import SENDING, attempts, idempotency, messages


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
        self.leases = Leases(clock, postgresql=is_postgresql(engine))
        self.log = Log(engine)  # the email log's reads, on the same database

    # -- enqueue -------------------------------------------------------------------------
    def _enqueue_op(
        self, env: Envelope, hold: float = 0.0, idem: IdempotencyKey | None = None
    ) -> Write:
        row = message_row(env, self.clock(), self.lifetime, hold)
        if idem is None:
            return RowInsert(INSERT_MESSAGE, row)

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
            conn.execute(INSERT_MESSAGE, row)
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
            return self.leases.claim(conn, owner, limit, lease, only)

        return op

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
        return finish_row(msg, status=status, next_attempt_at=next_attempt_at,
                          last_error=last_error, attempts=attempts, copy_due=copy_due,
                          now=self.clock())

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
        """Expire the leases of workers on this host whose process is gone, so a restarted
        server delivers their mail now rather than after lease_seconds."""
        n: int = await self.writer.submit(self.leases.reclaim_dead_local)
        return n

    async def release(self, msgs: Sequence[Claimed]) -> None:
        """Give leased messages back (graceful shutdown): due again at once."""
        if msgs:
            await self.writer.submit(lambda conn: self.leases.release(conn, msgs))

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
        n: int = await self.writer.submit(lambda conn: self.leases.renew(conn, tokens, lease))
        return n

    # -- workers ---------------------------------------------------------------------------
    async def heartbeat(self, owner: str, started_at: float, *, gone: bool = False) -> None:
        """Say that worker ``owner`` is alive (or, with ``gone``, that it stopped)."""
        now = self.clock()
        await self.writer.submit(
            lambda conn: registry.heartbeat(conn, owner, started_at, now, gone=gone))

    def workers_seen(self, since: float) -> list[dict[str, Any]]:
        """Workers that reported in at or after ``since``."""
        return registry.seen(self.engine, since)

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
