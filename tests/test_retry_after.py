"""Retry-After as a real input (issue 14): a provider answering 429 with Retry-After holds its
connection until then for every worker and node (routing.health, through the database); the
chain falls back meanwhile, and mail no connection took waits at least until the hold ends.
Two workers, each with its own queue and health cache, on one database: SQLite and
PostgreSQL (the ``queue`` fixture runs each test on both)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import T0, FakeClock, envelope, run
from sqlalchemy import select
from typer.testing import CliRunner

from postroom.envelope import Envelope
from postroom.exceptions import DeliveryError
from postroom.queue.sql import Queue
from postroom.queue.worker import Worker
from postroom.routing.health import Health
from postroom.routing.rules import Route
from postroom.settings import DeliverySettings
from postroom.store.log import LogFilter
from postroom.store.schema import connection_state, events
from postroom.transports import base


class Provider(base.Transport):
    """An HTTPS API provider as the worker sees it: answers 429 with the next Retry-After of
    ``busy`` while there is one, then accepts and names its message id."""

    def __init__(self, name: str, busy: list[float] | None = None) -> None:
        super().__init__(base.ConnectionBase(name=name, transport="fake"),
                         base.TransportContext(ehlo_name="test"))
        self.busy = list(busy or [])
        self.calls = 0
        self.sent: list[Envelope] = []

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        self.calls += 1
        if self.busy:
            raise DeliveryError(f"{self.name}: HTTP 429 Too Many Requests; it asks to wait",
                                code="http.rate_limited", reply_code=429,
                                retry_after=self.busy.pop(0))
        self.sent.append(envelope)
        ok = base.RecipientResult(250, "accepted")
        return base.DeliveryResult({r: ok for r in envelope.recipients}, reply_code=250,
                                   provider_id=f"{self.name}-{len(self.sent)}")


def worker(queue: Queue, clock: FakeClock, owner: str, *transports: Provider) -> Worker:
    return Worker(queue, {t.name: t for t in transports}, DeliverySettings(), owner=owner,
                  clock=clock, default_connection=transports[0].name,
                  routes=[Route(chain=[t.name for t in transports])])


async def deliver(queue: Queue, w: Worker, rcpt: str | None = None) -> list[dict[str, Any]]:
    """Hand in a message (if ``rcpt``), then one claim and delivery run by ``w``."""
    if rcpt is not None:
        await queue.enqueue(envelope(rcpt))
    claimed = await queue.claim(w.owner, 10, 600)
    rows = [a for m in claimed for a in await w.deliver(m)]
    await w.health.flush()
    return rows


def tried(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["connection"], a["outcome"]) for a in rows]


def held_until(queue: Queue, name: str) -> float | None:
    with queue.engine.connect() as conn:
        return conn.execute(select(connection_state.c.held_until)
                            .where(connection_state.c.name == name)).scalar()


def kinds(queue: Queue, kind: str) -> list[str]:
    with queue.engine.connect() as conn:
        return [r.detail for r in conn.execute(select(events).where(events.c.kind == kind))]


def test_a_hold_is_honoured_by_every_worker(queue: Queue, clock: FakeClock) -> None:
    other = Queue(queue.engine, clock=clock)  # a second node: its own writer and caches
    a_api, a_backup = Provider("api", [120]), Provider("backup")
    b_api, b_backup = Provider("api"), Provider("backup")
    node_a = worker(queue, clock, "node-a", a_api, a_backup)
    node_b = worker(other, clock, "node-b", b_api, b_backup)

    async def go() -> None:
        try:
            first = await deliver(queue, node_a, "one@example.test")
            assert tried(first) == [("api", "fallback"), ("backup", "sent")]
            assert (first[0]["reply_code"], first[0]["error_code"]) == (429, "http.rate_limited")
            assert held_until(queue, "api") == pytest.approx(T0 + 120)
            # Node B never saw the 429: it reads the hold from the database.
            assert tried(await deliver(other, node_b, "two@example.test")) == [
                ("backup", "sent")]
            assert tried(await deliver(queue, node_a, "three@example.test")) == [
                ("backup", "sent")]
            assert b_api.calls == 0 and a_api.calls == 1
            clock.advance(121)  # the hold is over
            node_b.health.all(["api"])  # past the one-second read cache
            assert tried(await deliver(other, node_b, "four@example.test")) == [("api", "sent")]
        finally:
            await other.writer.aclose()

    run(queue, go)
    assert [len(t.sent) for t in (a_api, a_backup, b_api, b_backup)] == [0, 2, 1, 1]
    [held] = kinds(queue, "connection_held")
    assert "held until" in held and "http.rate_limited" in held
    assert any("Retry-After" in d for d in kinds(queue, "fallback_used"))


@pytest.mark.parametrize(("retry_after", "due"), [(900, T0 + 900), (10, T0 + 300)])
def test_with_no_other_connection_the_message_waits_for_the_hold(
        queue: Queue, clock: FakeClock, retry_after: float, due: float) -> None:
    """The only connection asks to wait: the message is retried when the hold ends, or
    after the normal backoff (300 s) if that is later; by whichever node is free then."""
    other = Queue(queue.engine, clock=clock)
    node_a = worker(queue, clock, "node-a", Provider("api", [retry_after]))
    b_api = Provider("api")
    node_b = worker(other, clock, "node-b", b_api)

    async def go() -> None:
        try:
            assert tried(await deliver(queue, node_a, "one@example.test")) == [
                ("api", "deferred")]
            [m] = queue.log.page(LogFilter())
            assert m["next_attempt_at"] == pytest.approx(due)
            assert "429" in (m["last_error"] or "")
            clock.advance(due - T0 - 1)
            assert await deliver(other, node_b) == []  # not due yet
            clock.advance(1)
            node_b.health.all(["api"])
            assert tried(await deliver(other, node_b)) == [("api", "sent")]
        finally:
            await other.writer.aclose()

    run(queue, go)
    assert len(b_api.sent) == 1


def test_a_hold_is_never_shortened(queue: Queue, clock: FakeClock) -> None:
    health = Health(queue, failures=5, cooldown=60, clock=clock)

    async def go() -> None:
        await health.hold("api", T0 + 600, "http.rate_limited: 429")
        await health.hold("api", T0 + 60, "http.rate_limited: 429")  # a shorter one: ignored
        await health.flush()
        await Health(queue, failures=5, cooldown=60, clock=clock).hold(
            "api", T0 + 30, "another node, a shorter wait")
        await health.flush()

    run(queue, go)
    assert held_until(queue, "api") == pytest.approx(T0 + 600)
    st = health.all(["api"])[0]
    assert st.blocked(T0 + 599) is not None and "Retry-After" in (st.blocked(T0) or "")
    assert st.blocked(T0 + 600) is None
    assert len(kinds(queue, "connection_held")) == 1


def test_postroom_connections_shows_the_hold(tmp_path: Path) -> None:
    from postroom.cli import app
    from postroom.runtime import Instance
    from postroom.settings import load

    cfg = tmp_path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n'
                   '[[connections]]\nname = "api"\ntransport = "memory"\n')
    inst = Instance(load(cfg, environ={}))
    until = time.time() + 600
    health = Health(inst.queue, failures=5, cooldown=60)
    run(inst.queue, lambda: health.hold("api", until, "http.rate_limited: 429"))
    runner = CliRunner()
    shown = runner.invoke(app, ["connections", "--config", str(cfg)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "held until" in shown.output and "the provider asked to wait" in shown.output
    report = runner.invoke(app, ["connections", "--json", "--config", str(cfg)])
    assert report.exit_code == 0, report.output
    [api] = json.loads(report.output)["connections"]
    assert api["held_until"].endswith("Z") and api["health"] == "up"
