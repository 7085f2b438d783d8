"""The email log's bookkeeping off the enqueue (issue 13: enqueue >= 0.9x without it)

Measured at the database's raw limit (bench/worker_bench.py), the enqueue with the log's
indexes and triggers ran well below the 0.9x of its rate without them that issue 13 asks
(docs/benchmarks.md). What an insert of a queued message paid, and what it pays now:

- ``ix_messages_status_created`` (the log's status filter) had every row, so each enqueue
  and each claim wrote it. Now partial: finished messages only (sent, partial, failed,
  suppressed), which a finished delivery writes once. A filter on a waiting status (queued,
  deferred, sending: the queue, not the log's bulk) uses the queue's own index
  ``ix_messages_due``, whose first column is the status; it gets ``created_at`` as its last
  column, so the dashboard's waiting counts since a time and the oldest waiting message are
  read from that index alone (same entries, 8 bytes longer: the enqueue writes no more).
- The text index's pending row, written by a row trigger (migration 0008). SQLite: no row
  at all, a mark instead (``postroom.store.pending``): the ``control`` row
  ``log.indexed_rowid`` holds the largest rowid in the index, every row above it waits.
  Rows still in ``log_pending`` are indexed here (their addresses get a re-read marker
  for the indexer, migration 0011's), and the delete and update triggers of 0008 now ask
  the mark whether a row is in the index; the delete trigger also lowers the mark when the
  newest rows go, so a rowid SQLite gives again is pending again. PostgreSQL keeps
  ``log_pending`` (its ids do not follow commit order: no mark can say which rows the
  indexer has read), but the queue writes a batch's ids in one statement, and the insert
  trigger skips the rows inserted while the transaction's setting
  ``postroom.pending_written`` is on (a WHEN, checked before its function would run;
  every other writer still gets the trigger). postroom.store.pending. The rollups' insert
  trigger and the pending one are one trigger now (``log_insert``): each AFTER row trigger
  costs an executemany's every row its set-up, even with a WHEN that is false.
- The rollup insert trigger does not fire on an enqueue (its WHEN wants a finished status).

An SQLite without FTS5 (no text index, migration 0008) gets the status index only.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

MARK = "log.indexed_rowid"  # postroom.store.pending.MARK
_MARK = f"(SELECT CAST(value AS INTEGER) FROM control WHERE name = '{MARK}')"
_FINISHED = "status IN ('sent', 'partial', 'failed', 'suppressed')"  # schema.FINISHED_WHERE
_FTS_COLUMNS = ("subject", "from_header", "to_header", "sender", "recipients", "message_id")
_COLS = ", ".join(_FTS_COLUMNS)
_OLD = ", ".join(f"old.{c}" for c in _FTS_COLUMNS)
_NEW = ", ".join(f"new.{c}" for c in _FTS_COLUMNS)


def _fts_triggers(indexed: str, after_delete: str) -> list[str]:
    """Migration 0008's delete and update triggers of the text index, with ``indexed`` as
    the test of whether the old row is in it."""
    forget = (f"INSERT INTO messages_fts (messages_fts, rowid, {_COLS}) "
              f"SELECT 'delete', old.rowid, {_OLD} WHERE {indexed};")
    learn = f"INSERT INTO messages_fts (rowid, {_COLS}) VALUES (new.rowid, {_NEW});"
    return [
        f"CREATE TRIGGER messages_fts_del AFTER DELETE ON messages BEGIN {forget} "
        f"{after_delete} END",
        f"CREATE TRIGGER messages_fts_upd AFTER UPDATE OF {_COLS} ON messages "
        f"WHEN {indexed} BEGIN {forget} {learn} END",
    ]


# Now: in the index when at or below the mark. A delete that leaves the largest rowid below
# the mark lowers it (in the same trigger, after the index forgot the row: its test above
# must still see the old mark).
_TOP = "(SELECT coalesce(max(rowid), 0) FROM messages)"
_NOW_TRIGGERS = _fts_triggers(
    f"old.rowid <= {_MARK}",
    f"UPDATE control SET value = CAST({_TOP} AS TEXT) WHERE name = '{MARK}' "
    f"AND CAST(value AS INTEGER) > {_TOP};")
# Migration 0008's: in the index unless pending.
_0008_TRIGGERS = _fts_triggers("NOT EXISTS (SELECT 1 FROM log_pending WHERE id = old.id)",
                               "DELETE FROM log_pending WHERE id = old.id;")

SKIP = "postroom.pending_written"  # postroom.store.pending.SKIP
_FINAL = "('sent', 'partial', 'failed', 'suppressed')"  # store.schema.ROLLUP_STATUSES
_WRITES_PENDING = f"current_setting('{SKIP}', true) IS DISTINCT FROM 'on'"
# PostgreSQL: one insert trigger for the rollups (a finished message inserted) and the
# pending row (unless the queue's batch wrote it), instead of 0008's two: an executemany runs
# one statement a row, and each AFTER row trigger costs its set-up per statement even when
# its WHEN is false. The rollup's INSERT is migration 0014's.
_PG_INSERT_FN = f"""
CREATE FUNCTION log_insert_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.status IN {_FINAL} THEN
    INSERT INTO log_rollups (hour, status, connection, app, count) VALUES
      (floor(NEW.created_at / 3600) * 3600, NEW.status, coalesce(NEW.via, ''),
       coalesce(NEW.app, ''), 1) ON CONFLICT (hour, status, connection, app)
      DO UPDATE SET count = log_rollups.count + excluded.count;
  END IF;
  IF {_WRITES_PENDING} THEN
    INSERT INTO log_pending (id) VALUES (NEW.id);
  END IF;
  RETURN NULL;
END $$;
"""
_PG_UP = [
    _PG_INSERT_FN,
    "DROP TRIGGER log_rollup_ins ON messages",
    "DROP TRIGGER log_pending_ins ON messages",
    f"CREATE TRIGGER log_insert AFTER INSERT ON messages FOR EACH ROW WHEN "
    f"(NEW.status IN {_FINAL} OR {_WRITES_PENDING}) EXECUTE FUNCTION log_insert_row()",
]
_PG_DOWN = [  # 0014's rollup insert trigger and 0008's pending one
    "DROP TRIGGER log_insert ON messages",
    "DROP FUNCTION log_insert_row()",
    f"CREATE TRIGGER log_rollup_ins AFTER INSERT ON messages FOR EACH ROW "
    f"WHEN (NEW.status IN {_FINAL}) EXECUTE FUNCTION log_rollup_row()",
    "CREATE TRIGGER log_pending_ins AFTER INSERT ON messages FOR EACH ROW "
    "EXECUTE FUNCTION log_pending_row()",
]


def _has_fts(bind: sa.Connection) -> bool:
    return bind.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").first() is not None


def _status_index(where: str | None) -> None:
    op.drop_index("ix_messages_status_created", table_name="messages")
    cond = sa.text(where) if where else None
    op.create_index("ix_messages_status_created", "messages", ["status", "created_at"],
                    sqlite_where=cond, postgresql_where=cond)
    due = ["status", "priority", "next_attempt_at"] + (["created_at"] if where else [])
    op.drop_index("ix_messages_due", table_name="messages")
    op.create_index("ix_messages_due", "messages", due)


def upgrade() -> None:
    bind = op.get_bind()
    _status_index(_FINISHED)
    if bind.dialect.name == "postgresql":
        for sql in _PG_UP:
            bind.exec_driver_sql(sql)
        return
    if not _has_fts(bind):
        return
    pending = "SELECT id FROM log_pending"
    for sql in (
        f"INSERT INTO messages_fts (rowid, {_COLS}) SELECT rowid, {_COLS} FROM messages "
        f"WHERE id IN ({pending}) ORDER BY rowid",
        # Their addresses: read by the indexer (postroom.store.addresses.reread).
        f"INSERT OR IGNORE INTO log_addresses (role, address, message_id) "
        f"SELECT 'p', '', id FROM messages WHERE id IN ({pending})",
        "DELETE FROM log_pending",
        "DROP TRIGGER log_pending_ins",
        "DROP TRIGGER messages_fts_del",
        "DROP TRIGGER messages_fts_upd",
        *_NOW_TRIGGERS,
    ):
        bind.exec_driver_sql(sql)
    op.execute(sa.text("INSERT INTO control (name, value, updated_at) VALUES "
                       f"(:name, CAST({_TOP} AS TEXT), :now)")
               .bindparams(name=MARK, now=time.time()))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for sql in _PG_DOWN:
            bind.exec_driver_sql(sql)
    elif _has_fts(bind):
        for sql in (
            f"INSERT INTO log_pending (id) SELECT id FROM messages WHERE rowid > {_MARK} "
            "ORDER BY rowid",
            "DROP TRIGGER messages_fts_del",
            "DROP TRIGGER messages_fts_upd",
            *_0008_TRIGGERS,
            "CREATE TRIGGER log_pending_ins AFTER INSERT ON messages "
            "BEGIN INSERT INTO log_pending (id) VALUES (new.id); END",
        ):
            bind.exec_driver_sql(sql)
        op.execute(sa.text("DELETE FROM control WHERE name = :name").bindparams(name=MARK))
    _status_index(None)
