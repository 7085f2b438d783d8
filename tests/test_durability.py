"""Durability and retries with a real `postroom serve` subprocess (tests/serve_proc.py).

- kill -9 while a client streams messages: nothing that got a 250 is lost (upstream: the real
  Postfix on its plain port, read back from its Maildir);
- retries against an upstream we control (an in-process aiosmtpd server on a free port):
  down then up, 550 at RCPT (no retry), 451 then 250;
- graceful shutdown (SIGTERM) with deliveries in flight against a slow upstream.

Every wait is bounded; every process and server started here is stopped in a finally.
"""

from __future__ import annotations

import asyncio
import collections
import json
import smtplib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from serve_proc import Postroom, free_port, smtp_connection

HOST = "127.0.0.1"
SENDER = "durability@example.org"
FAST = "min_backoff = 1\nmax_backoff = 2\npoll_interval = 0.2\n"
GRACE = 30.0  # Worker.stop()'s default, used by `postroom serve` on SIGTERM


connection = smtp_connection


def message(subject: str, to: str) -> bytes:
    m = EmailMessage()
    m["From"] = SENDER
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    m.set_content(f"{subject}\n")
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def submit(pr: Postroom, subject: str, to: str = "rcpt@example.test") -> str:
    """Hand one message to Postroom over SMTP; returns the queue id from the 250 reply."""
    with smtplib.SMTP(HOST, pr.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail(SENDER)
        code, reply = s.rcpt(to)
        assert code == 250, reply
        code, reply = s.data(message(subject, to))
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def db_row(db: Path, msg_id: str) -> dict[str, Any] | None:
    con = sqlite3.connect(db, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        r = con.execute("SELECT * FROM messages WHERE id = ?", (msg_id,)).fetchone()
        if r is None:
            return None
        row = dict(r)
        row["attempts"] = [dict(a) for a in con.execute(
            "SELECT * FROM attempts WHERE message_id = ? ORDER BY id", (msg_id,))]
        return row
    finally:
        con.close()


def wait_row(db: Path, msg_id: str, pred: Callable[[dict[str, Any]], bool],
             timeout: float = 20, what: str = "") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        last = db_row(db, msg_id)
        if last is not None and pred(last):
            return last
        time.sleep(0.05)
    summary = last and {k: last[k] for k in ("status", "attempt_count", "last_error")}
    raise AssertionError(f"message {msg_id}: not {what or 'as expected'} after {timeout}s; "
                         f"last seen {summary}")


def cli(pr: Postroom, *args: str) -> Any:
    """`postroom ARGS` for this instance, with stdout/stderr as text."""
    res = pr.cli(*args)
    res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    return res


def show_json(pr: Postroom, msg_id: str) -> dict[str, Any]:
    res = cli(pr, "show", msg_id, "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


# -- an upstream we control ------------------------------------------------------------------
class Upstream:
    """aiosmtpd handler. ``rcpt_reply(n)`` / ``data_reply(n)`` give the reply to the n-th
    RCPT / DATA (1-based; None = accept); ``data_delay`` seconds pass before DATA is answered."""

    def __init__(self, rcpt_reply: Callable[[int], str | None] = lambda n: None,
                 data_reply: Callable[[int], str | None] = lambda n: None,
                 data_delay: float = 0.0) -> None:
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.data_delay = data_delay
        self.rcpts: list[str] = []
        self.datas = 0
        self.accepted: list[bytes] = []
        self.data_started = threading.Event()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpts.append(address)
        reply = self.rcpt_reply(len(self.rcpts))
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.datas += 1
        n = self.datas
        self.data_started.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        reply = self.data_reply(n)
        if reply:
            return reply
        self.accepted.append(envelope.content)
        return "250 2.0.0 Ok: kept"

    def subjects(self) -> list[str]:
        out = []
        for raw in self.accepted:
            for line in raw.split(b"\r\n"):
                if line.lower().startswith(b"subject:"):
                    out.append(line.split(b":", 1)[1].strip().decode())
        return out


@contextmanager
def upstream(handler: Upstream, port: int) -> Iterator[Upstream]:
    ctl = Controller(handler, hostname=HOST, port=port, ready_timeout=10)
    ctl.start()
    try:
        yield handler
    finally:
        ctl.stop()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Callable[..., Postroom]]:
    """Make Postroom instances; every one is stopped (SIGTERM, then SIGKILL) at the end."""
    made: list[Postroom] = []

    def make(connections: str, delivery: str = FAST, **kw: Any) -> Postroom:
        pr = Postroom(tmp_path / f"pr{len(made)}", connections=connections, delivery=delivery,
                      **kw)
        made.append(pr)
        return pr

    yield make
    for pr in made:
        pr.stop()


# -- (a) kill -9 while a client streams messages --------------------------------------------------
def test_kill9_while_streaming_loses_no_accepted_message(peers: Any,
                                                        instance: Callable[..., Postroom]
                                                        ) -> None:
    run = uuid.uuid4().hex[:10]
    rcpt = f"dur-{run}@example.com"  # catch-all folder; peers.messages() filters on rcpt
    # lease_seconds: how long mail leased by the killed process waits before it is taken
    # again (default 600 s; a restarted `serve` does not reclaim its predecessor's leases).
    pr = instance(connection(peers.plain_port), delivery=FAST + "lease_seconds = 5\n")
    pr.start()

    acked: dict[str, str] = {}  # subject -> queue id, for every message that got 250
    failed: list[tuple[str, str]] = []  # (subject, error) for messages not acknowledged
    tried = 0
    first_ack = threading.Event()
    killed = threading.Event()

    def client() -> None:
        nonlocal tried
        for i in range(1, 100_000):
            if killed.is_set():
                return
            subject = f"dur-{run}-{i:06d}"
            tried += 1
            try:
                s = smtplib.SMTP(HOST, pr.smtp_port, timeout=10)
                try:
                    s.ehlo("client.test")
                    s.mail(SENDER)
                    s.rcpt(rcpt)
                    code, reply = s.data(message(subject, rcpt))
                    if code == 250:
                        acked[subject] = reply.decode().rsplit(" ", 1)[-1]
                        first_ack.set()
                    else:
                        failed.append((subject, f"{code} {reply!r}"))
                finally:
                    s.close()  # no QUIT: the next connection may already find the server dead
            except (OSError, smtplib.SMTPException) as err:
                failed.append((subject, repr(err)))
                if killed.is_set():
                    return
                time.sleep(0.01)

    thread = threading.Thread(target=client, name="durability-client", daemon=True)
    thread.start()
    try:
        assert first_ack.wait(20), f"no message accepted: {failed[:3]}"
        time.sleep(1.5)
        pr.kill9()
        killed.set()
    finally:
        killed.set()
        thread.join(30)
    assert not thread.is_alive()

    # State at the moment of the kill, as the killed process left it on disk.
    con = sqlite3.connect(pr.db, timeout=10)
    try:
        at_kill = dict(con.execute("SELECT status, count(*) FROM messages GROUP BY status"))
        stored = {r[0] for r in con.execute("SELECT id FROM messages")}
    finally:
        con.close()
    sending_at_kill = at_kill.get("sending", 0)
    lost_rows = [s for s, i in acked.items() if i not in stored]
    assert not lost_rows, f"acknowledged but not in the database after kill -9: {lost_rows[:5]}"

    pr.start()
    deadline = time.monotonic() + 90
    subjects: collections.Counter[str] = collections.Counter()
    while time.monotonic() < deadline:
        subjects = collections.Counter(str(m["Subject"]) for m in peers.messages(rcpt))
        if all(s in subjects for s in acked):
            break
        time.sleep(0.5)
    # Let the queue drain completely, so that late duplicates would show up too.
    drain_deadline = time.monotonic() + 30
    while time.monotonic() < drain_deadline:
        con = sqlite3.connect(pr.db, timeout=10)
        try:
            busy = con.execute("SELECT count(*) FROM messages WHERE status IN "
                               "('queued', 'sending', 'deferred')").fetchone()[0]
        finally:
            con.close()
        if busy == 0:
            break
        time.sleep(0.2)
    time.sleep(1)
    subjects = collections.Counter(str(m["Subject"]) for m in peers.messages(rcpt))

    lost = sorted(s for s in acked if s not in subjects)
    duplicates = {s: n for s, n in subjects.items() if n > 1}
    unacked_delivered = sorted(s for s in subjects if s not in acked)
    report = (
        f"DURABILITY: tried={tried} acked(250)={len(acked)} not_acked={len(failed)} "
        f"rows_at_kill={sum(at_kill.values())} status_at_kill={at_kill} "
        f"delivered_unique={len(subjects)} delivered_total={sum(subjects.values())} "
        f"lost={len(lost)} duplicates={len(duplicates)} (allowed <= sending_at_kill="
        f"{sending_at_kill}) delivered_without_250={len(unacked_delivered)}"
    )
    print(report)
    if duplicates:
        print(f"DURABILITY duplicates: {duplicates}")
    if unacked_delivered:
        print(f"DURABILITY delivered although the client saw no 250: {unacked_delivered}")
    assert not lost, f"{len(lost)} acknowledged message(s) never delivered: {lost[:10]}\n{report}"
    assert sum(duplicates.values()) - len(duplicates) <= sending_at_kill, report
    # Everything acknowledged is recorded as sent in the log.
    con = sqlite3.connect(pr.db, timeout=10)
    try:
        statuses = dict(con.execute("SELECT id, status FROM messages"))
    finally:
        con.close()
    assert {statuses[i] for i in acked.values()} == {"sent"}, report


# -- (b) upstream down, then up ------------------------------------------------------------------
def test_upstream_down_defers_then_delivers(instance: Callable[..., Postroom]) -> None:
    port = free_port()  # nothing listens here yet
    pr = instance(connection(port))
    pr.start()
    msg_id = submit(pr, "retry-after-refused")

    row = wait_row(pr.db, msg_id, lambda r: r["status"] == "deferred", what="deferred")
    first = row["attempts"][0]
    assert first["outcome"] == "deferred"
    assert first["error_code"] == "connect.refused"
    assert first["permanent"] == 0
    assert row["next_attempt_at"] > first["ended_at"]  # a later retry is planned
    assert row["last_error"].startswith("connect.refused:")

    log = cli(pr, "log", "--status", "deferred", "--json")
    assert log.returncode == 0, log.stderr
    assert msg_id in [json.loads(line)["id"] for line in log.stdout.splitlines()]
    shown = cli(pr, "show", msg_id)
    assert shown.returncode == 0, shown.stderr
    assert "deferred" in shown.stdout and "connect.refused" in shown.stdout

    # It keeps retrying (backoff 1 s, then 2 s) while the upstream is down.
    wait_row(pr.db, msg_id, lambda r: r["attempt_count"] >= 2, what="retried", timeout=10)

    sink = Upstream()
    with upstream(sink, port):
        row = wait_row(pr.db, msg_id, lambda r: r["status"] == "sent", what="sent", timeout=20)
    assert sink.subjects() == ["retry-after-refused"]
    outcomes = [a["outcome"] for a in row["attempts"]]
    assert outcomes[-1] == "sent" and set(outcomes[:-1]) == {"deferred"}, outcomes
    assert row["last_error"] is None
    assert show_json(pr, msg_id)["status"] == "sent"


# -- (c) 550 at RCPT: failed, never retried --------------------------------------------------
def test_rcpt_550_fails_without_retry(instance: Callable[..., Postroom]) -> None:
    port = free_port()
    sink = Upstream(rcpt_reply=lambda n: "550 5.1.1 <nobody@example.test>: User unknown")
    with upstream(sink, port):
        pr = instance(connection(port))
        pr.start()
        msg_id = submit(pr, "rcpt-550", to="nobody@example.test")
        row = wait_row(pr.db, msg_id, lambda r: r["status"] == "failed", what="failed")
        time.sleep(5)  # a few backoff periods (1-2 s): no further attempt may happen
        row = db_row(pr.db, msg_id)
    assert row is not None
    assert row["status"] == "failed"
    assert row["attempt_count"] == 1
    assert len(row["attempts"]) == 1
    assert sink.rcpts == ["nobody@example.test"]  # the upstream was asked once
    assert sink.datas == 0
    rcpt = json.loads(row["rcpt_status"])["nobody@example.test"]
    assert rcpt["state"] == "failed" and rcpt["code"] == 550
    assert "User unknown" in row["last_error"]
    failed = cli(pr, "log", "--status", "failed", "--json")
    assert [json.loads(line)["id"] for line in failed.stdout.splitlines()] == [msg_id]


# -- (d) 451 then 250 -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_451_then_250_defers_then_sends(instance: Callable[..., Postroom], stage: str) -> None:
    port = free_port()
    first_451 = lambda n: "451 4.3.0 Try again later" if n == 1 else None  # noqa: E731
    sink = Upstream(**{f"{stage}_reply": first_451})
    with upstream(sink, port):
        pr = instance(connection(port))
        pr.start()
        msg_id = submit(pr, f"451-at-{stage}")
        row = wait_row(pr.db, msg_id, lambda r: r["status"] == "sent", what="sent")
    outcomes = [(a["outcome"], a["permanent"]) for a in row["attempts"]]
    assert outcomes == [("deferred", 0), ("sent", 0)]
    first, second = row["attempts"]
    recipients = json.loads(first["recipients"])
    assert recipients["rcpt@example.test"]["code"] == 451
    assert recipients["rcpt@example.test"]["state"] == "pending"
    assert second["started_at"] >= first["ended_at"] + 0.9  # waited min_backoff (1 s)
    assert sink.subjects() == [f"451-at-{stage}"]  # delivered exactly once
    assert row["attempt_count"] == 2


# -- (e) graceful shutdown ------------------------------------------------------------------------
def test_sigterm_lets_a_slow_delivery_finish(instance: Callable[..., Postroom]) -> None:
    port = free_port()
    sink = Upstream(data_delay=3)
    with upstream(sink, port):
        pr = instance(connection(port))
        pr.start()
        msg_id = submit(pr, "slow-but-finishes")
        assert sink.data_started.wait(15), "the delivery never reached DATA"
        assert db_row(pr.db, msg_id)["status"] == "sending"  # type: ignore[index]
        t0 = time.monotonic()
        rc = pr.stop(timeout=GRACE + 10)
        elapsed = time.monotonic() - t0
    print(f"graceful stop with a 3 s delivery in flight: exit {rc} after {elapsed:.1f} s")
    assert rc == 0
    assert elapsed < GRACE
    row = db_row(pr.db, msg_id)
    assert row is not None
    assert row["status"] == "sent", row["status"]
    assert row["lease_owner"] is None
    assert sink.subjects() == ["slow-but-finishes"]


def test_sigterm_with_a_hung_upstream_exits_after_grace_and_requeues(
        instance: Callable[..., Postroom]) -> None:
    port = free_port()
    sink = Upstream(data_delay=GRACE + 30)  # answers long after the grace period
    with upstream(sink, port):
        pr = instance(connection(port, extra="timeout = 120\n"))
        pr.start()
        msg_id = submit(pr, "hung-upstream")
        assert sink.data_started.wait(15), "the delivery never reached DATA"
        t0 = time.monotonic()
        rc = pr.stop(timeout=GRACE + 20)
        elapsed = time.monotonic() - t0
        print(f"graceful stop with a hung delivery: exit {rc} after {elapsed:.1f} s")
        assert rc == 0
        assert elapsed < GRACE + 5, f"exit took {elapsed:.1f}s, grace is {GRACE}s"
        row = db_row(pr.db, msg_id)
        assert row is not None
        assert row["status"] == "queued", row["status"]  # handed back, due at once
        assert row["lease_owner"] is None
        assert sink.accepted == []

    # After a restart, with a healthy upstream, it is delivered.
    healthy = Upstream()
    with upstream(healthy, port):
        pr.start()
        wait_row(pr.db, msg_id, lambda r: r["status"] == "sent", what="sent")
    assert healthy.subjects() == ["hung-upstream"]
