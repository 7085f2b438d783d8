"""The bounce and complaint rate rule (issue 15, "bounce/complaint rate over R%"): the pure
rule (minimum sample, per connection and in all, one alert and one recovery with a margin)
and its figures read from the log's rollups and ``delivery_events`` on SQLite and
PostgreSQL, with the query plans on the indexes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import FakeClock, envelope
from sqlalchemy import Engine, insert, text, update

from postroom.alerts import rates
from postroom.alerts.config import AlertRule, AlertsSettings
from postroom.alerts.dispatcher import Dispatcher
from postroom.alerts.rules import Facts, Rate, State, decide
from postroom.exceptions import ConfigError
from postroom.queue.sql import Queue
from postroom.settings import load
from postroom.store.db import write_transaction
from postroom.store.schema import delivery_events, messages

T0 = 1_800_000_000.0


def rule(**kw: Any) -> AlertRule:
    return AlertRule(channels=["json://127.0.0.1:1/x"], failures=0, queue_age=0,
                     oauth_days=0, **kw)


def seen(r: AlertRule, state: State, by_conn: dict[str, Rate], at: float = T0) -> list[str]:
    out = decide([r], state, [], Facts(rates={r.name: by_conn}), at)
    return [f"{a.change.value}:{a.kind}:{a.connection or '*'}" for a in out]


def test_defaults_are_the_providers_lines(tmp_path: Path) -> None:
    r = rule()
    assert (r.bounce_rate, r.complaint_rate, r.rate_minutes, r.rate_min_sent) == (
        5, 0.1, 1440, 100)
    path = tmp_path / "postroom.toml"
    path.write_text('[[alerts]]\nchannels = ["a://b"]\ncomplaint_rate = -1\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError, match="complaint_rate"):
        load(path, connections=False)


def test_rate_opens_once_and_recovers_under_the_margin() -> None:
    r, state = rule(), State()
    # 3 bounces of 10 messages: too few to tell
    assert seen(r, state, {"ses": Rate(10, 3, 0)}) == []
    assert seen(r, state, {"ses": Rate(100, 5, 0)}) == ["opened:bounce_rate:ses"]
    assert seen(r, state, {"ses": Rate(200, 30, 0)}) == []  # the same incident
    assert seen(r, state, {"ses": Rate(500, 21, 0)}) == []  # 4.2%: not under 4% yet
    assert seen(r, state, {"ses": Rate(50, 0, 0)}) == []  # below the sample: stays open
    assert seen(r, state, {"ses": Rate(500, 19, 0)}) == ["recovered:bounce_rate:ses"]
    assert seen(r, state, {"ses": Rate(1000, 0, 1)}) == ["opened:complaint_rate:ses"]
    (inc,) = state.open.values()
    assert "1 of 1000 messages sent through ses" in inc.detail and "0.10%" in inc.detail


def test_rate_per_connection_and_in_all() -> None:
    r, state = rule(bounce_rate=5, complaint_rate=0), State()
    # each connection too small or under the line; together 120 messages, 7 bounces
    got = seen(r, state, {"a": Rate(60, 4, 0), "b": Rate(60, 3, 0)})
    assert got == ["opened:bounce_rate:*"]
    out = decide([r], State(), [], Facts(rates={r.name: {"a": Rate(100, 9, 0)}}), T0)
    assert [(a.connection, a.severity) for a in out] == [("a", "warning")]  # one, not two
    assert seen(rule(bounce_rate=0, complaint_rate=0), State(),
                {"a": Rate(100, 100, 100)}) == []


def test_rate_state_survives_json() -> None:
    import json

    r, state = rule(), State()
    seen(r, state, {"ses": Rate(100, 50, 0)})
    again = State.from_dict(json.loads(json.dumps(state.as_dict())))
    assert seen(r, again, {"ses": Rate(100, 50, 0)}) == []
    assert seen(r, again, {"ses": Rate(100, 0, 0)}) == ["recovered:bounce_rate:ses"]


# -- the figures, on SQLite and PostgreSQL ----------------------------------------------------
def sent(engine: Engine, clock: FakeClock, n: int, via: str, app: str | None = None
         ) -> list[str]:
    q = Queue(engine, lifetime=86400, clock=clock)
    ids = [q.enqueue_sync(envelope(f"r{i}@example.org")) for i in range(n)]
    with write_transaction(engine) as conn:  # the rollups' trigger counts each as sent
        conn.execute(update(messages).where(messages.c.id.in_(ids))
                     .values(status="sent", via=via, app=app, updated_at=clock()))
    asyncio.run(q.writer.aclose())
    return ids


def reported(engine: Engine, clock: FakeClock, conn_name: str, kind: str, ids: list[str],
             permanent: bool | None = None, ago: float = 0) -> None:
    with write_transaction(engine) as conn:
        conn.execute(insert(delivery_events), [
            {"connection": conn_name, "event_key": f"{kind}-{conn_name}-{mid}-{ago}",
             "message_id": mid, "kind": kind, "permanent": permanent,
             "at": clock() - ago, "received_at": clock() - ago} for mid in ids])


def test_figures_from_rollups_and_delivery_events(engine: Engine, clock: FakeClock) -> None:
    ses = sent(engine, clock, 40, "ses")
    shop = sent(engine, clock, 10, "ses", app="shop")
    smtp = sent(engine, clock, 5, "relay")
    reported(engine, clock, "ses", "bounced", ses[:3], permanent=True)
    reported(engine, clock, "ses", "bounced", ses[3:5])  # the provider did not say: counts
    reported(engine, clock, "ses", "bounced", ses[5:9], permanent=False)  # soft: does not
    reported(engine, clock, "ses", "complained", shop[:1])
    reported(engine, clock, "ses", "complained", ses[9:10], ago=2 * 86400)  # out of window
    reported(engine, clock, "relay", "bounced", smtp[:1], permanent=True)
    reported(engine, clock, "ses", "delivered", ses[10:20])
    now = clock()
    with engine.connect() as conn:
        every = rates.read(conn, rule(), now)
        assert every == {"ses": Rate(50, 5, 1), "relay": Rate(5, 1, 0)}
        assert rates.read(conn, rule(connections=["relay"]), now) == {"relay": Rate(5, 1, 0)}
        assert rates.read(conn, rule(apps=["shop"]), now) == {"ses": Rate(10, 0, 1)}
        shared = rates.read_all(conn, [rule(name="a"), rule(name="b"),
                                       rule(name="off", bounce_rate=0, complaint_rate=0)], now)
        assert shared == {"a": every, "b": every}


def test_dispatcher_alerts_on_the_rate(engine: Engine, clock: FakeClock,
                                       tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text('[[alerts]]\nchannels = ["json://127.0.0.1:1/x"]\nfailures = 0\n'
                    'queue_age = 0\nrate_min_sent = 20\n', encoding="utf-8")
    settings = load(path, connections=False)
    assert settings.section(AlertsSettings).rules[0].rate_min_sent == 20
    ids = sent(engine, clock, 20, "ses")
    reported(engine, clock, "ses", "bounced", ids[:2], permanent=True)  # 10%
    d = Dispatcher(engine, lambda: settings, clock=clock)
    alerts = d.evaluate()
    assert d.evaluate() == []  # one alert per incident
    assert [(a.kind, a.connection) for a in alerts] == [("bounce_rate", "ses")]
    assert "2 of 20 messages" in alerts[0].text


def plan(engine: Engine, stmt: Any) -> str:
    """The database's plan of ``stmt`` with its parameters inlined, as one text."""
    sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET enable_seqscan = off"))  # the tables are tiny here
            return "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + sql)))
        return "\n".join(str(r[-1]) for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))


def test_rate_queries_use_the_indexes(engine: Engine) -> None:
    captured: list[Any] = []

    class Spy:
        def execute(self, stmt: Any) -> list[Any]:
            captured.append(stmt)
            return []

    rates.read(Spy(), rule(), T0)  # type: ignore[arg-type]
    sent_q, events_q = captured
    sent_plan, events_plan = plan(engine, sent_q), plan(engine, events_q)
    if engine.dialect.name == "postgresql":
        assert "log_rollups_pkey" in sent_plan, sent_plan
        assert "ix_delivery_events_kind" in events_plan, events_plan
        assert "Seq Scan" not in sent_plan + events_plan
    else:
        assert "USING INDEX sqlite_autoindex_log_rollups_1" in sent_plan, sent_plan
        assert "USING INDEX ix_delivery_events_kind" in events_plan, events_plan
