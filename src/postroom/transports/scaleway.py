"""Scaleway Transactional Email (TEM), regions fr-par and nl-ams: ``POST
/transactional-email/v1alpha1/regions/{region}/emails`` with the message as JSON (Scaleway
API reference "Transactional Email API: send an email",
https://www.scaleway.com/en/developers/api/transactional-email/; the scaleway-sdk-python
``tem.v1alpha1`` types; "Understanding webhook event payloads"; Topics and Events
"Verifying webhook signatures").

- Auth: ``X-Auth-Token: <API secret key>`` of an IAM application allowed
  TransactionalEmailEmailApiCreate on the project; ``project_id`` names the project.
- Request: ``from`` / ``to`` / ``cc`` / ``bcc`` ({email, name}), ``subject``, ``text``,
  ``html``, ``attachments`` ([{name, type, content (base64)}]), ``additional_headers``
  ([{key, value}]: Reply-To, the message's own custom fields, and Postroom's tags and
  metadata as X-Postroom-Tags / X-Postroom-Metadata, transports._headers). TEM has no
  inline images: a message with a Content-ID part is refused naming it.
- Success: 200 ``{"emails": [{"id", "message_id", "mail_rcpt", "status", ...}]}``, one per
  recipient; ``message_id`` (the Message-ID, brackets off) is the provider id kept,
  ``status`` "failed"/"canceled" is that recipient refused.
- Errors: Scaleway's ``{"type": ..., "message": ...}`` (table below).
- Events: TEM webhooks publish to a Scaleway Topics and Events topic (SNS-compatible);
  an HTTPS subscription delivers them SNS-style, signed with a certificate from
  ``messaging.s3.<region>.scw.cloud`` that must be issued by Scaleway's CA: the
  connection names the trust chain file Scaleway publishes (``sns_trust_chain_file``) and
  the topic (``sns_topic_arns``). Events name the message by its headers (``email_headers``
  with Message-ID: the provider id) and the recipient's copy by ``email_id``.

Checked against Scaleway's own docs on 2026-12-07 (issue 14):

- Confirmed: ``email_headers`` is a list of ``{key, value}`` objects in every TEM event
  (https://www.scaleway.com/en/docs/transactional-email/reference-content/webhook-events-payloads/,
  its source in github.com/scaleway/docs-content), and the send answer's ``message_id`` is
  the email's Message ID (scaleway-sdk-python, tem v1alpha1 ``Email``).
- Unverified: that Message-ID is among the headers an event lists (the page says "SMTP
  headers" and names none): without it, events fall back to ``email_id``, which the send's
  ``message_id`` is not, so such an event matches no message.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, cast
from uuid import UUID

import httpx

from postroom.envelope import Envelope
from postroom.exceptions import (
    ConnectError,
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _headers, _http, _mime, base
from postroom.webhooks import BadEvent, DeliveryEvent, Kind, Refused, WebhookRequest, sns
from postroom.webhooks.base import Webhook, WebhookConfig

HOST = "https://api.scaleway.com"
PATH = "/transactional-email/v1alpha1/regions"  # then /{region}/emails
# Where Topics and Events serves its signing certificates (one bucket for both regions).
CERT_HOSTS = frozenset({"messaging.s3.fr-par.scw.cloud", "messaging.s3.nl-ams.scw.cloud"})
_FAILED = {"failed", "canceled"}

_Rule = _http.ErrorRule
# Scaleway's error "type" values (its API conventions) as TEM answers them.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "denied_authentication": _Rule("auth.api_key_refused", auth="refused"),
    "authentication_error": _Rule("auth.api_key_refused", auth="refused"),
    "permissions_denied": _Rule("auth.api_key_forbidden", auth="forbidden"),
    "invalid_arguments": _Rule("scaleway.invalid_request", "Scaleway found the message "
                               "invalid (the field is named above: an address, a subject or "
                               "body under 10 characters, an attachment type TEM refuses): "
                               "correct it in the app that sent it"),
    "quotas_exceeded": _Rule("scaleway.quota_exceeded", "the project's TEM quota is used up "
                             "(emails per month or per hour). Postroom retries later; ask "
                             "Scaleway for a higher quota", kind=ConnectError,
                             permanent=False),
    "precondition_failed": _Rule(
        "scaleway.domain_unchecked", "the From domain is not a checked TEM domain of the "
        "project. Fix: add it in the project's Transactional Email and publish its SPF, "
        "DKIM and MX records until it is checked", kind=SenderRejected, permanent=False,
        scope=Scope.CONFIGURATION),
    "not_found": _Rule("scaleway.not_found", "the project or region has no such resource. "
                       "Fix: check project_id and region of the connection",
                       kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
}


class ScalewaySettings(_http.ApiKeySettings, sns.SnsTopics):
    """``api_key*``: the API secret key (not the access key)."""

    transport: Literal["scaleway"] = "scaleway"
    region: Literal["fr-par", "nl-ams"] = "fr-par"  # where the project's domain lives
    project_id: UUID  # the Scaleway project that holds the domain
    # Delivery events: Scaleway's CA trust chain for the region (its "Verifying webhook
    # signatures" page links it), against which signing certificates are checked.
    sns_trust_chain_file: Path | None = None


# -- delivery events -------------------------------------------------------------------------
_KINDS: dict[str, tuple[Kind, bool | None]] = {
    "email_queued": (Kind.QUEUED, None),
    "email_delivered": (Kind.DELIVERED, None),
    "email_deferred": (Kind.DEFERRED, None),
    "email_dropped": (Kind.BOUNCED, True),  # refused for good by the receiving server
    "email_mailbox_not_found": (Kind.BOUNCED, True),
    "email_blocklisted": (Kind.REJECTED, None),  # TEM's own blocklist: not sent at all
    "email_spam": (Kind.COMPLAINED, None),
}


class ScalewayWebhook(Webhook):
    docs_url = ("https://www.scaleway.com/en/docs/transactional-email/reference-content/"
                "webhook-events-payloads/")

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        s = cast(ScalewaySettings, settings.connection)  # the door pairs them
        if s.sns_trust_chain_file is None:
            raise Refused("the connection has no sns_trust_chain_file (Scaleway's CA)",
                          code="event.no_key")
        sns.verify(req, topics=s.sns_topic_arns, cert_hosts=CERT_HOSTS | set(s.sns_cert_hosts),
                   trust_chain=sns.load_chain(str(s.sns_trust_chain_file)), ca_file=s.ca_file)

    async def answer(self, req: WebhookRequest,
                     settings: WebhookConfig) -> tuple[int, bytes] | None:
        s = cast(ScalewaySettings, settings.connection)
        # The SubscribeURL is inside the signed message, whose certificate Scaleway's CA
        # issued: it is Scaleway's to name.
        return await sns.confirm(req, hosts=None, ca_file=s.ca_file)

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        envelope = self.json(req)
        message = sns.message(envelope)
        if message is None:
            return []
        return [scaleway_event(message)]


def scaleway_event(data: dict[str, Any]) -> DeliveryEvent:
    name = str(data.get("type", ""))
    if not name:
        raise BadEvent("a TEM event without its type")
    kind, permanent = _KINDS.get(name, (Kind.UNKNOWN, None))
    # [{key, value}] as Scaleway documents (webhook-events-payloads); which keys it holds
    # is not documented (module header).
    headers = {str(h.get("key", "")).lower(): str(h.get("value", ""))
               for h in data.get("email_headers") or [] if isinstance(h, dict)}
    code, said = data.get("email_response_code"), data.get("email_response_message")
    detail = " ".join(str(p) for p in (code, said) if p) or str(
        data.get("blocklist_reason") or data.get("email_error") or name)
    when = sns.iso_time(data.get("created_at")) or 0.0
    # The message's id as the send answer gave it (its Message-ID, brackets off): events
    # name the message by its headers; email_id is one recipient's copy.
    header_id = headers.get("message-id", "").strip()
    provider_id = header_id.strip("<>") or str(data.get("email_id") or "") or None
    return DeliveryEvent(kind=kind, provider_id=provider_id,
                         recipient=str(data["email_to"]) if data.get("email_to") else None,
                         at=when, detail=detail[:1000], raw=data,
                         event_id=str(data.get("id") or "") or None,
                         message_id_header=header_id or None,
                         permanent=permanent)


class ScalewayTransport(_http.HttpTransport):
    settings: ScalewaySettings
    settings_model = ScalewaySettings
    title = "Scaleway TEM"
    docs_url = "https://www.scaleway.com/en/developers/api/transactional-email/"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "region": "fr-par",
        "project_id": "b8c2a1d0-5e6f-4a7b-9c8d-0e1f2a3b4c5d",
        "api_key_env": "SCW_SECRET_KEY",
        "sns_topic_arns": ["arn:scw:sns:fr-par:project-b8c2a1d0-5e6f-4a7b-9c8d-0e1f2a3b4c5d:tem"],
        "sns_trust_chain_file": "/etc/postroom/scaleway-sns-trust-chain.pem",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "TransactionalEmailEmailApiCreate on the project",
        "sns_trust_chain_file": "from Scaleway's docs",
    }
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = ScalewayWebhook
    default_base = HOST

    @property
    def regional(self) -> str:
        """The region's API root (``api_base`` replaces the host only)."""
        return f"{self.base}{PATH}/{self.settings.region}"

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("X-Auth-Token", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        inline = [a.filename for a in m.attachments if a.inline]
        if inline:
            raise UnsupportedFeature(
                f"Scaleway TEM has no inline images, and this message has {len(inline)} "
                f"({inline[0]}, shown by the HTML through its Content-ID): send the image "
                "as a link, or route such mail to an SMTP connection",
                code="unsupported.inline")
        data: dict[str, Any] = {"project_id": str(self.settings.project_id),
                                "from": _mime.mailbox_object(m.from_), "subject": m.subject}
        for key, values in (("to", m.to), ("cc", m.cc), ("bcc", m.bcc)):
            if values:
                data[key] = [_mime.mailbox_object(v) for v in values]
        if m.text is not None:
            data["text"] = m.text
        if m.html is not None:
            data["html"] = m.html
        if m.attachments:
            data["attachments"] = [{"name": a.filename, "type": a.content_type,
                                    "content": base64.b64encode(a.data).decode("ascii")}
                                   for a in m.attachments]
        extra = list(m.headers)
        if m.reply_to:
            extra.insert(0, ("Reply-To", ", ".join(m.reply_to)))
        extra += _headers.tag_fields(env, self.title)
        if extra:
            data["additional_headers"] = [{"key": k, "value": v} for k, v in extra]
        body = _http.json_bytes(data)
        return _http.Request("POST", f"{self.regional}/emails",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, f"JSON, {len(m.attachments)} attachment(s), {len(body)} bytes")

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        emails = _http.json_body(resp).get("emails")
        emails = [e for e in emails if isinstance(e, dict)] if isinstance(emails, list) else []
        refused = {str(e.get("mail_rcpt")): base.RecipientResult(
                       550, f"{self.title}: {e.get('status')} {e.get('status_details') or ''}"
                       .rstrip())
                   for e in emails if e.get("status") in _FAILED and e.get("mail_rcpt")}
        # One Message-ID for all recipients' copies; kept without brackets, as events
        # (scaleway_event) name it.
        msg_id = next((str(e["message_id"]).strip().strip("<>") for e in emails
                       if e.get("message_id")), None)
        return msg_id, refused or None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        words = str(data.get("message") or resp.reason_phrase)
        extra = data.get("help_message") or data.get("precondition") or data.get("details")
        if extra:
            words = f"{words} ({json.dumps(extra) if not isinstance(extra, str) else extra})"
        return _http.ApiError(resp.status_code, str(data.get("type") or ""), words)

    async def check(self) -> str:
        """``GET .../domains?project_id=...`` lists the project's TEM domains and sends
        nothing. A key allowed only to send may not list them: that 403 still proves
        Scaleway knows the key (a wrong one gets 401)."""
        ex = _http.Exchange()
        resp = await self.request(ex, _http.Request(
            "GET", f"{self.regional}/domains?project_id={self.settings.project_id}",
            {"Accept": "application/json"}, b"", "the project's domains"))
        if resp.status_code == 403 and _http.json_body(resp).get("type") == (
                "permissions_denied"):
            ex.lines.append(f"*  {self.title}: the key works (it may not list domains, "
                            "which sending does not need)")
            return ex.transcript
        if not resp.is_success:
            raise self.failure(resp, ex)
        domains = _http.json_body(resp).get("domains")
        checked = [str(d.get("name")) for d in domains if isinstance(d, dict)
                   and d.get("status") == "checked"] if isinstance(domains, list) else []
        ex.lines.append(f"*  {self.title}: the key works (checked domains: "
                        f"{', '.join(checked) or 'none yet'})")
        return ex.transcript
