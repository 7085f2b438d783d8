"""Delivery events from provider webhooks and DSNs (issue 14)

``delivery_events``: one row per event a provider's webhook reported or a DSN told
(postroom.webhooks.intake), unique per (connection, event_key) so a replay is recorded once,
attached to its message when one is found (deleted with it).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delivery_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("event_key", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=32),
                  sa.ForeignKey("messages.id", ondelete="CASCADE")),
        sa.Column("provider_id", sa.String(length=255)),
        sa.Column("recipient", sa.String(length=320)),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("permanent", sa.Boolean()),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
    )
    op.create_index("ux_delivery_events_key", "delivery_events", ["connection", "event_key"],
                    unique=True)
    op.create_index("ix_delivery_events_message", "delivery_events", ["message_id"],
                    sqlite_where=sa.text("message_id IS NOT NULL"),
                    postgresql_where=sa.text("message_id IS NOT NULL"))
    op.create_index("ix_delivery_events_kind", "delivery_events", ["kind", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_events_kind", table_name="delivery_events")
    op.drop_index("ix_delivery_events_message", table_name="delivery_events")
    op.drop_index("ux_delivery_events_key", table_name="delivery_events")
    op.drop_table("delivery_events")
