"""`postroom wizard --yes` against sources an attacker controls (issue 11, point 10).

Whoever is on the network path can forge a plain-HTTP autoconfig document, turn an HTTPS
fetch into plain HTTP with a redirect, or stand up a server whose trusted certificate is
for a name of their own; an autoconfig document can name OAuth endpoints that would receive
the user's sign-in and the app's client secret; an OAuth discovery URL could be file: or
ftp:. Each test shows (a) the refusal, with a message that says why and how to go on, and
(b) that the legitimate way still works in the same setting.

The internet is played by tests/dns_helpers.py (a dnslib server, and an HTTP proxy serving
the autoconfig documents over HTTP and HTTPS with a test CA); the SMTP servers are the real
Postfix peer or local aiosmtpd servers with certificates from a test CA (tests/diag_helpers).
Everything listens on 127.0.0.1 on ports the OS picks; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diag_helpers import ProviderHandler, make_ca, make_cert, provider, pty_run, server_context
from dns_helpers import Web, dns_server, web

from postroom.diagnostics import autoconfig, discover
from postroom.diagnostics.dns import Resolver
from postroom.exceptions import ConfigError
from postroom.oauth import providers as oauth_providers

USER = "testuser@example.test"
DOMAIN = "example.test"
BASE_ZONE = """
example.test.        IN MX 10 mail.example.test.
mail.example.test.   IN A 127.0.0.1
"""
AC_HTTPS = "https://autoconfig.example.test/mail/config-v1.1.xml"
AC_HTTP = "http://autoconfig.example.test/mail/config-v1.1.xml"
RUN_TIMEOUT = 120  # seconds for one wizard run


def ispdb(port: int, sock: str = "STARTTLS", host: str = "mail.%EMAILDOMAIN%",
          oauth: str = "") -> str:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<clientConfig version="1.1">
  <emailProvider id="example.test">
    <domain>example.test</domain>
    <outgoingServer type="smtp">
      <hostname>{host}</hostname><port>{port}</port><socketType>{sock}</socketType>
      <username>%EMAILADDRESS%</username><authentication>password-cleartext</authentication>
    </outgoingServer>
  </emailProvider>{oauth}
</clientConfig>"""


def oauth_block(auth_url: str, token_url: str) -> str:
    return (f"<oAuth2><issuer>example.test</issuer><scope>smtp</scope>"
            f"<authURL>{auth_url}</authURL><tokenURL>{token_url}</tokenURL></oAuth2>")


def _env(w: Web, extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("POSTROOM_") and k.lower() not in ("http_proxy", "https_proxy")}
    return {**base, **w.env, "COLUMNS": "200", **(extra or {})}


def _argv(cfg: Path, dns: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "postroom.cli", "wizard", USER, "--dns-server", dns,
            "--config", str(cfg), "--timeout", "15", *args]


def run_wizard(cfg: Path, w: Web, dns: str, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(cfg, dns, *args), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=_env(w, env), stdin=subprocess.DEVNULL)


def _saved(cfg: Path) -> dict[str, Any]:
    return dict(tomllib.loads(cfg.read_text())["connections"][0])


# -- 1. plain-HTTP autoconfig ------------------------------------------------------------------
@pytest.mark.peers
def test_plain_http_autoconfig_is_refused_unattended(tmp_path: Path, peers: Any) -> None:
    docs = {AC_HTTP: (200, ispdb(peers.submission_port))}
    cfg = tmp_path / "postroom.toml"
    pw = {"WIZ_PW": peers.users[USER]}
    with dns_server(BASE_ZONE) as dns, \
            web(tmp_path, docs, deny_connect={"autoconfig.example.test", DOMAIN}) as w:
        refused = run_wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file",
                             peers.ca_file, "--password-env", "WIZ_PW", "--no-test", env=pw)
        human = run_wizard(cfg, w, dns.address, "--yes", "--ca-file", peers.ca_file,
                           "--password-env", "WIZ_PW", "--no-test", env=pw)
        assert not cfg.exists()
        # (b) the two ways on that the refusal names: the user names the server...
        named = run_wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file", peers.ca_file,
                           "--server", f"mail.example.test:{peers.submission_port}",
                           "--password-env", "WIZ_PW", "--no-test", "--name", "named", env=pw)
        # ... or confirms on a terminal, after seeing who vouches for it.
        code, screen = pty_run(
            _argv(cfg, dns.address, "--ca-file", peers.ca_file, "--no-test", "--name", "asked"),
            _env(w, {"TERM": "dumb"}),
            [(b"Use it anyway?", b"y\r"), (b"Save connection 'asked'", b"y\r"),
             (b"password for testuser@example.test", peers.users[USER].encode() + b"\r")],
            timeout=RUN_TIMEOUT)
    # (a) nothing chosen, nothing written, and the message says why and how to go on
    assert refused.returncode == 1, refused.stdout + refused.stderr
    data = json.loads(refused.stdout)
    assert data["plan"]["chosen"] is None and data["error"]["code"] == "wizard.unauthenticated"
    [option] = data["plan"]["refused"]
    assert option["vouch"] == ["autoconfig_http"] and option["authenticated_by"] is None
    assert option["verdict"] == "ok"  # it works: refused for who named it, not for failing
    expl = "\n".join(data["plan"]["explanation"])
    assert "named only by autoconfig over plain HTTP (anyone on the path can forge it)" in expl
    assert "without --yes" in expl and "--server HOST[:PORT]" in expl
    assert human.returncode == 1 and "Traceback" not in human.stdout + human.stderr
    assert "nobody authenticated" in human.stdout and "--server HOST[:PORT]" in human.stdout
    assert named.returncode == 0, named.stdout + named.stderr
    chosen = json.loads(named.stdout)["plan"]["chosen"]
    assert chosen["vouch"] == ["user"] and chosen["authenticated_by"] == "--server (you)"
    assert code == 0, screen
    # the table says who vouches (a narrow terminal wraps the cell), then the question
    assert "│ nobody" in screen and "check mail.example.test:" in screen
    assert "named only by autoconfig over plain HTTP" in screen
    assert "login works" in screen
    assert [c["name"] for c in tomllib.loads(cfg.read_text())["connections"]] == [
        "named", "asked"]


# -- 2. an HTTPS document redirected to plain HTTP -------------------------------------------------
@pytest.mark.peers
def test_https_redirected_to_http_is_not_authenticated(tmp_path: Path, peers: Any) -> None:
    moved_http = "http://autoconfig.example.test/moved/config-v1.1.xml"
    moved_https = "https://example.test/moved/config-v1.1.xml"
    pw = {"WIZ_PW": peers.users[USER]}
    downgrade = {AC_HTTPS: (302, moved_http), moved_http: (200, ispdb(peers.submission_port))}
    upgrade_only = {AC_HTTPS: (302, moved_https), moved_https: (200, ispdb(peers.submission_port))}
    with dns_server(BASE_ZONE) as dns:
        with web(tmp_path / "down", downgrade, deny_connect={DOMAIN}) as w:
            res = run_wizard(tmp_path / "a.toml", w, dns.address, "--yes", "--json",
                             "--ca-file", peers.ca_file, "--password-env", "WIZ_PW",
                             "--no-test", env=pw)
            fetched = w.requests
        with web(tmp_path / "up", upgrade_only) as w:
            ok = run_wizard(tmp_path / "b.toml", w, dns.address, "--yes", "--json",
                            "--ca-file", peers.ca_file, "--password-env", "WIZ_PW",
                            "--no-test", env=pw)
    # (a) the document was fetched through the redirect, and counted as plain HTTP
    assert f"GET {moved_http}" in fetched
    assert res.returncode == 1, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["plan"]["chosen"] is None
    log = data["plan"]["discovery"]["log"]
    assert any(line.startswith(f"autoconfig {AC_HTTPS}") and "redirected from HTTPS to plain "
               f"HTTP ({moved_http}): unauthenticated" in line for line in log), log
    assert data["plan"]["refused"][0]["vouch"] == ["autoconfig_http"]
    assert not (tmp_path / "a.toml").exists()
    # (b) an HTTPS redirect to another HTTPS URL stays authenticated, and is used
    assert ok.returncode == 0, ok.stdout + ok.stderr
    chosen = json.loads(ok.stdout)["plan"]["chosen"]
    assert chosen["vouch"] == ["autoconfig_https"] and chosen["port"] == peers.submission_port
    assert _saved(tmp_path / "b.toml")["port"] == peers.submission_port


def test_redirect_chain_is_recorded() -> None:
    doc = autoconfig.parse(ispdb(587), USER, AC_HTTPS)
    assert doc.secure and doc.insecure_reason is None
    doc.chain = (AC_HTTPS, "https://example.test/b.xml")
    assert doc.secure
    doc.chain = (AC_HTTPS, "HTTP://example.test/b.xml")
    assert not doc.secure and "redirected from HTTPS to plain HTTP" in str(doc.insecure_reason)
    assert autoconfig.parse(ispdb(587), USER, AC_HTTP).insecure_reason == "plain HTTP"


# -- 3. a certificate's own name ---------------------------------------------------------------
@contextlib.contextmanager
def smtp_with_cert(tmp: Path, ca: Any, name: str) -> Iterator[int]:
    folder = tmp / name
    folder.mkdir()
    cert, key = make_cert(ca, folder, [name])
    with provider(ProviderHandler(), tls=server_context(cert, key)) as port:
        yield port


def srv_zone(port: int) -> str:
    return BASE_ZONE + f"_submission._tcp.example.test. IN SRV 0 1 {port} mail.example.test.\n"


def test_certificate_name_is_not_adopted(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    pw = {"WIZ_PW": "anything"}  # the test server takes any login
    with smtp_with_cert(tmp_path, ca, "other.test") as wrong, \
            smtp_with_cert(tmp_path, ca, "mail.example.test") as right, \
            web(tmp_path, {}, deny_connect={"autoconfig.example.test", DOMAIN}) as w:
        with dns_server(srv_zone(wrong)) as dns:
            res = run_wizard(tmp_path / "a.toml", w, dns.address, "--yes", "--json",
                             "--ca-file", str(ca.path), "--password-env", "WIZ_PW",
                             "--no-test", env=pw)
            argv = _argv(tmp_path / "c.toml", dns.address, "--ca-file", str(ca.path),
                         "--no-test")
            code, screen = pty_run(
                argv, _env(w, {"TERM": "dumb"}),
                [(b"Use it anyway?", b"y\r"), (b"Save connection", b"y\r"),
                 (b"password for", b"anything\r")], timeout=RUN_TIMEOUT)
        with dns_server(srv_zone(right)) as dns:
            ok = run_wizard(tmp_path / "b.toml", w, dns.address, "--yes", "--json",
                            "--ca-file", str(ca.path), "--password-env", "WIZ_PW",
                            "--no-test", env=pw)
    # (a) a trusted certificate for another name: refused unattended, and why
    assert res.returncode == 1, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["plan"]["chosen"] is None
    [refused] = data["plan"]["refused"]
    assert refused["port"] == wrong and refused["verdict"] == "certificate"
    assert refused["authenticated_by"] == "SRV _submission._tcp.example.test"  # in-domain
    expl = "\n".join(data["plan"]["explanation"])
    assert "the certificate of mail.example.test is issued for other.test" in expl
    assert not (tmp_path / "a.toml").exists()
    # on a terminal the user is asked, and only a yes writes the certificate's name
    assert code == 0, screen
    assert "issued for other.test" in screen and "login works" in screen
    assert _saved(tmp_path / "c.toml")["tls_server_name"] == "other.test"
    # (b) the certificate that names the server: chosen unattended, verified as its own name
    assert ok.returncode == 0, ok.stdout + ok.stderr
    conn = _saved(tmp_path / "b.toml")
    assert conn["port"] == right and conn["tls_server_name"] == "mail.example.test"


# -- 4. OAuth endpoints from autoconfig ------------------------------------------------------------
def _discover_with(tmp: Path, monkeypatch: pytest.MonkeyPatch, docs: dict[str, tuple[int, str]],
                   zone: str = BASE_ZONE) -> discover.Discovery:
    with dns_server(zone) as dns, web(tmp, docs, deny_connect={DOMAIN}) as w:
        for k, v in w.env.items():
            monkeypatch.setenv(k, v)
        return discover.discover(USER, Resolver(dns.address), timeout=10)


def test_oauth_urls_only_from_an_authenticated_document(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    good = oauth_block("https://login.example.test/authorize", "https://login.example.test/token")
    cases = {
        "http-doc": {AC_HTTP: (200, ispdb(587, oauth=good))},
        "plain-url": {AC_HTTPS: (200, ispdb(587, oauth=oauth_block(
            "http://login.evil.test/authorize", "https://login.evil.test/token")))},
        "file-url": {AC_HTTPS: (200, ispdb(587, oauth=oauth_block(
            "https://login.evil.test/authorize", "file:///etc/passwd")))},
        "legit": {AC_HTTPS: (200, ispdb(587, oauth=good))},
    }
    found = {name: _discover_with(tmp_path / name, monkeypatch, docs)
             for name, docs in cases.items()}
    # (a) each hostile block is dropped, and the log says why
    http_doc = found["http-doc"]
    assert http_doc.oauth == {}
    assert any("<oAuth2> block is ignored: the document is unauthenticated (plain HTTP)" in x
               for x in http_doc.log), http_doc.log
    assert any("authURL http://login.evil.test/authorize is plain http to another machine"
               in x for x in found["plain-url"].log), found["plain-url"].log
    assert found["plain-url"].oauth == {} and found["file-url"].oauth == {}
    assert any("tokenURL 'file:///etc/passwd' is not an https URL" in x
               for x in found["file-url"].log), found["file-url"].log
    # (b) an HTTPS document with https endpoints is still taken
    assert found["legit"].oauth["tokenURL"] == "https://login.example.test/token"


@pytest.mark.peers
def test_oauth_table_is_not_written_from_plain_http(tmp_path: Path, peers: Any) -> None:
    evil = oauth_block("https://login.evil.test/authorize", "https://login.evil.test/token")
    docs = {AC_HTTP: (200, ispdb(peers.smtps_port, "SSL", oauth=evil))}
    cfg = tmp_path / "postroom.toml"
    with dns_server(srv_zone(peers.submission_port)) as dns, \
            web(tmp_path, docs, deny_connect={"autoconfig.example.test", DOMAIN}) as w:
        res = run_wizard(cfg, w, dns.address, "--yes", "--json", "--ca-file", peers.ca_file,
                         "--oauth", "--client-id", "app", "--password-env", "WIZ_PW",
                         "--no-test", env={"WIZ_PW": peers.users[USER]})
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    # (a) the plain-HTTP document's server and its OAuth endpoints are both refused ...
    assert data["plan"]["oauth_possible"] is False
    assert [o["port"] for o in data["plan"]["refused"]] == [peers.smtps_port]
    assert "evil" not in cfg.read_text()
    # (b) ... while the SRV-named server in the domain is set up with a password
    conn = _saved(cfg)
    assert conn["port"] == peers.submission_port and "oauth" not in conn
    assert data["login"] == "ok"


# -- 5. OAuth discovery URLs -------------------------------------------------------------------
@contextlib.contextmanager
def http_site(routes: dict[str, tuple[int, dict[str, str], bytes]]) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1: path -> (status, headers, body). Yields its base."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = routes.get(self.path, (404, {}, b"no"))
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def _doc(base: str, token: str | None = None) -> bytes:
    return json.dumps({"issuer": base, "authorization_endpoint": f"{base}/authorize",
                       "token_endpoint": token or f"{base}/token"}).encode()


def test_oauth_discover_opens_only_https(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"token_endpoint": "https://stolen.example/token"}')
    for url, why in ((secret.as_uri(), "not an https URL (scheme 'file')"),
                     ("ftp://127.0.0.1/metadata", "not an https URL (scheme 'ftp')"),
                     ("data:application/json,{}", "not an https URL (scheme 'data')"),
                     ("http://login.example.com/.well-known/openid-configuration",
                      "plain http to another machine"),
                     ("https://[::1:99999/x", "not a valid URL")):
        with pytest.raises(ConfigError, match=r"must be https|not a valid URL") as err:
            oauth_providers.discover(url, timeout=5)
        assert why in err.value.message and "authorize_url and token_url" in err.value.message
        assert err.value.code == "config.oauth.discovery"
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    with http_site(routes) as base:
        routes.update({
            "/to-file": (302, {"Location": secret.as_uri()}, b""),
            "/to-remote-http": (302, {"Location": "http://login.example.com/meta"}, b""),
            "/evil-endpoint": (200, {}, _doc(base, "http://login.example.com/token")),
            "/huge": (200, {}, b" " * (oauth_providers.MAX_DISCOVERY_BYTES + 10)),
            "/good": (200, {}, _doc(base)),
            "/moved": (302, {"Location": "/good"}, b""),
        })
        # (a) a redirect off the rule, an endpoint off the rule, a document too large
        for path, why in (("/to-file", "redirects: 'file:"),
                          ("/to-remote-http", "redirects: http://login.example.com/meta is "
                                              "plain http to another machine"),
                          ("/evil-endpoint", "token_endpoint: http://login.example.com/token"),
                          ("/huge", "larger than 1024 KiB")):
            with pytest.raises(ConfigError) as err:
                oauth_providers.discover(base + path, timeout=5)
            assert why in err.value.message, err.value.message
        # (b) loopback http (a local identity provider), and a redirect within the rule
        assert oauth_providers.discover(base + "/good", timeout=5)["token_url"] == \
            f"{base}/token"
        assert oauth_providers.discover(base + "/moved", timeout=5)["authorize_url"] == \
            f"{base}/authorize"
    assert oauth_providers.endpoint_url_problem("https://login.example.com/x") is None
    assert oauth_providers.endpoint_url_problem("http://localhost:9000/o/token/") is None
    assert oauth_providers.endpoint_url_problem("http://[::1]:9000/o/token/") is None
    assert oauth_providers.endpoint_url_problem("https:///nohost") is not None


def test_server_argument_is_checked(tmp_path: Path) -> None:
    with web(tmp_path, {}) as w:
        bad = run_wizard(tmp_path / "x.toml", w, "127.0.0.1:9", "--yes",
                         "--server", "smtp.example.com:99999")
    assert bad.returncode == 2 and "--server 'smtp.example.com:99999'" in bad.stderr
    assert "HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
