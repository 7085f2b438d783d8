"""Connections, routes and settings made in the web admin, stored in the database

``config_entries`` holds what postroom.store.dbconfig stores (never a secret: those stay in
``secrets``); the configuration's generation is the ``control`` row ``config.generation``.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config_entries",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("updated_by", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name"),
    )
    # The generation every process polls: present from the start, so a change is one UPDATE.
    control = sa.table("control", sa.column("name", sa.String), sa.column("value", sa.Text),
                       sa.column("updated_at", sa.Float))
    op.bulk_insert(control, [{"name": "config.generation", "value": "0", "updated_at": 0.0}])


def downgrade() -> None:
    op.execute("DELETE FROM control WHERE name = 'config.generation'")
    op.drop_table("config_entries")
