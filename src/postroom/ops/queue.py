"""The queue and the connections as an operator sees and steers them: the dashboard's
figures, what waits, pause and resume (the whole queue or one connection).

Pausing writes the switch every worker and node reads (routing.health), so it takes effect
everywhere within about a second; mail is still accepted while paused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postroom import audit
from postroom.audit import Action, Actor, Role
from postroom.ops import require

if TYPE_CHECKING:
    from postroom.queue.status import ConnectionStatus
    from postroom.runtime import Instance

DAY = 86400.0
# The dashboard's windows: (key, seconds back from now).
WINDOWS = (("24h", DAY), ("7d", 7 * DAY), ("30d", 30 * DAY))
# The figures the dashboard shows per window: statuses the store has, plus fallback use.
FIGURES = ("sent", "partial", "failed", "suppressed", "deferred", "fallback_used")
QUEUE_PAGE = 200


def _health(inst: Instance) -> Any:
    from postroom.routing.health import Health

    d = inst.settings.delivery
    return Health(inst.queue, d.breaker_failures, d.breaker_cooldown)


def _known_connection(inst: Instance, name: str) -> None:
    # An unknown name is a ConfigError listing the known ones.
    inst.settings.connection(name)


def pause(inst: Instance, actor: Actor, connection: str | None = None) -> None:
    """Stop delivering: the whole queue (``connection=None``) or one connection."""
    _switch(inst, actor, connection, paused=True)


def resume(inst: Instance, actor: Actor, connection: str | None = None) -> None:
    """Deliver again after :func:`pause`."""
    _switch(inst, actor, connection, paused=False)


def _switch(inst: Instance, actor: Actor, connection: str | None, *, paused: bool) -> None:
    what = ("pause" if paused else "resume") + (
        f" connection {connection}" if connection else " the queue")
    require(actor, Role.ADMIN, what)
    if connection is not None:
        _known_connection(inst, connection)
    _health(inst).set_paused(connection, paused)
    if connection is None:
        action = Action.QUEUE_PAUSE if paused else Action.QUEUE_RESUME
    else:
        action = Action.CONNECTION_PAUSE if paused else Action.CONNECTION_RESUME
    audit.record(inst.engine, actor, action, connection or "queue")


@dataclass(frozen=True)
class QueueView:
    """The queue page: the pause switch, counts, what waits (in the workers' order)."""

    paused: bool
    counts: dict[str, int]  # queued, sending, deferred
    oldest_age: float | None  # seconds the oldest waiting message has waited
    rows: list[dict[str, Any]]
    connections: list[ConnectionStatus] = field(default_factory=list)


def queue_view(inst: Instance, actor: Actor, *, status: str | None = None,
               limit: int = QUEUE_PAGE) -> QueueView:
    """What waits (``status``: queued, sending or deferred; None: all three), newest
    order as the workers take it, with each connection's pause switch. Blocking."""
    from postroom.queue.maintenance import Filter, list_queue, waiting_counts
    from postroom.queue.status import connection_status

    require(actor, Role.VIEWER, "see the queue")
    flt = Filter(statuses=(status,) if status else ())
    paused, conns = connection_status(inst.queue, inst.settings)
    depth = inst.queue.log.queue_depth()
    return QueueView(paused=paused, counts=waiting_counts(inst.queue),
                     oldest_age=depth["oldest_age"],
                     rows=list_queue(inst.queue, flt, max(1, min(limit, 1000))),
                     connections=conns)


@dataclass(frozen=True)
class Dashboard:
    """Everything the dashboard shows, read in one go."""

    windows: dict[str, dict[str, int]]  # "24h" -> {"sent": n, "failed": n, ...}
    series: list[tuple[float, dict[str, int]]]  # hourly, the last 24 h
    depth: dict[str, Any]  # Log.queue_depth()
    paused: bool
    connections: list[ConnectionStatus]
    oauth: dict[str, dict[str, Any]]  # connection name -> its OAuth grant's state
    failures: list[dict[str, Any]]  # newest failed messages, each with "advice" (or None)


def dashboard(inst: Instance, actor: Actor, *, failures: int = 10) -> Dashboard:
    """The dashboard's figures: indexed reads and rollups only, never a count over the whole
    log. Blocking (run it in a thread from async code)."""
    from postroom.diagnostics.advice import advice_for_attempt
    from postroom.queue.status import connection_status

    require(actor, Role.VIEWER, "see the dashboard")
    now = time.time()
    log = inst.queue.log
    figures, depth = log.overview([now - back for _, back in WINDOWS])
    windows = {key: {k: int(got.get(k, 0)) for k in FIGURES}
               for (key, _), got in zip(WINDOWS, figures, strict=True)}
    paused, conns = connection_status(inst.queue, inst.settings, now)
    latest = log.latest_failures(failures)
    for row in latest:
        attempt = row.get("attempt")
        row["advice"] = advice_for_attempt(attempt, settings=inst.settings) if attempt else None
    return Dashboard(windows=windows, series=log.series(now - DAY + 1), depth=depth,
                     paused=paused, connections=conns, oauth=_oauth_states(inst),
                     failures=latest)


def _oauth_states(inst: Instance) -> dict[str, dict[str, Any]]:
    """Each OAuth connection's grant: state ("ok", "dead", "no_grant"...) and expiry."""
    if not any(getattr(c, "oauth", None) for c in inst.settings.connections):
        return {}  # no OAuth connection: do not build the token manager at all
    from postroom.commands.oauth import oauth_rows

    return {r["connection"]: r for r in oauth_rows(inst)}
