"""Local stand-ins for the internet the wizard and the doctor read (tests/test_doctor.py,
test_spf.py, test_wizard.py, test_dkim.py):

- ``dns_server(zone)``: an authoritative DNS server (dnslib, the fallback server of the
  tests/peers/dns.sh recipe) on 127.0.0.1, UDP and TCP, on a port the OS picks, serving a
  BIND-style zone text given by the test. Unknown names get NXDOMAIN, known names without the
  asked type an empty answer (no data), names listed in ``servfail`` a SERVFAIL.
- ``dnsmasq()``: the recipe's main server (dnsmasq) configured by ``tests/peers/dns.sh`` in
  a private state folder on a free port, with its own zones (example.test, example.org,
  nullmx.test) and DKIM keys; stopped at the end.
- ``web(docs)``: an HTTP proxy that plays every web server of the test: plain ``GET
  http://host/path`` is answered from ``docs`` (keyed by URL without the query), ``CONNECT
  host:443`` is tunnelled to a local TLS server (certificate for any host of ``docs``,
  from a test CA) that answers from ``docs`` too. Point HTTP_PROXY/HTTPS_PROXY at it and
  SSL_CERT_FILE at ``ca``. Records every request.

Everything binds 127.0.0.1, runs in daemon threads and stops when the context exits; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer

HOST = "127.0.0.1"
RECIPES = Path(__file__).resolve().parent / "peers"


# -- dnslib ---------------------------------------------------------------------------------------
class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, text: str, servfail: set[str]) -> None:
        self.rrs = RR.fromZone(text)
        self.names = {str(rr.rname).lower() for rr in self.rrs}
        self.servfail = {n.lower().rstrip(".") + "." for n in servfail}
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        q = request.q
        qname = str(q.qname).lower()
        self.queries.append((qname, QTYPE[q.qtype]))
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        for rr in self.rrs:
            if str(rr.rname).lower() == qname and (q.qtype == rr.rtype or q.qtype == QTYPE.ANY):
                reply.add_answer(rr)
        # A name with no records of its own but names below it exists (an empty non-terminal).
        exists = qname in self.names or any(n.endswith("." + qname) for n in self.names)
        if not reply.rr and not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        reply.header.aa = 1
        return reply


@dataclass
class DnsServer:
    port: int
    zone: _Zone

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind((HOST, 0))
            port = int(t.getsockname()[1])
            try:
                u.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


@contextlib.contextmanager
def dns_server(zone: str, servfail: set[str] | frozenset[str] = frozenset()
               ) -> Iterator[DnsServer]:
    resolver = _Zone(zone, set(servfail))
    log = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers: list[Any] = []
    for _ in range(10):
        port = _free_udp_tcp_port()
        try:
            udp = DNSServer(resolver, port=port, address=HOST, logger=log)
            tcp = DNSServer(resolver, port=port, address=HOST, tcp=True, logger=log)
        except OSError:
            continue
        servers = [udp, tcp]
        break
    if not servers:
        raise RuntimeError("could not start the dnslib server")
    for s in servers:
        s.start_thread()
    try:
        yield DnsServer(port, resolver)
    finally:
        for s in servers:
            s.stop()
            s.server.server_close()


def txt(value: str) -> str:
    """A TXT value as zone-file strings (split at 255 bytes, quotes escaped)."""
    parts = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


# -- dnsmasq (tests/peers/dns.sh) ------------------------------------------------------------------
@dataclass
class Dnsmasq:
    port: int
    state: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def key(self, selector: str) -> Path:
        return self.state / "dns" / "dkim" / f"{selector}.example.test.key"


@contextlib.contextmanager
def dnsmasq(state: Path) -> Iterator[Dnsmasq]:
    """dns.sh configure + start with PEERS=state and a free DNS_PORT; stop at the end."""
    if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
        raise AssertionError("dnsmasq is not installed: run `bash scripts/test.sh` (it runs "
                             "tests/peers/dns.sh install)")
    port = _free_udp_tcp_port()
    env = {**os.environ, "PEERS": str(state), "DNS_PORT": str(port), "HERE": str(RECIPES)}
    script = str(RECIPES / "dns.sh")

    def run(step: str) -> None:
        res = subprocess.run(["bash", script, step], env=env, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise AssertionError(f"dns.sh {step} failed:\n{res.stdout}\n{res.stderr}")

    run("configure")
    try:
        run("start")
        _wait_dns(port)
        yield Dnsmasq(port, state)
    finally:
        run("stop")


def _wait_dns(port: int, timeout: float = 10.0) -> None:
    import dns.nameserver
    import dns.resolver

    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(HOST, port)]
    r.lifetime = 1
    deadline = time.monotonic() + timeout
    while True:
        try:
            r.resolve("example.test", "MX")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the web (autoconfig documents) -------------------------------------------------------------
@dataclass
class Web:
    proxy_port: int
    ca: Path
    docs: dict[str, tuple[int, str]]
    requests: list[str] = field(default_factory=list)  # "GET http://..." / "CONNECT h:443"

    @property
    def env(self) -> dict[str, str]:
        proxy = f"http://{HOST}:{self.proxy_port}"
        return {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
                "https_proxy": proxy, "SSL_CERT_FILE": str(self.ca), "NO_PROXY": "",
                "no_proxy": ""}


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    request = (await reader.readline()).decode("latin-1").strip()
    headers: dict[str, str] = {}
    for _ in range(100):
        line = (await reader.readline()).decode("latin-1")
        if line in ("\r\n", "\n", ""):
            break
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return request, headers


def _answer(web: Web, url: str) -> bytes:
    status, body = web.docs.get(url.split("?")[0], (404, "not here"))
    data = body.encode()
    reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
    if status in (301, 302, 307, 308):  # a redirect: the body is where to
        data, reason = b"", f"Redirect\r\nLocation: {body}"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data


@contextlib.contextmanager
def web(tmp: Path, docs: dict[str, tuple[int, str]], deny_connect: set[str] = frozenset()
        ) -> Iterator[Web]:
    from diag_helpers import make_ca, make_cert, server_context

    ca = make_ca(tmp / "webca")
    hosts = sorted({u.split("/")[2] for u in docs} | {"localhost"})
    cert, key = make_cert(ca, tmp / "webca", hosts)
    tls_ctx = server_context(cert, key)
    w = Web(0, ca.path, docs)
    loop = asyncio.new_event_loop()
    servers: list[Any] = []

    async def https_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            request, headers = await _read_head(reader)
            path = request.split()[1] if len(request.split()) > 1 else "/"
            writer.write(_answer(w, f"https://{headers.get('host', '').split(':')[0]}{path}"))
            await writer.drain()
        writer.close()

    async def proxy_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request, _ = await _read_head(reader)
            method, target = request.split()[:2]
            w.requests.append(f"{method} {target}")
            if method == "CONNECT":
                if target.split(":")[0] in deny_connect:
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    return
                up_r, up_w = await asyncio.open_connection(HOST, https_port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()

                async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                    with contextlib.suppress(ConnectionError, OSError):
                        while data := await src.read(65536):
                            dst.write(data)
                            await dst.drain()
                    dst.close()

                await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
                return
            writer.write(_answer(w, target))
            await writer.drain()
        except (ConnectionError, ValueError, IndexError, OSError):
            pass
        finally:
            writer.close()

    https_port = 0

    async def start() -> None:
        nonlocal https_port
        srv = await asyncio.start_server(https_handler, HOST, 0, ssl=tls_ctx)
        https_port = int(srv.sockets[0].getsockname()[1])
        psrv = await asyncio.start_server(proxy_handler, HOST, 0)
        w.proxy_port = int(psrv.sockets[0].getsockname()[1])
        servers.extend([srv, psrv])

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield w
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
