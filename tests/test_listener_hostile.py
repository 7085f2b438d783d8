"""Hostile and malformed input against a real `postroom serve`.

Each case checks three things: the exact SMTP reply, that nothing was stored (the messages
table of the instance's SQLite database gains no row, and certainly no smuggled second
message), and that the server is still up afterwards (a normal message goes through to the
upstream Postfix Maildir). Raw sockets are used wherever smtplib would "help" (it normalises
line endings and quotes dots).

127.0.0.2 plays the remote client: it is outside the default trusted_networks
(127.0.0.1/32, ::1/128) even though Python calls it a loopback address.
"""

from __future__ import annotations

import base64
import json
import smtplib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from serve_proc import Postroom, smtp_connection
from smtp_raw import Raw, auth_plain

pytestmark = [pytest.mark.peers]

RCPT = "testuser@example.test"
SENDER = "sender@example.org"
APP = "hostile"
REMOTE = "127.0.0.2"
TIMEOUT = 15.0  # every socket and wait in this module
MAX_SIZE = 10000
# Larger than the test helper's 0.2 s so that the cost of one argon2 check (about 0.15 s
# here) cannot be mistaken for the delay.
AUTH_DELAY = 1.0
MAX_AUTH_FAILURES = 3
MAX_RECIPIENTS = 1000



@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    p = Postroom(
        tmp_path_factory.mktemp("listener-hostile"),
        connections=smtp_connection(peers.plain_port),
        server=(f"max_message_size = {MAX_SIZE}\n"
                f"max_auth_failures = {MAX_AUTH_FAILURES}\n"
                f"max_recipients = {MAX_RECIPIENTS}\n"
                'trusted_networks = ["127.0.0.1/32", "::1/128"]\n'),
        # The helper writes auth_failure_delay = 0.2 into the file; the environment wins.
        env={"POSTROOM_SERVER__AUTH_FAILURE_DELAY": str(AUTH_DELAY)},
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def secret(pr: Postroom) -> str:
    return pr.add_app(APP)


def envelope(c: Raw) -> None:
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 250


# -- what is stored, and is the server still up --------------------------------------------------
def stored_ids(pr: Postroom) -> set[str]:
    if not pr.db.exists():
        return set()
    con = sqlite3.connect(f"file:{pr.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        return {row[0] for row in con.execute("SELECT id FROM messages")}
    finally:
        con.close()


def queued_id(reply: str | bytes) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()


def send_normal(pr: Postroom, peers: Any, *, extra_line: str = "") -> str:
    """A normal message from a trusted client; returns its id once it is upstream."""
    subject = f"alive {uuid.uuid4().hex}"
    body = f"still alive\r\n{extra_line}\r\n" if extra_line else "still alive\r\n"
    raw = f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n\r\n{body}".encode()
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT) as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt(RCPT)[0] == 250
        code, reply = s.data(raw)
        assert code == 250, reply
    msg_id = queued_id(reply)
    peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    return msg_id


def assert_nothing_stored_and_alive(pr: Postroom, peers: Any, before: set[str]) -> None:
    assert stored_ids(pr) == before, "a hostile session stored a message"
    alive = send_normal(pr, peers)
    assert stored_ids(pr) == before | {alive}, "more than the one normal message was stored"


def upstream_subjects(peers: Any) -> list[str]:
    return [str(m.get("Subject", "")) for m in peers.messages(RCPT)]


# -- relaying and AUTH policy --------------------------------------------------------------------
def test_relay_from_remote_without_auth_is_refused(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port, REMOTE) as c:
        c.ehlo()
        code, text = c.cmd(f"MAIL FROM:<{SENDER}>")
        assert code == 530 and text.startswith("5.7.0"), text
        assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 503  # no MAIL accepted
        assert c.cmd("DATA")[0] == 503
        # Encryption alone does not make a client trusted.
        c.starttls(pr.cert)
        c.ehlo()
        code, text = c.cmd(f"MAIL FROM:<{SENDER}>")
        assert code == 530 and text.startswith("5.7.0"), text
        assert c.cmd("QUIT")[0] == 221
    assert_nothing_stored_and_alive(pr, peers, before)


def test_auth_before_starttls_is_refused_off_trusted_networks(
    pr: Postroom, secret: str, peers: Any
) -> None:
    """127.0.0.2 is a loopback address but not in trusted_networks: no AUTH in the clear."""
    before = stored_ids(pr)
    with Raw(pr.smtp_port, REMOTE) as c:
        features = c.ehlo()
        assert "AUTH" not in features and "STARTTLS" in features, features
        code, text = c.cmd(auth_plain(APP, secret))  # even the right credentials
        assert code == 538 and text.startswith("5.7.11"), text
        code, text = c.cmd("AUTH LOGIN")
        assert code == 538, text
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 530  # and the session is not authenticated
        c.starttls(pr.cert)
        assert "AUTH" in c.ehlo()
        code, text = c.cmd(auth_plain(APP, secret))
        assert code == 235, text
        assert c.cmd("QUIT")[0] == 221
    assert_nothing_stored_and_alive(pr, peers, before)


def test_auth_in_the_clear_is_allowed_for_trusted_networks(pr: Postroom, secret: str) -> None:
    with Raw(pr.smtp_port, "127.0.0.1") as c:
        assert "AUTH" in c.ehlo()
        code, text = c.cmd(auth_plain(APP, secret))
        assert code == 235, text
        assert c.cmd("QUIT")[0] == 221


def test_bad_credentials_are_delayed_then_session_closed(
    pr: Postroom, secret: str, peers: Any
) -> None:
    """Each failed attempt costs the client auth_failure_delay before it learns the next
    result (consecutive failures are answered at least that far apart), and the third one
    ends the session with 421. Written so it holds whether the server delays the 535 itself
    or the reading of the next command (see the next test)."""
    before = stored_ids(pr)
    floor = AUTH_DELAY - 0.05  # asyncio timers may fire a hair early
    with Raw(pr.smtp_port, REMOTE) as c:
        c.starttls(pr.cert)
        c.ehlo()
        first_sent = time.monotonic()
        # 1: wrong secret for a real app (PLAIN with an initial response)
        code, text = c.cmd(auth_plain(APP, secret + "x"))
        assert code == 535 and text.startswith("5.7.8"), text
        failed_1 = time.monotonic()
        # 2: unknown user, LOGIN dialogue
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(base64.b64encode(b"nobody").decode())[0] == 334
        code, text = c.cmd(base64.b64encode(secret.encode()).decode())
        assert code == 535 and text.startswith("5.7.8"), text
        failed_2 = time.monotonic()
        assert failed_2 - failed_1 >= floor, f"2nd failure answered {failed_2 - failed_1:.3f}s"
        # 3: wrong secret again, pipelined with a NOOP that must never be answered
        third_sent = time.monotonic()
        c.send((auth_plain(APP, "wrong") + "\r\nNOOP\r\n").encode())
        code, text = c.reply()
        failed_3 = time.monotonic()
        assert code == 535 and text.startswith("5.7.8"), text
        assert failed_3 - failed_2 >= floor, f"3rd failure answered {failed_3 - failed_2:.3f}s"
        code, text = c.reply()
        closed = time.monotonic()
        assert code == 421 and text.startswith("4.7.0"), text
        assert closed - third_sent >= floor, f"421 came {closed - third_sent:.3f}s after"
        assert closed - first_sent >= MAX_AUTH_FAILURES * floor, f"{closed - first_sent:.3f}s"
        assert c.closed_by_server()
    # The lockout is per session: a new session with the right secret is fine and can send.
    with Raw(pr.smtp_port, REMOTE) as c:
        c.starttls(pr.cert)
        c.ehlo()
        assert c.cmd(auth_plain(APP, secret))[0] == 235
        assert c.cmd("QUIT")[0] == 221
    assert_nothing_stored_and_alive(pr, peers, before)


def test_failed_auth_reply_itself_is_delayed(pr: Postroom, secret: str) -> None:
    with Raw(pr.smtp_port, REMOTE) as c:
        c.starttls(pr.cert)
        c.ehlo()
        start = time.monotonic()
        code, _ = c.cmd(auth_plain(APP, secret + "x"))
        elapsed = time.monotonic() - start
    assert code == 535
    assert elapsed >= AUTH_DELAY - 0.05, f"535 came after {elapsed:.3f}s"


# -- SMTP smuggling ------------------------------------------------------------------------------
SMUGGLE_ENDINGS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-dot-cr": b"\r\n.\r",
}


@pytest.mark.parametrize("ending", list(SMUGGLE_ENDINGS.values()), ids=list(SMUGGLE_ENDINGS))
def test_smuggling_with_bare_newlines_is_refused(
    pr: Postroom, peers: Any, ending: bytes
) -> None:
    before = stored_ids(pr)
    smuggled = f"smuggled {uuid.uuid4().hex}"
    payload = (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: carrier\r\n\r\nhello".encode()
        + ending
        + b"MAIL FROM:<admin@example.test>\r\n"
        + f"RCPT TO:<{RCPT}>\r\n".encode()
        + b"DATA\r\n"
        + f"From: admin@example.test\r\nSubject: {smuggled}\r\n\r\nevil\r\n".encode()
        + b"\r\n.\r\n"
    )
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        envelope(c)
        code, text = c.data(payload)
        assert code == 550 and text.startswith("5.5.2"), text
        # Still in step: the smuggled commands were data, never executed (no stray replies).
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert_nothing_stored_and_alive(pr, peers, before)
    assert smuggled not in upstream_subjects(peers)


def test_bare_lf_in_a_header_is_refused(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        envelope(c)
        code, text = c.data(b"Subject: a\nBcc: b@example.test\r\n\r\nbody\r\n.\r\n")
        assert code == 550 and text.startswith("5.5.2"), text
    assert_nothing_stored_and_alive(pr, peers, before)


# -- sizes and lengths ---------------------------------------------------------------------------
def test_size_parameter_over_the_limit_is_refused_at_mail(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port) as c:
        assert "SIZE" in c.ehlo()
        code, text = c.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE + 1}")
        assert code == 552, text
        assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 503  # the MAIL was not taken
        code, text = c.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE}")  # the limit itself is fine
        assert code == 250, text
        assert c.cmd("RSET")[0] == 250
    assert_nothing_stored_and_alive(pr, peers, before)


def test_data_over_the_limit_is_refused_after_data(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        envelope(c)
        line = b"y" * 78 + b"\r\n"
        payload = b"Subject: big\r\n\r\n" + line * (MAX_SIZE // len(line) + 2) + b".\r\n"
        code, text = c.data(payload)
        assert code == 552, text
        # The transaction is over; the session goes on.
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("DATA")[0] == 503
    assert_nothing_stored_and_alive(pr, peers, before)


@pytest.mark.parametrize("length", [600, 5000], ids=["over-512", "over-reader-limit"])
def test_overlong_command_line_is_refused(pr: Postroom, peers: Any, length: int) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        code, text = c.cmd("NOOP " + "x" * length)
        assert code == 500, text
        local = "a" * length
        code, text = c.cmd(f"MAIL FROM:<{local}@example.org>")
        assert code == 500, text
        # The rest of the long line was swallowed, not run as a command.
        assert c.cmd("NOOP")[0] == 250
        envelope(c)
        assert c.cmd("RSET")[0] == 250
    assert_nothing_stored_and_alive(pr, peers, before)


def test_overlong_data_line_is_refused(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        envelope(c)
        payload = b"Subject: long line\r\n\r\nshort\r\n" + b"z" * 1200 + b"\r\nafter\r\n.\r\n"
        code, text = c.data(payload)
        assert code == 500, text
        assert "too long" in text.lower(), text
        assert c.cmd("NOOP")[0] == 250
    assert_nothing_stored_and_alive(pr, peers, before)
    # The RFC 5321 maximum (998 characters + CRLF) is still accepted and delivered intact.
    edge = send_normal(pr, peers, extra_line="e" * 998)
    assert edge in stored_ids(pr)


def test_recipient_limit(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    total = MAX_RECIPIENTS + 2
    replies: list[tuple[int, str]] = []
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        batch = 100  # pipelined: a batch of RCPTs, then their replies
        for start in range(0, total, batch):
            n = min(batch, total - start)
            c.send(b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i
                            for i in range(start, start + n)))
            replies.extend(c.reply() for _ in range(n))
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    codes = [code for code, _ in replies]
    assert codes[:MAX_RECIPIENTS] == [250] * MAX_RECIPIENTS
    assert codes[MAX_RECIPIENTS:] == [452, 452]
    assert replies[MAX_RECIPIENTS][1].startswith("4.5.3"), replies[MAX_RECIPIENTS]
    assert_nothing_stored_and_alive(pr, peers, before)


# -- malformed input ------------------------------------------------------------------------------
BAD_ADDRESSES = [
    "<a@@b.example>",
    "<a b@example.org>",
    "<@x>",
    "<nodomain>",
    "<a@>",
    "<a@-bad-.example>",
    "<a@bad_label.example>",
    "<a@b..example>",
    f"<a@{'x' * 64}.example>",
    f"<{'l' * 65}@example.org>",
    "<a@b@example.org>",
]


def test_malformed_addresses_are_refused(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    problems: list[str] = []
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        for addr in BAD_ADDRESSES:
            code, text = c.cmd(f"MAIL FROM:{addr}")
            if code not in (501, 553):
                problems.append(f"MAIL FROM:{addr} -> {code} {text}")
            if code < 400:
                c.cmd("RSET")
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for addr in [*BAD_ADDRESSES, "<>"]:
            code, text = c.cmd(f"RCPT TO:{addr}")
            if code not in (501, 553):
                problems.append(f"RCPT TO:{addr} -> {code} {text}")
        if not problems:
            code, text = c.cmd("DATA")  # no recipient was accepted
            assert code == 503, text
        assert c.cmd("QUIT")[0] == 221
    assert not problems, "\n".join(problems)
    assert_nothing_stored_and_alive(pr, peers, before)


def test_non_utf8_header_is_refused(pr: Postroom, peers: Any) -> None:
    before = stored_ids(pr)
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        for head in (b"Subject: \xff\xfe\r\n", b"From: \xe9t\xe9 <a@example.org>\r\n"):
            envelope(c)
            code, text = c.data(head + b"To: " + RCPT.encode() + b"\r\n\r\nbody\r\n.\r\n")
            assert code == 554 and text.startswith("5.6.0"), text
        assert c.cmd("NOOP")[0] == 250
    assert_nothing_stored_and_alive(pr, peers, before)


# -- last: the whole module stored only the normal messages --------------------------------------
def test_log_holds_only_the_normal_messages(pr: Postroom) -> None:
    out = pr.cli("log", "--json", "--limit", "1000")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
    assert rows, "the liveness messages should be in the log"
    assert {r["id"] for r in rows} == stored_ids(pr)
    for r in rows:
        assert r["subject"].startswith("alive "), r
        assert r["source"] == "smtp:trusted", r
        assert r["recipients"] == [RCPT], r
