"""MailerSend: ``POST /v1/email`` with the message as JSON (MailerSend API reference,
"Email: send an email", https://developers.mailersend.com/api/v1/email.html, "API
response: validation errors", https://developers.mailersend.com/general.html, "API quota",
and "Webhooks: signing requests", https://developers.mailersend.com/api/v1/webhooks.html).

- Auth: ``Authorization: Bearer <API token>`` (a token with "Email: full access").
- Request: ``from`` / ``reply_to`` ({email, name}), ``to`` (at most 50), ``cc`` and ``bcc``
  (at most 10 each) as [{email, name}], ``subject``, ``text``, ``html``, ``attachments``
  ([{content (base64), filename, disposition "attachment" | "inline", id}]: an inline
  part's ``id`` is its Content-ID), ``tags`` (at most 5), ``headers`` ([{name, value}],
  names of letters, digits and "-"; Professional and Enterprise plans only). MailerSend has
  no metadata field: Postroom's metadata goes in the ``X-Postroom-Metadata`` header field
  (transports._headers). ``plain_headers = true`` (plans without custom headers) sends no
  ``headers``: MailerSend writes its own Message-ID, and a message with other custom header
  fields (or metadata) is refused rather than sent without them.
- Success: 202 with an empty body and ``X-Message-Id`` (what events name as
  ``data.email.message.id``); with suppressed recipients the body lists them
  (``warnings[].type`` SOME_SUPPRESSED / ALL_SUPPRESSED, ``recipients[].reasons``): those
  are reported refused, per recipient.
- Errors: ``{"message", "errors": {"field": ["... #MS42207"]}}`` (422; the ``#MSnnnnn`` code
  names the cause), 401 ``{"message": "Unauthenticated."}``, 403, 429 (Retry-After), 5xx.
- Webhooks: ``Signature`` = hex HMAC-SHA256 of the body under the webhook's signing secret
  (no timestamp is signed: a replay is caught by the event id, ``data.id``).

Checked against MailerSend's own pages on 2026-12-07 (issue 14): the event's message id
path is confirmed (https://developers.mailersend.com/api/v1/webhooks.html, "Payload
example": ``data.email.message`` is an object ``message`` with its ``id``), and the send
answers with ``X-Message-Id``, the message's id for later queries
(https://developers.mailersend.com/api/v1/email.html, "Send an email"). That the two are
the same id is implied by both naming the message, not stated in so many words.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx

from postroom.envelope import Envelope
from postroom.exceptions import DeliveryError, Scope, SenderRejected, UnsupportedFeature
from postroom.transports import _auth, _headers, _http, _mime, base
from postroom.webhooks import DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

MAX_SIZE = 50 * 1024 * 1024  # "total size of the JSON payload: 50MB"
MAX_TO, MAX_CC, MAX_BCC, MAX_TAGS = 50, 10, 10, 5
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")  # "must be alphanumeric which can contain -"
_CODE = re.compile(r"#(MS\d{5})")

_Rule = _http.ErrorRule
_TRIAL = _Rule("mailersend.trial_limit", "the trial account sends only to its "
               "administrator's address or a few unique recipients. Fix: verify a domain and "
               "get the account approved (or upgrade the plan) in MailerSend",
               kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION)
# MailerSend's #MS codes (and message words for errors that carry none) -> meaning here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "MS42207": _Rule("mailersend.domain_unverified", "the From address's domain is not "
                     "verified in MailerSend. Fix: add it under Domains, publish its DNS "
                     "records, and send from an address of it", kind=SenderRejected,
                     permanent=False, scope=Scope.CONFIGURATION),
    "MS42225": _TRIAL,
    "trial": _TRIAL,
    "plan": _Rule("mailersend.plan_feature", "the message uses a feature the MailerSend plan "
                  "lacks (custom headers need Professional or Enterprise). Fix: upgrade, or "
                  "set plain_headers = true on the connection", kind=DeliveryError,
                  permanent=False, scope=Scope.CONFIGURATION),
    422: _Rule("mailersend.invalid_request", "MailerSend found the message invalid (the "
               "field is named above): correct it in the app that sent it"),
}
# Words of MailerSend messages without a #MS code -> the ERRORS key they mean.
MESSAGES: Mapping[str, str] = {
    "trial account": "trial",
    "professional and enterprise": "plan",
}


class MailerSendSettings(_http.ApiKeySettings):
    transport: Literal["mailersend"] = "mailersend"
    # Plans without custom headers (Free, Hobby, Starter): send no "headers" (see above).
    plain_headers: bool = False


class MailerSendWebhook(Webhook):
    """MailerSend's webhooks: ``Signature`` is hex HMAC-SHA256 of the body."""

    docs_url = "https://developers.mailersend.com/api/v1/webhooks.html#security"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        verify.check_body_hmac(req, settings.key, "MailerSend", "signature")

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        if not isinstance(data, dict) or not str(data.get("type", "")).startswith("activity."):
            return []  # maintenance, sender identity and inbound events name no message
        d = _dict(data.get("data"))
        email = _dict(d.get("email"))
        message = _dict(email.get("message"))
        recipient = _dict(email.get("recipient")).get("email")
        morph = _dict(d.get("morph"))
        kind = EVENTS.get(str(data["type"]), Kind.UNKNOWN)
        permanent = {"activity.hard_bounced": True,
                     "activity.soft_bounced": False}.get(str(data["type"]))
        # data.email.message.id (webhooks.html, "Payload example"), taken as the send's
        # X-Message-Id (module header).
        return [DeliveryEvent(
            kind=kind, provider_id=str(message.get("id") or email.get("id") or "") or None,
            recipient=str(recipient).lower() if recipient else None,
            at=event_time(d.get("created_at") or data.get("created_at")),
            detail=str(morph.get("reason") or d.get("type") or data["type"]), raw=data,
            event_id=str(d.get("id") or "") or None, permanent=permanent)]


# MailerSend webhook events ("Webhooks: available events") -> vocabulary.
EVENTS: Mapping[str, Kind] = {
    "activity.sent": Kind.QUEUED, "activity.delivered": Kind.DELIVERED,
    "activity.soft_bounced": Kind.BOUNCED, "activity.hard_bounced": Kind.BOUNCED,
    "activity.spam_complaint": Kind.COMPLAINED, "activity.unsubscribed": Kind.UNSUBSCRIBED,
    "activity.opened": Kind.OPENED, "activity.opened_unique": Kind.OPENED,
    "activity.clicked": Kind.CLICKED, "activity.clicked_unique": Kind.CLICKED,
}


class MailerSendTransport(_http.HttpTransport):
    settings: MailerSendSettings
    settings_model = MailerSendSettings
    title = "MailerSend"
    docs_url = "https://developers.mailersend.com/api/v1/email.html"
    default_base = "https://api.mailersend.com/v1"
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = MailerSendWebhook
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "MAILERSEND_API_TOKEN", "webhook_key_env": "MAILERSEND_SIGNING_SECRET"}
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "an API token with Email: full access",
        "webhook_key_env": "the webhook's signing secret (Integrations > Webhooks)"}

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("Authorization", self.api_key, prefix="Bearer ")

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        _mime.limit_recipients(m, MAX_TO + MAX_CC + MAX_BCC, self.title)
        for field, values, limit in (("To", m.to, MAX_TO), ("Cc", m.cc, MAX_CC),
                                     ("Bcc", m.bcc, MAX_BCC)):
            if len(values) > limit:
                raise UnsupportedFeature(
                    f"MailerSend takes at most {limit} {field} addresses; this message has "
                    f"{len(values)}: send it in parts", code="unsupported.recipients")
        body = _http.refuse_over(_http.json_bytes(self.payload(m)), MAX_SIZE, self.title)
        return _http.Request("POST", f"{self.base}/email",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, m.summary(len(body)))

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        data: dict[str, Any] = _mime.address_fields(m)
        if len(m.reply_to) > 1:
            raise UnsupportedFeature(
                "MailerSend takes one Reply-To address, and this message has "
                f"{len(m.reply_to)}: keep one", code="unsupported.reply_to")
        if m.reply_to:
            data["reply_to"] = _mime.mailbox_object(m.reply_to[0])
        if m.text is not None:
            data["text"] = m.text
        if m.html is not None:
            data["html"] = m.html
        if m.attachments:
            data["attachments"] = [_attachment(a) for a in m.attachments]
        if len(m.tags) > MAX_TAGS:
            raise UnsupportedFeature(
                f"MailerSend keeps at most {MAX_TAGS} tags per message; this one has "
                f"{len(m.tags)}: use fewer", code="unsupported.tags")
        if m.tags:
            data["tags"] = list(m.tags)
        headers = self.headers(m)
        if headers:
            data["headers"] = headers
        return data

    def headers(self, m: _mime.Mapped) -> list[dict[str, str]]:
        """The custom header fields, and the metadata as one (no field of its own)."""
        fields = list(m.headers)
        if m.metadata:
            value = json.dumps(m.metadata, ensure_ascii=True)
            if len(value) > _headers.MAX_VALUE:
                raise UnsupportedFeature(
                    f"MailerSend takes Postroom's metadata in the {_headers.METADATA} header "
                    f"field, and it would be {len(value)} characters (at most "
                    f"{_headers.MAX_VALUE}): send less", code="unsupported.tags")
            fields.append((_headers.METADATA, value))
        if self.settings.plain_headers:
            # Message-ID is written by MailerSend then; any other field has nowhere to go.
            extra = [n for n, _ in fields if n.lower() != "message-id"]
            if extra:
                raise UnsupportedFeature(
                    f"the connection sets plain_headers (the MailerSend plan has no custom "
                    f"headers), and this message has the header field {extra[0]}: send it "
                    "without, or through a plan or connection that keeps it",
                    code="unsupported.headers")
            return []
        for name, _ in fields:
            if not _HEADER_NAME.fullmatch(name):
                raise UnsupportedFeature(
                    f"MailerSend takes header names of letters, digits and '-' only: the "
                    f"header field {name} cannot be sent", code="unsupported.headers")
        return [{"name": n, "value": v} for n, v in fields]

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        refused: _http.Recipients = {}
        for warning in _http.json_body(resp).get("warnings") or []:
            if not isinstance(warning, dict):
                continue
            for r in warning.get("recipients") or []:
                if isinstance(r, dict) and r.get("email"):
                    why = ", ".join(str(x) for x in r.get("reasons") or []) or "suppressed"
                    refused[str(r["email"])] = base.RecipientResult(
                        550, f"MailerSend: suppressed ({why}); it sends nothing to it")
        return resp.headers.get("X-Message-Id") or None, refused or None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        said = str(data.get("message") or resp.reason_phrase)
        errors = data.get("errors")
        if isinstance(errors, dict) and errors:
            field, texts = next(iter(errors.items()))
            first = texts[0] if isinstance(texts, list) and texts else texts
            said = f"{field}: {first}"
        found = _CODE.search(said)
        low = said.lower()
        code = found.group(1) if found else next(
            (c for words, c in MESSAGES.items() if words in low), "")
        return _http.ApiError(resp.status_code, code, said)

    def check_request(self) -> _http.Request:
        """``GET /api-quota``: the token's daily request quota; sends nothing, answered for
        any valid token whatever its permissions."""
        return _http.Request("GET", f"{self.base}/api-quota", {"Accept": "application/json"},
                             b"", "the API quota")

    def checked(self, resp: httpx.Response) -> str:
        data = _http.json_body(resp)
        left = data.get("remaining")
        return "the API token works" + (
            f" ({left} of {data.get('quota')} requests left today)" if left is not None else "")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _attachment(a: _mime.Attachment) -> dict[str, str]:
    out = {"filename": a.filename, "content": base64.b64encode(a.data).decode("ascii"),
           "disposition": "inline" if a.content_id else "attachment"}
    if a.content_id:
        out["id"] = a.content_id
    return out
