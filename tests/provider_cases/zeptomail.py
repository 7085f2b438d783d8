"""ZeptoMail in the contract suite: shapes and bodies from ZeptoMail's "Email sending API"
(Authorization: Zoho-enczapikey, POST /v1.1/email, the 201 {"data", "request_id"}
answer), its "API error codes" page ({"error": {"code", "details": [{"code", "message",
"target"}]}}) and its webhook documentation (producer-signature, event_name/event_message)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent
from provider_hooks import Expected, HookCase

from postroom.exceptions import (
    AuthError,
    DataRejected,
    DeliveryError,
    ProtocolError,
    SenderRejected,
)
from postroom.webhooks import Kind

KEY = "wSsVR60h+0T2Wqp8zjb4Ke9rnVxdVAmiHEt8iVKn6HT6GfmVocc8kkHLAFP0GaUcR2FtFmMXp7J8nxcG1DEI"
REQUEST_ID = "2d6f.3b0d3e1f3c2d6a4e.m1.5a9a7b60-7b2f-11ee-9a8b-525400fa05f6.18b9f3f1c07"
FIELDS = {"from", "to", "cc", "bcc", "reply_to", "subject", "textbody", "htmlbody",
          "attachments", "inline_images", "mime_headers", "client_reference", "track_clicks",
          "track_opens", "bounce_address"}


def error(status: int, code: str, sub: str, message: str, target: str = "",
          **headers: str) -> Answer:
    detail = {"code": sub, "message": message, **({"target": target} if target else {})}
    return Answer(status, {"error": {"code": code, "details": [detail], "message": "Invalid "
                                     "API request", "request_id": REQUEST_ID}}, headers)


def _addr(obj: dict[str, str]) -> str:
    assert set(obj) <= {"address", "name"}, obj
    return obj["address"].lower()


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    atts = []
    for a in data.get("attachments", []):
        assert set(a) == {"name", "mime_type", "content"}
        atts.append((a["name"], a["mime_type"], base64.b64decode(a["content"]), None))
    for a in data.get("inline_images", []):
        assert set(a) == {"cid", "mime_type", "content"}
        atts.append(("logo.png", a["mime_type"], base64.b64decode(a["content"]), a["cid"]))
    reference = json.loads(data.get("client_reference", "{}"))
    return Sent(
        from_=_addr(data["from"]), to=[_addr(o["email_address"]) for o in data["to"]],
        cc=[_addr(o["email_address"]) for o in data.get("cc", [])],
        bcc=[_addr(o["email_address"]) for o in data.get("bcc", [])],
        reply_to=[_addr(o) for o in data.get("reply_to", [])], subject=data["subject"],
        text=data.get("textbody"), html=data.get("htmlbody"), attachments=atts,
        headers=dict(data.get("mime_headers", {})), tags=reference.get("tags", []),
        metadata=reference.get("metadata", {}))


CASE = ProviderCase(
    kind="zeptomail",
    # As the dashboard shows the token: with its scheme, which Postroom does not send twice.
    settings={"api_key": f"Zoho-enczapikey {KEY}", "region": "eu"},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/email"),
    authorised=lambda rec: rec.headers.get("authorization") == f"Zoho-enczapikey {KEY}",
    read=read,
    success=Answer(201, {"data": [{"code": "EM_104", "additional_info": [],
                                   "message": "Email request received"}],
                         "message": "OK", "request_id": REQUEST_ID, "object": "email"}),
    provider_id=REQUEST_ID,
    bad_key=error(401, "TM_4001", "SERR_157", "Invalid API Token found"),
    rate_limited=Answer(429, {"error": {"code": "TM_5001", "message": "Too many requests"}},
                        {"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "TM_3201", "GE_102", "Mandatory Field 'subject' was set as Empty "
                        "Value.", "subject"), DataRejected, True, "zeptomail.invalid_request"),
        ErrorCase(error(400, "TM_4001", "SM_113", "Mandatory Field 'to' has Invalid Value.",
                        "to"), DataRejected, True, "zeptomail.invalid_request"),
        ErrorCase(error(400, "TM_3301", "SM_101", "Invalid JSON."), ProtocolError, True,
                  "zeptomail.json_refused"),
        ErrorCase(error(403, "TM_4001", "SM_111", "Sender address domain is not verified in "
                        "your Mail Agent.", "from"), SenderRejected, False,
                  "zeptomail.domain_unverified"),
        ErrorCase(error(403, "TM_4001", "SM_128", "Your ZeptoMail account is yet to be "
                        "reviewed and approved by us."), DeliveryError, False,
                  "zeptomail.account_review"),
        ErrorCase(error(403, "TM_3601", "SM_133", "Trial mail sending limit exceeded."),
                  DeliveryError, False, "zeptomail.account_review"),
        ErrorCase(error(403, "TM_3501", "LE_101", "Credits expired."), DeliveryError, False,
                  "zeptomail.credits"),
        ErrorCase(error(403, "TM_3601", "SMI_115", "Per day limit exhausted, try after some "
                        "time."), DeliveryError, False, "zeptomail.daily_limit"),
        ErrorCase(error(403, "TM_3601", "SERR_156", "Email sending IP is not in the allowed "
                        "IPs list."), DeliveryError, False, "zeptomail.ip_not_allowed"),
        ErrorCase(error(403, "TM_3601", "AE_101", "Account blocked"), DeliveryError, False,
                  "zeptomail.account_blocked"),
        ErrorCase(error(401, "TM_4001", "SERR_157", "Invalid API Token found"), AuthError,
                  False, "auth.api_key_refused"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=None,  # a send mail token can only send (zeptomail.py)
    # multipart/signed: ZeptoMail rebuilds the message from fields, which breaks a signature.
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: signed\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; "
                b"protocol=\"application/pgp-signature\"; boundary=\"b\"\r\n\r\n--b\r\n"
                b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: "
                b"application/pgp-signature\r\n\r\nsig\r\n--b--\r\n", "multipart/signed"),
)


# -- webhooks: producer-signature (documented hardbounce payload) --------------------------
HOOK_KEY = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d"
EVENT = {
    "event_name": ["hardbounce"],
    "event_message": [{
        "email_info": {
            "email_reference": "2d6f.3b0d3e1f3c2d6a4e.m1@bounce-zem.example.com",
            "client_reference": "{\"tags\": [\"orders\"]}", "is_smtp_trigger": False,
            "subject": "Your order 1234", "bounce_address": "bounce@bounce-zem.example.com",
            "from": {"address": "shop@example.com", "name": "Shop"},
            "to": [{"email_address": {"address": "dead@example.org", "name": "Dead"}}],
            "processed_time": "2026-12-07T08:29:59.000+0000", "object": "email"},
        "event_data": [{"details": [{
            "reason": "Mailbox not found", "bounced_recipient": "dead@example.org",
            "time": "2026-12-07T08:30:00.000+0000",
            "diagnostic_message": "550 5.1.1 The email account that you tried to reach "
                                  "does not exist"}], "object": "hardbounce"}],
        "request_id": REQUEST_ID}],
    "mailagent_key": "2d6f.3b0d3e1f3c2d6a4e", "webhook_request_id": "2d6f.1a2b3c4d5e6f",
}


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    ts = str(int(at * 1000))
    sig = base64.b64encode(hmac.new(HOOK_KEY.encode(), ts.encode() + body,
                                    hashlib.sha256).digest()).decode()
    return body, {"producer-signature": f"ts={ts};s={sig};s-algorithm=HmacSHA256",
                  "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="zeptomail", settings=CASE.settings, key=HOOK_KEY,
    wrong_key="9f8e7d6c5b4a39281706f5e4d3c2b1a0", body=json.dumps(EVENT).encode(),
    sign=_sign, events=[Expected(Kind.BOUNCED, REQUEST_ID, "dead@example.org", True)],
    tamper=lambda body: body.replace(b"hardbounce", b"softbounce"),
)
