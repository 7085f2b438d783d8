"""DKIM (RFC 6376): keys kept encrypted in the instance's secret store, the DNS record that
publishes them, and signing at delivery time.

A connection signs what it sends when it has a ``dkim`` table::

    [[connections]]
    name = "primary"
    ...
    dkim = { domain = "example.com", selector = "postroom" }   # headers = [...] optional

The private key lives in the secret store under ``dkim:<domain>:<selector>`` (Fernet, the
instance key), written by ``postroom dkim keygen``. Each delivery attempt signs the exact
bytes it sends, after the message policy has rewritten them (a forced From or added header
is covered by the signature; the stored message stays unsigned, so a retry or a resend signs
afresh with the current time). Signing runs in a thread: RSA and the body hash of a large
message must not stall the event loop.

Relaxed/relaxed canonicalisation (survives the header re-folding and trailing-space changes
that relays make), rsa-sha256 (RFC 8301: verifiers refuse keys under 1024 bits, 2048 is the
size to use).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from postroom.exceptions import ConfigError, MessageError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from postroom.envelope import Envelope
    from postroom.transports.base import Transport

SELECTOR_RE = r"^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*$"
DEFAULT_BITS = 2048
MIN_BITS = 1024  # RFC 8301 3.2: verifiers MUST NOT accept smaller RSA keys
MAX_TXT_STRING = 255  # RFC 1035 3.3.14: one character-string


class DkimSettings(BaseModel):
    """A connection's ``dkim`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)  # see settings
    domain: str = Field(min_length=1)  # d=: the domain that takes responsibility (From's)
    selector: str = Field(pattern=SELECTOR_RE)  # s=: <selector>._domainkey.<domain>
    # Header fields to sign (h=); default: those of RFC 6376 5.4.1 present in the message,
    # with From signed twice so that a second From cannot be added after signing.
    headers: list[str] | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return check_domain(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not any(h.lower() == "from" for h in v):
            raise ValueError("headers must include From (RFC 6376 5.4)")
        for h in v:
            if not re.fullmatch(r"[!-9;-~]+", h):
                raise ValueError(f"{h!r} is not a header field name")
        return v


def check_domain(domain: str) -> str:
    """The domain as an A-label (d= is ASCII), lower case; ValueError when it is not one."""
    from postroom.envelope import validate_address
    from postroom.idn import ascii_domain

    d = domain.strip().rstrip(".").lower()
    try:
        validate_address(f"postmaster@{d}")
        return ascii_domain(d)
    except MessageError as err:
        raise ValueError(f"{domain!r} is not a domain name, e.g. example.com") from err


def secret_name(domain: str, selector: str) -> str:
    return f"dkim:{domain.lower()}:{selector}"


def dns_name(domain: str, selector: str) -> str:
    return f"{selector}._domainkey.{domain}"


# -- keys and records ----------------------------------------------------------------------------
def public_key_b64(private_pem: str) -> str:
    """The p= value: base64 of the DER SubjectPublicKeyInfo (RFC 6376 3.6.1)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode("ascii")


def record_value(private_pem: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_key_b64(private_pem)}"


def split_txt(value: str, size: int = MAX_TXT_STRING) -> list[str]:
    """A TXT value longer than one DNS string (255 bytes) as the strings to publish; the
    reader joins them without spaces (RFC 6376 3.6.2.2)."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def zone_line(domain: str, selector: str, value: str) -> str:
    """The record in zone-file syntax, split into quoted strings."""
    strings = " ".join(f'"{s}"' for s in split_txt(value))
    return f"{dns_name(domain, selector)}. IN TXT ( {strings} )"


@dataclass(frozen=True)
class KeyInfo:
    domain: str
    selector: str
    bits: int
    record: str  # the TXT value

    @property
    def name(self) -> str:
        return dns_name(self.domain, self.selector)

    @property
    def strings(self) -> list[str]:
        return split_txt(self.record)

    @property
    def zone_line(self) -> str:
        return zone_line(self.domain, self.selector, self.record)

    def to_dict(self) -> dict[str, object]:
        return {"domain": self.domain, "selector": self.selector, "bits": self.bits,
                "name": self.name, "type": "TXT", "value": self.record,
                "strings": self.strings, "zone": self.zone_line}


def key_bits(private_pem: str) -> int:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return int(getattr(key, "key_size", 0))


def keygen(secrets_get: Callable[[str], str | None], secrets_set: Callable[[str, str], None],
           domain: str, selector: str, bits: int = DEFAULT_BITS, *,
           force: bool = False) -> KeyInfo:
    """A new RSA key for ``selector._domainkey.domain``, stored encrypted; refuses to replace
    an existing one unless ``force`` (mail signed with it would stop verifying the moment
    the new key is published: rotate with a new selector instead)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        domain = check_domain(domain)
    except ValueError as err:
        raise ConfigError(f"--domain: {err}", code="dkim.domain") from err
    if not re.fullmatch(SELECTOR_RE, selector):
        raise ConfigError(f"--selector {selector!r}: letters, digits, '-' and '_', labels "
                          "separated by dots (e.g. postroom, s2026)", code="dkim.selector")
    if not MIN_BITS <= bits <= 4096 or bits % 8:
        raise ConfigError(f"--bits {bits}: use 2048 (1024 is the minimum receivers accept, "
                          "4096 the most that fits DNS well)", code="dkim.bits")
    name = secret_name(domain, selector)
    if secrets_get(name) is not None and not force:
        raise ConfigError(
            f"a DKIM key for {dns_name(domain, selector)} already exists; rotate with a new "
            "selector (publish its record, switch the connection's dkim.selector, remove the "
            "old record a week later), or replace this one with --force",
            code="dkim.exists")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode("ascii")
    secrets_set(name, pem)
    return KeyInfo(domain, selector, bits, record_value(pem))


def stored(secrets_get: Callable[[str], str | None], domain: str,
           selector: str) -> KeyInfo | None:
    pem = secrets_get(secret_name(domain, selector))
    if pem is None:
        return None
    return KeyInfo(domain, selector, key_bits(pem), record_value(pem))


def stored_keys(engine: Engine) -> list[tuple[str, str]]:
    """(domain, selector) of every DKIM key in the secret store."""
    from sqlalchemy import select

    from postroom.store.schema import secrets

    with engine.connect() as conn:
        names = conn.execute(select(secrets.c.name).where(
            secrets.c.name.like("dkim:%"))).scalars().all()
    out = []
    for n in names:
        _, domain, selector = n.split(":", 2)
        out.append((domain, selector))
    return sorted(out)


# -- published records ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedKey:
    """A DKIM key record as found in DNS."""

    text: str
    tags: dict[str, str]
    key_type: str = "rsa"
    bits: int | None = None
    revoked: bool = False  # empty p=
    error: str | None = None

    @property
    def p(self) -> str:
        return re.sub(r"\s+", "", self.tags.get("p", ""))


def parse_record(text: str) -> PublishedKey:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        k, eq, v = part.partition("=")
        if eq:
            tags[k.strip().lower()] = v.strip()
    if tags.get("v", "DKIM1") != "DKIM1":
        return PublishedKey(text, tags, error=f"v={tags['v']}: must be DKIM1")
    if "p" not in tags:
        return PublishedKey(text, tags, error="no p= tag (the public key)")
    k = tags.get("k", "rsa").lower()
    p = re.sub(r"\s+", "", tags["p"])
    if not p:
        return PublishedKey(text, tags, k, revoked=True)
    try:
        der = base64.b64decode(p, validate=True)
    except ValueError:
        return PublishedKey(text, tags, k, error="p= is not valid base64")
    if k == "ed25519":  # RFC 8463: the raw 32-byte key
        ok = len(der) == 32
        return PublishedKey(text, tags, k, 256 if ok else None,
                            error=None if ok else "an ed25519 key must be 32 bytes")
    if k != "rsa":
        return PublishedKey(text, tags, k, error=f"k={k}: unknown key type")
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        try:  # some publish the bare RSAPublicKey (PKCS#1) instead of SubjectPublicKeyInfo
            from cryptography.hazmat.primitives.serialization import load_der_public_key

            key = load_der_public_key(_pkcs1_to_spki(der))
        except ValueError:
            return PublishedKey(text, tags, k, error="p= is not an RSA public key")
    return PublishedKey(text, tags, k, int(getattr(key, "key_size", 0)) or None)


def _pkcs1_to_spki(der: bytes) -> bytes:
    """Wrap a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (rsaEncryption, NULL)."""
    def length(n: int) -> bytes:
        if n < 0x80:
            return bytes([n])
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([0x80 | len(b)]) + b

    algo = bytes.fromhex("300d06092a864886f70d0101010500")
    bitstring = b"\x03" + length(len(der) + 1) + b"\x00" + der
    body = algo + bitstring
    return b"\x30" + length(len(body)) + body


# -- signing -------------------------------------------------------------------------------------
def sign(raw: bytes, settings: DkimSettings,
         secrets_get: Callable[[str], str | None]) -> bytes:
    """``raw`` with a DKIM-Signature field in front (the exact bytes then sent)."""
    import dkim as dkimpy

    pem = secrets_get(secret_name(settings.domain, settings.selector))
    if pem is None:
        raise ConfigError(
            f"no DKIM key for {dns_name(settings.domain, settings.selector)} in this "
            f"instance's secret store; create it with `postroom dkim keygen --domain "
            f"{settings.domain} --selector {settings.selector}` (the mail waits meanwhile)",
            code="dkim.key_missing", permanent=False)
    headers = [h.encode() for h in settings.headers] if settings.headers else None
    try:
        sig = dkimpy.sign(raw, settings.selector.encode(), settings.domain.encode(),
                          pem.encode(), canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=headers, linesep=b"\r\n")
    except dkimpy.DKIMException as err:
        raise MessageError(f"DKIM signing failed: {err} (does the message have a From "
                           "header?)", code="dkim.sign") from err
    return bytes(sig) + raw


async def sign_envelope(env: Envelope, transport: Transport | None) -> Envelope:
    """The envelope to send: signed when the connection has a ``dkim`` table."""
    cfg = getattr(transport.settings, "dkim", None) if transport is not None else None
    if transport is None or cfg is None:
        return env
    # Here, not at the top: settings imports this module, and postroom-sendmail, which starts
    # once per message, has no event loop.
    import asyncio

    raw = await asyncio.to_thread(sign, env.raw, cfg, transport.ctx.stored_secret)
    return replace(env, raw=raw)
