"""Events, one owner (issue 15): the closed vocabulary and its one writer and one reader
(postroom.events, on SQLite and PostgreSQL), no module writing or filtering the table on
its own, `postroom events` (with --follow, stopped by Ctrl-C) in a subprocess,
``/api/v1/admin/events`` and the Events page on a real `postroom serve`."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_browser import (
    ADMIN,
    ARTIFACTS,
    VIEWER,
    AdminServer,
    admin_token,
    assert_clean,
    instance_from,
    login,
    signed_in,
)
from queue_helpers import envelope, run
from sqlalchemy import Engine, insert

from postroom import events
from postroom.events import SPECS, Event, Kind, Severity, Subject
from postroom.exceptions import MessageError
from postroom.queue.sql import Queue
from postroom.routing.health import Health
from postroom.store.db import write_transaction
from postroom.store.schema import events as events_table

SRC = Path(__file__).resolve().parents[1] / "src" / "postroom"
T0 = 1_800_000_000.0


# -- the vocabulary ----------------------------------------------------------------------------
def test_every_kind_has_a_severity_and_a_subject() -> None:
    assert set(SPECS) == set(Kind)
    for kind in Kind:
        assert isinstance(kind.severity, Severity) and isinstance(kind.subject, Subject)
        assert len(kind.value) <= events_table.c.kind.type.length, kind  # type: ignore[attr-defined]
    # A fallback that delivered is a warning of its own, never an error (issue 15).
    assert Kind.FALLBACK_USED.severity is Severity.WARNING
    assert Kind.CONNECTION_DOWN.severity is Severity.ERROR
    assert Kind.OAUTH_GRANT_DEAD.subject is Subject.OAUTH_GRANT
    # the strings rows were written with before the vocabulary existed
    assert Kind("connection_down") is Kind.CONNECTION_DOWN and Kind.LEASE_EXPIRED == "lease_expired"


def test_kinds_named_by_a_user() -> None:
    assert events.parse_kinds(["connection_down,FALLBACK_USED", " ", "lease_expired"]) == [
        Kind.CONNECTION_DOWN, Kind.FALLBACK_USED, Kind.LEASE_EXPIRED]
    with pytest.raises(MessageError) as err:
        events.parse_kinds(["conection_down"], "--kind")
    assert err.value.code == "events.kind"
    assert "'conection_down'" in err.value.message and "connection_down" in err.value.message


# -- the writer and the reader -----------------------------------------------------------------
def test_write_then_read(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        events.record(conn, Kind.CONNECTION_DOWN, at=T0, connection="primary",
                      detail="5 failures in a row; last: 421" + "x" * 3000)
        events.record_all(conn, [Event(Kind.LEASE_EXPIRED, T0 + 1, message_id=f"m{i}")
                                 for i in range(3)])
        events.record(conn, Kind.QUEUE_PAUSED, at=T0 + 2)
        with pytest.raises(ValueError):
            events.record(conn, "made_up", at=T0)  # type: ignore[arg-type]
    everything = events.read(engine)
    assert [e.kind for e in everything] == [Kind.CONNECTION_DOWN, *[Kind.LEASE_EXPIRED] * 3,
                                            Kind.QUEUE_PAUSED]
    down = everything[0]
    assert down.connection == "primary" and len(down.detail) == events.MAX_DETAIL
    assert down.as_dict()["severity"] == "error" and down.as_dict()["subject"] == "connection"
    assert [e.message_id for e in events.read(engine, kinds=[Kind.LEASE_EXPIRED])] == [
        "m0", "m1", "m2"]
    assert [e.kind for e in events.read(engine, connection="primary")] == [Kind.CONNECTION_DOWN]
    assert [e.kind for e in events.read(engine, message_id="m1")] == [Kind.LEASE_EXPIRED]
    assert [e.kind for e in events.read(engine, since=T0 + 2)] == [Kind.QUEUE_PAUSED]
    # the last two, then the page before them; following from the first
    last_two = events.read(engine, limit=2)
    assert [e.message_id for e in last_two] == ["m2", None]
    before = events.read(engine, limit=2, before_id=last_two[0].id)
    assert [e.message_id for e in before] == ["m0", "m1"]
    ids = [e.id for e in everything]
    assert [e.id for e in events.read(engine, after_id=ids[0], limit=2)] == ids[1:3]
    assert events.last_id(engine) == ids[-1]
    with engine.connect() as conn:
        assert events.count(conn, Kind.LEASE_EXPIRED, since=T0) == 3
        assert events.count(conn, Kind.LEASE_EXPIRED, since=T0, until=T0 + 1) == 0


def test_a_kind_this_version_does_not_know_is_left_out(engine: Engine) -> None:
    """A newer Postroom on the same database may write kinds this one does not know: they
    are left out, and following goes past them."""
    with write_transaction(engine) as conn:
        conn.execute(insert(events_table), [{"at": T0, "kind": "from_the_future", "detail": ""}
                                            for _ in range(3)])
        events.record(conn, Kind.QUEUE_RESUMED, at=T0 + 1)
    assert [e.kind for e in events.read(engine, after_id=0, limit=2)] == [Kind.QUEUE_RESUMED]


def test_record_once_per_connection_and_window(engine: Engine) -> None:
    def once(at: float, connection: str = "g") -> bool:
        with write_transaction(engine) as conn:
            return events.record_once(conn, Kind.OAUTH_IDLE, at=at, within=86400,
                                      connection=connection, detail="idle")

    assert once(T0) and not once(T0 + 3600) and once(T0 + 3600, "other")
    assert once(T0 + 86401)
    assert len(events.read(engine, kinds=[Kind.OAUTH_IDLE])) == 3


def test_the_queue_writers_batch_goes_through_the_writer(engine: Engine) -> None:
    """Health.event (the worker's fallback_used, unknown_outcome) is queued on the queue's
    writer and written in one executemany with the rest of its batch."""
    queue = Queue(engine)
    health = Health(queue, failures=3, cooldown=60, clock=lambda: T0)

    async def go() -> None:
        for i in range(5):
            await health.event(Kind.FALLBACK_USED, message_id=f"m{i}", connection="backup",
                               detail="delivered via backup after: primary down")
        await health.flush()

    run(queue, go)
    found = events.read(engine, kinds=[Kind.FALLBACK_USED])
    assert [e.message_id for e in found] == [f"m{i}" for i in range(5)]
    assert {e.at for e in found} == {T0} and found[0].severity is Severity.WARNING


# -- one owner ---------------------------------------------------------------------------------
def test_no_module_writes_or_filters_events_but_the_events_module() -> None:
    """Every writer and reader goes through postroom.events: no other module builds an
    INSERT into the table, compares its kind with a string, or even imports the table
    (retention, which deletes old rows whatever their kind, excepted)."""
    allowed = {SRC / "events.py", SRC / "queue" / "retention.py"}
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path in allowed or "static" in path.parts:
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("events.c.kind ==", "insert(events)", "events.insert("):
            if needle in text:
                offenders.append(f"{path.relative_to(SRC)}: {needle}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "postroom.store.schema" \
                    and any(a.name == "events" for a in node.names):
                offenders.append(f"{path.relative_to(SRC)}: imports the events table")
    assert offenders == [], "use postroom.events (record/read): " + "; ".join(offenders)


# -- the command -------------------------------------------------------------------------------
def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postroom.cli", "events", *args, "--config",
                           str(cfg)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_the_command(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n')
    out = cli(cfg)
    assert out.returncode == 0 and "no event recorded yet" in out.stdout, out.stderr
    inst = instance_from(cfg)
    now = time.time()
    with closing(inst), write_transaction(inst.engine) as conn:
        events.record(conn, Kind.CONNECTION_DOWN, at=now - 7200, connection="primary",
                      detail="5 failures in a row")
        events.record(conn, Kind.FALLBACK_USED, at=now - 60, message_id="abc123",
                      connection="backup", detail="delivered via backup")
    out = cli(cfg)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "connection_down" in lines[0] and "error" in lines[0]
    assert "fallback_used" in lines[1] and "backup abc123" in lines[1]
    out = cli(cfg, "--since", "1h", "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["kind"] for r in rows] == ["fallback_used"]
    assert rows[0]["severity"] == "warning" and rows[0]["message_id"] == "abc123"
    out = cli(cfg, "--kind", "connection_down", "--connection", "primary")
    assert "connection_down" in out.stdout and "fallback_used" not in out.stdout
    out = cli(cfg, "--kind", "connection_dwn")
    assert out.returncode == 1 and "events.kind" in out.stderr
    assert "connection_down" in out.stderr  # the kinds it could have been
    out = cli(cfg, "--since", "yesterday")
    assert out.returncode == 1 and "cli.time" in out.stderr


def test_show_lists_a_messages_events(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n')
    inst = instance_from(cfg)
    with closing(inst):
        queue = Queue(inst.engine)
        msg_id = run(queue, lambda: queue.enqueue(envelope("a@example.org")))
        with write_transaction(inst.engine) as conn:
            events.record(conn, Kind.FALLBACK_USED, at=time.time(), message_id=msg_id,
                          connection="backup", detail="delivered via backup after: primary")
    shown = subprocess.run([sys.executable, "-m", "postroom.cli", "show", msg_id, "--config",
                            str(cfg)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "Events" in shown.stdout and "fallback_used" in shown.stdout
    as_json = subprocess.run([sys.executable, "-m", "postroom.cli", "show", msg_id, "--json",
                              "--config", str(cfg)], capture_output=True, text=True,
                             timeout=120)
    [noted] = json.loads(as_json.stdout)["events"]
    assert noted["kind"] == "fallback_used" and noted["severity"] == "warning"


def test_follow_prints_new_events_until_ctrl_c(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n')
    inst = instance_from(cfg)
    with write_transaction(inst.engine) as conn:
        events.record(conn, Kind.QUEUE_PAUSED, at=time.time())
    proc = subprocess.Popen([sys.executable, "-m", "postroom.cli", "events", "--follow",
                             "--json", "--kind", "queue_resumed,connection_up", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(3)  # it has started following (a read a second)
        with write_transaction(inst.engine) as conn:
            events.record(conn, Kind.QUEUE_PAUSED, at=time.time())  # not asked for
            events.record(conn, Kind.QUEUE_RESUMED, at=time.time())
            events.record(conn, Kind.CONNECTION_UP, at=time.time(), connection="primary")
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert (first["kind"], second["kind"]) == ("queue_resumed", "connection_up")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == "" and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        inst.close()


# -- the admin API and page --------------------------------------------------------------------
@pytest.fixture(scope="module")
def admin_config() -> str:
    return '[[connections]]\nname = "cap"\ntransport = "capture"\n'


@pytest.fixture(scope="module")
def seeded(admin_server: AdminServer) -> AdminServer:
    """The server with a connection down, a fallback, a dead OAuth grant, and the queue
    paused and resumed with the real commands."""
    server = admin_server
    inst = instance_from(server.proc.config)
    now = time.time()
    with closing(inst), write_transaction(inst.engine) as conn:
        events.record(conn, Kind.CONNECTION_DOWN, at=now - 600, connection="cap",
                      detail="5 failures in a row; last: 421 4.7.0 try again later")
        events.record(conn, Kind.FALLBACK_USED, at=now - 300, message_id="0123456789abcdef",
                      connection="cap", detail="delivered via cap after: primary down")
        events.record(conn, Kind.OAUTH_GRANT_DEAD, at=now - 100, connection="gmail",
                      detail="connection gmail: Google refused the refresh token "
                      "(invalid_grant): sign in again at https://postroom.example/admin/x")
    for command in ("pause", "resume"):
        assert server.proc.cli("queue", command).returncode == 0
    return server


def test_the_admin_api(seeded: AdminServer) -> None:
    admin_server = seeded
    viewer = {"Authorization": f"Bearer {admin_token(admin_server, VIEWER[0])}"}
    base = admin_server.base + "/api/v1/admin/events"
    with httpx.Client(timeout=30) as c:
        assert c.get(base).status_code == 401
        r = c.get(base, headers=viewer)
        assert r.status_code == 200, r.text
        body = r.json()
        kinds = [e["kind"] for e in body["events"]]
        assert kinds[-2:] == ["queue_paused", "queue_resumed"]
        assert {"connection_down", "fallback_used", "oauth_grant_dead"} <= set(kinds)
        assert body["last_id"] == body["events"][-1]["id"] and body["older"] is None
        dead = next(e for e in body["events"] if e["kind"] == "oauth_grant_dead")
        assert dead["severity"] == "error" and dead["subject"] == "oauth_grant"
        page = c.get(base, params={"limit": 2}, headers=viewer).json()
        assert [e["kind"] for e in page["events"]] == ["queue_paused", "queue_resumed"]
        older = c.get(base, params={"limit": 2, "before_id": page["older"]},
                      headers=viewer).json()
        assert older["events"][-1]["id"] < page["events"][0]["id"]
        r = c.get(base, params=[("kind", "fallback_used"), ("kind", "connection_down")],
                  headers=viewer)
        assert [e["kind"] for e in r.json()["events"]] == ["connection_down", "fallback_used"]
        r = c.get(base, params={"kind": "nope"}, headers=viewer)
        assert r.status_code == 400 and r.json()["error"]["code"] == "events.kind"
        assert c.get(base, params={"after_id": body["last_id"]},
                     headers=viewer).json() == {"events": [], "older": None,
                                                "last_id": body["last_id"]}
        assert admin_server.proc.cli("queue", "pause").returncode == 0
        news = c.get(base, params={"after_id": body["last_id"]}, headers=viewer).json()
        assert [e["kind"] for e in news["events"]] == ["queue_paused"]
        assert admin_server.proc.cli("queue", "resume").returncode == 0
    s, _ = signed_in(admin_server, *VIEWER)  # a signed-in viewer's session reads them too
    with closing(s):
        assert s.get("/api/v1/admin/events").status_code == 200


def test_the_events_page(page: Any, seeded: AdminServer) -> None:
    login(page, *VIEWER)
    page.get_by_role("navigation", name="Main").last.get_by_role("link", name="Events").click()
    page.wait_for_load_state()
    assert page.url.endswith("/admin/events")
    table = page.locator("#events-table")
    assert "oauth_grant_dead" in table.inner_text()
    first = table.locator("tbody tr").first.inner_text()  # newest first
    assert "queue_resumed" in first
    assert "the queue" in first  # what a queue event is about, in the About column
    dead = table.locator("tr", has_text="oauth_grant_dead")
    assert dead.locator(".badge.fail").inner_text() == "error"
    assert table.locator("tr", has_text="fallback_used").locator(".badge.warn").count() == 1
    assert dead.get_by_role("link", name="gmail").get_attribute("href") == \
        "/admin/connections/gmail"
    assert_clean(page, "events-list")
    assert (ARTIFACTS / "events-list-phone.png").exists()
    page.get_by_label("Kind").select_option("fallback_used")
    page.get_by_role("button", name="Show").click()
    page.wait_for_load_state()
    rows = page.locator("#events-table tbody tr")
    assert rows.count() == 1 and "0123456789ab" in rows.inner_text()
    page.goto("/admin/events?connection=nobody")
    assert "No event matches." in page.locator("main").inner_text()


def test_the_events_page_in_french(browser: Any, seeded: AdminServer) -> None:
    admin_server = seeded
    context = browser.new_context(base_url=admin_server.base, locale="fr-FR",
                                  extra_http_headers={"Accept-Language": "fr"})
    try:
        tab = context.new_page()
        tab.goto("/admin/login")
        tab.locator("#name").fill(ADMIN[0])
        tab.locator("#password").fill(ADMIN[1])
        tab.locator("form button[type=submit]").click()
        tab.wait_for_load_state()
        tab.goto("/admin/events")
        text = tab.locator("main").inner_text()
        assert "Gravité" in text and "erreur" in text and "avertissement" in text
    finally:
        context.close()
