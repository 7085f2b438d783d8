"""The ``peers`` fixture itself works: mail sent with stdlib smtplib to the real Postfix +
Dovecot (plain, STARTTLS + AUTH, SMTPS, XOAUTH2 and OAUTHBEARER with a token from the real
OAuth server) is found again in the Maildir by a unique Subject."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
import uuid
from email.message import EmailMessage

import pytest
from conftest import Peers, StoredMessage, free_port

pytestmark = pytest.mark.peers

SENDER = "harness@example.org"
TESTUSER = "testuser@example.test"


def make_msg(subject: str, to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@harness.example.org>"
    msg.set_content("harness test\n")
    return msg


def tls(peers: Peers) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=peers.ca_file)


def received(msg: StoredMessage) -> str:
    return "\n".join(str(v) for v in msg.get_all("Received", []))


@pytest.mark.parametrize(
    ("rcpt", "folders"),
    [
        (TESTUSER, ["example.test/testuser"]),
        # mailserver.sh's regexp fallback beats its @domain catch-alls (see Peers.maildirs)
        ("nobody-{u}@example.org", ["example.org/_catchall", "_other"]),
        ("someone-{u}@elsewhere.invalid", ["_other"]),
    ],
    ids=["known-user", "catchall-domain", "other-domain"],
)
def test_plain_port_delivery_and_folders(peers: Peers, unique_subject: str, rcpt: str,
                                         folders: list[str]) -> None:
    rcpt = rcpt.format(u=uuid.uuid4().hex[:8])
    with smtplib.SMTP(peers.host, peers.plain_port, timeout=15) as s:
        s.ehlo("harness.example.org")
        assert not s.has_extn("starttls")
        refused = s.send_message(make_msg(unique_subject, rcpt), SENDER, [rcpt])
        assert refused == {}
    got = peers.wait_for(rcpt, unique_subject)
    assert got.path is not None
    assert got.path.parent.parent in [peers.maildir_root / f for f in folders]
    assert got["Delivered-To"] == rcpt
    assert got["Return-Path"] == f"<{SENDER}>"
    assert got.raw.startswith(b"Return-Path: ")
    assert "with ESMTP " in received(got)
    assert [m["Subject"] for m in peers.messages(rcpt)].count(unique_subject) == 1


def test_submission_starttls_auth(peers: Peers, unique_subject: str) -> None:
    with smtplib.SMTP(peers.host, peers.submission_port, timeout=15) as s:
        s.ehlo("harness.example.org")
        assert not s.has_extn("auth"), "AUTH must only be offered after STARTTLS"
        s.starttls(context=tls(peers))
        s.ehlo("harness.example.org")
        s.login(TESTUSER, peers.users[TESTUSER])
        s.send_message(make_msg(unique_subject, TESTUSER))
    got = peers.wait_for(TESTUSER, unique_subject)
    rec = received(got)
    assert "ESMTPSA" in rec and f"(Authenticated sender: {TESTUSER})" in rec, rec


def test_smtps_auth_plain_other_user(peers: Peers, unique_subject: str) -> None:
    alice = "alice@example.test"
    with smtplib.SMTP_SSL(peers.host, peers.smtps_port, context=tls(peers), timeout=15) as s:
        s.ehlo("harness.example.org")
        s.user, s.password = alice, peers.users[alice]
        s.auth("PLAIN", s.auth_plain)
        s.send_message(make_msg(unique_subject, alice))
    got = peers.wait_for(alice, lambda m: m["Subject"] == unique_subject)
    assert f"(Authenticated sender: {alice})" in received(got)


def test_untrusted_certificate_is_refused_without_ca(peers: Peers) -> None:
    with pytest.raises(ssl.SSLCertVerificationError), \
            smtplib.SMTP_SSL(peers.host, peers.smtps_port, timeout=15,
                             context=ssl.create_default_context()):
        pass


def xoauth2(user: str, token: str) -> smtplib._AuthObject:
    # The server answers a bad token with a JSON error challenge; the client must reply "".
    return lambda challenge=None: (f"user={user}\x01auth=Bearer {token}\x01\x01"
                                   if challenge is None else "")


def test_xoauth2_with_token_from_oauth_server(peers: Peers, unique_subject: str) -> None:
    token = peers.oauth_token(TESTUSER)
    assert token and token != peers.oauth_token(TESTUSER)  # fresh each time
    with smtplib.SMTP(peers.host, peers.submission_port, timeout=15) as s:
        s.starttls(context=tls(peers))
        s.ehlo("harness.example.org")
        assert "XOAUTH2" in s.esmtp_features.get("auth", "").upper().split()
        code, _ = s.auth("XOAUTH2", xoauth2(TESTUSER, token), initial_response_ok=True)
        assert code == 235
        s.send_message(make_msg(unique_subject, TESTUSER))
    got = peers.wait_for(TESTUSER, unique_subject)
    assert f"(Authenticated sender: {TESTUSER})" in received(got)


def test_oauthbearer_smtps(peers: Peers, unique_subject: str) -> None:
    token = peers.oauth_token(TESTUSER)
    port = peers.smtps_port
    gs2 = f"n,a={TESTUSER},\x01host={peers.host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    with smtplib.SMTP_SSL(peers.host, port, context=tls(peers), timeout=15) as s:
        s.ehlo("harness.example.org")
        s.auth("OAUTHBEARER", lambda ch=None: gs2 if ch is None else "\x01",
               initial_response_ok=True)
        s.send_message(make_msg(unique_subject, TESTUSER))
    peers.wait_for(TESTUSER, unique_subject)


def test_xoauth2_bad_and_refreshed_tokens_get_535(peers: Peers) -> None:
    tokens = peers.oauth_tokens(TESTUSER)
    fresh = peers.oauth_refresh(tokens["refresh_token"])  # rotation kills the old access token
    assert fresh["access_token"] != tokens["access_token"]
    for bad in ("not-a-token", tokens["access_token"]):
        with smtplib.SMTP(peers.host, peers.submission_port, timeout=15) as s:
            s.starttls(context=tls(peers))
            s.ehlo("harness.example.org")
            with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
                s.auth("XOAUTH2", xoauth2(TESTUSER, bad), initial_response_ok=True)
            assert exc.value.smtp_code == 535


def test_wait_for_is_bounded(peers: Peers) -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="no message with Subject"):
        peers.wait_for(TESTUSER, f"never-sent-{uuid.uuid4().hex}", timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
