"""SparkPost (US or EU): ``POST /api/v1/transmissions`` with the stored MIME as
``content.email_rfc822`` (SparkPost API reference "Transmissions: create"; "Extended error
codes" https://support.sparkpost.com/docs/tech-resources/extended-error-codes; events:
"Webhooks: event types" and "Webhooks: authentication").

- Auth: ``Authorization: <API key>`` (no scheme); the key needs "Transmissions: Read/Write".
- Hosts: ``https://api.sparkpost.com`` (region ``us``), ``https://api.eu.sparkpost.com``
  (``eu``): an account lives in one region, its keys work only there.
- Request: ``{"recipients": [{"address": {"email": ...}, "tags": [...]}], "content":
  {"email_rfc822": "<MIME>"}, "metadata": {...}, "options": {"sandbox": true}}``. The
  recipients are the envelope's (SparkPost sends the rfc822 content as it is to each, as
  SMTP's RCPT TO does); Postroom's tags go on each recipient (at most 10, 64 bytes each:
  more is refused naming the tag), its metadata at the top (at most 1000 bytes as JSON).
  ``sandbox = true`` sends through SparkPost's sandbox domain (sparkpostbox.com senders only).
- Success: 200 ``{"results": {"id": "<transmission id>", "total_accepted_recipients": n,
  "total_rejected_recipients": m}}``; the transmission id is what events name
  (``transmission_id``).
- Errors: ``{"errors": [{"code": "1902", "message": ..., "description": ...}]}``.
- Events: batches POSTed with HTTP basic auth (the connection's webhook key is
  ``user:password``, as set on the webhook at SparkPost); a batch is a JSON list of
  ``{"msys": {"<class>_event": {...}}}``.
"""

from __future__ import annotations

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
from postroom.transports import _auth, _http
from postroom.webhooks import BadEvent, DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig

HOSTS = {"us": "https://api.sparkpost.com", "eu": "https://api.eu.sparkpost.com"}
MAX_TAGS, MAX_TAG_BYTES, MAX_METADATA = 10, 64, 1000  # "Transmissions: recipient attributes"

_Rule = _http.ErrorRule
# SparkPost's extended error codes (the code in the body; its HTTP status in the comment).
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "1100": _Rule("auth.api_key_forbidden", auth="forbidden"),  # 403 permission denied
    "1300": _Rule("sparkpost.invalid_request", "SparkPost found the request invalid (named "
                  "above): correct the message in the app that sent it"),  # 422
    "1400": _Rule("sparkpost.invalid_request", "a required field is missing (named above): "
                  "correct the message in the app that sent it"),  # 422
    "1900": _Rule("provider.unavailable", "SparkPost's message generation is not available; "
                  "Postroom retries", kind=ConnectError, permanent=False),  # 503
    "1901": _Rule("sparkpost.generation_failed", "SparkPost could not build the message "
                  "from its MIME (named above): correct it in the app that sent it"),  # 400
    "1902": _Rule("sparkpost.generation_rejected", "SparkPost refused to send it (a "
                  "recipient on its suppression list, or its content policy)"),  # 400
    "2101": _Rule("sparkpost.limit_exceeded", "the account's sending limit is reached. "
                  "Postroom retries later; raise the plan's limit in SparkPost",
                  kind=ConnectError, permanent=False),  # 420 hourly
    "2102": _Rule("sparkpost.limit_exceeded", "the account's sending limit is reached. "
                  "Postroom retries later; raise the plan's limit in SparkPost",
                  kind=ConnectError, permanent=False),  # 420 daily
    "2103": _Rule("sparkpost.sandbox_limit", "the sandbox domain's lifetime allowance is "
                  "used up. Fix: add and verify a sending domain of your own",
                  kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),  # 420
    "7000": _Rule("sparkpost.domain_blocked", "SparkPost blocked the sending domain. Fix: "
                  "contact SparkPost support", kind=SenderRejected, permanent=False,
                  scope=Scope.CONFIGURATION),  # 400
    "7001": _Rule("sparkpost.domain_unconfigured", "the From domain is not a verified "
                  "sending domain of the account. Fix: add it under Sending Domains in "
                  "SparkPost and publish its DKIM record", kind=SenderRejected,
                  permanent=False, scope=Scope.CONFIGURATION),  # 400
    420: _Rule("sparkpost.limit_exceeded", "the account's sending limit is reached. Postroom "
               "retries later; raise the plan's limit in SparkPost", kind=ConnectError,
               permanent=False),
}


class SparkPostSettings(_http.ApiKeySettings):
    transport: Literal["sparkpost"] = "sparkpost"
    region: Literal["us", "eu"] = "us"  # where the account lives: its keys work only there
    sandbox: bool = False  # options.sandbox: SparkPost's sandbox domain (sparkpostbox.com)


# -- delivery events -------------------------------------------------------------------------
# "Webhooks: event types" -> our vocabulary.
_KINDS: dict[str, Kind] = {
    "injection": Kind.QUEUED, "delivery": Kind.DELIVERED, "delay": Kind.DEFERRED,
    "bounce": Kind.BOUNCED, "out_of_band": Kind.BOUNCED, "policy_rejection": Kind.REJECTED,
    "generation_failure": Kind.REJECTED, "generation_rejection": Kind.REJECTED,
    "spam_complaint": Kind.COMPLAINED, "list_unsubscribe": Kind.UNSUBSCRIBED,
    "link_unsubscribe": Kind.UNSUBSCRIBED, "open": Kind.OPENED, "initial_open": Kind.OPENED,
    "amp_open": Kind.OPENED, "amp_initial_open": Kind.OPENED, "click": Kind.CLICKED,
    "amp_click": Kind.CLICKED,
}
# "Bounce classification codes": 10 invalid recipient, 30 no RCPT, 90 unsubscribe are hard;
# 1 undetermined and 25 admin failure (SparkPost's own policy) say nothing of the address.
HARD_CLASSES = frozenset({"10", "30", "90"})
UNSURE_CLASSES = frozenset({"1", "25"})


class SparkPostWebhook(Webhook):
    docs_url = "https://developers.sparkpost.com/api/webhooks/"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        verify.check_basic(req, verify.need_key(settings.key, "SparkPost"))

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        batch = self.json(req)
        if not isinstance(batch, list):
            raise BadEvent("a SparkPost webhook body is a JSON list of events")
        out = []
        for item in batch:
            msys = item.get("msys") if isinstance(item, dict) else None
            if not isinstance(msys, dict):
                raise BadEvent("a SparkPost event without its msys object")
            for ev in msys.values():  # {"message_event": {...}}; {} is the webhook's ping
                if isinstance(ev, dict):
                    out.append(sparkpost_event(ev))
        return out


def sparkpost_event(ev: dict[str, Any]) -> DeliveryEvent:
    kind = _KINDS.get(str(ev.get("type", "")), Kind.UNKNOWN)
    bounce_class = str(ev.get("bounce_class", ""))
    permanent = None
    if kind is Kind.BOUNCED and bounce_class and bounce_class not in UNSURE_CLASSES:
        permanent = bounce_class in HARD_CLASSES
    try:
        at = float(ev.get("timestamp", 0))
    except (TypeError, ValueError):
        at = 0.0
    detail = str(ev.get("raw_reason") or ev.get("reason") or ev.get("target_link_url") or
                 ev.get("type", ""))
    rcpt = ev.get("rcpt_to") or ev.get("raw_rcpt_to")
    return DeliveryEvent(kind=kind, provider_id=str(ev.get("transmission_id") or "") or None,
                         recipient=str(rcpt) if rcpt else None, at=at, detail=detail[:1000],
                         raw=ev, event_id=str(ev.get("event_id") or "") or None,
                         permanent=permanent)


class SparkPostTransport(_http.HttpTransport):
    settings: SparkPostSettings
    settings_model = SparkPostSettings
    title = "SparkPost"
    docs_url = "https://developers.sparkpost.com/api/transmissions/"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "region": "eu",
        "api_key_env": "SPARKPOST_API_KEY",
        "webhook_key_env": "SPARKPOST_WEBHOOK_AUTH",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "region": "api.eu.sparkpost.com",
        "api_key_env": "Transmissions: Read/Write",
        "webhook_key_env": "\"user:password\", as set on the webhook",
    }
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = SparkPostWebhook

    def default_api_base(self) -> str:
        return HOSTS[self.settings.region]

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("Authorization", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        tags = list(env.tags)
        too_long = [t for t in tags if len(t.encode()) > MAX_TAG_BYTES]
        if len(tags) > MAX_TAGS or too_long:
            raise UnsupportedFeature(
                f"SparkPost keeps at most {MAX_TAGS} tags of {MAX_TAG_BYTES} bytes; "
                f"this message has {len(tags)}" + (f" ({too_long[0]!r} is too long)"
                                                   if too_long else ""),
                code="unsupported.tags")
        recipient: dict[str, Any] = {"tags": tags} if tags else {}
        data: dict[str, Any] = {
            "recipients": [{"address": {"email": r}, **recipient} for r in env.recipients],
            "content": {"email_rfc822": env.raw.decode("utf-8", "surrogateescape")},
        }
        if env.metadata:
            meta = json.dumps(env.metadata)
            if len(meta.encode()) > MAX_METADATA:
                raise UnsupportedFeature(
                    f"SparkPost keeps at most {MAX_METADATA} bytes of metadata; this "
                    f"message's is {len(meta.encode())}", code="unsupported.metadata")
            data["metadata"] = dict(env.metadata)
        if self.settings.sandbox:
            data["options"] = {"sandbox": True}
        try:
            body = _http.json_bytes(data)
        except UnicodeEncodeError as err:
            raise UnsupportedFeature(
                "SparkPost takes the message as JSON text, and this one has bytes that are "
                "not UTF-8 (8-bit data in a non-UTF-8 charset): send it base64- or "
                "quoted-printable-encoded, or route it to an SMTP connection",
                code="unsupported.mime") from err
        return _http.Request("POST", f"{self.base}/api/v1/transmissions",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, f"raw MIME, {len(env.raw)} bytes in JSON")

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        results = _http.json_body(resp).get("results")
        tid = results.get("id") if isinstance(results, dict) else None
        return (str(tid) if tid else None), None

    def accepted(self, resp: httpx.Response) -> str:
        results = _http.json_body(resp).get("results")
        if isinstance(results, dict):
            return (f"{resp.status_code} accepted {results.get('total_accepted_recipients', '?')}"
                    f", rejected {results.get('total_rejected_recipients', 0)}")
        return super().accepted(resp)

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        errors = _http.json_body(resp).get("errors")
        first = errors[0] if isinstance(errors, list) and errors else {}
        first = first if isinstance(first, dict) else {}
        words = ": ".join(str(first[k]) for k in ("message", "description") if first.get(k))
        return _http.ApiError(resp.status_code, str(first.get("code") or ""),
                              words or resp.reason_phrase)

    async def check(self) -> str:
        """``GET /api/v1/account`` validates the key without sending. A key restricted to
        sending (the least privilege SparkPost advises) may not read the account: that 403
        still proves SparkPost knows the key (a wrong one gets 401)."""
        ex = _http.Exchange()
        resp = await self.request(ex, _http.Request(
            "GET", f"{self.base}/api/v1/account", {"Accept": "application/json"}, b"",
            "the account"))
        if resp.status_code == 403:
            ex.lines.append(f"*  {self.title}: the key works (it may not read the account, "
                            "which sending does not need)")
            return ex.transcript
        if not resp.is_success:
            raise self.failure(resp, ex)
        ex.lines.append(f"*  {self.title}: the key works ({self.settings.region.upper()} "
                        "region)")
        return ex.transcript
