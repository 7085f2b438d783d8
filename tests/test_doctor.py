"""`postroom doctor` against real DNS servers on loopback: per-test zones in a dnslib server
(good and broken SPF, DKIM present/absent/weak/mismatched/2048-bit split, DMARC p=reject
misaligned, null MX), the tests/peers/dns.sh dnsmasq server with its own zones and keys, and
the connections' health against the real Postfix upstream. Each verdict is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dns_helpers import Dnsmasq, dns_server, dnsmasq, txt

from postroom import dkim
from postroom import settings as settings_mod
from postroom.diagnostics import doctor
from postroom.diagnostics.dns import Resolver
from postroom.diagnostics.domaincheck import Finding
from postroom.runtime import Instance

SENDGRID = """
[[connections]]
name = "sg"
transport = "smtp"
host = "smtp.sendgrid.net"
port = 587
username = "apikey"
password = "x"
policy = { from = "shop@{domain}" }
"""


def relay(domain: str, name: str = "relay", extra: str = "") -> str:
    return f"""
[[connections]]
name = "{name}"
transport = "smtp"
host = "127.0.0.1"
port = 10025
security = "none"
username = "app@{domain}"
password = "x"
{extra}
"""


def instance(tmp_path: Path, connections: str) -> Instance:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\n{connections}')
    return Instance(settings_mod.load(cfg, environ={}))


def run(inst: Instance, zone: str, domains: tuple[str, ...] = ()) -> list[Finding]:
    with dns_server(zone) as dns:
        report = doctor.run(inst, Resolver(dns.address, timeout=3), list(domains),
                            connect=False)
    return report.findings


def find(findings: list[Finding], subject: str, check: str) -> Finding:
    hits = [f for f in findings if f.subject == subject and f.check == check]
    assert len(hits) == 1, (subject, check, [f.to_dict() for f in findings])
    return hits[0]


def keygen(inst: Instance, domain: str, selector: str, bits: int = 2048) -> dkim.KeyInfo:
    return dkim.keygen(inst.secrets.get, inst.secrets.set, domain, selector, bits)


# -- SPF -----------------------------------------------------------------------------------------
def test_good_domain_everything_passes(tmp_path: Path) -> None:
    inst = instance(tmp_path, relay("good.test", extra='dkim = { domain = "good.test", '
                                    'selector = "postroom" }')
                    + SENDGRID.replace("{domain}", "good.test"))
    key = keygen(inst, "good.test", "postroom")
    assert len(key.record) > 255 and len(key.strings) == 2  # the 2048-bit split record
    zone = f"""
good.test.              IN MX 10 mx.good.test.
mx.good.test.           IN A 192.0.2.25
good.test.              IN TXT "v=spf1 ip4:127.0.0.0/8 include:sendgrid.net -all"
sendgrid.net.           IN TXT "v=spf1 ip4:167.89.0.0/17 -all"
postroom._domainkey.good.test. IN TXT {txt(key.record)}
_dmarc.good.test.       IN TXT "v=DMARC1; p=reject; rua=mailto:d@good.test"
"""
    f = run(inst, zone)
    assert find(f, "good.test", "mx").status == "ok"
    spf_f = find(f, "good.test", "spf")
    assert spf_f.status == "ok" and "(1 of 10 DNS lookups)" in spf_f.summary
    dk = find(f, "good.test", "dkim")
    assert dk.status == "ok" and "postroom._domainkey.good.test: RSA 2048 bits" in dk.summary
    assert find(f, "good.test", "dmarc").status == "ok"
    r = find(f, "connection relay", "spf.sender")
    assert r.status == "ok" and "authorises 127.0.0.1" in r.summary and "ip4:127.0.0.0/8" in \
        r.summary
    d = find(f, "connection relay", "dkim.sender")
    assert d.status == "ok" and "published key matches the stored one (2048 bits)" in d.summary
    assert find(f, "connection relay", "dmarc.sender").status == "ok"
    sg = find(f, "connection sg", "spf.sender")
    assert sg.status == "ok" and "include:sendgrid.net" in sg.summary
    assert find(f, "connection sg", "dmarc.sender").status == "ok"  # SPF aligned
    assert find(f, "connection sg", "dkim.sender").status == "warn"  # SendGrid's s1/s2 absent
    assert not any(x.status == "fail" for x in f)


def test_spf_missing_provider_include(tmp_path: Path) -> None:
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "shop.test"))
    zone = """
shop.test.        IN MX 10 mx.shop.test.
mx.shop.test.     IN A 192.0.2.25
shop.test.        IN TXT "v=spf1 ip4:192.0.2.0/24 ~all"
_dmarc.shop.test. IN TXT "v=DMARC1; p=quarantine"
"""
    f = run(inst, zone)
    sg = find(f, "connection sg", "spf.sender")
    assert sg.status == "fail"
    assert sg.summary.startswith("your SPF does not authorise smtp.sendgrid.net")
    assert sg.record is not None and sg.record.name == "shop.test"
    assert sg.record.value == "v=spf1 ip4:192.0.2.0/24 include:sendgrid.net ~all"
    al = find(f, "connection sg", "dmarc.sender")
    assert al.status == "fail" and "p=quarantine" in al.summary and "spam" in al.summary


def test_spf_own_server_not_authorised(tmp_path: Path) -> None:
    inst = instance(tmp_path, relay("own.test"))
    zone = """
own.test.        IN MX 10 mx.own.test.
mx.own.test.     IN A 192.0.2.25
own.test.        IN TXT "v=spf1 mx -all"
"""
    f = run(inst, zone)
    r = find(f, "connection relay", "spf.sender")
    assert r.status == "fail" and "your SPF does not authorise 127.0.0.1" in r.summary
    assert "'fail'" in r.summary and r.record is not None
    assert r.record.value == "v=spf1 mx ip4:127.0.0.1 -all"
    dm = find(f, "own.test", "dmarc")
    assert dm.status == "warn" and dm.record is not None
    assert (dm.record.name, dm.record.value) == (
        "_dmarc.own.test", "v=DMARC1; p=none; rua=mailto:dmarc-reports@own.test")
    assert find(f, "connection relay", "dmarc.sender").status == "info"


def test_spf_too_many_lookups_and_none(tmp_path: Path) -> None:
    incs = " ".join(f"include:i{i}.many.test" for i in range(12))
    zone = f"many.test. IN MX 10 mx.many.test.\nmx.many.test. IN A 192.0.2.1\n" \
        f"many.test. IN TXT {txt('v=spf1 ' + incs + ' -all')}\n" + "\n".join(
            f'i{i}.many.test. IN TXT "v=spf1 ip4:10.0.{i}.0/24 -all"' for i in range(12)) + \
        "\nnone.test. IN MX 10 mx.many.test.\n"
    inst = instance(tmp_path, "")
    f = run(inst, zone, ("many.test", "none.test"))
    many = find(f, "many.test", "spf")
    assert many.status == "fail" and "needs 12 DNS lookups" in many.summary
    assert many.fix is not None and "ip4:/ip6:" in many.fix
    none = find(f, "none.test", "spf")
    assert none.status == "fail" and none.summary.startswith("no SPF record")
    assert none.record is not None and none.record.value == "v=spf1 mx ~all"


# -- DKIM ----------------------------------------------------------------------------------------
def test_dkim_absent_weak_and_mismatched(tmp_path: Path) -> None:
    inst = instance(tmp_path, relay("k.test", "signed", 'dkim = { domain = "k.test", '
                                    'selector = "s2048" }')
                    + relay("k.test", "unpublished", 'dkim = { domain = "k.test", '
                            'selector = "gone" }')
                    + relay("k.test", "nokey", 'dkim = { domain = "k.test", '
                            'selector = "nokey" }'))
    keygen(inst, "k.test", "s2048")
    keygen(inst, "k.test", "gone")
    other = dkim.keygen(lambda _n: None, lambda _n, _v: None, "k.test", "s2048")  # not ours
    weak = dkim.keygen(lambda _n: None, lambda _n, _v: None, "k.test", "old", 1024)
    zone = f"""
k.test.            IN MX 10 mx.k.test.
mx.k.test.         IN A 192.0.2.1
k.test.            IN TXT "v=spf1 ip4:127.0.0.1 -all"
s2048._domainkey.k.test. IN TXT {txt(other.record)}
old._domainkey.k.test.   IN TXT "{weak.record}"
bad._domainkey.k.test.   IN TXT "v=DKIM1; k=rsa; p=bm90IGEga2V5"
_dmarc.k.test.     IN TXT "v=DMARC1; p=none"
"""
    with dns_server(zone) as dns:  # "old" and "bad" are not common selectors: asked for
        f = doctor.run(inst, Resolver(dns.address), ["k.test"], connect=False,
                       selectors=["old", "bad"]).findings
    mismatch = find(f, "connection signed", "dkim.sender")
    assert mismatch.status == "fail" and "not the one Postroom signs with" in mismatch.summary
    stored = dkim.stored(inst.secrets.get, "k.test", "s2048")
    assert stored is not None and mismatch.record is not None
    assert mismatch.record.value == stored.record
    unpub = find(f, "connection unpublished", "dkim.sender")
    assert unpub.status == "fail" and "not published" in unpub.summary
    assert unpub.record is not None and unpub.record.name == "gone._domainkey.k.test"
    nokey = find(f, "connection nokey", "dkim.sender")
    assert nokey.status == "fail" and "has no key" in nokey.summary
    assert "postroom dkim keygen --domain k.test --selector nokey" in (nokey.fix or "")
    texts = {x.summary: x.status for x in f if x.check == "dkim"}
    assert texts["old._domainkey.k.test: RSA 1024 bits: accepted today, but 2048 is the "
                 "recommended size"] == "warn"
    assert texts["bad._domainkey.k.test: p= is not an RSA public key"] == "fail"
    assert texts["s2048._domainkey.k.test: RSA 2048 bits"] == "ok"


def test_dkim_none_found(tmp_path: Path) -> None:
    f = run(instance(tmp_path, ""), "nodkim.test. IN MX 10 mx.nodkim.test.\n"
            "mx.nodkim.test. IN A 192.0.2.1\n", ("nodkim.test",))
    d = find(f, "nodkim.test", "dkim")
    assert d.status == "warn" and d.summary.startswith("no DKIM key found")
    assert "postroom dkim keygen --domain nodkim.test --selector postroom" in (d.fix or "")


# -- DMARC and MX --------------------------------------------------------------------------------
def test_dmarc_reject_misaligned(tmp_path: Path) -> None:
    policy = 'policy = { envelope_sender = "bounces@mail.strict.test" }'
    inst = instance(tmp_path, relay("strict.test", extra=policy))
    zone = """
strict.test.           IN MX 10 mx.strict.test.
mx.strict.test.        IN A 192.0.2.1
strict.test.           IN TXT "v=spf1 ip4:127.0.0.1 -all"
mail.strict.test.      IN MX 10 mx.strict.test.
mail.strict.test.      IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.strict.test.    IN TXT "v=DMARC1; p=reject; adkim=s; aspf=s"
"""
    f = run(inst, zone)
    spf_f = find(f, "connection relay", "spf.sender")
    assert spf_f.status == "ok" and "mail.strict.test" in spf_f.summary  # SPF passes...
    al = find(f, "connection relay", "dmarc.sender")
    assert al.status == "fail"  # ...but not aligned (strict), and no DKIM
    assert al.summary.startswith("DMARC fails (p=reject): receivers reject mail From strict.test")
    assert "not aligned with From strict.test, strict" in al.summary
    assert 'envelope_sender = "bounces@strict.test"' in (al.fix or "")
    dm = find(f, "strict.test", "dmarc")
    assert dm.status == "ok" and "DKIM alignment strict, SPF alignment strict" in dm.summary


def test_dmarc_relaxed_subdomain_aligns_and_org_fallback(tmp_path: Path) -> None:
    policy = 'policy = { envelope_sender = "bounces@mail.relaxed.test", ' \
        'from = "News <news@news.relaxed.test>" }'
    inst = instance(tmp_path, relay("relaxed.test", extra=policy))
    zone = """
relaxed.test.            IN MX 10 mx.relaxed.test.
mx.relaxed.test.         IN A 192.0.2.1
news.relaxed.test.       IN MX 10 mx.relaxed.test.
mail.relaxed.test.       IN MX 10 mx.relaxed.test.
mail.relaxed.test.       IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.relaxed.test.     IN TXT "v=DMARC1; p=reject; sp=quarantine"
"""
    f = run(inst, zone)
    dm = find(f, "news.relaxed.test", "dmarc")
    assert "inherited from the organizational domain" in dm.summary and "p=quarantine" in \
        dm.summary
    assert find(f, "connection relay", "dmarc.sender").status == "ok"


def test_null_mx(tmp_path: Path) -> None:
    f = run(instance(tmp_path, ""), """
nullmx.test.   IN MX 0 .
nullmx.test.   IN TXT "v=spf1 -all"
nomx.test.     IN A 192.0.2.1
gone.test.     IN TXT "v=spf1 -all"
""", ("nullmx.test", "nomx.test", "gone.test"))
    n = find(f, "nullmx.test", "mx")
    assert n.status == "warn" and n.summary.startswith("null MX (RFC 7505)")
    assert "envelope_sender" in (n.fix or "")
    a = find(f, "nomx.test", "mx")
    assert a.status == "warn" and "goes to its A/AAAA address (192.0.2.1)" in a.summary
    g = find(f, "gone.test", "mx")
    assert g.status == "fail" and "neither MX nor address records" in g.summary


# -- the command ---------------------------------------------------------------------------------
def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    return subprocess.run([sys.executable, "-m", "postroom.cli", "doctor", *args,
                           "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                          env={**env, "COLUMNS": "200"})


def test_cli_json_and_rich(tmp_path: Path) -> None:
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "shop.test"))
    inst.close()
    zone = """
shop.test.        IN MX 10 mx.shop.test.
mx.shop.test.     IN A 192.0.2.25
shop.test.        IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
"""
    cfg = tmp_path / "postroom.toml"
    with dns_server(zone) as dns:
        res = _cli(cfg, "--dns-server", dns.address, "--no-connect", "--json")
        rich = _cli(cfg, "--dns-server", dns.address, "--no-connect")
        bad = _cli(cfg, "--dns-server", "dns.example", "--no-connect")
    assert res.returncode == 1, res.stderr
    data = json.loads(res.stdout)
    assert data["domains"] == ["shop.test"] and data["resolver"] == dns.address
    sg = next(x for x in data["findings"] if x["subject"] == "connection sg"
              and x["check"] == "spf.sender")
    assert sg["status"] == "fail" and sg["record"]["value"].endswith("include:sendgrid.net -all")
    health = next(x for x in data["findings"] if x["check"] == "health")
    assert health["status"] == "ok" and health["summary"].startswith("health up")
    assert rich.returncode == 1 and "your SPF does not authorise smtp.sendgrid.net" in \
        rich.stdout
    assert 'publish: shop.test. IN TXT "v=spf1 ip4:192.0.2.0/24 include:sendgrid.net -all"' \
        in rich.stdout
    assert "problems found" in rich.stdout
    assert bad.returncode == 2 and "--dns-server 'dns.example'" in bad.stderr
    assert "Traceback" not in bad.stderr + rich.stderr + res.stderr


# -- connection health against the real upstream --------------------------------------------------
def test_health_login_checked(tmp_path: Path, peers: Any) -> None:
    conns = "".join(f"""
[[connections]]
name = "{name}"
transport = "smtp"
host = "127.0.0.1"
port = {peers.submission_port}
security = "starttls"
username = "testuser@example.test"
password = "{pw}"
ca_file = "{peers.ca_file}"
connect_timeout = 5
""" for name, pw in (("good", peers.users["testuser@example.test"]), ("badpw", "wrong")))
    inst = instance(tmp_path, conns)
    with dns_server("example.test. IN MX 10 mail.example.test.\n") as dns:
        report = doctor.run(inst, Resolver(dns.address), ["example.test"], connect=True)
    good = find(report.findings, "connection good", "login")
    assert good.status == "ok" and "logged in without sending" in good.summary
    bad = find(report.findings, "connection badpw", "login")
    assert bad.status == "fail" and "535" in bad.summary
    assert bad.fix and "password" in bad.fix.lower()


# -- the recipe's dnsmasq ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dnsmasq(tmp_path_factory.mktemp("dnspeers")) as server:
        yield server


def test_doctor_against_dnsmasq(tmp_path: Path, masq: Dnsmasq) -> None:
    conns = relay("example.test", "sel1", 'dkim = { domain = "example.test", selector = '
                  '"sel1" }') + relay("example.test", "sel2048", 'dkim = { domain = '
                                      '"example.test", selector = "sel2048" }')
    inst = instance(tmp_path, conns)
    for sel in ("sel1", "sel2048"):  # the keys dns.sh published, imported into the store
        inst.secrets.set(dkim.secret_name("example.test", sel), masq.key(sel).read_text())
    report = doctor.run(inst, Resolver(masq.address), ["example.test", "nullmx.test"],
                        connect=False)
    f = report.findings
    assert find(f, "example.test", "spf").summary.startswith("v=spf1 ip4:127.0.0.0/8 mx -all")
    assert find(f, "example.test", "mx").summary == \
        "MX 10 mail.example.test, 20 mx2.example.test"
    dmarc_f = find(f, "example.test", "dmarc")
    assert dmarc_f.status == "ok" and "p=reject" in dmarc_f.summary
    for sel, bits in (("sel1", 1024), ("sel2048", 2048)):
        subject = f"connection {sel} (From example.test)"  # it is checked for both domains
        d = find(f, subject, "dkim.sender")
        assert d.status == "ok" and f"matches the stored one ({bits} bits)" in d.summary, d
        assert find(f, subject, "dmarc.sender").status == "ok"
        assert find(f, f"connection {sel} (From nullmx.test)", "dmarc.sender").status == "info"
    weak = next(x for x in f if x.subject == "example.test" and x.check == "dkim"
                and "sel1." in x.summary)
    assert weak.status == "warn" and "1024 bits" in weak.summary
    assert find(f, "nullmx.test", "mx").summary.startswith("null MX")


def test_oauth_grant_checked(tmp_path: Path) -> None:
    conn = """
[[connections]]
name = "gm"
transport = "smtp"
host = "127.0.0.1"
port = 10587
username = "me@oauth.test"
auth = "xoauth2"
[connections.oauth]
provider = "generic"
client_id = "gateway"
token_url = "http://127.0.0.1:9/t"
authorize_url = "http://127.0.0.1:9/a"
scopes = ["smtp"]
"""
    f = run(instance(tmp_path, conn), "oauth.test. IN MX 10 mx.oauth.test.\n")
    o = find(f, "connection gm", "oauth")
    assert o.status == "fail" and o.summary.startswith("OAuth grant no_grant")
    assert o.fix == "postroom oauth login gm"
