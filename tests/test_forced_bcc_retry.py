"""Forced Bcc copies are retried on their own (issue 19, point 1), through a real
`postroom serve` whose connection's message policy adds an archive Bcc.

The upstream is a counting sink (tests/real_servers.py ``Sink``) that answers the archive's
RCPT TO with Postfix's exact temporary refusal the first N times, then accepts it; every RCPT
TO it is asked is recorded, so "nobody else got it twice" is counted, not assumed.

- 451 to the archive twice: the own recipient gets exactly one copy, the archive exactly one
  after the retries, with the same Message-ID; only the archive is in those retries' RCPT TO;
  the message is `sent` from its first delivery on, the copy `pending` beside it, then `sent`
  (API recipient states, `postroom show`, `postroom log --json`).
- 451 then a 5xx: the copy alone is failed with the server's reply; the message stays sent.
- 451 until the message's lifetime ends: the copy is failed saying so, with the last reply.

And on the queue itself (SQLite and PostgreSQL, the package's memory transport, a fake
clock): a copy's run leases the row without touching its status; a worker that stops hands
the copy back (due at once, still `sent`), one that dies loses it only until its lease ends;
nothing is copied when nobody got the message.
"""

from __future__ import annotations

import json
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import FakeClock, run
from real_servers import HOST, Sink, message_id_of
from serve_proc import Postroom, smtp_connection

from postroom import policy as mpolicy
from postroom.envelope import Envelope
from postroom.queue.sql import Queue
from postroom.queue.worker import Worker
from postroom.settings import DeliverySettings, PolicySettings
from postroom.store.db import make_engine
from postroom.transports import base, memory

OWN = "bob@example.org"
ARCHIVE = "archive@example.org"
# Postfix's reply when a lookup table behind smtpd_recipient_restrictions is unavailable.
TEMPFAIL = (f"451 4.3.5 <{ARCHIVE}>: Recipient address rejected: "
            "Server configuration problem")
USER_UNKNOWN = f"550 5.1.1 <{ARCHIVE}>: Recipient address rejected: User unknown"
DELIVERY = "min_backoff = 1\nmax_backoff = 2\npoll_interval = 0.2\nshutdown_grace = 2\n"


class Replies(dict[str, str]):
    """The sink's RCPT replies, scripted per address: ``script[addr]`` is the list of
    replies for its first RCPT commands (then it is accepted); every lookup is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.script: dict[str, list[str]] = {}
        self.asked: Counter[str] = Counter()
        self.lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        with self.lock:
            self.asked[key] += 1
            todo = self.script.get(key)
            return todo.pop(0) if todo else default


class World:
    def __init__(self, root: Path) -> None:
        self.replies = Replies()
        self.sink = Sink()
        self.sink.handler.rcpt_reply = self.replies  # Sink copies a dict it is given
        self.sink.start()
        policy = f'policy = {{ bcc = ["Archive <{ARCHIVE}>"] }}\n'
        self.pr = Postroom(root, connections=smtp_connection(self.sink.port, "up", policy),
                           delivery=DELIVERY)
        self.key = ""

    def start(self) -> World:
        self.pr.start()
        self.key = self.pr.add_app_keys("shop")[1]
        return self

    def stop(self) -> None:
        self.pr.stop()
        self.sink.stop()

    def send(self, subject: str, **extra: Any) -> str:
        with self.pr.api(self.key) as c:
            resp = c.post("/api/v1/messages", json={
                "from": "shop@example.com", "to": [OWN], "subject": subject,
                "text": "Your order has shipped.", **extra})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def detail(self, msg_id: str) -> dict[str, Any]:
        with self.pr.api(self.key) as c:
            resp = c.get(f"/api/v1/messages/{msg_id}")
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def watch(self, msg_id: str, done: Any, timeout: float = 40) -> list[tuple[str, str]]:
        """Poll the stored row until ``done(row)``; returns every (status, archive state)
        seen, in order, without repeats."""
        engine = make_engine(f"sqlite:///{self.pr.db}")
        queue = Queue(engine)
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                m = queue.log.get(msg_id)
                if m is not None:
                    now = (m["status"], m["rcpt_status"].get(ARCHIVE, {}).get("state", "-"))
                    if not seen or seen[-1] != now:
                        seen.append(now)
                    if done(m):
                        return seen
                if time.monotonic() >= deadline:
                    raise AssertionError(f"{msg_id}: not done after {timeout}s; seen {seen}")
                time.sleep(0.05)
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("forced-bcc"))
    try:
        yield w.start()
    finally:
        w.stop()


def _copy_done(m: dict[str, Any]) -> bool:
    return m["rcpt_status"].get(ARCHIVE, {}).get("state") in ("sent", "failed")


def test_archive_copy_retried_alone_until_delivered(world: World) -> None:
    world.replies.script[ARCHIVE] = [TEMPFAIL, TEMPFAIL]
    asked_before = Counter(world.replies.asked)
    arrived_before = world.sink.count()
    msg_id = world.send("Order 1001 shipped")

    # Wait for the first delivery, then look at the copy while it is pending.
    seen = world.watch(msg_id, lambda m: m["status"] != "queued" and m["status"] != "sending")
    pending = world.detail(msg_id)
    assert pending["status"] == "sent"
    states = {s["address"]: s for s in pending["recipient_states"]}
    assert states[OWN]["state"] == "sent"
    assert states[OWN]["forced"] is None
    if states[ARCHIVE]["state"] == "pending":  # (the retries are quick: it may be over)
        assert states[ARCHIVE]["forced"] == "bcc"
        assert states[ARCHIVE]["reply"].startswith("4.3.5 ")
        assert states[ARCHIVE]["code"] == 451

    seen += world.watch(msg_id, _copy_done)
    statuses = [s for s, _ in seen if s not in ("queued", "sending")]
    assert set(statuses) == {"sent"}, seen  # sent from its first delivery on, throughout
    assert ("sent", "pending") in seen and seen[-1] == ("sent", "sent"), seen

    # Exactly one copy each, same Message-ID; the retries asked for the archive alone.
    arrivals = world.sink.arrivals[arrived_before:]
    assert sorted(a.recipients for a in arrivals) == [(ARCHIVE,), (OWN,)]
    assert len({a.message_id for a in arrivals}) == 1 and arrivals[0].message_id
    asked = world.replies.asked - asked_before
    assert asked == Counter({OWN: 1, ARCHIVE: 3})

    final = world.detail(msg_id)
    assert final["status"] == "sent" and final["last_error"] is None
    states = {s["address"]: s for s in final["recipient_states"]}
    assert states[ARCHIVE]["state"] == "sent" and states[ARCHIVE]["forced"] == "bcc"
    copies = [a for a in final["attempts"] if a["outcome"] == "copy"]
    assert len(copies) == 2  # the two retries of the copy, each with the archive alone
    assert all(list(a["recipients"]) == [ARCHIVE] for a in copies)
    assert [a["recipients"][ARCHIVE]["state"] for a in copies] == ["pending", "sent"]

    shown = world.pr.cli("show", msg_id)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert f"{ARCHIVE}: sent 250" in text and "added by the message policy: bcc" in text

    logged = world.pr.cli("log", "--json")
    assert logged.returncode == 0, logged.stderr
    rows = {r["id"]: r for r in map(json.loads, logged.stdout.decode().splitlines())}
    assert rows[msg_id]["status"] == "sent"
    assert rows[msg_id]["rcpt_status"][ARCHIVE]["state"] == "sent"
    assert rows[msg_id]["rcpt_status"][ARCHIVE]["forced"] == "bcc"


def test_a_permanent_refusal_fails_the_copy_alone(world: World) -> None:
    world.replies.script[ARCHIVE] = [TEMPFAIL, USER_UNKNOWN]
    asked_before = Counter(world.replies.asked)
    arrived_before = world.sink.count()
    msg_id = world.send("Order 1002 shipped")
    seen = world.watch(msg_id, _copy_done)
    assert seen[-1] == ("sent", "failed"), seen
    m = world.detail(msg_id)
    states = {s["address"]: s for s in m["recipient_states"]}
    assert m["status"] == "sent" and m["last_error"] is None
    assert states[ARCHIVE]["code"] == 550
    assert states[ARCHIVE]["reply"] == USER_UNKNOWN.split(" ", 1)[1]
    assert [a.recipients for a in world.sink.arrivals[arrived_before:]] == [(OWN,)]
    assert world.replies.asked - asked_before == Counter({OWN: 1, ARCHIVE: 2})
    time.sleep(2.5)  # longer than max_backoff: a failed copy is not tried again
    assert world.replies.asked - asked_before == Counter({OWN: 1, ARCHIVE: 2})


def test_a_copy_whose_lifetime_ends_is_failed_with_the_reason(world: World) -> None:
    world.replies.script[ARCHIVE] = [TEMPFAIL] * 50
    asked_before = Counter(world.replies.asked)
    msg_id = world.send("Order 1003 shipped", expires_at=time.time() + 4)
    seen = world.watch(msg_id, _copy_done, timeout=30)
    world.replies.script[ARCHIVE] = []
    assert seen[-1] == ("sent", "failed"), seen
    m = world.detail(msg_id)
    states = {s["address"]: s for s in m["recipient_states"]}
    assert m["status"] == "sent"
    assert states[ARCHIVE]["reply"].startswith(
        "gave up: maximum lifetime reached; last reply: 451 4.3.5 ")
    asked = world.replies.asked - asked_before
    assert asked[OWN] == 1 and 2 <= asked[ARCHIVE] <= 5  # backoff 1 s, then 2 s, in 4 s


def test_smtp_submission_with_a_forced_copy_keeps_one_message(world: World) -> None:
    """The same through the SMTP door (no app): the copy's retry is the same message."""
    world.replies.script[ARCHIVE] = [TEMPFAIL]
    arrived_before = world.sink.count()
    raw = (f"From: shop@example.com\r\nTo: {OWN}\r\nSubject: via SMTP\r\n"
           "Message-ID: <smtp-forced-1@example.com>\r\n\r\nHello.\r\n").encode()
    with smtplib.SMTP(HOST, world.pr.smtp_port, timeout=30) as s:
        s.sendmail("shop@example.com", [OWN], raw)
    deadline = time.monotonic() + 30
    while world.sink.count() < arrived_before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    arrivals = world.sink.arrivals[arrived_before:]
    assert sorted(a.recipients for a in arrivals) == [(ARCHIVE,), (OWN,)]
    assert {a.message_id for a in arrivals} == {"<smtp-forced-1@example.com>"}
    assert message_id_of(raw) == "<smtp-forced-1@example.com>"


# -- on the queue: the copy's lease ---------------------------------------------------------------
LEASE = 600.0


@pytest.fixture
def mem(monkeypatch: pytest.MonkeyPatch) -> memory.Transport:
    monkeypatch.setattr(memory.Transport, "outboxes", {})
    monkeypatch.setattr(memory.Transport, "rejections", {})
    return memory.Transport(memory.Settings(name="mem"), base.TransportContext(ehlo_name="t"))


def _worker(queue: Queue, clock: FakeClock, t: memory.Transport, owner: str) -> Worker:
    p = mpolicy.merge(PolicySettings.model_validate({"bcc": [ARCHIVE]}), None)
    return Worker(queue, {"mem": t}, DeliverySettings(min_backoff=60, max_backoff=60),
                  default_connection="mem", owner=owner, clock=clock, policies={"mem": p})


def _env(n: int) -> Envelope:
    raw = (f"From: shop@example.com\r\nTo: {OWN}\r\nSubject: {n}\r\n"
           f"Message-ID: <q{n}@example.com>\r\n\r\nHi.\r\n").encode()
    return Envelope("shop@example.com", [OWN], raw)


def test_a_copy_run_keeps_the_status_and_its_lease_comes_back(
        queue: Queue, clock: FakeClock, mem: memory.Transport) -> None:
    a = _worker(queue, clock, mem, "a")
    memory.Transport.rejections[ARCHIVE] = (451, "4.3.5 Server configuration problem")

    async def go() -> str:
        msg_id = await queue.enqueue(_env(1))
        [msg] = await queue.claim("a", 10, LEASE)
        await a.deliver(msg)
        row = queue.log.get(msg_id)
        assert row is not None and row["status"] == "sent"
        assert row["copy_due"] == clock.t + 60 and row["lease_owner"] is None
        assert await queue.claim("a", 10, LEASE) == []  # not due before its backoff

        clock.advance(61)
        [copy] = await queue.claim("a", 10, LEASE)
        assert copy.status == "sent" and copy.recipients == [OWN]
        row = queue.log.get(msg_id)
        assert row is not None and row["status"] == "sent"  # leased, still sent
        assert await queue.claim("b", 10, LEASE) == []  # nobody else takes it meanwhile
        assert await queue.renew([copy.token], LEASE) == 1
        await queue.release([copy])  # a worker that stops hands it back, due at once
        row = queue.log.get(msg_id)
        assert row is not None and row["status"] == "sent" and row["copy_due"] == clock.t

        [dead] = await queue.claim("b", 10, LEASE)  # taken, then its worker dies
        clock.advance(LEASE + 1)
        [again] = await queue.claim("c", 10, LEASE)  # due again when that lease ends
        assert again.token != dead.token
        del memory.Transport.rejections[ARCHIVE]
        await a.deliver(again)
        return msg_id

    msg_id = run(queue, go)
    row = queue.log.get(msg_id)
    assert row is not None and row["status"] == "sent" and row["copy_due"] is None
    assert row["rcpt_status"][ARCHIVE]["state"] == "sent"
    assert row["lease_owner"] is None
    sent = [e.recipients for e in mem.outbox]
    assert sent[0] == [OWN] and all(r == [ARCHIVE] for r in sent[1:])


def test_nothing_is_copied_when_nobody_got_the_message(
        queue: Queue, clock: FakeClock, mem: memory.Transport) -> None:
    a = _worker(queue, clock, mem, "a")
    memory.Transport.rejections[ARCHIVE] = (451, "4.3.5 Server configuration problem")
    memory.Transport.rejections[OWN] = (550, "5.1.1 User unknown")

    async def go() -> str:
        msg_id = await queue.enqueue(_env(2))
        [msg] = await queue.claim("a", 10, LEASE)
        await a.deliver(msg)
        clock.advance(3600)
        assert await queue.claim("a", 10, LEASE) == []
        return msg_id

    row = queue.log.get(run(queue, go))
    assert row is not None and row["status"] == "failed" and row["copy_due"] is None
    st = row["rcpt_status"][ARCHIVE]
    assert st["state"] == "failed"
    assert st["reply"] == (f"{mpolicy.NOT_COPIED}; last reply: 451 "
                           "4.3.5 Server configuration problem")
