"""Mailjet in the contract suite: shapes and bodies from Mailjet's "Send API v3.1" guide and
reference (Basic public:secret, POST /v3.1/send, Messages[] with per-recipient MessageID,
ErrorCode "mj-0013" / "send-0008", the 401 body) and GET /v3/REST/sender."""

from __future__ import annotations

import base64
import json
from typing import Any

from provider_fake import (
    Answer,
    ErrorCase,
    ProviderCase,
    Recorded,
    Sent,
    addresses,
    basic_auth,
    mailbox_address,
)
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

PUBLIC = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
KEY = "secret-9a8b7c6d5e4f3a2b1c0d"
MESSAGE_ID = "1152921511742440800"
FIELDS = {"From", "To", "Cc", "Bcc", "ReplyTo", "Subject", "TextPart", "HTMLPart",
          "Attachments", "InlinedAttachments", "Headers", "CustomID", "EventPayload",
          "CustomCampaign", "TemplateID", "TemplateLanguage", "Variables"}


def errors(status: int, code: str, message: str, related: list[str],
           **headers: str) -> Answer:
    return Answer(status, {"Messages": [{"Status": "error", "Errors": [{
        "ErrorIdentifier": "ac93d194-1432-4e25-a215-2cb450d4a818", "ErrorCode": code,
        "StatusCode": status, "ErrorMessage": message, "ErrorRelatedTo": related}]}]},
        headers)


def _mailbox(obj: dict[str, str]) -> str:
    return mailbox_address(obj, "Email", "Name")


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= {"Messages", "SandboxMode"}
    [msg] = data["Messages"]
    assert set(msg) <= FIELDS, set(msg) - FIELDS
    atts = []
    for key in ("Attachments", "InlinedAttachments"):
        for a in msg.get(key, []):
            assert set(a) <= {"ContentType", "Filename", "Base64Content", "ContentID"}
            assert ("ContentID" in a) == (key == "InlinedAttachments")
            atts.append((a["Filename"], a["ContentType"], base64.b64decode(a["Base64Content"]),
                         a.get("ContentID")))
    payload = json.loads(msg.get("EventPayload", "{}"))
    tags = [t.strip() for t in payload.pop("tags", "").split(",") if t.strip()]
    assert msg["CustomID"] == msg["Headers"]["Message-ID"]  # events find the message by it
    return Sent(
        from_=addresses(_mailbox(msg["From"]))[0],
        to=addresses([_mailbox(x) for x in msg["To"]]),
        cc=addresses([_mailbox(x) for x in msg.get("Cc", [])]),
        bcc=addresses([_mailbox(x) for x in msg.get("Bcc", [])]),
        reply_to=addresses([_mailbox(msg["ReplyTo"])] if "ReplyTo" in msg else []),
        subject=msg["Subject"], text=msg.get("TextPart"), html=msg.get("HTMLPart"),
        attachments=atts, headers=dict(msg.get("Headers", {})), tags=tags, metadata=payload)


CASE = ProviderCase(
    kind="mailjet",
    settings={"api_key_public": PUBLIC, "api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/v3.1/send"),
    authorised=lambda rec: rec.headers.get("authorization") == basic_auth(PUBLIC, KEY),
    read=read,
    success=Answer(200, {"Messages": [{
        "Status": "success", "CustomID": "",
        "To": [{"Email": "bob@example.org", "MessageUUID": "123", "MessageID": int(MESSAGE_ID),
                "MessageHref": f"https://api.mailjet.com/v3/REST/message/{MESSAGE_ID}"}],
        "Cc": [], "Bcc": []}]}),
    provider_id=MESSAGE_ID,
    bad_key=Answer(401, {"ErrorIdentifier": "ac93d194-1432-4e25-a215-2cb450d4a818",
                         "StatusCode": 401, "ErrorMessage": "API key authentication/"
                         "authorization failure. You may be unauthorized to access the API or "
                         "your API key may be expired. Visit API keys management section to "
                         "check your keys."}),
    rate_limited=Answer(429, {"StatusCode": 429, "ErrorMessage": "Too many requests"},
                        {"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(errors(400, "mj-0013", '"bob@" is an invalid email address.',
                         ["To[0].Email"]), DataRejected, True, "mailjet.invalid_address",
                  advice="mailjet.invalid_request"),
        ErrorCase(errors(400, "send-0003", 'At least "HTMLPart", "TextPart" or "TemplateID" '
                         "must be provided.", ["HTMLPart", "TextPart", "TemplateID"]),
                  DataRejected, True, "mailjet.invalid_request"),
        ErrorCase(errors(403, "send-0008", '"shop@example.com" is not an authorized sender '
                         "email address for your account.", ["From"]), SenderRejected, False,
                  "mailjet.sender_unverified"),
        ErrorCase(Answer(403, {"ErrorIdentifier": "x", "StatusCode": 403, "ErrorMessage":
                               "Your account is suspended"}), DeliveryError, False,
                  "mailjet.account_blocked"),
        ErrorCase(Answer(401, {"StatusCode": 401, "ErrorMessage": "API key authentication/"
                               "authorization failure."}), AuthError, False,
                  "auth.api_key_refused"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", "/v3/REST/sender"),
    check_ok=Answer(200, {"Count": 1, "Data": [{"Email": "shop@example.com", "ID": 1,
                                                "Status": "Active"}], "Total": 1}),
    # Two Reply-To addresses: Mailjet's ReplyTo holds one.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nReply-To: a@example.com, "
                b"b@example.com\r\nSubject: two replies\r\n\r\nhello\r\n", "Reply-To"),
)


# -- Event API (basic auth in the callback URL; the "sent" and "bounce" samples, grouped) --
HOOK_KEY = "mailjet-hooks:s3cret-callback-password"
MESSAGE_HEADER_ID = "<20261207080000.1234@example.com>"
EVENTS = [
    {"event": "sent", "time": 1433333949, "MessageID": int(MESSAGE_ID),
     "Message_GUID": "1ab23cd4-e567-8901-2345-6789f0gh1i2j", "email": "bob@example.org",
     "mj_campaign_id": 7257, "mj_contact_id": 4, "customcampaign": "",
     "mj_message_id": MESSAGE_ID, "smtp_reply": "sent (250 2.0.0 OK 1433333948 "
     "fa5si855896wjc.199 - gsmtp)", "CustomID": MESSAGE_HEADER_ID, "Payload": ""},
    {"event": "bounce", "time": 1430812195, "MessageID": 13792286917004336,
     "Message_GUID": "1ab23cd4-e567-8901-2345-6789f0gh1i2k", "email": "carol@example.org",
     "mj_campaign_id": 0, "mj_contact_id": 0, "customcampaign": "",
     "CustomID": MESSAGE_HEADER_ID, "Payload": "", "blocked": False, "hard_bounce": True,
     "error_related_to": "recipient", "error": "user unknown"},
]


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    return body, {"Authorization": basic_auth(*HOOK_KEY.split(":", 1)),
                  "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="mailjet", settings=CASE.settings, key=HOOK_KEY,
    wrong_key="mailjet-hooks:another-password", body=json.dumps(EVENTS).encode(), sign=_sign,
    events=[Expected(Kind.DELIVERED, MESSAGE_ID, "bob@example.org"),
            Expected(Kind.BOUNCED, "13792286917004336", "carol@example.org", True)],
    tamper=None, timestamped=False,  # Mailjet signs nothing: basic auth only
)
