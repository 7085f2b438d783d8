"""One connection of the HTTP listener: HTTP/1.1 parsed by llhttp (postroom.http11), each
request handed to the ASGI front (ingress.http_front) in turn.

A server of our own rather than uvicorn: uvicorn's start-up (click, logging.config,
multiprocessing, its own modules) cost `postroom serve` more memory than its whole front,
and counted neither connections per client nor a deadline for a request's head. Here:

- caps on open connections, in all and per client address (postroom.ingress.guard
  SessionCaps: clients in trusted_networks only count toward the total, whose last tenth is
  theirs alone); a connection over a cap gets a 503 at once and is closed;
- a deadline for each request's line and headers, from the connection's start or the end
  of the previous response: past it, a client that sent part of a request gets 408 (RFC
  9110 section 15.5.9) and one that sent nothing is closed, as is an idle keep-alive
  connection after KEEP_ALIVE seconds; a head over http11.MAX_HEAD gets 431;
- keep-alive, pipelined requests answered in order (one at a time: the next request is not
  parsed before the previous response is complete), ``Expect: 100-continue`` answered when
  the front first reads the body, chunked bodies both ways (postroom.http11), HEAD;
- backpressure both ways: reading pauses while more than INBOX_LIMIT bytes wait for the
  front, and the front's ``send`` waits while the socket's write buffer is full, at most
  [http] read_timeout per pause (a client that stops reading is cut off, its request no
  longer held);
- a failure in the front never shows the client a traceback: a 500 in the project's error
  shape if no response had started, else the connection is cut.

The body has deadlines of its own in the front, which reads it. This module (and httptools)
is imported on the first connection (ingress.http_server), not at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from postroom.exceptions import PostroomError
from postroom.http11 import END, MAX_HEAD, Data, Event, Framing, Head, Malformed, Requests

if TYPE_CHECKING:
    from postroom.ingress.http_front import ASGIApp, Message
    from postroom.ingress.http_server import Limits

log = logging.getLogger(__name__)
KEEP_ALIVE = 15.0  # seconds an idle kept-alive connection is held open
INBOX_LIMIT = 64 * 1024  # bytes received but not yet parsed before reading pauses
# Left unread by the front (it answered without reading the body): drained to reach the
# next request on the connection when no more than this, else the connection is closed.
DRAIN_LIMIT = 64 * 1024


class ASGIMisuse(PostroomError):
    """The front sent an ASGI message out of order (a bug, logged; the client sees a 500)."""


def raw_answer(status: int, code: str, message: str, fix: str,
               extra: tuple[str, ...] = ()) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for the moments when there
    is no request (yet) to answer through the ASGI application."""
    body = json.dumps({"error": {"code": code, "message": message, "fix": fix,
                                 "field": None}}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "cache-control: no-store", "connection: close",
            *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY = raw_answer(
    503, "http.busy", "too many connections are open, from your address or in all",
    "close idle connections (reuse one with keep-alive) and retry in a few seconds",
    ("retry-after: 5",))
FAILED = raw_answer(  # the words of http_errors.internal, the API's own 500
    500, "internal", "internal error; it was logged on the server",
    "retry; if it persists, report it with the server log")


def _bad_request(status: int) -> bytes:
    if status == 431:
        return raw_answer(431, "request.head_too_large",
                          f"the request line and headers are over {MAX_HEAD} bytes",
                          "send fewer or shorter headers (cookies, tokens)")
    return raw_answer(400, "request.malformed", "the request is not valid HTTP/1.1",
                      "send a well-formed HTTP/1.1 request")


class _Dates:
    """The Date header (RFC 9110 section 6.6.1), formatted at most once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode()
        return self.value


DATES = _Dates()


class Connection(asyncio.Protocol):
    """One client's connection; its requests are served one after another by ``run``."""

    def __init__(self, app: ASGIApp, limits: Limits, live: set[Connection]) -> None:
        self.app = app
        self.limits = limits
        self.live = live  # the listener's open connections (for its shutdown)
        self.loop = asyncio.get_running_loop()
        self.requests = Requests()
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.counted = False
        self.inbox = bytearray()  # received, not yet given to the parser
        self.eof = False
        self.paused = False  # reading paused: the inbox is full
        self.arrived = asyncio.Event()  # data or end of stream since the last wait
        self.writable = asyncio.Event()
        self.writable.set()
        self.gone = asyncio.Event()  # the connection is lost
        self.task: asyncio.Task[None] | None = None
        self.in_request = False  # a request's head was parsed and it is not answered yet
        self.partial = False  # bytes of a request whose head is incomplete arrived
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.stopping = False  # the listener is shutting down: no further request

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.limits.caps.try_open(ip, exempt=self.limits.trusted(ip)):
            transport.write(BUSY)  # never served: nothing is parsed or counted
            transport.close()
            return
        self.counted = True
        self.transport = transport
        self.peer = (ip, int(peer[1])) if isinstance(peer, tuple) and len(peer) > 1 else None
        local = transport.get_extra_info("sockname")
        self.local = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
        self.live.add(self)
        self.arm()
        self.task = self.loop.create_task(self.run())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.counted:
            return
        self.counted = False
        self.limits.caps.close(self.peer[0] if self.peer else "")
        self.live.discard(self)
        self.disarm()
        self.eof = True
        self.gone.set()
        self.arrived.set()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return  # refused: the 503 is on its way and the transport closing
        self.inbox += data
        self.partial = True
        self.arrived.set()
        if len(self.inbox) > INBOX_LIMIT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.arrived.set()
        # True keeps the sending half open: a client that shut down its own (curl's -N,
        # `nc -N`) still gets the answers to what it sent. TLS transports cannot.
        return not self.limits.tls

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- the deadline for a request's head ------------------------------------------------

    def arm(self) -> None:
        """Start the clock for the next request's head (and the idle keep-alive limit)."""
        self.disarm()
        self.partial = bool(self.inbox) or self.requests.partial
        self.idle_since = self.loop.time()
        self.timer = self.loop.call_later(
            min(KEEP_ALIVE, self.limits.header_timeout), self.expired)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expired(self) -> None:
        self.timer = None
        if self.in_request or self.transport is None or self.transport.is_closing():
            return
        if self.partial:
            left = self.idle_since + self.limits.header_timeout - self.loop.time()
            if left > 0:  # the idle limit came first; the head's own deadline is later
                self.timer = self.loop.call_later(left, self.expired)
                return
            self.transport.write(_late(self.limits.header_timeout))
        self.transport.close()

    # -- reading --------------------------------------------------------------------------

    def parsed(self) -> Event | None:
        """The next event parsed from what has arrived, or None: never waits. Raises
        http11.Malformed."""
        events = self.requests.events
        while not events:
            if self.requests.failed is not None:
                raise self.requests.failed
            if not self.inbox:
                return None
            data, self.inbox = bytes(self.inbox), bytearray()
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            self.requests.feed(data)
        return events.popleft()

    async def next_event(self) -> Event | None:
        """The next event, waiting for data as needed; None once nothing more will come."""
        while (event := self.parsed()) is None:
            if self.eof or self.requests.closed:
                return None  # (parsed raised if the parser stopped on bad bytes)
            self.arrived.clear()
            await self.arrived.wait()
        return event

    # -- the requests ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self.stopping:
                try:
                    event = await self.next_event()
                except Malformed as err:
                    self.refuse(err.status)
                    return
                if not isinstance(event, Head):
                    return  # the client closed
                self.in_request = True
                self.disarm()
                exchange = Exchange(self, event)
                keep = await exchange.serve()
                self.in_request = False
                if not keep or self.stopping or not await self.next_cycle(exchange):
                    return
                self.arm()
        finally:
            self.disarm()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    def refuse(self, status: int) -> None:
        """Answer a request that could not be parsed (no response to it has started)."""
        self.write([_bad_request(431 if status == 431 else 400)])

    async def next_cycle(self, exchange: Exchange) -> bool:
        """Get ready for the connection's next request: whether there can be one."""
        if not exchange.complete or exchange.framing is None or exchange.framing.close:
            return False
        drained = 0
        while not exchange.body_done and drained <= DRAIN_LIMIT:
            if exchange.head.expects_continue and not exchange.continued:
                return False  # the body was never asked for: the client may not send it
            try:
                event = await asyncio.wait_for(self.next_event(), self.limits.header_timeout)
            except (TimeoutError, Malformed):
                return False
            if event is None:
                return False
            if isinstance(event, Data):
                drained += len(event.data)
            elif event is END:
                exchange.body_done = True
        return exchange.body_done

    # -- writing --------------------------------------------------------------------------

    def write(self, pieces: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(pieces)

    async def drained(self) -> bool:
        """Wait while the client is behind reading; False if it fell silent too long."""
        if self.writable.is_set():
            return not self.gone.is_set()
        try:
            await asyncio.wait_for(self.writable.wait(), self.limits.write_timeout)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()  # it stopped reading: let its request go
            return False
        return not self.gone.is_set()


def _late(header_timeout: float) -> bytes:
    return raw_answer(
        408, "request.timeout",
        f"the request line and headers did not arrive within {header_timeout:g} s",
        "send the whole request head at once; raise [http] header_timeout for slow links")


class Exchange:
    """One request and its response, between the parser and the ASGI front."""

    def __init__(self, conn: Connection, head: Head) -> None:
        self.conn = conn
        self.head = head
        self.started = False  # the response's head was made
        self.framing: Framing | None = None
        self.held: list[bytes] = []  # the head, written with the first part of the body
        self.complete = False
        self.body_done = False  # the request's body was read to its END
        self.continued = False  # 100 Continue was sent
        self.broken = False  # the request's body was not valid HTTP
        self.pending: Event | None = None  # an event parsed ahead of the front's next receive

    def scope(self) -> dict[str, Any] | None:
        head = self.head
        path, _, query = head.target.partition(b"?")
        try:
            text = path.decode("ascii")
            method = head.method.decode("ascii")
        except UnicodeDecodeError:
            return None
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": head.version.decode("ascii"), "method": method,
            "scheme": "https" if self.conn.limits.tls else "http",
            "path": unquote(text), "raw_path": path, "query_string": query, "root_path": "",
            "headers": head.headers, "client": self.conn.peer, "server": self.conn.local,
            "state": {},
        }

    async def serve(self) -> bool:
        """Run the front on this request; whether the connection may carry another."""
        conn = self.conn
        scope = self.scope()
        if scope is None:
            conn.refuse(400)
            return False
        try:
            await conn.app(scope, self.receive, self.send)
        except Exception:
            log.exception("HTTP %s %s failed", scope["method"], scope["path"])
            if not self.started:
                conn.write([FAILED])
            return False
        if self.broken:
            if not self.started:
                conn.refuse(400)
            return False
        if not self.complete:
            if not self.started and not conn.gone.is_set():
                log.error("HTTP %s %s: no response", scope["method"], scope["path"])
                conn.write([FAILED])
            return False
        return True

    async def receive(self) -> Message:
        conn = self.conn
        if self.body_done or self.complete:
            await conn.gone.wait()  # only the end of the connection is left to tell
            return {"type": "http.disconnect"}
        if self.broken:  # an invalid body: the connection ends after this request
            return {"type": "http.disconnect"}
        if self.head.expects_continue and not self.continued and not self.started:
            self.continued = True
            conn.write([b"HTTP/1.1 100 Continue\r\n\r\n"])
        try:
            event, self.pending = self.pending or await conn.next_event(), None
        except Malformed:
            self.broken = True
            return {"type": "http.disconnect"}
        if isinstance(event, Data):
            # The rest of the body and its end are most often in the same read (the parser
            # gives a big body in pieces): said in this message, the front need not ask again.
            self.continued = True  # the client sent the body: nothing to wait for
            more = True
            parts = [event.data]
            try:
                follow = conn.parsed()
                while isinstance(follow, Data):
                    parts.append(follow.data)
                    follow = conn.parsed()
            except Malformed:
                self.broken = True  # told on the next receive
            else:
                if follow is END:
                    more, self.body_done = False, True
                elif follow is not None:
                    self.pending = follow
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            return {"type": "http.request", "body": body, "more_body": more}
        if event is END:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}  # the client went away

    async def send(self, message: Message) -> None:
        conn = self.conn
        kind = message["type"]
        if conn.gone.is_set():
            return  # the client went away: what is left to say goes nowhere
        if kind == "http.response.start" and not self.started:
            status = int(message["status"])
            made = Framing(self.head, status)
            made.close = made.close or conn.stopping or conn.requests.closed
            try:
                head = made.head(status, message.get("headers", ()), DATES.now())
            except ValueError as err:
                raise ASGIMisuse(f"the front's response head: {err}") from err
            self.framing, self.started = made, True
            self.held.append(head)
            return
        framing = self.framing
        if kind != "http.response.body" or framing is None or self.complete:
            raise ASGIMisuse(f"unexpected ASGI message {kind!r} from the front")
        pieces, self.held = self.held, []
        try:
            pieces += framing.body(message.get("body", b""))
        except ValueError as err:
            raise ASGIMisuse(f"the front's response body: {err}") from err
        if not message.get("more_body", False):
            pieces += framing.end()
            self.complete = True
        conn.write(pieces)
        await conn.drained()
