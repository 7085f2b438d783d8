"""The stored MIME message, read once into the parts a JSON provider API asks for: text and
HTML bodies, attachments, inline parts (with their Content-ID), From / To / Cc / Bcc /
Reply-To, Subject, the custom header fields, and the message's tags.

A JSON API rebuilds the message from these, so what they cannot hold is refused with an
UnsupportedFeature naming it (``code="unsupported.mime"``), never dropped: a signed or
encrypted message (multipart/signed, multipart/encrypted: the provider's rebuild would break
the signature), a multipart inside an attachment, a second body of one type. Header fields
the provider rebuilds itself (Date, MIME-Version, Content-*) or that describe an earlier hop
(Received, Return-Path, DKIM-Signature: the provider signs with its own key) are left out
and listed in ``rebuilt`` for the transcript.
"""

from __future__ import annotations

import email.policy
import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr, quote
from typing import Any, cast

from postroom.envelope import Envelope
from postroom.exceptions import UnsupportedFeature

# Fields the JSON carries on its own (addresses, subject) or the provider writes itself.
_OWN = frozenset({"from", "to", "cc", "bcc", "reply-to", "subject"})
_REBUILT = frozenset({"date", "mime-version", "content-type", "content-transfer-encoding",
                      "content-disposition", "content-id", "content-description",
                      "received", "return-path", "dkim-signature", "x-postroom-id"})


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str  # "image/png"
    data: bytes
    content_id: str | None = None  # without <>; set for an inline part the HTML shows

    @property
    def inline(self) -> bool:
        return self.content_id is not None


@dataclass
class Mapped:
    """One message as the fields of a JSON API. Addresses are RFC 5322 mailboxes
    ("Name <a@example.com>"), display names decoded."""

    from_: str
    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: list[str] = field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # custom fields, in order
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None
    rebuilt: list[str] = field(default_factory=list)  # fields left to the provider

    @property
    def recipients(self) -> list[str]:
        return [*self.to, *self.cc, *self.bcc]

    def summary(self, size: int) -> str:
        """The request in words for the transcript (a Request's ``summary``), naming the
        header fields left for the provider to write (none is dropped unsaid)."""
        said = f"JSON, {len(self.attachments)} attachment(s), {size} bytes"
        return f"{said}; written by the provider: {', '.join(self.rebuilt)}" if self.rebuilt \
            else said


def _refuse(what: str, title: str) -> UnsupportedFeature:
    return UnsupportedFeature(
        f"{title} builds the message from fields, and {what} has no field there: route such "
        "mail to an SMTP connection (or a provider that takes raw MIME), or send it without",
        code="unsupported.mime")


# RFC 5322 specials: a display name holding one is quoted.
_SPECIALS = re.compile(r'[()<>@,;:\\".\[\]]')


# A message's header fields as stored (raw values), by lower-case name, in order: one pass
# over them serves every field the mapping reads.
_Fields = dict[str, list[tuple[str, str]]]


def _by_name(items: list[tuple[str, str]]) -> _Fields:
    fields: _Fields = {}
    for name, value in items:
        fields.setdefault(name.lower(), []).append((name, value))
    return fields


def _pairs(fields: _Fields, policy: email.policy.EmailPolicy[EmailMessage],
           name: str) -> list[tuple[str, str]]:
    """The (display name, address) pairs of every ``name`` field, display names decoded (a
    JSON API takes Unicode; formataddr would write RFC 2047 encoded-words); no empty
    addresses ("undisclosed-recipients:;")."""
    values = [value if _PLAIN_ADDRESSES.fullmatch(value) and "=?" not in value
              else str(policy.header_fetch_parse(field, value))
              for field, value in fields.get(name, ())]
    return [pair for pair in address_pairs(values) if pair[1]] if values else []


def _mailboxes(pairs: list[tuple[str, str]]) -> list[str]:
    """The pairs as RFC 5322 mailboxes, a display name with specials quoted."""
    out = []
    for display, addr in pairs:
        if display and _SPECIALS.search(display):
            display = f'"{quote(display)}"'
        out.append(f"{display} <{addr}>" if display else addr)
    return out


def missing_recipients(named: set[str], env: Envelope, title: str) -> list[str]:
    """The envelope recipients an API that sends to every address in To/Cc/Bcc must be given
    as Bcc (those the fields do not name; ``named`` in lower case). A field recipient outside
    this delivery cannot be left out there, so that message is refused."""
    wanted = {r.lower() for r in env.recipients}
    extra = sorted(named - wanted)
    if extra:
        raise UnsupportedFeature(
            f"{title} sends to every address in To/Cc/Bcc, and this delivery is for only some "
            f"of them ({', '.join(extra[:5])} are not part of it: a route split the "
            "recipients, or they were delivered already). Route such mail to an SMTP "
            "connection, which delivers to the envelope alone", code="unsupported.recipients")
    return [r for r in env.recipients if r.lower() not in named]


# Header values email.policy.default's header classes would give back unchanged (for
# address fields: whose addresses getaddresses reads the same), so read as they stand: the
# classes' parse was most of the mapping of a small message (bench/https_bench.py). Printable
# ASCII words between single spaces and no RFC 2047 encoded word ("=?"); for addresses
# only "Name <a@b>", "<a@b>" or "a@b", comma-separated, with no quotes, comments, groups
# or dots in names. tests/test_mime_mapping.py holds both ways against each other.
_PLAIN = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*"
_MAILBOX = rf"(?:(?:{_ATEXT} )+<{_ADDR}>|<{_ADDR}>|{_ADDR})"
_PLAIN_ADDRESSES = re.compile(rf"{_MAILBOX}(?:, ?{_MAILBOX})*")
_PLAIN_ID = re.compile(rf"<{_ADDR}>")
# One mailbox of such a list: the display name, or the address within <> or alone.
_MAILBOX_PARTS = re.compile(rf"((?:{_ATEXT} )+)<({_ADDR})>|<({_ADDR})>|({_ADDR})")


def address_pairs(values: list[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses(values)``: (display name, address) pairs. Plain lists
    (_PLAIN_ADDRESSES) are split by a regular expression, which reads them as getaddresses
    does: its parser, with 3.11's checks for parentheses and quotes, was most of a small
    message's mapping once the header classes were out of the way."""
    if all(_PLAIN_ADDRESSES.fullmatch(v) and "=?" not in v for v in values):
        return [((m[1] or "").strip(), m[2] or m[3] or m[4])
                for v in values for m in _MAILBOX_PARTS.finditer(v)]
    return getaddresses(values)
# Fields whose class is not the unstructured one (addresses, dates, MIME parameters) are
# parsed, but for Message-ID written "<id@host>".
_STRUCTURED = frozenset(HeaderRegistry().registry) - {"subject"}


def _plain_value(policy: email.policy.EmailPolicy[EmailMessage], name: str,
                 raw_value: str) -> str:
    """A header field's value as ``str(msg.get(name))`` reads it."""
    low = name.lower()
    if "=?" not in raw_value and (
            _PLAIN_ID.fullmatch(raw_value) if low == "message-id"
            else low not in _STRUCTURED and _PLAIN.fullmatch(raw_value)):
        return raw_value
    return str(policy.header_fetch_parse(name, raw_value))


# Content-Type / Content-Disposition written "type/subtype; name=value; ..." (printable ASCII,
# a value quoted or not, not empty, no quote or backslash inside it; each name once), and a
# Content-Transfer-Encoding token: what their classes write of them is known without the
# parse (each value quoted, "; " between), and the email package's accessors read no more.
_TOKEN = r"[!#$%&+.^_`|~0-9A-Za-z-]+"  # less "*" and "'", RFC 2231's marks
_ATTRIBUTE = r"[!#$&+.^_`|~0-9A-Za-z-]+"  # a parameter's name: no "%" either
_PARAM = re.compile(rf'; ?({_ATTRIBUTE})=(?:({_TOKEN})|"([ !#-\[\]-~]+)")')
_MIME_FIELD = re.compile(rf"({_TOKEN}(?:/{_TOKEN})?)((?:{_PARAM.pattern})*)")
_PARAMETERIZED = {"content-type": True, "content-disposition": False,
                  "content-transfer-encoding": False}  # -> has a subtype


def _mime_field(low: str, value: str) -> str | None:
    """The text email.policy.default's class for the field ``low`` makes of ``value``, when
    known without parsing it; else None."""
    found = _MIME_FIELD.fullmatch(value)
    if found is None or "=?" in value or ("/" in found[1]) != _PARAMETERIZED[low]:
        return None
    params = [(m[1], m[2] if m[2] is not None else m[3]) for m in _PARAM.finditer(found[2])]
    if low == "content-transfer-encoding":
        return None if params else value
    if len({n.lower() for n, _ in params}) != len(params):
        return None
    return found[1] + "".join(f'; {n}="{v}"' for n, v in params)


class _Known(str):
    """A MIME field's value as its header class writes it, parsed by that class only when
    something beyond the text is asked of it (``.params``, ``.fold()``...)."""

    name: str
    _raw: str
    _factory: _ParseOnce

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._factory.parse(self.name, self._raw), attr)


class _ParseOnce(HeaderRegistry):
    """A header factory that parses each field once: email.message's accessors
    (get_content_type, get_filename, get_content...) each parse Content-Type anew, and
    those parses were half the mapping of a small message (bench/https_bench.py); and does
    not parse the plain MIME fields at all (_mime_field). One per message (see
    map_message), so no parsed header outlives it."""

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        found = self._parsed.get((name, value))
        if found is not None:
            return found
        low = name.lower()
        text = _mime_field(low, value) if low in _PARAMETERIZED else None
        if text is None:
            return self.parse(name, value)
        known = _Known(text)
        known.name, known._raw, known._factory = name, value, self
        # A str as BaseHeader is; the rest on demand.
        found = self._parsed[(name, value)] = cast(BaseHeader, known)
        return found

    def parse(self, name: str, value: str) -> BaseHeader:
        """The field parsed by its class (kept for the next ask)."""
        found = self._parsed.get((name, value))
        if found is None or isinstance(found, _Known):
            found = self._parsed[(name, value)] = super().__call__(name, value)
        return found


def map_envelope(env: Envelope, title: str, *,
                 forbidden_headers: Collection[str] = ()) -> Mapped:
    """The envelope's message as an API that sends to every address in To/Cc/Bcc must get it:
    map_message of the message transports._http.match_headers makes (each envelope
    recipient the fields do not name added as Bcc, a field recipient outside this delivery
    refused), with the header read once for both."""
    return _map(env, env.raw, title, forbidden_headers, match=True)


def map_message(env: Envelope, raw: bytes, title: str, *,
                forbidden_headers: Collection[str] = ()) -> Mapped:
    """``raw`` read into a Mapped as it stands (To/Cc/Bcc as its fields say; the providers
    use map_envelope). ``forbidden_headers``: lower-case field names the provider refuses
    as custom headers."""
    return _map(env, raw, title, forbidden_headers, match=False)


def _map(env: Envelope, raw: bytes, title: str, forbidden_headers: Collection[str], *,
         match: bool) -> Mapped:
    policy = email.policy.default.clone(header_factory=_ParseOnce())
    simple = _simple(raw)
    if simple is not None:
        items, body = simple
        msg = None
    else:
        msg = _parse(raw, policy)
        items = list(msg.raw_items())
    fields = _by_name(items)
    to, cc, bcc = (_pairs(fields, policy, name) for name in ("to", "cc", "bcc"))
    if match:
        named = {addr.lower() for _, addr in (*to, *cc, *bcc)}
        bcc[:0] = [("", r) for r in missing_recipients(named, env, title)]
    froms = _mailboxes(_pairs(fields, policy, "from"))
    if len(froms) != 1:
        raise _refuse(f"a From field with {len(froms)} addresses", title)
    out = Mapped(from_=froms[0], to=_mailboxes(to), cc=_mailboxes(cc), bcc=_mailboxes(bcc),
                 reply_to=_mailboxes(_pairs(fields, policy, "reply-to")),
                 subject=next((_plain_value(policy, name, value)
                               for name, value in fields.get("subject", ())), ""),
                 tags=list(env.tags), metadata=dict(env.metadata))
    # The raw items, then parsing only the fields kept: items() would parse every field with
    # the policy's header classes, Date and Content-Type too, and those dominated the
    # mapping of a small message (bench/https_bench.py).
    for name, raw_value in items:
        low = name.lower()
        if low in _OWN:
            continue
        if low in _REBUILT:
            out.rebuilt.append(name)
            continue
        if low in forbidden_headers:
            raise _refuse(f"the header field {name}", title)
        value = _plain_value(policy, name, raw_value)
        if low == "message-id":
            out.message_id = value.strip()
        out.headers.append((name, value))
    if msg is None:
        ctype, text = body
        if ctype == "text/html":
            out.html = text
        else:
            out.text = text
    else:
        _walk(msg, out, title, top=True)
    if out.text is None and out.html is None:
        out.text = ""  # an empty body: both APIs and readers take an empty text part
    return out


def _parse(raw: bytes, policy: email.policy.EmailPolicy[EmailMessage]) -> EmailMessage:
    """``raw`` parsed as BytesParser would, with a single-part body (not multipart/*, not
    message/*) taken as the rest of the text at once: the parser reads it a line at a time,
    most of the mapping of a 50 KB message (bench/https_bench.py). Anything the header
    block's parse does not end exactly at the first empty line of (a defect, a line break
    other than CRLF or LF) takes the whole parse."""
    end = raw.find(b"\r\n\r\n")
    if end >= 0:
        msg = _header_block(raw[:end].decode("ascii", "surrogateescape"), policy)
        if msg is not None and msg.get_content_maintype() not in ("multipart", "message"):
            msg.set_payload(raw[end + 4:].decode("ascii", "surrogateescape"))
            return msg
    parser = BytesParser(policy=policy)
    ends = [i + 3 if sep == b"\n\r\n" else i + 2
            for sep in (b"\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    if ends:
        end = min(ends)
        msg = parser.parsebytes(raw[:end], headersonly=True)
        if (not msg.defects and msg.get_payload() == ""
                and msg.get_content_maintype() not in ("multipart", "message")):
            msg.set_payload(raw[end:].decode("ascii", "surrogateescape"))
            return msg
    return parser.parsebytes(raw)


# The first line of a header field as the email parser takes it (feedparser's headerRE): a
# name of printable characters but ":", then ":".
_FIELD_START = re.compile(r"[\x21-\x39\x3b-\x7e]+:")


def _header_block(head: str, policy: email.policy.EmailPolicy[EmailMessage],
                  ) -> EmailMessage | None:
    """The header block ``head`` (up to the empty line) read into a message as the email
    parser reads it (_raw_fields): the parser's generator machinery was half the mapping of
    a small message. None where _raw_fields gives none."""
    items = _raw_fields(head)
    if items is None:
        return None
    msg = policy.message_factory(policy=policy)  # type: ignore[misc]
    for name, value in items:
        msg.set_raw(name, value)
    return msg


def _raw_fields(head: str) -> list[tuple[str, str]] | None:
    """The header block ``head`` (up to the empty line) as the (name, raw value) pairs the
    email parser stores, through the policy's header_source_parse. None for anything but
    CRLF lines of fields and their continuations (a bare CR or LF, a line that is no field,
    a Unix "From " line), which the parser reads with its defects."""
    if not head.count("\r") == head.count("\n") == head.count("\r\n"):
        return None
    source_parse = email.policy.default.header_source_parse
    items = []
    field: list[str] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and field:
            field.append(line + "\r\n")
            continue
        if not _FIELD_START.match(line):
            return None
        if field:
            items.append(source_parse(field))
        field = [line + "\r\n"]
    if field:
        items.append(source_parse(field))
    return items


# What a single text body may say of itself for _simple to read it: its type (text/plain or
# text/html) with only these parameters, a charset Python names so (a name the codecs do not
# know raises in get_content), no encoding to undo, and nothing that makes it a file.
_SIMPLE_PARAMS = frozenset({"charset", "format", "delsp"})
_SIMPLE_CHARSETS = frozenset({"utf-8", "us-ascii", "ascii"})
_SIMPLE_CTE = frozenset({"7bit", "8bit", "binary"})
_MIME_NAMES = frozenset({"content-type", "content-disposition", "content-id",
                         "content-transfer-encoding"})


def _simple(raw: bytes) -> tuple[list[tuple[str, str]], tuple[str, str]] | None:
    """A message of one text body read without an EmailMessage: its raw header fields and
    (content type, text) as _walk would read them (get_content_type, get_content), for a
    CRLF message whose Content-Type is absent or a plain text/plain or text/html
    (_SIMPLE_PARAMS, _SIMPLE_CHARSETS), Content-Transfer-Encoding absent or _SIMPLE_CTE,
    Content-Disposition absent or "inline", and no Content-ID. None for anything else, which
    takes _parse: the accessors' parses and lookups were most of a small message's mapping.
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None
    items = _raw_fields(raw[:end].decode("ascii", "surrogateescape"))
    if items is None:
        return None
    mime: dict[str, str] = {}
    for name, value in items:
        low = name.lower()
        if low in _MIME_NAMES:
            if low in mime:
                return None
            mime[low] = value
    if "content-id" in mime:
        return None
    cte = mime.get("content-transfer-encoding")
    if cte is not None and cte.lower() not in _SIMPLE_CTE:
        return None
    disposition = mime.get("content-disposition")
    if disposition is not None and disposition.lower() != "inline":
        return None
    ctype, charset = "text/plain", "ascii"  # email.message's defaults
    given = mime.get("content-type")
    if given is not None:
        found = _MIME_FIELD.fullmatch(given)
        if found is None or "=?" in given:
            return None
        ctype = found[1].lower()
        if ctype not in ("text/plain", "text/html"):
            return None
        seen = set()
        for m in _PARAM.finditer(found[2]):
            name = m[1].lower()
            if name not in _SIMPLE_PARAMS or name in seen:
                return None
            seen.add(name)
            if name == "charset":
                charset = (m[2] or m[3] or "").lower()
                if charset not in _SIMPLE_CHARSETS:
                    return None
    return items, (ctype, raw[end + 4:].decode(charset, "replace"))


def _walk(part: EmailMessage, out: Mapped, title: str, *, top: bool = False) -> None:
    ctype = part.get_content_type()
    if part.is_multipart() and ctype != "message/rfc822":  # a forwarded message: a file
        sub = part.get_content_subtype()
        if sub not in ("mixed", "alternative", "related"):
            raise _refuse(f"a {ctype} part", title)
        if not top and part.get_content_disposition() == "attachment":
            raise _refuse(f"an attachment that is itself {ctype}", title)
        for child in part.iter_parts():
            _walk(cast(EmailMessage, child), out, title)
        return
    disposition = part.get_content_disposition()
    cid = str(part.get("content-id", "")).strip().strip("<>") or None
    body = disposition != "attachment" and part.get_filename() is None and cid is None
    if body and ctype in ("text/plain", "text/html"):
        text = part.get_content()
        if ctype == "text/plain" and out.text is None:
            out.text = text
            return
        if ctype == "text/html" and out.html is None:
            out.html = text
            return
        raise _refuse(f"a second {ctype} body", title)
    if ctype == "message/rfc822":
        inner = part.get_payload(0)
        data = inner.as_bytes() if isinstance(inner, EmailMessage) else b""
    else:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
    name = part.get_filename() or _default_name(ctype, len(out.attachments) + 1)
    out.attachments.append(Attachment(name, ctype, data,
                                      cid if disposition != "attachment" else None))


def mailbox_object(mailbox: str, email: str = "email", name: str = "name") -> dict[str, str]:
    """One RFC 5322 mailbox as Mapped holds it, as the {email, name} object of an API that
    takes them so (its own key names); no name key when there is no display name."""
    plain = _MAILBOX_PARTS.fullmatch(mailbox)
    if plain is not None:  # read as parseaddr reads it (address_pairs): its parse was most
        display = (plain[1] or "").strip()  # of a small message's build
        addr = plain[2] or plain[3] or plain[4]
    else:
        display, addr = parseaddr(mailbox)
    return {email: addr, name: display} if display else {email: addr}


def limit_recipients(m: Mapped, limit: int, title: str) -> None:
    """Refuse a message the API cannot send in one request: one without a To address (the
    JSON APIs require one; "To: undisclosed-recipients:;" names none), or to more
    recipients (To, Cc and Bcc together) than ``limit``: the app sends it in parts, it is
    never cut short here."""
    if not m.to:
        raise UnsupportedFeature(
            f"{title} needs at least one To address, and this message has none (only Cc or "
            "Bcc): put one in To (the sender's own works), or route it to an SMTP connection",
            code="unsupported.recipients")
    if len(m.recipients) > limit:
        raise UnsupportedFeature(
            f"{title} sends one message to at most {limit} recipients (To, Cc and Bcc); this "
            f"one has {len(m.recipients)}: send it in parts", code="unsupported.recipients")


def address_fields(m: Mapped) -> dict[str, object]:
    """``from``, ``to``, ``cc``, ``bcc`` (the last two only when set) as {email, name}
    objects, and ``subject``: the head of the JSON APIs that name them so (MailerSend,
    Mailtrap)."""
    data: dict[str, object] = {"from": mailbox_object(m.from_),
                               "to": [mailbox_object(a) for a in m.to], "subject": m.subject}
    for key, values in (("cc", m.cc), ("bcc", m.bcc)):
        if values:
            data[key] = [mailbox_object(a) for a in values]
    return data


def labels_json(m: Mapped) -> str | None:
    """Postroom's tags and metadata as one JSON text ``{"tags": [...], "metadata": {...}}``,
    for an API whose only place for them is a string it echoes in its events (Elastic
    Email's Postback, ZeptoMail's client_reference); None when there are neither."""
    labels: dict[str, object] = {}
    if m.tags:
        labels["tags"] = list(m.tags)
    if m.metadata:
        labels["metadata"] = dict(m.metadata)
    return json.dumps(labels, ensure_ascii=False) if labels else None


def header_dict(m: Mapped, title: str) -> dict[str, str]:
    """The custom header fields as one JSON object (name -> value), for APIs that take them
    so: a field given twice has no place there, and is refused rather than losing one."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in m.headers:
        if name.lower() in seen:
            raise _refuse(f"the header field {name}, given twice,", title)
        seen.add(name.lower())
        out[name] = value
    return out


def _default_name(ctype: str, n: int) -> str:
    ext = {"message/rfc822": "eml", "text/plain": "txt", "text/html": "html",
           "text/calendar": "ics"}.get(ctype, ctype.rpartition("/")[2] or "bin")
    return f"part-{n}.{ext}"
