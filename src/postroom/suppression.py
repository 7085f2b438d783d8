"""The suppression list: addresses Postroom does not send to any more.

A hard bounce, a provider's refusal of an address it calls invalid, or a spam complaint
(and an unsubscribe, if ``[suppression] suppress`` lists it) puts the recipient on the list
(:func:`note_events`, called by postroom.webhooks' intake for both its doors, webhooks and
the DSN reader); an operator adds, removes and imports addresses by hand
(postroom.ops.suppressions). Before each
delivery the worker asks :meth:`Suppressions.apply`: a suppressed recipient is left out of
RCPT TO and recorded as ``suppressed`` with the reason; a message whose every recipient is
suppressed ends with status ``suppressed`` and is never sent. Intake never refuses for it:
the app handing mail in would see an error for a legitimate message.

Why stop sending: mailbox providers rate a sender by its bounce and complaint rates (Gmail's
sender guidelines ask for a spam rate under 0.3%; providers such as Postmark and SendGrid
keep suppression lists of their own and suspend accounts that keep mailing dead addresses).

Scope: an entry holds for every sender (``*``) or for one sender domain. Events add entries
scoped per ``[suppression] scope``; the check reads both kinds in one indexed query.

The database is imported by the functions that use it, not with this module: the section
model is loaded by settings.load for any configuration with a [suppression] section, which
includes postroom-sendmail's when it shares the server's file.
"""

from __future__ import annotations

import builtins
import enum
import functools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field

from postroom.exceptions import MessageError
from postroom.settings import SectionModel, register_section

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from postroom.settings import Settings

GLOBAL = "*"  # the scope of an entry that holds for every sender
MAX_REASON = 500
MAX_DETAIL = 2000
LIST_LIMIT = 1000  # rows in one page of list()
CHECK_CHUNK = 500  # addresses per IN (...) list: a message may have thousands of recipients
# The worker asks before every delivery; most recipients are on no list. A list of up to
# MEMORY_MAX addresses is held in memory and re-read when its (count, newest) stamp changes,
# looked at once per REFRESH seconds: the database is queried only for recipients that are
# listed somewhere. An entry added by another process takes effect within REFRESH seconds.
MEMORY_MAX = 100_000
REFRESH = 1.0


class Source(enum.StrEnum):
    """Why an address is on the list."""

    BOUNCE = "bounce"  # a hard bounce, or a provider refusing the address as invalid
    COMPLAINT = "complaint"  # the recipient marked a message as spam (feedback loop)
    UNSUBSCRIBE = "unsubscribe"  # the recipient unsubscribed through the provider
    MANUAL = "manual"  # an operator added it
    IMPORT = "import"  # an operator imported it from a file


# The delivery event kinds (postroom.webhooks.Kind values) that may suppress, and the source
# each one records.
EVENT_SOURCES = {"bounced": Source.BOUNCE, "rejected": Source.BOUNCE,
                 "complained": Source.COMPLAINT, "unsubscribed": Source.UNSUBSCRIBE}
EventKind = Literal["bounced", "rejected", "complained", "unsubscribed"]
DEFAULT_KINDS: tuple[EventKind, ...] = ("bounced", "rejected", "complained")


class SuppressionSettings(SectionModel):
    """[suppression]: which delivery events stop later mail to an address, and for whom."""

    enabled: bool = True  # false: nothing is added from events, nothing is checked
    # sender_domain (the default): an entry an event adds holds for the sender domain whose
    # mail bounced or was complained about. Postroom sends for many apps and domains at
    # once; a complaint about one domain's newsletter must not silence another's password
    # resets. A dead mailbox costs each other sender domain one more bounce, after which it
    # is suppressed for that domain too. global: one entry stops mail from every sender.
    scope: Literal["global", "sender_domain"] = "sender_domain"
    # Which events add an entry. "bounced" and "rejected" count only when permanent (a soft
    # bounce never suppresses); an unsubscribe is usually about a newsletter, not the
    # transactional mail Postroom carries, hence not suppressed unless listed here.
    suppress: list[EventKind] = Field(default_factory=lambda: list(DEFAULT_KINDS))


register_section("suppression", SuppressionSettings)


class DeliveryEventLike(Protocol):
    """What :func:`note_event` reads of a postroom.webhooks.DeliveryEvent."""

    @property
    def kind(self) -> str: ...
    @property
    def recipient(self) -> str | None: ...
    @property
    def detail(self) -> str: ...
    @property
    def permanent(self) -> bool | None: ...


@dataclass(frozen=True)
class Entry:
    """One row of the list."""

    address: str
    scope: str
    reason: str
    source: str
    created_at: float
    message_id: str | None = None
    detail: str = ""

    @property
    def cursor(self) -> Cursor:
        """Where the next page of :meth:`Suppressions.list` starts after this entry."""
        return (self.created_at, self.address, self.scope)

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "scope": self.scope, "reason": self.reason,
                "source": self.source, "created_at": self.created_at,
                "message_id": self.message_id, "detail": self.detail}


Cursor = tuple[float, str, str]  # (created_at, address, scope) of a page's last entry


def encode_cursor(cursor: Cursor) -> str:
    """A cursor as one URL-safe token (for ``?after=`` in the API and the page)."""
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(list(cursor)).encode()).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor:
    """The cursor of :func:`encode_cursor`; a MessageError for anything else."""
    import base64
    import binascii
    import json

    try:
        at, address, scope = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return (float(at), str(address), str(scope))
    except (ValueError, TypeError, binascii.Error) as err:
        raise MessageError("after: not a cursor this list gave; pass the next_after of the "
                           "previous page, or leave it out", code="suppression.cursor") from err


def normalise(address: str) -> str:
    """``address`` as the list keeps it: lower-cased, its domain as an IDNA 2008 A-label
    (postroom.idn), so ``Bob@Bücher.de`` and ``bob@xn--bcher-kva.de`` are one entry. The
    local part is lower-cased too: RFC 5321 lets a server tell case apart, but no mailbox
    provider does, and a list that missed ``Bob@`` for ``bob@`` would not protect anyone.
    A MessageError saying what is wrong for an address that is not one."""
    from postroom.idn import ascii_domain, check_address

    text = address.strip()
    try:
        check_address(text)
    except MessageError as err:
        raise MessageError(f"{err.message}; give an address like user@example.com",
                           code="suppression.address") from err
    local, _, domain = text.rpartition("@")
    return f"{local}@{ascii_domain(domain)}".lower()


def normalise_scope(scope: str) -> str:
    """``*`` (also written "" or "global") or a sender domain as an A-label, lower-cased."""
    from postroom.envelope import validate_address
    from postroom.idn import ascii_domain

    text = scope.strip().lower().lstrip("@")
    if text in ("", GLOBAL, "global"):
        return GLOBAL
    try:
        domain = ascii_domain(text)
        validate_address(f"x@{domain}")
    except MessageError as err:
        raise MessageError(f"scope {scope!r} is not a domain; give a sender domain like "
                           "example.com, or * for every sender", code="suppression.scope"
                           ) from err
    return domain.lower()


def sender_domain(sender: str | None) -> str | None:
    """The A-label domain of an envelope sender; None for the null sender or no domain."""
    if not sender or "@" not in sender:
        return None
    try:
        return normalise_scope(sender.rpartition("@")[2])
    except MessageError:
        return None


def _key(address: str) -> str:
    """The lookup key of a recipient at delivery time; intake validated it, so a failure
    here is an address this list cannot hold (kept lower-cased as it is)."""
    try:
        return normalise(address)
    except MessageError:
        return address.strip().lower()


def _insert(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert ``rows``, leaving alone those whose (address, scope) is listed already (the
    first reason stays); the number inserted."""
    if not rows:
        return 0
    # An executemany of one statement built once per dialect (SQLAlchemy sends it as
    # multi-row INSERTs); RETURNING names the rows inserted (a driver's rowcount for an
    # INSERT that skipped conflicts is not reliable across both databases).
    return len(conn.execute(_insert_statement(conn.dialect.name), builtins.list(rows)).all())


@functools.cache
def _insert_statement(dialect: str) -> Any:
    """The INSERT ... ON CONFLICT DO NOTHING RETURNING address, built once: building it
    cost more than running it for the one row a bounce adds."""
    from postroom.store.schema import suppressions as table

    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(table)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table)
    return stmt.on_conflict_do_nothing().returning(table.c.address)


def _row(address: str, scope: str, reason: str, source: Source, message_id: str | None,
         detail: str, at: float) -> dict[str, Any]:
    return {"address": address, "scope": scope, "reason": reason[:MAX_REASON] or source.value,
            "source": Source(source).value, "created_at": at, "message_id": message_id,
            "detail": detail[:MAX_DETAIL]}


def suppresses(event: DeliveryEventLike, config: SuppressionSettings) -> Source | None:
    """The source an event adds its recipient under, or None when it must not: a soft
    bounce, a deferral, an open, or a kind ``[suppression] suppress`` leaves out. A bounce
    or a provider's rejection suppresses only when permanent: the event says so, or its
    detail carries a 5.x.x enhanced status code (RFC 3463) when the provider did not say."""
    kind = str(event.kind)
    if not config.enabled or kind not in config.suppress or not event.recipient:
        return None
    if kind in ("bounced", "rejected"):
        permanent = event.permanent
        if permanent is None:
            import re

            permanent = re.search(r"(?<![\d.])5\.\d{1,3}\.\d{1,3}(?![\d.])",
                                  event.detail or "") is not None
        if not permanent:
            return None
    return EVENT_SOURCES[kind]


def note_event(where: Engine | Connection, event: DeliveryEventLike, sender: str | None,
               message_id: str | None = None, *, connection: str = "",
               config: SuppressionSettings | None = None) -> Entry | None:
    """Put the event's recipient on the list if the event calls for it (see
    :func:`suppresses`); the entry added, or None (nothing to add, or listed already).
    Given a Connection, the row is part of that transaction (the webhook intake's)."""
    cfg = config if config is not None else SuppressionSettings()
    row = _event_row(event, sender, message_id, connection, cfg)
    if row is None:
        return None
    from sqlalchemy import Connection as Conn

    if isinstance(where, Conn):
        added = _insert(where, [row])
    else:
        from postroom.store.db import write_transaction

        with write_transaction(where) as conn:
            added = _insert(conn, [row])
    return Entry(**row) if added else None


def note_events(conn: Connection,
                noted: Iterable[tuple[DeliveryEventLike, str | None, str | None, str]], *,
                config: SuppressionSettings | None = None) -> int:
    """:func:`note_event` for many (event, sender, message id, connection), in ``conn``'s
    transaction and one statement; the number of entries added."""
    cfg = config if config is not None else SuppressionSettings()
    rows = [row for event, sender, message_id, connection in noted
            if (row := _event_row(event, sender, message_id, connection, cfg)) is not None]
    return _insert(conn, rows)


def _event_row(event: DeliveryEventLike, sender: str | None, message_id: str | None,
               connection: str, cfg: SuppressionSettings) -> dict[str, Any] | None:
    """The entry an event adds, or None (see :func:`suppresses`, and a garbled
    recipient)."""
    source = suppresses(event, cfg)
    if source is None or event.recipient is None:
        return None
    try:
        address = normalise(event.recipient)
    except MessageError:
        return None  # a provider's garbled recipient: nothing Postroom would send to
    domain = sender_domain(sender) if cfg.scope == "sender_domain" else None
    detail = event.detail or ""
    reason = f"{event.kind} ({connection}): {detail}" if connection else f"{event.kind}: {detail}"
    return _row(address, domain or GLOBAL, reason.strip(": "), source, message_id, detail,
                time.time())


class Suppressions:
    """The list in one database; ``config``: the instance's [suppression] section."""

    def __init__(self, engine: Engine, config: SuppressionSettings | None = None) -> None:
        self.engine = engine
        self.config = config if config is not None else SuppressionSettings()
        self._lock = threading.Lock()  # check() runs in worker threads (asyncio.to_thread)
        self._listed: frozenset[str] | None = None  # None: not read, or over MEMORY_MAX
        self._stamp: tuple[Any, ...] | None = None
        self._looked = float("-inf")  # time.monotonic() of the last stamp read

    def _forget(self) -> None:
        """This process changed the list: the next check reads the stamp again."""
        self._looked = float("-inf")

    def clear_now(self, recipients: Sequence[str]) -> bool:
        """True when the list held in memory is fresh and names none of ``recipients``: the
        worker then skips :meth:`apply` and its thread hop (the common case). False means
        "ask apply()", not "suppressed". Never touches the database."""
        if not self.config.enabled or not recipients:
            return True
        listed = self._listed
        if listed is None or time.monotonic() - self._looked >= REFRESH:
            return False
        return not any(_key(r) in listed for r in recipients)

    def _addresses(self) -> frozenset[str] | None:
        """Every listed address (any scope), or None when the list is too long to hold."""
        from sqlalchemy import func, select

        from postroom.store.schema import suppressions as table

        with self._lock:
            now = time.monotonic()
            if now - self._looked < REFRESH:
                return self._listed
            with self.engine.connect() as conn:
                stamp = tuple(conn.execute(select(func.count(), func.max(table.c.created_at))
                                           .select_from(table)).one())
                if stamp != self._stamp:
                    self._listed = None if stamp[0] > MEMORY_MAX else frozenset(
                        conn.execute(select(table.c.address).distinct()).scalars())
                    self._stamp = stamp
            self._looked = now
            return self._listed

    @classmethod
    def of(cls, settings: Settings, engine: Engine) -> Suppressions:
        """The list of an instance, with its [suppression] section (defaults if none)."""
        return cls(engine, settings.section(SuppressionSettings))

    # -- writes ------------------------------------------------------------------------------
    def add(self, address: str, scope: str = GLOBAL, reason: str = "",
            source: Source | str = Source.MANUAL, message_id: str | None = None,
            detail: str = "") -> Entry | None:
        """Add one entry; None when (address, scope) is listed already (left as it was)."""
        from postroom.store.db import write_transaction

        row = _row(normalise(address), normalise_scope(scope), reason.strip(), Source(source),
                   message_id, detail, time.time())
        self._forget()
        with write_transaction(self.engine) as conn:
            return Entry(**row) if _insert(conn, [row]) else None

    def add_many(self, addresses: Iterable[tuple[str, str]], *, reason: str,
                 source: Source | str = Source.IMPORT, batch: int = 500) -> int:
        """Add (address, scope) pairs, already normalised; the number that were new."""
        from postroom.store.db import write_transaction

        now = time.time()
        rows = [_row(a, s, reason, Source(source), None, "", now) for a, s in addresses]
        added = 0
        self._forget()
        for start in range(0, len(rows), batch):
            with write_transaction(self.engine) as conn:
                added += _insert(conn, rows[start:start + batch])
        return added

    def remove(self, address: str, scope: str | None = GLOBAL) -> int:
        """Remove ``address`` from ``scope`` (None: from every scope); the rows removed."""
        from sqlalchemy import delete

        from postroom.store.db import write_transaction
        from postroom.store.schema import suppressions as table

        stmt = delete(table).where(table.c.address == normalise(address))
        if scope is not None:
            stmt = stmt.where(table.c.scope == normalise_scope(scope))
        self._forget()
        with write_transaction(self.engine) as conn:
            return int(conn.execute(stmt).rowcount or 0)

    # -- reads -------------------------------------------------------------------------------
    def list(self, *, contains: str | None = None, scope: str | None = None,
             source: str | None = None, after: Cursor | None = None,
             limit: int = 100) -> list[Entry]:
        """Entries newest first; ``contains``: a part of the address; ``after``: the previous
        page's last entry's :attr:`Entry.cursor` (an import adds many at one time)."""
        from sqlalchemy import and_, or_, select

        from postroom.store.schema import suppressions as table

        c = table.c
        q = (select(table).order_by(c.created_at.desc(), c.address, c.scope)
             .limit(max(1, min(limit, LIST_LIMIT))))
        if contains:
            text = contains.strip().lower()
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = q.where(c.address.like(f"%{escaped}%", escape="\\"))
        if scope is not None:
            q = q.where(c.scope == normalise_scope(scope))
        if source:
            q = q.where(c.source == Source(source).value)
        if after is not None:
            at, address, scope_ = after
            q = q.where(or_(c.created_at < at, and_(c.created_at == at, or_(
                c.address > address, and_(c.address == address, c.scope > scope_)))))
        with self.engine.connect() as conn:
            return [Entry(**dict(r._mapping)) for r in conn.execute(q)]

    def count(self) -> int:
        from sqlalchemy import func, select

        from postroom.store.schema import suppressions as table

        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def check(self, sender: str | None, recipients: Sequence[str]) -> dict[str, str]:
        """The recipients on the list for mail from ``sender`` (global entries and those of
        its domain), each with the reason: one indexed query for up to CHECK_CHUNK
        recipients (the (address, scope) primary key)."""
        if not self.config.enabled or not recipients:
            return {}
        from sqlalchemy import select

        from postroom.store.schema import suppressions as table

        keys: dict[str, list[str]] = {}
        for rcpt in recipients:
            keys.setdefault(_key(rcpt), []).append(rcpt)
        listed = self._addresses()
        if listed is not None:  # only those listed in some scope need the query
            keys = {k: v for k, v in keys.items() if k in listed}
            if not keys:
                return {}
        domain = sender_domain(sender)
        scopes = [GLOBAL] if domain is None else [GLOBAL, domain]
        c = table.c
        found: dict[str, str] = {}
        names = builtins.list(keys)
        with self.engine.connect() as conn:
            for start in range(0, len(names), CHECK_CHUNK):
                q = select(c.address, c.scope, c.reason).where(
                    c.address.in_(names[start:start + CHECK_CHUNK]), c.scope.in_(scopes))
                # A global entry's reason wins over a domain's: it is the one that would
                # still hold if the domain's were removed.
                for address, scope, reason in sorted(conn.execute(q).all(),
                                                     key=lambda r: r[1] != GLOBAL):
                    for rcpt in keys[address]:
                        found.setdefault(rcpt, f"{reason} [{scope}]" if scope != GLOBAL
                                         else reason)
        return found

    def apply(self, sender: str | None, recipients: Sequence[str],
              rcpt_status: dict[str, dict[str, Any]]
              ) -> tuple[builtins.list[str], dict[str, str]]:
        """Before a delivery: ``recipients`` (those still pending) split into those to send
        to and those suppressed (recipient -> reason). Each suppressed one's entry in
        ``rcpt_status`` becomes state ``suppressed`` with the reason, so it is no longer
        pending (queue.sql.Claimed.pending) and the log shows why it got nothing."""
        blocked = self.check(sender, recipients)
        for rcpt, reason in blocked.items():
            entry = rcpt_status.setdefault(rcpt, {})
            entry.update(state="suppressed", code=None,
                         reply=f"not sent: on the suppression list ({reason})"[:500])
        return [r for r in recipients if r not in blocked], blocked

    def note_event(self, connection: str, event: DeliveryEventLike, sender: str | None,
                   message_id: str | None = None) -> Entry | None:
        """:func:`note_event` with this list's database and settings."""
        self._forget()
        return note_event(self.engine, event, sender, message_id, connection=connection,
                          config=self.config)


def all_suppressed(rcpt_status: Mapping[str, Mapping[str, Any]],
                   recipients: Sequence[str]) -> bool:
    """Whether every one of the message's own recipients was suppressed: the message then
    ends with status ``suppressed`` (store.states.SUPPRESSED), never sent."""
    return bool(recipients) and all(
        rcpt_status.get(r, {}).get("state") == "suppressed" for r in recipients)


def summary(suppressed: Mapping[str, str]) -> str:
    """The message's last_error for its suppressed recipients."""
    return "; ".join(f"{r}: suppressed ({why})" for r, why in suppressed.items())[:2000]
