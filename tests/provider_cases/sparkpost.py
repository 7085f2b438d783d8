"""SparkPost in the contract suite: shapes and bodies from SparkPost's "Transmissions: create"
(Authorization: KEY, POST /api/v1/transmissions with content.email_rfc822, recipients with
tags, metadata), its "Extended error codes" table ({"errors": [{"code", "message",
"description"}]}) and "Account: retrieve" (GET /api/v1/account)."""

from __future__ import annotations

import base64
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, mime_sent
from provider_hooks import Expected, HookCase

from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    SenderRejected,
)
from postroom.webhooks import Kind

KEY = "0f9a1d3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f"
TRANSMISSION_ID = "11668787484950529"
FIELDS = {"recipients", "content", "metadata", "options", "campaign_id", "return_path",
          "description", "substitution_data"}


def error(status: int, code: str, message: str, description: str = "",
          **headers: str) -> Answer:
    err = {"code": code, "message": message}
    if description:
        err["description"] = description
    return Answer(status, {"errors": [err]}, headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    assert set(data["content"]) == {"email_rfc822"}
    tags: list[str] = []
    for r in data["recipients"]:
        assert set(r) <= {"address", "tags", "metadata", "substitution_data"}, r
        assert set(r["address"]) == {"email"}
        tags = r.get("tags", [])
    return mime_sent(data["content"]["email_rfc822"].encode(),
                     [r["address"]["email"] for r in data["recipients"]], tags=tags,
                     metadata=data.get("metadata", {}))


CASE = ProviderCase(
    kind="sparkpost",
    settings={"api_key": KEY, "region": "eu"},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/api/v1/transmissions"),
    authorised=lambda rec: rec.headers.get("authorization") == KEY,
    read=read,
    success=Answer(200, {"results": {"total_rejected_recipients": 0,
                                     "total_accepted_recipients": 3, "id": TRANSMISSION_ID}}),
    provider_id=TRANSMISSION_ID,
    bad_key=Answer(401, {"errors": [{"message": "Unauthorized."}]}),
    rate_limited=error(429, "", "Too many requests", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "7001", "Invalid domain", "Unconfigured Sending Domain "
                        "<example.com> "), SenderRejected, False,
                  "sparkpost.domain_unconfigured"),
        ErrorCase(error(400, "7000", "Sending domain blacklisted"), SenderRejected, False,
                  "sparkpost.domain_blocked", advice="sparkpost.domain_unconfigured"),
        ErrorCase(error(400, "1902", "Message generation rejected", "recipient address was "
                        "suppressed due to customer policy"), DataRejected, True,
                  "sparkpost.generation_rejected"),
        ErrorCase(error(400, "1901", "Message failed to generate", "Invalid header"),
                  DataRejected, True, "sparkpost.generation_failed",
                  advice="sparkpost.generation_rejected"),
        ErrorCase(error(422, "1300", "invalid data format/type/length", "recipients: "
                        "invalid email address"), DataRejected, True,
                  "sparkpost.invalid_request"),
        ErrorCase(error(420, "2101", "Exceed Sending Limit (hourly)"), ConnectError, False,
                  "sparkpost.limit_exceeded"),
        ErrorCase(error(420, "2103", "Exceed Sending Limit (sandbox)"), DeliveryError, False,
                  "sparkpost.sandbox_limit"),
        ErrorCase(Answer(401, {"errors": [{"message": "Unauthorized."}]}), AuthError, False,
                  "auth.api_key_refused"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/api/v1/account"),
    check_ok=Answer(200, {"results": {"customer_id": 123456, "company_name": "Example Inc",
                                      "status": "active"}}),
    unmappable=None,
)


# -- Webhooks: a batch as "Webhooks: event types" shows them; HTTP basic auth ---------------
HOOK_KEY = "hooks:s3cret-pass"
BATCH = [
    {"msys": {"message_event": {
        "type": "delivery", "event_id": "92356927693813856", "transmission_id":
        TRANSMISSION_ID, "message_id": "0e0d94b7-9085-4e3c-ab30-e3f2cd9c273e",
        "rcpt_to": "bob@example.org", "timestamp": "1460989507", "queue_time": "3166",
        "raw_rcpt_to": "bob@example.org", "ip_address": "127.0.0.1"}}},
    {"msys": {"message_event": {
        "type": "bounce", "bounce_class": "10", "event_id": "92356927693813857",
        "transmission_id": TRANSMISSION_ID, "rcpt_to": "dead@example.org",
        "timestamp": "1460989508", "reason": "550 5.1.1 <dead@example.org>: Recipient "
        "address rejected: User unknown", "raw_reason": "550 5.1.1 <dead@example.org>: "
        "Recipient address rejected: User unknown", "error_code": "550"}}},
    {"msys": {"message_event": {
        "type": "bounce", "bounce_class": "21", "event_id": "92356927693813858",
        "transmission_id": "11668787484950530", "rcpt_to": "full@example.org",
        "timestamp": "1460989509", "raw_reason": "452 4.2.2 mailbox full"}}},
    {"msys": {"message_event": {
        "type": "spam_complaint", "event_id": "92356927693813859", "transmission_id":
        "11668787484950530", "rcpt_to": "angry@example.org", "timestamp": "1460989510",
        "fbtype": "abuse"}}},
    {"msys": {"track_event": {
        "type": "click", "event_id": "92356927693813860", "transmission_id":
        "11668787484950530", "rcpt_to": "bob@example.org", "timestamp": "1460989511",
        "target_link_url": "https://example.com/orders/1234"}}},
    {"msys": {"unsubscribe_event": {
        "type": "list_unsubscribe", "event_id": "92356927693813861", "transmission_id":
        "11668787484950530", "rcpt_to": "bob@example.org", "timestamp": "1460989512"}}},
    {"msys": {"message_event": {"type": "sms_status", "event_id": "92356927693813862",
                                "timestamp": "1460989513"}}},
]


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    return body, {"Authorization": "Basic " + base64.b64encode(HOOK_KEY.encode()).decode(),
                  "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="sparkpost", settings=CASE.settings, key=HOOK_KEY, wrong_key="hooks:another-pass",
    body=json.dumps(BATCH).encode(), sign=_sign,
    events=[Expected(Kind.DELIVERED, TRANSMISSION_ID, "bob@example.org"),
            Expected(Kind.BOUNCED, TRANSMISSION_ID, "dead@example.org", True),
            Expected(Kind.BOUNCED, "11668787484950530", "full@example.org", False),
            Expected(Kind.COMPLAINED, "11668787484950530", "angry@example.org"),
            Expected(Kind.CLICKED, "11668787484950530", "bob@example.org"),
            Expected(Kind.UNSUBSCRIBED, "11668787484950530", "bob@example.org"),
            Expected(Kind.UNKNOWN, None, None)],
    tamper=None, timestamped=False,  # SparkPost webhooks: basic auth only
)
