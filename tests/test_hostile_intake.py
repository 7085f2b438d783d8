"""One intake path (issue 11, points 8 and 11): every door refuses the same bad message with
the same rule (postroom.ingress.accept), stores nothing, and still serves a good one; what
goes out on the wire can never end the data early; the null sender can be handed in.

Doors: the SMTP listener (raw socket), `postroom-sendmail` (a real process), the HTTP raw API
(from 127.0.0.2 with an app key) and the Python Mailer. Upstream: the real Postfix, and a
scripted server that records the exact bytes of DATA.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from real_servers import ScriptedServer, smtp_session
from serve_proc import Postroom, smtp_connection
from smtp_raw import TIMEOUT, Raw

from postroom import Mailer
from postroom.envelope import Envelope
from postroom.exceptions import MessageError
from postroom.runtime import Instance
from postroom.settings import load

pytestmark = [pytest.mark.peers]

RCPT = "testuser@example.test"
SENDER = "app@example.org"
SENDMAIL = Path(sys.executable).with_name("postroom-sendmail")
MAX_RECIPIENTS = 5

# name -> (message, the code every door refuses it with)
BAD = {
    "bare CR": (b"From: app@example.org\r\nSubject: x\r\n\r\nline\r.\r\nMAIL FROM:<x@evil>\r\n",
                "message.bare_newline"),
    "NUL": (b"From: app@example.org\r\nSubject: x\r\n\r\nnul \x00 here\r\n", "message.nul"),
    "header bytes": (b"From: app@example.org\r\nSubject: caf\xe9\r\n\r\nbody\r\n",
                     "message.header_charset"),
}


@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    with Postroom(tmp_path_factory.mktemp("intake"), connections=smtp_connection(peers.plain_port),
                 server=f"max_recipients = {MAX_RECIPIENTS}\n") as p:
        yield p


@pytest.fixture(scope="module")
def key(pr: Postroom) -> str:
    return pr.add_app_keys("intake")[1]


def stored(pr: Postroom) -> int:
    con = sqlite3.connect(f"file:{pr.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        return int(con.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        con.close()


def via_smtp(pr: Postroom, raw: bytes, rcpts: list[str]) -> str:
    with Raw(pr.smtp_port) as c:
        c.ehlo()
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for r in rcpts:
            code, text = c.cmd(f"RCPT TO:<{r}>")
            if code != 250:
                return f"{code} {text}"
        code, text = c.data(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return f"{code} {text}"


def via_api(pr: Postroom, key: str, raw: bytes, rcpts: list[str]) -> str:
    with pr.api(key, source="127.0.0.2") as c:
        r = c.post("/api/v1/messages/raw",
                   params=[("to", x) for x in rcpts], content=raw,
                   headers={"Content-Type": "message/rfc822"})
    return f"{r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else ''}"


def via_sendmail(pr: Postroom, raw: bytes, rcpts: list[str]) -> str:
    r = subprocess.run([str(SENDMAIL), "-i", "-f", SENDER, *rcpts], input=raw,
                       capture_output=True, timeout=TIMEOUT,
                       env={**pr.env, "POSTROOM_CONFIG": str(pr.config), "HOME": str(pr.root)})
    return f"{r.returncode} {r.stderr.decode()}"


def via_mailer(pr: Postroom, raw: bytes, rcpts: list[str]) -> str:
    with Mailer(config=pr.config, app="intake-py") as m:
        try:
            return f"ok {m.send_raw(raw, SENDER, rcpts)}"
        except MessageError as err:
            return f"refused {err.code} {err}"


@pytest.mark.parametrize("case", list(BAD))
def test_every_door_refuses_the_same_message_the_same_way(
        pr: Postroom, key: str, peers: Any, case: str) -> None:
    raw, code = BAD[case]
    before = stored(pr)
    smtp = via_smtp(pr, raw, [RCPT])
    assert smtp.startswith(("550 5.5.2", "554 5.6.0")) and "refused" in smtp, smtp
    assert via_api(pr, key, raw, [RCPT]) == f"422 {code}"
    out = via_sendmail(pr, raw, [RCPT])
    assert out.startswith("65 "), out  # EX_DATAERR: the message, not the system
    assert "Traceback" not in out
    assert via_mailer(pr, raw, [RCPT]).startswith(f"refused {code}")
    assert stored(pr) == before, "a door stored a refused message"
    # ... and a good message still goes through every door.
    subject = f"good {uuid.uuid4().hex}"
    good = f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nfine\r\n".encode()
    assert via_smtp(pr, good, [RCPT]).startswith("250"), subject
    peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    assert via_api(pr, key, good, [RCPT]).startswith("202")
    assert via_sendmail(pr, good, [RCPT]).startswith("0 ")
    assert via_mailer(pr, good, [RCPT]).startswith("ok ")
    assert stored(pr) == before + 4


def test_recipient_limit_is_one_rule(pr: Postroom, key: str) -> None:
    rcpts = [f"r{i}@example.test" for i in range(MAX_RECIPIENTS + 1)]
    raw = f"From: {SENDER}\r\nSubject: many\r\n\r\nx\r\n".encode()
    before = stored(pr)
    assert via_smtp(pr, raw, rcpts).startswith("452 4.5.3")
    assert via_api(pr, key, raw, rcpts) == "422 message.too_many_recipients"
    assert via_sendmail(pr, raw, rcpts).startswith("65 ")
    assert "message.too_many_recipients" in via_mailer(pr, raw, rcpts)
    assert stored(pr) == before


def test_sendmail_lone_lf_is_fine_but_bare_cr_is_not(pr: Postroom, peers: Any) -> None:
    """Unix line ends are what sendmail clients write (PHP's mail()): they become CRLF."""
    subject = f"unix {uuid.uuid4().hex}"
    assert via_sendmail(pr, f"Subject: {subject}\n\nline\n.\n".encode(), [RCPT]).startswith("0 ")
    msg = peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    assert msg.get_payload().replace("\r\n", "\n").startswith("line\n.")
    out = via_sendmail(pr, b"Subject: cr\n\nline\r.\nMAIL FROM:<x@evil>\n", [RCPT])
    assert out.startswith("65 ") and "bare CR" in out, out


# -- the wire: a dot after any line break is stuffed -------------------------------------------
def test_a_stored_bare_cr_cannot_end_the_data_early(tmp_path: Path) -> None:
    """A row stored before the intake rule (or by other means) holding ``\\r.\\r\\n``: the
    transport stuffs that dot too, so the upstream sees one message, not two."""
    got: list[bytes] = []
    done = threading.Event()

    def record(data: bytes) -> bytes:
        got.append(data)
        done.set()
        return b"250 2.0.0 one message"

    upstream = ScriptedServer(lambda sock, _n: smtp_session(sock, record)).start()
    p = Postroom(tmp_path / "wire", connections=smtp_connection(upstream.port))
    try:
        smuggled = (b"From: app@example.org\r\nSubject: smuggle\r\n\r\nfirst\r.\r\n"
                    b"MAIL FROM:<evil@example.org>\r\n.\rlast\n.x\r\n")
        inst = Instance(load(p.config))
        inst.queue.enqueue_sync(Envelope(SENDER, [RCPT], smuggled, source="test"))
        inst.close()
        p.start()
        assert done.wait(TIMEOUT), f"nothing delivered:\n{p.log.read_text()}"
    finally:
        p.stop()
        upstream.stop()
    [data] = got
    assert b"\r..\r\nMAIL FROM" in data and b"\r.\r\n" not in data
    assert b"\r\n..\rlast\n..x" in data, data  # after CRLF, and after a lone LF


# -- point 11: the null sender ------------------------------------------------------------------
def test_null_sender_over_smtp_with_swaks(pr: Postroom, peers: Any) -> None:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed: run scripts/test.sh (tests/peers/clients.sh)")
    subject = f"bounce {uuid.uuid4().hex}"
    r = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(pr.smtp_port), "--from", "<>",
         "--to", RCPT, "--header", f"Subject: {subject}", "--header",
         "From: MAILER-DAEMON@example.org", "--body", "a delivery status notification",
         "--timeout", "15"],
        capture_output=True, text=True, timeout=TIMEOUT + 15, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MAIL FROM:<>" in r.stdout and "queued as" in r.stdout, r.stdout
    msg = peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    assert msg["Return-Path"] == "<>"
