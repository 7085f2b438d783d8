"""MailerSend in the contract suite: shapes and bodies from MailerSend's "Email" reference
(Authorization: Bearer, POST /v1/email, 202 with X-Message-Id, the 422 validation body with
#MS codes, SOME_SUPPRESSED warnings), GET /v1/api-quota, and its webhook documentation
(the Signature header, activity.* payloads)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, mailbox_address
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "mlsn.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
MESSAGE_ID = "5e42957d51f1d94a1070a733"
FIELDS = {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments",
          "tags", "headers", "personalization", "precedence_bulk", "send_at", "in_reply_to",
          "references", "settings", "template_id", "list_unsubscribe"}


def invalid(field: str, message: str) -> Answer:
    return Answer(422, {"message": message, "errors": {field: [message]}})


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    atts = []
    for a in data.get("attachments", []):
        assert set(a) <= {"content", "filename", "disposition", "id"}
        assert a["disposition"] in ("inline", "attachment")
        assert ("id" in a) == (a["disposition"] == "inline")
        ctype = {"pdf": "application/pdf", "png": "image/png"}[a["filename"].rpartition(".")[2]]
        atts.append((a["filename"], ctype, base64.b64decode(a["content"]), a.get("id")))
    headers = {h["name"]: h["value"] for h in data.get("headers", [])}
    metadata = json.loads(headers.pop("X-Postroom-Metadata", "{}"))
    return Sent(
        from_=mailbox_address(data["from"]), to=[mailbox_address(o) for o in data["to"]],
        cc=[mailbox_address(o) for o in data.get("cc", [])],
        bcc=[mailbox_address(o) for o in data.get("bcc", [])],
        reply_to=[mailbox_address(data["reply_to"])] if "reply_to" in data else [],
        subject=data["subject"], text=data.get("text"), html=data.get("html"),
        attachments=atts, headers=headers, tags=list(data.get("tags", [])),
        metadata=metadata)


CASE = ProviderCase(
    kind="mailersend",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/email"),
    authorised=lambda rec: rec.headers.get("authorization") == f"Bearer {KEY}",
    read=read,
    success=Answer(202, b"", {"X-Message-Id": MESSAGE_ID,
                              "Content-Type": "text/plain; charset=utf-8"}),
    provider_id=MESSAGE_ID,
    bad_key=Answer(401, {"message": "Unauthenticated."}),
    rate_limited=Answer(429, {"message": "Too Many Attempts."}, {"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(invalid("from.email", "The from.email domain must be verified in your "
                          "account to send emails. #MS42207"), SenderRejected, False,
                  "mailersend.domain_unverified"),
        ErrorCase(invalid("to", "You have reached trial account unique recipients limit. "
                          "#MS42225"), DeliveryError, False, "mailersend.trial_limit"),
        ErrorCase(invalid("to", "Trial accounts can only send emails to the administrator's "
                          "email."), DeliveryError, False, "mailersend.trial_limit"),
        ErrorCase(invalid("headers", "The headers feature is available to Professional and "
                          "Enterprise accounts only."), DeliveryError, False,
                  "mailersend.plan_feature"),
        ErrorCase(invalid("to.0.email", "The to.0.email must be a valid email address."),
                  DataRejected, True, "mailersend.invalid_request"),
        ErrorCase(Answer(401, {"message": "Unauthenticated."}), AuthError, False,
                  "auth.api_key_refused"),
        ErrorCase(Answer(403, {"message": "This action is unauthorized."}), AuthError, False,
                  "auth.api_key_forbidden"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/api-quota"),
    check_ok=Answer(200, {"quota": 100000, "remaining": 99998,
                          "reset": "2026-12-08T00:00:00Z"}),
    # Two Reply-To addresses: MailerSend's reply_to is one {email, name}.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nReply-To: a@example.com, "
                b"b@example.com\r\nSubject: two\r\n\r\nhello\r\n", "one Reply-To"),
)


# -- webhooks: Signature = hex HMAC-SHA256 of the body (the documented activity.* shape) --
HOOK_KEY = "ms-signing-secret-0123456789abcdef"
EVENT = {
    "type": "activity.hard_bounced", "domain_id": "7z3m5jgrogdpyo6n",
    "created_at": "2026-12-07T08:30:00.000000Z", "webhook_id": "7z3m5jgrogdpyo6n",
    "url": "https://postroom.example.com/webhooks/mailersend",
    "data": {
        "object": "activity", "id": "62f114f8165fe0d8db0288e3", "type": "hard_bounced",
        "created_at": "2026-12-07T08:30:00.000000Z",
        "email": {
            "object": "email", "id": "62f114f7165fe0d8db0288e2",
            "created_at": "2026-12-07T08:29:59.000000Z", "from": "shop@example.com",
            "subject": "Your order 1234", "status": "rejected", "tags": ["orders"],
            "message": {"object": "message", "id": MESSAGE_ID,
                        "created_at": "2026-12-07T08:29:59.000000Z"},
            "recipient": {"object": "recipient", "id": "62c69be8e6ab6a22e7dc5e0f",
                          "email": "Dead@Example.org",
                          "created_at": "2026-12-07T08:29:59.000000Z"}},
        "morph": {"object": "recipient_bounce", "reason": "Host or domain name not found",
                  "created_at": "2026-12-07T08:30:00.000000Z"}}}


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    sig = hmac.new(HOOK_KEY.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Signature": sig, "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="mailersend", settings=CASE.settings, key=HOOK_KEY,
    wrong_key="ms-another-secret-fedcba9876543210", body=json.dumps(EVENT).encode(),
    sign=_sign, events=[Expected(Kind.BOUNCED, MESSAGE_ID, "dead@example.org", True)],
    tamper=lambda body: body.replace(b"hard_bounced", b"soft_bounced"),
    timestamped=False,  # the signature covers the body alone: the event id stops a replay
)
