"""Whole-address search of the email log: ``log_addresses`` (migration 0011).

A search for a whole address (``bob@example.com``) looked its trigrams up in the text
index, and the trigrams of an address ("exa", "le.", "com") are in nearly every row: at a
million messages some took seconds. Every address of each message is kept here instead,
lower-cased, keyed (role, address, message_id): such a search is one range of a B-tree.

- role "r": the envelope recipients and the To header's addresses; "s": the envelope
  sender and the From header's; "p": a marker (address "") for a message whose addresses
  were rewritten (migration 0011's update trigger), read again by the indexer.
- Written by the text indexer (``postroom.store.log.Log.index_pending``) with the text
  index, from the same pending rows: the enqueue pays nothing for it. A search compares the
  rows still pending itself, through :func:`addresses`, so its answer is always complete.
- Messages logged before migration 0011 are read by :func:`backfill`, newest first, below
  the created_at cursor in the ``control`` row BACKFILL; until that row is gone
  (:func:`complete`), whole-address searches take the trigram path.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from sqlalchemy import ColumnElement, Connection, Text, cast, delete, or_, select, update

from postroom.store import pending as index_pending
from postroom.store.db import is_postgresql
from postroom.store.schema import control, log_addresses, messages

RECIPIENT, SENDER = "r", "s"
REREAD = "p"  # a message whose addresses changed: read again by the indexer
BACKFILL = "log.addresses_backfill"  # control row: created_at below which rows are unread
MAX_ADDRESS = 320  # log_addresses.address (RFC 5321 4.5.3.1: 64 + 1 + 255)
# A whole address: a local part, "@", a domain with a dot in it; nothing that separates
# addresses in a header, no spaces. Anything else is searched as part of one.
_WHOLE = re.compile(r"[^\s@<>,;:\"()\[\]]+@[^\s@<>,;:\"()\[\]]+\.[^\s@<>,;:\"()\[\].]+")
# An address in a To / From header: what is around "@" up to a separator. A regex, not
# email.utils.getaddresses, which costs the indexer about 40 us a header (more than the
# rest of its work on a message); a display name holding an "@" adds a row that finds the
# message by a text that is in its header anyway.
_IN_HEADER = re.compile(r"[^\s@<>,;:\"()\[\]]+@[^\s@<>,;:\"()\[\]]+")
# A row already there is skipped: a message read twice (pending, and by the backfill).
# SQLite: the driver's executemany of tuples (a third of the cost of SQLAlchemy Core's
# dicts). PostgreSQL: one statement over arrays; an executemany there is one statement a
# row, each paying the server's per-statement set-up, about 2.5 rows a message.
_ADD_SQLITE = ("INSERT OR IGNORE INTO log_addresses (role, address, message_id, created_at) "
               "VALUES (?, ?, ?, ?)")
_ADD_PG = ("INSERT INTO log_addresses (role, address, message_id, created_at) "
           "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::float8[]) "
           "ON CONFLICT DO NOTHING")
_ROWS = (messages.c.id, messages.c.sender, messages.c.recipients, messages.c.to_header,
         messages.c.from_header, messages.c.created_at)


def whole_address(value: str) -> str | None:
    """``value`` lower-cased when it is a whole address (``bob@example.com``), which the
    recipient and sender filters look up exactly; None for part of one (``bob@``,
    ``example.com``), which they search as a substring."""
    return value.lower() if _WHOLE.fullmatch(value) else None


def addresses(sender: str, recipients: Iterable[str], to_header: str,
              from_header: str) -> set[tuple[str, str]]:
    """A message's (role, address) rows: RECIPIENT for the envelope recipients and the To
    header's addresses, SENDER for the envelope sender and the From header's, lower-cased;
    what the indexer writes and what a search of pending rows compares, so both give the
    same answer. Values that cannot be a whole address (no "@", longer than the column)
    are left out: no whole-address search can find them."""
    found = {(RECIPIENT, a.lower()) for a in recipients if "@" in a}
    found.update((RECIPIENT, a.lower()) for a in _IN_HEADER.findall(to_header))
    found.add((SENDER, sender.lower()))
    found.update((SENDER, a.lower()) for a in _IN_HEADER.findall(from_header))
    return {(role, a) for role, a in found if len(a) <= MAX_ADDRESS and "@" in a}


def complete(conn: Connection) -> bool:
    """Whether every message's addresses were read (migration 0011's backfill is done)."""
    return conn.execute(select(control.c.value).where(
        control.c.name == BACKFILL)).first() is None


def exact(conn: Connection, role: str, address: str,
          low: float | None = None) -> ColumnElement[bool]:
    """The log filter for messages with ``address`` in ``role``: indexed ones from the
    table's key, pending ones (few: the indexer takes them within a second or so) compared
    here, as the indexer will write them. ``low``: indexed ones created at or after it
    only (the caller bounds the messages too)."""
    la = log_addresses.c
    found = select(la.message_id).where(la.role == role, la.address == address)
    if low is not None:
        found = found.where(la.created_at >= low)
    waiting = index_pending.ids(is_postgresql(conn.engine)).union_all(
        select(la.message_id).where(la.role == REREAD))
    m = messages.c
    rows = select(*_ROWS).where(m.id.in_(waiting))
    near = _near(role, address)
    if near is not None:  # SQL narrows the pending rows (up to log.PENDING_BOUND) first
        rows = rows.where(near)
    pending = [r.id for r in conn.execute(rows)
               if (role, address) in addresses(r.sender, r.recipients, r.to_header,
                                               r.from_header)]
    if not pending:
        return m.id.in_(found)
    return m.id.in_(found.union_all(select(m.id).where(m.id.in_(pending))))


def _near(role: str, address: str) -> ColumnElement[bool] | None:
    """A condition every message with ``address`` in ``role`` meets (more may): the
    columns hold it, ASCII case ignored (ILIKE). For an ASCII address only, and "k" matches
    any one character: the Kelvin sign (U+212A) is the one character beyond ASCII whose
    lower case (what addresses() compares) is an ASCII one. An address with a backslash
    is written doubled in the recipients' JSON: None, Python compares every pending row."""
    if not address.isascii() or "\\" in address:
        return None
    pattern = "%" + address.replace("%", "\\%").replace("_", "\\_").replace("k", "_") + "%"
    m = messages.c
    cols = (m.recipients, m.to_header) if role == RECIPIENT else (m.sender, m.from_header)
    return or_(*(cast(c, Text).ilike(pattern, escape="\\") for c in cols))


def write(conn: Connection, ids: list[str]) -> None:
    """The rows of these messages (a message deleted meanwhile has none)."""
    if not ids:
        return
    rows = [(role, address, r.id, r.created_at)
            for r in conn.execute(select(*_ROWS).where(messages.c.id.in_(ids)))
            for role, address in addresses(r.sender, r.recipients, r.to_header,
                                           r.from_header)]
    if not rows:
        return
    if is_postgresql(conn.engine):
        conn.exec_driver_sql(_ADD_PG, tuple(map(list, zip(*rows, strict=True))))
    else:
        conn.exec_driver_sql(_ADD_SQLITE, rows)


def reread(conn: Connection, batch: int) -> int:
    """Up to ``batch`` messages whose addresses were rewritten, read again; how many."""
    la = log_addresses.c
    ids = list(conn.execute(select(la.message_id).where(la.role == REREAD).limit(batch)
                            .with_for_update(skip_locked=True)).scalars())
    if ids:
        conn.execute(delete(log_addresses).where(la.message_id.in_(ids)))
        write(conn, ids)
    return len(ids)


def backfill(conn: Connection, batch: int) -> int:
    """Read up to about ``batch`` messages created before migration 0011, newest first,
    from the BACKFILL row's created_at cursor down; how many were read (0: none left, the
    row is gone). Run in a short write transaction of its own, like the indexer's.

    On PostgreSQL a message deleted while its batch is read may leave rows that point at
    no message: searches join them to ``messages``, so they show nothing, and they cost a
    few bytes each."""
    m = messages.c
    below = conn.execute(select(control.c.value).where(control.c.name == BACKFILL)).scalar()
    if below is None:
        return 0
    rows = conn.execute(select(m.id, m.created_at).where(m.created_at < float(below))
                        .order_by(m.created_at.desc()).limit(batch)).all()
    if len(rows) < batch:  # the oldest: done
        ids = [r.id for r in rows]
        conn.execute(delete(control).where(control.c.name == BACKFILL))
    else:  # the whole of the last created_at, so the cursor can pass it
        low = rows[-1].created_at
        ids = [r.id for r in rows if r.created_at > low]
        ids += conn.execute(select(m.id).where(m.created_at == low)).scalars()
        conn.execute(update(control).where(control.c.name == BACKFILL)
                     .values(value=repr(float(low)), updated_at=time.time()))
    write(conn, ids)
    return len(ids)


def newest_at(conn: Connection, role: str, address: str, at: float | None,
              k: int) -> float | None:
    """The created_at of the ``k``-th newest message with ``address`` in ``role`` at or
    before ``at`` (a page's cursor), read down the (role, address, created_at) index; None
    when there are fewer than ``k``."""
    la = log_addresses.c
    q = (select(la.created_at).where(la.role == role, la.address == address)
         .order_by(la.created_at.desc()).offset(k - 1).limit(1))
    if at is not None:
        q = q.where(la.created_at <= at)
    found = conn.execute(q).scalar()
    return None if found is None else float(found)
