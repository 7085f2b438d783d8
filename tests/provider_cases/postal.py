"""Postal in the contract suite: shapes and bodies from Postal's legacy API
(app/controllers/legacy_api/*.rb in postalserver/postal): X-Server-API-Key, POST
/api/v1/send/raw {mail_from, rcpt_to, data (base64), bounce}, answers always HTTP 200 with
{"status": "success" | "error" | "parameter-error", "data": ...}; check() asks
/api/v1/messages/message for message 0 (MessageNotFound with a valid key). A 429 or 503
comes from a proxy in front of Postal, as a self-hosted installation has."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, mime_sent
from provider_hooks import Expected, HookCase

from postroom.exceptions import AuthError, DataRejected, DeliveryError, SenderRejected
from postroom.webhooks import Kind

KEY = "Qd5QMpSU2KmNHaEvMvbeQ3Xk"
MESSAGE_ID = "b7bc2f4a-e38e-4336-af7d-e6c392c2f817@rp.postal.example.com"


def ok(data: dict[str, Any]) -> Answer:
    return Answer(200, {"status": "success", "time": 0.05, "flags": {}, "data": data})


def error(code: str, message: str = "", **extra: str) -> Answer:
    data = {**({"message": message} if message else {}), **extra, "code": code}
    return Answer(200, {"status": "error", "time": 0.01, "flags": {}, "data": data})


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) == {"mail_from", "rcpt_to", "data", "bounce"}, set(data)
    assert data["bounce"] is False and data["mail_from"]
    sent = mime_sent(base64.b64decode(data["data"], validate=True), data["rcpt_to"])
    tags = sent.headers.get("X-Postroom-Tags")
    sent.tags = [t.strip() for t in tags.split(",")] if tags else []
    assert sent.headers.get("X-Postal-Tag") == (sent.tags[0] if sent.tags else None)
    sent.metadata = json.loads(sent.headers.get("X-Postroom-Metadata", "{}"))
    return sent


CASE = ProviderCase(
    kind="postal",
    settings={"api_key": KEY},
    bad_settings={"api_key": "wrong"},
    send=("POST", "/api/v1/send/raw"),
    authorised=lambda rec: rec.headers.get("x-server-api-key") == KEY,
    read=read,
    success=ok({"message_id": MESSAGE_ID, "messages": {
        "bob@example.org": {"id": 101, "token": "aBcDeF12"},
        "carol@example.org": {"id": 102, "token": "gHiJkL34"},
        "audit@example.net": {"id": 103, "token": "mNoPqR56"}}}),
    provider_id=MESSAGE_ID,
    # Postal echoes the refused key (data.token): the transcript must not.
    bad_key=error("InvalidServerAPIKey", "The API token provided in X-Server-API-Key was not "
                  "valid.", token="wrong"),
    rate_limited=Answer(429, "<html><body><h1>429 Too Many Requests</h1></body></html>",
                        {"Retry-After": "30"}),
    unavailable=Answer(503, "<html><body><h1>503 Service Unavailable</h1></body></html>",
                       {"Retry-After": "120"}),
    errors=[
        ErrorCase(error("UnauthenticatedFromAddress", "The From address is not authorised to "
                        "send mail from this server"), SenderRejected, False,
                  "postal.from_unauthenticated"),
        ErrorCase(error("ServerSuspended", "The mail server has been suspended"),
                  DeliveryError, False, "postal.server_suspended"),
        ErrorCase(Answer(200, {"status": "parameter-error", "time": 0.0, "flags": {},
                               "data": {"message": "`rcpt_to` parameter is required but is "
                                                   "missing"}}),
                  DataRejected, True, "postal.invalid_request"),
        ErrorCase(error("AccessDenied", "Must be authenticated as a server."), AuthError,
                  False, "auth.api_key_refused"),
        ErrorCase(Answer(413, "<html><body><h1>413 Request Entity Too Large</h1></body>"
                         "</html>"), DataRejected, True, "data.too_big",
                  advice="message.too_big"),
    ],
    check=("POST", "/api/v1/messages/message"),
    check_ok=error("MessageNotFound", "No message found matching provided ID", id="0"),
    unmappable=None,
)


# -- Webhooks: Postal's {event, timestamp, payload, uuid}, signed with the server's RSA key --
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_key(key: rsa.RSAPrivateKey) -> str:
    """The public key as Postal's web interface shows it: base64 of the DER."""
    return base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


def signatures(key: rsa.RSAPrivateKey, body: bytes, *, sha1_only: bool = False
               ) -> dict[str, str]:
    """Postal 3's headers (SHA256 and SHA1); an older Postal's (SHA1 alone)."""
    sha1 = base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA1())).decode()
    if sha1_only:
        return {"X-Postal-Signature": sha1}
    sha256 = base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()
    return {"X-Postal-Signature-256": sha256, "X-Postal-Signature": sha1,
            "X-Postal-Signature-KID": "ba26fc4b"}


MESSAGE = {"id": 101, "token": "aBcDeF12", "direction": "outgoing", "message_id": MESSAGE_ID,
           "to": "bob@example.org", "from": "shop@example.com", "subject": "Your order",
           "timestamp": 1477945177.12994, "spam_status": "NotSpam", "tag": "orders"}
SENT = {"event": "MessageSent", "timestamp": 1477945177.5, "uuid": "c8b6d2f8-5e2c-4f1b-9f0a",
        "payload": {"message": MESSAGE, "status": "Sent", "details": "Message for "
                    "bob@example.org accepted by mx.example.org", "output": "250 2.0.0 OK",
                    "sent_with_ssl": True, "timestamp": 1477945177.5, "time": 0.12}}


def _sign(body: bytes, at: float) -> tuple[bytes, dict[str, str]]:
    return body, {**signatures(SIGNING_KEY, body), "Content-Type": "application/json"}


WEBHOOK = HookCase(
    kind="postal", settings=CASE.settings, key=public_key(SIGNING_KEY),
    wrong_key=public_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    body=json.dumps(SENT).encode(), sign=_sign,
    events=[Expected(Kind.DELIVERED, MESSAGE_ID, "bob@example.org")],
    tamper=lambda body: body.replace(b"bob@example.org", b"eve@example.org"),
    timestamped=False,  # the signature covers no time: a replay is a duplicate by uuid
)
