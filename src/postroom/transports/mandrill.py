"""Mandrill (Mailchimp Transactional): ``POST /api/1.0/messages/send-raw`` with the stored MIME
(Mailchimp Transactional API reference "Messages: send-raw",
https://mailchimp.com/developer/transactional/api/messages/send-mime-message/; "Users: ping";
"Errors"; "Authenticating webhook requests",
https://mailchimp.com/developer/transactional/guides/track-respond-activity-webhooks/; SMTP
headers X-MC-Tags / X-MC-Metadata, "Customize messages with SMTP headers").

- Auth: the API key goes in the JSON body (``"key"``), on every call; no header carries it.
- Request: ``{"key", "raw_message": "<MIME>", "to": [envelope recipients], "async": false}``.
  ``raw_message`` is sent "exactly as if it were sent through Mandrill's SMTP servers", so
  Postroom's tags and metadata go in its ``X-MC-Tags`` (comma-separated) and
  ``X-MC-Metadata`` (JSON) header fields, which Mandrill reads and removes. The message's
  Message-ID is added to the metadata (``postroom_message_id``): events carry the metadata,
  not the header fields. A test API key (made in Mandrill's test mode) validates and sends
  nothing.
- Success: 200 ``[{"email", "status": "sent" | "queued" | "scheduled" | "rejected" |
  "invalid", "reject_reason", "_id"}]``, one per recipient: refused ones become per-recipient
  failures; the first recipient's ``_id`` is the attempt's provider id (events name each
  recipient's own ``_id``; the others are matched by the Message-ID in the metadata).
- Errors: ``{"status": "error", "code": n, "name": "Invalid_Key" | "ValidationError" |
  "PaymentRequired" | "Unknown_Subaccount" | "GeneralError" ..., "message"}`` (HTTP 500 for
  most: the name, not the status, says what it is).
- Webhooks: a form POST with ``mandrill_events`` (a JSON list), signed in
  ``X-Mandrill-Signature``: base64 HMAC-SHA1, under the webhook's key, of the webhook URL
  exactly as entered in Mandrill followed by each POST field's name and value, sorted by
  name. ``webhook_url`` is that URL (the request's own may differ behind a proxy).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field

from postroom.envelope import Envelope, header_values
from postroom.exceptions import (
    AuthError,
    ConnectError,
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _headers, _http, base
from postroom.webhooks import DeliveryEvent, Kind, Refused, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

MAX_SIZE = 25 * 1024 * 1024  # Mandrill's message size limit, the encoded message in all
TAGS_HEADER, METADATA_HEADER = "X-MC-Tags", "X-MC-Metadata"
MESSAGE_ID_KEY = "postroom_message_id"  # in the metadata: events find the message by it

_Rule = _http.ErrorRule
_DOMAIN = ("the sending domain is not verified in Mandrill (or has no DKIM/SPF set up). Fix: "
           "in Mandrill, add the From domain under Settings > Domains > Sending Domains and "
           "verify it")
# Mandrill's error names, and the reject_reason of refused recipients that say the
# connection (not the recipient) is at fault -> what they mean here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "Invalid_Key": _Rule("auth.api_key_refused", auth="refused"),
    "ValidationError": _Rule("mandrill.invalid_request", "Mandrill found the message invalid "
                             "(named above): correct it in the app that sent it"),
    "PaymentRequired": _Rule("mandrill.payment_required", "the account may not send until "
                             "it is paid for (or its sending blocks run out). Fix: check "
                             "billing in Mailchimp Transactional", kind=DeliveryError,
                             permanent=False, scope=Scope.CONFIGURATION),
    "Unknown_Subaccount": _Rule("mandrill.unknown_subaccount", "the subaccount named by the "
                                "message (X-MC-Subaccount) does not exist. Fix: create it in "
                                "Mandrill, or correct the header", kind=DeliveryError,
                                permanent=False, scope=Scope.CONFIGURATION),
    "GeneralError": _Rule("mandrill.general_error", "Mandrill failed; Postroom retries (or uses "
                          "the next connection of the route)", kind=ConnectError,
                          permanent=False),
    "unsigned": _Rule("mandrill.domain_unverified", _DOMAIN, kind=SenderRejected,
                      permanent=False, scope=Scope.CONFIGURATION),
    "invalid-sender": _Rule("mandrill.domain_unverified", _DOMAIN, kind=SenderRejected,
                            permanent=False, scope=Scope.CONFIGURATION),
    "test-mode-limit": _Rule("mandrill.test_mode_limit", "the test API key's daily allowance "
                             "is used up. Fix: wait a day, or use a production key",
                             kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
    429: _Rule("provider.rate_limited", "rate limit. Postroom retries later; lower the "
               "connection's rate_limit to stay under it", kind=ConnectError, permanent=False),
}
# reject_reason values that fault the connection: every recipient refused for one of these
# makes the attempt fail as the table says (held, the next connection tried).
CONNECTION_REASONS = frozenset({"unsigned", "invalid-sender", "test-mode-limit"})
# A soft-bounce rejection lasts until Mandrill's rejection list entry expires: retry later.
TRANSIENT_REASONS = frozenset({"soft-bounce"})


class MandrillSettings(_http.ApiKeySettings):
    transport: Literal["mandrill"] = "mandrill"
    ip_pool: str | None = Field(default=None, min_length=1)  # a dedicated IP pool's name
    # The webhook's URL exactly as entered in Mandrill (Settings > Webhooks): its signature
    # covers it. https://postroom.example.com/webhooks/NAME
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")


class BodyKey(_auth.Auth):
    """Mandrill's API key rides in the JSON body (``"key"``), which ``build`` writes; no
    header carries a credential."""

    retry_on_401 = False
    shown = "key in the JSON body: ****"

    async def headers(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes, held: _auth.Held, *,
                      rejected: bool = False) -> dict[str, str]:
        return {}

    def refused(self, who: _auth.Who) -> AuthError:
        return _auth.api_key_refused(who)


class MandrillWebhook(Webhook):
    docs_url = ("https://mailchimp.com/developer/transactional/guides/"
                "track-respond-activity-webhooks/")

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        key = verify.need_key(settings.key, "Mandrill")
        url = getattr(settings.connection, "webhook_url", None)
        if not url:
            raise Refused("Mandrill webhook: the connection has no webhook_url; set it to the "
                          "URL exactly as entered in Mandrill (its signature covers it)",
                          code="event.no_url")
        signed = url + "".join(k + v for k, v in sorted(self.form(req).items()))
        verify.check_hmac(verify.header(req, "X-Mandrill-Signature"), key.encode(),
                          signed.encode(), algorithm="sha1", encoding="base64")

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        events = self.form(req).get("mandrill_events", "[]")
        data = self.json(WebhookRequest(req.method, req.path, req.headers, events.encode()))
        items = data if isinstance(data, list) else []
        return [mandrill_event(e) for e in items if isinstance(e, dict)]


# Mandrill's message events -> the vocabulary ("send": the receiving server took it).
# Sync events (rejection and allow lists: "type" instead of "event") are kept as unknown.
EVENTS: Mapping[str, Kind] = {
    "send": Kind.DELIVERED, "deferral": Kind.DEFERRED, "hard_bounce": Kind.BOUNCED,
    "soft_bounce": Kind.BOUNCED, "reject": Kind.REJECTED, "spam": Kind.COMPLAINED,
    "unsub": Kind.UNSUBSCRIBED, "open": Kind.OPENED, "click": Kind.CLICKED,
}


def mandrill_event(e: dict[str, Any]) -> DeliveryEvent:
    name = str(e.get("event", ""))
    kind = EVENTS.get(name, Kind.UNKNOWN)
    found = e.get("msg")
    msg: dict[str, Any] = found if isinstance(found, dict) else {}
    found = msg.get("metadata")
    metadata: dict[str, Any] = found if isinstance(found, dict) else {}
    msg_id = e.get("_id") or msg.get("_id")
    rcpt = msg.get("email") or e.get("email")
    detail = str(msg.get("bounce_description") or msg.get("diag") or e.get("url") or
                 name or e.get("type", ""))
    header_id = str(metadata.get(MESSAGE_ID_KEY) or "") or None
    return DeliveryEvent(
        kind=kind, provider_id=str(msg_id) if msg_id else None,
        recipient=str(rcpt).lower() if rcpt else None, at=event_time(e.get("ts")),
        detail=detail[:1000], raw=e, message_id_header=header_id,
        permanent=(name == "hard_bounce") if kind is Kind.BOUNCED else None)


class MandrillTransport(_http.HttpTransport):
    settings: MandrillSettings
    settings_model = MandrillSettings
    title = "Mandrill"
    docs_url = "https://mailchimp.com/developer/transactional/api/messages/send-mime-message/"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "MANDRILL_API_KEY",
        "webhook_url": "https://postroom.example.com/webhooks/mandrill",
        "webhook_key_env": "MANDRILL_WEBHOOK_KEY",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "Settings > SMTP & API Info",
        "webhook_url": "exactly as entered in Mandrill",
        "webhook_key_env": "the webhook's key (Settings > Webhooks)",
    }
    default_base = "https://mandrillapp.com/api/1.0"
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = MandrillWebhook

    def make_auth(self) -> _auth.Auth:
        return BodyKey()

    def build(self, env: Envelope) -> _http.Request:
        raw = self.with_fields(env)
        data: dict[str, Any] = {"key": self.api_key(),
                                "raw_message": _http.mime_text(raw, self.title),
                                "to": list(env.recipients), "async": False}
        if self.settings.ip_pool:
            data["ip_pool"] = self.settings.ip_pool
        body = _http.refuse_over(_http.json_bytes(data), MAX_SIZE,
                                 self.title)
        return _http.Request("POST", f"{self.base}/messages/send-raw",
                             {"Content-Type": "application/json"}, body,
                             f"raw MIME, {len(raw)} bytes in JSON")

    def with_fields(self, env: Envelope) -> bytes:
        """``env.raw`` with Postroom's tags and metadata (and its Message-ID) in Mandrill's
        X-MC-Tags / X-MC-Metadata fields; a message that already sets them is refused
        rather than sent with two."""
        had = header_values(env.raw, ("x-mc-tags", "x-mc-metadata", "message-id"))
        metadata = dict(env.metadata)
        if "message-id" in had:
            metadata[MESSAGE_ID_KEY] = had["message-id"].strip()
        bad = [t for t in env.tags if "," in t or t.startswith("_") or not t.isprintable()]
        if bad:
            raise UnsupportedFeature(
                f"Mandrill's tags are a comma-separated list that may not start with an "
                f"underscore; the tag {bad[0]!r} cannot be one: rename it",
                code="unsupported.tags")
        fields = []
        if env.tags:
            fields.append((TAGS_HEADER, ", ".join(env.tags)))
        if metadata:
            fields.append((METADATA_HEADER, json.dumps(metadata, ensure_ascii=True)))
        clash = [name for name, _ in fields if name.lower() in had]
        if clash:
            raise UnsupportedFeature(
                f"the message sets {clash[0]} itself, and Postroom would add its tags and "
                "metadata there: leave the field out (Postroom's tags and metadata fill it)",
                code="unsupported.tags")
        return _headers.prepended(fields, env.raw)

    def recipients(self, resp: httpx.Response) -> list[dict[str, Any]]:
        try:
            data = resp.json()
        except ValueError:
            return []
        return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        rows = self.recipients(resp)
        refused: _http.Recipients = {}
        for r in rows:
            status = str(r.get("status", ""))
            if status in ("rejected", "invalid") and r.get("email"):
                reason = str(r.get("reject_reason") or status)
                code = 450 if reason in TRANSIENT_REASONS else 550
                refused[str(r["email"])] = base.RecipientResult(
                    code, f"Mandrill: {status} ({reason})")
        msg_id = next((r["_id"] for r in rows if r.get("_id")), None)
        return (str(msg_id) if msg_id else None), refused or None

    def delivered(self, envelope: Envelope, resp: httpx.Response,
                  ex: _http.Exchange) -> base.DeliveryResult:
        """Every recipient refused for a reason of the connection's (an unverified domain,
        the test key's limit): the attempt fails as that reason's table row says."""
        rows = self.recipients(resp)
        if rows and all(r.get("reject_reason") in CONNECTION_REASONS for r in rows):
            raise self.failure(resp, ex)
        return super().delivered(envelope, resp, ex)

    def accepted(self, resp: httpx.Response) -> str:
        rows = self.recipients(resp)
        said = ", ".join(f"{r.get('email')} {r.get('status')}" for r in rows[:5])
        return f"{resp.status_code} " + (said or "accepted")

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        rows = self.recipients(resp)
        if rows:  # a 200 whose every recipient was refused for the connection's reason
            reason = str(rows[0].get("reject_reason") or "")
            return _http.ApiError(resp.status_code, reason,
                                  f"every recipient rejected ({reason})")
        data = _http.json_body(resp)
        return _http.ApiError(resp.status_code, str(data.get("name") or ""),
                              str(data.get("message") or resp.reason_phrase))

    def check_request(self) -> _http.Request:
        """``POST /users/ping2``: answers ``{"PING": "PONG!"}`` to a valid key; sends
        nothing."""
        body = json.dumps({"key": self.api_key()}).encode()
        return _http.Request("POST", f"{self.base}/users/ping2",
                             {"Content-Type": "application/json"}, body, "ping")

    def checked(self, resp: httpx.Response) -> str:
        return "the API key works"
