"""`postroom serve` and `postroom worker`: the long-running processes."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from postroom.bootstrap import ensure_certificate
from postroom.ingress import http_front, smtpd
from postroom.queue.worker import Worker
from postroom.runtime import Instance
from postroom.settings import Settings

log = logging.getLogger("postroom")


def setup_logging() -> None:
    """One line per event on stderr; aiosmtpd's per-connection chatter only when debugging."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _chores(inst: Instance) -> list[asyncio.Task[None]]:
    """Periodic work that runs wherever a worker runs; each is safe on every node at once
    (it checks in the database whether it is due and takes a lock while it runs)."""
    from postroom.queue.retention import retention_loop

    chores = [asyncio.create_task(retention_loop(inst.queue, inst.settings),
                                  name="postroom-retention")]
    if any(c.oauth is not None for c in inst.settings.connections):
        from postroom.oauth.checks import periodic

        # Stopped by cancellation with the other chores; the event is never set.
        chores.append(asyncio.create_task(periodic(inst.oauth, asyncio.Event()),
                                          name="postroom-oauth-checks"))
    return chores


async def _stop_chores(chores: list[asyncio.Task[None]]) -> None:
    for task in chores:
        task.cancel()
    await asyncio.gather(*chores, return_exceptions=True)


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    ready: Callable[[list[tuple[str, int]]], None] | None = None,
) -> None:
    """Listen for mail (and deliver it, unless ``server.worker = false``) until stopped."""
    setup_logging()
    inst = Instance(settings)
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    cert, key = inst.tls_files
    if ensure_certificate(cert, key, settings.server.hostname):
        _say(f"created a self-signed certificate for STARTTLS: {cert}")
    inst.secrets  # noqa: B018 - creates the encryption key on first run, before any client
    tls = smtpd.tls_context(str(cert), str(key))
    transports = inst.transports()
    worker: Worker | None = None
    if settings.server.worker:
        worker = inst.worker(transports)
    handler = smtpd.Handler(
        inst.queue,
        inst.apps,
        smtpd.Policy(settings.server),
        on_enqueued=(lambda _id: worker.wake()) if worker else None,
    )
    worker_task: asyncio.Task[None] | None = None
    http = None  # bound before SMTP: when the SMTP port answers, the HTTP one does too
    if settings.http_listen:
        ctx = http_front.Context(
            inst.queue, inst.apps, settings,
            on_enqueued=(lambda _id: worker.wake()) if worker else None,
            worker_running=(lambda: worker_task is not None and not worker_task.done())
            if worker else None,
            worker_owner=worker.owner if worker else None,
        )
        http, (hh, hp) = await http_front.start(ctx, *settings.http_listen)
        _say(f"postroom: HTTP API on http://{hh}:{hp}/api/v1 (docs /api/v1/docs, "
             "health /healthz)")
    servers = [await smtpd.start(handler, settings.server, *settings.smtp_listen, tls)]
    if settings.smtps_listen:
        servers.append(
            await smtpd.start(
                handler, settings.server, *settings.smtps_listen, tls, implicit_tls=True
            )
        )
    bound = [s.sockets[0].getsockname()[:2] for s in servers]
    worker_task = asyncio.create_task(worker.run()) if worker else None
    chores = _chores(inst) if worker else []
    _say(f"postroom: accepting mail on {', '.join(f'{h}:{p}' for h, p in bound)} "
         f"(data in {settings.data_dir})")
    if not settings.connections:
        where = settings.config_path or "postroom.toml"
        _say(f"postroom: no [[connections]] in {where}: mail is accepted and kept in the queue "
             "until you add one (see the commented example in the file) and restart")
    if ready is not None:
        ready(bound)
    try:
        await stop.wait()
    finally:
        _say("postroom: shutting down: no new mail accepted; finishing deliveries in flight")
        for s in servers:
            s.close()
        if http is not None:
            await http.stop()
        if worker is not None:
            await worker.stop(settings.delivery.shutdown_grace)
        if worker_task is not None:
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)
        await _stop_chores(chores)
        for t in transports.values():
            await t.aclose()
        await inst.queue.writer.aclose()
        inst.close()


async def work(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """A delivery worker alone (scale-out): claims from the shared queue until stopped."""
    setup_logging()
    inst = Instance(settings)
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    transports = inst.transports()
    worker = inst.worker(transports)
    task = asyncio.create_task(worker.run())
    chores = _chores(inst)
    _say(f"postroom worker {worker.owner}: delivering from {settings.database_url}")
    try:
        await stop.wait()
    finally:
        await worker.stop(settings.delivery.shutdown_grace)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _stop_chores(chores)
        for t in transports.values():
            await t.aclose()
        await inst.queue.writer.aclose()
        inst.close()
