"""The worker registry: who a worker is (host and process id), its row in ``workers``
(heartbeats, for `postroom status` and the health page), and whether a worker on this
host is still alive (its process exists).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select

from postroom.store.schema import workers


def worker_id() -> str:
    """``host:pid``: what a worker's claim tokens start with (postroom.queue.lease), so that
    a restarted process on the same host can tell its dead predecessors' leases."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_local_owners(tokens: Iterable[str], me: int) -> set[str]:
    """Of these claim tokens (``host:pid:seq``, all of this host), those whose process is
    gone; never process ``me``'s."""
    dead = set()
    for token in tokens:
        pid = token.split(":")[1] if token.count(":") >= 2 else ""
        if pid.isdigit() and int(pid) != me and not pid_alive(int(pid)):
            dead.add(token)
    return dead


def heartbeat(conn: Connection, owner: str, started_at: float, now: float, *,
              gone: bool = False) -> None:
    """Worker ``owner`` is alive at ``now`` (or, with ``gone``, stopped)."""
    conn.execute(delete(workers).where(workers.c.id == owner))
    if not gone:
        conn.execute(insert(workers).values(id=owner, started_at=started_at, seen_at=now))


def seen(engine: Engine, since: float) -> list[dict[str, Any]]:
    """Workers that reported in at or after ``since``."""
    with engine.connect() as conn:
        rows = conn.execute(select(workers).where(workers.c.seen_at >= since))
        return [dict(r._mapping) for r in rows]
