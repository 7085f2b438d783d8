"""Internationalized addresses: IDNA 2008 domains (RFC 5890/5891, with the UTS #46 mapping
browsers and mail clients use) and the SMTPUTF8 fallback (RFC 6531).

A message keeps its addresses as given (U-labels, UTF-8 local parts) and is sent with
SMTPUTF8 when the upstream offers it. When it does not, :func:`downgrade` rewrites what can
be rewritten without changing where mail goes: every non-ASCII *domain*, in the envelope and
in the address header fields, becomes its A-label (``bücher.de`` -> ``xn--bcher-kva.de``).
A non-ASCII *local part* has no ASCII form (RFC 6530 section 7): that message can only go
through a server with SMTPUTF8, and :func:`downgrade` says so with a permanent error.

``idna`` is imported only when a non-ASCII domain shows up: most mail never needs it, and
the import costs milliseconds that a sendmail command would pay on every run.
"""

from __future__ import annotations

import re
from dataclasses import replace

from postroom.envelope import Envelope, validate_address
from postroom.exceptions import MessageError
from postroom.headers import split_fields

# Fields that carry addresses (RFC 5322 3.6.2/3.6.3/3.6.6, RFC 3798, common extensions).
ADDRESS_FIELDS = frozenset({
    b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc", b"resent-from", b"resent-sender",
    b"resent-to", b"resent-cc", b"resent-bcc", b"return-path", b"disposition-notification-to",
    b"return-receipt-to", b"errors-to", b"mail-followup-to", b"mail-reply-to",
    b"delivered-to", b"x-original-to",
})
# An addr-spec in the unquoted text of an address field.
_ADDR = re.compile(r"([^\s<>,;:\"()@\[\]]+)@([^\s<>,;:\"()@\[\]]+)")
_CACHE: dict[str, str] = {}


def ascii_domain(domain: str) -> str:
    """The A-label form of ``domain`` (unchanged when already ASCII); a MessageError saying
    why when it is not a valid IDNA 2008 name."""
    if domain.isascii():
        return domain
    cached = _CACHE.get(domain)
    if cached is not None:
        return cached
    import idna

    try:
        result = idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as err:
        raise MessageError(
            f"{domain!r} is not a valid internationalized domain name (IDNA 2008): {err}",
            code="address.idna",
        ) from err
    if len(_CACHE) < 1024:
        _CACHE[domain] = result
    return result


def check_address(address: str, what: str = "address") -> str:
    """Validate an address with an internationalized domain checked by IDNA 2008 (the
    envelope check alone knows only the older IDNA 2003); return it unchanged."""
    local, at, domain = address.rpartition("@")
    if at and domain and not domain.isascii() and not domain.startswith("["):
        try:
            validate_address(f"{local}@{ascii_domain(domain)}")
        except MessageError as err:
            raise MessageError(f"{what}: {err.message}", code=err.code) from err
        return address
    try:
        return validate_address(address)
    except MessageError as err:
        raise MessageError(f"{what}: {err.message}", code=err.code) from err


def ascii_address(address: str, what: str = "address") -> str:
    """``address`` with an A-label domain; a permanent MessageError if its local part is not
    ASCII (it cannot be written without SMTPUTF8)."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not local.isascii():
        raise MessageError(
            f"the {what} {address} has a non-ASCII local part, which only a server with "
            "SMTPUTF8 (RFC 6531) can accept, and this one does not offer it; send through a "
            "connection whose server supports SMTPUTF8, or use an ASCII address",
            code="message.smtputf8",
        )
    return f"{local}{at}{ascii_domain(domain)}"


def downgrade(env: Envelope) -> Envelope:
    """A copy of ``env`` for a server without SMTPUTF8: envelope addresses and the addresses
    in the header fields with A-label domains. Other header text is left as it is."""
    sender = ascii_address(env.sender, "envelope sender")
    rcpts = [ascii_address(r, "recipient") for r in env.recipients]
    return replace(env, sender=sender, recipients=rcpts, raw=ascii_headers(env.raw))


def ascii_headers(raw: bytes) -> bytes:
    """``raw`` with every non-ASCII domain in its address fields turned into its A-label;
    a MessageError if an address there has a non-ASCII local part."""
    end = raw.find(b"\r\n\r\n")
    head, rest = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 2 :])
    if head.isascii():
        return raw
    out: list[bytes] = []
    for field in split_fields(head):
        name = field.split(b":", 1)[0].strip()
        if name.lower() in ADDRESS_FIELDS and not field.isascii():
            text = field.decode("utf-8", "surrogateescape")
            field = _rewrite_addresses(text, name.decode("ascii", "replace")).encode(
                "utf-8", "surrogateescape")
        out.append(field)
    return b"".join(out) + rest


def _rewrite_addresses(field: str, name: str) -> str:
    """Rewrite addr-specs outside quoted strings and comments (a display name may hold '@')."""
    out: list[str] = []
    start = i = 0
    while i < len(field):
        if field[i] in '"(':
            out.append(_ascii_span(field[start:i], name))
            j = _skip(field, i)
            out.append(field[i:j])
            start = i = j
        else:
            i += 1
    out.append(_ascii_span(field[start:], name))
    return "".join(out)


def _skip(text: str, i: int) -> int:
    """Index just after the quoted string or (nested) comment that starts at ``text[i]``."""
    quote = text[i] == '"'
    depth = 1
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if quote and c == '"':
            return j + 1
        if not quote and c == "(":
            depth += 1
        elif not quote and c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(text)


def _ascii_span(span: str, name: str) -> str:
    if span.isascii():
        return span

    def one(m: re.Match[str]) -> str:
        return ascii_address(f"{m.group(1)}@{m.group(2)}", f"address in the {name} header")

    return _ADDR.sub(one, span)
