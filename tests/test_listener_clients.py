"""Real SMTP clients hand mail to a real `postroom serve`, which delivers it to the upstream
Postfix on its plain port (tests/peers/README.md). Each message carries a unique Subject and
must arrive in the upstream Maildir with the body we sent, and `postroom log --json` must list
it as sent with the right source ("smtp:<app>" after AUTH, "smtp:trusted" without).

Clients: swaks (STARTTLS + AUTH + PIPELINING), msmtp (STARTTLS + AUTH PLAIN/LOGIN),
PHPMailer on php-cli (STARTTLS + AUTH), Python smtplib (plain loopback without AUTH,
STARTTLS + AUTH, implicit TLS with SMTP_SSL). TLS is verified against the instance's
self-signed certificate everywhere (swaks 20201014 checks the chain only, not the name).
"""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import smtplib
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, smtp_connection

pytestmark = [pytest.mark.peers]

RCPT = "testuser@example.test"
SENDER = "sender@example.org"
APP = "clients"
TIMEOUT = 20.0  # every socket, subprocess and wait in this module



@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    p = Postroom(
        tmp_path_factory.mktemp("listener-clients"),
        connections=smtp_connection(peers.plain_port),
        smtps=True,
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def secret(pr: Postroom) -> str:
    return pr.add_app(APP)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `bash tests/peers/clients.sh install`",
                    pytrace=False)


def _subject(client: str) -> str:
    return f"postroom-listener {client} {uuid.uuid4().hex}"


def _delivered_body(peers: Any, subject: str) -> str:
    """Wait for the message in the upstream Maildir; return its body text (LF line ends).
    (wait_for returns the parsed message with the file's bytes in ``.raw``.)"""
    found = peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    msg = email.message_from_bytes(found.raw, policy=email.policy.compat32)
    assert msg["Subject"] == subject
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode().replace("\r\n", "\n")


def _log_entry(pr: Postroom, subject: str) -> dict[str, Any]:
    """The `postroom log --json` row for ``subject`` once its delivery is final."""
    deadline = time.monotonic() + TIMEOUT
    row: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        out = pr.cli("log", "--json", "--limit", "1000")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
        matches = [r for r in rows if r["subject"] == subject]
        assert len(matches) <= 1, matches
        if matches:
            row = matches[0]
            if row["status"] not in ("queued", "sending", "deferred"):
                return row
        time.sleep(0.2)
    raise AssertionError(f"no final log entry for {subject!r} after {TIMEOUT}s: {row}")


def _check_sent(pr: Postroom, peers: Any, subject: str, body: str, source: str) -> None:
    assert _delivered_body(peers, subject).rstrip("\n") == body.rstrip("\n")
    row = _log_entry(pr, subject)
    assert row["status"] == "sent", row
    assert row["source"] == source, row
    assert row["recipients"] == [RCPT], row


def _run(args: list[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=input, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=None if input is not None else subprocess.DEVNULL)


# -- swaks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_ip", "mech"),
    [("127.0.0.1", "PLAIN"), ("127.0.0.2", "LOGIN")],
    ids=["loopback-plain", "remote-login"],
)
def test_swaks_starttls_auth_pipeline(
    pr: Postroom, secret: str, peers: Any, source_ip: str, mech: str
) -> None:
    _need("swaks")
    subject = _subject(f"swaks-{mech}")
    body = f"swaks body {uuid.uuid4().hex}"
    r = _run([
        "swaks", "--server", "127.0.0.1", "--port", str(pr.smtp_port),
        "--local-interface", source_ip,
        "--tls", "--tls-verify", "--tls-ca-path", str(pr.cert),
        "--pipeline", "--auth", mech, f"--auth-user={APP}", f"--auth-password={secret}",
        "--from", SENDER, "--to", RCPT,
        "--header", f"Subject: {subject}", "--body", body,
        "--timeout", "15",
    ])
    assert r.returncode == 0, r.stdout + r.stderr
    transcript = r.stdout
    assert "TLS started" in transcript, transcript
    assert "235 2.7.0" in transcript, transcript
    # PIPELINING really used: MAIL, RCPT and DATA all went out before the reply to MAIL.
    lines = transcript.splitlines()
    sent_mail = next(i for i, x in enumerate(lines) if x.startswith(" ~> MAIL FROM"))
    sent_data = next(i for i, x in enumerate(lines) if x.startswith(" ~> DATA"))
    reply_mail = next(i for i, x in enumerate(lines) if x.startswith("<~  250 2.1.0"))
    assert sent_mail < sent_data < reply_mail, transcript
    _check_sent(pr, peers, subject, body, f"smtp:{APP}")


def test_swaks_tls_verify_really_verifies(pr: Postroom, secret: str, peers: Any) -> None:
    """Control for the test above: against a CA that did not sign the instance's certificate,
    swaks --tls-verify must fail the TLS negotiation (so the passing run proves something)."""
    _need("swaks")
    r = _run([
        "swaks", "--server", "127.0.0.1", "--port", str(pr.smtp_port),
        "--tls", "--tls-verify", "--tls-ca-path", str(peers.ca_file),
        "--auth", "PLAIN", f"--auth-user={APP}", f"--auth-password={secret}",
        "--from", SENDER, "--to", RCPT, "--header", f"Subject: {_subject('swaks-badca')}",
        "--timeout", "15",
    ])
    assert r.returncode != 0, r.stdout
    assert "235 2.7.0" not in r.stdout


# -- msmtp ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mech", ["plain", "login"])
def test_msmtp_starttls_auth(
    pr: Postroom, secret: str, peers: Any, tmp_path: Path, mech: str
) -> None:
    _need("msmtp")
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\n"
        "timeout 15\n"
        "syslog off\n"
        f"logfile {tmp_path / 'msmtp.log'}\n"
        "account postroom\n"
        "host 127.0.0.1\n"
        f"port {pr.smtp_port}\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {pr.cert}\n"
        f"auth {mech}\n"
        f"user {APP}\n"
        f"password {secret}\n"
        f"from {SENDER}\n"
    )
    rc.chmod(0o600)  # msmtp refuses a config file holding a password otherwise
    subject = _subject(f"msmtp-{mech}")
    body = f"msmtp body {uuid.uuid4().hex}\n.a line starting with a dot\nlast line\n"
    message = f"From: {SENDER}\nTo: {RCPT}\nSubject: {subject}\n\n{body}"
    r = _run(["msmtp", "-C", str(rc), "-a", "postroom", "-v", RCPT], input=message)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--> STARTTLS" in r.stdout and "<-- 235 2.7.0" in r.stdout, r.stdout
    _check_sent(pr, peers, subject, body, f"smtp:{APP}")


# -- PHPMailer -----------------------------------------------------------------------------------
def test_phpmailer_starttls_auth(pr: Postroom, secret: str, peers: Any) -> None:
    _need("php")
    script = Path(__file__).parent / "peers" / "clients" / "phpmailer-send.php"
    if not Path("/usr/share/php/libphp-phpmailer/autoload.php").exists():
        pytest.fail("libphp-phpmailer is not installed: run `bash tests/peers/clients.sh "
                    "install`", pytrace=False)
    subject = _subject("phpmailer")
    body = f"PHPMailer body {uuid.uuid4().hex}"
    r = _run([
        "php", str(script), "--host=127.0.0.1", f"--port={pr.smtp_port}", "--secure=tls",
        f"--user={APP}", f"--pass={secret}", f"--cafile={pr.cert}",
        f"--from={SENDER}", f"--to={RCPT}", f"--subject={subject}", f"--body={body}",
        "--timeout=15", "--debug=2",
    ])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CLIENT -> SERVER: STARTTLS" in r.stderr, r.stderr
    assert "235 2.7.0" in r.stderr, r.stderr
    _check_sent(pr, peers, subject, body, f"smtp:{APP}")


# -- Python smtplib ------------------------------------------------------------------------------
def _raw_message(subject: str) -> tuple[bytes, str]:
    body = (f"smtplib body {uuid.uuid4().hex}\r\n"
            ".leading dot survives transparency\r\n"
            "caf\u00e9 in UTF-8\r\n")
    head = (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n")
    return (head + body).encode(), body.replace("\r\n", "\n")


def _client_tls(pr: Postroom) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pr.cert))  # verifies chain and 127.0.0.1


def test_smtplib_plain_loopback_without_auth(pr: Postroom, peers: Any) -> None:
    subject = _subject("smtplib-plain")
    raw, body = _raw_message(subject)
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT) as s:
        s.ehlo()
        s.mail(SENDER, ["BODY=8BITMIME"])
        assert s.rcpt(RCPT)[0] == 250
        code, reply = s.data(raw)
        assert code == 250 and b"queued as" in reply, reply
    _check_sent(pr, peers, subject, body, "smtp:trusted")


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_smtplib_starttls_auth(pr: Postroom, secret: str, peers: Any, mech: str) -> None:
    subject = _subject(f"smtplib-starttls-{mech}")
    raw, body = _raw_message(subject)
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT) as s:
        s.starttls(context=_client_tls(pr))
        s.ehlo()
        assert s.has_extn("auth") and mech in s.esmtp_features["auth"].split()
        s.user, s.password = APP, secret
        fn = s.auth_plain if mech == "PLAIN" else s.auth_login
        code, _ = s.auth(mech, fn, initial_response_ok=mech == "PLAIN")
        assert code == 235
        s.sendmail(SENDER, [RCPT], raw, mail_options=["BODY=8BITMIME"])
    _check_sent(pr, peers, subject, body, f"smtp:{APP}")


def test_smtplib_implicit_tls_port(pr: Postroom, secret: str, peers: Any) -> None:
    assert pr.smtps_port is not None
    subject = _subject("smtplib-smtps")
    raw, body = _raw_message(subject)
    with smtplib.SMTP_SSL("127.0.0.1", pr.smtps_port, timeout=TIMEOUT,
                          context=_client_tls(pr)) as s:
        s.ehlo()
        assert not s.has_extn("starttls")  # already encrypted
        assert s.has_extn("auth")
        s.login(APP, secret)
        s.sendmail(SENDER, [RCPT], raw, mail_options=["BODY=8BITMIME"])
    _check_sent(pr, peers, subject, body, f"smtp:{APP}")


def test_smtplib_remote_starttls_auth(pr: Postroom, secret: str, peers: Any) -> None:
    """A non-trusted client (127.0.0.2) sees AUTH only after STARTTLS, then sends normally."""
    subject = _subject("smtplib-remote")
    raw, body = _raw_message(subject)
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT,
                      source_address=("127.0.0.2", 0)) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        s.starttls(context=_client_tls(pr))
        s.ehlo()
        assert s.has_extn("auth")
        s.login(APP, secret)
        s.sendmail(SENDER, [RCPT], raw, mail_options=["BODY=8BITMIME"])
    _check_sent(pr, peers, subject, body, f"smtp:{APP}")


def test_null_sender_is_accepted(pr: Postroom) -> None:
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT) as s:
        s.ehlo()
        code, reply = s.mail("")
        s.rset()
    assert code == 250, reply


def test_ehlo_advertises_extensions_and_smtputf8_goes_through(pr: Postroom, peers: Any) -> None:
    """SMTPUTF8, 8BITMIME, SIZE, STARTTLS and PIPELINING are offered; an internationalized
    address (RFC 6531) and UTF-8 header text (RFC 6532) reach the upstream intact."""
    rcpt = "δοκιμή@example.test"
    subject = _subject("smtputf8") + " Grüße"
    raw = (f"From: Jörg <jörg@example.org>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           "\r\nκείμενο\r\n").encode()
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT) as s:
        code, features = s.ehlo()
        assert code == 250
        for ext in (b"SMTPUTF8", b"8BITMIME", b"SIZE", b"STARTTLS", b"PIPELINING"):
            assert ext in features, features
        s.mail("jörg@example.org", ["SMTPUTF8", "BODY=8BITMIME"])
        assert s.rcpt(rcpt)[0] == 250
        assert s.data(raw)[0] == 250
    got = peers.wait_for(rcpt, lambda m: subject.encode() in m.raw, timeout=TIMEOUT)
    assert got.raw.replace(b"\n", b"\r\n").endswith(raw.split(b"\r\n", 3)[3])
    assert "κείμενο".encode() in got.raw
