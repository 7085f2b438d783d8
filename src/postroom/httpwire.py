"""A small keep-alive HTTP/1.1 client for hot paths (provider APIs, alert webhooks):
asyncio streams (TLS in the ssl module's transport, as the SMTP transport's) and h11 for the
framing (RFC 9112), a pool of kept-alive connections per host.

Why not httpx here: on every request and every answer httpcore's pool checks each of its
connections for expiry through anyio's ``extra_attributes``, and anyio's TLS stream runs the
record layer in Python over ``ssl.MemoryBIO`` -- together most of an HTTPS worker's CPU per
message (docs/benchmarks.md, "HTTPS providers and webhooks"). httpx stays for proxies,
mocked transports in tests, OAuth and everything off the send path (transports/_http.py
picks).

Errors are the exception tree's, with ``after_data`` set as RFC 9110 §9.2.2 asks of a
non-idempotent POST: a request whose bytes were written but whose answer never came has an
unknown outcome and is never sent again here (the queue retries it on the same connection).
A kept-alive connection the server has closed while idle is noticed before the request is
written and replaced (RFC 9112 §9.3.1): that is the only case a new connection is opened for
a request, and only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from postroom.exceptions import ConnectError, DeliveryError, TimeoutError_

# The most of an answer read: a provider's JSON answer is a few hundred bytes; the transcript
# keeps 500 characters and the parsers need the whole JSON. Beyond this, the answer is refused
# rather than held in memory.
MAX_ANSWER = 1 << 20
# Idle connections older than this are closed rather than reused: servers close idle
# keep-alive connections after a few seconds (Node.js's default keepAliveTimeout is 5 s,
# nginx's keepalive_timeout 75 s), and a request written as they do so has an unknown
# outcome. Below the shortest common one; a busy worker keeps its connections busy anyway.
KEEPALIVE_EXPIRY = 4.0
_READ = 65536


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        """Still open (the server has not closed it while idle) and not idle too long."""
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and now - self.idle_since < KEEPALIVE_EXPIRY)

    def close(self) -> None:
        self.writer.close()


class _Host:
    """The kept-alive connections to one scheme://host:port, and the slots bounding them."""

    def __init__(self, size: int) -> None:
        self.idle: list[_Conn] = []
        self.slots = asyncio.Semaphore(size)


class WirePool:
    """Keep-alive HTTP/1.1 connections, at most ``size`` per host. ``title`` and ``base``
    name the provider in error messages (the same words as the httpx path's)."""

    def __init__(self, *, title: str, base: str, ssl_context: ssl.SSLContext, size: int,
                 connect_timeout: float, timeout: float, user_agent: str) -> None:
        self.title = title
        self.base = base
        self.ssl = ssl_context
        self.size = size
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.user_agent = user_agent
        self.hosts: dict[tuple[str, str, int], _Host] = {}
        self.opened = 0  # connections opened, for tests and the bench

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      body: bytes) -> Answer:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        pool = self.hosts.get(key)
        if pool is None:
            pool = self.hosts[key] = _Host(self.size)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]  # as written: [v6] and :port kept
        given = {name.lower() for name in headers}
        head = [(name, value) for name, value in (
            ("Host", authority), ("User-Agent", self.user_agent), ("Accept", "*/*"),
            ("Content-Length", str(len(body)))) if name.lower() not in given]
        head += headers.items()
        try:
            request = h11.Request(method=method, target=target, headers=head)
        except h11.LocalProtocolError as err:  # a header value HTTP cannot carry
            raise ConnectError(f"{self.title}: the request cannot be sent: {err}",
                               code="connect.failed") from err
        async with pool.slots:
            conn = await self._connection(pool, key)
            try:
                answer = await self._exchange(conn, request, body)
            except BaseException:
                conn.close()
                raise
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                conn.idle_since = time.monotonic()
                pool.idle.append(conn)
            else:  # "Connection: close", or an answer before the whole request was read
                conn.close()
            return answer

    async def _connection(self, pool: _Host, key: tuple[str, str, int]) -> _Conn:
        now = time.monotonic()
        while pool.idle:
            conn = pool.idle.pop()
            if conn.usable(now):
                return conn
            conn.close()  # closed by the server while idle, or idle too long: a new one
        scheme, host, port = key
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port,
                                        ssl=self.ssl if scheme == "https" else None,
                                        server_hostname=host if scheme == "https" else None,
                                        limit=_READ),
                self.connect_timeout)
        except TimeoutError as err:
            raise TimeoutError_(f"{self.title} did not answer in time (ConnectTimeout)",
                                code="timeout") from err
        except (OSError, ssl.SSLError) as err:
            raise ConnectError(f"cannot reach {self.title} at {self.base}: {err}",
                               code="connect.failed") from err
        self.opened += 1
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, request: h11.Request, body: bytes) -> Answer:
        c = conn.h11
        data = c.send(request) or b""
        data += c.send(h11.Data(data=body)) or b""
        data += c.send(h11.EndOfMessage()) or b""
        # From here the server may have the request: any failure is an unknown outcome.
        conn.writer.write(data)
        try:
            await asyncio.wait_for(conn.writer.drain(), self.timeout)
            return await asyncio.wait_for(self._answer(conn), self.timeout)
        except TimeoutError as err:
            raise self._unknown(TimeoutError_(
                f"{self.title} did not answer in time (ReadTimeout)", code="timeout")) from err
        except (OSError, ssl.SSLError, h11.RemoteProtocolError) as err:
            raise self._unknown(ConnectError(
                f"{self.title} closed the connection: {err or type(err).__name__}",
                code="connect.lost")) from err

    async def _answer(self, conn: _Conn) -> Answer:
        c = conn.h11
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        got = 0
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(_READ)
                c.receive_data(data)  # b"" is the end of the stream: h11 says what it means
                continue
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                got += len(event.data)
                if got > MAX_ANSWER:
                    raise self._unknown(ConnectError(
                        f"{self.title} answered with more than {MAX_ANSWER} bytes: not a "
                        f"provider API's answer; check the connection's api_base "
                        f"(now {self.base})", code="connect.answer_too_big"))
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("Server disconnected without sending a response")
            # InformationalResponse (100 Continue) and others: keep reading.

    @staticmethod
    def _unknown(err: DeliveryError) -> DeliveryError:
        err.after_data = True
        return err

    async def aclose(self) -> None:
        closing = [conn for pool in self.hosts.values() for conn in pool.idle]
        for pool in self.hosts.values():
            pool.idle.clear()
        for conn in closing:
            conn.close()
        # TLS says goodbye (close_notify) before the socket closes; a server that does not
        # answer it does not hold the shutdown.
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(
                *(c.writer.wait_closed() for c in closing), return_exceptions=True), 2.0)
