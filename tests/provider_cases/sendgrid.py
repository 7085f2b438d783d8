"""SendGrid in the contract suite: shapes and bodies from SendGrid's "Mail Send" reference
(Authorization: Bearer, POST /v3/mail/send, 202 + X-Message-Id, {"errors": [...]}) and
"API keys: scopes" (GET /v3/scopes)."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
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

KEY = "SG.test-key.0123456789"
MESSAGE_ID = "Lqp3sr2yTJCjzWWkM0e32Q"  # X-Message-Id: 22 characters, base64url
FIELDS = {"personalizations", "from", "reply_to", "reply_to_list", "subject", "content",
          "attachments", "headers", "categories", "custom_args", "mail_settings",
          "tracking_settings", "send_at", "asm", "ip_pool_name", "template_id"}


def error(status: int, message: str, field: str | None = None, **headers: str) -> Answer:
    return Answer(status, {"errors": [{"message": message, "field": field, "help": None}]},
                  headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    [person] = data["personalizations"]
    content = {c["type"]: c["value"] for c in data["content"]}
    assert data["content"][0]["type"] == "text/plain"  # SendGrid: text/plain comes first
    atts = []
    for a in data.get("attachments", []):
        assert set(a) <= {"content", "type", "filename", "disposition", "content_id"}
        assert (a["disposition"] == "inline") == ("content_id" in a)
        atts.append((a["filename"], a["type"], base64.b64decode(a["content"]),
                     a.get("content_id")))
    replies = data.get("reply_to_list") or ([data["reply_to"]] if "reply_to" in data else [])
    return Sent(
        from_=addresses(mailbox_address(data["from"]))[0],
        to=addresses([mailbox_address(x) for x in person["to"]]),
        cc=addresses([mailbox_address(x) for x in person.get("cc", [])]),
        bcc=addresses([mailbox_address(x) for x in person.get("bcc", [])]),
        reply_to=addresses([mailbox_address(x) for x in replies]),
        subject=data["subject"], text=content.get("text/plain"), html=content.get("text/html"),
        attachments=atts, headers=dict(data.get("headers", {})),
        tags=list(data.get("categories", [])), metadata=dict(data.get("custom_args", {})))


CASE = ProviderCase(
    kind="sendgrid",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/v3/mail/send"),
    authorised=lambda rec: rec.headers.get("authorization") == f"Bearer {KEY}",
    read=read,
    success=Answer(202, b"", {"X-Message-Id": MESSAGE_ID}),
    provider_id=MESSAGE_ID,
    bad_key=error(401, "The provided authorization grant is invalid, expired, or revoked"),
    rate_limited=error(429, "too many requests", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "The from email does not contain a valid address.",
                        "from.email"), DataRejected, True, "sendgrid.invalid_request"),
        ErrorCase(error(403, "The from address does not match a verified Sender Identity. "
                        "Mail cannot be sent until this error is resolved. Visit "
                        "https://sendgrid.com/docs/for-developers/sending-email/"
                        "sender-identity/ to see the Sender Identity requirements"),
                  SenderRejected, False, "sendgrid.sender_unverified"),
        ErrorCase(error(401, "Maximum credits exceeded"), DeliveryError, False,
                  "sendgrid.credits_exceeded"),
        ErrorCase(error(401, "The provided authorization grant is invalid, expired, or "
                        "revoked"), AuthError, False, "auth.api_key_refused"),
        ErrorCase(error(413, "The JSON payload you have included in your request is too "
                        "large."), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/v3/scopes"),
    check_ok=Answer(200, {"scopes": ["mail.send", "alerts.read"]}),
    # multipart/signed: SendGrid rebuilds the message from fields, which breaks a signature.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: signed\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; "
                b"protocol=\"application/pgp-signature\"; boundary=\"b\"\r\n\r\n--b\r\n"
                b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: "
                b"application/pgp-signature\r\n\r\nsig\r\n--b--\r\n", "multipart/signed"),
)


# -- the Signed Event Webhook ("Getting started with the Event Webhook Security Features") --
def _keypair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


_SIGNER, HOOK_KEY = _keypair()
_, OTHER_KEY = _keypair()
SG_ID = f"{MESSAGE_ID}.filterdrecv-p3iad2-8ddf98858-xk9s9-19-5B97A5A0-C.0"
# The "Event Webhook reference" examples, trimmed to the fields Postroom reads and a few more.
EVENTS = [
    {"email": "bob@example.org", "timestamp": 1513299569, "smtp-id":
     "<14c5d75ce93.dfd.64b469@ismtpd-555>", "event": "processed", "category": ["orders"],
     "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A", "sg_message_id": SG_ID},
    {"email": "bob@example.org", "timestamp": 1513299569, "event": "delivered",
     "response": "250 OK", "sg_event_id": "rWVYmVk90MjZJ9iohOBa3w", "sg_message_id": SG_ID},
    {"email": "dead@example.org", "timestamp": 1513299569, "event": "bounce",
     "reason": "500 unknown recipient", "status": "5.0.0", "type": "bounce",
     "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw", "sg_message_id": SG_ID},
    {"email": "busy@example.org", "timestamp": 1513299569, "event": "bounce",
     "reason": "421 try again later", "status": "4.0.0", "type": "blocked",
     "sg_event_id": "7g4ZI7SA-xmRDv57GoPIPw", "sg_message_id": SG_ID},
    {"email": "bob@example.org", "timestamp": 1513299569, "event": "spamreport",
     "sg_event_id": "37nvH5QBz858KGVYCM4uOA", "sg_message_id": SG_ID},
    {"email": "bob@example.org", "timestamp": 1513299569, "event": "group_resubscribe",
     "asm_group_id": 10, "sg_event_id": "pJ4kQ6Sg2kS6dF5c7b3Jwg", "sg_message_id": SG_ID},
]


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    stamp = str(int(at))
    sig = _SIGNER.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return body, {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
                  "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
                  "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="sendgrid", settings=CASE.settings, key=HOOK_KEY, wrong_key=OTHER_KEY,
    body=json.dumps(EVENTS).encode(), sign=_sign,
    events=[Expected(Kind.QUEUED, MESSAGE_ID, "bob@example.org"),
            Expected(Kind.DELIVERED, MESSAGE_ID, "bob@example.org"),
            Expected(Kind.BOUNCED, MESSAGE_ID, "dead@example.org", True),
            Expected(Kind.BOUNCED, MESSAGE_ID, "busy@example.org", False),
            Expected(Kind.COMPLAINED, MESSAGE_ID, "bob@example.org"),
            Expected(Kind.UNKNOWN, MESSAGE_ID, "bob@example.org")],
    tamper=lambda body: body.replace(b"dead@example.org", b"live@example.org"),
)
