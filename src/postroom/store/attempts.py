"""Reads of the ``attempts`` table that are not the email log's: which message a provider's
id belongs to. Delivery events (postroom.webhooks) name the message by the id the provider
gave it when it was handed over; the worker keeps that id on the attempt row."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, bindparam, func, select

from postroom.store.schema import attempts

# An event batch names a few hundred ids at most; IN lists stay below every driver's limit.
_CHUNK = 500

# Built once: constructing and compiling the grouped subquery on each call cost more than
# running it (a webhook request with one event paid it per event; bench/webhook_bench.py).
_a = attempts.c
_NEWEST = (select(_a.provider_id, func.max(_a.id).label("id"))
           .where(_a.connection == bindparam("connection"),
                  _a.provider_id.in_(bindparam("ids", expanding=True)))
           .group_by(_a.provider_id).subquery())
_OWNERS = (select(_NEWEST.c.provider_id, _a.message_id)
           .join(attempts, _a.id == _NEWEST.c.id))


def messages_for_provider_ids(where: Engine | Connection, connection: str,
                              provider_ids: Sequence[str]) -> dict[str, str]:
    """``{provider id: message id}`` for the ids connection ``connection`` gave out; ids
    not found are left out. One indexed query per 500 ids (ix_attempts_provider). Should a
    provider ever reuse an id, the newest attempt's message wins. Given a Connection, the
    query runs in its transaction (the webhook intake's write)."""
    wanted = sorted({p for p in provider_ids if p})
    found: dict[str, str] = {}
    if not wanted:
        return found
    with (where.connect() if isinstance(where, Engine)
          else contextlib.nullcontext(where)) as conn:
        for i in range(0, len(wanted), _CHUNK):
            rows = conn.execute(_OWNERS, {"connection": connection,
                                          "ids": wanted[i:i + _CHUNK]})
            found.update({str(p): str(m) for p, m in rows})
    return found
