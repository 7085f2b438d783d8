"""HTTPS reachability of the API providers' endpoints (port 443), through HTTPS_PROXY if set.

When a network blocks outgoing SMTP (most cloud VMs block port 25, some hosts every SMTP
port), an HTTP API provider is the way out: this tells which ones this machine can reach.
One TLS handshake (certificate verified with the system CAs, or SSL_CERT_FILE) and one
``HEAD /`` per endpoint; any HTTP status counts as reachable. No credentials are sent (a
proxy's own user:password from HTTPS_PROXY excepted, which the proxy requires).

The proxy is honoured the way curl and Python's HTTP clients do it: ``https_proxy`` /
``HTTPS_PROXY`` (an ``http://`` proxy, tunnelled with CONNECT), bypassed for ``NO_PROXY``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from postroom.diagnostics import net


@dataclass(frozen=True)
class Endpoint:
    provider: str
    host: str
    port: int = 443


# The OAuth token endpoints: sending through Gmail or Microsoft 365 needs them besides the
# API. The API providers' own hosts come from the transports registry (every region of
# each: postroom.diagnostics.api_providers.endpoints), so a provider added there is probed.
OAUTH_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("Google OAuth", "oauth2.googleapis.com"),
    Endpoint("Microsoft OAuth", "login.microsoftonline.com"),
)


def default_endpoints() -> tuple[Endpoint, ...]:
    """The endpoints `postroom probe --https` checks: every API provider's host per region,
    then the OAuth token endpoints (imports the provider modules: call it when probing)."""
    from postroom.diagnostics.api_providers import endpoints as api_endpoints

    api = api_endpoints()
    hosts = {e.host for e in api}
    return (*api, *(e for e in OAUTH_ENDPOINTS if e.host not in hosts))


def __getattr__(name: str) -> tuple[Endpoint, ...]:
    # ``ENDPOINTS``, computed when asked for: importing this module loads no provider.
    if name == "ENDPOINTS":
        return default_endpoints()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

REACHABLE = "reachable"
UNTRUSTED = "untrusted"  # TLS works, but not with a certificate this machine trusts
PROXY_REFUSED = "proxy_refused"
TIMEOUT = "timeout"


@dataclass
class EndpointResult:
    provider: str
    host: str
    status: str = TIMEOUT  # reachable | untrusted | net.Reach values | proxy_refused | timeout
    http_status: int | None = None
    tls_version: str | None = None
    via_proxy: bool = False
    error: str | None = None
    ms: float | None = None

    @property
    def reachable(self) -> bool:
        return self.status == REACHABLE

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "host": self.host, "status": str(self.status),
            "http_status": self.http_status, "tls_version": self.tls_version,
            "via_proxy": self.via_proxy, "error": self.error,
            "ms": None if self.ms is None else round(self.ms, 1),
        }


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    auth: str | None  # "user:password" for Proxy-Authorization: Basic

    @property
    def display(self) -> str:
        return f"http://{'***@' if self.auth else ''}{self.host}:{self.port}"


def proxy_for(host: str, environ: Mapping[str, str]) -> Proxy | str | None:
    """The proxy for ``host`` from the environment: a Proxy, None (direct), or a string saying
    why the configured proxy cannot be used."""
    url = environ.get("https_proxy") or environ.get("HTTPS_PROXY") or ""
    if not url.strip():
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    if no_proxy and bypass(host, no_proxy):
        return None
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme != "http":
        return (f"HTTPS_PROXY={_redact(url)}: only http:// proxies (CONNECT) are supported, "
                f"not {parts.scheme}://")
    try:
        port = parts.port or 80
    except ValueError:
        return f"HTTPS_PROXY={_redact(url)}: invalid port"
    if not parts.hostname:
        return f"HTTPS_PROXY={_redact(url)}: no proxy host"
    auth = None
    if parts.username is not None:
        auth = (f"{urllib.parse.unquote(parts.username)}:"
                f"{urllib.parse.unquote(parts.password or '')}")
    return Proxy(parts.hostname, port, auth)


def bypass(host: str, no_proxy: str) -> bool:
    """NO_PROXY as curl reads it: "*", host names (a leading dot optional, subdomains
    included), IP addresses and CIDR ranges; ports are ignored."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for item in (i.strip().lower() for i in no_proxy.split(",")):
        if not item:
            continue
        if item == "*":
            return True
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(item.strip("[]"), strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = item.split(":")[0].lstrip(".").rstrip(".")
        if name and (host == name or host.endswith(f".{name}")):
            return True
    return False


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


async def check(
    endpoints: Sequence[Endpoint] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    deadline: float | None = None,
    timeout: float = 10.0,
) -> list[EndpointResult]:
    """Check every endpoint (default: :func:`default_endpoints`) in parallel; finished by
    ``deadline`` (loop time) at the latest."""
    if endpoints is None:
        endpoints = default_endpoints()
    loop = asyncio.get_running_loop()
    end = deadline if deadline is not None else loop.time() + timeout
    env = os.environ if environ is None else environ
    ctx = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    results = [EndpointResult(e.provider, e.host) for e in endpoints]
    await asyncio.gather(*(_one(e, r, env, ctx, end) for e, r in zip(endpoints, results,
                                                                        strict=True)))
    return results


async def _one(ep: Endpoint, r: EndpointResult, environ: Mapping[str, str],
               ctx: ssl.SSLContext, deadline: float) -> None:
    t0 = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout_at(deadline):
            proxy = proxy_for(ep.host, environ)
            if isinstance(proxy, str):
                r.status, r.error = net.Reach.ERROR, proxy
                return
            r.via_proxy = proxy is not None
            target = (proxy.host, proxy.port) if proxy else (ep.host, ep.port)
            try:
                addresses = await net.resolve(*target)
            except OSError as err:
                r.status, r.error = net.classify(err)
                if proxy:
                    r.error = f"proxy {proxy.display}: {r.error}"
                return
            conn = await net.connect(addresses, target[1])
            if isinstance(conn, net.NotConnected):
                r.status, r.error = conn.reach, conn.error
                if proxy:
                    r.error = f"proxy {proxy.display}: {conn.error}"
                return
            writer = conn.writer
            if proxy and not await _tunnel(conn, ep, proxy, r):
                return
            try:
                await writer.start_tls(ctx, server_hostname=ep.host)
            except ssl.SSLCertVerificationError as err:
                r.status, r.error = UNTRUSTED, err.verify_message or str(err)
                return
            except (ssl.SSLError, OSError) as err:
                r.status, r.error = net.Reach.ERROR, f"TLS handshake failed: {err}"
                return
            obj = writer.get_extra_info("ssl_object")
            r.tls_version = obj.version() if obj is not None else None
            writer.write(f"HEAD / HTTP/1.1\r\nHost: {ep.host}\r\nUser-Agent: postroom-probe\r\n"
                         "Connection: close\r\n\r\n".encode())
            line = await conn.reader.readline()
            r.http_status = _status(line)
            if r.http_status is None:
                r.status, r.error = net.Reach.ERROR, f"not an HTTP answer: {line[:60]!r}"
            else:
                r.status = REACHABLE
    except TimeoutError:
        r.status, r.error = TIMEOUT, "no answer before the deadline"
    except OSError as err:
        r.status, r.error = net.Reach.ERROR, str(err)
    finally:
        r.ms = (time.monotonic() - t0) * 1000
        if writer is not None:
            await net.close(writer, 0.2)


async def _tunnel(conn: net.Connected, ep: Endpoint, proxy: Proxy, r: EndpointResult) -> bool:
    head = f"CONNECT {ep.host}:{ep.port} HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\n"
    if proxy.auth:
        head += f"Proxy-Authorization: Basic {base64.b64encode(proxy.auth.encode()).decode()}\r\n"
    conn.writer.write((head + "\r\n").encode())
    status = _status(await conn.reader.readline())
    for _ in range(100):  # the proxy's headers, up to the blank line (bounded)
        line = await conn.reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
    if status == 200:
        return True
    r.status = PROXY_REFUSED
    r.error = f"proxy {proxy.display} answered CONNECT with {status or 'no HTTP status'}"
    return False


def _status(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None
