"""What `postroom probe` found: the verdict per port, the recommendation, and the words
for both (shared by the probe, its terminal output and its JSON)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from postroom.diagnostics.https import EndpointResult
from postroom.diagnostics.tlsinfo import TLSInfo


class Verdict(StrEnum):
    OK = "ok"  # TLS with a trusted, matching, valid certificate
    CERTIFICATE = "certificate"  # TLS works, the certificate does not pass
    NO_TLS = "no_tls"  # plain SMTP only
    TLS_FAILED = "tls_failed"  # TLS offered but the handshake (or STARTTLS) fails
    REJECTED = "rejected"  # the server turns us away in its greeting (4xx/5xx)
    NOT_SMTP = "not_smtp"  # open, but not an SMTP server (or closed at once)
    TIMEOUT = "timeout"  # connected, then too slow for the deadline
    REFUSED = "refused"
    DROPPED = "dropped"
    UNREACHABLE = "unreachable"
    DNS = "dns"
    ERROR = "error"


USABLE = (Verdict.OK, Verdict.CERTIFICATE, Verdict.NO_TLS)


@dataclass
class PortResult:
    port: int
    expected: str  # what the port number suggests: "smtps" or "starttls"
    verdict: Verdict = Verdict.ERROR
    stage: str = "dns"  # how far the probe got: dns, connect, banner, ehlo, starttls, tls...
    address: str | None = None
    tcp: str | None = None  # net.Reach value
    connect_ms: float | None = None
    banner: str | None = None
    banner_ms: float | None = None
    security: str | None = None  # how the port speaks: "smtps", "starttls" or "none"
    ehlo: dict[str, str] = field(default_factory=dict)  # before TLS
    ehlo_tls: dict[str, str] | None = None  # after TLS
    tls: TLSInfo | None = None
    trust_error: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    elapsed_ms: float | None = None

    @property
    def capabilities(self) -> dict[str, str]:
        """What a client can use: the EHLO after TLS where there is TLS."""
        return self.ehlo_tls if self.ehlo_tls is not None else self.ehlo

    @property
    def auth(self) -> list[str]:
        return mechanisms(self.capabilities)

    @property
    def usable(self) -> bool:
        return self.verdict in USABLE

    def summary(self) -> str:
        return _summary(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "port": self.port, "verdict": str(self.verdict), "summary": self.summary(),
            "expected": self.expected, "security": self.security, "stage": self.stage,
            "address": self.address, "tcp": self.tcp, "connect_ms": _ms(self.connect_ms),
            "banner": self.banner, "banner_ms": _ms(self.banner_ms),
            "ehlo": self.ehlo, "ehlo_tls": self.ehlo_tls, "auth": self.auth,
            "tls": self.tls.to_dict() if self.tls else None, "error": self.error,
            "notes": self.notes, "transcript": self.transcript,
            "elapsed_ms": _ms(self.elapsed_ms),
        }


@dataclass
class Recommendation:
    port: int
    security: str
    auth: list[str]
    text: str
    connection: dict[str, Any]  # the [[connections]] keys to use

    def to_dict(self) -> dict[str, Any]:
        return {"port": self.port, "security": self.security, "auth": self.auth,
                "text": self.text, "connection": self.connection}


@dataclass
class ProbeReport:
    host: str
    timeout: float
    ports: list[PortResult]
    addresses: list[str] = field(default_factory=list)
    dns_error: str | None = None
    https: list[EndpointResult] | None = None
    proxy: str | None = None
    recommendation: Recommendation | None = None
    summary: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host, "timeout": self.timeout, "addresses": self.addresses,
            "dns_error": self.dns_error, "ports": [p.to_dict() for p in self.ports],
            "https": None if self.https is None else [e.to_dict() for e in self.https],
            "proxy": self.proxy,
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
            "summary": self.summary, "elapsed_ms": _ms(self.elapsed_ms),
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def mechanisms(caps: Mapping[str, str]) -> list[str]:
    return [m.upper() for m in caps.get("AUTH", "").split()]


# -- verdicts in words ---------------------------------------------------------------------------
def _tls_words(r: PortResult) -> str:
    kind = "implicit TLS" if r.security == "smtps" else "STARTTLS"
    version = f" ({r.tls.version})" if r.tls and r.tls.version else ""
    return kind + version


def _summary(r: PortResult) -> str:
    auth = f", AUTH {' '.join(r.auth)}" if r.auth else ", no AUTH offered"
    v = r.verdict
    if v is Verdict.OK:
        return f"{_tls_words(r)}, certificate valid for {r.tls.name if r.tls else '?'}{auth}"
    if v is Verdict.CERTIFICATE:
        problems = "; ".join(r.tls.problems) if r.tls else "not checked"
        return f"{_tls_words(r)} works, but the certificate is {problems}{auth}"
    if v is Verdict.NO_TLS:
        return f"plain SMTP only, no STARTTLS{auth}: never send a password here"
    if v is Verdict.REFUSED:
        return "connection refused (RST): nothing listens there, or a firewall rejects it"
    if v is Verdict.DROPPED:
        return ("no answer at all: the connection is silently dropped by a firewall "
                "(this machine's, the network's or the hosting provider's)")
    if v is Verdict.UNREACHABLE:
        return f"unreachable from this machine: {r.error} (no route, or an ICMP error)"
    if v is Verdict.DNS:
        return f"DNS failure: {r.error}"
    if v is Verdict.REJECTED:
        return f"the server turns this machine away: {r.banner}"
    if v is Verdict.TLS_FAILED:
        return f"TLS does not work: {r.error}"
    if v is Verdict.NOT_SMTP:
        return f"open, but not an SMTP server: {r.error}"
    if v is Verdict.TIMEOUT:
        return f"too slow: {r.error}"
    return f"error: {r.error}"


_VERDICT_RANK = {Verdict.OK: 0, Verdict.CERTIFICATE: 1, Verdict.NO_TLS: 2}


def recommend(report: ProbeReport) -> Recommendation | None:
    """The port to use: a trusted TLS port first, implicit TLS before STARTTLS (RFC 8314
    section 3.3), a port that offers AUTH before one that does not, the submission ports
    before 25/2525, then the fastest."""
    usable = [r for r in report.ports if r.usable]
    if not usable:
        return None

    def rank(r: PortResult) -> tuple[int, int, int, int, float]:
        return (_VERDICT_RANK[r.verdict], 0 if r.auth else 1, 0 if r.security == "smtps" else 1,
                0 if r.port in (465, 587) else 1, r.elapsed_ms or 0.0)

    best = min(usable, key=rank)
    security = best.security or "none"
    words = {"smtps": "implicit TLS", "starttls": "STARTTLS", "none": "no TLS"}[security]
    auth = best.auth
    text = f"use this: {best.port} {words}"
    text += f", AUTH {'/'.join(auth)}" if auth else ", no AUTH offered (the server must know you)"
    conn: dict[str, Any] = {"host": report.host.strip("[]"), "port": best.port,
                            "security": security}
    if best.verdict is Verdict.CERTIFICATE and best.tls is not None:
        if best.tls.name_matches is False and best.tls.certificate is not None:
            names = best.tls.certificate.dns_names or best.tls.certificate.common_names
            if names and not names[0].startswith("*"):
                conn["tls_server_name"] = names[0]
                text += f"; the certificate is for {names[0]}: set tls_server_name"
        if best.tls.trusted is False:
            text += "; the certificate is not trusted here: set ca_file to the server's CA"
        if best.tls.expired:
            text += "; the certificate has expired: tell the server's administrator"
    if best.verdict is Verdict.NO_TLS:
        text += "; no encryption: only on a network you trust, never with a password"
    return Recommendation(best.port, security, auth, text, conn)


def overall(report: ProbeReport) -> list[str]:
    lines: list[str] = []
    if report.recommendation:
        lines.append(report.recommendation.text)
    elif report.dns_error:
        lines.append(f"{report.dns_error}: check the host name (`getent hosts "
                     f"{report.host}`) and this machine's DNS settings")
    else:
        verdicts = {r.verdict for r in report.ports}
        if verdicts == {Verdict.DROPPED}:
            lines.append("every SMTP port is silently dropped: a firewall blocks outgoing "
                         "SMTP from here (cloud providers and some ISPs do this)")
        elif verdicts <= {Verdict.REFUSED, Verdict.DROPPED}:
            lines.append("no SMTP port accepts connections: check the host name and the "
                         "ports your provider documents")
        elif verdicts <= {Verdict.UNREACHABLE, Verdict.DROPPED, Verdict.REFUSED}:
            lines.append("this machine has no route to the server: check its network")
        else:
            lines.append("no port is usable as it is; see each port's verdict")
    for r in report.ports:
        lines.extend(f"{r.port}: {note}" for note in r.notes)
    if report.https is not None and not report.recommendation:
        reachable = [e.provider for e in report.https if e.reachable]
        if reachable:
            lines.append("HTTPS works from here: an API provider is a way out ("
                         + ", ".join(reachable) + ")")
        else:
            lines.append("the providers' HTTPS APIs are not reachable from here either")
    return lines
