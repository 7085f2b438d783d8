"""Group commit: one process's writes in as few transactions as possible.

Every write that arrives while a commit is in progress is folded into the next transaction,
so many concurrent SMTP sessions share one fsync, and nobody is told "accepted" before their
row is on disk. Within a transaction, writes of the same kind go together: the rows of one
INSERT in one executemany (the hot path of accepting mail), a batch's delivery results in
one go (postroom.queue.finish, the worker's hot path).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, insert
from sqlalchemy.exc import SQLAlchemyError

from postroom.exceptions import StoreError
from postroom.queue import finish
from postroom.queue.finish import FinishRow
from postroom.queue.insert import RowInsert
from postroom.store.db import write_transaction
from postroom.store.pending import insert_messages
from postroom.store.schema import messages

Op = Callable[[Connection], Any]
# New messages: on PostgreSQL their batch also writes the log's pending ids (store/pending.py).
INSERT_MESSAGE = insert(messages)


Write = Op | RowInsert | FinishRow


def run_writes(conn: Connection, ops: Sequence[Write]) -> list[Any]:
    """Run ``ops`` in the transaction ``conn``; their results in order (None for a row)."""
    results: list[Any] = [None] * len(ops)
    inserts: dict[int, list[RowInsert]] = {}
    finishes: list[int] = []
    for i, op in enumerate(ops):
        if isinstance(op, RowInsert):
            inserts.setdefault(id(op.stmt), []).append(op)
        elif isinstance(op, FinishRow):
            finishes.append(i)
    for group in inserts.values():
        stmt, rows = group[0].stmt, [op.row for op in group]
        if stmt is INSERT_MESSAGE and conn.dialect.name == "postgresql":
            insert_messages(conn, stmt, rows)
        else:
            conn.execute(stmt, rows)
    if finishes:
        fins: list[FinishRow] = [ops[i] for i in finishes]  # type: ignore[misc]
        for i, ok in zip(finishes, finish.record(conn, fins), strict=True):
            results[i] = ok
    for i, op in enumerate(ops):
        if not isinstance(op, RowInsert | FinishRow):
            results[i] = op(conn)
    return results


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
                    return [(True, r) for r in run_writes(conn, ops)]
            except Exception:
                if len(ops) == 1:
                    return [self._one(ops[0])]
            return [self._one(op) for op in ops]

    def _one(self, op: Write) -> tuple[bool, Any]:
        try:
            with write_transaction(self._engine) as conn:
                return True, run_writes(conn, [op])[0]
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
