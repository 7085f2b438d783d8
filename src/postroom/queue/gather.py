"""Many small writes of one kind, run as one write with shared statements.

The group commit (postroom.queue.commit.GroupCommitter) already puts every write that arrives
during a commit into the next transaction, but each write still runs its own statements: a
hundred one-event webhook requests are a hundred duplicate checks, a hundred lookups and a
hundred inserts in that transaction. A :class:`Gather` folds the items submitted while its
write waits for the writer into that one write, whose function gets them all and runs each
statement once for all (an ``IN`` list, an executemany).

Each caller still hears only once its own item is committed. One item that makes the
shared write fail does not fail the others: the group commit runs a failed write again
alone, and then this runs each item in a savepoint of its own, so only the bad one fails.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from postroom.exceptions import StoreError

if TYPE_CHECKING:
    from postroom.queue.commit import GroupCommitter

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class _Failed:
    """An item's error in a group whose other items were written."""

    error: BaseException


@dataclass(eq=False)
class _Group(Generic[T]):
    """Items waiting for one write: open (taking items) until the writer runs it."""

    loop: asyncio.AbstractEventLoop
    items: list[T] = field(default_factory=list)
    future: asyncio.Future[Any] | None = None
    failed: bool = False  # the shared write raised once: run each item alone now


class Gather(Generic[T, R]):
    """Items of one kind written together: ``write(conn, items)`` returns one result per
    item, in order, and runs in the writer's transaction."""

    def __init__(self, write: Callable[[Connection, Sequence[T]], Sequence[R]]) -> None:
        self._write = write
        # Taken on the event loop (adding an item) and on the writer thread (closing the
        # group): an item added after the writer took the group would never be written.
        self._lock = threading.Lock()
        self._open: weakref.WeakKeyDictionary[GroupCommitter, _Group[T]] = (
            weakref.WeakKeyDictionary())

    async def submit(self, writer: GroupCommitter, item: T) -> R:
        """``item``'s result, once the transaction that wrote it committed."""
        loop = asyncio.get_running_loop()
        with self._lock:
            group = self._open.get(writer)
            if group is None or group.loop is not loop:
                group = _Group[T](loop)
                self._open[writer] = group
                group.future = writer.enqueue(functools.partial(self._run, writer, group))
            index = len(group.items)
            group.items.append(item)
        assert group.future is not None
        # Shielded: a caller that goes away (its client disconnected) must not cancel the
        # write the others wait for.
        results = await asyncio.shield(group.future)
        result = results[index]
        if isinstance(result, _Failed):
            raise result.error
        return result  # type: ignore[no-any-return]

    def _run(self, writer: GroupCommitter, group: _Group[T],
             conn: Connection) -> Sequence[R | _Failed]:
        with self._lock:
            if self._open.get(writer) is group:
                del self._open[writer]
        if not group.failed or len(group.items) == 1:
            try:
                return self._write(conn, group.items)
            except Exception:
                group.failed = True
                raise
        return [self._alone(conn, item) for item in group.items]

    def _alone(self, conn: Connection, item: T) -> R | _Failed:
        try:
            with conn.begin_nested():
                return self._write(conn, [item])[0]
        except SQLAlchemyError as err:  # as the group commit words it for a write alone
            return _Failed(StoreError(f"database write failed: {err}", code="store.write"))
        except Exception as err:  # handed to its caller, as the group commit does
            return _Failed(err)
