"""Mailtrap Email API: ``POST /api/send`` with the message as JSON (Mailtrap API reference,
"Send email (including templates)", https://api-docs.mailtrap.io/docs/mailtrap-api-docs/,
"Email API", https://mailtrap.io/email-api.md, and "Webhooks",
https://docs.mailtrap.io/email-api-smtp/advanced/webhooks).

- Hosts: ``https://send.api.mailtrap.io`` (the transactional stream), ``https://bulk.api.
  mailtrap.io`` (``stream = "bulk"``: Mailtrap requires it for promotional mail), and the
  Email Testing sandbox ``https://sandbox.api.mailtrap.io/api/send/{inbox_id}``
  (``sandbox = true`` + ``inbox_id``: mail lands in that test inbox, never delivered).
- Auth: ``Authorization: Bearer <API token>`` (the token needs access to the sending
  domain, or to the inbox for the sandbox).
- Request: ``from`` ({email, name}), ``to``/``cc``/``bcc`` ([{email, name}]), ``subject``,
  ``text``, ``html``, ``attachments`` ([{content (base64), type, filename, disposition
  "attachment" | "inline", content_id}]), ``headers`` ({name: value}: Reply-To goes there,
  as Mailtrap's API has no field taking several), ``category`` (one: Postroom's first tag;
  with more, all of them go in ``custom_variables["tags"]``), ``custom_variables``
  ({str: str}: Postroom's metadata), both echoed in events.
- Success: 200 ``{"success": true, "message_ids": [...]}``: one id per recipient, in the
  order To, Cc, Bcc (the sandbox gives one for all). Each recipient's id is in its result;
  the first is the message's ``provider_id`` (events for the others carry their own ids:
  see the report of doubtful points in the team notes).
- Errors: ``{"success": false, "errors": ["..."]}`` (400, 401 "Unauthorized", 403, 429,
  5xx): plain sentences, told apart by their words (MESSAGES); a 403 they do not name is
  the sending domain's (not verified, or the token has no access to it).
- Webhooks: ``Mailtrap-Signature`` = hex HMAC-SHA256 of the body under the webhook's signing
  secret; a batch ``{"events": [...]}``, each with its ``event_id`` (no timestamp is signed).

Errors checked against Mailtrap's own OpenAPI spec and docs on 2026-12-07 (issue 14):

- Confirmed: the error body and its statuses (github.com/mailtrap/mailtrap-openapi,
  specs/email-sending-transactional.openapi.yml: ``success: false`` + an ``errors`` array of
  strings; 401 "Unauthorized"; 403 "Forbidden", described as verify the domain or check
  the token's permissions), hence parse_error's reading of a bare 403.
- Partly documented words: "from domain" (the SMTP refusal "Sending from domain is not
  allowed", docs.mailtrap.io/email-api-smtp/troubleshooting/sending-from-domain-not-allowed)
  and "limit" (a suspension event's reason, specs/webhooks.openapi.yml).
- Unverified: the API's own sentences for an unverified domain, a suspended account and a
  used-up plan ("not verified", "sending domain", "suspended"): Mailtrap documents none.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import Field, model_validator

from postroom.envelope import Envelope
from postroom.exceptions import DeliveryError, Scope, SenderRejected, UnsupportedFeature
from postroom.transports import _auth, _http, _mime, base
from postroom.webhooks import DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

HOSTS: Mapping[str, str] = {"transactional": "https://send.api.mailtrap.io",
                            "bulk": "https://bulk.api.mailtrap.io",
                            "sandbox": "https://sandbox.api.mailtrap.io"}
ACCOUNTS = "https://mailtrap.io"  # the general API: GET /api/accounts
MAX_RECIPIENTS = 1000  # To, Cc and Bcc together ("up to 1000 recipients")

_Rule = _http.ErrorRule
# Words of Mailtrap's error sentences (lower case) -> the ERRORS key they mean; which of them
# Mailtrap documents is in the module header.
MESSAGES: Mapping[str, str] = {
    "not verified": "domain", "from domain": "domain", "sending domain": "domain",
    "suspended": "suspended", "limit": "limit",
}
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "domain": _Rule("mailtrap.domain_unverified", "the From address's domain is not a "
                    "verified sending domain of the Mailtrap account (or the token has no "
                    "access to it). Fix: verify the domain under Sending Domains, or send "
                    "from one", kind=SenderRejected, permanent=False,
                    scope=Scope.CONFIGURATION),
    "suspended": _Rule("mailtrap.account_suspended", "Mailtrap suspended sending for the "
                       "account or domain. Fix: see the notice in Mailtrap and contact its "
                       "support", kind=DeliveryError, permanent=False,
                       scope=Scope.CONFIGURATION),
    "limit": _Rule("mailtrap.plan_limit", "the plan's sending limit is used up. Fix: wait "
                   "for it to renew or upgrade the plan in Mailtrap", kind=DeliveryError,
                   permanent=False, scope=Scope.CONFIGURATION),
    400: _Rule("mailtrap.invalid_request", "Mailtrap found the message invalid (named "
               "above): correct it in the app that sent it"),
}


class MailtrapSettings(_http.ApiKeySettings):
    transport: Literal["mailtrap"] = "mailtrap"
    stream: Literal["transactional", "bulk"] = "transactional"  # bulk: promotional mail
    sandbox: bool = False  # Email Testing: into inbox_id, never delivered
    inbox_id: int | None = Field(default=None, gt=0)  # the Email Testing inbox (sandbox)

    @model_validator(mode="after")
    def _sandbox_inbox(self) -> MailtrapSettings:
        if self.sandbox and self.inbox_id is None:
            raise ValueError("sandbox = true needs inbox_id: the Email Testing inbox's id "
                             "(the number in its URL in Mailtrap)")
        return self


class MailtrapWebhook(Webhook):
    """Mailtrap's webhooks: ``Mailtrap-Signature`` is hex HMAC-SHA256 of the body."""

    docs_url = "https://docs.mailtrap.io/email-api-smtp/advanced/webhooks"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        verify.check_body_hmac(req, settings.key, "Mailtrap", "mailtrap-signature")

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        items = data.get("events") if isinstance(data, dict) else None
        out = []
        for ev in items if isinstance(items, list) else []:
            if not isinstance(ev, dict) or str(ev.get("event", "")).startswith("inbound"):
                continue
            name = str(ev.get("event", ""))
            kind = EVENTS.get(name.replace("_", " "), Kind.UNKNOWN)
            recipient = ev.get("email")
            out.append(DeliveryEvent(
                kind=kind, provider_id=str(ev.get("message_id") or "") or None,
                recipient=str(recipient).lower() if recipient else None,
                at=event_time(ev.get("timestamp")),
                detail=str(ev.get("response") or ev.get("reason") or name), raw=ev,
                event_id=str(ev.get("event_id") or "") or None,
                permanent=True if kind is Kind.BOUNCED else None))
        return out


# Mailtrap events ("Statuses and events") -> vocabulary. A soft bounce is retried by
# Mailtrap, and a suspension holds the message: both a delay, not a failure.
EVENTS: Mapping[str, Kind] = {
    "delivery": Kind.DELIVERED, "bounce": Kind.BOUNCED, "soft bounce": Kind.DEFERRED,
    "suspension": Kind.DEFERRED, "reject": Kind.REJECTED, "spam": Kind.COMPLAINED,
    "unsubscribe": Kind.UNSUBSCRIBED, "open": Kind.OPENED, "click": Kind.CLICKED,
}


class MailtrapTransport(_http.HttpTransport):
    settings: MailtrapSettings
    settings_model = MailtrapSettings
    title = "Mailtrap"
    docs_url = "https://api-docs.mailtrap.io/docs/mailtrap-api-docs/"
    default_base = HOSTS["transactional"]
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = MailtrapWebhook
    example: ClassVar[Mapping[str, Any]] = {
        "api_key_env": "MAILTRAP_API_TOKEN", "stream": "transactional",
        "webhook_key_env": "MAILTRAP_SIGNING_SECRET"}
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "an API token with access to the sending domain",
        "stream": "or \"bulk\" for promotional mail",
        "webhook_key_env": "the webhook's signing secret"}

    def default_api_base(self) -> str:
        return HOSTS["sandbox" if self.settings.sandbox else self.settings.stream]

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("Authorization", self.api_key, prefix="Bearer ")

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        _mime.limit_recipients(m, MAX_RECIPIENTS, self.title)
        body = _http.json_bytes(self.payload(m))
        path = f"/api/send/{self.settings.inbox_id}" if self.settings.sandbox else "/api/send"
        return _http.Request("POST", f"{self.base}{path}",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, m.summary(len(body)))

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        data: dict[str, Any] = _mime.address_fields(m)
        if m.text is not None:
            data["text"] = m.text
        if m.html is not None:
            data["html"] = m.html
        headers = _mime.header_dict(m, self.title)
        if m.reply_to:
            headers["Reply-To"] = ", ".join(m.reply_to)
        if headers:
            data["headers"] = headers
        if m.attachments:
            data["attachments"] = [_attachment(a) for a in m.attachments]
        variables = dict(m.metadata)
        if m.tags:
            data["category"] = m.tags[0]  # Mailtrap keeps one category
            if len(m.tags) > 1:
                if "tags" in variables:
                    raise UnsupportedFeature(
                        "Mailtrap keeps one category: Postroom puts several tags in the "
                        "custom variable 'tags', which this message's metadata uses too: "
                        "rename it", code="unsupported.tags")
                variables["tags"] = ", ".join(m.tags)
        if variables:
            data["custom_variables"] = variables
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        ids = [str(i) for i in _http.json_body(resp).get("message_ids") or []]
        if not ids:
            return None, None
        # The ids follow the request's To, Cc, Bcc: each recipient's goes in its result.
        try:
            asked = json.loads(resp.request.content)
        except (RuntimeError, ValueError):
            asked = {}
        order = [str(o.get("email")) for key in ("to", "cc", "bcc")
                 for o in (asked.get(key) or []) if isinstance(o, dict)] \
            if isinstance(asked, dict) else []
        per: _http.Recipients = {}
        if len(order) == len(ids) > 1:
            per = {r: base.RecipientResult(250, f"Mailtrap: accepted, id {i}")
                   for r, i in zip(order, ids, strict=True)}
        return ids[0], per or None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        data = _http.json_body(resp)
        errors = data.get("errors")
        texts = ([str(e) for e in errors] if isinstance(errors, list)
                 else [f"{k}: {v}" for k, v in errors.items()] if isinstance(errors, dict)
                 else [str(data.get("error") or resp.reason_phrase)])
        said = "; ".join(texts)
        low = said.lower()
        # A 429's or 5xx's words ("rate limit") are the base's to classify.
        code = "" if resp.status_code == 429 or resp.status_code >= 500 else next(
            (c for words, c in MESSAGES.items() if words in low), "")
        # Mailtrap documents a send's bare 403 as the domain's or the token's access to it
        # (module header): the "domain" rule names both, the generic 403 only the key. A
        # 403 from the accounts API (check) keeps the generic meaning.
        if not code and resp.status_code == 403 and "/api/send" in resp.request.url.path:
            code = "domain"
        return _http.ApiError(resp.status_code, code, said)

    def check_request(self) -> _http.Request:
        """``GET /api/accounts`` of Mailtrap's general API: the accounts the token may use;
        sends nothing. With ``api_base`` (a proxy, a test server) it is asked there too."""
        root = self.base if self.settings.api_base else ACCOUNTS
        return _http.Request("GET", f"{root}/api/accounts", {"Accept": "application/json"},
                             b"", "the token's accounts")

    def checked(self, resp: httpx.Response) -> str:
        try:
            accounts = resp.json()
        except ValueError:
            accounts = []
        names = [str(a.get("name")) for a in accounts if isinstance(a, dict)] \
            if isinstance(accounts, list) else []
        return "the API token works" + (f" (account {', '.join(names)})" if names else "")


def _attachment(a: _mime.Attachment) -> dict[str, str]:
    out = {"filename": a.filename, "content": base64.b64encode(a.data).decode("ascii"),
           "type": a.content_type, "disposition": "inline" if a.content_id else "attachment"}
    if a.content_id:
        out["content_id"] = a.content_id
    return out
