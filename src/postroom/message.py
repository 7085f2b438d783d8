"""Compose and parse MIME (EmailMessage with the SMTP policy: CRLF, RFC 2047/2231)."""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate, make_msgid
from pathlib import Path

from postroom.exceptions import MessageError


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
