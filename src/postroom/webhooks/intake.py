"""Recording delivery events: attach each to its message, keep it once, tell the rest.

Every door for delivery events (the webhook endpoint, the DSN reader postroom.bounces) ends
in :meth:`EventLog.record`, which

1. finds each event's message: by the provider's message id the connection's attempts kept
   (``attempts.provider_id``, postroom.store.attempts), else by its Message-ID among the
   last few days' messages; none found is not an error (providers report mail sent other
   ways too): the event is kept unattached;

then, in one write transaction (the queue's group commit):

2. inserts it into ``delivery_events`` unless its (connection, event key) is there already:
   a replayed or re-sent event is a duplicate, counted and otherwise ignored;
3. writes a ``delivery_event`` row in ``events`` for each new one (alerts and the message's
   page read those);
4. gives bounces, complaints and unsubscribes to the suppression list
   (postroom.suppression.note_event), which decides what it keeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, bindparam, insert, select

from postroom import events
from postroom.store.attempts import messages_for_provider_ids
from postroom.store.schema import delivery_events, messages
from postroom.webhooks import DeliveryEvent, Kind

if TYPE_CHECKING:
    from postroom.queue.sql import Queue
    from postroom.settings import Settings
    from postroom.suppression import SuppressionSettings

MAX_RAW = 16 * 1024  # characters of raw payload kept per event
MAX_DETAIL = 1000
# How far back a Message-ID is looked for when no provider id matched: the header is not
# indexed (the relay would pay for it on every message), the creation time is.
MESSAGE_ID_WINDOW = 7 * 86400
# Kinds the suppression list hears about (it keeps hard bounces and complaints).
SUPPRESSING = frozenset({Kind.BOUNCED, Kind.COMPLAINED, Kind.UNSUBSCRIBED})
KNOWN = "known"  # _owners' key for the message a door named itself

# Built once: compiling a statement costs more than running it on SQLite (the hot path).
_d = delivery_events.c
_KNOWN_KEYS = select(_d.event_key).where(
    _d.connection == bindparam("connection"), _d.event_key.in_(bindparam("keys", expanding=True)))
_INSERT = insert(delivery_events)


def event_key(event: DeliveryEvent) -> str:
    """The event's identity for duplicates: the provider's event id (hashed when longer
    than the column), else the sha256 of what it says."""
    if event.event_id and len(event.event_id) <= 64:
        return event.event_id
    basis = event.event_id or json.dumps(
        [event.kind, event.provider_id, event.recipient, event.at, event.raw],
        sort_keys=True, default=str)
    return hashlib.sha256(basis.encode()).hexdigest()


def raw_text(raw: dict[str, Any] | str) -> str:
    """The raw payload as JSON text of at most MAX_RAW characters (a longer one is kept as
    its head, marked truncated, so it stays valid JSON)."""
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False)
    if len(text) <= MAX_RAW:
        return text
    return json.dumps({"truncated": True, "head": text[: MAX_RAW - 100]}, ensure_ascii=False)


@dataclass
class Recorded:
    """What :meth:`EventLog.record` did: new events (with their message and its sender, for
    the suppression list) and how many were duplicates."""

    new: list[tuple[DeliveryEvent, str | None, str | None]] = field(default_factory=list)
    duplicates: int = 0

    @property
    def attached(self) -> int:
        return sum(1 for _, msg, _ in self.new if msg is not None)


class EventLog:
    """Delivery events in the store: record (async, the queue's writer) and read (sync).
    ``settings``: the instance's, for its [suppression] section (its defaults without)."""

    def __init__(self, queue: Queue, settings: Settings | None = None) -> None:
        self.queue = queue
        self.settings = settings

    async def record(self, connection: str, items: Sequence[DeliveryEvent], *,
                     message_id: str | None = None) -> Recorded:
        """Record ``items`` reported for ``connection``; ``message_id``: the message they are
        about, when the door knows it already (a DSN's VERP address)."""
        if not items:
            return Recorded()
        now = self.queue.clock()
        suppressing = any(ev.kind in SUPPRESSING for ev in items)
        owners = await asyncio.to_thread(self._owners, connection, items, message_id, now,
                                         suppressing)
        suppression = self._suppression() if suppressing else None

        def op(conn: Connection) -> Recorded:
            return _record(conn, connection, items, owners, now, suppression)

        done: Recorded = await self.queue.writer.submit(op)
        return done

    def _suppression(self) -> SuppressionSettings:
        from postroom.suppression import SuppressionSettings

        if self.settings is None:
            return SuppressionSettings()
        return self.settings.section(SuppressionSettings)

    def _owners(self, connection: str, items: Sequence[DeliveryEvent], known: str | None,
                now: float, senders: bool) -> dict[str, tuple[str, str | None]]:
        """(message id, sender) by "id:" + provider id (what the connection's attempts
        kept), and by "mid:" + Message-ID for the events whose provider id matched nothing;
        under KNOWN, the ``known`` message. Events of mail sent some other way match none.
        The sender (for the suppression list's scope) is looked up only when ``senders``."""
        m = messages.c
        by_key: dict[str, str] = {}
        if known is not None:
            by_key[KNOWN] = known
        else:
            pids = [ev.provider_id for ev in items if ev.provider_id]
            found = messages_for_provider_ids(self.queue.engine, connection, pids)
            by_key.update({f"id:{pid}": mid for pid, mid in found.items()})
            headers = sorted({ev.message_id_header for ev in items if ev.message_id_header
                              and ev.provider_id not in found})
            if headers:
                q = select(m.message_id, m.id).where(
                    m.created_at >= now - MESSAGE_ID_WINDOW, m.message_id.in_(headers))
                with self.queue.engine.connect() as conn:
                    by_key.update({f"mid:{h}": str(mid) for h, mid in conn.execute(q)})
        if not by_key or not (senders or known is not None):
            return {k: (mid, None) for k, mid in by_key.items()}
        with self.queue.engine.connect() as conn:
            found_senders = dict(conn.execute(select(m.id, m.sender).where(
                m.id.in_(sorted(set(by_key.values()))))).all())
        # A message deleted since (retention) is no longer there to attach to.
        return {k: (mid, str(found_senders[mid])) for k, mid in by_key.items()
                if mid in found_senders}

    def for_message(self, message_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """A message's delivery events, oldest first (raw payload as stored)."""
        d = delivery_events.c
        q = (select(d.at, d.kind, d.recipient, d.permanent, d.detail, d.provider_id,
                    d.connection, d.raw).where(d.message_id == message_id)
             .order_by(d.at, d.id).limit(limit))
        with self.queue.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]


def with_event(kind: str) -> Select[tuple[str | None]]:
    """The ids of the messages that had a delivery event of ``kind``, as a subquery (the
    log's ``event`` filter, postroom.store.log.LogFilter)."""
    d = delivery_events.c
    return select(d.message_id).where(d.kind == kind, d.message_id.is_not(None))


def _record(conn: Connection, connection: str, items: Sequence[DeliveryEvent],
            owners: dict[str, tuple[str, str | None]], now: float,
            suppression: SuppressionSettings | None) -> Recorded:
    keyed = {event_key(ev): ev for ev in items}  # the same event twice in one batch: once
    have = set(conn.execute(_KNOWN_KEYS, {"connection": connection,
                                          "keys": list(keyed)}).scalars())
    fresh = {k: ev for k, ev in keyed.items() if k not in have}
    done = Recorded(duplicates=len(items) - len(fresh))
    if not fresh:
        return done
    rows, notes = [], []
    for key, ev in fresh.items():
        owner = (owners.get(KNOWN) or owners.get(f"id:{ev.provider_id}")
                 or owners.get(f"mid:{ev.message_id_header}"))
        msg, sender = owner if owner is not None else (None, None)
        done.new.append((ev, msg, sender))
        rows.append({"connection": connection, "event_key": key, "message_id": msg,
                     "provider_id": (ev.provider_id or None) and ev.provider_id[:255],
                     "recipient": (ev.recipient or None) and ev.recipient[:320],
                     "kind": str(ev.kind), "permanent": ev.permanent, "at": ev.at,
                     "received_at": now, "detail": ev.detail[:MAX_DETAIL],
                     "raw": raw_text(ev.raw)})
        what = f"{ev.kind}" + (f" {ev.recipient}" if ev.recipient else "")
        notes.append(events.Event(events.Kind.DELIVERY_EVENT, now, message_id=msg,
                                  connection=connection,
                                  detail=f"{what}: {ev.detail}" if ev.detail else what))
    conn.execute(_INSERT, rows)
    events.record_all(conn, notes)
    if suppression is not None:
        from postroom.suppression import note_event

        # In this transaction: an event recorded is an address suppressed, or neither (a
        # replay after a crash in between would be a duplicate, never suppressed).
        for ev, msg, sender in done.new:
            if ev.kind in SUPPRESSING:
                note_event(conn, ev, sender, msg, connection=connection, config=suppression)
    return done
