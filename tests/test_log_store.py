"""The email log (postroom.store.log): filters, text search (indexed after the commit, exact
before), cursor pages, rollups, the indexes each filter uses, and migration 0008 on a
populated log. Every test with the ``engine`` / ``queue`` fixture runs on SQLite and on
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import sqlite3
import threading
from email.utils import getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from queue_helpers import T0, FakeClock, envelope, run
from sqlalchemy import Engine, column, delete, event, func, insert, select, table, text, update

from postroom.envelope import Envelope, new_id
from postroom.exceptions import MessageError
from postroom.message import compose
from postroom.queue.sql import Queue
from postroom.store import direct, pending
from postroom.store.addresses import whole_address
from postroom.store.db import make_engine, migrate
from postroom.store.log import Log, LogFilter, index_loop
from postroom.store.schema import ROLLUP_STATUSES, attempts, events, messages

HOUR = 3600.0


def add(queue: Queue, clock: FakeClock, *, to: str = "r@example.test",
        sender: str = "app@example.org", subject: str = "hello", app: str | None = None,
        tags: list[str] | None = None, status: str | None = None, via: str | None = None,
        at: float | None = None) -> str:
    """One logged message, created at ``at`` (the queue's clock), then set to ``status``
    and ``via`` by an UPDATE as a delivery result would."""
    if at is not None:
        clock.t = at
    raw = compose(sender=sender, to=[to], subject=subject, text="body\n")
    env = Envelope(sender, [to], raw, source="test", app=app, tags=tags or [])
    msg_id = queue.enqueue_sync(env)
    if status is not None or via is not None:
        with queue.engine.begin() as conn:
            conn.execute(update(messages).where(messages.c.id == msg_id).values(
                status=status or "queued", via=via))
    return msg_id


def ids(log: Log, f: LogFilter, **kw: Any) -> list[str]:
    return [r["id"] for r in log.page(f, **kw)]


@pytest.fixture
def sample(queue: Queue, clock: FakeClock) -> dict[str, str]:
    return {
        "old": add(queue, clock, to="alice@example.test", sender="billing@shop.example",
                   subject="Invoice 100% paid", app="shop", tags=["billing"], status="sent",
                   via="primary", at=T0),
        "fail": add(queue, clock, to="nobody@example.test", sender="alerts@ops.example",
                    subject="Disk at 91_0 percent", app="monitor", tags=["alert"],
                    status="failed", via="backup", at=T0 + HOUR),
        "wait": add(queue, clock, to="bob@other.test", sender="news@blog.example",
                    subject="Weekly \"digest\" NEAR OR *", status="deferred", via="primary",
                    at=T0 + 2 * HOUR),
        "new": add(queue, clock, to="Carol@Example.test", sender="billing@shop.example",
                   subject="Invoice 1000 due", app="shop", tags=["billing", "late"],
                   status="sent", via="sendgrid", at=T0 + 3 * HOUR),
    }


def test_every_filter(queue: Queue, sample: dict[str, str]) -> None:
    log, s = queue.log, sample
    assert ids(log, LogFilter()) == [s["new"], s["wait"], s["fail"], s["old"]]
    assert ids(log, LogFilter(status="sent")) == [s["new"], s["old"]]
    assert ids(log, LogFilter(app="shop")) == [s["new"], s["old"]]
    assert ids(log, LogFilter(connection="primary")) == [s["wait"], s["old"]]
    assert ids(log, LogFilter(sender="billing@shop")) == [s["new"], s["old"]]
    assert ids(log, LogFilter(sender="OPS.example")) == [s["fail"]]  # case-insensitive
    assert ids(log, LogFilter(to="carol@example.test")) == [s["new"]]
    assert ids(log, LogFilter(to="other.test")) == [s["wait"]]
    assert ids(log, LogFilter(text="invoice")) == [s["new"], s["old"]]
    assert ids(log, LogFilter(tag="billing")) == [s["new"], s["old"]]
    assert ids(log, LogFilter(tag="bill")) == []  # a tag is matched whole
    assert ids(log, LogFilter(source="test", since=T0 + HOUR, until=T0 + 3 * HOUR)) == [
        s["wait"], s["fail"]]
    assert ids(log, LogFilter(status="sent", app="shop", text="1000", to="carol")) == [s["new"]]
    assert log.count(LogFilter()) == 4 and log.count(LogFilter(), cap=2) == 2
    assert log.count(LogFilter(text="invoice")) == 2
    assert list(log.ids(LogFilter(), batch=3)) == [[s["new"], s["wait"], s["fail"]], [s["old"]]]
    assert "raw" not in log.page(LogFilter())[0]
    assert "rcpt_status" in log.page(LogFilter(), states=True)[0]


def test_last_delivered_is_the_newest_success_through_a_connection(
        queue: Queue, sample: dict[str, str]) -> None:
    """The dashboard's "last success": the health table writes it only on recovery, so a
    connection that never failed would show none; the log has it."""
    log = queue.log
    updated = {r["id"]: r["updated_at"] for r in log.page(LogFilter())}
    assert log.last_delivered("primary") == updated[sample["old"]]  # "wait" is deferred
    assert log.last_delivered("sendgrid") == updated[sample["new"]]
    assert log.last_delivered("backup") is None  # only a failure went through it
    assert log.last_delivered("unknown") is None


def searched(log: Log, query: str, cols: tuple[str, ...]) -> list[str]:
    """What a substring search over ``cols`` must find: computed here, row by row."""
    rows = log.page(LogFilter(), limit=1000)
    return [r["id"] for r in rows
            if any(query.lower() in str(r[c]).lower() for c in cols)]


def addressed(log: Log, query: str, cols: tuple[str, ...]) -> list[str]:
    """What a recipient or sender search must find: a whole address exactly (in the
    envelope or the header, any case), part of one as a substring of ``cols``."""
    address = whole_address(query)
    if address is None:
        return searched(log, query, cols)
    envelope, header = cols[::-1] if "recipients" in cols else cols

    def has(r: dict[str, Any]) -> bool:
        listed = r[envelope] if isinstance(r[envelope], list) else [r[envelope]]
        return address in {a.lower() for a in listed} | {
            a.lower() for _, a in getaddresses([r[header]])}

    return [r["id"] for r in log.page(LogFilter(), limit=1000) if has(r)]


TEXT = ("subject", "from_header", "to_header", "message_id")


def test_short_queries_and_like_wildcards_are_literal(queue: Queue,
                                                      sample: dict[str, str]) -> None:
    log, s = queue.log, sample
    for query in ("1", "d ", "ly", "%", "100%", "91_0", "_", "\\", "Invoice 1_00"):
        assert ids(log, LogFilter(text=query)) == searched(log, query, TEXT), query
    assert ids(log, LogFilter(text="100%")) == [s["old"]]
    assert ids(log, LogFilter(text="91_0")) == [s["fail"]]
    assert ids(log, LogFilter(text="9100")) == []  # '_' is not "any character"
    assert ids(log, LogFilter(to="bo")) == [s["wait"], s["fail"]]  # < 3: LIKE


@pytest.mark.parametrize("query", ['"', '"digest"', "NEAR OR *", "*", "OR", "NEAR(a b)",
                                   'a" OR "b', "{subject}: x", "^weekly", "-digest", "(",
                                   "subject:invoice", "\\", "'; DROP TABLE messages; --"])
def test_fts_syntax_is_taken_literally(queue: Queue, sample: dict[str, str],
                                       query: str) -> None:
    """Whatever a user types is a substring to find, never FTS or SQL syntax (and never an
    error)."""
    expected = searched(queue.log, query, TEXT)
    assert ids(queue.log, LogFilter(text=query)) == expected
    assert queue.log.count(LogFilter(text=query)) == len(expected)


def test_search_is_kept_in_step_on_insert_update_delete(queue: Queue, clock: FakeClock) -> None:
    log = queue.log
    msg_id = add(queue, clock, subject="quarterly report", to="dana@example.test")
    assert ids(log, LogFilter(text="quarterly")) == [msg_id]
    with queue.engine.begin() as conn:  # a header rewrite (no writer does it today)
        conn.execute(update(messages).where(messages.c.id == msg_id)
                     .values(subject="annual summary", recipients=["erin@example.test"],
                             to_header="erin@example.test"))
    assert ids(log, LogFilter(text="quarterly")) == []
    assert ids(log, LogFilter(text="annual")) == [msg_id]
    assert ids(log, LogFilter(to="erin@example")) == [msg_id]
    assert ids(log, LogFilter(to="dana@")) == []
    assert queue.delete_sync(msg_id)
    assert ids(log, LogFilter(text="annual")) == []
    assert ids(log, LogFilter(to="erin@example")) == []


@pytest.mark.sqlite_only
def test_sendmails_direct_insert_is_indexed(tmp_path: Path) -> None:
    """postroom-sendmail writes with sqlite3 alone: the triggers index its row too."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = make_engine(url)
    migrate(engine)
    raw = compose(sender="cron@host.example", to=["root@example.test"],
                  subject="Cron <root@host> backup finished", text="ok\n")
    env = Envelope("cron@host.example", ["root@example.test"], raw, source="sendmail")
    assert direct.enqueue(env, database_url=url) == env.id
    log = Log(engine)
    assert log.pending() == 1  # the insert trigger marked it, sqlite3 alone
    for indexed in (False, True):
        assert ids(log, LogFilter(text="backup finished")) == [env.id], indexed
        assert ids(log, LogFilter(to="root@example")) == [env.id], indexed
        assert ids(log, LogFilter(sender="cron@host")) == [env.id], indexed
        assert ids(log, LogFilter(text="nothing like it")) == [], indexed
        if not indexed:
            assert log.index_pending() == 1 and log.pending() == 0
    engine.dispose()


def test_every_search_plan_finds_the_same_rows(queue: Queue, clock: FakeClock,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Rare trigrams through the index, all-common trigrams by a LIKE walk, a trigram
    sampled outside the window: the same rows, in the same order, page after page."""
    made = [add(queue, clock, subject=f"common thing {i}", to=f"u{i}@corp.example",
                at=T0 + i) for i in range(12)]
    made.reverse()
    results = []
    for common, window in ((200, 20_000), (1, 20_000), (200, 2), (200, 0)):
        monkeypatch.setattr("postroom.store.log.COMMON", common)
        monkeypatch.setattr("postroom.store.log.WINDOW", window)
        first = queue.log.page(LogFilter(text="common thing"), limit=5)
        second = queue.log.page(LogFilter(text="common thing"), limit=5,
                                before=(first[-1]["created_at"], first[-1]["id"]))
        results.append(([r["id"] for r in first + second],
                         ids(queue.log, LogFilter(to="u1@corp")),
                         ids(queue.log, LogFilter(text="thing 1")),
                         ids(queue.log, LogFilter(text="thing 99"))))
    truth = (made[:10], searched(queue.log, "u1@corp", ("to_header", "recipients")),
             searched(queue.log, "thing 1", TEXT), [])
    assert len(truth[1]) == 1 and len(truth[2]) == 3  # thing 1, 10, 11
    assert all(r == truth for r in results), results


def test_cursor_pages_are_stable_while_mail_arrives(queue: Queue, clock: FakeClock) -> None:
    log = queue.log
    first_ids = [add(queue, clock, at=T0 + i) for i in range(5)]
    first_ids.reverse()
    seen: list[str] = []
    before = None
    for round_ in range(4):
        page = log.page(LogFilter(), before=before, limit=2)
        seen += [r["id"] for r in page]
        if not page:
            break
        before = (page[-1]["created_at"], page[-1]["id"])
        add(queue, clock, at=T0 + 100 + round_)  # newer mail lands between pages
    assert seen == first_ids
    # Same created_at: the id breaks the tie, so no row is skipped or shown twice.
    same = sorted((add(queue, clock, at=T0 - 50) for _ in range(3)), reverse=True)
    tail = log.page(LogFilter(until=T0), limit=2)
    rest = log.page(LogFilter(until=T0), limit=2,
                    before=(tail[-1]["created_at"], tail[-1]["id"]))
    assert [r["id"] for r in tail + rest] == same


def full_counts(engine: Engine) -> dict[tuple[float, str, str, str], int]:
    keys = (func.floor(messages.c.created_at / HOUR) * HOUR, messages.c.status,
            func.coalesce(messages.c.via, ""), func.coalesce(messages.c.app, ""))
    q = (select(*keys, func.count()).where(messages.c.status.in_(ROLLUP_STATUSES))
         .group_by(*keys))
    r = text("SELECT hour, status, connection, app, count FROM log_rollups WHERE count <> 0")
    with engine.connect() as conn:
        want = {(float(h), s, c, a): int(n) for h, s, c, a, n in conn.execute(q)}
        got = {(float(h), s, c, a): int(n) for h, s, c, a, n in conn.execute(r)}
    assert got == want
    return got


OPS = st.lists(st.tuples(st.sampled_from(["add", "status", "via", "delete", "bulk"]),
                         st.integers(0, 30), st.sampled_from(["queued", "sending", "sent",
                                                              "partial", "deferred", "failed"]),
                         st.sampled_from([None, "primary", "backup"])),
               min_size=1, max_size=25)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_rollups_equal_a_full_count(queue: Queue, clock: FakeClock,
                                    ops: list[tuple[str, int, str, str | None]]) -> None:
    """After any mix of inserts, status and connection changes and deletes (one row or a
    statement over many), the rollups are what counting the table says."""
    for op, n, status, via in ops:
        with queue.engine.connect() as conn:
            known = [r[0] for r in conn.execute(select(messages.c.id).order_by(messages.c.id))]
        target = known[n % len(known)] if known else None
        if op == "add" or target is None:
            add(queue, clock, status=status, via=via, app=random.choice([None, "shop"]),
                at=T0 + n * 1000)
            continue
        with queue.engine.begin() as conn:
            if op == "status":
                conn.execute(update(messages).where(messages.c.id == target)
                             .values(status=status))
            elif op == "via":
                conn.execute(update(messages).where(messages.c.id == target).values(via=via))
            elif op == "delete":
                conn.execute(delete(messages).where(messages.c.id == target))
            else:  # one statement over many rows (maintenance's retry, retention's purge)
                conn.execute(update(messages).where(messages.c.id >= target)
                             .values(status=status))
        full_counts(queue.engine)
    counted = full_counts(queue.engine)
    total = {s: sum(n for k, n in counted.items() if k[1] == s) for s in ROLLUP_STATUSES}
    summary = queue.log.summary(0)
    assert all(summary[s] == total[s] for s in ROLLUP_STATUSES)
    with queue.engine.connect() as conn:
        by_status = dict(conn.execute(select(messages.c.status, func.count())
                                      .group_by(messages.c.status)).all())
    assert queue.log.counts() == {k: v for k, v in by_status.items() if v}


def test_worker_results_set_the_connection_and_the_dashboard(queue: Queue,
                                                            clock: FakeClock) -> None:
    a = add(queue, clock, app="shop", at=T0)
    b = add(queue, clock, at=T0 + 10)

    async def go() -> None:
        for m in await queue.claim("w", 10, 600):
            if m.id == a:
                await queue.finish(m, status="sent", next_attempt_at=0, last_error=None,
                                   attempts=[_attempt("mem", "sent")])
            else:
                await queue.finish(m, status="failed", next_attempt_at=0, last_error="550 no",
                                   attempts=[_attempt("other", "failed")])

    run(queue, go)
    log = queue.log
    assert ids(log, LogFilter(connection="mem")) == [a]
    assert ids(log, LogFilter(connection="other")) == [b]
    with queue.engine.begin() as conn:
        conn.execute(insert(events).values(at=T0 + 5, kind="fallback_used", message_id=b,
                                           connection="other", detail=""))
    summary = log.summary(T0 - 10)
    assert (summary["sent"], summary["failed"], summary["fallback_used"]) == (1, 1, 1)
    assert log.summary(T0 + HOUR)["sent"] == 0
    series = log.series(T0 - 2 * HOUR, until=T0 + 2 * HOUR)
    assert [at for at, _ in series] == [(T0 // HOUR + i) * HOUR for i in range(-2, 2)]
    assert [b_["sent"] for _, b_ in series] == [0, 0, 1, 0]
    assert [b_["failed"] for _, b_ in series] == [0, 0, 1, 0]
    assert len(log.series(T0, bucket=86400, until=T0 + 86400 * 3)) in (3, 4)
    [failure] = log.latest_failures()
    assert failure["id"] == b and failure["attempt"]["connection"] == "other"
    assert log.queue_depth()["queued"] == 0 and log.queue_depth()["oldest_at"] is None
    waiting = add(queue, clock, at=T0 + 20)
    assert log.queue_depth()["queued"] == 1 and log.queue_depth()["oldest_at"] == T0 + 20
    assert log.get(waiting[:8])["id"] == waiting  # type: ignore[index]
    assert log.get(waiting[:5]) is None  # too short to be a prefix
    assert log.get("%%%%%%%%") is None  # a prefix, not a pattern
    assert log.body(waiting) is not None and log.body("nope") is None
    assert log.get(a)["attempts"][0]["connection"] == "mem"  # type: ignore[index]


def test_the_dashboards_overview_equals_its_parts(queue: Queue, clock: FakeClock) -> None:
    """Log.overview (the dashboard's one pass over the waiting mail) gives what summary()
    per window and queue_depth() give one by one."""
    first, *_ = [add(queue, clock, at=T0 - back + i)  # waiting, created over three weeks
                 for i, back in enumerate((0, 2 * HOUR, 3 * 86400, 20 * 86400))]
    sent = add(queue, clock, at=T0 - 5 * 86400)

    async def finish() -> None:
        for m in await queue.claim("w", 10, 600):
            if m.id not in (sent, first):
                await queue.finish(m, status="queued", next_attempt_at=0, last_error=None,
                                   attempts=[])
            elif m.id == sent:
                await queue.finish(m, status="sent", next_attempt_at=0, last_error=None,
                                   attempts=[_attempt("mem", "sent")])
            elif m.id == first:  # one of them deferred, the others stay queued
                await queue.finish(m, status="deferred", next_attempt_at=T0 + HOUR,
                                   last_error="421 later", attempts=[_attempt("mem", "deferred")])

    run(queue, finish)
    log = queue.log
    sinces = [T0 - HOUR, T0 - 86400, T0 - 7 * 86400, T0 - 30 * 86400]
    windows, depth = log.overview(sinces)
    assert windows == [log.summary(s) for s in sinces]
    assert [w["queued"] + w.get("deferred", 0) + w.get("sending", 0) for w in windows] \
        == [1, 2, 3, 4]
    assert windows[2]["sent"] == 1 and windows[1]["sent"] == 0
    plain = log.queue_depth()
    assert {k: v for k, v in depth.items() if k != "oldest_age"} == \
        {k: v for k, v in plain.items() if k != "oldest_age"}
    assert depth["oldest_at"] == T0 - 20 * 86400 + 3


def _attempt(connection: str, outcome: str) -> dict[str, Any]:
    return {"connection": connection, "started_at": T0, "ended_at": T0 + 1, "outcome": outcome,
            "reply_code": 250 if outcome == "sent" else 550, "reply_text": "x",
            "error_code": None, "permanent": outcome == "failed", "recipients": {},
            "transcript": ""}


def test_filter_from_and_to_a_url() -> None:
    f = LogFilter(status="failed", to="a@b", text="x y", since=1700000000.0, until=1700000500.5)
    assert LogFilter.from_mapping(dict(parse_qsl(f.query_string()))) == f
    assert LogFilter.from_mapping({"status": "", "app": "shop", "junk": "1"}) == \
        LogFilter(app="shop")
    for bad in ({"status": "lost"}, {"since": "yesterday"}, {"until": "nan"},
                {"since": "-5"}, {"text": "x" * 321}):
        with pytest.raises(MessageError) as err:
            LogFilter.from_mapping(bad)
        assert err.value.code == "log.filter" and next(iter(bad)) in err.value.message
    with pytest.raises(MessageError, match="whole number of hours"):
        Log.series(Log.__new__(Log), 0, bucket=60)


# -- the indexes each filter uses ----------------------------------------------------------
def _plan(engine: Engine, statement: str, params: Any) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # Tiny tables: a sequential scan would win; the point is that an index CAN serve.
            conn.exec_driver_sql("SET enable_seqscan = off")
            rows = conn.exec_driver_sql("EXPLAIN " + statement, params).all()
        else:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
    return " / ".join(str(r[-1]) for r in rows)


def test_filters_use_their_indexes(queue: Queue, sample: dict[str, str]) -> None:
    """Each filter's page query (captured as run) is served by its index."""
    pg = queue.engine.dialect.name == "postgresql"
    assert queue.log.index_pending() == len(sample)
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    def plan(f: LogFilter) -> str:
        event.listen(queue.engine, "before_cursor_execute", capture)
        try:
            queue.log.page(f)
        finally:
            event.remove(queue.engine, "before_cursor_execute", capture)
        return _plan(queue.engine, *seen[-1])

    assert "ix_messages_status_created" in plan(LogFilter(status="failed"))
    assert "ix_messages_app_created" in plan(LogFilter(app="shop"))
    assert "ix_messages_via_created" in plan(LogFilter(connection="primary"))
    assert "ix_messages_created" in plan(LogFilter(since=T0))
    for f, index in ((LogFilter(text="invoice"), "ix_message_search_body"),
                     (LogFilter(to="carol@"), "ix_message_search_rcpt"),
                     (LogFilter(sender="billing"), "ix_message_search_sndr")):
        p = plan(f)
        if pg:
            assert index in p, p
        else:
            assert "messages_fts VIRTUAL TABLE INDEX" in p, p
            assert not re.search(r"SCAN messages( |$)", p), p


# -- migration 0008 on a populated log -----------------------------------------------------
def test_migration_from_a_populated_0007_database(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    db = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{db}")
    cfg = Config()
    cfg.set_main_option("script_location", str(direct.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0007")
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(messages)")]
    assert "via" not in cols
    made = []
    with engine.begin() as conn:
        for i, (status, subject) in enumerate([("sent", "Welcome aboard"),
                                               ("failed", "Password reset"),
                                               ("queued", "Welcome back")]):
            msg_id = new_id()
            raw = compose(sender="a@example.org", to=[f"u{i}@example.test"],
                          subject=subject, text="x\n")
            row: dict[str, Any] = {c: None for c in cols}
            row.update(id=msg_id, created_at=T0 + i, updated_at=T0 + i, status=status,
                       next_attempt_at=T0, expires_at=T0 + 1e6, attempt_count=1,
                       sender="a@example.org", recipients=[f"u{i}@example.test"],
                       rcpt_status={}, source="old", app="shop", message_id=f"<{i}@x>",
                       subject=subject, from_header="a@example.org",
                       to_header=f"u{i}@example.test", size=len(raw), raw=raw, priority=0)
            row = {k: json.dumps(v) if isinstance(v, list | dict) else v
                   for k, v in row.items()}
            conn.execute(insert(table("messages", *(column(c) for c in cols))), row)
            for conn_name in ("first", "second"):
                conn.execute(insert(attempts).values(**_attempt(conn_name, status),
                                                     message_id=msg_id))
            made.append(msg_id)
    migrate(engine)
    log = Log(engine)
    assert ids(log, LogFilter(text="welcome")) == [made[2], made[0]]
    assert ids(log, LogFilter(to="u1@example")) == [made[1]]
    assert ids(log, LogFilter(connection="second")) == made[::-1]  # the last attempt's
    assert full_counts(engine) == {(T0 // HOUR * HOUR, "sent", "second", "shop"): 1,
                                   (T0 // HOUR * HOUR, "failed", "second", "shop"): 1}
    assert log.counts() == {"sent": 1, "failed": 1, "queued": 1}
    # and the triggers keep going after the migration
    q = Queue(engine, clock=FakeClock(T0 + 100))
    later = q.enqueue_sync(envelope("z@example.test", subject="Welcome again"))
    assert ids(log, LogFilter(text="welcome"))[0] == later
    engine.dispose()


# -- the text index, written after the commit ------------------------------------------------
def test_index_pending_moves_rows_into_the_index(queue: Queue, clock: FakeClock) -> None:
    """An enqueue leaves a pending row and nothing in the index; index_pending takes them in
    batches; searches give the same rows before, during and after."""
    made = [add(queue, clock, subject=f"order {1000 + i} shipped", to=f"u{i}@corp.example",
                at=T0 + i) for i in range(5)]
    log = queue.log
    assert log.pending() == 5

    def answers() -> tuple[list[str], ...]:
        return (ids(log, LogFilter(text="order 1003")), ids(log, LogFilter(to="u4@corp")),
                ids(log, LogFilter(text="shipped")), ids(log, LogFilter(text="nowhere")))

    want = ([made[3]], [made[4]], made[::-1], [])
    assert answers() == want
    assert log.index_pending(batch=2) == 2 and log.pending() == 3
    assert answers() == want  # half indexed, half pending
    if queue.engine.dialect.name == "sqlite":  # in arrival order (FTS5 appends cheaply)
        with queue.engine.connect() as conn:
            left = set(conn.execute(pending.ids(False)).scalars())
        assert left == set(made[2:])
    assert log.index_pending(batch=10) == 3 and log.pending() == 0
    assert answers() == want
    assert log.index_pending() == 0
    assert log.catch_up() == 0


def _local(value: str) -> str:
    return "".join(c for c in value if c.isalnum())


TEXTS = st.text(alphabet="abcxyz@. 12", min_size=0, max_size=12)
LOG_OPS = st.lists(st.tuples(st.sampled_from(["add", "add", "index", "delete", "rewrite"]),
                             st.integers(0, 50), TEXTS, TEXTS), min_size=1, max_size=30)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=LOG_OPS, queries=st.lists(TEXTS.filter(lambda q: q.strip() == q and q),
                                     min_size=1, max_size=4))
def test_search_equals_a_scan_whatever_is_pending(
        queue: Queue, clock: FakeClock, ops: list[tuple[str, int, str, str]],
        queries: list[str]) -> None:
    """Inserts, index batches, deletes and header rewrites interleaved at random: every text,
    recipient and sender search answers what comparing each row in Python does."""
    log = queue.log
    with queue.engine.begin() as conn:  # the fixture is shared by hypothesis' examples
        conn.execute(delete(messages))
    for op, n, a, b in ops:
        with queue.engine.connect() as conn:
            known = list(conn.execute(select(messages.c.id).order_by(messages.c.id)).scalars())
        target = known[n % len(known)] if known else None
        if op == "add" or target is None:
            add(queue, clock, subject=f"s {a}", to=f"x{_local(b)}@t{n}.example",
                sender=f"y{_local(a)}@s.example", at=T0 + n)
        elif op == "index":
            log.index_pending(batch=n % 4 + 1)
        elif op == "delete":
            assert queue.delete_sync(target)
        else:  # a rewrite of searched columns (no writer does it today; the index follows)
            with queue.engine.begin() as conn:
                conn.execute(update(messages).where(messages.c.id == target)
                             .values(subject=f"r {b}", to_header=f"z{_local(a)}@r.example"))
    for q in queries:
        assert ids(log, LogFilter(text=q), limit=1000) == searched(log, q, TEXT), q
        assert ids(log, LogFilter(to=q), limit=1000) == addressed(
            log, q, ("to_header", "recipients")), q
        assert ids(log, LogFilter(sender=q), limit=1000) == addressed(
            log, q, ("sender", "from_header")), q
    log.catch_up()
    assert log.pending() == 0
    if queue.engine.dialect.name == "sqlite":
        with queue.engine.begin() as conn:  # FTS5 compares its index with the table
            conn.exec_driver_sql(
                "INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)")
    for q in queries:
        assert ids(log, LogFilter(text=q), limit=1000) == searched(log, q, TEXT), q


def test_deleting_a_message_forgets_its_pending_and_indexed_rows(queue: Queue,
                                                                  clock: FakeClock) -> None:
    log = queue.log
    indexed = add(queue, clock, subject="keep me indexed", at=T0)
    log.index_pending()
    waiting = add(queue, clock, subject="keep me pending", at=T0 + 1)
    assert log.pending() == 1
    with queue.engine.begin() as conn:  # one statement over both (a retention purge)
        conn.execute(delete(messages).where(messages.c.id.in_([indexed, waiting])))
    assert log.pending() == 0
    assert ids(log, LogFilter(text="keep me")) == []
    if queue.engine.dialect.name == "postgresql":
        with queue.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM message_search").scalar() == 0


def test_two_nodes_draining_at_once_take_each_row_once(queue: Queue, clock: FakeClock) -> None:
    """Two indexers (two nodes) in parallel while new mail keeps arriving: every message
    indexed exactly once, none lost (PostgreSQL: SKIP LOCKED gives each other rows; SQLite:
    one writer at a time)."""
    for i in range(300):
        add(queue, clock, subject=f"bulk {i}", at=T0 + i)
    taken: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def node() -> None:
        mine = Log(queue.engine)
        start.wait(timeout=30)
        try:
            for _ in range(1000):  # bounded: 300 rows in batches of 7 take ~45 rounds
                n = mine.index_pending(batch=7)
                taken.append(n)
                if n == 0 and mine.pending() == 0:
                    return
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=node) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(20):  # arriving while they drain
        add(queue, clock, subject=f"late {i}", at=T0 + 1000 + i)
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    rest = queue.log.catch_up()  # whatever arrived after both stopped
    pg = queue.engine.dialect.name == "postgresql"
    with queue.engine.connect() as conn:  # one index row per message (FTS5: its docsize)
        rows = conn.exec_driver_sql(
            "SELECT count(*), count(DISTINCT id) FROM message_search" if pg else
            "SELECT count(*), count(DISTINCT id) FROM messages_fts_docsize").one()
    assert tuple(rows) == (320, 320) and queue.log.pending() == 0
    assert sum(taken) + rest == 320  # no id taken twice
    assert len(ids(queue.log, LogFilter(text="bulk 1"), limit=1000)) == 111  # 1, 10-19, 100-199


def test_the_indexer_chore_drains_and_survives_failures(queue: Queue, clock: FakeClock,
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """index_loop (run by serve and `postroom worker`): a failure is logged once and retried;
    when the database answers again, the pending rows are indexed."""
    from sqlalchemy.exc import OperationalError

    for i in range(12):
        add(queue, clock, subject=f"chore {i}", at=T0 + i)
    real = Log.index_pending
    fails = {"left": 3}

    def flaky(self: Log, batch: int = 2000) -> int:
        if fails["left"]:
            fails["left"] -= 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return real(self, batch)

    monkeypatch.setattr(Log, "index_pending", flaky)

    async def go() -> None:
        task = asyncio.create_task(index_loop(queue.log, batch=5, interval=0.01))
        try:
            for _ in range(500):  # bounded: 5 s at most
                if queue.log.pending() == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="postroom.store.log"):
        run(queue, go)
    assert queue.log.pending() == 0 and fails["left"] == 0
    failed = [r for r in caplog.records if "indexing the email log failed" in r.message]
    assert len(failed) == 1 and "database is locked" in failed[0].message
    assert any("works again" in r.message for r in caplog.records)


# -- whole addresses: log_addresses (migration 0011) ----------------------------------------
def _address_rows(engine: Engine) -> set[tuple[str, str, str]]:
    with engine.connect() as conn:
        return {tuple(r) for r in conn.exec_driver_sql(  # type: ignore[misc]
            "SELECT role, address, message_id FROM log_addresses")}


def test_a_whole_address_is_found_exactly(queue: Queue, clock: FakeClock) -> None:
    """A whole address matches that address (any case) in the envelope or the To / From
    header, and nothing that merely contains it; part of one is still a substring. The same
    before and after indexing; a delete forgets the rows, a rewrite has them read again."""
    log = queue.log
    carol = add(queue, clock, to="Carol@Example.test", sender="Shop <billing@shop.example>",
                at=T0)
    longer = add(queue, clock, to="xcarol@example.test", sender="billing@shop.example.au",
                 at=T0 + 1)
    suffix = add(queue, clock, to="carol@example.test.au", at=T0 + 2)
    clock.t = T0 + 3
    header = queue.enqueue_sync(Envelope(  # To names carol; the envelope says someone else
        "bounce@shop.example", ["archive@example.test"],
        compose(sender="Billing <billing@shop.example>", to=["Carol <carol@example.test>"],
                subject="copy", text="x\n"), source="test"))

    def answers() -> dict[str, list[str]]:
        return {"to": ids(log, LogFilter(to="carol@EXAMPLE.test")),
                "part": ids(log, LogFilter(to="carol@example")),
                "sender": ids(log, LogFilter(sender="billing@shop.example")),
                "envelope only": ids(log, LogFilter(sender="bounce@shop.example")),
                "archive": ids(log, LogFilter(to="archive@example.test"))}

    want = {"to": [header, carol], "part": [header, suffix, longer, carol],
            "sender": [header, carol], "envelope only": [header], "archive": [header]}
    assert answers() == want  # all pending
    assert log.index_pending(batch=2) == 2
    assert answers() == want  # half and half
    log.catch_up()
    assert log.pending() == 0
    assert answers() == want
    assert ("r", "carol@example.test", carol) in _address_rows(queue.engine)
    assert queue.delete_sync(header)
    assert {m for _, _, m in _address_rows(queue.engine)} == {carol, longer, suffix}
    with queue.engine.begin() as conn:  # a rewrite (no writer does it): read again
        conn.execute(update(messages).where(messages.c.id == longer)
                     .values(recipients=["carol@example.test"]))
    assert ("p", "", longer) in _address_rows(queue.engine)
    assert ids(log, LogFilter(to="carol@example.test")) == [longer, carol]  # pending again
    assert log.index_pending() == 1
    assert ("r", "carol@example.test", longer) in _address_rows(queue.engine)
    assert not any(role == "p" for role, _, _ in _address_rows(queue.engine))
    assert ids(log, LogFilter(to="carol@example.test")) == [longer, carol]


def test_a_whole_address_search_reads_the_address_key(queue: Queue,
                                                      sample: dict[str, str]) -> None:
    queue.log.catch_up()
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    event.listen(queue.engine, "before_cursor_execute", capture)
    try:
        assert ids(queue.log, LogFilter(to="carol@example.test")) == [sample["new"]]
    finally:
        event.remove(queue.engine, "before_cursor_execute", capture)
    p = _plan(queue.engine, *seen[-1])
    if queue.engine.dialect.name == "postgresql":
        assert re.search(r"log_addresses_pkey|ix_log_addresses_newest", p), p
    else:  # the key, or the (role, address, created_at) index, which holds the key too
        assert re.search(r"log_addresses USING (PRIMARY KEY|COVERING INDEX "
                         r"ix_log_addresses_newest)", p), p
        assert not re.search(r"SCAN messages( |$)", p), p


def _upgrade(engine: Engine, revision: str, *, down: bool = False) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(direct.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def _index_as_0010(engine: Engine) -> None:
    """What the indexer of revision 0010 did (it had no log_addresses to write)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "INSERT INTO message_search (id, body, rcpt, sndr) SELECT id, subject || E'\\n' "
                "|| from_header || E'\\n' || to_header || E'\\n' || message_id, to_header || "
                "E'\\n' || recipients::text, sender || E'\\n' || from_header FROM messages")
        else:
            conn.exec_driver_sql("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
        conn.exec_driver_sql("DELETE FROM log_pending")


def test_migration_0011_backfills_addresses_a_batch_at_a_time(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Messages logged before 0011 are read into log_addresses by the indexer, newest
    first, a batch at a time (the migration itself reads none); whole-address searches
    take the trigram path until it is done, and give the same answers after. Then down
    to 0010 and up again."""
    url = (request.getfixturevalue("pg_server").new_database() if backend == "postgresql"
           else f"sqlite:///{tmp_path / 'old.db'}")
    engine = make_engine(url)
    _upgrade(engine, "0010")
    clk = FakeClock(T0)
    queue = Queue(engine, clock=clk)
    made = []
    for i in range(7):
        clk.t = T0 + i
        made.append(queue.enqueue_sync(envelope(f"u{i % 3}@example.test", subject=f"m {i}")))
    with engine.begin() as conn:  # two created in the same instant: the cursor passes both
        conn.execute(update(messages).where(messages.c.id.in_(made[2:4]))
                     .values(created_at=T0 + 1.5))
    _index_as_0010(engine)
    _upgrade(engine, "head")  # 0011 and the later ones: this code reads the head's schema
    log = Log(engine)
    want = {i: ids(log, LogFilter(to=f"u{i}@example.test")) for i in range(3)}
    assert sorted(m for w in want.values() for m in w) == sorted(made)
    assert _address_rows(engine) == set() and not log._addresses_ready()
    clk.t = T0 + 100
    later = queue.enqueue_sync(envelope("u0@example.test", subject="after"))
    assert log.index_pending() == 1  # new mail: indexed with its addresses at once
    assert {m for _, _, m in _address_rows(engine)} == {later}
    want[0].insert(0, later)
    read = []
    while n := log.backfill_addresses(batch=2):
        read.append(n)
        assert {i: ids(log, LogFilter(to=f"u{i}@example.test")) for i in range(3)} == want
    assert sum(read) >= len(made) and max(read) <= 3  # a batch, plus its last instant's ties
    assert log._addresses_ready()
    assert {m for _, _, m in _address_rows(engine)} == {*made, later}
    assert {i: ids(log, LogFilter(to=f"u{i}@example.test")) for i in range(3)} == want
    _upgrade(engine, "0010", down=True)
    _upgrade(engine, "head")
    assert {i: ids(Log(engine), LogFilter(to=f"u{i}@example.test")) for i in range(3)} == want
    engine.dispose()


# -- a page looked for among the newest rows first (Log.window) ------------------------------
def test_a_windowed_page_is_the_whole_logs_page(queue: Queue, clock: FakeClock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole address in many messages, alone and beside other filters, and (PostgreSQL)
    a text beside status and app, page after page, some rows still pending: the window's
    answer, or the unbounded query's when the window holds less than a page, is the page
    the whole log gives."""
    monkeypatch.setattr("postroom.store.log.NEWEST", 6)
    monkeypatch.setattr("postroom.store.log.PAGE", 2)  # a text with 2 hits in 6 walks
    monkeypatch.setattr("postroom.store.log.WIDEN", 1)
    log = queue.log
    for i in range(40):  # two at each instant: the cursor passes ties
        add(queue, clock, to="many@example.test" if i % 2 else f"o{i}@example.test",
            sender="bulk@shop.example", subject=f"invoice {i}" if i % 3 else f"note {i}",
            app="shop" if i % 4 else "crm", status="failed" if i % 5 == 0 else "sent",
            tags=["odd"] if i % 2 else [], at=T0 + i // 2)
    log.index_pending(batch=25)  # the newest 15 stay pending
    filters = [LogFilter(to="many@example.test"),
               LogFilter(to="many@example.test", status="failed"),
               LogFilter(sender="bulk@shop.example"),
               LogFilter(sender="bulk@shop.example", to="many@example.test", status="failed"),
               LogFilter(text="invoice", status="sent", app="shop"),
               LogFilter(text="note", status="failed"),
               LogFilter(tag="odd"), LogFilter(tag="odd", status="failed")]

    def pages(f: LogFilter) -> list[str]:
        out: list[str] = []
        before = None
        for _ in range(40):  # bounded
            rows = log.page(f, before=before, limit=4)
            out += [r["id"] for r in rows]
            if len(rows) < 4:
                return out
            before = (rows[-1]["created_at"], rows[-1]["id"])
        raise AssertionError("more pages than messages")

    with log.engine.connect() as conn:
        assert log.window(conn, filters[0], None, 4) is not None
        for f in (filters[4], filters[6]):
            assert (log.window(conn, f, None, 4) is not None) == (
                queue.engine.dialect.name == "postgresql")
    windowed = {f: pages(f) for f in filters}
    assert all(windowed.values()), windowed
    monkeypatch.setattr(Log, "window", lambda *_a, **_k: None)
    assert windowed == {f: pages(f) for f in filters}


# -- the indexer's duty cycle ----------------------------------------------------------------
def test_the_indexer_gives_way_while_mail_flows(queue: Queue, clock: FakeClock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """While mail flows the indexer works DUTY of the time (the round's own duration sets the
    pause); idle, or with PENDING_BOUND rows waiting (searches compare those themselves),
    at full speed."""
    from postroom.store.log import DUTY, INDEX_PAUSE, index_pause

    assert index_pause(500, 500, 0.1, False) == INDEX_PAUSE
    assert index_pause(10, 500, 0.1, False, interval=1.0) == 1.0
    assert index_pause(500, 500, 0.2, True) == pytest.approx(0.2 * (1 - DUTY) / DUTY)
    assert index_pause(10, 500, 0.01, True, interval=1.0) == 1.0  # never below the interval
    assert index_pause(0, 500, 5.0, True, interval=1.0) == 1.0  # nothing done: nothing owed
    log = queue.log
    msg = add(queue, clock, at=1_600_000_000.0)  # created long ago, not being sent
    assert not log.gives_way()
    with queue.engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == msg).values(status="sending"))
    assert log.gives_way()
    monkeypatch.setattr("postroom.store.log.PENDING_BOUND", 1)  # one pending: the bound
    assert not log.gives_way()
    monkeypatch.setattr("postroom.store.log.PENDING_BOUND", 5000)
    with queue.engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == msg).values(status="sent"))
    assert not log.gives_way()
    import time

    add(queue, clock, at=time.time())  # just created: mail flows
    assert log.gives_way()


def test_pending_rows_narrowed_by_sql_still_match_as_the_indexer_does(queue: Queue,
                                                                      clock: FakeClock) -> None:
    """A whole-address search compares pending rows in Python after an ILIKE narrows them:
    the narrowing never drops a row the indexer will file under the address (upper case,
    LIKE's wildcards, the Kelvin sign U+212A whose lower case is an ASCII "k")."""
    log = queue.log
    kelvin = add(queue, clock, to="r@example.test", at=T0)
    upper = add(queue, clock, to="BoK_1%x@Example.test", at=T0 + 1)
    other = add(queue, clock, to="bokz1%x@example.test", at=T0 + 2)  # "_" is not a wildcard
    with queue.engine.begin() as conn:  # a header as a rewrite leaves it: pending again
        conn.execute(update(messages).where(messages.c.id == kelvin)
                     .values(to_header="Bo\u212a_1%x@example.test"))
    want = [upper, kelvin]
    assert ids(log, LogFilter(to="bok_1%x@example.test")) == want
    assert ids(log, LogFilter(to="bokz1%x@example.test")) == [other]
    log.catch_up()
    assert log.pending() == 0
    assert ids(log, LogFilter(to="bok_1%x@example.test")) == want
