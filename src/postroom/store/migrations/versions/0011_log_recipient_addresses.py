"""Exact recipient addresses for the email log (issue 13)

A search for a whole address (``postroom log --to bob@example.com``) went through the text
index's trigrams, and for an address whose trigrams are all common ("exa", "com", "le.")
that meant confirming thousands of candidates: p95 of 2 s at a million messages. Now:

- ``log_addresses`` (role, address, message_id): every address of each message, lower-cased;
  role "r" = the envelope recipients and the To header's addresses, "s" = the envelope
  sender and the From header's. The key is a B-tree on (role, address, message_id) (SQLite:
  WITHOUT ROWID, the key is the row), so a whole-address search is one range of it; with the
  message's created_at beside it, indexed (role, address, created_at), so a page of an
  address found in thousands of messages reads its newest rows in order, not all of them.
- Written by the text indexer (``postroom.store.log.Log.index_pending``) with the text index,
  from the same pending rows: the enqueue pays nothing for it. Header addresses are parsed
  in Python (a regex around "@": ``postroom.store.addresses``), which SQL cannot do.
- A message deleted: its rows go (SQLite: a row trigger; PostgreSQL: migration 0008's
  statement trigger ``log_forget_rows``, replaced here with one more DELETE). A message
  whose addresses are rewritten (no Postroom writer does it): its rows go and a marker row
  (role "p") tells the indexer to read it again; searches treat it as pending meanwhile.
- Existing messages are not read here (a million rows would hold the migration, and every
  process starting, for minutes): the ``control`` row ``log.addresses_backfill`` holds a
  ``created_at`` cursor, and the indexer chore walks the log down from it, newest first, a
  batch at a time when nothing else is pending, then deletes the row. Until it is gone,
  whole-address searches take the trigram path they took before.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

BACKFILL = "log.addresses_backfill"  # postroom.store.addresses.BACKFILL
_WATCHED = "sender, recipients, from_header, to_header"
# Migration 0008's function, and the same with the addresses forgotten too.
_FORGET_0008 = """
CREATE OR REPLACE FUNCTION log_forget_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM log_pending WHERE id IN (SELECT id FROM gone);
  DELETE FROM message_search WHERE id IN (SELECT id FROM gone);
  RETURN NULL;
END $$;
"""
_FORGET = """
CREATE OR REPLACE FUNCTION log_forget_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM log_pending WHERE id IN (SELECT id FROM gone);
  DELETE FROM message_search WHERE id IN (SELECT id FROM gone);
  DELETE FROM log_addresses WHERE message_id IN (SELECT id FROM gone);
  RETURN NULL;
END $$;
"""
_PG_REREAD_FN = """
CREATE FUNCTION log_addresses_reread() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM log_addresses WHERE message_id = NEW.id;
  INSERT INTO log_addresses (role, address, message_id) VALUES ('p', '', NEW.id)
    ON CONFLICT DO NOTHING;
  RETURN NULL;
END $$;
"""


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "log_addresses",
        sa.Column("role", sa.String(length=1), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("role", "address", "message_id"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_log_addresses_message", "log_addresses", ["message_id"])
    op.create_index("ix_log_addresses_newest", "log_addresses", ["role", "address",
                                                                 "created_at"])
    if bind.dialect.name == "postgresql":
        for sql in (
            _FORGET, _PG_REREAD_FN,
            f"CREATE TRIGGER log_addresses_upd AFTER UPDATE OF {_WATCHED} ON messages "
            "FOR EACH ROW EXECUTE FUNCTION log_addresses_reread()",
        ):
            bind.exec_driver_sql(sql)
    else:
        has_fts = bind.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").first() is not None
        if not has_fts:  # no text index, no indexer (migration 0008): the table stays empty
            return
        for sql in (
            "CREATE TRIGGER log_addresses_del AFTER DELETE ON messages "
            "BEGIN DELETE FROM log_addresses WHERE message_id = old.id; END",
            f"CREATE TRIGGER log_addresses_upd AFTER UPDATE OF {_WATCHED} ON messages "
            "BEGIN DELETE FROM log_addresses WHERE message_id = new.id; "
            "INSERT OR IGNORE INTO log_addresses (role, address, message_id) "
            "VALUES ('p', '', new.id); END",
        ):
            bind.exec_driver_sql(sql)
    newest = bind.exec_driver_sql("SELECT max(created_at) FROM messages").scalar()
    if newest is not None:
        # Every message created up to now: the indexer reads them below this cursor (rows
        # still pending are read from log_pending as well; an address row twice is one row).
        op.execute(sa.text("INSERT INTO control (name, value, updated_at) VALUES "
                           "(:name, :value, :now)").bindparams(
            name=BACKFILL, value=repr(float(newest) + 1.0), now=time.time()))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS log_addresses_upd ON messages")
        op.execute("DROP FUNCTION IF EXISTS log_addresses_reread()")
        bind.exec_driver_sql(_FORGET_0008)
    else:
        op.execute("DROP TRIGGER IF EXISTS log_addresses_del")
        op.execute("DROP TRIGGER IF EXISTS log_addresses_upd")
    op.execute(sa.text("DELETE FROM control WHERE name = :name").bindparams(name=BACKFILL))
    op.drop_index("ix_log_addresses_newest", table_name="log_addresses")
    op.drop_index("ix_log_addresses_message", table_name="log_addresses")
    op.drop_table("log_addresses")
