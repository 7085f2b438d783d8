"""Resend in the contract suite: shapes and bodies from Resend's "Send Email" reference
(Authorization: Bearer, POST /emails, Idempotency-Key, {"id"}), its "Errors" page
({"statusCode", "name", "message"}) and GET /domains."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, addresses
from provider_hooks import Expected, HookCase

from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    SenderRejected,
)
from postroom.webhooks import Kind

KEY = "re_123456789_abcdefghijklmnop"
MESSAGE_ID = "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"
FIELDS = {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers",
          "attachments", "tags", "scheduled_at"}


def error(status: int, name: str, message: str, **headers: str) -> Answer:
    return Answer(status, {"statusCode": status, "name": name, "message": message}, headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    assert rec.headers["idempotency-key"].startswith("postroom-")
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    atts = []
    for a in data.get("attachments", []):
        assert set(a) <= {"filename", "content", "content_type", "content_id", "path"}
        atts.append((a["filename"], a["content_type"], base64.b64decode(a["content"]),
                     a.get("content_id")))
    tags = {t["name"]: t["value"] for t in data.get("tags", [])}
    return Sent(
        from_=addresses(data["from"])[0], to=addresses(data["to"]),
        cc=addresses(data.get("cc")), bcc=addresses(data.get("bcc")),
        reply_to=addresses(data.get("reply_to")), subject=data["subject"],
        text=data.get("text"), html=data.get("html"), attachments=atts,
        headers=dict(data.get("headers", {})),
        tags=[n for n, v in tags.items() if v == "true"],
        metadata={n: v for n, v in tags.items() if v != "true"})


CASE = ProviderCase(
    kind="resend",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/emails"),
    authorised=lambda rec: rec.headers.get("authorization") == f"Bearer {KEY}",
    read=read,
    success=Answer(200, {"id": MESSAGE_ID}),
    provider_id=MESSAGE_ID,
    bad_key=error(403, "invalid_api_key", "API key is invalid"),
    rate_limited=error(429, "rate_limit_exceeded", "Too many requests. You can only make 2 "
                       "requests per second.", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(422, "validation_error", "Invalid `to` field. The email address "
                        "needs to follow the `email@example.com` or `Name <email@example.com>` "
                        "format."), DataRejected, True, "resend.invalid_request"),
        ErrorCase(error(422, "invalid_attachment", "Attachment must have either a `content` "
                        "or `path`."), DataRejected, True, "resend.invalid_request"),
        ErrorCase(error(403, "validation_error", "You can only send testing emails to your "
                        "own email address (owner@example.com). To send emails to other "
                        "recipients, please verify a domain at resend.com/domains, and change "
                        "the `from` address to an email using this domain."), DeliveryError,
                  False, "resend.testing_only"),
        ErrorCase(error(403, "validation_error", "The example.com domain is not verified. "
                        "Please, add and verify your domain on https://resend.com/domains"),
                  SenderRejected, False, "resend.domain_unverified"),
        ErrorCase(error(429, "daily_quota_exceeded", "You have reached your daily email "
                        "sending quota."), DeliveryError, False, "resend.quota_exceeded"),
        ErrorCase(error(409, "concurrent_idempotent_requests", "Same idempotency key used "
                        "while original request is still in progress."), ConnectError, False,
                  "resend.idempotency_busy"),
        ErrorCase(error(401, "missing_api_key", "Missing API key in the authorization "
                        "header."), AuthError, False, "auth.api_key_refused"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/domains"),
    check_ok=Answer(200, {"object": "list", "has_more": False, "data": [{
        "id": "d91cd9bd-1176-453e-8fc1-35364d380206", "name": "example.com",
        "status": "verified", "created_at": "2023-04-26T20:21:26.347412+00:00",
        "region": "us-east-1"}]}),
    # One header field twice: Resend's headers are one JSON object, a name once.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: twice\r\n"
                b"X-Order: 1\r\nX-Order: 2\r\n\r\nhello\r\n", "X-Order, given twice"),
)


# -- webhooks, signed by Svix ("Verify webhooks requests"; the documented email.bounced) --
HOOK_KEY = "whsec_" + base64.b64encode(b"resend-test-signing-secret-32byt").decode()
OTHER_KEY = "whsec_" + base64.b64encode(b"another-signing-secret-of-32byte").decode()
EVENT = {
    "type": "email.bounced", "created_at": "2024-11-22T23:41:12.126Z",
    "data": {"broadcast_id": "8b146471-e88e-4322-86af-016cd36fd216",
             "created_at": "2024-11-22T23:41:11.894719+00:00", "email_id": MESSAGE_ID,
             "from": "Acme <onboarding@resend.dev>", "to": ["delivered@resend.dev"],
             "subject": "Sending this example",
             "bounce": {"message": "The recipient's email address is on the suppression list "
                        "because it has a recent history of producing hard bounces.",
                        "subType": "Suppressed", "type": "Permanent"},
             "tags": {"category": "confirm_email"}}}


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    msg_id, stamp = "msg_2Lh9KRb0pzN4nePCCrexjp9EHrf", str(int(at))
    key = base64.b64decode(HOOK_KEY.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    # Two signatures, as while a secret is rotated: the second one is the valid one.
    sigs = f"v1,{base64.b64encode(b'x' * 32).decode()} v1,{base64.b64encode(digest).decode()}"
    return body, {"svix-id": msg_id, "svix-timestamp": stamp, "svix-signature": sigs,
                  "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="resend", settings=CASE.settings, key=HOOK_KEY, wrong_key=OTHER_KEY,
    body=json.dumps(EVENT).encode(), sign=_sign,
    events=[Expected(Kind.BOUNCED, MESSAGE_ID, "delivered@resend.dev", True)],
    tamper=lambda body: body.replace(b"Permanent", b"Transient"),
)
