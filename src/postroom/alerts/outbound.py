"""An HTTPS request to a URL that somebody else chose (a browser's push endpoint): to a
public address only, unless the configuration allows a network by name.

Server-side request forgery: the URL comes from a signed-in browser, but a request from the
server reaches what the browser cannot (the loopback, the LAN, a cloud's metadata address).
So the host is resolved here, every address it has must be public (``is_global``) or inside
one of the ``allowed`` networks, and the request then goes to the address that was checked
(TLS still verifies the certificate for the host name, sent as SNI): a DNS answer that
changes between the check and the connection (rebinding) cannot move it. No redirect is
followed, and at most MAX_ANSWER bytes of the answer are read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from postroom.exceptions import AlertError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_ANSWER = 4096


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    text: str  # the start of the body, for the error message


def networks(values: Sequence[str]) -> list[Network]:
    """Parse ``["10.0.0.0/8", ...]`` (checked by the configuration already)."""
    return [ipaddress.ip_network(v, strict=False) for v in values]


def allowed_address(ip: str, allowed: Sequence[Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is the loopback too
    return addr.is_global or any(addr in net for net in allowed)


async def resolve(host: str, port: int, allowed: Sequence[Network]) -> str:
    """The address to connect to for ``host``: refused (AlertError) when any of its
    addresses is neither public nor allowed."""
    try:
        ipaddress.ip_address(host)
        found = [host]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise AlertError(f"cannot resolve {host}: {err}", code="alert.webpush") from err
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    bad = [ip for ip in found if not allowed_address(ip, allowed)]
    if bad or not found:
        raise AlertError(f"{host} has the address {', '.join(bad) or '(none)'}, which is not "
                         "public: Postroom sends pushes to public addresses only (allow a "
                         "network with [[alerts]] webpush_networks)", code="alert.webpush")
    return found[0]


async def post(url: str, body: bytes, headers: Mapping[str, str], *, timeout: float,
               allowed: Sequence[Network]) -> Answer:
    """POST ``body`` to ``url`` (https) at a checked address. Network failures are
    AlertError (retried by the outbox). The CA bundle is the system's, or SSL_CERT_FILE's
    (httpx reads it)."""
    import httpx

    target = httpx.URL(url)
    if target.scheme != "https" or not target.host:
        raise AlertError(f"{target.host or url!r} is not an https URL", code="alert.webpush",
                         permanent=True)
    port = target.port or 443
    ip = await resolve(target.host, port, allowed)
    host_header = target.host if target.port is None else f"{target.host}:{port}"
    if ":" in target.host:
        host_header = f"[{target.host}]" + ("" if target.port is None else f":{port}")
    pinned = target.copy_with(host=ip)
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            request = client.build_request(
                "POST", pinned, content=body, headers={**headers, "Host": host_header},
                extensions={"sni_hostname": target.host})
            response = await client.send(request, stream=True)
            try:
                text = b""
                async for chunk in response.aiter_bytes():
                    text += chunk
                    if len(text) >= MAX_ANSWER:
                        break
            finally:
                await response.aclose()
    except httpx.HTTPError as err:
        raise AlertError(f"push service {target.host}: {type(err).__name__}: {err}",
                         code="alert.webpush") from err
    return Answer(response.status_code, text[:MAX_ANSWER].decode("utf-8", "replace"))
