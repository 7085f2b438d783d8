"""Facts about one TLS session and its certificate, and the server-name check.

The probe collects these facts whether or not the certificate is trusted, then judges trust,
name and expiry separately, so that a user learns *what* is wrong ("issued for
mail.example.net", "expired 3 days ago") rather than only that the handshake failed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID


@dataclass
class CertInfo:
    subject: str
    common_names: list[str]
    dns_names: list[str]
    ip_addresses: list[str]
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    self_signed: bool
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject, "common_names": self.common_names,
            "dns_names": self.dns_names, "ip_addresses": self.ip_addresses,
            "issuer": self.issuer, "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(), "self_signed": self.self_signed,
            "key": self.key,
        }


@dataclass
class TLSInfo:
    """One handshake: protocol facts, the leaf certificate, and the three judgements."""

    version: str | None
    cipher: str | None
    bits: int | None
    name: str  # the name the certificate must carry (host, or the --server-name given)
    certificate: CertInfo | None = None
    trusted: bool | None = None  # chain verified against the CA bundle in use
    trust_error: str | None = None  # OpenSSL's reason when not trusted
    name_matches: bool | None = None
    expired: bool | None = None
    days_left: int | None = None
    handshake_ms: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.trusted and self.name_matches and not self.expired)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "cipher": self.cipher, "bits": self.bits,
            "name": self.name, "trusted": self.trusted, "trust_error": self.trust_error,
            "name_matches": self.name_matches, "expired": self.expired,
            "days_left": self.days_left, "handshake_ms": _round(self.handshake_ms),
            "certificate": self.certificate.to_dict() if self.certificate else None,
            "problems": self.problems,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def session_facts(
    version: str | None,
    cipher: tuple[str, str, int] | None,
    der: bytes | None,
    name: str,
    *,
    trusted: bool,
    trust_error: str | None,
    now: dt.datetime | None = None,
) -> TLSInfo:
    """Judge one handshake: ``trusted`` comes from the verifying handshake (or its failure);
    name and expiry are checked here from the certificate itself."""
    info = TLSInfo(version, cipher[0] if cipher else None, cipher[2] if cipher else None, name,
                   trusted=trusted, trust_error=trust_error)
    if not trusted:
        info.problems.append(f"not trusted: {trust_error or 'chain not verified'}")
    if der is None:
        info.problems.append("the server sent no certificate")
        return info
    cert = parse_certificate(der)
    info.certificate = cert
    now = now or dt.datetime.now(dt.UTC)
    info.days_left = (cert.not_after - now).days
    info.expired = now > cert.not_after
    if info.expired:
        info.problems.append(f"expired on {cert.not_after:%Y-%m-%d}")
    elif now < cert.not_before:
        info.expired = True  # not yet valid fails verification the same way
        info.problems.append(f"not valid before {cert.not_before:%Y-%m-%d} (check the clock)")
    info.name_matches = name_matches(name, cert)
    if not info.name_matches:
        names = cert.dns_names + cert.ip_addresses or cert.common_names
        info.problems.append(f"issued for {', '.join(names) or 'no name'}, not {name}")
    return info


def parse_certificate(der: bytes) -> CertInfo:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        common_names=cns,
        dns_names=dns_names,
        ip_addresses=ips,
        issuer=cert.issuer.rfc4514_string(),
        not_before=_utc(cert, "not_valid_before"),
        not_after=_utc(cert, "not_valid_after"),
        self_signed=cert.issuer == cert.subject,
        key=_key_name(cert),
    )


def _utc(cert: x509.Certificate, attr: str) -> dt.datetime:
    # cryptography >= 42 has the timezone-aware *_utc properties; older ones only naive UTC.
    value = getattr(cert, f"{attr}_utc", None)
    if isinstance(value, dt.datetime):
        return value
    naive: dt.datetime = getattr(cert, attr)
    return naive.replace(tzinfo=dt.UTC)


def _key_name(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


def name_matches(name: str, cert: CertInfo) -> bool:
    """RFC 6125 section 6: DNS names against dNSName SANs (a wildcard stands for exactly one
    whole left-most label), IP addresses against iPAddress SANs. The subject CN counts only
    when the certificate has no SAN at all (as OpenSSL does)."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return any(_same_ip(ip, s) for s in cert.ip_addresses)
    host = _a_label(name)
    patterns = cert.dns_names or ([] if cert.ip_addresses else cert.common_names)
    return any(_dns_match(_a_label(p), host) for p in patterns)


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


def _a_label(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def _dns_match(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    if not pattern.startswith("*.") or "*" in pattern[2:]:
        return False
    label, _, rest = host.partition(".")
    # "*.example.com" matches "a.example.com", never "example.com" or "a.b.example.com";
    # and never a wildcard directly under a public suffix such as "*.com".
    return bool(label) and rest == pattern[2:] and "." in rest
