"""Postmark in the contract suite: shapes and bodies from Postmark's "Email API" and "API
overview" pages (X-Postmark-Server-Token, POST /email, ErrorCode table, GET /server)."""

from __future__ import annotations

import base64
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, addresses

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected

KEY = "pm-server-token-1"
MESSAGE_ID = "b7bc2f4a-e38e-4336-af7d-e6c392c2f817"
# The documented /email request keys (Postmark "Email API: send a single email").
FIELDS = {"From", "To", "Cc", "Bcc", "Subject", "Tag", "HtmlBody", "TextBody", "ReplyTo",
          "Metadata", "Headers", "TrackOpens", "TrackLinks", "Attachments", "MessageStream"}


def error(status: int, code: int, message: str, **headers: str) -> Answer:
    return Answer(status, {"ErrorCode": code, "Message": message}, headers)


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    assert rec.headers["accept"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    assert data["MessageStream"] == "outbound"
    atts = []
    for a in data.get("Attachments", []):
        assert set(a) <= {"Name", "Content", "ContentType", "ContentID"}
        cid = a.get("ContentID")
        assert cid is None or cid.startswith("cid:")  # Postmark's inline form
        atts.append((a["Name"], a["ContentType"], base64.b64decode(a["Content"]),
                     cid[4:] if cid else None))
    tags = [data["Tag"]] if "Tag" in data else []
    metadata = dict(data.get("Metadata", {}))
    if "tags" in metadata:
        tags = [t.strip() for t in metadata.pop("tags").split(",")]
    return Sent(
        from_=addresses(data["From"])[0], to=addresses(data["To"]), cc=addresses(data.get("Cc")),
        bcc=addresses(data.get("Bcc")), reply_to=addresses(data.get("ReplyTo")),
        subject=data["Subject"], text=data.get("TextBody"), html=data.get("HtmlBody"),
        attachments=atts, headers={h["Name"]: h["Value"] for h in data.get("Headers", [])},
        tags=tags, metadata=metadata)


CASE = ProviderCase(
    kind="postmark",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/email"),
    authorised=lambda rec: rec.headers.get("x-postmark-server-token") == KEY,
    read=read,
    success=Answer(200, {"To": "bob@example.org", "SubmittedAt": "2026-12-07T08:00:00Z",
                         "MessageID": MESSAGE_ID, "ErrorCode": 0, "Message": "OK"}),
    provider_id=MESSAGE_ID,
    bad_key=error(401, 10, "The Server Token you provided in the X-Postmark-Server-Token "
                  "request header was invalid. Please verify that you are using a valid "
                  "token."),
    rate_limited=error(429, 429, "Rate limit exceeded", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(422, 300, "Invalid 'To' address: 'bob@'."), DataRejected, True,
                  "postmark.invalid_request"),
        ErrorCase(error(422, 400, "The 'From' address you supplied (shop@example.com) is not "
                        "a Sender Signature on your account."), SenderRejected, False,
                  "postmark.sender_signature_missing"),
        ErrorCase(error(422, 401, "The 'From' address you supplied is a Sender Signature "
                        "that has not been confirmed."), SenderRejected, False,
                  "postmark.sender_unconfirmed"),
        ErrorCase(error(422, 406, "You tried to send to recipient(s) that have been marked as "
                        "inactive. Found inactive addresses: bob@example.org."), DataRejected,
                  True, "postmark.inactive_recipient"),
        ErrorCase(error(422, 411, "Forbidden attachment type: x.exe"), DataRejected, True,
                  "postmark.forbidden_attachment"),
        ErrorCase(error(422, 412, "While your account is pending approval, all recipients "
                        "must share the same domain as the 'From' address."), DeliveryError,
                  False, "postmark.account_pending"),
        ErrorCase(error(422, 405, "You are not allowed to send: out of credits."),
                  DeliveryError, False, "postmark.not_allowed"),
        ErrorCase(error(422, 413, "Your account may not send."), DeliveryError, False,
                  "postmark.account_blocked", advice="postmark.not_allowed"),
        ErrorCase(error(422, 1235, "The message stream for the provided 'MessageStream' was "
                        "not found."), DeliveryError, False, "postmark.stream_missing"),
        ErrorCase(error(401, 10, "Bad or missing API token"), AuthError, False,
                  "auth.api_key_refused"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/server"),
    check_ok=Answer(200, {"ID": 1, "Name": "Staging Testing", "ApiTokens": ["****"],
                          "Color": "red", "DeliveryType": "Live"}),
    # multipart/signed: Postmark rebuilds the message from fields, which breaks a signature.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: signed\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; "
                b"protocol=\"application/pgp-signature\"; boundary=\"b\"\r\n\r\n--b\r\n"
                b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: "
                b"application/pgp-signature\r\n\r\nsig\r\n--b--\r\n", "multipart/signed"),
)
