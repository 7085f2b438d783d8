"""Network steps shared by the SMTP and HTTPS probes: resolve, connect, and name the result.

Every step runs under the caller's deadline (``asyncio.timeout_at``). A connection attempt
ends in one of a few outcomes a user can act on: open, refused (an RST: nothing listens, or a
firewall rejects), dropped (no answer at all: a firewall discards the packets), unreachable
(no route: ENETUNREACH/EHOSTUNREACH, or an ICMP error), or a DNS failure.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from enum import StrEnum


class Reach(StrEnum):
    OPEN = "open"
    REFUSED = "refused"
    DROPPED = "dropped"
    UNREACHABLE = "unreachable"
    DNS = "dns"
    ERROR = "error"


# errno values that mean "no way there from here" (a route, or an ICMP "unreachable" /
# "administratively prohibited" that the kernel reports to connect()).
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN,
                errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM}


def classify(err: BaseException) -> tuple[Reach, str]:
    """What a failed connect() means, and the system's words for it."""
    if isinstance(err, socket.gaierror):
        return Reach.DNS, err.strerror or str(err)
    if isinstance(err, ConnectionRefusedError):
        return Reach.REFUSED, "connection refused"
    if isinstance(err, TimeoutError):
        return Reach.DROPPED, "no answer"
    if isinstance(err, OSError) and err.errno in _UNREACHABLE:
        return Reach.UNREACHABLE, err.strerror or str(err)
    if isinstance(err, OSError):
        return Reach.ERROR, err.strerror or str(err)
    return Reach.ERROR, str(err) or type(err).__name__


@dataclass(frozen=True)
class Address:
    family: int
    ip: str

    def __str__(self) -> str:
        return f"[{self.ip}]" if self.family == socket.AF_INET6 else self.ip


async def resolve(host: str, port: int) -> list[Address]:
    """A and AAAA records through the system resolver (getaddrinfo, as every other program on
    this machine sees them), in the order the system prefers (RFC 6724).

    getaddrinfo cannot be cancelled, so it runs in a daemon thread of its own: a resolver that
    hangs past the deadline is abandoned instead of holding up the event loop's shutdown
    (asyncio.run joins its default executor). Raises socket.gaierror."""
    try:  # an address needs no resolver, nor its thread (the SMTP transport connects often)
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return [Address(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))]
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[list[Address]] = loop.create_future()

    def done(result: list[Address] | None, err: BaseException | None) -> None:
        if fut.done():
            return
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(result or [])

    def work() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as err:  # handed to the waiting coroutine, nothing is lost
            loop.call_soon_threadsafe(done, None, err)
            return
        seen: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            addr = Address(int(family), str(sockaddr[0]))
            if addr not in seen:
                seen.append(addr)
        loop.call_soon_threadsafe(done, seen, None)

    threading.Thread(target=work, name=f"resolve-{host}", daemon=True).start()
    return await fut


@dataclass
class Connected:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: Address
    connect_ms: float


@dataclass
class NotConnected:
    reach: Reach
    error: str
    address: Address | None


async def connect(addresses: list[Address], port: int) -> Connected | NotConnected:
    """Connect to the first address that answers. An address without a route (a broken IPv6
    setup, typically) is skipped at once; a refusal or a drop is the answer. A deadline that
    runs out raises TimeoutError: the caller reports that as dropped."""
    failure: NotConnected | None = None
    for addr in addresses:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(addr.ip, port, family=addr.family)
        except OSError as err:
            reach, text = classify(err)
            failure = NotConnected(reach, text, addr)
            if reach is Reach.UNREACHABLE:
                continue
            return failure
        return Connected(reader, writer, addr, (time.monotonic() - t0) * 1000)
    return failure or NotConnected(Reach.DNS, "no address", None)


async def close(writer: asyncio.StreamWriter, wait: float = 0.5) -> None:
    """Close politely but briefly; TLS close_notify from a server may never come."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), wait)
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
    except Exception:  # a timeout, a reset, an SSL error on close: nothing left to learn
        writer.transport.abort()
