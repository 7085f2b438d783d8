"""The HTTP listening socket of `postroom serve`: bound at start-up, served from the first
connection on by ingress.http_conn (llhttp, postroom.http11) with the ASGI front
(ingress.http_front), and stopped gracefully.

The socket listens from the start (clients connect at once and wait in its backlog); the
parser and the connection code are imported, and the TLS context made, when the first connection
is pending. Until then the process carries none of it: a `postroom serve` that only ever
gets SMTP mail stays smaller (its idle budget is 60 MB).

Shutdown: the socket stops accepting, idle connections are closed, requests in flight get
GRACE seconds to finish (their responses say ``Connection: close``), then what is left is
cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.exceptions import ConfigError
from postroom.ingress.guard import SessionCaps
from postroom.ingress.http_front import ASGIApp, Context, Front

if TYPE_CHECKING:
    from postroom.ingress.http_conn import Connection

log = logging.getLogger(__name__)
GRACE = 5.0  # seconds requests in flight may take to finish at shutdown
# Mozilla's "intermediate" TLS 1.2 suites (no CBC, no SHA-1); TLS 1.3's are not set by this.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of HTTPS on http_listen, with ``cert`` and ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_ciphers(CIPHERS)
    return context


def check_tls(cert: Path, key: Path) -> None:
    """Load the pair once at start-up: a wrong path or a key that does not match is a
    ConfigError now, not a listener that dies on its first connection."""
    try:
        tls_context(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"cannot serve HTTPS with certificate {cert} and key {key}: "
            f"{getattr(err, 'strerror', None) or err}; fix [http] tls_cert / tls_key (or "
            "server.tls_cert / tls_key), or set [http] tls = false", code="config.tls",
        ) from err


@dataclass(frozen=True)
class Limits:
    """What every connection of one listener is held to."""

    caps: SessionCaps  # open connections, per client address and in all
    trusted: Callable[[str], bool]  # clients held to the total cap only
    header_timeout: float  # for each request's line and headers
    write_timeout: float  # longest wait for the client to read part of a response
    tls: bool = False  # served over TLS (the requests' scheme is https)


class Listener:
    """The HTTP listening socket, served from its first connection on."""

    def __init__(self, app: ASGIApp, sock: socket.socket, limits: Limits,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.app = app
        self.sock = sock
        self.limits = replace(limits, tls=tls is not None)
        self.tls = tls
        self.server: asyncio.Server | None = None
        self.context: ssl.SSLContext | None = None  # made with the first connection
        self.live: set[Connection] = set()
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
            # Imported in a thread (httptools, the connection code): mail keeps flowing meanwhile.
            context = self.context = await asyncio.to_thread(self._prepare)
            from postroom.ingress.http_conn import Connection

            limits = self.limits
            loop = asyncio.get_running_loop()
            self.server = await loop.create_server(
                lambda: Connection(self.app, limits, self.live), sock=self.sock, ssl=context,
                backlog=512)
        except Exception:  # a certificate gone since start-up, a failed import
            log.exception("the HTTP listener stopped; the API and /healthz are unavailable")
            self.sock.close()

    def _prepare(self) -> ssl.SSLContext | None:
        import postroom.ingress.http_conn  # noqa: F401 - httptools and the protocol, off the loop

        return tls_context(*self.tls) if self.tls else None

    def check_tls_files(self) -> None:
        """Load the certificate and key files again in a fresh context (ConfigError if the
        pair no longer loads): the first half of a reload, which changes nothing."""
        if self.tls is not None:
            check_tls(*self.tls)

    def reload_tls(self) -> None:
        """Read the certificate and key files again (renewed in place: certbot, an ACME
        client), for connections from now on; open ones keep theirs (a SIGHUP reload,
        postroom.hup, after :meth:`check_tls_files`). Other paths need a restart."""
        if self.tls is not None and self.context is not None:
            self.context.load_cert_chain(*self.tls)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish within GRACE, close the rest."""
        if self.task is None:
            if self._loop is not None and self.sock.fileno() >= 0:
                self._loop.remove_reader(self.sock.fileno())
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            if self.server is not None:
                self.server.close()
            await self._finish()
        if isinstance(self.app, Front):
            if self.app.apart is not None:
                await self.app.apart.close()
            self.app.ctx.keys.close()
        self.sock.close()

    async def _finish(self) -> None:
        for conn in list(self.live):
            conn.stopping = True
            if not conn.in_request and conn.transport is not None:
                conn.transport.close()
        tasks = [c.task for c in self.live if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=GRACE)
        for conn in list(self.live):
            if conn.transport is not None:
                conn.transport.abort()
            if conn.task is not None:
                conn.task.cancel()
        leftover = [c.task for c in self.live if c.task is not None]
        await asyncio.gather(*leftover, return_exceptions=True)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket on host:port, or a ConfigError saying what to change."""
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


async def start(ctx: Context, host: str, port: int,
                tls: tuple[Path, Path] | None = None) -> tuple[Listener, tuple[str, int]]:
    """Listen on host:port (HTTPS with the ``tls`` certificate and key files) for the front
    of ``ctx``; returns the listener (``await listener.stop()``) and the address."""
    if tls is not None:
        check_tls(*tls)
    sock = bind(host, port)
    front = Front(ctx)
    http = ctx.settings.http
    caps = SessionCaps(per_peer=http.max_connections_per_ip, total=http.max_connections,
                       reserve=http.max_connections // 10)
    # A client that stops reading a response waits as long as one that pauses in a body.
    limits = Limits(caps, front.is_trusted, http.header_timeout, http.read_timeout)
    listener = Listener(front, sock, limits, tls)
    listener.start()
    bound: tuple[str, int] = sock.getsockname()[:2]
    return listener, bound
