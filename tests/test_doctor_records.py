"""Records a user can paste (issue 12, section 3): `postroom doctor` and `postroom dkim`
against DNS servers on loopback (per-test zones in a dnslib server, and the
tests/peers/dns.sh dnsmasq server). Each test asserts the exact record text to publish and
that the wrong one is gone:

- records are printed whole, one per line, at 80 columns and when stdout is a file, and a
  file is not wrapped mid-phrase;
- one SPF record per name, merging what every connection needs (and several published
  records), with the 10-lookup limit said when the merge passes it;
- a missing MX is advised with a host that exists, or a placeholder marked as one;
- DKIM advice reuses the selector a connection signs with; `dkim keygen` names the
  connection to add the ``dkim`` table to.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dns_helpers import Dnsmasq, dns_server, dnsmasq, txt
from test_doctor import SENDGRID, find, instance, relay  # the doctor tests' configurations

from postroom import dkim
from postroom.diagnostics import doctor
from postroom.diagnostics.dns import Resolver
from postroom.diagnostics.domaincheck import Finding
from postroom.runtime import Instance

SHOP_ZONE = """
shop.test.         IN A 192.0.2.80
shop.test.         IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
sendgrid.net.      IN TXT "v=spf1 ip4:167.89.0.0/17 -all"
"""
SHOP_SPF = 'shop.test. IN TXT "v=spf1 ip4:192.0.2.0/24 include:sendgrid.net ip4:127.0.0.1 -all"'


def signing(domain: str, selector: str) -> str:
    return f'dkim = {{ domain = "{domain}", selector = "{selector}" }}'


def findings(inst: Instance, address: str, domains: list[str]) -> list[Finding]:
    return doctor.run(inst, Resolver(address, timeout=3), domains, connect=False).findings


def spf_records(found: list[Finding], name: str) -> set[str]:
    return {f.record.value for f in found if f.record is not None and f.record.name == name
            and f.record.value.startswith("v=spf1")}


def postroom(cfg: Path, *args: str, columns: str | None, stdout: Path | None = None
             ) -> tuple[int, str, str]:
    """`postroom ARGS` in a real process, stdout a pipe or the file ``stdout``; COLUMNS set
    only when given (a pipe or a file is not a terminal either way)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("POSTROOM_") and k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    cmd = [sys.executable, "-m", "postroom.cli", *args, "--config", str(cfg)]
    if stdout is None:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                             stdin=subprocess.DEVNULL)
        return res.returncode, res.stdout, res.stderr
    with stdout.open("w") as out:
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120,
                             env=env, stdin=subprocess.DEVNULL)
    return res.returncode, stdout.read_text(), res.stderr


def published(output: str) -> list[str]:
    """The records of the "Publish" list, in order: "  N: RECORD" lines after its heading."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Publish ("))
    out = []
    for n, line in enumerate(lines[start + 1:], 1):
        m = re.fullmatch(r"  (\d+): (.+)", line)
        if m is None:
            break
        assert int(m.group(1)) == n, line
        out.append(m.group(2))
    return out


# -- records printed whole -----------------------------------------------------------------------
def test_records_whole_at_80_columns_and_in_a_file(tmp_path: Path) -> None:
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "shop.test")
                         + relay("shop.test", extra=signing("shop.test", "pr1")))
    key = dkim.keygen(inst.secrets.get, inst.secrets.set, "shop.test", "pr1")
    inst.close()
    expected = [
        "shop.test. IN MX 10 shop.test.",
        '_dmarc.shop.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@shop.test"',
        SHOP_SPF,
        "pr1._domainkey.shop.test. IN TXT " + " ".join(f'"{s}"' for s in key.strings),
    ]
    cfg = tmp_path / "postroom.toml"
    with dns_server(SHOP_ZONE) as dns:
        args = ("doctor", "--domain", "shop.test", "--dns-server", dns.address,
                "--no-connect")
        narrow = postroom(cfg, *args, columns="80")
        wide = postroom(cfg, *args, columns="200")
        to_file = postroom(cfg, *args, columns=None, stdout=tmp_path / "doctor.txt")
    for code, out, err in (narrow, wide, to_file):
        assert code == 1 and "Traceback" not in err, err
        # Each record once, whole on its own line, exactly as it must be published.
        assert published(out) == expected, out
        assert "…" not in out and "mail.shop.test" not in out
    code, out, _ = narrow
    table_lines = out[:out.index("\nPublish (")].splitlines()
    assert max(len(line) for line in table_lines) <= 80
    # The tables refer to the records they could not show whole, by their number.
    assert "publish: record 3, printed whole below" in out
    assert "publish: record 4, printed whole below" in out
    assert not any('IN TXT "v=spf1' in line for line in table_lines)  # not cut in a cell
    # A file is not cut at 80 columns: each finding's sentence stays on one line.
    code, out, _ = to_file
    assert ("your SPF does not authorise smtp.sendgrid.net: shop.test's record has no "
            "include:sendgrid.net (SendGrid sends from its own servers, not from the address "
            "you connect to)") in out
    assert f"publish: {SHOP_SPF}" in out
    assert re.search(r"problems found: \d+ ok, \d+ info, \d+ warnings, \d+ failures\n\Z", out)


# -- one SPF record per name ---------------------------------------------------------------------
def test_one_spf_record_for_every_connection(tmp_path: Path) -> None:
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "shop.test") + relay("shop.test"))
    with dns_server(SHOP_ZONE) as dns:
        found = findings(inst, dns.address, [])
    sg = find(found, "connection sg", "spf.sender")
    rl = find(found, "connection relay", "spf.sender")
    assert sg.status == rl.status == "fail"
    assert sg.record is not None and rl.record is not None
    assert sg.record.zone() == rl.record.zone() == SHOP_SPF
    # The record each connection alone would have had is never advised.
    assert spf_records(found, "shop.test") == {
        "v=spf1 ip4:192.0.2.0/24 include:sendgrid.net ip4:127.0.0.1 -all"}
    assert sg.fix == ("add include:sendgrid.net to the record (before the all); the record "
                      "shown also has what connection relay needs: shop.test must publish "
                      "exactly one SPF record")
    assert rl.fix is not None and rl.fix.endswith(
        "the record shown also has what connection sg needs: shop.test must publish exactly "
        "one SPF record")


def test_no_spf_record_gets_one_record_with_every_need(tmp_path: Path) -> None:
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "bare.test") + relay("bare.test"))
    zone = "bare.test. IN MX 10 mx.bare.test.\nmx.bare.test. IN A 192.0.2.25\n" \
        'sendgrid.net. IN TXT "v=spf1 ip4:167.89.0.0/17 -all"\n'
    with dns_server(zone) as dns:
        found = findings(inst, dns.address, [])
    mine = find(found, "bare.test", "spf")
    assert mine.status == "fail" and mine.record is not None
    assert mine.record.value == "v=spf1 include:sendgrid.net ip4:127.0.0.1 ~all"
    assert mine.fix is not None and mine.fix.endswith(
        "(this one has what connections relay, sg need)")
    assert spf_records(found, "bare.test") == {mine.record.value}  # not "v=spf1 mx ~all"
    assert find(found, "connection sg", "spf.sender").summary == \
        "bare.test has no SPF record, so nothing authorises smtp.sendgrid.net"


def test_two_spf_records_are_an_error_and_merged(tmp_path: Path) -> None:
    inst = instance(tmp_path, relay("two.test"))
    zone = """
two.test.        IN MX 10 mx.two.test.
mx.two.test.     IN A 192.0.2.25
two.test.        IN TXT "v=spf1 include:_spf.two.test ~all"
two.test.        IN TXT "v=spf1 ip4:192.0.2.0/24 mx -all"
_spf.two.test.   IN TXT "v=spf1 ip4:198.51.100.0/24 -all"
"""
    with dns_server(zone) as dns:
        found = findings(inst, dns.address, [])
    mine = find(found, "two.test", "spf")
    assert mine.status == "fail"
    assert mine.summary == (
        "two.test publishes 2 SPF records: two SPF records on one name are themselves an "
        "error, receivers return permerror and SPF fails for all its mail (RFC 7208 3.2): "
        "v=spf1 include:_spf.two.test ~all | v=spf1 ip4:192.0.2.0/24 mx -all")
    merged = "v=spf1 include:_spf.two.test ip4:192.0.2.0/24 mx ip4:127.0.0.1 ~all"
    assert mine.record is not None and mine.record.value == merged
    sender = find(found, "connection relay", "spf.sender")
    assert sender.summary == ("two.test publishes 2 SPF records, itself an error (permerror, "
                              "RFC 7208 3.2): nothing authorises 127.0.0.1")
    assert sender.record is not None and sender.record.value == merged
    assert spf_records(found, "two.test") == {merged}


def test_merged_record_over_the_lookup_limit_says_so(tmp_path: Path) -> None:
    incs = " ".join(f"include:i{i}.full.test" for i in range(10))
    zone = f"full.test. IN MX 10 mx.full.test.\nmx.full.test. IN A 192.0.2.1\n" \
        f"full.test. IN TXT {txt('v=spf1 ' + incs + ' -all')}\n" \
        'sendgrid.net. IN TXT "v=spf1 ip4:167.89.0.0/17 -all"\n' + "\n".join(
            f'i{i}.full.test. IN TXT "v=spf1 ip4:10.0.{i}.0/24 -all"' for i in range(10))
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "full.test"))
    with dns_server(zone) as dns:
        found = findings(inst, dns.address, [])
    assert find(found, "full.test", "spf").status == "ok"  # 10 lookups: at the limit
    sg = find(found, "connection sg", "spf.sender")
    assert sg.record is not None and sg.record.value == f"v=spf1 {incs} include:sendgrid.net -all"
    assert sg.fix is not None and "this record needs 11 DNS lookups, more than 10: receivers " \
        "would treat it as broken" in sg.fix


# -- MX ------------------------------------------------------------------------------------------
def test_missing_mx_names_a_host_that_exists(tmp_path: Path) -> None:
    zone = """
nomx.test.     IN A 192.0.2.1
nomx.test.     IN TXT "v=spf1 -all"
gone.test.     IN TXT "v=spf1 -all"
"""
    with dns_server(zone) as dns:
        found = findings(instance(tmp_path, ""), dns.address, ["nomx.test", "gone.test"])
    a = find(found, "nomx.test", "mx")
    assert a.record is not None and a.record.zone() == "nomx.test. IN MX 10 nomx.test."
    g = find(found, "gone.test", "mx")
    assert g.status == "fail" and g.record is None  # nothing exists to name exactly
    assert g.fix == ("publish an MX record for gone.test: gone.test. IN MX 10 <your mail "
                     "server>. (a placeholder: put the host name your mail provider gives)")
    assert not any("mail.nomx.test" in str(f.to_dict()) or "mail.gone.test" in str(f.to_dict())
                   for f in found)


@pytest.fixture(scope="module")
def masq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dnsmasq(tmp_path_factory.mktemp("dnspeers")) as server:
        yield server


def test_missing_mx_against_dnsmasq(tmp_path: Path, masq: Dnsmasq) -> None:
    found = findings(instance(tmp_path, ""), masq.address, ["nomx.test"])
    a = find(found, "nomx.test", "mx")
    assert a.status == "warn" and "goes to its A/AAAA address (127.0.0.1)" in a.summary
    assert a.record is not None and a.record.zone() == "nomx.test. IN MX 10 nomx.test."


# -- DKIM ----------------------------------------------------------------------------------------
def test_dkim_advice_uses_the_selector_a_connection_signs_with(tmp_path: Path) -> None:
    inst = instance(tmp_path, SENDGRID.replace("{domain}", "shop.test")
                         + relay("shop.test", extra=signing("shop.test", "pr1")))
    key = dkim.keygen(inst.secrets.get, inst.secrets.set, "shop.test", "pr1")
    zone = SHOP_ZONE + '_dmarc.shop.test. IN TXT "v=DMARC1; p=reject"\n'
    with dns_server(zone) as dns:
        found = findings(inst, dns.address, [])
    table = 'dkim = { domain = "shop.test", selector = "pr1" }'
    domain = find(found, "shop.test", "dkim")
    assert domain.fix == (
        "connection relay signs with selector pr1: publish its key (postroom dkim show "
        f"--domain shop.test --selector pr1 prints the record); add {table} to connection sg "
        "too")
    sg = find(found, "connection sg", "dkim.sender")
    assert sg.fix == f"let Postroom sign as connection relay already does: add {table} to " \
        "connection sg"
    assert f"sign with DKIM for shop.test (let Postroom sign as connection relay already " \
        f"does: add {table} to connection sg)" in (find(found, "connection sg",
                                                       "dmarc.sender").fix or "")
    unpublished = find(found, "connection relay", "dkim.sender")
    assert unpublished.record is not None and unpublished.record.value == key.record
    assert not any("--selector postroom" in (f.fix or "") or 'selector = "postroom"'
                   in (f.fix or "") for f in found)


def test_dkim_keygen_names_the_connection(tmp_path: Path) -> None:
    inst = instance(tmp_path, relay("shop.test") + relay("shop.test", "signer",
                                                                signing("shop.test", "old"))
                         + relay("else.test", "other"))
    inst.close()
    cfg = tmp_path / "postroom.toml"
    code, out, err = postroom(cfg, "dkim", "keygen", "--domain", "shop.test", "--selector",
                              "s2026", columns=None)
    assert code == 0, err
    assert ('Then sign with it: add  dkim = { domain = "shop.test", selector = "s2026" }  to '
            "connections relay, signer (connection signer signs with another selector today: "
            "switch once this record is published), and check with `postroom doctor --domain "
            "shop.test`.") in out
    assert "[]" not in out and not re.search(r"\bother\b", out)  # other sends for else.test
    code, out, _ = postroom(cfg, "dkim", "keygen", "--domain", "shop.test", "--selector", "old",
                            columns=None)
    assert code == 0 and ("connection signer already signs with it: publish the record, and "
                          "check with `postroom doctor --domain shop.test`.") in out
    code, out, _ = postroom(cfg, "dkim", "keygen", "--domain", "nobody.test", "--selector",
                            "s1", columns=None)
    assert code == 0 and ('add  dkim = { domain = "nobody.test", selector = "s1" }  to the '
                          "[[connections]] entry that sends mail From nobody.test") in out
