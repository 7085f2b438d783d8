"""OAuth 2.0 grants (tokens encrypted) and pending authorizations

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oauth_grants",
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("grant_type", sa.String(length=32), nullable=False),
        sa.Column("account", sa.String(length=320), nullable=True),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("refresh_token", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("issued_at", sa.Float(), nullable=True),
        sa.Column("refresh_expires_at", sa.Float(), nullable=True),
        sa.Column("granted_at", sa.Float(), nullable=False),
        sa.Column("last_refresh_at", sa.Float(), nullable=True),
        sa.Column("last_used_at", sa.Float(), nullable=True),
        sa.Column("refreshes", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_code", sa.String(length=64), nullable=True),
        sa.Column("last_error_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("connection"),
    )
    op.create_table(
        "oauth_pending",
        sa.Column("state", sa.String(length=64), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("verifier", sa.Text(), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("state"),
    )
    op.create_index("ix_oauth_pending_created", "oauth_pending", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_oauth_pending_created", table_name="oauth_pending")
    op.drop_table("oauth_pending")
    op.drop_table("oauth_grants")
