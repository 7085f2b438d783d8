"""The row a new message gets in ``messages``: one builder for the queue (SQLAlchemy) and
for the sendmail command's standard-library path (postroom.store.direct)."""

from __future__ import annotations

from typing import Any

from postroom.envelope import Envelope, summarize
from postroom.exceptions import MessageError
from postroom.store.states import PRIORITIES, QUEUED


def message_row(env: Envelope, now: float, lifetime: float, hold: float = 0.0) -> dict[str, Any]:
    if not env.recipients:
        raise MessageError("a message needs at least one recipient", code="message.no_recipients")
    if env.priority not in PRIORITIES.values():
        raise MessageError(
            f"priority {env.priority!r} is not one of {sorted(PRIORITIES.values())} "
            "(1 high, 0 normal, -1 low)", code="message.priority",
        )
    expires = now + lifetime if env.expires_at is None else min(env.expires_at, now + lifetime)
    if expires <= max(now, env.not_before or 0.0):
        raise MessageError(
            "the message would expire before it could be sent: give an expiry time after "
            "now and after send_at", code="message.expired",
        )
    summary = summarize(env.raw)
    return {
        "id": env.id,
        "created_at": now,
        "updated_at": now,
        "status": QUEUED,
        "next_attempt_at": max(now + hold, env.not_before or 0.0),
        "expires_at": expires,
        "priority": env.priority,
        "attempt_count": 0,
        "sender": env.sender,
        "recipients": list(env.recipients),
        "rcpt_status": {r: {"state": "pending"} for r in env.recipients},
        "source": env.source[:80],
        "app": env.app,
        "connection": env.connection,
        "message_id": summary.message_id,
        "subject": summary.subject,
        "from_header": summary.from_,
        "to_header": summary.to,
        "size": len(env.raw),
        "raw": env.raw,
        "tags": list(env.tags) or None,
        "meta": dict(env.metadata) or None,
    }
