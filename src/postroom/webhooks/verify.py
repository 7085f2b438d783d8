"""Signature checks every provider's webhook shares (postroom.webhooks.base.Webhook.verify).

Each raises ``webhooks.Refused`` and says nothing the client could learn from: the door
answers a bare 401 whatever failed; the reason goes to the log (at info: anyone on the
internet can cause it).

Replays: a signed request carries a timestamp inside its signed data (Mailgun, SendGrid,
Resend / Svix, SNS); :func:`check_timestamp` refuses one outside a window around now, and a
copy sent again inside the window is a duplicate by its event key (the unique
``delivery_events`` (connection, event_key): postroom.webhooks.intake), answered 200 and
not recorded twice. Providers that only offer basic auth (Postmark, Mailjet, SparkPost) get
the event key alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import time

from postroom.webhooks import Refused, WebhookRequest

DEFAULT_TOLERANCE = 300.0  # seconds, either way: Svix and Stripe use 5 minutes too


def need_key(key: str | None, provider: str) -> str:
    """The connection's webhook key, or Refused when none is configured: an unsigned
    request is never accepted for want of a key to check it with."""
    if not key:
        raise Refused(f"{provider} webhook: the connection has no webhook key; set "
                      "webhook_key_env or webhook_key_file (or store it with `postroom "
                      "connection set-password`)", code="event.no_key")
    return key


def header(req: WebhookRequest, name: str) -> str:
    """A header the signature needs; Refused when it is missing or empty."""
    value = req.headers.get(name.lower(), "").strip()
    if not value:
        raise Refused(f"the {name} header is missing", code="event.unsigned")
    return value


def mac(key: bytes, data: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, data, getattr(hashlib, algorithm)).digest()


def check_hmac(signature: str, key: bytes, data: bytes, *, algorithm: str = "sha256",
               encoding: str = "hex") -> None:
    """``signature`` (``hex`` or ``base64``) must be HMAC-``algorithm`` of ``data`` under
    ``key``; compared in constant time (hmac.compare_digest)."""
    try:
        given = (bytes.fromhex(signature) if encoding == "hex"
                 else base64.b64decode(signature, validate=True))
    except (ValueError, binascii.Error):
        given = b""
    if not hmac.compare_digest(given, mac(key, data, algorithm)):
        raise Refused("the webhook signature does not match", code="event.bad_signature")


def check_body_hmac(req: WebhookRequest, key: str | None, provider: str, name: str) -> None:
    """Header ``name`` must be the hex HMAC-SHA256 of the whole body under the connection's
    webhook key (MailerSend's ``Signature``, Mailtrap's ``Mailtrap-Signature``)."""
    secret = need_key(key, provider)
    check_hmac(header(req, name), secret.encode(), req.body)


def check_timestamp(value: str | float, *, tolerance: float = DEFAULT_TOLERANCE,
                    now: float | None = None, millis: bool = False) -> float:
    """The signed timestamp as epoch seconds, refused when it is not a number or is more
    than ``tolerance`` seconds away from ``now``: an old request replayed."""
    try:
        at = float(value) / (1000.0 if millis else 1.0)
    except (TypeError, ValueError):
        at = math.nan
    current = time.time() if now is None else now
    if not math.isfinite(at) or abs(current - at) > tolerance:
        raise Refused("the webhook's signed timestamp is missing or outside the "
                      f"{tolerance:g} s window (a replay, or a clock far off)",
                      code="event.stale")
    return at


def check_basic(req: WebhookRequest, expected: str) -> None:
    """HTTP basic auth (RFC 7617) with ``expected`` ("user:password", the connection's
    webhook key), compared in constant time."""
    scheme, _, token = req.headers.get("authorization", "").partition(" ")
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (ValueError, binascii.Error):
        given = b""
    # compare_digest on both operands' digests: equal lengths, no early exit on length.
    ok = scheme.lower() == "basic" and hmac.compare_digest(
        hashlib.sha256(given).digest(), hashlib.sha256(expected.encode()).digest())
    if not ok:
        raise Refused("the webhook's basic auth credentials do not match",
                      code="event.bad_signature")


def check_bearer(req: WebhookRequest, token: str) -> None:
    """``Authorization: Bearer TOKEN`` (RFC 6750) with ``token`` (the connection's webhook
    key), compared in constant time: the header some providers (Brevo, SMTP2GO) put on
    their webhook requests instead of a signature."""
    scheme, _, given = req.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        hashlib.sha256(given.strip().encode()).digest(), hashlib.sha256(token.encode()).digest())
    if not ok:
        raise Refused("the webhook's bearer token does not match", code="event.bad_signature")


def check_authorization(req: WebhookRequest, key: str, scheme: str) -> None:
    """The Authorization header a provider was told to send: ``scheme`` "basic" (``key`` is
    ``user:password``) or "bearer" (``key`` is the token)."""
    if scheme == "bearer":
        check_bearer(req, key)
    else:
        check_basic(req, key)
