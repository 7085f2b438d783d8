"""Brevo in the contract suite: shapes and bodies from Brevo's API reference "Send a
transactional email" (api-key header, POST /v3/smtp/email, sender/to/cc/bcc objects,
attachment [{content, name}], headers, tags; 201 {"messageId"}), its error model ({"code",
"message"}: unauthorized, invalid_parameter, not_enough_credits, permission_denied,
account_under_validation), "Get your account information" (GET /v3/account) and its
transactional webhook samples."""

from __future__ import annotations

import base64
import json
import mimetypes
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, addresses
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "xkeysib-3f1c0e9d8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e-AbCdEfGh"
MESSAGE_ID = "<202612070800.12345678901@smtp-relay.mailin.fr>"
# The documented /v3/smtp/email request keys.
FIELDS = {"sender", "to", "cc", "bcc", "replyTo", "subject", "htmlContent", "textContent",
          "attachment", "headers", "tags", "templateId", "params", "messageVersions",
          "scheduledAt", "batchId"}


def error(status: int, code: str, message: str, **headers: str) -> Answer:
    return Answer(status, {"code": code, "message": message}, headers)


def _box(obj: dict[str, str]) -> str:
    assert set(obj) <= {"email", "name"}, obj
    return obj["email"]


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    atts = []
    for a in data.get("attachment", []):
        assert set(a) == {"content", "name"}, a  # Brevo types a file by its extension
        atts.append((a["name"], mimetypes.guess_type(a["name"])[0] or "",
                     base64.b64decode(a["content"]), None))
    headers = dict(data.get("headers", {}))
    metadata = json.loads(headers.get("X-Mailin-custom", "{}"))
    return Sent(
        from_=addresses(_box(data["sender"]))[0], to=addresses([_box(x) for x in data["to"]]),
        cc=addresses([_box(x) for x in data.get("cc", [])]),
        bcc=addresses([_box(x) for x in data.get("bcc", [])]),
        reply_to=addresses([_box(data["replyTo"])] if "replyTo" in data else []),
        subject=data["subject"], text=data.get("textContent"), html=data.get("htmlContent"),
        attachments=atts, headers=headers, tags=list(data.get("tags", [])), metadata=metadata)


CASE = ProviderCase(
    kind="brevo",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/v3/smtp/email"),
    authorised=lambda rec: rec.headers.get("api-key") == KEY,
    read=read,
    success=Answer(201, {"messageId": MESSAGE_ID}),
    provider_id=MESSAGE_ID,
    bad_key=error(401, "unauthorized", "Key not found"),
    rate_limited=error(429, "too_many_requests", "Too many requests",
                       **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "invalid_parameter", "email is not valid in to"), DataRejected,
                  True, "brevo.invalid_request"),
        ErrorCase(error(400, "missing_parameter", "subject is missing"), DataRejected, True,
                  "brevo.invalid_request"),
        ErrorCase(error(402, "not_enough_credits", "Not enough credits"), DeliveryError, False,
                  "brevo.no_credits"),
        ErrorCase(error(403, "permission_denied", "Sending has been rejected because the "
                        "sender you used shop@example.com is not valid. Validate your sender "
                        "or authenticate your domain"), SenderRejected, False,
                  "brevo.permission_denied"),
        ErrorCase(error(403, "account_under_validation", "Your account is under validation"),
                  DeliveryError, False, "brevo.account_under_validation"),
        ErrorCase(error(401, "unauthorized", "API Key is not enabled"), AuthError, False,
                  "auth.api_key_refused"),
    ],
    check=("GET", "/v3/account"),
    check_ok=Answer(200, {"email": "shop@example.com", "firstName": "Shop", "lastName": "Owner",
                          "companyName": "Shop", "plan": [{"type": "free", "credits": 300,
                                                           "creditsType": "sendLimit"}]}),
    # Two Reply-To addresses: Brevo's replyTo holds one.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nReply-To: a@example.com, "
                b"b@example.com\r\nSubject: two replies\r\n\r\nhello\r\n", "Reply-To"),
    lacks=frozenset({"inline"}),
)


# -- transactional webhooks (bearer token here; the "delivered" and "hard_bounce" samples) --
HOOK_KEY = "brevo-webhook-token-6f1d2c3b4a"
EVENTS = [
    {"event": "delivered", "email": "bob@example.org", "id": 123456,
     "date": "2026-12-07 09:00:00", "ts": 1796634000, "message-id": MESSAGE_ID.strip("<>"),
     "ts_event": 1796634000, "subject": "Your order 1234", "X-Mailin-custom": '{"order": '
     '"1234"}', "sending_ip": "185.41.28.109", "tags": ["orders"], "ts_epoch": 1796634000123},
    {"event": "hard_bounce", "email": "carol@example.org", "id": 123456,
     "date": "2026-12-07 09:00:01", "ts": 1796634001, "message-id": MESSAGE_ID.strip("<>"),
     "ts_event": 1796634001, "subject": "Your order 1234", "sending_ip": "185.41.28.109",
     "tags": ["orders"], "reason": "550 5.1.1 user unknown", "ts_epoch": 1796634001456},
]


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    return body, {"Authorization": f"Bearer {HOOK_KEY}", "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="brevo", settings={**CASE.settings, "webhook_auth": "bearer"}, key=HOOK_KEY,
    wrong_key="brevo-webhook-token-other", body=json.dumps(EVENTS).encode(), sign=_sign,
    events=[Expected(Kind.DELIVERED, MESSAGE_ID, "bob@example.org"),
            Expected(Kind.BOUNCED, MESSAGE_ID, "carol@example.org", True)],
    tamper=None, timestamped=False,  # Brevo signs nothing: basic auth or a bearer token
)
