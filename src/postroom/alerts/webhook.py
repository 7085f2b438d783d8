"""The generic webhook: ``webhook+https://host/path`` receives each alert as a JSON POST.

Signed when its rule has a ``webhook_secret`` (env/file/stored, postroom.secrets): the header
``X-Postroom-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, the scheme
Stripe documents for its webhooks (https://docs.stripe.com/webhooks#verify-manually): the
timestamp inside the signed text lets a receiver refuse replays of old requests. A receiver
checks it with :func:`verify`. Not retried here: the outbox retries (a 404 or 410 is
permanent: the endpoint is gone, the channel is disabled). The dispatcher keeps the channel
between alerts, so its client keeps its connection alive for the next one
(:meth:`WebhookChannel.aclose` closes it): the send path's lean HTTP/1.1 client
(postroom/httpwire.py), far cheaper for a worker's first alert than importing httpx and
building its client (docs/benchmarks.md, alerts); httpx where the environment sets a proxy
for the URL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from postroom.alerts import Alert, ChannelConfig
from postroom.exceptions import AlertError

if TYPE_CHECKING:
    import httpx

    from postroom.httpwire import WirePool

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
        parts = urlsplit(self.url)
        self.host = parts.hostname or ""
        # A proxy set in the environment for this URL (HTTPS_PROXY, NO_PROXY...): httpx,
        # which speaks CONNECT and SOCKS; else the lean keep-alive client of the send path.
        proxies = getproxies()
        self.proxied = bool(proxies.get(parts.scheme) or proxies.get("all")) and not (
            proxy_bypass(self.host))
        self._client: httpx.AsyncClient | None = None  # made at the first alert
        self._wire: WirePool | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._wire is not None:
            await self._wire.aclose()
            self._wire = None

    async def send(self, alert: Alert) -> None:
        body = json.dumps(alert.as_dict(), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "Postroom-alerts"}
        if self.secret:
            headers[HEADER] = sign(self.secret, body, int(time.time()))
        status = await (self._by_proxy(body, headers) if self.proxied
                        else self._direct(body, headers))
        if status in GONE:
            raise AlertError(f"webhook {self.host} answered {status}: the endpoint is gone; "
                             "fix the URL in [[alerts]] channels", code="alert.webhook",
                             permanent=True)
        if not 200 <= status < 300:
            raise AlertError(f"webhook {self.host} answered {status}", code="alert.webhook")

    async def _direct(self, body: bytes, headers: dict[str, str]) -> int:
        # (imported at the first alert: postroom/httpwire.py, httptools; TLS context only for
        # https)
        import ssl

        from postroom.exceptions import DeliveryError
        from postroom.httpwire import WirePool

        if self._wire is None:
            tls = (ssl.create_default_context() if self.url.startswith("https:")
                   else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # never used for http://
            where = urlsplit(self.url)  # named without its path: a token may be in it
            self._wire = WirePool(title=f"webhook {self.host}",
                                  base=f"{where.scheme}://{where.netloc.rpartition('@')[2]}",
                                  ssl_context=tls, size=4, connect_timeout=self.timeout,
                                  timeout=self.timeout, user_agent="Postroom-alerts")
        try:
            return (await self._wire.request("POST", self.url, headers, body)).status
        except DeliveryError as err:
            raise AlertError(err.message, code="alert.webhook") from err

    async def _by_proxy(self, body: bytes, headers: dict[str, str]) -> int:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        try:
            resp = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as err:
            raise AlertError(f"webhook {self.host}: {type(err).__name__}: {err}",
                             code="alert.webhook") from err
        return resp.status_code
