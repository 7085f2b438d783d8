"""``/api/v1/admin``: the dashboard's figures, the queue, and pause/resume of the queue and of
each connection, as JSON; the same service functions as the pages (postroom.ops.queue)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from postroom.audit import Actor, Role
from postroom.ops import queue as queue_ops
from postroom.queue.status import ConnectionStatus
from postroom.web import auth, fence
from postroom.web.api import ERRORS
from postroom.web.dashboard import instance
from postroom.web.ops_errors import call

router = APIRouter(prefix=fence.API, tags=["admin"], responses=ERRORS)
Viewer = Annotated[Actor, Depends(auth.api_actor(Role.VIEWER))]
Admin = Annotated[Actor, Depends(auth.api_actor(Role.ADMIN))]


class ConnectionHealth(BaseModel):
    name: str
    transport: str
    server: str | None
    health: str = Field(description="up, degraded or down (the circuit breaker's view).")
    paused: bool
    failures: int = Field(description="Connection-level failures in a row.")
    circuit_open_until: float | None = Field(description="Skipped until then (down).")
    held_until: float | None = Field(default=None, description="Skipped until then: the "
                                     "provider asked to wait (429/503 Retry-After).")
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None
    oauth_state: str | None = Field(default=None, description="OAuth connections: ok, dead, "
                                    "no_grant...; null for others.")
    oauth_expires_at: float | None = None


class Failure(BaseModel):
    id: str
    created_at: float
    subject: str
    recipients: list[str]
    last_error: str | None
    advice: dict[str, Any] | None = Field(description="cause, fix, docs: what the log's "
                                          "advice says about the last attempt.")


class DashboardOut(BaseModel):
    windows: dict[str, dict[str, int]] = Field(description="24h, 7d, 30d: sent, partial, "
                                               "failed, suppressed, deferred, fallback_used.")
    series: list[tuple[float, dict[str, int]]] = Field(description="Finished messages per "
                                                       "hour over the last day.")
    queue: dict[str, Any] = Field(description="Waiting counts by status, oldest_at, "
                                  "oldest_age (seconds).")
    paused: bool
    connections: list[ConnectionHealth]
    failures: list[Failure]


class QueueOut(BaseModel):
    paused: bool
    counts: dict[str, int]
    oldest_age: float | None
    messages: list[dict[str, Any]] = Field(description="What waits, in the workers' order "
                                           "(no bodies).")
    connections: list[ConnectionHealth]


class Switched(BaseModel):
    paused: bool
    connection: str | None = Field(description="null: the whole queue.")


def _health(c: ConnectionStatus, oauth: dict[str, dict[str, Any]] | None = None
            ) -> ConnectionHealth:
    grant = (oauth or {}).get(c.name) or {}
    return ConnectionHealth(name=c.name, transport=c.transport, server=c.server,
                            health=c.health, paused=c.paused, failures=c.failures,
                            circuit_open_until=c.circuit_open_until,
                            held_until=c.held_until,
                            last_success_at=c.last_success_at, last_error=c.last_error,
                            last_error_at=c.last_error_at,
                            oauth_state=grant.get("state"),
                            oauth_expires_at=grant.get("expires_at"))


@router.get("/dashboard", summary="The dashboard's figures")
async def dashboard(request: Request, actor: Viewer) -> DashboardOut:
    d = await call(queue_ops.dashboard, instance(request), actor)
    return DashboardOut(
        windows=d.windows, series=d.series, queue=d.depth, paused=d.paused,
        connections=[_health(c, d.oauth) for c in d.connections],
        failures=[Failure(id=f["id"], created_at=f["created_at"], subject=f["subject"],
                          recipients=list(f["recipients"]), last_error=f.get("last_error"),
                          advice=f.get("advice")) for f in d.failures])


_BODYLESS = ("id", "created_at", "status", "next_attempt_at", "attempt_count", "priority",
             "sender", "recipients", "subject", "app", "via", "last_error")


@router.get("/queue", summary="What waits")
async def queue(request: Request, actor: Viewer,
                status: Annotated[str | None, Query(pattern="^(queued|sending|deferred)$")]
                = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> QueueOut:
    v = await call(queue_ops.queue_view, instance(request), actor, status=status, limit=limit)
    return QueueOut(paused=v.paused, counts=v.counts, oldest_age=v.oldest_age,
                    messages=[{k: r.get(k) for k in _BODYLESS} for r in v.rows],
                    connections=[_health(c) for c in v.connections])


@router.post("/queue/pause", summary="Pause the queue")
async def pause_queue(request: Request, actor: Admin) -> Switched:
    """Every worker and node stops taking mail within about a second; mail is still
    accepted."""
    await call(queue_ops.pause, instance(request), actor)
    return Switched(paused=True, connection=None)


@router.post("/queue/resume", summary="Resume the queue")
async def resume_queue(request: Request, actor: Admin) -> Switched:
    await call(queue_ops.resume, instance(request), actor)
    return Switched(paused=False, connection=None)


@router.post("/connections/{name}/pause", summary="Pause a connection")
async def pause_connection(request: Request, actor: Admin, name: str) -> Switched:
    """No worker uses it; its mail goes to the next connection of its route, or waits."""
    await call(queue_ops.pause, instance(request), actor, name)
    return Switched(paused=True, connection=name)


@router.post("/connections/{name}/resume", summary="Resume a connection")
async def resume_connection(request: Request, actor: Admin, name: str) -> Switched:
    await call(queue_ops.resume, instance(request), actor, name)
    return Switched(paused=False, connection=name)
