"""Elastic Email in the contract suite: shapes and bodies from the REST API v4 reference
(X-ElasticEmail-ApiKey, POST /v4/emails/transactional with Recipients / Content / Options,
EmailSend {"TransactionID", "MessageID"}, error bodies with an "Error" text,
GET /v4/statistics/channels)."""

from __future__ import annotations

import base64
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, addresses

from postroom.exceptions import AuthError, DataRejected

KEY = "7D1E4C0B2A99F3E8D7C6B5A4F3E2D1C0B9A8F7E6D5C4B3A2F1E0D9C8B7A6F5E4D3C2B1A0F9E8D7C6"
MESSAGE_ID = "4Jx5YxYzjs3xJT7qn4kHLw2"
TRANSACTION_ID = "5a7b0d2c-3e1f-4a5b-9c8d-7e6f5a4b3c2d"
CONTENT = {"Body", "Merge", "Attachments", "Headers", "Postback", "EnvelopeFrom", "From",
           "ReplyTo", "Subject", "TemplateName", "AttachFiles", "Utm"}


def error(status: int, message: str, **headers: str) -> Answer:
    return Answer(status, {"Error": message}, headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= {"Recipients", "Content", "Options"}, set(data)
    rcpts, content = data["Recipients"], data["Content"]
    assert set(rcpts) <= {"To", "CC", "BCC"} and set(content) <= CONTENT, set(content) - CONTENT
    bodies = {p["ContentType"]: p["Content"] for p in content["Body"]}
    assert set(bodies) <= {"HTML", "PlainText", "AMP"}
    atts = []
    for a in content.get("Attachments", []):
        assert set(a) <= {"BinaryContent", "Name", "ContentType", "Size"}, a
        atts.append((a["Name"], a["ContentType"], base64.b64decode(a["BinaryContent"]), None))
    postback = json.loads(content.get("Postback", "{}"))
    return Sent(
        from_=addresses(content["From"])[0], to=addresses(rcpts["To"]),
        cc=addresses(rcpts.get("CC", [])), bcc=addresses(rcpts.get("BCC", [])),
        reply_to=addresses(content.get("ReplyTo")), subject=content["Subject"],
        text=bodies.get("PlainText"), html=bodies.get("HTML"), attachments=atts,
        headers=dict(content.get("Headers", {})), tags=postback.get("tags", []),
        metadata=postback.get("metadata", {}))


CASE = ProviderCase(
    kind="elasticemail",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/v4/emails/transactional"),
    authorised=lambda rec: rec.headers.get("x-elasticemail-apikey") == KEY,
    read=read,
    success=Answer(200, {"TransactionID": TRANSACTION_ID, "MessageID": MESSAGE_ID}),
    provider_id=MESSAGE_ID,
    bad_key=error(401, "Access Denied."),
    rate_limited=error(429, "Too many requests", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "Invalid recipient email: bob@"), DataRejected, True,
                  "elasticemail.invalid_request"),
        ErrorCase(error(401, "Access Denied."), AuthError, False, "auth.api_key_refused"),
        ErrorCase(error(403, "This API key does not have the required access level: "
                        "SendHttp"), AuthError, False, "auth.api_key_forbidden"),
    ],
    check=("GET", "/v4/statistics/channels"),
    check_ok=Answer(200, [{"ChannelName": "Default", "Recipients": 12, "EmailTotal": 12,
                           "Delivered": 12, "Bounced": 0}]),
    # Two Reply-To addresses: Elastic Email's ReplyTo holds one.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nReply-To: a@example.com, "
                b"b@example.com\r\nSubject: two replies\r\n\r\nhello\r\n", "Reply-To"),
    lacks=frozenset({"inline"}),
)
