"""Events: the things worth telling someone about (a connection down, a fallback used, an
OAuth grant dying...), for alerts, ``postroom events``, the admin's Events page and API, and
a message's page.

One closed vocabulary: :class:`Kind`, each kind with its :class:`Severity` and the
:class:`Subject` it concerns (:data:`SPECS`). One writer: :func:`record` (one row),
:func:`record_all` (rows in one statement), :func:`record_once` (unless recorded lately) and
:func:`queued` (a row for the queue writer's batches, postroom.queue.commit). One reader:
:func:`read` and :func:`count`. Nothing else reads or writes the ``events`` table, except
retention (postroom.queue.retention), which deletes old rows whatever their kind.

The kinds are stored as their values, the strings written before this module existed, so
rows already in a database stay valid. A new kind goes into :class:`Kind` and :data:`SPECS`
(tests/test_events.py checks that every kind has its spec).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from postroom.exceptions import MessageError
from postroom.queue.insert import RowInsert
from postroom.store.schema import events as table

MAX_DETAIL = 2000  # characters of detail kept
READ_LIMIT = 1000  # rows one read returns at most


class Severity(enum.StrEnum):
    INFO = "info"  # for the record: nothing to do
    WARNING = "warning"  # mail still goes, but look (a fallback used, a grant dying soon)
    ERROR = "error"  # mail stops or fails until someone acts


class Subject(enum.StrEnum):
    """What an event is about, and so which of its fields names it."""

    CONNECTION = "connection"  # ``connection``
    MESSAGE = "message"  # ``message_id`` (None for one about many messages)
    QUEUE = "queue"  # the whole queue: neither
    OAUTH_GRANT = "oauth_grant"  # ``connection``: a grant is one connection's


class Kind(enum.StrEnum):
    # A connection's circuit breaker, pause and Retry-After hold (postroom.routing.health).
    CONNECTION_DOWN = "connection_down"
    CONNECTION_UP = "connection_up"
    CONNECTION_HELD = "connection_held"
    CONNECTION_PAUSED = "connection_paused"
    CONNECTION_RESUMED = "connection_resumed"
    # The whole queue (routing.health, queue.maintenance).
    QUEUE_PAUSED = "queue_paused"
    QUEUE_RESUMED = "queue_resumed"
    QUEUE_PURGED = "queue_purged"
    # A message (queue.worker, queue.lease, queue.maintenance, webhooks.intake).
    FALLBACK_USED = "fallback_used"
    UNKNOWN_OUTCOME = "unknown_outcome"
    LEASE_EXPIRED = "lease_expired"
    RETRY_REQUESTED = "retry_requested"
    DELIVERY_EVENT = "delivery_event"
    # An OAuth grant (oauth.tokens, oauth.checks, oauth.flows).
    OAUTH_GRANTED = "oauth_granted"
    OAUTH_RENEWED = "oauth_renewed"
    OAUTH_REVOKED = "oauth_revoked"
    OAUTH_GRANT_DEAD = "oauth_grant_dead"
    OAUTH_TESTING_APP = "oauth_testing_app"
    OAUTH_IDLE = "oauth_idle"
    OAUTH_SCOPE_MISSING = "oauth_scope_missing"
    OAUTH_NO_GRANT = "oauth_no_grant"
    OAUTH_ACCOUNT_MISMATCH = "oauth_account_mismatch"
    OAUTH_ACCOUNT_NOTE = "oauth_account_note"
    OAUTH_ACCOUNT_REFUSED = "oauth_account_refused"

    @property
    def severity(self) -> Severity:
        return SPECS[self].severity

    @property
    def subject(self) -> Subject:
        return SPECS[self].subject


@dataclass(frozen=True, slots=True)
class Spec:
    severity: Severity
    subject: Subject


_I, _W, _E = Severity.INFO, Severity.WARNING, Severity.ERROR
_C, _M, _Q, _O = Subject.CONNECTION, Subject.MESSAGE, Subject.QUEUE, Subject.OAUTH_GRANT
SPECS: dict[Kind, Spec] = {
    # down: its circuit is open, mail goes around it or waits
    Kind.CONNECTION_DOWN: Spec(_E, _C),
    Kind.CONNECTION_UP: Spec(_I, _C),  # delivering again after being down
    Kind.CONNECTION_HELD: Spec(_W, _C),  # the provider asked to wait (429/503 Retry-After)
    Kind.CONNECTION_PAUSED: Spec(_W, _C),  # by hand: its mail waits
    Kind.CONNECTION_RESUMED: Spec(_I, _C),
    Kind.QUEUE_PAUSED: Spec(_W, _Q),  # by hand: no mail leaves
    Kind.QUEUE_RESUMED: Spec(_I, _Q),
    Kind.QUEUE_PURGED: Spec(_I, _Q),
    # Delivered, by another connection than the first of its chain: a warning, never a
    # failure (Post SMTP's users complain that a fallback that worked still alerts).
    Kind.FALLBACK_USED: Spec(_W, _M),
    # The server may have taken it (the session broke after DATA): never retried blindly.
    Kind.UNKNOWN_OUTCOME: Spec(_W, _M),
    Kind.LEASE_EXPIRED: Spec(_W, _M),  # its worker died mid-delivery: a duplicate is possible
    Kind.RETRY_REQUESTED: Spec(_I, _M),
    # What a provider's webhook or a DSN said (the detail has which: bounced, delivered...).
    Kind.DELIVERY_EVENT: Spec(_I, _M),
    Kind.OAUTH_GRANTED: Spec(_I, _O),
    Kind.OAUTH_RENEWED: Spec(_I, _O),
    Kind.OAUTH_REVOKED: Spec(_I, _O),
    Kind.OAUTH_GRANT_DEAD: Spec(_E, _O),  # the refresh token was refused: sign in again
    # Google ends a "Testing" app's refresh tokens after 7 days.
    Kind.OAUTH_TESTING_APP: Spec(_W, _O),
    Kind.OAUTH_IDLE: Spec(_W, _O),  # Microsoft ends refresh tokens unused for 90 days
    Kind.OAUTH_SCOPE_MISSING: Spec(_E, _O),  # the grant cannot send mail
    Kind.OAUTH_NO_GRANT: Spec(_E, _O),  # never signed in: its mail cannot go
    Kind.OAUTH_ACCOUNT_MISMATCH: Spec(_E, _O),  # signed in as another account than configured
    Kind.OAUTH_ACCOUNT_NOTE: Spec(_I, _O),
    Kind.OAUTH_ACCOUNT_REFUSED: Spec(_W, _O),  # a sign-in as the wrong account, refused
}


@dataclass(frozen=True, slots=True)
class Event:
    """One event: to write (``id`` None) or as read."""

    kind: Kind
    at: float
    message_id: str | None = None
    connection: str | None = None
    detail: str = ""
    id: int | None = None

    @property
    def severity(self) -> Severity:
        return self.kind.severity

    @property
    def subject(self) -> Subject:
        return self.kind.subject

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "kind": self.kind.value,
                "severity": self.severity.value, "subject": self.subject.value,
                "message_id": self.message_id, "connection": self.connection,
                "detail": self.detail}


def parse_kinds(values: Iterable[str], option: str = "kind") -> list[Kind]:
    """Kinds named by a user (each value may be a comma-separated list); an unknown name is
    refused with the list of kinds."""
    out: list[Kind] = []
    for value in values:
        for name in (v.strip().lower() for v in value.split(",")):
            if not name:
                continue
            try:
                out.append(Kind(name))
            except ValueError:
                raise MessageError(f"{option} {name!r} is not an event kind; use one of: "
                                   f"{', '.join(Kind)}", code="events.kind") from None
    return out


# -- the writer ------------------------------------------------------------------------------
# Built once: compiling a statement costs more than running it on SQLite (the worker's path).
INSERT = insert(table)


def _row(ev: Event) -> dict[str, Any]:
    # Kind(...) refuses a string outside the vocabulary, whatever a caller's types said.
    return {"at": ev.at, "kind": Kind(ev.kind).value, "message_id": ev.message_id,
            "connection": ev.connection, "detail": ev.detail[:MAX_DETAIL]}


def record(conn: Connection, kind: Kind, *, at: float, message_id: str | None = None,
           connection: str | None = None, detail: str = "") -> None:
    """Write one event in ``conn``'s transaction."""
    record_all(conn, [Event(kind, at, message_id, connection, detail)])


def record_all(conn: Connection, items: Sequence[Event]) -> None:
    """Write these events in one statement (an executemany)."""
    if items:
        conn.execute(INSERT, [_row(ev) for ev in items])


def record_once(conn: Connection, kind: Kind, *, at: float, within: float, connection: str,
                detail: str = "") -> bool:
    """Write the event unless one of the same kind was recorded for ``connection`` in the
    last ``within`` seconds (by any node: call it in a write transaction). Whether written."""
    seen = conn.execute(select(table.c.id).where(
        table.c.kind == Kind(kind).value, table.c.connection == connection,
        table.c.at > at - within).limit(1)).first()
    if seen is not None:
        return False
    record(conn, kind, at=at, connection=connection, detail=detail)
    return True


def queued(kind: Kind, *, at: float, message_id: str | None = None,
           connection: str | None = None, detail: str = "") -> RowInsert:
    """The event as a row for the queue's writer: a batch's events go in one executemany
    (one per message when a flapping primary makes every message fall back)."""
    return RowInsert(INSERT, _row(Event(kind, at, message_id, connection, detail)))


# -- the reader ------------------------------------------------------------------------------
def read(engine: Engine, *, since: float | None = None, kinds: Sequence[Kind] = (),
         connection: str | None = None, message_id: str | None = None, limit: int = 100,
         after_id: int | None = None, before_id: int | None = None) -> list[Event]:
    """Events oldest first: with ``after_id``, the first ``limit`` after that row (to
    follow them); else the last ``limit`` (before row ``before_id``: the previous page).
    Rows of a kind this version does not know (a newer Postroom on the same database) are
    left out."""
    t = table.c
    names = [Kind(k).value for k in kinds] or [k.value for k in Kind]
    q = select(table).where(t.kind.in_(names))
    if since is not None:
        q = q.where(t.at >= since)
    if connection:
        q = q.where(t.connection == connection)
    if message_id:
        q = q.where(t.message_id == message_id)
    if before_id is not None:
        q = q.where(t.id < before_id)
    n = max(1, min(limit, READ_LIMIT))
    if after_id is not None:
        q = q.where(t.id > after_id).order_by(t.id).limit(n)
    else:
        q = q.order_by(t.id.desc()).limit(n)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    found = [Event(Kind(r.kind), r.at, r.message_id, r.connection, r.detail or "", r.id)
             for r in rows]
    return found if after_id is not None else found[::-1]


def count(conn: Connection, kind: Kind, *, since: float, until: float | None = None) -> int:
    """How many events of ``kind`` were recorded in [since, until)."""
    q = select(func.count()).where(table.c.at >= since, table.c.kind == Kind(kind).value)
    if until is not None:
        q = q.where(table.c.at < until)
    return int(conn.execute(q).scalar_one())


def last_id(engine: Engine) -> int:
    """The newest event's id (0 when there is none): where following starts."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.max(table.c.id))).scalar() or 0)
