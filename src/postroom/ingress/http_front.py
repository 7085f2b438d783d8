"""The ASGI front of `postroom serve`'s HTTP listener (ingress.http_server, whose
connections ingress.http_conn serves with llhttp): it answers ``/healthz`` itself, and serves
the app API under ``/api/v1`` (the route table of ``http_api``, dispatched by
``api_dispatch``, no FastAPI) once the request has passed the front's checks, cheapest
first:

1. connections: caps per client address and in all, a deadline for each request's head
   (``http_conn``, before a request reaches this front);
2. requests in flight: the same kind of caps (503 with Retry-After);
3. the API key, from the headers alone (``http_auth``): no body is read, buffered or parsed
   for a client without a valid key, whose 401 comes ever later while it keeps failing;
4. the body: ``[http] max_body_size``, a deadline for each pause and for the whole.

/healthz shows its details (store errors, worker ids, queue sizes) to server.admin_networks
only; everyone else gets the verdict alone.

``POST /webhooks/{connection}`` (providers' delivery events, ingress.webhooks_http) needs no
API key: the connection and its provider's webhook are found from the path before any body
is read (404 alike for both), the body is read under 1 MB, the signature checked there.

The web admin (``/``, ``/admin...``, ``/api/v1/admin...``; postroom.web) has its own fence
here, before any page work: server.admin_networks and the ``Host`` header first
(postroom.web.fence), then a body read under 64 KB unless the request is signed in. Under
`postroom serve` it is then served, with the OAuth pages and the OpenAPI document, by a
process of its own, started on demand and stopped when idle (ingress.admin_proxy).

Both are loaded when first needed: the HTTP parser on the first connection, the app API's
modules on its first request. `postroom serve` must idle within 60 MB, also once each door was used:
FastAPI (about 10 MB) is imported only by the web admin's process, or here for the admin,
the OAuth pages and the docs when there is no such process (an application embedded on its
own). Any other path is a 404 from the front itself.

``GET /metrics`` (Prometheus, postroom.metrics) is fenced like the web admin
(server.admin_networks) and needs an admin API token; prometheus_client is loaded on the
first scrape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from postroom.apps import Apps
from postroom.ingress.accept import Intake
from postroom.ingress.guard import FailureLimiter, Networks, SessionCaps
from postroom.ingress.health import health
from postroom.ingress.http_auth import AUTH_STATE, KeyChecker
from postroom.ingress.http_errors import route_unknown
from postroom.queue.sql import Queue
from postroom.settings import Settings
from postroom.web import fence

if TYPE_CHECKING:
    from postroom.admin.tokens import AdminTokens
    from postroom.ingress.admin_proxy import AdminProcess
    from postroom.metrics.expose import Metrics
    from postroom.runtime import Instance
    from postroom.web.auth import AdminAuth

log = logging.getLogger(__name__)
PREFIX = "/api/v1"
OPENAPI = PREFIX + "/openapi.json"
# How much of the web admin the application has (http_api.create_app), least to most.
AdminPart = Literal["none", "pages", "all"]
ADMIN_PARTS: tuple[AdminPart, ...] = ("none", "pages", "all")
WEBHOOKS = "/webhooks/"  # providers' delivery events (ingress.webhooks_http)
METRICS = "/metrics"  # Prometheus (postroom.metrics), not imported until scraped

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class Context:
    """What the HTTP side of one `postroom serve` works with."""

    queue: Queue
    apps: Apps
    settings: Settings
    on_enqueued: Callable[[str], None] | None = None
    # True while this process's own delivery worker runs (None: it has none).
    worker_running: Callable[[], bool] | None = None
    worker_owner: str | None = None
    intake: Intake | None = None  # ingress.accept; made from settings and apps when None
    keys: KeyChecker = field(default_factory=KeyChecker)  # API keys (http_auth)
    # The instance `postroom serve` runs (its engine, secrets, config store...), for the web
    # admin's pages; None when the API is used on its own.
    instance: Instance | None = None
    admin: AdminAuth | None = None  # the web admin's accounts and sessions (web.auth.of)
    # /metrics' running totals and cache (postroom.metrics.expose), made on the first scrape
    # or by `postroom serve` when [metrics] listen serves them on an address of their own.
    metrics: Metrics | None = None
    # Reads the stored configuration now and applies a change (postroom.reload's
    # LiveConfig.check): the web admin's process calls it after each request that may have
    # changed it, so that this process's worker knows a connection as soon as the admin does.
    refresh_config: Callable[[], Awaitable[object]] | None = None

    def checks(self) -> Intake:
        if self.intake is None:
            self.intake = Intake.of(self.settings, self.apps)
        return self.intake


async def _json(send: Send, status: int, body: Any,
                headers: Sequence[tuple[bytes, bytes]] = (),
                *, head: bool = False, close: bool = False) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"), *headers]
    if close:
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": b"" if head else data})


def _error(code: str, message: str, fix: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fix": fix, "field": field}}


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if (name == b"content-length" and value.strip() not in (b"", b"0")) or \
                name == b"transfer-encoding":
            return True
    return False


def _closing(send: Send) -> Send:
    """``send`` with ``Connection: close`` added to the response: the request's body was
    not read, and is not worth reading to reach a next request on the connection."""
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()),
                                               (b"connection", b"close")]}
        await send(message)

    return wrapped


async def _empty() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _raw(send: Send, status: int, content_type: bytes, data: bytes, *,
               close: bool = False) -> None:
    hdrs = [(b"content-type", content_type), (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store")]
    if close:
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


@dataclass(frozen=True)
class _Held:
    """An answer the application gave but asked to delay (a failed admin login): sent
    after ``delay`` seconds, once the request no longer counts toward the caps."""

    delay: float
    messages: list[Message]
    send: Send


@dataclass(frozen=True)
class _Later:
    """An answer to send once the request no longer counts toward the caps."""

    delay: float
    status: int
    body: dict[str, Any]
    headers: Sequence[tuple[bytes, bytes]]


class Front:
    """The ASGI application the listener (ingress.http_server) runs: /healthz, the caps on
    requests in flight, the API key checked from the headers before any body is read, the
    body read under its limit and deadlines, then the app API's dispatcher (or the web
    admin's process)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        http, server = ctx.settings.http, ctx.settings.server
        self.http = http
        self.max_body = http.max_body_size
        self.trusted = Networks(server.trusted_networks)
        self.admin = Networks(server.admin_networks)
        self.requests = SessionCaps(per_peer=http.max_requests_per_ip, total=http.max_requests,
                                    reserve=http.max_requests // 10)
        # A bad key from outside trusted_networks is answered ever later (see _authenticate).
        self.failures = FailureLimiter(
            base_delay=server.auth_failure_delay,
            max_delay=max(server.auth_failure_delay, server.auth_failure_max_delay))
        self._public_health: tuple[float, int, dict[str, Any]] | None = None
        self._api: ASGIApp | None = None
        self._part: AdminPart = "none"  # how much of the web admin self._api has
        self._loading = asyncio.Lock()
        # ingress.api_dispatch.serve, imported on the first app API request.
        self._dispatch: Callable[[Context, Scope, bytes, Send], Awaitable[None]] | None = None
        # Under `postroom serve` (an instance, an interpreter to start): the web admin, the
        # OAuth pages and the OpenAPI document are served by a process of their own
        # (ingress.admin_proxy); else by the application here, as `part` says.
        # Made on the first request for it (its module is not imported before).
        self.apart: AdminProcess | None = None
        self._may_part = ctx.instance is not None and bool(sys.executable)
        # /metrics' admin API tokens, checked here without the web admin's modules (and
        # FastAPI under them) when the admin runs in its own process; made on first scrape.
        self._tokens: AdminTokens | None = None

    def is_trusted(self, ip: str) -> bool:
        return ip in self.trusted

    def admin_process(self) -> AdminProcess | None:
        """The web admin's process (ingress.admin_proxy), when this server has one."""
        if self.apart is None and self._may_part:
            from postroom.admin.config import AdminSettings
            from postroom.ingress.admin_proxy import AdminProcess

            self.apart = AdminProcess(
                self.ctx.settings, self.ctx.settings.section(AdminSettings).process_idle,
                on_enqueued=self.ctx.on_enqueued, worker_owner=self.ctx.worker_owner,
                refresh_config=lambda: self.ctx.refresh_config)
        return self.apart

    def sees_details(self, ip: str) -> bool:
        """Whether /healthz may show this client the store's errors, worker ids and queue
        sizes: only administrators (server.admin_networks) may."""
        return ip in self.admin

    async def api(self, part: AdminPart = "none") -> ASGIApp:
        """The application, with at least ``part`` of the web admin. The first is made
        without it, the admin's modules not even imported; the first request for a part it
        lacks replaces it with one that has it (requests in flight finish on theirs)."""
        def lacks() -> bool:
            return ADMIN_PARTS.index(self._part) < ADMIN_PARTS.index(part)

        api = self._api
        if api is None or lacks():
            async with self._loading:
                api = self._api
                if api is None or lacks():
                    # Imported in a thread: it takes a few hundred ms, mail keeps flowing.
                    def load() -> ASGIApp:
                        from postroom.ingress.http_api import create_app

                        # With an admin process, it serves the OAuth pages and the docs.
                        return create_app(self.ctx, admin=part, pages=not self._may_part)

                    api = self._api = await asyncio.to_thread(load)
                    self._part = part
        return api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        ip = _client(scope)
        if not self.requests.try_open(ip, exempt=self.is_trusted(ip)):
            await _json(send, 503, _error(
                "http.busy", "too many requests in progress, from your address or in all",
                "retry after the Retry-After seconds; send fewer requests at once"),
                [(b"retry-after", b"2")], close=_announces_body(scope))
            return
        try:
            later = await self._handle(scope, receive, send, ip)
        finally:
            self.requests.close(ip)
        if later is not None:
            # Waited out here, no longer counted as in flight: a client being slowed down
            # holds its own connection only, never a place another client needs.
            await asyncio.sleep(later.delay)
            if isinstance(later, _Held):
                for message in later.messages:
                    await later.send(message)
            else:
                await _json(send, later.status, later.body, later.headers, close=True)

    async def _handle(self, scope: Scope, receive: Receive, send: Send,
                      ip: str) -> _Later | _Held | None:
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            await self._health(send, method, ip)
            return None
        if fence.is_admin(path):
            return await self._admin(scope, receive, send, ip)
        if path.startswith(WEBHOOKS):
            await self._webhook(scope, receive, send, ip)
            return None
        if path == METRICS:
            return await self._metrics(scope, send, ip)
        if path == PREFIX or (path.startswith(PREFIX + "/") and not _public(path)):
            refusal = await self._authenticate(scope, ip)
            if refusal is not None:
                return refusal
            read = await self._body(scope, receive, send)
            if read is None:
                return None
            await self._app_api(scope, read, send)
            return None
        if _announces_body(scope):
            # Public pages take no body: it is not read, and the connection ends after the
            # answer (else its bytes would be read as the next request).
            send = _closing(send)
        if not _apart_path(path):
            # Not an application's: answered here, nothing loaded for a scanner's paths.
            await _json(send, 404, route_unknown())
            return None
        await self._run(scope, b"", receive, send)
        return None

    async def _app_api(self, scope: Scope, body: bytes, send: Send) -> None:
        serve = self._dispatch
        if serve is None:
            async with self._loading:
                if self._dispatch is None:
                    # Imported in a thread: the models take a moment, mail keeps flowing.
                    def load() -> Callable[[Context, Scope, bytes, Send], Awaitable[None]]:
                        from postroom.ingress import api_dispatch

                        return api_dispatch.serve

                    self._dispatch = await asyncio.to_thread(load)
                serve = self._dispatch
        await serve(self.ctx, scope, body, send)

    async def _run(self, scope: Scope, body: bytes, receive: Receive, send: Send, *,
                   part: AdminPart = "none") -> None:
        """The application, given the body read here."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect remains

        apart = self.admin_process() if part != "none" or _apart_path(scope["path"]) else None
        if apart is not None:
            await apart.forward(scope, body, send, _client(scope))
            return
        # The OpenAPI document describes the admin's JSON endpoints too.
        app = await self.api("all" if scope["path"] == OPENAPI else part)
        try:
            await app(scope, replay, send)
        except Exception:
            # The application has answered 500 already (its last-resort handler); this is
            # where the traceback goes, to the log and never to the client.
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])

    async def _admin(self, scope: Scope, receive: Receive, send: Send,
                     ip: str) -> _Held | None:
        """The web admin: its fence (admin_networks, Host), its body limit (64 KB until
        signed in), its headers; a failed login's answer is held back (web.auth)."""
        refused = fence.refusal(self.ctx.settings, scope, ip)
        if refused is not None:
            await _raw(send, refused[0], refused[1], refused[2], close=_announces_body(scope))
            return None
        send = fence.guarded(send, static=scope["path"].startswith(fence.PAGES + "/static/"))
        body = b""
        if _announces_body(scope):
            limit = fence.ANONYMOUS_BODY
            if fence.carries_credentials(scope) and await self._signed_in(scope):
                limit = self.max_body
            read = await self._body(scope, receive, send, limit)
            if read is None:
                return None
            body = read
        state = scope.setdefault("state", {})
        held: list[Message] = []

        async def holding(message: Message) -> None:
            if state.get(fence.DELAY_STATE):
                held.append(message)
            else:
                await send(message)

        await self._run(scope, body, receive, holding,
                        part="all" if fence.is_api(scope["path"]) else "pages")
        delay = state.get(fence.DELAY_STATE)
        return _Held(float(delay), held, send) if delay and held else None

    async def _webhook(self, scope: Scope, receive: Receive, send: Send, ip: str) -> None:
        """``POST /webhooks/{connection}`` (ingress.webhooks_http): no API key (providers
        have none; their signature is checked instead), a body of at most 1 MB read only
        for a connection whose provider sends events."""
        from postroom.ingress import webhooks_http
        from postroom.webhooks import MAX_BODY

        found = webhooks_http.target(self.ctx, scope)
        if isinstance(found, tuple):
            await _json(send, found[0], found[1], close=_announces_body(scope),
                        head=scope["method"] == "HEAD")
            return
        body = await self._body(scope, receive, send, min(MAX_BODY, self.max_body), fix=(
            "send fewer events per request (the provider's batch size setting)"))
        if body is None:
            return
        status, answer = await webhooks_http.handle(self.ctx, found, scope, body, ip)
        if isinstance(answer, bytes):  # a handshake's own answer (SNS)
            await _raw(send, status, b"text/plain; charset=utf-8", answer)
        else:
            await _json(send, status, answer)

    async def _metrics(self, scope: Scope, send: Send, ip: str) -> _Later | None:
        """``GET /metrics`` (postroom.metrics): server.admin_networks, then an admin API
        token of any role, from the headers (a body is never read); a bad token is answered
        ever later, like a bad API key."""
        from postroom.metrics.expose import CONTENT_TYPE, Metrics, network_refusal

        method, close = scope["method"], _announces_body(scope)
        if method not in ("GET", "HEAD"):
            await _json(send, 405, _error("method.not_allowed", f"{method} /metrics",
                                          "use GET"), [(b"allow", b"GET, HEAD")], close=close)
            return None
        refused = network_refusal(self.ctx.settings, ip)
        if refused is not None:
            message, _, fix = refused.partition(". ")
            await _json(send, 403, _error("metrics.network", message, fix), close=close)
            return None
        if not await self._admin_token(scope, ip):
            delay = 0.0
            if not self.is_trusted(ip):  # as for a bad API key (_authenticate)
                self.failures.failed(ip)
                delay = self.failures.delay(ip)
            return _Later(delay, 401, _error(
                "metrics.unauthenticated", "no valid admin API token for /metrics",
                "send 'Authorization: Bearer prt_...' with a token from `postroom admin "
                "token` (the viewer role suffices), or serve /metrics without one on an "
                "address of its own: [metrics] listen = \"127.0.0.1:9464\""),
                [(b"www-authenticate", b"Bearer")])
        self.failures.succeeded(ip)
        if self.ctx.metrics is None:
            inst = self.ctx.instance
            self.ctx.metrics = Metrics(self.ctx.queue, (lambda: inst.settings) if inst
                                       else (lambda: self.ctx.settings))
        await _raw(send, 200, CONTENT_TYPE, await self.ctx.metrics.text(), close=close)
        return None

    async def _admin_token(self, scope: Scope, ip: str) -> bool:
        """Whether the request carries a valid admin API token (web.auth's accounts)."""
        header = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
        if header[:7].lower() != "bearer " or not header[7:].strip().startswith("prt_"):
            return False
        tokens = self.ctx.admin.tokens if self.ctx.admin is not None else self._tokens
        if tokens is None:
            from postroom.admin.tokens import AdminTokens
            from postroom.runtime import key_file
            from postroom.secrets import load_or_create_key

            settings = self.ctx.settings
            self._tokens = tokens = AdminTokens(
                self.ctx.queue.engine, lambda: load_or_create_key(key_file(settings)))
        actor = await asyncio.to_thread(tokens.check, header[7:].strip(), ip)
        return actor is not None

    async def _signed_in(self, scope: Scope) -> bool:
        apart = self.admin_process()
        if apart is not None:  # the accounts are the admin process's
            return await apart.signed_in(scope, _client(scope))
        from postroom.web import auth  # the accounts' modules: loaded on first admin use

        return await auth.signed_in(self.ctx, scope)

    async def _health(self, send: Send, method: str, ip: str) -> None:
        if method not in ("GET", "HEAD"):
            await _json(send, 405, _error("method.not_allowed", f"{method} /healthz",
                                          "use GET"), [(b"allow", b"GET, HEAD")])
            return
        if self.sees_details(ip):
            status, report = await health(self.ctx)
        else:
            status, report = await self._status_only()
        await _json(send, status, report, head=method == "HEAD")

    async def _status_only(self) -> tuple[int, dict[str, Any]]:
        """/healthz for everyone else: the verdict alone, worked out at most once a second
        however often it is asked (each check is two queries on the store)."""
        now = time.monotonic()
        if self._public_health is None or self._public_health[0] < now:
            status, report = await health(self.ctx)
            self._public_health = (now + 1.0, status, {"status": report["status"]})
        return self._public_health[1], self._public_health[2]

    async def _authenticate(self, scope: Scope, ip: str) -> _Later | None:
        """Check the API key from the headers; the body is still unread. On success the app
        goes into the scope for the API's route dependency; else the 401 to send, after the
        peer's failure delay (none inside trusted_networks: this host's apps, where a retry
        loop with a stale key must not stall, and API keys are 192-bit random: delaying
        guesses protects the server's time, not the keys)."""
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
        found = await self.ctx.keys.check(self.ctx.apps, header)
        if isinstance(found, str):
            self.failures.succeeded(ip)
            scope.setdefault("state", {})[AUTH_STATE] = found
            return None
        delay = 0.0
        if not self.is_trusted(ip):
            self.failures.failed(ip)
            delay = self.failures.delay(ip)
        return _Later(delay, 401, _error(found.code, found.message, found.fix),
                      [(b"www-authenticate", found.challenge.encode())])

    async def _receive(self, receive: Receive, deadline: float) -> Message | None:
        """The next part of the body, or None once the read or body deadline has passed."""
        left = min(self.http.read_timeout, deadline - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(max(left, 0.0)):
                return await receive()
        except TimeoutError:
            return None

    async def _body(self, scope: Scope, receive: Receive, send: Send,
                    limit: int | None = None, fix: str | None = None) -> bytes | None:
        """The whole request body, or None after answering 413 (over ``limit``, by default
        [http] max_body_size) or 408 (too slow), or when the client went away."""
        max_body = self.max_body if limit is None else limit
        over_fix = fix
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        chunks: list[bytes] = []
        size = 0
        over = declared is not None and declared > max_body
        expects_continue = any(n == b"expect" and v.lower() == b"100-continue"
                               for n, v in scope["headers"])
        deadline = asyncio.get_running_loop().time() + self.http.body_timeout
        if not (over and expects_continue):  # else the client has not sent the body yet
            while True:
                msg = await self._receive(receive, deadline)
                if msg is None:
                    await _json(send, 408, _error(
                        "request.timeout", "the request body did not arrive in time "
                        f"(a pause over {self.http.read_timeout:g} s, or more than "
                        f"{self.http.body_timeout:g} s in all)",
                        "send the body without pauses; for slow links raise [http] "
                        "read_timeout or body_timeout"), close=True)
                    return None
                if msg["type"] == "http.disconnect":
                    return None
                part = msg.get("body", b"")
                size += len(part)
                if size > max_body:
                    over = True
                    chunks.clear()
                elif not over:
                    chunks.append(part)
                # Over the limit, the rest is read and dropped (up to the limit again) so
                # that the client, still writing, gets to read the 413 instead of a reset.
                if not msg.get("more_body") or size > 2 * max_body:
                    break
        if over:
            fix = (f"send at most {max_body} bytes (the server's [http] max_body_size); big "
                   "files belong in a link rather than an attachment")
            if max_body < self.max_body:
                fix = (f"sign in first: before, a request body may hold at most {max_body} "
                       "bytes")
            await _json(send, 413, _error(
                "request.too_large", f"the request body is over {max_body} bytes",
                over_fix or fix),
                close=True)
            return None
        return b"".join(chunks)


def _apart_path(path: str) -> bool:
    """Served by the admin's process besides the web admin itself: the OAuth sign-in pages
    (postroom.oauth.web), the OpenAPI document and the docs page."""
    return path.startswith("/oauth/") or _public(path)


def _public(path: str) -> bool:
    """API paths served without a key: the OpenAPI document and the docs page."""
    return path in (f"{PREFIX}/openapi.json", f"{PREFIX}/docs") or \
        path.startswith(f"{PREFIX}/docs/")
