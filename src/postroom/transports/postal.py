"""Postal (self-hosted, https://docs.postalserver.io): ``POST /api/v1/send/raw`` with the
stored MIME (Postal's legacy HTTP API: app/controllers/legacy_api/send_controller.rb and
base_controller.rb in postalserver/postal; "Webhooks" in its documentation).

- Auth: ``X-Server-API-Key: <an API credential of the mail server>``.
- Address: the Postal installation's own URL, ``api_base`` (there is no default).
- Request: JSON ``{"mail_from": <envelope sender>, "rcpt_to": [envelope recipients],
  "data": <base64 MIME>, "bounce": false}``: Postal delivers to ``rcpt_to`` alone, as SMTP.
  Postal keeps one tag per message, read from the ``X-Postal-Tag`` header; Postroom adds it
  for the first tag, and carries every tag and the metadata in ``X-Postroom-Tags`` and
  ``X-Postroom-Metadata`` headers (Postal stores them with the message; its webhooks and
  message API show them).
- Answers: always HTTP 200 (behind a proxy, its own statuses come first), ``{"status":
  "success" | "error" | "parameter-error", "data": {...}}``; an error's ``data.code`` is
  one of the table below. Success: ``data.message_id`` (the Message-ID Postal keeps and
  its webhooks name) and ``data.messages`` ``{rcpt: {"id", "token"}}``.
- Events: Postal signs each webhook request's body with its private key, RSA PKCS#1 v1.5:
  ``X-Postal-Signature-256`` (SHA256, Postal 3) and ``X-Postal-Signature`` (SHA1). The
  connection's webhook key is the server's public key as Postal shows it (base64 DER, or
  PEM). The body has no signed time of its own, so a replay is caught by the event's
  ``uuid`` (the intake's duplicate check), not by a window.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import httpx
from pydantic import model_validator

from postroom.envelope import Envelope
from postroom.exceptions import DeliveryError, Scope, SenderRejected
from postroom.transports import _auth, _headers, _http, base
from postroom.webhooks import BadEvent, DeliveryEvent, Kind, Refused, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig

_Rule = _http.ErrorRule
# base_controller.rb and send_controller.rb render_error codes (all with HTTP 200).
ERRORS: Mapping[str | int, _http.ErrorRule] = {
    "AccessDenied": _Rule("auth.api_key_refused", auth="refused"),
    "InvalidServerAPIKey": _Rule("auth.api_key_refused", auth="refused"),
    "ServerSuspended": _Rule("postal.server_suspended", "the Postal mail server is suspended. "
                             "Fix: an admin of the Postal installation unsuspends it",
                             kind=DeliveryError, permanent=False, scope=Scope.CONFIGURATION),
    "UnauthenticatedFromAddress": _Rule(
        "postal.from_unauthenticated", "the From address's domain is not a verified domain of "
        "this Postal mail server. Fix: add and verify the domain (its DNS records) in Postal",
        kind=SenderRejected, permanent=False, scope=Scope.CONFIGURATION),
    "parameter-error": _Rule("postal.invalid_request", "Postal refused Postroom's request: "
                             "please report it"),
}


class PostalSettings(_http.ApiKeySettings):
    transport: Literal["postal"] = "postal"

    @model_validator(mode="after")
    def _needs_base(self) -> PostalSettings:
        if not self.api_base:
            raise ValueError("api_base is required for Postal: the URL of your Postal "
                             "installation (https://postal.example.com)")
        return self


# -- delivery events -------------------------------------------------------------------------
# Postal's webhook events ("Webhooks: events") -> (our kind, permanent for bounces).
_KINDS: dict[str, tuple[Kind, bool | None]] = {
    "MessageSent": (Kind.DELIVERED, None),
    "MessageDelayed": (Kind.DEFERRED, None),
    "MessageHeld": (Kind.DEFERRED, None),  # held by Postal (limits, spam); may be released
    "MessageDeliveryFailed": (Kind.BOUNCED, True),  # a permanent SMTP refusal (HardFail)
    "MessageBounced": (Kind.BOUNCED, None),  # a bounce message came back: hard or not unsaid
    "MessageLoaded": (Kind.OPENED, None),
    "MessageLinkClicked": (Kind.CLICKED, None),
}


def public_key(text: str) -> Any:
    """The server's public key from the webhook key setting: PEM, or base64 DER (as
    Postal's web interface shows it)."""
    from cryptography.hazmat.primitives.serialization import (
        load_der_public_key,
        load_pem_public_key,
    )

    try:
        if "BEGIN" in text:
            return load_pem_public_key(text.encode())
        return load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, binascii.Error, TypeError) as err:
        raise Refused("the connection's webhook key is not Postal's public key (base64 DER "
                      "or PEM)", code="event.no_key") from err


class PostalWebhook(Webhook):
    docs_url = "https://docs.postalserver.io/developer/webhooks"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        key = public_key(verify.need_key(settings.key, "Postal"))
        if not isinstance(key, rsa.RSAPublicKey):
            raise Refused("Postal's webhook key is an RSA key", code="event.no_key")
        # Postal 3 sends both; SHA1 alone comes from older installations.
        digest: hashes.HashAlgorithm
        if req.headers.get("x-postal-signature-256"):
            given, digest = req.headers["x-postal-signature-256"], hashes.SHA256()
        else:
            given, digest = verify.header(req, "X-Postal-Signature"), hashes.SHA1()
        try:
            signature = base64.b64decode(given.strip(), validate=True)
            key.verify(signature, req.body, padding.PKCS1v15(), digest)
        except (ValueError, binascii.Error, InvalidSignature) as err:
            raise Refused("the Postal signature does not match",
                          code="event.bad_signature") from err

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        if not isinstance(data, dict) or not isinstance(data.get("payload"), dict):
            raise BadEvent("a Postal webhook body is {event, timestamp, payload, uuid}")
        return [postal_event(data)]


def postal_event(data: dict[str, Any]) -> DeliveryEvent:
    payload: dict[str, Any] = data["payload"]
    kind, permanent = _KINDS.get(str(data.get("event", "")), (Kind.UNKNOWN, None))
    message = payload.get("message") or payload.get("original_message")
    message = message if isinstance(message, dict) else {}
    bounce = payload.get("bounce")
    detail = str(payload.get("details") or payload.get("output") or payload.get("url") or
                 (bounce.get("subject") if isinstance(bounce, dict) else "") or
                 data.get("event", ""))
    try:
        at = float(data.get("timestamp") or payload.get("timestamp") or 0)
    except (TypeError, ValueError):
        at = 0.0
    msg_id = str(message.get("message_id") or "") or None
    return DeliveryEvent(kind=kind, provider_id=msg_id,
                         recipient=str(message["to"]) if message.get("to") else None,
                         at=at, detail=detail[:1000], raw=data,
                         event_id=str(data.get("uuid") or "") or None,
                         message_id_header=f"<{msg_id.strip('<>')}>" if msg_id else None,
                         permanent=permanent)


class PostalTransport(_http.HttpTransport):
    settings: PostalSettings
    settings_model = PostalSettings
    title = "Postal"
    docs_url = "https://docs.postalserver.io/developer/api"
    # The README's sample entry (postroom.diagnostics.api_providers).
    example: ClassVar[Mapping[str, Any]] = {
        "api_base": "https://postal.example.com",
        "api_key_env": "POSTAL_SERVER_API_KEY",
        "webhook_key_file": "/etc/postroom/postal-signing.pub",
    }
    example_notes: ClassVar[Mapping[str, str]] = {
        "api_key_env": "a mail server's API credential",
        "webhook_key_file": "the server's public key (Webhooks page)",
    }
    errors: ClassVar[Mapping[str | int, _http.ErrorRule]] = ERRORS
    webhook = PostalWebhook

    def make_auth(self) -> _auth.Auth:
        return _auth.ApiKeyHeader("X-Server-API-Key", self.api_key)

    def build(self, env: Envelope) -> _http.Request:
        fields = _headers.tag_fields(env, self.title)
        if env.tags:  # Postal's own tag, one per message: the first
            fields.insert(0, ("X-Postal-Tag", env.tags[0]))
        raw = b"".join(f"{k}: {v}\r\n".encode("ascii") for k, v in fields) + env.raw
        data = {"mail_from": env.sender, "rcpt_to": list(env.recipients),
                "data": base64.b64encode(raw).decode("ascii"), "bounce": False}
        body = json.dumps(data).encode()
        return _http.Request("POST", f"{self.base}/api/v1/send/raw",
                             {"Content-Type": "application/json"}, body,
                             f"raw MIME, {len(raw)} bytes base64 in JSON")

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        # Postal answers 200 to everything: its "status" says whether it sent.
        ex = _http.Exchange()
        try:
            resp = await self.request(ex, self.build(envelope))
        finally:
            self.redact(ex)
        if resp.is_success and _http.json_body(resp).get("status") == "success":
            return self.delivered(envelope, resp, ex)
        raise self.failure(resp, ex)

    def redact(self, ex: _http.Exchange) -> None:
        """Postal echoes a refused key in its answer (``data.token``): never in a transcript."""
        key = ex.held.credential
        if key:
            ex.lines[:] = [line.replace(key, "****") for line in ex.lines]

    def parse_success(self, resp: httpx.Response) -> tuple[str | None, _http.Recipients | None]:
        data = _http.json_body(resp).get("data")
        msg_id = data.get("message_id") if isinstance(data, dict) else None
        return (str(msg_id) if msg_id else None), None

    def parse_error(self, resp: httpx.Response) -> _http.ApiError:
        body = _http.json_body(resp)
        found = body.get("data")
        data: dict[str, Any] = found if isinstance(found, dict) else {}
        code = str(data.get("code") or "")
        if body.get("status") == "parameter-error":
            code = "parameter-error"
        message = str(data.get("message") or resp.reason_phrase or body.get("status") or "")
        return _http.ApiError(resp.status_code, code, message)

    async def check(self) -> str:
        """Postal has no "who am I": ``POST /api/v1/messages/message`` for message id 0 asks
        about a message that cannot exist, so a valid key gets ``MessageNotFound`` and a
        wrong one ``InvalidServerAPIKey``, and nothing is sent."""
        ex = _http.Exchange()
        try:
            resp = await self.request(ex, _http.Request(
                "POST", f"{self.base}/api/v1/messages/message",
                {"Content-Type": "application/json"}, b'{"id": 0}', "message 0 (none)"))
        finally:
            self.redact(ex)
        data = _http.json_body(resp).get("data")
        code = str(data.get("code") or "") if isinstance(data, dict) else ""
        if not resp.is_success or code != "MessageNotFound":
            raise self.failure(resp, ex)
        ex.lines.append(f"*  {self.title}: the server API key works")
        return ex.transcript
