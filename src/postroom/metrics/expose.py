"""The /metrics answer: a :class:`~postroom.metrics.collect.Snapshot` written in the
Prometheus text exposition format (version 0.0.4, which every Prometheus server reads:
https://prometheus.io/docs/instrumenting/exposition_formats/) by prometheus_client's
``generate_latest`` over a registry holding one custom collector, cached a few seconds; and
``[metrics] listen``, the address that serves it without a token.

Imported on the first scrape only (prometheus_client too): an idle `postroom serve` carries
neither (tests/test_memory_imports.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from postroom.ingress.guard import Networks
from postroom.metrics import PATH
from postroom.metrics.collect import BUCKETS, STATES, Collector, Snapshot
from postroom.queue.sql import Queue
from postroom.settings import Settings

log = logging.getLogger(__name__)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4.encode()
MAX_HEAD = 8 * 1024  # a scrape's request line and headers are a few hundred bytes
HEAD_TIMEOUT = 10.0  # seconds for them to arrive


def families(snap: Snapshot) -> list[Metric]:
    """The metric families of one snapshot."""
    msgs = GaugeMetricFamily(
        "postroom_messages", "Messages in the email log by status, connection that last "
        "tried them ('' for none yet) and app ('' for none)",
        labels=["status", "connection", "app"])
    for (status, conn, app), n in sorted(snap.messages.items()):
        msgs.add_metric([status, conn, app], n)
    queue = GaugeMetricFamily("postroom_queue_messages",
                              "Messages waiting or being sent, by status", labels=["status"])
    for status, n in sorted(snap.queue.items()):
        queue.add_metric([status], n)
    hist = HistogramMetricFamily(
        "postroom_attempt_duration_seconds", "Delivery attempts' duration, by connection "
        "and outcome (sent, partial, deferred, failed)", labels=["connection", "outcome"])
    for (conn, outcome), h in sorted(snap.durations.items()):
        bounds = [f"{b:g}" for b in BUCKETS] + ["+Inf"]
        hist.add_metric([conn, outcome], list(zip(bounds, h.counts, strict=True)), h.total)
    state = GaugeMetricFamily(
        "postroom_connection_state", "1 for the connection's breaker state (up, degraded, "
        "down, held at the provider's request), 0 for the others",
        labels=["connection", "state"])
    paused = GaugeMetricFamily("postroom_connection_paused", "1 when the connection is paused",
                               labels=["connection"])
    failures = GaugeMetricFamily("postroom_connection_failures",
                                 "Consecutive connection-level failures", labels=["connection"])
    for b in snap.breakers:
        for s in STATES:
            state.add_metric([b.connection, s], 1.0 if b.state == s else 0.0)
        paused.add_metric([b.connection], 1.0 if b.paused else 0.0)
        failures.add_metric([b.connection], b.failures)
    access = GaugeMetricFamily(
        "postroom_oauth_access_token_expiry_timestamp_seconds",
        "When the connection's OAuth access token expires (Unix time)", labels=["connection"])
    refresh = GaugeMetricFamily(
        "postroom_oauth_refresh_token_expiry_timestamp_seconds",
        "When the provider said the connection's OAuth refresh token expires (Unix time; "
        "absent when it did not say)", labels=["connection"])
    dead = GaugeMetricFamily("postroom_oauth_grant_dead",
                             "1 when the connection's OAuth grant no longer works (sign in "
                             "again: postroom oauth login)", labels=["connection"])
    for g in snap.grants:
        if g.access_expires is not None:
            access.add_metric([g.connection], g.access_expires)
        if g.refresh_expires is not None:
            refresh.add_metric([g.connection], g.refresh_expires)
        dead.add_metric([g.connection], 1.0 if g.dead else 0.0)
    evts = CounterMetricFamily("postroom_events", "Events recorded (postroom events), by kind",
                               labels=["kind"])
    for kind, n in sorted(snap.events.items()):
        evts.add_metric([kind], n)
    return [
        msgs, queue,
        GaugeMetricFamily("postroom_queue_oldest_age_seconds",
                          "Age of the oldest message still waiting or being sent (0: none)",
                          value=snap.oldest_age),
        GaugeMetricFamily("postroom_queue_oldest_due_seconds",
                          "How long the longest-overdue message has been due without being "
                          "sent (0: none overdue)", value=snap.oldest_due),
        GaugeMetricFamily("postroom_queue_paused", "1 when the whole queue is paused",
                          value=1.0 if snap.queue_paused else 0.0),
        hist, state, paused, failures, access, refresh, dead, evts, *alert_families(snap),
    ]


def alert_families(snap: Snapshot) -> list[Metric]:
    """The alerts' families: sent (a counter kept in the database, so every process and
    node reports the same total), waiting and failed outbox rows, disabled channels; every
    configured channel has a sample (0 included), so an alert on "failing" sees it."""
    fig = snap.alerts
    if fig is None:
        return []
    channels = sorted(set(snap.alert_channels) | set(fig.sent) | set(fig.failed)
                      | fig.disabled | {c for c, _ in fig.waiting})
    sent = CounterMetricFamily("postroom_alerts_sent", "Alerts sent, by channel id (rule#n)",
                               labels=["channel"])
    waiting = GaugeMetricFamily(
        "postroom_alerts_waiting", "Alerts in the outbox not sent yet, by channel and whether "
        "a try failed already (retrying) or not (new)", labels=["channel", "state"])
    failed = GaugeMetricFamily(
        "postroom_alerts_failed", "Alerts that failed for good (the channel was disabled or "
        "gave up), among the outbox rows kept", labels=["channel"])
    disabled = GaugeMetricFamily(
        "postroom_alert_channel_disabled", "1 when the alert channel is disabled (postroom "
        "alerts enable CHANNEL)", labels=["channel"])
    for ch in channels:
        sent.add_metric([ch], fig.sent.get(ch, 0))
        waiting.add_metric([ch, "new"], fig.waiting.get((ch, False), 0))
        waiting.add_metric([ch, "retrying"], fig.waiting.get((ch, True), 0))
        failed.add_metric([ch], fig.failed.get(ch, 0))
        disabled.add_metric([ch], 1.0 if ch in fig.disabled else 0.0)
    return [sent, waiting, failed, disabled]


class _Fixed:
    """A prometheus_client collector that yields the families it was given."""

    def __init__(self, found: list[Metric]) -> None:
        self.found = found

    def collect(self) -> Iterator[Metric]:
        yield from self.found


def render(snap: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(snap)))
    return generate_latest(registry)


class Metrics:
    """One per server process: the collector's running totals and the cached answer."""

    def __init__(self, queue: Queue, settings: Callable[[], Settings]) -> None:
        self.settings = settings
        self.collector = Collector(queue, settings)
        self._cached: tuple[float, bytes] | None = None
        self._lock = asyncio.Lock()

    async def text(self) -> bytes:
        """The exposition; scrapes within [metrics] cache_seconds of the last share it."""
        from postroom.metrics import MetricsSettings

        ttl = self.settings().section(MetricsSettings).cache_seconds
        async with self._lock:  # concurrent scrapes wait for one reading
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= ttl:
                data = await asyncio.to_thread(lambda: render(self.collector.snapshot()))
                self._cached = (time.monotonic(), data)
            return self._cached[1]


def network_refusal(settings: Settings, ip: str) -> str | None:
    """Why a client at ``ip`` may not read /metrics, or None: it must be in
    server.admin_networks, the web admin's fence (the figures name connections and apps)."""
    networks = settings.server.admin_networks
    if ip in Networks(networks):
        return None
    return (f"{ip or 'an unknown address'} is not in server.admin_networks "
            f"({', '.join(networks) or 'empty'}), which fences /metrics like the web admin. "
            "Scrape from an address in it, or add the Prometheus server's address to "
            "server.admin_networks and restart Postroom")


async def _answer(writer: asyncio.StreamWriter, status: str, ctype: bytes, body: bytes,
                  head: bool = False) -> None:
    writer.write(b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype +
                 b"\r\ncontent-length: " + str(len(body)).encode() +
                 b"\r\ncache-control: no-store\r\nconnection: close\r\n\r\n" +
                 (b"" if head else body))
    with contextlib.suppress(OSError):
        await writer.drain()


class Listener:
    """``[metrics] listen``: GET /metrics without a token, one request per connection
    (Prometheus opens its own), to clients in server.admin_networks only."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        from postroom.exceptions import ConfigError

        try:
            self.server = await asyncio.start_server(self._serve, host, port,
                                                     limit=MAX_HEAD)
        except OSError as err:
            raise ConfigError(
                f"cannot listen for /metrics on {host}:{port}: {err.strerror or err}; pick "
                "another address with [metrics] listen (\"\" serves /metrics on "
                "server.http_listen only)", code="config.listen") from err
        bound: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return bound

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        try:
            await self._request(reader, writer, ip)
        except Exception:  # one scrape's failure must not end the listener
            log.exception("/metrics on [metrics] listen failed for %s", ip)
            await _answer(writer, "500 Internal Server Error", b"text/plain; charset=utf-8",
                          b"the metrics could not be read; the server's log says why\n")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       ip: str) -> None:
        text = b"text/plain; charset=utf-8"
        refused = network_refusal(self.metrics.settings(), ip)
        if refused is not None:  # answered before reading anything from the client
            await _answer(writer, "403 Forbidden", text, refused.encode() + b"\n")
            return
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await _answer(writer, "400 Bad Request", text, b"send GET /metrics\n")
            return
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if target != PATH.encode():
            await _answer(writer, "404 Not Found", text, b"only /metrics is served here\n")
        elif method not in (b"GET", b"HEAD"):
            await _answer(writer, "405 Method Not Allowed", text, b"use GET /metrics\n")
        else:
            await _answer(writer, "200 OK", CONTENT_TYPE, await self.metrics.text(),
                          head=method == b"HEAD")

