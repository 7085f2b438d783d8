"""``/healthz``: whether this instance can take and deliver mail. 200 when the store answers
and a delivery worker is alive (in this process, or a `postroom worker` that reported within
three heartbeats and, on this host, whose process exists); 503 otherwise. The front
(``http_front``) shows this body to server.admin_networks only, the verdict to others."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from postroom.queue.worker import HEARTBEAT_SECONDS
from postroom.queue.workers import pid_alive
from postroom.store.schema import DEFERRED, QUEUED, SENDING, messages

if TYPE_CHECKING:
    from postroom.ingress.http_front import Context

log = logging.getLogger(__name__)


def _live_workers(ctx: Context, now: float) -> list[str]:
    """Workers that reported within 3 heartbeats; on this host the process must also exist
    (a killed worker is seen as gone at once, not after its heartbeat goes stale)."""
    host = socket.gethostname()[:40]
    alive = []
    for row in ctx.queue.workers_seen(now - 3 * HEARTBEAT_SECONDS):
        wid = str(row["id"])
        whost, _, pid = wid.rpartition(":")
        if whost == host and pid.isdigit() and not pid_alive(int(pid)):
            continue
        alive.append(wid)
    return alive


def _waiting(ctx: Context) -> dict[str, int]:
    # Only the states a health check cares about: the (status, ...) index answers this
    # without reading the whole log, unlike counting every status.
    q = (select(messages.c.status, func.count())
         .where(messages.c.status.in_((QUEUED, DEFERRED, SENDING)))
         .group_by(messages.c.status))
    with ctx.queue.engine.connect() as conn:
        found = {str(s): int(n) for s, n in conn.execute(q)}
    return {s: found.get(s, 0) for s in (QUEUED, DEFERRED, SENDING)}


async def health(ctx: Context) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /healthz: 200 when the store answers and a worker is alive."""
    body: dict[str, Any] = {"status": "ok", "store": {"ok": True}, "worker": {}, "queue": {}}
    alive: list[str] = []
    try:
        body["queue"] = await asyncio.to_thread(_waiting, ctx)
        alive = await asyncio.to_thread(_live_workers, ctx, time.time())
    except Exception as err:  # any failure of the store is what this endpoint reports
        log.warning("/healthz: the store did not answer: %s", err)
        body["store"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    in_process = ctx.worker_running() if ctx.worker_running is not None else None
    others = [w for w in alive if w != ctx.worker_owner]
    body["worker"] = {"ok": bool(in_process or others), "in_process": in_process,
                      "others": others}
    if not body["worker"]["ok"]:
        body["worker"]["fix"] = ("no delivery worker is running: set server.worker = true or "
                                 "start `postroom worker` with the same configuration")
    healthy = body["store"]["ok"] and body["worker"]["ok"]
    body["status"] = "ok" if healthy else "unhealthy"
    return (200 if healthy else 503), body
