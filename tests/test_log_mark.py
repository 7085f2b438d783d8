"""The email log's bookkeeping off the enqueue (issue 13, migration 0017, store/pending.py):
on SQLite an enqueue writes the messages and nothing for the log (a rowid mark says what
the text index holds), and every writer still keeps the log right: the queue, sendmail's
direct insert, deletes that take the newest rows, and a database upgraded with rows
pending; on both, the status index holds finished messages only."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from migration_helpers import migrate_to
from queue_helpers import envelope
from sqlalchemy import Engine, event, select, text

from postroom.envelope import Envelope
from postroom.message import compose
from postroom.queue.sql import IdempotencyKey, Queue
from postroom.store import direct, pending
from postroom.store.db import make_engine
from postroom.store.log import Log, LogFilter
from postroom.store.schema import messages


def _ids(log: Log, f: LogFilter) -> set[str]:
    return {r["id"] for r in log.page(f)}


def _fts_intact(engine: Engine) -> None:
    """SQLite: FTS5 checks its index against the messages it says it holds (it raises on a
    row indexed twice, missing, or indexed with other text)."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO messages_fts (messages_fts, rank) "
                                 "VALUES ('integrity-check', 1)")


def _enqueue_batch(queue: Queue, envs: list[Envelope]) -> list[str]:
    """Enqueue concurrently: the group commit writes them in one transaction (the last with
    an idempotency key: an INSERT of its own in that transaction, after the batch's)."""
    key = IdempotencyKey("shop", "k1", "h1")

    async def go() -> list[str]:
        try:
            return list(await asyncio.gather(
                *(queue.enqueue(e) for e in envs[:-1]),
                queue.enqueue(envs[-1], idempotency=key)))
        finally:
            await queue.writer.aclose()
    return asyncio.run(go())


def test_an_enqueue_batch_writes_the_messages_alone(queue: Queue) -> None:
    """One executemany of messages for a batch (SQLite: no trigger but the rollups', which
    wants a finished status, runs on the insert; PostgreSQL: the batch's pending ids in one
    statement, the row trigger for the idempotent enqueue's own INSERT and for a writer
    outside the queue), searchable before and after the indexer took them."""
    engine, pg = queue.engine, queue.engine.dialect.name == "postgresql"
    seen: list[str] = []

    def capture(_c: Any, _cur: Any, stmt: str, *_a: Any) -> None:
        if "INSERT INTO messages" in stmt:
            seen.append(stmt)

    envs = [Envelope("app@example.org", [f"ü{i}@example.test", "x@example.test"],
                     compose(sender="app@example.org", to=[f"u{i}@example.test"],
                             subject=f"Bestellung {i} versandt", text="body\n"),
                     source="test", tags=["größe"] if i % 2 else [],
                     metadata={"k": "ä"} if i == 1 else {}) for i in range(5)]
    event.listen(engine, "before_cursor_execute", capture)
    try:
        made = _enqueue_batch(queue, envs)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert len(seen) == 2, seen  # the batch's executemany, the idempotent enqueue's own
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(messages))}
        if not pg:  # what fires on an insert: the rollups' trigger, whose WHEN wants a final
            on_insert = conn.exec_driver_sql(  # status, and nothing else
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND "
                "sql LIKE '%AFTER INSERT ON messages%'").scalars().all()
            assert on_insert == ["log_rollup_ins"]
    for env in envs:
        r = rows[env.id]
        assert (r.recipients, r.raw, r.status) == (list(env.recipients), env.raw, "queued")
        assert r.rcpt_status == {a: {"state": "pending"} for a in env.recipients}
        assert (r.tags, r.meta) == (list(env.tags) or None, dict(env.metadata) or None)
    log = queue.log
    assert log.pending() == 5
    with engine.begin() as conn:  # another writer: an INSERT of its own, of a finished one
        conn.execute(messages.insert().values(
            id="outside", created_at=1.0, updated_at=1.0, status="sent", next_attempt_at=0.0,
            expires_at=9e9, attempt_count=0, sender="s@example.org", recipients=["o@x.test"],
            rcpt_status={}, source="test", message_id="<o@x>", subject="Bestellung extern",
            from_header="s@example.org", to_header="o@x.test", size=1, raw=b"x"))
    made.append("outside")
    assert log.pending() == 6 and log.counts().get("sent") == 1  # the rollups counted it
    want = (_ids(log, LogFilter(text="Bestellung 3")), _ids(log, LogFilter(to="ü4@example.test")),
            _ids(log, LogFilter(text="versandt")))
    assert want == ({made[3]}, {made[4]}, set(made[:5]))
    assert _ids(log, LogFilter(text="extern")) == {"outside"}
    assert log.index_pending(batch=3) == 3 and log.pending() == 3
    assert log.index_pending() == 3 and log.pending() == 0
    _fts_intact(engine)
    assert (_ids(log, LogFilter(text="Bestellung 3")), _ids(log, LogFilter(to="ü4@example.test")),
            _ids(log, LogFilter(text="versandt"))) == want


def test_a_batch_in_chunks_writes_what_one_row_a_statement_would(queue: Queue) -> None:
    """PostgreSQL writes a batch CHUNK messages a statement (store/pending.py): a batch of
    two chunks and a rest gives the same rows, each pending once, found by its text and
    address, as the one-row executemany (which SQLite keeps)."""
    n = 2 * pending.CHUNK + 5
    envs = [Envelope("app@example.org", [f"c{i}@example.test"],
                     compose(sender="app@example.org", to=[f"c{i}@example.test"],
                             subject=f"Sendung {i} unterwegs", text="body\n"),
                     source="test", tags=[f"t{i}"] if i % 3 else [],
                     metadata={"i": str(i)} if i % 5 == 0 else {}, priority=i % 3 - 1)
            for i in range(n)]
    made = _enqueue_batch(queue, envs)
    with queue.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(messages))}
    assert sorted(rows) == sorted(made) and len(made) == n
    for i, env in enumerate(envs):
        r = rows[env.id]
        assert (r.recipients, r.raw, r.status, r.priority, r.size, r.subject) == (
            list(env.recipients), env.raw, "queued", env.priority, len(env.raw),
            f"Sendung {i} unterwegs")
        assert (r.tags, r.meta) == (list(env.tags) or None, dict(env.metadata) or None)
    log = queue.log
    assert log.pending() == n
    assert _ids(log, LogFilter(text="Sendung 17 unterwegs")) == {made[17]}
    assert _ids(log, LogFilter(to="c33@example.test")) == {made[33]}
    assert log.catch_up() == n and log.pending() == 0
    assert _ids(log, LogFilter(text="Sendung 17 unterwegs")) == {made[17]}
    assert _ids(log, LogFilter(to="c33@example.test")) == {made[33]}
    assert _ids(log, LogFilter(text="unterwegs")) == set(made)


@pytest.mark.sqlite_only
def test_a_rowid_given_again_waits_for_the_index(queue: Queue) -> None:
    """SQLite gives a new row the largest rowid + 1: after the newest messages are deleted
    (indexed or not), the next one gets a rowid the mark had passed; the delete trigger
    lowered the mark, so it is pending, found, and indexed once. sendmail's direct insert
    too."""
    log, engine = queue.log, queue.engine
    first = [queue.enqueue_sync(envelope("a@example.test", subject=f"kept {i}"))
             for i in range(3)]
    assert log.catch_up() == 3
    gone = queue.enqueue_sync(envelope("b@example.test", subject="dropped pending"))
    with engine.begin() as conn:  # the newest: one indexed, one pending
        conn.execute(messages.delete().where(messages.c.id.in_([first[2], gone])))
    _fts_intact(engine)
    again = queue.enqueue_sync(envelope("c@example.test", subject="rowid again"))
    with engine.connect() as conn:
        rid = conn.exec_driver_sql("SELECT rowid FROM messages WHERE id = ?",
                                   (again,)).scalar()
        mark = conn.execute(select(pending.mark())).scalar()
    assert rid == 3 and mark == 2  # the rowid of first[2], which the index no longer has
    assert log.pending() == 1
    assert _ids(log, LogFilter(text="rowid again")) == {again}
    assert _ids(log, LogFilter(text="kept")) == set(first[:2])
    url = str(engine.url)
    sent = direct.enqueue(envelope("d@example.test", subject="from sendmail"), database_url=url)
    assert sent is not None and log.pending() == 2
    assert _ids(log, LogFilter(text="from sendmail")) == {sent}
    assert log.catch_up() == 2 and log.pending() == 0
    _fts_intact(engine)
    with engine.begin() as conn:  # every message gone: the mark goes back to 0
        conn.execute(messages.delete())
    last = queue.enqueue_sync(envelope("e@example.test", subject="after all gone"))
    assert log.pending() == 1 and _ids(log, LogFilter(text="after all")) == {last}
    assert log.catch_up() == 1
    _fts_intact(engine)


def test_migration_0017_with_rows_pending_and_back(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Messages pending when 0017 runs are in the index after it (their addresses read by
    the indexer); one pending at 0017 is pending again at 0016 (its log_pending row), and
    every search answers the same at each step. The status index holds finished messages
    only from 0017 on."""
    url = (request.getfixturevalue("pg_server").new_database() if backend == "postgresql"
           else f"sqlite:///{tmp_path / 'old.db'}")
    engine = make_engine(url)
    migrate_to(engine, "0016", up=True)
    with engine.begin() as conn:  # as the 0016 enqueue wrote them: the row trigger too
        for i in range(3):
            conn.execute(messages.insert().values(
                id=f"m{i}", created_at=1000.0 + i, updated_at=1000.0 + i,
                status="sent" if i else "queued", next_attempt_at=0.0, expires_at=9e9,
                attempt_count=0, sender="s@example.org", recipients=[f"r{i}@example.test"],
                rcpt_status={}, source="test", message_id=f"<{i}@x>", subject=f"old {i}",
                from_header="s@example.org", to_header=f"r{i}@example.test", size=1,
                raw=b"x"))
        assert conn.execute(text("SELECT count(*) FROM log_pending")).scalar() == 3
    migrate_to(engine, "head", up=True)
    log = Log(engine)
    assert log.pending() == 0 or engine.dialect.name == "postgresql"
    _fts_intact(engine)

    def answers() -> tuple[set[str], ...]:
        return (_ids(log, LogFilter(text="old")), _ids(log, LogFilter(to="r1@example.test")),
                _ids(log, LogFilter(status="sent")))

    want = ({"m0", "m1", "m2"}, {"m1"}, {"m1", "m2"})
    assert answers() == want
    log.catch_up()
    assert answers() == want and log.pending() == 0
    queue = Queue(engine)
    late = queue.enqueue_sync(envelope("r1@example.test", subject="old but late"))
    want = ({"m0", "m1", "m2", late}, {"m1", late}, {"m1", "m2"})
    assert answers() == want
    migrate_to(engine, "0016", up=False)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM log_pending")).scalars().all() == [late]
    migrate_to(engine, "head", up=True)
    log = Log(engine)
    log.catch_up()
    _fts_intact(engine)  # (it compares every message: none may be pending)
    assert answers() == want and log.pending() == 0
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            found = conn.exec_driver_sql("SELECT indexdef FROM pg_indexes WHERE indexname = "
                                         "'ix_messages_status_created'").scalar()
        else:
            found = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = "
                                         "'ix_messages_status_created'").scalar()
    assert "WHERE" in str(found) and "suppressed" in str(found), found
    engine.dispose()
