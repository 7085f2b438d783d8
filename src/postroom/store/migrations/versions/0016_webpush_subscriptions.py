"""Web Push subscriptions of the web admin's browsers (issue 15)

- ``webpush_subscriptions``: one row per browser that asked for alerts from the web admin
  (postroom.alerts.subscriptions), owned by an admin account (deleted with it). The
  browser's keys (p256dh, auth) are kept Fernet-encrypted (``secret``).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webpush_subscriptions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(64),
                  sa.ForeignKey("admin_accounts.name", ondelete="CASCADE"), nullable=False),
        sa.Column("endpoint", sa.String(1024), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("label", sa.String(120), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float()),
        sa.Column("sent_keys", sa.Text(), nullable=False),
    )
    op.create_index("ux_webpush_subscriptions_endpoint", "webpush_subscriptions",
                    ["endpoint"], unique=True)
    op.create_index("ix_webpush_subscriptions_account", "webpush_subscriptions", ["account"])


def downgrade() -> None:
    op.drop_table("webpush_subscriptions")
