"""Read a stored message for a person to look at: its header fields decoded, the text and
HTML bodies, the attachments (name, type, size) and one part's bytes.

The reverse of postroom.message (which writes MIME): this one reads what any door
accepted, so everything here is hostile input. The standard library's email parser does
the decoding (RFC 2047 words, RFC 2231 parameters, transfer encodings); this module bounds
how much of it is walked and never lets a malformed part raise: a part that cannot be
decoded is listed with what is known of it.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser

# A message is walked up to this many parts (a crafted message can nest thousands of empty
# parts to make every page view slow); what lies past them is not listed.
MAX_PARTS = 500
MAX_HEADERS = 1000
# The HTML preview inlines cid: images up to this many bytes in all; larger ones are dropped.
MAX_INLINE = 4 * 1024 * 1024
_CID = re.compile(r"cid:([^\s\"'<>()]{1,250})", re.IGNORECASE)
_IMAGE_TYPE = re.compile(r"image/[a-z0-9][a-z0-9.+-]{0,60}")


@dataclass(frozen=True)
class Part:
    """One leaf part that is not the text or HTML body shown: an attachment or an inline
    image. ``index`` is its number in the walk, stable for a given message."""

    index: int
    filename: str  # as the message names it (decoded), "" when it names none
    content_type: str
    size: int  # decoded bytes
    content_id: str = ""  # without the angle brackets
    inline: bool = False


@dataclass(frozen=True)
class Body:
    """What a person reads of a message."""

    text: str | None = None
    html: str | None = None
    parts: list[Part] = field(default_factory=list)
    truncated: bool = False  # more than MAX_PARTS parts: the rest is not listed


def _decoded(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a header the parser cannot render: show it raw
        return repr(value)


def headers(raw: bytes) -> list[tuple[str, str]]:
    """Every header field of the message, in order, its value decoded (RFC 2047) and
    unfolded; a value that cannot be decoded is shown as it is stored."""
    head = BytesHeaderParser(policy=policy.default).parsebytes(raw)
    out: list[tuple[str, str]] = []
    for name, value in head.raw_items():
        if len(out) >= MAX_HEADERS:
            break
        try:
            text = str(policy.default.header_fetch_parse(name, value))
        except Exception:  # malformed field: keep its raw text
            text = _decoded(value)
        out.append((name, " ".join(text.split())))
    return out


def _parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)  # policy.default makes EmailMessage
    return msg


def _leaves(msg: Message) -> tuple[list[Message], bool]:
    """The message's leaf parts in order (at most MAX_PARTS), and whether it had more."""
    out: list[Message] = []
    for part in msg.walk():
        if len(out) >= MAX_PARTS:
            return out, True
        if not part.is_multipart():
            out.append(part)
    return out, False


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # a broken transfer encoding: nothing to show
        return b""
    return data if isinstance(data, bytes) else b""


def _text(part: Message) -> str:
    data = _payload(part)
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def _filename(part: Message) -> str:
    try:
        return str(part.get_filename() or "")
    except Exception:  # a malformed RFC 2231 parameter
        return ""


def read(raw: bytes) -> Body:
    """The first text/plain and text/html parts that are not attachments, and every other
    leaf part (attachments, inline images)."""
    leaves, truncated = _leaves(_parse(raw))
    return _body(leaves, truncated)


def _body(leaves: list[Message], truncated: bool) -> Body:
    text = html = None
    parts: list[Part] = []
    for index, part in enumerate(leaves):
        ctype = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        name = _filename(part)
        if disposition != "attachment" and not name:
            if ctype == "text/plain" and text is None:
                text = _text(part)
                continue
            if ctype == "text/html" and html is None:
                html = _text(part)
                continue
        cid = str(part.get("content-id", "") or "").strip().strip("<>")
        parts.append(Part(index=index, filename=name, content_type=ctype,
                          size=len(_payload(part)), content_id=cid,
                          inline=disposition == "inline" or (bool(cid) and not name)))
    return Body(text=text, html=html, parts=parts, truncated=truncated)


def part(raw: bytes, index: int) -> tuple[Part, bytes] | None:
    """Leaf part number ``index`` (as :func:`read` numbers them) and its decoded bytes; None
    when there is no such part or it is one of the bodies shown as text."""
    leaves, truncated = _leaves(_parse(raw))
    found = next((p for p in _body(leaves, truncated).parts if p.index == index), None)
    if found is None:
        return None
    return found, _payload(leaves[index])


def inline_images(raw: bytes, html: str) -> str:
    """``html`` with each ``cid:`` reference to an image part of the message replaced by a
    ``data:`` URI of it (the preview's CSP allows data: images only); references to
    anything else, or past MAX_INLINE bytes in all, become an empty ``cid:`` (nothing)."""
    if "cid:" not in html.lower():
        return html
    leaves, _ = _leaves(_parse(raw))
    images: dict[str, tuple[str, bytes]] = {}
    for leaf in leaves:
        cid = str(leaf.get("content-id", "") or "").strip().strip("<>")
        ctype = leaf.get_content_type()
        if cid and _IMAGE_TYPE.fullmatch(ctype):
            images.setdefault(cid, (ctype, _payload(leaf)))
    budget = [MAX_INLINE]

    def swap(m: re.Match[str]) -> str:
        found = images.get(m.group(1))
        if found is None or len(found[1]) > budget[0]:
            return "cid:"
        budget[0] -= len(found[1])
        # Only base64 characters and a checked type go into the attribute: nothing in it
        # can end the quoted value or start markup.
        return f"data:{found[0]};base64,{base64.b64encode(found[1]).decode('ascii')}"

    return _CID.sub(swap, html)
