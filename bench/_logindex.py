"""The email log's indexes off: the "without" state the benches compare the queue against.

Migration 0008 (src/postroom/store/migrations/versions/0008_log_search_rollups.py) gives
the log its filter indexes, text index, pending trigger and rollup triggers; migration 0011
the address table's delete and rewrite triggers; migration 0017 makes the status index
partial and SQLite's pending rows a rowid mark (no insert trigger left there; the mark's
row stays, unread without the index).
Issue 13 asks that enqueue and delivery keep >= 0.9x of their throughput with all of that
in place;
bench/log_bench.py, bench/relay_bench.py and bench/worker_bench.py each measure a run on a
database where :func:`drop_log_indexes` removed it, beside a normal one.

The database stays at the head revision (nothing is downgraded), so a ``postroom serve``
or ``postroom worker`` started on it migrates nothing and runs as usual. On SQLite its
indexer chore finds no text index and indexes nothing. On PostgreSQL the queue's batch still
writes the pending ids itself (``postroom.store.pending.insert_messages``, since migration
0017), so "without" still pays that statement at the enqueue, and the chore still copies
those messages into ``message_search`` (no trigram index left on it) and ``log_addresses``:
"without" there is the log's indexes and triggers off, not all of its bookkeeping.
"""

from __future__ import annotations

from sqlalchemy import Engine, func, select

from postroom.store.db import write_transaction
from postroom.store.schema import messages

_INDEXES = ("ix_messages_status_created", "ix_messages_app_created", "ix_messages_via_created",
            "ix_message_search_body", "ix_message_search_rcpt", "ix_message_search_sndr")
_PG_TRIGGERS = ("log_rollup_ins", "log_rollup_del", "log_rollup_upd", "message_search_upd",
                "log_pending_ins", "log_forget_del", "log_addresses_upd", "log_insert")
_SQLITE_TRIGGERS = ("log_rollup_ins", "log_rollup_del", "log_rollup_upd_old",
                    "log_rollup_upd_new", "messages_fts_del", "messages_fts_upd",
                    "log_addresses_del", "log_addresses_upd")


def drop_log_indexes(engine: Engine) -> None:
    """The "without" row: migrations 0008's, 0011's and 0017's triggers, the text index and
    the filter indexes gone."""
    stmts = [f"DROP INDEX IF EXISTS {n}" for n in _INDEXES]
    if engine.dialect.name == "postgresql":
        stmts += [f"DROP TRIGGER IF EXISTS {t} ON messages" for t in _PG_TRIGGERS]
    else:
        stmts += [f"DROP TRIGGER IF EXISTS {t}" for t in _SQLITE_TRIGGERS]
        stmts.append("DROP TABLE IF EXISTS messages_fts")
    with write_transaction(engine) as conn:
        for s in stmts:
            conn.exec_driver_sql(s)


def status_counts(engine: Engine) -> dict[str, int]:
    """Messages by status, counted in ``messages`` itself. ``Log.counts`` reads finished
    statuses from the rollups, which the rollup triggers keep: without them it would
    report no mail sent, so a bench that compares both states counts here."""
    with engine.connect() as conn:
        return {s: int(n) for s, n in conn.execute(
            select(messages.c.status, func.count()).group_by(messages.c.status))}
