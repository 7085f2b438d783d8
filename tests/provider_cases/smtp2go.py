"""SMTP2GO in the contract suite: shapes and bodies from SMTP2GO's API reference (the
X-Smtp2go-Api-Key header, POST /v3/email/mime with mime_email (base64), the {"request_id", "data":
{...}} answers and E_ApiResponseCodes error codes, POST /v3/api_keys/permissions) and its
webhook documentation (JSON events with an Authorization header)."""

from __future__ import annotations

import base64
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, mime_sent
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, ConnectError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "api-0F1E2D3C4B5A69788796A5B4C3D2E1F0"
EMAIL_ID = "1er8bV-6Tw0Mi-7h"
REQUEST_ID = "aa253464-0bd0-467a-b24b-6159dcd7be60"


def error(status: int, code: str, message: str, **headers: str) -> Answer:
    return Answer(status, {"request_id": REQUEST_ID,
                           "data": {"error_code": f"E_ApiResponseCodes.{code}",
                                    "error": message}}, headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) == {"mime_email"}, set(data)
    sent = mime_sent(base64.b64decode(data["mime_email"], validate=True))  # base64, as documented
    sent.tags = [t.strip() for t in sent.headers.get("X-Postroom-Tags", "").split(",")
                 if t.strip()]
    sent.metadata = json.loads(sent.headers.get("X-Postroom-Metadata", "{}"))
    return sent


CASE = ProviderCase(
    kind="smtp2go",
    settings={"api_key": KEY, "region": "eu"},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/email/mime"),
    authorised=lambda rec: rec.headers.get("x-smtp2go-api-key") == KEY,
    read=read,
    success=Answer(200, {"request_id": REQUEST_ID, "data": {
        "succeeded": 3, "failed": 0, "failures": [], "email_id": EMAIL_ID}}),
    provider_id=EMAIL_ID,
    bad_key=Answer(401, {"request_id": REQUEST_ID, "data": {"error": "Invalid API key"}}),
    rate_limited=Answer(429, {"request_id": REQUEST_ID, "data": {"error": "Too many requests"}},
                        {"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "ENDPOINT_PERMISSION_DENIED", "You do not have permission to "
                        "access this API endpoint"), AuthError, False, "auth.api_key_forbidden"),
        ErrorCase(error(403, "SENDER_NOT_VERIFIED", "You can only send testing emails to your "
                        "own email address (owner@example.com). Verify a sender domain to "
                        "send to other recipients."), SenderRejected, False,
                  "smtp2go.sender_unverified"),
        ErrorCase(error(400, "NON_VALIDATING_IN_PAYLOAD", "An error occurred processing the "
                        "json data you sent with the request, please make sure the data "
                        "conforms to the specification for this call"), DataRejected, True,
                  "smtp2go.invalid_request"),
        ErrorCase(error(400, "API_EXCEPTION", "An internal error occurred"), ConnectError,
                  False, "smtp2go.api_exception"),
        ErrorCase(Answer(402, {"request_id": REQUEST_ID, "data": {
            "error": "Your account has exceeded its monthly email allowance"}}), DeliveryError,
            False, "smtp2go.request_failed"),
        ErrorCase(Answer(401, {"request_id": REQUEST_ID, "data": {"error": "Invalid API key"}}),
                  AuthError, False, "auth.api_key_refused"),
    ],
    check=("POST", "/api_keys/permissions"),
    check_ok=Answer(200, {"request_id": REQUEST_ID, "data": {
        "permissions": ["/email/send", "/email/mime", "/api_keys/permissions"]}}),
    unmappable=None,  # raw MIME: everything can be expressed
)


# -- webhooks (JSON output, basic auth header; the documented "delivered" and "bounce") --
HOOK_KEY = "postroom:smtp2go-hook-s3cret"
EVENTS = [
    {"event": "delivered", "time": "2026-12-07T09:00:00Z", "sendtime": "2026-12-07T08:59:55Z",
     "sender": "shop@example.com", "from_address": "shop@example.com", "rcpt": "bob@example.org",
     "recipients": ["bob@example.org"], "email_id": EMAIL_ID, "subject": "Your order 1234",
     "Message-Id": "<1@example.com>"},
    {"event": "bounce", "bounce": "hard", "time": "2026-12-07T09:00:01Z",
     "rcpt": "Carol@Example.org", "email_id": EMAIL_ID,
     "context": "550 5.1.1 <carol@example.org>: Recipient address rejected"},
]


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    return body, {"Authorization": "Basic " + base64.b64encode(HOOK_KEY.encode()).decode(),
                  "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="smtp2go", settings=CASE.settings, key=HOOK_KEY, wrong_key="postroom:other-password",
    body=json.dumps(EVENTS).encode(), sign=_sign,
    events=[Expected(Kind.DELIVERED, EMAIL_ID, "bob@example.org"),
            Expected(Kind.BOUNCED, EMAIL_ID, "carol@example.org", True)],
    tamper=None, timestamped=False,  # SMTP2GO signs nothing: an Authorization header only
)
