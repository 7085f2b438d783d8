"""SMTP2GO: ``POST /v3/email/mime`` with the stored MIME (SMTP2GO API reference
https://developers.smtp2go.com/reference/introduction-1 (base URLs per region, the
``X-Smtp2go-Api-Key`` header, response codes), "Send a MIME email",
https://developers.smtp2go.com/reference/send-mime-email; "View API key
permissions" (POST /v3/api_keys/permissions); "Webhooks overview" and "Setup a Webhook",
https://developers.smtp2go.com/docs/setup-a-webhook).

- Auth: ``X-Smtp2go-Api-Key: api-...``; the key's permission list must include
  ``/email/mime`` (else SMTP2GO answers ``E_ApiResponseCodes.ENDPOINT_PERMISSION_DENIED``).
- Hosts: ``https://api.smtp2go.com/v3`` (``region = "global"``: the nearest of the others),
  ``us-api``, ``eu-api``, ``au-api`` (``us``, ``eu``, ``au``).
- Request: ``{"mime_email": "<the MIME message, base64-encoded>"}``. SMTP2GO reads the
  recipients from To/Cc/Bcc, so
  envelope recipients missing there are added as Bcc (transports._http.match_headers).
  SMTP2GO has no tag or metadata field for a MIME message: Postroom's tags and metadata go in
  ``X-Postroom-Tags`` / ``X-Postroom-Metadata`` header fields (transports._headers), which a
  webhook returns when it lists them under "Email headers".
- Success: 200 ``{"request_id", "data": {"succeeded": n, "failed": m, "failures": [...],
  "email_id": "1er8bV-6Tw0Mi-7h"}}``: ``email_id`` is what events name.
- Errors: ``{"request_id", "data": {"error", "error_code": "E_ApiResponseCodes.<NAME>",
  "field_validation_errors": {...}}}`` with 400/401/402/403/429/5xx.
- Webhooks: JSON (or a form) per event, no signature; a webhook may send an Authorization
  header, basic or bearer, set where it is created. ``webhook_auth`` says which; the
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
)
from postroom.transports import _auth, _headers, _http, base
from postroom.webhooks import DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

BASES = {"global": "https://api.smtp2go.com/v3", "us": "https://us-api.smtp2go.com/v3",
         "eu": "https://eu-api.smtp2go.com/v3", "au": "https://au-api.smtp2go.com/v3"}
MAX_SIZE = 50 * 1024 * 1024  # "Max 50 MB total email size"
_CODE = "E_ApiResponseCodes."

_Rule = _http.ErrorRule
# SMTP2GO's error_code values -> what they mean here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    f"{_CODE}ENDPOINT_PERMISSION_DENIED": _Rule("auth.api_key_forbidden", auth="forbidden"),
    f"{_CODE}SENDER_NOT_VERIFIED": _Rule(
        "smtp2go.sender_unverified", "the From address is not a verified sender of the "
        "account. Fix: in SMTP2GO, verify its domain under Sending > Verified Senders (or "
        "add it as a single sender)", kind=SenderRejected, permanent=False,
        scope=Scope.CONFIGURATION),
    f"{_CODE}NON_VALIDATING_IN_PAYLOAD": _Rule(
        "smtp2go.invalid_request", "SMTP2GO found the message invalid (named above): correct "
        "it in the app that sent it"),
    f"{_CODE}API_EXCEPTION": _Rule("smtp2go.api_exception", "SMTP2GO failed handling the "
                                   "request; Postroom retries (or uses the next connection "
                                   "of the route)", kind=ConnectError, permanent=False),
    402: _Rule("smtp2go.request_failed", "SMTP2GO could not send it (the account's monthly "
               "allowance used up, or sending paused). Fix: check the account's plan and "
               "status in SMTP2GO", kind=DeliveryError, permanent=False,
               scope=Scope.CONFIGURATION),
    429: _Rule("provider.rate_limited", "rate limit. Postroom retries later; lower the "
               "connection's rate_limit to stay under it", kind=ConnectError, permanent=False),
}


class Smtp2goSettings(_http.ApiKeySettings):
    transport: Literal["smtp2go"] = "smtp2go"
    region: Literal["global", "us", "eu", "au"] = "global"  # the API host; global: nearest
    # How SMTP2GO authenticates its webhook requests to Postroom (the webhook's
    # "Authorization header"): "basic" (webhook key = "user:password") or "bearer" (the token).
    webhook_auth: Literal["basic", "bearer"] = "basic"


class Smtp2goWebhook(Webhook):
    """SMTP2GO's webhooks: one event per request, JSON or form-encoded, with the
    Authorization header set on the webhook."""

    docs_url = "https://developers.smtp2go.com/docs/setup-a-webhook"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        scheme = getattr(settings.connection, "webhook_auth", "basic")
        verify.check_authorization(req, verify.need_key(settings.key, "SMTP2GO"), scheme)

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        if "form-urlencoded" in req.headers.get("content-type", ""):
            items: Any = [self.form(req)]
        else:
            data = self.json(req)
            items = data if isinstance(data, list) else [data]
        return [smtp2go_event(e) for e in items if isinstance(e, dict)]


# SMTP2GO's email events -> the vocabulary ("processed": SMTP2GO accepted it).
EVENTS: Mapping[str, Kind] = {
    "processed": Kind.QUEUED, "delivered": Kind.DELIVERED, "bounce": Kind.BOUNCED,
    "reject": Kind.REJECTED, "spam": Kind.COMPLAINED, "unsubscribe": Kind.UNSUBSCRIBED,
    "resubscribe": Kind.UNKNOWN, "open": Kind.OPENED, "click": Kind.CLICKED,
}


def smtp2go_event(e: dict[str, Any]) -> DeliveryEvent:
    name = str(e.get("event", ""))
    kind = EVENTS.get(name, Kind.UNKNOWN)
    header_id = next((str(v) for k, v in e.items() if k.lower() == "message-id" and v), None)
    detail = str(e.get("context") or e.get("message") or e.get("url") or name)
    return DeliveryEvent(
        kind=kind, provider_id=str(e.get("email_id") or "") or None,
        recipient=str(e["rcpt"]).lower() if e.get("rcpt") else None,
        at=event_time(e.get("time")), detail=detail[:1000], raw=e,
        message_id_header=header_id,
        permanent=(str(e.get("bounce")) == "hard") if kind is Kind.BOUNCED else None)


class Smtp2goTransport(_http.HttpTransport):
    settings: Smtp2goSettings
    settings_model = Smtp2goSettings
    title = "SMTP2GO"
    docs_url = "https://developers.smtp2go.com/reference/introduction-1"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "region": "eu",
        "api_key_env": "SMTP2GO_API_KEY",
        "webhook_key_env": "SMTP2GO_WEBHOOK_AUTH",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "region": "eu-api.smtp2go.com",
        "api_key_env": "its permissions must include /email/mime",
        "webhook_key_env": "\"user:password\" of the webhook's basic auth header",
    }
    default_base = BASES["global"]
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = Smtp2goWebhook

    def default_api_base(self) -> str:
        return BASES[self.settings.region]

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("X-Smtp2go-Api-Key", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        raw = _headers.prepended(_headers.tag_fields(env, self.title),
                                 _http.match_headers(env, self.title))
        # The limit is the email's own size, before the base64 of the request.
        encoded = base64.b64encode(_http.refuse_over(raw, MAX_SIZE, self.title))
        body = json.dumps({"mime_email": encoded.decode("ascii")}).encode()
        return _http.Request("POST", f"{self.base}/email/mime",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, f"raw MIME, {len(raw)} bytes base64 in JSON")

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        data = _http.json_body(resp).get("data")
        data = data if isinstance(data, dict) else {}
        refused: _http.Recipients = {}
        for failure in data.get("failures") or []:
            # A failure names its recipient: "addr" or {"email": addr, "error": why}.
            addr, why = ((failure.get("email"), failure.get("error"))
                         if isinstance(failure, dict) else (failure, None))
            if addr:
                refused[str(addr)] = base.RecipientResult(
                    550, f"SMTP2GO: {why or 'refused this recipient'}")
        email_id = data.get("email_id")
        return (str(email_id) if email_id else None), refused or None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp).get("data")
        data = data if isinstance(data, dict) else {}
        said = str(data.get("error") or resp.reason_phrase)
        fields = data.get("field_validation_errors")
        if isinstance(fields, dict) and fields.get("message"):
            said = f"{said} ({fields.get('fieldname', '')}: {fields['message']})"
        return _http.ApiError(resp.status_code, str(data.get("error_code") or ""), said)

    def check_request(self) -> _http.Request:
        """``POST /api_keys/permissions``: the key's own permissions, which every key may
        read; nothing is sent."""
        return _http.Request("POST", f"{self.base}/api_keys/permissions",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             b"{}", "the key's permissions")

    def checked(self, resp: httpx.Response) -> str:
        return "the API key works"
