"""DSNs (RFC 3464) for SMTP connections: a signed return path out, the report read back in.

With a ``[bounces]`` section, mail sent through the connections it names carries a VERP
return path (the envelope sender, RFC 5321 4.1.2) that names the message and is signed::

    [bounces]
    address = "bounces@example.com"       # mail for it must reach Postroom's SMTP listener
    connections = ["relay"]               # SMTP connections whose mail uses it
    networks = ["192.0.2.25/32"]          # where DSNs come from (default: trusted_networks)

    MAIL FROM:<bounces+0f3c...9a.k2m7q4x1zt5w3b8d@example.com>
                       ^ message id (32 hex)  ^ HMAC tag

The tag is 80 bits of HMAC-SHA256, under a key derived from the instance key, of the message
id: a report to an address whose tag does not match is refused at RCPT, so nobody can forge
a bounce (and with it a suppression) for a message Postroom sent, let alone invent one. The
message's recipients see the return path, so a recipient could report on that one message:
only its own recipients' states are taken from the report (postroom.webhooks.intake).

One return path per message, not per recipient (classic VERP): Postroom sends a message in
one transaction, whatever its number of recipients; the report's Final-Recipient fields say
which recipient it is about.

A report arriving at the listener (postroom.ingress.smtpd) for such an address is parsed
here with the standard library's email package (multipart/report; report-type=
delivery-status: the message/delivery-status part's per-recipient fields; the original's
Message-ID from text/rfc822-headers or message/rfc822) and recorded as delivery events
(bounced, deferred, delivered) on the message, never queued for delivery. A client outside
``networks`` may send such a report without AUTH only with the null reverse path (``<>``,
which RFC 3464 section 2 and RFC 5321 4.5.5 prescribe for reports).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from postroom.exceptions import ConfigError, EventError
from postroom.secrets import LazyKey, load_or_create_key
from postroom.settings import SectionModel, Settings, check_networks, register_section
from postroom.webhooks import DeliveryEvent, Kind

if TYPE_CHECKING:
    from email.message import Message

    from postroom.queue.sql import Queue
    from postroom.webhooks.intake import Recorded

_PURPOSE = b"postroom verp v1"
_TAG_BYTES = 10  # 80 bits: 16 base32 characters
_VERP = re.compile(r"\+([0-9a-f]{32})\.([a-z2-7]{16})@", re.IGNORECASE)
MAX_RECIPIENTS = 100  # per-recipient blocks read from one report


class BounceSettings(SectionModel):
    """[bounces]: the address DSNs come back to, for mail sent through some connections."""

    address: str = ""  # "": DSNs are not asked for (no VERP return path)
    connections: list[str] = Field(default_factory=list)  # the SMTP connections that ask for DSNs
    networks: list[str] = Field(default_factory=list)  # []: server.trusted_networks

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        local, at, domain = v.rpartition("@")
        if v and (not at or not local or not domain or "+" in local or not v.isascii()):
            raise ValueError("write an ASCII address without '+', e.g. bounces@example.com "
                             "(Postroom adds +MESSAGE.TAG to it)")
        return v

    @field_validator("networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        return check_networks(v)


register_section("bounces", BounceSettings)


def configured(settings: Settings) -> BounceSettings | None:
    """The [bounces] section when it names an address, else None; ConfigError when it names
    a connection that is not an SMTP one of this configuration."""
    if not any(name == "bounces" for name, _ in settings.features):
        return None
    section = settings.section(BounceSettings)
    smtp = {c.name for c in settings.connections if c.transport == "smtp"}
    wrong = [name for name in section.connections if name not in smtp]
    if wrong:
        raise ConfigError(
            f"[bounces] connections names {', '.join(map(repr, wrong))}, not an SMTP "
            "connection of this configuration; list SMTP connections only (HTTPS API "
            "providers report bounces through their webhooks)", code="config.bounces")
    return section if section.address else None


class Verp:
    """Signed return paths: :meth:`address` for a message, :meth:`message_of` back."""

    def __init__(self, address: str, key: LazyKey | bytes) -> None:
        self.local, _, self.domain = address.rpartition("@")
        self._key = key if isinstance(key, LazyKey) else LazyKey(key, _PURPOSE)

    @classmethod
    def of(cls, settings: Settings, section: BounceSettings) -> Verp:
        from postroom.runtime import key_file

        return cls(section.address, LazyKey(lambda: load_or_create_key(key_file(settings)),
                                            _PURPOSE))

    def _tag(self, msg_id: str) -> str:
        digest = hmac.new(self._key(), msg_id.encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:_TAG_BYTES]).decode().lower()

    def address(self, msg_id: str) -> str:
        return f"{self.local}+{msg_id}.{self._tag(msg_id)}@{self.domain}"

    def is_ours(self, address: str) -> bool:
        """Whether ``address`` is the bounce address, with or without a tag (valid or not):
        mail to it is never relayed."""
        local, _, domain = address.rpartition("@")
        base = local.split("+", 1)[0]
        return base.lower() == self.local.lower() and domain.lower() == self.domain.lower()

    def message_of(self, address: str) -> str | None:
        """The message id a return path names, when its tag is right (compared in constant
        time); None for any other address."""
        if not self.is_ours(address):
            return None
        m = _VERP.search(address)
        if m is None:
            return None
        msg_id, tag = m.group(1).lower(), m.group(2).lower()
        return msg_id if hmac.compare_digest(tag, self._tag(msg_id)) else None


# -- reading a report ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipientReport:
    """One per-recipient block of a message/delivery-status part (RFC 3464 2.3)."""

    recipient: str
    action: str  # failed | delayed | delivered | relayed | expanded
    status: str  # "5.1.1"
    diagnostic: str = ""
    remote_mta: str = ""


@dataclass(frozen=True)
class Report:
    """A parsed DSN: the reporting MTA, the original's Message-ID, each recipient's state."""

    reporting_mta: str
    original_message_id: str | None
    recipients: list[RecipientReport] = field(default_factory=list)
    dsn_message_id: str = ""


def _typed(value: str | None) -> str:
    """A typed field's value ("rfc822; user@example.com", "smtp; 550 ...") without its type."""
    text = " ".join((value or "").split())
    kind, sep, rest = text.partition(";")
    return rest.strip() if sep and kind.strip().replace("-", "").isalnum() else text


def parse(raw: bytes) -> Report:
    """The DSN in ``raw``; EventError when it is not a delivery-status report."""
    from email import message_from_bytes
    from email.policy import compat32

    msg = message_from_bytes(raw, policy=compat32)
    status_part = original = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status" and status_part is None:
            status_part = part
        elif ctype in ("text/rfc822-headers", "message/rfc822") and original is None:
            original = part
    if msg.get_content_type() != "multipart/report" or status_part is None:
        raise EventError("not a delivery status notification (RFC 3464: multipart/report "
                         "with a message/delivery-status part)", code="dsn.invalid")
    from email.message import Message

    payload = status_part.get_payload()
    blocks = [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []
    if not blocks:
        raise EventError("the DSN's message/delivery-status part is empty",
                         code="dsn.invalid")
    per_message = blocks[0]
    recipients = []
    for block in blocks[1: 1 + MAX_RECIPIENTS]:
        rcpt = _typed(block.get("Final-Recipient") or block.get("Original-Recipient"))
        action = (block.get("Action") or "").strip().lower()
        if not rcpt or not action:
            continue
        recipients.append(RecipientReport(
            recipient=rcpt, action=action, status=(block.get("Status") or "").strip(),
            diagnostic=_typed(block.get("Diagnostic-Code"))[:500],
            remote_mta=_typed(block.get("Remote-MTA"))))
    if not recipients:
        raise EventError("the DSN reports on no recipient (no Final-Recipient and Action)",
                         code="dsn.invalid")
    return Report(reporting_mta=_typed(per_message.get("Reporting-MTA")),
                  original_message_id=_original_id(original),
                  recipients=recipients, dsn_message_id=(msg.get("Message-ID") or "").strip())


def _original_id(part: Message | None) -> str | None:
    if part is None:
        return None
    if part.get_content_type() == "message/rfc822":
        from email.message import Message

        inner = part.get_payload()
        first = inner[0] if isinstance(inner, list) and inner else None
        header = first.get("Message-ID") if isinstance(first, Message) else None
    else:
        from email.parser import HeaderParser

        text = part.get_payload(decode=True)
        payload = text.decode("utf-8", "replace") if isinstance(text, bytes) else ""
        header = HeaderParser().parsestr(payload).get("Message-ID")
    return str(header).strip() or None if header else None


_KINDS = {"failed": Kind.BOUNCED, "delayed": Kind.DEFERRED, "delivered": Kind.DELIVERED,
          "relayed": Kind.DELIVERED, "expanded": Kind.DELIVERED}


def events(report: Report, at: float) -> list[DeliveryEvent]:
    """The report as delivery events, one per recipient. A failure is permanent when its
    status class is 5 (RFC 3463); the event id binds the report's own Message-ID, so the
    same report delivered twice is recorded once."""
    out = []
    for r in report.recipients:
        kind = _KINDS.get(r.action, Kind.UNKNOWN)
        raw: dict[str, Any] = {
            "reporting_mta": report.reporting_mta, "final_recipient": r.recipient,
            "action": r.action, "status": r.status, "diagnostic_code": r.diagnostic,
            "remote_mta": r.remote_mta, "original_message_id": report.original_message_id}
        ident = "\n".join([report.dsn_message_id, r.recipient, r.action, r.status])
        out.append(DeliveryEvent(
            kind=kind, provider_id=None, recipient=r.recipient, at=at,
            detail=f"{r.status} {r.diagnostic}".strip(), raw=raw,
            event_id="dsn:" + hashlib.sha256(ident.encode()).hexdigest()[:56],
            message_id_header=report.original_message_id,
            permanent=(r.status.startswith("5") if kind is Kind.BOUNCED else None)))
    return out


class Door:
    """What the SMTP listener asks: is this recipient a signed return path, may this peer
    send reports, and take this report."""

    def __init__(self, verp: Verp, queue: Queue, networks: list[str],
                 settings: Settings | None = None) -> None:
        from postroom.ingress.guard import Networks

        self.verp = verp
        self.queue = queue
        self.settings = settings
        self.networks = Networks(networks)

    @classmethod
    def of(cls, settings: Settings, queue: Queue) -> Door | None:
        section = configured(settings)
        if section is None:
            return None
        return cls(Verp.of(settings, section), queue,
                   section.networks or list(settings.server.trusted_networks), settings)

    async def take(self, raw: bytes, msg_ids: list[str]) -> Recorded:
        """Record the report ``raw`` sent to the return paths of ``msg_ids``: on the
        message (each report is about one; several return paths in one transaction are
        read as the same report to each)."""
        import asyncio

        from postroom.webhooks.intake import EventLog, Recorded

        report = await asyncio.to_thread(parse, raw)
        items = events(report, time.time())
        done = Recorded()
        log = EventLog(self.queue, self.settings)
        for msg_id in dict.fromkeys(msg_ids):
            owned = await asyncio.to_thread(self._owned, msg_id, items)
            one = await log.record(owned[0], owned[1], message_id=msg_id)
            done.new += one.new
            done.duplicates += one.duplicates
        return done

    def _owned(self, msg_id: str, items: list[DeliveryEvent]) -> tuple[str, list[
            DeliveryEvent]]:
        """The connection that sent the message (its events' connection) and the events
        about its own recipients: a report naming anyone else is ignored for them (a
        recipient who saw the return path cannot report on another address)."""
        from sqlalchemy import select

        from postroom.store.schema import messages

        m = messages.c
        with self.queue.engine.connect() as conn:
            row = conn.execute(select(m.via, m.recipients, m.rcpt_status)
                               .where(m.id == msg_id)).first()
        if row is None:
            return "smtp", []
        known = {str(r).lower() for r in [*(row.recipients or []), *(row.rcpt_status or {})]}
        return row.via or "smtp", [ev for ev in items
                                   if (ev.recipient or "").lower() in known]
