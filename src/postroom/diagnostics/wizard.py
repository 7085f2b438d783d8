"""`postroom wizard`: from an address to a working connection.

:func:`plan` finds the candidate servers (postroom.diagnostics.discover), probes every one
of them in parallel under one deadline (postroom.diagnostics.probe: TCP, greeting, TLS,
certificate, AUTH; no credentials sent), ranks them and says why the first one won:

1. it works at all (a usable verdict);
2. its certificate is trusted and names the host (else TLS works but is not verified);
3. it offers AUTH (with the mechanism the chosen login needs: XOAUTH2 for OAuth);
4. the source that named it can be trusted (the built-in table, SRV, HTTPS autoconfig
   before the MX mapping, plain-HTTP autoconfig and guesses);
5. implicit TLS before STARTTLS (RFC 8314 3.3), then the faster answer.

Some choices only a person may make, so each option lists its *concerns*: no authenticated
source vouches for it (postroom.diagnostics.discover.authenticating), or its certificate is
trusted but issued for another name (taking that name as ``tls_server_name`` would accept
whatever server holds it). Unattended (``--yes``, or no terminal), an option with a concern
is never chosen: the plan says which ones were refused and how to go on. On a terminal the
command shows the concerns and asks.

The plan holds the ``[[connections]]`` keys to write; the command (postroom.commands.wizard)
does the talking: asks for what is missing, checks the login, stores the password
encrypted, writes the entry and sends a test message.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postroom.diagnostics import discover as disc
from postroom.diagnostics import providers
from postroom.diagnostics.dns import Resolver
from postroom.diagnostics.probe import probe
from postroom.diagnostics.report import PortResult, Verdict
from postroom.exceptions import ConfigError, DeliveryError

_VERDICT_RANK = {Verdict.OK: 0, Verdict.CERTIFICATE: 1, Verdict.NO_TLS: 2}
_SECURITY_RANK = {"smtps": 0, "starttls": 1, "none": 2}
OAUTH_MECHS = ("XOAUTH2", "OAUTHBEARER")


@dataclass
class Option:
    candidate: disc.Candidate
    result: PortResult | None
    addresses: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.result is not None and self.result.usable

    @property
    def security(self) -> str:
        """How the port really speaks (the probe's finding over the source's claim)."""
        if self.result is not None and self.result.security:
            return self.result.security
        return self.candidate.security

    @property
    def auth(self) -> list[str]:
        return self.result.auth if self.result is not None else []

    @property
    def label(self) -> str:
        words = {"smtps": "implicit TLS", "starttls": "STARTTLS", "none": "no TLS"}
        return f"{self.candidate.host}:{self.candidate.port} {words.get(self.security, '?')}"

    def rank(self, oauth: bool) -> tuple[int, ...]:
        r = self.result
        verdict = _VERDICT_RANK.get(r.verdict, 9) if r is not None else 9
        if oauth:
            auth = 0 if any(m in self.auth for m in OAUTH_MECHS) else 1 if self.auth else 2
        else:
            auth = 0 if self.auth else 1
        return (0 if self.usable else 1, verdict, auth, self.candidate.trust,
                _SECURITY_RANK.get(self.security, 3), int((r.elapsed_ms or 0) if r else 0))

    def why(self) -> str:
        """One line: what the probe found."""
        r = self.result
        if r is None:
            return "not probed"
        return r.summary()

    @property
    def cert_name(self) -> str | None:
        """The name a trusted certificate was issued for, when it is not this host's (a
        wildcard is no single name to verify against, so it is not offered)."""
        tls = self.result.tls if self.result is not None else None
        if tls is None or tls.name_matches is not False or not tls.trusted or \
                tls.certificate is None:
            return None
        names = tls.certificate.dns_names or tls.certificate.common_names
        return names[0] if names and not names[0].startswith("*") else None

    def concerns(self, domain: str) -> list[str]:
        """What a person must confirm before this option is used (empty: nothing)."""
        out: list[str] = []
        if self.candidate.vouched_by(domain) is None:
            out.append(f"{self.candidate.unvouched_reason(domain)}: nothing proves "
                       f"{self.candidate.host} is your provider's server")
        name = self.cert_name
        if name is not None:
            out.append(f"the certificate of {self.candidate.host} is issued for {name}, not "
                       f"for {self.candidate.host}: verifying the server as {name} "
                       f"(tls_server_name) is only right if {name} is your provider's")
        return out

    def to_dict(self, domain: str) -> dict[str, Any]:
        return {**self.candidate.to_dict(domain), "security": self.security,
                "usable": self.usable, "addresses": self.addresses, "auth": self.auth,
                "verdict": str(self.result.verdict) if self.result else None,
                "summary": self.why(), "concerns": self.concerns(domain),
                "probe": self.result.to_dict() if self.result else None}


@dataclass
class Plan:
    discovery: disc.Discovery
    options: list[Option]
    chosen: Option | None
    provider: providers.Provider | None
    explanation: list[str]
    oauth_possible: bool
    connection: dict[str, Any] = field(default_factory=dict)  # [[connections]] keys
    notes: list[str] = field(default_factory=list)
    # Usable options passed over because no one was there to confirm their concerns.
    refused: list[Option] = field(default_factory=list)

    @property
    def needs_password(self) -> bool:
        return bool(self.chosen and self.chosen.auth)

    @property
    def concerns(self) -> list[str]:
        """What the user must confirm before the chosen option is saved."""
        return self.chosen.concerns(self.discovery.domain) if self.chosen else []

    @property
    def cert_name(self) -> str | None:
        """The chosen option's certificate name, taken as tls_server_name only once the
        user confirms it (the command adds it to the entry)."""
        return self.chosen.cert_name if self.chosen else None

    def to_dict(self) -> dict[str, Any]:
        domain = self.discovery.domain
        return {"discovery": self.discovery.to_dict(),
                "provider": ({"id": self.provider.id, "title": self.provider.title,
                              "oauth": self.provider.oauth, "password": self.provider.password,
                              "note": self.provider.note, "docs": self.provider.docs}
                             if self.provider else None),
                "options": [o.to_dict(domain) for o in self.options],
                "chosen": self.chosen.to_dict(domain) if self.chosen else None,
                "refused": [o.to_dict(domain) for o in self.refused],
                "explanation": self.explanation, "oauth_possible": self.oauth_possible,
                "connection": self.connection, "notes": self.notes}


def default_name(address: str, provider: providers.Provider | None) -> str:
    if provider is not None:
        return provider.id
    domain = address.rpartition("@")[2]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", domain.split(".")[0])[:64] or "primary"


def parse_server(text: str) -> tuple[str, int | None]:
    """A server the user names: HOST, HOST:PORT, [IPv6] or [IPv6]:PORT."""
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    if not host or any(ch in host for ch in "/@ ") or (port_text and not (
            port_text.isdigit() and 0 < int(port_text) < 65536)):
        raise ConfigError(f"--server {text!r}: expected HOST or HOST:PORT, e.g. "
                          "smtp.example.com:587", code="wizard.server")
    return host.lower(), int(port_text) if port_text else None


def entry_for(p: Plan, name: str, *, cert_name: str | None = None) -> dict[str, Any]:
    """The recommended ``[[connections]]`` entry named ``name``; ``cert_name``: the
    certificate's name the user confirmed as tls_server_name (Plan.cert_name)."""
    entry: dict[str, Any] = {"name": name, **p.connection}
    if cert_name is not None:
        entry["tls_server_name"] = cert_name
        p.notes.append(f"tls_server_name = \"{cert_name}\": the name on the server's "
                       "certificate, confirmed by you")
    return entry


async def check_login(entry: dict[str, Any] | Any, secret: str | None, *,
                      ehlo_name: str) -> DeliveryError | None:
    """Connect and log in with ``entry`` (an SMTP ``[[connections]]`` table, not saved) and
    ``secret``; nothing is sent. None when it works, else the DeliveryError (with its
    transcript). The transport's own timeouts bound it."""
    from postroom import transports
    from postroom.transports.base import TransportContext

    model = transports.settings_model(str(entry.get("transport", "smtp")), "wizard")
    cfg = model.model_validate({k: v for k, v in entry.items() if k != "oauth"})
    t = transports.create(cfg, TransportContext(
        ehlo_name=ehlo_name, stored_secret=lambda _name: secret))
    try:
        await t.check()
    except DeliveryError as err:
        return err
    finally:
        await t.aclose()
    return None


def _system_resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return True


async def _probe_all(d: disc.Discovery, resolver: Resolver, timeout: float,
                     ca_file: Path | None) -> list[Option]:
    by_host: dict[str, list[disc.Candidate]] = defaultdict(list)
    for c in d.candidates:
        by_host[c.host].append(c)

    async def one(host: str, cands: list[disc.Candidate]) -> list[Option]:
        addrs = await asyncio.to_thread(resolver.addresses, host)
        ports = [c.port for c in cands]
        implicit = {c.port for c in cands if c.security == "smtps"}
        report = await probe(host, ports, timeout=timeout, ca_file=ca_file,
                             implicit_tls_ports=implicit, https=False,
                             addresses=addrs or None)
        results = {r.port: r for r in report.ports}
        return [Option(c, results.get(c.port), addrs or report.addresses) for c in cands]

    groups = await asyncio.gather(*(one(h, cs) for h, cs in by_host.items()))
    return [o for g in groups for o in g]


def plan(address: str, resolver: Resolver, *, timeout: float = 15.0,
         ca_file: Path | None = None, oauth: bool | None = None, http: bool = True,
         unattended: bool = False, servers: list[tuple[str, int | None]] | None = None
         ) -> Plan:
    """Discover, probe, rank; ``oauth`` True/False forces the login kind, None lets the
    provider decide (OAuth where it is the only way). ``unattended``: nobody can confirm a
    concern, so an option with one is refused (listed in ``Plan.refused``). ``servers``:
    the user's own ``--server`` choices instead of discovery."""
    d = disc.discover(address, resolver, timeout=min(timeout, 10.0), ca_file=ca_file,
                      http=http, servers=servers)
    options = asyncio.run(_probe_all(d, resolver, timeout, ca_file))
    prov = d.provider
    oauth_possible = bool((prov and prov.oauth) or d.oauth)
    want_oauth = bool(oauth) and oauth_possible
    options.sort(key=lambda o: o.rank(want_oauth))
    usable = [o for o in options if o.usable]
    refused = [o for o in usable if o.concerns(d.domain)] if unattended else []
    chosen = next((o for o in usable if o not in refused), None)
    if chosen is not None and chosen.candidate.provider is not None:
        prov = prov or chosen.candidate.provider
    p = Plan(d, options, chosen, prov, [], oauth_possible, refused=refused)
    p.explanation = _explain(p)
    if chosen is not None:
        p.connection = _connection(p, address, ca_file, want_oauth)
    return p


def _explain(p: Plan) -> list[str]:
    lines: list[str] = []
    c = p.chosen
    domain = p.discovery.domain
    if c is None and p.refused:
        lines.append("no server can be chosen without you (--yes, or no terminal to ask on):")
        for o in p.refused:
            lines += [f"  {o.label} refused: {why}" for why in o.concerns(domain)]
        lines.append("to go on: run the wizard on a terminal without --yes and confirm, or "
                     "name the server yourself with --server HOST[:PORT] once you know it is "
                     "your provider's (its documentation says which)")
        return lines
    if c is None:
        lines.append("no candidate server is usable from here:")
        lines += [f"  {o.label}: {o.why()}" for o in p.options]
        return lines
    r = c.result
    assert r is not None
    found = "; ".join(dict.fromkeys(c.candidate.sources))
    lines.append(f"use {c.label} (found by {found})")
    if r.verdict is Verdict.OK and r.tls is not None:
        lines.append(f"  certificate trusted and valid for {r.tls.name or c.candidate.host}")
    elif r.verdict is Verdict.CERTIFICATE and r.tls is not None:
        lines.append(f"  TLS works, but the certificate is {'; '.join(r.tls.problems)}")
    elif r.verdict is Verdict.NO_TLS:
        lines.append("  no encryption offered: the password would cross the network readable")
    lines.append(f"  AUTH {' '.join(c.auth)} offered" if c.auth else
                 "  no AUTH offered: the server must accept this machine without a login")
    by = c.candidate.vouched_by(domain)
    lines.append(f"  vouched for by {by.kind.words} ({by.label})" if by else
                 "  named by an unauthenticated source (plain HTTP or a guess): check that "
                 "this host is really your provider's")
    for concern in c.concerns(domain):
        lines.append(f"  to confirm: {concern}")
    for o in p.refused:
        lines += [f"  refused (nobody to confirm it): {o.label}: {why}"
                  for why in o.concerns(domain)]
    for note in r.notes:
        lines.append(f"  note: {note}")
    others = [o for o in p.options if o is not c]
    if others:
        lines.append("not chosen:")
        for o in others:
            lines.append(f"  {o.label}: {o.why()}")
    return lines


def _connection(p: Plan, address: str, ca_file: Path | None, oauth: bool) -> dict[str, Any]:
    c = p.chosen
    assert c is not None and c.result is not None
    host = c.candidate.host
    conn: dict[str, Any] = {"transport": "smtp", "host": host, "port": c.candidate.port,
                            "security": c.security}
    # A certificate issued for another name is never taken as tls_server_name here: that
    # needs the user's yes (Plan.cert_name; the command asks, and --yes refuses).
    if not _system_resolves(host) and c.addresses:
        # Found through the DNS server the wizard was given, which this machine's own
        # resolver (the one delivery uses) does not ask: connect by address, and still
        # check the certificate against the name.
        conn["host"] = c.addresses[0]
        conn["tls_server_name"] = host
        p.notes.append(f"{host} resolves only through the DNS server given, not through this "
                       f"machine's resolver: saved as its address {c.addresses[0]} with "
                       f"tls_server_name = \"{host}\"")
    if ca_file is not None and c.security != "none":
        conn["ca_file"] = str(ca_file.resolve())
    if c.auth:
        login = c.candidate.username or (p.provider.login(address) if p.provider else address)
        conn["username"] = login
        if oauth:
            conn["auth"] = "oauthbearer" if "XOAUTH2" not in c.auth and \
                "OAUTHBEARER" in c.auth else "xoauth2"
    return conn
