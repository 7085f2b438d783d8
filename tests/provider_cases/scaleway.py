"""Scaleway TEM in the contract suite: shapes and bodies from Scaleway's "Transactional Email
API: send an email" (X-Auth-Token, POST /transactional-email/v1alpha1/regions/{region}/emails,
the scaleway-sdk-python CreateEmailRequest fields, {"emails": [...]} per recipient), its
error conventions ({"type", "message", "details"}) and "List domains". TEM has no inline
images (``lacks``): the suite checks that such a message is refused naming them."""

from __future__ import annotations

import base64
import json
from typing import Any

from provider_fake import Answer, ErrorCase, ProviderCase, Recorded, Sent, addresses

from postroom.exceptions import (
    AuthError,
    ConnectError,
    DataRejected,
    DeliveryError,
    SenderRejected,
)

KEY = "4ee4a4e4-3f45-4a3c-8c3a-7b7c1f4e2d11"  # a secret key is a UUID
PROJECT = "b8c2a1d0-5e6f-4a7b-9c8d-0e1f2a3b4c5d"
MESSAGE_ID = "c6c2f4a0-8a8b-4e53-9d0c-5f2f1c3b7e19@scw-tem.cloud"
FIELDS = {"from", "to", "cc", "bcc", "subject", "text", "html", "project_id", "attachments",
          "send_before", "additional_headers"}
PATH = "/transactional-email/v1alpha1/regions/nl-ams"


def error(status: int, kind: str, message: str, headers: dict[str, str] | None = None,
          **more: Any) -> Answer:
    return Answer(status, {"message": message, "type": kind, **more}, headers or {})


def email(rcpt: str, kind: str, n: int) -> dict[str, Any]:
    return {"id": f"0d5b1d0c-0000-4000-8000-00000000000{n}", "message_id": f"<{MESSAGE_ID}>",
            "project_id": PROJECT, "mail_from": "shop@example.com", "rcpt_to": rcpt,
            "mail_rcpt": rcpt, "rcpt_type": kind, "subject": "Your order 1234",
            "created_at": "2026-12-07T08:00:00Z", "updated_at": "2026-12-07T08:00:00Z",
            "status": "sending", "status_details": None, "try_count": 0, "last_tries": [],
            "flags": []}


def read(rec: Recorded) -> Sent:
    assert rec.headers["content-type"] == "application/json"
    data: dict[str, Any] = rec.json()
    assert set(data) <= FIELDS, set(data) - FIELDS
    assert data["project_id"] == PROJECT
    for person in [data["from"], *data.get("to", []), *data.get("cc", []),
                   *data.get("bcc", [])]:
        assert set(person) <= {"email", "name"}, person
    headers = {h["key"]: h["value"] for h in data.get("additional_headers", [])}
    atts = []
    for a in data.get("attachments", []):
        assert set(a) == {"name", "type", "content"}, a  # no content id: no inline images
        atts.append((a["name"], a["type"], base64.b64decode(a["content"]), None))
    tags = headers.get("X-Postroom-Tags")
    return Sent(
        from_=data["from"]["email"].lower(),
        to=[p["email"].lower() for p in data.get("to", [])],
        cc=[p["email"].lower() for p in data.get("cc", [])],
        bcc=[p["email"].lower() for p in data.get("bcc", [])],
        reply_to=addresses(headers.get("Reply-To")), subject=data["subject"],
        text=data.get("text"), html=data.get("html"), attachments=atts, headers=headers,
        tags=[t.strip() for t in tags.split(",")] if tags else [],
        metadata=json.loads(headers.get("X-Postroom-Metadata", "{}")))


CASE = ProviderCase(
    kind="scaleway",
    settings={"api_key": KEY, "project_id": PROJECT, "region": "nl-ams"},
    bad_settings={"api_key": "wrong"},
    send=("POST", f"{PATH}/emails"),
    authorised=lambda rec: rec.headers.get("x-auth-token") == KEY,
    read=read,
    success=Answer(200, {"emails": [email("bob@example.org", "to", 1),
                                    email("carol@example.org", "cc", 2),
                                    email("audit@example.net", "bcc", 3)]}),
    provider_id=MESSAGE_ID,
    bad_key=error(401, "denied_authentication", "authentication is denied",
                  method="api_key", reason="invalid_argument"),
    rate_limited=error(429, "too_many_requests", "rate limit exceeded",
                       headers={"Retry-After": "30"}),
    unavailable=Answer(503, {"message": "service unavailable"}, {"Retry-After": "120"}),
    errors=[
        ErrorCase(error(400, "invalid_arguments", "invalid argument(s)", details=[
            {"argument_name": "subject", "reason": "constraint", "help_message":
             "length must be between 6 and 998"}]), DataRejected, True,
            "scaleway.invalid_request"),
        ErrorCase(error(403, "quotas_exceeded", "quota(s) exceeded for this resource",
                        details=[{"resource": "tem_emails", "quota": 300, "current": 300}]),
                  ConnectError, False, "scaleway.quota_exceeded"),
        ErrorCase(error(412, "precondition_failed", "resource is in an unexpected state",
                        precondition="domain_not_checked", help_message="the domain "
                        "example.com is not checked"), SenderRejected, False,
                  "scaleway.domain_unchecked"),
        ErrorCase(error(404, "not_found", "resource is not found", resource="project",
                        resource_id=PROJECT), DeliveryError, False, "scaleway.not_found"),
        ErrorCase(error(403, "permissions_denied", "insufficient permissions", details=[
            {"resource": "transactional_email_email", "action": "create"}]), AuthError,
            False, "auth.api_key_forbidden"),
        ErrorCase(error(401, "denied_authentication", "authentication is denied"), AuthError,
                  False, "auth.api_key_refused"),
    ],
    check=("GET", f"{PATH}/domains"),
    check_ok=Answer(200, {"total_count": 1, "domains": [
        {"id": "d0d0d0d0-0000-4000-8000-000000000001", "name": "example.com",
         "status": "checked", "project_id": PROJECT, "region": "nl-ams"}]}),
    unmappable=(b"From: shop@example.com\r\nTo: bob@example.org\r\nSubject: signed message\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; "
                b"protocol=\"application/pgp-signature\"; boundary=\"b\"\r\n\r\n--b\r\n"
                b"Content-Type: text/plain\r\n\r\nhello there\r\n--b\r\nContent-Type: "
                b"application/pgp-signature\r\n\r\nsig\r\n--b--\r\n", "multipart/signed"),
    lacks=frozenset({"inline"}),
)
