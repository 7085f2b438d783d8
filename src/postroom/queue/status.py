"""Each configured connection as an operator sees it: health (the circuit breaker's view,
postroom.routing.health), paused or not, and its limits with their current use (the same
sliding windows postroom.queue.limits enforces). `postroom connections` prints it; the
HTTP API serves :func:`connections_report` as JSON."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from postroom.queue.sql import Queue
from postroom.routing.health import DOWN, Health
from postroom.settings import Settings
from postroom.store.schema import send_log, session_leases


@dataclass(frozen=True, slots=True)
class RateUse:
    limit: str  # as configured, e.g. "50/minute"
    count: int
    period: float  # seconds
    used: int  # sends in the last `period` seconds, by every worker and node


@dataclass(slots=True)
class ConnectionStatus:
    name: str
    transport: str
    server: str | None  # host:port for SMTP, None for API transports
    health: str  # up | degraded | down
    paused: bool
    failures: int  # consecutive connection-level failures
    since: float | None  # when `health` last changed
    circuit_open_until: float | None  # skipped until then (down); then probed again
    held_until: float | None  # skipped until then at its provider's request (Retry-After)
    last_error: str | None
    last_error_at: float | None
    last_success_at: float | None
    rates: list[RateUse] = field(default_factory=list)
    max_sessions: int | None = None
    sessions_in_use: int = 0


def connection_status(queue: Queue, settings: Settings, now: float | None = None
                      ) -> tuple[bool, list[ConnectionStatus]]:
    """(queue paused?, every configured connection in configuration order)."""
    now = time.time() if now is None else now
    d = settings.delivery
    health = Health(queue, d.breaker_failures, d.breaker_cooldown)
    states = health.all([c.name for c in settings.connections])
    out: list[ConnectionStatus] = []
    with queue.engine.connect() as conn:
        for c, st in zip(settings.connections, states, strict=True):
            rates = []
            for text, (count, period) in zip(c.rate_limit, c.rates, strict=True):
                used = conn.execute(select(func.count()).select_from(send_log).where(
                    send_log.c.connection == c.name, send_log.c.at > now - period)).scalar_one()
                rates.append(RateUse(text, count, period, int(used)))
            busy = 0
            if c.max_sessions is not None:
                busy = int(conn.execute(select(func.count()).select_from(session_leases).where(
                    session_leases.c.connection == c.name, session_leases.c.until > now)
                ).scalar_one())
            host = getattr(c, "host", None)
            port = getattr(c, "effective_port", None)
            out.append(ConnectionStatus(
                name=c.name, transport=c.transport,
                server=f"{host}:{port}" if host and port else host,
                health=st.health, paused=st.paused, failures=st.failures,
                since=st.since or None,
                circuit_open_until=st.open_until if st.health == DOWN else None,
                held_until=st.held_until if st.held(now) else None,
                last_error=st.last_error, last_error_at=st.last_error_at,
                last_success_at=max((t for t in (st.last_success_at,
                                                  queue.log.last_delivered(c.name)) if t),
                                    default=None), rates=rates,
                max_sessions=c.max_sessions, sessions_in_use=busy,
            ))
    return health.queue_paused(), out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def connections_report(queue: Queue, settings: Settings, now: float | None = None
                       ) -> dict[str, Any]:
    """JSON-ready: ``{"queue_paused": bool, "connections": [...]}``, times in ISO 8601 UTC.
    Blocking (a few indexed queries): call it from a thread in async code."""
    paused, conns = connection_status(queue, settings, now)
    return {
        "queue_paused": paused,
        "connections": [{
            "name": c.name, "transport": c.transport, "server": c.server,
            "health": c.health, "paused": c.paused, "failures": c.failures,
            "since": _iso(c.since), "circuit_open_until": _iso(c.circuit_open_until),
            "held_until": _iso(c.held_until),
            "last_error": c.last_error, "last_error_at": _iso(c.last_error_at),
            "last_success_at": _iso(c.last_success_at),
            "rate_limits": [{"limit": r.limit, "count": r.count, "period_seconds": r.period,
                             "used": r.used} for r in c.rates],
            "max_sessions": c.max_sessions, "sessions_in_use": c.sessions_in_use,
        } for c in conns],
    }
