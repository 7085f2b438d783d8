"""Mailjet: ``POST /v3.1/send`` with the message as JSON (Mailjet "Send API v3.1" guide and
reference, https://dev.mailjet.com/email/guides/send-api-v31/ and
https://dev.mailjet.com/email/reference/send-emails/, "Event API: real-time notifications",
https://dev.mailjet.com/email/guides/webhooks/).

- Auth: HTTP Basic with the API key pair: user = the "API Key" (public, ``api_key_public``
  here), password = the "Secret Key" (``api_key_env`` / ``api_key_file`` / stored, as
  every provider's secret). Mailjet's US instance is ``https://api.us.mailjet.com``
  (``region = "us"``); accounts live in one.
- Request: ``{"Messages": [{From: {Email, Name}, To/Cc/Bcc: [{Email, Name}], ReplyTo (one),
  Subject, TextPart, HTMLPart, Attachments: [{ContentType, Filename, Base64Content}],
  InlinedAttachments: [... + ContentID], Headers: {name: value}, CustomID,
  EventPayload}], "SandboxMode": true}`` (sandbox: validated, not sent). Postroom's
  Message-ID goes in ``CustomID`` and its tags and metadata (JSON) in ``EventPayload``:
  both come back in every event.
- Success: 200 ``{"Messages": [{"Status": "success", "To": [{"Email", "MessageUUID",
  "MessageID", "MessageHref"}], "Cc": [...], "Bcc": [...]}]}``: one MessageID per
  recipient. The first To's is the attempt's provider id; events of the others are
  matched by CustomID (the Message-ID).
- Errors: ``{"Messages": [{"Status": "error", "Errors": [{"ErrorIdentifier", "ErrorCode"
  ("mj-0013", "send-0008"), "StatusCode", "ErrorMessage", "ErrorRelatedTo"}]}]}``;
  authentication: ``{"ErrorIdentifier", "StatusCode": 401, "ErrorMessage"}``.
- Event API: a JSON object (or a list, when grouped) per event; Mailjet signs nothing, it
  offers HTTP basic auth in the callback URL (``https://user:password@host/webhooks/NAME``):
  the connection's webhook key is that ``user:password``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field

from postroom.envelope import Envelope
from postroom.exceptions import (
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http, _mime
from postroom.webhooks import DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

BASES = {"eu": "https://api.mailjet.com", "us": "https://api.us.mailjet.com"}
MAX_SIZE = 15 * 1024 * 1024  # Send API v3.1: 15 MB per message, attachments included
MAX_RECIPIENTS = 50  # To, Cc and Bcc together, per message (Send API v3.1 limits)
# Header fields Mailjet sets itself and refuses in Headers (Send API v3.1: "Headers").
RESERVED_HEADERS = frozenset({
    "sender", "delivered-to", "domainkey-status", "received-spf", "authentication-results",
    "x-mailjet-prio", "x-mailjet-debug", "user-agent", "x-mailer", "x-mj-customid",
    "x-mj-eventpayload", "x-mj-vars", "x-mj-templateerrordeliver",
    "x-mj-templateerrorreporting", "x-mj-templatelanguage", "x-mj-templateid"})

_Rule = _http.ErrorRule
# Mailjet's ErrorCode values (Send API v3.1, "Error codes") -> what they mean here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "send-0008": _Rule(
        "mailjet.sender_unverified", "the From address is not a validated sender of the "
        "account. Fix: in Mailjet, add and validate it (or its domain) under Account "
        "settings > Senders & Domains", kind=SenderRejected, permanent=False,
        scope=Scope.CONFIGURATION),
    "mj-0013": _Rule("mailjet.invalid_address", "Mailjet cannot read an address (named "
                     "above): correct it in the app that sent the message"),
    400: _Rule("mailjet.invalid_request", "Mailjet found the message invalid (the field is "
               "named above): correct it in the app that sent it"),
    403: _Rule("mailjet.account_blocked", "Mailjet does not let the account send (it is "
               "suspended, or under review). Fix: check the account's status in Mailjet or "
               "contact Mailjet support", kind=DeliveryError, permanent=False,
               scope=Scope.CONFIGURATION),
}


class MailjetSettings(_http.ApiKeySettings):
    transport: Literal["mailjet"] = "mailjet"
    # Mailjet's "API Key" (the public half of the pair: the basic-auth user name); the
    # "Secret Key" is the connection's api key (api_key_env / api_key_file / stored).
    api_key_public: str = Field(min_length=1)
    region: Literal["eu", "us"] = "eu"  # "us": an account of Mailjet's US instance
    sandbox: bool = False  # SandboxMode: Mailjet validates the message and sends nothing


class MailjetWebhook(Webhook):
    """Mailjet's Event API: HTTP basic auth (the callback URL's user:password), JSON."""

    docs_url = "https://dev.mailjet.com/email/guides/webhooks/"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        verify.check_basic(req, verify.need_key(settings.key, "Mailjet"))

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        items = data if isinstance(data, list) else [data]
        return [_event(e) for e in items if isinstance(e, dict)]


# Mailjet event -> vocabulary ("Event API": sent, open, click, bounce, blocked, spam, unsub).
# "sent" means the receiving server accepted the message.
EVENTS: Mapping[str, Kind] = {
    "sent": Kind.DELIVERED, "open": Kind.OPENED, "click": Kind.CLICKED,
    "bounce": Kind.BOUNCED, "blocked": Kind.REJECTED, "spam": Kind.COMPLAINED,
    "unsub": Kind.UNSUBSCRIBED,
}


def _event(e: dict[str, Any]) -> DeliveryEvent:
    kind = EVENTS.get(str(e.get("event", "")), Kind.UNKNOWN)
    permanent = bool(e.get("hard_bounce")) if kind is Kind.BOUNCED else None
    custom = str(e.get("CustomID") or "")
    detail = " ".join(str(x) for x in (e.get("error_related_to"), e.get("error"),
                                       e.get("smtp_reply")) if x) or str(e.get("event", ""))
    return DeliveryEvent(
        kind=kind, provider_id=str(e["MessageID"]) if e.get("MessageID") else None,
        recipient=str(e["email"]).lower() if e.get("email") else None,
        at=event_time(e.get("time")), detail=detail,
        raw=e, message_id_header=custom if custom.startswith("<") else None,
        permanent=permanent)


class MailjetTransport(_http.HttpTransport):
    settings: MailjetSettings
    settings_model = MailjetSettings
    title = "Mailjet"
    docs_url = "https://dev.mailjet.com/email/guides/send-api-v31/"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_public": "0123456789abcdef0123456789abcdef",
        "api_key_env": "MAILJET_SECRET_KEY",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_public": "the API Key (the pair's public half)",
        "api_key_env": "its Secret Key",
    }
    default_base = BASES["eu"]
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = MailjetWebhook

    def default_api_base(self) -> str:
        return BASES[self.settings.region]

    def make_auth(self) -> _auth.Auth:
        return _auth.Basic(self.settings.api_key_public, self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title, forbidden_headers=RESERVED_HEADERS)
        _mime.limit_recipients(m, MAX_RECIPIENTS, self.title)
        if len(m.reply_to) > 1:
            raise UnsupportedFeature(
                f"Mailjet takes one Reply-To address; this message has {len(m.reply_to)}: "
                "send it with one, or through a provider that takes several",
                code="unsupported.reply_to")
        data: dict[str, Any] = {"Messages": [self.message(m)]}
        if self.settings.sandbox:
            data["SandboxMode"] = True
        body = _http.refuse_over(_http.json_bytes(data), MAX_SIZE,
                                 self.title)
        return _http.Request("POST", f"{self.base}/v3.1/send",
                             {"Content-Type": "application/json"}, body,
                             f"JSON, {len(m.attachments)} attachment(s), {len(body)} bytes")

    def message(self, m: _mime.Mapped) -> dict[str, Any]:
        out: dict[str, Any] = {"From": _mailbox(m.from_), "Subject": m.subject,
                               "To": [_mailbox(a) for a in m.to]}
        for key, values in (("Cc", m.cc), ("Bcc", m.bcc)):
            if values:
                out[key] = [_mailbox(a) for a in values]
        if m.reply_to:
            out["ReplyTo"] = _mailbox(m.reply_to[0])
        if m.text is not None:
            out["TextPart"] = m.text
        if m.html is not None:
            out["HTMLPart"] = m.html
        files = [a for a in m.attachments if not a.inline]
        inline = [a for a in m.attachments if a.inline]
        if files:
            out["Attachments"] = [_attachment(a) for a in files]
        if inline:
            out["InlinedAttachments"] = [_attachment(a) for a in inline]
        headers = _mime.header_dict(m, self.title)
        if headers:
            out["Headers"] = headers
        if m.message_id:
            out["CustomID"] = m.message_id  # echoed in every event: matches the message
        payload = dict(m.metadata)
        if m.tags:
            payload["tags"] = ", ".join(m.tags)
        if payload:
            out["EventPayload"] = json.dumps(payload, ensure_ascii=False)
        return out

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        messages = _http.json_body(resp).get("Messages")
        first = messages[0] if isinstance(messages, list) and messages else {}
        to = first.get("To") if isinstance(first, dict) else None
        msg_id = to[0].get("MessageID") if isinstance(to, list) and to and isinstance(
            to[0], dict) else None
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        errors: list[dict[str, Any]] = []
        for msg in data.get("Messages") or []:
            if isinstance(msg, dict) and isinstance(msg.get("Errors"), list):
                errors += [e for e in msg["Errors"] if isinstance(e, dict)]
        if not errors:
            return _http.ApiError(resp.status_code, "", str(data.get("ErrorMessage")
                                                            or resp.reason_phrase))
        said = "; ".join(f"{e.get('ErrorMessage', '')}" + (
            f" ({', '.join(map(str, e['ErrorRelatedTo']))})"
            if isinstance(e.get("ErrorRelatedTo"), list) else "") for e in errors)
        return _http.ApiError(resp.status_code, str(errors[0].get("ErrorCode") or ""), said)

    def check_request(self) -> _http.Request:
        """``GET /v3/REST/sender?Limit=1``: a read of the sender list, which every key pair
        may make; nothing is sent."""
        return _http.Request("GET", f"{self.base}/v3/REST/sender?Limit=1", {}, b"",
                             "the sender list")

    def checked(self, resp: httpx.Response) -> str:
        return "the API key pair works"


def _mailbox(mailbox: str) -> dict[str, str]:
    return _mime.mailbox_object(mailbox, "Email", "Name")


def _attachment(a: _mime.Attachment) -> dict[str, str]:
    out = {"ContentType": a.content_type, "Filename": a.filename,
           "Base64Content": base64.b64encode(a.data).decode("ascii")}
    if a.content_id:
        out["ContentID"] = a.content_id
    return out
