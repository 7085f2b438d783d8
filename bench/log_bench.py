#!/usr/bin/env python3
"""The email log at scale: server time of the log's queries on a big database, and what its
indexes cost the queue.

    .venv/bin/python bench/log_bench.py                      # SQLite, 1,000,000 messages
    .venv/bin/python bench/log_bench.py --pg -n 200000       # PostgreSQL (tests/pgserver.py)
    .venv/bin/python bench/log_bench.py --pg-url postgresql://u@h/db
    .venv/bin/python bench/log_bench.py --ingest             # enqueue/delivery, indexes on/off

Query mode: a fresh database is filled with N messages (2 KB bodies; senders, recipients,
subjects, statuses, apps, connections and tags varied; creation times spread over 60 days,
mail still waiting only in the last 5 (the default max_lifetime: older waiting mail has
failed, as the worker fails it at its expiry); one attempt for every message that was
tried), in transactions of 20,000 rows with the
indexes and triggers of migration 0008 live (what a real log pays), then the text index is
built from the pending rows by ``Log.index_pending`` (timed). Then, warm (each query
run once first), every query postroom.store.log serves a page with is run ``--runs`` times
with a different value each run, timing the call of :class:`Log` (server time: no HTTP, no
template): p50 and p95 in milliseconds. Targets: p95 <= 50 ms for text and recipient
search, <= 100 ms for the rest. Rows "the same, no window" run the query above them with
``Log.window`` off (the page asked of the whole log at once, as before session 6's L2).

Ingest mode: ``--ingest-n`` messages enqueued by 100 concurrent callers through the queue's
group commit, then delivered by one in-process Worker to the memory transport; once on a
database with migration 0008's indexes and triggers and the indexer chore running beside
them as in ``postroom serve`` (``store.log.index_loop``), once with all of it dropped (the
"without" row); the ratio is the cost of keeping the log searchable (target >= 0.9x). The
"with" row also reports how long after the last delivery the text index had caught up; a
third row, "trigger", has only the insert trigger that fills ``log_pending`` (no indexer;
SQLite has none since migration 0017, so there it is the "without" row again): the
enqueue's own share of the text index; a fourth, "fullspeed", runs the indexer without
its duty cycle (``store.log.DUTY`` = 1: as before session 6), the "before" of that change.

A PostgreSQL started here (``--pg``) is stopped in a finally block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests"), str(REPO / "bench")]

from _logindex import drop_log_indexes  # noqa: E402 - bench/_logindex.py
from sqlalchemy import Engine, delete, func, insert, select  # noqa: E402

from postroom.store.addresses import BACKFILL  # noqa: E402
from postroom.store.db import make_engine, migrate, write_transaction  # noqa: E402
from postroom.store.log import Log, LogFilter  # noqa: E402
from postroom.store.schema import attempts, control, messages  # noqa: E402

DAY = 86400.0
LIFETIME = 5 * DAY  # [delivery] max_lifetime's default: no message waits longer
STATUS_MIX = [("sent", 86), ("failed", 5), ("partial", 2), ("deferred", 3), ("queued", 4)]
APPS = ["shop", "blog", "crm", "billing", "monitor", None]
CONNECTIONS = ["primary", "backup", "sendgrid", "m365"]
TAGS = ["welcome", "reset", "invoice", "newsletter", "alert", "receipt"]
SUBJECTS = ["Your order {n} has shipped", "Reset your password", "Invoice {n} for March",
            "Weekly digest #{n}", "Alert: disk usage at {n}%", "Welcome aboard, {name}",
            "Receipt for payment {n}", "Meeting notes {n}"]
WORDS = ["alpha", "brisk", "cobalt", "delta", "ember", "fjord", "gale", "harbor", "iris",
         "juniper", "kelp", "lumen", "meadow", "nectar", "onyx", "prism"]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


class Corpus:
    """The values the fill draws from, kept so that queries can ask for real ones."""

    def __init__(self, rnd: random.Random) -> None:
        domains = [f"{w}{i}.example" for i, w in enumerate(WORDS)] + ["gmail.test", "corp.test"]
        self.senders = [f"{rnd.choice(WORDS)}.{i}@{rnd.choice(domains[:8])}" for i in range(200)]
        self.recipients = [f"{rnd.choice(WORDS)}{i}@{rnd.choice(domains)}" for i in range(50_000)]
        self.names = [w.title() for w in WORDS]


def fill(engine: Engine, n: int, rnd: random.Random, corpus: Corpus) -> float:
    now = time.time()
    statuses = [s for s, w in STATUS_MIX for _ in range(w)]
    body = bytes(rnd.getrandbits(8) % 94 + 33 for _ in range(2048))
    started = time.perf_counter()
    batch = 20_000
    for start in range(0, n, batch):
        rows: list[dict[str, Any]] = []
        tried: list[dict[str, Any]] = []
        for i in range(start, min(n, start + batch)):
            # inserted in time order, as a queue is (a few seconds of jitter)
            created = now - 60 * DAY * (1 - i / n) + rnd.random() * 5
            status = rnd.choice(statuses)
            if status in ("queued", "deferred") and created + LIFETIME < now:
                status = "failed"  # as the worker fails mail still waiting at its expiry
            rcpts = rnd.sample(corpus.recipients, rnd.choice((1, 1, 1, 2, 3)))
            sender = rnd.choice(corpus.senders)
            subject = rnd.choice(SUBJECTS).format(n=rnd.randint(1000, 999_999),
                                                  name=rnd.choice(corpus.names))
            via = rnd.choice(CONNECTIONS) if status != "queued" else None
            mid = uuid.uuid4().hex
            rows.append({
                "id": mid, "created_at": created, "updated_at": created, "status": status,
                "next_attempt_at": created, "expires_at": created + LIFETIME,
                "attempt_count": 0 if via is None else 1, "sender": sender,
                "recipients": rcpts,
                "rcpt_status": {r: {"state": "sent" if status == "sent" else "pending"}
                                for r in rcpts},
                "source": "bench", "app": rnd.choice(APPS), "connection": None,
                "message_id": f"<{uuid.uuid4().hex}@{sender.split('@')[1]}>",
                "subject": subject, "from_header": sender, "to_header": ", ".join(rcpts),
                "size": len(body), "raw": body, "last_error": (
                    "550 5.1.1 user unknown" if status == "failed" else None),
                "tags": rnd.sample(TAGS, rnd.choice((0, 1, 1, 2))), "meta": None,
                "priority": 0, "via": via,
            })
            if via is not None:
                tried.append({
                    "message_id": mid, "connection": via, "started_at": created + 1,
                    "ended_at": created + 2, "outcome": status, "reply_code": 250,
                    "reply_text": "ok", "error_code": None, "permanent": False,
                    "recipients": {}, "transcript": "S: 250 ok"})
        with write_transaction(engine) as conn:
            conn.execute(insert(messages), rows)
            if tried:
                conn.execute(insert(attempts), tried)
        print(f"  filled {min(n, start + batch):,}/{n:,} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def build_index(engine: Engine) -> float:
    """Index every pending message (what the indexer chore does over time), timed."""
    log = Log(engine)
    started = time.perf_counter()
    done = 0
    while n := log.index_pending(20_000):
        done += n
        print(f"  indexed {done:,} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)
    took = time.perf_counter() - started
    with write_transaction(engine) as conn:  # statistics of the drained pending table
        conn.exec_driver_sql("ANALYZE")
    return took


def measure(fn: Callable[[int], Any], runs: int) -> tuple[float, float]:
    fn(0)  # warm
    times = []
    for i in range(runs):
        t = time.perf_counter()
        fn(i + 1)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), percentile(times, 95)


def queries(engine: Engine, corpus: Corpus, rnd: random.Random,
            runs: int) -> list[tuple[str, float, float, float]]:
    log = Log(engine)
    log.page(LogFilter(to=corpus.recipients[0]))  # log_addresses found complete, once
    trigrams = Log(engine)  # the same searches as before migration 0011: see trigram_path
    now = time.time()
    ids = [r["id"] for r in log.page(LogFilter(), limit=200)]
    first = log.page(LogFilter(), limit=50)
    cursor = (first[-1]["created_at"], first[-1]["id"])

    def pick(xs: list[Any]) -> Any:
        return xs[rnd.randrange(len(xs))]

    cases: list[tuple[str, float, Callable[[int], Any]]] = [
        ("log page, no filter", 100, lambda i: log.page(LogFilter())),
        ("page 2 via cursor", 100, lambda i: log.page(LogFilter(), before=cursor)),
        ("status = failed", 100, lambda i: log.page(LogFilter(status="failed"))),
        ("status = queued", 100, lambda i: log.page(LogFilter(status="queued"))),
        ("app", 100, lambda i: log.page(LogFilter(app=pick(APPS[:-1])))),
        ("connection", 100, lambda i: log.page(LogFilter(connection=pick(CONNECTIONS)))),
        ("sender", 100, lambda i: log.page(LogFilter(sender=pick(corpus.senders)))),
        ("  the same, no window (before session 6's L2)", 100,
         lambda i: log.page(LogFilter(sender=pick(corpus.senders)))),
        ("  the same, trigram path (session 5)", 100,
         lambda i: trigrams.page(LogFilter(sender=pick(corpus.senders)))),
        ("tag", 100, lambda i: log.page(LogFilter(tag=pick(TAGS)))),
        ("  the same, no window (before session 6's L2)", 100,
         lambda i: log.page(LogFilter(tag=pick(TAGS)))),
        ("time range (one day, 30 days ago)", 100, lambda i: log.page(LogFilter(
            since=now - 30 * DAY - i * 3600, until=now - 29 * DAY - i * 3600))),
        ("recipient search (an address)", 50,
         lambda i: log.page(LogFilter(to=pick(corpus.recipients)))),
        ("  the same, no window (before session 6's L2)", 50,
         lambda i: log.page(LogFilter(to=pick(corpus.recipients)))),
        ("  the same, trigram path (session 5)", 50,
         lambda i: trigrams.page(LogFilter(to=pick(corpus.recipients)))),
        ("recipient search (part of one)", 50,
         lambda i: log.page(LogFilter(to=pick(corpus.recipients).split("@")[0]))),
        ("text search (an order number)", 50,
         lambda i: log.page(LogFilter(text=str(rnd.randint(100_000, 999_999))))),
        ("text search (a common word)", 50, lambda i: log.page(LogFilter(text="password"))),
        ("  the same, no window (before session 6's L2)", 50,
         lambda i: log.page(LogFilter(text="password"))),
        ("status + app + text", 100, lambda i: log.page(LogFilter(
            status="sent", app=pick(APPS[:-1]), text="invoice"))),
        ("  the same, no window (before session 6's L2)", 100, lambda i: log.page(LogFilter(
            status="sent", app=pick(APPS[:-1]), text="invoice"))),
        ("count, capped at 10,000", 100,
         lambda i: log.count(LogFilter(status="sent"), cap=10_000)),
        ("message page (get)", 100, lambda i: log.get(pick(ids))),
        ("dashboard", 100, lambda i: (  # what postroom.ops.queue.dashboard reads
            log.overview([now - DAY, now - 7 * DAY, now - 30 * DAY]),
            log.series(now - 7 * DAY), log.latest_failures())),
    ]
    out = []
    for label, target, fn in cases:
        with trigram_path(engine, "trigram path" in label), no_window("no window" in label):
            p50, p95 = measure(fn, runs)
        print(f"  {label:40s} p50 {p50:8.2f} ms  p95 {p95:8.2f} ms  (target {target})",
              file=sys.stderr, flush=True)
        out.append((label, p50, p95, target))
    return out


@contextlib.contextmanager
def trigram_path(engine: Engine, on: bool) -> Iterator[None]:
    """With ``on``: whole-address searches of a Log made meanwhile take the trigram path of
    session 5 (before log_addresses), as while migration 0011's backfill is unfinished (its
    control row present): the same database, before and after, in the same run."""
    if not on:
        yield
        return
    with write_transaction(engine) as conn:
        conn.execute(insert(control).values(name=BACKFILL, value="0", updated_at=time.time()))
    try:
        yield
    finally:
        with write_transaction(engine) as conn:
            conn.execute(delete(control).where(control.c.name == BACKFILL))


@contextlib.contextmanager
def no_window(on: bool) -> Iterator[None]:
    """With ``on``: pages are not looked for among the newest rows first (Log.window), as
    before session 6 (L2): the same database, before and after, in the same run."""
    if not on:
        yield
        return
    real = Log.window
    Log.window = lambda *_a, **_k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Log.window = real  # type: ignore[method-assign]


def pending_trigger_only(engine: Engine) -> None:
    """The "trigger" row: everything of drop_log_indexes gone but the log_pending trigger
    (PostgreSQL; SQLite has none since migration 0017: a rowid mark instead)."""
    drop_log_indexes(engine)
    if engine.dialect.name != "postgresql":
        return
    with write_transaction(engine) as conn:
        conn.exec_driver_sql("CREATE TRIGGER log_pending_ins AFTER INSERT ON messages "
                             "FOR EACH ROW EXECUTE FUNCTION log_pending_row()")


def sent(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(messages.c.status == "sent"))
                   .scalar_one())


def cpu_clock(pg_pid: int | None) -> Callable[[], float]:
    """CPU seconds so far of this process (every thread: the group commit, SQLite, the
    indexer) and of the PostgreSQL server at ``pg_pid`` (its backends, live and exited):
    what a run costs, which a busy shared box disturbs far less than its wall time."""
    from postfix_instance import children_of, proc_cpu  # bench/postfix_instance.py

    def read() -> float:
        total = time.process_time()
        if pg_pid is not None:
            total += proc_cpu(pg_pid, children=True)
            for child in children_of(pg_pid):
                with contextlib.suppress(OSError, IndexError, ValueError):  # exited meanwhile
                    total += proc_cpu(child)
        return total

    return read


async def _ingest_run(engine: Engine, n: int, rnd: random.Random, corpus: Corpus,
                      indexer: bool, cpu: Callable[[], float]) -> dict[str, float]:
    from postroom.envelope import Envelope
    from postroom.message import compose
    from postroom.queue.sql import Queue
    from postroom.queue.worker import Worker
    from postroom.settings import DeliverySettings
    from postroom.transports import base, memory

    queue = Queue(engine)
    filler = "x" * 1900 + "\n"
    envs = []
    for i in range(n):
        rcpt = rnd.choice(corpus.recipients)
        sender = rnd.choice(corpus.senders)
        raw = compose(sender=sender, to=[rcpt], subject=f"Your order {i} has shipped",
                      text=filler)
        envs.append(Envelope(sender, [rcpt], raw, source="bench", app=rnd.choice(APPS)))
    sem = asyncio.Semaphore(100)

    async def one(env: Envelope) -> None:
        async with sem:
            await queue.enqueue(env)

    from postroom.store.log import index_loop

    chore = asyncio.create_task(index_loop(queue.log)) if indexer else None
    out: dict[str, float] = {}
    t, c = time.perf_counter(), cpu()
    await asyncio.gather(*(one(e) for e in envs))
    out["enqueue"] = n / (time.perf_counter() - t)
    out["enqueue_cpu_us"] = (cpu() - c) / n * 1e6
    transport = memory.Transport(memory.Settings(name="primary"),
                                 base.TransportContext(ehlo_name="bench"))
    worker = Worker(queue, {"primary": transport}, DeliverySettings(poll_interval=0.02),
                    default_connection="primary", owner="bench:1")
    t, c = time.perf_counter(), cpu()
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(600):
            while sent(engine) < n:  # not counts(): the "without" row has no rollups
                await asyncio.sleep(0.05)
        out["delivery"] = n / (time.perf_counter() - t)
        t = time.perf_counter()
        async with asyncio.timeout(600):
            while indexer and queue.log.pending():
                await asyncio.sleep(0.05)
        out["index_lag"] = time.perf_counter() - t
        # Up to the index's catching up: its work counts, wherever it fell.
        out["delivery_cpu_us"] = (cpu() - c) / n * 1e6
    finally:
        if chore is not None:
            chore.cancel()
            await asyncio.gather(chore, return_exceptions=True)
        await worker.stop(grace=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await queue.writer.aclose()
        memory.Transport.outboxes.clear()
    return out


def ingest_rows(new_url: Callable[[], str], n: int, rounds: int,
                cpu: Callable[[], float]) -> list[dict[str, Any]]:
    """Alternating with/without runs, each on a fresh database: the best rate of each and
    the median CPU per message."""
    rnd = random.Random(7)
    corpus = Corpus(rnd)
    import postroom.store.log as store_log

    duty = store_log.DUTY
    results: dict[str, list[dict[str, float]]] = {
        "with": [], "without": [], "trigger": [], "fullspeed": []}
    for _ in range(rounds):
        for kind in results:
            engine = make_engine(new_url())
            migrate(engine)
            if kind == "without":
                drop_log_indexes(engine)
            elif kind == "trigger":
                pending_trigger_only(engine)
            # "fullspeed": the indexer as before session 6's L2, never giving way to the mail
            store_log.DUTY = 1.0 if kind == "fullspeed" else duty
            try:
                r = asyncio.run(_ingest_run(engine, n, rnd, corpus,
                                            kind in ("with", "fullspeed"), cpu))
            finally:
                store_log.DUTY = duty
                engine.dispose()
            print(f"  {kind:8s} indexes: enqueue {r['enqueue']:7.0f}/s "
                  f"({r['enqueue_cpu_us']:5.0f} us cpu/msg)  delivery {r['delivery']:7.0f}/s "
                  f"({r['delivery_cpu_us']:5.0f} us cpu/msg)  index caught up "
                  f"{r['index_lag']:5.2f} s after", file=sys.stderr, flush=True)
            results[kind].append(r)
    return [{"row": k, "enqueue": max(r["enqueue"] for r in v),
             "delivery": max(r["delivery"] for r in v),
             "index_lag": min(r["index_lag"] for r in v),
             "enqueue_cpu_us": statistics.median(r["enqueue_cpu_us"] for r in v),
             "delivery_cpu_us": statistics.median(r["delivery_cpu_us"] for r in v)}
            for k, v in results.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1_000_000, help="messages in the log")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per query")
    ap.add_argument("--pg", action="store_true", help="a throw-away PostgreSQL")
    ap.add_argument("--pg-url", default="", help="an existing, empty PostgreSQL database")
    ap.add_argument("--db", default="", help="SQLite file (default: a temporary one)")
    ap.add_argument("--ingest", action="store_true", help="enqueue/delivery, indexes on/off")
    ap.add_argument("--ingest-n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="ingest: rounds of with/without")
    ap.add_argument("--json", default="", help="write the results here too")
    args = ap.parse_args()
    pg = None
    tmp = tempfile.TemporaryDirectory(prefix="log_bench_")
    seq = iter(range(1_000_000))
    try:
        if args.pg:
            from pgserver import PgServer

            pg = PgServer().start()
            new_url: Callable[[], str] = pg.new_database
        elif args.pg_url:
            new_url = lambda: args.pg_url  # noqa: E731
        else:
            new_url = lambda: f"sqlite:///{args.db or Path(tmp.name) / f'log{next(seq)}.db'}"  # noqa: E731
        backend = "PostgreSQL" if (args.pg or args.pg_url) else "SQLite"
        result: dict[str, Any] = {"backend": backend}
        if args.ingest:
            cpu = cpu_clock(pg.proc.pid if pg is not None and pg.proc is not None else None)
            result["ingest"] = ingest_rows(new_url, args.ingest_n, args.rounds, cpu)
            w, wo, trig, full = result["ingest"]
            print(f"{backend}: with/without = enqueue {w['enqueue'] / wo['enqueue']:.2f}x, "
                  f"delivery {w['delivery'] / wo['delivery']:.2f}x; CPU per message "
                  f"without/with (the rate it allows on a full box) = enqueue "
                  f"{wo['enqueue_cpu_us'] / w['enqueue_cpu_us']:.2f}x, delivery "
                  f"{wo['delivery_cpu_us'] / w['delivery_cpu_us']:.2f}x; index caught up "
                  f"{w['index_lag']:.2f} s after the last delivery; the pending trigger "
                  f"alone: enqueue {trig['enqueue'] / wo['enqueue']:.2f}x, CPU "
                  f"{wo['enqueue_cpu_us'] / trig['enqueue_cpu_us']:.2f}x; the indexer at "
                  f"full speed (no duty cycle): enqueue {full['enqueue'] / wo['enqueue']:.2f}x,"
                  f" delivery {full['delivery'] / wo['delivery']:.2f}x, index caught up "
                  f"{full['index_lag']:.2f} s after")
        else:
            rnd = random.Random(1)
            corpus = Corpus(rnd)
            engine = make_engine(new_url(), synchronous="normal")
            migrate(engine)
            result["fill_seconds"] = 0.0
            if Log(engine).count(LogFilter(), cap=1):  # --db of an earlier run: reused
                print("reusing the filled database", file=sys.stderr)
            else:
                print(f"filling {args.n:,} messages ({backend})", file=sys.stderr)
                result["fill_seconds"] = fill(engine, args.n, rnd, corpus)
            result["index_seconds"] = build_index(engine)
            result["n"] = args.n
            result["queries"] = queries(engine, corpus, rnd, args.runs)
            engine.dispose()
            print(f"\n{backend}, {args.n:,} messages (fill {result['fill_seconds']:.0f} s, "
                  f"text index from pending {result['index_seconds']:.0f} s), "
                  f"{args.runs} runs each, server time in ms:\n")
            print("| query | p50 | p95 | target p95 |\n|---|---:|---:|---:|")
            for label, p50, p95, target in result["queries"]:
                mark = "" if p95 <= target else " (over)"
                print(f"| {label} | {p50:.1f} | {p95:.1f}{mark} | {target} |")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if pg is not None:
            pg.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
