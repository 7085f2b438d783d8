"""The HTTP listener's connections: how many a client may hold open, and how long it may take
to send a request's line and headers.

uvicorn counts neither per client nor a header deadline: a connection that sends nothing,
or half a request line, is kept for ever, and a few hundred of them lock everyone out of
/healthz and the API. This is uvicorn's h11 protocol with

- caps on open connections, in all and per client address (postroom.ingress.guard
  SessionCaps: clients in trusted_networks only count toward the total, whose last tenth is
  theirs alone); a connection over a cap gets a 503 at once and is closed;
- a deadline for each request's line and headers, from the connection's start or the end
  of the previous response: past it, a client that sent part of a request gets 408 (RFC
  9110 section 15.5.9) and one that sent nothing is closed, as an idle keep-alive is.

The body has deadlines of its own in the front (http_front), which reads it.
Imported only when uvicorn starts (on the first HTTP connection).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from postroom.ingress.guard import SessionCaps


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


def guarded_protocol(caps: SessionCaps, trusted: Callable[[str], bool],
                     header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol class (uvicorn.Config(http=...)) held to ``caps`` and
    ``header_timeout``."""
    late = raw_answer(
        408, "request.timeout",
        f"the request line and headers did not arrive within {header_timeout:g} s",
        "send the whole request head at once; raise [http] header_timeout for slow links")

    class Guarded(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.peer_ip = ""
            self.counted = False
            self.partial = False  # bytes of a request whose head is incomplete arrived
            self.head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if not caps.try_open(self.peer_ip, exempt=trusted(self.peer_ip)):
                # Not handed to uvicorn at all: it never counts or serves this connection.
                if isinstance(transport, asyncio.WriteTransport):
                    transport.write(BUSY)
                transport.close()
                return
            self.counted = True
            super().connection_made(transport)  # type: ignore[arg-type]
            self.arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.counted:
                return
            self.counted = False
            caps.close(self.peer_ip)
            self.disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.counted:
                return  # refused: the 503 is on its way and the transport closing
            self.partial = True
            super().data_received(data)
            if self.in_request():
                self.disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.in_request():
                self.arm()  # the next request's head has the same deadline

        def in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def arm(self) -> None:
            self.disarm()
            self.partial = False
            self.head_timer = self.loop.call_later(header_timeout, self.head_expired)

        def disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_expired(self) -> None:
            self.head_timer = None
            if self.in_request() or self.transport.is_closing():
                return
            if self.partial:
                self.transport.write(late)
            self.transport.close()

    return Guarded
