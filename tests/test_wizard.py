"""`postroom wizard` end to end, run non-interactively as a script would: a test domain
whose SRV records or autoconfig documents (served through a local HTTP proxy standing in for
the web, tests/dns_helpers.py) point at the real Postfix upstream, DNS from a dnslib server
on loopback; the wizard probes, ranks, checks the login, stores the password encrypted,
appends the connection to postroom.toml and delivers a test message. Plus the sources on
their own (the provider table, MX mapping, ISPDB parsing) and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from diag_helpers import pty_run
from dns_helpers import Web, dns_server, web

from postroom import configedit
from postroom.diagnostics import autoconfig, discover, providers
from postroom.diagnostics.dns import Resolver
from postroom.exceptions import ConfigError

USER = "testuser@example.test"
BASE_ZONE = """
example.test.        IN MX 10 mail.example.test.
mail.example.test.   IN A 127.0.0.1
"""
SRV_ZONE = BASE_ZONE + """
_submission._tcp.example.test.  IN SRV 0 1 {port} mail.example.test.
_submissions._tcp.example.test. IN SRV 0 0 0 .
"""
AC_HTTPS = "https://autoconfig.example.test/mail/config-v1.1.xml"
AC_WELL_KNOWN = "https://example.test/.well-known/autoconfig/mail/config-v1.1.xml"
AC_HTTP = "http://autoconfig.example.test/mail/config-v1.1.xml"


def ispdb(*servers: tuple[int, str], auth: str = "password-cleartext", oauth: str = "") -> str:
    outs = "".join(f"""
    <outgoingServer type="smtp">
      <hostname>mail.%EMAILDOMAIN%</hostname>
      <port>{port}</port>
      <socketType>{sock}</socketType>
      <username>%EMAILADDRESS%</username>
      <authentication>{auth}</authentication>
    </outgoingServer>""" for port, sock in servers)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<clientConfig version="1.1">
  <emailProvider id="example.test">
    <domain>example.test</domain>
    <displayName>Example Test Mail</displayName>
    <incomingServer type="imap"><hostname>imap.example.test</hostname><port>993</port>
      <socketType>SSL</socketType></incomingServer>{outs}
  </emailProvider>{oauth}
</clientConfig>"""


def wizard(cfg: Path, w: Web, dns: str, *args: str, env: dict[str, str] | None = None,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("POSTROOM_") and k.lower() not in ("http_proxy", "https_proxy")}
    return subprocess.run(
        [sys.executable, "-m", "postroom.cli", "wizard", USER, "--dns-server", dns,
         "--config", str(cfg), "--timeout", "15", *args],
        capture_output=True, text=True, timeout=120, input=input,
        env={**base, **w.env, "COLUMNS": "200", **(env or {})})


def _chosen(data: dict[str, Any]) -> dict[str, Any]:
    chosen = data["plan"]["chosen"]
    assert chosen is not None, data["plan"]["explanation"]
    return dict(chosen)


# -- end to end --------------------------------------------------------------------------------
def test_srv_end_to_end_delivers_a_test_message(tmp_path: Path, peers: Any) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('# my own settings, kept as they are\n[server]\ndata_dir = "data"\n'
                   'hostname = "postroom.test"\n')
    before = cfg.read_text()
    with dns_server(SRV_ZONE.format(port=peers.submission_port)) as dns, \
            web(tmp_path, {}, deny_connect={"autoconfig.example.test", "example.test"}) as w:
        res = wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file", peers.ca_file,
                     "--password-env", "WIZ_PW", "--test-to", "alice@example.test",
                     env={"WIZ_PW": peers.users[USER]})
        again = wizard(cfg, w, dns.address, "--yes", "--ca-file", peers.ca_file,
                       "--password-env", "WIZ_PW", env={"WIZ_PW": peers.users[USER]})
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    chosen = _chosen(data)
    assert (chosen["host"], chosen["port"], chosen["security"]) == (
        "mail.example.test", peers.submission_port, "starttls")
    assert chosen["sources"] == ["SRV _submission._tcp.example.test"]
    assert chosen["verdict"] == "ok" and {"PLAIN", "LOGIN"} <= set(chosen["auth"])
    log = data["plan"]["discovery"]["log"]
    assert "SRV _submissions._tcp.example.test: '.' (the domain says: not offered)" in log
    assert f"SRV _submission._tcp.example.test: mail.example.test:{peers.submission_port}" in log
    assert any(line.startswith(f"autoconfig {AC_HTTP}?emailaddress=") and "HTTP 404" in line
               for line in log), log
    # every autoconfig URL was tried, in Thunderbird's order of preference
    assert sorted(w.requests[:3]) == sorted([
        "CONNECT autoconfig.example.test:443", "CONNECT example.test:443",
        f"GET {AC_HTTP}?emailaddress=testuser%40example.test"])
    assert data["plan"]["explanation"][0].startswith(
        f"use mail.example.test:{peers.submission_port} STARTTLS (found by SRV")
    # the file: the user's text untouched, the entry appended, no password in it
    text = cfg.read_text()
    assert text.startswith(before) and "# Added by `postroom wizard testuser@example.test`" \
        in text
    assert peers.users[USER] not in text
    conn = tomllib.loads(text)["connections"][0]
    assert conn == {"name": "example", "transport": "smtp", "host": "127.0.0.1",
                    "port": peers.submission_port, "security": "starttls",
                    "tls_server_name": "mail.example.test",
                    "ca_file": str(Path(peers.ca_file).resolve()), "username": USER}
    assert data["password_stored"] is True and data["login"] == "ok"
    db = (tmp_path / "data" / "postroom.db").read_bytes()
    assert peers.users[USER].encode() not in db  # encrypted at rest
    test = data["test"]
    assert test["status"] == "sent" and test["attempts"][0]["outcome"] == "sent"
    assert "C: STARTTLS" in test["attempts"][0]["transcript"]
    msg = peers.wait_for("alice@example.test", "Postroom test via example", timeout=30)
    assert "set up by `postroom wizard`" in msg.get_content()
    # a second run refuses the name in use, and writes nothing
    assert again.returncode == 2, again.stdout + again.stderr
    assert "already has a connection named 'example'" in again.stderr
    assert "--name" in again.stderr and "Traceback" not in again.stderr
    assert cfg.read_text() == text


def test_autoconfig_https_document(tmp_path: Path, peers: Any) -> None:
    docs = {AC_HTTPS: (200, ispdb((peers.submission_port, "STARTTLS")))}
    cfg = tmp_path / "postroom.toml"
    with dns_server(BASE_ZONE) as dns, web(tmp_path, docs) as w:
        res = wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file", peers.ca_file,
                     "--password-stdin", "--no-test", "--name", "viaauto",
                     input=peers.users[USER] + "\n")
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    chosen = _chosen(data)
    assert chosen["sources"] == [f"autoconfig {AC_HTTPS}"]
    assert chosen["port"] == peers.submission_port and chosen["username"] == USER
    assert "test" not in data and data["login"] == "ok" and data["created_config"] is True
    assert "CONNECT autoconfig.example.test:443" in w.requests
    assert tomllib.loads(cfg.read_text())["connections"][0]["name"] == "viaauto"
    # the MX host was looked up too (no provider behind it), and nothing was guessed
    log = data["plan"]["discovery"]["log"]
    assert "MX example.test: mail.example.test" in log
    assert not any(c["sources"][0].startswith("guess") for c in data["plan"]["options"])


def test_http_fallback_ranks_implicit_tls_first(tmp_path: Path, peers: Any) -> None:
    # Only a plain-HTTP document names the servers: ranked, but --yes chooses none of them
    # (anyone on the path could have written it; tests/test_hostile_wizard.py has more).
    doc = ispdb((peers.plain_port, "plain"), (peers.submission_port, "STARTTLS"),
                (peers.smtps_port, "SSL"))
    cfg = tmp_path / "postroom.toml"
    with dns_server(BASE_ZONE) as dns, \
            web(tmp_path, {AC_HTTP: (200, doc)},
                deny_connect={"autoconfig.example.test", "example.test"}) as w:
        res = wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file", peers.ca_file,
                     "--password-env", "WIZ_PW", "--no-test",
                     env={"WIZ_PW": peers.users[USER]})
    assert res.returncode == 1, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["plan"]["chosen"] is None and data["error"]["code"] == "wizard.unauthenticated"
    ranked = [(o["port"], o["security"]) for o in data["plan"]["options"]]
    assert ranked[0] == (peers.smtps_port, "smtps"), ranked
    options = {o["port"]: o for o in data["plan"]["options"]}
    assert options[peers.submission_port]["verdict"] == "ok"
    assert options[peers.plain_port]["verdict"] == "no_tls"
    expl = "\n".join(data["plan"]["explanation"])
    assert f"mail.example.test:{peers.smtps_port} implicit TLS refused: named only by " \
        "autoconfig over plain HTTP" in expl
    assert "--server HOST[:PORT]" in expl and not cfg.exists()


def test_server_without_auth_needs_no_password(tmp_path: Path, peers: Any) -> None:
    cfg = tmp_path / "postroom.toml"
    with dns_server(SRV_ZONE.format(port=peers.plain_port)) as dns, web(tmp_path, {}) as w:
        res = wizard(cfg, w, dns.address, "--yes", "--json", "--test-to", "bob@example.test")
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert _chosen(data)["verdict"] == "no_tls" and data["password_stored"] is False
    assert "login" not in data  # nothing asked, nothing checked
    assert "no encryption offered" in "\n".join(data["plan"]["explanation"])
    conn = tomllib.loads(cfg.read_text())["connections"][0]
    assert conn["security"] == "none" and "username" not in conn
    assert data["test"]["status"] == "sent"
    peers.wait_for("bob@example.test", "Postroom test via example", timeout=30)


def test_wrong_password_writes_nothing(tmp_path: Path, peers: Any) -> None:
    cfg = tmp_path / "postroom.toml"
    with dns_server(SRV_ZONE.format(port=peers.submission_port)) as dns, \
            web(tmp_path, {}) as w:
        res = wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file", peers.ca_file,
                     "--password-env", "WIZ_PW", env={"WIZ_PW": "wrong"})
        human = wizard(cfg, w, dns.address, "--yes", "--ca-file", peers.ca_file,
                       "--password-env", "WIZ_PW", env={"WIZ_PW": "wrong"})
        nopw = wizard(cfg, w, dns.address, "--yes", "--ca-file", peers.ca_file)
    assert res.returncode == 1
    data = json.loads(res.stdout)
    assert data["login"]["code"].startswith("auth") and "535" in data["login"]["message"]
    assert data["advice"]["fix"]
    assert not cfg.exists()  # nothing written, not even the template
    assert human.returncode == 1 and "login failed" in human.stdout
    assert "why" in human.stdout and "fix" in human.stdout and "nothing written" in human.stdout
    assert nopw.returncode == 1 and "needs a login" in nopw.stderr
    assert "--password-env VAR or --password-stdin" in nopw.stderr


def test_interactive_asks_and_hides_the_password(tmp_path: Path, peers: Any) -> None:
    cfg = tmp_path / "postroom.toml"
    password = peers.users[USER]
    with dns_server(SRV_ZONE.format(port=peers.submission_port)) as dns, \
            web(tmp_path, {}) as w:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env.update(w.env, COLUMNS="160", TERM="dumb")
        code, screen = pty_run(
            [sys.executable, "-m", "postroom.cli", "wizard", USER, "--dns-server",
             dns.address, "--ca-file", peers.ca_file, "--config", str(cfg),
             "--test-to", "alice@example.test", "--timeout", "15"], env,
            [(b"Save connection 'example'", b"y\r"),
             (b"password for testuser@example.test", password.encode() + b"\r")])
    assert code == 0, screen
    assert "login works" in screen and "test message sent" in screen
    assert password not in screen  # hidden input: never echoed
    assert tomllib.loads(cfg.read_text())["connections"][0]["username"] == USER


def test_oauth_connection_points_to_the_login(tmp_path: Path, peers: Any) -> None:
    oauth = """
  <oAuth2>
    <issuer>127.0.0.1</issuer>
    <scope>smtp offline_access</scope>
    <authURL>http://127.0.0.1:9000/o/authorize/</authURL>
    <tokenURL>http://127.0.0.1:9000/o/token/</tokenURL>
  </oAuth2>"""
    doc = ispdb((peers.submission_port, "STARTTLS"), auth="OAuth2", oauth=oauth)
    cfg = tmp_path / "postroom.toml"
    with dns_server(BASE_ZONE) as dns, web(tmp_path, {AC_HTTPS: (200, doc)}) as w:
        res = wizard(cfg, w, dns.address, "--yes", "--ca-file", peers.ca_file, "--oauth",
                     "--client-id", "gateway", "--client-secret-env", "GW_SECRET")
        noid = wizard(tmp_path / "other.toml", w, dns.address, "--yes", "--ca-file",
                      peers.ca_file, "--oauth")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "postroom oauth login example" in res.stdout
    conn = tomllib.loads(cfg.read_text())["connections"][0]
    assert conn["auth"] == "xoauth2" and conn["username"] == USER
    assert conn["oauth"] == {"provider": "generic", "client_id": "gateway",
                             "client_secret_env": "GW_SECRET",
                             "authorize_url": "http://127.0.0.1:9000/o/authorize/",
                             "token_url": "http://127.0.0.1:9000/o/token/",
                             "scopes": ["smtp", "offline_access"]}
    assert noid.returncode == 2 and "--client-id" in noid.stderr


def test_bad_arguments(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    with web(tmp_path, {}) as w:
        bad = subprocess.run([sys.executable, "-m", "postroom.cli", "wizard", "not-an-address",
                              "--yes", "--config", str(cfg)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **w.env})
        dnsbad = wizard(cfg, w, "nonsense", "--yes")
    assert bad.returncode == 1 and "is not an email address" in bad.stderr
    assert dnsbad.returncode == 2 and "--dns-server 'nonsense'" in dnsbad.stderr
    assert "Traceback" not in bad.stderr + dnsbad.stderr


# -- the sources on their own --------------------------------------------------------------------
def test_provider_table_and_mx_mapping(tmp_path: Path) -> None:
    zone = """
shop.test.   IN MX 1 aspmx.l.google.com.
shop.test.   IN MX 5 alt1.aspmx.l.google.com.
corp.test.   IN MX 0 corp-test.mail.protection.outlook.com.
aolish.test. IN MX 1 mx-aol.mail.gm0.yahoodns.net.
"""
    with dns_server(zone) as dns:
        r = Resolver(dns.address)
        gmail = discover.discover("me@gmail.com", r, http=False)
        shop = discover.discover("me@shop.test", r, http=False)
        corp = discover.discover("me@corp.test", r, http=False)
        aol = discover.discover("me@aolish.test", r, http=False)
        nothing = discover.discover("me@nowhere.test", r, http=False)
    assert gmail.provider is not None and gmail.provider.id == "google"
    assert [(c.host, c.port, c.security) for c in gmail.candidates] == [
        ("smtp.gmail.com", 465, "smtps"), ("smtp.gmail.com", 587, "starttls")]
    assert gmail.candidates[0].sources == ["built-in table (Gmail / Google Workspace)"]
    assert shop.provider is not None and shop.provider.id == "google"
    assert shop.candidates[0].sources == [
        "MX aspmx.l.google.com (Gmail / Google Workspace)",
        "MX alt1.aspmx.l.google.com (Gmail / Google Workspace)"]
    assert corp.provider is not None and corp.provider.id == "microsoft365"
    assert corp.candidates[0].host == "smtp.office365.com"
    assert aol.provider is not None and aol.provider.id == "aol"  # the more specific pattern
    assert [c.host for c in nothing.candidates][:2] == ["smtp.nowhere.test", "smtp.nowhere.test"]
    assert all([s.kind for s in c.origins] == [discover.Vouch.GUESS]
               and c.vouched_by("nowhere.test") is None for c in nothing.candidates)
    assert shop.candidates[0].vouched_by("shop.test") is not None  # the table's own servers


def test_providers_table_is_consistent() -> None:
    table = providers.table()
    assert len(table) >= 25
    for p in table:
        for s in p.servers:
            assert s.security in ("smtps", "starttls") and 0 < s.port < 65536, p.id
        if p.oauth:
            from postroom.oauth.providers import PROVIDERS

            assert p.oauth in PROVIDERS, p.id
    assert providers.by_host("smtp.sendgrid.net").spf == ("sendgrid.net",)  # type: ignore[union-attr]
    assert providers.by_host("email-smtp.eu-west-1.amazonaws.com").id == "ses"  # type: ignore[union-attr]
    assert providers.by_transport("gmail").id == "google"  # type: ignore[union-attr]
    assert providers.by_host("127.0.0.1") is None
    assert providers.by_domain("GMail.com").id == "google"  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        providers.load('[[provider]]\nid = "x"\ntitle = "X"\npassword = "maybe"\n')


def test_ispdb_parsing() -> None:
    doc = autoconfig.parse(ispdb((587, "STARTTLS"), (465, "SSL"), (25, "plain")),
                           "bob@example.test", AC_HTTPS)
    assert [(o.host, o.port, o.security, o.username) for o in doc.outgoing] == [
        ("mail.example.test", 587, "starttls", "bob@example.test"),
        ("mail.example.test", 465, "smtps", "bob@example.test"),
        ("mail.example.test", 25, "none", "bob@example.test")]
    assert doc.display_name == "Example Test Mail" and doc.secure
    for bad, err in (("<html/>", "not an autoconfig document"),
                     ("not xml", "not XML"),
                     ('<!DOCTYPE x [<!ENTITY a "b">]><clientConfig/>', "DTD"),
                     ("<clientConfig><emailProvider id='x'/></clientConfig>", "no <outgoing")):
        with pytest.raises(ValueError, match=err):
            autoconfig.parse(bad, "bob@example.test")
    assert autoconfig.urls("Bob@Example.test") == [
        "https://autoconfig.example.test/mail/config-v1.1.xml?emailaddress=Bob%40Example.test",
        "https://example.test/.well-known/autoconfig/mail/config-v1.1.xml",
        "http://autoconfig.example.test/mail/config-v1.1.xml?emailaddress=Bob%40Example.test"]


def test_config_append_never_clobbers(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    original = '[server]\ndata_dir = "d"  # mine\n\n[[routes]]\nchain = ["a"]\n\n' \
        '[[connections]]\nname = "a"\ntransport = "memory"\n'
    cfg.write_text(original)
    configedit.append_connection(cfg, {"name": "b", "transport": "memory",
                                       "policy": {"from": "Shop <s@x.test>"}}, ["why: test"])
    text = cfg.read_text()
    assert text.startswith(original) and "# why: test\n[[connections]]\nname = \"b\"" in text
    assert 'policy = { from = "Shop <s@x.test>" }' in text
    with pytest.raises(ConfigError, match="already has a connection named 'a'"):
        configedit.append_connection(cfg, {"name": "a", "transport": "memory"})
    with pytest.raises(ConfigError, match="not a known transport"):
        configedit.append_connection(cfg, {"name": "c", "transport": "pigeon"})
    assert cfg.read_text() == text
    cfg.write_text("connections = [ { name = 'x' } ]\n")
    with pytest.raises(ConfigError, match="inline array"):
        configedit.append_connection(cfg, {"name": "c", "transport": "memory"})
