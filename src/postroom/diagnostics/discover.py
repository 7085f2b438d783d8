"""Where does an address submit mail? Every source a mail client would ask, gathered into
candidate servers (host, port, TLS mode) with the source that named each one:

1. the built-in provider table (providers.toml) by the address's domain;
2. RFC 6186/8314 SRV records: ``_submissions._tcp`` (implicit TLS) and ``_submission._tcp``
   (STARTTLS); a target of "." says the service is not offered;
3. autoconfig documents (postroom.diagnostics.autoconfig);
4. the domain's MX hosts mapped to a known provider (``*.google.com`` -> Google), for a
   custom domain hosted there;
5. when nothing above answers: the usual names (smtp.<domain>, mail.<domain>, the MX host)
   on 465 and 587, as Thunderbird guesses them.

Sources rank by how much they can be trusted: the table, DNS and HTTPS documents above the
MX mapping, plain-HTTP documents and guesses last.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from postroom.diagnostics import autoconfig, providers
from postroom.diagnostics.dns import Resolver

# Source trust, lower is better.
TABLE, SRV, AUTOCONFIG, MX, AUTOCONFIG_HTTP, GUESS = 0, 1, 1, 2, 3, 4


@dataclass
class Candidate:
    host: str
    port: int
    security: str  # smtps | starttls | none
    sources: list[str] = field(default_factory=list)
    trust: int = GUESS
    provider: providers.Provider | None = None
    username: str | None = None
    auth: tuple[str, ...] = ()  # autoconfig's <authentication> values

    def to_dict(self) -> dict[str, object]:
        return {"host": self.host, "port": self.port, "security": self.security,
                "sources": self.sources, "provider": self.provider.id if self.provider else None,
                "username": self.username, "auth": list(self.auth)}


@dataclass
class Discovery:
    address: str
    domain: str
    provider: providers.Provider | None = None
    mx: list[tuple[int, str]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # what was asked and what it said
    oauth: dict[str, str] = field(default_factory=dict)  # an autoconfig <oAuth2> block

    def add(self, host: str, port: int, security: str, source: str, trust: int,
            provider: providers.Provider | None = None, username: str | None = None,
            auth: tuple[str, ...] = ()) -> None:
        host = host.lower().rstrip(".")
        for c in self.candidates:
            if (c.host, c.port) == (host, port):
                c.sources.append(source)
                c.trust = min(c.trust, trust)
                c.provider = c.provider or provider
                c.username = c.username or username
                c.auth = c.auth or auth
                return
        self.candidates.append(Candidate(host, port, security, [source], trust, provider,
                                         username, auth))

    def to_dict(self) -> dict[str, object]:
        return {"address": self.address, "domain": self.domain,
                "provider": self.provider.id if self.provider else None,
                "mx": [{"preference": p, "host": h} for p, h in self.mx],
                "candidates": [c.to_dict() for c in self.candidates], "log": self.log,
                "oauth": self.oauth or None}


def discover(address: str, resolver: Resolver, *, timeout: float = 8.0,
             ca_file: Path | None = None, http: bool = True) -> Discovery:
    domain = address.rpartition("@")[2].lower().rstrip(".")
    d = Discovery(address, domain)
    with ThreadPoolExecutor(4) as pool:
        docs = pool.submit(autoconfig.fetch_all, address, timeout, ca_file) if http else None
        mx = pool.submit(resolver.mx, domain)
        srv_tls = pool.submit(resolver.srv, f"_submissions._tcp.{domain}")
        srv_start = pool.submit(resolver.srv, f"_submission._tcp.{domain}")
        # 1. the table
        prov = providers.by_domain(domain)
        if prov is not None:
            d.provider = prov
            d.log.append(f"built-in table: {domain} is {prov.title}")
            for s in prov.servers:
                d.add(s.host, s.port, s.security, f"built-in table ({prov.title})", TABLE,
                      prov, prov.login(address))
        else:
            d.log.append(f"built-in table: {domain} is not a provider's own domain")
        # 2. SRV
        for fut, name, security in ((srv_tls, "_submissions._tcp", "smtps"),
                                    (srv_start, "_submission._tcp", "starttls")):
            ans, records = fut.result()
            qname = f"{name}.{domain}"
            if ans.temporary:
                d.log.append(f"SRV {qname}: {ans.describe()}")
            elif not records:
                d.log.append(f"SRV {qname}: none")
            for _, _, port, target in records:
                if not target:
                    d.log.append(f"SRV {qname}: '.' (the domain says: not offered)")
                    continue
                d.log.append(f"SRV {qname}: {target}:{port}")
                d.add(target, port, security, f"SRV {qname}", SRV,
                      providers.by_host(target), address)
        # 3. autoconfig
        if docs is not None:
            first = True
            for got in docs.result():
                if got.document is None:
                    d.log.append(f"autoconfig {got.url}: {got.error}")
                    continue
                doc = got.document
                d.log.append(f"autoconfig {got.url}: {len(doc.outgoing)} SMTP server(s)"
                             + (" (plain HTTP: unauthenticated)" if not doc.secure else ""))
                if not first:  # Thunderbird uses the first document found; later ones are
                    continue  # listed, not used
                first = False
                d.oauth = doc.oauth
                for o in doc.outgoing:
                    d.add(o.host, o.port, o.security, f"autoconfig {got.url.split('?')[0]}",
                          AUTOCONFIG if doc.secure else AUTOCONFIG_HTTP,
                          providers.by_host(o.host), o.username, o.auth)
        # 4. MX
        ans, hosts = mx.result()
        d.mx = hosts
        if ans.temporary:
            d.log.append(f"MX {domain}: {ans.describe()}")
        elif not hosts:
            d.log.append(f"MX {domain}: none")
        for _, host in hosts:
            if not host:
                d.log.append(f"MX {domain}: null MX (the domain receives no mail)")
                continue
            by_mx = providers.by_mx(host)
            d.log.append(f"MX {domain}: {host}" + (f" -> {by_mx.title}" if by_mx else ""))
            if by_mx is not None and d.provider is None:
                d.provider = by_mx
            if by_mx is not None:
                for s in by_mx.servers:
                    d.add(s.host, s.port, s.security, f"MX {host} ({by_mx.title})", MX,
                          by_mx, by_mx.login(address))
    if not d.candidates:  # 5. guesses
        names = [f"smtp.{domain}", f"mail.{domain}", *(h for _, h in d.mx if h)]
        for host in dict.fromkeys(names):
            for port, security in ((465, "smtps"), (587, "starttls")):
                d.add(host, port, security, "guess (no published setting)", GUESS, None,
                      address)
        d.log.append(f"nothing published: guessing {', '.join(dict.fromkeys(names))}")
    return d
