"""SPF (postroom.diagnostics.spf) and the DNS layer (postroom.diagnostics.dns) against a real
DNS server on loopback (dnslib, tests/dns_helpers.py): check_host() results for every
mechanism, the 10-lookup and void-lookup limits, macros, temporary errors, and the static
analysis the doctor uses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dns_helpers import DnsServer, dns_server, txt

from postroom.diagnostics import spf
from postroom.diagnostics.dns import Resolver, parse_server
from postroom.exceptions import ConfigError

TOO_MANY = "\n".join(
    f'n{i}.toomany.test. IN TXT "v=spf1 ip4:10.9.{i}.0/24 -all"' for i in range(11))
GOOD = "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a:web.good.test mx include:_spf.partner.test -all"
MANY = "v=spf1 " + " ".join(f"include:n{i}.toomany.test" for i in range(11)) + " -all"
ZONE = f"""
good.test.            IN TXT {txt(GOOD)}
good.test.            IN TXT "some-site-verification=abc"
good.test.            IN MX 10 mx.good.test.
mx.good.test.         IN A 198.51.100.7
web.good.test.        IN A 198.51.100.20
_spf.partner.test.    IN TXT "v=spf1 ip4:203.0.113.0/25 ~all"
soft.test.            IN TXT "v=spf1 ip4:192.0.2.1 ~all"
redir.test.           IN TXT "v=spf1 redirect=good.test"
redirnone.test.       IN TXT "v=spf1 redirect=nothing.test"
toomany.test.         IN TXT {txt(MANY)}
{TOO_MANY}
voids.test.           IN TXT "v=spf1 a:v1.voids.test a:v2.voids.test a:v3.voids.test -all"
two.test.             IN TXT "v=spf1 -all"
two.test.             IN TXT "v=spf1 +all"
badmech.test.         IN TXT "v=spf1 ipv4:192.0.2.1 -all"
missinginc.test.      IN TXT "v=spf1 include:nospf.test -all"
nospf.test.           IN A 192.0.2.50
macro.test.           IN TXT "v=spf1 exists:%{{i}}._ip.macro.test exists:%{{l}}.u.macro.test -all"
192.0.2.77._ip.macro.test. IN A 127.0.0.2
alice.u.macro.test.   IN A 127.0.0.2
loop.test.            IN TXT "v=spf1 include:loop2.test -all"
loop2.test.           IN TXT "v=spf1 include:loop.test -all"
broken.test.          IN TXT "v=spf1 include:down.test -all"
neutral.test.         IN TXT "v=spf1 ip4:192.0.2.1"
cidr.test.            IN TXT "v=spf1 a/24 mx:mail.cidr.test/28 -all"
cidr.test.            IN A 198.51.100.1
mail.cidr.test.       IN MX 5 mx.cidr.test.
mx.cidr.test.         IN A 203.0.113.17
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with dns_server(ZONE, servfail={"down.test"}) as server:
        yield server


@pytest.fixture
def resolver(dns: DnsServer) -> Resolver:
    return Resolver(dns.address, timeout=3)


@pytest.mark.parametrize(("ip", "domain", "result", "matched"), [
    ("192.0.2.10", "good.test", "pass", "ip4:192.0.2.0/24"),
    ("2001:db8::5", "good.test", "pass", "ip6:2001:db8::/32"),
    ("198.51.100.20", "good.test", "pass", "a:web.good.test"),
    ("198.51.100.7", "good.test", "pass", "mx"),
    ("203.0.113.9", "good.test", "pass", "include:_spf.partner.test"),
    ("203.0.113.200", "good.test", "fail", "-all"),  # the include soft-fails: not a match
    ("198.51.100.99", "soft.test", "softfail", "~all"),
    ("192.0.2.10", "redir.test", "pass", "ip4:192.0.2.0/24"),
    ("192.0.2.2", "neutral.test", "neutral", None),
    ("198.51.100.77", "cidr.test", "pass", "a/24"),
    ("203.0.113.30", "cidr.test", "pass", "mx:mail.cidr.test/28"),
    ("203.0.113.60", "cidr.test", "fail", "-all"),
    ("192.0.2.77", "macro.test", "pass", "exists:%{i}._ip.macro.test"),
])
def test_check_host_mechanisms(resolver: Resolver, ip: str, domain: str, result: str,
                               matched: str | None) -> None:
    r = spf.check_host(resolver, ip, domain, f"bob@{domain}")
    assert r.result == result, (r.reason, r.trace)
    if matched is None:
        assert r.matched is None
    else:
        assert r.matched is not None and r.matched.endswith(matched), r.matched


def test_macro_local_part(resolver: Resolver) -> None:
    assert spf.check_host(resolver, "192.0.2.1", "macro.test", "alice@macro.test").result \
        == "pass"
    assert spf.check_host(resolver, "192.0.2.1", "macro.test", "bob@macro.test").result \
        == "fail"


@pytest.mark.parametrize(("domain", "result", "reason"), [
    ("toomany.test", "permerror", "more than 10 DNS lookups"),
    ("voids.test", "permerror", "more than 2 lookups found nothing"),
    ("two.test", "permerror", "2 SPF records"),
    ("badmech.test", "permerror", "unknown mechanism 'ipv4:192.0.2.1'"),
    ("missinginc.test", "permerror", "nospf.test has no SPF record"),
    ("redirnone.test", "permerror", "nothing.test has no SPF record"),
    ("loop.test", "permerror", "more than 10 DNS lookups"),
    ("broken.test", "temperror", "SERVFAIL"),
    ("nothing.test", "none", ""),
])
def test_check_host_errors(resolver: Resolver, domain: str, result: str, reason: str) -> None:
    r = spf.check_host(resolver, "192.0.2.9", domain)
    assert r.result == result, (r.reason, r.trace)
    assert reason in r.reason


def test_analyze_counts_the_whole_tree(resolver: Resolver) -> None:
    a = spf.analyze(resolver, "good.test")
    assert a.status == "ok" and a.lookups == 3 and a.includes == ["_spf.partner.test"]
    assert a.problems == [] and a.all_qualifier == "fail"
    many = spf.analyze(resolver, "toomany.test")
    assert many.status == "permerror" and many.lookups == 11
    assert "needs 11 DNS lookups" in many.problems[0]
    voids = spf.analyze(resolver, "voids.test")
    assert voids.void_lookups == 3 and voids.status == "permerror"
    loop = spf.analyze(resolver, "loop.test")
    assert any("loops back" in p for p in loop.problems)
    assert spf.analyze(resolver, "missinginc.test").status == "permerror"


@pytest.mark.parametrize(("record", "error"), [
    ("v=spf1 ip4:300.1.1.1 -all", "not an IP address"),
    ("v=spf1 ip4:2001:db8::1 -all", "an IPv6 address under ip4"),
    ("v=spf1 include -all", "include needs a domain"),
    ("v=spf1 redirect=a.test redirect=b.test", "redirect= appears twice"),
    ("v=spf1 a/33 -all", "longer than 32"),
    ("v=spf1 exists:%{x}.test -all", "bad macro"),
    ("v=spf10 -all", "must start with v=spf1"),
])
def test_parse_errors(record: str, error: str) -> None:
    with pytest.raises(spf.SPFError) as info:
        spf.parse(record)
    assert error in info.value.reason


def test_parse_keeps_unknown_modifiers_and_cidr() -> None:
    rec = spf.parse("v=spf1 mx/24//64 a:x.test/28 foo=bar ~all")
    mx, a, _, all_ = rec.terms
    assert (mx.name, mx.value, mx.cidr4, mx.cidr6) == ("mx", "", 24, 64)
    assert (a.value, a.cidr4) == ("x.test", 28)
    assert rec.terms[2].modifier and all_.qualifier == "softfail"


def test_resolver_tells_void_from_failure(resolver: Resolver) -> None:
    assert resolver.query("nothing.test", "TXT").status == "nxdomain"
    assert resolver.query("nospf.test", "TXT").status == "nodata"
    assert resolver.query("down.test", "TXT").status == "servfail"
    assert resolver.query("good.test", "TXT").ok


def test_resolver_server_syntax() -> None:
    assert parse_server("127.0.0.1:5353") == [("127.0.0.1", 5353)]
    assert parse_server("[::1]:53, 9.9.9.9") == [("::1", 53), ("9.9.9.9", 53)]
    for bad in ("dns.example", "127.0.0.1:x", "[::1]x", ""):
        with pytest.raises(ConfigError):
            parse_server(bad)


def test_resolver_times_out_on_a_dead_server() -> None:
    import socket
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bound, never answers
        s.bind(("127.0.0.1", 0))
        r = Resolver(f"127.0.0.1:{s.getsockname()[1]}", timeout=1.0)
        t0 = time.monotonic()
        ans = r.query("good.test", "TXT")
        assert ans.status == "timeout" and ans.temporary
        assert time.monotonic() - t0 < 3
        result = spf.check_host(r, "192.0.2.1", "good.test")
        assert result.result == "temperror"
