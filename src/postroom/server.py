"""`postroom serve` and `postroom worker`: the long-running processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postroom.bootstrap import ensure_certificate
from postroom.ingress import http_front, http_server, smtpd
from postroom.queue.worker import Worker
from postroom.reload import LiveConfig
from postroom.runtime import Instance
from postroom.settings import LogSettings, Settings
from postroom.system import notify
from postroom.transports.base import Transport

if TYPE_CHECKING:
    from postroom.bounces import Door
    from postroom.metrics.expose import Listener as MetricsListener

log = logging.getLogger("postroom")


class RepeatFilter(logging.Filter):
    """Lets through at most ``burst`` records of one kind per ``interval`` seconds, then one
    "suppressed K similar lines" record for the rest.

    A kind is (logger, level, first line of the message template): what repeats in a flood
    is the template, while its arguments (addresses, descriptors) vary. The case that needs
    it: out of file descriptors, asyncio logs "socket.accept() out of system resource", with
    a traceback, once per pending connection (up to the listen backlog) every second, and
    did so 218,578 times in 12 s. The summary is written when the kind's interval has ended
    and any record comes through the handler, so a count is never lost while the process
    logs anything at all. Memory: at most ``max_kinds`` kinds are tracked.

    Only the loggers in ``limited`` are counted: the listeners and the event loop, whose
    lines a client can make us write at will. The delivery's lines (one per message and
    attempt) are the operator's record, bounded by the mail accepted: never dropped.
    """

    def __init__(
        self,
        sink: Callable[[logging.LogRecord], object],
        *,
        burst: int = 20,
        interval: float = 10.0,
        max_kinds: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        limited: tuple[str, ...] = ("asyncio", "uvicorn", "mail.log", "postroom.ingress"),
    ) -> None:
        super().__init__()
        self.limited = limited
        self.sink = sink  # where summaries go: the handler this filter is installed on
        self.burst = burst
        self.interval = interval
        self.max_kinds = max_kinds
        self.clock = clock
        # kind -> [start of its interval, records let through, records suppressed]
        self._kinds: dict[tuple[str, int, str], list[float]] = {}
        self._next_sweep = 0.0
        self._lock = threading.Lock()  # records come from executor threads too

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "postroom_summary", False):
            return True
        if not any(record.name == p or record.name.startswith(p + ".") for p in self.limited):
            return True
        now = self.clock()
        kind = (record.name, record.levelno, str(record.msg).partition("\n")[0])
        with self._lock:
            ended = self._sweep(now) if now >= self._next_sweep else []
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) >= self.max_kinds:
                    oldest = next(iter(self._kinds))
                    ended.append((oldest, self._kinds.pop(oldest)))
                state = self._kinds[kind] = [now, 0, 0]
            if state[1] < self.burst:
                state[1] += 1
                passed = True
            else:
                state[2] += 1
                passed = False
        for k, st in ended:
            if st[2]:
                self._summary(k, st, now)
        return passed

    def _sweep(self, now: float) -> list[tuple[tuple[str, int, str], list[float]]]:
        self._next_sweep = now + self.interval
        ended = [(k, st) for k, st in self._kinds.items() if now - st[0] >= self.interval]
        for k, _ in ended:
            del self._kinds[k]
        return ended

    def _summary(self, kind: tuple[str, int, str], state: list[float], now: float) -> None:
        name, level, first_line = kind
        record = logging.LogRecord(
            name, level, __file__, 0, "suppressed %d similar lines in %.0f s: %s",
            (int(state[2]), now - state[0], first_line), None,
        )
        record.postroom_summary = True
        self.sink(record)


def setup_logging(cfg: LogSettings | None = None) -> None:
    """One line per event on stderr, in ``[log] format`` from ``[log] level`` up
    (postroom.logformat); aiosmtpd's per-connection chatter only when debugging; a line
    repeated in a flood is written a few times, then counted (RepeatFilter)."""
    from postroom.logformat import formatter

    cfg = cfg or LogSettings()
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "postroom_stderr", False)]
    if not root.handlers or ours:  # a host's own logging (pytest, an embedding app) is kept
        if not ours:
            stderr = logging.StreamHandler()
            stderr.postroom_stderr = True  # type: ignore[attr-defined]
            root.addHandler(stderr)
            ours = [stderr]
        for mine in ours:  # called again (a second serve in one process): latest wins
            mine.setFormatter(formatter(cfg.format))
        root.setLevel(cfg.level.upper())
    for handler in root.handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter(handler.handle))
    logging.getLogger("mail.log").setLevel(
        logging.DEBUG if cfg.level == "debug" else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard) after.

    Each SMTP or HTTP session holds a descriptor, and the usual soft limit (1024) is far
    below the hard one (often 524288): a few hundred idle connections would otherwise leave
    no descriptor for the database, the delivery connections or the next accept().
    """
    try:
        import resource
    except ImportError:  # not POSIX (Windows): there is no such limit to raise
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return (soft, hard)
    # An unlimited hard limit (macOS) still refuses more than the kernel's own maximum.
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 10240]
    for target in targets:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        soft = target
        break
    return (soft, hard)


def open_files_needed(settings: Settings) -> int:
    """Descriptors `serve` may hold at once: sessions, plus deliveries in flight, plus the
    database, listeners and a margin (also the unit's LimitNOFILE, postroom.system.install)."""
    return settings.server.smtp_max_sessions + settings.delivery.concurrency + 100


def _check_open_files(settings: Settings) -> None:
    soft, hard = raise_open_files_limit()
    need = open_files_needed(settings)
    if 0 <= soft < need:
        log.warning(
            "open-file limit is %d (hard limit %d), below the %d that smtp_max_sessions (%d) "
            "and delivery.concurrency (%d) may use: raise the hard limit (systemd "
            "LimitNOFILE=, `ulimit -Hn`) or lower smtp_max_sessions", soft, hard, need,
            settings.server.smtp_max_sessions, settings.delivery.concurrency)


def _say(text: str) -> None:
    from postroom.logformat import structured

    if structured():  # [log] format = json | logfmt: every stderr line is a record
        log.info("%s", text.removeprefix("postroom: "))
        return
    print(text, file=sys.stderr, flush=True)


# POSTROOM_DEBUG_MODULES=FILE: on SIGUSR1, the process writes the names of the modules it
# has imported to FILE, one a line. tests/test_memory_imports.py checks with it that what a
# door needs once (alembic, cryptography...) is not kept by a running server.
DEBUG_MODULES = "POSTROOM_DEBUG_MODULES"


def _write_modules(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{name}\n" for name in sorted(sys.modules)), encoding="utf-8")
    tmp.replace(path)  # whole or absent: a reader never sees half a list


def _stop_on_signals(stop: asyncio.Event, hup: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if hup is not None:  # from the start: SIGHUP's default would end the process
        loop.add_signal_handler(signal.SIGHUP, hup.set)
    dump = os.environ.get(DEBUG_MODULES)
    if dump and hasattr(signal, "SIGUSR1"):
        loop.add_signal_handler(signal.SIGUSR1, _write_modules, Path(dump))


def _chores(inst: Instance) -> list[asyncio.Task[None]]:
    """Periodic work that runs wherever a worker runs; each is safe on every node at once
    (it checks in the database whether it is due and takes a lock while it runs)."""
    from postroom.queue.retention import retention_loop
    from postroom.store.log import index_loop

    chores = [asyncio.create_task(retention_loop(inst.queue, inst.settings),
                                  name="postroom-retention"),
              # the log's text index, written after each enqueue's commit (store/log.py)
              asyncio.create_task(index_loop(inst.queue.log), name="postroom-log-index")]
    if any(c.oauth is not None for c in inst.settings.connections):
        from postroom.oauth.checks import periodic

        # Stopped by cancellation with the other chores; the event is never set.
        chores.append(asyncio.create_task(periodic(inst.oauth, asyncio.Event()),
                                          name="postroom-oauth-checks"))
    return chores + _feature_chores(inst)


def _feature_chores(inst: Instance, running: Collection[str] = ()) -> list[asyncio.Task[None]]:
    """The chores of the feature sections the configuration has, except those ``running``:
    at start, and when a configuration stored in the database adds the section later."""
    chores: list[asyncio.Task[None]] = []
    features = {name for name, _ in inst.settings.features}
    # [[alerts]] (postroom.alerts): only a configuration that has rules imports the package.
    if "alerts" in features and "postroom-alerts" not in running:
        from postroom.alerts.dispatcher import Dispatcher
        from postroom.alerts.dispatcher import run as alerts_loop

        # inst.settings is read at each tick: a configuration reload applies to the next one
        chores.append(asyncio.create_task(
            alerts_loop(Dispatcher(inst.engine, lambda: inst.settings)),
            name="postroom-alerts"))
    # [reports] (postroom.reports): the summary report emails, once per period on one node.
    if "reports" in features and "postroom-reports" not in running:
        from postroom.reports.schedule import report_loop

        chores.append(asyncio.create_task(report_loop(inst, lambda: inst.settings),
                                          name="postroom-reports"))
    return chores


def _follow_config(inst: Instance, worker: Worker | None, transports: dict[str, Transport],
                   chores: list[asyncio.Task[None]]) -> tuple[LiveConfig, asyncio.Task[None]]:
    """Follow the configuration stored in the database (postroom.reload): connections,
    routes and policies are swapped in; the retention chore restarts with new settings."""
    from postroom.queue.retention import retention_loop

    live = LiveConfig(inst, worker, transports)

    def retention_changed(old: Settings, new: Settings) -> None:
        if old.retention == new.retention:
            return
        for i, task in enumerate(chores):
            if task.get_name() == "postroom-retention":
                task.cancel()
                chores[i] = asyncio.create_task(retention_loop(inst.queue, new),
                                                name="postroom-retention")

    def features_added(old: Settings, new: Settings) -> None:
        if chores:  # a node that runs the chores (one with a worker)
            chores.extend(_feature_chores(inst, {task.get_name() for task in chores}))

    live.listeners.append(retention_changed)
    live.listeners.append(features_added)
    return live, asyncio.create_task(live.run(), name="postroom-config-reload")


def _reload_on_hup(inst: Instance, live: LiveConfig, hup: asyncio.Event,
                   **listener: Any) -> asyncio.Task[None]:
    """SIGHUP: read postroom.toml again and swap it in (postroom.hup); ``listener``: the
    SMTP listener's TLS context and rules, and record=True for `serve`."""
    from postroom.hup import FileReload

    reloader = FileReload(inst, live, **listener)
    reloader.snapshot()
    return asyncio.create_task(reloader.watch(hup), name="postroom-hup")


def _browsable(host: str) -> str:
    """The host part of a URL a browser on this machine can open for a listening address."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ":" in host:
        return "[::1]" if host == "::" else f"[{host}]"
    return host


def _admin_setup(inst: Instance, base_url: str) -> None:
    """While no admin account exists, print the one-time link that creates the first
    (postroom.admin.setup); each start replaces the previous link."""
    from postroom.admin.config import AdminSettings

    if not inst.settings.section(AdminSettings).enabled:
        return
    from sqlalchemy import select

    from postroom.store.schema import admin_accounts

    with inst.engine.connect() as conn:  # the usual case, one row found, imports nothing more
        if conn.execute(select(admin_accounts.c.name).limit(1)).first() is not None:
            _say(f"postroom: web admin on {base_url}/admin/")
            return
    from postroom.admin.setup import setup_link

    link = setup_link(inst.engine, None, base_url)
    if link is not None:
        _say(f"postroom: web admin on {base_url}/admin/; no admin account yet: create the "
             f"first one with this link (valid 24 hours, once):\n  {link}\nor run "
             "`postroom admin add NAME`")


def _bounce_door(inst: Instance) -> Door | None:
    """The listener's door for delivery reports, when [bounces] names an address (read at
    start: a changed bounce address needs a restart)."""
    if not any(name == "bounces" for name, _ in inst.settings.features):
        return None  # postroom.bounces (and the email parser) not loaded
    from postroom.bounces import Door

    return Door.of(inst.settings, inst.queue)


async def _metrics_listener(inst: Instance, ctx: http_front.Context | None
                            ) -> MetricsListener | None:
    """``[metrics] listen``: /metrics on an address of its own, without a token (read at
    start: a changed address needs a restart). It shares the HTTP front's running totals
    and cache, so both addresses answer the same figures."""
    if not any(name == "metrics" for name, _ in inst.settings.features):
        return None  # postroom.metrics (and prometheus_client) not loaded
    from postroom.metrics import MetricsSettings

    address = inst.settings.section(MetricsSettings).address
    if address is None:
        return None
    from postroom.metrics.expose import Listener, Metrics

    metrics = Metrics(inst.queue, lambda: inst.settings)
    if ctx is not None:
        ctx.metrics = metrics
    listener = Listener(metrics)
    host, port = await listener.start(*address)
    _say(f"postroom: Prometheus metrics on http://{_browsable(host)}:{port}/metrics")
    return listener


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
    setup_logging(settings.log)
    _check_open_files(settings)
    web = settings.http
    if settings.http_listen and web.tls and web.tls_cert and web.tls_key:
        # A wrong pair is reported now, not after a first start's migration.
        http_server.check_tls(settings.resolve(web.tls_cert), settings.resolve(web.tls_key))
    inst = Instance(settings, migrate_apart=True)
    stop, hup = stop or asyncio.Event(), asyncio.Event()
    _stop_on_signals(stop, hup)
    cert, key = inst.tls_files
    if ensure_certificate(cert, key, settings.server.hostname, apart=True):
        _say(f"created a self-signed certificate for STARTTLS: {cert}")
    for warning in inst.permission_warnings():
        log.warning("%s", warning)
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
        inst.intake,
        on_enqueued=(lambda _id: worker.wake()) if worker else None,
        bounces=_bounce_door(inst),
    )
    worker_task: asyncio.Task[None] | None = None
    http = None  # bound before SMTP: when the SMTP port answers, the HTTP one does too
    ctx: http_front.Context | None = None
    if settings.http_listen:
        ctx = http_front.Context(
            inst.queue, inst.apps, settings,
            on_enqueued=(lambda _id: worker.wake()) if worker else None,
            worker_running=(lambda: worker_task is not None and not worker_task.done())
            if worker else None,
            worker_owner=worker.owner if worker else None,
            intake=inst.intake,
            instance=inst,
        )
        web = settings.http
        https = None
        if web.tls:  # its own pair, or the SMTP listener's (made above when missing)
            https = ((settings.resolve(web.tls_cert), settings.resolve(web.tls_key))
                     if web.tls_cert and web.tls_key else (cert, key))
        http, (hh, hp) = await http_server.start(ctx, *settings.http_listen, tls=https)
        _say(f"postroom: HTTP API on http{'s' if https else ''}://{hh}:{hp}/api/v1 (docs "
             "/api/v1/docs, health /healthz)")
        _admin_setup(inst, f"http{'s' if https else ''}://{_browsable(hh)}:{hp}")
    metrics = await _metrics_listener(inst, ctx)
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
    live, live_task = _follow_config(inst, worker, transports, chores)
    if ctx is not None:  # the web admin's process changes it (ingress.admin_proxy)
        ctx.refresh_config = live.check
    hup_task = _reload_on_hup(inst, live, hup, tls=tls, https=http, policy=handler.policy,
                              record=True)
    from postroom.hup import hold_pidfile

    pidfile = hold_pidfile(settings.data_dir)  # `postroom reload` finds this process by it
    reads = None  # `postroom log`, `show`, `queue list` ask this server (postroom.control)
    if pidfile is not None:  # another serve of this data folder answers them
        from postroom.control import ReadSocket

        reads = ReadSocket(inst)
        await reads.start()
    _say(f"postroom: accepting mail on {', '.join(f'{h}:{p}' for h, p in bound)} "
         f"(data in {settings.data_dir})")
    if not inst.settings.connections:
        where = settings.config_path or "postroom.toml"
        _say(f"postroom: no [[connections]] in {where}: mail is accepted and kept in the queue "
             "until you add one (see the commented example in the file) and restart, or add "
             "one in the web admin")
    if ready is not None:
        ready(bound)
    # systemd (Type=notify): every listener answers and the store is open
    notify.ready(f"accepting mail on {', '.join(f'{h}:{p}' for h, p in bound)}")
    pulse = notify.start_watchdog()
    try:
        await stop.wait()
    finally:
        notify.stopping()
        _say("postroom: shutting down: no new mail accepted; finishing deliveries in flight")
        for s in servers:
            s.close()
        if http is not None:
            await http.stop()
        if metrics is not None:
            await metrics.stop()
        if reads is not None:
            reads.close()
        if worker is not None:
            await worker.stop(settings.delivery.shutdown_grace)
        if worker_task is not None:
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)
        await _stop_chores([live_task, hup_task, *chores, *pulse])
        await live.aclose()
        await inst.queue.writer.aclose()
        inst.close()
        if pidfile is not None:
            pidfile.close()  # the lock goes with it: the file left behind reads as stale


async def work(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """A delivery worker alone (scale-out): claims from the shared queue until stopped."""
    setup_logging(settings.log)
    _check_open_files(settings)
    inst = Instance(settings, migrate_apart=True)
    stop, hup = stop or asyncio.Event(), asyncio.Event()
    _stop_on_signals(stop, hup)
    for warning in inst.permission_warnings():
        log.warning("%s", warning)
    transports = inst.transports()
    worker = inst.worker(transports)
    task = asyncio.create_task(worker.run())
    chores = _chores(inst)
    live, live_task = _follow_config(inst, worker, transports, chores)
    hup_task = _reload_on_hup(inst, live, hup)
    _say(f"postroom worker {worker.owner}: delivering from {settings.database_url}")
    notify.ready(f"worker {worker.owner} delivering")
    pulse = notify.start_watchdog()
    try:
        await stop.wait()
    finally:
        notify.stopping()
        await worker.stop(settings.delivery.shutdown_grace)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await _stop_chores([live_task, hup_task, *chores, *pulse])
        await live.aclose()
        await inst.queue.writer.aclose()
        inst.close()
