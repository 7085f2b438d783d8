"""Mailgun: ``POST /v3/{domain}/messages.mime`` with the stored MIME as is (Mailgun API
reference, "Messages: send a message in MIME format",
https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages/post-v3--domain-name--messages-mime,
"API: errors / status codes", and "Webhooks: securing webhooks",
https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks).

- Auth: HTTP Basic, user ``api``, password the (private or domain sending) API key.
  Regions: ``https://api.mailgun.net`` (US) and ``https://api.eu.mailgun.net`` (EU): a
  domain lives in one, and the other answers 401/404 for it.
- Request: multipart/form-data with ``to`` (the envelope recipients, one field each:
  Mailgun delivers to these, whatever the header says, so Bcc needs no header), ``message``
  (the MIME file), ``o:tag`` (Postroom's tags, at most 3), ``v:NAME`` (Postroom's
  metadata: "user variables", echoed in every event), ``o:testmode = yes`` with
  ``test_mode``: accepted, not delivered.
- Success: 200 ``{"id": "<20111114174239.25659.5817@samples.mailgun.org>", "message":
  "Queued. Thank you."}``; events name the message by that id without its brackets.
- Errors: ``{"message": "..."}`` (401 answers a plain "Forbidden"), no error codes: the
  messages that mean something precise are matched below (MESSAGES).
- Webhooks: a JSON body ``{"signature": {"timestamp", "token", "signature"}, "event-data":
  {...}}``, ``signature`` = hex HMAC-SHA256 of timestamp + token under the account's HTTP
  webhook signing key (the connection's webhook key).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import field_validator

from postroom.envelope import Envelope
from postroom.exceptions import (
    DeliveryError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http
from postroom.webhooks import BadEvent, DeliveryEvent, Kind, Refused, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

BASES = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}
MAX_SIZE = 25 * 1024 * 1024  # "maximum message size is 25 MB", attachments included
MAX_TAGS = 3  # "o:tag ... up to 3 tags per message"

_Rule = _http.ErrorRule


def _held(code: str, fix: str) -> _http.ErrorRule:
    """An account or domain problem: the mail is held, the route's next connection used."""
    return _Rule(code, fix, kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION)


# Mailgun's error messages that say more than their HTTP status, matched as substrings
# (lower case) -> the code the ERRORS table knows them by.
MESSAGES: Mapping[str, str] = {
    "free accounts are for test purposes only": "sandbox",
    "authorized recipients": "sandbox",
    "domain not found": "domain",
    "is unverified": "unverified",
    "requires dns configuration": "unverified",
    "is disabled": "disabled",
}
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "sandbox": _held(
        "mailgun.sandbox_recipient", "a sandbox domain sends only to its authorized "
        "recipients. Fix: add the recipient under the domain's Authorized Recipients in "
        "Mailgun, or send from a verified domain of your own"),
    "domain": _held(
        "mailgun.domain_unknown", "Mailgun has no such sending domain in this region. Fix: "
        "set the connection's domain to one listed under Sending > Domains, and region to "
        "where it lives (us or eu)"),
    "unverified": _Rule(
        "mailgun.domain_unverified", "the sending domain is not verified. Fix: add the DNS "
        "records Mailgun shows for it (Sending > Domains > DNS records) and verify it",
        kind=SenderRejected, permanent=False, scope=Scope.CONFIGURATION),
    "disabled": _held(
        "mailgun.account_disabled", "Mailgun disabled the domain or account (billing, or a "
        "review). Fix: settle it in Mailgun's dashboard or contact Mailgun support"),
    400: _Rule("mailgun.invalid_request", "Mailgun found the message invalid (named "
               "above): correct it in the app that sent it"),
    402: _held("mailgun.payment_required", "Mailgun would not send for the account (a "
               "payment is due). Fix: settle the account in Mailgun's dashboard"),
}


class MailgunSettings(_http.ApiKeySettings):
    transport: Literal["mailgun"] = "mailgun"
    # The sending domain, as listed in Mailgun (a sandbox domain works for tests).
    domain: str
    region: Literal["us", "eu"] = "us"  # where the Mailgun account lives
    test_mode: bool = False  # o:testmode: Mailgun accepts the message and delivers nothing

    @field_validator("domain")
    @classmethod
    def _domain_name(cls, value: str) -> str:
        # It goes into the request's path: a domain name, nothing else.
        if not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", value):
            raise ValueError(f"domain {value!r} is not a domain name: set it to the sending "
                             "domain as Mailgun lists it under Sending > Domains")
        return value


class MailgunWebhook(Webhook):
    """Mailgun's webhooks: HMAC-SHA256 of timestamp + token, in the JSON body itself."""

    docs_url = ("https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/"
                "securing-webhooks")

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        key = verify.need_key(settings.key, "Mailgun")
        try:
            data = self.json(req)
        except BadEvent as err:  # unreadable is unsigned: nothing is said before the check
            raise Refused("the Mailgun webhook body is not JSON", code="event.unsigned") from err
        sig = data.get("signature") if isinstance(data, dict) else None
        if not isinstance(sig, dict):
            raise Refused("the Mailgun webhook has no signature object", code="event.unsigned")
        stamp, token = str(sig.get("timestamp", "")), str(sig.get("token", ""))
        verify.check_timestamp(stamp, tolerance=settings.tolerance)
        verify.check_hmac(str(sig.get("signature", "")), key.encode(),
                          (stamp + token).encode())

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        e = data.get("event-data") if isinstance(data, dict) else None
        if not isinstance(e, dict):
            raise BadEvent("the Mailgun webhook has no event-data object")
        return [_event(e, data)]


# Mailgun event -> vocabulary ("Events" reference). "failed" splits by severity below.
EVENTS: Mapping[str, Kind] = {
    "accepted": Kind.QUEUED, "delivered": Kind.DELIVERED, "rejected": Kind.REJECTED,
    "complained": Kind.COMPLAINED, "unsubscribed": Kind.UNSUBSCRIBED,
    "opened": Kind.OPENED, "clicked": Kind.CLICKED,
}


def _event(e: dict[str, Any], raw: dict[str, Any]) -> DeliveryEvent:
    name = str(e.get("event", ""))
    kind = EVENTS.get(name, Kind.UNKNOWN)
    permanent: bool | None = None
    if name == "failed":
        permanent = e.get("severity") == "permanent"
        # Mailgun's own suppression lists drop the message before any attempt.
        reason = str(e.get("reason", ""))
        kind = (Kind.REJECTED if reason.startswith("suppress") else
                Kind.BOUNCED if permanent else Kind.DEFERRED)
    status = e.get("delivery-status")
    status = status if isinstance(status, dict) else {}
    message = e.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    mid = str(headers.get("message-id") or "") if isinstance(headers, dict) else ""
    detail = " ".join(str(x) for x in (status.get("code") or "", status.get("message") or
                                       status.get("description") or e.get("reason") or name)
                      if x).strip()
    return DeliveryEvent(
        kind=kind, provider_id=mid.strip("<>") or None,
        recipient=str(e["recipient"]).lower() if e.get("recipient") else None,
        at=event_time(e.get("timestamp")),
        detail=detail, raw=raw, event_id=str(e["id"]) if e.get("id") else None,
        message_id_header=f"<{mid.strip('<>')}>" if mid else None, permanent=permanent)


class MailgunTransport(_http.HttpTransport):
    settings: MailgunSettings
    settings_model = MailgunSettings
    title = "Mailgun"
    docs_url = ("https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/"
                "messages/post-v3--domain-name--messages-mime")
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "region": "eu",
        "domain": "mg.example.com",
        "api_key_env": "MAILGUN_API_KEY",
        "webhook_key_env": "MAILGUN_WEBHOOK_SIGNING_KEY",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "region": "api.eu.mailgun.net",
        "domain": "the sending domain (Sending > Domains)",
        "webhook_key_env": "the HTTP webhook signing key",
    }
    default_base = BASES["us"]
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = MailgunWebhook

    def default_api_base(self) -> str:
        return BASES[self.settings.region]

    def make_auth(self) -> _auth.Auth:
        return _auth.Basic("api", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        if len(env.tags) > MAX_TAGS:
            raise UnsupportedFeature(
                f"Mailgun takes at most {MAX_TAGS} tags per message; this one has "
                f"{len(env.tags)}: send it with fewer tags", code="unsupported.tags")
        form: dict[str, Any] = {"to": list(env.recipients)}
        if env.tags:
            form["o:tag"] = list(env.tags)
        form.update({f"v:{k}": v for k, v in env.metadata.items()})
        if self.settings.test_mode:
            form["o:testmode"] = "yes"
        url = f"{self.base}/v3/{self.settings.domain}/messages.mime"
        # httpx encodes the multipart/form-data body (and its boundary) itself.
        mime = ("message.eml", env.raw, "application/octet-stream")
        encoded = httpx.Request("POST", url, data=form, files={"message": mime})
        body = _http.refuse_over(encoded.read(), MAX_SIZE, self.title)
        return _http.Request("POST", url, {"Content-Type": encoded.headers["Content-Type"]},
                             body, f"raw MIME, {len(env.raw)} bytes, "
                             f"{len(env.recipients)} recipient(s)")

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        msg_id = str(_http.json_body(resp).get("id") or "").strip().strip("<>")
        return msg_id or None, None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        said = str(_http.json_body(resp).get("message") or resp.text[:300].strip()
                   or resp.reason_phrase)
        low = said.lower()
        code = next((c for words, c in MESSAGES.items() if words in low), "")
        return _http.ApiError(resp.status_code, code, said)

    def check_request(self) -> _http.Request:
        """``GET /v3/domains/{domain}``: the key works for this domain and region, and the
        domain's state (active, unverified) is read; nothing is sent."""
        return _http.Request("GET", f"{self.base}/v3/domains/{self.settings.domain}", {}, b"",
                             "the sending domain")

    def checked(self, resp: httpx.Response) -> str:
        domain = _http.json_body(resp).get("domain")
        state = domain.get("state") if isinstance(domain, dict) else None
        said = f"the API key works for {self.settings.domain}"
        if state in (None, "active"):
            return said + (f" (state {state})" if state else "")
        return (f"{said}, but the domain is {state}: verify its DNS records in Mailgun "
                "before sending")
