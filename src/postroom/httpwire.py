"""A small keep-alive HTTP/1.1 client for hot paths (provider APIs, alert webhooks):
asyncio streams (TLS in the ssl module's transport, as the SMTP transport's), requests
written here and answers read by llhttp (postroom.http11, as the HTTP listener's) for the
framing (RFC 9112), a pool of kept-alive connections per host.

Why not httpx here: on every request and every answer httpcore's pool checks each of its
connections for expiry through anyio's ``extra_attributes``, and anyio's TLS stream runs the
record layer in Python over ``ssl.MemoryBIO`` -- together most of an HTTPS worker's CPU per
message (docs/benchmarks.md, "HTTPS providers and webhooks"). httpx stays for proxies,
mocked transports in tests, OAuth and everything off the send path (transports/_http.py
picks). Why not h11 (which this client used first): its state machine and validation in
Python were 130-220 µs of GIL time per request in the HTTPS bench; llhttp parses in C.

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
import functools
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from postroom.exceptions import ConnectError, DeliveryError, TimeoutError_
from postroom.http11 import Data, Malformed, Responses, request_head

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


def _where(url: str) -> tuple[tuple[str, str, int], str, str]:
    """``url``'s (scheme, host, port), request target and authority; parsed once per URL
    without a query (a provider posts every message to the same one or few), each time for
    one with a query (a pre-authenticated URL: its credential is not kept here)."""
    return _parse_url(url) if "?" in url else _parse_url_once(url)


def _parse_url(url: str) -> tuple[tuple[str, str, int], str, str]:
    parts = urlsplit(url)
    scheme, host = parts.scheme, parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]  # as written: [v6] and :port kept
    return (scheme, host, port), target, authority


_parse_url_once = functools.lru_cache(maxsize=64)(_parse_url)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
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
        key, target, authority = _where(url)
        pool = self.hosts.get(key)
        if pool is None:
            pool = self.hosts[key] = _Host(self.size)
        given = {name.lower() for name in headers}
        head = [(name, value) for name, value in (
            ("Host", authority), ("User-Agent", self.user_agent), ("Accept", "*/*"),
            ("Content-Length", str(len(body)))) if name.lower() not in given]
        head += headers.items()
        request = self._head(method, target, head)
        async with pool.slots:
            conn = await self._connection(pool, key)
            try:
                answer, reuse = await self._exchange(conn, request, body)
            except BaseException:
                conn.close()
                raise
            if reuse:
                conn.idle_since = time.monotonic()
                pool.idle.append(conn)
            else:  # "Connection: close", HTTP/1.0, or more than one answer
                conn.close()
            return answer

    def _head(self, method: str, target: str, fields: list[tuple[str, str]]) -> bytes:
        """The request line and header fields (postroom.http11.request_head); one HTTP
        cannot carry is refused."""
        try:
            if method == "HEAD":  # its answer's length says no body follows, which the
                raise ValueError("method", method.encode())  # parser cannot know
            return request_head(method.encode("ascii"), target.encode("ascii"),
                                [(n.encode("ascii"), v.encode("ascii")) for n, v in fields])
        except UnicodeEncodeError:
            what, text = "header field", "with a character outside ASCII"
        except ValueError as err:
            what, text = err.args[0], bytes(err.args[1]).decode("latin-1")
        raise ConnectError(f"{self.title}: the request cannot be sent: illegal {what} "
                           f"{text!r}", code="connect.failed")

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

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes) -> tuple[Answer, bool]:
        """The answer, and whether the connection may carry another request."""
        # From here the server may have the request: any failure is an unknown outcome.
        conn.writer.writelines((head, body))
        try:
            # asyncio.timeout rather than wait_for, which runs its awaitable as a Task of
            # its own: two more tasks per request (3.11). Waiting for the write only when
            # some of it is still buffered (the usual request leaves in one go).
            if conn.writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.timeout):
                    await conn.writer.drain()
            async with asyncio.timeout(self.timeout):
                return await self._answer(conn)
        except TimeoutError as err:
            raise self._unknown(TimeoutError_(
                f"{self.title} did not answer in time (ReadTimeout)", code="timeout")) from err
        except (OSError, ssl.SSLError, Malformed) as err:
            raise self._unknown(ConnectError(
                f"{self.title} closed the connection: {err or type(err).__name__}",
                code="connect.lost")) from err

    async def _answer(self, conn: _Conn) -> tuple[Answer, bool]:
        got = Responses()
        chunks: list[bytes] = []
        while True:
            data = await conn.reader.read(_READ)
            got.feed(data)  # b"": the end of a body delimited by the close, else Malformed
            while got.events:
                event = got.events.popleft()
                if isinstance(event, Data):
                    chunks.append(event.data)
            if got.size > MAX_ANSWER:
                raise self._unknown(ConnectError(
                    f"{self.title} answered with more than {MAX_ANSWER} bytes: not a "
                    f"provider API's answer; check the connection's api_base "
                    f"(now {self.base})", code="connect.answer_too_big"))
            if got.complete:
                assert got.headers is not None
                return (Answer(got.status, got.headers, b"".join(chunks)),
                        bool(data) and got.keep_alive and not got.extra)

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
