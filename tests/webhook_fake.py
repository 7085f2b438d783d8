"""A provider that exists only for tests and benchmarks: ``hooktest``, a transport that
sends nothing and a webhook signed like Svix / Stripe (``X-Hook-Signature: t=<epoch>,
v1=<hex HMAC-SHA256 of "<t>.<body>">``), its body a JSON list of events::

    [{"id": "evt-1", "type": "bounce", "message": "<provider id>", "recipient": "a@b",
      "time": 1800000000.0, "reason": "5.1.1 unknown", "hard": true}]

Registered by ``transports.REGISTRY[KIND] = REGISTRY_ENTRY`` (a test's monkeypatch, or a
benchmark's own `postroom serve` process). The real providers' webhooks come with their
modules (transports/<provider>.py), their payloads from the providers' documentation.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from pathlib import Path
from typing import ClassVar

from postroom.connection_settings import ConnectionBase
from postroom.envelope import Envelope
from postroom.exceptions import EventError
from postroom.transports.base import DeliveryResult, Transport
from postroom.webhooks import DeliveryEvent, Kind, WebhookRequest, verify
from postroom.webhooks.base import Webhook, WebhookConfig

KIND = "hooktest"
REGISTRY_ENTRY = "webhook_fake:HookTransport"
BLOCKING_KIND, BLOCKING_ENTRY = "hooktest_io", "webhook_fake:BlockingHookTransport"
KEY = "whsec-test-key-0123456789"
_KINDS = {"delivered": Kind.DELIVERED, "bounce": Kind.BOUNCED, "spam": Kind.COMPLAINED}


class HookSettings(ConnectionBase):
    # The keys every provider's settings have (transports' ApiKeySettings), for the door.
    webhook_key: str | None = None
    webhook_key_env: str | None = None
    webhook_key_file: Path | None = None


class HookWebhook(Webhook):
    docs_url = "https://example.invalid/webhooks"

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        key = verify.need_key(settings.key, KIND)
        parts = dict(p.split("=", 1) for p in verify.header(req, "X-Hook-Signature")
                     .split(",") if "=" in p)
        at = parts.get("t", "")
        verify.check_timestamp(at, tolerance=settings.tolerance)
        verify.check_hmac(parts.get("v1", ""), key.encode(), at.encode() + b"." + req.body)

    def parse(self, req: WebhookRequest, settings: WebhookConfig) -> list[DeliveryEvent]:
        data = self.json(req)
        if not isinstance(data, list):
            raise EventError("expected a list of events")
        return [DeliveryEvent(
            kind=_KINDS.get(str(e.get("type")), Kind.UNKNOWN), provider_id=e.get("message"),
            recipient=e.get("recipient"), at=float(e.get("time", 0)),
            detail=str(e.get("reason", "")), raw=e, event_id=e.get("id"),
            message_id_header=e.get("message_id_header"), permanent=e.get("hard"))
            for e in data]


class BlockingHookWebhook(HookWebhook):
    """The same, declared ``blocking`` (as SNS's, which fetches its certificate): refuses
    unless the door runs it off the event loop's thread (the main one, in the tests)."""

    blocking = True

    def verify(self, req: WebhookRequest, settings: WebhookConfig) -> None:
        if threading.current_thread() is threading.main_thread():
            raise verify.Refused("a blocking verify ran on the event loop")
        super().verify(req, settings)


class HookTransport(Transport):
    settings_model = HookSettings
    title = "Hook test"
    webhook: ClassVar[type[Webhook] | None] = HookWebhook

    async def send(self, envelope: Envelope) -> DeliveryResult:
        raise NotImplementedError("not a sending transport: webhooks only")


class BlockingHookTransport(HookTransport):
    webhook = BlockingHookWebhook


def signed(body: bytes, *, at: float | None = None, key: str = KEY) -> dict[str, str]:
    """The headers of a request carrying ``body``, signed at ``at`` (default: now)."""
    t = str(int(time.time() if at is None else at))
    sig = hmac.new(key.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Hook-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}
