#!/usr/bin/env python3
"""Delivery throughput of `postroom worker` processes, side by side with django-post-office.

    sudo .venv/bin/python bench/worker_bench.py                 # 10,000 msgs per run
    sudo .venv/bin/python bench/worker_bench.py --messages 2000 --no-profile   # quick

What is measured (everything on 127.0.0.1, ports picked free at start): messages already in
the queue (pre-enqueued, 2 KB each, one recipient) are delivered to one `smtp-sink -c`
upstream (Postfix's, not Python: it counts every message it receives) over reused SMTP
connections, by

* 1, 2 and 4 `postroom worker` processes sharing one PostgreSQL database (a throw-away
  cluster, tests/pgserver.py: initdb in a temporary folder, fsync on), and 1 worker on
  SQLite (WAL, synchronous = FULL);
* 1 worker on PostgreSQL whose route's chain starts with a connection that is down (a
  closed port): once with the circuit breaker kept closed (every message tries the dead
  connection first, then falls back), once with it open (the dead connection is skipped);
  the difference to the plain run is the overhead of the fallback path per message;
* django-post-office's multi-process sender (`manage.py send_queued_mail --processes N`,
  N = 1, 2, 4 on PostgreSQL, 1 on SQLite), Django's SMTP backend to the same sink, the
  same number of messages of the same size, pre-enqueued with `post_office.mail.send_many`.

Beside the plain 1-worker runs on PostgreSQL and SQLite, the same run on a database from
which bench/_logindex.py dropped the email log's indexes and triggers (migration 0008: text
index, pending and rollup triggers, filter indexes) right after migrating it, before the
enqueue ("log indexes off"; ``--only pg-1-noidx,sqlite-1-noidx`` with ``pg-1,sqlite-1``):
the report's "with/without log indexes" line divides the enqueue and delivery rates of the
plain runs by these (issue 13: >= 0.9x). Messages are counted by status in ``messages``
itself, since the log's counts come from the rollups the triggers keep.

Each run starts on a fresh database. Postroom's workers start with the queue paused
(`postroom queue pause`'s switch) and are resumed once all of them are up; the rate is
N / (time every message is recorded as sent - time of the first arrival at the sink), so
worker start-up is not counted and recording the results is. post-office's command is
timed from the first arrival to its exit (it records a batch's results after sending the
batch); its CPU is that of the command and its pool processes minus one run of the command
on an empty queue (Django start-up). CPU per message is read from /proc: the worker
processes (all threads), the PostgreSQL server (postmaster and backends), and the whole box
(/proc/stat). The default `[delivery]` is measured, and `concurrency = 40` (with
`claim_batch = 50`, the default before session 3) beside it. On PostgreSQL each run starts
after the previous runs' databases are dropped and a CHECKPOINT: their dead rows would
otherwise be vacuumed, and their pages written, during the run (it made one run of the
same configuration 25 % slower than the next).

Unless ``--no-profile``, two more, unmeasured runs of 1 worker on PostgreSQL (default
`[delivery]`, then `concurrency = 40`) are recorded by py-spy (`--gil`, raw collapsed
stacks), summarised as GIL time per message by area and by function.

The report block goes to docs/benchmarks.md between its BEGIN/END markers (below the
relay bench's generated part) and is printed. Needs root (smtp-sink -u nobody, PostgreSQL
run as the postgres user), Postfix's smtp-sink, PostgreSQL's server binaries, and
django-post-office in this Python (`pip install django-post-office`). Every process started
here is stopped by PID in a finally block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
import _report  # noqa: E402 - bench/_report.py: the docs/benchmarks.md block
from _logindex import drop_log_indexes, status_counts  # noqa: E402 - bench/_logindex.py
from pgserver import PgServer  # noqa: E402
from postfix_instance import children_of, proc_cpu  # noqa: E402
from relay_bench import (  # noqa: E402
    HOST,
    Proc,
    Sink,
    box_busy,
    free_port,
    postroom_cmd,
    probe_ms,
    src_hash,
    versions,
    wait_quiet,
)

from postroom.settings import DeliverySettings  # noqa: E402

NAME = "worker_bench.py"
BEGIN, END = _report.markers(NAME)
SIZE = 2048
SENDER, DOMAIN = "bench@example.com", "example.org"
TARGET_ONE, TARGET_TWO = 2000.0, 1.6  # msg/s for one worker; 2 workers vs 1 (issue 4)
TUNED = ("concurrency=40", "claim_batch=50")  # the default before session 3
LOG_INDEX_TARGET = 0.9  # with/without the email log's indexes, enqueue and delivery (issue 13)


_DATABASES: list[str] = []  # the runs' PostgreSQL databases, dropped before the next run


def fresh_database(pg: PgServer) -> str:
    """A new database, after dropping the earlier runs' ones and a CHECKPOINT (see the
    module docstring: autovacuum and page writes of earlier runs must not land in this one)."""
    for name in _DATABASES:
        pg._psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _DATABASES.clear()
    pg._psql("CHECKPOINT")
    url = pg.new_database()
    _DATABASES.append(url.rsplit("/", 1)[1])
    return url


def say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- messages
def raw_message(i: int, run: str) -> bytes:
    head = (f"From: Bench <{SENDER}>\r\nTo: <rcpt{i % 100}@{DOMAIN}>\r\n"
            f"Subject: worker bench {i}\r\nMessage-ID: <{run}-{i}@bench.test>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = "The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = (line * (SIZE // len(line) + 1))[: SIZE - len(head)]
    return (head + body).encode()


def enqueue_postroom(url: str, n: int, log_indexes: bool = True) -> float:
    """Store n messages through Postroom's own enqueue (group commit), with the queue paused
    so that the workers started next wait for the signal; without ``log_indexes``, on a
    database whose email-log indexes were dropped first. Returns seconds taken."""
    from postroom.envelope import Envelope
    from postroom.queue.sql import Queue
    from postroom.routing.health import Health
    from postroom.store.db import make_engine, migrate

    engine = make_engine(url)
    migrate(engine)
    if not log_indexes:
        drop_log_indexes(engine)
    queue = Queue(engine)
    Health(queue, 5, 60).set_paused(None, True)
    run = uuid.uuid4().hex[:8]
    envs = [Envelope(SENDER, [f"rcpt{i % 100}@{DOMAIN}"], raw_message(i, run),
                     source="bench:load") for i in range(n)]

    async def go() -> None:
        try:
            for i in range(0, n, 1000):
                await asyncio.gather(*(queue.enqueue(e) for e in envs[i:i + 1000]))
        finally:
            await queue.writer.aclose()

    t0 = time.perf_counter()
    asyncio.run(go())
    took = time.perf_counter() - t0
    engine.dispose()
    return took


def set_paused(url: str, paused: bool) -> None:
    from postroom.queue.sql import Queue
    from postroom.routing.health import Health
    from postroom.store.db import make_engine

    engine = make_engine(url)
    Health(Queue(engine), 5, 60).set_paused(None, paused)
    engine.dispose()


def wait_recorded(url: str, n: int, timeout: float = 60) -> float | None:
    """When all n messages are recorded as sent (the worker's last commits come a little
    after the sink's last arrival): the end of a run, as post-office's is its exit."""
    from postroom.store.db import make_engine

    engine = make_engine(url)
    deadline = time.perf_counter() + timeout
    try:
        while time.perf_counter() < deadline:
            if status_counts(engine).get("sent", 0) >= n:
                return time.perf_counter()
            time.sleep(0.01)
        return None
    finally:
        engine.dispose()


def postroom_counts(url: str) -> dict[str, int]:
    from postroom.store.db import make_engine

    engine = make_engine(url)
    try:
        return status_counts(engine)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- measuring
@dataclass
class Meter:
    """CPU of some processes, of the PostgreSQL server and of the box, between two points."""

    pids: list[int]
    pg_pid: int | None
    t: float = 0.0
    cpu: float = 0.0
    pg: float = 0.0
    box: float = 0.0
    out: dict[str, float] = field(default_factory=dict)

    def _pg(self) -> float:
        if self.pg_pid is None:
            return 0.0
        total = proc_cpu(self.pg_pid, children=True)
        for c in children_of(self.pg_pid):
            with contextlib.suppress(OSError, IndexError, ValueError):  # exited meanwhile
                total += proc_cpu(c)
        return total

    def _cpu(self) -> float:
        total = 0.0
        for p in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += proc_cpu(p, children=True)
        return total

    def start(self) -> None:
        self.t, self.cpu, self.pg, self.box = (time.perf_counter(), self._cpu(), self._pg(),
                                               box_busy())

    def stop(self, extra_cpu: float = 0.0) -> dict[str, float]:
        self.out = {"wall": time.perf_counter() - self.t,
                    "cpu": self._cpu() - self.cpu + extra_cpu,
                    "pg_cpu": self._pg() - self.pg, "box_cpu": box_busy() - self.box}
        return self.out


def watch_sink(sink: Sink, base: int, n: int, timeout: float,
               alive: Any = None) -> tuple[float | None, float | None, int]:
    """Poll the sink's counter every 5 ms: (time of the first arrival, time of the n-th,
    count reached). Stops early if ``alive()`` turns false and nothing moves for 5 s."""
    first = last = None
    deadline = time.perf_counter() + timeout
    seen, moved = base, time.perf_counter()
    while time.perf_counter() < deadline:
        c = sink.count()
        now = time.perf_counter()
        if c > seen:
            seen, moved = c, now
            if first is None:
                first = now
        if c >= base + n:
            last = now
            break
        if alive is not None and not alive() and now - moved > 5:
            break
        time.sleep(0.005)
    return first, last, seen - base


# --------------------------------------------------------------------------- Postroom runs
DELIVERY_EXTRA: list[str] = []  # --delivery KEY=VALUE lines, for trying other settings


def worker_config(root: Path, url: str, sink_port: int, fallback: str | None,
                  tuning: tuple[str, ...] = ()) -> Path:
    """One node's config: its own data folder, the shared database."""
    root.mkdir(parents=True, exist_ok=True)
    delivery = "lease_seconds = 60\n" + "".join(
        f"{line.replace('=', ' = ', 1)}\n" for line in (*DELIVERY_EXTRA, *tuning))
    conns = (f'[[connections]]\nname = "sink"\ntransport = "smtp"\nhost = "{HOST}"\n'
             f'port = {sink_port}\nsecurity = "none"\n')
    if fallback is not None:
        # The breaker never opens ("closed"), or opens after 5 failures and stays open.
        delivery += ("breaker_failures = 1000000\n" if fallback == "closed"
                     else "breaker_failures = 5\nbreaker_cooldown = 3600\n")
        conns = (f'[[connections]]\nname = "down"\ntransport = "smtp"\nhost = "{HOST}"\n'
                 f'port = {free_port()}\nsecurity = "none"\nconnect_timeout = 5\n\n' + conns
                 + '\n[[routes]]\nchain = ["down", "sink"]\n')
    cfg = root / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\ndatabase = "{url}"\n'
                   f'hostname = "postroom.bench.test"\n\n[delivery]\n{delivery}\n{conns}')
    return cfg


def wait_log(path: Path, text: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited at start: {path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s: {path.read_text()[-2000:]}")


def run_postroom(label: str, work: Path, pg: PgServer, sink: Sink, n: int, workers: int,
                 db: str, fallback: str | None = None, quiet: float = 20,
                 profile: Path | None = None, tuning: tuple[str, ...] = (),
                 log_indexes: bool = True) -> dict[str, Any]:
    root = work / label.replace(" ", "-").replace(",", "")
    root.mkdir(parents=True)
    url = fresh_database(pg) if db == "postgresql" else f"sqlite:///{root / 'queue.db'}"
    rec: dict[str, Any] = {"label": label, "kind": "postroom", "db": db, "procs": workers,
                           "msgs": n, "fallback": fallback, "tuning": list(tuning),
                           "log_indexes": log_indexes}
    rec["enqueue_s"] = enqueue_postroom(url, n, log_indexes)
    procs: list[Proc] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        for i in range(workers):
            cfg = worker_config(root / f"node{i}", url, sink.port, fallback, tuning)
            log = root / f"node{i}" / "worker.log"
            procs.append(Proc(f"worker{i}", [*postroom_cmd(), "worker", "--config", str(cfg)],
                              log))
        for i, p in enumerate(procs):
            wait_log(root / f"node{i}" / "worker.log", "delivering from", p)
        if profile is not None:
            spy = spy_on(procs[0].pid, profile)
        rec["busy_before"] = wait_quiet(quiet)
        rec["probe_ms"] = probe_ms()
        meter = Meter([p.pid for p in procs], pg.proc.pid if db == "postgresql" and pg.proc
                      else None)
        base = sink.count()
        meter.start()
        set_paused(url, False)
        first, last, got = watch_sink(sink, base, n, timeout=max(120, n / 50),
                                      alive=lambda: all(p.alive() for p in procs))
        done = wait_recorded(url, n) if last is not None else None
        rec.update(meter.stop())
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        time.sleep(0.3)
        rec["delivered"] = got
        rec["sink_total"] = sink.count() - base
        rec["statuses"] = postroom_counts(url)
        rec["ok"] = (first is not None and last is not None and got == n
                     and rec["statuses"] == {"sent": n})
        rec["span_arrivals"] = (last - first) if first is not None and last is not None \
            else None
        rec["span"] = (done - first) if first is not None and done is not None else None
        if fallback is not None:
            rec["attempts"] = attempt_outcomes(url)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(10)
        for p in procs:
            p.stop()
    time.sleep(0.5)
    rec["sink_after_stop"] = sink.count() - base
    return rec


def attempt_outcomes(url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from postroom.store.db import make_engine
    from postroom.store.schema import attempts

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(attempts.c.connection, attempts.c.outcome, func.count())
                                .group_by(attempts.c.connection, attempts.c.outcome)).all()
    finally:
        engine.dispose()
    return {f"{c}:{o}": k for c, o, k in rows}


def pyspy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def spy_on(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording process ``pid`` into ``out`` (raw collapsed stacks, 100 Hz, only the
    thread holding the GIL) until it gets SIGINT; started a second before returning."""
    spy = subprocess.Popen(
        [pyspy(), "record", "--pid", str(pid), "--rate", "100", "--gil", "--threads",
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(1.0)
    return spy


# --------------------------------------------------------------------------- post-office runs
PO_SETTINGS = """\
SECRET_KEY = "worker-bench"
INSTALLED_APPS = ["post_office"]
DATABASES = {{"default": {db}}}
USE_TZ = True
TEMPLATES = [{{"BACKEND": "django.template.backends.django.DjangoTemplates"}}]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = "{host}"
EMAIL_PORT = {port}
EMAIL_TIMEOUT = 30
# BATCH_SIZE 1000 instead of the default 100: with --processes N every batch forks a new
# pool and opens new SMTP connections; 1000 is what its README suggests for volume.
POST_OFFICE = {{"BACKENDS": {{"default": EMAIL_BACKEND}}, "BATCH_SIZE": 1000}}
LOGGING = {{"version": 1, "disable_existing_loggers": False,
           "root": {{"level": "WARNING", "handlers": []}}}}
"""

PO_ENQUEUE = """\
import sys, django
django.setup()
from post_office import mail
n, size, run = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
line = "The quick brown fox jumps over the lazy dog, again and again.\\n"
body = (line * (size // len(line) + 1))[: size - 300]
for start in range(0, n, 1000):
    mail.send_many([dict(sender="Bench <{sender}>", recipients=[f"rcpt{{i % 100}}@{domain}"],
                         subject=f"worker bench {{i}}", message=body,
                         headers={{"Message-ID": f"<{{run}}-{{i}}@bench.test>"}})
                    for i in range(start, min(n, start + 1000))])
"""


def django_admin() -> list[str]:
    exe = Path(sys.executable).parent / "django-admin"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "django"]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_post_office(label: str, work: Path, pg: PgServer, sink: Sink, n: int, procs: int,
                    db: str, quiet: float = 20) -> dict[str, Any]:
    root = work / label.replace(" ", "-").replace(",", "")
    root.mkdir(parents=True)
    if db == "postgresql":
        url = fresh_database(pg)
        m = re.match(r"postgresql://(\w+)@([\d.]+):(\d+)/(\w+)", url)
        assert m, url
        dbconf = (f'{{"ENGINE": "django.db.backends.postgresql", "NAME": "{m[4]}", '
                  f'"USER": "{m[1]}", "HOST": "{m[2]}", "PORT": "{m[3]}"}}')
    else:
        dbconf = (f'{{"ENGINE": "django.db.backends.sqlite3", "NAME": "{root / "po.db"}", '
                  '"OPTIONS": {"timeout": 30}}')
    (root / "po_settings.py").write_text(PO_SETTINGS.format(db=dbconf, host=HOST,
                                                            port=sink.port))
    (root / "po_enqueue.py").write_text(PO_ENQUEUE.format(sender=SENDER, domain=DOMAIN))
    env = {**os.environ, "PYTHONPATH": str(root), "DJANGO_SETTINGS_MODULE": "po_settings"}
    rec: dict[str, Any] = {"label": label, "kind": "post-office", "db": db, "procs": procs,
                           "msgs": n}

    def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, timeout=timeout,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.decode()[-2000:]}")
        return out

    run([*django_admin(), "migrate", "-v", "0"])
    lock = str(root / "po.lock")
    send = [*django_admin(), "send_queued_mail", "--processes", str(procs), "-L", lock]
    c0 = children_cpu()
    run(send)  # empty queue: what Django's start-up and one query cost
    rec["startup_cpu"] = children_cpu() - c0
    t0 = time.perf_counter()
    run([sys.executable, str(root / "po_enqueue.py"), str(n), str(SIZE), uuid.uuid4().hex[:8]])
    rec["enqueue_s"] = time.perf_counter() - t0
    rec["busy_before"] = wait_quiet(quiet)
    rec["probe_ms"] = probe_ms()
    base = sink.count()
    meter = Meter([], pg.proc.pid if db == "postgresql" and pg.proc else None)
    c0 = children_cpu()
    meter.start()
    p = subprocess.Popen(send, cwd=root, env=env, stdout=(root / "send.log").open("wb"),
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        first, last, got = watch_sink(sink, base, n, timeout=max(180, n / 30),
                                      alive=lambda: p.poll() is None)
        deadline = time.perf_counter() + 120
        while p.poll() is None and time.perf_counter() < deadline:  # recording the results
            time.sleep(0.005)
        done = time.perf_counter() if p.poll() is not None else None
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    rec.update(meter.stop(extra_cpu=children_cpu() - c0 - rec["startup_cpu"]))
    rec["delivered"] = got
    rec["sink_total"] = sink.count() - base
    rec["span_arrivals"] = (last - first) if first is not None and last is not None else None
    rec["span"] = (done - first) if first is not None and done is not None else None
    check = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); "
         "from post_office.models import Email; from collections import Counter; "
         "print(dict(Counter(Email.objects.values_list('status', flat=True))))"],
        cwd=root, env=env, capture_output=True, timeout=120, check=False)
    rec["statuses"] = check.stdout.decode().strip() or check.stderr.decode()[-300:]
    rec["ok"] = got == n and rec["span"] is not None
    return rec


# --------------------------------------------------------------------------- profile summary
AREAS = [
    ("psycopg/", "psycopg (PostgreSQL driver)"),
    ("sqlalchemy/", "SQLAlchemy (statements, results)"),
    ("sqlite3/", "sqlite3 module"),
    ("smtplib.py", "smtplib (the SMTP session)"),
    ("socket.py", "smtplib (the SMTP session)"),
    ("postroom/transports/", "postroom SMTP transport"),
    ("postroom/queue/sql.py", "postroom queue (claim, finish)"),
    ("postroom/queue/commit.py", "postroom queue (claim, finish)"),
    ("postroom/queue/lease.py", "postroom queue (claim, finish)"),
    ("postroom/queue/finish.py", "postroom queue (claim, finish)"),
    ("postroom/queue/worker.py", "postroom worker (deliver, decide)"),
    ("postroom/routing/", "postroom routing (rules, health, breaker)"),
    ("postroom/queue/limits.py", "postroom limits"),
    ("postroom/", "postroom (other)"),
    ("json/", "json (JSON columns)"),
    ("logging/", "logging (one line per delivery)"),
    ("asyncio/", "asyncio (event loop)"),
    ("concurrent/futures/", "thread hand-offs"),
    ("threading.py", "thread hand-offs"),
    ("queue.py", "thread hand-offs"),
]
WRAPPERS = ("threading.py", "concurrent/futures/thread.py", "asyncio/runners.py", "typer/",
            "click/", "postroom/cli.py", "<module>", "asyncio/base_events.py",
            "asyncio/events.py")


def summarize_profile(raw: Path, n: int, rate: int = 100, top: int = 25) -> dict[str, Any]:
    """GIL samples per area (innermost matching frame) and per function (inclusive), as µs of
    GIL time per delivered message."""
    areas: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_c: Counter[str] = Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return {"error": f"no profile at {raw}"}
    for line in lines:
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        funcs = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]
        if not funcs:
            continue
        total += c
        self_c[funcs[-1]] += c
        for f in set(funcs):
            if not any(w in f for w in WRAPPERS):
                incl[f] += c
        area = next((a for f in reversed(funcs) for key, a in AREAS if key in f), None)
        areas[area or "other: " + funcs[-1]] += c
    us = 1e6 / rate / max(n, 1)
    return {"samples": total, "gil_us_per_msg": total * us,
            "areas": [(a, c * us) for a, c in areas.most_common(14)],
            "inclusive": [(f, c * us) for f, c in incl.most_common(top)],
            "self": [(f, c * us) for f, c in self_c.most_common(15)]}


# --------------------------------------------------------------------------- report
def rate(r: dict[str, Any]) -> float:
    return r["msgs"] / r["span"] if r.get("span") else float("nan")


def us(r: dict[str, Any], key: str) -> float:
    return r[key] / r["msgs"] * 1e6


def extra_us(r: dict[str, Any], ref: dict[str, Any]) -> float:
    """CPU per message (worker + database) of ``r`` over that of ``ref``."""
    return us(r, "cpu") + us(r, "pg_cpu") - us(ref, "cpu") - us(ref, "pg_cpu")


def log_index_lines(recs: list[dict[str, Any]], base: dict[Any, dict[str, Any]]) -> list[str]:
    """The plain 1-worker runs' enqueue and delivery rates divided by those of the same run
    with the email log's indexes off, per database (``base``: 1-process runs by report key);
    no lines when the run had no "log indexes off" row."""
    out = []
    for r in recs:
        if r["kind"] != "postroom" or r.get("log_indexes", True) or r.get("tuning"):
            continue
        on = base.get(("postroom", r["db"], (), True))
        if on is None:
            continue
        enq = (on["msgs"] / on["enqueue_s"]) / (r["msgs"] / r["enqueue_s"])
        dlv = rate(on) / rate(r)

        def mark(x: float) -> str:
            return "met" if x >= LOG_INDEX_TARGET else "missed"

        out.append(f"- {r['db']}, 1 worker: enqueue {enq:.2f}× (**{mark(enq)}**; "
                   f"{on['msgs'] / on['enqueue_s']:,.0f} / {r['msgs'] / r['enqueue_s']:,.0f} "
                   f"msg/s), delivery {dlv:.2f}× (**{mark(dlv)}**; {rate(on):,.0f} / "
                   f"{rate(r):,.0f} msg/s)")
    if not out:
        return []
    return ["", f"Postroom with/without log indexes (issue 13, target ≥ {LOG_INDEX_TARGET:g}×): "
            "each plain run divided by the same run on a database without the email log's "
            "indexes and triggers (migration 0008, dropped by bench/_logindex.py before the "
            "enqueue). Enqueue = the pre-enqueue through the group commit (1,000 concurrent "
            "callers, in this process); delivery = the rate above, whose workers also run the "
            "text indexer chore.", "", *out]


def report(env: dict[str, Any], recs: list[dict[str, Any]],
           profs: list[dict[str, Any]]) -> str:
    def key(r: dict[str, Any]) -> tuple[str, str, tuple[str, ...], bool]:
        return r["kind"], r["db"], tuple(r.get("tuning") or ()), r.get("log_indexes", True)

    base = {key(r): r for r in recs if r["procs"] == 1 and not r.get("fallback")}
    pg1 = base.get(("postroom", "postgresql", (), True))
    L = [BEGIN, "", "## Delivery workers: throughput on PostgreSQL and SQLite, vs "
         "django-post-office", "",
         f"Generated by `python bench/{NAME} --messages {env['n']}` on {env['date']} "
         f"(source {env['src']}; load average before: {env['load']}; 2 cores). "
         f"{env['n']:,} pre-enqueued 2 KB messages per run, one recipient each, delivered to "
         "one `smtp-sink -c` over reused SMTP connections; a fresh database per run. Rate = "
         "messages / (time every message is recorded as sent − first arrival at the sink): "
         "start-up is not counted, recording the results is (for post-office: until "
         "`send_queued_mail` exits, since it records a batch's results after sending it). CPU "
         "from /proc: the sending processes (all threads), the PostgreSQL server (postmaster + "
         "backends) and the whole box (includes the sink and this harness).", "",
         "| run | processes | msg/s | vs 1 process, same kind & db | worker CPU µs/msg | "
         "PostgreSQL µs/msg | box µs/msg | box busy before | check |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        ref = base.get(key(r))
        ratio = (f"{rate(r) / rate(ref):.2f}×" if ref is not None and ref is not r
                 and not r.get("fallback") else "1.00×" if ref is r else "")
        if r.get("fallback") and pg1 is not None:
            ratio = f"{rate(r) / rate(pg1):.2f}× of plain"
        pgc = f"{us(r, 'pg_cpu'):,.0f}" if r["db"] == "postgresql" else "–"
        check = "ok" if r["ok"] else f"FAILED: {r.get('delivered')} arrived, {r.get('statuses')}"
        L.append(f"| {r['label']} | {r['procs']} | {rate(r):,.0f} | {ratio} | "
                 f"{us(r, 'cpu'):,.0f} | {pgc} | {us(r, 'box_cpu'):,.0f} | "
                 f"{r['busy_before'] * 100:.0f}% | {check} |")
    L += ["", "Side by side (same database kind, same process count):", "",
          "| database | processes | Postroom msg/s | post-office msg/s | Postroom ÷ post-office |"
          " Postroom CPU µs/msg (worker + db) | post-office CPU µs/msg (sender + db) |",
          "|---|---|---|---|---|---|---|"]
    for r in recs:
        if key(r) != ("postroom", r["db"], (), True) or r.get("fallback"):
            continue
        po = next((x for x in recs if x["kind"] == "post-office" and x["db"] == r["db"]
                   and x["procs"] == r["procs"]), None)
        if po is None:
            continue
        L.append(f"| {r['db']} | {r['procs']} | {rate(r):,.0f} | {rate(po):,.0f} | "
                 f"{rate(r) / rate(po):.2f}× | {us(r, 'cpu') + us(r, 'pg_cpu'):,.0f} | "
                 f"{us(po, 'cpu') + us(po, 'pg_cpu'):,.0f} |")
    fb = [r for r in recs if r.get("fallback")]
    L += log_index_lines(recs, base)
    for tuning in sorted({key(r)[2] for r in recs if r["kind"] == "postroom"}):
        runs = {r["procs"]: r for r in recs
                if key(r) == ("postroom", "postgresql", tuning, True) and not r.get("fallback")}
        pg = {n: rate(r) for n, r in runs.items()}
        one, two = pg.get(1, float("nan")), pg.get(2, float("nan"))
        how = ("default [delivery]" if not tuning else
               ", ".join(t.replace("=", " ") for t in tuning))
        why = ""
        if 2 in runs and two / one < TARGET_TWO:
            # Two workers share the box with PostgreSQL and the sink: at the box CPU per
            # message of their run, 2 cores cannot do more than this, whatever the workers.
            box = 2e6 / us(runs[2], "box_cpu")
            if TARGET_TWO * one > box:
                why = (f"; {TARGET_TWO}× one worker is {TARGET_TWO * one:,.0f} msg/s, more than "
                       f"this 2-core box can do at the 2-worker run's {us(runs[2], 'box_cpu'):,.0f}"
                       f" µs of box CPU per message ({box:,.0f} msg/s): they reached "
                       f"{two / box:.0%} of that bound")
        L += ["", f"Targets (issue 4), {how}: one worker ≥ 2,000 msg/s: "
              f"**{'met' if one >= TARGET_ONE else 'missed'}** ({one:,.0f} msg/s on "
              f"PostgreSQL); 2 workers ≥ {TARGET_TWO}× one: "
              f"**{'met' if two / one >= TARGET_TWO else 'missed'}** ({two / one:.2f}×{why})."]
    for r in recs:
        if key(r)[:2] == ("postroom", "postgresql") and key(r)[3] and r["procs"] == 1 \
                and not r.get("fallback"):
            how = ("default [delivery]" if not r.get("tuning") else
                   ", ".join(t.replace("=", " ") for t in r["tuning"]))
            L += ["", f"CPU bounds, 1 worker on PostgreSQL, {how}: a worker process uses at "
                  f"most one core, so at {us(r, 'cpu'):,.0f} µs/msg it cannot pass "
                  f"{1e6 / us(r, 'cpu'):,.0f} msg/s (measured {rate(r):,.0f}: "
                  f"{rate(r) * us(r, 'cpu') / 1e6:.2f} core busy, the rest waiting); the box "
                  f"(2 cores; everything on it, other sessions' work included) at "
                  f"{us(r, 'box_cpu'):,.0f} µs/msg cannot pass "
                  f"{2e6 / us(r, 'box_cpu'):,.0f} msg/s."]
    if fb and pg1 is not None:
        L += ["", "Fallback path (primary down: a closed port first in the chain, 1 worker, "
              "PostgreSQL): extra CPU per message over the plain run, worker + database: "
              + "; ".join(
                  f"breaker {r['fallback']}: {extra_us(r, pg1):+,.0f} µs "
                  f"({rate(r):,.0f} msg/s, attempts {r.get('attempts')})" for r in fb) + "."]
    for prof in profs:
        if "error" in prof:
            L += ["", f"py-spy: {prof['error']}"]
            continue
        how = ("default [delivery]" if not prof["tuning"] else
               ", ".join(t.replace("=", " ") for t in prof["tuning"]))
        L += ["", f"### Where one worker's time goes (py-spy, PostgreSQL, 1 worker, {how})", "",
              f"An extra run of {prof['msgs']:,} messages, not measured above "
              f"({prof['rate_under_spy']:,.0f} msg/s under the profiler; box "
              f"{prof['busy_before'] * 100:.0f}% busy before), sampled at 100 Hz, only the "
              f"thread holding the GIL (`--gil`): {prof['gil_us_per_msg']:,.0f} µs of GIL time "
              "per message (on a busy box this includes time the holder was descheduled). "
              "Areas are charged by the innermost matching frame; functions are inclusive "
              "(thread and loop wrappers left out) or self.", "",
              "| GIL µs/msg | area |", "|---|---|"]
        L += [f"| {v:,.0f} | {a} |" for a, v in prof["areas"]]
        L += ["", "| GIL µs/msg incl. | function |", "|---|---|"]
        L += [f"| {v:,.0f} | `{f}` |" for f, v in prof["inclusive"][:16]]
        L += ["", "| GIL µs/msg self | function |", "|---|---|"]
        L += [f"| {v:,.0f} | `{f}` |" for f, v in prof["self"][:10]]
    d = DeliverySettings()
    L += ["", f"Settings: `postroom worker` with the default `[delivery]` (concurrency "
          f"{d.concurrency}, claim_batch {d.claim_batch}) and `pool_size` sessions per "
          "connection, each worker its own config and data folder (as on separate nodes) "
          "on the shared database; PostgreSQL "
          "15 with fsync on (tests/pgserver.py); SQLite WAL, synchronous = FULL. "
          "post-office " + env["versions"].get("django-post-office", "?") + " on Django "
          + env["versions"].get("Django", "?") + ": `send_queued_mail --processes N`, "
          "BATCH_SIZE 1000, THREADS_PER_PROCESS 5 (default), LOG_LEVEL 2 (default: a Log row "
          "per sent mail, as Postroom's attempt row), Django's SMTP backend; its CPU excludes "
          "Django's start-up (one run on an empty queue, subtracted).", "", END]
    return "\n".join(L) + "\n"


def write_block(text: str, out: Path) -> None:
    _report.write_block(NAME, text, out)


def render_saved(files: list[Path], out: str) -> int:
    runs: dict[str, dict[str, Any]] = {}
    env: dict[str, Any] = {}
    profs: list[dict[str, Any]] = []
    dates = []
    for f in files:
        data = json.loads(f.read_text())
        env = env or data["env"]
        e = data["env"]
        dates.append(f"{e['date']} (source {e['src']}, load average {e['load']})")
        runs.update({r["label"]: r for r in data["runs"]})
        profs = data.get("profiles") or profs
    env["date"] = "; ".join(dates) + ", merged"
    env["src"] = "per run above"
    env["load"] = "per run above"
    text = report(env, list(runs.values()), profs)
    print(text)
    if out != "-":
        write_block(text, Path(out))
    return 0


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000, help="per run")
    ap.add_argument("--only", default="", help="comma-separated runs to keep: a run's id "
                    "(exact: pg-1, pg-1-noidx, sqlite-1, sqlite-1-noidx, pg-2, pg-1-c40, "
                    "po-pg-1...) or part of its label, e.g. 'postroom' or 'sqlite'")
    ap.add_argument("--no-post-office", action="store_true")
    ap.add_argument("--no-fallback", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--quiet-wait", dest="quiet", type=float, default=20.0,
                    help="wait up to S seconds for the box to be <20%% busy before each run")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="markdown file for the report block ('-' = print only)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--delivery", action="append", default=[], metavar="KEY=VALUE",
                    help="extra [delivery] setting for the workers, e.g. concurrency=50")
    ap.add_argument("--from-json", nargs="+", metavar="RESULTS", default=None,
                    help="only render the report from saved results.json files; a run in a "
                    "later file replaces the run of the same label in an earlier one (re-run "
                    "the rows a busy box spoiled)")
    args = ap.parse_args()
    DELIVERY_EXTRA.extend(args.delivery)
    if args.from_json:
        return render_saved([Path(f) for f in args.from_json], args.out)
    n = args.messages
    for tool in ("smtp-sink",):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} not found: apt-get install postfix")
    work = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    os.chmod(work, 0o755)
    say(f"work dir {work}; load average {os.getloadavg()}")
    env = {"n": n, "date": time.strftime("%Y-%m-%d %H:%M"), "src": src_hash(),
           "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()), "versions": versions()}
    try:
        import importlib.metadata as md
        env["versions"]["django-post-office"] = md.version("django-post-office")
        env["versions"]["Django"] = md.version("Django")
    except Exception:
        pass
    # (id for --only, label, arguments); each "log indexes off" run right after its
    # plain one, so the pair sees the same state of the (shared) box.
    plan: list[tuple[str, str, Any]] = [
        ("pg-1", "Postroom, PostgreSQL, 1 worker", dict(workers=1, db="postgresql")),
        ("pg-1-noidx", "Postroom, PostgreSQL, 1 worker, log indexes off",
         dict(workers=1, db="postgresql", log_indexes=False)),
        ("pg-2", "Postroom, PostgreSQL, 2 workers", dict(workers=2, db="postgresql")),
        ("pg-4", "Postroom, PostgreSQL, 4 workers", dict(workers=4, db="postgresql")),
        ("sqlite-1", "Postroom, SQLite, 1 worker", dict(workers=1, db="sqlite")),
        ("sqlite-1-noidx", "Postroom, SQLite, 1 worker, log indexes off",
         dict(workers=1, db="sqlite", log_indexes=False)),
        # What fewer messages in flight give (fewer per commit): the old default.
        ("pg-1-c40", "Postroom, PostgreSQL, 1 worker, concurrency 40",
         dict(workers=1, db="postgresql", tuning=TUNED)),
        ("pg-2-c40", "Postroom, PostgreSQL, 2 workers, concurrency 40",
         dict(workers=2, db="postgresql", tuning=TUNED)),
        ("sqlite-1-c40", "Postroom, SQLite, 1 worker, concurrency 40",
         dict(workers=1, db="sqlite", tuning=TUNED)),
    ]
    if not args.no_fallback:
        plan += [
            ("pg-1-down-closed", "Postroom, PostgreSQL, 1 worker, primary down, breaker closed",
             dict(workers=1, db="postgresql", fallback="closed")),
            ("pg-1-down-open", "Postroom, PostgreSQL, 1 worker, primary down, breaker open",
             dict(workers=1, db="postgresql", fallback="open")),
        ]
    if not args.no_post_office:
        plan += [(f"po-{'pg' if db == 'postgresql' else db}-{p}",
                  f"post-office, {db}, {p} process{'es' if p > 1 else ''}",
                  dict(procs=p, db=db, po=True))
                 for db, p in (("postgresql", 1), ("postgresql", 2), ("postgresql", 4),
                               ("sqlite", 1))]
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        chosen = [run for run in plan
                  if any(k == run[0] or k in run[1].lower() for k in keys)]
        if not chosen:
            shutil.rmtree(work, ignore_errors=True)
            sys.exit(f"--only {args.only!r} matches no run; ids: "
                     + ", ".join(i for i, _, _ in plan))
        plan = chosen
    sink = Sink(free_port(), work / "sink.log")
    pg = PgServer().start()
    recs: list[dict[str, Any]] = []
    profs: list[dict[str, Any]] = []
    try:
        for _, label, kw in plan:
            say(f"-- {label} (load {os.getloadavg()[0]:.2f})")
            if kw.pop("po", False):
                r = run_post_office(label, work, pg, sink, n, kw["procs"], kw["db"],
                                    quiet=args.quiet)
            else:
                r = run_postroom(label, work, pg, sink, n, quiet=args.quiet, **kw)
            recs.append(r)
            say(f"   {rate(r):,.0f} msg/s, cpu {us(r, 'cpu'):,.0f} µs/msg, pg "
                f"{us(r, 'pg_cpu'):,.0f}, box {us(r, 'box_cpu'):,.0f}; ok={r['ok']} "
                f"{r.get('statuses')} {r.get('attempts', '')}")
        for tuning in ((), TUNED) if not args.no_profile else ():
            how = "default" if not tuning else "tuned"
            raw = work / f"profile-pg-1worker-{how}.txt"
            say(f"-- profile: Postroom, PostgreSQL, 1 worker ({how}), under py-spy")
            r = run_postroom(f"profile {how}", work, pg, sink, n, 1, "postgresql",
                             quiet=args.quiet, profile=raw, tuning=tuning)
            p = {"msgs": n, "tuning": list(tuning), **summarize_profile(raw, n)}
            p["rate_under_spy"], p["busy_before"] = rate(r), r["busy_before"]
            profs.append(p)
            say(json.dumps(p, indent=1)[:3000])
    finally:
        sink.stop()
        pg.stop()
    (work / "results.json").write_text(json.dumps({"env": env, "runs": recs, "profiles": profs},
                                                  indent=1, default=str))
    text = report(env, recs, profs)
    print(text)
    if args.out != "-":
        write_block(text, Path(args.out))
        say(f"report block written to {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"kept {work}")
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
