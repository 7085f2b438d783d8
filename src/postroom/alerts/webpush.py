"""Web Push to the web admin's browsers: ``webpush://admins`` (every browser subscribed by
an account with the admin role), ``webpush://all`` (viewers' too) or
``webpush://account/NAME`` (one account's browsers).

Each alert is a JSON object (the alert, and ``url``: the admin page to open on a click),
encrypted to each browser's keys (RFC 8291, aes128gcm, by pywebpush) and posted to its push
service with a VAPID signature (RFC 8292, postroom.alerts.vapid) and, by severity, a TTL
(how long the service keeps it for a browser that is offline) and an Urgency (RFC 8030 5.3).
The service worker the admin page registers (web/static/push-worker.js) shows it.

A push service that answers 404 or 410 has dropped that subscription: it is deleted, the
channel carries on. Any other failure is retried by the outbox; a retry skips the browsers
that already took the alert (subscriptions.delivered). The request goes to a public
address only (postroom.alerts.outbound).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from postroom.alerts import Alert, ChannelConfig, outbound, vapid
from postroom.exceptions import AlertError, PostroomError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from sqlalchemy import Engine

    from postroom.alerts.subscriptions import Subscription
    from postroom.secrets import SecretStore

GONE = (404, 410)
# severity -> (TTL seconds, Urgency): an error still matters tomorrow morning, and may wake
# a phone; a warning keeps half a day; the rest an hour, delivered when convenient.
DELIVERY = {"error": (86400, "high"), "warning": (43200, "normal"), "info": (3600, "low")}
# Push services take 4096 bytes of encrypted payload (RFC 8291 4: 4096 octets, less the
# 86-octet header, tag and padding): the text is cut to keep the JSON well under.
MAX_TEXT = 2000
ADMIN = "/admin"


@dataclass(frozen=True, slots=True)
class Target:
    """Whose browsers a webpush:// URL names (subscriptions.targets' audience)."""

    audience: str

    @classmethod
    def of(cls, url: str) -> Target:
        rest = url.partition("://")[2].strip("/")
        if rest in ("admins", "all"):
            return cls(rest)
        kind, _, name = rest.partition("/")
        if kind == "account" and name and "/" not in name:
            return cls(f"account:{name.lower()}")
        raise AlertError(f"webpush://{rest} names no browsers: write webpush://admins, "
                         "webpush://all or webpush://account/NAME", code="alert.webpush",
                         permanent=True)


def page(alert: Alert) -> str:
    """The admin page an alert's notification opens."""
    from postroom.events import Kind

    if alert.connection:
        return f"{ADMIN}/connections/{quote(alert.connection, safe='')}"
    if alert.kind in {k.value for k in Kind}:
        return f"{ADMIN}/events?kind={quote(alert.kind)}"
    return f"{ADMIN}/events"


def payload(alert: Alert) -> bytes:
    body: dict[str, Any] = alert.as_dict()
    if len(alert.text) > MAX_TEXT:
        body["text"] = alert.text[:MAX_TEXT - 1] + "…"
    body["title"] = alert.title[:200]
    body["url"] = page(alert)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def encrypt(sub: Subscription, data: bytes) -> bytes:
    """``data`` encrypted to the browser's keys (RFC 8291 aes128gcm), by pywebpush."""
    from pywebpush import WebPusher

    pusher = WebPusher({"endpoint": sub.endpoint,
                        "keys": {"p256dh": sub.p256dh, "auth": sub.auth}})
    body: bytes = pusher.encode(data, content_encoding="aes128gcm")["body"]
    return body


class WebPushChannel:
    def __init__(self, config: ChannelConfig) -> None:
        self.url = config.url
        self.timeout = config.timeout
        self.engine: Engine | None = config.engine
        self.settings = config.settings
        self.rule = config.rule

    def _store(self) -> SecretStore:
        from postroom.runtime import key_file
        from postroom.secrets import SecretStore, load_or_create_key

        if self.engine is None or self.settings is None:
            raise AlertError("the Web Push channel needs the instance's database",
                             code="alert.webpush", permanent=True)
        return SecretStore(self.engine, load_or_create_key(key_file(self.settings)))

    def subject(self) -> str:
        given = getattr(self.rule, "webpush_subject", None)
        if given:
            return str(given)
        host = self.settings.server.hostname if self.settings is not None else "localhost"
        return f"mailto:postmaster@{host}"

    async def send(self, alert: Alert) -> None:
        # here, not with the module: the configuration imports Target, and must stay light
        from postroom.alerts import subscriptions

        target = Target.of(self.url)
        store = self._store()
        engine = store.engine
        subs = await asyncio.to_thread(subscriptions.targets, engine, store.vault,
                                       target.audience)
        if not subs:
            raise AlertError(f"no browser is subscribed for {self.url}: open the web admin's "
                             "account page and choose \"Send alerts to this browser\"",
                             code="alert.webpush")
        todo = [s for s in subs if alert.key not in s.sent_keys]
        if not todo:
            return  # a retry: every browser took it the first time
        key = await asyncio.to_thread(vapid.private_key, store)
        data = payload(alert)
        results = await asyncio.gather(*(self._push(s, key, data, alert) for s in todo))
        now = time.time()
        failed: list[str] = []
        for sub, outcome in zip(todo, results, strict=True):
            if outcome is None:
                await asyncio.to_thread(subscriptions.delivered, engine, sub, alert.key, now)
            elif outcome == "gone":
                await asyncio.to_thread(subscriptions.gone, engine, sub.id)
            else:
                failed.append(f"{sub.service} ({sub.account}): {outcome}")
        if failed:
            raise AlertError("Web Push failed for " + "; ".join(failed), code="alert.webpush")
        if all(o == "gone" for o in results):
            raise AlertError(f"every browser subscribed for {self.url} has unsubscribed: "
                             "subscribe one again in the web admin", code="alert.webpush")

    async def _push(self, sub: Subscription, key: EllipticCurvePrivateKey,
                    data: bytes, alert: Alert) -> str | None:
        """None when the push service took it, "gone", or why it failed."""
        ttl, urgency = DELIVERY.get(alert.severity, DELIVERY["info"])
        allowed = outbound.networks(getattr(self.rule, "webpush_networks", None) or [])
        try:
            headers = {"Authorization": vapid.authorization(key, sub.endpoint, self.subject(),
                                                            time.time()),
                       "Content-Encoding": "aes128gcm",
                       "Content-Type": "application/octet-stream",
                       "TTL": str(ttl), "Urgency": urgency,
                       "User-Agent": "Postroom-alerts"}
            body = await asyncio.to_thread(encrypt, sub, data)
            answer = await outbound.post(sub.endpoint, body, headers, timeout=self.timeout,
                                         allowed=allowed)
        except PostroomError as err:
            return err.message
        if answer.status in GONE:
            return "gone"
        if 200 <= answer.status < 300:
            return None
        host = urlsplit(sub.endpoint).hostname
        return f"{host} answered {answer.status} {answer.text[:200]}".strip()
