"""Fallback chains against real servers, through a real `postroom serve` process (issue 4).

The upstreams: the Postfix+Dovecot peer (plain port 10025 delivers to a Maildir; submission
port 10587 with STARTTLS + AUTH), and servers this module runs for what a well-behaved
server never does (tests/real_servers.py): a closed port, a listener that accepts and
closes, a 421 greeting, a server that reads the message data and never answers the final
dot, and counting sinks (one refusing a recipient with 550).

One `postroom serve` carries every scenario: each has its own route, matched on the
envelope sender, whose chain starts with the broken connection(s). The message goes in over
SMTP like any app's; the log (`postroom show --json`) must show one attempt per connection
tried, and the message's final state.

- refused / drops / wrong password / 421 / TLS mismatch -> the next connection delivers it
  (the second, or the third after two broken ones); status `sent`, a `fallback_used` event.
- recipient 550 -> failed at once, nothing sent to the next connection.
- timeout after the data was sent -> attempt `unknown`, nothing sent to the next connection;
  retried later on the same connection with the same Message-ID, then `sent`.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from real_servers import (
    HOST,
    ScriptedServer,
    Sink,
    message_id_of,
    raw_message,
    smtp_session,
)
from serve_proc import Postroom, free_port
from sqlalchemy import select

from postroom.queue.sql import Queue
from postroom.store.db import make_engine
from postroom.store.schema import events

MAILBOX = "testuser@example.test"
GONE = "gone@example.test"
HANG_TIMEOUT = 2  # seconds the hanging connection waits for the reply to the final dot
DELIVERY = "min_backoff = 1\nmax_backoff = 2\npoll_interval = 0.2\nshutdown_grace = 2\n"


class World:
    """The servers and the Postroom instance shared by this module's tests."""

    def __init__(self, root: Path, peers: Any) -> None:
        self.peers = peers
        self.hang_data: list[bytes] = []
        self.drops = ScriptedServer(lambda sock, n: None).start()  # accept, close
        self.greeting = ScriptedServer(
            lambda sock, n: sock.sendall(b"421 4.3.2 Service not available\r\n")).start()
        self.hang = ScriptedServer(self._hang_first).start()
        self.rejects = Sink({GONE: "550 5.1.1 <gone@example.test>: Recipient address "
                                   "rejected: User unknown"}).start()
        self.catcher = Sink().start()  # the fallback that must receive nothing
        closed = free_port()  # nothing listens there
        ca = peers.ca_file

        def smtp(name: str, port: int, extra: str = "", security: str = "none") -> str:
            return (f'[[connections]]\nname = "{name}"\ntransport = "smtp"\nhost = "{HOST}"\n'
                    f'port = {port}\nsecurity = "{security}"\nconnect_timeout = 5\n'
                    f"timeout = 10\n{extra}\n")

        conns = "".join([
            smtp("peer", peers.plain_port),
            smtp("refused", closed),
            smtp("drops", self.drops.port),
            smtp("badpass", peers.submission_port,
                 f'auth = "plain"\nusername = "{MAILBOX}"\npassword = "not-the-password"\n'
                 f'ca_file = "{ca}"\n', security="starttls"),
            smtp("greeting421", self.greeting.port),
            smtp("tls_mismatch", peers.submission_port, f'ca_file = "{ca}"\n',
                 security="smtps"),
            smtp("rejects", self.rejects.port),
            smtp("catcher", self.catcher.port),
            smtp("hang", self.hang.port).replace("timeout = 10", f"timeout = {HANG_TIMEOUT}"),
        ])
        routes = {
            "refused": ["refused", "peer"],
            "drops": ["drops", "peer"],
            "badpass": ["badpass", "peer"],
            "greeting": ["greeting421", "peer"],
            "tls": ["tls_mismatch", "peer"],
            "third": ["drops", "tls_mismatch", "peer"],
            "reject": ["rejects", "catcher"],
            "hang": ["hang", "catcher"],
        }
        for who, chain in routes.items():
            conns += (f'[[routes]]\nname = "{who}"\nmatch = {{ sender = "{who}@app.test" }}\n'
                      f"chain = {json.dumps(chain)}\n")
        conns += '[[routes]]\nchain = ["peer"]\n'
        self.pr = Postroom(root, connections=conns, delivery=DELIVERY)

    def _hang_first(self, sock: Any, n: int) -> None:
        """First session: read the message, never answer the final dot. Later: accept."""
        def on_dot(data: bytes) -> bytes | None:
            self.hang_data.append(data)
            return None if n == 1 else b"250 2.0.0 Ok: kept"

        smtp_session(sock, on_dot)

    def start(self) -> World:
        self.pr.start()
        return self

    def stop(self) -> None:
        self.pr.stop()
        for s in (self.drops, self.greeting, self.hang, self.rejects, self.catcher):
            s.stop()

    # -- helpers -------------------------------------------------------------------------
    def submit(self, sender: str, rcpts: list[str], subject: str) -> tuple[str, bytes]:
        """Hand a message to the listener over SMTP; returns (queue id, raw message)."""
        raw = raw_message(sender, rcpts[0], subject, f"<{uuid.uuid4().hex}@app.test>")
        with smtplib.SMTP(HOST, self.pr.smtp_port, timeout=30) as s:
            s.ehlo("app.test")
            s.mail(sender)
            for r in rcpts:
                s.rcpt(r)
            code, reply = s.data(raw)
        assert code == 250, reply
        found = re.search(rb"queued as (\S+)", reply)
        assert found, reply
        return found.group(1).decode(), raw

    def wait_status(self, msg_id: str, want: set[str], timeout: float = 30) -> dict[str, Any]:
        engine = make_engine(f"sqlite:///{self.pr.db}")
        queue = Queue(engine)
        deadline = time.monotonic() + timeout
        try:
            while True:
                m = queue.log.get(msg_id)
                if m is not None and m["status"] in want:
                    return m
                if time.monotonic() >= deadline:
                    raise AssertionError(f"message {msg_id} not {want} after {timeout}s: "
                                         f"{m and (m['status'], m['last_error'])}")
                time.sleep(0.1)
        finally:
            engine.dispose()

    def show(self, msg_id: str) -> dict[str, Any]:
        out = self.pr.cli("show", msg_id, "--json")
        assert out.returncode == 0, out.stderr
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def events(self, msg_id: str) -> list[tuple[str, str | None, str]]:
        engine = make_engine(f"sqlite:///{self.pr.db}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(events).where(events.c.message_id == msg_id)
                                    .order_by(events.c.id)).all()
        finally:
            engine.dispose()
        return [(r.kind, r.connection, r.detail) for r in rows]


@pytest.fixture(scope="module")
def world(peers: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("fallback"), peers)
    try:
        yield w.start()
    finally:
        w.stop()


# -- the next connection delivers ---------------------------------------------------------------
@pytest.mark.parametrize(("who", "broken"), [
    ("refused", [("refused", "connect.refused")]),
    ("drops", [("drops", "connect.lost")]),
    ("badpass", [("badpass", "auth.rejected")]),
    ("greeting", [("greeting421", "connect.greeting")]),
    ("tls", [("tls_mismatch", "tls.handshake")]),
    ("third", [("drops", "connect.lost"), ("tls_mismatch", "tls.handshake")]),
])
def test_connection_failure_falls_back_and_delivers(
    world: World, who: str, broken: list[tuple[str, str]], unique_subject: str
) -> None:
    msg_id, raw = world.submit(f"{who}@app.test", [MAILBOX], unique_subject)
    world.wait_status(msg_id, {"sent", "failed", "deferred", "partial"})
    stored = world.peers.wait_for(MAILBOX, unique_subject, timeout=20)
    assert message_id_of(stored.raw.replace(b"\n", b"\r\n")) == message_id_of(raw)
    m = world.show(msg_id)
    assert m["status"] == "sent", (m["status"], m["last_error"])
    hops = [(a["connection"], a["outcome"], a["error_code"]) for a in m["attempts"]]
    assert hops == [(name, "fallback", code) for name, code in broken] \
        + [("peer", "sent", None)], hops
    assert m["attempts"][-1]["reply_code"] == 250
    assert m["rcpt_status"][MAILBOX]["state"] == "sent"
    if who == "greeting":
        assert m["attempts"][0]["reply_code"] == 421
    if who == "badpass":
        assert m["attempts"][0]["reply_code"] == 535
        assert "not-the-password" not in json.dumps(m)
    kinds = [(k, c) for k, c, _ in world.events(msg_id)]
    assert ("fallback_used", "peer") in kinds, kinds


# -- no fallback -------------------------------------------------------------------------------
def test_recipient_550_fails_without_fallback(world: World, unique_subject: str) -> None:
    before = world.catcher.count()
    msg_id, _ = world.submit("reject@app.test", [GONE], unique_subject)
    world.wait_status(msg_id, {"failed", "sent", "partial"})
    m = world.show(msg_id)
    assert m["status"] == "failed"
    assert [(a["connection"], a["outcome"]) for a in m["attempts"]] == [("rejects", "failed")]
    assert m["rcpt_status"][GONE]["code"] == 550
    assert m["rcpt_status"][GONE]["state"] == "failed"
    time.sleep(1)  # a wrong fallback would have happened in the same delivery run
    assert world.catcher.count() == before
    assert not world.events(msg_id)


def test_recipient_550_for_one_recipient_only_fails_that_one(
    world: World, unique_subject: str
) -> None:
    before = world.catcher.count()
    msg_id, raw = world.submit("reject@app.test", [GONE, "fine@example.test"], unique_subject)
    world.wait_status(msg_id, {"failed", "sent", "partial"})
    m = world.show(msg_id)
    assert m["status"] == "partial"
    assert m["rcpt_status"][GONE]["state"] == "failed"
    assert m["rcpt_status"]["fine@example.test"]["state"] == "sent"
    got = [a for a in world.rejects.arrivals if a.message_id == message_id_of(raw)]
    assert [a.recipients for a in got] == [("fine@example.test",)]
    assert world.catcher.count() == before


def test_timeout_after_data_is_unknown_and_retried_on_the_same_connection(
    world: World, unique_subject: str
) -> None:
    before = world.catcher.count()
    msg_id, raw = world.submit("hang@app.test", [MAILBOX], unique_subject)
    # The first try waits HANG_TIMEOUT s for the final reply; the retry comes after the
    # backoff (1-2 s here).
    world.wait_status(msg_id, {"sent", "failed", "partial"}, timeout=40)
    m = world.show(msg_id)
    hops = [(a["connection"], a["outcome"], a["error_code"]) for a in m["attempts"]]
    assert hops == [("hang", "unknown", "timeout"), ("hang", "sent", None)], hops
    assert m["status"] == "sent"
    first = m["attempts"][0]
    assert first["recipients"][MAILBOX]["state"] == "unknown"
    assert first["transcript"].rstrip().splitlines()[-1].startswith("C: <message data")
    # Same message, same Message-ID both times: the provider or recipient can deduplicate.
    assert [message_id_of(d) for d in world.hang_data] == [message_id_of(raw)] * 2
    assert world.hang.connections == 2
    assert world.catcher.count() == before  # never sent elsewhere
    kinds = [k for k, _, _ in world.events(msg_id)]
    assert "unknown_outcome" in kinds and "fallback_used" not in kinds, kinds
