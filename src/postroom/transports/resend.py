"""Resend: ``POST /emails`` with the message as JSON (Resend API reference, "Send Email",
https://resend.com/docs/api-reference/emails/send-email, "Errors",
https://resend.com/docs/api-reference/errors, "Idempotency keys", and "Webhooks: verify
webhooks requests", https://resend.com/docs/dashboard/webhooks/verify-webhooks-requests).

- Auth: ``Authorization: Bearer re_...``.
- Request: ``from``, ``to``/``cc``/``bcc``/``reply_to`` (lists of "Name <a@b>", at most 50
  recipients), ``subject``, ``text``, ``html``, ``headers`` ({name: value}),
  ``attachments`` ([{filename, content (base64), content_type, content_id}]: a
  ``content_id`` makes it an inline image), ``tags`` ([{name, value}], ASCII letters,
  digits, ``_`` and ``-`` only): Postroom's tags as ``{tag: "true"}``, its metadata as
  ``{key: value}``, both echoed in events. ``Idempotency-Key``: one per message and body,
  so a retry after an answer that never came is not sent twice (Resend keeps keys 24 h).
- Success: 200 ``{"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}``, the id events carry as
  ``data.email_id``.
- Errors: ``{"statusCode", "name", "message"}``; ``name`` is the code (``invalid_api_key``,
  ``validation_error``, ``daily_quota_exceeded``...). "validation_error" covers several
  causes, told apart by their message (MESSAGES).
- Webhooks: signed by Svix: ``svix-id``, ``svix-timestamp``, ``svix-signature`` ("v1,<base64
  HMAC-SHA256 of id.timestamp.body>", space-separated, any may match) under the endpoint's
  signing secret ``whsec_<base64 key>`` (the connection's webhook key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
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
from postroom.webhooks import DeliveryEvent, Kind, Refused, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

MAX_SIZE = 40 * 1024 * 1024  # "up to 40MB" per email, after base64 encoding
MAX_RECIPIENTS = 50  # "to: max 50" (and the same for the whole message here)
_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")  # Resend: tag names and values

_Rule = _http.ErrorRule
# Resend's messages that say more than their error name ("validation_error" covers all of
# them), matched as substrings (lower case) -> the code the ERRORS table knows them by.
MESSAGES: Mapping[str, str] = {
    "only send testing emails": "testing_only",
    "domain is not verified": "domain_unverified",
    "verify a domain": "testing_only",
}
_QUOTA = _Rule("resend.quota_exceeded", "the account's sending quota is used up. Fix: wait "
               "for it to renew or upgrade the plan in Resend", kind=DeliveryError,
               permanent=False, scope=Scope.CONFIGURATION)
_INVALID = _Rule("resend.invalid_request", "Resend found the message invalid (named "
                 "above): correct it in the app that sent it")
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "invalid_api_key": _Rule("auth.api_key_refused", auth="refused"),
    "missing_api_key": _Rule("auth.api_key_refused", auth="refused"),
    "restricted_api_key": _Rule("auth.api_key_forbidden", auth="forbidden"),
    "testing_only": _Rule(
        "resend.testing_only", "without a verified domain Resend sends only to the "
        "account's own address. Fix: verify a domain at resend.com/domains and send from an "
        "address of it", kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
    "domain_unverified": _Rule(
        "resend.domain_unverified", "the From address's domain is not verified in Resend. "
        "Fix: add it at resend.com/domains and publish its DNS records", kind=SenderRejected,
        permanent=False, scope=Scope.CONFIGURATION),
    "daily_quota_exceeded": _QUOTA,
    "monthly_quota_exceeded": _QUOTA,
    "concurrent_idempotent_requests": _Rule(
        "resend.idempotency_busy", "an earlier try of this message is still in progress "
        "at Resend; Postroom tries again later", kind=ConnectError, permanent=False),
    "validation_error": _INVALID, "invalid_parameter": _INVALID,
    "missing_required_field": _INVALID, "invalid_attachment": _INVALID,
    "invalid_from_address": _INVALID,
}


class ResendSettings(_http.ApiKeySettings):
    transport: Literal["resend"] = "resend"


class ResendWebhook(Webhook):
    """Resend's webhooks, signed by Svix (HMAC-SHA256 of id.timestamp.body)."""

    docs_url = "https://resend.com/docs/dashboard/webhooks/verify-webhooks-requests"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        secret = verify.need_key(settings.key, "Resend")
        msg_id = verify.header(req, "svix-id")
        stamp = verify.header(req, "svix-timestamp")
        signatures = verify.header(req, "svix-signature")
        verify.check_timestamp(stamp, tolerance=settings.tolerance)
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError) as err:
            raise Refused("the connection's Resend webhook key is not a whsec_ signing "
                          "secret", code="event.no_key") from err
        signed = f"{msg_id}.{stamp}.".encode() + req.body
        expected = verify.mac(key, signed)
        # Several "v1,<sig>" separated by spaces while a secret is rotated: any may match.
        for item in signatures.split():
            version, _, given = item.partition(",")
            try:
                ok = version == "v1" and hmac.compare_digest(
                    base64.b64decode(given, validate=True), expected)
            except (binascii.Error, ValueError):
                ok = False
            if ok:
                return
        raise Refused("no Svix v1 signature matches", code="event.bad_signature")

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        if not isinstance(data, dict):
            return []
        kind = EVENTS.get(str(data.get("type", "")))
        if kind is None and not str(data.get("type", "")).startswith("email."):
            return []  # contact.* and domain.* events are about no message
        d = data.get("data")
        d = d if isinstance(d, dict) else {}
        to = d.get("to")
        to = [str(a) for a in to] if isinstance(to, list) else []
        bounce = d.get("bounce")
        bounce = bounce if isinstance(bounce, dict) else {}
        permanent = (bounce.get("type") == "Permanent") if kind is Kind.BOUNCED else None
        failed = d.get("failed")
        reason = failed.get("reason") if isinstance(failed, dict) else None
        detail = str(bounce.get("message") or reason or data.get("type"))
        return [DeliveryEvent(
            kind=kind or Kind.UNKNOWN, provider_id=str(d.get("email_id") or "") or None,
            # One address is the recipient; a list names the message's To, not whom the
            # event is about, so no recipient is claimed (nor suppressed).
            recipient=_mime.mailbox_object(to[0])["email"].lower() if len(to) == 1 else None,
            at=event_time(data.get("created_at") or d.get("created_at")),
            detail=detail, raw=data, event_id=req.headers.get("svix-id"),
            permanent=permanent)]


# Resend event type -> vocabulary ("Webhooks: event types").
EVENTS: Mapping[str, Kind] = {
    "email.sent": Kind.QUEUED, "email.scheduled": Kind.QUEUED,
    "email.delivered": Kind.DELIVERED, "email.delivery_delayed": Kind.DEFERRED,
    "email.bounced": Kind.BOUNCED, "email.complained": Kind.COMPLAINED,
    "email.failed": Kind.REJECTED, "email.suppressed": Kind.REJECTED,
    "email.opened": Kind.OPENED, "email.clicked": Kind.CLICKED,
}


class ResendTransport(_http.HttpTransport):
    settings: ResendSettings
    settings_model = ResendSettings
    title = "Resend"
    docs_url = "https://resend.com/docs/api-reference/emails/send-email"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "RESEND_API_KEY",
        "webhook_key_env": "RESEND_WEBHOOK_SECRET",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "webhook_key_env": "the webhook's whsec_ signing secret",
    }
    default_base = "https://api.resend.com"
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = ResendWebhook

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("Authorization", self.api_key, prefix="Bearer ")

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        _mime.limit_recipients(m, MAX_RECIPIENTS, self.title)
        body = _http.refuse_over(_http.json_bytes(self.payload(m)), MAX_SIZE, self.title)
        # One key per message and body: a retry of the same request is the same key.
        key = f"postroom-{env.id}-{hashlib.sha256(body).hexdigest()[:32]}"
        return _http.Request("POST", f"{self.base}/emails",
                             {"Content-Type": "application/json", "Idempotency-Key": key},
                             body, f"JSON, {len(m.attachments)} attachment(s), {len(body)} bytes")

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        data: dict[str, Any] = {"from": m.from_, "to": m.to, "subject": m.subject}
        for key, values in (("cc", m.cc), ("bcc", m.bcc), ("reply_to", m.reply_to)):
            if values:
                data[key] = values
        if m.text is not None:
            data["text"] = m.text
        if m.html is not None:
            data["html"] = m.html
        headers = _mime.header_dict(m, self.title)
        if headers:
            data["headers"] = headers
        if m.attachments:
            data["attachments"] = [_attachment(a) for a in m.attachments]
        tags = _tags(m)
        if tags:
            data["tags"] = tags
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        msg_id = _http.json_body(resp).get("id")
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        said = str(data.get("message") or resp.reason_phrase)
        low = said.lower()
        code = next((c for words, c in MESSAGES.items() if words in low),
                    str(data.get("name") or ""))
        return _http.ApiError(resp.status_code, code, said)

    def check_request(self) -> _http.Request:
        """``GET /domains``: sends nothing; answered for a full-access key."""
        return _http.Request("GET", f"{self.base}/domains", {}, b"", "the domain list")

    def checked(self, resp: httpx.Response) -> str:
        return "the API key works (full access)"

    async def check(self) -> str:
        """A sending-only key is answered ``restricted_api_key`` by ``GET /domains``: it
        authenticated, so it is valid too (and all Postroom needs)."""
        ex = _http.Exchange()
        resp = await self.request(ex, self.check_request())
        if not resp.is_success and _http.json_body(resp).get("name") != "restricted_api_key":
            raise self.failure(resp, ex)
        said = self.checked(resp) if resp.is_success else "the API key works (sending only)"
        ex.lines.append(f"*  {self.title}: {said}")
        return ex.transcript


def _tags(m: _mime.Mapped) -> list[dict[str, str]]:
    """Postroom's tags ({tag: "true"}) and metadata ({key: value}) as Resend's tags, whose
    names and values take ASCII letters, digits, "_" and "-" only: others are refused."""
    pairs = [(t, "true") for t in m.tags] + list(m.metadata.items())
    names = [n for n, _ in pairs]
    for name, value in pairs:
        if not (_TAG.fullmatch(name) and _TAG.fullmatch(value)):
            raise UnsupportedFeature(
                f"Resend tags take only ASCII letters, digits, '_' and '-': the tag or "
                f"metadata {name!r} = {value!r} has others; rename it",
                code="unsupported.tags")
        if names.count(name) > 1:
            raise UnsupportedFeature(
                f"{name!r} is both a tag and a metadata key, and Resend tags are one name "
                "each: rename one", code="unsupported.tags")
    return [{"name": n, "value": v} for n, v in pairs]


def _attachment(a: _mime.Attachment) -> dict[str, str]:
    out = {"filename": a.filename, "content": base64.b64encode(a.data).decode("ascii"),
           "content_type": a.content_type}
    if a.content_id:
        out["content_id"] = a.content_id
    return out
