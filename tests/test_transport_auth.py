"""The HTTPS transports' auth strategies (postroom.transports._auth) and Retry-After.

SigV4 is checked against the AWS Signature Version 4 test suite's published vectors
("get-vanilla", "post-x-www-form-urlencoded", and a temporary credential's security token),
with botocore's clock pinned to the suite's 2015-08-30T12:36:00Z. HTTP Basic against RFC 7617's
own example. OAuth's refresh-once-on-401 and each scheme's wording of a refused credential
through the real HTTP workflow, at the httpx seam.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from postroom.exceptions import AuthError
from postroom.transports import _auth, _http
from postroom.transports._errors import retry_after
from postroom.transports.base import TransportContext
from postroom.transports.postmark import PostmarkSettings, PostmarkTransport

# The AWS SigV4 test suite's credentials and time.
AKID, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
CREDENTIAL = "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request"


@pytest.fixture
def aws_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.auth

    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda *a, **k: dt.datetime(2015, 8, 30, 12, 36, 0))


def sign(method: str, headers: dict[str, str], body: bytes, token: str | None = None
         ) -> dict[str, str]:
    auth = _auth.SigV4("service", "us-east-1", lambda: AKID, lambda: SECRET,
                       (lambda: token) if token else None)
    return asyncio.run(auth.headers(method, "https://example.amazonaws.com/", headers, body,
                                    _auth.Held()))


@pytest.mark.usefixtures("aws_clock")
def test_sigv4_matches_the_aws_test_suite() -> None:
    got = sign("GET", {}, b"")
    assert got["X-Amz-Date"] == "20150830T123600Z"
    assert got["Authorization"] == (
        f"AWS4-HMAC-SHA256 {CREDENTIAL}, SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")
    got = sign("POST", {"Content-Type": "application/x-www-form-urlencoded"}, b"Param1=value1")
    assert got["Authorization"] == (
        f"AWS4-HMAC-SHA256 {CREDENTIAL}, SignedHeaders=content-type;host;x-amz-date, "
        "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a")
    assert "Content-Type" not in got  # the request's own header is left alone


@pytest.mark.usefixtures("aws_clock")
def test_sigv4_signs_a_temporary_credentials_token() -> None:
    got = sign("GET", {}, b"", token="TOKEN")
    assert got["X-Amz-Security-Token"] == "TOKEN"
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in got["Authorization"]


def test_botocore_is_imported_only_to_sign() -> None:
    code = ("import sys; import postroom.transports._auth, postroom.transports.postmark; "
            "print('botocore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_basic_is_rfc_7617s_example() -> None:
    auth = _auth.Basic("Aladdin", lambda: "open sesame")
    got = asyncio.run(auth.headers("GET", "https://x/", {}, b"", _auth.Held()))
    assert got == {"Authorization": "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="}


def test_api_key_header_with_and_without_prefix() -> None:
    calls: list[int] = []

    def key() -> str:
        calls.append(1)
        return "k-123"

    held = _auth.Held()
    plain = _auth.ApiKeyHeader("X-Api-Key", key)
    assert asyncio.run(plain.headers("POST", "u", {}, b"", held)) == {"X-Api-Key": "k-123"}
    asyncio.run(plain.headers("POST", "u", {}, b"", held))
    assert len(calls) == 1  # read once per delivery
    bearer = _auth.ApiKeyHeader("Authorization", key, prefix="Bearer ")
    got = asyncio.run(bearer.headers("POST", "u", {}, b"", _auth.Held()))
    assert got == {"Authorization": "Bearer k-123"}
    assert bearer.shown == "Authorization: Bearer ****" and not bearer.retry_on_401


class Tokens:
    """An OAuth token source: hands out t1, then t2 once t1 is named as refused."""

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    async def atoken(self, connection: str, *, rejected: str | None = None) -> str:
        self.asked.append(rejected)
        return "t2" if rejected else "t1"


class Bearer(_http.HttpTransport):
    title = "Example API"

    def build(self, env: Any) -> _http.Request:
        return _http.Request("POST", f"{self.base}/send", {}, b"{}", "JSON")

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        return _http.ApiError(resp.status_code, "", resp.text)


def run_send(t: _http.HttpTransport) -> Any:
    from postroom.envelope import Envelope

    async def go() -> Any:
        try:
            return await t.send(Envelope("a@example.com", ["b@example.org"], b"x"))
        finally:
            await t.aclose()
    return asyncio.run(go())


def test_oauth_refreshes_once_on_401_then_says_sign_in_again() -> None:
    seen: list[str] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers["Authorization"])
        return httpx.Response(401 if len(seen) < 3 else 200, text="expired")

    tokens = Tokens()
    settings = _http.HttpSettings(name="api", transport="memory", api_base="https://api.test")
    t = Bearer(settings, TransportContext("t", tokens=tokens), http=httpx.MockTransport(answer))
    with pytest.raises(AuthError) as info:
        run_send(t)
    assert seen == ["Bearer t1", "Bearer t2"] and tokens.asked == [None, "t1"]
    assert info.value.code == "oauth.token_refused"
    assert "postroom oauth login api" in info.value.message
    assert "t1" not in info.value.transcript and "Bearer ****" in info.value.transcript


def test_an_api_key_refused_is_not_retried_and_says_create_a_new_key() -> None:
    seen: list[str] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers["X-Postmark-Server-Token"])
        return httpx.Response(401, json={"ErrorCode": 10, "Message": "Bad or missing token"})

    settings = PostmarkSettings(name="pm", api_key="secret-key", api_base="https://api.test")
    t = PostmarkTransport(settings, TransportContext("t"), http=httpx.MockTransport(answer))
    from postroom.message import Draft, build

    env = build(Draft(from_="a@example.com", to=["b@example.org"], text="x"))
    with pytest.raises(AuthError) as info:
        asyncio.run(t.send(env))
    asyncio.run(t.aclose())
    assert seen == ["secret-key"]
    err = info.value
    assert err.code == "auth.api_key_refused" and not err.permanent
    assert "create a new key in Postmark's dashboard" in err.message
    assert "`postroom connection set-password pm`" in err.message
    assert "secret-key" not in err.transcript + err.message
    assert "X-Postmark-Server-Token: ****" in err.transcript


@pytest.mark.parametrize(("scheme", "code", "words"), [
    (_auth.Basic("api", lambda: "k"), "auth.api_key_refused", "create a new key"),
    (_auth.SigV4("ses", "eu-west-1", lambda: "a", lambda: "s"), "auth.aws_refused",
     "eu-west-1"),
    (_auth.OAuthBearer(Tokens().atoken), "oauth.token_refused", "sign in again"),
])
def test_each_scheme_words_a_refusal(scheme: _auth.Auth, code: str, words: str) -> None:
    who = _auth.Who("conn", "Example", "Example answered 401", 401, "no")
    err = scheme.refused(who)
    assert err.code == code and words in err.message and not err.permanent
    assert scheme.forbidden(who).code != code  # a 403 is a missing permission, said apart


NOW = 1_800_000_000.0


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 30.0), ("0", 1.0), ("86400", 3600.0), ("2.5", 2.5), (" 17 ", 17.0),
    (format_datetime(dt.datetime.fromtimestamp(NOW + 120, dt.UTC), usegmt=True), 120.0),
    (format_datetime(dt.datetime.fromtimestamp(NOW - 60, dt.UTC), usegmt=True), 1.0),
    ("", None), (None, None), ("soon", None), ("nan", None), ("Sun, 06 Nov 1994 08:49:37", None),
])
def test_retry_after_reads_seconds_and_http_dates(value: str | None,
                                                  seconds: float | None) -> None:
    got = retry_after(value, now=NOW)
    assert got == (pytest.approx(seconds) if seconds is not None else None)
