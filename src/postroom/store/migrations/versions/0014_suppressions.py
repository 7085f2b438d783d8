"""The suppression list (issue 14)

- ``suppressions``: addresses no mail is sent to (postroom.suppression), one row per
  (address, scope); the primary key serves the delivery-time check.
- A new final status, ``suppressed`` (every recipient of the message was on the list): the
  hourly rollups of migration 0008 count finished messages, so their triggers now watch it
  too. Messages with that status (only after a downgrade and an upgrade again) are counted
  into them here.

The trigger text is this migration's own copy of 0008's with the longer status list: a
migration stays as it was written, whatever later ones do.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_BEFORE = "('sent', 'partial', 'failed')"
_AFTER = "('sent', 'partial', 'failed', 'suppressed')"  # store.schema.ROLLUP_STATUSES
_SQLITE_TRIGGERS = ("log_rollup_ins", "log_rollup_del", "log_rollup_upd_old",
                    "log_rollup_upd_new")
_PG_TRIGGERS = ("log_rollup_ins", "log_rollup_del", "log_rollup_upd")


def _sqlite_rollup_triggers(final: str) -> list[str]:
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
        f"WHEN new.status IN {final} BEGIN {bump('new', '1')} END",
        f"CREATE TRIGGER log_rollup_del AFTER DELETE ON messages "
        f"WHEN old.status IN {final} BEGIN {bump('old', '-1')} END",
        f"CREATE TRIGGER log_rollup_upd_old AFTER {watched} "
        f"WHEN old.status IN {final} AND {changed} BEGIN {bump('old', '-1')} END",
        f"CREATE TRIGGER log_rollup_upd_new AFTER {watched} "
        f"WHEN new.status IN {final} AND {changed} BEGIN {bump('new', '1')} END",
    ]


def _pg_bump(r: str, delta: str) -> str:
    return (f"INSERT INTO log_rollups (hour, status, connection, app, count) VALUES "
            f"(floor({r}.created_at / 3600) * 3600, {r}.status, coalesce({r}.via, ''), "
            f"coalesce({r}.app, ''), {delta}) ON CONFLICT (hour, status, connection, app) "
            f"DO UPDATE SET count = log_rollups.count + excluded.count;")


def _pg_rollup(final: str) -> list[str]:
    changed = ("(OLD.status IS DISTINCT FROM NEW.status OR OLD.via IS DISTINCT FROM NEW.via "
               "OR OLD.app IS DISTINCT FROM NEW.app "
               "OR OLD.created_at IS DISTINCT FROM NEW.created_at)")
    return [
        f"""CREATE OR REPLACE FUNCTION log_rollup_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    IF OLD.status IN {final} THEN {_pg_bump('OLD', '-1')} END IF;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    IF NEW.status IN {final} THEN {_pg_bump('NEW', '1')} END IF;
  END IF;
  RETURN NULL;
END $$;
""",
        f"CREATE TRIGGER log_rollup_ins AFTER INSERT ON messages FOR EACH ROW "
        f"WHEN (NEW.status IN {final}) EXECUTE FUNCTION log_rollup_row()",
        f"CREATE TRIGGER log_rollup_del AFTER DELETE ON messages FOR EACH ROW "
        f"WHEN (OLD.status IN {final}) EXECUTE FUNCTION log_rollup_row()",
        f"CREATE TRIGGER log_rollup_upd AFTER UPDATE OF status, via, app, created_at "
        f"ON messages FOR EACH ROW WHEN ((OLD.status IN {final} OR NEW.status IN {final}) "
        f"AND {changed}) EXECUTE FUNCTION log_rollup_row()",
    ]


def _rollup_triggers(final: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for trig in _PG_TRIGGERS:
            bind.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trig} ON messages")
        statements = _pg_rollup(final)
    else:
        for trig in _SQLITE_TRIGGERS:
            bind.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trig}")
        statements = _sqlite_rollup_triggers(final)
    for sql in statements:
        bind.exec_driver_sql(sql)


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("scope", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("address", "scope"),
    )
    op.create_index("ix_suppressions_created", "suppressions", ["created_at"])
    _rollup_triggers(_AFTER)
    # Messages left with the status by a downgrade and upgrade again (on the status index).
    hour = ("floor(created_at / 3600) * 3600" if op.get_bind().dialect.name == "postgresql"
            else "CAST(created_at / 3600 AS INTEGER) * 3600")
    op.execute("DELETE FROM log_rollups WHERE status = 'suppressed'")
    op.execute(f"INSERT INTO log_rollups (hour, status, connection, app, count) "
               f"SELECT {hour}, status, coalesce(via, ''), coalesce(app, ''), count(*) "
               f"FROM messages WHERE status = 'suppressed' GROUP BY 1, 2, 3, 4")


def downgrade() -> None:
    _rollup_triggers(_BEFORE)
    # The older code knows no such status: its counts would never see these rows again.
    op.execute("DELETE FROM log_rollups WHERE status = 'suppressed'")
    op.drop_index("ix_suppressions_created", table_name="suppressions")
    op.drop_table("suppressions")
