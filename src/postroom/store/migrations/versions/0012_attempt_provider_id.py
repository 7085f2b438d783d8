"""The provider's message id on each attempt; a connection held for Retry-After (issue 14)

``attempts.provider_id``: the id the provider gave the message (an HTTPS API's message id,
the queue id of an SMTP server's final reply), indexed with the connection for delivery
events (webhooks) to find their message. ``connection_state.held_until``: the connection is
skipped until then because its provider asked to wait (429/503 ``Retry-After``).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns: a plain ALTER TABLE ADD COLUMN on SQLite and PostgreSQL alike, no
    # table rewrite (existing attempts simply have no provider id).
    op.add_column("attempts", sa.Column("provider_id", sa.String(length=255), nullable=True))
    op.create_index("ix_attempts_provider", "attempts", ["connection", "provider_id"])
    op.add_column("connection_state", sa.Column("held_until", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("connection_state") as batch:
        batch.drop_column("held_until")
    op.drop_index("ix_attempts_provider", table_name="attempts")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("provider_id")
