"""Brevo (formerly Sendinblue): ``POST /v3/smtp/email`` with the message as JSON (Brevo API
reference "Send a transactional email", https://developers.brevo.com/reference/send-transac-email;
"Get your account information" (GET /v3/account); error model: ``{"code", "message"}``;
"Transactional webhooks", https://developers.brevo.com/docs/transactional-webhooks).

- Auth: the ``api-key: <v3 API key>`` header (an SMTP key does not work here).
- Request: ``sender {name, email}``, ``to``/``cc``/``bcc`` ([{email, name}]), ``replyTo``
  (one object), ``subject``, ``htmlContent``/``textContent``, ``attachment`` ([{content
  (base64), name}]: Brevo takes the type from the file name's extension and has no
  Content-ID, so inline images are refused), ``headers`` ({name: value}), ``tags``
  ([str]). Postroom's metadata travels in the ``X-Mailin-custom`` header, which Brevo
  returns in every webhook event. ``sandbox = true`` adds ``X-Sib-Sandbox: drop``: Brevo
  validates the request and sends nothing.
- Success: 201 ``{"messageId": "<...@smtp-relay.mailin.fr>"}``: the id the events name
  (``message-id``).
- Errors: 400 ``{"code": "invalid_parameter" | "missing_parameter" | ..., "message"}``, 401
  ``unauthorized``, 402 ``not_enough_credits``, 403 ``permission_denied`` /
  ``account_under_validation``, 429, 5xx.
- Webhooks: Brevo signs nothing; a webhook is secured with HTTP basic auth (credentials in
  its URL) or a bearer token, set when it is created. ``webhook_auth`` says which; the
  connection's webhook key is ``user:password`` or the token.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx

from postroom.envelope import Envelope
from postroom.exceptions import (
    ConnectError,
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http, _mime
from postroom.webhooks import DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

METADATA_HEADER = "X-Mailin-custom"  # returned as-is in webhook events
# Header fields Brevo writes itself (its own tags/custom data go in their fields).
RESERVED_HEADERS = frozenset({"x-mailin-custom", "x-mailin-tag", "x-sib-sandbox"})

_Rule = _http.ErrorRule
_SENDER = ("the sender is not a validated sender of the Brevo account. Fix: in Brevo, add "
           "the address under Senders, Domains & Dedicated IPs > Senders (or authenticate its "
           "domain)")
# Brevo's error codes (the "code" of its error body) -> what they mean here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "unauthorized": _Rule("auth.api_key_refused", auth="refused"),
    "invalid_parameter": _Rule("brevo.invalid_request", "Brevo found the message invalid "
                               "(named above): correct it in the app that sent it"),
    "missing_parameter": _Rule("brevo.invalid_request", "a field Brevo needs is missing "
                               "(named above): correct the message in the app that sent it"),
    "out_of_range": _Rule("brevo.invalid_request", "a value is out of Brevo's range (named "
                          "above): correct the message in the app that sent it"),
    "not_enough_credits": _Rule("brevo.no_credits", "the account has no email credits left. "
                                "Fix: buy credits or upgrade the plan in Brevo",
                                kind=DeliveryError, permanent=False,
                                scope=Scope.CONFIGURATION),
    "account_under_validation": _Rule("brevo.account_under_validation", "Brevo is still "
                                      "validating the account; it may not send until then. "
                                      "Fix: complete the activation Brevo asks for",
                                      kind=DeliveryError, permanent=False,
                                      scope=Scope.CONFIGURATION),
    "permission_denied": _Rule("brevo.permission_denied", f"{_SENDER}, or the API key may "
                               "not send (an IP not in its authorised IPs)",
                               kind=SenderRejected, permanent=False,
                               scope=Scope.CONFIGURATION),
    429: _Rule("provider.rate_limited", "rate limit. Postroom retries later; lower the "
               "connection's rate_limit to stay under it", kind=ConnectError, permanent=False),
}


class BrevoSettings(_http.ApiKeySettings):
    transport: Literal["brevo"] = "brevo"
    sandbox: bool = False  # X-Sib-Sandbox: drop: validated by Brevo, nothing is sent
    # How Brevo authenticates its webhook requests to Postroom (set on the webhook there):
    # "basic" (webhook key = "user:password") or "bearer" (webhook key = the token).
    webhook_auth: Literal["basic", "bearer"] = "basic"


class BrevoWebhook(Webhook):
    """Brevo's transactional webhooks: one JSON event per request, basic auth or a bearer
    token."""

    docs_url = "https://developers.brevo.com/docs/transactional-webhooks"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        scheme = getattr(settings.connection, "webhook_auth", "basic")
        verify.check_authorization(req, verify.need_key(settings.key, "Brevo"), scheme)

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        items = data if isinstance(data, list) else [data]
        return [brevo_event(e) for e in items if isinstance(e, dict)]


# Brevo's transactional event names -> the vocabulary. "request": Brevo accepted it;
# "error" and "invalid_email"/"blocked": Brevo would not send it.
EVENTS: Mapping[str, Kind] = {
    "request": Kind.QUEUED, "delivered": Kind.DELIVERED, "deferred": Kind.DEFERRED,
    "soft_bounce": Kind.BOUNCED, "hard_bounce": Kind.BOUNCED, "blocked": Kind.REJECTED,
    "invalid_email": Kind.REJECTED, "error": Kind.REJECTED, "spam": Kind.COMPLAINED,
    "complaint": Kind.COMPLAINED, "unsubscribed": Kind.UNSUBSCRIBED, "opened": Kind.OPENED,
    "unique_opened": Kind.OPENED, "proxy_open": Kind.OPENED, "unique_proxy_open": Kind.OPENED,
    "click": Kind.CLICKED,
}


def brevo_event(e: dict[str, Any]) -> DeliveryEvent:
    name = str(e.get("event", ""))
    kind = EVENTS.get(name, Kind.UNKNOWN)
    # The send answer's messageId is "<id@host>"; events write it with or without the <>.
    msg_id = str(e.get("message-id") or "").strip() or None
    if msg_id and not msg_id.startswith("<"):
        msg_id = f"<{msg_id}>"
    detail = str(e.get("reason") or e.get("link") or name)
    return DeliveryEvent(
        kind=kind, provider_id=msg_id,
        recipient=str(e["email"]).lower() if e.get("email") else None,
        at=_when(e), detail=detail[:1000], raw=e, message_id_header=msg_id,
        permanent=(name == "hard_bounce") if kind is Kind.BOUNCED else None)


def _when(e: dict[str, Any]) -> float:
    """``ts_epoch`` (milliseconds in Brevo's samples), else ``ts_event`` (seconds)."""
    epoch = e.get("ts_epoch")
    if isinstance(epoch, int | float) and epoch > 1e11:
        return float(epoch) / 1000
    return event_time(epoch or e.get("ts_event") or e.get("date"))


class BrevoTransport(_http.HttpTransport):
    settings: BrevoSettings
    settings_model = BrevoSettings
    title = "Brevo"
    docs_url = "https://developers.brevo.com/reference/send-transac-email"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "BREVO_API_KEY",
        "webhook_auth": "bearer",
        "webhook_key_env": "BREVO_WEBHOOK_TOKEN",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "a v3 API key (SMTP & API > API keys), not an SMTP key",
        "webhook_auth": "POST /webhooks/brevo, with the token set there",
    }
    default_base = "https://api.brevo.com"
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = BrevoWebhook

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("api-key", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title, forbidden_headers=RESERVED_HEADERS)
        if any(a.inline for a in m.attachments):
            raise UnsupportedFeature(
                "Brevo's API has no Content-ID for attachments, so this message's inline "
                "images cannot be sent as inline: link them from the HTML, or route such mail "
                "to an SMTP connection", code="unsupported.inline")
        if len(m.reply_to) > 1:
            raise UnsupportedFeature(
                f"Brevo takes one Reply-To address; this message has {len(m.reply_to)}: send "
                "it with one, or through a provider that takes several",
                code="unsupported.reply_to")
        # No size check here: a message over Brevo's limit is refused by Brevo (413,
        # data.too_big), which is what its documentation promises.
        body = _http.json_bytes(self.payload(m))
        return _http.Request("POST", f"{self.base}/v3/smtp/email",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, f"JSON, {len(m.attachments)} attachment(s), {len(body)} bytes")

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        data: dict[str, Any] = {"sender": _mime.mailbox_object(m.from_),
                                "to": [_mime.mailbox_object(a) for a in m.to],
                                "subject": m.subject}
        for key, values in (("cc", m.cc), ("bcc", m.bcc)):
            if values:
                data[key] = [_mime.mailbox_object(a) for a in values]
        if m.reply_to:
            data["replyTo"] = _mime.mailbox_object(m.reply_to[0])
        if m.html is not None:
            data["htmlContent"] = m.html
        if m.text is not None:
            data["textContent"] = m.text
        if m.attachments:
            data["attachment"] = [{"content": base64.b64encode(a.data).decode("ascii"),
                                   "name": a.filename} for a in m.attachments]
        headers = _mime.header_dict(m, self.title)
        if m.metadata:
            headers[METADATA_HEADER] = json.dumps(m.metadata, ensure_ascii=False)
        if self.settings.sandbox:
            headers["X-Sib-Sandbox"] = "drop"
        if headers:
            data["headers"] = headers
        if m.tags:
            data["tags"] = list(m.tags)
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        msg_id = _http.json_body(resp).get("messageId")
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        return _http.ApiError(resp.status_code, str(data.get("code") or ""),
                              str(data.get("message") or resp.reason_phrase))

    def check_request(self) -> _http.Request:
        """``GET /v3/account``: the account's plan and credits, which any v3 key may read;
        nothing is sent."""
        return _http.Request("GET", f"{self.base}/v3/account", {"Accept": "application/json"},
                             b"", "the account")

    def checked(self, resp: httpx.Response) -> str:
        email = _http.json_body(resp).get("email")
        return "the API key works" + (f" (account {email})" if email else "")
