"""Forced copies retried on their own

A recipient added by the message policy (an archive or compliance Bcc) that got a temporary
failure was failed "not retried" once the message's own recipients were done. It is now
retried on its own: ``copy_due`` says when, and its partial index (rows with a copy waiting
only, so no other write pays for it) lets a claim find the few finished messages that
still have a copy to send without walking every sent one. Existing rows get
NULL (nothing due): their copies were already given up.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        batch_op.add_column(sa.Column("copy_due", sa.Float(), nullable=True))
        batch_op.create_index("ix_messages_copy_due", ["copy_due"],
                              sqlite_where=sa.text("copy_due IS NOT NULL"),
                              postgresql_where=sa.text("copy_due IS NOT NULL"))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_index("ix_messages_copy_due")
        batch_op.drop_column("copy_due")
