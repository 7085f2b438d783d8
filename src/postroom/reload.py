"""Live configuration: a running `serve` or `worker` follows the connections, routes,
policy and retention stored in the database (postroom.store.dbconfig) without a restart.

Every process polls the configuration's generation (one primary-key read every
CHECK_SECONDS). On a change it builds the effective settings again and swaps them in:

- transports: an unchanged connection keeps its transport (and its open sessions); a
  changed or new one gets a new transport; one that cannot be built (its module fails,
  its settings no longer validate) keeps the previous transport, if any, and is logged once
  with the fix, so a broken entry never stops delivery;
- the worker's routes, policies and default connection, and the intake's connection names;
- the transports no longer used are closed only once every delivery under way at the
  swap has ended: a try finishes on the transport it started on, and nothing is dropped.

A new postroom.toml (SIGHUP, `postroom reload`: postroom.hup) goes through the same swap:
:meth:`LiveConfig.adopt` lays the database's entries over the new file's settings and
applies the result as a stored change is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from postroom import transports as registry
from postroom.exceptions import PostroomError
from postroom.settings import Settings
from postroom.store.dbconfig import load
from postroom.transports.base import Transport

if TYPE_CHECKING:
    from postroom.queue.worker import Worker
    from postroom.runtime import Instance

log = logging.getLogger(__name__)
CHECK_SECONDS = 2.0
# A retired transport waits at most this long for the deliveries under way at the swap (a
# delivery is itself bounded by its transport's timeouts; this only bounds a stuck one).
RETIRE_WAIT = 600.0

Listener = Callable[[Settings, Settings], None]  # (old, new) effective settings


class LiveConfig:
    """Keeps one process's transports, worker and intake in step with the database."""

    def __init__(self, inst: Instance, worker: Worker | None,
                 transports: dict[str, Transport], *, interval: float = CHECK_SECONDS) -> None:
        self.inst = inst
        self.worker = worker
        self.transports = transports  # the set in use now (the worker's, when there is one)
        self.interval = interval
        self.generation = inst.config_generation
        self.listeners: list[Listener] = []
        self._retiring: set[asyncio.Task[None]] = set()
        # One swap at a time: a poll must not apply settings built from the file's settings
        # a SIGHUP has just replaced.
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """Poll until cancelled; errors are logged, never raised (delivery goes on)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except (PostroomError, SQLAlchemyError) as err:
                log.error("reading the stored configuration failed: %s", err)
            except Exception:
                log.exception("reloading the configuration crashed; keeping the current one")

    async def check(self) -> bool:
        """Reload if the stored configuration changed; True when it did."""
        async with self._lock:
            new, generation = await asyncio.to_thread(load, self.inst.file_settings,
                                                      self.inst.engine)
            if generation == self.generation:
                return False
            self.apply(new, generation)
            return True

    async def adopt(self, file: Settings) -> Settings:
        """Use ``file`` (a new postroom.toml's settings) from now on: the stored entries laid
        over it, swapped in whatever the generation; returns the effective settings. Raises
        (nothing changed) when the database cannot be read."""
        async with self._lock:
            new, generation = await asyncio.to_thread(load, file, self.inst.engine)
            self.inst.file_settings = file
            self.apply(new, generation)
            return new

    def apply(self, new: Settings, generation: int) -> None:
        """Swap ``new`` (effective settings) into the running parts."""
        from postroom.policy import for_settings

        old = self.inst.settings
        self.inst.settings = new
        if "oauth" in vars(self.inst):  # the token manager exists: it follows too
            self.inst.oauth.reconfigure(new)
        transports = self._build(new)
        default = self.inst.default_connection
        if self.worker is not None:
            retired, busy = self.worker.reconfigure(transports, new.routes, for_settings(new),
                                                    default)
        else:
            retired = [t for n, t in self.transports.items() if transports.get(n) is not t]
            busy = []
        self.transports = transports
        self.inst.intake.connections = frozenset(c.name for c in new.connections)
        if retired:
            task = asyncio.create_task(self._retire(retired, busy), name="postroom-retire")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self.generation = generation
        for listener in self.listeners:
            listener(old, new)
        log.info("configuration generation %d loaded: connections %s", generation,
                 ", ".join(transports) or "none")

    def _build(self, new: Settings) -> dict[str, Transport]:
        ctx = self.inst.transport_context()
        out: dict[str, Transport] = {}
        for conn in new.connections:
            current = self.transports.get(conn.name)
            if current is not None and current.settings == conn:
                out[conn.name] = current
                continue
            try:
                out[conn.name] = registry.create(conn, ctx)
            except Exception as err:  # any failure: this connection only, never the worker
                if current is not None:
                    out[conn.name] = current
                    log.error("connection %s: the changed settings cannot be used (%s); still "
                              "delivering with the previous ones: fix the entry in the web "
                              "admin or postroom.toml", conn.name, err)
                else:
                    log.error("connection %s cannot be used (%s); mail routed to it waits in "
                              "the queue: fix the entry in the web admin or postroom.toml",
                              conn.name, err)
        return out

    async def _retire(self, old: list[Transport],
                      busy: list[asyncio.Task[list[dict[str, Any]]]]) -> None:
        if busy:
            await asyncio.wait(busy, timeout=RETIRE_WAIT)
        for transport in old:
            try:
                await transport.aclose()
            except Exception as err:
                log.warning("closing a replaced transport failed: %s", err)

    async def aclose(self) -> None:
        """At shutdown, after the worker stopped: close every transport, old and current."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for transport in self.transports.values():
            with contextlib.suppress(Exception):
                await transport.aclose()
