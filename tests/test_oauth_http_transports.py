"""The Gmail API and Microsoft Graph transports at the HTTP seam (httpx.MockTransport), with
request and response shapes from the providers' documentation, and their tokens from the
real TokenManager (its token requests answered at the same seam):

- Gmail ``users.messages.send``: JSON ``{"raw": base64url}``; a large message through the
  media upload endpoint as message/rfc822; Bcc added for envelope-only recipients; a Google
  service account's signed JWT (domain-wide delegation) and a user grant's refresh;
- Graph ``sendMail`` with base64 MIME as text/plain, as a shared mailbox, with an app-only
  (client credentials) token from the tenant's endpoint;
- errors: 401 -> one refresh and a retry; 403 scope / send-as; 429 with Retry-After and 5xx
  -> transient, connection-level; 400 -> the message is refused for good.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from postroom import settings as settings_mod
from postroom.envelope import Envelope
from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.oauth.tokens import TokenManager
from postroom.routing.chain import Next, after_failure
from postroom.store.db import make_engine, migrate
from postroom.transports import base, gmail, msgraph

Handler = Callable[[httpx.Request], httpx.Response]
GOOGLE_TOKEN = "https://oauth2.googleapis.com/token"
MS_TOKEN = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"


def message(to: str = "bob@example.org", bcc: str = "", size: int = 0) -> bytes:
    head = (f"From: Shared <shared@contoso.com>\r\nTo: {to}\r\nSubject: hello\r\n"
            "Message-ID: <m1@contoso.com>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n")
    if bcc:
        head += f"Bcc: {bcc}\r\n"
    return (head + "\r\n" + "x" * size + "Hello.\r\n").encode()


class Seam:
    """Requests seen and the answers to give, per host."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []
        self.token_requests: list[dict[str, str]] = []
        self.api: list[httpx.Response] = []  # answers for the API, in order
        self.tokens = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        url = str(request.url)
        if url in (GOOGLE_TOKEN, MS_TOKEN):
            form = dict(urllib.parse.parse_qsl(request.content.decode()))
            self.token_requests.append(form)
            self.tokens += 1
            return httpx.Response(200, json={
                "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                "access_token": f"access-{self.tokens}", "scope": form.get("scope", "")})
        return self.api.pop(0) if self.api else httpx.Response(599)


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


def setup(tmp_path: Path, conn: str, seam: Seam, clock: Clock) -> tuple[Any, TokenManager]:
    (tmp_path / "postroom.toml").write_text(
        f'[server]\ndata_dir = "data"\nhttp_listen = ""\n{conn}')
    settings = settings_mod.load(tmp_path / "postroom.toml")
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    _ENGINES.append(engine)
    migrate(engine)
    tm = TokenManager(settings, engine, Fernet.generate_key(), clock=clock,
                      transport=httpx.MockTransport(seam.handler))
    return settings, tm


def transport(module: Any, settings: Any, tm: TokenManager, seam: Seam) -> Any:
    ctx = base.TransportContext(ehlo_name="test", tokens=tm)
    return module.Transport(settings.connections[0], ctx,
                            http=httpx.MockTransport(seam.handler))


def send(t: Any, env: Envelope) -> base.DeliveryResult:
    async def go() -> base.DeliveryResult:
        try:
            return await t.send(env)  # type: ignore[no-any-return]
        finally:
            await t.aclose()

    return asyncio.run(go())


def fail(t: Any, env: Envelope) -> DeliveryError:
    with pytest.raises(DeliveryError) as info:
        send(t, env)
    return info.value


# -- Microsoft Graph -------------------------------------------------------------------------
GRAPH = ('[[connections]]\nname = "m365"\ntransport = "msgraph"\nmailbox = "shared@contoso.com"\n'
         'oauth = { provider = "microsoft", tenant = "contoso.onmicrosoft.com", '
         'grant = "client_credentials", client_id = "11111111-2222-3333-4444-555555555555", '
         'client_secret = "s3cret" }\n')


def graph_error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={"error": {
        "code": code, "message": message, "innerError": {
            "date": "2026-11-21T08:00:00", "request-id": "5a5a-1", "client-request-id": "5a5a-1"}}})


def test_graph_sends_mime_as_a_shared_mailbox_with_an_app_only_token(tmp_path: Path) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GRAPH, seam, clock)
    seam.api = [httpx.Response(202, headers={"request-id": "r-1"})]
    env = Envelope("shared@contoso.com", ["bob@example.org", "carol@example.org"],
                   message(bcc=""))
    result = send(transport(msgraph, settings, tm, seam), env)
    assert {r: v.code for r, v in result.recipients.items()} == {
        "bob@example.org": 250, "carol@example.org": 250}
    # The token: client credentials at the tenant's v2.0 endpoint, the Graph .default scope.
    form = seam.token_requests[0]
    assert form["grant_type"] == "client_credentials" and form["client_secret"] == "s3cret"
    assert form["scope"] == "https://graph.microsoft.com/.default"
    req = next(r for r in seam.seen if r.url.host == "graph.microsoft.com")
    assert str(req.url) == "https://graph.microsoft.com/v1.0/users/shared@contoso.com/sendMail"
    assert req.headers["content-type"] == "text/plain"
    assert req.headers["authorization"] == "Bearer access-1"
    sent = base64.b64decode(req.content)
    # carol is only in the envelope: added as Bcc, which Graph removes on delivery.
    assert sent.startswith(b"Bcc: carol@example.org\r\n") and sent.endswith(env.raw)
    assert "Bearer ****" in result.transcript and "access-1" not in result.transcript
    grant = tm.store.get("m365")
    assert grant is not None and grant.grant_type == "client_credentials"


def test_graph_401_refreshes_once_then_succeeds(tmp_path: Path) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GRAPH, seam, clock)
    t = transport(msgraph, settings, tm, seam)
    asyncio.run(tm.atoken("m365"))  # a token from a minute ago...
    clock.now += 60
    seam.api = [graph_error(401, "InvalidAuthenticationToken",
                            "Access token has expired or is not yet valid."),
                httpx.Response(202)]
    result = send(t, Envelope("shared@contoso.com", ["bob@example.org"], message()))
    assert result.reply_code == 250 and seam.tokens == 2
    api = [r for r in seam.seen if r.url.host == "graph.microsoft.com"]
    assert [r.headers["authorization"] for r in api] == ["Bearer access-1", "Bearer access-2"]
    assert "refreshing it once" in result.transcript


@pytest.mark.parametrize(("answer", "error", "code", "permanent", "falls_back"), [
    (graph_error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."),
     AuthError, "oauth.scope_missing", False, True),
    (graph_error(403, "ErrorSendAsDenied", "The user account which was used to submit this "
                 "request does not have the right to send mail on behalf of the specified "
                 "sending account."), SenderRejected, "sender.send_as_denied", False, True),
    (graph_error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency "
                 "limit.", **{"Retry-After": "17"}), ConnectError, "provider.rate_limited",
     False, True),
    (graph_error(503, "ServiceUnavailable", "Service Unavailable"), ConnectError,
     "provider.unavailable", False, True),
    (graph_error(400, "ErrorMimeContentInvalidBase64String",
                 "Invalid base64 string for MIME content."), DataRejected, "data.rejected",
     True, False),
    (graph_error(404, "ErrorInvalidUser", "The requested user 'shared@contoso.com' is "
                 "invalid."), DeliveryError, "config.mailbox", False, True),
])
def test_graph_errors_are_classified(tmp_path: Path, answer: httpx.Response, error: type,
                                     code: str, permanent: bool, falls_back: bool) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GRAPH, seam, clock)
    seam.api = [answer]
    err = fail(transport(msgraph, settings, tm, seam),
               Envelope("shared@contoso.com", ["bob@example.org"], message()))
    assert isinstance(err, error) and err.code == code and err.permanent is permanent, err
    assert (after_failure(err) is Next.FALLBACK) is falls_back
    assert "Fix" in err.message or "retries" in err.message or "refuses" in err.message \
        or "check" in err.message
    if code == "provider.rate_limited":
        assert "17 s (Retry-After)" in err.message


def test_graph_refuses_what_it_cannot_send_exactly(tmp_path: Path) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GRAPH, seam, clock)
    # bob is in To but not part of this delivery: Graph would send to him anyway.
    err = fail(transport(msgraph, settings, tm, seam),
               Envelope("shared@contoso.com", ["carol@example.org"], message()))
    assert isinstance(err, UnsupportedFeature) and err.code == "unsupported.recipients"
    big = Envelope("shared@contoso.com", ["bob@example.org"], message(size=3_200_000))
    err = fail(transport(msgraph, settings, tm, seam), big)
    assert err.code == "unsupported.size" and after_failure(err) is Next.FALLBACK


# -- Gmail API ----------------------------------------------------------------------------------
def gmail_error(status: int, reason: str, message: str, grpc: str,
                detail: str | None = None, **headers: str) -> httpx.Response:
    body: dict[str, Any] = {"code": status, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": reason}], "status": grpc}
    if detail:
        body["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": detail, "domain": "googleapis.com",
                            "metadata": {"service": "gmail.googleapis.com"}}]
    return httpx.Response(status, headers=headers, json={"error": body})


def service_account(tmp_path: Path) -> tuple[Path, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = tmp_path / "sa.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "kid1",
        "private_key": pem, "client_email": "postroom@p.iam.gserviceaccount.com",
        "client_id": "1234", "token_uri": GOOGLE_TOKEN}))
    path.chmod(0o600)
    return path, key.public_key()


def gmail_sa(tmp_path: Path) -> tuple[str, Any]:
    path, public = service_account(tmp_path)
    return ('[[connections]]\nname = "gw"\ntransport = "gmail"\nuser = "alice@corp.example"\n'
            f'oauth = {{ provider = "google", grant = "service_account", '
            f'service_account_file = "{path}" }}\n'), public


def test_gmail_sends_raw_base64url_with_a_service_account_jwt(tmp_path: Path) -> None:
    conn, public = gmail_sa(tmp_path)
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, conn, seam, clock)
    seam.api = [httpx.Response(200, json={"id": "18c2f0", "threadId": "18c2f0",
                                          "labelIds": ["SENT"]})]
    env = Envelope("alice@corp.example", ["bob@example.org"], message())
    result = send(transport(gmail, settings, tm, seam), env)
    assert result.recipients["bob@example.org"].code == 250
    assert "id 18c2f0" in result.reply_text
    req = next(r for r in seam.seen if r.url.host == "gmail.googleapis.com")
    assert str(req.url) == ("https://gmail.googleapis.com/gmail/v1/users/alice@corp.example/"
                            "messages/send")
    body = json.loads(req.content)
    assert base64.urlsafe_b64decode(body["raw"]) == env.raw  # base64url, no other change
    # RFC 7523 assertion, signed RS256 by the service account, for the Workspace user.
    form = seam.token_requests[0]
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    token = jwt.decode(form["assertion"], RSAKey.import_key(public))
    claims = token.claims
    assert token.header["alg"] == "RS256" and token.header["kid"] == "kid1"
    assert claims["iss"] == "postroom@p.iam.gserviceaccount.com"
    assert claims["sub"] == "alice@corp.example" and claims["aud"] == GOOGLE_TOKEN
    assert claims["scope"] == "https://www.googleapis.com/auth/gmail.send"
    assert claims["exp"] - claims["iat"] == 3600


def test_gmail_large_message_goes_through_the_upload_endpoint(tmp_path: Path) -> None:
    conn, _ = gmail_sa(tmp_path)
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, conn.replace('user = "alice@corp.example"\n',
                                               'user = "me"\nupload_above = 1000\n'), seam, clock)
    seam.api = [httpx.Response(200, json={"id": "big1", "threadId": "big1"})]
    env = Envelope("alice@corp.example", ["bob@example.org"], message(size=5000))
    send(transport(gmail, settings, tm, seam), env)
    req = next(r for r in seam.seen if r.url.host == "gmail.googleapis.com")
    assert req.url.path == "/upload/gmail/v1/users/me/messages/send"
    assert req.url.params["uploadType"] == "media"
    assert req.headers["content-type"] == "message/rfc822" and req.content == env.raw


GMAIL_USER = ('[[connections]]\nname = "gm"\ntransport = "gmail"\n'
              'oauth = { provider = "google", client_id = "123.apps.googleusercontent.com", '
              'client_secret = "g-secret" }\n')


def _google_grant(tm: TokenManager) -> None:
    tm.save("gm", {"access_token": "first", "refresh_token": "rt-1", "expires_in": 3599,
                   "scope": "https://www.googleapis.com/auth/gmail.send",
                   "token_type": "Bearer"}, "authorization_code")


def test_gmail_401_refreshes_the_user_grant_once(tmp_path: Path) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GMAIL_USER, seam, clock)
    _google_grant(tm)
    clock.now += 120
    seam.api = [gmail_error(401, "authError", "Request had invalid authentication credentials.",
                            "UNAUTHENTICATED"),
                httpx.Response(200, json={"id": "m2", "threadId": "m2"})]
    result = send(transport(gmail, settings, tm, seam),
                  Envelope("me@gmail.com", ["bob@example.org"], message()))
    assert result.reply_code == 250
    form = seam.token_requests[0]
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "rt-1"
    assert form["client_id"] == "123.apps.googleusercontent.com"  # client_secret_post
    grant = tm.store.get("gm")
    assert grant is not None and grant.refresh_token == "rt-1"  # Google does not rotate
    assert grant.access_token == "access-1" and grant.refreshes == 1


@pytest.mark.parametrize(("answer", "code", "permanent"), [
    (gmail_error(403, "insufficientPermissions", "Request had insufficient authentication "
                 "scopes.", "PERMISSION_DENIED", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"),
     "oauth.scope_missing", False),
    (gmail_error(429, "rateLimitExceeded", "User-rate limit exceeded.  Retry after "
                 "2026-11-21T08:10:00.000Z", "RESOURCE_EXHAUSTED", **{"Retry-After": "60"}),
     "provider.rate_limited", False),
    (gmail_error(403, "userRateLimitExceeded", "User Rate Limit Exceeded",
                 "PERMISSION_DENIED"), "provider.rate_limited", False),
    (gmail_error(500, "backendError", "Backend Error", "INTERNAL"), "provider.unavailable",
     False),
    (gmail_error(400, "invalidArgument", "Invalid To header", "INVALID_ARGUMENT"),
     "data.rejected", True),
])
def test_gmail_errors_are_classified(tmp_path: Path, answer: httpx.Response, code: str,
                                     permanent: bool) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GMAIL_USER, seam, clock)
    _google_grant(tm)
    seam.api = [answer]
    err = fail(transport(gmail, settings, tm, seam),
               Envelope("me@gmail.com", ["bob@example.org"], message()))
    assert err.code == code and err.permanent is permanent, err
    assert err.transcript.startswith("C: POST https://gmail.googleapis.com/")


def test_gmail_without_a_grant_waits_with_the_sign_in_link(tmp_path: Path) -> None:
    seam, clock = Seam(), Clock()
    settings, tm = setup(tmp_path, GMAIL_USER, seam, clock)
    err = fail(transport(gmail, settings, tm, seam),
               Envelope("me@gmail.com", ["bob@example.org"], message()))
    assert err.code == "oauth.no_grant" and not err.permanent
    # This instance has http_listen = "": no link that leads nowhere, and no device flow,
    # which Google refuses for the Gmail scope (issue 12).
    assert "/oauth/start/gm" not in err.message and "postroom oauth login gm" in err.message
    assert "turn on server.http_listen" in err.message and "--device" not in err.message
