"""`postroom probe` and postroom.diagnostics.probe against real endpoints: the Postfix peers
(10025 plain, 10587 STARTTLS + AUTH after TLS, 10465 implicit TLS, 10588 AUTH in plain text),
a closed port, a port that silently drops connections, a listener that never speaks, a
network namespace without a route, a name that does not resolve, a server with an expired
certificate, and the providers' HTTPS endpoints through a local CONNECT proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diag_helpers import (
    HOST,
    ProviderHandler,
    Scripted,
    blackhole,
    closed_port,
    make_ca,
    make_cert,
    provider,
    server_context,
)

from postroom.diagnostics import https as https_mod
from postroom.diagnostics.probe import PortResult, ProbeReport, Verdict, probe_sync
from postroom.diagnostics.tlsinfo import CertInfo, name_matches

CLI_TIMEOUT = 60.0


def probe(*ports: int, **kw: Any) -> ProbeReport:
    kw.setdefault("timeout", 10.0)
    kw.setdefault("https", False)
    kw.setdefault("banner_wait", 1.0)
    return probe_sync(kw.pop("host", HOST), list(ports), **kw)


def port(report: ProbeReport, number: int) -> PortResult:
    return next(p for p in report.ports if p.port == number)


def no_credentials_sent(report: ProbeReport) -> None:
    for p in report.ports:
        for line in p.transcript:
            assert not line.upper().startswith(("C: AUTH", "C: MAIL", "C: RCPT")), line


def run_cli(*args: str, env: dict[str, str] | None = None,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("POSTROOM_") and k.lower() not in ("https_proxy", "no_proxy")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run([*prefix, sys.executable, "-m", "postroom.cli", "probe", *args],
                          env=full_env, capture_output=True, text=True, timeout=CLI_TIMEOUT)


# -- the real Postfix ports ---------------------------------------------------------------------
def test_plain_port_has_no_tls(peers: Any) -> None:
    r = port(probe(peers.plain_port), peers.plain_port)
    assert r.verdict is Verdict.NO_TLS, r.to_dict()
    assert r.tcp == "open" and r.security == "none" and r.tls is None
    assert r.banner is not None and r.banner.startswith("220 ")
    assert r.banner_ms is not None and r.banner_ms < 5000
    assert {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8"} <= set(r.ehlo)
    assert r.ehlo["SIZE"].isdigit() and "STARTTLS" not in r.ehlo
    assert r.auth == [] and r.ehlo_tls is None
    assert "never send a password" in r.summary()


def test_starttls_port_with_auth_after_tls(peers: Any) -> None:
    rep = probe(peers.submission_port, ca_file=Path(peers.ca_file))
    r = port(rep, peers.submission_port)
    assert r.verdict is Verdict.OK, r.to_dict()
    assert r.security == "starttls" and r.expected == "starttls"
    assert "STARTTLS" in r.ehlo and "AUTH" not in r.ehlo  # Postfix smtpd_tls_auth_only
    assert r.ehlo_tls is not None and "STARTTLS" not in r.ehlo_tls
    assert {"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER"} <= set(r.auth)
    assert r.tls is not None and r.tls.version in ("TLSv1.2", "TLSv1.3") and r.tls.cipher
    assert r.tls.trusted and r.tls.name_matches and not r.tls.expired
    cert = r.tls.certificate
    assert cert is not None and "mail.example.test" in cert.dns_names
    assert "127.0.0.1" in cert.ip_addresses and "Peers Test CA" in cert.issuer
    assert r.tls.days_left is not None and r.tls.days_left > 30
    assert rep.recommendation is not None
    assert rep.recommendation.text.startswith(f"use this: {peers.submission_port} STARTTLS, AUTH ")
    assert "PLAIN/LOGIN/CRAM-MD5/XOAUTH2/OAUTHBEARER" in rep.recommendation.text
    assert rep.recommendation.connection == {"host": HOST, "port": peers.submission_port,
                                             "security": "starttls"}
    no_credentials_sent(rep)


def test_implicit_tls_port_found_by_its_silence(peers: Any) -> None:
    t0 = time.monotonic()
    rep = probe(peers.smtps_port, ca_file=Path(peers.ca_file), banner_wait=0.5)
    r = port(rep, peers.smtps_port)
    assert r.verdict is Verdict.OK, r.to_dict()
    assert r.security == "smtps" and r.ehlo == {} and r.ehlo_tls
    assert "PLAIN" in r.auth and r.banner is not None and r.banner.startswith("220")
    assert any("sends no greeting until TLS is up" in n for n in r.notes), r.notes
    assert 0.5 <= time.monotonic() - t0 < 5
    assert rep.recommendation is not None and rep.recommendation.security == "smtps"
    assert "implicit TLS" in rep.recommendation.text


def test_implicit_tls_port_known_by_number_needs_no_wait(peers: Any) -> None:
    rep = probe(peers.smtps_port, ca_file=Path(peers.ca_file), banner_wait=5,
                implicit_tls_ports={peers.smtps_port})
    r = port(rep, peers.smtps_port)
    assert r.verdict is Verdict.OK and r.security == "smtps" and r.notes == []
    assert r.elapsed_ms is not None and r.elapsed_ms < 2000


def test_port_expected_implicit_but_speaking_starttls(peers: Any) -> None:
    # What a TLS client gets on 587: "wrong version number"; the probe says what it is.
    rep = probe(peers.submission_port, ca_file=Path(peers.ca_file),
                implicit_tls_ports={peers.submission_port})
    r = port(rep, peers.submission_port)
    assert r.expected == "smtps" and r.security == "starttls" and r.verdict is Verdict.OK
    assert any("greets in plain text, so it wants STARTTLS" in n for n in r.notes), r.notes
    assert any("WRONG_VERSION_NUMBER" in line for line in r.transcript), r.transcript


def test_port_with_auth_in_plaintext(peers: Any) -> None:
    r = port(probe(peers.legacy_port, ca_file=Path(peers.ca_file)), peers.legacy_port)
    assert r.verdict is Verdict.OK and r.security == "starttls"
    assert "PLAIN" in r.ehlo["AUTH"].split()  # offered before TLS: noted as a risk
    assert any("offers AUTH before TLS" in n for n in r.notes), r.notes


def test_untrusted_certificate_is_explained(peers: Any) -> None:
    # No ca_file: the peers' private CA is not trusted. The facts are still collected.
    rep = probe(peers.submission_port, peers.smtps_port)
    for number in (peers.submission_port, peers.smtps_port):
        r = port(rep, number)
        assert r.verdict is Verdict.CERTIFICATE, r.to_dict()
        assert r.tls is not None and r.tls.trusted is False
        assert r.tls.trust_error == "self-signed certificate in certificate chain"
        assert r.tls.name_matches is True and r.tls.expired is False
        assert r.tls.certificate is not None
        assert r.tls.certificate.common_names == ["mail.example.test"]
        assert "PLAIN" in r.auth  # the EHLO after TLS was read on the unverified session
        assert "not trusted: self-signed certificate in certificate chain" in r.summary()
    assert rep.recommendation is not None
    assert "set ca_file" in rep.recommendation.text
    no_credentials_sent(rep)


def test_certificate_for_another_name(peers: Any) -> None:
    rep = probe(peers.submission_port, ca_file=Path(peers.ca_file),
                server_name="smtp.example.org")
    r = port(rep, peers.submission_port)
    assert r.verdict is Verdict.CERTIFICATE and r.tls is not None
    assert r.tls.trusted is True and r.tls.name_matches is False
    assert "not smtp.example.org" in r.summary()
    assert rep.recommendation is not None
    assert rep.recommendation.connection["tls_server_name"] == "mail.example.test"


def test_expired_certificate(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert, key = make_cert(ca, tmp_path, ["expired.test", HOST], days=(-60, -2))
    with provider(ProviderHandler(), tls=server_context(cert, key)) as number:
        rep = probe(number, ca_file=ca.path)
    r = port(rep, number)
    assert r.verdict is Verdict.CERTIFICATE and r.tls is not None, r.to_dict()
    assert r.tls.expired is True and r.tls.trusted is False
    assert r.tls.trust_error == "certificate has expired"
    assert r.tls.days_left is not None and r.tls.days_left < 0
    assert "expired on" in r.summary()


# -- ports that do not answer as SMTP -----------------------------------------------------------
def test_closed_port_is_refused() -> None:
    number = closed_port()
    r = port(probe(number), number)
    assert r.verdict is Verdict.REFUSED and r.tcp == "refused"
    assert r.elapsed_ms is not None and r.elapsed_ms < 1000


def test_dropped_port_ends_at_the_deadline() -> None:
    with blackhole() as number:
        t0 = time.monotonic()
        rep = probe(number, timeout=2.0)
        took = time.monotonic() - t0
    r = port(rep, number)
    assert r.verdict is Verdict.DROPPED and r.tcp == "dropped", r.to_dict()
    assert 1.9 <= took < 2.8, took
    assert rep.recommendation is None
    assert rep.summary[0].startswith("every SMTP port is silently dropped")


def test_listener_that_never_speaks() -> None:
    with socket.socket() as srv:
        srv.bind((HOST, 0))
        srv.listen(5)  # the kernel completes the handshake; nobody ever answers
        number = int(srv.getsockname()[1])
        r = port(probe(number, timeout=3.0, banner_wait=0.5), number)
    assert r.tcp == "open" and r.verdict is Verdict.NOT_SMTP, r.to_dict()
    assert "no greeting" in (r.error or "")


def test_tls_bytes_instead_of_a_greeting() -> None:
    # A TLS alert record where "220" should be: the port speaks TLS, so the probe goes back
    # with a TLS handshake (which this fake then fails, honestly reported).
    with Scripted(greeting="\x15\x03\x03\x00\x02\x02\x46").running() as srv:
        r = port(probe(srv.port, timeout=3.0), srv.port)
    assert any("sent TLS data instead of a greeting" in n for n in r.notes), r.to_dict()
    assert r.verdict is Verdict.TLS_FAILED and r.security is None


def test_name_that_does_not_resolve() -> None:
    rep = probe(25, 587, host="nonexistent.invalid")
    assert rep.dns_error and "cannot resolve nonexistent.invalid" in rep.dns_error
    assert {p.verdict for p in rep.ports} == {Verdict.DNS}
    assert rep.addresses == [] and rep.recommendation is None
    assert "getent hosts nonexistent.invalid" in rep.summary[0]


def _unshare() -> tuple[str, ...]:
    tool = shutil.which("unshare")
    assert tool, "unshare (util-linux) is needed for the network-namespace test"
    return (tool, "--net")


def test_unreachable_in_a_namespace_without_routes(peers: Any) -> None:
    # A fresh network namespace has only a loopback device, and it is down: every
    # connect() fails at once with ENETUNREACH, as on a machine without a route.
    res = run_cli(HOST, "-p", "25", "-p", "587", "--no-https", "--json", "--timeout", "5",
                  prefix=_unshare())
    assert res.returncode == 1, res.stderr
    data = json.loads(res.stdout)
    assert [p["verdict"] for p in data["ports"]] == ["unreachable", "unreachable"]
    assert data["ports"][0]["error"] == "Network is unreachable"
    assert data["elapsed_ms"] < 2000
    assert data["summary"][0].startswith("this machine has no route to the server")


# -- everything at once, one deadline -------------------------------------------------------------
def test_ports_are_probed_in_parallel_under_one_deadline(peers: Any) -> None:
    closed = closed_port()
    with blackhole() as dropped:
        t0 = time.monotonic()
        rep = probe(peers.plain_port, peers.submission_port, peers.legacy_port, closed, dropped,
                    timeout=3.0, ca_file=Path(peers.ca_file))
        took = time.monotonic() - t0
    assert 2.9 <= took < 3.8, took  # the dropped port takes the whole deadline, no more
    verdicts = {p.port: p.verdict for p in rep.ports}
    assert verdicts == {peers.plain_port: Verdict.NO_TLS, peers.submission_port: Verdict.OK,
                        peers.legacy_port: Verdict.OK, closed: Verdict.REFUSED,
                        dropped: Verdict.DROPPED}
    for number in (peers.plain_port, peers.submission_port, peers.legacy_port):
        assert (port(rep, number).elapsed_ms or 1e9) < 1500  # done long before the deadline
    assert rep.recommendation is not None and rep.recommendation.port in (
        peers.submission_port, peers.legacy_port)
    no_credentials_sent(rep)


# -- the command --------------------------------------------------------------------------------
def test_cli_json(peers: Any) -> None:
    res = run_cli(HOST, "-p", str(peers.submission_port), "-p", str(peers.smtps_port),
                  "--ca-file", peers.ca_file, "--no-https", "--json", "--banner-wait", "0.5")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["host"] == HOST and data["addresses"] == [HOST] and data["https"] is None
    ports = {p["port"]: p for p in data["ports"]}
    sub, smtps = ports[peers.submission_port], ports[peers.smtps_port]
    assert (sub["verdict"], sub["security"]) == ("ok", "starttls")
    assert (smtps["verdict"], smtps["security"]) == ("ok", "smtps")
    assert sub["tls"]["certificate"]["dns_names"] == ["mail.example.test", "localhost"]
    assert sub["tls"]["trusted"] is True and "PLAIN" in sub["auth"]
    assert data["recommendation"]["security"] == "smtps"
    assert data["recommendation"]["text"].startswith(f"use this: {peers.smtps_port} implicit TLS")


def test_cli_table_and_exit_codes(peers: Any) -> None:
    res = run_cli(HOST, "-p", str(peers.submission_port), "--ca-file", peers.ca_file,
                  "--no-https")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for word in ("port", "connect", "greeting", "certificate", "verdict", "STARTTLS TLSv1",
                 "trusted", "mail.example.test", "use this:"):
        assert word in out, out
    with blackhole() as dropped:
        res = run_cli(HOST, "-p", str(dropped), "--timeout", "1", "--no-https")
    assert res.returncode == 1 and "silently dropped" in res.stdout, res.stdout
    bad = run_cli(HOST, "-p", "25", "--ca-file", "/nonexistent/ca.pem")
    assert bad.returncode == 2 and "--ca-file /nonexistent/ca.pem: no such file" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_cli(HOST, "-p", "70000")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# -- HTTPS endpoints, through a proxy -------------------------------------------------------------
class _Proxy:
    """A minimal HTTP CONNECT proxy: records each request and tunnels every CONNECT to one
    local TLS server (standing in for the internet), or refuses the hosts in ``deny``."""

    def __init__(self, upstream: int, deny: set[str]) -> None:
        self.upstream = upstream
        self.deny = deny
        self.requests: list[tuple[str, str | None]] = []  # (target, Proxy-Authorization)
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readline()).decode()
            auth = None
            for _ in range(50):
                line = (await reader.readline()).decode()
                if line in ("\r\n", ""):
                    break
                name, _, value = line.partition(":")
                if name.lower() == "proxy-authorization":
                    auth = value.strip()
            target = request.split()[1]
            self.requests.append((target, auth))
            if target.split(":")[0] in self.deny:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            up_r, up_w = await asyncio.open_connection(HOST, self.upstream)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        except (ConnectionError, IndexError):
            pass
        finally:
            writer.close()


async def _https_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await reader.readline()
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    writer.close()


@contextlib.contextmanager
def _internet(tmp_path: Path, deny: set[str] = frozenset()) -> Iterator[tuple[_Proxy, int, Path]]:
    """A local HTTPS server with a certificate for every provider host (and 127.0.0.1),
    signed by a test CA, behind a CONNECT proxy. Yields (proxy, https port, CA file)."""
    ca = make_ca(tmp_path / "ca")
    names = [e.host for e in https_mod.ENDPOINTS] + [HOST]
    cert, key = make_cert(ca, tmp_path / "ca", names)
    ctx = server_context(cert, key)
    loop = asyncio.new_event_loop()
    proxy = _Proxy(0, set(deny))
    servers: list[Any] = []

    async def start() -> int:
        srv = await asyncio.start_server(_https_server, HOST, 0, ssl=ctx)
        proxy.upstream = int(srv.sockets[0].getsockname()[1])
        psrv = await asyncio.start_server(proxy.handle, HOST, 0)
        proxy.port = int(psrv.sockets[0].getsockname()[1])
        servers.extend([srv, psrv])
        return proxy.upstream

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    https_port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield proxy, https_port, ca.path
    finally:
        async def stop() -> None:
            for s in servers:
                s.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_https_endpoints_through_https_proxy(tmp_path: Path, peers: Any) -> None:
    deny = {"api.sendgrid.com"}
    with _internet(tmp_path, deny) as (proxy, _, ca_file):
        res = run_cli(HOST, "-p", str(peers.plain_port), "--json", env={
            "HTTPS_PROXY": f"http://probe:s3cret@{HOST}:{proxy.port}",
            "SSL_CERT_FILE": str(ca_file)})
        plain = run_cli(HOST, "-p", str(peers.plain_port), env={
            "HTTPS_PROXY": f"http://probe:s3cret@{HOST}:{proxy.port}",
            "SSL_CERT_FILE": str(ca_file)})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["proxy"] == f"http://***@{HOST}:{proxy.port}"  # the password never printed
    results = {e["host"]: e for e in data["https"]}
    assert set(results) == {e.host for e in https_mod.ENDPOINTS}
    for host, e in results.items():
        assert e["via_proxy"] is True, e
        if host in deny:
            assert e["status"] == "proxy_refused" and "403" in e["error"], e
        else:
            assert (e["status"], e["http_status"]) == ("reachable", 404), e
            assert e["tls_version"] in ("TLSv1.2", "TLSv1.3")
    # Every provider was asked for through the proxy, with the proxy's credentials.
    want = "Basic " + base64.b64encode(b"probe:s3cret").decode()
    assert sorted(t for t, _ in proxy.requests) == sorted(
        [f"{e.host}:443" for e in https_mod.ENDPOINTS] * 2)  # two runs
    assert {a for _, a in proxy.requests} == {want}
    assert "HTTPS APIs via proxy http://***@" in plain.stdout and "s3cret" not in plain.stdout
    assert "Gmail API" in plain.stdout and "reachable, HTTP 404" in plain.stdout


def test_https_direct_no_proxy_and_interception(tmp_path: Path) -> None:
    with _internet(tmp_path) as (proxy, https_port, ca_file):
        local = [https_mod.Endpoint("Local", HOST, https_port)]
        proxied = {"HTTPS_PROXY": f"{HOST}:{proxy.port}"}

        def check(env: dict[str, str]) -> https_mod.EndpointResult:
            old = os.environ.get("SSL_CERT_FILE")
            os.environ["SSL_CERT_FILE"] = str(ca_file)
            try:
                return asyncio.run(https_mod.check(local, environ=env, timeout=5))[0]
            finally:
                if old is None:
                    os.environ.pop("SSL_CERT_FILE", None)
                else:
                    os.environ["SSL_CERT_FILE"] = old

        direct = check({**proxied, "NO_PROXY": "localhost,127.0.0.0/8"})
        assert (direct.status, direct.via_proxy, direct.http_status) == ("reachable", False, 404)
        assert proxy.requests == []
        via = check(proxied)
        assert (via.status, via.via_proxy) == ("reachable", True)
        assert proxy.requests[0][0] == f"{HOST}:{https_port}"
        # Without the test CA the certificate is not trusted: what a TLS-intercepting proxy
        # or antivirus looks like to an API client.
        untrusted = asyncio.run(https_mod.check(local, environ={}, timeout=5))[0]
        assert untrusted.status == "untrusted" and untrusted.error
        socks = asyncio.run(https_mod.check(local, environ={"HTTPS_PROXY": "socks5://x:1"},
                                            timeout=5))[0]
        assert socks.status == "error" and "only http:// proxies" in (socks.error or "")


def test_no_proxy_rules() -> None:
    assert https_mod.bypass("api.mailgun.net", "mailgun.net")
    assert https_mod.bypass("api.mailgun.net", ".mailgun.net")
    assert https_mod.bypass("api.mailgun.net", "*")
    assert not https_mod.bypass("api.mailgun.net", "gun.net")
    assert https_mod.bypass("10.1.2.3", "10.0.0.0/8")
    assert not https_mod.bypass("11.1.2.3", "10.0.0.0/8,example.com")
    assert https_mod.bypass("example.com", "other.org, example.com:443")


def test_certificate_name_rules() -> None:
    import datetime as dt

    def cert(dns: list[str], ips: list[str] = (), cn: list[str] = ()) -> CertInfo:  # type: ignore[assignment]
        now = dt.datetime.now(dt.UTC)
        return CertInfo("", list(cn), dns, list(ips), "", now, now, False, "")

    assert name_matches("smtp.example.com", cert(["*.example.com"]))
    assert not name_matches("a.smtp.example.com", cert(["*.example.com"]))
    assert not name_matches("example.com", cert(["*.example.com"]))
    assert not name_matches("example.com", cert(["*.com"]))
    assert name_matches("SMTP.Example.COM.", cert(["smtp.example.com"]))
    assert name_matches("192.0.2.1", cert([], ["192.0.2.1"]))
    assert not name_matches("192.0.2.1", cert(["192.0.2.1"]))
    assert name_matches("mail.example.test", cert([], cn=["mail.example.test"]))
    assert not name_matches("mail.example.test", cert(["other.test"], cn=["mail.example.test"]))
    assert name_matches("bücher.example", cert(["xn--bcher-kva.example"]))
