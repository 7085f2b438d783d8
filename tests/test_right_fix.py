"""Right cause, right fix (issue 12, section 2): each failure below once got advice that was
wrong; here it is reproduced and the advice a user reads is asserted, with the wrong one absent.

Against the real peers where they show it (Postfix 10025 is a relay port without AUTH or
STARTTLS, 10465 speaks implicit TLS, 10587 has a certificate for other names than the one
asked, Dovecot refuses an OAuth token of another account), else a local server answering with
the provider's exact words. The advice is read from the stored attempt record through the real
worker and queue (test_advice's helpers), as `postroom show`, `postroom test` and the HTTP API
get it. The catalog entries added for these cases are declared with ``covers`` (counted by
test_advice's coverage check).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from diag_helpers import HOST, SILENT, Scripted, blackhole
from rich.console import Console
from test_advice import (
    M365_DISABLED,
    TESTUSER,
    advice_of,
    attempt,
    auth_refused,
    covers,
    expect,
    queue,
    replied,
    smtp,
)
from typer.testing import CliRunner

from postroom import settings as settings_mod
from postroom.cli import app
from postroom.diagnostics.advice import advice_for_attempt
from postroom.diagnostics.render import print_advice
from postroom.exceptions import DeliveryError
from postroom.oauth import checks, errors
from postroom.oauth.errors import GrantError
from postroom.oauth.tokens import TokenManager
from postroom.queue.sql import Queue
from postroom.runtime import Instance
from postroom.store.db import make_engine, migrate
from postroom.transports import base
from postroom.transports.smtp import Settings, Transport

__all__ = ["queue"]  # the fixture, shared with test_advice


# -- 1. a greeting timeout after the TCP connect is no firewall --------------------------------
@covers("tls.implicit_expected", "timeout.connect")
def test_starttls_on_the_smtps_port_reads_unlike_a_dropped_port(queue: Queue,
                                                                 peers: Any) -> None:
    row = attempt(queue, smtp(peers.smtps_port, security="starttls", connect_timeout=1,
                              ca_file=peers.ca_file))
    assert row["error_code"] == "tls.implicit_expected", row
    transcript = row["transcript"]
    assert f"*  connected to {HOST} port {peers.smtps_port}" in transcript
    assert "*  a TLS server answered (TLSv1." in transcript and "S: " not in transcript
    assert 'set security = "smtps"' in row["reply_text"]
    advice = expect(advice_of(row), "tls.implicit_expected")
    assert "implicit TLS, usually 465" in advice["cause"]
    assert f'Set security = "smtps" for port {peers.smtps_port}' in advice["fix"]
    assert "firewall" not in advice["cause"] + advice["fix"]

    with blackhole() as port:
        dropped = attempt(queue, smtp(port, connect_timeout=1))
    assert dropped["error_code"] == "timeout.connect", dropped
    assert "connected to" not in dropped["transcript"]
    advice = expect(advice_of(dropped), "timeout.connect")
    assert "never established" in advice["cause"] and "firewall" in advice["cause"]
    assert "implicit TLS" not in advice["cause"] + advice["fix"]


@covers("timeout.greeting")
def test_connected_but_silent_and_no_tls_either(queue: Queue) -> None:
    with Scripted(greeting=SILENT).running() as srv:
        row = attempt(queue, smtp(srv.port, connect_timeout=1))
    assert row["error_code"] == "timeout.greeting", row
    assert f"*  connected to {HOST} port {srv.port}" in row["transcript"]
    assert "*  no TLS server answered either" in row["transcript"]
    advice = expect(advice_of(row), "timeout.greeting")
    assert advice["cause"].startswith("The TCP connection was established, so no firewall")
    assert "implicit TLS, usually 465" in advice["cause"]


# -- 2. no AUTH and no STARTTLS: a relay/MX port ----------------------------------------------
@covers("port.relay")
def test_relay_port_without_auth_or_starttls(queue: Queue, peers: Any) -> None:
    login = {"username": TESTUSER, "password": peers.users[TESTUSER],
             "allow_plaintext_auth": True}
    for auth in ("plain", None):  # a mechanism named, or chosen automatically
        row = attempt(queue, smtp(peers.plain_port, auth=auth, **login))
        assert row["error_code"] == "auth.mechanism_unavailable", row
        assert "neither AUTH nor STARTTLS" in row["reply_text"]
        assert "pick one of those" not in row["reply_text"]
        advice = expect(advice_of(row), "port.relay")
        assert "Use the submission port (587 with STARTTLS or 465 with TLS)" in advice["fix"]
        assert 'Set security = "starttls"' not in advice["fix"]
    # security = "starttls" against it says the same, not "set security".
    row = attempt(queue, smtp(peers.plain_port, security="starttls"))
    assert row["error_code"] == "tls.starttls_unavailable", row
    advice = expect(advice_of(row), "port.relay")
    assert "relay or MX port" in advice["cause"]


def test_auth_offered_only_after_starttls_still_says_starttls(queue: Queue,
                                                              peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, username=TESTUSER,
                              password=peers.users[TESTUSER], allow_plaintext_auth=True))
    assert "no AUTH before TLS (it offers STARTTLS)" in row["reply_text"]
    advice = expect(advice_of(row), "auth.not_before_tls")
    assert 'Set security = "starttls"' in advice["fix"]


# -- 3. XOAUTH2 for another account: a mismatch, not "expired or revoked" -----------------------
class _Grants:
    """A token provider that knows who signed in (as postroom.oauth's does) and hands out
    the token of oauth_token_env, which nothing can refresh."""

    def __init__(self, account: str) -> None:
        self.account = account

    def token(self, connection: str, *, refresh: bool = False,
              rejected: str | None = None) -> str:
        raise AssertionError("the token comes from oauth_token_env")

    def explain(self, err: DeliveryError, transcript: str, username: str,
                connection: str | None = None) -> DeliveryError:
        return errors.explain_smtp(err, transcript, username, account=self.account)


@covers("auth.oauth.account_mismatch")
def test_token_of_another_account_is_a_mismatch(queue: Queue, peers: Any) -> None:
    os.environ["POSTROOM_RIGHT_FIX_TOKEN"] = peers.oauth_token("alice@example.test")
    try:
        settings = Settings(name="mismatch", host=HOST, port=peers.submission_port,
                            ca_file=peers.ca_file, username=TESTUSER, auth="xoauth2",
                            oauth_token_env="POSTROOM_RIGHT_FIX_TOKEN", connect_timeout=5,
                            timeout=10)
        t = Transport(settings, base.TransportContext(ehlo_name="right.test",
                                                      tokens=_Grants("alice@example.test")))
        row = attempt(queue, t)
    finally:
        os.environ.pop("POSTROOM_RIGHT_FIX_TOKEN")
    assert row["error_code"] == "auth.rejected.oauth_account", row
    # Nothing refreshed it (a token from the environment): the transcript does not say so.
    assert "refreshing it once" not in row["transcript"]
    assert "which Postroom cannot refresh; not tried again" in row["transcript"]
    assert row["transcript"].count("C: AUTH XOAUTH2") == 1
    advice = expect(advice_of(row), "auth.oauth.account_mismatch")
    assert advice["cause"].startswith("Account mismatch")
    assert "expired" not in advice["cause"] and "revoked" not in advice["cause"]


# -- the token manager: who signed in, what it did --------------------------------------------
SMTP_OAUTH = ('[[connections]]\nname = "m"\ntransport = "smtp"\nhost = "smtp.office365.com"\n'
              'auth = "xoauth2"\nusername = "shared@contoso.com"\n'
              'oauth = { provider = "microsoft", client_id = "abc" }\n')


def _manager(tmp_path: Path, server: str, answers: list[httpx.Response]) -> TokenManager:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "postroom.toml").write_text(
        f'[server]\ndata_dir = "data"\n{server}\n{SMTP_OAUTH}')
    settings = settings_mod.load(tmp_path / "postroom.toml")
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    migrate(engine)
    n = iter(range(1, 100))

    def endpoint(request: httpx.Request) -> httpx.Response:
        if answers:
            return answers.pop(0)
        i = next(n)
        return httpx.Response(200, json={"access_token": f"at-{i}", "refresh_token": f"rt-{i}",
                                         "expires_in": 3600, "token_type": "Bearer"})

    return TokenManager(settings, engine, Fernet.generate_key(),
                        transport=httpx.MockTransport(endpoint))


def test_the_account_that_signed_in_is_reported_and_refreshes_are_told_as_they_were(
        tmp_path: Path) -> None:
    tm = _manager(tmp_path, "", [])
    scope = "https://outlook.office.com/SMTP.Send offline_access"
    try:
        # A sign-in where the provider did not name the account: not the configured one.
        g = tm.save("m", {"access_token": "at-0", "refresh_token": "rt-0", "expires_in": 3600,
                          "token_type": "Bearer", "scope": scope}, "authorization_code")
        assert g.account is None
        assert checks.check_one(tm, "m").detail.startswith(
            "signed in as an account the provider did not name")
        g = tm.save("m", {"access_token": "at-0", "refresh_token": "rt-0", "expires_in": 3600,
                          "token_type": "Bearer", "scope": scope}, "authorization_code",
                    account="alice@contoso.com")
        check = checks.check_one(tm, "m")
        assert (check.ok, check.state) == (False, "warning")
        assert "the account that signed in is alice@contoso.com" in check.detail
        assert "username is shared@contoso.com" in check.detail
        # The refusal after a refresh: a refresh is claimed because one was made...
        token, what = tm.token_again("m", "at-0")
        assert token != "at-0" and what.startswith("refreshing it once")
        # ...and not the second time, moments later: the account is named instead.
        with pytest.raises(GrantError) as info:
            tm.token_again("m", token)
        err = info.value
        assert err.code == "oauth.token_refused" and "not refreshing it again" in err.message
        assert "the account that signed in is alice@contoso.com" in err.message
        explained = tm.explain(DeliveryError("AUTH XOAUTH2 as shared@contoso.com: 535",
                                             reply_code=535, reply_text="5.7.3 Authentication "
                                             "unsuccessful"), "", "shared@contoso.com", "m")
        assert explained.code == "auth.rejected.oauth_account"
        assert "expired or was revoked" not in explained.message
    finally:
        tm.engine.dispose()


# -- 4. a rate limit's fix is rate_limit, with the provider's documented limit -------------------
M365_RATE = "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
M365_THREADS = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
GMAIL_RATE = ("421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating "
              "from your DKIM domain.\r\n421-4.7.28 To protect our users from spam, mail sent "
              "from your domain has been temporarily\r\n421-4.7.28 rate limited. Please visit\r\n"
              "421 4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to "
              "review our Bulk Email Senders Guidelines. - gsmtp")


@covers("rate.limited.m365", "rate.limited.gmail", "rate.sessions.m365")
def test_rate_limit_replies_name_the_rate_limit(queue: Queue) -> None:
    advice = expect(advice_of(replied(queue, mail=M365_RATE)), "rate.limited.m365")
    assert 'rate_limit = ["30/minute", "10000/day"]' in advice["fix"]
    advice = expect(advice_of(replied(queue, mail=GMAIL_RATE)), "rate.limited.gmail")
    assert 'rate_limit = ["2000/day"]' in advice["fix"]
    advice = expect(advice_of(replied(queue, mail="421 4.7.0 Try again later, closing "
                                      "connection.")), "rate.limited")
    assert "rate_limit" in advice["fix"]
    for text in (M365_RATE, GMAIL_RATE):
        fix = advice_of(replied(queue, mail=text))["fix"]  # type: ignore[index]
        assert "max_sessions" not in fix and "concurrency" not in fix
    # Microsoft's limit on simultaneous connections is the one that max_sessions is for.
    advice = expect(advice_of(replied(queue, mail=M365_THREADS)), "rate.sessions.m365")
    assert "max_sessions = 3" in advice["fix"] and "rate_limit" not in advice["fix"]


# -- 5. Microsoft 5.7.139: the way around is Graph ----------------------------------------------
def test_smtp_auth_disabled_points_to_graph_not_xoauth2(queue: Queue) -> None:
    advice = expect(advice_of(auth_refused(queue, M365_DISABLED)), "auth.m365.smtp_auth_disabled")
    assert 'transport = "msgraph"' in advice["fix"]
    assert "Or send with OAuth (XOAUTH2)" not in advice["fix"]
    err = errors.explain_smtp(DeliveryError("AUTH XOAUTH2 as a@contoso.com", reply_code=535,
                                            reply_text=M365_DISABLED[4:]), "", "a@contoso.com")
    assert 'transport = "msgraph"' in err.message and "blocks OAuth (XOAUTH2) too" in err.message


# -- 6. a certificate for another name: no "set ca_file" ----------------------------------------
def test_name_mismatch_does_not_suggest_ca_file(queue: Queue, peers: Any) -> None:
    row = attempt(queue, smtp(peers.submission_port, security="starttls", ca_file=peers.ca_file,
                              tls_server_name="smtp.example.org"))
    assert row["error_code"] == "tls.certificate"
    assert "ca_file" not in row["reply_text"] and "tls_server_name" in row["reply_text"]
    assert "ca_file" not in expect(advice_of(row), "tls.name_mismatch")["fix"]
    row = attempt(queue, smtp(peers.submission_port, security="starttls"))  # a private CA
    assert "set ca_file" in row["reply_text"]


# -- 7. OAuth errors: cause and fix lines, once; the sign-in link only where it is served -------
def _settings(tmp_path: Path, listen: str) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "postroom.toml").write_text(
        f'[server]\ndata_dir = "data"\nhttp_listen = "{listen}"\n{SMTP_OAUTH}')
    return settings_mod.load(tmp_path / "postroom.toml")


def _as_attempt(err: DeliveryError) -> dict[str, Any]:
    """The attempt record the worker stores for ``err``."""
    return {"connection": "m", "outcome": "deferred", "error_code": err.code,
            "reply_code": err.reply_code, "reply_text": err.reply_text or err.message,
            "transcript": err.transcript}


def _shown(a: dict[str, Any], settings: Any) -> str:
    """What `postroom show` prints for the attempt's error: its line, then the advice."""
    con = Console(record=True, width=200)
    con.print(f"  error ({a['error_code']}): {a['reply_text']}", markup=False)
    print_advice(con, advice_for_attempt(a, settings=settings))
    return con.export_text()


@covers("oauth.invalid_grant", "oauth.token_refused", "oauth.sign_in", "oauth")
def test_oauth_errors_have_cause_and_fix_once(tmp_path: Path) -> None:
    on, off = _settings(tmp_path / "on", "127.0.0.1:8025"), _settings(tmp_path / "off", "")
    dead = errors.failure("invalid_grant", "m", said="invalid_grant: AADSTS70008: The "
                          "refresh token has expired due to inactivity.", link="")
    assert "/oauth/start" not in dead.message
    assert "`postroom oauth login m --device`" in dead.message
    text = _shown(_as_attempt(dead), off)
    assert text.count("postroom oauth login m") == 1 and "Fix:" not in text
    assert "why: The connection's OAuth grant is dead" in text
    advice = expect(advice_for_attempt(_as_attempt(dead), settings=off), "oauth.invalid_grant")
    assert "`postroom oauth login m --device`" in advice["fix"]
    assert "/oauth/start" not in advice["fix"]
    advice = advice_for_attempt(_as_attempt(dead), settings=on)
    assert advice and "open the link it prints" in advice["fix"]

    refused = GrantError("connection m: the server refused an access token refreshed 2 s ago; "
                         "not refreshing it again", code="oauth.token_refused")
    text = _shown(_as_attempt(refused), on)
    assert text.count("not refreshing it again") == 1
    advice = expect(advice_for_attempt(_as_attempt(refused), settings=on),
                    "oauth.token_refused")
    assert "postroom oauth status" in advice["fix"] and "expired" not in advice["cause"]

    never = errors.failure("no_grant", "m", link="")
    expect(advice_for_attempt(_as_attempt(never), settings=off), "oauth.sign_in")
    client = errors.failure("invalid_client", "m", said="invalid_client", console="Entra")
    advice = expect(advice_for_attempt(_as_attempt(client), settings=on), "oauth")
    shown = _shown(_as_attempt(client), on)  # the provider-specific fix is in the error line
    assert shown.count("client secret with the app registration (Entra)") == 1


def test_sign_in_link_only_where_a_listener_serves_it(tmp_path: Path) -> None:
    for listen, has_link in (("", False), ("127.0.0.1:8025", True)):
        tm = _manager(tmp_path / (listen or "off"), f'http_listen = "{listen}"', [])
        try:
            assert bool(tm.sign_in_link("m")) is has_link
            with pytest.raises(GrantError) as info:
                tm.token("m")  # no grant yet
            assert ("/oauth/start/m" in info.value.message) is has_link
            assert "postroom oauth login m" in info.value.message
        finally:
            tm.engine.dispose()


def test_a_greeting_refusal_records_the_connection_once(queue: Queue) -> None:
    # A server that answers at once: "connected" is noted once, before its greeting.
    with Scripted(greeting="554 5.7.1 no").running() as srv:
        started = time.monotonic()
        row = attempt(queue, smtp(srv.port))
    assert row["error_code"] == "connect.greeting" and time.monotonic() - started < 30
    assert row["transcript"].count("*  connected to") == 1


def test_oauth_status_and_login_report_what_is_true(tmp_path: Path) -> None:
    """`oauth status`: the account that signed in, a mismatch with username, no live expiry
    for a dead grant; `oauth login` prints no link that no listener serves."""
    config = tmp_path / "postroom.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nhttp_listen = ""\n'
                      f'{SMTP_OAUTH}')
    tm = Instance(settings_mod.load(config)).oauth
    tm.save("m", {"access_token": "at-0", "refresh_token": "rt-0", "expires_in": 3600,
                  "token_type": "Bearer"}, "authorization_code", account="alice@contoso.com")
    tm.store.update("m", state="dead", last_error="connection m: the grant is dead")
    tm.engine.dispose()
    runner = CliRunner()
    shown = runner.invoke(app, ["oauth", "status", "--json", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    row = json.loads(shown.output)[0]
    assert row["account"] == "alice@contoso.com" and row["state"] == "dead"
    assert row["expires_at"] is None  # the token of a dead grant is refused, whatever its date
    assert "username is shared@contoso.com" in row["account_mismatch"]
    table = runner.invoke(app, ["oauth", "status", "--config", str(config)],
                          env={"COLUMNS": "200"})
    assert "unusable: sign in again" in table.output and "expires in" not in table.output
    login = runner.invoke(app, ["oauth", "login", "m", "--config", str(config)],
                          env={"COLUMNS": "200"})
    assert login.exit_code == 1
    assert "/oauth/start" not in login.output and "postroom oauth login m --device" in login.output
