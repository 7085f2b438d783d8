"""The error-advice catalog (postroom/diagnostics/advice.toml): every entry is reproduced here
and the advice given is asserted.

A failure is reproduced for real wherever it can be: against the Postfix + Dovecot peers
(wrong password, AUTH in plain text refused by Postroom, STARTTLS to the implicit-TLS port,
implicit TLS to the STARTTLS port, an untrusted or mismatched certificate, 530 without
STARTTLS, a message over the SIZE limit, a rejected OAuth token...), or against a closed or
dropping port. Provider behaviour that Postfix cannot show is reproduced by a local server
that answers with the provider's documented text (diag_helpers: aiosmtpd, or a scripted
server for wire-level misbehaviour). Delivery failures go through the real worker and queue,
and the advice is read from the stored attempt record, exactly as `postroom show`, `postroom
test` and the HTTP API get it.

Each test declares the entries it covers with ``@covers(...)`` and must call ``expect`` for
each; ``test_catalog_loads_and_every_entry_is_covered`` fails when an entry has no test.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from diag_helpers import (
    CLOSE,
    HOST,
    RESET,
    SILENT,
    ProviderHandler,
    Scripted,
    closed_port,
    make_ca,
    make_cert,
    provider,
    server_context,
)

from postroom.diagnostics.advice import (
    Facts,
    advice_for_attempt,
    advise,
    advise_error,
    catalog,
    load_catalog,
)
from postroom.envelope import Envelope, validate_address
from postroom.exceptions import ConfigError, MessageError, PostroomError, StoreError
from postroom.queue.sql import Queue
from postroom.queue.worker import Worker
from postroom.settings import DeliverySettings
from postroom.store.db import make_engine, migrate
from postroom.transports import base, memory
from postroom.transports.smtp import Settings, Transport

TESTUSER = "testuser@example.test"
SENDER = "advice-test@example.org"
DELIVERY_TIMEOUT = 60.0

# -- coverage bookkeeping ------------------------------------------------------------------------
COVERED: dict[str, str] = {}  # entry id -> test name
_seen: list[str] = []


def covers(*ids: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register the entries a test reproduces; after it ran, each must have been expected."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        for i in ids:
            assert i not in COVERED, f"{i} is covered twice ({COVERED[i]}, {fn.__name__})"
            COVERED[i] = fn.__name__

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            _seen.clear()
            fn(*args, **kwargs)
            missing = set(ids) - set(_seen)
            assert not missing, f"{fn.__name__} declares {sorted(missing)} but never expects them"

        return wrapper

    return deco


def expect(advice: Any, entry: str) -> dict[str, Any]:
    """``advice`` (an Advice or its dict) is the catalog entry ``entry``."""
    data = advice.to_dict() if hasattr(advice, "to_dict") else advice
    assert data is not None, f"no advice; expected {entry}"
    assert data["id"] == entry, f"advice {data['id']!r}, expected {entry!r}: {data}"
    assert data["cause"] and data["fix"] and "{" not in data["cause"] + data["fix"], data
    _seen.append(entry)
    return dict(data)


# -- delivering through the real worker and queue -
@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Queue]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('advice') / 'q.db'}")
    migrate(engine)
    yield Queue(engine, lifetime=3600)
    engine.dispose()


def smtp(port: int, **kw: Any) -> Transport:
    values: dict[str, Any] = {"name": f"c{uuid.uuid4().hex[:8]}", "host": HOST, "port": port,
                              "connect_timeout": 5, "timeout": 10, "security": "none"}
    values.update(kw)
    return Transport(Settings(**values), base.TransportContext(ehlo_name="advice.test"))


def attempt(queue: Queue, transport: base.Transport | None, *, to: str = TESTUSER,
            sender: str = SENDER, raw: bytes | None = None,
            connection: str | None = None) -> dict[str, Any]:
    """Queue one message, deliver it once through ``transport`` with the real worker, and
    return the stored attempt record."""
    name = connection or (transport.name if transport else "gone")
    body = raw or (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: advice {uuid.uuid4().hex[:8]}"
                   "\r\n\r\nadvice test\r\n").encode()
    env = Envelope(sender, [to], body, source="cli:test", connection=name)
    msg_id = queue.enqueue_sync(env)
    transports = {name: transport} if transport else {}

    async def go() -> None:
        w = Worker(queue, transports, DeliverySettings(), default_connection=name)
        try:
            claimed = await queue.claim(w.owner, 1, 60, only=msg_id)
            assert claimed, "message not claimable"
            await asyncio.wait_for(w.deliver(claimed[0]), DELIVERY_TIMEOUT)
        finally:
            for t in transports.values():
                await t.aclose()
            await queue.writer.aclose()

    asyncio.run(go())
    stored = queue.log.get(msg_id)
    assert stored and stored["attempts"], stored
    return dict(stored["attempts"][-1])


def advice_of(row: dict[str, Any], host: str | None = None) -> dict[str, Any] | None:
    return advice_for_attempt(row, host=host)


def error_of(transport: Transport, to: str = TESTUSER, raw: bytes | None = None) -> Exception:
    """Send directly (no queue) and return the error: for failures outside the worker."""
    env = Envelope(SENDER, [to], raw or b"Subject: x\r\n\r\nx\r\n")

    async def go() -> None:
        try:
            await asyncio.wait_for(transport.send(env), DELIVERY_TIMEOUT)
        finally:
            await transport.aclose()

    with pytest.raises(PostroomError) as info:
        asyncio.run(go())
    return info.value


def in_namespace(code: str) -> str:
    """Run Python ``code`` in a fresh network namespace (loopback down, no routes, no DNS
    server reachable) and return what it prints."""
    tool = shutil.which("unshare")
    assert tool, "unshare (util-linux) is needed for the network-namespace tests"
    res = subprocess.run([tool, "--net", sys.executable, "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


NAMESPACE_SEND = """
import asyncio
import json
from postroom.diagnostics.advice import advise_error
from postroom.envelope import Envelope
from postroom.exceptions import PostroomError
from postroom.transports.base import TransportContext
from postroom.transports.smtp import Settings, Transport
t = Transport(Settings(name="n", host=HOST_NAME, port=25, security="none", connect_timeout=5),
              TransportContext(ehlo_name="ns.test"))
try:
    asyncio.run(t.send(Envelope("a@example.org", ["b@example.org"],
                                b"Subject: x\\r\\n\\r\\nx\\r\\n")))
except PostroomError as err:
    a = advise_error(err)
    print(json.dumps({"code": err.code, "advice": a.to_dict() if a else None}))
"""


# -- the catalog itself -
def test_catalog_loads_and_every_entry_is_covered() -> None:
    import test_provider_contract  # noqa: F401  (the HTTPS API providers' entries, issue 14)
    import test_right_fix  # noqa: F401  (its tests cover the entries of issue 12, section 2)

    entries = catalog()
    ids = [e.id for e in entries]
    assert len(ids) == len(set(ids)) >= 60
    missing = sorted(set(ids) - set(COVERED))
    assert not missing, f"catalog entries without a reproducing test: {missing}"
    unknown = sorted(set(COVERED) - set(ids))
    assert not unknown, f"tests cover entries that are not in the catalog: {unknown}"


@pytest.mark.parametrize("text,error", [
    ('[[entry]]\nid = "x"\ncause = "c"\nfix = "f"\nmatch = { codee = "a" }', "unknown criteria"),
    ('[[entry]]\nid = "x"\ncause = "c"\nfix = "f"\nmatch = { text = "(" }', "text '('"),
    ('[[entry]]\nid = "x"\ncause = "c"\nfix = "f"\nmatch = { reply = "5x" }', "reply '5x'"),
    ('[[entry]]\nid = "x"\ncause = "c"\nfix = "f"\nmatch = { enhanced = "5.7" }', "enhanced"),
    ('[[entry]]\nid = "x"\ncause = ""\nfix = "f"\nmatch = { code = "a" }', "cause must be"),
    ('[[entry]]\nid = "x"\ncause = "c"\nfix = "f"', "match must be"),
    ('[[entry]]\nid = "X Y"\ncause = "c"\nfix = "f"\nmatch = { code = "a" }', "id must be"),
    ('[[entry]]\nid = "x"\ncause = "c"\nfix = "f"\nmatch = { code = "a" }\n'
     '[[entry]]\nid = "x"\ncause = "c"\nfix = "f"\nmatch = { code = "b" }', "used twice"),
    ("entry = 3", "no [[entry]]"),
    ("[[entry", "syntax"),
])
def test_a_broken_catalog_is_a_clear_error(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_catalog(text)
    assert error in info.value.message and info.value.code == "config.advice"


def test_most_specific_entry_wins_and_ties_go_to_the_first() -> None:
    entries = load_catalog(textwrap.dedent('''
        [[entry]]
        id = "generic"
        cause = "g"
        fix = "g"
        match = { code = "auth" }
        [[entry]]
        id = "code"
        cause = "c"
        fix = "c"
        match = { code = "auth.rejected" }
        [[entry]]
        id = "text"
        cause = "t"
        fix = "t"
        match = { text = "app password" }
        [[entry]]
        id = "text-too"
        cause = "t2"
        fix = "t2"
        match = { text = "password" }
        [[entry]]
        id = "provider"
        cause = "p"
        fix = "p"
        match = [{ text = "password", host = "example\\\\.com$" }, { reply = "599" }]
    '''))
    assert advise(Facts("auth.mechanism"), entries).id == "generic"  # type: ignore[union-attr]
    assert advise(Facts("auth.rejected"), entries).id == "code"  # type: ignore[union-attr]
    assert advise(Facts("auth.rejected", 535, "need an app password"),
                  entries).id == "text"  # type: ignore[union-attr]
    assert advise(Facts("auth.rejected", 535, "password", "smtp.example.com"),
                  entries).id == "provider"  # type: ignore[union-attr]
    assert advise(Facts(None, 599), entries).id == "provider"  # type: ignore[union-attr]
    assert advise(Facts("authx"), entries) is None


def test_successful_attempt_has_no_advice() -> None:
    row = {"connection": "x", "error_code": None, "recipients": {
        "a@example.org": {"code": 250, "reply": "2.0.0 Ok", "state": "sent"}}}
    assert advice_for_attempt(row) is None


# -- reaching the server -
@covers("connect.dns")
def test_name_that_does_not_resolve(queue: Queue) -> None:
    row = attempt(queue, Transport(Settings(name="dns", host="nonexistent.invalid", port=25,
                                            security="none", connect_timeout=5),
                                   base.TransportContext(ehlo_name="advice.test")))
    assert row["error_code"] == "connect.dns"
    expect(advice_of(row), "connect.dns")


@covers("connect.dns.temporary", "connect.unreachable")
def test_no_network_in_a_namespace() -> None:
    # DNS: no resolver reachable -> "Temporary failure in name resolution".
    out = json.loads(in_namespace(NAMESPACE_SEND.replace("HOST_NAME", '"smtp.example.com"')))
    assert out["code"] == "connect.dns"
    advice = expect(out["advice"], "connect.dns.temporary")
    assert "`getent hosts smtp.example.com`" in advice["fix"]
    # Loopback down, no route anywhere: ENETUNREACH at connect().
    out = json.loads(in_namespace(NAMESPACE_SEND.replace("HOST_NAME", '"127.0.0.1"')))
    assert out["code"] == "connect.failed"
    expect(out["advice"], "connect.unreachable")


def _entry(ident: str) -> dict[str, Any]:
    found = next((e.advice for e in catalog() if e.id == ident), None)
    assert found is not None, f"no entry {ident!r}"
    return found.to_dict()


@covers("connect.refused")
def test_closed_port(queue: Queue) -> None:
    row = attempt(queue, smtp(closed_port()))
    assert row["error_code"] == "connect.refused"
    expect(advice_of(row), "connect.refused")


@covers("connect.failed")
def test_connection_reset_during_tls(queue: Queue) -> None:
    with Scripted(greeting=RESET).running() as srv:
        row = attempt(queue, smtp(srv.port, security="smtps"))
    assert row["error_code"] == "connect.failed", row
    assert "reset" in row["reply_text"].lower()
    expect(advice_of(row), "connect.failed")


@covers("connect.lost")
def test_server_closes_mid_session(queue: Queue) -> None:
    with Scripted(replies={"EHLO": CLOSE}).running() as srv:
        row = attempt(queue, smtp(srv.port))
    assert row["error_code"] == "connect.lost"
    expect(advice_of(row), "connect.lost")


@covers("timeout.no_greeting")
def test_no_greeting_dropped_port_and_implicit_tls_port(queue: Queue, peers: Any) -> None:
    # A dropped port and STARTTLS against the implicit-TLS port no longer read alike (issue
    # 12): test_right_fix has both. What is left here: implicit TLS to a server that accepts
    # the connection and never answers the handshake.
    with Scripted(greeting=SILENT).running() as srv:
        row = attempt(queue, smtp(srv.port, security="smtps", connect_timeout=1))
    assert row["error_code"] == "timeout.tls" and "S: " not in row["transcript"]
    advice = expect(advice_of(row), "timeout.no_greeting")
    assert f"`postroom probe {HOST} --port {srv.port}`" in advice["fix"]  # filled in


@covers("timeout")
def test_server_stops_answering(queue: Queue) -> None:
    with Scripted(replies={"MAIL": SILENT}).running() as srv:
        row = attempt(queue, smtp(srv.port, timeout=1))
    assert row["error_code"] == "timeout"
    expect(advice_of(row), "timeout")


@covers("connect.greeting.busy", "connect.greeting.refused")
def test_greeting_refusals(queue: Queue) -> None:
    with Scripted(greeting="421 4.3.2 Service not available, closing transmission channel"
                  ).running() as srv:
        row = attempt(queue, smtp(srv.port))
    assert (row["error_code"], row["reply_code"]) == ("connect.greeting", 421)
    expect(advice_of(row), "connect.greeting.busy")
    with Scripted(greeting="554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked "
                  "using zen.spamhaus.org").running() as srv:
        row = attempt(queue, smtp(srv.port))
    assert (row["error_code"], row["reply_code"]) == ("connect.greeting", 554)
    expect(advice_of(row), "connect.greeting.refused")


# -- TLS -
@covers("tls.wrong_version")
def test_implicit_tls_to_the_starttls_port(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, security="smtps", ca_file=peers.ca_file))
    assert row["error_code"] == "tls.handshake"
    expect(advice_of(row), "tls.wrong_version")


@covers("tls.handshake")
def test_tls_handshake_failure(queue: Queue, tmp_path: Path) -> None:
    # A server that demands a client certificate (TLS 1.2, so inside the handshake).
    ca = make_ca(tmp_path)
    cert, key = make_cert(ca, tmp_path, [HOST])
    ctx = server_context(cert, key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca.path)
    with Scripted(tls=ctx).running() as srv:
        row = attempt(queue, smtp(srv.port, security="smtps", ca_file=ca.path))
    assert row["error_code"] == "tls.handshake", row
    expect(advice_of(row), "tls.handshake")


@covers("tls.untrusted", "tls.name_mismatch")
def test_certificate_untrusted_or_for_another_name(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, security="starttls"))
    assert row["error_code"] == "tls.certificate"
    expect(advice_of(row), "tls.untrusted")
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              tls_server_name="smtp.example.org"))
    assert row["error_code"] == "tls.certificate"
    expect(advice_of(row), "tls.name_mismatch")


@covers("tls.expired")
def test_expired_certificate(queue: Queue, tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert, key = make_cert(ca, tmp_path, [HOST], days=(-90, -1))
    with provider(ProviderHandler(), tls=server_context(cert, key)) as port:
        row = attempt(queue, smtp(port, security="starttls", ca_file=ca.path))
    assert row["error_code"] == "tls.certificate"
    expect(advice_of(row), "tls.expired")


@covers("tls.starttls_unavailable")
def test_starttls_to_a_port_without_it(queue: Queue) -> None:
    # A server with AUTH but no STARTTLS (the relay port without either, Postfix 10025, is
    # port.relay: test_right_fix).
    with provider(ProviderHandler()) as port:
        row = attempt(queue, smtp(port, security="starttls"))
    assert row["error_code"] == "tls.starttls_unavailable"
    expect(advice_of(row), "tls.starttls_unavailable")


@covers("tls.starttls_refused")
def test_starttls_refused(queue: Queue) -> None:
    ehlo = "250-scripted.test\n250-STARTTLS\n250 8BITMIME"
    with Scripted(replies={"EHLO": ehlo, "STARTTLS": "454 4.7.0 TLS not available due to "
                           "local problem"}).running() as srv:
        row = attempt(queue, smtp(srv.port, security="starttls"))
    assert (row["error_code"], row["reply_code"]) == ("tls.starttls_refused", 454)
    expect(advice_of(row), "tls.starttls_refused")


@covers("starttls.required")
def test_530_must_issue_starttls(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, security="none"))
    assert (row["error_code"], row["reply_code"]) == ("sender.rejected", 530)
    assert "Must issue a STARTTLS command first" in row["reply_text"]
    expect(advice_of(row), "starttls.required")


# -- logging in -
@covers("auth.plaintext_refused")
def test_postroom_refuses_auth_in_plain_text(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.legacy_port, username=TESTUSER,
                              password=peers.users[TESTUSER]))
    assert row["error_code"] == "auth.plaintext_refused"
    assert "C: AUTH" not in row["transcript"]
    expect(advice_of(row), "auth.plaintext_refused")


@covers("auth.not_before_tls")
def test_no_auth_before_tls(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, username=TESTUSER,
                              password=peers.users[TESTUSER], allow_plaintext_auth=True))
    assert row["error_code"] == "auth.mechanism_unavailable"
    expect(advice_of(row), "auth.not_before_tls")


@covers("auth.mechanism_unavailable")
def test_mechanism_not_offered(queue: Queue) -> None:
    with provider(ProviderHandler(), auth_exclude_mechanism=["PLAIN"]) as port:
        row = attempt(queue, smtp(port, auth="plain", username="u@example.org", password="p",
                                  allow_plaintext_auth=True))
    assert row["error_code"] == "auth.mechanism_unavailable"
    assert "offered: LOGIN" in row["reply_text"]
    expect(advice_of(row), "auth.mechanism_unavailable")


@covers("auth.secret_missing", "auth.token_missing")
def test_missing_password_and_token(queue: Queue, peers: Any) -> None:
    os.environ.pop("POSTROOM_ADVICE_UNSET", None)
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              username=TESTUSER, password_env="POSTROOM_ADVICE_UNSET"))
    assert row["error_code"] == "auth.secret_missing"
    expect(advice_of(row), "auth.secret_missing")
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              username=TESTUSER, auth="xoauth2"))
    assert row["error_code"] == "auth.token_missing"
    expect(advice_of(row), "auth.token_missing")


@covers("auth.rejected")
def test_wrong_password(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              username=TESTUSER, password="wrong"))
    assert (row["error_code"], row["reply_code"]) == ("auth.rejected", 535)
    expect(advice_of(row), "auth.rejected")


@covers("auth.xoauth2.rejected")
def test_oauth_token_rejected(queue: Queue, peers: Any) -> None:
    os.environ["POSTROOM_ADVICE_TOKEN"] = "not-a-token"
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              username=TESTUSER, auth="xoauth2",
                              oauth_token_env="POSTROOM_ADVICE_TOKEN"))
    assert row["error_code"] == "auth.rejected" and "S: 334 " in row["transcript"]
    expect(advice_of(row), "auth.xoauth2.rejected")
    # A valid token, granted by another account than the connection's username.
    os.environ["POSTROOM_ADVICE_TOKEN"] = peers.oauth_token("alice@example.test")
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              username=TESTUSER, auth="oauthbearer",
                              oauth_token_env="POSTROOM_ADVICE_TOKEN"))
    assert row["error_code"] == "auth.rejected"
    expect(advice_of(row), "auth.xoauth2.rejected")
    os.environ.pop("POSTROOM_ADVICE_TOKEN")


# Providers' AUTH refusals, as their servers word them.
GMAIL_APP_PASSWORD = ("534-5.7.9 Application-specific password required. Learn more at\r\n"
                      "534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor "
                      "d2e1a72fcca58-7a2b3c4d5e6f - gsmtp")
GMAIL_BAD_CREDENTIALS = ("535-5.7.8 Username and Password not accepted. For more information, "
                         "go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials "
                         "d2e1a72fcca58-7a2b3c4d5e6f - gsmtp")
M365_DISABLED = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
                 "for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. "
                 "[SN4PR0501CA0054.namprd05.prod.outlook.com]")
M365_SECURITY_DEFAULTS = ("535 5.7.139 Authentication unsuccessful, user is locked by your "
                          "organization's security defaults policy. Contact your administrator.")
M365_REJECTED = "535 5.7.3 Authentication unsuccessful [BN9PR03CA0123.namprd03.prod.outlook.com]"
M365_BAD_PASSWORD = ("535 5.7.139 Authentication unsuccessful, the user credentials were "
                     "incorrect. [AM0PR10CA0011.EURPRD10.PROD.OUTLOOK.COM]")
YAHOO = "535 5.7.0 (#AUTH005) Too many bad auth attempts."
ENCRYPTION = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_TEMPORARY = ("454 4.7.0 Temporary authentication failure: Connection lost to "
                  "authentication server")


def auth_refused(queue: Queue, text: str) -> dict[str, Any]:
    with provider(ProviderHandler(auth=text)) as port:
        row = attempt(queue, smtp(port, username="me@example.com", password="secret",
                                  allow_plaintext_auth=True))
    assert row["error_code"] == "auth.rejected", row
    assert row["reply_code"] == int(text[:3])
    return row


@covers("auth.gmail.app_password", "auth.gmail.bad_credentials")
def test_gmail_auth_refusals(queue: Queue) -> None:
    expect(advice_of(auth_refused(queue, GMAIL_APP_PASSWORD)), "auth.gmail.app_password")
    advice = expect(advice_of(auth_refused(queue, GMAIL_BAD_CREDENTIALS)),
                    "auth.gmail.bad_credentials")
    assert "https://support.google.com/mail/?p=BadCredentials" in advice["docs"]


@covers("auth.m365.smtp_auth_disabled", "auth.m365.security_defaults", "auth.m365.rejected")
def test_microsoft_365_auth_refusals(queue: Queue) -> None:
    expect(advice_of(auth_refused(queue, M365_DISABLED)), "auth.m365.smtp_auth_disabled")
    expect(advice_of(auth_refused(queue, M365_SECURITY_DEFAULTS)),
           "auth.m365.security_defaults")
    expect(advice_of(auth_refused(queue, M365_REJECTED)), "auth.m365.rejected")
    expect(advice_of(auth_refused(queue, M365_BAD_PASSWORD)), "auth.m365.rejected")


@covers("auth.yahoo")
def test_yahoo_auth_refusal(queue: Queue) -> None:
    expect(advice_of(auth_refused(queue, YAHOO)), "auth.yahoo")


@covers("auth.encryption_required")
def test_server_wants_tls_for_auth(queue: Queue) -> None:
    expect(advice_of(auth_refused(queue, ENCRYPTION)), "auth.encryption_required")


@covers("auth.temporary")
def test_auth_backend_down(queue: Queue) -> None:
    expect(advice_of(auth_refused(queue, AUTH_TEMPORARY)), "auth.temporary")


# -- replies to MAIL, RCPT and DATA -------------------------------------------------------------
def replied(queue: Queue, **handler: str) -> dict[str, Any]:
    """Deliver through a local server answering MAIL/RCPT/DATA with the given texts."""
    with provider(ProviderHandler(**handler)) as port:
        return attempt(queue, smtp(port))


def recipient_advice(row: dict[str, Any], entry: str) -> None:
    assert row["error_code"] is None, row
    advice = expect(advice_of(row), entry)
    assert advice["recipient"] == TESTUSER


@covers("auth.required")
def test_authentication_required(queue: Queue) -> None:
    gmail = ("530-5.7.0 Authentication Required. Learn more at\r\n530 5.7.0  "
             "https://support.google.com/mail/?p=WantAuthError d2e1a72fcca58 - gsmtp")
    row = replied(queue, mail=gmail)
    assert (row["error_code"], row["reply_code"]) == ("sender.rejected", 530)
    expect(advice_of(row), "auth.required")
    m365 = ("530 5.7.57 Client not authenticated to send mail. "
            "[BN1P110CA0052.NAMP110.PROD.OUTLOOK.COM 2023-11-29T14:52:57.126Z]")
    expect(advice_of(replied(queue, mail=m365)), "auth.required")


@covers("client.denied")
def test_client_host_rejected_without_login(queue: Queue, peers: Any) -> None:
    # 10587 with TLS but without AUTH: Postfix refuses the recipient.
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file))
    assert row["recipients"][TESTUSER]["code"] == 554
    recipient_advice(row, "client.denied")


@covers("relay.denied")
def test_relay_denied(queue: Queue) -> None:
    row = replied(queue, rcpt=f"554 5.7.1 <{TESTUSER}>: Relay access denied")
    recipient_advice(row, "relay.denied")
    row = replied(queue, rcpt="550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain")
    recipient_advice(row, "relay.denied")


@covers("sender.not_owned", "sender.rejected")
def test_sender_refused(queue: Queue) -> None:
    row = replied(queue, mail=f"553 5.7.1 <{SENDER}>: Sender address rejected: not owned by "
                  f"user {TESTUSER}")
    assert row["error_code"] == "sender.rejected"
    expect(advice_of(row), "sender.not_owned")
    row = replied(queue, mail="501 5.1.7 Bad sender address syntax")
    expect(advice_of(row), "sender.rejected")


@covers("sender.send_as_denied")
def test_send_as_denied(queue: Queue) -> None:
    row = replied(queue, data="550 5.7.60 SMTP; Client does not have permissions to send as "
                  "this sender")
    recipient_advice(row, "sender.send_as_denied")
    row = replied(queue, data="554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException."
                  "MapiExceptionSendAsDenied; Failed to process message due to a permanent "
                  "exception with message Cannot submit message.")
    recipient_advice(row, "sender.send_as_denied")


@covers("mailbox.unavailable", "mailbox.full")
def test_recipient_mailbox(queue: Queue) -> None:
    row = replied(queue, rcpt=f"550 5.1.1 <{TESTUSER}>: Recipient address rejected: User "
                  "unknown in virtual mailbox table")
    assert row["recipients"][TESTUSER]["state"] == "failed"
    recipient_advice(row, "mailbox.unavailable")
    row = replied(queue, rcpt="550-5.1.1 The email account that you tried to reach does not "
                  "exist. Please try\r\n550 5.1.1 double-checking the recipient's email address "
                  "for typos or unnecessary spaces. - gsmtp")
    recipient_advice(row, "mailbox.unavailable")
    row = replied(queue, rcpt="452-4.2.2 The email account that you tried to reach is over "
                  "quota.\r\n452 4.2.2 Please direct the recipient to ... - gsmtp")
    assert row["recipients"][TESTUSER]["state"] == "pending"
    recipient_advice(row, "mailbox.full")


@covers("message.too_big.local")
def test_message_over_the_servers_size_limit(queue: Queue, peers: Any) -> None:
    # Postfix announces SIZE 10240000: Postroom does not send 10.5 MB.
    body = b"x" * 998 + b"\r\n"
    raw = (f"From: <{SENDER}>\r\nTo: <{TESTUSER}>\r\nSubject: big\r\n\r\n".encode()
           + body * 10_500)
    row = attempt(queue, smtp(peers.plain_port), raw=raw)
    assert (row["error_code"], row["reply_code"]) == ("data.too_big", 552)
    expect(advice_of(row), "message.too_big.local")


@covers("message.too_big")
def test_message_refused_as_too_big(queue: Queue) -> None:
    recipient_advice(replied(queue, data="552 5.3.4 Message size exceeds fixed limit"),
                     "message.too_big")
    recipient_advice(replied(queue, data="552-5.2.3 Your message exceeded Google's message size "
                             "limits. Please visit\r\n552 5.2.3 https://support.google.com/mail/"
                             "?p=MaxSizeError to view our size guidelines. - gsmtp"),
                     "message.too_big")


@covers("message.smtputf8")
def test_internationalized_address_without_smtputf8(queue: Queue) -> None:
    with provider(ProviderHandler(), enable_SMTPUTF8=False) as port:
        row = attempt(queue, smtp(port), to="δοκιμή@example.test")
    assert row["error_code"] == "message.smtputf8"
    expect(advice_of(row), "message.smtputf8")


@covers("message.policy")
def test_message_refused_by_policy(queue: Queue) -> None:
    row = replied(queue, data="550-5.7.1 [192.0.2.1] Our system has detected that this message "
                  "is\r\n550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to "
                  "Gmail,\r\n550 5.7.1 this message has been blocked. - gsmtp")
    recipient_advice(row, "message.policy")


@covers("rate.daily_limit")
def test_daily_sending_limit(queue: Queue) -> None:
    row = replied(queue, data="550 5.4.5 Daily user sending limit exceeded. For more information "
                  "on Gmail's sending limits go to https://support.google.com/a/answer/166852 - "
                  "gsmtp")
    recipient_advice(row, "rate.daily_limit")
    row = replied(queue, data="554 5.2.0 STOREDRV.Submission.Exception:"
                  "SubmissionQuotaExceededException; Failed to process message due to a "
                  "permanent exception with message Cannot submit message.")
    recipient_advice(row, "rate.daily_limit")


@covers("rate.greylisted")
def test_greylisting(queue: Queue) -> None:
    row = replied(queue, rcpt=f"450 4.2.0 <{TESTUSER}>: Recipient address rejected: Greylisted, "
                  "see http://postgrey.schweikert.ch/help/example.test.html")
    recipient_advice(row, "rate.greylisted")


@covers("rate.limited")
def test_rate_limited(queue: Queue) -> None:
    row = replied(queue, mail="421 4.7.0 Try again later, closing connection.")
    assert (row["error_code"], row["reply_code"]) == ("sender.rejected", 421)
    expect(advice_of(row), "rate.limited")
    row = replied(queue, rcpt="421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred "
                  "due to unexpected volume or user complaints - 4.16.55.1; see "
                  "https://postmaster.yahooinc.com/error-codes")
    recipient_advice(row, "rate.limited")
    row = replied(queue, data="451 4.7.28 Our system has detected an unusual rate of mail "
                  "originating from your DKIM domain. - gsmtp")
    recipient_advice(row, "rate.limited.gmail")  # Gmail's own words: its limits, rate_limit


@covers("dmarc.rejected", "spf.rejected", "ptr.missing")
def test_sender_domain_authentication(queue: Queue) -> None:
    for text in (
        "550-5.7.26 Unauthenticated email from example.org is not accepted due to domain's\r\n"
        "550-5.7.26 DMARC policy. Please contact the administrator of example.org domain.\r\n"
        "550 5.7.26 - gsmtp",
        "550-5.7.26 This message does not have authentication information or fails to\r\n"
        "550-5.7.26 pass authentication checks (SPF or DKIM). To best protect our users\r\n"
        "550 5.7.26 from spam, the message has been blocked. - gsmtp",
        "550 5.7.509 Access denied, sending domain example.org does not pass DMARC "
        "verification and has a DMARC policy of reject.",
    ):
        recipient_advice(replied(queue, data=text), "dmarc.rejected")
    for text in (
        "550-5.7.26 This message fails to pass SPF checks for an SPF record with a hard\r\n"
        "550 5.7.26 fail policy (-all). - gsmtp",
        "550 5.7.23 The message was rejected because of Sender Policy Framework violation",
    ):
        recipient_advice(replied(queue, data=text), "spf.rejected")
    recipient_advice(replied(queue, data="550-5.7.25 The IP address sending this message does not "
                             "have a PTR record setup, or\r\n550 5.7.25 the corresponding forward "
                             "DNS entry does not point to the sending IP. - gsmtp"),
                     "ptr.missing")


# -- protocol ---------------------------------------------------------------------------------
@covers("protocol.bad_sequence")
def test_bad_sequence(queue: Queue) -> None:
    row = replied(queue, mail="503 5.5.1 Error: send HELO/EHLO first")
    assert (row["error_code"], row["reply_code"]) == ("sender.rejected", 503)
    expect(advice_of(row), "protocol.bad_sequence")


@covers("protocol.helo")
def test_ehlo_and_helo_refused(queue: Queue) -> None:
    with Scripted(replies={
        "EHLO": "502 5.5.2 Error: command not recognized",
        "HELO": "501 5.5.2 <advice.test>: Helo command rejected: need fully-qualified hostname",
    }).running() as srv:
        row = attempt(queue, smtp(srv.port))
    assert row["error_code"] == "protocol.helo"
    expect(advice_of(row), "protocol.helo")


@covers("protocol")
def test_garbled_reply(queue: Queue) -> None:
    with Scripted(replies={"EHLO": "250 " + "x" * 9000}).running() as srv:
        row = attempt(queue, smtp(srv.port))
    assert row["error_code"] == "protocol", row
    assert "line too long" in row["reply_text"]
    expect(advice_of(row), "protocol")


# -- Postroom itself -----------------------------------------------------------------------------
@covers("config.connection.unknown")
def test_message_for_a_removed_connection(queue: Queue) -> None:
    row = attempt(queue, None, connection="removed")
    assert row["error_code"] == "config.connection.unknown"
    expect(advice_of(row), "config.connection.unknown")


@covers("config.secret.undecryptable")
def test_stored_password_under_another_key(queue: Queue, peers: Any) -> None:
    from cryptography.fernet import Fernet

    from postroom.secrets import SecretStore

    engine = queue.engine
    SecretStore(engine, Fernet.generate_key()).set("connection:keyed:password", "testpass")
    other = SecretStore(engine, Fernet.generate_key())
    t = Transport(Settings(name="keyed", host=HOST, port=peers.submission_port,
                           ca_file=peers.ca_file, username=TESTUSER, connect_timeout=5),
                  base.TransportContext(ehlo_name="advice.test", stored_secret=other.get))
    row = attempt(queue, t)
    assert row["error_code"] == "config.secret.undecryptable"
    expect(advice_of(row), "config.secret.undecryptable")


@covers("config.secret_key")
def test_key_file_readable_by_others(tmp_path: Path) -> None:
    from postroom.secrets import load_or_create_key

    key = tmp_path / "secret.key"
    load_or_create_key(key, {})
    key.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_or_create_key(key, {})
    expect(advise_error(info.value), "config.secret_key")


@covers("config.ca_file")
def test_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.cer"
    bad.write_bytes(b"\x30\x82\x01\x00 not PEM at all")
    with pytest.raises(ConfigError) as info:
        smtp(25, ca_file=bad)
    assert info.value.code == "config.ca_file"
    expect(advise_error(info.value), "config.ca_file")


@covers("config")
def test_broken_configuration_file(tmp_path: Path) -> None:
    from postroom import settings as settings_mod

    cfg = tmp_path / "postroom.toml"
    cfg.write_text("[server\nsmtp_listen = 1\n")
    with pytest.raises(ConfigError) as info:
        settings_mod.load(cfg)
    expect(advise_error(info.value), "config")


@covers("store")
def test_database_that_is_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "postroom.db"
    db.write_bytes(b"this is not an SQLite database file " * 40)
    with pytest.raises(StoreError) as info:
        migrate(make_engine(f"sqlite:///{db}"))
    expect(advise_error(info.value), "store")


@covers("address.malformed")
def test_malformed_address() -> None:
    with pytest.raises(MessageError) as info:
        validate_address("not an address")
    expect(advise_error(info.value), "address.malformed")


class _Broken(memory.Transport):
    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        raise RuntimeError("a bug")


@covers("internal")
def test_a_bug_in_a_transport(queue: Queue) -> None:
    t = _Broken(memory.Settings(name="broken"), base.TransportContext(ehlo_name="advice.test"))
    row = attempt(queue, t)
    assert row["error_code"] == "internal"
    expect(advice_of(row), "internal")


# -- where users see it ------------------------------------------------------------------------
def test_provider_specific_advice_by_host() -> None:
    # The same refusal, told apart by the provider's host when the catalog says so.
    entries = load_catalog(textwrap.dedent('''
        [[entry]]
        id = "generic"
        cause = "g"
        fix = "g"
        match = { code = "auth.rejected" }
        [[entry]]
        id = "gmail"
        cause = "gm"
        fix = "gm"
        match = { code = "auth.rejected", host = '(^|\\.)(gmail|googlemail|google)\\.com$' }
    '''))
    facts = Facts("auth.rejected", 535, "5.7.8 Error: authentication failed")
    assert advise(facts, entries).id == "generic"  # type: ignore[union-attr]
    gmail = Facts("auth.rejected", 535, "x", transcript="*  connecting to smtp.gmail.com:587 "
                  "(starttls)\nS: 220 smtp.gmail.com ESMTP")
    assert advise(gmail, entries).id == "gmail"  # type: ignore[union-attr]


def _config(tmp_path: Path, connection: str) -> Path:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\n'
                   f'[delivery]\nmin_backoff = 1\nmax_backoff = 2\n\n{connection}\n')
    return cfg


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "postroom.cli", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_postroom_test_and_show_print_the_advice(tmp_path: Path, peers: Any) -> None:
    cfg = _config(tmp_path, textwrap.dedent(f'''
        [[connections]]
        name = "up"
        transport = "smtp"
        host = "{HOST}"
        port = {peers.submission_port}
        security = "starttls"
        ca_file = "{peers.ca_file}"
        username = "{TESTUSER}"
        password = "wrong-password"
        connect_timeout = 5
    '''))
    res = _cli(cfg, "test", "up", "--to", TESTUSER)
    assert res.returncode == 1, res.stderr
    cause = _entry("auth.rejected")["cause"]
    fix = _entry("auth.rejected")["fix"]
    out = " ".join(res.stdout.split())
    assert f"why: {cause}" in out and f"fix: {fix}" in out, res.stdout
    assert "Traceback" not in res.stderr
    log = _cli(cfg, "log", "--json")
    msg_id = json.loads(log.stdout.splitlines()[0])["id"]
    shown = _cli(cfg, "show", msg_id)
    assert shown.returncode == 0, shown.stderr
    assert f"why: {cause}" in " ".join(shown.stdout.split()), shown.stdout
