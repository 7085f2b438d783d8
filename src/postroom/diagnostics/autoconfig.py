"""Mozilla ISPDB-format autoconfig documents ("config-v1.1.xml"), fetched where a mail
domain publishes them, in Thunderbird's order:

1. ``https://autoconfig.<domain>/mail/config-v1.1.xml?emailaddress=<address>``
2. ``https://<domain>/.well-known/autoconfig/mail/config-v1.1.xml``
3. ``http://autoconfig.<domain>/mail/config-v1.1.xml?emailaddress=<address>`` (the plain-HTTP
   fallback Thunderbird also uses; anyone on the path can forge it, so what it says ranks
   below what came over HTTPS or from DNS, the wizard says where it came from, and never
   uses it without a person confirming)

A document is authenticated (``Document.secure``) only when every request that fetched it
was HTTPS with a verified certificate: redirects are followed one by one (at most
``MAX_REDIRECTS``) and recorded, so an HTTPS URL redirected to plain HTTP is not.

Fetched with httpx, which honours HTTP_PROXY / HTTPS_PROXY / NO_PROXY and SSL_CERT_FILE, and
resolves names with this machine's resolver. Mozilla's central ISPDB is not asked: that
would tell a third party which domain is being set up.

Only the ``outgoingServer type="smtp"`` entries and the ``oAuth2`` block are read. The
document is refused when it is large or declares a DTD or entities (no entity expansion).
"""

from __future__ import annotations

import ssl
import urllib.parse
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_BYTES = 256 * 1024
MAX_REDIRECTS = 3
_SOCKET = {"ssl": "smtps", "tls": "smtps", "starttls": "starttls", "plain": "none"}


@dataclass(frozen=True)
class Outgoing:
    host: str
    port: int
    security: str  # smtps | starttls | none
    username: str | None
    auth: tuple[str, ...]  # password-cleartext, password-encrypted, OAuth2, client-IP-address...


@dataclass
class Document:
    url: str
    provider_id: str = ""
    display_name: str = ""
    outgoing: list[Outgoing] = field(default_factory=list)
    oauth: dict[str, str] = field(default_factory=dict)
    # Every URL requested to get it, the first one included (redirects follow it).
    chain: tuple[str, ...] = ()

    @property
    def secure(self) -> bool:
        """Fetched only over HTTPS (httpx verifies the certificate: verification is never
        turned off here), the first request and every redirect."""
        return self.insecure_reason is None

    @property
    def insecure_reason(self) -> str | None:
        hops = self.chain or (self.url,)
        plain = next((u for u in hops if not u.lower().startswith("https://")), None)
        if plain is None:
            return None
        if plain == hops[0]:
            return "plain HTTP"
        return f"redirected from HTTPS to plain HTTP ({plain.split('?')[0]})"


def urls(address: str) -> list[str]:
    domain = address.rpartition("@")[2].lower()
    q = urllib.parse.urlencode({"emailaddress": address})
    return [f"https://autoconfig.{domain}/mail/config-v1.1.xml?{q}",
            f"https://{domain}/.well-known/autoconfig/mail/config-v1.1.xml",
            f"http://autoconfig.{domain}/mail/config-v1.1.xml?{q}"]


def _fill(text: str, address: str) -> str:
    local, _, domain = address.rpartition("@")
    return (text.replace("%EMAILADDRESS%", address).replace("%EMAILLOCALPART%", local)
            .replace("%EMAILDOMAIN%", domain))


def parse(text: str, address: str, url: str = "") -> Document:
    """Raises ValueError when the text is not a usable ISPDB document."""
    head = text[:4096].upper()
    if "<!DOCTYPE" in head or "<!ENTITY" in text.upper():
        raise ValueError("the document declares a DTD or entities; refused")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"not XML: {err}") from None
    if root.tag != "clientConfig":
        raise ValueError(f"not an autoconfig document (root <{root.tag}>, "
                         "expected <clientConfig>)")
    doc = Document(url)
    prov = root.find("emailProvider")
    if prov is None:
        raise ValueError("no <emailProvider>")
    doc.provider_id = prov.get("id", "")
    doc.display_name = (prov.findtext("displayName") or "").strip()
    for out in prov.findall("outgoingServer"):
        if out.get("type", "smtp").lower() != "smtp":
            continue
        host = _fill((out.findtext("hostname") or "").strip(), address).lower()
        port_text = (out.findtext("port") or "").strip()
        sock = (out.findtext("socketType") or "").strip().lower()
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            continue
        user = out.findtext("username")
        auth = tuple(a.text.strip() for a in out.findall("authentication") if a.text)
        doc.outgoing.append(Outgoing(host, int(port_text), _SOCKET.get(sock, "starttls"),
                                     _fill(user.strip(), address) if user else None, auth))
    oauth = root.find("oAuth2")
    if oauth is not None:
        doc.oauth = {child.tag: (child.text or "").strip() for child in oauth}
    if not doc.outgoing:
        raise ValueError("no <outgoingServer type=\"smtp\"> with a host name and port")
    return doc


@dataclass
class Fetched:
    url: str
    document: Document | None = None
    error: str | None = None


def _client_verify(ca_file: Path | None) -> Any:
    if ca_file is None:
        return True  # httpx: certifi, or SSL_CERT_FILE / SSL_CERT_DIR (trust_env)
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(ca_file))  # the system's CAs plus this one
    return ctx


def fetch(url: str, address: str, timeout: float, ca_file: Path | None = None) -> Fetched:
    import httpx

    chain = [url]
    try:
        with httpx.Client(timeout=timeout, verify=_client_verify(ca_file), trust_env=True,
                          follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", chain[-1],
                                   headers={"Accept": "application/xml"}) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        target = str(resp.url.join(resp.headers["location"]))
                        if not target.lower().startswith(("https://", "http://")):
                            return Fetched(url, error=f"redirected to {target[:100]}: only "
                                           "http and https are followed")
                        chain.append(target)
                        continue
                    if resp.status_code != 200:
                        return Fetched(url, error=f"HTTP {resp.status_code}")
                    body = b""
                    for chunk in resp.iter_bytes():
                        body += chunk
                        if len(body) > MAX_BYTES:
                            return Fetched(url, error=f"larger than {MAX_BYTES // 1024} KiB")
                    break
            else:
                return Fetched(url, error=f"more than {MAX_REDIRECTS} redirects")
    except httpx.HTTPError as err:
        return Fetched(url, error=_http_error(err))
    try:
        doc = parse(body.decode("utf-8", "replace"), address, url)
    except ValueError as err:
        return Fetched(url, error=str(err))
    doc.chain = tuple(chain)
    return Fetched(url, doc)


def _http_error(err: Exception) -> str:
    text = str(err) or type(err).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        why = text.partition("certificate verify failed:")[2].split(" (_ssl")[0].strip()
        return f"TLS certificate not accepted ({why or 'not trusted'})"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the name does not resolve"
    return text[:200]


def fetch_all(address: str, timeout: float, ca_file: Path | None = None) -> list[Fetched]:
    """Every URL of :func:`urls`, in parallel, returned in Thunderbird's order."""
    targets = urls(address)
    with ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda u: fetch(u, address, timeout, ca_file), targets))
