"""The generic webhook: ``webhook+https://host/path`` receives each alert as a JSON POST.

Signed when its rule has a ``webhook_secret`` (env/file/stored, postroom.secrets): the header
``X-Postroom-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, the scheme
Stripe documents for its webhooks (https://docs.stripe.com/webhooks#verify-manually): the
timestamp inside the signed text lets a receiver refuse replays of old requests. A receiver
checks it with :func:`verify`. Not retried here: the outbox retries (a 404 or 410 is
permanent: the endpoint is gone, the channel is disabled).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from postroom.alerts import Alert, ChannelConfig
from postroom.exceptions import AlertError

HEADER = "X-Postroom-Signature"
GONE = (404, 410)


def sign(secret: str, body: bytes, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, now: float, tolerance: float = 300) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, t), f"t={t},v1={parts.get('v1', '')}")


class WebhookChannel:
    def __init__(self, config: ChannelConfig) -> None:
        self.url = config.url.split("+", 1)[1]  # webhook+https://... -> https://...
        self.secret = config.secret
        self.timeout = config.timeout

    async def send(self, alert: Alert) -> None:
        import httpx

        body = json.dumps(alert.as_dict(), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "Postroom-alerts"}
        if self.secret:
            headers[HEADER] = sign(self.secret, body, int(time.time()))
        host = httpx.URL(self.url).host
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                resp = await client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as err:
            raise AlertError(f"webhook {host}: {type(err).__name__}: {err}",
                             code="alert.webhook") from err
        if resp.status_code in GONE:
            raise AlertError(f"webhook {host} answered {resp.status_code}: the endpoint is "
                             "gone; fix the URL in [[alerts]] channels", code="alert.webhook",
                             permanent=True)
        if not 200 <= resp.status_code < 300:
            raise AlertError(f"webhook {host} answered {resp.status_code}",
                             code="alert.webhook")
