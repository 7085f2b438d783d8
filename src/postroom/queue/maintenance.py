"""What an operator does to the queue by hand: see what waits, retry, purge.

Retry, for each state a message can be in:

- ``queued`` / ``deferred``: due now (its retry time is reset); nothing else changes.
- ``failed`` / ``partial``: the recipients that failed are pending again and the message is
  due now, with a fresh lifetime (``delivery.max_lifetime`` from now: the operator asked
  for it to be sent, so an expiry that already passed must not fail it at once). Recipients
  already delivered are never sent again: retrying a ``partial`` message sends it only to
  those that failed. A full copy to everyone is `postroom resend` (a new log entry).
- ``sending``: refused (a worker holds it; wait for the attempt to end).
- ``sent``: refused (use `postroom resend`).
- body purged by retention: refused (there is nothing left to send).

Every write re-checks the state in its own transaction (PostgreSQL: the rows are locked
first), so a worker claiming at the same moment and an operator command cannot both win.
Bulk work runs in batches of one short transaction each: never one transaction over a big
log, and delivery carries on between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Text, and_, bindparam, cast, delete, func, or_, select, update

from postroom import events
from postroom.events import Kind
from postroom.exceptions import MessageError
from postroom.queue.sql import Queue
from postroom.store.schema import (
    DEFERRED,
    FAILED,
    PARTIAL,
    QUEUED,
    SENDING,
    SENT,
    STATUSES,
    SUPPRESSED,
    WAITING,
    attempts,
    messages,
)

FINAL = (SENT, PARTIAL, FAILED, SUPPRESSED)
Progress = Callable[[int], None]


def _contains(value: str, *columns: Any) -> Any:
    escaped = value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return or_(*(func.lower(c).like(f"%{escaped}%", escape="\\") for c in columns))


@dataclass(frozen=True, slots=True)
class Filter:
    """Which messages an operator command is about (every given condition must hold)."""

    statuses: tuple[str, ...] = ()
    app: str | None = None  # handed in by this app, through any door ("<door>:<app>")
    to: str | None = None  # a recipient contains this
    sender: str | None = None  # the envelope sender or From contains this
    before: float | None = None  # created before
    since: float | None = None  # created at or after
    priority: int | None = None
    due_by: float | None = None  # next attempt at or before

    def __post_init__(self) -> None:
        for s in self.statuses:
            if s not in STATUSES:
                raise MessageError(f"status {s!r}: use one of {', '.join(STATUSES)}",
                                   code="cli.status")

    def where(self) -> list[Any]:
        m = messages.c
        cond: list[Any] = []
        if self.statuses:
            cond.append(m.status.in_(self.statuses))
        if self.app:
            cond.append(m.app == self.app)
        if self.to:
            cond.append(_contains(self.to, m.to_header, cast(m.recipients, Text)))
        if self.sender:
            cond.append(_contains(self.sender, m.sender, m.from_header))
        if self.before is not None:
            cond.append(m.created_at < self.before)
        if self.since is not None:
            cond.append(m.created_at >= self.since)
        if self.priority is not None:
            cond.append(m.priority == self.priority)
        if self.due_by is not None:
            cond.append(m.next_attempt_at <= self.due_by)
        return cond


_LIST_COLUMNS = [c for c in messages.c if c.name not in ("raw", "meta")]


def waiting_counts(queue: Queue) -> dict[str, int]:
    """How many messages are queued, sending, deferred (the (status, ...) index answers it
    without reading the log)."""
    with queue.engine.connect() as conn:
        rows = conn.execute(select(messages.c.status, func.count())
                            .where(messages.c.status.in_((*WAITING, SENDING)))
                            .group_by(messages.c.status)).all()
    return {QUEUED: 0, SENDING: 0, DEFERRED: 0, **{r[0]: int(r[1]) for r in rows}}


def list_queue(queue: Queue, flt: Filter, limit: int = 100) -> list[dict[str, Any]]:
    """Messages in the order workers take them: higher priority first, then by due time.
    Without statuses in the filter: everything queued, sending or deferred."""
    if not flt.statuses:
        flt = Filter(**{**_fields(flt), "statuses": (*WAITING, SENDING)})
    q = (select(*_LIST_COLUMNS).where(*flt.where())
         .order_by(messages.c.priority.desc(), messages.c.next_attempt_at, messages.c.id)
         .limit(limit))
    with queue.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def _fields(flt: Filter) -> dict[str, Any]:
    return {name: getattr(flt, name) for name in Filter.__slots__}


def count(queue: Queue, flt: Filter, *, exclude_sending: bool = False) -> int:
    cond = flt.where()
    if exclude_sending:
        cond.append(messages.c.status != SENDING)
    with queue.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(messages).where(*cond))
                   .scalar_one())


def resolve(queue: Queue, msg_id: str) -> str:
    """The full id of a message given by its id or a unique prefix (6 characters or more)."""
    with queue.engine.connect() as conn:
        if conn.execute(select(messages.c.id).where(messages.c.id == msg_id)).first():
            return msg_id
        found: Sequence[Any] = []
        if len(msg_id) >= 6:
            esc = msg_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            found = conn.execute(select(messages.c.id).where(
                messages.c.id.like(f"{esc}%", escape="\\")).limit(2)).scalars().all()
    if len(found) == 1:
        return str(found[0])
    if len(found) > 1:
        raise MessageError(f"{msg_id!r} is the start of several message ids; give more of it",
                           code="message.ambiguous")
    raise MessageError(f"no message {msg_id!r}; `postroom queue list` shows what waits, "
                       "`postroom log` everything", code="message.unknown")


# -- retry --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Retried:
    id: str
    was: str  # the status before
    recipients: tuple[str, ...]  # the recipients that will be tried (pending again or still)


def _lock(conn: Connection, ids: Sequence[str], *cond: Any) -> Sequence[Any]:
    """The rows, locked until the transaction ends (PostgreSQL: a worker's claim or another
    operator waits; SQLite has one writer at a time anyway)."""
    return conn.execute(select(messages.c.id, messages.c.status, messages.c.rcpt_status,
                               messages.c.recipients, messages.c.attempt_count,
                               messages.c.expires_at, messages.c.raw.is_(None).label("purged"))
                        .where(messages.c.id.in_(list(ids)), *cond)
                        .with_for_update()).all()


def _reopened(rcpt_status: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Failed recipients become pending; their last reply is kept in the note."""
    out: dict[str, dict[str, Any]] = {}
    for rcpt, st in rcpt_status.items():
        if st.get("state") == "failed":
            before = f"{st.get('code') or ''} {st.get('reply') or ''}".strip()
            new: dict[str, Any] = {"state": "pending", "code": None,
                                   "reply": f"retry requested; before: {before}"[:500]}
            if st.get("forced"):  # a forced policy copy rides along again (postroom.policy)
                new["forced"] = st["forced"]
            out[rcpt] = new
        else:
            out[rcpt] = st
    return out


_REOPEN = (
    update(messages)
    .where(messages.c.id == bindparam("b_id"), messages.c.status == bindparam("b_status"))
    .values(status=bindparam("status"), next_attempt_at=bindparam("now"),
            expires_at=bindparam("expires_at"), updated_at=bindparam("now"),
            rcpt_status=bindparam("rcpt_status", type_=messages.c.rcpt_status.type))
)


def _reopen_params(row: Any, now: float, lifetime: float) -> dict[str, Any]:
    return {"b_id": row.id, "b_status": row.status,
            "status": DEFERRED if row.attempt_count else QUEUED, "now": now,
            "expires_at": max(row.expires_at, now + lifetime),
            "rcpt_status": _reopened(dict(row.rcpt_status))}


def retry(queue: Queue, msg_id: str) -> Retried:
    """Make one message due now (see the module docstring for what each state means)."""
    full = resolve(queue, msg_id)
    now = queue.clock()

    def op(conn: Connection) -> Retried:
        rows = _lock(conn, [full])
        if not rows:
            raise MessageError(f"message {full} is gone (purged meanwhile)",
                               code="message.unknown")
        row = rows[0]
        if row.status == SENDING:
            raise MessageError(
                f"message {full} is being sent right now; wait for the attempt to end "
                f"(`postroom show {full}`)", code="queue.retry.sending")
        if row.status == SENT:
            raise MessageError(
                f"message {full} was delivered to every recipient; to send it again, "
                f"`postroom resend {full}` queues a copy", code="queue.retry.sent")
        if row.purged:
            raise MessageError(
                f"message {full} has no body any more (purged by retention); it cannot be "
                "delivered again", code="queue.retry.no_body")
        if row.status in WAITING:
            conn.execute(update(messages).where(messages.c.id == full,
                                                messages.c.status == row.status)
                         .values(next_attempt_at=now, updated_at=now))
            todo = tuple(r for r in row.recipients
                         if row.rcpt_status.get(r, {}).get("state") in ("pending", "unknown"))
        else:
            params = _reopen_params(row, now, queue.lifetime)
            conn.execute(_REOPEN, params)
            todo = tuple(r for r in row.recipients
                         if params["rcpt_status"].get(r, {}).get("state") == "pending")
        events.record(conn, Kind.RETRY_REQUESTED, at=now, message_id=full,
                      detail=f"was {row.status}; {len(todo)} recipient(s) to try")
        return Retried(full, row.status, todo)

    result: Retried = queue.writer.run_sync(op)
    return result


def retry_failed(queue: Queue, *, since: float | None = None, app: str | None = None,
                 batch: int = 200, progress: Progress | None = None) -> tuple[int, int]:
    """Retry every ``failed`` message (that failed at or after ``since``; of ``app``).
    Returns (retried, skipped because their body was purged)."""
    cond = [messages.c.status == FAILED, *Filter(app=app).where()]
    if since is not None:
        cond.append(messages.c.updated_at >= since)
    retried = skipped = 0
    last = ""
    while True:  # keyset over ids: each row is looked at once, however the others change
        with queue.engine.connect() as conn:
            ids = conn.execute(select(messages.c.id).where(*cond, messages.c.id > last)
                               .order_by(messages.c.id).limit(batch)).scalars().all()
        if not ids:
            return retried, skipped
        last = ids[-1]
        now = queue.clock()

        def op(conn: Connection, ids: Sequence[str] = ids, now: float = now) -> tuple[int, int]:
            rows = _lock(conn, ids, messages.c.status == FAILED)
            ok = [r for r in rows if not r.purged]
            if ok:
                conn.execute(_REOPEN, [_reopen_params(r, now, queue.lifetime) for r in ok])
                events.record(conn, Kind.RETRY_REQUESTED, at=now,
                              detail=f"retry --all-failed: {len(ok)} message(s)")
            return len(ok), len(rows) - len(ok)

        n, purged = queue.writer.run_sync(op)
        retried += n
        skipped += purged
        if progress is not None:
            progress(len(ids))


# -- purge --------------------------------------------------------------------------------
def purge(queue: Queue, flt: Filter, *, batch: int = 500,
          progress: Progress | None = None) -> dict[str, int]:
    """Delete the messages the filter matches, with their attempts; never one being sent
    (re-checked, locked, in the transaction that deletes it). Returns counts."""
    if SENDING in flt.statuses:
        raise MessageError("messages being sent are never purged; pause the queue "
                           "(`postroom queue pause`), then purge them once they are back "
                           "in the queue", code="queue.purge.sending")
    cond = [*flt.where(), messages.c.status != SENDING]
    counts = {"messages": 0, "attempts": 0}
    last: tuple[float, str] | None = None
    while True:  # keyset over (created_at, id), oldest first
        q = select(messages.c.created_at, messages.c.id).where(*cond)
        if last is not None:
            q = q.where(or_(messages.c.created_at > last[0],
                            and_(messages.c.created_at == last[0], messages.c.id > last[1])))
        with queue.engine.connect() as conn:
            page = conn.execute(q.order_by(messages.c.created_at, messages.c.id)
                                .limit(batch)).all()
        if not page:
            break
        last = (page[-1].created_at, page[-1].id)
        ids = [r.id for r in page]
        def op(conn: Connection, ids: list[str] = ids) -> tuple[int, int]:
            return delete_messages(conn, ids, messages.c.status != SENDING)

        n_msgs, n_att = queue.writer.run_sync(op)
        counts["messages"] += n_msgs
        counts["attempts"] += n_att
        if progress is not None:
            progress(len(ids))
    if counts["messages"]:
        now = queue.clock()
        queue.writer.run_sync(lambda conn: events.record(
            conn, Kind.QUEUE_PURGED, at=now, detail=f"{counts['messages']} message(s) deleted"))
    return counts


def delete_messages(conn: Connection, ids: Sequence[str], *cond: Any) -> tuple[int, int]:
    """Delete these messages (those of them still matching ``cond``, checked on locked rows)
    and their attempts; returns (messages, attempts) deleted."""
    locked = conn.execute(select(messages.c.id).where(messages.c.id.in_(list(ids)), *cond)
                          .with_for_update()).scalars().all()
    if not locked:
        return 0, 0
    n_att = conn.execute(delete(attempts).where(attempts.c.message_id.in_(locked))).rowcount
    n_msg = conn.execute(delete(messages).where(messages.c.id.in_(locked))).rowcount
    return int(n_msg), int(n_att)
