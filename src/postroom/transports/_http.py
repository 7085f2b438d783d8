"""What the HTTP API transports share: the base owns the workflow (token -> request -> on 401
refresh once and repeat -> classify), each provider module only builds its request and
reads its error body (django-anymail's shape).

Errors, by HTTP status (after a 401 was answered with one refresh):

- 401 -> AuthError ``oauth.token_refused`` (transient: the mail waits for a working grant);
- 403 -> missing permission (scope) or send-as refused, per the provider's error reason;
  some providers also say "rate limit" with 403;
- 429 -> transient, connection-level (the next connection of the chain may take it), with
  the provider's Retry-After in the message;
- 5xx -> transient, connection-level;
- 400 (and 413) -> the message itself is refused: permanent.

A request whose body was sent but whose answer never came (read timeout, connection cut)
has an unknown outcome: retried on the same connection only (``after_data``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import Field

from postroom.envelope import Envelope, header_values
from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    SenderRejected,
    TimeoutError_,
    UnsupportedFeature,
)
from postroom.settings import ConnectionBase
from postroom.transports import base


class AsyncTokens(Protocol):
    async def atoken(self, connection: str, *, rejected: str | None = None) -> str: ...


class HttpSettings(ConnectionBase):
    """Keys every HTTP API connection has (besides its ``oauth`` table)."""

    api_base: str = ""  # default: the provider's; a test server or a proxy otherwise
    timeout: float = Field(default=60, gt=0)
    connect_timeout: float = Field(default=15, gt=0)
    ca_file: str | None = None


@dataclass(frozen=True)
class ApiError:
    """A provider's error body, read by the provider module."""

    status: int
    code: str  # the provider's own code or reason ("insufficientPermissions", ...)
    message: str


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    content: bytes
    summary: str  # for the transcript, e.g. "raw MIME, 1234 bytes base64url in JSON"
    # False: a pre-authenticated URL (an upload session's): no Authorization header goes
    # with it, and its query, which carries the credential, stays out of the transcript.
    auth: bool = True


@dataclass
class Exchange:
    """The requests of one delivery: their transcript lines and the access token in use."""

    lines: list[str] = field(default_factory=list)
    token: str | None = None

    @property
    def transcript(self) -> str:
        return "\n".join(self.lines)


class HttpTransport(base.Transport):
    """Base of the HTTP API transports."""

    settings: HttpSettings
    title = "provider"  # "Gmail API", "Microsoft Graph"
    default_base = ""
    # Error codes/reasons that mean: the grant lacks a permission / may not send as this
    # sender / the provider's rate limit, whatever the HTTP status says.
    scope_codes: frozenset[str] = frozenset()
    send_as_codes: frozenset[str] = frozenset()
    rate_codes: frozenset[str] = frozenset()
    config_codes: frozenset[str] = frozenset()

    def __init__(self, settings: ConnectionBase, ctx: base.TransportContext, *,
                 http: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(settings, ctx)
        s = self.settings
        timeout = httpx.Timeout(s.timeout, connect=s.connect_timeout)
        self.client = httpx.AsyncClient(timeout=timeout, transport=http, trust_env=True,
                                        verify=_verify(s.ca_file))
        self.base = (s.api_base or self.default_base).rstrip("/")

    # -- what a provider module says ----------------------------------------------------------
    def build(self, env: Envelope) -> Request:
        raise NotImplementedError

    def accepted(self, resp: httpx.Response) -> str:
        """The provider's words for a success, e.g. its message id."""
        return f"{resp.status_code} accepted"

    def parse_error(self, resp: httpx.Response) -> ApiError:
        raise NotImplementedError

    # -- the workflow --------------------------------------------------------------------------
    async def _token(self, rejected: str | None = None) -> str:
        tokens = self.ctx.tokens
        if tokens is None:
            raise AuthError(f"connection {self.name}: transport {self.settings.transport!r} "
                            "logs in with OAuth: add an oauth table to the connection",
                            code="config.oauth.missing", permanent=False)
        atoken: Callable[..., Any] | None = getattr(tokens, "atoken", None)
        if atoken is not None:
            return str(await atoken(self.name, rejected=rejected))
        import asyncio

        return await asyncio.to_thread(tokens.token, self.name, refresh=rejected is not None)

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        ex = Exchange()
        resp = await self.request(ex, self.build(envelope))
        if resp.is_success:
            return self.delivered(envelope, resp, ex)
        raise self.failure(resp, ex)

    async def request(self, ex: Exchange, req: Request) -> httpx.Response:
        """Make one request of a delivery: with the connection's token (refreshed once on a
        401), or without one for a pre-authenticated URL. Any answer is returned; a
        network failure raises a DeliveryError carrying the transcript so far."""
        if not req.auth:
            return await self._call(req, None, ex.lines)
        if ex.token is None:
            ex.token = await self._token()
        resp = await self._call(req, ex.token, ex.lines)
        if resp.status_code == 401:
            ex.lines.append("*  the access token was refused (401): refreshing it once")
            ex.token = await self._token(rejected=ex.token)
            resp = await self._call(req, ex.token, ex.lines)
        return resp

    def delivered(self, envelope: Envelope, resp: httpx.Response,
                  ex: Exchange) -> base.DeliveryResult:
        """Every recipient accepted, in the provider's words."""
        said = self.accepted(resp)
        res = base.RecipientResult(250, f"{self.title}: {said}")
        return base.DeliveryResult({r: res for r in envelope.recipients}, ex.transcript,
                                   reply_code=250, reply_text=said)

    def failure(self, resp: httpx.Response, ex: Exchange) -> DeliveryError:
        """The error a refusing answer means, with the transcript so far."""
        err = self._classify(resp)
        err.transcript = ex.transcript
        return err

    async def _call(self, req: Request, token: str | None,
                    lines: list[str]) -> httpx.Response:
        if token is None:
            lines.append(f"C: {req.method} {hide_query(req.url)} ({req.summary}; "
                         "no Authorization: the URL is pre-authenticated)")
            headers = req.headers
        else:
            lines.append(f"C: {req.method} {req.url} ({req.summary}; "
                         "Authorization: Bearer ****)")
            headers = {**req.headers, "Authorization": f"Bearer {token}"}
        sent = False
        try:
            request = self.client.build_request(req.method, req.url, content=req.content,
                                                headers=headers)
            sent = True
            resp = await self.client.send(request)
        except httpx.TimeoutException as err:
            unknown = isinstance(err, httpx.ReadTimeout)
            mapped: DeliveryError = TimeoutError_(
                f"{self.title} did not answer in time ({type(err).__name__})", code="timeout")
            mapped.after_data = unknown and sent
            mapped.transcript = "\n".join(lines)
            raise mapped from err
        except httpx.RemoteProtocolError as err:
            mapped = ConnectError(f"{self.title} closed the connection: {err}",
                                  code="connect.lost")
            mapped.after_data = sent
            mapped.transcript = "\n".join(lines)
            raise mapped from err
        except httpx.ConnectError as err:
            mapped = ConnectError(f"cannot reach {self.title} at {self.base}: {err}",
                                  code="connect.failed")
            mapped.transcript = "\n".join(lines)
            raise mapped from err
        except httpx.HTTPError as err:
            mapped = ConnectError(f"{self.title}: {type(err).__name__}: {err}",
                                  code="connect.failed")
            mapped.transcript = "\n".join(lines)
            raise mapped from err
        # A URL in an answer may be a credential itself (an upload session's): its query
        # stays out of the transcript.
        body = _URL_QUERY.sub(r"\1?****", resp.text[:500].replace("\n", " "))
        lines.append(f"S: {resp.status_code} {body}".rstrip())
        return resp

    def _classify(self, resp: httpx.Response) -> DeliveryError:
        e = self.parse_error(resp)
        said = f"{self.title} answered {e.status} {e.code}: {e.message}".rstrip(": ")
        name = self.name
        if e.code in self.rate_codes or e.status == 429:
            wait = resp.headers.get("Retry-After")
            hint = f"; it asks to wait {wait} s (Retry-After)" if wait else ""
            return ConnectError(f"{said}: rate limit{hint}. Postroom retries later; lower the "
                                "connection's rate_limit to stay under it",
                                code="provider.rate_limited", reply_code=e.status,
                                reply_text=e.message)
        if e.status >= 500:
            return ConnectError(f"{said}: the provider failed; Postroom retries (or uses the "
                                "next connection of the route)", code="provider.unavailable",
                                reply_code=e.status, reply_text=e.message)
        if e.code in self.send_as_codes:
            return SenderRejected(
                f"{said}: the signed-in account may not send as this sender. Fix: send from "
                "the account's own address, or give it Send As permission on that mailbox",
                code="sender.send_as_denied", permanent=False, reply_code=e.status,
                reply_text=e.message)
        if e.status == 401:
            return AuthError(f"{said}: the access token was refused even after a refresh. "
                             f"Fix: sign in again (`postroom oauth login {name}`)",
                             code="oauth.token_refused", permanent=False,
                             reply_code=e.status, reply_text=e.message)
        if e.code in self.scope_codes or e.status == 403:
            return AuthError(f"{said}: the grant lacks the permission to send. Fix: sign in "
                             f"again and accept every permission (`postroom oauth login {name}`"
                             "); for app-only access an admin grants the API permission",
                             code="oauth.scope_missing", permanent=False,
                             reply_code=e.status, reply_text=e.message)
        if e.code in self.config_codes or e.status == 404:
            return DeliveryError(f"{said}: check the connection's mailbox/user setting",
                                 code="config.mailbox", permanent=False,
                                 reply_code=e.status, reply_text=e.message)
        if e.status == 413:
            return DataRejected(f"{said}: the message is too big for the API",
                                code="data.too_big", permanent=True, reply_code=552,
                                reply_text=e.message)
        return DataRejected(f"{said}: the provider refuses this message", code="data.rejected",
                            permanent=True, reply_code=554, reply_text=e.message)

    async def aclose(self) -> None:
        await self.client.aclose()


def _verify(ca_file: str | None) -> Any:
    if not ca_file:
        return True
    import ssl

    return ssl.create_default_context(cafile=ca_file)


def json_error(resp: httpx.Response) -> dict[str, Any]:
    """``{"error": {...}}`` of a JSON error body, or {}."""
    try:
        data = resp.json()
    except (ValueError, json.JSONDecodeError):
        return {}
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else {}


def header_recipients(raw: bytes) -> set[str]:
    found = header_values(raw, ("to", "cc", "bcc"))
    return {addr.lower() for _, addr in getaddresses(list(found.values())) if addr}


def match_headers(env: Envelope, title: str) -> bytes:
    """The message an API that reads its recipients from the header fields may send: every
    envelope recipient not named there is added as Bcc (which the provider removes); a
    header recipient outside this delivery cannot be left out, so that is refused."""
    named = header_recipients(env.raw)
    wanted = {r.lower() for r in env.recipients}
    extra = sorted(named - wanted)
    if extra:
        raise UnsupportedFeature(
            f"{title} sends to every address in To/Cc/Bcc, and this delivery is for only some "
            f"of them ({', '.join(extra[:5])} are not part of it: a route split the "
            "recipients, or they were delivered already). Route such mail to an SMTP "
            "connection, which delivers to the envelope alone", code="unsupported.recipients")
    missing = [r for r in env.recipients if r.lower() not in named]
    if not missing:
        return env.raw
    return f"Bcc: {', '.join(missing)}\r\n".encode() + env.raw


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


# Up to a quote or a space: a URL in a JSON string (paths may hold ' as Graph's do).
_URL_QUERY = re.compile(r'(https?://[^\s"?]+)\?[^\s"]*')


def hide_query(url: str) -> str:
    """``url`` with its query replaced by ``****``: a pre-authenticated URL carries its
    credential there (Graph's upload sessions: ``?authtoken=...``)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="****")) if parts.query else url
