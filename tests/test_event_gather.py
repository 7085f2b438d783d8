"""Delivery events recorded together (postroom.queue.gather, postroom.webhooks.intake): many
concurrent one-event reports share one write, each caller hears its own result after the
commit, the same event in two concurrent reports is kept once, and one report that fails the
shared write fails alone (its own savepoint), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from queue_helpers import envelope, run
from sqlalchemy import event, func, insert, select, update

from postroom.exceptions import StoreError
from postroom.queue.sql import Queue
from postroom.store.schema import attempts, delivery_events, messages, suppressions
from postroom.webhooks import DeliveryEvent, Kind
from postroom.webhooks.intake import EventLog, Recorded

NOW = 1_700_000_000.0
REPORTS = 20


def _sent(queue: Queue, n: int) -> list[str]:
    """``n`` sent messages whose attempts through "hooks" kept provider ids pm-0 ... ."""
    ids = []
    for i in range(n):
        env = envelope(f"r{i}@example.net", sender="shop@shop.example")
        queue.enqueue_sync(env)
        ids.append(env.id)
    with queue.engine.begin() as conn:
        conn.execute(update(messages).values(status="sent", via="hooks"))
        conn.execute(insert(attempts), [
            {"message_id": mid, "connection": "hooks", "started_at": NOW, "ended_at": NOW,
             "outcome": "sent", "permanent": False, "recipients": {}, "transcript": "",
             "provider_id": f"pm-{i}"} for i, mid in enumerate(ids)])
    return ids


def _event(i: int, eid: str | None = None, bounce: bool = False,
           at: Any = NOW) -> DeliveryEvent:
    return DeliveryEvent(Kind.BOUNCED if bounce else Kind.DELIVERED, f"pm-{i}",
                         f"r{i}@example.net", at, "550 5.1.1 no such user" if bounce else "",
                         {"i": i}, event_id=eid or f"ev-{i}", permanent=bounce or None)


def test_concurrent_reports_share_one_write(queue: Queue) -> None:
    ids = _sent(queue, REPORTS)
    commits: list[int] = []
    event.listen(queue.engine, "commit", lambda _conn: commits.append(1))
    log = EventLog(queue)

    async def scenario() -> list[Recorded]:
        return await asyncio.gather(*(
            log.record("hooks", [_event(i, bounce=i % 5 == 0)]) for i in range(REPORTS)))

    done = run(queue, scenario)
    assert len(commits) < REPORTS  # shared, not one transaction each
    for i, one in enumerate(done):  # each caller got its own event, attached
        assert [(ev.event_id, msg) for ev, msg, _ in one.new] == [(f"ev-{i}", ids[i])]
    with queue.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(delivery_events)).scalar() == \
            REPORTS
        listed = set(conn.execute(select(suppressions.c.address)).scalars())
    assert listed == {f"r{i}@example.net" for i in range(0, REPORTS, 5)}


def test_the_same_event_in_two_concurrent_reports_is_kept_once(queue: Queue) -> None:
    _sent(queue, 2)
    log = EventLog(queue)

    async def scenario() -> list[Recorded]:
        return await asyncio.gather(log.record("hooks", [_event(0), _event(1)]),
                                    log.record("hooks", [_event(0)]))

    first, second = run(queue, scenario)
    assert (len(first.new), first.duplicates) == (2, 0)
    assert (len(second.new), second.duplicates) == (0, 1)


def test_a_report_that_fails_the_write_fails_alone(queue: Queue) -> None:
    """A row the database driver refuses (here: a time that is no number, which no
    provider's module makes) fails its own report with a StoreError; the reports written
    with it are kept."""
    ids = _sent(queue, 4)
    log = EventLog(queue)

    async def scenario() -> list[Recorded | BaseException]:
        return await asyncio.gather(
            log.record("hooks", [_event(0)]),
            log.record("hooks", [_event(1, "ev-bad", at=object())]),
            log.record("hooks", [_event(2), _event(3, bounce=True)]),
            return_exceptions=True)

    good, bad, more = run(queue, scenario)
    assert isinstance(bad, StoreError)
    assert isinstance(good, Recorded) and isinstance(more, Recorded)
    assert len(good.new) == 1 and len(more.new) == 2
    with queue.engine.connect() as conn:
        kept = conn.execute(select(delivery_events.c.event_key, delivery_events.c.message_id)
                            .order_by(delivery_events.c.event_key)).all()
        listed = list(conn.execute(select(suppressions.c.address)).scalars())
    assert [tuple(r) for r in kept] == [("ev-0", ids[0]), ("ev-2", ids[2]), ("ev-3", ids[3])]
    assert listed == ["r3@example.net"]


def test_a_caller_that_goes_away_does_not_cancel_the_others(queue: Queue) -> None:
    _sent(queue, 2)
    log = EventLog(queue)

    async def scenario() -> Recorded:
        gone = asyncio.ensure_future(log.record("hooks", [_event(0)]))
        stays = asyncio.ensure_future(log.record("hooks", [_event(1)]))
        await asyncio.sleep(0)  # both joined the same write
        gone.cancel()
        return await stays

    assert len(run(queue, scenario).new) == 1
