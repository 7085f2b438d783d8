"""/metrics (issue 15, "Metrics"): a real `postroom serve` with an SMTP upstream that takes
most mail and refuses one address (550), and a connection to a closed port; the figures
checked after the mail is delivered, failed and deferred; who may read them; and the Debian
`prometheus` server scraping ``[metrics] listen`` and answering a PromQL query.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from queue_helpers import envelope, run
from real_servers import Sink
from serve_proc import Postroom, free_port, smtp_connection, wait_port
from sqlalchemy import Engine

TIMEOUT = 20.0
WAIT = 60.0  # bound on every wait for figures to show up
REFUSED = "nobody@example.test"
Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink({REFUSED: "550 5.1.1 no such user"}).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """[metrics] listen's port."""
    return free_port()


@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, sink: Sink, metrics_port: int
       ) -> Iterator[Postroom]:
    p = Postroom(
        tmp_path_factory.mktemp("metrics"),
        connections=smtp_connection(sink.port) + smtp_connection(free_port(), name="nowhere")
        + f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\ncache_seconds = 0.5\n',
    )
    p.start()
    try:
        wait_port(p.http_port, timeout=TIMEOUT)
        wait_port(metrics_port, timeout=TIMEOUT)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def viewer(pr: Postroom) -> str:
    """An admin API token of a viewer account."""
    out = pr.cli("admin", "add", "watcher", "--role", "viewer", "--password-stdin",
                 input=b"a long enough viewer password\n")
    assert out.returncode == 0, out.stderr
    out = pr.cli("admin", "token", "watcher", "--label", "prometheus")
    token = next((w for w in out.stdout.decode().split() if w.startswith("prt_")), None)
    assert token, out
    return token


def parse(text: str) -> Figures:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def figure(found: Figures, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def scrape(port: int) -> Figures:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return parse(r.text)


def wait_for(port: int, ok: Callable[[Figures], bool]) -> Figures:
    deadline = time.monotonic() + WAIT
    while True:
        found = scrape(port)
        if ok(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def test_token_needed_on_the_http_port(pr: Postroom, viewer: str) -> None:
    url = f"http://127.0.0.1:{pr.http_port}/metrics"
    none = httpx.get(url, timeout=TIMEOUT)
    assert none.status_code == 401
    assert none.json()["error"]["code"] == "metrics.unauthenticated"
    assert "postroom admin token" in none.json()["error"]["fix"]
    assert none.headers["www-authenticate"] == "Bearer"
    bad = httpx.get(url, headers={"Authorization": "Bearer prt_x_y"}, timeout=TIMEOUT)
    assert bad.status_code == 401
    app_key = pr.add_app_keys("other")[1]  # an app's API key is not an admin token
    assert httpx.get(url, headers={"Authorization": f"Bearer {app_key}"},
                     timeout=TIMEOUT).status_code == 401
    ok = httpx.get(url, headers={"Authorization": f"Bearer {viewer}"}, timeout=TIMEOUT)
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = parse(ok.text)
    assert figure(found, "postroom_connection_state", connection="up", state="up") == 1.0
    assert figure(found, "postroom_events_total", kind="connection_down") is not None
    head = httpx.head(url, headers={"Authorization": f"Bearer {viewer}"}, timeout=TIMEOUT)
    assert head.status_code == 200 and head.content == b""
    posted = httpx.post(url, headers={"Authorization": f"Bearer {viewer}"}, timeout=TIMEOUT)
    assert posted.status_code == 405


def test_hostile_client_refused(pr: Postroom, viewer: str, metrics_port: int) -> None:
    """127.0.0.2 is outside server.admin_networks (127.0.0.1/32, ::1/128 by default): no
    figures on either address, token or not."""
    own = f"http://127.0.0.1:{metrics_port}/metrics"
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                      timeout=TIMEOUT) as c:
        r = c.get(own)
        assert r.status_code == 403
        assert "server.admin_networks" in r.text and "postroom_" not in r.text
        r = c.get(f"http://127.0.0.1:{pr.http_port}/metrics",
                  headers={"Authorization": f"Bearer {viewer}"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "metrics.network"
    assert httpx.get(own.replace("/metrics", "/other"), timeout=TIMEOUT).status_code == 404
    assert httpx.post(own, timeout=TIMEOUT).status_code == 405
    with contextlib.closing(socket.create_connection(("127.0.0.1", metrics_port),
                                                     timeout=TIMEOUT)) as s:
        s.sendall(b"GARBAGE" * 2000)  # a head over the limit, never ended
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def final(api: httpx.Client, msg_id: str, statuses: tuple[str, ...]) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        status = str(api.get(f"/api/v1/messages/{msg_id}").json()["status"])
        if status in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def send(api: httpx.Client, to: str, **extra: Any) -> str:
    r = api.post("/api/v1/messages", json={"from": "shop@example.org", "to": [to],
                                           "subject": "metrics", "text": "hi", **extra})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def delivered(pr: Postroom, metrics_port: int) -> Figures:
    """Three messages delivered, one refused for good, one deferred (closed port); the
    figures once the attempts have settled."""
    scrape(metrics_port)  # attempts and events count from a server's first scrape on
    key = pr.add_app_keys("shop")[1]
    with pr.api(key) as api:
        sent = [send(api, f"user{i}@example.test") for i in range(3)]
        failed = send(api, REFUSED)
        deferred = send(api, "later@example.test", connection="nowhere")
        assert [final(api, m, ("sent",)) for m in sent] == ["sent"] * 3
        assert final(api, failed, ("failed",)) == "failed"
        assert final(api, deferred, ("deferred",)) == "deferred"

    def settled(f: Figures) -> bool:
        return figure(f, "postroom_attempt_duration_seconds_count",
                      connection="up", outcome="sent") == 3.0 and \
            figure(f, "postroom_attempt_duration_seconds_count",
                   connection="up", outcome="failed") == 1.0

    return wait_for(metrics_port, settled)


def test_figures_after_delivery(delivered: Figures) -> None:
    f = delivered
    assert figure(f, "postroom_messages", status="sent", connection="up", app="shop") == 3.0
    assert figure(f, "postroom_messages", status="failed", connection="up", app="shop") == 1.0
    waiting = sum(figure(f, "postroom_messages", status=s, connection="nowhere",
                         app="shop") or 0.0 for s in ("deferred", "sending", "queued"))
    assert waiting == 1.0
    assert sum(figure(f, "postroom_queue_messages", status=s) or 0.0
               for s in ("queued", "deferred", "sending")) == 1.0
    assert (figure(f, "postroom_queue_oldest_age_seconds") or 0.0) > 0.0
    assert figure(f, "postroom_attempt_duration_seconds_count",
                  connection="up", outcome="sent") == 3.0
    assert figure(f, "postroom_attempt_duration_seconds_bucket",
                  connection="up", outcome="sent", le="+Inf") == 3.0
    assert (figure(f, "postroom_attempt_duration_seconds_count",
                   connection="nowhere", outcome="deferred") or 0.0) >= 1.0
    assert figure(f, "postroom_attempt_duration_seconds_count",
                  connection="up", outcome="failed") == 1.0
    assert figure(f, "postroom_connection_state", connection="up", state="up") == 1.0
    assert figure(f, "postroom_connection_paused", connection="up") == 0.0
    assert (figure(f, "postroom_connection_failures", connection="nowhere") or 0.0) >= 1.0
    assert figure(f, "postroom_queue_paused") == 0.0


@pytest.fixture
def prometheus(metrics_port: int, tmp_path: Path) -> Iterator[str]:
    """The Debian `prometheus` server scraping [metrics] listen every second; its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is not installed: run "
                    "`bash tests/peers/prometheus.sh install` (as root)", pytrace=False)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: postroom\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n",
        encoding="utf-8")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_port(port, timeout=WAIT)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_prometheus_scrapes_and_answers_promql(delivered: Figures, prometheus: str) -> None:
    query = 'sum(postroom_messages{status="sent", app="shop"})'
    deadline = time.monotonic() + WAIT
    answer: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": query},
                           timeout=TIMEOUT).json()
        result = answer.get("data", {}).get("result", [])
        if result and result[0]["value"][1] == "3":
            break
        time.sleep(0.5)
    assert answer["status"] == "success"
    assert answer["data"]["result"][0]["value"][1] == "3", answer
    up = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="postroom"}'},
                   timeout=TIMEOUT).json()
    assert up["data"]["result"][0]["value"][1] == "1", up


def test_tail_counts_from_first_read_and_waits_for_unsettled_rows() -> None:
    """Rows before the first read are not counted; a row younger than SETTLE stops the read
    there, so one written later with an older time (a lower id) is not skipped."""
    from sqlalchemy import create_engine, insert

    from postroom.metrics.collect import SETTLE, Tail
    from postroom.store.schema import events

    engine = create_engine("sqlite://")
    events.create(engine)
    now = 1_000_000.0
    with engine.begin() as conn:
        conn.execute(insert(events), [{"at": now - 100, "kind": "queue_paused", "detail": ""}])
        tail = Tail(events, events.c.at, (events.c.kind,))
        assert tail.read(conn, now) == []  # the past: not counted
        conn.execute(insert(events), [
            {"at": now - 10, "kind": "connection_down", "detail": ""},
            {"at": now - SETTLE / 2, "kind": "connection_up", "detail": ""},  # not settled
            {"at": now - 10, "kind": "fallback_used", "detail": ""},
        ])
        assert [r.kind for r in tail.read(conn, now)] == ["connection_down"]
        assert [r.kind for r in tail.read(conn, now + SETTLE)] == ["connection_up",
                                                                   "fallback_used"]
        assert tail.read(conn, now + 100) == []
    engine.dispose()


def test_histogram_buckets_are_cumulative() -> None:
    from postroom.metrics.collect import BUCKETS, Histogram

    h = Histogram()
    for value in (0.01, 0.3, 0.3, 1000.0):
        h.observe(value)
    bounds = dict(zip((*BUCKETS, float("inf")), h.counts, strict=True))
    assert bounds[0.05] == 1 and bounds[0.25] == 1 and bounds[0.5] == 3
    assert bounds[300.0] == 3 and bounds[float("inf")] == 4
    assert h.total == pytest.approx(1000.61)


def test_snapshot_on_both_stores(engine: Engine, tmp_path: Path) -> None:
    """The collector's queries on SQLite and PostgreSQL: waiting mail by status, attempts
    counted once each from the first read on, OAuth expiry, the text Prometheus reads."""
    from sqlalchemy import insert

    from postroom.metrics.collect import Collector
    from postroom.metrics.expose import render
    from postroom.queue.sql import Queue
    from postroom.settings import load
    from postroom.store.schema import attempts, oauth_grants

    config = tmp_path / "postroom.toml"
    config.write_text(smtp_connection(free_port(), name="a"), encoding="utf-8")
    conf = load(config)
    queue = Queue(engine)
    ids = [queue.enqueue_sync(envelope(f"r{i}@example.test")) for i in range(2)]
    collector = Collector(queue, lambda: conf)
    first = collector.snapshot()
    assert first.messages == {("queued", "", ""): 2}
    assert first.queue["queued"] == 2 and first.oldest_age >= 0.0
    now = time.time()
    with engine.begin() as conn:
        conn.execute(insert(attempts), [
            {"message_id": ids[0], "connection": "a", "started_at": now - 12,
             "ended_at": now - 10, "outcome": "deferred", "recipients": {}, "transcript": ""},
            {"message_id": ids[1], "connection": "a", "started_at": now - 10.5,
             "ended_at": now - 10, "outcome": "deferred", "recipients": {}, "transcript": ""}])
        conn.execute(insert(oauth_grants).values(
            connection="a", provider="google", client_id="c", grant_type="authorization_code",
            scopes="s", expires_at=now + 3600, granted_at=now, state="dead"))
    snap = collector.snapshot()
    hist = snap.durations[("a", "deferred")]
    assert hist.counts[-1] == 2 and hist.total == pytest.approx(2.5)
    assert [b.state for b in snap.breakers] == ["up"]
    found = parse(render(snap).decode())
    assert figure(found, "postroom_oauth_access_token_expiry_timestamp_seconds",
                  connection="a") == pytest.approx(now + 3600)
    assert figure(found, "postroom_oauth_grant_dead", connection="a") == 1.0
    assert figure(found, "postroom_attempt_duration_seconds_bucket", connection="a",
                  outcome="deferred", le="2.5") == 2.0
    assert collector.snapshot().durations[("a", "deferred")].counts[-1] == 2  # not twice
    run(queue, lambda: asyncio.sleep(0))  # closes the queue's group committer
