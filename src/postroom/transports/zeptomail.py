"""Zoho ZeptoMail: ``POST /v1.1/email`` with the message as JSON (ZeptoMail "Email sending
API", https://www.zoho.com/zeptomail/help/api/email-sending.html, "API error codes",
https://www.zoho.com/zeptomail/help/api/error-codes.html, and "Webhooks",
https://www.zoho.com/zeptomail/help/webhooks.html).

- Hosts, one per Zoho data centre (the account's region; ``region``): ``api.zeptomail.com``
  (us), ``.eu``, ``.in``, ``.com.au`` (au), ``.jp``, ``.ca``; another through ``api_base``.
  Zoho's "Email sending API" page names ``api.zeptomail.com`` only (see below).
- Auth: ``Authorization: Zoho-enczapikey <send mail token>`` (a Mail Agent's token; the
  dashboard shows it with that prefix, which may be pasted with it).
- Request: ``from`` ({address, name}), ``to``/``cc``/``bcc`` ([{email_address: {address,
  name}}]; at most 340 To, 100 Cc, 100 Bcc), ``reply_to`` ([{address, name}], at most 40),
  ``subject``, ``textbody``, ``htmlbody``, ``attachments`` ([{content (base64), mime_type,
  name}], at most 60), ``inline_images`` ([{content, mime_type, cid}]), ``mime_headers``
  ({name: value}), ``client_reference`` (a string echoed in events: Postroom's tags and
  metadata as JSON, ZeptoMail having no field for either).
- Success: 201 ``{"data": [{"code": "EM_104", "message": "Email request received"}],
  "request_id": "...", "object": "email"}``: ``request_id`` is what events carry.
- Errors: ``{"error": {"code": "TM_4001", "details": [{"code": "SM_111", "message",
  "target"}], "message", "request_id"}}``: the detail's sub code names the cause (ERRORS).
- Checking a token: ZeptoMail has no endpoint that reads anything with a send mail token
  (it only sends), so ``check()`` says so; ``postroom test NAME`` sends a real message.
- Webhooks: ``producer-signature: ts=<ms>;s=<base64 HMAC-SHA256 of ts + body>;
  s-algorithm=HmacSHA256`` under the webhook's authentication key; events ``softbounce``,
  ``hardbounce``, ``email_open``, ``email_link_click``.

Checked against Zoho's own pages on 2026-12-07 (issue 14):

- Confirmed: the send URL and auth header (email-sending.html: POST
  https://api.zeptomail.com/v1.1/email, ``Zoho-enczapikey`` + send mail token); the webhook
  events (webhooks.html: bounces, opens, clicks) and that a webhook authentication key
  secures them (https://www.zoho.com/zeptomail/webhooks-instant-notification.html, "Secure
  requests", which also shows the ``event_name`` / ``event_message`` payload).
- Unverified, not found in Zoho's pages: the regional hosts other than
  ``api.zeptomail.com`` (the API pages give no other; the ones here are those third-party
  code uses), and the ``producer-signature`` format (the stored copy of webhooks.html stops
  before any signature section; third-party receivers parse the same ts/s/s-algorithm).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx

from postroom.envelope import Envelope
from postroom.exceptions import (
    DeliveryError,
    ProtocolError,
    Scope,
    SenderRejected,
    UnsupportedFeature,
)
from postroom.transports import _auth, _http, _mime
from postroom.webhooks import DeliveryEvent, Kind, Refused, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig, event_time

# Only "us" is on Zoho's own pages (email-sending.html); the others are unverified (header).
HOSTS: Mapping[str, str] = {
    "us": "https://api.zeptomail.com", "eu": "https://api.zeptomail.eu",
    "in": "https://api.zeptomail.in", "au": "https://api.zeptomail.com.au",
    "jp": "https://api.zeptomail.jp", "ca": "https://api.zeptomail.ca",
}
PREFIX = "Zoho-enczapikey "
# "Fields exceeding limits" (SM_127): unique addresses per field, attachments.
LIMITS: Mapping[str, int] = {"to": 340, "cc": 100, "bcc": 100, "reply_to": 40}
MAX_ATTACHMENTS = 60

_Rule = _http.ErrorRule
_INVALID = _Rule("zeptomail.invalid_request", "ZeptoMail found the message invalid (the "
                 "field is named above): correct it in the app that sent it")
_REVIEW = _Rule("zeptomail.account_review", "the account awaits ZeptoMail's review (a "
                "trial account may send only a few messages until then). Fix: request the "
                "review in ZeptoMail", kind=DeliveryError, permanent=False,
                scope=Scope.CONFIGURATION)
_CREDITS = _Rule("zeptomail.credits", "the account's credits expired or are used up. Fix: "
                 "buy credits on ZeptoMail's Subscription page", kind=DeliveryError,
                 permanent=False, scope=Scope.CONFIGURATION)
# ZeptoMail's sub codes ("API error codes") -> meaning here.
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "SERR_157": _Rule("auth.api_key_refused", auth="refused"),
    "SM_111": _Rule("zeptomail.domain_unverified", "the From address's domain is not "
                    "verified in this Mail Agent. Fix: verify the domain in the Mail Agent "
                    "the token belongs to, or send from one it has", kind=SenderRejected,
                    permanent=False, scope=Scope.CONFIGURATION),
    "SM_128": _REVIEW, "SM_133": _REVIEW,
    "LE_101": _CREDITS, "LE_102": _CREDITS,
    "SMI_115": _Rule("zeptomail.daily_limit", "the account's daily sending limit is used "
                     "up. Postroom holds the mail; ZeptoMail takes it again tomorrow",
                     kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
    "SERR_156": _Rule("zeptomail.ip_not_allowed", "this machine's IP address is not in the "
                      "account's allowed IPs. Fix: add it under Settings > IP restrictions "
                      "in ZeptoMail", kind=DeliveryError, permanent=False,
                      scope=Scope.CONFIGURATION),
    "AE_101": _Rule("zeptomail.account_blocked", "ZeptoMail blocked the account. Fix: "
                    "contact ZeptoMail support", kind=DeliveryError, permanent=False,
                    scope=Scope.CONFIGURATION),
    "SM_101": _Rule("zeptomail.json_refused", "ZeptoMail could not read Postroom's request: "
                    "please report it", kind=ProtocolError, scope=Scope.CONNECTION),
    "GE_102": _INVALID, "SM_113": _INVALID, "SM_120": _INVALID, "SM_127": _INVALID,
    "SM_129": _INVALID,
}


class ZeptoMailSettings(_http.ApiKeySettings):
    transport: Literal["zeptomail"] = "zeptomail"
    region: Literal["us", "eu", "in", "au", "jp", "ca"] = "us"  # the Zoho data centre


class ZeptoMailWebhook(Webhook):
    """ZeptoMail's webhooks: ``producer-signature`` (HMAC-SHA256 of ts + body, base64)."""

    docs_url = "https://www.zoho.com/zeptomail/help/webhooks.html"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        # Format unverified against Zoho's pages (module header): a mismatch refuses, never
        # accepts, so a wrong guess loses events visibly (401s logged), never lets forged ones in.
        key = verify.need_key(settings.key, "ZeptoMail")
        parts = dict(p.strip().partition("=")[::2]
                     for p in verify.header(req, "producer-signature").split(";"))
        stamp, given = parts.get("ts", ""), parts.get("s", "")
        if parts.get("s-algorithm", "HmacSHA256").lower() != "hmacsha256" or not given:
            raise Refused("the producer-signature is not an HmacSHA256 signature",
                          code="event.unsigned")
        # ZeptoMail's ts is epoch milliseconds (13 digits); seconds are read too.
        verify.check_timestamp(stamp, tolerance=settings.tolerance, millis=len(stamp) > 11)
        try:
            raw = base64.b64decode(given, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not hmac.compare_digest(raw, verify.mac(key.encode(), stamp.encode() + req.body)):
            raise Refused("the webhook signature does not match", code="event.bad_signature")

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        if not isinstance(data, dict):
            return []
        names = data.get("event_name")
        name = str(names[0] if isinstance(names, list) and names else names or "")
        kind = EVENTS.get(name, Kind.UNKNOWN)
        out = []
        messages = data.get("event_message")
        for msg in messages if isinstance(messages, list) else []:
            if not isinstance(msg, dict):
                continue
            details = [d for ed in msg.get("event_data") or [] if isinstance(ed, dict)
                       for d in ed.get("details") or [] if isinstance(d, dict)] or [{}]
            for d in details:
                who = d.get("bounced_recipient") or d.get("email_address")
                out.append(DeliveryEvent(
                    kind=kind, provider_id=str(msg.get("request_id") or "") or None,
                    recipient=str(who).lower() if who else None,
                    at=event_time(d.get("time")),
                    detail=str(d.get("diagnostic_message") or d.get("reason") or name),
                    raw=msg, event_id=_event_id(data, msg, d),
                    permanent={"hardbounce": True, "softbounce": False}.get(name)))
        return out


def _event_id(data: dict[str, Any], msg: dict[str, Any], d: dict[str, Any]) -> str | None:
    """The webhook request's id names the request; with several events in it, each one's
    recipient and time make it unique."""
    rid = data.get("webhook_request_id")
    if not rid:
        return None
    return f"{rid}:{msg.get('request_id')}:{d.get('bounced_recipient') or d.get('email_address')}" \
           f":{d.get('time')}"


# ZeptoMail webhook events -> vocabulary.
EVENTS: Mapping[str, Kind] = {
    "hardbounce": Kind.BOUNCED, "softbounce": Kind.BOUNCED, "email_open": Kind.OPENED,
    "email_link_click": Kind.CLICKED,
}


class ZeptoMailTransport(_http.HttpTransport):
    settings: ZeptoMailSettings
    settings_model = ZeptoMailSettings
    title = "ZeptoMail"
    docs_url = "https://www.zoho.com/zeptomail/help/api/email-sending.html"
    default_base = HOSTS["us"]
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = ZeptoMailWebhook
    example: ClassVar[Mapping[str, Any]] = {
        "region": "eu", "api_key_env": "ZEPTOMAIL_SEND_MAIL_TOKEN",
        "webhook_key_env": "ZEPTOMAIL_WEBHOOK_KEY"}
    example_notes: ClassVar[Mapping[str, str]] = {
        "region": "the account's data centre: api.zeptomail.eu",
        "api_key_env": "a Mail Agent's send mail token",
        "webhook_key_env": "the webhook's authentication key"}

    def default_api_base(self) -> str:
        return f"{HOSTS[self.settings.region]}/v1.1"

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("Authorization", self.token, prefix=PREFIX)

    def token(self) -> str:
        """The send mail token without the prefix the dashboard shows it with."""
        key = self.api_key().strip()
        return key[len(PREFIX):].strip() if key.lower().startswith(PREFIX.lower()) else key

    def build(self, env: Envelope) -> _http.Request:
        m = _mime.map_envelope(env, self.title)
        _mime.limit_recipients(m, sum(LIMITS.values()), self.title)
        for field, values in (("to", m.to), ("cc", m.cc), ("bcc", m.bcc),
                              ("reply_to", m.reply_to)):
            if len(values) > LIMITS[field]:
                raise UnsupportedFeature(
                    f"ZeptoMail takes at most {LIMITS[field]} addresses in {field}; this "
                    f"message has {len(values)}: send it in parts",
                    code="unsupported.recipients")
        if len(m.attachments) > MAX_ATTACHMENTS:
            raise UnsupportedFeature(
                f"ZeptoMail takes at most {MAX_ATTACHMENTS} attachments; this message has "
                f"{len(m.attachments)}: send fewer", code="unsupported.attachments")
        body = _http.json_bytes(self.payload(m))
        return _http.Request("POST", f"{self.base}/email",
                             {"Content-Type": "application/json", "Accept": "application/json"},
                             body, m.summary(len(body)))

    def payload(self, m: _mime.Mapped) -> dict[str, Any]:
        data: dict[str, Any] = {"from": _address(m.from_),
                                "to": [{"email_address": _address(a)} for a in m.to],
                                "subject": m.subject}
        for key, values in (("cc", m.cc), ("bcc", m.bcc)):
            if values:
                data[key] = [{"email_address": _address(a)} for a in values]
        if m.reply_to:
            data["reply_to"] = [_address(a) for a in m.reply_to]
        if m.text is not None:
            data["textbody"] = m.text
        if m.html is not None:
            data["htmlbody"] = m.html
        files = [a for a in m.attachments if not a.content_id]
        inline = [a for a in m.attachments if a.content_id]
        if files:
            data["attachments"] = [{"name": a.filename, "mime_type": a.content_type,
                                    "content": _b64(a.data)} for a in files]
        if inline:
            data["inline_images"] = [{"cid": a.content_id, "mime_type": a.content_type,
                                      "content": _b64(a.data)} for a in inline]
        headers = _mime.header_dict(m, self.title)
        if headers:
            data["mime_headers"] = headers
        labels = _mime.labels_json(m)
        if labels:
            data["client_reference"] = labels
        return data

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        rid = _http.json_body(resp).get("request_id")
        return (str(rid) if rid else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        err = _http.json_error(resp)
        details = [d for d in err.get("details") or [] if isinstance(d, dict)]
        first = details[0] if details else {}
        code = str(first.get("code") or err.get("code") or "")
        said = str(first.get("message") or err.get("message") or resp.reason_phrase)
        target = first.get("target_value") or first.get("target")
        if target:
            said = f"{said} ({target})"
        return _http.ApiError(resp.status_code, code, said)

    async def check(self) -> str:
        """A send mail token can only send: make sure it is at hand, and say so."""
        self.token()
        return (f"*  {self.title}: the send mail token of {self.name} is at hand; ZeptoMail "
                "has no request that checks it without sending (`postroom test "
                f"{self.name} --to ADDRESS` sends a real message)")


def _address(mailbox: str) -> dict[str, str]:
    return _mime.mailbox_object(mailbox, email="address")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
