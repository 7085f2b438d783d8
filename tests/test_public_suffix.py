"""DMARC's organizational domain from the Public Suffix List (issue 19, point 3).

The list is the one the ``publicsuffixlist`` package ships; these tests also prove it is read
from the package, with no network: the doctor runs against a local DNS server only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dns_helpers import dns_server
from test_doctor import find, instance, relay, run

from postroom.diagnostics import dmarc
from postroom.diagnostics.dns import Resolver


@pytest.mark.parametrize(("name", "org"), [
    ("mail.example.co.uk", "example.co.uk"),  # ICANN two-label suffix
    ("MAIL.Example.CO.UK.", "example.co.uk"),  # case and the root dot do not matter
    ("example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
    ("news.example.nhs.uk", "example.nhs.uk"),  # a suffix no "co/com/org" rule knows
    ("a.b.city.kawasaki.jp", "city.kawasaki.jp"),  # the list's exception rule (!city...)
    ("foo.github.io", "foo.github.io"),  # private-section suffix: github.io
    ("mail.foo.github.io", "foo.github.io"),
    ("github.io", "github.io"),
    ("www.example.com", "example.com"),
    ("news.relaxed.test", "relaxed.test"),  # a TLD not on the list: the "*" rule
    # IDN suffixes, as U-labels and as A-labels: each keeps the form it was given in.
    ("mail.example.個人.香港", "example.個人.香港"),
    ("mail.example.xn--gmqw5a.xn--j6w193g", "example.xn--gmqw5a.xn--j6w193g"),
    ("почта.пример.рф", "пример.рф"),
    ("xn--80a1acny.xn--e1afmkfd.xn--p1ai", "xn--e1afmkfd.xn--p1ai"),
])
def test_org_domain(name: str, org: str) -> None:
    assert dmarc.org_domain(name) == org


def test_alignment_uses_the_list() -> None:
    # Relaxed: subdomains of one registered name align, under a multi-label suffix too.
    assert dmarc.aligned("bounce.example.co.uk", "mail.example.co.uk", "r")
    assert not dmarc.aligned("example.co.uk", "other.co.uk", "r")
    # Two owners under one private suffix are not one organization.
    assert not dmarc.aligned("evil.github.io", "foo.github.io", "r")
    assert dmarc.aligned("mail.foo.github.io", "foo.github.io", "r")
    # U-labels and A-labels are the same name, for strict and relaxed alignment alike.
    assert dmarc.aligned("mail.example.xn--gmqw5a.xn--j6w193g", "example.個人.香港", "r")
    assert dmarc.aligned("пример.рф", "xn--e1afmkfd.xn--p1ai", "s")
    assert not dmarc.aligned("a.example.個人.香港", "b.example.個人.香港", "s")
    assert not dmarc.aligned("example.個人.香港", "other.個人.香港", "r")
    # A name that is not a valid IDN is compared as written, not an error.
    assert not dmarc.aligned("bad..name", "example.com", "r")


def test_report_uri_is_ascii_at_the_org_domain() -> None:
    assert dmarc.report_uri("mail.example.co.uk") == "mailto:dmarc-reports@example.co.uk"
    assert dmarc.report_uri("почта.пример.рф") == \
        "mailto:dmarc-reports@xn--e1afmkfd.xn--p1ai"


def test_list_is_read_without_the_network() -> None:
    """The list comes from the installed package: a fresh process in which every connection
    attempt fails still knows co.uk and github.io."""
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('the Public Suffix List must not be fetched')\n"
        "socket.socket.connect = refuse\n"
        "socket.socket.connect_ex = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "from postroom.diagnostics import dmarc\n"
        "print(dmarc.org_domain('x.foo.github.io'), dmarc.org_domain('x.example.co.uk'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == ["foo.github.io", "example.co.uk"], out.stderr


# -- the doctor, against a local DNS server ------------------------------------------------------
def test_doctor_falls_back_to_the_org_domain_under_co_uk(tmp_path: Path) -> None:
    policy = 'policy = { envelope_sender = "bounces@bounce.example.co.uk", ' \
        'from = "News <news@mail.example.co.uk>" }'
    inst = instance(tmp_path, relay("example.co.uk", extra=policy))
    # A decoy at the public suffix: a lookup that went one label too far would find it.
    zone = """
example.co.uk.             IN MX 10 mx.example.co.uk.
mx.example.co.uk.          IN A 192.0.2.1
mail.example.co.uk.        IN MX 10 mx.example.co.uk.
bounce.example.co.uk.      IN MX 10 mx.example.co.uk.
bounce.example.co.uk.      IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.example.co.uk.      IN TXT "v=DMARC1; p=reject; sp=quarantine"
_dmarc.co.uk.              IN TXT "v=DMARC1; p=none"
"""
    f = run(inst, zone)
    dm = find(f, "mail.example.co.uk", "dmarc")
    assert dm.summary.startswith("_dmarc.example.co.uk (inherited from the organizational "
                                 "domain): p=quarantine"), dm.summary
    # bounce.example.co.uk and mail.example.co.uk share example.co.uk: relaxed SPF aligns.
    assert find(f, "connection relay", "dmarc.sender").status == "ok"


def test_doctor_private_suffix_is_not_an_org_domain(tmp_path: Path) -> None:
    """foo.github.io's policy is its own, not github.io's; and an envelope sender at another
    github.io site does not align with it (the old two-label rule said it did)."""
    policy = 'policy = { envelope_sender = "bounces@evil.github.io", ' \
        'from = "Site <site@www.foo.github.io>" }'
    inst = instance(tmp_path, relay("foo.github.io", extra=policy))
    zone = """
www.foo.github.io.         IN MX 10 mx.github.io.
evil.github.io.            IN MX 10 mx.github.io.
evil.github.io.            IN TXT "v=spf1 ip4:127.0.0.1 -all"
mx.github.io.              IN A 192.0.2.1
_dmarc.foo.github.io.      IN TXT "v=DMARC1; p=reject"
_dmarc.github.io.          IN TXT "v=DMARC1; p=none"
"""
    f = run(inst, zone)
    dm = find(f, "www.foo.github.io", "dmarc")
    assert dm.summary.startswith("_dmarc.foo.github.io (inherited"), dm.summary
    assert "p=reject" in dm.summary
    al = find(f, "connection relay", "dmarc.sender")
    assert al.status == "fail", al.summary
    assert "not aligned with From www.foo.github.io" in al.summary
    assert "use an envelope sender under foo.github.io" in (al.fix or "")


@pytest.mark.parametrize("domain", ["mail.example.個人.香港",
                                    "mail.example.xn--gmqw5a.xn--j6w193g"])
def test_doctor_idn_suffix(tmp_path: Path, domain: str) -> None:
    """Under 個人.香港 (an IDN second-level suffix) the organizational domain is
    example.個人.香港, asked for in DNS by its A-labels, given as U-labels or A-labels."""
    inst = instance(tmp_path, "")
    zone = """
example.xn--gmqw5a.xn--j6w193g.         IN MX 10 mx.example.xn--gmqw5a.xn--j6w193g.
mail.example.xn--gmqw5a.xn--j6w193g.    IN MX 10 mx.example.xn--gmqw5a.xn--j6w193g.
mx.example.xn--gmqw5a.xn--j6w193g.      IN A 192.0.2.1
_dmarc.example.xn--gmqw5a.xn--j6w193g.  IN TXT "v=DMARC1; p=quarantine"
_dmarc.xn--gmqw5a.xn--j6w193g.          IN TXT "v=DMARC1; p=none"
"""
    f = run(inst, zone, (domain,))
    dm = find(f, domain, "dmarc")
    assert "(inherited from the organizational domain): p=quarantine" in dm.summary, \
        dm.summary
    assert dm.summary.startswith("_dmarc.example.")


def test_lookup_asks_the_org_domain_and_no_higher() -> None:
    zone = '_dmarc.example.co.uk. IN TXT "v=DMARC1; p=none"\n'
    with dns_server(zone) as dns:
        pol, where = dmarc.lookup(Resolver(dns.address, timeout=3), "a.b.example.co.uk")
        asked = [q for q, _ in dns.zone.queries]
    assert pol is not None and pol.inherited and where == "_dmarc.example.co.uk"
    assert asked == ["_dmarc.a.b.example.co.uk.", "_dmarc.example.co.uk."]
