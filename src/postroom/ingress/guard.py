"""Per-peer rules shared by the listeners and the admin pages: whether a client is in a set of
networks (trusted_networks, admin_networks), how many sessions a peer may hold, and how long
a peer that keeps failing to authenticate waits for its next answer.

Pure and synchronous (no I/O, no locks: the listeners call it from the event loop thread), and
bounded in memory whatever the peers do: SessionCaps holds one entry per peer with an open
session, FailureLimiter at most ``max_peers`` entries.

Peers are counted by address, except IPv6 ones, which are counted by /64: one subscriber
is routinely given a whole /64 (RFC 6177), so counting single addresses would let one
client open as many "peers" as it likes. IPv4-mapped IPv6 addresses count as the IPv4 one.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import time
from collections.abc import Callable, Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(value: object) -> Address | None:
    """A client's IP address from what a socket or ASGI server reports (a string, or a
    (host, port) peer), IPv4-mapped IPv6 (a dual-stack socket's IPv4 client) as IPv4; None
    for anything that is not an IP address."""
    if isinstance(value, tuple | list):
        value = value[0] if value else None
    return _parse(str(value))


# Asked several times per HTTP request and per SMTP session (the caps, trusted_networks):
# parsing an address costs more than the rest of those checks. Bounded, so that many
# distinct clients only churn it.
@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Networks:
    """A configured list of networks, and the one way to ask whether a client is in it."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self._nets = [ipaddress.ip_network(n, strict=False) for n in self.names]
        self._holds = functools.lru_cache(maxsize=1024)(self._lookup)

    def __contains__(self, client: object) -> bool:
        if isinstance(client, tuple | list):
            client = client[0] if client else None
        return self._holds(str(client))

    def _lookup(self, client: str) -> bool:
        addr = _parse(client)
        return addr is not None and any(addr in net for net in self._nets)


@functools.lru_cache(maxsize=4096)
def peer_key(ip: str) -> str:
    """The identity a peer is counted under: its IPv4 address or its IPv6 /64.

    Anything that is not an IP address (a Unix socket path, "") is returned unchanged, so
    such peers share one count per distinct value.
    """
    addr = client_address(ip)  # an IPv6 zone ("fe80::1%eth0") dropped, IPv4-mapped unwrapped
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


# How long a peer's failures are remembered after its last one (FailureLimiter's default).
FAILURE_WINDOW = 600.0


class FailureLimiter:
    """A growing delay for peers whose authentication fails, across sessions and requests.

    After the n-th failure within ``window`` seconds of the previous one, the peer's next
    failed attempt is answered after ``base_delay * 2 ** (n - 1)`` seconds, at most
    ``max_delay``: one mistyped secret costs a client ``base_delay``, a guessing loop soon
    costs it ``max_delay`` per guess however many connections it opens. The listener sleeps
    on its event loop, so a delayed peer holds only its own connection.

    A success forgets the peer's failures (a client behind the same address that fixed its
    secret is not punished for its earlier mistakes).
    """

    def __init__(
        self,
        *,
        base_delay: float,
        max_delay: float,
        window: float = FAILURE_WINDOW,
        max_peers: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base_delay < 0 or max_delay < base_delay:
            raise ValueError("need 0 <= base_delay <= max_delay")
        if window <= 0 or max_peers < 1:
            raise ValueError("window must be > 0 and max_peers >= 1")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.max_peers = max_peers
        self._clock = clock
        # key -> (failures, time of the last one); oldest first, so eviction pops the left.
        self._peers: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._peers)

    def failures(self, ip: str) -> int:
        """Failures counted against ``ip`` (0 once ``window`` has passed since the last)."""
        key = peer_key(ip)
        entry = self._peers.get(key)
        if entry is None:
            return 0
        if self._clock() - entry[1] > self.window:
            del self._peers[key]
            return 0
        return entry[0]

    def delay(self, ip: str) -> float:
        """Seconds to wait before answering this peer's next attempt (0 if it is clean)."""
        n = self.failures(ip)
        if n == 0:
            return 0.0
        # The exponent is capped so that a long-lived count cannot overflow a float.
        return min(self.max_delay, self.base_delay * 2.0 ** min(n - 1, 64))

    def failed(self, ip: str) -> None:
        """Count one failed attempt from ``ip``."""
        key = peer_key(ip)
        n = self.failures(ip) + 1
        self._peers[key] = (n, self._clock())
        self._peers.move_to_end(key)
        while len(self._peers) > self.max_peers:
            # The peer failing least recently goes first: the one whose delay matters least.
            self._peers.popitem(last=False)

    def succeeded(self, ip: str) -> None:
        """Forget the failures of ``ip``."""
        self._peers.pop(peer_key(ip), None)


class SessionCaps:
    """How many sessions may be open at once: ``per_peer`` per peer, ``total`` in all.

    ``exempt`` peers (the listener's trusted networks) are not held to ``per_peer``: by
    default that is this host, whose applications may legitimately keep many connections
    open; and when a proxy on this host makes every client look like 127.0.0.1, a per-peer
    count of that address says nothing about any one client (the proxy must limit them).
    The last ``reserve`` places of ``total`` are kept for exempt peers, so that outsiders
    filling the listener do not lock out this host's own applications.

    Every ``try_open`` that returned True must be matched by exactly one ``close``.
    """

    def __init__(self, *, per_peer: int, total: int, reserve: int = 0) -> None:
        if per_peer < 1 or total < 1 or not 0 <= reserve < total:
            raise ValueError("need per_peer >= 1, total >= 1 and 0 <= reserve < total")
        self.per_peer = per_peer
        self.total = total
        self.reserve = reserve
        self.open = 0
        self._by_peer: dict[str, int] = {}

    def count(self, ip: str) -> int:
        """Sessions open now from ``ip`` (or its IPv6 /64)."""
        return self._by_peer.get(peer_key(ip), 0)

    def try_open(self, ip: str, *, exempt: bool = False) -> bool:
        """Count a new session from ``ip`` and return True, or return False if over a cap."""
        key = peer_key(ip)
        held = self._by_peer.get(key, 0)
        if exempt:
            if self.open >= self.total:
                return False
        elif self.open >= self.total - self.reserve or held >= self.per_peer:
            return False
        self._by_peer[key] = held + 1
        self.open += 1
        return True

    def close(self, ip: str) -> None:
        """A session from ``ip`` counted by ``try_open`` has ended."""
        key = peer_key(ip)
        held = self._by_peer.get(key, 0)
        if held <= 0:
            return  # never counted: nothing to give back (keeps the counts from going negative)
        if held == 1:
            del self._by_peer[key]
        else:
            self._by_peer[key] = held - 1
        self.open -= 1
