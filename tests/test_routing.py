"""Routes, fallback chains, the circuit breaker, pausing, rate and session limits,
priorities and expiry — on SQLite and PostgreSQL, with scripted transports and a fake clock.
(The same behaviour against real servers: tests/test_fallback_real.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from queue_helpers import T0, FakeClock, envelope, run
from sqlalchemy import select

from postroom.envelope import Envelope
from postroom.exceptions import (
    AuthError,
    ConfigError,
    ConnectError,
    DataRejected,
    DeliveryError,
    TimeoutError_,
    TLSError,
)
from postroom.queue.limits import Limiter
from postroom.queue.sql import Queue
from postroom.queue.worker import Worker
from postroom.routing.chain import Next, after_failure
from postroom.routing.rules import Facts, Match, Route, Router
from postroom.settings import DeliverySettings, load
from postroom.store.log import LogFilter
from postroom.store.schema import PRIORITIES, events
from postroom.transports import base


class Scripted(base.Transport):
    """Answers each send with the next scripted step: an exception to raise, a dict of
    per-recipient (code, text), or None for "all accepted"."""

    def __init__(self, name: str, steps: list[Any] | None = None, **limits: Any) -> None:
        super().__init__(base.ConnectionBase(name=name, transport="scripted", **limits),
                         base.TransportContext(ehlo_name="test"))
        self.steps = list(steps or [])
        self.sent: list[Envelope] = []

    async def send(self, envelope: Envelope) -> base.DeliveryResult:
        step = self.steps.pop(0) if self.steps else None
        if isinstance(step, BaseException):
            raise step
        codes = step or {}
        self.sent.append(envelope)
        return base.DeliveryResult({r: base.RecipientResult(*codes.get(r, (250, "2.0.0 ok")))
                                    for r in envelope.recipients}, transcript="scripted")


def after_data(err: DeliveryError) -> DeliveryError:
    err.after_data = True
    return err


def make(queue: Queue, clock: FakeClock, *transports: Scripted, routes: list[Route] | None = None,
         **delivery: Any) -> Worker:
    return Worker(queue, {t.name: t for t in transports}, DeliverySettings(**delivery),
                  default_connection=transports[0].name, owner="w", clock=clock,
                  routes=routes or [Route(chain=[t.name for t in transports])])


async def once(queue: Queue, worker: Worker) -> list[dict[str, Any]]:
    claimed = await queue.claim("w", 100, 600)
    return [a for m in claimed for a in await worker.deliver(m)]


def event_kinds(queue: Queue) -> list[str]:
    with queue.engine.connect() as conn:
        return [r.kind for r in conn.execute(select(events).order_by(events.c.id))]


# -- the fallback decision ----------------------------------------------------------------------
@pytest.mark.parametrize(("err", "verdict"), [
    (ConnectError("refused", code="connect.refused"), Next.FALLBACK),
    (TimeoutError_("no answer", code="timeout"), Next.FALLBACK),
    (TLSError("bad certificate", code="tls.certificate"), Next.FALLBACK),
    (AuthError("535 bad password", code="auth.rejected", permanent=True), Next.FALLBACK),
    (DeliveryError.from_reply("greeting", 421, "4.3.2 busy"), Next.FALLBACK),
    (ConfigError("no such connection", code="config.connection.unknown"), Next.FALLBACK),
    (DataRejected("552 too big", code="data.too_big", permanent=True), Next.STOP),
    (after_data(TimeoutError_("no final reply", code="timeout")), Next.UNKNOWN),
])
def test_fallback_decision(err: Any, verdict: Next) -> None:
    if not isinstance(err, DeliveryError):
        err = DeliveryError(str(err), code=err.code)
    assert after_failure(err) is verdict


# -- routes -------------------------------------------------------------------------------------
def test_routes_split_recipients_and_match_sender_app_tag_header() -> None:
    router = Router([
        Route(name="gmail", match=Match(recipient_domain=["gmail.com", "googlemail.com"]),
              chain=["google", "primary"]),
        Route(name="shop", match=Match(sender_domain="*.shop.example", app="shop*"),
              chain=["sendgrid"]),
        Route(name="news", match=Match(tag="newsletter", header={"X-Campaign": "*"}),
              chain=["bulk"]),
        Route(name="default", chain=["primary", "backup"]),
    ], default_connection="primary")

    def legs(sender: str, rcpts: list[str], app: str = "", tags: tuple[str, ...] = (),
             headers: dict[str, str] | None = None) -> list[tuple[str, tuple[str, ...]]]:
        f = Facts(sender, rcpts, app, tags, headers or {})
        return [(leg.route, leg.recipients) for leg in router.legs(f)]

    assert legs("a@x.org", ["u@Gmail.com", "v@y.org"]) == [
        ("gmail", ("u@Gmail.com",)), ("default", ("v@y.org",))]
    assert legs("a@eu.shop.example", ["v@y.org"], app="shop-eu") == [("shop", ("v@y.org",))]
    assert legs("a@eu.shop.example", ["v@y.org"], app="crm") == [("default", ("v@y.org",))]
    assert legs("a@x.org", ["v@y.org"], tags=("newsletter",),
                headers={"x-campaign": "spring"}) == [("news", ("v@y.org",))]
    assert legs("a@x.org", ["v@y.org"], tags=("newsletter",)) == [("default", ("v@y.org",))]
    pinned = router.legs(Facts("a@x.org", ["u@gmail.com"], "", (), {}), pinned="backup")
    assert [(leg.chain, leg.recipients) for leg in pinned] == [(("backup",), ("u@gmail.com",))]
    # Without any default route the first connection is the default.
    assert Router([], "primary").legs(Facts("a@x", ["b@y"], "", (), {}))[0].chain == ("primary",)


def test_route_configuration_errors_name_the_fix(tmp_path: Any) -> None:
    cfg = tmp_path / "postroom.toml"
    conns = ('[[connections]]\nname = "primary"\ntransport = "memory"\n'
             '[[connections]]\nname = "backup"\ntransport = "memory"\n')
    cfg.write_text(conns + '[[routes]]\nchain = ["primray"]\n')
    with pytest.raises(ConfigError, match="did you mean 'primary'"):
        load(cfg, environ={})
    cfg.write_text(conns + '[[routes]]\nchain = ["primary"]\n'
                   '[[routes]]\nmatch = { app = "shop" }\nchain = ["backup"]\n')
    with pytest.raises(ConfigError, match="move it last"):
        load(cfg, environ={})
    cfg.write_text(conns + '[[routes]]\nmatch = { sendr = "x" }\nchain = ["backup"]\n')
    with pytest.raises(ConfigError, match="did you mean 'sender'"):
        load(cfg, environ={})
    cfg.write_text(conns + '[[connections]]\nname = "c"\ntransport = "memory"\n'
                   'rate_limit = "50/fortnight"\n')
    with pytest.raises(ConfigError, match="COUNT/PERIOD"):
        load(cfg, environ={})
    cfg.write_text(conns + '[[routes]]\nmatch = { recipient_domain = "gmail.com" }\n'
                   'chain = ["backup", "primary"]\n[[routes]]\nchain = ["primary"]\n')
    s = load(cfg, environ={})
    assert [r.chain for r in s.routes] == [["backup", "primary"], ["primary"]]


# -- fallback along a chain -----------------------------------------------------------------------
@pytest.mark.parametrize("failure", [
    ConnectError("127.0.0.1:1 refused the connection", code="connect.refused"),
    TimeoutError_("no greeting", code="timeout"),
    AuthError("535 5.7.8 bad credentials", code="auth.rejected", permanent=True),
    DeliveryError.from_reply("greeting", 421, "4.3.2 Service not available",
                             code="connect.greeting"),
    TLSError("wrong version number", code="tls.handshake"),
])
def test_connection_failure_falls_back_and_the_message_is_sent(
        queue: Queue, clock: FakeClock, failure: DeliveryError) -> None:
    primary, backup = Scripted("primary", [failure]), Scripted("backup")
    worker = make(queue, clock, primary, backup)

    async def go() -> list[dict[str, Any]]:
        await queue.enqueue(envelope("bob@example.test"))
        return await once(queue, worker)

    attempts = run(queue, go)
    assert [(a["connection"], a["outcome"]) for a in attempts] == [
        ("primary", "fallback"), ("backup", "sent")]
    assert attempts[0]["error_code"] == failure.code
    assert len(backup.sent) == 1
    [m] = queue.log.page(LogFilter())
    assert m["status"] == "sent" and m["last_error"] is None
    assert "fallback_used" in event_kinds(queue)


def test_third_connection_after_two_failures(queue: Queue, clock: FakeClock) -> None:
    a = Scripted("a", [ConnectError("refused", code="connect.refused")])
    b = Scripted("b", [AuthError("535", code="auth.rejected", permanent=True)])
    c = Scripted("c")
    worker = make(queue, clock, a, b, c)

    async def go() -> list[dict[str, Any]]:
        await queue.enqueue(envelope("bob@example.test"))
        return await once(queue, worker)

    assert [(x["connection"], x["outcome"]) for x in run(queue, go)] == [
        ("a", "fallback"), ("b", "fallback"), ("c", "sent")]


def test_recipient_5xx_is_final_and_never_falls_back(queue: Queue, clock: FakeClock) -> None:
    primary = Scripted("primary", [{"gone@example.test": (550, "5.1.1 no such user")}])
    backup = Scripted("backup")
    worker = make(queue, clock, primary, backup)

    async def go() -> list[dict[str, Any]]:
        await queue.enqueue(envelope("gone@example.test", "ok@example.test"))
        return await once(queue, worker)

    attempts = run(queue, go)
    assert [(a["connection"], a["outcome"]) for a in attempts] == [("primary", "partial")]
    assert backup.sent == []
    [m] = queue.log.page(LogFilter())
    assert m["status"] == "partial"


def test_message_refused_stops_the_chain(queue: Queue, clock: FakeClock) -> None:
    primary = Scripted("primary", [DataRejected("552 5.3.4 too big", code="data.too_big",
                                                permanent=True, reply_code=552)])
    backup = Scripted("backup")
    worker = make(queue, clock, primary, backup)
    run(queue, lambda: queue.enqueue(envelope("bob@example.test")))
    attempts = run(queue, lambda: once(queue, worker))
    assert [(a["connection"], a["outcome"]) for a in attempts] == [("primary", "failed")]
    assert backup.sent == []


def test_all_connections_fail_transiently_then_the_message_waits(queue: Queue,
                                                                 clock: FakeClock) -> None:
    a = Scripted("a", [ConnectError("refused", code="connect.refused")])
    b = Scripted("b", [TimeoutError_("no greeting", code="timeout")])
    worker = make(queue, clock, a, b)
    run(queue, lambda: queue.enqueue(envelope("bob@example.test")))
    attempts = run(queue, lambda: once(queue, worker))
    assert [(x["connection"], x["outcome"]) for x in attempts] == [
        ("a", "fallback"), ("b", "deferred")]
    [m] = queue.log.page(LogFilter())
    assert m["status"] == "deferred" and m["attempt_count"] == 1
    assert m["next_attempt_at"] == pytest.approx(T0 + 300)


def test_unknown_outcome_is_retried_only_on_the_same_connection(queue: Queue,
                                                                clock: FakeClock) -> None:
    """A timeout after the data was sent: maybe delivered. Never sent elsewhere."""
    primary = Scripted("primary", [after_data(TimeoutError_("no reply to the data",
                                                            code="timeout")), None])
    backup = Scripted("backup")
    worker = make(queue, clock, primary, backup)
    msg_id = run(queue, lambda: queue.enqueue(envelope("bob@example.test")))
    first = run(queue, lambda: once(queue, worker))
    assert [(a["connection"], a["outcome"]) for a in first] == [("primary", "unknown")]
    m = queue.log.get(msg_id)
    assert m is not None and m["status"] == "deferred"
    assert m["rcpt_status"]["bob@example.test"]["state"] == "unknown"
    assert "outcome unknown" in (m["last_error"] or "")
    assert backup.sent == []
    clock.advance(301)
    second = run(queue, lambda: once(queue, worker))
    assert [(a["connection"], a["outcome"]) for a in second] == [("primary", "sent")]
    assert backup.sent == [] and len(primary.sent) == 1
    assert "unknown_outcome" in event_kinds(queue)
    sent = primary.sent[0]
    assert b"Message-ID" in sent.raw  # the same bytes, the same Message-ID, every retry


# -- circuit breaker, pause -------------------------------------------------------------------
def test_circuit_breaker_skips_a_dead_connection_then_probes_it(queue: Queue,
                                                                clock: FakeClock) -> None:
    refused = [ConnectError("refused", code="connect.refused") for _ in range(3)]
    primary, backup = Scripted("primary", refused), Scripted("backup")
    worker = make(queue, clock, primary, backup, breaker_failures=2, breaker_cooldown=60)

    def deliver_one() -> list[tuple[str, str]]:
        run(queue, lambda: queue.enqueue(envelope("bob@example.test")))
        worker.health._read_at = -1e9  # the 1 s read cache uses the real clock
        return [(a["connection"], a["outcome"]) for a in run(queue, lambda: once(queue, worker))]

    assert deliver_one() == [("primary", "fallback"), ("backup", "sent")]
    assert worker.health.all(["primary"])[0].health == "degraded"
    assert deliver_one() == [("primary", "fallback"), ("backup", "sent")]
    st = worker.health.all(["primary"])[0]
    assert (st.health, st.failures, st.open_until) == ("down", 2, T0 + 60)
    assert deliver_one() == [("backup", "sent")]  # skipped while the circuit is open
    clock.advance(61)
    assert deliver_one() == [("primary", "fallback"), ("backup", "sent")]  # probed: still down
    clock.advance(61)
    assert deliver_one() == [("primary", "sent")]  # probed: back
    assert worker.health.all(["primary"])[0].health == "up"
    kinds = event_kinds(queue)
    assert kinds.count("connection_down") == 1 and kinds.count("connection_up") == 1


def test_paused_connection_is_skipped_and_a_paused_chain_waits(queue: Queue,
                                                               clock: FakeClock) -> None:
    primary, backup = Scripted("primary"), Scripted("backup")
    worker = make(queue, clock, primary, backup)
    worker.health.set_paused("primary", True)
    run(queue, lambda: queue.enqueue(envelope("a@example.test")))
    assert [(a["connection"], a["outcome"]) for a in run(queue, lambda: once(queue, worker))] \
        == [("backup", "sent")]
    worker.health.set_paused("backup", True)
    msg_id = run(queue, lambda: queue.enqueue(envelope("b@example.test")))
    assert run(queue, lambda: once(queue, worker)) == []  # nothing tried: no attempt row
    m = queue.log.get(msg_id)
    assert m is not None and m["status"] == "deferred" and m["attempt_count"] == 0
    assert "paused" in (m["last_error"] or "")
    worker.health.set_paused("primary", False)
    clock.advance(20)
    assert [(a["connection"], a["outcome"]) for a in run(queue, lambda: once(queue, worker))] \
        == [("primary", "sent")]


def test_paused_queue_is_not_claimed(queue: Queue, clock: FakeClock) -> None:
    worker = make(queue, clock, Scripted("primary"), poll_interval=0.02)
    worker.health.set_paused(None, True)
    run(queue, lambda: queue.enqueue(envelope("a@example.test")))

    async def go() -> tuple[dict[str, int], dict[str, int]]:
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        while_paused = queue.log.counts()
        worker.health.set_paused(None, False)
        worker.wake()
        for _ in range(200):  # the switch is re-read within about a second
            if queue.log.counts() == {"sent": 1}:
                break
            await asyncio.sleep(0.02)
        await worker.stop(1)
        await task
        return while_paused, queue.log.counts()

    assert run(queue, go) == ({"queued": 1}, {"sent": 1})


# -- limits --------------------------------------------------------------------------------------
def test_rate_limit_is_a_sliding_window_and_mail_waits(queue: Queue, clock: FakeClock) -> None:
    conn = Scripted("limited", rate_limit=["3/10s"]).settings
    limiter = Limiter(queue, clock=clock)

    def take() -> float | None:
        return run(queue, lambda: limiter.acquire(conn, f"h{clock()}"))

    assert [take() for _ in range(3)] == [None, None, None]
    assert take() == pytest.approx(T0 + 10)  # the oldest send leaves the window then
    clock.advance(5)
    assert take() == pytest.approx(T0 + 10)
    clock.advance(5.01)
    assert take() is None


def test_session_limit_holds_until_released(queue: Queue, clock: FakeClock) -> None:
    conn = Scripted("limited", max_sessions=2).settings
    limiter = Limiter(queue, lease=60, clock=clock)
    assert run(queue, lambda: limiter.acquire(conn, "a")) is None
    assert run(queue, lambda: limiter.acquire(conn, "b")) is None
    assert run(queue, lambda: limiter.acquire(conn, "c")) == pytest.approx(T0 + 1)
    run(queue, lambda: limiter.release(conn, "a"))
    assert run(queue, lambda: limiter.acquire(conn, "c")) is None
    clock.advance(61)  # the holders died: their leases run out
    assert run(queue, lambda: limiter.acquire(conn, "d")) is None


def test_over_the_rate_limit_mail_waits_and_never_fails(queue: Queue, clock: FakeClock) -> None:
    limited, other = Scripted("limited", rate_limit=["2/minute"]), Scripted("other")
    worker = make(queue, clock, limited, other,
                  routes=[Route(match=Match(recipient_domain="slow.test"), chain=["limited"]),
                          Route(chain=["other"])])
    for i in range(4):
        run(queue, lambda i=i: queue.enqueue(envelope(f"u{i}@slow.test", f"u{i}@fast.test")))
    run(queue, lambda: once(queue, worker))
    assert len(limited.sent) == 2 and len(other.sent) == 4
    waiting = queue.log.page(LogFilter(status="deferred"))
    assert len(waiting) == 2
    assert all(m["attempt_count"] == 1 and "limit" in m["last_error"] for m in waiting)
    assert all(m["next_attempt_at"] == pytest.approx(T0 + 60) for m in waiting)
    clock.advance(60.5)
    run(queue, lambda: once(queue, worker))
    assert len(limited.sent) == 4 and queue.log.counts() == {"sent": 4}


# -- priorities and expiry ---------------------------------------------------------------------
def test_high_priority_is_claimed_first(queue: Queue, clock: FakeClock) -> None:
    order = ["low", "normal", "high", "normal", "low", "high"]
    ids = {}
    for i, level in enumerate(order):
        env = envelope(f"r{i}@example.test")
        env.priority = PRIORITIES[level]
        ids[env.id] = level
        queue.enqueue_sync(env)
        clock.advance(1)
    claimed = run(queue, lambda: queue.claim("w", 3, 600))
    assert [ids[m.id] for m in claimed] == ["high", "high", "normal"]
    rest = run(queue, lambda: queue.claim("w", 10, 600))
    assert [ids[m.id] for m in rest] == ["normal", "low", "low"]
    bad = envelope("x@example.test")
    bad.priority = 7
    with pytest.raises(Exception, match="priority"):
        queue.enqueue_sync(bad)


def test_expiry_time_fails_instead_of_sending_late(queue: Queue, clock: FakeClock) -> None:
    primary = Scripted("primary", [ConnectError("refused", code="connect.refused")])
    worker = make(queue, clock, primary)
    env = envelope("bob@example.test")
    env.expires_at = T0 + 120  # a one-time code: useless after two minutes
    run(queue, lambda: queue.enqueue(env))
    attempts = run(queue, lambda: once(queue, worker))
    assert attempts[-1]["outcome"] == "failed"
    m = queue.log.get(env.id)
    assert m is not None and m["status"] == "failed"
    assert "expired" in (m["last_error"] or "")
    late = envelope("bob@example.test")
    late.expires_at = T0 - 1
    with pytest.raises(Exception, match="expire"):
        queue.enqueue_sync(late)



def test_failures_queued_together_are_counted_together(queue: Queue, clock: FakeClock) -> None:
    """Many messages failing on one connection at once (breaker kept closed): their
    failures join the write already queued, and none is lost; the breaker opens once, with
    one connection_down event."""
    from postroom.routing.health import Health

    health = Health(queue, failures=5, cooldown=60, clock=clock)

    async def go() -> None:
        for i in range(7):
            await health.failed("primary", f"refused #{i}")
        await health.flush()
        for i in range(3):  # after the commit: a new write
            await health.failed("primary", f"refused again #{i}")
        await health.flush()

    run(queue, go)
    st = health.all(["primary"])[0]
    assert (st.failures, st.health, st.last_error) == (10, "down", "refused again #2")
    assert st.open_until == T0 + 60
    assert event_kinds(queue).count("connection_down") == 1
