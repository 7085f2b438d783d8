"""Retention: what the log keeps, and for how long (``[retention]`` in postroom.toml).

- Bodies: ``keep_bodies_days`` (default 30) after a message was finished, its raw MIME is
  set to NULL and its attempts' transcripts are emptied; the row stays (who, when, status,
  replies), so the log still answers "was it sent?". `resend` then says there is no body.
- Rows: ``keep_rows_days`` (default 90) after it was finished, the message is deleted with
  its attempts; events and idempotency keys older than that go too.
- Size: ``max_size`` (default 0: none) bounds the total size of the stored bodies; past it,
  the bodies of the oldest finished messages are purged (as by age) until it is under, so a
  burst of big mail cannot fill the disk before ``keep_bodies_days`` comes round. Bodies,
  not rows: they are what takes the room, and the rows still answer "was it sent?".
- ``send_log`` (the rate limits' sliding windows) keeps only what a window can still count.

Only finished messages (sent, partial, failed) are touched, and only when both their
creation and their last change are older than the cut-off: mail still queued, deferred or
being sent is never purged, whatever its age. 0 days keeps forever.

Every step works in batches of ``batch`` rows, one short transaction each, so a big log is
never locked for long and delivery carries on in between. One runner at a time across every
node (a PostgreSQL advisory lock; for SQLite a lock file beside the database), and at most
one run per ``interval`` seconds across all of them (the last run's time is kept in the
``control`` table): every worker may call :func:`run_retention` as often as it likes.

Bodies already purged stay in the log for weeks, so a run does not walk them again: it
remembers (``control``) the creation time up to which every finished message's body is
gone, and starts there next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from postroom.exceptions import PostroomError
from postroom.queue.limits import Limiter
from postroom.queue.maintenance import FINAL, delete_messages
from postroom.queue.sql import Queue
from postroom.settings import Settings
from postroom.store.db import is_postgresql
from postroom.store.schema import attempts, control, events, idempotency, messages

log = logging.getLogger(__name__)
DAY = 86400.0
LOCK_KEY = 7405312  # PostgreSQL advisory lock (migrations use 7405311)
LAST_RUN = "retention_last_run"
BODIES_DONE = "retention_bodies_until"
CHECK_SECONDS = 300.0  # how often retention_loop asks whether a run is due
COUNTS = ("bodies", "transcripts", "messages", "attempts", "events", "idempotency_keys",
          "send_log")
Progress = Callable[[str, int], None]


@contextlib.contextmanager
def _single_runner(queue: Queue) -> Iterator[bool]:
    """Yields True if this process may run retention now (nobody else is)."""
    engine = queue.engine
    if is_postgresql(engine):
        with engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                    {"k": LOCK_KEY}).scalar())
            conn.commit()  # the lock belongs to the session: no transaction left open
            try:
                yield got
            finally:
                # A broken connection released the lock with its session already.
                with contextlib.suppress(SQLAlchemyError):
                    if got:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                        conn.commit()
        return
    path = engine.url.database
    if not path or path == ":memory:":
        yield True
        return
    fd = os.open(f"{path}.retention.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _get(conn: Connection, name: str) -> float | None:
    value = conn.execute(select(control.c.value).where(control.c.name == name)).scalar()
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _set(conn: Connection, name: str, value: float, now: float) -> None:
    conn.execute(delete(control).where(control.c.name == name))
    conn.execute(insert(control).values(name=name, value=repr(value), updated_at=now))


def _after(last: tuple[float, str] | None) -> Any:
    if last is None:
        return True
    return or_(messages.c.created_at > last[0],
               and_(messages.c.created_at == last[0], messages.c.id > last[1]))


class _Run:
    def __init__(self, queue: Queue, settings: Settings, now: float,
                 progress: Progress | None, stop: threading.Event) -> None:
        self.queue, self.settings, self.now = queue, settings, now
        self.batch = settings.retention.batch
        self.progress = progress
        self.stop = stop
        self.counts = dict.fromkeys(COUNTS, 0)

    def write(self, op: Callable[[Connection], Any]) -> Any:
        return self.queue.writer.run_sync(op)

    def add(self, what: str, n: int) -> None:
        self.counts[what] += n
        if self.progress is not None and n:
            self.progress(what, n)

    def bodies(self, days: float) -> None:
        cutoff = self.now - days * DAY
        start = self.write(lambda c: _get(c, BODIES_DONE))
        # The oldest message in the range this run could not purge yet (still waiting, or
        # finished after the cut-off): next time the scan starts there, not later.
        keep_from = cutoff
        last: tuple[float, str] | None = None
        m = messages.c
        while not self.stop.is_set():
            q = (select(m.created_at, m.id, m.status, m.updated_at, m.raw.is_(None).label("gone"))
                 .where(m.created_at < cutoff, _after(last)))
            if start is not None:
                q = q.where(m.created_at >= start)
            with self.queue.engine.connect() as conn:
                page = conn.execute(q.order_by(m.created_at, m.id).limit(self.batch)).all()
            if not page:
                break
            last = (page[-1].created_at, page[-1].id)
            ids = []
            for r in page:
                if r.gone:
                    continue
                if r.status in FINAL and r.updated_at < cutoff:
                    ids.append(r.id)
                else:
                    keep_from = min(keep_from, r.created_at)
            if ids:
                n_bodies, n_transcripts = self.write(
                    functools.partial(self._purge_bodies, ids=ids, cutoff=cutoff))
                self.add("bodies", n_bodies)
                self.add("transcripts", n_transcripts)
        if not self.stop.is_set():  # a scan cut short proves nothing about what is left
            self.write(lambda c: _set(c, BODIES_DONE, keep_from, self.now))

    def size_cap(self, max_size: int) -> None:
        """Purge the bodies of the oldest finished messages until the stored bodies' total
        is at most ``max_size`` bytes (waiting mail is never touched, so it may stay over)."""
        m = messages.c
        with self.queue.engine.connect() as conn:
            total = int(conn.execute(select(func.coalesce(func.sum(m.size), 0))
                                     .where(m.raw.is_not(None))).scalar() or 0)
        excess = total - max_size
        last: tuple[float, str] | None = None
        while excess > 0 and not self.stop.is_set():
            with self.queue.engine.connect() as conn:
                page = conn.execute(select(m.created_at, m.id, m.size)
                                    .where(m.raw.is_not(None), m.status.in_(FINAL),
                                           _after(last))
                                    .order_by(m.created_at, m.id).limit(self.batch)).all()
            if not page:
                return
            ids = []
            for r in page:
                ids.append(r.id)
                excess -= r.size
                if excess <= 0:
                    break
            last = (page[len(ids) - 1].created_at, ids[-1])
            n_bodies, n_transcripts = self.write(
                functools.partial(self._purge_bodies, ids=ids, cutoff=None))
            self.add("bodies", n_bodies)
            self.add("transcripts", n_transcripts)

    @staticmethod
    def _purge_bodies(conn: Connection, *, ids: list[str],
                      cutoff: float | None) -> tuple[int, int]:
        """``cutoff``: only messages finished before it (None: whenever; by size)."""
        m = messages.c
        since = () if cutoff is None else (m.updated_at < cutoff,)
        done = conn.execute(
            update(messages)
            .where(m.id.in_(ids), m.status.in_(FINAL), *since, m.raw.is_not(None))
            .values(raw=None).returning(m.id)).scalars().all()
        if not done:
            return 0, 0
        n = conn.execute(update(attempts).where(attempts.c.message_id.in_(done),
                                                attempts.c.transcript != "")
                         .values(transcript="")).rowcount
        return len(done), int(n)

    def rows(self, days: float) -> None:
        cutoff = self.now - days * DAY
        m = messages.c
        final = _final_before(cutoff)
        last: tuple[float, str] | None = None
        while not self.stop.is_set():  # keyset: what stays (not final) is passed once
            with self.queue.engine.connect() as conn:
                page = conn.execute(select(m.created_at, m.id)
                                    .where(m.created_at < cutoff, *final, _after(last))
                                    .order_by(m.created_at, m.id).limit(self.batch)).all()
            if not page:
                break
            last = (page[-1].created_at, page[-1].id)
            ids = [r.id for r in page]
            n_msg, n_att = self.write(functools.partial(_delete_final, ids=ids, cutoff=cutoff))
            self.add("messages", n_msg)
            self.add("attempts", n_att)
        self._drain("events", lambda conn: _delete_events(conn, cutoff, self.batch))
        self._drain("idempotency_keys", lambda conn: _delete_keys(conn, cutoff, self.batch))

    def _drain(self, what: str, op: Callable[[Connection], int]) -> None:
        while not self.stop.is_set():
            n = self.write(op)
            self.add(what, n)
            if n < self.batch:
                return

    def send_log(self) -> None:
        limiter = Limiter(self.queue, clock=lambda: self.now)
        self.add("send_log", self.write(
            lambda conn: limiter.purge(conn, self.settings.connections)))


def _final_before(cutoff: float) -> tuple[Any, ...]:
    return messages.c.status.in_(FINAL), messages.c.updated_at < cutoff


def _delete_final(conn: Connection, *, ids: list[str], cutoff: float) -> tuple[int, int]:
    return delete_messages(conn, ids, *_final_before(cutoff))


def _delete_events(conn: Connection, cutoff: float, batch: int) -> int:
    ids = conn.execute(select(events.c.id).where(events.c.at < cutoff)
                       .order_by(events.c.id).limit(batch)).scalars().all()
    if not ids:
        return 0
    return int(conn.execute(delete(events).where(events.c.id.in_(ids))).rowcount)


def _delete_keys(conn: Connection, cutoff: float, batch: int) -> int:
    rows = conn.execute(select(idempotency.c.app, idempotency.c.key)
                        .where(idempotency.c.created_at < cutoff).limit(batch)).all()
    by_app: dict[str, list[str]] = {}
    for r in rows:
        by_app.setdefault(r.app, []).append(r.key)
    n = 0
    for app, keys in by_app.items():
        n += conn.execute(delete(idempotency).where(idempotency.c.app == app,
                                                    idempotency.c.key.in_(keys))).rowcount
    return int(n)


def retention_sync(queue: Queue, settings: Settings, now: float | None = None, *,
                   force: bool = False, progress: Progress | None = None,
                   stop: threading.Event | None = None) -> dict[str, int]:
    """One retention run; returns what it removed, with ``skipped`` = 1 when it did not run
    (another node is running it, or ``force`` is not set and the last run is more recent
    than ``[retention] interval``). Setting ``stop`` ends it after the current batch."""
    now = queue.clock() if now is None else now
    cfg = settings.retention
    with _single_runner(queue) as mine:
        if not mine:
            return {**dict.fromkeys(COUNTS, 0), "skipped": 1}
        if not force:
            last = queue.writer.run_sync(lambda c: _get(c, LAST_RUN))
            if last is not None and 0 <= now - last < cfg.interval:
                return {**dict.fromkeys(COUNTS, 0), "skipped": 1}
        # Recorded first: a run that crashes half-way is not retried in a tight loop.
        queue.writer.run_sync(lambda c: _set(c, LAST_RUN, now, now))
        run = _Run(queue, settings, now, progress, stop or threading.Event())
        if cfg.keep_bodies_days:
            run.bodies(cfg.keep_bodies_days)
        if cfg.keep_rows_days:
            run.rows(cfg.keep_rows_days)
        if cfg.max_size:  # after the age steps: what they removed counts already
            run.size_cap(cfg.max_size)
        run.send_log()
    if any(run.counts.values()):
        log.info("retention: %s", ", ".join(f"{k}={v}" for k, v in run.counts.items() if v))
    return {**run.counts, "skipped": 0}


async def run_retention(queue: Queue, settings: Settings, now: float | None = None, *,
                        force: bool = False) -> dict[str, int]:
    """:func:`retention_sync` on a thread, for the worker's event loop. Cheap when it is not
    due (a lock and one read), so a worker may call it every few minutes. Cancelled, the
    thread stops after its current batch (a shutdown does not wait for a whole run)."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(retention_sync, queue, settings, now, force=force,
                                       stop=stop)
    except asyncio.CancelledError:
        stop.set()
        raise


async def retention_loop(queue: Queue, settings: Settings,
                         check_every: float = CHECK_SECONDS) -> None:
    """For a worker process: run retention whenever it is due, until cancelled. Every
    worker of every node may run this loop; the lock and the shared last-run time make it
    one run per ``[retention] interval`` in all. Failures are logged, never raised: they
    must not stop delivery."""
    while True:
        try:
            await run_retention(queue, settings)
        except (PostroomError, SQLAlchemyError) as err:
            log.error("retention run failed: %s", err)
        except Exception:
            log.exception("retention run crashed")
        await asyncio.sleep(min(check_every, settings.retention.interval))
