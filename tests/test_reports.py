"""Summary reports (issue 15, postroom.reports): figures and trends for seeded data on SQLite
and PostgreSQL, the rendered email (HTML with a text part, inline CSS only), the schedule
(local time and zone, once per period even with two nodes racing), `postroom report`, and
the email really delivered through the real Postfix peer into its Maildir."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from admin_browser import VIEWER, AdminServer, assert_clean, instance_from, login
from conftest import free_port
from queue_helpers import FakeClock
from sqlalchemy import insert, select, update

from postroom import settings as settings_mod
from postroom.envelope import Envelope
from postroom.exceptions import ConfigError
from postroom.message import compose
from postroom.queue.sql import Queue
from postroom.reports import build, render, schedule
from postroom.reports.config import ReportsSettings
from postroom.runtime import Instance
from postroom.store.schema import attempts, control, messages
from postroom.suppression import Suppressions

HOUR = 3600
DAY = 86_400
MAILBOX = "testuser@example.test"
# Nothing listens there: the doctor's DNS queries are refused at once (no internet in tests).
NO_DNS = f"127.0.0.1:{free_port()}"


def write_config(path: Path, database: str, extra: str = "") -> Path:
    cfg = path / "postroom.toml"
    cfg.write_text(f'[server]\ndata_dir = "data"\nhostname = "postroom.test"\n'
                   f'database = "{database}"\n{extra}')
    return cfg


@pytest.fixture
def database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        return str(request.getfixturevalue("pg_server").new_database())
    return f"sqlite:///{tmp_path / 'reports.db'}"


@pytest.fixture
def inst(database: str, tmp_path: Path) -> Iterator[Instance]:
    extra = ('[reports]\nto = ["ops@example.test"]\ndaily = true\ntimezone = "Europe/Paris"\n'
             f'dns_wait = 5\ndns_server = "{NO_DNS}"\n')
    instance = Instance(settings_mod.load(write_config(tmp_path, database, extra),
                                          environ={}))
    yield instance
    instance.close()


def add(queue: Queue, clock: FakeClock, at: float, status: str, via: str | None,
        app: str | None, error: str | None = None) -> str:
    """One finished message created at ``at``; a failed one gets an attempt with ``error``."""
    clock.t = at
    raw = compose(sender="app@example.org", to=["r@example.test"], subject="s", text="b\n")
    msg_id = queue.enqueue_sync(Envelope("app@example.org", ["r@example.test"], raw,
                                         source="test", app=app))
    with queue.engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == msg_id).values(
            status=status, via=via, last_error=error))
        if error is not None:
            conn.execute(insert(attempts).values(
                message_id=msg_id, connection=via or "", started_at=at, ended_at=at,
                outcome="failed", reply_code=535, error_code=error, permanent=True,
                reply_text="535 5.7.8 Authentication credentials invalid", recipients={},
                transcript=""))
    return msg_id


@pytest.fixture
def seeded(inst: Instance) -> float:
    """Mail of the day before ``end`` and of the day before that; returns ``end``."""
    end = math.floor(time.time() / HOUR) * HOUR + HOUR  # includes "now"
    clock = FakeClock()
    queue = Queue(inst.engine, lifetime=5 * DAY, clock=clock)
    now_at, before_at = end - 5 * HOUR, end - DAY - 5 * HOUR
    for _ in range(8):
        add(queue, clock, now_at, "sent", "primary", "shop")
    for _ in range(2):
        add(queue, clock, now_at, "failed", "primary", "shop", error="auth.rejected")
    for _ in range(3):
        add(queue, clock, now_at, "sent", "backup", None)
    for _ in range(4):
        add(queue, clock, before_at, "sent", "primary", "shop")
    add(queue, clock, before_at, "failed", "primary", "shop", error="connect.refused")
    add(queue, clock, end - 3 * DAY, "sent", "primary", "shop")  # in neither period
    sup = Suppressions(inst.engine)
    sup.add("gone@example.test", reason="hard bounce")
    sup.add("spam@example.test", reason="complaint")
    return end


def test_figures_and_trends(inst: Instance, seeded: float) -> None:
    report = build.build(inst, "day", end=seeded)
    assert (report.start, report.end) == (seeded - DAY, seeded)
    t = report.totals
    assert (t.now.sent, t.now.failed, t.now.total) == (11, 2, 13)
    assert (t.before.sent, t.before.failed, t.before.total) == (4, 1, 5)
    assert t.change == 8 and t.change_pct == pytest.approx(160.0)
    assert t.now.failure_rate == pytest.approx(2 / 13)
    assert t.rate_change == pytest.approx(100 * (2 / 13 - 1 / 5))
    conns = {r.name: r for r in report.connections}
    assert list(conns) == ["primary", "backup"]  # most mail first
    assert (conns["primary"].now.total, conns["primary"].before.total) == (10, 5)
    assert conns["primary"].change_pct == pytest.approx(100.0)
    assert (conns["backup"].now.total, conns["backup"].change_pct) == (3, None)
    apps = {r.name: r for r in report.apps}
    assert (apps["shop"].now.sent, apps["shop"].now.failed) == (8, 2)
    assert apps[""].now.total == 3 and apps[""].before.total == 0
    # only this period's failures, with the advice the log shows for them
    assert [(c.code, c.count) for c in report.causes] == [("auth.rejected", 2)]
    assert report.causes[0].advice is not None and report.causes[0].advice["fix"]
    assert "535" in report.causes[0].example
    assert (report.suppressed_total, report.suppressed_new) == (2, 2)
    assert {s["address"] for s in report.suppressed_newest} == {"gone@example.test",
                                                                "spam@example.test"}
    assert report.oauth == [] and report.doctor.state == "off"
    week = build.build(inst, "week", end=seeded)
    assert week.totals.now.total == 19 and week.totals.before.total == 0
    json.dumps(week.to_dict())  # --json's output


@pytest.mark.sqlite_only
def test_doctor_says_when_dns_does_not_answer(inst: Instance, tmp_path: Path) -> None:
    # no connection has a sending domain: the doctor answers at once, without DNS
    part = build.doctor_part(inst, wait=10, dns_server=NO_DNS, shared=False)
    assert part.state == "done" and part.domains[0]["counts"]["warn"] == 1, part
    # a sending domain, and a DNS server that never answers: the report does not wait
    other = tmp_path / "other"
    other.mkdir()
    relay = ('[[connections]]\nname = "relay"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
             'port = 10025\nsecurity = "none"\nusername = "app@example.test"\n'
             'password = "x"\n')
    with silent_dns() as address, closing(Instance(settings_mod.load(
            write_config(other, f"sqlite:///{other / 'r.db'}", relay), environ={}))) as sender:
        # (on a daemon thread, as the command runs it: the test run does not wait for it)
        part = build.doctor_part(sender, wait=0.5, dns_server=address, shared=False)
        assert part.state == "checking", part
        assert "no answer within 0.5 s" in part.error and "unreachable" in part.error


@contextmanager
def silent_dns() -> Iterator[str]:
    """A UDP socket that reads DNS queries and never answers."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_email_has_html_and_text(inst: Instance, seeded: float) -> None:
    cfg = inst.settings.section(ReportsSettings)
    report = build.build(inst, "day", end=seeded,
                         doctor=build.DoctorPart("checking", "no DNS answer within 5 s"))
    env = render.envelope(report, inst.settings, cfg)
    assert env.recipients == ["ops@example.test"] and env.sender == "postroom@postroom.test"
    msg = email.message_from_bytes(env.raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    rich = msg.get_body(("html",))
    assert plain is not None and rich is not None
    text, html = plain.get_content(), rich.get_content()  # type: ignore[attr-defined]
    assert "Messages: 13 (+8 (+160%), failure rate -4.6 pt)" in text
    assert "primary: 10 delivered" not in text and "primary: 8 delivered, 2 failed" in text
    assert "2 x" in text and "no DNS answer within 5 s" in text
    assert "Europe/Paris" not in text and ("CET" in text or "CEST" in text)
    for forbidden in ("<img", "<link", "<style", "<script", "src="):
        assert forbidden not in html, forbidden
    assert "style=" in html and "primary" in html and "auth.rejected" in html
    assert str(msg["Subject"]).startswith("Daily Postroom report")
    with pytest.raises(ConfigError) as refused:
        render.envelope(report, inst.settings, ReportsSettings())
    assert refused.value.code == "reports.no_recipient" and "[reports] to" in str(refused.value)


def test_last_due_in_local_time() -> None:
    cfg = ReportsSettings(at="08:30", timezone="Europe/Paris", weekday="wednesday")
    paris = cfg.zone
    # Monday 2026-12-07 10:00 in Paris: today's daily, last Wednesday's weekly
    now = dt.datetime(2026, 12, 7, 10, 0, tzinfo=paris).timestamp()
    assert schedule.last_due("day", cfg, now) == dt.datetime(2026, 12, 7, 8, 30, tzinfo=paris)
    assert schedule.last_due("week", cfg, now) == dt.datetime(2026, 12, 2, 8, 30,
                                                              tzinfo=paris)
    early = dt.datetime(2026, 12, 7, 8, 29, tzinfo=paris).timestamp()
    assert schedule.last_due("day", cfg, early).day == 6
    on_the_day = dt.datetime(2026, 12, 9, 8, 30, tzinfo=paris).timestamp()
    assert schedule.last_due("week", cfg, on_the_day).day == 9
    # summer time: the same wall-clock time, one hour less of UTC offset
    summer = dt.datetime(2026, 7, 1, 9, 0, tzinfo=paris).timestamp()
    assert schedule.last_due("day", cfg, summer).utcoffset() == dt.timedelta(hours=2)
    for bad in ({"at": "8h"}, {"timezone": "Mars/Olympus"}, {"weekday": "funday"},
                {"to": ["not an address"]}):
        with pytest.raises(ValueError):
            ReportsSettings(**bad)


def test_claim_once_per_period_racing(inst: Instance) -> None:
    wins: list[bool] = []
    gate = threading.Barrier(4)

    def claim() -> None:
        gate.wait()
        wins.append(schedule.claim(inst.engine, "day", "202612070830", 1.0))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(wins) == [False, False, False, True]
    assert not schedule.claim(inst.engine, "day", "202612060830", 2.0)  # older: never again
    assert schedule.claim(inst.engine, "day", "202612080830", 3.0)  # the next period
    schedule.release(inst.engine, "day", "202612080830", "202612070830")
    assert schedule.claim(inst.engine, "day", "202612080830", 4.0)  # given back: again


def test_two_nodes_send_once(inst: Instance, database: str, tmp_path: Path) -> None:
    """Two instances (nodes) on one database tick at once, twice: one email per kind."""
    other_dir = tmp_path / "node2"
    other_dir.mkdir()
    other = Instance(settings_mod.load(write_config(other_dir, database, (
        '[reports]\nto = ["ops@example.test"]\ndaily = true\ntimezone = "Europe/Paris"\n'
        f'dns_wait = 1\ndns_server = "{NO_DNS}"\n')), environ={}))
    cfg = inst.settings.section(ReportsSettings)
    now = time.time()

    async def race() -> list[str]:
        got = await asyncio.gather(schedule.tick(inst, cfg, now), schedule.tick(other, cfg, now))
        again = await asyncio.gather(schedule.tick(inst, cfg, now + 60),
                                     schedule.tick(other, cfg, now + 60))
        await inst.queue.writer.aclose()
        await other.queue.writer.aclose()
        return [i for ids in (*got, *again) for i in ids]

    try:
        ids = asyncio.run(race())
    finally:
        other.close()
    assert len(ids) == 2  # one daily, one weekly
    with inst.engine.connect() as conn:
        rows = conn.execute(select(messages.c.subject, messages.c.source)
                            .where(messages.c.id.in_(ids))).all()
        kept = dict(conn.execute(select(control.c.name, control.c.value)).all())
    assert sorted(r.subject.split(",")[0] for r in rows) == ["Daily Postroom report",
                                                             "Weekly Postroom report"]
    assert {r.source for r in rows} == {render.SOURCE}
    day_due = schedule.last_due("day", cfg, now)
    assert kept[schedule.CONTROL_PREFIX + "day"] == schedule.key(day_due)


@pytest.mark.sqlite_only
def test_the_chore_sends_each_period_once(inst: Instance) -> None:
    """serve's chore, ticking fast: the day's and the week's report are queued once, and
    later ticks of the same periods queue nothing."""

    def sent() -> int:
        with inst.engine.connect() as conn:
            return len(conn.execute(select(messages.c.id).where(
                messages.c.source == render.SOURCE)).all())

    async def main() -> tuple[int, int]:
        task = asyncio.create_task(schedule.report_loop(inst, lambda: inst.settings,
                                                        interval=0.01))
        try:
            for _ in range(3000):  # at most ~30 s for the first two
                await asyncio.sleep(0.01)
                if await asyncio.to_thread(sent) >= 2:
                    break
            first = await asyncio.to_thread(sent)
            await asyncio.sleep(0.3)  # many more ticks of the same periods
            return first, await asyncio.to_thread(sent)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await inst.queue.writer.aclose()

    assert asyncio.run(main()) == (2, 2)


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    return subprocess.run([sys.executable, "-m", "postroom.cli", *args, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120,
                          env={**env, "NO_COLOR": "1", "COLUMNS": "200"})


@pytest.mark.sqlite_only
def test_cli(inst: Instance, seeded: float, tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    out = cli(cfg, "report", "--period", "day", "--json", "--dns-wait", "3")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["kind"] == "day" and got["totals"]["now"]["total"] == 13
    assert got["doctor"]["state"] in ("done", "failed", "checking")
    out = cli(cfg, "report", "--period", "week", "--dns-wait", "0")
    assert out.returncode == 0, out.stderr
    assert "Weekly Postroom report" in out.stdout and "Messages: 19" in out.stdout
    bad = cli(cfg, "report", "--period", "month")
    assert bad.returncode != 0 and "use day or week" in (bad.stdout + bad.stderr)
    nobody = cli(cfg, "report", "--send")  # [reports] to is set, its connection is not
    assert nobody.returncode == 0, nobody.stderr
    cfg.write_text(cfg.read_text().replace("[reports]\n", '[reports]\nconnection = "nope"\n'))
    bad = cli(cfg, "report", "--send", "--dns-wait", "0")
    assert bad.returncode != 0 and "no connection named 'nope'" in (bad.stdout + bad.stderr)


@pytest.mark.sqlite_only
def test_email_delivered_through_real_postfix(tmp_path: Path, peers: Any,
                                              unique_subject: str) -> None:
    """`postroom report --send` queues the email; a worker delivers it through the real
    Postfix peer into the Maildir, as multipart/alternative with its text and HTML."""
    from postroom import Mailer

    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'real.db'}", (
        f'\n[[connections]]\nname = "peer"\ntransport = "smtp"\nhost = "{peers.host}"\n'
        f'port = {peers.plain_port}\nsecurity = "none"\n'
        f'\n[reports]\nto = ["{MAILBOX}"]\nconnection = "peer"\n'
        f'sender = "reports-{unique_subject[-8:]}@postroom.test"\n'
        f'dns_wait = 3\ndns_server = "{NO_DNS}"\n'))
    out = cli(cfg, "report", "--period", "day", "--send", "--json")
    assert out.returncode == 0, out.stderr
    msg_id = json.loads(out.stdout)["id"]
    with Mailer(config=cfg) as mailer:
        assert mailer.deliver_due() == 1
    sender = f"reports-{unique_subject[-8:]}@postroom.test"
    got = peers.wait_for(MAILBOX, lambda m: sender in str(m.get("From", "")))
    assert str(got["Subject"]).startswith("Daily Postroom report")
    assert got.get_content_type() == "multipart/alternative"
    plain, rich = got.get_body(("plain",)), got.get_body(("html",))
    assert plain is not None and rich is not None
    assert "Top failure causes" in plain.get_content()
    assert "<h2" in rich.get_content() and "<img" not in rich.get_content()
    shown = cli(cfg, "show", msg_id, "--json")
    assert json.loads(shown.stdout)["status"] == "sent", shown.stdout


# -- the admin page --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def admin_config() -> str:
    return ('[[connections]]\nname = "cap"\ntransport = "capture"\n'
            f'\n[reports]\ndns_wait = 2\ndns_server = "{NO_DNS}"\n')


@pytest.fixture(scope="module")
def served(admin_server: AdminServer) -> AdminServer:
    """The server's log with a day of mail: 6 sent and 2 failed through cap, by app shop."""
    inst = instance_from(admin_server.proc.config)
    clock = FakeClock()
    queue = Queue(inst.engine, lifetime=5 * DAY, clock=clock)
    with closing(inst):
        at = time.time() - 2 * HOUR
        for _ in range(6):
            add(queue, clock, at, "sent", "cap", "shop")
        for _ in range(2):
            add(queue, clock, at, "failed", "cap", "shop", error="auth.rejected")
        Suppressions(inst.engine).add("gone@example.test", reason="hard bounce")
    return admin_server


def test_the_reports_page(page: Any, served: AdminServer) -> None:
    login(page, *VIEWER)  # a viewer may read the reports
    page.get_by_role("navigation", name="Main").last.get_by_role("link",
                                                                  name="Reports").click()
    page.wait_for_load_state()
    assert page.url.endswith("/admin/reports")
    main = page.locator("main").inner_text()
    assert "Top failure causes" in main and "auth.rejected" in main
    conns = page.locator("section", has=page.locator("#r-conns")).inner_text()
    assert "cap" in conns and "25.0 %" in conns  # 2 failed of 8
    assert "1 added in this period; 1 on the list." in main
    assert_clean(page, "reports-week")
    page.get_by_label("Report").select_option("day")
    page.get_by_role("button", name="Show").click()
    page.wait_for_load_state()
    assert page.url.endswith("period=day")
    assert "+8 (" not in page.locator("#r-totals").inner_text()  # nothing the day before
    assert_clean(page, "reports-day")


def test_the_reports_page_in_french(page: Any, served: AdminServer) -> None:
    login(page, *VIEWER)
    page.set_extra_http_headers({"Accept-Language": "fr"})  # the page follows the browser
    page.goto("/admin/reports?period=day")
    main = page.locator("main").inner_text()
    assert "Rapports" in main and "Principales causes d’échec" in main
    assert "Ajoutées sur cette période : 1 ; dans la liste : 1." in main
