"""The unit that flows through Postroom: who sends, to whom, the raw bytes, and where from."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.header import Header, decode_header, make_header

from postroom.exceptions import MessageError

# RFC 5321 4.5.3.1: local part <= 64 octets, domain <= 255, path <= 256.
_MAX_PATH = 256
_LOCAL_RE = re.compile(r"^[^\s<>()\[\]\\,;:@\"]+$|^\"(?:[^\"\\\r\n]|\\.)*\"$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def new_id() -> str:
    """A message id: time-ordered enough for log listing, unique across nodes."""
    # uuid.uuid4().hex without importing uuid (and platform): short-lived commands such as
    # postroom-sendmail, one process per message, make one id each.
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return b.hex()


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


def validate_address(address: str, *, allow_empty: bool = False) -> str:
    """Check an envelope address (RFC 5321 path, SMTPUTF8 allowed); return it unchanged.

    Raises MessageError saying what is wrong, never lets CR/LF or brackets through.
    """
    if address == "":
        if allow_empty:
            return address
        raise MessageError("empty address", code="address.empty")
    if any(c in address for c in "\r\n\x00<> ") or len(address.encode()) > _MAX_PATH:
        raise MessageError(f"malformed address {address!r}", code="address.malformed")
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise MessageError(
            f"malformed address {address!r}: expected local-part@domain", code="address.malformed"
        )
    if len(local.encode()) > 64 or not _LOCAL_RE.match(local):
        raise MessageError(f"malformed local part in {address!r}", code="address.malformed")
    if domain.startswith("[") and domain.endswith("]"):
        return address  # address literal, e.g. [127.0.0.1]
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError as err:
        raise MessageError(f"invalid domain in {address!r}", code="address.malformed") from err
    labels = ascii_domain.rstrip(".").split(".")
    if len(ascii_domain) > 255 or not all(_LABEL_RE.match(lb) for lb in labels):
        raise MessageError(f"invalid domain in {address!r}", code="address.malformed")
    return address


@dataclass(frozen=True, slots=True)
class Summary:
    """Header fields kept beside the raw message for search and listing."""

    message_id: str
    subject: str
    from_: str
    to: str


_SUMMARY_FIELDS = {b"message-id": "message_id", b"subject": "subject", b"from": "from_",
                   b"to": "to"}
_LIMITS = {"message_id": 250, "subject": 250, "from_": 250, "to": 1000}


def _decoded(value: bytes, limit: int) -> str:
    text = value.decode("utf-8", "replace")
    if "=?" in text:  # RFC 2047 encoded words
        # malformed encoded-words: keep the raw text, search still works
        with contextlib.suppress(Exception):
            text = str(make_header(decode_header(text)))
    return " ".join(text.split())[:limit]


def summarize(raw: bytes) -> Summary:
    """Message-ID, Subject, From and To, read from the header section only.

    A plain scan rather than the email package's parser: this runs for every accepted
    message, and the full parser costs several times more for four fields."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    found: dict[str, bytes] = {}
    current: str | None = None
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # folded continuation of the previous field
            if current is not None:
                found[current] += b" " + line.strip()
            continue
        name, colon, value = line.partition(b":")
        current = _SUMMARY_FIELDS.get(name.strip().lower()) if colon else None
        if current is not None:
            if current in found:  # a repeated field: only To may repeat meaningfully
                current = current if current == "to" else None
                if current is not None:
                    found["to"] += b", " + value.strip()
                continue
            found[current] = value.strip()
    return Summary(**{k: _decoded(found.get(k, b""), n) for k, n in _LIMITS.items()})


def header_values(raw: bytes, names: Sequence[str]) -> dict[str, str]:
    """The first value of each of ``names`` (lower case) in the header, decoded (RFC 2047)
    and unfolded; names absent from the message are absent from the result."""
    wanted = set(names)
    found: dict[str, str] = {}
    for f in split_header(raw)[0]:
        name = field_name(f)
        if name in wanted and name not in found:
            found[name] = _decoded(f.partition(b":")[2].replace(b"\r\n", b""), 2000)
    return found


# -- completing a locally submitted message (the sendmail door) --------------------------------
# RFC 5322 3.6.8: a field name is printable US-ASCII except the colon, then the colon.
_FIELD_RE = re.compile(rb"[!-9;-~]+:")
_NAME_SPECIALS = re.compile(r'[][()<>@,:;.\\"]')
# Postfix's message_drop_headers default: a Bcc must never reach the recipients, Return-Path
# is for the final MTA to add (RFC 5321 4.4), Content-Length means nothing in transit.
DROPPED_ON_SUBMISSION = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})
# Address fields whose bare user names ("root", as cron and mailx write) get the local domain.
_ADDRESS_FIELDS = frozenset({"from", "sender", "reply-to", "to", "cc", "resent-from",
                             "resent-sender", "resent-reply-to", "resent-to", "resent-cc"})


def split_header(raw: bytes) -> tuple[list[bytes], bytes]:
    """The header fields of a CRLF message, each with its folded continuation lines (without
    the final CRLF), and the body after the empty line. A line that is neither a field nor a
    continuation ends the header section and starts the body, as Postfix reads it."""
    fields: list[bytes] = []
    pos, size = 0, len(raw)
    while pos < size:
        end = raw.find(b"\r\n", pos)
        line = raw[pos:] if end < 0 else raw[pos:end]
        nxt = size if end < 0 else end + 2
        if not line:
            return fields, raw[nxt:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif _FIELD_RE.match(line):
            fields.append(line)
        else:
            return fields, raw[pos:]
        pos = nxt
    return fields, b""


def field_name(field: bytes) -> str:
    """The lower-case name of a field from :func:`split_header`."""
    return field.partition(b":")[0].strip().lower().decode("ascii")


def field_text(field: bytes) -> str:
    """The unfolded value of a field as text (raw UTF-8 is allowed, RFC 6532)."""
    value = field.partition(b":")[2].replace(b"\r\n", b"")
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise MessageError(
            f"the {field_name(field)!r} header is neither ASCII nor UTF-8; encode it "
            "(RFC 2047) or send it as UTF-8",
            code="message.header",
        ) from err


def mailbox(name: str, address: str) -> str:
    """``Name <address>`` for a header: the name quoted (RFC 5322) or, when it is not ASCII,
    encoded (RFC 2047). CR or LF in either is an error, never a new header."""
    if any(c in name or c in address for c in "\r\n\x00"):
        raise MessageError(f"line break in the name or address {name!r} <{address}>",
                           code="message.header")
    if not name:
        return address
    if not name.isascii():
        shown = Header(name, "utf-8").encode(linesep="\r\n")
    elif _NAME_SPECIALS.search(name):
        shown = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        shown = name
    return f"{shown} <{address}>"


def qualify(address: str, domain: str) -> str:
    """A bare user name such as ``root`` gets ``@domain`` (Postfix: append_at_myorigin)."""
    return address if not address or "@" in address else f"{address}@{domain}"


def _qualified(field: bytes, domain: str) -> bytes:
    from email.utils import getaddresses

    pairs = [(n, a) for n, a in getaddresses([field_text(field)]) if a]
    if all("@" in a for _, a in pairs):
        return field  # the usual case: the field stays byte for byte as it was written
    name = field.partition(b":")[0].decode("ascii")
    return f"{name}: {', '.join(mailbox(n, qualify(a, domain)) for n, a in pairs)}".encode()


def _id_domain(sender: str, domain: str) -> str:
    right = sender.rpartition("@")[2] or domain
    if right.isascii():
        return right
    try:
        return right.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def complete_headers(
    raw: bytes, *, sender: str, domain: str, full_name: str = "", now: float | None = None
) -> bytes:
    """Complete a message submitted on this machine, as Postfix's cleanup(8) does.

    ``raw`` has CRLF line ends. Drops :data:`DROPPED_ON_SUBMISSION`; gives bare user names in
    address fields ``@domain``; adds Message-ID, Date and ``From: full_name <sender>`` when
    they are missing (``MAILER-DAEMON@domain`` for the null sender). Other fields stay byte
    for byte; the empty line between header and body is ensured."""
    from email.utils import formatdate, make_msgid

    fields, body = split_header(raw)
    kept = [
        _qualified(f, domain) if field_name(f) in _ADDRESS_FIELDS else f
        for f in fields
        if field_name(f) not in DROPPED_ON_SUBMISSION
    ]
    present = {field_name(f) for f in kept}
    added = []
    if "message-id" not in present:
        added.append(f"Message-ID: {make_msgid(domain=_id_domain(sender, domain))}")
    if "date" not in present:
        added.append(f"Date: {formatdate(now, localtime=True)}")
    if "from" not in present:
        # As Postfix: the null sender's From is MAILER-DAEMON, without the user's name.
        added.append("From: " + (mailbox(full_name, sender) if sender
                                 else f"MAILER-DAEMON@{domain}"))
    head = b"\r\n".join([*kept, *(line.encode() for line in added)])
    return head + b"\r\n\r\n" + body


@dataclass(slots=True)
class Envelope:
    """A message as handed in: envelope sender and recipients, raw RFC 5322 bytes (CRLF)."""

    sender: str
    recipients: list[str]
    raw: bytes
    source: str = ""  # the door, for the log: "smtp:<app>" / "smtp:trusted" / "cli" ...
    # The owning app, only when a door authenticated it; apps see their own mail by this.
    app: str | None = None
    connection: str | None = None  # pin delivery to one named connection
    id: str = field(default_factory=new_id)
    tags: list[str] = field(default_factory=list)  # the app's labels, searchable
    metadata: dict[str, str] = field(default_factory=dict)  # the app's own key/values
    not_before: float | None = None  # scheduled send (epoch seconds): not delivered earlier
    expires_at: float | None = None  # failed, not sent late, after this (epoch seconds)
    priority: int = 0  # store.schema.PRIORITIES: 1 high, 0 normal, -1 low

    @property
    def smtputf8(self) -> bool:
        return needs_smtputf8(self.sender) or any(needs_smtputf8(r) for r in self.recipients)
