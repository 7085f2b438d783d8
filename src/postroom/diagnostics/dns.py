"""DNS lookups for the wizard and the doctor (dnspython), answered by this machine's resolver
or by the one the user names (``--dns-server 127.0.0.1:5353``): nothing goes to a vendor's
service.

Every answer says how the lookup ended, because SPF and DMARC tell the cases apart (RFC 7208
section 4.6.4, 5; RFC 7489 section 6.6.3): records found, the name does not exist
(NXDOMAIN), it exists without records of that type (no data: together with NXDOMAIN a
"void" lookup), or the DNS failed (SERVFAIL, timeout: a temporary error, never read as "no
record"). Answers are cached for the life of the :class:`Resolver` (one command run), so
an SPF tree that includes the same domain twice costs one query.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass
from typing import Any

from postroom.exceptions import ConfigError

OK = "ok"
NXDOMAIN = "nxdomain"
NODATA = "nodata"
SERVFAIL = "servfail"
TIMEOUT = "timeout"
ERROR = "error"
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Answer:
    name: str
    rtype: str
    status: str  # ok | nxdomain | nodata | servfail | timeout | error
    records: tuple[Any, ...] = ()  # dnspython rdata objects
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def void(self) -> bool:
        """NXDOMAIN or no data: the name answers nothing of this type (RFC 7208 4.6.4)."""
        return self.status in (NXDOMAIN, NODATA)

    @property
    def temporary(self) -> bool:
        return self.status in (SERVFAIL, TIMEOUT, ERROR)

    def describe(self) -> str:
        if self.ok:
            return f"{len(self.records)} {self.rtype} record(s)"
        return {NXDOMAIN: f"{self.name} does not exist (NXDOMAIN)",
                NODATA: f"{self.name} has no {self.rtype} record",
                SERVFAIL: f"the DNS server failed for {self.name} {self.rtype} (SERVFAIL)",
                TIMEOUT: f"no DNS answer for {self.name} {self.rtype} in time"}.get(
                    self.status, f"DNS error for {self.name} {self.rtype}: {self.error}")


def parse_server(text: str) -> list[tuple[str, int]]:
    """"127.0.0.1:5353", "[::1]:53", "9.9.9.9", "::1", comma-separated for several."""
    out: list[tuple[str, int]] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise _bad_server(item)
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            if not p.isdigit():
                raise _bad_server(item)
            port = int(p)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _bad_server(item) from None
        if not 1 <= port <= 65535:
            raise _bad_server(item)
        out.append((host, port))
    if not out:
        raise _bad_server(text)
    return out


def _bad_server(item: str) -> ConfigError:
    return ConfigError(f"--dns-server {item!r}: give the DNS server's IP address, optionally "
                       "with a port: 127.0.0.1:5353, [::1]:53 or 9.9.9.9",
                       code="config.dns_server")


class Resolver:
    """Queries one DNS server (or the system's), with a cache; safe to share between
    threads."""

    def __init__(self, server: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        import dns.nameserver
        import dns.resolver

        self.server = server
        if server:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in parse_server(server)]
        else:
            try:
                r = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration as err:
                raise ConfigError(
                    "this machine has no DNS resolver configured (/etc/resolv.conf); name "
                    "one with --dns-server IP[:PORT]", code="config.dns_server") from err
        r.lifetime = timeout
        r.timeout = min(timeout, 2.0)
        r.cache = None  # ours below also remembers failures
        self._r = r
        self._cache: dict[tuple[str, str], Answer] = {}
        self._lock = threading.Lock()
        self.queries = 0

    def describe(self) -> str:
        if self.server:
            return self.server
        return "system resolver (" + ", ".join(str(n) for n in self._r.nameservers) + ")"

    def query(self, name: str, rtype: str) -> Answer:
        key = (name.lower().rstrip("."), rtype)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        answer = self._query(key[0], rtype)
        with self._lock:
            self._cache[key] = answer
            self.queries += 1
        return answer

    def _query(self, name: str, rtype: str) -> Answer:
        import dns.exception
        import dns.name
        import dns.resolver

        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError) as err:
            return Answer(name, rtype, ERROR, error=f"not a valid domain name: {err}")
        try:
            ans = self._r.resolve(qname, rtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer(name, rtype, NXDOMAIN)
        except dns.resolver.LifetimeTimeout:
            return Answer(name, rtype, TIMEOUT, error="timeout")
        except dns.resolver.NoNameservers as err:
            return Answer(name, rtype, SERVFAIL, error=str(err))
        except dns.exception.DNSException as err:
            return Answer(name, rtype, ERROR, error=str(err) or type(err).__name__)
        if ans.rrset is None:
            return Answer(name, rtype, NODATA)
        return Answer(name, rtype, OK, tuple(ans.rrset))

    # -- typed helpers ---------------------------------------------------------------------------
    def txt(self, name: str) -> tuple[Answer, list[str]]:
        """TXT records, each one's strings joined (RFC 7208 3.3: a record longer than 255
        bytes is published as several strings that the reader concatenates)."""
        ans = self.query(name, "TXT")
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in ans.records]
        return ans, texts

    def mx(self, name: str) -> tuple[Answer, list[tuple[int, str]]]:
        """(answer, [(preference, exchange)]) sorted by preference; the exchange without the
        final dot, "" for the root (a null MX, RFC 7505)."""
        ans = self.query(name, "MX")
        hosts = sorted((int(r.preference), r.exchange.to_text().rstrip(".")) for r in ans.records)
        return ans, hosts

    def addresses(self, name: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        out: list[str] = []
        for rtype in families:
            out += [r.address for r in self.query(name, rtype).records]
        return out

    def srv(self, name: str) -> tuple[Answer, list[tuple[int, int, int, str]]]:
        """(answer, [(priority, weight, port, target)]) by priority then weight (highest
        first); target "" means "not offered here" (RFC 2782 target ".")."""
        ans = self.query(name, "SRV")
        items = [(int(r.priority), int(r.weight), int(r.port), r.target.to_text().rstrip("."))
                 for r in ans.records]
        return ans, sorted(items, key=lambda t: (t[0], -t[1]))

    def ptr(self, ip: str) -> list[str]:
        import dns.reversename

        ans = self.query(dns.reversename.from_address(ip).to_text(), "PTR")
        return [r.target.to_text().rstrip(".") for r in ans.records]
