"""The HTTP listener of `postroom serve`: uvicorn in the server's event loop, a small ASGI
front that answers ``/healthz`` itself, enforces ``[http] max_body_size``, and hands
``/api/v1`` to the FastAPI application (``http_api``).

Both are loaded when first needed: uvicorn on the first connection, FastAPI on the first
API request. `postroom serve` must idle within 60 MB, and they cost about 2 MB and 10 MB
that a server used only over SMTP (or only probed on /healthz) never needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from postroom.apps import Apps
from postroom.exceptions import ConfigError
from postroom.queue.sql import Queue
from postroom.queue.worker import HEARTBEAT_SECONDS
from postroom.settings import Settings
from postroom.store.schema import DEFERRED, QUEUED, SENDING, messages

log = logging.getLogger(__name__)

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_workers(ctx: Context, now: float) -> list[str]:
    """Workers that reported within 3 heartbeats; on this host the process must also exist
    (a killed worker is seen as gone at once, not after its heartbeat goes stale)."""
    host = socket.gethostname()[:40]
    alive = []
    for row in ctx.queue.workers_seen(now - 3 * HEARTBEAT_SECONDS):
        wid = str(row["id"])
        whost, _, pid = wid.rpartition(":")
        if whost == host and pid.isdigit() and not _pid_alive(int(pid)):
            continue
        alive.append(wid)
    return alive


def _waiting(ctx: Context) -> dict[str, int]:
    # Only the states a health check cares about: the (status, ...) index answers this
    # without reading the whole log, unlike counting every status.
    q = (select(messages.c.status, func.count())
         .where(messages.c.status.in_((QUEUED, DEFERRED, SENDING)))
         .group_by(messages.c.status))
    with ctx.queue.engine.connect() as conn:
        found = {str(s): int(n) for s, n in conn.execute(q)}
    return {s: found.get(s, 0) for s in (QUEUED, DEFERRED, SENDING)}


async def health(ctx: Context) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /healthz: 200 when the store answers and a worker is alive."""
    body: dict[str, Any] = {"status": "ok", "store": {"ok": True}, "worker": {}, "queue": {}}
    alive: list[str] = []
    try:
        body["queue"] = await asyncio.to_thread(_waiting, ctx)
        alive = await asyncio.to_thread(_live_workers, ctx, time.time())
    except Exception as err:  # any failure of the store is what this endpoint reports
        log.warning("/healthz: the store did not answer: %s", err)
        body["store"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    in_process = ctx.worker_running() if ctx.worker_running is not None else None
    others = [w for w in alive if w != ctx.worker_owner]
    body["worker"] = {"ok": bool(in_process or others), "in_process": in_process,
                      "others": others}
    if not body["worker"]["ok"]:
        body["worker"]["fix"] = ("no delivery worker is running: set server.worker = true or "
                                 "start `postroom worker` with the same configuration")
    healthy = body["store"]["ok"] and body["worker"]["ok"]
    body["status"] = "ok" if healthy else "unhealthy"
    return (200 if healthy else 503), body


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


class Front:
    """The ASGI application uvicorn runs."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.max_body = ctx.settings.http.max_body_size
        self._api: ASGIApp | None = None
        self._loading = asyncio.Lock()

    async def api(self) -> ASGIApp:
        if self._api is None:
            async with self._loading:
                if self._api is None:
                    # Imported in a thread: it takes a few hundred ms, mail keeps flowing.
                    def load() -> ASGIApp:
                        from postroom.ingress.http_api import create_app

                        return create_app(self.ctx)

                    self._api = await asyncio.to_thread(load)
        return self._api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        method = scope["method"]
        if scope["path"] == "/healthz":
            if method not in ("GET", "HEAD"):
                await _json(send, 405, _error("method.not_allowed", f"{method} /healthz",
                                              "use GET"), [(b"allow", b"GET, HEAD")])
                return
            status, report = await health(self.ctx)
            await _json(send, status, report, head=method == "HEAD")
            return
        body = await self._body(scope, receive, send)
        if body is None:
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect remains

        app = await self.api()
        try:
            await app(scope, replay, send)
        except Exception:
            # The application has answered 500 already (its last-resort handler); this is
            # where the traceback goes, to the log and never to the client.
            log.exception("HTTP %s %s failed", method, scope["path"])

    async def _body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None after answering 413 when it is over the limit."""
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        chunks: list[bytes] = []
        size = 0
        over = declared is not None and declared > self.max_body
        expects_continue = any(n == b"expect" and v.lower() == b"100-continue"
                               for n, v in scope["headers"])
        if not (over and expects_continue):  # else the client has not sent the body yet
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return None
                part = msg.get("body", b"")
                size += len(part)
                if size > self.max_body:
                    over = True
                    chunks.clear()
                elif not over:
                    chunks.append(part)
                # Over the limit, the rest is read and dropped (up to the limit again) so
                # that the client, still writing, gets to read the 413 instead of a reset.
                if not msg.get("more_body") or size > 2 * self.max_body:
                    break
        if over:
            limit = self.max_body
            await _json(send, 413, _error(
                "request.too_large", f"the request body is over {limit} bytes",
                f"send at most {limit} bytes (the server's [http] max_body_size); big files "
                "belong in a link rather than an attachment"), close=True)
            return None
        return b"".join(chunks)


def _uvicorn(app: ASGIApp) -> Any:
    """A uvicorn.Server for ``app`` without its own signal handling: `postroom serve` owns
    SIGTERM and SIGINT and stops this server with everything else."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(uvicorn.Config(
        # ws="none": no websocket library is imported even when one is installed.
        app, lifespan="off", ws="none", log_config=None, access_log=False,
        server_header=False, proxy_headers=False, timeout_graceful_shutdown=5,
        timeout_keep_alive=15,
    ))


class Listener:
    """The HTTP listening socket, served by uvicorn from the first connection on.

    The socket listens from the start (clients connect at once and wait in its backlog);
    uvicorn is imported and started when the first connection is pending. Until then the
    process carries none of it: a `postroom serve` that only ever gets SMTP mail stays
    ~2 MB smaller (its idle budget is 60 MB)."""

    def __init__(self, app: ASGIApp, sock: socket.socket) -> None:
        self.app = app
        self.sock = sock
        self.server: Any = None
        self.task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop = loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._first_connection, loop)

    def _first_connection(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.sock.fileno())
        self.task = loop.create_task(self._serve(), name="http")

    async def _serve(self) -> None:
        try:
            self.server = await asyncio.to_thread(_uvicorn, self.app)
            await self.server.serve(sockets=[self.sock])
        except (Exception, SystemExit):  # uvicorn exits on a failed start-up
            log.exception("the HTTP listener stopped; the API and /healthz are unavailable")
            self.sock.close()

    async def stop(self) -> None:
        if self.task is None:
            if self._loop is not None and self.sock.fileno() >= 0:
                self._loop.remove_reader(self.sock.fileno())
        else:
            if self.server is not None:
                self.server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sock.close()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
        # proto must be IPPROTO_TCP (not 0): asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets that say so, and with Nagle on, a response written as headers + body
        # waits for the client's delayed ACK: 40 ms per request on a kept-alive connection.
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr[:2])
            sock.listen(512)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as err:
        raise ConfigError(
            f"cannot listen for HTTP on {host}:{port}: {err.strerror or err}; pick another "
            "port with server.http_listen (\"\" turns the HTTP API off)",
            code="config.listen",
        ) from err


async def start(ctx: Context, host: str, port: int) -> tuple[Listener, tuple[str, int]]:
    """Listen on host:port; returns the listener (``await listener.stop()``) and the
    address."""
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    sock = _bind(host, port)
    listener = Listener(Front(ctx), sock)
    listener.start()
    bound: tuple[str, int] = sock.getsockname()[:2]
    return listener, bound
