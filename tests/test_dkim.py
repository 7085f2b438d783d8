"""DKIM: `postroom dkim keygen|show|list`, signing at delivery time, and signatures verified
by dkimpy against the key published in a DNS server on loopback (dnslib, tests/dns_helpers.py;
and the tests/peers/dns.sh dnsmasq server), including a message relayed by a real `postroom
serve` to the real Postfix upstream."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from dns_helpers import Dnsmasq, dns_server, dnsmasq, txt
from serve_proc import Postroom

from postroom import dkim
from postroom import settings as settings_mod
from postroom.diagnostics.dns import Resolver
from postroom.envelope import Envelope
from postroom.exceptions import ConfigError
from postroom.message import compose
from postroom.runtime import Instance
from postroom.transports import memory


def dnsfunc(address: str) -> Callable[..., bytes]:
    """dkimpy's DNS hook, answered by the local server through Postroom's resolver."""
    resolver = Resolver(address, timeout=3)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        _, texts = resolver.txt(name.decode().rstrip("."))
        return texts[0].encode() if texts else b""

    return lookup


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    return subprocess.run([sys.executable, "-m", "postroom.cli", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**env, "COLUMNS": "200"})


def config(tmp_path: Path, connections: str) -> Path:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\n'
                   f"[delivery]\nmin_backoff = 1\nmax_backoff = 2\n{connections}")
    return cfg


MEMORY = """
[[connections]]
name = "mem"
transport = "memory"
dkim = {{ domain = "{domain}", selector = "{selector}"{headers} }}
policy = {{ headers = {{ "X-Campaign" = "spring" }} }}
"""


def test_keygen_show_list_cli(tmp_path: Path) -> None:
    cfg = config(tmp_path, MEMORY.format(domain="shop.test", selector="s1", headers=""))
    res = cli(cfg, "dkim", "keygen", "--domain", "Shop.Test", "--selector", "s1", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["name"] == "s1._domainkey.shop.test" and info["bits"] == 2048
    assert info["value"].startswith("v=DKIM1; k=rsa; p=MII")
    assert len(info["strings"]) == 2 and all(len(s) <= 255 for s in info["strings"])
    assert "".join(info["strings"]) == info["value"]
    assert info["zone"].startswith('s1._domainkey.shop.test. IN TXT ( "v=DKIM1; k=rsa; p=')
    # stored encrypted: no PEM in the database file, nor its base64 body (every PKCS#8 RSA
    # private key starts with these 24 characters; "MII" alone turns up in random
    # ciphertext about once in a hundred runs)
    db = (tmp_path / "data" / "postroom.db").read_bytes()
    assert b"PRIVATE KEY" not in db and b"ADANBgkqhkiG9w0BAQEFAASC" not in db
    again = cli(cfg, "dkim", "keygen", "--domain", "shop.test", "--selector", "s1")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "rotate with a new selector" in again.stderr and "Traceback" not in again.stderr
    shown = cli(cfg, "dkim", "show", "--domain", "shop.test", "--selector", "s1", "--json")
    assert json.loads(shown.stdout)["value"] == info["value"]
    human = cli(cfg, "dkim", "show", "--domain", "shop.test", "--selector", "s1")
    assert "s1._domainkey.shop.test" in human.stdout and 'dkim = { domain = "shop.test"' in \
        human.stdout
    listed = json.loads(cli(cfg, "dkim", "list", "--json").stdout)
    assert listed == [{"domain": "shop.test", "selector": "s1",
                       "name": "s1._domainkey.shop.test", "connections": ["mem"]}]
    for bad, err in ((("--domain", "not a domain", "--selector", "x"), "not a domain name"),
                     (("--domain", "a.test", "--selector", "bad sel"), "--selector"),
                     (("--domain", "a.test", "--selector", "x", "--bits", "512"), "--bits")):
        res = cli(cfg, "dkim", "keygen", *bad)
        assert res.returncode == 2 and err in res.stderr and "Traceback" not in res.stderr
    missing = cli(cfg, "dkim", "show", "--domain", "shop.test", "--selector", "nope")
    assert missing.returncode == 2 and "postroom dkim keygen --domain shop.test" in \
        missing.stderr


def test_settings_validate_the_dkim_table(tmp_path: Path) -> None:
    for table, err in (('{ domain = "shop.test" }', "selector"),
                       ('{ domain = "x y", selector = "s" }', "not a domain name"),
                       ('{ domain = "a.test", selector = "s", headers = ["to"] }',
                        "must include From"),
                       ('{ domain = "a.test", selector = "s", bogus = 1 }', "unknown key")):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f'[[connections]]\nname = "m"\ntransport = "memory"\ndkim = {table}\n')
        with pytest.raises(ConfigError) as info:
            settings_mod.load(cfg, environ={})
        assert err in info.value.message


@pytest.fixture
def signed_instance(tmp_path: Path) -> Iterator[tuple[Instance, dkim.KeyInfo]]:
    memory.reset()
    cfg = config(tmp_path, MEMORY.format(domain="shop.test", selector="pr2026",
                                         headers=', headers = ["From", "To", "Subject", '
                                         '"Date", "Message-ID", "X-Campaign"]'))
    inst = Instance(settings_mod.load(cfg, environ={}))
    key = dkim.keygen(inst.secrets.get, inst.secrets.set, "shop.test", "pr2026")
    yield inst, key
    memory.reset()
    inst.close()


def _deliver(inst: Instance, sender: str = "news@shop.test") -> tuple[str, dict[str, Any]]:
    from postroom import cli as main_cli

    raw = compose(sender=sender, to=["bob@example.org"], subject="Spring sale",
                  text="Hello Bob,\n\nfrom the shop.\n")
    msg_id = inst.queue.enqueue_sync(Envelope(sender, ["bob@example.org"], raw, source="cli"),
                                     hold=60)
    main_cli._deliver_now(inst, msg_id)
    row = inst.queue.log.get(msg_id)
    assert row is not None
    return msg_id, row


def test_delivery_signs_what_is_sent(signed_instance: tuple[Instance, dkim.KeyInfo]) -> None:
    inst, key = signed_instance
    zone = f"pr2026._domainkey.shop.test. IN TXT {txt(key.record)}\n"
    _, row = _deliver(inst)
    assert row["status"] == "sent"
    [env] = memory.outbox("mem")
    assert env.raw.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                              b"d=shop.test;")
    assert b"X-Campaign: spring" in env.raw  # the policy ran first, and its header is signed
    sig = " ".join(env.raw.split(b"\r\n\r\n", 1)[0].decode().split())  # unfolded
    assert "s=pr2026" in sig and "h=from : to : subject : date : message-id : x-campaign" in sig
    assert b"DKIM-Signature" not in (row["raw"] or b"")  # the stored message stays unsigned
    with dns_server(zone) as dns:
        look = dnsfunc(dns.address)
        assert dkimpy.verify(env.raw, dnsfunc=look)
        tampered = env.raw.replace(b"Hello Bob", b"Hello Eve")
        assert not dkimpy.verify(tampered, dnsfunc=look)
    # a second delivery signs afresh (the stored raw is the unsigned original)
    _deliver(inst)
    assert memory.outbox("mem")[1].raw.count(b"DKIM-Signature:") == 1


def test_missing_key_defers_the_message(tmp_path: Path) -> None:
    memory.reset()
    cfg = config(tmp_path, MEMORY.format(domain="shop.test", selector="nokey", headers=""))
    inst = Instance(settings_mod.load(cfg, environ={}))
    _, row = _deliver(inst)
    assert row["status"] == "deferred" and memory.outbox("mem") == []
    [attempt] = row["attempts"]
    assert attempt["error_code"] == "dkim.key_missing"
    assert "postroom dkim keygen --domain shop.test --selector nokey" in row["last_error"]
    inst.close()


# -- against the recipe's dnsmasq ----------------------------------------------------------------
@pytest.fixture(scope="module")
def masq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    with dnsmasq(tmp_path_factory.mktemp("dnspeers")) as server:
        yield server


def test_sign_verifies_against_dnsmasq(masq: Dnsmasq) -> None:
    """dns.sh publishes sel2048 as a multi-string TXT record (too big for one UDP answer
    without EDNS: the resolver falls back to TCP)."""
    pem = masq.key("sel2048").read_text()
    raw = compose(sender="a@example.test", to=["b@example.org"], subject="via dnsmasq",
                  text="body\n")
    cfg = dkim.DkimSettings(domain="example.test", selector="sel2048")
    signed = dkim.sign(raw, cfg, lambda name: pem if name == "dkim:example.test:sel2048"
                       else None)
    assert dkimpy.verify(signed, dnsfunc=dnsfunc(masq.address))
    wrong = dkim.DkimSettings(domain="example.test", selector="sel1")  # the other key
    bad = dkim.sign(raw, wrong, lambda name: pem)
    assert not dkimpy.verify(bad, dnsfunc=dnsfunc(masq.address))


# -- end to end: postroom serve -> Postfix ---------------------------------------------------------
def test_serve_to_postfix_arrives_signed(tmp_path: Path, peers: Any) -> None:
    conn = f"""
[[connections]]
name = "up"
transport = "smtp"
host = "127.0.0.1"
port = {peers.plain_port}
security = "none"
connect_timeout = 5
dkim = {{ domain = "example.test", selector = "e2e" }}
"""
    pr = Postroom(tmp_path / "pr", connections=conn)
    res = pr.cli("dkim", "keygen", "--domain", "example.test", "--selector", "e2e", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)["value"]
    subject = f"signed {uuid.uuid4().hex[:8]}"
    with dns_server(f"e2e._domainkey.example.test. IN TXT {txt(record)}\n") as dns, pr:
        with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=10) as s:
            s.sendmail("shop@example.test", ["alice@example.test"],
                       compose(sender="shop@example.test", to=["alice@example.test"],
                               subject=subject, text="Signed by Postroom.\n"))
        msg = peers.wait_for("alice@example.test", subject, timeout=30)
        t0 = time.monotonic()
        assert msg.raw.count(b"DKIM-Signature:") == 1
        assert dkimpy.verify(msg.raw, dnsfunc=dnsfunc(dns.address))
        assert time.monotonic() - t0 < 10
