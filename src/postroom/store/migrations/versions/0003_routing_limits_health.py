"""priorities, connection state, rate-limit log, session leases, events, control

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "messages", sa.Column("priority", sa.Integer(), nullable=False, server_default="0")
    )
    op.drop_index("ix_messages_due", table_name="messages")
    op.create_index("ix_messages_due", "messages", ["status", "priority", "next_attempt_at"])
    op.create_table(
        "connection_state",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("since", sa.Float(), nullable=False),
        sa.Column("open_until", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", sa.Float(), nullable=True),
        sa.Column("last_success_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "send_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_send_log", "send_log", ["connection", "at"])
    op.create_table(
        "session_leases",
        sa.Column("holder", sa.String(length=96), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("holder"),
    )
    op.create_index("ix_session_leases", "session_leases", ["connection", "until"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("connection", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_table(
        "control",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    for table in ("control", "events", "session_leases", "send_log", "connection_state"):
        op.drop_table(table)
    op.drop_index("ix_messages_due", table_name="messages")
    op.create_index("ix_messages_due", "messages", ["status", "next_attempt_at"])
    with op.batch_alter_table("messages") as batch:  # SQLite cannot drop columns in place
        batch.drop_column("priority")
