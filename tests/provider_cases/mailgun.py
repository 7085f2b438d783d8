"""Mailgun in the contract suite: shapes and bodies from Mailgun's "Messages: send in MIME
format" (Basic api:KEY, POST /v3/{domain}/messages.mime, multipart to + message + o:tag +
v:*), its status-code table and error bodies ({"message": ...}), and GET /v3/domains/{d}."""

from __future__ import annotations

import hashlib
import hmac
import json

from provider_fake import (
    Answer,
    ErrorCase,
    ProviderCase,
    Recorded,
    Sent,
    basic_auth,
    form_data,
    mime_sent,
)
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
DOMAIN = "mg.example.com"
MESSAGE_ID = "20111114174239.25659.5817@samples.mailgun.org"


def error(status: int, message: str, **headers: str) -> Answer:
    return Answer(status, {"message": message}, headers)


def read(rec: Recorded) -> Sent:
    fields, files = form_data(rec)
    assert set(files) == {"message"}, files
    assert set(fields) <= {"to", "o:tag", "o:testmode"} | {f for f in fields
                                                            if f.startswith("v:")}, fields
    return mime_sent(files["message"], fields["to"], tags=fields.get("o:tag", []),
                     metadata={k[2:]: v[0] for k, v in fields.items() if k.startswith("v:")})


CASE = ProviderCase(
    kind="mailgun",
    settings={"api_key": KEY, "domain": DOMAIN},
    bad_settings={"api_key": "wrong"},
    send=("POST", f"/v3/{DOMAIN}/messages.mime"),
    authorised=lambda rec: rec.headers.get("authorization") == basic_auth("api", KEY),
    read=read,
    success=Answer(200, {"id": f"<{MESSAGE_ID}>", "message": "Queued. Thank you."}),
    provider_id=MESSAGE_ID,
    bad_key=Answer(401, "Forbidden"),
    rate_limited=error(429, "Too many requests", **{"Retry-After": "30"}),
    unavailable=Answer(503, "Service Unavailable", {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "'from' parameter is not a valid address. please check "
                        "documentation"), DataRejected, True, "mailgun.invalid_request"),
        ErrorCase(error(403, "Domain sandbox123.mailgun.org is not allowed to send: Free "
                        "accounts are for test purposes only. Please upgrade or add the "
                        "address to authorized recipients in Account Settings."),
                  DeliveryError, False, "mailgun.sandbox_recipient"),
        ErrorCase(error(404, f"Domain not found: {DOMAIN}"), DeliveryError, False,
                  "mailgun.domain_unknown"),
        ErrorCase(error(403, f"Domain {DOMAIN} is not allowed to send: The domain is "
                        "unverified and requires DNS configuration. Log in to your control "
                        "panel to view required DNS records."), SenderRejected, False,
                  "mailgun.domain_unverified"),
        ErrorCase(error(403, f"Domain {DOMAIN} is disabled"), DeliveryError, False,
                  "mailgun.account_disabled"),
        ErrorCase(error(402, "Request Failed"), DeliveryError, False,
                  "mailgun.payment_required", advice="mailgun.account_disabled"),
        ErrorCase(Answer(401, "Forbidden"), AuthError, False, "auth.api_key_refused"),
        ErrorCase(Answer(413, "Request Entity Too Large"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("GET", f"/v3/domains/{DOMAIN}"),
    check_ok=Answer(200, {"domain": {"name": DOMAIN, "state": "active",
                                     "type": "custom"},
                          "receiving_dns_records": [], "sending_dns_records": []}),
    unmappable=None,  # raw MIME: everything can be expressed
)


# -- webhooks ("Webhooks: securing webhooks"; the payload is the documented "failed" sample) --
HOOK_KEY = "key-webhook-signing-0123456789abcdef"
TOKEN = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"
EVENT = {"event-data": {
    "event": "failed", "severity": "permanent", "reason": "bounce",
    "id": "G9Bn5sl1TC6nu79C8C0bwg", "timestamp": 1521233195.375624, "log-level": "error",
    "recipient": "alice@example.com", "recipient-domain": "example.com",
    "message": {"headers": {"to": "Alice <alice@example.com>", "message-id": MESSAGE_ID,
                            "from": "Bob <bob@mg.example.com>",
                            "subject": "Test permanent_fail webhook"},
                "attachments": [], "size": 111},
    "delivery-status": {"attempt-no": 1, "message": "", "code": 605, "description":
                        "Not delivering to previously bounced address",
                        "session-seconds": 0.0},
    "user-variables": {"order": "1234"}, "tags": ["orders"],
    "envelope": {"transport": "smtp", "sender": "bob@mg.example.com", "targets":
                 "alice@example.com"}}}


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    stamp = str(int(at))
    digest = hmac.new(HOOK_KEY.encode(), (stamp + TOKEN).encode(), hashlib.sha256).hexdigest()
    doc = {"signature": {"timestamp": stamp, "token": TOKEN, "signature": digest},
           **json.loads(body)}
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="mailgun", settings=CASE.settings, key=HOOK_KEY, wrong_key="key-another-one",
    body=json.dumps(EVENT).encode(), sign=_sign,
    events=[Expected(Kind.BOUNCED, MESSAGE_ID, "alice@example.com", True)],
    # Mailgun signs timestamp + token (not the event): a changed token is a forgery.
    tamper=lambda body: body.replace(TOKEN.encode(), TOKEN[::-1].encode()),
)
