"""SendGrid (Twilio): ``POST /v3/mail/send`` with the message as JSON (SendGrid "Mail Send"
API reference, https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send, its
"Errors" section, and "Getting started with the Event Webhook Security Features",
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features).

- Auth: ``Authorization: Bearer <API key>``; the key needs the ``mail.send`` scope.
  Regions: ``https://api.sendgrid.com`` (global) or ``https://api.eu.sendgrid.com`` for an
  EU regional subuser (``region = "eu"``).
- Request: one ``personalizations`` entry with ``to``/``cc``/``bcc`` ([{email, name}]),
  ``from``, ``reply_to`` (or ``reply_to_list`` for several), ``subject``, ``content``
  ([{type, value}], text/plain first), ``attachments`` ([{content (base64), type,
  filename, disposition, content_id}]; ``disposition = "inline"`` with a ``content_id``
  for an image the HTML shows), ``headers`` ({name: value}), ``categories`` (at most 10:
  Postroom's tags), ``custom_args`` ({str: str}: Postroom's metadata, echoed in every
  event). ``sandbox = true`` sets ``mail_settings.sandbox_mode.enable``: validated, not sent.
- Success: 202 with an empty body and the message id in the ``X-Message-Id`` header (200 in
  sandbox mode). Events name the message ``sg_message_id = "<X-Message-Id>.<filter id>"``.
- Errors: ``{"errors": [{"message", "field", "help"}]}`` with no error codes: the messages
  that mean something precise are matched below (MESSAGES), the rest goes by HTTP status.
- Event webhook: a JSON list of events, signed (when "Signed Event Webhook" is on) with
  ECDSA P-256 / SHA-256 over ``timestamp + body``: headers
  ``X-Twilio-Email-Event-Webhook-Signature`` (base64 DER) and ``...-Timestamp``; the
  verification key (base64 DER public key, from the Mail Settings page) is the
  connection's webhook key.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx

from postroom.envelope import Envelope
from postroom.exceptions import (
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http, _mime
from postroom.webhooks import DeliveryEvent, Kind, Refused, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

BASES = {"global": "https://api.sendgrid.com", "eu": "https://api.eu.sendgrid.com"}
MAX_SIZE = 30 * 1024 * 1024  # "The total size of your email ... must be less than 30MB"
MAX_RECIPIENTS = 1000  # "The total number of recipients must be no more than 1000"
MAX_CATEGORIES = 10  # "You may not include more than 10 categories per request"
# Header fields SendGrid reserves (Mail Send: "headers"); the others _mime leaves out itself.
RESERVED_HEADERS = frozenset({"x-sg-id", "x-sg-eid"})

_Rule = _http.ErrorRule
# SendGrid's error messages that say more than their HTTP status, matched as substrings
# (lower case) -> the code the ERRORS table knows them by.
MESSAGES: Mapping[str, str] = {
    "verified sender identity": "sender_identity",
    "maximum credits exceeded": "credits",
}
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "sender_identity": _Rule(
        "sendgrid.sender_unverified", "the From address is not a verified Sender Identity. "
        "Fix: in SendGrid, verify it under Settings > Sender Authentication (a single sender "
        "or the whole domain), or send from one that is", kind=SenderRejected,
        permanent=False, scope=Scope.CONFIGURATION),
    "credits": _Rule(
        "sendgrid.credits_exceeded", "the account has used all its credits. Fix: upgrade the "
        "plan or wait for the next billing period in SendGrid", kind=DeliveryError,
        permanent=False, scope=Scope.CONFIGURATION),
    400: _Rule("sendgrid.invalid_request", "SendGrid found the message invalid (the field "
               "is named above): correct it in the app that sent it"),
}


class SendGridSettings(_http.ApiKeySettings):
    transport: Literal["sendgrid"] = "sendgrid"
    region: Literal["global", "eu"] = "global"  # "eu": an EU regional subuser's API host
    sandbox: bool = False  # mail_settings.sandbox_mode: SendGrid validates, sends nothing


class SendGridWebhook(Webhook):
    """SendGrid's Event Webhook, signed: ECDSA (P-256, SHA-256) over timestamp + body."""

    docs_url = ("https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/"
                "event")

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        key = verify.need_key(settings.key, "SendGrid")
        signature = verify.header(req, "X-Twilio-Email-Event-Webhook-Signature")
        stamp = verify.header(req, "X-Twilio-Email-Event-Webhook-Timestamp")
        verify.check_timestamp(stamp, tolerance=settings.tolerance)
        public = _public_key(key)
        try:
            sig = base64.b64decode(signature, validate=True)
            public.verify(sig, stamp.encode() + req.body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, binascii.Error, ValueError) as err:
            raise Refused("the SendGrid event signature does not match",
                          code="event.bad_signature") from err

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        items = data if isinstance(data, list) else [data]
        return [_event(e) for e in items if isinstance(e, dict)]


# SendGrid event -> vocabulary ("Event Webhook reference": delivery and engagement events).
EVENTS: Mapping[str, Kind] = {
    "processed": Kind.QUEUED, "delivered": Kind.DELIVERED, "deferred": Kind.DEFERRED,
    "bounce": Kind.BOUNCED, "dropped": Kind.REJECTED, "spamreport": Kind.COMPLAINED,
    "unsubscribe": Kind.UNSUBSCRIBED, "group_unsubscribe": Kind.UNSUBSCRIBED,
    "open": Kind.OPENED, "click": Kind.CLICKED,
}


def _public_key(key: str) -> Any:
    """The verification key as SendGrid shows it (base64 DER), or a PEM of it."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_der_public_key,
        load_pem_public_key,
    )

    try:
        text = key.strip()
        public = (load_pem_public_key(text.encode()) if text.startswith("-----BEGIN")
                  else load_der_public_key(base64.b64decode(text, validate=True)))
    except (ValueError, binascii.Error) as err:
        raise Refused("the connection's SendGrid webhook key is not the base64 public key "
                      "SendGrid shows under Mail Settings > Signed Event Webhook",
                      code="event.no_key") from err
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise Refused("the SendGrid webhook key is not an ECDSA public key",
                      code="event.no_key")
    return public


def _event(e: dict[str, Any]) -> DeliveryEvent:
    name = str(e.get("event", ""))
    kind = EVENTS.get(name, Kind.UNKNOWN)
    permanent: bool | None = None
    if kind is Kind.BOUNCED:
        # "type": "bounce" is a hard refusal; "blocked" a temporary one (SendGrid retries
        # nothing after either, but the address itself is not known dead).
        permanent = e.get("type", "bounce") == "bounce"
    sg_id = str(e.get("sg_message_id") or "")
    smtp_id = str(e.get("smtp-id") or "") or None
    detail = str(e.get("reason") or e.get("response") or e.get("status") or name)
    return DeliveryEvent(
        kind=kind, provider_id=sg_id.partition(".")[0] or None,
        recipient=str(e["email"]).lower() if e.get("email") else None,
        at=event_time(e.get("timestamp")), detail=detail,
        raw=e, event_id=str(e["sg_event_id"]) if e.get("sg_event_id") else None,
        message_id_header=smtp_id, permanent=permanent)


class SendGridTransport(_http.HttpTransport):
    settings: SendGridSettings
    settings_model = SendGridSettings
    title = "SendGrid"
    docs_url = "https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "SENDGRID_API_KEY",
        "webhook_key_env": "SENDGRID_WEBHOOK_PUBLIC_KEY",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "an API key with Mail Send permission",
        "webhook_key_env": "the Signed Event Webhook's verification key",
    }
    default_base = BASES["global"]
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = SendGridWebhook

    def default_api_base(self) -> str:
        return BASES[self.settings.region]

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("Authorization", self.api_key, prefix="Bearer ")

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title, forbidden_headers=RESERVED_HEADERS)
        _mime.limit_recipients(m, MAX_RECIPIENTS, self.title)
        if len(m.tags) > MAX_CATEGORIES:
            raise UnsupportedFeature(
                f"SendGrid takes at most {MAX_CATEGORIES} categories (Postroom's tags) per "
                f"message; this one has {len(m.tags)}: send it with fewer tags",
                code="unsupported.tags")
        body = _http.refuse_over(_http.json_bytes(self.payload(m)), MAX_SIZE, self.title)
        return _http.Request("POST", f"{self.base}/v3/mail/send",
                             {"Content-Type": "application/json"}, body,
                             f"JSON, {len(m.attachments)} attachment(s), {len(body)} bytes")

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        person: dict[str, Any] = {"to": [_mailbox(a) for a in m.to]}
        for key, values in (("cc", m.cc), ("bcc", m.bcc)):
            if values:
                person[key] = [_mailbox(a) for a in values]
        data: dict[str, Any] = {"personalizations": [person], "from": _mailbox(m.from_),
                                "subject": m.subject}
        if len(m.reply_to) == 1:
            data["reply_to"] = _mailbox(m.reply_to[0])
        elif m.reply_to:
            data["reply_to_list"] = [_mailbox(a) for a in m.reply_to]
        # "text/plain must be first, then text/html" (Mail Send: content).
        content = [{"type": t, "value": v} for t, v in (("text/plain", m.text),
                                                         ("text/html", m.html)) if v]
        # An empty value is refused ("at least one character"): a space reads as empty.
        data["content"] = content or [{"type": "text/plain", "value": " "}]
        if m.attachments:
            data["attachments"] = [_attachment(a) for a in m.attachments]
        headers = _mime.header_dict(m, self.title)
        if headers:
            data["headers"] = headers
        if m.tags:
            data["categories"] = m.tags
        if m.metadata:
            data["custom_args"] = m.metadata
        if self.settings.sandbox:
            data["mail_settings"] = {"sandbox_mode": {"enable": True}}
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        return resp.headers.get("X-Message-Id") or None, None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        errors = _http.json_body(resp).get("errors")
        found = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
        said = "; ".join(str(e.get("message", "")) + (f" ({e['field']})" if e.get("field")
                                                        else "") for e in found)
        low = said.lower()
        code = next((c for words, c in MESSAGES.items() if words in low), "")
        return _http.ApiError(resp.status_code, code, said or resp.reason_phrase)

    def check_request(self) -> _http.Request:
        """``GET /v3/scopes``: the key's permissions; sends nothing."""
        return _http.Request("GET", f"{self.base}/v3/scopes", {}, b"", "the API key's scopes")

    def checked(self, resp: httpx.Response) -> str:
        scopes = _http.json_body(resp).get("scopes")
        if not isinstance(scopes, list) or "mail.send" not in scopes:
            raise self.auth.forbidden(_auth.Who(
                self.name, self.title, f"{self.title}: the API key lacks the mail.send scope",
                resp.status_code, "mail.send missing"))
        return "the API key works (mail.send allowed)"


def _mailbox(mailbox: str) -> dict[str, str]:
    return _mime.mailbox_object(mailbox)


def _attachment(a: _mime.Attachment) -> dict[str, str]:
    out = {"content": base64.b64encode(a.data).decode("ascii"), "type": a.content_type,
           "filename": a.filename, "disposition": "inline" if a.inline else "attachment"}
    if a.content_id:
        out["content_id"] = a.content_id
    return out
