"""Ready-made MIME handed to ``POST /messages/raw``: check it, read its envelope, tidy it.

The bytes are kept as they came (a signed message must stay byte-identical) except for what
a submission server does too (RFC 6409 8, as Postfix's cleanup): lone LFs become CRLF;
Bcc, Resent-Bcc, Return-Path and Content-Length are removed (a Bcc must never reach a
recipient); a missing Date or Message-ID is added (envelope.complete_headers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import errors as email_errors
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses

from postroom.envelope import complete_headers, field_text
from postroom.exceptions import MessageError
from postroom.ingress.accept import crlf

_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 3.6.8 ftext: printable but ':'
# Structural damage that would deliver something other than what the app meant to send.
_FATAL = (
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.CloseBoundaryNotFoundDefect,
    email_errors.MultipartInvariantViolationDefect,
    email_errors.FirstHeaderLineIsContinuationDefect,
    email_errors.MissingHeaderBodySeparatorDefect,
)
_FIX = ("send a complete RFC 5322 message: header fields (From:, To:, Subject: ...), an empty "
        "line, then the body")


@dataclass(frozen=True, slots=True)
class RawMessage:
    raw: bytes  # CRLF line ends, without Bcc, with Date and Message-ID
    sender: str  # the From address (default envelope sender)
    recipients: list[str]  # To, Cc and Bcc addresses (default envelope recipients)


def _malformed(what: str) -> MessageError:
    return MessageError(f"malformed message: {what}; {_FIX}", code="raw.malformed")


def _fields(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, the whole field with its folded lines) for each header field.
    Stricter than a mail server's reading: a line that is not a field is an error here, not
    the start of the body, since an API client can be told and fix it."""
    out: list[tuple[str, bytes]] = []
    for n, line in enumerate(head.split(b"\r\n"), 1):
        if line[:1] in (b" ", b"\t"):
            if not out:
                raise _malformed("the first line is indented, so it is not a header field")
            prev, field = out[-1]
            out[-1] = (prev, field + b"\r\n" + line)
            continue
        raw_name, colon, _ = line.partition(b":")
        raw_name = raw_name.rstrip(b" \t")
        if not colon or not _NAME.match(raw_name):
            shown = line[:60].decode("utf-8", "replace")
            raise _malformed(f"header line {n} ({shown!r}) is not a 'Name: value' field")
        out.append((raw_name.decode("ascii").lower(), line))
    return out


def _addresses(fields: list[tuple[str, bytes]], *names: str) -> list[str]:
    values = [field_text(f) for n, f in fields if n in names]
    return [addr for _, addr in getaddresses(values) if addr]


def check(raw: bytes, hostname: str) -> RawMessage:
    """Validate ``raw`` (a whole message) and derive its default envelope."""
    if not raw.strip():
        raise MessageError(f"the request body is empty; {_FIX}", code="raw.empty")
    raw = crlf(raw)  # a bare CR is left for ingress.accept to refuse, with NUL bytes
    fields = _fields(raw.partition(b"\r\n\r\n")[0])
    msg = BytesParser(policy=compat32).parsebytes(raw)
    for part in msg.walk():
        for defect in part.defects:
            if isinstance(defect, _FATAL):
                kind = type(defect).__name__.removesuffix("Defect")
                raise _malformed(f"{kind} in a {part.get_content_type()} part")
    froms = [f for n, f in fields if n == "from"]
    if not froms:
        raise MessageError("the message has no From: header; add one (RFC 5322 3.6.2), "
                           "e.g. 'From: Shop <shop@example.com>'", code="message.no_from")
    if len(froms) > 1:
        raise _malformed("more than one From: field (RFC 5322 3.6 allows one)")
    senders = _addresses(fields, "from")
    if not senders:
        raise MessageError(f"no address in the From: header {field_text(froms[0])!r}; write it "
                           "as 'Name <addr@example.com>' or 'addr@example.com'",
                           code="message.no_from")
    recipients = list(dict.fromkeys(_addresses(fields, "to", "cc", "bcc")))
    tidy = complete_headers(raw, sender=senders[0], domain=hostname)
    return RawMessage(raw=tidy, sender=senders[0], recipients=recipients)
