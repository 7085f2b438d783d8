"""Recording delivery events: attach each to its message, keep it once, tell the rest.

Every door for delivery events (the webhook endpoint, the DSN reader postroom.bounces) ends
in :meth:`EventLog.record`, which, in one write transaction (the queue's group commit)
together with every other report that arrived meanwhile (postroom.queue.gather: one
statement of each kind for all of them, so that many one-event requests cost about what one
batch of their events does):

1. finds each event's message: by the provider's message id the connection's attempts kept
   (``attempts.provider_id``, postroom.store.attempts), else by its Message-ID among the
   last few days' messages; none found is not an error (providers report mail sent other
   ways too): the event is kept unattached. Looked up in the write, not before it: no
   thread hand-off of its own, and a message cannot be deleted in between;
2. inserts it into ``delivery_events`` unless its (connection, event key) is there already:
   a replayed or re-sent event is a duplicate, counted and otherwise ignored;
3. writes a ``delivery_event`` row in ``events`` for each new one (alerts and the message's
   page read those);
4. gives bounces, complaints and unsubscribes to the suppression list
   (postroom.suppression.note_events), which decides what it keeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, bindparam, insert, select

from postroom import events
from postroom.queue.gather import Gather
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
# Keys per IN (...) list: a gathered write may check thousands of events' keys at once.
CHUNK = 500

# Built once: compiling a statement costs more than running it on SQLite (the hot path).
_d = delivery_events.c
_KNOWN_KEYS = select(_d.event_key).where(
    _d.connection == bindparam("connection"), _d.event_key.in_(bindparam("keys", expanding=True)))
_m = messages.c
_BY_HEADER = select(_m.message_id, _m.id).where(
    _m.created_at >= bindparam("since"), _m.message_id.in_(bindparam("ids", expanding=True)))
_SENDERS = select(_m.id, _m.sender).where(_m.id.in_(bindparam("ids", expanding=True)))
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
        suppressing = any(ev.kind in SUPPRESSING for ev in items)
        report = _Report(connection, items, message_id, self.queue.clock(),
                         self._suppression() if suppressing else None)
        return await _GATHER.submit(self.queue.writer, report)

    def _suppression(self) -> SuppressionSettings:
        from postroom.suppression import SuppressionSettings

        if self.settings is None:
            return SuppressionSettings()
        return self.settings.section(SuppressionSettings)

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


@dataclass(frozen=True)
class _Report:
    """One door's events for one connection, waiting for the write (``known``: the message
    the door named itself; ``suppression``: set when some event may suppress)."""

    connection: str
    items: Sequence[DeliveryEvent]
    known: str | None
    now: float
    suppression: SuppressionSettings | None

    @property
    def senders(self) -> bool:
        """Whether its owners need their sender (the suppression list's scope)."""
        return self.suppression is not None or self.known is not None


Owner = tuple[str, str | None]  # a message id and its sender (None: not looked up)
# What the suppression list hears of a new event: it, its sender, message and connection.
Noted = tuple[DeliveryEvent, str | None, str | None, str]
Names = tuple[str | None, str | None]  # what an event names its message by (_names)


def _names(ev: DeliveryEvent) -> Names:
    return ev.provider_id, ev.message_id_header


def _chunks(values: Sequence[str]) -> list[list[str]]:
    ordered = sorted(set(values))
    return [ordered[i:i + CHUNK] for i in range(0, len(ordered), CHUNK)]


def _owners(conn: Connection, reports: Sequence[_Report]) -> list[dict[Names, Owner]]:
    """Each report's events' messages, looked up for all reports at once: by provider id
    (what the connection's attempts kept), else by Message-ID; the report's own message
    for a door that named it. Events of mail sent some other way match none. A message
    deleted since (retention) is not there to attach to, wherever a sender was wanted."""
    by_pid: dict[tuple[str, str], str] = {}
    for name in {r.connection for r in reports if r.known is None}:
        pids = [ev.provider_id for r in reports if r.connection == name and r.known is None
                for ev in r.items if ev.provider_id]
        by_pid.update({(name, pid): mid for pid, mid in
                       messages_for_provider_ids(conn, name, pids).items()})
    headers = [ev.message_id_header for r in reports if r.known is None for ev in r.items
               if ev.message_id_header and (r.connection, ev.provider_id) not in by_pid]
    by_header: dict[str, str] = {}
    if headers:
        since = min(r.now for r in reports) - MESSAGE_ID_WINDOW
        for part in _chunks(headers):
            by_header.update({str(h): str(mid) for h, mid in conn.execute(
                _BY_HEADER, {"since": since, "ids": part})})
    found: list[dict[Names, str]] = []
    for r in reports:
        mids: dict[Names, str] = {}
        for ev in r.items:
            mid = r.known or by_pid.get((r.connection, ev.provider_id or "")) or (
                by_header.get(ev.message_id_header or ""))
            if mid is not None:
                mids[_names(ev)] = mid
        found.append(mids)
    wanted = [mid for r, mids in zip(reports, found, strict=True) if r.senders
              for mid in mids.values()]
    senders: dict[str, str] = {}
    for part in _chunks(wanted):
        senders.update({str(i): str(s) for i, s in conn.execute(_SENDERS, {"ids": part})})
    return [{n: (mid, senders[mid]) for n, mid in mids.items() if mid in senders}
            if r.senders else {n: (mid, None) for n, mid in mids.items()}
            for r, mids in zip(reports, found, strict=True)]


def _write(conn: Connection, reports: Sequence[_Report]) -> list[Recorded]:
    """Record the reports in this transaction, in order: one duplicate check per connection
    (and 500 keys), one insert of all new events, one of their ``events`` rows."""
    keyed = [{event_key(ev): ev for ev in r.items} for r in reports]  # twice in one: once
    have: set[tuple[str, str]] = set()
    for name in {r.connection for r in reports}:
        keys = [k for r, ks in zip(reports, keyed, strict=True) if r.connection == name
                for k in ks]
        for part in _chunks(keys):
            have.update((name, k) for k in conn.execute(
                _KNOWN_KEYS, {"connection": name, "keys": part}).scalars())
    owners = _owners(conn, reports)
    done: list[Recorded] = []
    rows: list[dict[str, Any]] = []
    notes: list[events.Event] = []
    for r, ks, own in zip(reports, keyed, owners, strict=True):
        fresh = {k: ev for k, ev in ks.items() if (r.connection, k) not in have}
        have.update((r.connection, k) for k in fresh)  # a later report's copy: a duplicate
        one = Recorded(duplicates=len(r.items) - len(fresh))
        done.append(one)
        for key, ev in fresh.items():
            msg, sender = own.get(_names(ev), (None, None))
            one.new.append((ev, msg, sender))
            rows.append(_row(r, key, ev, msg))
            what = f"{ev.kind}" + (f" {ev.recipient}" if ev.recipient else "")
            notes.append(events.Event(events.Kind.DELIVERY_EVENT, r.now, message_id=msg,
                                      connection=r.connection,
                                      detail=f"{what}: {ev.detail}" if ev.detail else what))
    if rows:
        conn.execute(_INSERT, rows)
        events.record_all(conn, notes)
    # In this transaction: an event recorded is an address suppressed, or neither (a replay
    # after a crash in between would be a duplicate, never suppressed). One statement per
    # [suppression] section (one instance's reports share theirs).
    noted: dict[int, tuple[SuppressionSettings, list[Noted]]] = {}
    for r, one in zip(reports, done, strict=True):
        if r.suppression is not None:
            noted.setdefault(id(r.suppression), (r.suppression, []))[1].extend(
                (ev, sender, msg, r.connection) for ev, msg, sender in one.new
                if ev.kind in SUPPRESSING)
    if noted:
        from postroom.suppression import note_events

        for config, items in noted.values():
            note_events(conn, items, config=config)
    return done


def _row(report: _Report, key: str, ev: DeliveryEvent, msg: str | None) -> dict[str, Any]:
    return {"connection": report.connection, "event_key": key, "message_id": msg,
            "provider_id": (ev.provider_id or None) and ev.provider_id[:255],
            "recipient": (ev.recipient or None) and ev.recipient[:320],
            "kind": str(ev.kind), "permanent": ev.permanent, "at": ev.at,
            "received_at": report.now, "detail": ev.detail[:MAX_DETAIL],
            "raw": raw_text(ev.raw)}


# One for the process: reports to the same queue's writer share a write.
_GATHER: Gather[_Report, Recorded] = Gather(_write)
