"""A configuration mistake holds mail; it never fails it (issue 12, section 1).

Every class of "this connection is set up wrong" error, met by a real `postroom serve`
against the real Postfix/Dovecot peer or a small server answering with a provider's exact
words (tests/diag_helpers.py ``provider``): the message stays queued (deferred, its
last_error saying why), the failure counts against the connection (breaker), a chain falls
back to its next connection (which delivers the message exactly once), and once the
configuration is fixed and the server restarted, the held message is delivered, once.

Errors about the message stay final (a recipient's 550), and a test send (`postroom test`)
is tried once: it fails for good and no running worker sends it later.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from diag_helpers import ProviderHandler, provider
from queue_helpers import FakeClock, envelope, run
from real_servers import HOST, Sink, message_id_of, wait_statuses
from serve_proc import Postroom

from postroom.queue.sql import Queue
from postroom.queue.worker import Worker
from postroom.settings import DeliverySettings
from postroom.transports import base, smtp

MAILBOX = "testuser@example.test"
PASSWORD = "testpass"  # tests/conftest.py USERS
GONE = "gone@example.test"
# Retries every 3 s; the breaker opens after 5 failures, for 2 s only: a circuit left open
# by the broken configuration does not keep the fixed one waiting long.
DELIVERY = ("min_backoff = 3\nmax_backoff = 3\npoll_interval = 0.2\nshutdown_grace = 2\n"
            "breaker_cooldown = 2\n")
HELD = "held in the queue, not failed"

# Providers' refusals of AUTH, word for word.
MICROSOFT_SMTP_AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. "
    "[SN4PR0501CA0054.namprd05.prod.outlook.com]")
GMAIL_APP_PASSWORD = (
    "534-5.7.9 Application-specific password required. For more information, go to\r\n"
    "534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor "
    "d2e1a72fcca58-7a2b3c4d5e6f - gsmtp")


def connection(name: str, port: int, security: str = "none", host: str = HOST,
               connect_timeout: float = 5, **keys: Any) -> str:
    """A `[[connections]]` SMTP entry; ``keys`` are more settings (TOML values)."""
    lines = [f"name = {json.dumps(name)}", 'transport = "smtp"', f"host = {json.dumps(host)}",
             f"port = {port}", f"security = {json.dumps(security)}",
             f"connect_timeout = {connect_timeout}", "timeout = 10"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "[[connections]]\n" + "\n".join(lines) + "\n"


@dataclass
class Upstreams:
    peers: Any
    microsoft: int  # AUTH refused as Microsoft 365 refuses it when SMTP AUTH is disabled
    gmail: int  # AUTH refused as Gmail refuses a normal password on a 2-step account
    plain: int  # no STARTTLS; AUTH PLAIN and LOGIN only, offered in plain text
    backup: Sink  # the chain's working fallback, counting what it receives

    def working(self, name: str = "primary") -> str:
        """The connection as it should be: Postfix's submission port, STARTTLS, login."""
        return connection(name, self.peers.submission_port, "starttls", auth="plain",
                          username=MAILBOX, password=PASSWORD, ca_file=self.peers.ca_file)


@pytest.fixture(scope="module")
def upstreams(peers: Any) -> Iterator[Upstreams]:
    with contextlib.ExitStack() as stack:
        ms = stack.enter_context(provider(ProviderHandler(auth=MICROSOFT_SMTP_AUTH_DISABLED)))
        gm = stack.enter_context(provider(ProviderHandler(auth=GMAIL_APP_PASSWORD)))
        plain = stack.enter_context(provider(ProviderHandler()))
        backup = Sink().start()
        stack.callback(backup.stop)
        yield Upstreams(peers, ms, gm, plain, backup)


# -- every class of configuration mistake -------------------------------------------------------
@dataclass(frozen=True)
class Mistake:
    id: str
    code: str  # the attempt's error code
    primary: Callable[[Upstreams], str]  # the broken `primary` connection
    reply_code: int | None = None


def _submission(u: Upstreams, security: str = "starttls", port: int | None = None,
                connect_timeout: float = 5, **keys: Any) -> str:
    """The peer's submission login as `primary`, with ``keys`` changed (None: left out)."""
    given = {"auth": "plain", "username": MAILBOX, "password": PASSWORD,
             "ca_file": u.peers.ca_file, **keys}
    return connection("primary", port or u.peers.submission_port, security,
                      connect_timeout=connect_timeout,
                      **{k: v for k, v in given.items() if v is not None})


MISTAKES = [
    Mistake("wrong_password", "auth.rejected",
            lambda u: _submission(u, password="rotated-last-week"), 535),
    Mistake("microsoft_smtp_auth_disabled", "auth.rejected", lambda u: connection(
        "primary", u.microsoft, auth="login", username="me@contoso.com", password="x",
        allow_plaintext_auth=True), 535),
    Mistake("gmail_app_password_required", "auth.rejected", lambda u: connection(
        "primary", u.gmail, auth="plain", username="me@gmail.com", password="x",
        allow_plaintext_auth=True), 534),
    Mistake("plaintext_refused", "auth.plaintext_refused", lambda u: connection(
        "primary", u.peers.plain_port, auth="plain", username=MAILBOX, password=PASSWORD)),
    Mistake("mechanism_not_offered", "auth.mechanism_unavailable", lambda u: connection(
        "primary", u.plain, auth="cram-md5", username="me@example.com", password="x",
        allow_plaintext_auth=True)),
    Mistake("starttls_not_offered", "tls.starttls_unavailable",
            lambda u: connection("primary", u.plain, "starttls")),
    # security = "none" against a submission port: Postfix answers MAIL FROM with 530 5.7.0
    # "Must issue a STARTTLS command first".
    Mistake("no_tls_to_a_submission_port", "sender.rejected", lambda u: connection(
        "primary", u.peers.submission_port), 530),
    Mistake("smtps_on_a_plain_port", "tls.handshake",
            lambda u: _submission(u, "smtps")),
    # Silent until our TLS handshake: found out after connect_timeout.
    Mistake("starttls_on_an_implicit_tls_port", "tls.implicit_expected", lambda u: _submission(
        u, port=u.peers.smtps_port, connect_timeout=2)),
    Mistake("certificate_not_trusted", "tls.certificate",
            lambda u: _submission(u, ca_file=None)),
    Mistake("host_not_in_dns", "connect.dns", lambda u: connection(
        "primary", 587, "starttls", host="smtp.postroom-test.invalid")),
    Mistake("missing_password_secret", "auth.secret_missing",
            lambda u: _submission(u, password=None,
                                  password_env="POSTROOM_TEST_NEVER_SET_SECRET")),
]


def _config(primary: str, backup_port: int) -> str:
    """`primary` alone for app mail; sender fallback@app.test goes primary -> backup."""
    return (primary + connection("backup", backup_port)
            + '[[routes]]\nname = "fallback"\nmatch = { sender = "fallback@app.test" }\n'
              'chain = ["primary", "backup"]\n'
            + '[[routes]]\nchain = ["primary"]\n')


def send(pr: Postroom, sender: str, subject: str, to: str = MAILBOX) -> str:
    """Queue a message with `postroom send` (a door like any other); returns its id."""
    out = pr.cli("send", "--from", sender, "--to", to, "--subject", subject,
                 "--text", "configuration mistakes must not lose mail")
    assert out.returncode == 0, out.stderr
    found = re.search(r"queued (\S+)", out.stdout.decode())
    assert found, out.stdout
    return found.group(1)


def show(pr: Postroom, msg_id: str) -> dict[str, Any]:
    out = pr.cli("show", msg_id, "--json")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def health(pr: Postroom, name: str) -> dict[str, Any]:
    out = pr.cli("connections", "--json")
    assert out.returncode == 0, out.stderr
    [conn] = [c for c in json.loads(out.stdout)["connections"] if c["name"] == name]
    return dict(conn)


def wait_counts(pr: Postroom, done: Callable[[dict[str, int]], bool],
                timeout: float = 40) -> dict[str, int]:
    counts = wait_statuses(f"sqlite:///{pr.db}", done, timeout, every=0.2)
    assert done(counts), (counts, pr.log.read_text()[-3000:])
    return counts


def arrived(peers: Any, message_id: str) -> int:
    """How many copies of the message with this Message-ID are in the peer's mailbox."""
    return sum(1 for m in peers.messages(MAILBOX)
               if message_id_of(m.raw.replace(b"\n", b"\r\n")).strip("<>")
               == message_id.strip("<>"))


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_a_configuration_mistake_holds_the_mail_until_it_is_fixed(
        upstreams: Upstreams, tmp_path: Path, mistake: Mistake, unique_subject: str) -> None:
    u = upstreams
    pr = Postroom(tmp_path, connections=_config(mistake.primary(u), u.backup.port),
                  delivery=DELIVERY)
    try:
        pr.start()
        # A chain with a working second connection: delivered there, exactly once.
        fb_id = send(pr, "fallback@app.test", f"{unique_subject} fallback")
        wait_counts(pr, lambda c: c.get("sent", 0) == 1)
        fb = show(pr, fb_id)
        hops = [(a["connection"], a["outcome"], a["error_code"]) for a in fb["attempts"]]
        assert hops == [("primary", "fallback", mistake.code), ("backup", "sent", None)], hops
        fb_mid = fb["message_id"]
        assert u.backup.per_message_id()[fb_mid] == 1

        # The connection alone: the message is held, saying why.
        held_id = send(pr, "app@app.test", unique_subject)
        wait_counts(pr, lambda c: c.get("deferred", 0) == 1)
        held = show(pr, held_id)
        assert held["status"] == "deferred", held["last_error"]
        first = held["attempts"][0]
        assert (first["connection"], first["outcome"], first["error_code"]) == (
            "primary", "deferred", mistake.code)
        assert first["permanent"] is False and first["transcript"]
        if mistake.reply_code is not None:
            assert first["reply_code"] == mistake.reply_code
        assert held["last_error"].startswith(f"{mistake.code}: "), held["last_error"]
        assert HELD in held["last_error"]
        assert held["rcpt_status"][MAILBOX]["state"] == "pending"

        # The breaker counted both messages' failures against the connection.
        conn = health(pr, "primary")
        assert conn["failures"] >= 2 and conn["health"] in ("degraded", "down"), conn
        assert conn["last_error"].startswith(mistake.code), conn

        # Fixed (there is no reload yet: a restart reads the file again).
        pr.stop()
        pr.config.write_text(pr.config.read_text().replace(
            mistake.primary(u), u.working()))
        pr.start()
        wait_counts(pr, lambda c: c.get("sent", 0) == 2)
        done = show(pr, held_id)
        assert done["status"] == "sent" and done["attempts"][-1]["outcome"] == "sent"
        u.peers.wait_for(MAILBOX, unique_subject, timeout=20)
        time.sleep(0.5)  # a duplicate would come in the same run
        assert arrived(u.peers, done["message_id"]) == 1
        assert u.backup.per_message_id()[done["message_id"]] == 0  # never sent elsewhere
        assert u.backup.per_message_id()[fb_mid] == 1  # and the first one not again
    finally:
        pr.stop()


def test_a_held_message_fails_only_when_its_lifetime_ends(queue: Queue,
                                                          clock: FakeClock) -> None:
    """Microsoft's refusal, in-process with a fake clock: held for 5 days, not more."""

    async def attempt(worker: Worker) -> dict[str, Any]:
        [msg] = await queue.claim("w", 10, 600)
        await worker.deliver(msg)
        m = queue.log.get(msg.id)
        assert m is not None
        return m

    async def go(port: int) -> None:
        t = smtp.Transport(smtp.Settings(
            name="primary", host=HOST, port=port, security="none", auth="login",
            username="me@contoso.com", password="x", allow_plaintext_auth=True),
            base.TransportContext(ehlo_name="postroom.test"))
        worker = Worker(queue, {"primary": t}, DeliverySettings(),
                        default_connection="primary", owner="w", clock=clock)
        await queue.enqueue(envelope(MAILBOX))
        m = await attempt(worker)
        assert m["status"] == "deferred" and HELD in m["last_error"]
        assert m["next_attempt_at"] == clock() + 300  # the normal backoff
        clock.advance(5 * 86400)  # the retry due after the lifetime: given up
        m = await attempt(worker)
        assert m["status"] == "failed"
        assert m["last_error"].startswith("expired after 2 attempts; auth.rejected: ")
        assert "5.7.139" in m["last_error"]
        await t.aclose()

    with provider(ProviderHandler(auth=MICROSOFT_SMTP_AUTH_DISABLED)) as port:
        run(queue, lambda: go(port))


# -- what is about the message stays final -------------------------------------------------------
def test_a_recipients_550_still_fails_at_once(upstreams: Upstreams, tmp_path: Path,
                                              unique_subject: str) -> None:
    rejects = Sink({GONE: "550 5.1.1 <gone@example.test>: Recipient address rejected: "
                          "User unknown"}).start()
    pr = Postroom(tmp_path, connections=_config(connection("primary", rejects.port),
                                                upstreams.backup.port), delivery=DELIVERY)
    try:
        pr.start()
        msg_id = send(pr, "fallback@app.test", unique_subject, to=GONE)
        wait_counts(pr, lambda c: c.get("failed", 0) == 1)
        m = show(pr, msg_id)
        assert [(a["connection"], a["outcome"]) for a in m["attempts"]] == [
            ("primary", "failed")]
        assert m["rcpt_status"][GONE]["code"] == 550
        assert HELD not in (m["last_error"] or "")
        assert upstreams.backup.per_message_id()[m["message_id"]] == 0
        assert health(pr, "primary")["failures"] == 0  # says nothing about the connection
    finally:
        pr.stop()
        rejects.stop()


# -- a test send is tried once ----------------------------------------------------------------
def test_a_failed_test_send_is_never_sent_later(upstreams: Upstreams, tmp_path: Path) -> None:
    u = upstreams
    broken = _submission(u, password="rotated-last-week")
    pr = Postroom(tmp_path, connections=_config(broken, u.backup.port), delivery=DELIVERY)
    try:
        pr.start()
        out = pr.cli("test", "primary", "--to", MAILBOX)
        assert out.returncode == 1, out.stdout
        text = out.stdout.decode()
        assert "auth.rejected" in text and "C: AUTH PLAIN ********" in text, text
        [line] = pr.cli("log", "--json").stdout.decode().splitlines()
        msg_id = json.loads(line)["id"]
        m = show(pr, msg_id)
        assert m["status"] == "failed", m["last_error"]
        assert m["last_error"].startswith("a test send is not retried; auth.rejected: ")
        assert [(a["connection"], a["outcome"]) for a in m["attempts"]] == [
            ("primary", "failed")]
        assert m["attempts"][0]["transcript"]

        # Fixed, and a worker running: the failed test stays failed, nothing is sent.
        pr.stop()
        pr.config.write_text(pr.config.read_text().replace(broken, u.working()))
        pr.start()
        time.sleep(5)  # more than a retry's backoff (3 s)
        m = show(pr, msg_id)
        assert m["status"] == "failed" and len(m["attempts"]) == 1
        assert arrived(u.peers, m["message_id"]) == 0
    finally:
        pr.stop()
