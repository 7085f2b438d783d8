"""The unit that flows through Postroom: who sends, to whom, the raw bytes, and where from."""

from __future__ import annotations

import contextlib
import re
import uuid
from dataclasses import dataclass, field
from email.header import decode_header, make_header

from postroom.exceptions import MessageError

# RFC 5321 4.5.3.1: local part <= 64 octets, domain <= 255, path <= 256.
_MAX_PATH = 256
_LOCAL_RE = re.compile(r"^[^\s<>()\[\]\\,;:@\"]+$|^\"(?:[^\"\\\r\n]|\\.)*\"$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def new_id() -> str:
    """A message id: time-ordered enough for log listing, unique across nodes."""
    return uuid.uuid4().hex


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


@dataclass(slots=True)
class Envelope:
    """A message as handed in: envelope sender and recipients, raw RFC 5322 bytes (CRLF)."""

    sender: str
    recipients: list[str]
    raw: bytes
    source: str = ""  # "smtp:<app>" / "smtp:trusted" / "cli" ...
    connection: str | None = None  # pin delivery to one named connection
    id: str = field(default_factory=new_id)
    tags: list[str] = field(default_factory=list)  # the app's labels, searchable
    metadata: dict[str, str] = field(default_factory=dict)  # the app's own key/values
    not_before: float | None = None  # scheduled send (epoch seconds): not delivered earlier

    @property
    def smtputf8(self) -> bool:
        return needs_smtputf8(self.sender) or any(needs_smtputf8(r) for r in self.recipients)
