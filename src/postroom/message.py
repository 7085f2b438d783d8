"""Compose and parse MIME (EmailMessage with the SMTP policy: CRLF, RFC 2047/2231)."""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate, make_msgid
from pathlib import Path

from postroom.envelope import Envelope, validate_address
from postroom.exceptions import MessageError


@dataclass(slots=True)
class Attachment:
    """A file to attach. With ``content_id`` it is an inline part that the HTML shows with
    ``<img src="cid:CONTENT_ID">``."""

    filename: str
    content: bytes
    content_type: str | None = None  # guessed from the file name when not given
    content_id: str | None = None


@dataclass(slots=True)
class Draft:
    """A message to compose, as every composing door (CLI, HTTP API, Python API) gives it."""

    from_: str  # "Name <addr>" or "addr"
    to: Sequence[str] = ()
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()  # envelope only, never a header
    reply_to: Sequence[str] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: Sequence[Attachment] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    envelope_sender: str | None = None  # default: the From address


def build(
    draft: Draft,
    *,
    source: str = "",
    connection: str | None = None,
    tags: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
    not_before: float | None = None,
) -> Envelope:
    """Compose ``draft`` and wrap it for the queue: envelope sender and every recipient
    (To, Cc and Bcc) validated, raw MIME with CRLF line ends."""
    from email.utils import getaddresses, parseaddr

    sender = draft.envelope_sender or parseaddr(draft.from_)[1]
    rcpts = [a for _, a in getaddresses([*draft.to, *draft.cc, *draft.bcc]) if a]
    for addr in (sender, *rcpts):
        validate_address(addr)
    if not rcpts:
        raise MessageError("a message needs at least one recipient (to, cc or bcc)",
                           code="message.no_recipients")
    headers = list(draft.headers.items())
    if draft.reply_to:
        headers.append(("Reply-To", ", ".join(draft.reply_to)))
    raw = compose(sender=draft.from_, to=list(draft.to), cc=list(draft.cc),
                  subject=draft.subject, text=draft.text, html=draft.html, headers=headers)
    return Envelope(sender, list(dict.fromkeys(rcpts)), raw, source=source,
                    connection=connection, tags=list(tags), metadata=dict(metadata or {}),
                    not_before=not_before)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip(">") or "postroom.invalid"


def compose(
    *,
    sender: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    attachments: Sequence[Path] = (),
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Build a message; CR or LF in any header value is an error, never a new header."""
    msg = EmailMessage()
    try:
        msg["From"] = sender
        if to:
            msg["To"] = ", ".join(to)
        if cc:
            msg["Cc"] = ", ".join(cc)
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=_domain(sender))
        for name, value in headers:
            msg[name] = value
    except (ValueError, IndexError) as err:
        raise MessageError(f"invalid header: {err}", code="message.header") from err
    if text is None and html is None:
        text = ""
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    for path in attachments:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise MessageError(f"cannot read attachment {path}: {err.strerror}",
                               code="message.attachment") from err
        ctype, _ = mimetypes.guess_type(path.name)
        maintype, _, subtype = (ctype or "application/octet-stream").partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=path.name)
    needs_utf8 = not all(a.isascii() for a in (sender, *to, *cc))
    return msg.as_bytes(policy=SMTPUTF8 if needs_utf8 else SMTP)
