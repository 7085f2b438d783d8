"""Composed messages delivered for real.

- Property test (hypothesis): any composed message (random Unicode display names, subjects,
  bodies, attachment names and contents) survives composition -> Postroom's SMTP transport
  -> the real Postfix -> Maildir with equal decoded headers and bodies.
- SMTPUTF8: with Postfix (which offers it) a UTF-8 local part and IDN domains go as they
  are; with a small aiosmtpd server that does not offer it, IDN domains go as A-labels and a
  UTF-8 local part fails permanently with a clear error.
- The message policy end to end through a real `postroom serve`: a forced retry must not
  duplicate forced recipients, added headers or the From override.
"""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from message_helpers import mailboxes, parse, raw_field
from serve_proc import Postroom, free_port, smtp_connection

from postroom.envelope import Envelope
from postroom.exceptions import UnsupportedFeature
from postroom.message import Attachment, Draft, build
from postroom.transports.base import TransportContext
from postroom.transports.smtp import Settings, Transport

HOST = "127.0.0.1"
BOB = "bob@example.test"
ALICE = "alice@example.test"
UTF8USER = "utf8user@example.test"
GREEK = "δοκιμή@example.test"
SEND_TIMEOUT = 30.0


class Inbox:
    """New files in one Maildir, read once each: fast, however full the folder already is."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen = {p for sub in ("new", "cur") for p in self._names(sub)}
        self.found: list[bytes] = []

    def _names(self, sub: str) -> list[str]:
        try:
            return [e.path for e in os.scandir(self.folder / sub) if not e.name.startswith(".")]
        except FileNotFoundError:
            return []

    def _scan(self) -> None:
        for sub in ("new", "cur"):
            for path in self._names(sub):
                if path in self.seen:
                    continue
                try:
                    self.found.append(Path(path).read_bytes())
                except FileNotFoundError:  # moved to cur/ meanwhile: found there next time
                    continue
                self.seen.add(path)

    def matching(self, marker: bytes) -> list[bytes]:
        self._scan()
        return [m for m in self.found if marker in m]

    def wait(self, marker: bytes, count: int = 1, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            hits = self.matching(marker)
            if len(hits) >= count or time.monotonic() >= deadline:
                assert len(hits) >= count, (f"{len(hits)} of {count} message(s) with "
                                            f"{marker!r} in {self.folder} after {timeout}s")
                return hits
            time.sleep(0.05)


def inbox(peers: Any, address: str) -> Inbox:
    folders, shared = peers.maildirs(address)
    assert not shared, f"{address} has no Maildir of its own"
    return Inbox(folders[0])


class Upstream:
    """One SMTP transport (and session, pooled) to Postfix's plain port for many sends."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.transport = Transport(
            Settings(name="postfix", host=HOST, port=port, security="none", connect_timeout=10,
                     timeout=30, max_sessions=1),
            TransportContext(ehlo_name="postroom.test"))

    def send(self, env: Envelope) -> Any:
        return self.loop.run_until_complete(
            asyncio.wait_for(self.transport.send(env), SEND_TIMEOUT))

    def close(self) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.transport.aclose(), 15))
        self.loop.close()


@pytest.fixture(scope="module")
def postfix(peers: Any) -> Iterator[Upstream]:
    up = Upstream(peers.plain_port)
    try:
        yield up
    finally:
        up.close()


# -- property test ------------------------------------------------------------------------------
# Any Unicode scalar value (no surrogates) except CR, LF and NUL, which are refused in header
# values (tests/test_message.py shows that).
header_text = st.text(st.characters(blacklist_categories=("Cs",),
                                    blacklist_characters="\r\n\x00"), max_size=80)
body_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=600)
attachments = st.lists(
    st.tuples(header_text.filter(lambda s: bool(s.strip())), st.binary(max_size=400)),
    max_size=3)


def normalised(text: str) -> str:
    """A text body as it is read back: line ends as LF, ending with one (RFC 5322 lines)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(from_name=header_text, to_name=header_text, subject=header_text, text=body_text,
       html=st.none() | body_text, files=attachments)
def test_any_composed_message_survives_delivery(
        peers: Any, postfix: Upstream, from_name: str, to_name: str, subject: str, text: str,
        html: str | None, files: list[tuple[str, bytes]]) -> None:
    marker = uuid.uuid4().hex
    box = inbox(peers, BOB)
    env = build(Draft(from_=(from_name, "sender@example.org"), to=[(to_name, BOB)],
                      subject=subject, text=text, html=html,
                      attachments=[Attachment(n, c) for n, c in files],
                      headers={"X-Test-Id": marker}))
    result = postfix.send(env)
    assert result.recipients[BOB].code == 250, result.transcript
    (stored,) = box.wait(marker.encode())
    msg = parse(stored)
    assert msg["X-Test-Id"] == marker
    assert mailboxes(stored, "From") == [(from_name.strip(), "sender@example.org")]
    assert mailboxes(stored, "To") == [(to_name.strip(), BOB)]
    assert str(msg["Subject"]) == subject
    plain = msg.get_body(("plain",))
    assert plain is not None
    if html is None or text:  # (derived from the HTML otherwise; not a round trip)
        assert normalised(plain.get_content()) == normalised(text)
    if html is not None:
        rich = msg.get_body(("html",))
        assert rich is not None
        assert normalised(rich.get_content()) == normalised(html)
    got = [(a.get_filename(), a.get_payload(decode=True)) for a in msg.iter_attachments()]
    # The stdlib strips whitespace around file names (Message.get_filename).
    assert got == [(n.strip(), c) for n, c in files]


# -- SMTPUTF8 and IDN ---------------------------------------------------------------------------
def test_smtputf8_upstream_gets_utf8_addresses_as_they_are(peers: Any,
                                                           postfix: Upstream) -> None:
    marker = uuid.uuid4().hex
    box = inbox(peers, GREEK)
    env = build(Draft(from_="Jörg <jörg@bücher.example>", to=[("Δοκιμή", GREEK)],
                      reply_to=["hilfe@münchen.example"], subject="Grüße",
                      text="Καλημέρα\n", headers={"X-Test-Id": marker}))
    assert env.smtputf8
    result = postfix.send(env)
    assert result.recipients[GREEK].code == 250, result.transcript
    assert "mail FROM:<jörg@bücher.example> SMTPUTF8" in result.transcript
    (stored,) = box.wait(marker.encode())
    assert "<jörg@bücher.example>".encode() in stored  # U-labels kept, raw UTF-8 (RFC 6532)
    assert mailboxes(stored, "From") == [("Jörg", "jörg@bücher.example")]
    assert "Reply-To: hilfe@münchen.example".encode() in stored
    assert mailboxes(stored, "To") == [("Δοκιμή", GREEK)]
    msg = parse(stored)
    assert str(msg["Subject"]) == "Grüße"
    assert normalised(msg.get_content()) == "Καλημέρα\n"


class Capture:
    """aiosmtpd handler keeping what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes, list[str]]] = []
        self.mail_commands = 0

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              bytes(envelope.original_content), list(envelope.mail_options)))
        return "250 OK captured"


@pytest.fixture
def no_smtputf8() -> Iterator[tuple[Capture, int]]:
    """An upstream without SMTPUTF8 (aiosmtpd's default): Postfix here offers it."""
    handler = Capture()
    port = free_port()
    ctl = Controller(handler, hostname=HOST, port=port, ready_timeout=10,
                     enable_SMTPUTF8=False, decode_data=False)
    ctl.start()
    try:
        yield handler, port
    finally:
        ctl.stop()


def test_idn_domains_go_as_a_labels_without_smtputf8(no_smtputf8: tuple[Capture, int]) -> None:
    handler, port = no_smtputf8
    up = Upstream(port)
    try:
        env = build(Draft(from_='"Ann @ Home" <ann@bücher.example>',
                          to=["Kunde <kunde@münchen.example>", "plain@example.org"],
                          reply_to=["hilfe@bücher.example"], subject="Grüße",
                          text="Grüße\n"))
        result = up.send(env)
    finally:
        up.close()
    # Results are reported under the addresses as queued (the log's keys).
    assert {r: res.code for r, res in result.recipients.items()} == {
        "kunde@münchen.example": 250, "plain@example.org": 250}
    assert "A-labels" in result.transcript
    ((sender, rcpts, raw, options),) = handler.received
    assert sender == "ann@xn--bcher-kva.example"
    assert rcpts == ["kunde@xn--mnchen-3ya.example", "plain@example.org"]
    assert "SMTPUTF8" not in options
    assert raw.isascii()
    assert mailboxes(raw, "From") == [("Ann @ Home", "ann@xn--bcher-kva.example")]
    assert mailboxes(raw, "To") == [("Kunde", "kunde@xn--mnchen-3ya.example"),
                                    ("", "plain@example.org")]
    assert raw_field(raw, "Reply-To") == "hilfe@xn--bcher-kva.example"
    assert raw.split(b"\r\n\r\n", 1)[1] == env.raw.split(b"\r\n\r\n", 1)[1]


def test_utf8_local_part_without_smtputf8_fails_permanently(
        no_smtputf8: tuple[Capture, int]) -> None:
    handler, port = no_smtputf8
    up = Upstream(port)
    try:
        env = build(Draft(from_="app@example.org", to=[GREEK], subject="x", text="x"))
        with pytest.raises(UnsupportedFeature) as info:
            up.send(env)
    finally:
        up.close()
    err = info.value
    assert err.permanent and err.code == "message.smtputf8"
    assert GREEK in err.message and "SMTPUTF8" in err.message
    assert handler.mail_commands == 0 and handler.received == []  # nothing was sent


# -- the message policy through `postroom serve` -----------------------------------------------
class FlakyRelay:
    """aiosmtpd handler: refuses each address in ``flaky`` once with 451, relays the rest to
    Postfix (so that mail arrives in the real Maildirs)."""

    def __init__(self, upstream_port: int, flaky: set[str]) -> None:
        self.port = upstream_port
        self.flaky = set(flaky)
        self.refused: list[str] = []
        self.relayed: list[tuple[str, list[str]]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.flaky:
            self.flaky.discard(address)
            self.refused.append(address)
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        def relay() -> None:
            with smtplib.SMTP(HOST, self.port, timeout=20) as s:
                s.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content,
                           mail_options=["SMTPUTF8"] if envelope.smtp_utf8 else [])

        try:
            await asyncio.get_running_loop().run_in_executor(None, relay)
        except (OSError, smtplib.SMTPException) as err:
            return f"451 4.4.0 relay failed: {err}"
        self.relayed.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK relayed"


def test_policy_applies_once_per_attempt_through_serve(peers: Any, tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:12]
    relay = FlakyRelay(peers.plain_port, {UTF8USER})
    relay_port = free_port()
    ctl = Controller(relay, hostname=HOST, port=relay_port, ready_timeout=10,
                     enable_SMTPUTF8=True, decode_data=False)
    ctl.start()
    boxes = {a: inbox(peers, a) for a in (BOB, UTF8USER, ALICE, GREEK)}
    extra = (f'policy = {{ to = ["Δοκιμή <{GREEK}>"], bcc = ["{ALICE}"], '
             f'headers = {{ X-Policy-Run = "{run_id}" }} }}')
    pr = Postroom(tmp_path / "pr", connections=smtp_connection(relay_port, extra=extra))
    pr.config.write_text(pr.config.read_text() + (
        '\n[policy]\nfrom = "Postroom Policy <policy@example.test>"\n'
        'headers = { X-Policy-Run = "overridden by the connection" }\n'))
    try:
        pr.start()
        out = pr.cli("send", "--from", "App <app@example.org>", "--to", BOB, "--to", UTF8USER,
                     "--subject", f"policy {run_id}", "--text", "policy body",
                     "--reply-to", "Help <help@example.org>", "--header", f"X-Run: {run_id}")
        assert out.returncode == 0, out.stderr.decode()
        msg_id = out.stdout.decode().split()[-1]
        marker = run_id.encode()
        got = {a: box.wait(marker) for a, box in boxes.items()}  # utf8user: after the retry
        deadline = time.monotonic() + 20
        while True:
            shown = pr.cli("show", msg_id, "--json")
            assert shown.returncode == 0, shown.stderr.decode()
            info = json.loads(shown.stdout)
            if info["status"] == "sent" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1.5)  # room for a duplicate to show up, were one sent
        counts = {a: len(box.matching(marker)) for a, box in boxes.items()}
    finally:
        pr.stop()
        ctl.stop()
    assert info["status"] == "sent", info
    assert counts == {BOB: 1, UTF8USER: 1, ALICE: 1, GREEK: 1}
    assert relay.refused == [UTF8USER]
    assert [sorted(r) for _, r in relay.relayed] == [sorted([BOB, GREEK, ALICE]), [UTF8USER]]
    assert all(sender == "app@example.org" for sender, _ in relay.relayed)
    st = info["rcpt_status"]
    assert st[ALICE]["forced"] == "bcc" and st[ALICE]["state"] == "sent"
    assert st[GREEK]["forced"] == "to" and st[GREEK]["state"] == "sent"
    assert info["recipients"] == [BOB, UTF8USER]
    for address, (stored,) in got.items():
        msg = parse(stored)
        assert raw_field(stored, "X-Run") == run_id, address
        assert stored.count(b"X-Policy-Run:") == 1
        assert msg["X-Policy-Run"] == run_id  # the connection's value over the global one
        assert stored.count(b"\nFrom:") == 1
        assert mailboxes(stored, "From") == [("Postroom Policy", "policy@example.test")]
        assert mailboxes(stored, "To") == [("", BOB), ("", UTF8USER), ("Δοκιμή", GREEK)]
        assert mailboxes(stored, "Reply-To") == [("Help", "help@example.org")]
        assert ALICE.encode() not in _own_header(stored)
        assert normalised(msg.get_content()) == "policy body\n"


def _own_header(stored: bytes) -> bytes:
    """The header section without the trace fields Postfix prepends on delivery."""
    head = stored.split(b"\n\n", 1)[0]
    lines = head.split(b"\n")
    trace = (b"return-path:", b"x-original-to:", b"delivered-to:", b"received:")
    out: list[bytes] = []
    in_trace = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not in_trace:
                out.append(line)
            continue
        in_trace = line.lower().startswith(trace)
        if not in_trace:
            out.append(line)
    return b"\n".join(out)


# -- `postroom send` composes through Draft -------------------------------------------------------
def test_cli_send_composes_every_feature(tmp_path: Path) -> None:
    logo = tmp_path / "logo.png"
    logo.write_bytes(b"\x89PNG fake")
    doc = tmp_path / "Übersicht 2026.pdf"
    doc.write_bytes(b"%PDF-1.4 fake")
    pr = Postroom(tmp_path / "pr", connections=smtp_connection(free_port()))
    out = pr.cli("send", "--from", "Bücherstube <post@bücher.example>", "--to", "Bob <b@x.org>",
                 "--subject", "Grüße", "--html", '<p>Hi <img src="cid:logo.png" alt="logo"></p>',
                 "--inline", str(logo), "--attach", str(doc), "--reply-to", "Help <h@x.org>",
                 "--header", "X-Campaign: spring", "--header", "List-Id: <news.x.org>")
    assert out.returncode == 0, out.stderr.decode()
    msg_id = out.stdout.decode().split()[-1]
    raw = pr.cli("show", msg_id, "--raw").stdout
    msg = parse(raw)
    assert mailboxes(raw, "From") == [("Bücherstube", "post@bücher.example")]
    assert mailboxes(raw, "Reply-To") == [("Help", "h@x.org")]
    assert str(msg["Subject"]) == "Grüße"
    assert msg["X-Campaign"] == "spring" and msg["List-Id"] == "<news.x.org>"
    alt, pdf = list(msg.iter_parts())
    assert pdf.get_filename() == "Übersicht 2026.pdf"
    plain, related = list(alt.iter_parts())
    assert plain.get_content().strip() == "Hi [logo]"
    html, image = list(related.iter_parts())
    assert html.get_content_type() == "text/html"
    assert image["Content-ID"] == "<logo.png>"
    shown = json.loads(pr.cli("show", msg_id, "--json").stdout)
    assert shown["sender"] == "post@bücher.example" and shown["recipients"] == ["b@x.org"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--subject", "Hi\r\nBcc: victim@example.net"], "subject contains a line break"),
    (["--header", "X-A: 1\nBcc: victim@example.net"], "header X-A contains a line break"),
    (["--header", "no colon here"], "write it as 'Name: value'"),
    (["--header", "Content-Type: text/html"], "cannot be set"),
    (["--to", "Name <not-an-address>"], "malformed address"),
])
def test_cli_send_refuses_bad_input_and_stores_nothing(tmp_path: Path, args: list[str],
                                                       needle: str) -> None:
    pr = Postroom(tmp_path / "pr", connections=smtp_connection(free_port()))
    out = pr.cli("send", "--from", "a@x.org", "--to", "b@x.org", "--text", "x", *args)
    assert out.returncode == 1
    err = out.stderr.decode()
    assert needle in err and "Traceback" not in err, err
    assert pr.cli("log", "--json").stdout.strip() == b""
