"""Mandrill (Mailchimp Transactional) in the contract suite: shapes and bodies from its API
reference "Messages: send-raw" (key in the JSON body, raw_message, to, async; a list of
{email, status, reject_reason, _id}), "Errors" ({"status": "error", "code", "name",
"message"}, HTTP 500), "Users: ping2" and "Authenticating webhook requests" (X-Mandrill-
Signature), with the tags and metadata of its SMTP headers (X-MC-Tags, X-MC-Metadata)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import urlencode

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, mime_sent
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, ConnectError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "md-Xa1B2c3D4e5F6g7H8i9J0k"
MESSAGE_ID = "abc123abc123abc123abc123abc123"
FIELDS = {"key", "raw_message", "from_email", "from_name", "to", "async", "ip_pool", "send_at",
          "return_path_domain"}


def error(name: str, code: int, message: str, status: int = 500, **headers: str) -> Answer:
    return Answer(status, {"status": "error", "code": code, "name": name, "message": message},
                  headers)


def _authorised(rec: Recorded) -> bool:
    try:
        return bool(rec.json().get("key") == KEY)
    except ValueError:
        return False


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    assert "authorization" not in rec.headers  # the key rides in the body
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    assert data["async"] is False
    raw = data["raw_message"].encode()
    head = mime_sent(raw).headers
    tags = [t.strip() for t in head.get("X-MC-Tags", "").split(",") if t.strip()]
    metadata = json.loads(head.get("X-MC-Metadata", "{}"))
    assert metadata.pop("postroom_message_id") == head["Message-ID"]
    return mime_sent(raw, data["to"], tags=tags, metadata=metadata)


def rejected(reason: str) -> Answer:
    return Answer(200, [{"email": "bob@example.org", "status": "rejected",
                         "reject_reason": reason, "_id": MESSAGE_ID}])


CASE = ProviderCase(
    kind="mandrill",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/messages/send-raw"),
    authorised=_authorised,
    read=read,
    success=Answer(200, [
        {"email": "bob@example.org", "status": "sent", "reject_reason": None,
         "queued_reason": None, "_id": MESSAGE_ID},
        {"email": "carol@example.org", "status": "sent", "reject_reason": None,
         "queued_reason": None, "_id": "def456def456def456def456def456"},
        {"email": "audit@example.net", "status": "sent", "reject_reason": None,
         "queued_reason": None, "_id": "fed654fed654fed654fed654fed654"}]),
    provider_id=MESSAGE_ID,
    bad_key=error("Invalid_Key", -1, "Invalid API key"),
    rate_limited=Answer(429, "Too Many Requests", {"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error("ValidationError", -2, "Validation error: {\"raw_message\":\"Please "
                        "enter a valid MIME document\"}"), DataRejected, True,
                  "mandrill.invalid_request"),
        ErrorCase(error("PaymentRequired", 8, "This feature is only available for accounts "
                        "with a positive balance."), DeliveryError, False,
                  "mandrill.payment_required"),
        ErrorCase(error("Unknown_Subaccount", 12, "No subaccount exists with the id 'shop'"),
                  DeliveryError, False, "mandrill.unknown_subaccount"),
        ErrorCase(error("GeneralError", -1, "An unexpected error occurred processing the "
                        "request. Mandrill developers have been notified."), ConnectError,
                  False, "mandrill.general_error"),
        ErrorCase(error("Invalid_Key", -1, "Invalid API key"), AuthError, False,
                  "auth.api_key_refused"),
        ErrorCase(rejected("unsigned"), SenderRejected, False, "mandrill.domain_unverified"),
        ErrorCase(rejected("test-mode-limit"), DeliveryError, False,
                  "mandrill.test_mode_limit"),
    ],
    check=("POST", "/users/ping2"),
    check_ok=Answer(200, {"PING": "PONG!"}),
    unmappable=None,  # raw MIME: everything can be expressed
)


# -- webhooks (form field mandrill_events, X-Mandrill-Signature; the docs' sample events) --
HOOK_KEY = "mD5kEy-WebHook-0123456789"
HOOK_URL = "https://postroom.example.com/webhooks/hooks"
EVENTS = [
    {"event": "send", "_id": MESSAGE_ID, "ts": 1796634000,
     "msg": {"ts": 1796633990, "_id": MESSAGE_ID, "state": "sent", "subject": "Your order",
             "email": "bob@example.org", "sender": "shop@example.com", "tags": ["orders"],
             "metadata": {"order": "1234", "postroom_message_id": "<1@example.com>"},
             "opens": [], "clicks": [], "smtp_events": []}},
    {"event": "hard_bounce", "_id": "def456def456def456def456def456", "ts": 1796634001,
     "msg": {"ts": 1796633990, "_id": "def456def456def456def456def456", "state": "bounced",
             "subject": "Your order", "email": "carol@example.org",
             "sender": "shop@example.com", "tags": ["orders"],
             "metadata": {"postroom_message_id": "<1@example.com>"},
             "bounce_description": "bad_mailbox", "diag": "smtp;550 5.1.1 User unknown"}},
]


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    fields = {"mandrill_events": body.decode()}
    signed = HOOK_URL + "".join(k + v for k, v in sorted(fields.items()))
    mac = hmac.new(HOOK_KEY.encode(), signed.encode(), hashlib.sha1).digest()
    return urlencode(fields).encode(), {
        "X-Mandrill-Signature": base64.b64encode(mac).decode(),
        "Content-Type": "application/x-www-form-urlencoded"}


WEBHOOK = HookCase(
    kind="mandrill", settings={**CASE.settings, "webhook_url": HOOK_URL}, key=HOOK_KEY,
    wrong_key="mD5kEy-Other-9876543210", body=json.dumps(EVENTS).encode(), sign=_sign,
    events=[Expected(Kind.DELIVERED, MESSAGE_ID, "bob@example.org"),
            Expected(Kind.BOUNCED, "def456def456def456def456def456", "carol@example.org",
                     True)],
    tamper=lambda body: body.replace(b"hard_bounce", b"soft_bounce"),
    timestamped=False,  # the signature covers the URL and fields, no time
)
