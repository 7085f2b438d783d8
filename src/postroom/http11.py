"""HTTP/1.1 on the wire, both ways, for `postroom serve`'s listener (ingress.http_conn), its
client of the web admin's process (ingress.admin_proxy) and the lean HTTPS client of the
send path (postroom.httpwire): messages parsed by llhttp (the parser Node.js uses, through
httptools, in C) into a few plain events, and the answers' heads and body framing written
here.

Parsing in C rather than h11's pure Python: a small request (a provider's webhook, an API
call) cost the listener more CPU in h11's parsing and framing than in its own work.

What h11 enforced and llhttp does not is enforced here:

- a request head (line and headers) of at most MAX_HEAD bytes: 431. llhttp keeps no count,
  and httptools buffers an incomplete header in memory, so bytes are fed in slices of
  MAX_HEAD and a head still incomplete after more than twice that is refused before it
  grows further; a complete one is measured exactly;
- HTTP/1.0 or 1.1 only, and a Host header in every HTTP/1.1 request (RFC 9112 section 3.2);
- header names and values that go out hold no CR, LF or NUL (no response splitting from a
  value that came from a message, such as an attachment's file name);
- a body framed by Content-Length when the application gives one, else chunked (HTTP/1.1)
  or delimited by closing the connection (HTTP/1.0, whose clients get no keep-alive);
  no body after HEAD or with 204 / 304.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import httptools

MAX_HEAD = 16 * 1024  # a request line and headers over this get 431
_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}
_BAD = (b"\r", b"\n", b"\0")


class Malformed(Exception):
    """The peer's bytes are not acceptable HTTP/1.1; ``status``: the answer (400 or 431)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Head:
    """A request's line and headers (names lower-cased, values without surrounding
    whitespace)."""

    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool  # the client allows another request on the connection after this
    expects_continue: bool  # Expect: 100-continue (HTTP/1.1)
    has_body: bool  # a Content-Length over 0 or a Transfer-Encoding was announced


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


class _End:
    def __repr__(self) -> str:
        return "END"


END: Final = _End()  # the end of a message's body
Event = Head | Data | _End


class Requests:
    """A server connection's bytes in, requests' events out (Head, Data..., END), in order;
    pipelined requests queue behind one another. Bytes that are not acceptable HTTP set
    ``failed`` (what to answer once the events before them are served) and end parsing."""

    def __init__(self) -> None:
        self.events: collections.deque[Event] = collections.deque()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.in_head = False  # a request's line began and its head is not complete
        self._head_fed = 0  # bytes fed since then (an upper bound of its size so far)
        self._stopped = False  # llhttp parses no more (an upgrade, or bad bytes)
        self.failed: Malformed | None = None
        # An Upgrade request's body still to come: llhttp skips the body of any request it
        # takes for an upgrade (curl --http2 on http:// asks for h2c), so it is passed
        # through here by its Content-Length.
        self._left: int | None = None

    # -- httptools' callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head, self._head_fed = True, 0
        self._url, self._headers = b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # not a chunked body's trailer fields: those are dropped
            self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser, headers = self._parser, self._headers
        version = parser.get_http_version().encode()
        size = len(self._url) + 16 + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > MAX_HEAD:
            raise Malformed(431, "head too large")
        if version not in (b"1.1", b"1.0"):
            raise Malformed(400, "HTTP version")
        has_body = expects = host = False
        for name, value in headers:
            if name == b"host":
                host = True
            elif name == b"content-length":
                has_body = has_body or value not in (b"0", b"")
            elif name == b"transfer-encoding":
                has_body = True
            elif name == b"expect":
                expects = value.lower() == b"100-continue"
        if version == b"1.1" and not host:
            raise Malformed(400, "no Host header")
        self.events.append(Head(
            parser.get_method(), self._url, version, headers,
            keep_alive=version == b"1.1" and parser.should_keep_alive(),
            expects_continue=expects and version == b"1.1", has_body=has_body))

    def on_body(self, body: bytes) -> None:
        self.events.append(Data(body))

    def on_message_complete(self) -> None:
        self.events.append(END)

    # -- feeding ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse ``data``: its events appended to ``events``, or ``failed`` set."""
        if self._left is not None:
            self._pass(data)
            return
        if self._stopped:
            return
        for start in range(0, len(data), MAX_HEAD):
            piece = data[start:start + MAX_HEAD] if len(data) > MAX_HEAD else data
            try:
                self._parser.feed_data(piece)
            except httptools.HttpParserUpgrade as up:
                # An Upgrade (WebSocket, h2c) or CONNECT is not served: the request is
                # answered as a plain one, and the connection ends after it.
                self._stopped = True
                self._upgraded(piece[int(up.args[0]):] + data[start + len(piece):])
                return
            except httptools.HttpParserError as err:
                # A request before the bad bytes (HTTP/1.0's, then data after its end) is
                # still served; the error is answered after it.
                cause = err.__context__
                self.failed = cause if isinstance(cause, Malformed) else Malformed(400, str(err))
                self._stopped = True
                return
            if self.in_head:
                self._head_fed += len(piece)
                if self._head_fed > 2 * MAX_HEAD:
                    self.failed, self._stopped = Malformed(431, "head too large"), True
                    return

    def _upgraded(self, rest: bytes) -> None:
        """After an upgrade request's head: its body, which llhttp skipped, from ``rest``."""
        if len(self.events) < 2 or not isinstance(self.events[-2], Head):
            return
        head = self.events[-2]
        if not head.has_body:
            return
        length = next((v for n, v in head.headers if n == b"content-length"), None)
        self.events.pop()  # the END llhttp gave at once
        if length is None or not length.isdigit():
            self.events.pop()  # a chunked body: not read here, the request is refused
            self.failed = Malformed(400, "an Upgrade request with a chunked body")
            return
        self._left = int(length)
        self._pass(rest)

    def _pass(self, data: bytes) -> None:
        assert self._left is not None
        take = data[:self._left]
        if take:
            self.events.append(Data(take))
            self._left -= len(take)
        if not self._left:
            self.events.append(END)
            self._left = None  # and, stopped, closed: what follows is not read

    @property
    def closed(self) -> bool:
        """No more bytes will be read: the connection ends after what was parsed."""
        return self._stopped and self._left is None

    @property
    def partial(self) -> bool:
        """Part of a request's head has arrived."""
        return self.in_head


class Responses:
    """A client connection's bytes in, one response's events out: ``status``, ``headers``
    once the head is read, then Data... and END. Interim answers (1xx) are passed over.
    Call ``feed(b"")`` at the end of the stream: it ends a body delimited by the close, or
    the answer to a HEAD request (which has none, whatever its Content-Length says: the
    server closes after it). ``size``: the body's bytes so far (the caller caps it);
    ``extra``: bytes came after the answer (the connection is not to be reused)."""

    def __init__(self, head_request: bool = False, max_head: int = MAX_HEAD) -> None:
        self.events: collections.deque[Data | _End] = collections.deque()
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None  # set with the head
        self._collected: list[tuple[bytes, bytes]] = []
        self._head_request = head_request
        self._max_head = max_head
        self._head_fed = 0
        self.size = 0
        self.complete = False
        self.keep_alive = False  # the server allows another request (read at the end)
        self.extra = False

    def on_message_begin(self) -> None:
        self.extra = self.extra or self.complete

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers is None:
            self._collected.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        if self.headers is None and not self.complete:
            self.status = self._parser.get_status_code()
            if self.status >= 200:
                self.headers = self._collected

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.size += len(body)
            self.events.append(Data(body))

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if self.headers is None:  # 100 Continue and the like: the answer follows
            self._collected, self.status = [], 0
            return
        self.complete, self.keep_alive = True, self._parser.should_keep_alive()
        self.events.append(END)

    def feed(self, data: bytes) -> None:
        """Parse ``data``; b"" is the end of the stream. Malformed for a bad answer."""
        try:
            if data:
                self._parser.feed_data(data)
            elif not self.complete:
                if self.headers is None or not (self._head_request or not any(
                        n in (b"content-length", b"transfer-encoding")
                        for n, _ in self.headers)):
                    raise Malformed(400, "the connection closed before the answer ended")
                self.complete = True  # the body was delimited by the close
                self.events.append(END)
        except httptools.HttpParserError as err:
            if not self.complete:
                raise Malformed(400, str(err)) from None
            self.extra = True  # bytes after the answer: that connection is not reused
        if self.headers is None:  # bytes of an unfinished head: bounded, as a request's
            self._head_fed += len(data)
            if self._head_fed > self._max_head:
                raise Malformed(431, "answer head too large")


def _valid(pieces: list[bytes], block: bytes) -> bytes:
    """``block``, the joined ``pieces`` of a head, unless some piece held CR, LF or NUL."""
    expected = len(pieces)  # one CRLF after each line, one more at the end
    if block.count(b"\n") != expected or block.count(b"\r") != expected or b"\0" in block:
        raise ValueError("a header name or value holds CR, LF or NUL")
    return block


# What a request may carry (RFC 9110 sections 5.1, 5.5, 9.1; RFC 9112 section 3.2), as h11
# checked it: a method and field names are tokens, a field value visible characters with
# spaces or tabs inside (none at either end), the target visible characters.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"(?:[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?")
_TARGET = re.compile(rb"[!-~]+")


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request's head (the caller gives Host and the body's framing);
    ValueError(what, text) for a part HTTP cannot carry."""
    if not _TOKEN.fullmatch(method):
        raise ValueError("method", method)
    if not _TARGET.fullmatch(target):
        raise ValueError("target", target)
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise ValueError("header field", name + b": " + value)
    return b"".join([method, b" ", target, b" HTTP/1.1\r\n",
                     *(name + b": " + value + b"\r\n" for name, value in headers), b"\r\n"])


class Framing:
    """How one response's body goes out, decided from its head: ``head`` writes the head
    (after adding the framing headers it needs), ``body`` frames each part, ``end`` the
    last; ``close``: the connection must end after this response."""

    __slots__ = ("bodiless", "chunked", "close", "declared", "sent")

    def __init__(self, request: Head | None, status: int) -> None:
        self.chunked = False
        self.close = request is None or not request.keep_alive
        self.declared: int | None = None
        self.sent = 0
        self.bodiless = (request is not None and request.method == b"HEAD") or \
            status in (204, 304) or status < 200

    def head(self, status: int, headers: list[tuple[bytes, bytes]] | Any,
             date: bytes) -> bytes:
        framed = False
        lines = [b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"Unknown")),
                 b"date: " + date]
        for name, value in headers:
            name = name.lower()
            if name == b"content-length":
                framed = True
                self.declared = int(value)
            elif name == b"transfer-encoding":
                framed = self.chunked = True
            elif name == b"connection":
                if b"close" in value.lower():
                    self.close = True
                continue  # written below, once
            elif name == b"date":
                continue
            lines.append(name + b": " + value)
        if not framed and not self.bodiless and status >= 200:
            if self.close:
                pass  # delimited by the close
            else:
                self.chunked = True
                lines.append(b"transfer-encoding: chunked")
        if self.close:
            lines.append(b"connection: close")
        lines.append(b"")
        return _valid(lines, b"\r\n".join(lines) + b"\r\n")

    def body(self, data: bytes) -> list[bytes]:
        if self.bodiless or not data:
            return []
        self.sent += len(data)
        if self.declared is not None and self.sent > self.declared:
            raise ValueError("more body than the Content-Length said")
        if self.chunked:
            return [b"%x\r\n" % len(data), data, b"\r\n"]
        return [data]

    def end(self) -> list[bytes]:
        if self.declared is not None and self.sent != self.declared and not self.bodiless:
            self.close = True  # the client cannot find the next response: end here
        return [b"0\r\n\r\n"] if self.chunked and not self.bodiless else []
