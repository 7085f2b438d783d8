"""Which messages wait for the email log's text index (``postroom.store.log``'s indexer).

The enqueue is what every door's "accepted" waits on, so it should write nothing for the
index (issue 13: >= 0.9x of its rate without the log's indexes). Migration 0017:

- SQLite: a message waits when its rowid is above the mark in the ``control`` row MARK.
  SQLite has one writer at a time and gives a new row the largest rowid + 1, so rowids
  follow commit order and one number tells which rows the indexer has read; the enqueue
  (and ``postroom-sendmail``'s direct insert, and any other writer) writes nothing more
  than the message. A delete that takes the newest rows lowers the mark to the largest
  rowid left (migration 0017's delete trigger): a rowid given again is pending again.
  (Migration 0008's per-row insert trigger was a measurable share of the enqueue's cost:
  docs/benchmarks.md.)
- PostgreSQL: the ids in ``log_pending``. Its sequence values and transaction ids are not
  commit order (a row with a lower one can commit after the indexer passed it), so no mark
  can say which rows the indexer has read. An insert trigger writes them for every writer
  (migration 0017's ``log_insert``), but a plpgsql call and an INSERT per row were a large
  share of the raw enqueue's cost; the queue's batch (:func:`insert_messages`) writes its
  ids itself in one statement, and the trigger skips rows inserted while the transaction's
  setting SKIP is on (its WHEN, checked before any function runs). One statement for the
  messages too (``unnest`` of arrays) was tried and cost more: psycopg's pipelined
  executemany lets the server insert row k while this process sends row k + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Executable,
    Insert,
    Integer,
    Select,
    bindparam,
    cast,
    insert,
    literal_column,
    select,
    text,
)

from postroom.store.schema import control, log_pending, messages

MARK = "log.indexed_rowid"  # SQLite: the largest rowid in the text index (migration 0017)
# The mark as SQL, for statements written as text (store.log's FTS5 queries).
MARK_SQL = f"(SELECT CAST(value AS INTEGER) FROM control WHERE name = '{MARK}')"
_ROWID: ColumnElement[int] = literal_column("messages.rowid")
SKIP = "postroom.pending_written"  # PostgreSQL: the row trigger leaves these rows alone
_SKIP = text(f"SELECT set_config('{SKIP}', :on, true)")  # true: this transaction only
# DO NOTHING: on a schema before 0017 (a test at an old revision) the trigger wrote them.
_ADD = text("INSERT INTO log_pending (id) SELECT unnest(CAST(:ids AS text[])) "
            "ON CONFLICT DO NOTHING")


def mark() -> ColumnElement[int]:
    """SQLite: the mark, as a scalar subquery (NULL where there is no text index)."""
    return select(cast(control.c.value, Integer)).where(control.c.name == MARK) \
        .scalar_subquery()


def waiting(pg: bool) -> ColumnElement[bool]:
    """The condition on ``messages`` (not aliased) of a message not in the index yet."""
    if pg:
        return messages.c.id.in_(select(log_pending.c.id))
    return mark() < _ROWID


def ids(pg: bool) -> Select[tuple[str]]:
    """The ids of the messages not in the index yet."""
    if pg:
        return select(log_pending.c.id)
    return select(messages.c.id).where(waiting(pg))


def take(conn: Connection, batch: int) -> tuple[list[str], int]:
    """SQLite, in the indexer's write transaction: up to ``batch`` waiting messages in rowid
    (arrival) order, and the rowid of the last (the mark once they are indexed)."""
    rows = conn.execute(select(messages.c.id, _ROWID.label("rid")).where(waiting(False))
                        .order_by(_ROWID).limit(batch)).all()
    return [r.id for r in rows], (int(rows[-1].rid) if rows else 0)


def advance(conn: Connection, upto: int) -> None:
    """SQLite: every message up to rowid ``upto`` is in the index (same transaction)."""
    conn.execute(control.update().where(control.c.name == MARK).values(value=str(upto)))


def insert_messages(conn: Connection, stmt: Executable, rows: Sequence[dict[str, Any]]) -> None:
    """PostgreSQL: the executemany ``stmt`` of new messages ``rows``, and their pending ids
    in one statement, the row trigger off for them alone (the caller's other statements in
    the same transaction, an idempotent enqueue's INSERT, still get it).

    The rows go up to CHUNK to a statement: the server pays a set-up per statement (the
    executor opening every index, compiling the partial indexes' predicates and the
    insert trigger's WHEN), which with one row a statement was most of what the log's
    indexes cost the enqueue (docs/benchmarks.md). The chunks still go as one pipelined
    executemany, unlike one statement for the whole batch (which was slower: the server
    could not insert a row while the next ones were on their way)."""
    if not rows:
        return
    conn.execute(_SKIP, {"on": "on"})
    keys = tuple(rows[0])
    values = itemgetter(*keys)
    whole = len(rows) - len(rows) % CHUNK
    for start, end, size in ((0, whole, CHUNK), (whole, len(rows), len(rows) - whole)):
        if end == start:
            continue
        if size == 1:
            conn.execute(stmt, rows[start:end])
            continue
        chunked, names = _chunked(keys, size)
        params = []
        for i in range(start, end, size):
            group: dict[str, Any] = {}
            for j in range(size):
                group.update(zip(names[j], values(rows[i + j]), strict=True))
            params.append(group)
        conn.execute(chunked, params)
    conn.execute(_SKIP, {"on": "off"})
    conn.execute(_ADD, {"ids": [r["id"] for r in rows]})


CHUNK = 16  # rows a statement in insert_messages
# By the rows' keys and count: the INSERT of that many, each row's parameter names.
_CHUNKED: dict[tuple[tuple[str, ...], int], tuple[Insert, list[tuple[str, ...]]]] = {}


def _chunked(keys: tuple[str, ...], size: int) -> tuple[Insert, list[tuple[str, ...]]]:
    """An INSERT of ``size`` messages with columns ``keys`` (parameters ``{key}_{j}``), and
    the names of row j's parameters in the order of ``keys``."""
    found = _CHUNKED.get((keys, size))
    if found is None:
        names = [tuple(f"{k}_{j}" for k in keys) for j in range(size)]
        found = _CHUNKED[keys, size] = (insert(messages).values([
            {k: bindparam(n, type_=messages.c[k].type) for k, n in zip(keys, names[j],
                                                                        strict=True)}
            for j in range(size)]), names)
    return found
