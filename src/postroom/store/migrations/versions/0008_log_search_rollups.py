"""The email log's search indexes and hourly rollups

Text, sender and recipient searches scanned the whole table (``lower(col) LIKE '%x%'``;
migration 0005 dropped B-tree indexes that could not serve them). Now:

- The text index is built after the commit, not in it: an enqueue only adds its id to
  ``log_pending`` (a one-row trigger), and ``postroom.store.log.Log.index_pending`` (a chore
  of ``serve`` and ``postroom worker``) moves batches of pending ids into the index. Written
  in the enqueue's transaction, the index halved enqueue throughput, which every door's
  acknowledgement waits on. Searches read the index plus the few pending rows, so they are
  exact meanwhile. Rows that exist when this migration runs are indexed here directly.
- SQLite: an FTS5 table with the ``trigram`` tokenizer (case-insensitive) over subject,
  From, To, sender, recipients and Message-ID. External content (``content='messages'``):
  the index alone is stored, not a second copy of the text; the rows are the messages'
  rowids. Delete and update triggers keep indexed rows in step (a pending row is not in the
  index yet: they leave it to the indexer), whoever writes (the queue, postroom-sendmail's
  sqlite3 path, retention). (``messages`` has no INTEGER PRIMARY KEY, so a VACUUM may
  renumber its rowids: run ``INSERT INTO messages_fts(messages_fts) VALUES('rebuild')``
  after one, as after any rebuild of the table.) An SQLite without FTS5 or trigram (before
  3.34) gets no index and no pending trigger: searches stay LIKE scans, with a warning here.
- PostgreSQL: ``message_search``, one row per message with the searched columns joined
  (text: subject, From, To, Message-ID; recipients: To and the envelope's; sender: the
  envelope's and From), written by the indexer, rewritten by a trigger when those columns
  change, deleted with the message by a trigger (not a foreign key: its check would lock
  the message row and could deadlock the indexer against a delete); ``pg_trgm`` GIN
  indexes on it. A side table because every claim and result writes a new version of the
  ``messages`` row, and an index on ``messages`` would get every trigram of it again each
  time. ``pg_trgm`` is a trusted extension (the database owner may create it); if refused,
  searches scan the side table, with a warning saying the fix.
- ``messages.via``: the connection that last tried the message (the log's connection
  filter), set with each result; filled here from the attempts.
- Indexes for the filters newest first: (status, created_at), (app, created_at) and
  (via, created_at), the last two partial (WHERE app / via IS NOT NULL: mail of no app and
  an enqueue, which has no via yet, do not write them).
- ``log_rollups``: finished messages per creation hour, status, connection and app, kept by
  row triggers on ``messages`` that fire only when a row enters or leaves a finished
  status (sent, partial, failed): enqueues, claims and renewals never run them. Filled
  here from existing rows. (On PostgreSQL two transactions that each finish messages of
  several rollup rows may wait on each other's rollup rows; PostgreSQL breaks such a
  deadlock by failing one, and the queue's group commit retries its writes one by one.)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

log = logging.getLogger("postroom.store.migrations")

_FINAL = "('sent', 'partial', 'failed')"  # store.schema.ROLLUP_STATUSES
_FTS_COLUMNS = ("subject", "from_header", "to_header", "sender", "recipients", "message_id")
# message_search's columns, from a messages row `r` (postroom.store.log queries them).
_PG_SEARCH = {
    "body": "{r}subject || E'\\n' || {r}from_header || E'\\n' || {r}to_header || E'\\n' || "
            "{r}message_id",
    "rcpt": "{r}to_header || E'\\n' || {r}recipients::text",
    "sndr": "{r}sender || E'\\n' || {r}from_header",
}
_PG_SEARCH_FN = f"""
CREATE FUNCTION message_search_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO message_search (id, body, rcpt, sndr)
  VALUES (NEW.id, {', '.join(e.format(r='NEW.') for e in _PG_SEARCH.values())})
  ON CONFLICT (id) DO UPDATE
    SET body = excluded.body, rcpt = excluded.rcpt, sndr = excluded.sndr;
  RETURN NULL;
END $$;
"""
# The enqueue's whole share of the text index: one narrow row.
_PG_PENDING_FN = """
CREATE FUNCTION log_pending_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO log_pending (id) VALUES (NEW.id);
  RETURN NULL;
END $$;
"""
# Per statement, over the deleted rows (a retention purge deletes thousands at once). The
# pending row first: if an indexer holds it, this waits for that indexer's commit, and
# the next statement (a new snapshot) then sees and deletes the search row it wrote.
_PG_FORGET_FN = """
CREATE FUNCTION log_forget_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM log_pending WHERE id IN (SELECT id FROM gone);
  DELETE FROM message_search WHERE id IN (SELECT id FROM gone);
  RETURN NULL;
END $$;
"""
_INDEXES = {"ix_messages_status_created": ["status", "created_at"],
            "ix_messages_app_created": ["app", "created_at"],
            "ix_messages_via_created": ["via", "created_at"]}
_PARTIAL = {"ix_messages_app_created": "app IS NOT NULL",
            "ix_messages_via_created": "via IS NOT NULL"}


def _sqlite_rollup_triggers() -> list[str]:
    hour = "CAST({r}.created_at / 3600 AS INTEGER) * 3600"

    def bump(r: str, delta: str) -> str:
        return (f"INSERT INTO log_rollups (hour, status, connection, app, count) VALUES "
                f"({hour.format(r=r)}, {r}.status, coalesce({r}.via, ''), "
                f"coalesce({r}.app, ''), {delta}) ON CONFLICT (hour, status, connection, app) "
                f"DO UPDATE SET count = count + excluded.count;")

    changed = ("(old.status IS NOT new.status OR old.via IS NOT new.via OR "
               "old.app IS NOT new.app OR old.created_at IS NOT new.created_at)")
    watched = "UPDATE OF status, via, app, created_at ON messages"
    return [
        f"CREATE TRIGGER log_rollup_ins AFTER INSERT ON messages "
        f"WHEN new.status IN {_FINAL} BEGIN {bump('new', '1')} END",
        f"CREATE TRIGGER log_rollup_del AFTER DELETE ON messages "
        f"WHEN old.status IN {_FINAL} BEGIN {bump('old', '-1')} END",
        f"CREATE TRIGGER log_rollup_upd_old AFTER {watched} "
        f"WHEN old.status IN {_FINAL} AND {changed} BEGIN {bump('old', '-1')} END",
        f"CREATE TRIGGER log_rollup_upd_new AFTER {watched} "
        f"WHEN new.status IN {_FINAL} AND {changed} BEGIN {bump('new', '1')} END",
    ]


def _sqlite_fts(bind: sa.Connection) -> None:
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE VIRTUAL TABLE temp.postroom_fts_probe USING "
                                 "fts5(x, tokenize='trigram case_sensitive 0')")
            bind.exec_driver_sql("DROP TABLE temp.postroom_fts_probe")
    except sa.exc.OperationalError as err:
        log.warning("this SQLite (%s) has no FTS5 trigram tokenizer (%s): the email log's "
                    "text and recipient searches scan the whole table; an SQLite 3.34 or "
                    "newer with FTS5 gives them an index",
                    bind.exec_driver_sql("SELECT sqlite_version()").scalar(), err)
        return
    cols = ", ".join(_FTS_COLUMNS)
    old = ", ".join(f"old.{c}" for c in _FTS_COLUMNS)
    new = ", ".join(f"new.{c}" for c in _FTS_COLUMNS)
    # A pending row is not in the index: telling FTS5 to delete terms it never had would
    # corrupt it. The indexer reads the row as it is when it gets to it.
    indexed = "NOT EXISTS (SELECT 1 FROM log_pending WHERE id = old.id)"
    forget = (f"INSERT INTO messages_fts (messages_fts, rowid, {cols}) "
              f"SELECT 'delete', old.rowid, {old} WHERE {indexed};")
    learn = f"INSERT INTO messages_fts (rowid, {cols}) VALUES (new.rowid, {new});"
    for sql in (
        f"CREATE VIRTUAL TABLE messages_fts USING fts5({cols}, content='messages', "
        "content_rowid='rowid', tokenize='trigram case_sensitive 0')",
        "CREATE TRIGGER log_pending_ins AFTER INSERT ON messages "
        "BEGIN INSERT INTO log_pending (id) VALUES (new.id); END",
        f"CREATE TRIGGER messages_fts_del AFTER DELETE ON messages BEGIN {forget} "
        "DELETE FROM log_pending WHERE id = old.id; END",
        f"CREATE TRIGGER messages_fts_upd AFTER UPDATE OF {cols} ON messages "
        f"WHEN {indexed} BEGIN {forget} {learn} END",
        "INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')",
    ):
        bind.exec_driver_sql(sql)


def _pg_bump(r: str, delta: str) -> str:
    return (f"INSERT INTO log_rollups (hour, status, connection, app, count) VALUES "
            f"(floor({r}.created_at / 3600) * 3600, {r}.status, coalesce({r}.via, ''), "
            f"coalesce({r}.app, ''), {delta}) ON CONFLICT (hour, status, connection, app) "
            f"DO UPDATE SET count = log_rollups.count + excluded.count;")


_PG_ROLLUP_FN = f"""
CREATE FUNCTION log_rollup_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    IF OLD.status IN {_FINAL} THEN {_pg_bump('OLD', '-1')} END IF;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    IF NEW.status IN {_FINAL} THEN {_pg_bump('NEW', '1')} END IF;
  END IF;
  RETURN NULL;
END $$;
"""
_PG_CHANGED = ("(OLD.status IS DISTINCT FROM NEW.status OR OLD.via IS DISTINCT FROM NEW.via "
               "OR OLD.app IS DISTINCT FROM NEW.app "
               "OR OLD.created_at IS DISTINCT FROM NEW.created_at)")


def _pg(bind: sa.Connection) -> None:
    for sql in (
        _PG_ROLLUP_FN,
        # Row triggers whose WHEN is checked before any function runs: a claim, a renewal
        # or an enqueue (no finished status on either side) costs nothing here.
        f"CREATE TRIGGER log_rollup_ins AFTER INSERT ON messages FOR EACH ROW "
        f"WHEN (NEW.status IN {_FINAL}) EXECUTE FUNCTION log_rollup_row()",
        f"CREATE TRIGGER log_rollup_del AFTER DELETE ON messages FOR EACH ROW "
        f"WHEN (OLD.status IN {_FINAL}) EXECUTE FUNCTION log_rollup_row()",
        f"CREATE TRIGGER log_rollup_upd AFTER UPDATE OF status, via, app, created_at "
        f"ON messages FOR EACH ROW WHEN ((OLD.status IN {_FINAL} OR NEW.status IN {_FINAL}) "
        f"AND {_PG_CHANGED}) EXECUTE FUNCTION log_rollup_row()",
    ):
        bind.exec_driver_sql(sql)
    op.create_table(
        "message_search",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("rcpt", sa.Text(), nullable=False),
        sa.Column("sndr", sa.Text(), nullable=False),
    )
    cols = ", ".join(e.format(r="") for e in _PG_SEARCH.values())
    bind.exec_driver_sql(f"INSERT INTO message_search (id, body, rcpt, sndr) "
                         f"SELECT id, {cols} FROM messages")
    for sql in (
        _PG_SEARCH_FN, _PG_PENDING_FN, _PG_FORGET_FN,
        "CREATE TRIGGER message_search_upd AFTER UPDATE OF subject, from_header, to_header, "
        "sender, recipients, message_id ON messages FOR EACH ROW "
        "EXECUTE FUNCTION message_search_row()",
        "CREATE TRIGGER log_pending_ins AFTER INSERT ON messages FOR EACH ROW "
        "EXECUTE FUNCTION log_pending_row()",
        "CREATE TRIGGER log_forget_del AFTER DELETE ON messages REFERENCING OLD TABLE AS gone "
        "FOR EACH STATEMENT EXECUTE FUNCTION log_forget_rows()",
    ):
        bind.exec_driver_sql(sql)
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as err:
        log.warning("cannot create the PostgreSQL extension pg_trgm (%s): the email log's "
                    "text and recipient searches scan the whole log. Fix: install the "
                    "PostgreSQL contrib package and run CREATE EXTENSION pg_trgm in this "
                    "database as its owner, then CREATE INDEX ix_message_search_COL ON "
                    "message_search USING gin (COL gin_trgm_ops) for COL in body, rcpt, sndr",
                    str(err.orig).strip())
        return
    for col in _PG_SEARCH:
        bind.exec_driver_sql(f"CREATE INDEX ix_message_search_{col} ON message_search "
                             f"USING gin ({col} gin_trgm_ops)")


def upgrade() -> None:
    bind = op.get_bind()
    op.add_column("messages", sa.Column("via", sa.String(length=64), nullable=True))
    # The connection of each message's last attempt (attempts' ids grow with time).
    op.execute("UPDATE messages SET via = (SELECT a.connection FROM attempts a WHERE "
               "a.message_id = messages.id ORDER BY a.id DESC LIMIT 1) "
               "WHERE attempt_count > 0")
    for name, cols in _INDEXES.items():
        where = sa.text(_PARTIAL[name]) if name in _PARTIAL else None
        op.create_index(name, "messages", cols, sqlite_where=where, postgresql_where=where)
    # The message page lists a message's events (fallback used, lease expired...).
    op.create_index("ix_events_message", "events", ["message_id"],
                    sqlite_where=sa.text("message_id IS NOT NULL"),
                    postgresql_where=sa.text("message_id IS NOT NULL"))
    op.create_table(  # see the module's docstring: filled by triggers, drained by the indexer
        "log_pending",
        sa.Column("id", sa.String(length=32), primary_key=True),
    )
    op.create_table(
        "log_rollups",
        sa.Column("hour", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("app", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "status", "connection", "app"),
    )
    hour = ("floor(created_at / 3600) * 3600" if bind.dialect.name == "postgresql"
            else "CAST(created_at / 3600 AS INTEGER) * 3600")
    op.execute(f"INSERT INTO log_rollups (hour, status, connection, app, count) "
               f"SELECT {hour}, status, coalesce(via, ''), coalesce(app, ''), count(*) "
               f"FROM messages WHERE status IN {_FINAL} GROUP BY 1, 2, 3, 4")
    if bind.dialect.name == "postgresql":
        _pg(bind)
    else:
        for sql in _sqlite_rollup_triggers():
            bind.exec_driver_sql(sql)
        _sqlite_fts(bind)


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_index("ix_events_message", table_name="events")
    if bind.dialect.name == "postgresql":
        for trig in ("message_search_upd", "log_pending_ins", "log_forget_del"):
            op.execute(f"DROP TRIGGER IF EXISTS {trig} ON messages")
        for fn in ("message_search_row", "log_pending_row", "log_forget_rows"):
            op.execute(f"DROP FUNCTION IF EXISTS {fn}()")
        op.execute("DROP TABLE IF EXISTS message_search")
        for trig in ("log_rollup_ins", "log_rollup_del", "log_rollup_upd"):
            op.execute(f"DROP TRIGGER IF EXISTS {trig} ON messages")
        op.execute("DROP FUNCTION IF EXISTS log_rollup_row()")
    else:
        for trig in ("log_rollup_ins", "log_rollup_del", "log_rollup_upd_old",
                     "log_rollup_upd_new", "log_pending_ins", "messages_fts_del",
                     "messages_fts_upd"):
            op.execute(f"DROP TRIGGER IF EXISTS {trig}")
        op.execute("DROP TABLE IF EXISTS messages_fts")
    op.drop_table("log_rollups")
    op.drop_table("log_pending")
    for name in _INDEXES:
        op.drop_index(name, table_name="messages")
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_column("via")
