"""Token lifecycle and the proactive check (issue 5), with the providers' token endpoints at
the HTTP seam (httpx.MockTransport) and a clock the test moves: refresh ahead of expiry,
dead grants (no request storm, events with the sign-in link, Google "Testing" apps), the
Microsoft 80-day warning, missing scopes; provider definitions and error mapping; the
sign-in routes' guard; client credentials against the real local OAuth server.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from postroom import settings as settings_mod
from postroom.exceptions import AuthError, ConfigError
from postroom.oauth import checks, errors, flows, providers, web
from postroom.oauth.errors import GrantError
from postroom.oauth.tokens import TokenManager, margin
from postroom.store.db import make_engine, migrate
from postroom.store.schema import events

DAY = 86400.0
MS_TOKEN = "https://login.microsoftonline.com/common/oauth2/v2.0/token"
GOOGLE_TOKEN = "https://oauth2.googleapis.com/token"
GOOGLE_SMTP = ('[[connections]]\nname = "g"\ntransport = "smtp"\nhost = "smtp.gmail.com"\n'
               'port = 465\nsecurity = "smtps"\nauth = "xoauth2"\nusername = "me@gmail.com"\n'
               'oauth = { provider = "google", client_id = "c.apps.googleusercontent.com", '
               'client_secret = "s" }\n')
MS_SMTP = ('[[connections]]\nname = "m"\ntransport = "smtp"\nhost = "smtp.office365.com"\n'
           'auth = "xoauth2"\nusername = "me@contoso.com"\n'
           'oauth = { provider = "microsoft", client_id = "abc" }\n')


class Endpoint:
    """A provider's token endpoint: answers in order, counts requests."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.forms: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.forms.append(dict(urllib.parse.parse_qsl(request.content.decode())))
        if self.answers:
            return self.answers.pop(0)
        n = len(self.forms)
        return httpx.Response(200, json={"access_token": f"at-{n}", "refresh_token": f"rt-{n}",
                                         "expires_in": 3600, "token_type": "Bearer"})


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


_ENGINES: list[Any] = []


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    while _ENGINES:
        _ENGINES.pop().dispose()


def manager(tmp_path: Path, conns: str, endpoint: Endpoint, clock: Clock,
            extra: str = "") -> TokenManager:
    (tmp_path / "postroom.toml").write_text(
        f'[server]\ndata_dir = "data"\nhttp_listen = "127.0.0.1:8025"\n{extra}\n{conns}')
    settings = settings_mod.load(tmp_path / "postroom.toml")
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    _ENGINES.append(engine)
    migrate(engine)
    return TokenManager(settings, engine, Fernet.generate_key(), clock=clock,
                        transport=httpx.MockTransport(endpoint))


def grant(tm: TokenManager, name: str, **token: Any) -> None:
    tm.save(name, {"access_token": "at-0", "refresh_token": "rt-0", "expires_in": 3600,
                   "token_type": "Bearer", **token}, "authorization_code")


def kinds(tm: TokenManager) -> list[str]:
    with tm.engine.connect() as c:
        return [r.kind for r in c.execute(select(events).order_by(events.c.id))]


def test_refreshed_ahead_of_expiry_not_per_message(tmp_path: Path) -> None:
    ep, clock = Endpoint(), Clock()
    tm = manager(tmp_path, MS_SMTP, ep, clock)
    grant(tm, "m", scope="https://outlook.office.com/SMTP.Send offline_access")
    assert margin(3600) == 300 and margin(10) == 1
    for _ in range(100):  # cached: no request while the token is good
        assert tm.token("m") == "at-0"
    clock.now += 3600 - 301
    assert tm.token("m") == "at-0" and not ep.forms
    clock.now += 2  # within 5 minutes of expiry: refreshed before it runs out
    assert tm.token("m") == "at-1" and len(ep.forms) == 1
    form = ep.forms[0]
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "rt-0"
    assert form["scope"] == "https://outlook.office.com/SMTP.Send offline_access"
    g = tm.store.get("m")
    assert g is not None and g.refresh_token == "rt-1"  # Microsoft rotates: the new one kept


def _ms_error(code: int, description: str, error: str = "invalid_grant") -> httpx.Response:
    # The shape of Microsoft identity platform error responses.
    return httpx.Response(400, json={
        "error": error, "error_description": f"AADSTS{code}: {description}\r\nTrace ID: t\r\n"
        "Correlation ID: c\r\nTimestamp: 2026-11-21 08:00:00Z", "error_codes": [code],
        "timestamp": "2026-11-21 08:00:00Z", "trace_id": "t", "correlation_id": "c"})


def test_dead_grant_defers_explains_alerts_once_and_does_not_hammer(tmp_path: Path) -> None:
    idle = ("The refresh token has expired due to inactivity. The token was issued on "
            "2026-08-01 and was inactive for 90.00:00:00.")
    ep, clock = Endpoint(_ms_error(700082, idle), _ms_error(700082, idle)), Clock()
    tm = manager(tmp_path, MS_SMTP, ep, clock)
    grant(tm, "m")
    clock.now += 3600
    with pytest.raises(GrantError) as info:
        tm.token("m")
    err = info.value
    assert err.code == "oauth.invalid_grant" and err.dead and not err.permanent
    assert "not used for too long" in err.message
    assert "http://127.0.0.1:8025/oauth/start/m" in err.message
    assert "AADSTS700082" in err.message
    for _ in range(20):  # every delivery meanwhile: the same explanation, no new request
        with pytest.raises(GrantError):
            tm.token("m")
    assert len(ep.forms) == 1
    assert kinds(tm).count("oauth_grant_dead") == 1
    clock.now += 301  # later the provider is asked again (in case it recovers)
    with pytest.raises(GrantError):
        tm.token("m")
    assert len(ep.forms) == 2 and kinds(tm).count("oauth_grant_dead") == 1


def test_google_grant_dying_after_seven_days_points_at_the_testing_app(tmp_path: Path) -> None:
    ep, clock = Endpoint(httpx.Response(400, json={
        "error": "invalid_grant", "error_description": "Token has been expired or revoked."})), \
        Clock()
    tm = manager(tmp_path, GOOGLE_SMTP, ep, clock)
    grant(tm, "g", scope="https://mail.google.com/")
    clock.now += 7 * DAY + 60
    result = checks.check_one(tm, "g")
    assert result.state == "dead" and "Token has been expired or revoked" in result.detail
    assert kinds(tm)[-2:] == ["oauth_grant_dead", "oauth_testing_app"]
    with tm.engine.connect() as c:
        detail = c.execute(select(events.c.detail).where(
            events.c.kind == "oauth_testing_app")).scalar()
    assert "Testing" in detail and "In production" in detail and "/oauth/start/g" in detail


def test_google_refresh_token_with_a_short_lifetime_is_flagged_at_sign_in(
        tmp_path: Path) -> None:
    tm = manager(tmp_path, GOOGLE_SMTP, Endpoint(), Clock())
    grant(tm, "g", scope="https://mail.google.com/", refresh_token_expires_in=604799)
    assert "oauth_testing_app" in kinds(tm)


def test_check_warns_of_microsoft_idle_grants_and_refreshes_them(tmp_path: Path) -> None:
    ep, clock = Endpoint(), Clock()
    tm = manager(tmp_path, MS_SMTP, ep, clock)
    grant(tm, "m", scope="https://outlook.office.com/SMTP.Send offline_access")
    clock.now += 81 * DAY  # Postroom was stopped for 81 days
    result = checks.check_one(tm, "m")
    assert result.ok, result
    assert "oauth_idle" in kinds(tm) and len(ep.forms) == 1
    g = tm.store.get("m")
    assert g is not None and g.last_refresh_at == clock.now
    clock.now += 3600  # a day has not passed: the next check does not refresh again
    assert checks.check_one(tm, "m").ok and len(ep.forms) == 2  # (the token had expired)
    assert kinds(tm).count("oauth_idle") == 1


def test_check_reports_missing_send_scope_and_missing_grant(tmp_path: Path) -> None:
    ep, clock = Endpoint(), Clock()
    tm = manager(tmp_path, MS_SMTP + GOOGLE_SMTP, ep, clock)
    grant(tm, "m", scope="openid email offline_access")  # consent without SMTP.Send
    results = {r.connection: r for r in __import__("asyncio").run(checks.run_checks(tm))}
    assert results["m"].state == "warning" and "SMTP.Send" in results["m"].detail
    assert results["g"].state == "no_grant" and "/oauth/start/g" in results["g"].detail
    assert {"oauth_scope_missing", "oauth_no_grant"} <= set(kinds(tm))
    # Microsoft lists Graph scopes without the resource: that counts as holding them.
    assert not tm.missing_scopes("m", tm.store.get("m").__class__(  # type: ignore[union-attr]
        connection="m", provider="microsoft", client_id="abc", grant_type="authorization_code",
        scopes=("SMTP.Send",), granted_at=0))


@pytest.mark.parametrize(("error", "description", "code"), [
    ("invalid_grant", "AADSTS65001: The user or administrator has not consented to use the "
     "application with ID 'x' named 'Postroom'.", "oauth.consent_required"),
    ("invalid_grant", "AADSTS90094: The grant requires admin permission.",
     "oauth.admin_consent_required"),
    ("invalid_client", "AADSTS7000215: Invalid client secret provided.", "oauth.invalid_client"),
    ("invalid_client", "AADSTS7000222: The provided client secret keys are expired.",
     "oauth.invalid_client"),
    ("invalid_request", "AADSTS50011: The redirect URI 'http://x/oauth/callback' specified in "
     "the request does not match the redirect URIs configured for the application.",
     "oauth.redirect_uri_mismatch"),
    ("redirect_uri_mismatch", "Bad Request", "oauth.redirect_uri_mismatch"),
    ("invalid_grant", "Token has been expired or revoked.", "oauth.invalid_grant"),
    ("invalid_client", "Unauthorized", "oauth.invalid_client"),
    ("interaction_required", "AADSTS50076: Due to a configuration change made by your "
     "administrator, you must use multi-factor authentication.", "oauth.interaction_required"),
])
def test_provider_errors_map_to_causes_and_fixes(error: str, description: str,
                                                 code: str) -> None:
    key = errors.classify(error, description)
    err = errors.failure(key, "c", said=f"{error}: {description}",
                         redirect_uri="http://127.0.0.1:8025/oauth/callback",
                         console="https://entra.microsoft.com/")
    assert err.code == code and not err.permanent and "Fix: " in err.message
    if code == "oauth.redirect_uri_mismatch":
        assert "register exactly http://127.0.0.1:8025/oauth/callback" in err.message


def _challenge(data: dict[str, str]) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def test_smtp_refusals_after_a_token_are_explained() -> None:
    # Gmail: the token is good but for another account than the XOAUTH2 user (status 400).
    transcript = ("C: AUTH XOAUTH2 ********\nS: 334 " + _challenge(
        {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"})
        + "\nC: \nS: 535 5.7.8 Username and Password not accepted.")
    err = AuthError.from_reply("AUTH XOAUTH2 as me@gmail.com", 535,
                               "5.7.8 Username and Password not accepted.", code="auth.rejected")
    out = errors.explain_smtp(err, transcript, "me@gmail.com")
    assert out.code == "auth.rejected.oauth_account" and not out.permanent
    assert "account that granted access is not this username" in out.message
    m365 = AuthError.from_reply(
        "AUTH XOAUTH2 as me@contoso.com", 535, "5.7.139 Authentication unsuccessful, "
        "SmtpClientAuthentication is disabled for the Tenant. Visit "
        "https://aka.ms/smtp_auth_disabled for more information.", code="auth.rejected")
    out = errors.explain_smtp(m365, "", "me@contoso.com")
    assert out.code == "auth.rejected.smtp_auth_disabled" and 'transport = "msgraph"' in out.message


def test_provider_definitions(tmp_path: Path, peers: Any) -> None:
    tm = manager(tmp_path, MS_SMTP.replace('client_id = "abc"',
                                           'client_id = "abc", tenant = "contoso.com"')
                 + GOOGLE_SMTP, Endpoint(), Clock())
    ep = tm.endpoints("m")
    assert ep.authorize_url == ("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/"
                                "authorize")
    assert ep.scopes == ("https://outlook.office.com/SMTP.Send", "offline_access")
    assert ep.authorize_params == {"prompt": "select_account"}
    g = tm.endpoints("g")
    assert g.authorize_params == {"access_type": "offline", "prompt": "consent"}
    with pytest.raises(ConfigError, match="does not allow the scope"):
        flows.device_start(tm, "g")  # Google: no Gmail scope in the device flow
    url = flows.start(tm, "g")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["redirect_uri"] == "http://127.0.0.1:8025/oauth/callback"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert q["access_type"] == "offline" and q["scope"] == "https://mail.google.com/"
    # A generic provider from its RFC 8414 document (the local server's).
    found = providers.discover(f"{peers.oauth_base}/o/.well-known/oauth-authorization-server")
    assert found["token_url"] == f"{peers.oauth_base}/o/token/"
    with pytest.raises(ConfigError, match="not a known provider"):
        providers.provider("fastmail")
    bad = tmp_path / "bad"
    bad.mkdir()
    app_only = manager(bad, '[[connections]]\nname = "x"\ntransport = "msgraph"\n'
                       'oauth = { provider = "microsoft", client_id = "a", client_secret = "b", '
                       'grant = "client_credentials" }\n', Endpoint(), Clock())
    with pytest.raises(ConfigError, match="needs tenant"):
        app_only.endpoints("x")


def test_sign_in_start_always_needs_a_ticket(tmp_path: Path) -> None:
    """Issue 11: an address in trusted_networks no longer starts a sign-in without a ticket
    (behind a same-host proxy every client is 127.0.0.1); the callback wants the browser's
    cookie. The real server's doors are in test_hostile_oauth."""
    tm = manager(tmp_path, GOOGLE_SMTP, Endpoint(), Clock())
    app = FastAPI()
    app.include_router(web.router)
    app.state.ctx = SimpleNamespace(settings=tm.settings)
    app.state.oauth = tm
    client = TestClient(app, base_url="http://127.0.0.1:8025", follow_redirects=False,
                        client=("127.0.0.1", 50000))
    assert client.get("/oauth/start/g").status_code == 403
    once = web.ticket(tm.key, "g", tm.clock())
    r = client.get(f"/oauth/start/g?ticket={once}")
    assert r.status_code == 302 and r.headers["location"].startswith(
        "https://accounts.google.com/o/oauth2/v2/auth?")
    again = client.get(f"/oauth/start/g?ticket={once}")
    assert again.status_code == 403 and "already used" in again.text
    other = web.ticket(tm.key, "other", tm.clock())
    assert client.get(f"/oauth/start/g?ticket={other}").status_code == 403
    r = client.get("/oauth/callback?state=nope&code=x")
    assert r.status_code == 400 and "not started in this browser" in r.text
    r = client.get("/oauth/callback?code=x")
    assert r.status_code == 400 and "already used" in r.text
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
        client.get(f"/oauth/start/g?ticket={web.ticket(tm.key, 'g', tm.clock())}")
        .headers["location"]).query))["state"]
    r = client.get(f"/oauth/callback?state={state}&error=access_denied&error_description=no")
    assert r.status_code == 400 and "declined" in r.text


def test_client_credentials_from_the_local_server(peers: Any, tmp_path: Path) -> None:
    base = peers.oauth_base
    conn = ('[[connections]]\nname = "app"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
            'auth = "xoauth2"\nusername = "svc@example.test"\n'
            'oauth = { provider = "generic", grant = "client_credentials", '
            'client_id = "dovecot-introspect", client_secret = "dovecot-introspect-secret", '
            f'token_url = "{base}/o/token/", scopes = ["introspection"] }}\n')
    (tmp_path / "postroom.toml").write_text(f'[server]\ndata_dir = "data"\n{conn}')
    settings = settings_mod.load(tmp_path / "postroom.toml")
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    _ENGINES.append(engine)
    migrate(engine)
    tm = TokenManager(settings, engine, Fernet.generate_key())
    first = tm.token("app")
    assert first and tm.token("app") == first  # cached, no second request
    g = tm.store.get("app")
    assert g is not None and g.grant_type == "client_credentials" and g.refresh_token is None
    assert g.scopes == ("introspection",)
    # The token is real: the server introspects it as active.
    r = httpx.post(f"{base}/o/introspect/", data={"token": first},
                   auth=("dovecot-introspect", "dovecot-introspect-secret"), timeout=20)
    assert r.json()["active"] is True
    engine.dispose()


def test_periodic_check_runs_until_stopped(tmp_path: Path) -> None:
    import asyncio

    tm = manager(tmp_path, MS_SMTP, Endpoint(), Clock())
    grant(tm, "m", scope="https://outlook.office.com/SMTP.Send offline_access")
    seen: list[list[checks.Check]] = []

    async def go() -> None:
        stop = asyncio.Event()

        def got(results: list[checks.Check]) -> None:
            seen.append(results)
            stop.set()

        await asyncio.wait_for(checks.periodic(tm, stop, got), timeout=30)

    asyncio.run(go())
    assert [r.state for r in seen[0]] == ["ok"]


def test_a_token_refused_right_after_a_refresh_is_not_refreshed_again(tmp_path: Path) -> None:
    ep, clock = Endpoint(), Clock()
    tm = manager(tmp_path, MS_SMTP, ep, clock)
    grant(tm, "m")
    assert tm.token("m", refresh=True) == "at-1"  # refused after sign-in: refreshed once
    clock.now += 5
    with pytest.raises(GrantError) as info:  # refused again, 5 s after that refresh
        tm.token("m", refresh=True)
    assert info.value.code == "oauth.token_refused" and len(ep.forms) == 1
    clock.now += 60  # later a refusal is answered with a refresh again
    assert tm.token("m", refresh=True) == "at-2" and len(ep.forms) == 2
