"""Mailtrap in the contract suite: shapes and bodies from Mailtrap's Email API reference
(Authorization: Bearer, POST /api/send, {"success", "message_ids"} one id per recipient,
{"success": false, "errors": [...]}), GET /api/accounts, and its webhook documentation
(Mailtrap-Signature, {"events": [...]})."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from provider_fake import (
    Answer,
    ErrorCase,
    ProviderCase,
    Recorded,
    Sent,
    addresses,
    mailbox_address,
)
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
IDS = ["0c7fd939-02cf-11ed-88c2-0a58a9feac02", "0c7fd93a-02cf-11ed-88c2-0a58a9feac02",
       "0c7fd93b-02cf-11ed-88c2-0a58a9feac02"]
FIELDS = {"from", "to", "cc", "bcc", "subject", "text", "html", "attachments", "headers",
          "category", "custom_variables", "template_uuid", "template_variables"}


def error(status: int, *messages: str, **headers: str) -> Answer:
    return Answer(status, {"success": False, "errors": list(messages)}, headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    atts = []
    for a in data.get("attachments", []):
        assert set(a) <= {"content", "type", "filename", "disposition", "content_id"}
        assert (a["disposition"] == "inline") == ("content_id" in a)
        atts.append((a["filename"], a["type"], base64.b64decode(a["content"]),
                     a.get("content_id")))
    headers = dict(data.get("headers", {}))
    variables = dict(data.get("custom_variables", {}))
    tags = [data["category"]] if "category" in data else []
    if "tags" in variables:
        tags = [t.strip() for t in variables.pop("tags").split(",")]
    return Sent(
        from_=mailbox_address(data["from"]), to=[mailbox_address(o) for o in data["to"]],
        cc=[mailbox_address(o) for o in data.get("cc", [])],
        bcc=[mailbox_address(o) for o in data.get("bcc", [])],
        reply_to=addresses(headers.pop("Reply-To", None)), subject=data["subject"],
        text=data.get("text"), html=data.get("html"), attachments=atts, headers=headers,
        tags=tags, metadata=variables)


CASE = ProviderCase(
    kind="mailtrap",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/api/send"),
    authorised=lambda rec: rec.headers.get("authorization") == f"Bearer {KEY}",
    read=read,
    success=Answer(200, {"success": True, "message_ids": IDS}),
    provider_id=IDS[0],
    bad_key=error(401, "Unauthorized"),
    rate_limited=error(429, "Rate limit exceeded", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "'to' address is invalid"), DataRejected, True,
                  "mailtrap.invalid_request"),
        # Mailtrap's SMTP refusal for such a domain; the API's own sentence is undocumented.
        ErrorCase(error(403, "Sending from domain is not allowed"), SenderRejected, False,
                  "mailtrap.domain_unverified"),
        ErrorCase(error(403, "Your account is suspended"), DeliveryError, False,
                  "mailtrap.account_suspended"),  # wording unverified (module header)
        # The reason Mailtrap's suspension events give (its webhooks spec).
        ErrorCase(error(403, "Your account has reached its daily sending limit."),
                  DeliveryError, False, "mailtrap.plan_limit"),
        ErrorCase(error(401, "Unauthorized"), AuthError, False, "auth.api_key_refused"),
        # The documented bare 403: verify the domain or the token's access to it.
        ErrorCase(error(403, "Forbidden"), SenderRejected, False,
                  "mailtrap.domain_unverified"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/api/accounts"),
    check_ok=Answer(200, [{"id": 26730, "name": "Shop", "access_levels": [100]}]),
    # One header field twice: Mailtrap's headers are one JSON object, a name once.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: twice\r\n"
                b"X-Order: 1\r\nX-Order: 2\r\n\r\nhello\r\n", "X-Order, given twice"),
)


# -- webhooks: Mailtrap-Signature = hex HMAC-SHA256 of the body (documented event batch) --
HOOK_KEY = "mt-signing-secret-0123456789abcdef"
EVENTS = {"events": [
    {"event": "delivery", "message_id": IDS[0], "sending_stream": "transactional",
     "email": "bob@example.org", "timestamp": 1765096200,
     "event_id": "bede7236-2284-43d6-a953-1fdcafd0fdbc", "category": "orders",
     "custom_variables": {"order": "1234"}},
    {"event": "bounce", "message_id": IDS[1], "sending_stream": "transactional",
     "email": "carol@example.org", "timestamp": 1765096260,
     "event_id": "c4f1b1e2-8d0a-4bd7-9b9e-0a1d2c3b4f5e", "response": "550 5.1.1 No such user",
     "response_code": 550, "bounce_category": "badmailbox"},
    {"event": "soft bounce", "message_id": IDS[2], "sending_stream": "transactional",
     "email": "audit@example.net", "timestamp": 1765096320,
     "event_id": "d1e2f3a4-b5c6-4d7e-8f90-a1b2c3d4e5f6", "response": "451 4.2.2 Mailbox full"},
    {"event": "spam", "message_id": IDS[0], "sending_stream": "transactional",
     "email": "bob@example.org", "timestamp": 1765096380,
     "event_id": "e2f3a4b5-c6d7-4e8f-9a0b-b1c2d3e4f5a6"},
]}


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    sig = hmac.new(HOOK_KEY.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Mailtrap-Signature": sig, "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="mailtrap", settings=CASE.settings, key=HOOK_KEY,
    wrong_key="mt-another-secret-fedcba9876543210", body=json.dumps(EVENTS).encode(),
    sign=_sign,
    events=[Expected(Kind.DELIVERED, IDS[0], "bob@example.org"),
            Expected(Kind.BOUNCED, IDS[1], "carol@example.org", True),
            Expected(Kind.DEFERRED, IDS[2], "audit@example.net"),
            Expected(Kind.COMPLAINED, IDS[0], "bob@example.org")],
    tamper=lambda body: body.replace(b'"soft bounce"', b'"bounce"'),
    timestamped=False,  # the signature covers the body alone: the event ids stop a replay
)
