"""What the HTTPS API transports share: the base owns the workflow, each provider module
only builds its request, reads its answers and gives its documented errors as data
(django-anymail's shape)::

    build(envelope) -> Request  ->  auth headers (transports._auth)  ->  POST
        -> 401 and the scheme can get another credential (OAuth): once more
        -> 2xx: parse_success(resp) -> (provider message id, per-recipient results or None)
        -> else: parse_error(resp) -> ApiError -> classify (the provider's ``errors`` table
           first, then the rules below)

Errors, when the provider's table says nothing about its code or status:

- 429 (or a provider's rate-limit code) -> transient, connection-level (the next connection
  of the chain may take it), ``retry_after`` from the Retry-After header;
- 5xx -> transient, connection-level (503 with ``retry_after`` too);
- 401 -> the auth scheme's "refused" (OAuth: sign in again; API key: create a new key);
- 403 -> the auth scheme's "forbidden" (missing permission or scope);
- 404 -> the endpoint is wrong (``api_base``) or the mailbox/user setting, per provider;
- 413 -> too big for the API: permanent; any other 4xx: the message is refused, permanent.

A request whose body was sent but whose answer never came (read timeout, connection cut)
has an unknown outcome: retried on the same connection only (``after_data``).

Requests go out through postroom/httpwire.py (a lean keep-alive HTTP/1.1 client: the send
path's CPU), or through httpx when a proxy is set in the environment or a test hands in an
httpx transport; either way a provider module reads an ``httpx.Response``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit, urlunsplit
from urllib.request import getproxies

import httpx

from postroom import __version__
from postroom.envelope import Envelope, header_values
from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    Scope,
    SenderRejected,
    TimeoutError_,
    UnsupportedFeature,
)
from postroom.httpwire import Answer, WirePool
from postroom.secrets import Secret
from postroom.settings import ConnectionBase
from postroom.transports import _auth, base
from postroom.transports._errors import ApiError as ApiError
from postroom.transports._errors import ErrorRule as ErrorRule
from postroom.transports._errors import retry_after
from postroom.transports._settings import ApiKeySettings as ApiKeySettings
from postroom.transports._settings import HttpSettings as HttpSettings


class AsyncTokens(Protocol):
    async def atoken(self, connection: str, *, rejected: str | None = None) -> str: ...


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    content: bytes
    summary: str  # for the transcript, e.g. "raw MIME, 1234 bytes base64url in JSON"
    # False: a pre-authenticated URL (an upload session's): no credential goes with it, and
    # its query, which carries the credential, stays out of the transcript.
    auth: bool = True


@dataclass
class Exchange:
    """The requests of one delivery: their transcript lines and the credential in use."""

    lines: list[str] = field(default_factory=list)
    held: _auth.Held = field(default_factory=_auth.Held)

    @property
    def transcript(self) -> str:
        return "\n".join(self.lines)


# Per-recipient results of an API that reports them: address -> RecipientResult.
Recipients = dict[str, base.RecipientResult]


class HttpTransport(base.Transport):
    """Base of the HTTPS API transports. A provider module sets the class attributes and
    overrides ``build``, ``parse_error`` and, where its API says more than "accepted",
    ``parse_success``; ``make_auth`` when it does not log in with OAuth."""

    settings: HttpSettings
    settings_model: ClassVar[type[ConnectionBase]] = HttpSettings
    default_base: ClassVar[str] = ""
    # The provider's documented errors: its error code (str) or an HTTP status (int) ->
    # ErrorRule. Looked up by code first, then status; the generic rules come after.
    errors: ClassVar[Mapping[str | int, ErrorRule]] = {}
    # OAuth providers' reasons that mean: the grant lacks a permission / may not send as
    # this sender / the provider's rate limit, whatever the HTTP status says.
    scope_codes: ClassVar[frozenset[str]] = frozenset()
    send_as_codes: ClassVar[frozenset[str]] = frozenset()
    rate_codes: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, settings: ConnectionBase, ctx: base.TransportContext, *,
                 http: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(settings, ctx)
        s = self.settings
        timeout = httpx.Timeout(s.timeout, connect=s.connect_timeout)
        # Every connection kept alive: httpx's default keeps 20 of up to 100, so a worker
        # with more deliveries in flight closed the rest after each answer and paid a new
        # TCP and TLS handshake per message (bench/https_bench.py).
        limits = httpx.Limits(max_connections=s.pool_size,
                              max_keepalive_connections=s.pool_size)
        tls = httpx.create_ssl_context(verify=_verify(s.ca_file))
        self.client = httpx.AsyncClient(timeout=timeout, transport=http, trust_env=True,
                                        verify=tls, limits=limits)
        # Requests wait here for a connection rather than in httpcore's pool, whose queue
        # costs time per waiting request on every answer (the worker has up to
        # [delivery] concurrency deliveries in flight, pool_size connections).
        self._slots = asyncio.Semaphore(s.pool_size)
        self.base = (s.api_base or self.default_api_base()).rstrip("/")
        self.auth = self.make_auth()
        # Deliveries go through the lean client (postroom/httpwire.py) unless a proxy is set
        # in the environment (httpx speaks CONNECT and SOCKS and applies NO_PROXY) or a test
        # gave an httpx transport.
        self.wire: WirePool | None = None
        if http is None and not _proxied():
            self.wire = WirePool(title=self.title, base=self.base, ssl_context=tls,
                                 size=s.pool_size, connect_timeout=s.connect_timeout,
                                 timeout=s.timeout, user_agent=f"postroom/{__version__}")

    # -- what a provider module says ----------------------------------------------------------
    def default_api_base(self) -> str:
        """The provider's API address when ``api_base`` is not set; a provider with regions
        picks it from the connection's ``region`` here."""
        return self.default_base

    def make_auth(self) -> _auth.Auth:
        """How requests are authenticated; by default the connection's OAuth grant."""
        return _auth.OAuthBearer(self._token)

    def build(self, env: Envelope) -> Request:
        raise NotImplementedError

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, Recipients | None]:
        """The result step: the provider's message id, and per-recipient outcomes when the
        API reports them (recipients it does not name count as accepted)."""
        return None, None

    def accepted(self, resp: httpx.Response) -> str:
        """The provider's words for a success (its message id is added when there is one)."""
        return f"{resp.status_code} accepted"

    def parse_error(self, resp: httpx.Response) -> ApiError:
        raise NotImplementedError

    # -- credentials ---------------------------------------------------------------------------
    def api_key(self) -> str:
        """The connection's API key (ApiKeySettings), read when a request is made."""
        s = self.settings
        key = self.secret("api_key", Secret.API_KEY, env=getattr(s, "api_key_env", None),
                          file=getattr(s, "api_key_file", None),
                          inline=getattr(s, "api_key", None))
        if not key:
            raise AuthError(f"connection {self.name}: no API key; set api_key_env or "
                            f"api_key_file, or run `postroom connection set-password "
                            f"{self.name}` (it stores the api key encrypted)",
                            code="auth.secret_missing", permanent=False)
        return key

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

    # -- the workflow --------------------------------------------------------------------------
    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        ex = Exchange()
        resp = await self.request(ex, self.build(envelope))
        if resp.is_success:
            return self.delivered(envelope, resp, ex)
        raise self.failure(resp, ex)

    async def request(self, ex: Exchange, req: Request) -> httpx.Response:
        """Make one request of a delivery: authenticated (once more with a new credential
        after a 401, where the scheme can get one), or not for a pre-authenticated URL. Any
        answer is returned; a network failure raises a DeliveryError carrying the
        transcript so far."""
        if not req.auth:
            return await self._call(req, None, ex.lines)
        resp = await self._call(req, await self._credentials(ex, req), ex.lines)
        if resp.status_code == 401 and self.auth.retry_on_401:
            ex.lines.append("*  the access token was refused (401): refreshing it once")
            resp = await self._call(req, await self._credentials(ex, req, rejected=True),
                                    ex.lines)
        return resp

    async def _credentials(self, ex: Exchange, req: Request, *,
                           rejected: bool = False) -> dict[str, str]:
        """The auth scheme's headers; its failure (a missing secret, a dead grant) carries
        the transcript so far."""
        try:
            return await self.auth.headers(req.method, req.url, req.headers, req.content,
                                           ex.held, rejected=rejected)
        except DeliveryError as err:
            err.transcript = ex.transcript
            raise

    def delivered(self, envelope: Envelope, resp: httpx.Response,
                  ex: Exchange) -> base.DeliveryResult:
        """Every recipient accepted, unless the API reported some refused."""
        provider_id, reported = self.parse_success(resp)
        said = self.accepted(resp)
        if provider_id and provider_id not in said:
            said = f"{said}, id {provider_id}"
        ok = base.RecipientResult(250, f"{self.title}: {said}")
        # Providers may write an address in another case than the envelope did.
        refused = {a.lower(): res for a, res in (reported or {}).items()}
        results = {r: refused.get(r.lower(), ok) for r in envelope.recipients}
        return base.DeliveryResult(results, ex.transcript, reply_code=250, reply_text=said,
                                   provider_id=provider_id)

    def failure(self, resp: httpx.Response, ex: Exchange) -> DeliveryError:
        """The error a refusing answer means, with the transcript so far."""
        err = self.classify(resp)
        err.transcript = ex.transcript
        return err

    async def _call(self, req: Request, auth: dict[str, str] | None,
                    lines: list[str]) -> httpx.Response:
        if auth is None:
            lines.append(f"C: {req.method} {hide_query(req.url)} ({req.summary}; "
                         "no Authorization: the URL is pre-authenticated)")
            headers = req.headers
        else:
            lines.append(f"C: {req.method} {req.url} ({req.summary}; {self.auth.shown})")
            headers = {**req.headers, **auth}
        sent = False
        try:
            if self.wire is not None:
                resp = await self._wire_call(self.wire, req, headers)
            else:
                request = self.client.build_request(req.method, req.url, content=req.content,
                                                    headers=headers)
                sent = True
                async with self._slots:
                    resp = await self.client.send(request)
        except DeliveryError as err:  # the lean client's, mapped there
            err.transcript = "\n".join(lines)
            raise
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
        body = _URL_QUERY.sub(r"\1?****", answer_text(resp)[:500].replace("\n", " "))
        lines.append(f"S: {resp.status_code} {body}".rstrip())
        return resp

    @staticmethod
    async def _wire_call(wire: WirePool, req: Request,
                         headers: Mapping[str, str]) -> httpx.Response:
        """One request through the lean client, its answer as the httpx.Response the
        providers' parsers read (with the request: some read what they asked)."""
        answer = await wire.request(req.method, req.url, headers, req.content)
        return WireResponse(answer, req)

    def classify(self, resp: httpx.Response) -> DeliveryError:
        """The DeliveryError a refusing answer means: the provider's table, then the rules
        of this module's docstring. ``retry_after`` is set from a 429/503's Retry-After."""
        e = self.parse_error(resp)
        err = self._classify(e)
        wait = None
        if e.status in (429, 503) or err.code == "provider.rate_limited":
            wait = retry_after(resp.headers.get("Retry-After"))
        if wait is not None:
            err.retry_after = wait
            err.message = f"{err.message}; it asks to wait {wait:g} s (Retry-After)"
            err.args = (err.message,)
        return err

    def _classify(self, e: ApiError) -> DeliveryError:
        said = f"{self.title} answered {e.status}" + (f" {e.code}" if e.code else "") + (
            f": {e.message}" if e.message else "")
        who = _auth.Who(self.name, self.title, said, e.status, e.message)
        rule = self.errors.get(e.code) if e.code else None
        if rule is None:
            rule = self.errors.get(e.status)
        if rule is not None:
            return self._apply(rule, who)
        if e.code in self.rate_codes or e.status == 429:
            return ConnectError(f"{said}: rate limit. Postroom retries later; lower the "
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
            return self.auth.refused(who)
        if e.code in self.scope_codes or e.status == 403:
            return self.auth.forbidden(who)
        if e.status == 404:
            return DeliveryError(f"{said}: the API address is wrong: check the connection's "
                                 f"api_base (now {self.base})", code="config.endpoint",
                                 permanent=False, scope=Scope.CONFIGURATION,
                                 reply_code=e.status, reply_text=e.message)
        if e.status == 413:
            return DataRejected(f"{said}: the message is too big for the API",
                                code="data.too_big", permanent=True, reply_code=552,
                                reply_text=e.message)
        return DataRejected(f"{said}: the provider refuses this message", code="data.rejected",
                            permanent=True, reply_code=554, reply_text=e.message)

    def _apply(self, rule: ErrorRule, who: _auth.Who) -> DeliveryError:
        if rule.auth == "refused":
            err: DeliveryError = self.auth.refused(who)
            err.code = rule.code or err.code
            return err
        if rule.auth == "forbidden":
            err = self.auth.forbidden(who)
            err.code = rule.code or err.code
            return err
        text = f"{who.said}: {rule.fix}" if rule.fix else who.said
        return rule.kind(text, code=rule.code, permanent=rule.permanent, scope=rule.scope,
                         reply_code=who.status, reply_text=who.message)

    def check_request(self) -> Request | None:
        """A request that validates the credentials without sending anything (an account
        or domain endpoint); None when the API has none."""
        return None

    def checked(self, resp: httpx.Response) -> str:
        """What a successful ``check_request`` answer says, for the transcript."""
        return "the credentials work"

    async def check(self) -> str:
        """Make ``check_request`` (or, without one, make sure the credentials are at hand)."""
        req = self.check_request()
        if req is None:
            await self.auth.headers("GET", self.base, {}, b"", _auth.Held())
            return f"*  {self.title}: the credentials of {self.name} are at hand"
        ex = Exchange()
        resp = await self.request(ex, req)
        if not resp.is_success:
            raise self.failure(resp, ex)
        ex.lines.append(f"*  {self.title}: {self.checked(resp)}")
        return ex.transcript

    async def aclose(self) -> None:
        if self.wire is not None:
            await self.wire.aclose()
        await self.client.aclose()


class WireResponse(httpx.Response):
    """An answer of the lean client as the httpx.Response the providers' parsers read, made
    without the two things they do not need: the body is handed over as read (not encoded
    anew as content), and the httpx.Request it answers is made only when something asks for
    it (of the providers, only Mailtrap's parser does), and the body is not passed through
    httpx's decoding generators when it is not content-coded. Those were most of the
    answer's cost in a worker (docs/benchmarks.md, issue 14)."""

    def __init__(self, answer: Answer, req: Request) -> None:
        headers = answer.headers
        if answer.body and not any(name.lower() == b"content-length" for name, _ in headers):
            # What httpx.Response(content=...) adds: the headers as they were with it.
            headers = [*headers, (b"Content-Length", str(len(answer.body)).encode())]
        super().__init__(answer.status, headers=headers, stream=httpx.ByteStream(answer.body))
        self._asked = req
        if "content-encoding" in self.headers:
            self.read()  # httpx's decoders undo it
            return
        # What read() leaves, without its chain of generators over the one chunk there is.
        self._content = answer.body
        self.is_stream_consumed = self.is_closed = True

    @property
    def request(self) -> httpx.Request:
        # httpx's own property reads _request (as raise_for_status does): set there.
        if self._request is None:
            req = self._asked
            self._request = httpx.Request(req.method, _url(req.url) if req.auth else req.url,
                                          content=req.content)
        return self._request

    @request.setter
    def request(self, value: httpx.Request) -> None:
        self._request = value

    def raise_for_status(self) -> httpx.Response:
        self.request  # noqa: B018 - made for httpx's check, which reads _request
        return super().raise_for_status()


def answer_text(resp: httpx.Response) -> str:
    """``resp.text``, for an answer that names no charset (the usual JSON one) without
    httpx's lookup of it, which parses the Content-Type with email.message: UTF-8, errors
    replaced, as httpx decodes then."""
    ctype = resp.headers.get("Content-Type")
    if ctype is None or "charset" not in ctype.lower():
        return resp.content.decode("utf-8", "replace")
    return resp.text


@functools.lru_cache(maxsize=64)
def _url(url: str) -> httpx.URL:
    """``url`` parsed once: httpx parses a URL string in Python on every Request, and a
    provider posts every message to the same one or few (an immutable value, safe to share;
    pre-authenticated URLs, one per upload and a credential each, are not kept)."""
    return httpx.URL(url)


def _proxied() -> bool:
    """A proxy is set for HTTPS in the environment (HTTPS_PROXY / ALL_PROXY, as httpx's
    trust_env reads them through urllib)."""
    found = getproxies()
    return bool(found.get("https") or found.get("all"))


def _verify(ca_file: str | None) -> Any:
    if not ca_file:
        return True
    import ssl

    return ssl.create_default_context(cafile=ca_file)


def json_body(resp: httpx.Response) -> dict[str, Any]:
    """A JSON object body, or {} (not JSON, or not an object: a proxy's HTML error page)."""
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def json_error(resp: httpx.Response) -> dict[str, Any]:
    """``{"error": {...}}`` of a JSON error body, or {}."""
    err = json_body(resp).get("error")
    return err if isinstance(err, dict) else {}


def json_bytes(value: Any) -> bytes:
    """``json.dumps(value, ensure_ascii=False).encode()``, byte for byte (a lone surrogate
    raises a UnicodeEncodeError too), with long ASCII strings (a message's MIME, a text
    body) escaped by the ``unicode_escape`` codec: json's C encoder escapes a character at a
    time, and a 50 KB body was a fifth of a worker's GIL time per message (docs/
    benchmarks.md). Dicts with str keys and lists are walked, each str of them written by
    json's own C function; anything else goes to one encoder made once (json.dumps with an
    argument makes one a call)."""
    out: list[bytes] = []
    _json_write(value, out)
    return b"".join(out)


def _json_write(value: Any, out: list[bytes]) -> None:
    kind = type(value)
    if kind is str:
        if len(value) >= _LONG and value.isascii():
            escaped = value.encode("unicode_escape")
            # For ASCII it escapes only backslash, \t, \n, \r (as JSON does) and other
            # controls and DEL as \xNN (which JSON writes otherwise): those, rare, go to json.
            if b"\\x" not in escaped:
                out += (b'"', escaped.replace(b'"', b'\\"'), b'"')
                return
        out.append(_json_str(value).encode())
    elif kind is dict and value and all(type(k) is str for k in value):
        sep = b"{"
        for key, item in value.items():
            out += (sep, _json_str(key).encode(), b": ")
            _json_write(item, out)
            sep = b", "
        out.append(b"}")
    elif kind is list and value:
        sep = b"["
        for item in value:
            out.append(sep)
            _json_write(item, out)
            sep = b", "
        out.append(b"]")
    else:
        out.append(_JSON.encode(value).encode())


# What json.dumps(ensure_ascii=False) writes: of a str, and of anything else.
_json_str: Callable[[str], str] = json.encoder.encode_basestring
_JSON = json.JSONEncoder(ensure_ascii=False)
_LONG = 1024  # below this, json.dumps's own escaping costs no more


def refuse_over(body: bytes, limit: int, title: str) -> bytes:
    """``body`` when it is within the provider's documented request size ``limit``; else the
    message is refused before any upload (permanent: it will not shrink)."""
    if len(body) > limit:
        raise UnsupportedFeature(
            f"the message is {len(body)} bytes as {title}'s request; {title} takes at most "
            f"{limit}: send big files as links", code="unsupported.size")
    return body


def mime_text(raw: bytes, title: str) -> str:
    """The raw message as the text an API that takes MIME inside JSON wants; a message with
    bytes that are not UTF-8 (8-bit data in another charset) cannot be one, and is refused."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnsupportedFeature(
            f"{title} takes the message as JSON text, and this one has bytes that are not "
            "UTF-8 (8-bit data in another charset): send it base64- or quoted-printable-"
            "encoded, or route it to an SMTP connection", code="unsupported.mime") from err


def header_recipients(raw: bytes) -> set[str]:
    # Imported here: a webhook-only use of a provider's module in `serve` loads no mapping.
    from postroom.transports._mime import address_pairs

    found = header_values(raw, ("to", "cc", "bcc"))
    return {addr.lower() for _, addr in address_pairs(list(found.values())) if addr}


def match_headers(env: Envelope, title: str) -> bytes:
    """The message an API that reads its recipients from the header fields may send, for
    the APIs that take it as MIME: every envelope recipient not named there is added as Bcc
    (which the provider removes); a header recipient outside this delivery cannot be left
    out, so that is refused (_mime.missing_recipients; the JSON APIs get the same from
    _mime.map_envelope)."""
    from postroom.transports._mime import missing_recipients

    missing = missing_recipients(header_recipients(env.raw), env, title)
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
