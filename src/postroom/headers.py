"""Header fields as they go on the wire (RFC 5322), written by hand rather than through
``email.message.EmailMessage``: composition is on the hot path of every composing door, and
the email package's header machinery costs most of a millisecond per message.

- Every value from a door is checked first: CR, LF or NUL is refused (:func:`check_value`),
  so no value can ever start a new header field; names must be RFC 5322 ``ftext``.
- Text (Subject, display names, other unstructured values) that is not plain printable ASCII
  is written as RFC 2047 encoded-words, also in SMTPUTF8 messages: every reader decodes
  them, and a message whose only raw UTF-8 is in addresses can be sent to a server without
  SMTPUTF8 by rewriting IDN domains to A-labels (postroom.idn).
- Addresses keep their UTF-8 (RFC 6532): a UTF-8 local part or a U-label domain.
- Parameters (attachment file names) use RFC 2231 with continuations.
- Lines are folded at 78 characters where the value allows it (RFC 5322 2.1.1).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Sequence

from postroom.exceptions import MessageError

CRLF = "\r\n"
LINE = 78  # RFC 5322 2.1.1: SHOULD; 998 is the hard limit
_MAX_LINE = 998
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # ftext, RFC 5322 3.6.8
_FORBIDDEN = re.compile(r"[\r\n\x00]")
# atext (RFC 5322 3.2.3) words separated by single spaces: a display name written as it is.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")
_PRINTABLE = re.compile(r"[ -~]*")
_WS_CHUNKS = re.compile(r"[ \t]*[^ \t]+|[ \t]+$")
# RFC 2047 5(3): the characters a "Q" encoded-word may carry as they are (phrase rules, the
# strictest, so one encoder serves display names and unstructured text alike).
_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_Q_SAFE = frozenset(_ALNUM + b"!*+-/")
_Q_CHAR = {c: (chr(c) if c in _Q_SAFE else "_" if c == 0x20 else f"={c:02X}") for c in range(256)}
# RFC 2231 attribute-char: what a parameter value may carry unescaped.
_ATTR_SAFE = frozenset(_ALNUM + b"!#$&+-.^_`|~")
_EW_MAX = 75  # RFC 2047 2: an encoded-word is at most 75 characters


def check_value(field: str, value: str) -> str:
    """``value`` unchanged if it can be a header value; a MessageError naming ``field`` if it
    holds CR, LF or NUL (which would end the field and start another: header injection)."""
    if _FORBIDDEN.search(value):
        raise MessageError(
            f"{field} contains a line break (CR or LF) or a NUL character; a header value must "
            "be one line: remove them", code="message.header_injection",
        )
    return value


def check_name(name: str) -> str:
    """``name`` unchanged if it is a valid field name (printable ASCII, no colon or space)."""
    if not _FIELD_NAME.fullmatch(name):
        raise MessageError(
            f"invalid header name {name!r}: use printable ASCII without spaces or ':' "
            "(at most 76 characters), e.g. X-Campaign", code="message.header_name",
        )
    return name


def fold(name: str, pieces: Sequence[str]) -> str:
    """``Name: piece piece ...`` with CRLF, folded before a piece when the line would pass 78
    characters. Pieces are never split; the first always stays on the name's line."""
    return _fold(name, [pieces[0], *(" " + p for p in pieces[1:])])


def _fold(name: str, chunks: Sequence[str]) -> str:
    """Join ``chunks`` (each after the first starts with a space or tab) after ``Name: ``,
    breaking the line before a chunk's whitespace where the line would pass 78 characters.
    Unfolding (removing the CRLFs) gives back exactly the joined chunks."""
    line = f"{name}: {chunks[0]}"
    lines: list[str] = []
    for chunk in chunks[1:]:
        if len(line) + len(chunk) > LINE and chunk.strip():
            lines.append(line)
            line = chunk
        else:
            line += chunk
    lines.append(line)
    if any(len(x) > _MAX_LINE for x in lines):
        raise MessageError(
            f"the {name} header has a word too long for a mail header line (998 characters "
            "at most); shorten it", code="message.header_too_long",
        )
    return CRLF.join(lines) + CRLF


def encoded_words(text: str, first: int = _EW_MAX) -> list[str]:
    """``text`` as RFC 2047 encoded-words in UTF-8, each at most 75 characters (the first
    at most ``first``), never splitting a character. "Q" or "B", whichever is shorter."""
    data = utf8(text)
    q_len = sum(len(_Q_CHAR[c]) for c in data)
    b = 4 * ((len(data) + 2) // 3) < q_len
    prefix = "=?utf-8?b?" if b else "=?utf-8?q?"
    words: list[str] = []
    budget = max(first, 20) - len(prefix) - 2
    chunk = bytearray()
    cost = 0
    for ch in text:
        enc = ch.encode("utf-8")
        add = 0 if b else sum(len(_Q_CHAR[c]) for c in enc)
        size = 4 * ((len(chunk) + len(enc) + 2) // 3) if b else cost + add
        if size > budget and chunk:
            words.append(_word(prefix, bytes(chunk), b))
            chunk.clear()
            cost = 0
            budget = _EW_MAX - len(prefix) - 2
        chunk += enc
        cost += add
    if chunk or not words:
        words.append(_word(prefix, bytes(chunk), b))
    return words


def _word(prefix: str, data: bytes, b: bool) -> str:
    body = binascii.b2a_base64(data, newline=False).decode() if b else "".join(
        _Q_CHAR[c] for c in data)
    return f"{prefix}{body}?="


def utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: not text at all
        raise MessageError(f"{text[:40]!r}... is not valid Unicode text (lone surrogate)",
                           code="message.encoding") from err


def _plain_text(value: str) -> bool:
    """Can ``value`` be written as it is and read back identically? Printable ASCII, single
    spaces, nothing a decoder would take for an encoded-word, words short enough to fold."""
    return (
        bool(_PRINTABLE.fullmatch(value))
        and "=?" not in value
        and "  " not in value
        and value == value.strip(" ")
        and all(len(w) <= LINE - 2 for w in value.split(" "))
    )


def unstructured(name: str, value: str) -> str:
    """A whole unstructured field (Subject, Comments, X-...): as it is when plain ASCII,
    else RFC 2047 encoded-words."""
    if _plain_text(value):
        return fold(name, value.split(" ") if value else [""])
    return fold(name, encoded_words(value, LINE - len(name) - 2))


def text_field(name: str, value: str) -> str:
    """A field whose value the caller gave as text: kept as given (folded at its own
    whitespace) when printable ASCII, so structured values such as ``List-Unsubscribe`` or
    ``In-Reply-To`` stay valid; RFC 2047 encoded-words otherwise."""
    if _PRINTABLE.fullmatch(value.replace("\t", " ")) and value.strip(" \t"):
        return _fold(name, _WS_CHUNKS.findall(value.lstrip(" \t")))
    return unstructured(name, value)


def split_fields(head: bytes) -> list[bytes]:
    """A header section (ending with CRLF) as whole fields: continuation lines joined to
    their field, each field ending with its CRLF."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


# -- addresses --------------------------------------------------------------------------------
Mailbox = tuple[str, str]  # (display name, addr-spec)


def split_addresses(value: str) -> list[str]:
    """Split ``a@x, "Doe, J" <j@y>`` at the commas outside quotes and angle brackets."""
    if "," not in value:  # one address (most often): nothing to walk through
        return [value.strip()] if value.strip() else []
    out: list[str] = []
    start = 0
    quoted = angle = False
    i = 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not angle:
            out.append(value[start:i])
            start = i + 1
        i += 1
    out.append(value[start:])
    return [p.strip() for p in out if p.strip()]


def parse_mailbox(value: str) -> Mailbox:
    """``Name <addr>``, ``"Name" <addr>`` or ``addr`` as (name, addr); names are unquoted."""
    s = value.strip()
    if s.endswith(">") and "<" in s:
        lt = s.rindex("<")
        name, addr = s[:lt].strip(), s[lt + 1 : -1].strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        return name, addr
    return "", s


def mailbox_pieces(name: str, addr: str) -> list[str]:
    """The foldable pieces of one mailbox: its display name as atoms, a quoted string or
    encoded-words, then ``<addr>``."""
    name = name.strip()
    if not name:
        return [addr]
    if _ATOMS.fullmatch(name) and "=?" not in name:
        return [*name.split(" "), f"<{addr}>"]
    if _PRINTABLE.fullmatch(name) and "=?" not in name and len(name) <= 60:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return [f'"{quoted}"', f"<{addr}>"]
    return [*encoded_words(name, 60), f"<{addr}>"]


def address_field(name: str, mailboxes: Iterable[Mailbox]) -> str:
    """``To: a <a@x>, b@y`` folded between (and inside) mailboxes."""
    pieces: list[str] = []
    for n, addr in mailboxes:
        if pieces:
            pieces[-1] += ","
        pieces.extend(mailbox_pieces(n, addr))
    return fold(name, pieces)


# -- parameters (RFC 2045 5.1, RFC 2231) ---------------------------------------------------------
def param(key: str, value: str) -> list[str]:
    """``key=value`` for a Content-Type/Content-Disposition parameter: a quoted string when it
    is short printable ASCII, else RFC 2231 ``key*=utf-8''...`` split into continuations."""
    if (_PRINTABLE.fullmatch(value) and not any(c in value for c in ('"', "\\", "=?"))
            and len(value) <= 60):
        return [f'{key}="{value}"']
    utf8(value)  # a clear error for lone surrogates
    # Percent-encoded per character, so that a continuation never splits one: RFC 2231
    # joins the octets first, but some readers decode each section alone.
    chars = ["".join(chr(c) if c in _ATTR_SAFE else f"%{c:02X}" for c in ch.encode())
             for ch in value]
    if sum(map(len, chars)) <= 60:
        return [f"{key}*=utf-8''{''.join(chars)}"]
    parts = [""]
    for enc in chars:
        if len(parts[-1]) + len(enc) > 60:
            parts.append("")
        parts[-1] += enc
    return [f"{key}*{n}*={'utf-8' + chr(39) * 2 if n == 0 else ''}{p}"
            for n, p in enumerate(parts)]


def params_field(name: str, value: str, params: Sequence[tuple[str, str]]) -> str:
    """``Content-Type: value; a="b"; c*=...`` folded between parameters."""
    pieces = [value]
    for key, v in params:
        for p in param(key, v):
            pieces[-1] += ";"
            pieces.append(p)
    return fold(name, pieces)
