"""The operator's commands: `postroom queue list|retry|purge|pause|resume`, `postroom
connections`, retention, `postroom log --export` — through the library (on SQLite and
PostgreSQL, with a fake clock) and through the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import io
import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import T0, FakeClock, envelope, run
from serve_proc import Postroom
from sqlalchemy import Engine, func, insert, select, text

from postroom.exceptions import MessageError
from postroom.queue import export, maintenance
from postroom.queue.limits import Limiter
from postroom.queue.retention import (
    BODIES_DONE,
    LOCK_KEY,
    _single_runner,
    retention_loop,
    retention_sync,
    run_retention,
)
from postroom.queue.sql import IdempotencyKey, Queue
from postroom.queue.status import connections_report
from postroom.queue.worker import Worker
from postroom.routing.health import Health
from postroom.runtime import Instance
from postroom.settings import DeliverySettings, Settings, load
from postroom.store.schema import (
    DEFERRED,
    FAILED,
    PARTIAL,
    QUEUED,
    SENDING,
    SENT,
    attempts,
    control,
    events,
    idempotency,
    messages,
    send_log,
)
from postroom.transports import base, memory

DAY = 86400.0
MEM = '[[connections]]\nname = "mem"\ntransport = "memory"\n'


@pytest.fixture(autouse=True)
def _clean_memory_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.Transport, "outboxes", {})
    monkeypatch.setattr(memory.Transport, "rejections", {})


def settings_with(tmp_path: Path, extra: str = "") -> Settings:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\n{extra}\n{MEM}'
                   '[[connections]]\nname = "limited"\ntransport = "memory"\n'
                   'rate_limit = ["2/minute", "5/hour"]\nmax_sessions = 2\n')
    return load(cfg, environ={})


# -- putting messages in a given state, through the queue's own claim and finish ---------------
def put(queue: Queue, clock: FakeClock, status: str, *rcpts: str, states: dict[str, str] |
        None = None, subject: str = "hello", idem: IdempotencyKey | None = None,
        env_id: str | None = None, source: str = "test") -> str:
    env = envelope(*(rcpts or ("a@example.org",)), subject=subject)
    env.source = source
    door, _, owner = source.partition(":")
    env.app = owner if door in ("api", "smtp") and owner != "trusted" else None
    if env_id is not None:
        env.id = env_id

    async def go() -> str:
        mid = await queue.enqueue(env, idempotency=idem)
        if status == QUEUED:
            return mid
        [msg] = await queue.claim("test-owner", 1, 1e9, only=mid)
        if status == SENDING:
            return mid
        default = {SENT: "sent", FAILED: "failed", DEFERRED: "pending"}
        for i, r in enumerate(msg.recipients):
            st = (states or {}).get(r) or default.get(status) or ("sent" if i == 0 else "failed")
            msg.rcpt_status[r] = {"state": st, "code": 250 if st == "sent" else 550,
                                  "reply": "ok" if st == "sent" else "5.1.1 unknown user"}
        now = clock()
        await queue.finish(msg, status=status, next_attempt_at=now + (300 if status == DEFERRED
                                                                        else 0),
                           last_error=None if status == SENT else "550 5.1.1 unknown user",
                           attempts=[{
                               "connection": "mem", "started_at": now, "ended_at": now,
                               "outcome": status, "reply_code": 250, "reply_text": "ok",
                               "error_code": None, "permanent": False,
                               "recipients": {r: dict(s) for r, s in msg.rcpt_status.items()},
                               "transcript": "S: 220 hello\nC: EHLO test\n"}])
        return mid

    return run(queue, go)


def msg_row(queue: Queue, msg_id: str) -> Any:
    with queue.engine.connect() as conn:
        return conn.execute(select(messages).where(messages.c.id == msg_id)).first()


def n_rows(engine: Engine, table: Any, *where: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where))
                   .scalar_one())


def mem_worker(queue: Queue, clock: FakeClock) -> Worker:
    t = memory.Transport(memory.Settings(name="mem"), base.TransportContext(ehlo_name="test"))
    return Worker(queue, {"mem": t}, DeliverySettings(), default_connection="mem",
                  owner="w", clock=clock)


# -- retry ---------------------------------------------------------------------------------------
def test_retry_deferred_makes_it_due_now(queue: Queue, clock: FakeClock) -> None:
    mid = put(queue, clock, DEFERRED)
    assert msg_row(queue, mid).next_attempt_at == T0 + 300
    clock.advance(10)
    done = maintenance.retry(queue, mid[:10])  # a unique prefix is enough
    assert (done.id, done.was, done.recipients) == (mid, DEFERRED, ("a@example.org",))
    row = msg_row(queue, mid)
    assert (row.status, row.next_attempt_at, row.attempt_count) == (DEFERRED, T0 + 10, 1)
    assert [m.id for m in run(queue, lambda: queue.claim("w", 10, 60))] == [mid]


def test_retry_failed_reopens_failed_recipients_with_a_fresh_lifetime(
        queue: Queue, clock: FakeClock) -> None:
    mid = put(queue, clock, FAILED, "a@example.org", "b@example.org")
    clock.advance(10 * DAY)  # far past its expiry: a retry must still send it
    done = maintenance.retry(queue, mid)
    assert done.was == FAILED and done.recipients == ("a@example.org", "b@example.org")
    row = msg_row(queue, mid)
    assert row.status == DEFERRED and row.next_attempt_at == clock()
    assert row.expires_at == clock() + queue.lifetime
    assert row.rcpt_status["a@example.org"]["state"] == "pending"
    assert "before: 550 5.1.1 unknown user" in row.rcpt_status["a@example.org"]["reply"]
    attempts_ = run(queue, lambda: _deliver_all(queue, clock))
    assert msg_row(queue, mid).status == SENT and len(attempts_) == 1
    assert [e.recipients for e in memory.outbox("mem")] == [["a@example.org", "b@example.org"]]
    with queue.engine.connect() as conn:
        kinds = conn.execute(select(events.c.kind, events.c.message_id)).all()
    assert ("retry_requested", mid) in [tuple(k) for k in kinds]


async def _deliver_all(queue: Queue, clock: FakeClock) -> list[dict[str, Any]]:
    w = mem_worker(queue, clock)
    return [a for m in await queue.claim("w", 100, 600) for a in await w.deliver(m)]


def test_retry_partial_sends_only_to_the_recipients_that_failed(
        queue: Queue, clock: FakeClock) -> None:
    mid = put(queue, clock, PARTIAL, "got@example.org", "lost@example.org")
    done = maintenance.retry(queue, mid)
    assert done.was == PARTIAL and done.recipients == ("lost@example.org",)
    row = msg_row(queue, mid)
    assert row.rcpt_status["got@example.org"]["state"] == "sent"
    run(queue, lambda: _deliver_all(queue, clock))
    assert [e.recipients for e in memory.outbox("mem")] == [["lost@example.org"]]
    assert msg_row(queue, mid).status == SENT


def test_retry_refuses_what_it_cannot_do(queue: Queue, clock: FakeClock) -> None:
    sending = put(queue, clock, SENDING)
    sent = put(queue, clock, SENT)
    purged = put(queue, clock, FAILED)
    with queue.engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.id == purged).values(raw=None))
    put(queue, clock, QUEUED, env_id="abcdef" + "1" * 26)
    put(queue, clock, QUEUED, env_id="abcdef" + "2" * 26)
    for msg_id, code, words in [
        (sending, "queue.retry.sending", "being sent right now"),
        (sent, "queue.retry.sent", f"postroom resend {sent}"),
        (purged, "queue.retry.no_body", "purged by retention"),
        ("nonexistent", "message.unknown", "postroom queue list"),
        ("abcdef", "message.ambiguous", "several message ids"),
    ]:
        with pytest.raises(MessageError) as exc:
            maintenance.retry(queue, msg_id)
        assert exc.value.code == code and words in exc.value.message
    assert msg_row(queue, sending).status == SENDING  # untouched
    assert msg_row(queue, sent).status == SENT


def test_retry_all_failed_since_and_app(queue: Queue, clock: FakeClock) -> None:
    old = put(queue, clock, FAILED, source="api:shop")
    clock.advance(DAY)
    recent = [put(queue, clock, FAILED, source="api:shop") for _ in range(3)]
    other_app = put(queue, clock, FAILED, source="smtp:crm")
    partial = put(queue, clock, PARTIAL, "x@example.org", "y@example.org", source="api:shop")
    sent = put(queue, clock, SENT, source="api:shop")
    seen: list[int] = []
    retried, skipped = maintenance.retry_failed(queue, since=clock() - 3600, app="shop",
                                                batch=2, progress=seen.append)
    assert (retried, skipped, sum(seen)) == (3, 0, 3)
    assert {m: msg_row(queue, m).status for m in [old, *recent, other_app, partial, sent]} == {
        old: FAILED, **dict.fromkeys(recent, DEFERRED), other_app: FAILED, partial: PARTIAL,
        sent: SENT}
    assert maintenance.retry_failed(queue) == (2, 0)  # every failed one left: old, other_app


# -- purge ---------------------------------------------------------------------------------------
def test_purge_deletes_by_filter_and_never_a_message_being_sent(
        queue: Queue, clock: FakeClock) -> None:
    old = {s: put(queue, clock, s) for s in (QUEUED, SENDING, DEFERRED, SENT, FAILED)}
    clock.advance(40 * DAY)
    new_failed = put(queue, clock, FAILED)
    flt = maintenance.Filter(statuses=(FAILED, SENT), before=clock() - 30 * DAY)
    assert maintenance.count(queue, flt) == 2
    assert maintenance.purge(queue, flt, batch=1) == {"messages": 2, "attempts": 2}
    assert msg_row(queue, old[FAILED]) is None and msg_row(queue, old[SENT]) is None
    assert n_rows(queue.engine, attempts, attempts.c.message_id == old[FAILED]) == 0
    assert msg_row(queue, new_failed) is not None
    # Every state but "sending", whatever the filter says.
    everything = maintenance.Filter(statuses=(QUEUED, DEFERRED, SENT, PARTIAL, FAILED))
    assert maintenance.purge(queue, everything)["messages"] == 3
    assert msg_row(queue, old[SENDING]).status == SENDING
    with pytest.raises(MessageError, match="never purged"):
        maintenance.purge(queue, maintenance.Filter(statuses=(SENDING,)))
    # A message claimed between the page read and the delete is re-checked, locked, kept.
    again = put(queue, clock, QUEUED)
    run(queue, lambda: queue.claim("w", 1, 600, only=again))
    assert queue.writer.run_sync(lambda conn: maintenance.delete_messages(
        conn, [again], messages.c.status != SENDING)) == (0, 0)
    assert msg_row(queue, again).status == SENDING


def test_bad_filter_status_is_an_error() -> None:
    with pytest.raises(MessageError, match="use one of queued"):
        maintenance.Filter(statuses=("bounced",))


# -- retention -----------------------------------------------------------------------------------
@pytest.fixture
def old_queue(engine: Engine, clock: FakeClock) -> Queue:
    """A queue whose mail may wait for a year: old messages that are still waiting."""
    return Queue(engine, lifetime=365 * DAY, clock=clock)


def test_retention_purges_bodies_then_rows_and_never_waiting_mail(
        old_queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    q = old_queue
    settings = settings_with(tmp_path, "[retention]\nkeep_bodies_days = 30\n"
                             "keep_rows_days = 90\nbatch = 2\n")
    done = {s: put(q, clock, s) for s in (SENT, FAILED, PARTIAL)}
    keyed = put(q, clock, SENT, idem=IdempotencyKey("shop", "k1", "h" * 64))
    waiting = {s: put(q, clock, s) for s in (QUEUED, DEFERRED, SENDING)}
    with q.engine.begin() as conn:
        conn.execute(insert(events).values(at=clock(), kind="connection_down", detail=""))
        conn.execute(insert(send_log), [{"connection": "limited", "at": clock()},
                                        {"connection": "gone", "at": clock()}])
    clock.advance(31 * DAY)
    fresh = put(q, clock, SENT)

    counts = retention_sync(q, settings)
    assert counts == {"bodies": 4, "transcripts": 4, "messages": 0, "attempts": 0,
                      "events": 0, "idempotency_keys": 0, "send_log": 2, "skipped": 0}
    for mid in [*done.values(), keyed]:
        row = msg_row(q, mid)
        assert row.raw is None and row.status in (SENT, FAILED, PARTIAL)
        with q.engine.connect() as conn:
            assert conn.execute(select(attempts.c.transcript)
                                .where(attempts.c.message_id == mid)).scalar() == ""
    for mid in [*waiting.values(), fresh]:
        assert msg_row(q, mid).raw is not None
    # Not due again within [retention] interval (unless forced): any worker may call it.
    assert retention_sync(q, settings)["skipped"] == 1

    clock.advance(60 * DAY)  # 91 days after the first messages
    counts = run(q, lambda: run_retention(q, settings))
    assert counts["messages"] == 4 and counts["attempts"] == 4
    assert counts["events"] == 1 and counts["idempotency_keys"] == 1
    assert n_rows(q.engine, idempotency) == 0 and n_rows(q.engine, events) == 0
    for mid in [*done.values(), keyed]:
        assert msg_row(q, mid) is None
    for status, mid in waiting.items():  # whatever their age: still there, body and all
        row = msg_row(q, mid)
        assert row.status == status and row.raw is not None
    assert msg_row(q, fresh).raw is None  # 60 days old: body gone, row kept
    assert msg_row(q, fresh).status == SENT


def test_retention_resumes_from_where_bodies_are_done(
        old_queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    """A message still waiting at one run is purged by a later run once it is finished,
    although the next run starts its scan at the remembered point."""
    q = old_queue
    settings = settings_with(tmp_path, "[retention]\nkeep_bodies_days = 30\nkeep_rows_days = 0\n")
    late = put(q, clock, DEFERRED)
    clock.advance(1)
    early_done = put(q, clock, SENT)
    clock.advance(40 * DAY)
    assert retention_sync(q, settings, force=True)["bodies"] == 1
    with q.engine.connect() as conn:
        mark = float(conn.execute(select(control.c.value)
                                  .where(control.c.name == BODIES_DONE)).scalar_one())
    assert mark == msg_row(q, late).created_at  # not past the message still waiting
    # It is delivered now; 31 days later its body goes, and the mark moves on.
    maintenance.retry(q, late)
    run(q, lambda: _deliver_all(q, clock))
    assert msg_row(q, late).status == SENT
    clock.advance(31 * DAY)
    assert retention_sync(q, settings, force=True)["bodies"] == 1
    assert msg_row(q, late).raw is None and msg_row(q, early_done).raw is None
    assert retention_sync(q, settings, force=True)["bodies"] == 0


def test_retention_runs_on_one_node_at_a_time(
        queue: Queue, clock: FakeClock, tmp_path: Path, backend: str) -> None:
    settings = settings_with(tmp_path)
    if backend == "postgresql":
        with queue.engine.connect() as other:  # another node holds the lock
            assert other.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                 {"k": LOCK_KEY}).scalar()
            assert retention_sync(queue, settings, force=True)["skipped"] == 1
            other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
            other.commit()
    else:
        fd = os.open(f"{queue.engine.url.database}.retention.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds it
            assert retention_sync(queue, settings, force=True)["skipped"] == 1
        finally:
            os.close(fd)
    with _single_runner(queue) as mine:
        assert mine
    assert retention_sync(queue, settings, force=True)["skipped"] == 0


def test_retention_stops_between_batches_and_the_worker_loop_runs_it(
        old_queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    q = old_queue
    settings = settings_with(tmp_path, "[retention]\nkeep_rows_days = 10\nbatch = 1\n")
    ids = [put(q, clock, SENT) for _ in range(3)]
    clock.advance(11 * DAY)
    stop = threading.Event()
    counts = retention_sync(q, settings, progress=lambda what, n: stop.set(), stop=stop)
    assert counts["messages"] == 1  # stopped after its first batch
    assert sum(msg_row(q, m) is None for m in ids) == 1

    async def loop_once() -> None:
        task = asyncio.create_task(retention_loop(q, settings))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(msg_row(q, m) for m in ids):
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

    clock.advance(settings.retention.interval)  # due again
    run(q, loop_once)
    assert all(msg_row(q, m) is None for m in ids)


def test_retention_settings_are_checked(tmp_path: Path) -> None:
    from postroom.exceptions import ConfigError

    for bad, words in [("keep_bodys_days = 3", "did you mean 'keep_bodies_days'"),
                       ("keep_rows_days = -1", "greater than or equal to 0"),
                       ("interval = 5", "greater than or equal to 60")]:
        with pytest.raises(ConfigError, match=words):
            settings_with(tmp_path, f"[retention]\n{bad}\n")
    r = settings_with(tmp_path).retention
    assert (r.keep_bodies_days, r.keep_rows_days, r.interval) == (30, 90, 3600)


# -- connections --------------------------------------------------------------------------------
def test_connections_report_health_pause_and_limits_in_use(
        queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    settings = settings_with(tmp_path, "[delivery]\nbreaker_failures = 2\n")
    clock.t = time.time()  # the report reads real time windows
    health = Health(queue, 2, 60, clock=clock)
    limited = settings.connection("limited")
    limiter = Limiter(queue, clock=clock)

    async def go() -> None:
        await health.failed("mem", "connect.refused: no answer")
        await health.failed("mem", "connect.refused: no answer")
        assert await limiter.acquire(limited, "h1") is None  # one send, one session held

    run(queue, go)
    health.set_paused("limited", True)
    health.set_paused(None, True)
    report = connections_report(queue, settings, now=clock())
    json.dumps(report)  # what the API serves
    assert report["queue_paused"] is True
    mem, lim = report["connections"]
    assert (mem["name"], mem["health"], mem["failures"], mem["paused"]) == ("mem", "down", 2,
                                                                           False)
    assert mem["last_error"] == "connect.refused: no answer"
    assert mem["circuit_open_until"] and mem["since"].endswith("Z")
    assert (lim["health"], lim["paused"], lim["sessions_in_use"], lim["max_sessions"]) == (
        "up", True, 1, 2)
    assert [(r["limit"], r["used"], r["count"]) for r in lim["rate_limits"]] == [
        ("2/minute", 1, 2), ("5/hour", 1, 5)]


# -- export -------------------------------------------------------------------------------------
def test_export_streams_csv_and_eml(queue: Queue, clock: FakeClock, tmp_path: Path) -> None:
    ids = []
    for i in range(5):
        clock.advance(1)
        ids.append(put(queue, clock, SENT, subject=f"=HYPERLINK(\"x\") {i}"))
    clock.advance(1)
    failed = put(queue, clock, FAILED, subject="failed one")
    with queue.engine.begin() as conn:
        conn.execute(messages.update().where(messages.c.id == ids[0]).values(raw=None))
    rows = list(export.iter_log(queue, page=2))  # 3 pages, newest first
    assert [r["id"] for r in rows] == [failed, *reversed(ids)]
    assert [r["id"] for r in export.iter_log(queue, page=2, limit=3)] == [failed, ids[4], ids[3]]
    assert [r["id"] for r in export.iter_log(queue, status=FAILED)] == [failed]

    buf = io.StringIO()
    assert export.write_csv(export.iter_log(queue, page=2), buf) == 6
    table = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert table[1]["subject"] == "'=HYPERLINK(\"x\") 4"  # a formula is not run
    assert table[0]["status"] == FAILED and table[0]["created_at"].endswith("Z")

    folder = tmp_path / "eml"
    assert export.write_eml(queue, export.iter_log(queue), folder) == (5, 1)
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 5 and all(f.endswith(".eml") for f in files)
    assert (folder / export.eml_name(rows[0])).read_bytes() == msg_row(queue, failed).raw
    zipped = tmp_path / "out.zip"
    assert export.write_eml(queue, export.iter_log(queue), zipped) == (5, 1)
    with zipfile.ZipFile(zipped) as zf:
        assert sorted(zf.namelist()) == files
    assert not list(tmp_path.glob("*.part"))


# -- through the real CLI ------------------------------------------------------------------------
@pytest.fixture
def pr(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Postroom:
    """A configured instance (not started) on SQLite or PostgreSQL, for CLI commands."""
    server = ""
    if backend == "postgresql":
        server = f'database = "{request.getfixturevalue("pg_server").new_database()}"\n'
    return Postroom(tmp_path / "pr", server=server, connections=MEM + (
        '[[connections]]\nname = "limited"\ntransport = "memory"\n'
        'rate_limit = ["50/minute"]\n'))


def instance_of(pr: Postroom, clock: FakeClock | None = None) -> tuple[Instance, Queue]:
    inst = Instance(load(pr.config, environ={}))
    q = inst.queue if clock is None else Queue(inst.engine, lifetime=365 * DAY, clock=clock)
    return inst, q


def ok(res: Any) -> str:
    assert res.returncode == 0, (res.stdout, res.stderr)
    return str(res.stdout.decode())


def err(res: Any, rc: int, *words: str) -> None:
    assert res.returncode == rc, (res.stdout, res.stderr)
    stderr = res.stderr.decode()
    assert "Traceback" not in stderr
    for w in words:
        assert w in stderr, stderr


def test_cli_queue_list_retry_purge(pr: Postroom) -> None:
    inst, q = instance_of(pr, FakeClock(time.time()))
    clock = q.clock
    assert isinstance(clock, FakeClock)
    low = envelope("low@example.org", subject="newsletter")
    low.priority = -1
    q.enqueue_sync(low)
    high = envelope("high@example.org", subject="password reset")
    high.priority = 1
    q.enqueue_sync(high)
    deferred = put(q, clock, DEFERRED, subject="deferred")
    failed = put(q, clock, FAILED, "a@example.org", subject="failed")
    sent = put(q, clock, SENT, subject="sent")
    inst.close()

    listed = [json.loads(line) for line in ok(pr.cli("queue", "list", "--json")).splitlines()]
    assert [m["subject"] for m in listed] == ["password reset", "deferred", "newsletter"]
    assert listed[1]["id"] == deferred and listed[1]["next_attempt_at"] > time.time() + 200
    table = ok(pr.cli("queue", "list"))
    assert "2 queued, 0 sending, 1 deferred" in table and "password reset" in table
    only = ok(pr.cli("queue", "list", "--status", "failed", "--json"))
    assert [json.loads(x)["id"] for x in only.splitlines()] == [failed]

    out = ok(pr.cli("queue", "retry", failed[:8]))
    assert f"{failed} (was failed): due now for 1 recipient(s): a@example.org" in out
    assert failed in ok(pr.cli("queue", "list", "--status", "deferred", "--json"))
    err(pr.cli("queue", "retry", sent), 1, "postroom resend")
    err(pr.cli("queue", "retry", "nosuchid"), 1, "message.unknown", "no message 'nosuchid'")
    err(pr.cli("queue", "retry"), 1, "give a message ID or --all-failed")
    err(pr.cli("queue", "retry", failed, "--all-failed"), 1, "not both")
    assert "0 failed message(s) due again now" in ok(pr.cli("queue", "retry", "--all-failed"))

    err(pr.cli("queue", "purge", "--status", "sent", "--before", "30 days"), 1,
        "--before '30 days'", "30d")
    err(pr.cli("queue", "purge"), 1, "say what to purge")
    err(pr.cli("queue", "purge", "--status", "bounced"), 1, "use one of queued")
    err(pr.cli("queue", "purge", "--status", "sending", "--yes"), 1, "never purged")
    # Without a terminal, nothing is deleted unless --yes says so.
    err(pr.cli("queue", "purge", "--status", "sent", input=b""), 1, "cli.confirm", "--yes")
    assert "would delete 1 message(s) (sent)" in ok(
        pr.cli("queue", "purge", "--status", "sent", "--dry-run"))
    assert "deleted 1 message(s) and 1 attempt(s)" in ok(
        pr.cli("queue", "purge", "--status", "sent", "--yes"))
    assert "nothing to purge" in ok(pr.cli("queue", "purge", "--status", "sent", "--yes"))
    shown = ok(pr.cli("log", "--json", "--limit", "100"))
    assert sent not in shown and failed in shown


def test_cli_retry_all_failed_with_progress_and_since(pr: Postroom) -> None:
    inst, q = instance_of(pr, FakeClock(time.time() - 3 * DAY))
    clock = q.clock
    assert isinstance(clock, FakeClock)
    old = put(q, clock, FAILED)
    clock.t = time.time()
    recent = [put(q, clock, FAILED) for _ in range(3)]
    inst.close()
    assert "3 failed message(s) due again now" in ok(
        pr.cli("queue", "retry", "--all-failed", "--since", "1d"))
    listed = ok(pr.cli("queue", "list", "--json"))
    assert all(m in listed for m in recent) and old not in listed
    err(pr.cli("queue", "retry", "--all-failed", "--since", "yesterday"), 1, "--since")


def test_cli_connections_pause_resume(pr: Postroom) -> None:
    report = json.loads(ok(pr.cli("connections", "--json")))
    assert [(c["name"], c["health"], c["paused"]) for c in report["connections"]] == [
        ("mem", "up", False), ("limited", "up", False)]
    assert report["connections"][1]["rate_limits"][0]["limit"] == "50/minute"
    assert "connection limited paused" in ok(pr.cli("connections", "pause", "limited"))
    assert json.loads(ok(pr.cli("connections", "--json")))["connections"][1]["paused"]
    table = ok(pr.cli("connections"))
    assert "paused" in table and "0 of 50/minute" in table
    assert "limited" in ok(pr.cli("connection", "list"))  # the older name still works
    assert "resumed" in ok(pr.cli("connections", "resume", "limited"))
    assert not json.loads(ok(pr.cli("connections", "--json")))["connections"][1]["paused"]
    err(pr.cli("connections", "pause", "nope"), 2, "no connection named 'nope'", "mem")
    assert "queue paused" in ok(pr.cli("queue", "pause"))
    assert json.loads(ok(pr.cli("connections", "--json")))["queue_paused"] is True
    assert "PAUSED" in ok(pr.cli("queue", "list"))
    assert "queue resumed" in ok(pr.cli("queue", "resume"))
    assert json.loads(ok(pr.cli("connections", "--json")))["queue_paused"] is False


def test_cli_export_csv_and_eml(pr: Postroom, tmp_path: Path) -> None:
    inst, q = instance_of(pr, FakeClock(time.time()))
    clock = q.clock
    assert isinstance(clock, FakeClock)
    ids = [put(q, clock, SENT, subject=f"report {i}") for i in range(3)]
    failed = put(q, clock, FAILED, subject="bounced")
    inst.close()
    text_ = ok(pr.cli("log", "--export", "csv", "--status", "sent"))
    got = list(csv.DictReader(io.StringIO(text_)))
    assert sorted(r["id"] for r in got) == sorted(ids) and got[0]["subject"].startswith("report")
    out = tmp_path / "log.csv"
    assert "4 message(s) written" in pr.cli("log", "--export", "csv", "--out", str(out)
                                            ).stderr.decode()
    assert len(list(csv.reader(out.open()))) == 5
    folder = tmp_path / "mails"
    res = pr.cli("log", "--export", "eml", "--out", str(folder), "--status", "failed")
    assert res.returncode == 0 and "1 message(s) written" in res.stderr.decode()
    [eml] = folder.iterdir()
    assert eml.name.endswith(f"-{failed}.eml") and b"Subject: bounced" in eml.read_bytes()
    zipped = tmp_path / "all.zip"
    ok(pr.cli("log", "--export", "eml", "--out", str(zipped), "--limit", "2"))
    assert len(zipfile.ZipFile(zipped).namelist()) == 2
    err(pr.cli("log", "--export", "eml"), 1, "needs --out")
    err(pr.cli("log", "--export", "pdf"), 1, "use csv or eml")


def test_cli_purge_retention_now(pr: Postroom) -> None:
    pr.config.write_text(pr.config.read_text()
                         + "\n[retention]\nkeep_bodies_days = 7\nkeep_rows_days = 60\n")
    inst, q = instance_of(pr, FakeClock(time.time() - 70 * DAY))
    clock = q.clock
    assert isinstance(clock, FakeClock)
    ancient = put(q, clock, SENT)
    waiting = put(q, clock, DEFERRED)
    clock.t = time.time() - 10 * DAY
    old = put(q, clock, FAILED)
    inst.close()
    err(pr.cli("queue", "purge", "--retention", "--status", "sent"), 1, "takes no filter")
    out = ok(pr.cli("queue", "purge", "--retention"))
    assert "bodies kept 7 days, rows 60 days" in out
    assert "2 bodies" in out and "1 messages" in out, out
    inst, q = instance_of(pr)
    try:
        assert msg_row(q, ancient) is None
        assert msg_row(q, old).raw is None and msg_row(q, old).status == FAILED
        assert msg_row(q, waiting).raw is not None and msg_row(q, waiting).status == DEFERRED
    finally:
        inst.close()
    bad = pr.config.read_text().replace("keep_rows_days = 60", "keep_rows_day = 60")
    pr.config.write_text(bad)
    err(pr.cli("queue", "purge", "--retention"), 2, "keep_rows_days")


def test_pause_holds_delivery_on_a_running_server(tmp_path: Path) -> None:
    """`queue pause` on a running `postroom serve`: mail is accepted and waits; `queue
    resume` and it is delivered."""
    pr = Postroom(tmp_path / "srv", connections=MEM)
    with pr:
        ok(pr.cli("queue", "pause"))
        time.sleep(1.5)  # the worker's pause switch is cached for up to a second
        out = ok(pr.cli("send", "--from", "a@example.org", "--to", "b@example.org",
                        "--subject", "held", "--text", "x"))
        msg_id = out.split()[-1]
        time.sleep(2.5)
        [row] = [json.loads(x) for x in ok(pr.cli("queue", "list", "--json")).splitlines()]
        assert (row["id"], row["status"]) == (msg_id, QUEUED)
        ok(pr.cli("queue", "resume"))
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            status = json.loads(ok(pr.cli("show", msg_id, "--json")))["status"]
            if status == SENT:
                break
            time.sleep(0.5)
        assert status == SENT
