"""The SMTP transport against real peers (Postfix + Dovecot, tests/peers/README.md) and,
where a behaviour cannot be provoked on Postfix, a tiny in-process aiosmtpd server.

Every test sends a message with a unique Subject and reads it back from the Maildir. Postfix
prepends Return-Path, X-Original-To, Delivered-To and Received and stores lines with LF; the
rest of the file must be exactly the bytes we sent.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from postroom.envelope import Envelope
from postroom.exceptions import (
    AuthError,
    ConfigError,
    ConnectError,
    DataRejected,
    DeliveryError,
    ProtocolError,
    SenderRejected,
    TimeoutError_,
    TLSError,
    UnsupportedFeature,
)
from postroom.transports.base import DeliveryResult, TransportContext
from postroom.transports.smtp import Settings, Transport

pytestmark = [pytest.mark.peers]

TESTUSER = "testuser@example.test"
ALICE = "alice@example.test"
UTF8USER = "utf8user@example.test"
IDN_RCPT = "δοκιμή@example.test"
SENDER = "postroom-test@example.org"
SEND_TIMEOUT = 60.0  # upper bound for one transport call (auth failures cost Dovecot's 2 s)
MAILDIR_TIMEOUT = 30.0
TRACE_HEADERS = (b"return-path:", b"x-original-to:", b"delivered-to:", b"received:")


# -- helpers ---------------------------------------------------------------------------------------
def new_subject(tag: str) -> str:
    return f"postroom-smtp-{tag}-{uuid.uuid4().hex[:12]}"


def make_message(subject: str, to: str, *, body: bytes | None = None, sender: str = SENDER,
                 extra_headers: bytes = b"") -> bytes:
    """An RFC 5322 message with CRLF line ends; the body includes a dot-stuffing case."""
    if body is None:
        body = (
            b"Hello from the Postroom SMTP transport test.\r\n"
            b".a line starting with a dot must arrive unchanged\r\n"
            b"..and one starting with two dots\r\n"
            b"\r\n"
            b"tail line with trailing spaces   \r\n"
        )
    head = (
        f"From: <{sender}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@postroom.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
    ).encode() + extra_headers
    return head + b"\r\n" + body


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {
        "name": "up",
        "host": "127.0.0.1",
        "connect_timeout": 10,
        "timeout": 30,
    }
    base.update(kw)
    return Settings(**base)


def transport(s: Settings, **ctx: Any) -> Transport:
    return Transport(s, TransportContext(ehlo_name="postroom.test", **ctx))


async def _bounded(coro: Any) -> Any:
    return await asyncio.wait_for(coro, SEND_TIMEOUT)


def send(s: Settings, env: Envelope, **ctx: Any) -> DeliveryResult:
    """Send one envelope through a fresh Transport and close it, bounded in time."""

    async def go() -> DeliveryResult:
        t = transport(s, **ctx)
        try:
            return await _bounded(t.send(env))  # type: ignore[no-any-return]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    return asyncio.run(go())


def send_fails(s: Settings, env: Envelope, exc: type[DeliveryError], **ctx: Any) -> Any:
    with pytest.raises(exc) as info:
        send(s, env, **ctx)
    return info.value


def client_lines(transcript: str) -> list[str]:
    return [ln[3:] for ln in transcript.splitlines() if ln.startswith("C: ")]


def strip_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """Split a Maildir file into (trace header fields Postfix prepended, the rest)."""
    fields: list[bytes] = []
    rest = stored
    while True:
        line_end = rest.find(b"\n")
        if line_end < 0:
            break
        first = rest[: line_end + 1]
        if not first.lower().startswith(TRACE_HEADERS):
            break
        end = line_end + 1
        while end < len(rest) and rest[end : end + 1] in (b" ", b"\t"):  # folded lines
            nxt = rest.find(b"\n", end)
            end = len(rest) if nxt < 0 else nxt + 1
        fields.append(rest[:end])
        rest = rest[end:]
    return fields, rest


def assert_delivered(peers: Any, mailbox: str, subject: str, raw: bytes, *,
                     auth_user: str | None = TESTUSER, sender: str = SENDER) -> bytes:
    """Wait for the message in ``mailbox``'s Maildir and compare it with what was sent."""
    stored: bytes = peers.wait_for(mailbox, subject, timeout=MAILDIR_TIMEOUT).raw
    trace, rest = strip_trace(stored)
    names = [f.split(b":", 1)[0].lower() for f in trace]
    assert names[:3] == [b"return-path", b"x-original-to", b"delivered-to"], trace
    assert b"received" in names, trace
    assert trace[0].strip() == f"Return-Path: <{sender}>".encode()
    assert f"Delivered-To: {mailbox}".encode() in b"".join(trace)
    received = b"".join(f for f in trace if f.lower().startswith(b"received:"))
    if auth_user is not None:
        assert f"(Authenticated sender: {auth_user})".encode() in received, received
        # ESMTPSA / ESMTPA, or UTF8SMTPSA when the transaction used SMTPUTF8
        assert re.search(rb"\bwith (ESMTP|UTF8SMTP)S?A\b", received), received
    # Byte for byte: exactly what we sent, with CRLF stored as LF by virtual(8).
    assert rest == raw.replace(b"\r\n", b"\n")
    return stored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- an in-process fake upstream (aiosmtpd) for what Postfix will not do ---------------------------
@dataclass
class FakeHandler:
    """Accepts everything except a few magic recipients; records every transaction."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    messages: list[Any] = field(default_factory=list)
    mail_froms: list[str] = field(default_factory=list)
    connections: int = 0
    mail_reply: str | None = None  # the next MAIL gets this reply (once)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.connections += 1
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self.mail_reply is not None:
            reply, self.mail_reply = self.mail_reply, None
            return reply
        self.mail_froms.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope)
        return "250 2.0.0 queued as FAKE"


@dataclass
class Fake:
    handler: FakeHandler
    port: int


@pytest.fixture
def fake_smtp() -> Iterator[Callable[..., Fake]]:
    """Start aiosmtpd servers in threads on free ports; all are stopped at the end."""
    started: list[Controller] = []

    def start(**smtp_params: Any) -> Fake:
        handler = FakeHandler()
        port = free_port()
        ctl = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10,
                         **smtp_params)
        ctl.start()
        started.append(ctl)
        return Fake(handler, port)

    yield start
    for ctl in started:
        ctl.stop()


# -- authentication mechanisms ---------------------------------------------------------------------
@pytest.mark.parametrize("port,security", [(10587, "starttls"), (10465, "smtps")],
                         ids=["starttls", "smtps"])
@pytest.mark.parametrize("mech", ["plain", "login", "cram-md5"])
def test_password_mechanisms_deliver(peers: Any, mech: str, port: int, security: str) -> None:
    subject = new_subject(f"{mech}-{security}")
    raw = make_message(subject, TESTUSER)
    s = settings(port=port, security=security, auth=mech, username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert result.reply_code == 250
    assert f"C: AUTH {mech.upper()}" in result.transcript
    assert "S: 235" in result.transcript
    assert "testpass" not in result.transcript
    stored = assert_delivered(peers, TESTUSER, subject, raw)
    assert b"TLSv1.3" in stored or b"TLSv1.2" in stored


@pytest.mark.parametrize("mech", ["xoauth2", "oauthbearer"])
@pytest.mark.parametrize("port,security", [(10587, "starttls"), (10465, "smtps")],
                         ids=["starttls", "smtps"])
def test_oauth_mechanisms_deliver(peers: Any, mech: str, port: int, security: str,
                                  tmp_path: Path) -> None:
    token = peers.oauth_token(TESTUSER)
    assert token
    subject = new_subject(f"{mech}-{security}")
    raw = make_message(subject, TESTUSER)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n", encoding="utf-8")
    s = settings(port=port, security=security, auth=mech, username=TESTUSER,
                 oauth_token_file=token_file, ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert f"C: AUTH {mech.upper()} ********" in result.transcript
    assert token not in result.transcript
    assert_delivered(peers, TESTUSER, subject, raw)


def test_xoauth2_token_from_token_provider(peers: Any) -> None:
    token = peers.oauth_token(TESTUSER)
    asked: list[tuple[str, bool]] = []

    class Tokens:
        def token(self, connection: str, *, refresh: bool = False,
                  rejected: str | None = None) -> str:
            asked.append((connection, refresh))
            return str(token)

    subject = new_subject("xoauth2-provider")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10587, security="starttls", auth="xoauth2", username=TESTUSER,
                 ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw), tokens=Tokens())
    assert result.recipients[TESTUSER].code == 250
    assert asked == [("up", False)]
    assert_delivered(peers, TESTUSER, subject, raw)


def test_bad_oauth_token_is_rejected(peers: Any) -> None:
    token = "not-a-valid-token-" + uuid.uuid4().hex
    s = settings(port=10587, security="starttls", auth="xoauth2", username=TESTUSER,
                 ca_file=peers.ca_file)
    raw = make_message(new_subject("bad-token"), TESTUSER)

    asked: list[bool] = []

    class Tokens:
        def token(self, connection: str, *, refresh: bool = False,
                  rejected: str | None = None) -> str:
            asked.append(refresh)
            return token

    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), AuthError, tokens=Tokens())
    assert asked == [False, True]  # refreshed once, then given up
    assert err.code == "auth.rejected"
    assert err.reply_code == 535
    assert err.permanent is True
    assert token not in err.transcript
    # The XOAUTH2 error dance: the server's JSON 334, our (redacted) empty reply, then 535.
    assert "S: 334 " in err.transcript
    assert "S: 535" in err.transcript


def test_rejected_oauth_token_is_refreshed_once(peers: Any) -> None:
    """A revoked or expired access token: the provider is asked for a fresh one and the
    AUTH is retried on the same session, so the message still goes."""
    good = peers.oauth_token(TESTUSER)
    asked: list[bool] = []

    class Tokens:
        def token(self, connection: str, *, refresh: bool = False,
                  rejected: str | None = None) -> str:
            asked.append(refresh)
            return str(good) if refresh else "stale-" + uuid.uuid4().hex

    subject = new_subject("xoauth2-refresh")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10587, security="starttls", auth="xoauth2", username=TESTUSER,
                 ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw), tokens=Tokens())
    assert result.recipients[TESTUSER].code == 250
    assert asked == [False, True]
    # This provider does not say whether it refreshed: the transcript claims no refresh.
    assert "asked the token provider to refresh it once" in result.transcript
    assert str(good) not in result.transcript
    assert_delivered(peers, TESTUSER, subject, raw)


def test_utf8_password(peers: Any) -> None:
    subject = new_subject("utf8-password")
    raw = make_message(subject, UTF8USER)
    s = settings(port=10587, security="starttls", auth="plain", username=UTF8USER,
                 password="pässwörd€", ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [UTF8USER], raw))
    assert result.recipients[UTF8USER].code == 250
    assert "pässwörd€" not in result.transcript
    assert_delivered(peers, UTF8USER, subject, raw, auth_user=UTF8USER)


@pytest.mark.parametrize("mech", ["login", "cram-md5"])
def test_utf8_password_other_mechanisms(peers: Any, mech: str) -> None:
    subject = new_subject(f"utf8-password-{mech}")
    raw = make_message(subject, UTF8USER)
    s = settings(port=10465, security="smtps", auth=mech, username=UTF8USER,
                 password="pässwörd€", ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [UTF8USER], raw))
    assert result.recipients[UTF8USER].code == 250
    assert_delivered(peers, UTF8USER, subject, raw, auth_user=UTF8USER)


@pytest.mark.parametrize("auth", ["auto", None], ids=["auto", "default"])
def test_auth_auto_picks_plain(peers: Any, auth: str | None) -> None:
    subject = new_subject("auth-auto")
    raw = make_message(subject, ALICE)
    s = settings(port=10587, security="starttls", auth=auth, username=ALICE,
                 password="alicepass", ca_file=peers.ca_file)
    assert s.effective_auth == "auto"
    result = send(s, Envelope(SENDER, [ALICE], raw))
    assert result.recipients[ALICE].code == 250
    assert "C: AUTH PLAIN ********" in result.transcript
    assert_delivered(peers, ALICE, subject, raw, auth_user=ALICE)


# -- where the password comes from -----------------------------------------------------------------
def test_password_from_env(peers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    var = "POSTROOM_TEST_SMTP_PASSWORD"
    monkeypatch.setenv(var, "testpass")
    subject = new_subject("password-env")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10587, security="starttls", auth="login", username=TESTUSER,
                 password_env=var, ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert_delivered(peers, TESTUSER, subject, raw)


def test_password_env_unset_is_transient_auth_error(peers: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    var = "POSTROOM_TEST_SMTP_PASSWORD_UNSET"
    monkeypatch.delenv(var, raising=False)
    s = settings(port=10587, security="starttls", auth="plain", username=TESTUSER,
                 password_env=var, ca_file=peers.ca_file)
    raw = make_message(new_subject("password-env-unset"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), AuthError)
    assert err.code == "auth.secret_missing"
    assert err.permanent is False
    assert not any(ln.startswith("AUTH") for ln in client_lines(err.transcript))


def test_password_from_file(peers: Any, tmp_path: Path) -> None:
    pw = tmp_path / "smtp-password"
    pw.write_text("testpass\n", encoding="utf-8")  # the trailing newline is not the password
    pw.chmod(0o600)
    subject = new_subject("password-file")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10465, security="smtps", auth="cram-md5", username=TESTUSER,
                 password_file=pw, ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert_delivered(peers, TESTUSER, subject, raw)


def test_password_file_utf8(peers: Any, tmp_path: Path) -> None:
    pw = tmp_path / "smtp-password"
    pw.write_bytes("pässwörd€\r\n".encode())
    subject = new_subject("password-file-utf8")
    raw = make_message(subject, UTF8USER)
    s = settings(port=10587, security="starttls", auth="plain", username=UTF8USER,
                 password_file=pw, ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [UTF8USER], raw))
    assert result.recipients[UTF8USER].code == 250
    assert_delivered(peers, UTF8USER, subject, raw, auth_user=UTF8USER)


# -- SMTPUTF8 --------------------------------------------------------------------------------------
def test_smtputf8_recipient_delivered(peers: Any) -> None:
    subject = new_subject("smtputf8")
    raw = make_message(subject, IDN_RCPT)
    s = settings(port=10587, security="starttls", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [IDN_RCPT], raw))
    assert result.recipients[IDN_RCPT].code == 250
    mail_cmd = next(ln for ln in client_lines(result.transcript) if ln.startswith("mail FROM"))
    assert "SMTPUTF8" in mail_cmd
    assert f"rcpt TO:<{IDN_RCPT}>" in client_lines(result.transcript)
    stored = assert_delivered(peers, IDN_RCPT, subject, raw)
    assert b" with UTF8SMTPSA " in stored  # Postfix saw an SMTPUTF8 transaction


def test_smtputf8_headers_delivered(peers: Any) -> None:
    """UTF-8 in header values (RFC 6532) with ASCII addresses: sent with SMTPUTF8.

    (Field *names* must stay ASCII: Postfix ends the header section at a non-ASCII name.)
    """
    subject = new_subject("utf8-header")
    raw = make_message(subject, TESTUSER, extra_headers="X-Greeting: Grüße, Ünïcødé ✓\r\n".encode(),
                       body="Grüße aus dem Postraum — ✓\r\n".encode())
    s = settings(port=10465, security="smtps", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    mail_cmd = next(ln for ln in client_lines(result.transcript) if ln.startswith("mail FROM"))
    assert "SMTPUTF8" in mail_cmd and "BODY=8BITMIME" in mail_cmd
    stored = assert_delivered(peers, TESTUSER, subject, raw)
    assert b" with UTF8SMTPSA " in stored


@pytest.mark.parametrize("who", ["recipient", "sender"])
def test_smtputf8_needed_but_not_offered(fake_smtp: Callable[..., Fake], who: str) -> None:
    fake = fake_smtp(enable_SMTPUTF8=False)
    sender, rcpt = (SENDER, IDN_RCPT) if who == "recipient" else ("прием@example.org", ALICE)
    raw = make_message(new_subject("no-smtputf8"), "someone@example.test")
    s = settings(port=fake.port, security="none")
    err = send_fails(s, Envelope(sender, [rcpt], raw), UnsupportedFeature)
    assert err.permanent is True
    assert err.code == "message.smtputf8"
    assert "SMTPUTF8" in str(err)
    assert "S: 250" in err.transcript  # EHLO happened; the features were read
    assert not any(ln.lower().startswith("mail") for ln in client_lines(err.transcript))
    assert fake.handler.mail_froms == [] and fake.handler.messages == []


# -- failures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mech", ["plain", "login", "cram-md5"])
def test_wrong_password(peers: Any, mech: str) -> None:
    secret = "wrong-" + uuid.uuid4().hex[:10]
    s = settings(port=10587, security="starttls", auth=mech, username=TESTUSER,
                 password=secret, ca_file=peers.ca_file)
    raw = make_message(new_subject(f"wrong-password-{mech}"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), AuthError)
    assert err.permanent is True
    assert err.code == "auth.rejected"
    assert err.reply_code == 535
    assert err.after_data is False
    t = err.transcript
    assert "********" in t
    assert f"C: AUTH {mech.upper()}" in t
    assert "S: 535" in t
    forbidden = [
        secret,
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(f"\0{TESTUSER}\0{secret}".encode()).decode(),
    ]
    for f in forbidden:
        assert f not in t, f
        assert f not in str(err)
    assert secret not in repr(err)


def test_untrusted_certificate(peers: Any) -> None:
    raw = make_message(new_subject("untrusted"), TESTUSER)
    for port, security in ((10587, "starttls"), (10465, "smtps")):
        s = settings(port=port, security=security, auth="plain", username=TESTUSER,
                     password="testpass")  # no ca_file: the private CA is not trusted
        err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), TLSError)
        assert err.code == "tls.certificate", security
        assert err.permanent is False
        assert "ca_file" in str(err)
        assert not any(ln.startswith("AUTH") for ln in client_lines(err.transcript))
        assert "testpass" not in err.transcript


def test_trusted_with_ca_file_and_server_name(peers: Any) -> None:
    subject = new_subject("tls-server-name")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10465, security="smtps", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file,
                 tls_server_name="mail.example.test")
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert_delivered(peers, TESTUSER, subject, raw)


def test_wrong_server_name_is_certificate_error(peers: Any) -> None:
    s = settings(port=10465, security="smtps", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file,
                 tls_server_name="not-the-server.example.test")
    raw = make_message(new_subject("wrong-name"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), TLSError)
    assert err.code == "tls.certificate"


def test_plaintext_auth_refused(peers: Any) -> None:
    s = settings(port=peers.legacy_port, security="none", auth="plain", username=TESTUSER,
                 password="testpass")
    raw = make_message(new_subject("plaintext-refused"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), AuthError)
    assert err.code == "auth.plaintext_refused"
    assert err.permanent is True
    lines = client_lines(err.transcript)
    assert any(ln.lower().startswith("ehlo") for ln in lines)  # we did talk to the server
    assert "AUTH" in err.transcript  # ... which offered AUTH in the clear
    assert not any(ln.upper().startswith("AUTH") for ln in lines)
    assert "testpass" not in err.transcript


def test_plaintext_auth_allowed(peers: Any) -> None:
    subject = new_subject("plaintext-allowed")
    raw = make_message(subject, TESTUSER)
    s = settings(port=peers.legacy_port, security="none", auth="plain", username=TESTUSER,
                 password="testpass", allow_plaintext_auth=True)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert "C: AUTH PLAIN ********" in result.transcript
    assert "STARTTLS" not in client_lines(result.transcript)
    stored = assert_delivered(peers, TESTUSER, subject, raw)
    assert b"with ESMTPA " in stored  # authenticated, not TLS


def test_smtps_against_starttls_port(peers: Any) -> None:
    s = settings(port=10587, security="smtps", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    raw = make_message(new_subject("smtps-on-587"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), TLSError)
    assert err.code == "tls.handshake"
    assert "WRONG_VERSION_NUMBER" in str(err) or "wrong version number" in str(err).lower()
    assert "starttls" in str(err)  # the hint
    assert "testpass" not in err.transcript


def test_starttls_not_offered(peers: Any) -> None:
    s = settings(port=10025, security="starttls")
    raw = make_message(new_subject("no-starttls"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), TLSError)
    assert err.code == "tls.starttls_unavailable"
    assert "STARTTLS" not in client_lines(err.transcript)
    assert not any(ln.lower().startswith("mail") for ln in client_lines(err.transcript))


def test_connection_refused() -> None:
    port = free_port()  # bound and released: nothing listens there
    s = settings(port=port, security="starttls", auth="plain", username=TESTUSER,
                 password="testpass")
    raw = make_message(new_subject("refused"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), ConnectError)
    assert err.code == "connect.refused"
    assert err.permanent is False
    assert f"connecting to 127.0.0.1:{port}" in err.transcript


# -- per-recipient results -------------------------------------------------------------------------
def test_per_recipient_results_postfix(peers: Any) -> None:
    """Postfix accepts every domain but rejects bad address syntax with 501."""
    bad = "nobody@bad..example.test"
    subject = new_subject("per-rcpt-postfix")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10587, security="starttls", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    result = send(s, Envelope(SENDER, [bad, TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    assert result.recipients[bad].code == 501
    assert result.recipients[bad].permanent
    assert "5.1.3" in result.recipients[bad].reply
    assert_delivered(peers, TESTUSER, subject, raw)


def test_per_recipient_results_fake(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    gone, later = "gone@example.test", "later@example.test"
    fake.handler.rcpt_replies = {
        gone: "550 5.1.1 <gone@example.test>: mailbox unavailable",
        later: "450 4.2.1 <later@example.test>: try again later",
    }
    raw = make_message(new_subject("per-rcpt-fake"), ALICE)
    s = settings(port=fake.port, security="none")
    result = send(s, Envelope(SENDER, [gone, ALICE, later], raw))
    r = result.recipients
    assert list(r) == [gone, ALICE, later]
    assert (r[gone].code, r[gone].permanent, r[gone].ok) == (550, True, False)
    assert "mailbox unavailable" in r[gone].reply
    assert (r[later].code, r[later].permanent, r[later].ok) == (450, False, False)
    assert "try again later" in r[later].reply
    assert r[ALICE].ok and r[ALICE].code == 250
    assert "queued as FAKE" in r[ALICE].reply
    assert len(fake.handler.messages) == 1
    got = fake.handler.messages[0]
    assert got.rcpt_tos == [ALICE]
    assert got.original_content == raw


def test_every_recipient_rejected(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    fake.handler.rcpt_replies = {
        "a@example.test": "550 5.1.1 no",
        "b@example.test": "451 4.3.0 later",
    }
    raw = make_message(new_subject("all-rejected"), "a@example.test")
    s = settings(port=fake.port, security="none")
    result = send(s, Envelope(SENDER, ["a@example.test", "b@example.test"], raw))
    assert result.recipients["a@example.test"].code == 550
    assert result.recipients["b@example.test"].code == 451
    assert result.reply_code is None
    assert "DATA" not in [ln.upper() for ln in client_lines(result.transcript)]
    assert fake.handler.messages == []


# -- session reuse ---------------------------------------------------------------------------------
def test_session_reuse(peers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[tuple[Any, ...]] = []
    real_open_connection = asyncio.open_connection

    async def counting(host: str, port: int, **kw: Any) -> Any:
        connects.append((host, port))
        return await real_open_connection(host, port, **kw)

    monkeypatch.setattr(asyncio, "open_connection", counting)
    s = settings(port=10587, security="starttls", auth="cram-md5", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    subjects = [new_subject(f"reuse-{i}") for i in range(3)]
    raws = [make_message(subj, TESTUSER) for subj in subjects]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            return [await _bounded(t.send(Envelope(SENDER, [TESTUSER], raw))) for raw in raws]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    results = asyncio.run(go())
    assert connects == [("127.0.0.1", 10587)]
    first, *later = (r.transcript for r in results)
    assert "connecting to 127.0.0.1:10587" in first and "C: AUTH CRAM-MD5" in first
    for n, t in enumerate(later, start=2):
        assert f"reusing session to 127.0.0.1 (message {n})" in t
        lines = client_lines(t)
        assert lines[0].startswith("mail FROM")  # no RSET round trip before a clean session
        assert not any(ln.upper().startswith(("AUTH", "EHLO", "STARTTLS")) for ln in lines)
        assert "connecting to" not in t
    for r in results:
        assert r.recipients[TESTUSER].code == 250
    for subj, raw in zip(subjects, raws, strict=True):
        assert_delivered(peers, TESTUSER, subj, raw)


def test_session_reuse_fake_counts_connections(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    s = settings(port=fake.port, security="none", max_messages_per_session=2)
    raws = [make_message(new_subject(f"fake-reuse-{i}"), ALICE) for i in range(3)]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            return [await _bounded(t.send(Envelope(SENDER, [ALICE], raw))) for raw in raws]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    results = asyncio.run(go())
    # max_messages_per_session = 2: the third message needs a new session.
    assert fake.handler.connections == 2
    assert "reusing session" in results[1].transcript
    assert "connecting to" in results[2].transcript
    assert [m.original_content for m in fake.handler.messages] == raws


# -- size limit ------------------------------------------------------------------------------------
def test_message_over_advertised_size(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp(data_size_limit=2000)
    raw = make_message(new_subject("too-big"), ALICE, body=(b"y" * 78 + b"\r\n") * 100)
    assert len(raw) > 2000
    s = settings(port=fake.port, security="none")
    err = send_fails(s, Envelope(SENDER, [ALICE], raw), DataRejected)
    assert err.permanent is True
    assert err.code == "data.too_big"
    assert err.reply_code == 552
    assert "2000" in str(err)
    lines = [ln.upper() for ln in client_lines(err.transcript)]
    assert "DATA" not in lines
    assert not any(ln.startswith("MAIL") for ln in lines)
    assert fake.handler.messages == [] and fake.handler.mail_froms == []


def test_message_over_postfix_size(peers: Any) -> None:
    """Postfix advertises SIZE 10240000; an 11 MB message is refused before MAIL."""
    raw = make_message(new_subject("too-big-postfix"), TESTUSER,
                       body=(b"z" * 998 + b"\r\n") * 11_000)
    s = settings(port=10587, security="starttls", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), DataRejected)
    assert err.code == "data.too_big" and err.permanent is True
    assert "DATA" not in [ln.upper() for ln in client_lines(err.transcript)]


def test_size_under_limit_sends_size_param(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp(data_size_limit=100_000)
    raw = make_message(new_subject("size-ok"), ALICE)
    s = settings(port=fake.port, security="none")
    result = send(s, Envelope(SENDER, [ALICE], raw))
    assert result.recipients[ALICE].code == 250
    assert fake.handler.messages[0].original_content == raw
    mail_cmd = next(ln for ln in client_lines(result.transcript) if ln.startswith("mail FROM"))
    assert f"SIZE={len(raw)}" in mail_cmd


# -- check() ---------------------------------------------------------------------------------------
def test_check_authenticates_without_sending(peers: Any) -> None:
    s = settings(port=10465, security="smtps", auth="login", username=ALICE,
                 password="alicepass", ca_file=peers.ca_file)

    async def go() -> str:
        t = transport(s)
        try:
            return await _bounded(t.check())  # type: ignore[no-any-return]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    transcript = asyncio.run(go())
    assert "S: 235" in transcript
    assert "alicepass" not in transcript
    assert not any(ln.lower().startswith("mail") for ln in client_lines(transcript))


def test_threads_do_not_leak(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    before = {t.name for t in threading.enumerate()}
    s = settings(name="leakcheck", port=fake.port, security="none")
    send(s, Envelope(SENDER, [ALICE], make_message(new_subject("leak"), ALICE)))
    for t in threading.enumerate():
        if t.name.startswith("smtp-leakcheck") and t.name not in before:
            t.join(timeout=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("smtp-leakcheck")]


# -- more envelopes and bodies through Postfix -----------------------------------------------------
def test_null_sender_and_awkward_body(peers: Any) -> None:
    """A bounce (MAIL FROM:<>), a line that is just ".", and a body without a final CRLF."""
    subject = new_subject("null-sender")
    body = b"first\r\n.\r\n..\r\n. \r\nlast line without CRLF"
    raw = make_message(subject, ALICE, body=body, sender="mailer-daemon@example.org")
    s = settings(port=10465, security="smtps", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    result = send(s, Envelope("", [ALICE], raw))
    assert result.recipients[ALICE].code == 250
    assert any(ln.startswith("mail FROM:<> ") for ln in client_lines(result.transcript))
    # The transport terminates the last line itself; everything else arrives unchanged.
    assert_delivered(peers, ALICE, subject, raw + b"\r\n", sender="")


def test_unauthenticated_submission_is_per_recipient_554(peers: Any) -> None:
    """No AUTH on the submission port: Postfix refuses at RCPT; nothing is delivered."""
    s = settings(port=10587, security="starttls", ca_file=peers.ca_file)
    assert s.effective_auth == "none"
    raw = make_message(new_subject("no-auth"), TESTUSER)
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    r = result.recipients[TESTUSER]
    assert r.code == 554 and r.permanent and "Access denied" in r.reply
    assert result.reply_code is None
    # Pipelined, DATA went out with the RCPT; Postfix refused it (no valid recipients), so
    # no message data was sent.
    assert "<message data" not in result.transcript
    assert "S: 554 5.5.1 Error: no valid recipients" in result.transcript


def test_mechanism_not_offered(peers: Any) -> None:
    """Port 10025 offers no AUTH at all: a configured mechanism cannot be used."""
    s = settings(port=10025, security="none", auth="plain", username=TESTUSER,
                 password="testpass", allow_plaintext_auth=True)
    raw = make_message(new_subject("no-mech"), TESTUSER)
    err = send_fails(s, Envelope(SENDER, [TESTUSER], raw), AuthError)
    assert err.code == "auth.mechanism_unavailable"
    assert err.permanent is True
    assert not any(ln.upper().startswith("AUTH") for ln in client_lines(err.transcript))


# -- protocol edge cases against the fake ----------------------------------------------------------
@pytest.mark.parametrize("reply,permanent", [("553 5.7.1 sender not allowed", True),
                                             ("451 4.3.0 try later", False)])
def test_sender_rejected(fake_smtp: Callable[..., Fake], reply: str, permanent: bool) -> None:
    fake = fake_smtp()

    async def reject_mail(server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        return reply

    fake.handler.handle_MAIL = reject_mail  # type: ignore[method-assign]
    raw = make_message(new_subject("sender-rejected"), ALICE)
    err = send_fails(settings(port=fake.port, security="none"),
                     Envelope(SENDER, [ALICE], raw), SenderRejected)
    assert err.code == "sender.rejected"
    assert err.permanent is permanent
    assert err.reply_code == int(reply[:3])
    assert not any(ln.lower().startswith("rcpt") for ln in client_lines(err.transcript))


def test_data_rejected_after_dot(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()

    async def reject_data(server: Any, session: Any, envelope: Any) -> str:
        return "554 5.6.0 content rejected"

    fake.handler.handle_DATA = reject_data  # type: ignore[method-assign]
    raw = make_message(new_subject("data-rejected"), ALICE)
    result = send(settings(port=fake.port, security="none"),
                  Envelope(SENDER, [ALICE, "bob@example.test"], raw))
    assert result.reply_code == 554
    for r in result.recipients.values():
        assert (r.code, r.permanent) == (554, True)
        assert "content rejected" in r.reply


def test_timeout_waiting_for_final_reply_is_ambiguous(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    release = threading.Event()

    async def slow_data(server: Any, session: Any, envelope: Any) -> str:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return "250 2.0.0 late"

    fake.handler.handle_DATA = slow_data  # type: ignore[method-assign]
    raw = make_message(new_subject("slow-data"), ALICE)
    s = settings(port=fake.port, security="none", timeout=1)
    try:
        err = send_fails(s, Envelope(SENDER, [ALICE], raw), TimeoutError_)
    finally:
        release.set()
    assert err.code == "timeout"
    assert err.permanent is False
    assert err.after_data is True  # the data was sent: it may or may not have been accepted
    assert "C: <message data," in err.transcript


def test_timeout_before_data_is_not_ambiguous(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    release = threading.Event()

    async def slow_rcpt(server: Any, session: Any, envelope: Any, address: str,
                        rcpt_options: list[str]) -> str:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        return "250 OK"

    fake.handler.handle_RCPT = slow_rcpt  # type: ignore[method-assign]
    raw = make_message(new_subject("slow-rcpt"), ALICE)
    s = settings(port=fake.port, security="none", timeout=1)
    try:
        err = send_fails(s, Envelope(SENDER, [ALICE], raw), TimeoutError_)
    finally:
        release.set()
    assert err.after_data is False


@pytest.fixture
def raw_listener() -> Iterator[Callable[[bytes | None], int]]:
    """A TCP listener that sends ``greeting`` (or nothing) to each client and keeps it open."""
    socks: list[socket.socket] = []
    stop = threading.Event()

    def start(greeting: bytes | None) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(5)
        srv.settimeout(0.2)
        socks.append(srv)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except OSError:
                    continue
                socks.append(conn)
                if greeting is not None:
                    conn.sendall(greeting)

        threading.Thread(target=serve, daemon=True).start()
        return int(srv.getsockname()[1])

    yield start
    stop.set()
    for s in socks:
        s.close()


def test_silent_server_times_out(raw_listener: Callable[[bytes | None], int]) -> None:
    port = raw_listener(None)
    s = settings(port=port, security="none", connect_timeout=1)
    raw = make_message(new_subject("silent"), ALICE)
    err = send_fails(s, Envelope(SENDER, [ALICE], raw), TimeoutError_)
    assert err.permanent is False and err.after_data is False


def test_greeting_refusal(raw_listener: Callable[[bytes | None], int]) -> None:
    port = raw_listener(b"554 5.3.2 no SMTP service here\r\n")
    s = settings(port=port, security="none", connect_timeout=5)
    raw = make_message(new_subject("greeting-554"), ALICE)
    err = send_fails(s, Envelope(SENDER, [ALICE], raw), ConnectError)
    assert err.code == "connect.greeting"
    assert err.permanent is True
    assert err.reply_code == 554


def test_temporary_auth_failure_is_transient(fake_smtp: Callable[..., Fake]) -> None:
    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False,
                          message="454 4.7.0 Temporary authentication failure")

    fake = fake_smtp(authenticator=authenticator, auth_require_tls=False)
    s = settings(port=fake.port, security="none", auth="plain", username=ALICE,
                 password="alicepass", allow_plaintext_auth=True)
    raw = make_message(new_subject("auth-454"), ALICE)
    err = send_fails(s, Envelope(SENDER, [ALICE], raw), AuthError)
    assert err.code == "auth.rejected"
    assert err.reply_code == 454
    assert err.permanent is False
    assert "alicepass" not in err.transcript


def test_stale_pooled_session_is_replaced(fake_smtp: Callable[..., Fake]) -> None:
    """The server dropped the idle connection: the next send notices (MAIL gets no reply,
    nothing was sent) and reconnects instead of failing."""
    fake = fake_smtp(timeout=1)  # aiosmtpd closes a connection idle for 1 s
    s = settings(port=fake.port, security="none", idle_timeout=60)
    raws = [make_message(new_subject(f"stale-{i}"), ALICE) for i in range(2)]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            first = await _bounded(t.send(Envelope(SENDER, [ALICE], raws[0])))
            await asyncio.sleep(2.5)
            second = await _bounded(t.send(Envelope(SENDER, [ALICE], raws[1])))
            return [first, second]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    results = asyncio.run(go())
    t2 = results[1].transcript
    assert "reusing session" in t2
    assert t2.index("reusing session") < t2.index("connecting to")
    assert results[1].recipients[ALICE].code == 250
    assert fake.handler.connections == 2
    assert [m.original_content for m in fake.handler.messages] == raws


def test_idle_timeout_closes_pooled_session(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    s = settings(port=fake.port, security="none", idle_timeout=0.5)
    raws = [make_message(new_subject(f"idle-{i}"), ALICE) for i in range(2)]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            first = await _bounded(t.send(Envelope(SENDER, [ALICE], raws[0])))
            await asyncio.sleep(1.0)
            second = await _bounded(t.send(Envelope(SENDER, [ALICE], raws[1])))
            return [first, second]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    results = asyncio.run(go())
    assert "reusing session" not in results[1].transcript
    assert "connecting to" in results[1].transcript
    assert fake.handler.connections == 2


def test_concurrent_sends_bounded_by_pool_size(fake_smtp: Callable[..., Fake]) -> None:
    fake = fake_smtp()
    s = settings(port=fake.port, security="none", pool_size=2)
    raws = [make_message(new_subject(f"conc-{i}"), ALICE) for i in range(8)]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            return list(await _bounded(asyncio.gather(
                *(t.send(Envelope(SENDER, [ALICE], raw)) for raw in raws))))
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    results = asyncio.run(go())
    assert all(r.recipients[ALICE].code == 250 for r in results)
    assert 1 <= fake.handler.connections <= 2
    assert sorted(m.original_content for m in fake.handler.messages) == sorted(raws)


def test_smtputf8_sender_delivered(peers: Any) -> None:
    sender = "отправитель@example.org"
    subject = new_subject("smtputf8-sender")
    raw = make_message(subject, TESTUSER, sender=sender)
    s = settings(port=10587, security="starttls", auth="plain", username=TESTUSER,
                 password="testpass", ca_file=peers.ca_file)
    result = send(s, Envelope(sender, [TESTUSER], raw))
    assert result.recipients[TESTUSER].code == 250
    stored = assert_delivered(peers, TESTUSER, subject, raw, sender=sender)
    assert b" with UTF8SMTPSA " in stored


def test_plain_port_without_auth(peers: Any) -> None:
    subject = new_subject("plain-noauth")
    raw = make_message(subject, "bob@example.test")
    s = settings(port=peers.plain_port, security="none")
    result = send(s, Envelope(SENDER, ["bob@example.test"], raw))
    assert result.recipients["bob@example.test"].code == 250
    assert not any(ln.upper().startswith(("AUTH", "STARTTLS")) for ln in
                   client_lines(result.transcript))
    stored = assert_delivered(peers, "bob@example.test", subject, raw, auth_user=None)
    assert b" with ESMTP id " in stored


def test_tls_verify_off_warns_and_works(peers: Any, caplog: pytest.LogCaptureFixture) -> None:
    subject = new_subject("tls-verify-off")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10465, security="smtps", auth="plain", username=TESTUSER,
                 password="testpass", tls_verify=False)
    with caplog.at_level("WARNING", logger="postroom.transports.smtp"):
        result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert "verification is OFF" in caplog.text
    assert result.recipients[TESTUSER].code == 250
    assert_delivered(peers, TESTUSER, subject, raw)


def test_ca_file_not_pem_is_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("this is not a certificate\n")
    s = settings(port=10465, security="smtps", ca_file=bad)
    with pytest.raises(ConfigError) as info:
        transport(s)
    assert info.value.code == "config.ca_file"


def test_ehlo_name_is_configurable(peers: Any) -> None:
    """The server's hostname by default; a connection's ehlo_name wins, and the upstream
    records it in its Received header."""
    default = send(settings(port=10025, security="none"),
                   Envelope(SENDER, [TESTUSER], make_message(new_subject("ehlo-d"), TESTUSER)))
    assert "C: ehlo postroom.test" in default.transcript
    subject = new_subject("ehlo-own")
    raw = make_message(subject, TESTUSER)
    s = settings(port=10025, security="none", ehlo_name="relay.example.net")
    result = send(s, Envelope(SENDER, [TESTUSER], raw))
    assert "C: ehlo relay.example.net" in result.transcript
    got = peers.wait_for(TESTUSER, subject, timeout=20)
    assert "from relay.example.net" in got["Received"]


def test_pipelining_two_writes_per_message(peers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Postfix offers PIPELINING: MAIL, every RCPT and DATA go out in one write and the
    data in a second; a pooled session is used without an RSET round trip. Each recipient
    still gets its own reply, and every copy arrives."""
    from postroom.smtpwire import Wire

    writes: list[bytes] = []
    real_send_lines, real_send_data = Wire.send_lines, Wire.send_data

    def lines(self: Wire, ls: list[str], shown: list[str] | None = None) -> None:
        writes.append("".join(f"{ln}\r\n" for ln in ls).encode())
        real_send_lines(self, ls, shown)

    async def data(self: Wire, d: bytes) -> None:
        writes.append(d)
        await real_send_data(self, d)

    monkeypatch.setattr(Wire, "send_lines", lines)
    monkeypatch.setattr(Wire, "send_data", data)
    s = settings(port=10025, security="none")
    subjects = [new_subject(f"pipelined-{i}") for i in range(2)]
    raws = [make_message(subj, TESTUSER) for subj in subjects]
    envs = [Envelope(SENDER, [TESTUSER, ALICE], raws[0]),
            Envelope(SENDER, [TESTUSER], raws[1])]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            return [await _bounded(t.send(env)) for env in envs]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    first, second = asyncio.run(go())
    assert first.recipients[TESTUSER].code == 250
    assert first.recipients[ALICE].code == 250
    assert second.recipients[TESTUSER].code == 250
    after_ehlo = [w for w in writes if not w.lower().startswith((b"ehlo", b"quit"))]
    assert len(after_ehlo) == 4, after_ehlo  # (commands, data) twice; no RSET
    assert after_ehlo[0].count(b"\r\n") == 4 and after_ehlo[0].endswith(b"DATA\r\n")
    assert after_ehlo[2].startswith(b"mail FROM:") and after_ehlo[2].endswith(b"DATA\r\n")
    for subj, raw in zip(subjects, raws, strict=True):
        assert_delivered(peers, TESTUSER, subj, raw, auth_user=None)
    assert_delivered(peers, ALICE, subjects[0], raws[0], auth_user=None)


def test_pooled_session_closing_with_421_is_replaced(fake_smtp: Callable[..., Fake]) -> None:
    """A server that answers MAIL on a pooled session with 421 (closing down, e.g. after
    its own per-connection message limit) gets the message on a new session, not a
    deferral."""
    fake = fake_smtp()
    s = settings(port=fake.port, security="none")
    raws = [make_message(new_subject(f"421-{i}"), ALICE) for i in range(2)]

    async def go() -> list[DeliveryResult]:
        t = transport(s)
        try:
            first = await _bounded(t.send(Envelope(SENDER, [ALICE], raws[0])))
            fake.handler.mail_reply = "421 4.4.2 too many messages, closing"
            second = await _bounded(t.send(Envelope(SENDER, [ALICE], raws[1])))
            return [first, second]
        finally:
            await asyncio.wait_for(t.aclose(), 15)

    _, second = asyncio.run(go())
    assert "S: 421 4.4.2 too many messages" in second.transcript
    assert "the pooled session is gone" in second.transcript
    assert second.recipients[ALICE].code == 250
    assert fake.handler.connections == 2
    assert [m.original_content for m in fake.handler.messages] == raws


def test_plain_text_after_starttls_reply_is_refused() -> None:
    """A reply smuggled in plain text right after "220" to STARTTLS would be read later as
    if it came through TLS (CVE-2011-0411 and its kin): the transport refuses to go on and
    sends nothing more, credentials included."""
    from diag_helpers import Scripted

    ehlo = "250-scripted.test\n250-PIPELINING\n250-STARTTLS\n250 AUTH PLAIN"
    srv = Scripted(replies={"EHLO": ehlo, "STARTTLS": "220 2.0.0 Ready\n250 2.1.0 injected"})
    with srv.running():
        s = settings(port=srv.port, security="starttls", auth="plain", username=ALICE,
                     password="alicepass", connect_timeout=5, timeout=5)
        err = send_fails(s, Envelope(SENDER, [ALICE], make_message(new_subject("inj"), ALICE)),
                         ProtocolError)
    assert err.code == "protocol" and "STARTTLS injection" in err.message
    assert srv.commands[-1] == "STARTTLS"  # nothing after it: no handshake, no AUTH, no MAIL


def test_dot_stuffing_doubles_every_dot_that_starts_a_line() -> None:
    """The two replaces in _dot_stuff double exactly the dots the RFC 5321 rule (plus bare
    CR and LF as line breaks) names: checked against that rule written as a regular
    expression, on every short string of the bytes that matter."""
    import itertools

    from postroom.transports.smtp import _dot_stuff

    rule = re.compile(rb"(?:\A|(?<=[\r\n]))\.")
    for n in range(1, 7):
        for combo in itertools.product((b".", b"\r", b"\n", b"x"), repeat=n):
            raw = b"".join(combo)
            want = rule.sub(b"..", raw)
            assert _dot_stuff(raw) == (want if want.endswith(b"\r\n") else want + b"\r\n"), raw
