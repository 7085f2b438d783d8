"""Message owner column; app limits and rotation

Ownership was read from the end of ``source`` ("api:shop" -> "shop"), so an app named
"trusted", "embedded" or after a Unix user could read what no app handed in
("smtp:trusted", "python:embedded", "sendmail:www-data"). The owner now has its own column,
set only by a door that authenticated an app. Existing rows get it where their source can
only have come from an authenticated app: "api:NAME" (every API request has a key) and
"smtp:NAME" (set after SMTP AUTH) other than "smtp:trusted". "python:NAME" rows are left
without an owner: an embedded Mailer's default name "embedded" and a chosen one cannot be
told apart from the row.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        batch_op.add_column(sa.Column("app", sa.String(length=64), nullable=True))
    with op.batch_alter_table("apps") as batch_op:
        batch_op.add_column(sa.Column("rotated_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("allowed_senders", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("allowed_connections", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("rate_limit", sa.String(length=32), nullable=True))
    messages = sa.table("messages", sa.column("source", sa.String), sa.column("app", sa.String))
    for door in ("api:", "smtp:"):
        op.execute(
            messages.update()
            .where(messages.c.source.like(f"{door}%"), messages.c.source != "smtp:trusted")
            .values(app=sa.func.substr(messages.c.source, len(door) + 1))
        )


def downgrade() -> None:
    with op.batch_alter_table("apps") as batch_op:
        for name in ("rate_limit", "allowed_connections", "allowed_senders", "rotated_at"):
            batch_op.drop_column(name)
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_column("app")
