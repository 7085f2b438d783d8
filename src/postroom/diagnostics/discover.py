"""Where does an address submit mail? Every source a mail client would ask, gathered into
candidate servers (host, port, TLS mode) with the sources that vouch for each one:

0. the servers the user names (``postroom wizard --server HOST[:PORT]``): then nothing else;
1. the built-in provider table (providers.toml) by the address's domain;
2. RFC 6186/8314 SRV records: ``_submissions._tcp`` (implicit TLS) and ``_submission._tcp``
   (STARTTLS); a target of "." says the service is not offered;
3. autoconfig documents (postroom.diagnostics.autoconfig);
4. the domain's MX hosts mapped to a known provider (``*.google.com`` -> Google), for a
   custom domain hosted there;
5. when nothing above answers: the usual names (smtp.<domain>, mail.<domain>, the MX host)
   on 465 and 587, as Thunderbird guesses them.

Whether a candidate may be used without asking the user is decided by one rule,
:func:`authenticating`, over the :class:`Vouch` kinds of its sources: anyone on the network
path can forge a plain-HTTP document or answer for a guessed name, so those alone never
choose a server unattended (``--yes``).
"""

from __future__ import annotations

import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from postroom.diagnostics import autoconfig, providers
from postroom.diagnostics.dns import Resolver
from postroom.oauth.providers import endpoint_url_problem


class Vouch(enum.Enum):
    """How a source vouches for a candidate. ``rank`` orders them (lower is more trusted);
    :func:`authenticating` says which of them let the wizard use a candidate unattended."""

    USER = ("you (--server)", 0)
    TABLE = ("Postroom's built-in provider table", 0)
    AUTOCONFIG_HTTPS = ("autoconfig over HTTPS, certificate verified", 1)
    SRV = ("DNS SRV record (DNS is not authenticated)", 1)
    MX = ("DNS MX record mapped to the built-in table", 2)
    AUTOCONFIG_HTTP = ("autoconfig over plain HTTP (anyone on the path can forge it)", 3)
    GUESS = ("a guess (nobody published it)", 4)

    def __init__(self, words: str, rank: int) -> None:
        self.words = words
        self.rank = rank


@dataclass(frozen=True)
class Source:
    kind: Vouch
    label: str  # what was asked: "SRV _submission._tcp.example.com", the document's URL...


def in_domain(host: str, domain: str) -> bool:
    host, domain = host.lower().rstrip("."), domain.lower().rstrip(".")
    return host == domain or host.endswith(f".{domain}")


def authenticating(source: Source, host: str, domain: str) -> bool:
    """The one rule: may ``source`` alone choose ``host`` for an address at ``domain``
    without a person confirming it?

    - the user (``--server``), the built-in table, and an autoconfig document whose every
      fetch (redirects included) was HTTPS with a verified certificate: yes;
    - the MX mapping: yes, the servers it yields are the table's own (the DNS answer only
      picks which known provider), and the certificate is checked against their names;
    - an SRV record: DNS carries no authentication here (no DNSSEC check), so only when its
      target is the table's server of a provider or inside the address's own domain: then
      the certificate, checked against that name, proves the server is the domain's
      (RFC 6186 section 6 asks the client to confirm any other target with the user);
    - plain-HTTP autoconfig (or an HTTPS one redirected to HTTP) and guesses: never.
    """
    if source.kind in (Vouch.USER, Vouch.TABLE, Vouch.AUTOCONFIG_HTTPS, Vouch.MX):
        return True
    if source.kind is Vouch.SRV:
        return in_domain(host, domain) or providers.by_host(host) is not None
    return False


@dataclass
class Candidate:
    host: str
    port: int
    security: str  # smtps | starttls | none
    origins: list[Source] = field(default_factory=list)
    provider: providers.Provider | None = None
    username: str | None = None
    auth: tuple[str, ...] = ()  # autoconfig's <authentication> values

    @property
    def sources(self) -> list[str]:
        return [s.label for s in self.origins]

    @property
    def trust(self) -> int:
        """The best rank among the sources (lower is better), for ordering candidates."""
        return min((s.kind.rank for s in self.origins), default=Vouch.GUESS.rank)

    def vouched_by(self, domain: str) -> Source | None:
        """The first source that authenticates this candidate, or None when only
        unauthenticated sources name it (a person must then confirm it)."""
        return next((s for s in self.origins if authenticating(s, self.host, domain)), None)

    def unvouched_reason(self, domain: str) -> str:
        """Why no source authenticates this candidate (for the refusal message)."""
        why = "; ".join(dict.fromkeys(
            f"{s.kind.words}" + (f", and {self.host} is outside {domain} and not a known "
                                 "provider's server" if s.kind is Vouch.SRV else "")
            for s in self.origins))
        return f"named only by {why}"

    def to_dict(self, domain: str = "") -> dict[str, object]:
        by = self.vouched_by(domain) if domain else None
        return {"host": self.host, "port": self.port, "security": self.security,
                "sources": self.sources, "vouch": [s.kind.name.lower() for s in self.origins],
                "authenticated_by": by.label if by else None,
                "provider": self.provider.id if self.provider else None,
                "username": self.username, "auth": list(self.auth)}


@dataclass
class Discovery:
    address: str
    domain: str
    provider: providers.Provider | None = None
    mx: list[tuple[int, str]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # what was asked and what it said
    # An autoconfig <oAuth2> block, kept only from an authenticated document and only with
    # endpoint URLs that pass postroom.oauth.providers' rule (https, or http on loopback).
    oauth: dict[str, str] = field(default_factory=dict)

    def add(self, host: str, port: int, security: str, source: Source,
            provider: providers.Provider | None = None, username: str | None = None,
            auth: tuple[str, ...] = ()) -> None:
        host = host.lower().rstrip(".")
        for c in self.candidates:
            if (c.host, c.port) == (host, port):
                c.origins.append(source)
                c.provider = c.provider or provider
                c.username = c.username or username
                c.auth = c.auth or auth
                return
        self.candidates.append(Candidate(host, port, security, [source], provider,
                                         username, auth))

    def to_dict(self) -> dict[str, object]:
        return {"address": self.address, "domain": self.domain,
                "provider": self.provider.id if self.provider else None,
                "mx": [{"preference": p, "host": h} for p, h in self.mx],
                "candidates": [c.to_dict(self.domain) for c in self.candidates],
                "log": self.log, "oauth": self.oauth or None}


def _security_for(port: int) -> str:
    return "smtps" if port == 465 else "starttls"  # the probe finds out what it really is


def discover(address: str, resolver: Resolver, *, timeout: float = 8.0,
             ca_file: Path | None = None, http: bool = True,
             servers: list[tuple[str, int | None]] | None = None) -> Discovery:
    """Gather the candidates; ``servers`` (the user's ``--server``) replaces every source."""
    domain = address.rpartition("@")[2].lower().rstrip(".")
    d = Discovery(address, domain)
    if servers:
        d.provider = providers.by_domain(domain)
        for host, port in servers:
            prov = providers.by_host(host) or d.provider
            login = prov.login(address) if prov is not None else address
            for p in ([port] if port else [465, 587]):
                d.add(host, p, _security_for(p), Source(Vouch.USER, "--server (you)"),
                      prov, login)
        d.log.append("--server given: only the server(s) you named are probed")
        return d
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
                d.add(s.host, s.port, s.security,
                      Source(Vouch.TABLE, f"built-in table ({prov.title})"),
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
                d.add(target, port, security, Source(Vouch.SRV, f"SRV {qname}"),
                      providers.by_host(target), address)
        # 3. autoconfig
        if docs is not None:
            _autoconfig(d, docs.result())
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
                    d.add(s.host, s.port, s.security,
                          Source(Vouch.MX, f"MX {host} ({by_mx.title})"),
                          by_mx, by_mx.login(address))
    if not d.candidates:  # 5. guesses
        names = [f"smtp.{domain}", f"mail.{domain}", *(h for _, h in d.mx if h)]
        for host in dict.fromkeys(names):
            for port, security in ((465, "smtps"), (587, "starttls")):
                d.add(host, port, security, Source(Vouch.GUESS, "guess (no published setting)"),
                      None, address)
        d.log.append(f"nothing published: guessing {', '.join(dict.fromkeys(names))}")
    return d


def _autoconfig(d: Discovery, fetched: list[autoconfig.Fetched]) -> None:
    first = True
    for got in fetched:
        if got.document is None:
            d.log.append(f"autoconfig {got.url}: {got.error}")
            continue
        doc = got.document
        how = "" if doc.secure else f" ({doc.insecure_reason}: unauthenticated)"
        d.log.append(f"autoconfig {got.url}: {len(doc.outgoing)} SMTP server(s){how}")
        if not first:  # Thunderbird uses the first document found; later ones are
            continue  # listed, not used
        first = False
        kind = Vouch.AUTOCONFIG_HTTPS if doc.secure else Vouch.AUTOCONFIG_HTTP
        for o in doc.outgoing:
            d.add(o.host, o.port, o.security, Source(kind, f"autoconfig {got.url.split('?')[0]}"),
                  providers.by_host(o.host), o.username, o.auth)
        if doc.oauth:
            d.oauth = _oauth_block(d, doc)


def _oauth_block(d: Discovery, doc: autoconfig.Document) -> dict[str, str]:
    """The document's <oAuth2> endpoints, or nothing (with the reason logged): they decide
    where the user's sign-in and the app's client secret go, so only an authenticated
    document may name them, and only as URLs postroom.oauth.providers accepts."""
    if not doc.secure:
        d.log.append(f"autoconfig {doc.url}: its <oAuth2> block is ignored: the document is "
                     f"unauthenticated ({doc.insecure_reason}); give the endpoints yourself "
                     "in the connection's oauth table")
        return {}
    for key in ("authURL", "tokenURL"):
        url = doc.oauth.get(key, "")
        problem = endpoint_url_problem(url) if url else None
        if problem is not None:
            d.log.append(f"autoconfig {doc.url}: its <oAuth2> block is ignored: {key} "
                         f"{problem}")
            return {}
    return dict(doc.oauth)
