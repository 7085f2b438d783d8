"""How an HTTPS API transport proves who it is: one small object per scheme.

- :class:`OAuthBearer`: an OAuth 2.0 access token (RFC 6750), refreshed once when refused;
- :class:`ApiKeyHeader`: an API key in a header of the provider's choosing, with an optional
  prefix (``X-Postmark-Server-Token: KEY``, ``Authorization: Bearer KEY``);
- :class:`Basic`: HTTP Basic (RFC 7617), e.g. Mailgun's ``api:KEY``, Mailjet's key pair;
- :class:`SigV4`: AWS Signature Version 4 (Amazon SES), signed by botocore's own signer
  (never a hand-written one), imported only when a request is signed.

A strategy also words what a refused credential means and how to fix it (``refused`` for a
401, ``forbidden`` for a 403): "sign in again" for OAuth, "create a new key" for an API key.
Credentials are read when a request is made (postroom.secrets.resolve through the
transport), so a missing secret fails that delivery with its own error, not the server.
"""

from __future__ import annotations

import abc
import base64
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from postroom.exceptions import AuthError

# A credential read when needed (may raise AuthError auth.secret_missing).
Credential = Callable[[], str]


@dataclass
class Held:
    """The credential one delivery's requests use (an OAuth token: after a 401 the next
    one is asked for with the refused one named, so concurrent deliveries refresh once)."""

    credential: str | None = None


@dataclass(frozen=True)
class Who:
    """Whose credential was refused, for the wording of the fix."""

    connection: str
    title: str  # "Postmark"
    said: str  # the provider's answer in words, "Postmark answered 401 10: ..."
    status: int
    message: str


def refusal(who: Who, what: str, code: str) -> AuthError:
    """A refused credential, in the provider's answer and ``what`` (cause and fix)."""
    return AuthError(f"{who.said}: {what}", code=code, permanent=False,
                     reply_code=who.status, reply_text=who.message)


class Auth(abc.ABC):
    """One authentication scheme. ``shown`` is how it appears in a transcript (the secret
    never does)."""

    shown: str = ""
    # A 401 is worth one more try with a new credential (an OAuth refresh); an API key
    # refused once is refused again.
    retry_on_401: bool = False

    @abc.abstractmethod
    async def headers(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes, held: Held, *, rejected: bool = False) -> dict[str, str]:
        """The headers that authenticate this request. ``rejected``: the credential in
        ``held`` was just refused (only asked when ``retry_on_401``)."""

    def refused(self, who: Who) -> AuthError:
        """What a 401 (after any retry) means."""
        return refusal(who, f"the credentials were refused. Fix: check them in {who.title}'s "
                            "dashboard and store them again with `postroom connection "
                            f"set-password {who.connection}`", "auth.credentials_refused")

    def forbidden(self, who: Who) -> AuthError:
        """What a 403 means when the provider's error table says nothing more precise."""
        return refusal(who, "the credentials may not send mail. Fix: give them the permission "
                            f"to send in {who.title}'s dashboard, or create ones that have it",
                            "auth.forbidden")


class OAuthBearer(Auth):
    """``Authorization: Bearer TOKEN`` from the connection's OAuth grant. ``token(rejected)``
    gives a token; with ``rejected`` set, another one (refreshing unless someone did)."""

    shown = "Authorization: Bearer ****"
    retry_on_401 = True

    def __init__(self, token: Callable[[str | None], Awaitable[str]]) -> None:
        self.token = token

    async def headers(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes, held: Held, *, rejected: bool = False) -> dict[str, str]:
        if held.credential is None or rejected:
            held.credential = await self.token(held.credential if rejected else None)
        return {"Authorization": f"Bearer {held.credential}"}

    def refused(self, who: Who) -> AuthError:
        return refusal(who, "the access token was refused even after a refresh. Fix: sign in "
                            f"again (`postroom oauth login {who.connection}`)",
                            "oauth.token_refused")

    def forbidden(self, who: Who) -> AuthError:
        return refusal(who, "the grant lacks the permission to send. Fix: sign in again and "
                            f"accept every permission (`postroom oauth login {who.connection}`); "
                            "for app-only access an admin grants the API permission",
                            "oauth.scope_missing")


class ApiKeyHeader(Auth):
    """An API key in header ``header``, after ``prefix`` ("Bearer ", or none)."""

    retry_on_401 = False

    def __init__(self, header: str, key: Credential, *, prefix: str = "") -> None:
        self.header = header
        self.key = key
        self.prefix = prefix
        self.shown = f"{header}: {prefix}****"

    async def headers(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes, held: Held, *, rejected: bool = False) -> dict[str, str]:
        if held.credential is None:
            held.credential = self.key()
        return {self.header: f"{self.prefix}{held.credential}"}

    def refused(self, who: Who) -> AuthError:
        return api_key_refused(who)

    def forbidden(self, who: Who) -> AuthError:
        return refusal(who, "the API key may not send mail. Fix: give the key the permission to "
                            f"send in {who.title}'s dashboard (or create one that has it) and "
                            f"store it with `postroom connection set-password {who.connection}`",
                            "auth.api_key_forbidden")


def api_key_refused(who: Who) -> AuthError:
    """The one wording of a refused API key (a provider's error table may name it for an
    error code that is not a 401)."""
    return refusal(who, f"the API key was refused. Fix: create a new key in {who.title}'s "
                        "dashboard and store it with `postroom connection set-password "
                        f"{who.connection}` (or in api_key_env / api_key_file)",
                        "auth.api_key_refused")


class Basic(Auth):
    """HTTP Basic (RFC 7617): ``Authorization: Basic base64(user:password)``, UTF-8."""

    retry_on_401 = False
    shown = "Authorization: Basic ****"

    def __init__(self, username: str | Credential, password: Credential) -> None:
        self.username = username
        self.password = password

    async def headers(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes, held: Held, *, rejected: bool = False) -> dict[str, str]:
        if held.credential is None:
            user = self.username if isinstance(self.username, str) else self.username()
            pair = f"{user}:{self.password()}".encode()
            held.credential = base64.b64encode(pair).decode("ascii")
        return {"Authorization": f"Basic {held.credential}"}

    def refused(self, who: Who) -> AuthError:
        return api_key_refused(who)


class SigV4(Auth):
    """AWS Signature Version 4 over the whole request (method, URL, headers, body), by
    ``botocore.auth.SigV4Auth``. Each request is signed anew: the signature covers its
    time (X-Amz-Date) and body."""

    retry_on_401 = False
    shown = "Authorization: AWS4-HMAC-SHA256 ****"

    def __init__(self, service: str, region: str, access_key_id: Credential,
                 secret_access_key: Credential, session_token: Credential | None = None) -> None:
        self.service = service
        self.region = region
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.session_token = session_token

    async def headers(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes, held: Held, *, rejected: bool = False) -> dict[str, str]:
        return sigv4_headers(method, url, headers, content, service=self.service,
                             region=self.region, access_key_id=self.access_key_id(),
                             secret_access_key=self.secret_access_key(),
                             session_token=self.session_token() if self.session_token else None)

    def refused(self, who: Who) -> AuthError:
        return refusal(who, "AWS refused the access key or its signature. Fix: check the access "
                            "key id and secret access key of the IAM user (create a new pair in "
                            "the IAM console and store its secret with `postroom connection "
                            f"set-password {who.connection}`), the region ({self.region}), and "
                            "that this machine's clock is right (signatures expire after 5 "
                            "minutes)", "auth.aws_refused")

    def forbidden(self, who: Who) -> AuthError:
        return refusal(who, "the IAM user may not send. Fix: attach a policy allowing "
                            "ses:SendEmail and ses:SendRawEmail to it in the IAM console",
                            "auth.aws_forbidden")


# Headers the signature covers besides Host: the others may be changed by proxies.
_SIGNED = ("content-type",)


def sigv4_headers(method: str, url: str, headers: Mapping[str, str], content: bytes, *,
                  service: str, region: str, access_key_id: str, secret_access_key: str,
                  session_token: str | None = None) -> dict[str, str]:
    """The headers botocore's SigV4 signer adds to this request (Authorization, X-Amz-Date,
    X-Amz-Security-Token for temporary credentials)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signed = {k: v for k, v in headers.items() if k.lower() in _SIGNED}
    request = AWSRequest(method=method, url=url, data=content, headers=signed)
    SigV4Auth(Credentials(access_key_id, secret_access_key, session_token),
              service, region).add_auth(request)
    return {k: str(v) for k, v in request.headers.items() if k.lower() not in _SIGNED}
