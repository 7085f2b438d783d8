"""The alerts' outbox (issue 15)

- ``alert_outbox``: one row per alert and channel (postroom.alerts.outbox), retried with
  backoff; unique on (alert_key, channel) so an alert is never written twice.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("alert_key", sa.String(255), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float()),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
    )
    op.create_index("ux_alert_outbox_key", "alert_outbox", ["alert_key", "channel"],
                    unique=True)
    op.create_index("ix_alert_outbox_due", "alert_outbox", ["status", "next_at"])
    op.create_index("ix_alert_outbox_created", "alert_outbox", ["created_at"])


def downgrade() -> None:
    op.drop_table("alert_outbox")
