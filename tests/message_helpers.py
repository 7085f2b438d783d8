"""Reading composed messages back in tests, with decoders that follow the RFCs.

The standard library's structured-header parser inserts a space between adjacent RFC 2047
encoded-words in a display name (RFC 2047 section 6.2 says the whitespace between them is
ignored), so it cannot read back a long non-ASCII name, even one that Python itself wrote.
Display names are therefore decoded here with ``email.header.decode_header``, which follows
RFC 2047, from the raw field."""

from __future__ import annotations

import email
import email.policy
import re
from email.header import decode_header, make_header
from email.message import EmailMessage

from postroom.headers import split_addresses


def parse(raw: bytes) -> EmailMessage:
    """Parsed as text: the stdlib's bytes parser would surrogate-escape UTF-8 addresses.
    (A message read from a Maildir has LF line ends; one from Postroom has CRLF.)"""
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def raw_field(raw: bytes, name: str) -> str:
    """The unfolded value of the first ``name`` field in the header section of ``raw``."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8")
    m = re.search(rf"(?im)^{re.escape(name)}:[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)", head)
    assert m is not None, f"no {name} field"
    return re.sub(r"\n(?=[ \t])", "", m.group(1))


def mailboxes(raw: bytes, name: str) -> list[tuple[str, str]]:
    """(display name, address) of every mailbox in the field ``name`` as Postroom writes
    them: ``addr``, ``atoms <addr>``, ``"quoted" <addr>`` or ``=?...?= ... <addr>``.
    (Commas are split outside quotes and angle brackets; encoded-words hold none.)"""
    out: list[tuple[str, str]] = []
    for item in split_addresses(raw_field(raw, name)):
        if item.endswith(">") and "<" in item:
            lt = item.rindex("<")
            out.append((decode_phrase(item[:lt]), item[lt + 1 : -1]))
        else:
            out.append(("", item))
    return out


def decode_phrase(phrase: str) -> str:
    phrase = phrase.strip()
    if phrase.startswith('"') and phrase.endswith('"'):
        return re.sub(r"\\(.)", r"\1", phrase[1:-1])
    if "=?" in phrase:
        return str(make_header(decode_header(phrase)))
    return phrase
