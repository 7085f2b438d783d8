"""Drop the message indexes no query uses

The log's search matches ``lower(column) LIKE '%text%'``, which no B-tree index on the
plain column can serve, while each index costs every write of the row: enqueue, claim and
result (a status change is never a HOT update). Five of them were a third of PostgreSQL's
work per delivered message. The due-mail index and the created_at index (newest first,
paging) stay.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_UNUSED = {"ix_messages_message_id": "message_id", "ix_messages_subject": "subject",
           "ix_messages_from": "from_header", "ix_messages_to": "to_header",
           "ix_messages_sender": "sender"}


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        for name in _UNUSED:
            batch_op.drop_index(name)


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        for name, column in _UNUSED.items():
            batch_op.create_index(name, [column], unique=False)
