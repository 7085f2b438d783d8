"""Queue and worker unit tests on a temporary SQLite store, with a fake clock and the
in-memory transport. No network, no subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from queue_helpers import T0, FakeClock, envelope, run
from sqlalchemy import Engine, event, select

from postroom.envelope import Envelope
from postroom.exceptions import DeliveryError, StoreError
from postroom.queue.backoff import backoff
from postroom.queue.lease import Claimed
from postroom.queue.sql import Queue
from postroom.queue.worker import Worker, decide
from postroom.settings import DeliverySettings
from postroom.store.db import make_engine, migrate
from postroom.store.log import LogFilter
from postroom.store.schema import events
from postroom.transports import base, memory

T = TypeVar("T")
CONN = "mem"


@pytest.fixture(autouse=True)
def _clean_memory_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    # The memory transport keeps its outboxes and rejections on the class: isolate each test.
    monkeypatch.setattr(memory.Transport, "outboxes", {})
    monkeypatch.setattr(memory.Transport, "rejections", {})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


def cfg(**kw: Any) -> DeliverySettings:
    return DeliverySettings(**kw)  # defaults: min_backoff 300, max_backoff 4000 (Postfix)


def mem_transport(name: str = CONN) -> memory.Transport:
    return memory.Transport(memory.Settings(name=name), base.TransportContext(ehlo_name="test"))


def make_worker(queue: Queue, clock: FakeClock, transport: base.Transport | None = None,
                **delivery: Any) -> Worker:
    t = transport or mem_transport()
    return Worker(queue, {t.name: t}, cfg(**delivery), default_connection=t.name,
                  owner="worker-test", clock=clock)


def row(db_path: Path, msg_id: str) -> sqlite3.Row | None:
    """Read a message row through a separate, plain sqlite3 connection."""
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM messages WHERE id = ?", (msg_id,)).fetchone()
    finally:
        con.close()


async def attempt_once(queue: Queue, worker: Worker, lease: float = 600) -> list[dict[str, Any]]:
    """Claim whatever is due and deliver it once; returns the attempt rows."""
    claimed = await queue.claim("worker-test", 100, lease)
    return [a for m in claimed for a in await worker.deliver(m)]


# -- enqueue ------------------------------------------------------------------------------------
def test_enqueue_is_durable_when_it_returns(queue: Queue, db_path: Path) -> None:
    async def go() -> str:
        msg_id = await queue.enqueue(envelope("bob@example.test"))
        # Committed: a different connection (another process, in effect) sees the row now.
        r = row(db_path, msg_id)
        assert r is not None
        assert r["status"] == "queued"
        assert r["attempt_count"] == 0
        assert r["next_attempt_at"] == T0
        assert r["expires_at"] == T0 + 5 * 86400
        assert r["subject"] == "hello"
        assert b"\r\nFrom: app@example.org\r\n" in b"\r\n" + r["raw"]
        return msg_id

    run(queue, go)


@pytest.mark.sqlite_only
def test_sqlite_is_wal_with_full_fsync(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_concurrent_enqueues_are_group_committed(queue: Queue, engine: Engine,
                                                 db_path: Path) -> None:
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))

    async def go() -> list[str]:
        envs = [envelope(f"user{i}@example.test", subject=f"m{i}") for i in range(200)]
        return list(await asyncio.gather(*(queue.enqueue(e) for e in envs)))

    ids = run(queue, go)
    assert len(set(ids)) == 200
    con = sqlite3.connect(db_path)
    try:
        stored = {r[0] for r in con.execute("SELECT id FROM messages")}
    finally:
        con.close()
    assert stored == set(ids)
    print(f"200 concurrent enqueues -> {len(commits)} commit(s)")
    assert 1 <= len(commits) <= 10, f"{len(commits)} commits for 200 enqueues: not grouped"


def test_one_bad_row_does_not_fail_its_neighbours(queue: Queue, db_path: Path) -> None:
    async def go() -> list[Any]:
        first = envelope("a@example.test")
        await queue.enqueue(first)
        dupe = envelope("b@example.test")
        dupe.id = first.id  # primary-key clash
        others = [envelope(f"c{i}@example.test") for i in range(5)]
        return list(await asyncio.gather(*(queue.enqueue(e) for e in [*others, dupe]),
                                         return_exceptions=True))

    results = run(queue, go)
    assert isinstance(results[-1], StoreError)
    assert all(isinstance(r, str) for r in results[:-1])
    for msg_id in results[:-1]:
        assert row(db_path, msg_id) is not None


# -- claim / lease / finish / release ------------------------------------------------------------
def test_claim_leases_and_reclaims_after_expiry(queue: Queue, clock: FakeClock) -> None:
    async def go() -> None:
        msg_id = await queue.enqueue(envelope("bob@example.test"))
        first = await queue.claim("w1", 10, lease=60)
        assert [m.id for m in first] == [msg_id]
        assert first[0].pending == ["bob@example.test"]
        assert await queue.claim("w2", 10, lease=60) == []  # leased
        clock.advance(59)
        assert await queue.claim("w2", 10, lease=60) == []  # still leased
        clock.advance(2)  # lease over: the first worker is presumed dead
        second = await queue.claim("w2", 10, lease=60)
        assert [m.id for m in second] == [msg_id]
        assert second[0].token != first[0].token
        # The log says that the next delivery may be a duplicate.
        with queue.engine.connect() as conn:
            found = conn.execute(select(events.c.kind, events.c.message_id,
                                        events.c.detail)).all()
        assert [(k, m) for k, m, _ in found] == [("lease_expired", msg_id)]
        assert "duplicate" in found[0][2]
        attempt = {"connection": CONN, "started_at": clock(), "ended_at": clock(),
                   "outcome": "sent", "recipients": {}, "transcript": "", "permanent": False}
        # The first worker comes back too late: its result is not applied.
        assert await queue.finish(first[0], status="sent", next_attempt_at=clock(),
                                  last_error=None, attempts=[attempt]) is False
        assert queue.log.get(msg_id)["status"] == "sending"  # type: ignore[index]
        assert await queue.finish(second[0], status="sent", next_attempt_at=clock(),
                                  last_error=None, attempts=[attempt]) is True
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "sent"
        assert m["lease_owner"] is None
        assert m["attempt_count"] == 1

    run(queue, go)


def test_claim_respects_limit_and_due_time(queue: Queue, clock: FakeClock) -> None:
    async def go() -> None:
        ids = [await queue.enqueue(envelope(f"u{i}@example.test")) for i in range(5)]
        got = await queue.claim("w", 3, lease=60)
        assert len(got) == 3
        rest = await queue.claim("w", 10, lease=60)
        assert {m.id for m in got + rest} == set(ids)
        assert await queue.claim("w", 10, lease=60) == []

    run(queue, go)


def test_claim_only_one_message(queue: Queue) -> None:
    async def go() -> None:
        a = await queue.enqueue(envelope("a@example.test"))
        b = await queue.enqueue(envelope("b@example.test"))
        got = await queue.claim("w", 10, lease=60, only=b)
        assert [m.id for m in got] == [b]
        assert await queue.claim("w", 10, lease=60, only=b) == []  # already leased
        assert [m.id for m in await queue.claim("w", 10, lease=60)] == [a]

    run(queue, go)


def test_enqueue_with_hold_is_left_to_the_caller(queue: Queue, clock: FakeClock) -> None:
    """`send --now` enqueues with a hold: workers leave it alone; claim(only=) takes it."""
    msg_id = queue.enqueue_sync(envelope("a@example.test"), hold=60)

    async def go() -> None:
        assert await queue.claim("worker", 10, lease=60) == []
        assert [m.id for m in await queue.claim("cli", 1, lease=60, only=msg_id)] == [msg_id]

    run(queue, go)
    other = queue.enqueue_sync(envelope("b@example.test"), hold=60)
    clock.advance(60)  # the caller died before claiming: a worker delivers it after the hold

    async def later() -> None:
        assert [m.id for m in await queue.claim("worker", 10, lease=60)] == [other]

    asyncio.run(later())


def test_release_puts_messages_back(queue: Queue, clock: FakeClock) -> None:
    async def go() -> None:
        msg_id = await queue.enqueue(envelope("bob@example.test"))
        claimed = await queue.claim("w1", 10, lease=600)
        await queue.release(claimed)
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "queued"  # never attempted: back to queued
        assert m["lease_owner"] is None and m["lease_until"] is None
        again = await queue.claim("w2", 10, lease=600)  # due at once, no lease wait
        assert [c.id for c in again] == [msg_id]

    run(queue, go)


def test_release_of_a_retried_message_keeps_it_deferred(queue: Queue, clock: FakeClock) -> None:
    memory.Transport.rejections["bob@example.test"] = (451, "4.3.0 try later")
    worker = make_worker(queue, clock)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("bob@example.test"))
        await attempt_once(queue, worker)
        clock.advance(300)
        claimed = await queue.claim("w", 10, lease=600)
        await queue.release(claimed)
        m = queue.log.get(msg_id)
        assert m is not None
        assert (m["status"], m["attempt_count"], m["next_attempt_at"]) == ("deferred", 1, clock())

    run(queue, go)


def test_release_ignores_a_lost_lease(queue: Queue, clock: FakeClock) -> None:
    async def go() -> None:
        msg_id = await queue.enqueue(envelope("bob@example.test"))
        old = await queue.claim("w1", 10, lease=10)
        clock.advance(11)
        new = await queue.claim("w2", 10, lease=600)
        await queue.release(old)  # must not take the message away from w2
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "sending"
        assert m["lease_owner"] == new[0].token

    run(queue, go)


# -- decide() -----------------------------------------------------------------------------------
def claimed(*rcpts: str, attempt_count: int = 0, expires_at: float = T0 + 86400) -> Claimed:
    return Claimed(id="m1", token="t", sender="s@example.org", recipients=list(rcpts),
                   rcpt_status={r: {"state": "pending"} for r in rcpts}, raw=b"",
                   connection=None, attempt_count=attempt_count, expires_at=expires_at)


R = base.RecipientResult


def test_decide_all_accepted_is_sent() -> None:
    msg = claimed("a@x.test", "b@x.test")
    d = decide(msg, {"a@x.test": R(250, "ok"), "b@x.test": R(250, "ok")}, T0, cfg())
    assert (d.status, d.outcome, d.last_error) == ("sent", "sent", None)
    assert {v["state"] for v in msg.rcpt_status.values()} == {"sent"}


def test_decide_5xx_and_250_is_partial() -> None:
    msg = claimed("a@x.test", "b@x.test")
    d = decide(msg, {"a@x.test": R(250, "ok"), "b@x.test": R(550, "5.1.1 no such user")}, T0,
               cfg())
    assert d.status == "partial"
    assert msg.rcpt_status["a@x.test"]["state"] == "sent"
    assert msg.rcpt_status["b@x.test"] == {"state": "failed", "code": 550,
                                           "reply": "5.1.1 no such user"}
    assert d.last_error is not None and "b@x.test: 550" in d.last_error
    assert msg.pending == []


def test_decide_all_5xx_is_failed() -> None:
    msg = claimed("a@x.test")
    d = decide(msg, {"a@x.test": R(554, "5.7.1 rejected")}, T0, cfg())
    assert d.status == "failed"


def test_decide_4xx_defers_with_postfix_backoff() -> None:
    waits = []
    for n in range(8):
        msg = claimed("a@x.test", attempt_count=n, expires_at=T0 + 10 * 86400)
        d = decide(msg, {"a@x.test": R(451, "4.3.0 later")}, T0, cfg())
        assert d.status == "deferred"
        waits.append(d.next_attempt_at - T0)
    assert waits == [300, 600, 1200, 2400, 4000, 4000, 4000, 4000]
    assert [backoff(n, 300, 4000) for n in range(0, 6)] == [0, 300, 600, 1200, 2400, 4000]
    assert backoff(10_000, 300, 4000) == 4000  # no overflow on huge attempt counts


def test_decide_expiry_fails_what_is_left() -> None:
    msg = claimed("a@x.test", "b@x.test", attempt_count=3, expires_at=T0 + 100)
    d = decide(msg, {"a@x.test": R(250, "ok"), "b@x.test": R(421, "4.4.2 timeout")}, T0, cfg())
    assert d.status == "partial"
    assert d.last_error is not None and d.last_error.startswith("expired after 4 attempts")
    assert msg.rcpt_status["b@x.test"]["state"] == "failed"
    assert "maximum lifetime" in msg.rcpt_status["b@x.test"]["reply"]


# -- the worker with the memory transport ----------------------------------------------------------
def test_worker_delivers_everything(queue: Queue, clock: FakeClock) -> None:
    worker = make_worker(queue, clock)

    async def go() -> None:
        ids = [await queue.enqueue(envelope(f"u{i}@example.test", subject=f"s{i}"))
               for i in range(30)]
        attempts = await attempt_once(queue, worker)
        assert [a["outcome"] for a in attempts] == ["sent"] * 30
        for msg_id in ids:
            m = queue.log.get(msg_id)
            assert m is not None
            assert m["status"] == "sent"
            assert m["attempt_count"] == 1
            assert len(m["attempts"]) == 1
            assert m["attempts"][0]["connection"] == CONN
        outbox = memory.Transport.outboxes[CONN]
        assert sorted(e.id for e in outbox) == sorted(ids)

    run(queue, go)


def test_worker_run_loop_and_stop(queue: Queue) -> None:
    worker = Worker(queue, {CONN: mem_transport()}, cfg(poll_interval=0.05), CONN)

    async def go() -> None:
        ids = [await queue.enqueue(envelope(f"u{i}@example.test")) for i in range(120)]
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(20):
                while queue.log.counts().get("sent", 0) < len(ids):
                    await asyncio.sleep(0.05)
        finally:
            await worker.stop(grace=5)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert queue.log.counts() == {"sent": 120}
        assert len(memory.Transport.outboxes[CONN]) == 120  # each exactly once

    run(queue, go)


def test_partial_delivery_is_final_and_sends_only_to_accepted(queue: Queue,
                                                              clock: FakeClock) -> None:
    memory.Transport.rejections["bad@example.test"] = (550, "5.1.1 no such user")
    worker = make_worker(queue, clock)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("good@example.test", "bad@example.test"))
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "partial"
        assert attempt["recipients"]["bad@example.test"]["code"] == 550
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "partial"
        assert m["rcpt_status"]["good@example.test"]["state"] == "sent"
        assert m["rcpt_status"]["bad@example.test"]["state"] == "failed"
        [env] = memory.Transport.outboxes[CONN]
        assert env.recipients == ["good@example.test"]
        clock.advance(10 * 86400)  # final: never claimed again
        assert await queue.claim("w", 10, lease=60) == []

    run(queue, go)


def test_deferred_retries_only_the_pending_recipient_with_backoff(queue: Queue,
                                                                   clock: FakeClock) -> None:
    memory.Transport.rejections["slow@example.test"] = (451, "4.2.0 mailbox busy")
    worker = make_worker(queue, clock)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("fast@example.test", "slow@example.test"))
        waits = []
        for _ in range(6):
            [attempt] = await attempt_once(queue, worker)
            assert attempt["outcome"] == "deferred"
            m = queue.log.get(msg_id)
            assert m is not None
            assert m["status"] == "deferred"
            assert m["last_error"] == "slow@example.test: 451 4.2.0 mailbox busy"
            waits.append(m["next_attempt_at"] - clock())
            clock.advance(waits[-1] - 1)
            assert await queue.claim("w", 10, lease=60) == []  # not due before its time
            clock.advance(1)
        assert waits == [300, 600, 1200, 2400, 4000, 4000]
        outbox = memory.Transport.outboxes[CONN]
        assert [e.recipients for e in outbox] == [["fast@example.test"]]  # fast got it once

        del memory.Transport.rejections["slow@example.test"]
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "sent"
        assert list(attempt["recipients"]) == ["slow@example.test"]  # only the pending one
        assert [e.recipients for e in outbox] == [["fast@example.test"], ["slow@example.test"]]
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "sent"
        assert m["attempt_count"] == 7
        assert [a["outcome"] for a in m["attempts"]] == ["deferred"] * 6 + ["sent"]

    run(queue, go)


def test_lifetime_expiry_fails_with_expired(engine: Engine, clock: FakeClock) -> None:
    queue = Queue(engine, lifetime=1000, clock=clock)
    memory.Transport.rejections["bob@example.test"] = (451, "4.3.0 later")
    worker = make_worker(queue, clock)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("bob@example.test"))
        outcomes = []
        for _ in range(5):
            attempts = await attempt_once(queue, worker)
            if not attempts:
                break
            outcomes.append(attempts[0]["outcome"])
            m = queue.log.get(msg_id)
            assert m is not None
            clock.t = max(clock.t, m["next_attempt_at"])
        # t=0 -> retry at 300; t=300 -> at 900; t=900: 900+1200 > 1000 -> give up
        assert outcomes == ["deferred", "deferred", "failed"]
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "failed"
        assert "expired" in m["last_error"]
        assert "maximum lifetime" in m["rcpt_status"]["bob@example.test"]["reply"]

    run(queue, go)


class FailingTransport(base.Transport):
    """Raises a session-level error (connect refused, AUTH rejected, ...)."""

    def __init__(self, name: str, error: Callable[[], DeliveryError]) -> None:
        super().__init__(memory.Settings(name=name), base.TransportContext(ehlo_name="test"))
        self.error = error
        self.calls = 0

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        self.calls += 1
        raise self.error()


def test_session_error_transient_defers(queue: Queue, clock: FakeClock) -> None:
    t = FailingTransport(CONN, lambda: DeliveryError(
        "127.0.0.1:1 refused the connection", code="connect.refused", permanent=False))
    worker = make_worker(queue, clock, t)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("a@example.test", "b@example.test"))
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "deferred"
        assert attempt["error_code"] == "connect.refused"
        assert attempt["permanent"] is False
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "deferred"
        assert m["next_attempt_at"] == clock() + 300
        assert m["last_error"] == "connect.refused: 127.0.0.1:1 refused the connection"
        assert {v["state"] for v in m["rcpt_status"].values()} == {"pending"}
        assert {v["code"] for v in m["rcpt_status"].values()} == {451}

    run(queue, go)


def test_session_error_permanent_fails(queue: Queue, clock: FakeClock) -> None:
    # (A refused login is no such error: it holds the mail, tests/test_config_mistakes.py.)
    t = FailingTransport(CONN, lambda: DeliveryError(
        "MAIL FROM:<a@example.test>: 554 5.7.1 Sender address rejected: Access denied",
        code="sender.rejected", permanent=True, reply_code=554,
        reply_text="5.7.1 Sender address rejected: Access denied"))
    worker = make_worker(queue, clock, t)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("a@example.test"))
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "failed"
        assert attempt["permanent"] is True
        assert attempt["reply_code"] == 554
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "failed"
        assert m["rcpt_status"]["a@example.test"]["code"] == 554
        clock.advance(86400)
        assert await queue.claim("w", 10, lease=60) == []  # no retry

    run(queue, go)


def test_session_error_at_expiry_says_expired(engine: Engine, clock: FakeClock) -> None:
    queue = Queue(engine, lifetime=100, clock=clock)  # the first retry would be too late
    t = FailingTransport(CONN, lambda: DeliveryError("refused", code="connect.refused"))
    worker = make_worker(queue, clock, t)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("a@example.test"))
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "failed"
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "failed"
        assert "expired" in m["last_error"]
        assert "connect.refused" in m["last_error"]

    run(queue, go)


def test_unknown_connection_defers(queue: Queue, clock: FakeClock) -> None:
    worker = make_worker(queue, clock)

    async def go() -> None:
        env = envelope("a@example.test")
        env.connection = "nope"
        msg_id = await queue.enqueue(env)
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "deferred"
        assert attempt["error_code"] == "config.connection.unknown"
        assert queue.log.get(msg_id)["status"] == "deferred"  # type: ignore[index]

    run(queue, go)


def test_crashing_transport_defers_not_loses(queue: Queue, clock: FakeClock) -> None:
    class Broken(base.Transport):
        async def send(self, envelope: Envelope) -> base.DeliveryResult:
            raise ZeroDivisionError("bug")

    t = Broken(memory.Settings(name=CONN), base.TransportContext(ehlo_name="test"))
    worker = make_worker(queue, clock, t)

    async def go() -> None:
        msg_id = await queue.enqueue(envelope("a@example.test"))
        [attempt] = await attempt_once(queue, worker)
        assert attempt["outcome"] == "deferred"
        assert attempt["error_code"] == "internal"
        assert queue.log.get(msg_id)["status"] == "deferred"  # type: ignore[index]

    run(queue, go)


class BlockingTransport(base.Transport):
    """Never finishes a send: for graceful-shutdown tests."""

    def __init__(self, name: str) -> None:
        super().__init__(memory.Settings(name=name), base.TransportContext(ehlo_name="test"))
        self.started = asyncio.Event()

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_worker_stop_hands_in_flight_messages_back(queue: Queue) -> None:
    async def go() -> None:
        t = BlockingTransport(CONN)
        worker = Worker(queue, {CONN: t}, cfg(poll_interval=0.05), CONN)
        msg_id = await queue.enqueue(envelope("a@example.test"))
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(t.started.wait(), 10)
        assert queue.log.get(msg_id)["status"] == "sending"  # type: ignore[index]
        await asyncio.wait_for(worker.stop(grace=0.2), 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] == "queued"
        assert m["lease_owner"] is None

    run(queue, go)


def test_worker_stop_during_a_claim_strands_nothing(queue: Queue) -> None:
    """stop() while run() awaits a claim (then `serve` cancels run()): what that claim
    leased must still be delivered or handed back, not left 'sending' until the lease ends."""

    async def go() -> None:
        worker = Worker(queue, {CONN: mem_transport()}, cfg(poll_interval=0.05), CONN)
        msg_id = await queue.enqueue(envelope("a@example.test"))
        real_claim = queue.claim
        claiming = asyncio.Event()

        async def slow_claim(*a: Any, **kw: Any) -> list[Claimed]:
            got = await real_claim(*a, **kw)
            if got:  # the rows are leased in the database; the caller has not seen them yet
                claiming.set()
                await asyncio.sleep(0.3)
            return got

        queue.claim = slow_claim  # type: ignore[method-assign]
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(claiming.wait(), 10)
        await asyncio.wait_for(worker.stop(grace=5), 10)
        task.cancel()  # what `postroom serve` does after stop()
        await asyncio.gather(task, return_exceptions=True)
        m = queue.log.get(msg_id)
        assert m is not None
        assert m["status"] in ("sent", "queued"), m["status"]
        assert m["lease_owner"] is None

    run(queue, go)


# -- the log: search, get, resend -----------------------------------------------------------------
def test_resend_creates_a_new_message(queue: Queue, clock: FakeClock) -> None:
    worker = make_worker(queue, clock)

    async def go() -> str:
        msg_id = await queue.enqueue(envelope("a@example.test", subject="receipt"))
        await attempt_once(queue, worker)
        return msg_id

    orig_id = run(queue, go)
    copy_id = queue.resend_sync(orig_id[:8], to=["other@example.test"])
    same_id = queue.resend_sync(orig_id)
    orig, copy, same = queue.log.get(orig_id), queue.log.get(copy_id), queue.log.get(same_id)
    assert orig is not None and copy is not None and same is not None
    assert len({orig_id, copy_id, same_id}) == 3
    assert orig["status"] == "sent" and len(orig["attempts"]) == 1
    assert copy["status"] == "queued" and copy["attempts"] == []
    assert copy["recipients"] == ["other@example.test"]
    assert same["recipients"] == ["a@example.test"]
    assert copy["raw"] == orig["raw"]
    assert copy["source"] == f"resend:{orig_id}"
    assert copy["subject"] == "receipt"
    with pytest.raises(Exception, match="no message"):
        queue.resend_sync("doesnotexist")


def test_get_by_prefix(queue: Queue) -> None:
    msg_id = queue.enqueue_sync(envelope("a@example.test"))
    m = queue.log.get(msg_id[:6])
    assert m is not None and m["id"] == msg_id
    assert queue.log.get(msg_id[:5]) is None  # too short to be a prefix
    assert queue.log.get("0" * 32) is None


def test_search_filters(queue: Queue, clock: FakeClock) -> None:
    memory.Transport.rejections["nobody@example.test"] = (550, "5.1.1 unknown")
    worker = make_worker(queue, clock)

    async def go() -> dict[str, str]:
        ids = {}
        ids["old"] = await queue.enqueue(
            envelope("alice@example.test", sender="billing@shop.example", subject="old"))
        clock.advance(3600)
        ids["fail"] = await queue.enqueue(
            envelope("nobody@example.test", sender="alerts@ops.example", subject="fail"))
        clock.advance(60)
        ids["new"] = await queue.enqueue(
            envelope("Carol@Example.test", sender="billing@shop.example", subject="new"))
        await attempt_once(queue, worker)
        return ids

    ids = run(queue, go)

    def found(limit: int = 50, **kw: Any) -> list[str]:
        return [r["id"] for r in queue.log.page(LogFilter(**kw), limit=limit)]

    assert found() == [ids["new"], ids["fail"], ids["old"]]  # newest first
    assert found(status="failed") == [ids["fail"]]
    assert found(status="sent") == [ids["new"], ids["old"]]
    assert found(status="queued") == []
    assert found(to="alice") == [ids["old"]]
    assert found(to="carol@example.test") == [ids["new"]]  # case-insensitive
    assert found(to="nobody@") == [ids["fail"]]
    assert found(sender="billing@") == [ids["new"], ids["old"]]
    assert found(sender="OPS.example") == [ids["fail"]]
    assert found(since=T0 + 1800) == [ids["new"], ids["fail"]]
    assert found(since=T0 + 1800, sender="billing") == [ids["new"]]
    assert found(limit=1) == [ids["new"]]
    rows = queue.log.page(LogFilter(status="failed"))
    assert "raw" not in rows[0]
    assert rows[0]["last_error"] == "nobody@example.test: 550 5.1.1 unknown"
    assert queue.log.counts() == {"sent": 2, "failed": 1}


def test_leases_of_dead_local_workers_are_taken_back(tmp_path: Path) -> None:
    """After kill -9 the restarted server must not wait lease_seconds for that mail."""
    import subprocess
    import sys

    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    migrate(engine)
    q = Queue(engine)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)

    async def go() -> tuple[int, int]:
        a = await q.enqueue(Envelope("a@x.test", ["b@y.test"], b"Subject: a\r\n\r\nx\r\n"))
        b = await q.enqueue(Envelope("a@x.test", ["b@y.test"], b"Subject: b\r\n\r\nx\r\n"))
        host = socket.gethostname()[:40]
        assert len(await q.claim(f"{host}:{dead_pid}", 1, 600)) == 1  # leased by a dead pid
        assert len(await q.claim(f"{host}:{os.getpid()}", 1, 600)) == 1  # by a live one (us)
        n = await q.reclaim_dead_local()
        again = await q.claim("other:1", 10, 600)
        await q.writer.aclose()
        assert {m.id for m in again} <= {a, b}
        return n, len(again)

    assert asyncio.run(go()) == (1, 1)


# -- SQLite: one writer at a time across processes, and claims that use the indexes ----------
def test_writers_of_one_sqlite_file_wait_on_the_shared_write_lock(queue: Queue,
                                                                 db_path: Path) -> None:
    """`postroom serve` and `postroom worker` share the file: a writer blocks on the lock
    file (woken as soon as it is free) instead of sleeping in SQLite's busy handler."""
    import threading

    from postroom.store.db import WriteLock

    lock_path = Path(f"{db_path}.lock")
    other = WriteLock(lock_path)  # its own file descriptor, as another process would have
    done = threading.Event()
    with other:
        t = threading.Thread(target=lambda: (queue.enqueue_sync(envelope("a@example.com")),
                                             done.set()))
        t.start()
        assert not done.wait(0.3), "a write went ahead while another writer held the lock"
    assert done.wait(10)
    t.join(10)
    assert os.stat(lock_path).st_mode & 0o777 == 0o600
    assert queue.log.counts() == {"queued": 1}


@pytest.mark.sqlite_only
def test_claim_statements_use_the_indexes(queue: Queue, engine: Engine) -> None:
    """The claim's cost must not grow with the backlog (25.9 ms per claim at 20k queued
    before): the due scans walk the status index, the UPDATE looks ids up by primary key.
    Every statement a real claim runs is captured and EXPLAINed."""
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    for i in range(3):
        queue.enqueue_sync(envelope(f"r{i}@example.com"))
    event.listen(engine, "before_cursor_execute", capture)
    try:
        claimed = run(queue, lambda: queue.claim("w", 2, 600))
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(claimed) == 2
    plans = []
    con = sqlite3.connect(engine.url.database or "")
    try:
        for statement, params in seen:
            rows = con.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
            plans.append((statement.split()[0], " / ".join(r[-1] for r in rows)))
    finally:
        con.close()
    # expire leases; (queued, deferred) x (high, normal) until 2 are found; the claim itself
    assert [kind for kind, _ in plans] == ["UPDATE"] + ["SELECT"] * 4 + ["UPDATE"]
    for kind, p in plans:
        assert "TEMP B-TREE" not in p and "SCAN messages" not in p, (kind, p)
    # expiring leases walks the 'sending' rows of either index that starts with status
    assert re.search(r"USING INDEX ix_messages_(due|status_created) \(status=", plans[0][1])
    assert all("USING INDEX ix_messages_due" in p for _, p in plans[1:-1]), plans
    assert "PRIMARY KEY" in plans[-1][1] or "autoindex_messages_1" in plans[-1][1], plans[-1]


# -- idempotency, scheduling, search, heartbeats ----------------------------------------------
def test_idempotency_key_returns_the_first_message(queue: Queue) -> None:
    from postroom.queue.sql import IdempotencyKey

    key = IdempotencyKey("shop", "order-42", "hash-a")

    async def go() -> list[str]:
        # Concurrent requests with one key land in one group commit: still one message.
        envs = [envelope("a@example.com") for _ in range(5)]
        return list(await asyncio.gather(*(queue.enqueue(e, idempotency=key) for e in envs)))

    ids = run(queue, go)
    assert len(set(ids)) == 1
    assert queue.log.counts() == {"queued": 1}
    assert queue.enqueue_sync(envelope("a@example.com"), idempotency=key) == ids[0]
    other_app = IdempotencyKey("crm", "order-42", "hash-a")  # keys are per app
    assert queue.enqueue_sync(envelope("a@example.com"), idempotency=other_app) != ids[0]
    with pytest.raises(Exception) as exc:
        queue.enqueue_sync(envelope("b@example.com"),
                           idempotency=IdempotencyKey("shop", "order-42", "hash-b"))
    assert getattr(exc.value, "code", "") == "idempotency.conflict"
    assert queue.log.counts() == {"queued": 2}


def test_scheduled_message_is_not_claimed_before_its_time(queue: Queue, clock: FakeClock) -> None:
    env = envelope("a@example.com")
    env.not_before = T0 + 3600
    queue.enqueue_sync(env)
    assert run(queue, lambda: queue.claim("w", 10, 600)) == []
    clock.advance(3600)
    assert [m.id for m in run(queue, lambda: queue.claim("w", 10, 600))] == [env.id]


def test_search_by_text_tag_and_cursor(queue: Queue, clock: FakeClock) -> None:
    ids = []
    for i in range(5):  # same created_at for all: the cursor must break ties by id
        env = envelope(f"r{i}@example.com", subject=f"Invoice 100% #{i}")
        env.tags = ["billing"] if i % 2 == 0 else ["news"]
        env.metadata = {"order": str(i)}
        ids.append(queue.enqueue_sync(env))
    assert len(queue.log.page(LogFilter(text="invoice 100%"))) == 5
    assert len(queue.log.page(LogFilter(text="invoice 1_0"))) == 0  # '_' is literal, not a wildcard
    assert {r["id"] for r in queue.log.page(LogFilter(tag="billing"))} == {ids[0], ids[2], ids[4]}
    pages, before = [], None
    while True:
        page = queue.log.page(LogFilter(), limit=2, before=before)
        if not page:
            break
        pages.append([r["id"] for r in page])
        before = (page[-1]["created_at"], page[-1]["id"])
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(i for p in pages for i in p) == sorted(ids)
    assert queue.log.page(LogFilter(to="r3@"))[0]["meta"] == {"order": "3"}


def test_worker_heartbeat_is_recorded_and_removed_on_stop(queue: Queue) -> None:
    w = Worker(queue, {CONN: mem_transport()}, cfg(poll_interval=0.05), default_connection=CONN,
               owner="beat-test")

    async def go() -> tuple[list[str], list[str]]:
        task = asyncio.create_task(w.run())
        for _ in range(100):
            if queue.workers_seen(0):
                break
            await asyncio.sleep(0.02)
        alive = [r["id"] for r in queue.workers_seen(0)]
        await w.stop(1)
        await task
        return alive, [r["id"] for r in queue.workers_seen(0)]

    assert run(queue, go) == (["beat-test"], [])


class SlowTransport(base.Transport):
    """Takes ``delay`` seconds per send and counts the sends: for lease tests."""

    def __init__(self, name: str, delay: float) -> None:
        super().__init__(memory.Settings(name=name), base.TransportContext(ehlo_name="test"))
        self.delay = delay
        self.sent: list[str] = []

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        await asyncio.sleep(self.delay)
        self.sent.append(envelope.id)
        return base.DeliveryResult({r: base.RecipientResult(250, "2.0.0 ok")
                                    for r in envelope.recipients})


async def stop_when_sent(queue: Queue, n: int,
                         running: list[tuple[Worker, asyncio.Task[None]]],
                         timeout: float) -> None:
    """Wait until ``n`` messages are sent, then stop the running workers (always)."""
    try:
        async with asyncio.timeout(timeout):
            while queue.log.counts().get("sent", 0) < n:
                await asyncio.sleep(0.05)
    finally:
        for w, t in running:
            await w.stop(grace=5)
            t.cancel()
        await asyncio.gather(*(t for _, t in running), return_exceptions=True)


def test_a_live_worker_renews_its_leases(engine: Engine) -> None:
    """Mail still in a worker (a slow upstream, a queue for sessions) keeps its lease: a
    second worker polling all the while never takes it, nor does the first take it again,
    and the result is recorded. (Real time: leases run out on the queue's clock.)"""
    queue = Queue(engine)

    async def go() -> None:
        slow, other = SlowTransport(CONN, 2.5), SlowTransport(CONN, 0)
        delivery = {"lease_seconds": 0.8, "poll_interval": 0.05}
        first = Worker(queue, {CONN: slow}, cfg(**delivery), CONN, owner="host:1")
        msg_id = await queue.enqueue(envelope("a@example.test"))
        t1 = asyncio.create_task(first.run())
        async with asyncio.timeout(10):
            while not first._inflight:
                await asyncio.sleep(0.01)
        second = Worker(queue, {CONN: other}, cfg(**delivery), CONN, owner="host:2")
        await stop_when_sent(queue, 1, [(first, t1), (second, asyncio.create_task(second.run()))],
                             timeout=15)
        assert slow.sent == [msg_id] and other.sent == []  # 3 leases long, sent once
        m = queue.log.get(msg_id)
        assert m is not None and m["status"] == "sent" and len(m["attempts"]) == 1

    run(queue, go)


def test_big_bodies_are_read_when_their_delivery_starts(queue: Queue) -> None:
    """A claim leaves bodies over BODY_WITH_CLAIM in the database (a worker holds up to
    `concurrency` claimed messages); the worker reads each when it delivers it, byte-exact."""
    from postroom.queue.lease import BODY_WITH_CLAIM

    big = (b"From: a@example.org\r\nTo: b@example.test\r\nSubject: big\r\n\r\n"
           + b"0123456789abcdef" * (BODY_WITH_CLAIM // 16 + 1) + b"\r\n")

    async def go() -> None:
        small_id = await queue.enqueue(envelope("s@example.test"))
        big_id = await queue.enqueue(Envelope("a@example.org", ["b@example.test"], big))
        claimed = {m.id: m for m in await queue.claim("w", 10, lease=60)}
        assert claimed[small_id].raw and not claimed[small_id].body_later
        assert claimed[big_id].raw == b"" and claimed[big_id].body_later
        await queue.release(list(claimed.values()))
        worker = Worker(queue, {CONN: mem_transport()}, cfg(poll_interval=0.05), CONN)
        await stop_when_sent(queue, 2, [(worker, asyncio.create_task(worker.run()))], timeout=10)
        sent = {env.id: env.raw for env in memory.Transport.outboxes[CONN]}
        assert sent[big_id] == big

    run(queue, go)


def test_migrations_build_exactly_the_declared_schema(engine: Engine) -> None:
    """What Alembic's migrations build (the engine fixture migrates) is store/schema.py:
    tables, columns, indexes (e.g. 0005 dropped the unused search indexes from both)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from postroom.store.schema import metadata

    def declared(name: str | None, kind: str, _parent: Any) -> bool:
        # The log's text search (migration 0008) is built for one database or the other:
        # SQLite's FTS5 virtual table (and its shadow tables), PostgreSQL's message_search
        # and its pg_trgm indexes (there only when the extension could be created).
        return not (kind == "table" and (name or "").startswith(("messages_fts",
                                                                  "message_search")))

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": declared})
        assert compare_metadata(context, metadata) == []


def _rollups(engine: Engine) -> dict[tuple[float, str, str, str], int]:
    """The log's rollups, checked against what counting the table says."""
    from sqlalchemy import func, text

    from postroom.store.schema import ROLLUP_STATUSES, messages

    keys = (func.floor(messages.c.created_at / 3600) * 3600, messages.c.status,
            func.coalesce(messages.c.via, ""), func.coalesce(messages.c.app, ""))
    with engine.connect() as conn:
        want = {(float(h), s, c, a): int(n) for h, s, c, a, n in conn.execute(
            select(*keys, func.count()).where(messages.c.status.in_(ROLLUP_STATUSES))
            .group_by(*keys))}
        got = {(float(h), s, c, a): int(n) for h, s, c, a, n in conn.execute(text(
            "SELECT hour, status, connection, app, sum(count) FROM log_rollups "
            "GROUP BY hour, status, connection, app HAVING sum(count) <> 0"))}
    assert got == want
    return got


def test_a_batch_of_results_counts_each_finished_message_once(queue: Queue, engine: Engine,
                                                              clock: FakeClock) -> None:
    """A batch of results (one statement on PostgreSQL) counts each finished message once in
    the log's rollups, a forced copy's run moves its count to its new connection, and
    other writers are counted too."""
    from sqlalchemy import update

    from postroom.store.schema import messages

    for i in range(6):
        queue.enqueue_sync(envelope(f"r{i}@example.test"))

    def tried(via: str) -> dict[str, Any]:
        return {"connection": via, "started_at": clock.t, "ended_at": clock.t,
                "outcome": "sent", "reply_code": 250, "reply_text": "ok", "error_code": None,
                "permanent": False, "recipients": {}, "transcript": "", "provider_id": None}

    async def go() -> list[bool]:
        claimed = await queue.claim("host:1", 10, 60)
        fates = ["sent", "sent", "sent", "failed", "deferred", "partial"]
        done = list(await asyncio.gather(*(
            queue.finish(m, status=fate, next_attempt_at=clock.t + 300, last_error=None,
                         attempts=[tried("a")], copy_due=clock.t if fate == "partial" else None)
            for m, fate in zip(claimed, fates, strict=True))))
        copies = await queue.claim("host:1", 10, 60)  # the partial one's forced copies
        assert [m.status for m in copies] == ["partial"]
        done.append(await queue.finish(copies[0], status="sent", next_attempt_at=clock.t,
                                       last_error=None, attempts=[tried("b")]))
        return done

    assert run(queue, go) == [True] * 7
    counts = _rollups(engine)
    assert sorted((s, c, n) for (_, s, c, _), n in counts.items()) == [
        ("failed", "a", 1), ("partial", "b", 1), ("sent", "a", 3)]
    with engine.begin() as conn:  # another writer: the trigger
        conn.execute(update(messages).where(messages.c.status == "failed")
                     .values(status="sent"))
    assert sum(n for (_, s, _, _), n in _rollups(engine).items() if s == "sent") == 4
