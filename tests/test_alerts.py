"""Alerts (issue 15): rules as tables, the outbox on SQLite and PostgreSQL, the signed
webhook and Apprise's json:// to a local receiver, a channel disabled and reported, no
duplicate after a restart, and the outage of 10,000 messages that is one alert and one
recovery per channel."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import FakeClock, envelope
from sqlalchemy import Engine, func, select

from postroom import events
from postroom.alerts import Change
from postroom.alerts import outbox as ob
from postroom.alerts.config import DEFAULT_KINDS, MAX_ATTEMPTS, AlertRule, AlertsSettings
from postroom.alerts.dispatcher import FACTS_EVERY, Dispatcher
from postroom.alerts.rules import Facts, State, decide
from postroom.alerts.webhook import HEADER, sign, verify
from postroom.events import Event, Kind
from postroom.exceptions import ConfigError
from postroom.queue.sql import Queue
from postroom.settings import Settings, load
from postroom.store.db import write_transaction
from postroom.store.schema import alert_outbox, messages

SECRET = "alert-s3cret"
T0 = 1_800_000_000.0


# -- rules (pure) ----------------------------------------------------------------------------
def rule(**kw: Any) -> AlertRule:
    return AlertRule(channels=["json://127.0.0.1:1/x"], **kw)


def ev(kind: Kind, i: int, conn: str | None = "primary", msg: str | None = None) -> Event:
    return Event(kind, T0 + i, msg, conn, f"{kind.value} detail", i)


def changes(alerts: list[Any]) -> list[tuple[str, str, str | None]]:
    return [(a.change.value, a.kind, a.connection) for a in alerts]


@pytest.mark.parametrize(("kinds", "stream", "expected"), [
    # one outage: down many times over, then up -> one alert, one recovery
    (None, [Kind.CONNECTION_DOWN] * 50 + [Kind.CONNECTION_UP],
     [("opened", "connection_down", "primary"), ("recovered", "connection_down", "primary")]),
    # up without down: nothing to recover
    (None, [Kind.CONNECTION_UP], []),
    # a fallback that delivered: not a default kind, and never a failure
    (None, [Kind.FALLBACK_USED] * 5, []),
    # listed: a warning of its own kind, once per throttle window
    (["fallback_used"], [Kind.FALLBACK_USED] * 5, [("opened", "fallback_used", "primary")]),
    # an OAuth grant dead, then renewed by a new sign-in
    (None, [Kind.OAUTH_GRANT_DEAD, Kind.OAUTH_GRANT_DEAD, Kind.OAUTH_GRANTED],
     [("opened", "oauth_grant_dead", "primary"), ("recovered", "oauth_grant_dead", "primary")]),
    # Google's 7-day Testing apps: a default warning
    (None, [Kind.OAUTH_TESTING_APP], [("opened", "oauth_testing_app", "primary")]),
    # info kinds are never defaults
    (None, [Kind.RETRY_REQUESTED, Kind.OAUTH_RENEWED, Kind.DELIVERY_EVENT], []),
])
def test_rules_incidents(kinds: list[str] | None, stream: list[Kind],
                         expected: list[tuple[str, str, str | None]]) -> None:
    r = rule(**({"kinds": kinds} if kinds else {}))
    state = State()
    out = decide([r], state, [ev(k, i + 1) for i, k in enumerate(stream)], Facts(), T0 + 100)
    assert changes(out) == expected
    assert state.cursor == len(stream)
    assert len({a.key for a in out}) == len(out)


def test_severity_of_fallback_and_recovery() -> None:
    r = rule(kinds=["fallback_used", "connection_down"])
    out = decide([r], State(), [ev(Kind.FALLBACK_USED, 1), ev(Kind.CONNECTION_DOWN, 2),
                                ev(Kind.CONNECTION_UP, 3)], Facts(), T0)
    assert [(a.change, a.severity) for a in out] == [
        (Change.OPENED, "warning"), (Change.OPENED, "error"), (Change.RECOVERED, "info")]


def test_throttle_then_digest() -> None:
    r = rule(kinds=["fallback_used"], throttle=600)
    state = State()
    first = decide([r], state, [ev(Kind.FALLBACK_USED, i) for i in range(1, 101)], Facts(), T0)
    assert changes(first) == [("opened", "fallback_used", "primary")]
    assert decide([r], state, [], Facts(), T0 + 599) == []
    digest = decide([r], state, [], Facts(), T0 + 600)
    assert [(a.change, a.title) for a in digest] == [(Change.DIGEST, "99 more fallback_used on "
                                                                      "primary")]
    assert decide([r], state, [], Facts(), T0 + 2000) == []  # nothing more held back


def test_down_for_holds_the_alert_back() -> None:
    r = rule(down_for=300)
    state = State()
    assert decide([r], state, [ev(Kind.CONNECTION_DOWN, 1)], Facts(), T0 + 1) == []
    # back within 5 minutes: no alert, and so no recovery either
    assert decide([r], state, [ev(Kind.CONNECTION_UP, 2)], Facts(), T0 + 100) == []
    assert decide([r], state, [ev(Kind.CONNECTION_DOWN, 3)], Facts(), T0 + 200) == []
    late = decide([r], state, [], Facts(), T0 + 503)
    assert changes(late) == [("opened", "connection_down", "primary")]
    assert decide([r], state, [], Facts(), T0 + 600) == []
    assert changes(decide([r], state, [ev(Kind.CONNECTION_UP, 4)], Facts(), T0 + 700)) == [
        ("recovered", "connection_down", "primary")]


@pytest.mark.parametrize(("facts_seq", "expected"), [
    # 5 failures in the window opens, more stays open, none closes
    ([Facts(failures={"alerts": 5}), Facts(failures={"alerts": 50}),
      Facts(failures={"alerts": 0})],
     [["opened:failures"], [], ["recovered:failures"]]),
    ([Facts(failures={"alerts": 4})], [[]]),
    # the oldest waiting message: over an hour old, then moving again
    ([Facts(oldest_waiting=T0 - 4000), Facts(oldest_waiting=T0 - 3000), Facts()],
     [["opened:queue_age"], ["recovered:queue_age"], []]),
    # a refresh token dying within 7 days
    ([Facts(refresh_expires={"gmail": T0 + 3 * 86400}),
      Facts(refresh_expires={"gmail": T0 + 60 * 86400})],
     [["opened:oauth_expiry"], ["recovered:oauth_expiry"]]),
])
def test_thresholds(facts_seq: list[Facts], expected: list[list[str]]) -> None:
    r, state = rule(), State()
    got = [[f"{a.change.value}:{a.kind}" for a in decide([r], state, [], f, T0)]
           for f in facts_seq]
    assert got == expected


def test_filters_by_connection_and_app() -> None:
    r = rule(connections=["backup"], apps=["shop"], kinds=["unknown_outcome", "queue_paused",
                                                           "connection_down"], throttle=0)
    stream = [ev(Kind.CONNECTION_DOWN, 1, "primary"), ev(Kind.CONNECTION_DOWN, 2, "backup"),
              ev(Kind.UNKNOWN_OUTCOME, 3, "backup", "m-blog"),
              ev(Kind.UNKNOWN_OUTCOME, 4, "backup", "m-shop"),
              ev(Kind.QUEUE_PAUSED, 5, None)]
    out = decide([r], State(), stream, Facts(), T0, {"m-blog": "blog", "m-shop": "shop"})
    assert changes(out) == [("opened", "connection_down", "backup"),
                            ("opened", "unknown_outcome", "backup"),
                            ("opened", "queue_paused", None)]


def test_state_survives_json() -> None:
    r, state = rule(kinds=["fallback_used", "connection_down"]), State()
    decide([r], state, [ev(Kind.CONNECTION_DOWN, 1), ev(Kind.FALLBACK_USED, 2),
                        ev(Kind.FALLBACK_USED, 3)], Facts(), T0)
    again = State.from_dict(json.loads(json.dumps(state.as_dict())))
    assert again == state
    assert changes(decide([r], again, [ev(Kind.CONNECTION_UP, 4)], Facts(), T0)) == [
        ("recovered", "connection_down", "primary")]


# -- configuration ---------------------------------------------------------------------------
def config(tmp_path: Path, body: str) -> Settings:
    path = tmp_path / "postroom.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n{body}', encoding="utf-8")
    return load(path, connections=False)


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[[alerts]]\nchannels = ["ntfy://ntfy.example/t"]\n'
                 ).section(AlertsSettings)
    (r,) = cfg.rules
    assert r.name == "alerts" and r.kinds == list(DEFAULT_KINDS)
    assert Kind.CONNECTION_DOWN in r.kinds and Kind.OAUTH_IDLE in r.kinds
    assert Kind.FALLBACK_USED not in r.kinds
    assert list(cfg.channel_ids()) == ["alerts#1"]
    assert config(tmp_path, "").section(AlertsSettings).rules == []
    for body, words in [
        ('[[alerts]]\nchannels = ["nope"]\n', "is not a URL"),
        ("[[alerts]]\nchannels = []\n", "channels"),
        ('[[alerts]]\nchannels = ["a://b"]\nkinds = ["down"]\n', "connection_down"),
        ('[[alerts]]\nchannels = ["a://b", "a://b"]\n', "twice"),
        ('[[alerts]]\nchannels = ["a://b"]\n[[alerts]]\nchannels = ["c://d"]\n',
         "give each rule its own name"),
        ('[[alerts]]\nchannels = ["a://b"]\nthrottle = -1\n', "throttle"),
    ]:
        with pytest.raises(ConfigError, match=words):
            config(tmp_path, body)


def test_webhook_signature_roundtrip() -> None:
    body = b'{"a":1}'
    header = sign(SECRET, body, int(T0))
    assert verify(SECRET, body, header, now=T0 + 10)
    assert not verify(SECRET, body + b" ", header, now=T0)
    assert not verify("other", body, header, now=T0)
    assert not verify(SECRET, body, header, now=T0 + 3600)  # too old: a replay


# -- a local receiver ------------------------------------------------------------------------
class Receiver:
    """HTTP on 127.0.0.1 (a free port) recording each POST; ``status[path]`` answers."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.status: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                code = outer.status.get(self.path, 200)
                if code == 200:
                    outer.got.append((self.path, dict(self.headers.items()), body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(b) for p, _, b in self.got if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def dispatcher(engine: Engine, tmp_path: Path, rules: str, clock: FakeClock) -> Dispatcher:
    settings = config(tmp_path, rules)
    return Dispatcher(engine, lambda: settings, clock=clock)


def tick(d: Dispatcher) -> None:
    asyncio.run(d.tick())


def write(engine: Engine, items: list[Event]) -> None:
    with write_transaction(engine) as conn:
        events.record_all(conn, items)


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(alert_outbox)).scalar_one())


def two_channels(port: int, extra: str = "") -> str:
    return (f'[[alerts]]\nname = "ops"\nchannels = ["webhook+http://127.0.0.1:{port}/hook", '
            f'"json://127.0.0.1:{port}/apprise"]\nwebhook_secret = "{SECRET}"\n{extra}')


def test_outage_of_10000_is_one_alert_and_one_recovery(
        engine: Engine, tmp_path: Path, receiver: Receiver, clock: FakeClock) -> None:
    d = dispatcher(engine, tmp_path, two_channels(receiver.port), clock)
    tick(d)  # first start: the cursor starts at the newest event
    # The upstream refuses 10,000 messages: each attempt notes the connection down (every
    # node, every worker), lease and outcome warnings come with them; then it recovers.
    t = clock()
    outage = [Event(Kind.CONNECTION_DOWN, t + i / 1000, None, "primary", "421 try later")
              for i in range(10_000)]
    outage += [Event(Kind.LEASE_EXPIRED, t + 11, f"m{i}", "primary") for i in range(500)]
    write(engine, outage[:6000])
    tick(d)
    write(engine, outage[6000:])
    clock.advance(5)
    tick(d)
    write(engine, [Event(Kind.CONNECTION_UP, t + 20, None, "primary", "delivering again")])
    clock.advance(5)
    tick(d)
    tick(d)
    for path in ("/hook", "/apprise"):
        assert len(receiver.bodies(path)) == 2, receiver.got
    hooks = receiver.bodies("/hook")
    assert [(h["change"], h["kind"], h["connection"]) for h in hooks] == [
        ("opened", "connection_down", "primary"), ("recovered", "connection_down", "primary")]
    apprise = receiver.bodies("/apprise")
    assert [a["type"] for a in apprise] == ["failure", "success"]
    assert "connection_down on primary" in apprise[0]["title"]
    # every webhook request is signed with the rule's secret
    for path, headers, body in receiver.got:
        if path == "/hook":
            assert verify(SECRET, body, headers[HEADER], now=time.time())
    assert rows(engine) == 4
    assert all(r.status == ob.SENT for r in ob.history(engine))


def test_channel_gone_is_disabled_and_reported(
        engine: Engine, tmp_path: Path, receiver: Receiver, clock: FakeClock) -> None:
    receiver.status["/hook"] = 404
    d = dispatcher(engine, tmp_path, two_channels(receiver.port), clock)
    tick(d)
    write(engine, [Event(Kind.OAUTH_GRANT_DEAD, clock(), None, "gmail", "invalid_grant")])
    tick(d)  # the alert: taken by Apprise's channel, 404 on the webhook -> disabled
    tick(d)  # the report that the webhook is off, on the other channel
    off = ob.disabled(engine)
    assert list(off) == ["ops#1"] and "answered 404" in off["ops#1"]
    got = receiver.bodies("/apprise")
    assert [g["title"] for g in got] == ["Postroom: oauth_grant_dead on gmail",
                                         "Postroom: alert channel ops#1 disabled"]
    assert "postroom alerts enable ops#1" in got[1]["message"]
    # later alerts skip the disabled channel
    write(engine, [Event(Kind.CONNECTION_DOWN, clock(), None, "primary")])
    tick(d)
    assert len(receiver.bodies("/apprise")) == 3 and receiver.bodies("/hook") == []
    assert {r.channel for r in ob.history(engine) if r.status == ob.PENDING} == set()
    assert ob.enable(engine, "ops#1") and ob.disabled(engine) == {}


def test_outbox_retries_and_survives_a_restart(
        engine: Engine, tmp_path: Path, receiver: Receiver, clock: FakeClock) -> None:
    receiver.status["/hook"] = 503  # down for a while
    rules = two_channels(receiver.port)
    d = dispatcher(engine, tmp_path, rules, clock)
    tick(d)
    write(engine, [Event(Kind.CONNECTION_DOWN, clock(), None, "primary")])
    tick(d)
    assert len(receiver.bodies("/apprise")) == 1
    (row,) = [r for r in ob.history(engine) if r.channel == "ops#1"]
    assert row.status == ob.PENDING and row.attempts == 1 and "503" in row.last_error
    # restart: a new dispatcher on the same database; the webhook is back
    receiver.status.clear()
    again = dispatcher(engine, tmp_path, rules, clock)
    tick(again)
    assert receiver.bodies("/hook") == []  # not due yet: backoff
    clock.advance(ob.MIN_BACKOFF)
    tick(again)
    tick(again)
    assert len(receiver.bodies("/hook")) == 1 and len(receiver.bodies("/apprise")) == 1
    assert rows(engine) == 2 and ob.disabled(engine) == {}


def test_failures_threshold_reads_the_log(
        engine: Engine, tmp_path: Path, receiver: Receiver, clock: FakeClock) -> None:
    d = dispatcher(engine, tmp_path, f'[[alerts]]\nchannels = ["json://127.0.0.1:'
                   f'{receiver.port}/a"]\nfailures = 3\nqueue_age = 0\n', clock)
    q = Queue(engine, lifetime=86400, clock=clock)

    async def put() -> list[str]:
        try:
            return [await q.enqueue(envelope("x@example.org")) for _ in range(3)]
        finally:
            await q.writer.aclose()

    ids = asyncio.run(put())
    tick(d)
    assert receiver.got == []
    with write_transaction(engine) as conn:
        conn.execute(messages.update().where(messages.c.id.in_(ids))
                     .values(status="failed", updated_at=clock()))
    tick(d)
    assert receiver.got == []  # the figures are read every FACTS_EVERY seconds
    clock.advance(FACTS_EVERY)
    tick(d)
    tick(d)
    assert [b["title"] for b in receiver.bodies("/a")] == ["Postroom: failures"]
    assert "3 messages failed" in receiver.bodies("/a")[0]["message"]


def test_migration_0015_goes_down_and_up(engine: Engine) -> None:
    from migration_helpers import migrate_to, tables

    assert "alert_outbox" in tables(engine)
    migrate_to(engine, "0014", up=False)
    assert "alert_outbox" not in tables(engine)
    migrate_to(engine, "head", up=True)
    assert "alert_outbox" in tables(engine)


# -- a real serve: the connection refuses, then recovers --------------------------------------
def wait_for(check: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


def test_serve_outage_one_alert_one_recovery_and_the_commands(
        tmp_path: Path, receiver: Receiver) -> None:
    import smtplib

    from real_servers import Sink
    from serve_proc import Postroom, smtp_connection

    sink = Sink()  # its port refuses until it is started
    alerts = (f'[[alerts]]\nname = "ops"\nchannels = ["webhook+http://127.0.0.1:'
              f'{receiver.port}/hook", "json://127.0.0.1:{receiver.port}/apprise"]\n'
              'webhook_secret_env = "OPS_HOOK_SECRET"\n')
    pr = Postroom(tmp_path, connections=smtp_connection(sink.port, "up") + alerts,
                  delivery="min_backoff = 1\nmax_backoff = 1\npoll_interval = 0.2\n"
                           "breaker_failures = 2\nbreaker_cooldown = 1\n",
                  env={"OPS_HOOK_SECRET": SECRET + "\n"})
    n = 30
    with pr:
        with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=30) as s:
            for i in range(n):
                s.sendmail("app@example.org", ["to@example.net"],
                           f"Subject: outage {i}\r\n\r\nbody\r\n".encode())

        def both(change: str) -> bool:  # on the webhook and, as Apprise's type, on json://
            apprise_type = {"opened": "failure", "recovered": "success"}[change]
            return (change in [b["change"] for b in receiver.bodies("/hook")]
                    and apprise_type in [b["type"] for b in receiver.bodies("/apprise")])

        assert wait_for(lambda: both("opened")), (receiver.got, pr.log.read_text()[-3000:])
        sink.start()
        try:
            assert sink.wait_count(n, 90) == n, pr.log.read_text()[-3000:]
            assert wait_for(lambda: both("recovered")), receiver.got
            time.sleep(3)  # a tick or two more: nothing else may come
        finally:
            sink.stop()
        hooks = receiver.bodies("/hook")
        assert [(h["change"], h["kind"]) for h in hooks] == [
            ("opened", "connection_down"), ("recovered", "connection_down")]
        assert [a["type"] for a in receiver.bodies("/apprise")] == ["failure", "success"]
        for path, headers, body in receiver.got:
            if path == "/hook":
                assert verify(SECRET, body, headers[HEADER], now=time.time())

        listed = pr.cli("alerts", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(c["channel"], c["url"], c["disabled"]) for c in json.loads(listed.stdout)] == [
            ("ops#1", f"webhook+http://127.0.0.1:{receiver.port}/…", None),
            ("ops#2", "json://…", None)]
        hist = pr.cli("alerts", "history", "--json")
        assert hist.returncode == 0, hist.stderr
        assert sorted((r["channel"], r["status"], r["alert"]["change"])
                      for r in json.loads(hist.stdout)) == [
            ("ops#1", "sent", "opened"), ("ops#1", "sent", "recovered"),
            ("ops#2", "sent", "opened"), ("ops#2", "sent", "recovered")]
        tested = pr.cli("alerts", "test", "ops")
        assert tested.returncode == 0, tested.stderr
        assert receiver.bodies("/hook")[-1]["change"] == "test"
        unknown = pr.cli("alerts", "test", "nope")
        assert unknown.returncode != 0 and b"ops#1" in unknown.stderr + unknown.stdout
        assert SECRET.encode() not in pr.log.read_bytes()


def test_apprise_failing_every_try_is_disabled_and_reported(
        engine: Engine, tmp_path: Path, receiver: Receiver, clock: FakeClock) -> None:
    receiver.status["/apprise"] = 500  # Apprise reports each try as failed
    d = dispatcher(engine, tmp_path, two_channels(receiver.port), clock)
    tick(d)
    write(engine, [Event(Kind.CONNECTION_DOWN, clock(), None, "primary")])
    for _ in range(MAX_ATTEMPTS):
        tick(d)
        clock.advance(ob.MAX_BACKOFF)
    tick(d)
    assert list(ob.disabled(engine)) == ["ops#2"]
    (row,) = [r for r in ob.history(engine) if r.channel == "ops#2"]
    assert row.status == ob.FAILED and row.attempts == MAX_ATTEMPTS
    assert [h["change"] for h in receiver.bodies("/hook")] == ["opened", "channel_disabled"]


def test_two_nodes_at_once_write_each_alert_once(
        engine: Engine, tmp_path: Path, receiver: Receiver, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rules = two_channels(receiver.port)
    one, other = dispatcher(engine, tmp_path, rules, clock), dispatcher(engine, tmp_path, rules,
                                                                        clock)
    tick(one)
    write(engine, [Event(Kind.CONNECTION_DOWN, clock(), None, "primary")])
    real = Dispatcher.facts
    ran: list[list[Any]] = []

    def interleaved(self: Dispatcher, rules: Any, now: float) -> Facts:
        if self is one and not ran:  # node one has read the state: node two ticks now
            ran.append(other.evaluate())
        return real(self, rules, now)

    monkeypatch.setattr(Dispatcher, "facts", interleaved)
    assert one.evaluate() == []  # node two wrote the state since: one's tick is given up
    assert [a.change for a in ran[0]] == [Change.OPENED]
    assert rows(engine) == 2
