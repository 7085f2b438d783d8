"""The dashboard, the log list (filters, live rows, bulk actions, export) and the queue page
against a real `postroom serve` delivering to a real SMTP upstream (tests/real_servers.py
Sink, which refuses one recipient with 550 5.1.1): clicks in Debian's Chromium for the main
flows, httpx with a session or an admin API token for the JSON side and the refusals.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import smtplib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from admin_browser import (
    ADMIN,
    DESKTOP,
    PHONE,
    VIEWER,
    AdminServer,
    admin_token,
    assert_clean,
    axe,
    http,
    login,
    no_horizontal_scroll,
    shot,
    signed_in,
    wait_for,
)
from real_servers import Sink
from serve_proc import smtp_connection

GOOD = "alice@example.net"
REFUSED = "nobody@example.net"
REFUSAL = f"550 5.1.1 <{REFUSED}>: Recipient address rejected: User unknown"
WAIT = 30.0


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink(rcpt_reply={REFUSED: REFUSAL}).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def admin_config(sink: Sink) -> str:
    return smtp_connection(sink.port, "sink") + smtp_connection(sink.port, "spare")


def send(server: AdminServer, to: str, subject: str) -> str:
    """A message handed in over SMTP from this machine; its queue id."""
    with smtplib.SMTP("127.0.0.1", server.proc.smtp_port, timeout=10) as s:
        refused = s.sendmail("shop@example.org", [to], (
            f"From: shop@example.org\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nhello\r\n").encode())
    assert not refused
    return db_one(server, "SELECT id FROM messages WHERE subject = ?", subject)


def db_rows(server: AdminServer, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(server.proc.db, timeout=30) as db:
        return db.execute(sql, args).fetchall()


def db_one(server: AdminServer, sql: str, *args: Any) -> Any:
    rows = db_rows(server, sql, *args)
    return rows[0][0] if rows else None


def status_of(server: AdminServer, subject: str) -> str | None:
    found: str | None = db_one(server, "SELECT status FROM messages WHERE subject = ?",
                                subject)
    return found


@pytest.fixture(scope="module")
def mail(admin_server: AdminServer, sink: Sink) -> AdminServer:
    """Three delivered messages to GOOD, one refused for REFUSED."""
    for i in (1, 2, 3):
        send(admin_server, GOOD, f"welcome {i}")
    send(admin_server, REFUSED, "bounce me")
    wait_for(lambda: [status_of(admin_server, f"welcome {i}") for i in (1, 2, 3)]
             == ["sent"] * 3 and status_of(admin_server, "bounce me") == "failed",
             "three sent, one failed")
    return admin_server


def figures(page: Any) -> dict[str, str]:
    row = page.locator("table.figures tbody tr").first
    cells = row.locator("td").all_inner_texts()
    return dict(zip(("sent", "partial", "failed", "suppressed", "deferred", "fallback"), cells,
                    strict=True))


def subjects(page: Any) -> list[str]:
    return page.locator("#rows tr:not(.live) td:nth-child(6)").all_inner_texts()


# -- the dashboard ------------------------------------------------------------------------
def test_dashboard_shows_counts_and_the_failure_with_advice(mail: AdminServer, page: Any
                                                           ) -> None:
    login(page, *ADMIN)
    page.goto("/admin/")
    got = figures(page)
    assert got["sent"] == "3" and got["failed"] == "1", got
    failure = page.locator("ul.failures li").first
    assert "bounce me" in failure.inner_text()
    assert "does not exist" in failure.locator(".advice").inner_text()  # 550 5.1.1's advice
    msg_id = db_one(mail, "SELECT id FROM messages WHERE subject = 'bounce me'")
    assert failure.get_by_role("link").get_attribute("href") == f"/admin/messages/{msg_id}"
    # The chart: a labelled image with its table fallback, 24 hours of bars.
    assert page.locator("svg.chart[role=img] rect.bar-sent").count() >= 1
    assert "sink" in page.locator("#conns-title ~ .table-wrap").inner_text()
    # "Last success" from the log: the health table writes it only when a connection recovers.
    sink_row = page.locator("#conns-title ~ .table-wrap tbody tr", has_text="sink").first
    assert "UTC" in sink_row.inner_text(), sink_row.inner_text()
    assert_clean(page, "dashboard-data")
    page.emulate_media(color_scheme="dark")
    assert axe(page) == [], "dashboard in dark mode"
    shot(page, "dashboard-e1-dark")


# -- the log ------------------------------------------------------------------------------
def test_statuses_read_in_the_page_language(mail: AdminServer) -> None:
    """French pages say "échoué", "envoyé"; the filter's values and the URLs stay the
    store's tokens, so a link works whatever the language."""
    c, _ = signed_in(mail, *ADMIN)
    with contextlib.closing(c):
        fr = {"Accept-Language": "fr"}
        r = c.get("/admin/log", params={"status": "failed"}, headers=fr)
        assert r.status_code == 200
        assert '<option value="failed" selected>échoué</option>' in r.text
        assert re.search(r'class="badge s-failed fail">échoué</span>', r.text), r.text
        assert ">failed<" not in r.text
        sent = c.get("/admin/log", params={"status": "sent"}, headers=fr).text
        assert 'class="badge s-sent ok">envoyé</span>' in sent
        english = c.get("/admin/log", params={"status": "failed"}).text
        assert 'class="badge s-failed fail">failed</span>' in english
        queue = c.get("/admin/queue", headers=fr).text
        assert '<option value="deferred">différé</option>' in queue


def test_log_filters_narrow_the_table(mail: AdminServer, page: Any) -> None:
    login(page, *ADMIN)
    page.goto("/admin/log")
    assert {"welcome 1", "welcome 2", "welcome 3", "bounce me"} <= set(subjects(page))
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Filter", exact=True).click()
    page.wait_for_load_state()
    assert "status=failed" in page.url  # a filtered view is a bookmark
    assert subjects(page) == ["bounce me"]
    page.goto("/admin/log")
    page.get_by_label("Recipient").fill("alice@")
    page.get_by_role("button", name="Filter", exact=True).click()
    page.wait_for_load_state()
    assert sorted(subjects(page)) == ["welcome 1", "welcome 2", "welcome 3"]
    page.get_by_label("Subject or text").fill("welcome 2")
    page.get_by_role("button", name="Filter", exact=True).click()
    page.wait_for_load_state()
    assert subjects(page) == ["welcome 2"]
    assert "1 message(s) match" in page.locator("#log-count").inner_text()
    page.goto("/admin/log")
    assert_clean(page, "log")
    page.emulate_media(color_scheme="dark")
    assert axe(page) == [], "log in dark mode"
    shot(page, "log-dark")


def lines(cell: Any) -> int:
    """How many lines a cell's text takes as rendered."""
    return int(cell.evaluate(
        "el => { const r = document.createRange(); r.selectNodeContents(el);"
        " return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size; }"))


def on_screen(cell: Any, width: int) -> bool:
    box = cell.bounding_box()
    return bool(box) and box["x"] >= 0 and box["x"] + box["width"] <= width


def test_the_log_on_a_phone_reads_as_cards(mail: AdminServer, page: Any) -> None:
    """At 360 px the filter is folded (the results come first) and each message is a card:
    status, time, subject, sender and recipient all on the screen, nothing sideways."""
    login(page, *ADMIN)
    page.set_viewport_size(PHONE)
    page.goto("/admin/log")
    assert page.locator("details.filters").get_attribute("open") is None
    assert not page.get_by_label("Recipient").is_visible()
    first = page.locator("#rows tr:not(.live) td.c-main").first.bounding_box()
    assert first and first["y"] + first["height"] <= PHONE["height"], first
    row = page.locator("#rows tr", has_text="bounce me")
    for cell in ("c-status", "c-when", "c-main", "c-addr", "c-to", "c-meta"):
        assert on_screen(row.locator(f"td.{cell}").first, PHONE["width"]), cell
    assert no_horizontal_scroll(page)
    # The header row is hidden, but "select all" stays, with its words, and works.
    header = page.locator("table.log thead th", has_text="Subject").bounding_box()
    assert header and header["width"] <= 1  # visually hidden, still read out
    page.get_by_text("Select all on this page").click()
    assert page.locator("#rows input[type=checkbox]:not(:checked)").count() == 0
    row.get_by_role("checkbox").uncheck()
    assert page.locator("#rows input[type=checkbox]:checked").count() \
        == page.locator("#rows input[type=checkbox]").count() - 1
    # Unfold, filter: the answer comes back with the filter open, saying what is in use,
    # and the rarely used fields still folded.
    page.locator("details.filters > summary").click()
    page.get_by_label("Recipient").fill("nobody@")
    page.get_by_role("button", name="Filter", exact=True).click()
    page.wait_for_load_state()
    assert subjects(page) == ["bounce me"]
    assert page.locator("details.filters").get_attribute("open") == ""
    assert "(1 in use)" in page.locator("details.filters > summary").inner_text()
    assert not page.get_by_label("Sender").is_visible()
    page.goto("/admin/log?sender=shop%40example.org")
    assert page.get_by_label("Sender").is_visible()  # a rarer filter in use: shown
    assert axe(page) == []
    page.emulate_media(color_scheme="dark")
    assert axe(page) == [], "log cards in dark mode"
    page.emulate_media(color_scheme="light")
    shot(page, "log-filtered")


def test_the_log_on_a_desktop_keeps_columns_and_whole_addresses(mail: AdminServer,
                                                                 page: Any) -> None:
    login(page, *ADMIN)
    page.set_viewport_size(DESKTOP)
    page.goto("/admin/log")
    # Wide screens show every filter field without unfolding anything.
    assert page.get_by_label("Recipient").is_visible() and page.get_by_label("Tag").is_visible()
    assert page.locator("table.log thead th", has_text="Subject").is_visible()
    row = page.locator("#rows tr", has_text="bounce me")
    assert lines(row.locator("td.c-addr").first) == 1  # shop@example.org, not "examp le"
    assert lines(row.locator("td.c-to")) == 1
    assert "shop@<wbr>example<wbr>.org" in row.locator("td.c-addr").first.inner_html()


def test_addresses_break_only_where_markup_allows_and_stay_escaped() -> None:
    from postroom.web.i18n import Language
    from postroom.web.render import environment

    cells = environment(Language.EN).get_template("log/_cells.html").module
    assert str(cells.address("a.b@c.d, e@f")) == "a<wbr>.b@<wbr>c<wbr>.d, e@<wbr>f"
    hostile = str(cells.address('<script>x</script>"@<img src=x onerror=y>.org'))
    assert "<script" not in hostile and "<img" not in hostile
    assert hostile == ("&lt;script&gt;x&lt;/script&gt;&#34;@<wbr>&lt;img src=x "
                       "onerror=y&gt;<wbr>.org")
    assert str(cells.address(None)) == ""
    assert str(cells.stamp("2026-12-07 05:41 UTC")) == (
        '<span class="nowrap">2026-12-07</span> <span class="nowrap">05:41 UTC</span>')


def test_a_new_message_appears_without_reload(mail: AdminServer, page: Any) -> None:
    login(page, *ADMIN)
    page.goto("/admin/log")
    page.evaluate("window.__same_page = true")  # gone if the page reloads
    send(mail, "live@example.net", "arrived live")
    page.locator("#rows tr", has_text="arrived live").wait_for(timeout=20_000)
    assert page.evaluate("window.__same_page === true")


def test_bulk_retry_of_a_filter_confirms_the_count(mail: AdminServer, page: Any) -> None:
    login(page, *ADMIN)
    page.goto("/admin/log?status=failed")
    page.get_by_label("Action").select_option("retry")
    page.get_by_role("button", name="Apply to all 1 matching").click()
    page.wait_for_load_state()
    assert "1 message(s)" in page.locator("#confirm-count").inner_text()
    assert "status=failed" in page.locator("main").inner_text()
    assert_clean(page, "log-confirm")
    before = db_one(mail, "SELECT count(*) FROM attempts a JOIN messages m ON "
                    "a.message_id = m.id WHERE m.subject = 'bounce me'")
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()
    assert "1 message(s) due again now" in page.locator(".notice").inner_text()
    # The retry really ran: one more attempt, refused again by the upstream.
    wait_for(lambda: db_one(mail, "SELECT count(*) FROM attempts a JOIN messages m ON "
                            "a.message_id = m.id WHERE m.subject = 'bounce me'") > before
             and status_of(mail, "bounce me") == "failed", "the retried message tried again")
    detail = db_one(mail, "SELECT detail FROM audit WHERE action = 'message.retry' "
                    "ORDER BY id DESC LIMIT 1")
    assert json.loads(detail)["filter"] == "status=failed" and json.loads(detail)["done"] == 1


def test_select_rows_then_resend(mail: AdminServer, page: Any, sink: Sink) -> None:
    login(page, *ADMIN)
    page.goto("/admin/log?to=alice")
    page.get_by_label("Select all on this page").check()
    assert page.locator("#rows input[type=checkbox]:checked").count() == 3
    page.get_by_label("Action").select_option("resend")
    arrived = sink.count()
    page.get_by_role("button", name="Apply to the selected").click()
    page.wait_for_load_state()
    assert "3 message(s)" in page.locator("#confirm-count").inner_text()
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_load_state()
    assert "3 copy(ies) queued" in page.locator(".notice").inner_text()
    assert sink.wait_count(arrived + 3, WAIT) >= arrived + 3


def test_export_csv_downloads_the_filter(mail: AdminServer, page: Any) -> None:
    login(page, *ADMIN)
    page.goto("/admin/log?text=welcome+1")
    with page.expect_download() as info:
        page.get_by_role("link", name="Export CSV").click()
    rows = list(csv.DictReader(io.StringIO(info.value.path().read_text())))
    # "welcome 1" and its resent copy.
    assert [r["subject"] for r in rows] == ["welcome 1", "welcome 1"]
    assert {r["recipients"] for r in rows} == {GOOD}
    detail = db_one(mail, "SELECT detail FROM audit WHERE action = 'message.export' "
                    "ORDER BY id DESC LIMIT 1")
    assert json.loads(detail) == {"filter": "text=welcome+1", "format": "csv"}


# -- the queue ----------------------------------------------------------------------------
def test_pause_holds_mail_and_resume_sends_it(mail: AdminServer, page: Any,
                                              sink: Sink) -> None:
    login(page, *ADMIN)
    page.goto("/admin/queue")
    page.get_by_role("button", name="Pause the queue").click()
    page.wait_for_load_state()
    assert "paused" in page.locator("#queue-state").inner_text()
    try:
        time.sleep(2)  # every worker reads the switch within about a second
        send(mail, GOOD, "held while paused")
        time.sleep(3)  # workers poll every 0.2 s: well past when it would have gone
        assert status_of(mail, "held while paused") == "queued"
        page.goto("/admin/queue")
        assert page.locator("tbody tr", has_text="held while paused").count() == 1
        assert_clean(page, "queue")
        page.set_viewport_size(PHONE)  # a card: what and to whom on the screen, and the button
        held = page.locator("tbody tr", has_text="held while paused")
        for cell in ("c-status", "c-main", "c-to", "c-meta"):
            assert on_screen(held.locator(f"td.{cell}").first, PHONE["width"]), cell
        assert held.get_by_role("button", name="Retry now").is_visible()
        page.emulate_media(color_scheme="dark")
        assert axe(page) == [], "queue cards in dark mode"
        shot(page, "queue-dark")
        page.emulate_media(color_scheme="light")
        page.set_viewport_size(DESKTOP)
    finally:
        page.goto("/admin/queue")
        page.get_by_role("button", name="Resume the queue").click()
        page.wait_for_load_state()
    wait_for(lambda: status_of(mail, "held while paused") == "sent", "sent after resume")
    # One connection: paused and resumed from its switch.
    page.get_by_role("button", name="Pause spare").click()
    page.wait_for_load_state()
    assert "Connection spare paused" in page.locator(".notice").inner_text()
    paused = db_one(mail, "SELECT paused FROM connection_state WHERE name = 'spare'")
    assert paused
    page.get_by_role("button", name="Resume spare").click()
    page.wait_for_load_state()
    assert not db_one(mail, "SELECT paused FROM connection_state WHERE name = 'spare'")
    actions = [r[0] for r in db_rows(mail, "SELECT action FROM audit WHERE action LIKE "
                                     "'queue.%' OR action LIKE 'connection.%' ORDER BY id")]
    assert actions[-4:] == ["queue.pause", "queue.resume", "connection.pause",
                            "connection.resume"]


# -- viewers and the JSON side --------------------------------------------------------------
def test_a_viewer_sees_no_controls_and_every_change_is_refused(mail: AdminServer,
                                                                page: Any) -> None:
    c, csrf = signed_in(mail, *VIEWER)
    with contextlib.closing(c):
        log = c.get("/admin/log")
        assert log.status_code == 200 and "bounce me" in log.text
        assert "Apply to" not in log.text and 'type="checkbox"' not in log.text
        assert "format=eml" not in log.text  # bodies: admins only by default
        queue = c.get("/admin/queue")
        assert "Pause the queue" not in queue.text and "Pause sink" not in queue.text
        form = {"csrf": csrf, "action": "delete", "scope": "filter", "confirm": "1"}
        for url, data in (("/admin/log/bulk", form), ("/admin/queue/pause", {"csrf": csrf}),
                          ("/admin/queue/resume", {"csrf": csrf}),
                          ("/admin/queue/retry", {"csrf": csrf, "all": "deferred"}),
                          ("/admin/queue/connections/sink/pause", {"csrf": csrf})):
            r = c.post(url, data=data)
            assert r.status_code == 403, (url, r.status_code)
        assert c.get("/admin/log/export?format=eml").status_code == 403
        h = {"X-CSRF-Token": csrf}
        for url, body in (("/api/v1/admin/log/bulk", {"action": "delete", "filter": {}}),
                          ("/api/v1/admin/queue/pause", None),
                          ("/api/v1/admin/connections/sink/pause", None)):
            r = c.post(url, json=body, headers=h)
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin.role", url
        r = c.get("/api/v1/admin/log/export?format=eml")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin.forbidden"
        assert c.get("/api/v1/admin/log/export?format=csv").status_code == 200
    # Nothing changed: every message still there, the queue running.
    assert db_one(mail, "SELECT count(*) FROM messages WHERE subject = 'bounce me'") == 1
    assert db_one(mail, "SELECT value FROM control WHERE name = 'queue_paused'") in (None, "0")
    login(page, *VIEWER)
    page.goto("/admin/log")
    shot(page, "log-viewer")


def test_json_endpoints(mail: AdminServer) -> None:
    with http(mail) as anon:
        r = anon.get("/api/v1/admin/log")
        assert r.status_code == 401 and r.json()["error"]["code"] == "admin.unauthenticated"
    token = admin_token(mail)
    with http(mail, headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.get("/api/v1/admin/log", params={"status": "failed"})
        assert r.status_code == 200, r.text
        assert [m["subject"] for m in r.json()["messages"]] == ["bounce me"]
        first = c.get("/api/v1/admin/log", params={"limit": 2}).json()
        second = c.get("/api/v1/admin/log", params={"limit": 2, "before": first["next"]}).json()
        assert not {m["id"] for m in first["messages"]} & {m["id"] for m in second["messages"]}
        assert c.get("/api/v1/admin/log/count", params={"to": "alice"}).json() == {
            "count": 7, "capped": False}  # 3, 3 resent copies, the one held while paused
        assert c.get("/api/v1/admin/log", params={"status": "nope"}).status_code == 422
        assert c.get("/api/v1/admin/log", params={"before": "x"}).json()["error"]["code"] \
            == "log.cursor"
        failed = c.get("/api/v1/admin/log", params={"status": "failed"}) \
            .json()["messages"][0]["id"]
        dash = c.get("/api/v1/admin/dashboard").json()
        assert dash["windows"]["24h"]["failed"] >= 1 and len(dash["series"]) >= 24
        assert dash["failures"][0]["id"] == failed
        assert "does not exist" in dash["failures"][0]["advice"]["cause"]
        assert {x["name"] for x in dash["connections"]} == {"sink", "spare"}
        r = c.post("/api/v1/admin/log/bulk", json={"action": "retry", "ids": [failed]})
        assert r.status_code == 200 and r.json()["done"] == 1, r.text
        r = c.post("/api/v1/admin/log/bulk", json={"action": "retry"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "bulk.target"
        assert c.get("/api/v1/admin/queue").json()["paused"] is False
        r = c.post("/api/v1/admin/connections/nosuch/pause")
        assert r.status_code == 404, r.text
        assert c.post("/api/v1/admin/queue/pause").json() == {"paused": True,
                                                              "connection": None}
        assert c.get("/api/v1/admin/queue").json()["paused"] is True
        assert c.post("/api/v1/admin/queue/resume").json()["paused"] is False
        eml = c.get("/api/v1/admin/log/export", params={"format": "eml", "text": "welcome 2"})
        assert eml.status_code == 200
        import zipfile

        with zipfile.ZipFile(io.BytesIO(eml.content)) as zf:
            names = zf.namelist()
            assert len(names) == 2 and b"Subject: welcome 2" in zf.read(names[0])
        paths = c.get("/api/v1/openapi.json").json()["paths"]
        for p in ("/api/v1/admin/log", "/api/v1/admin/log/bulk", "/api/v1/admin/queue/pause",
                  "/api/v1/admin/connections/{name}/pause", "/api/v1/admin/dashboard"):
            assert p in paths, p


# -- a big log (last: it adds 10,000 rows) ---------------------------------------------------
def test_a_10000_message_log_still_pages_and_counts(mail: AdminServer) -> None:
    now = time.time()
    rows = [(uuid.uuid4().hex, now - 86400 + i, now - 86400 + i, "sent", now, now + 86400, 1,
             "bulk@example.org", json.dumps([f"r{i}@example.net"]),
             json.dumps({f"r{i}@example.net": {"state": "delivered"}}), "test:bulk",
             f"<{i}@bulk>", f"bulk {i}", "bulk@example.org", f"r{i}@example.net", 100, 0)
            for i in range(10_000)]
    with sqlite3.connect(mail.proc.db, timeout=30) as db:
        db.executemany(
            "INSERT INTO messages (id, created_at, updated_at, status, next_attempt_at, "
            "expires_at, attempt_count, sender, recipients, rcpt_status, source, message_id, "
            "subject, from_header, to_header, size, priority) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    c, _csrf = signed_in(mail, *ADMIN)
    with contextlib.closing(c):
        started = time.monotonic()
        r = c.get("/admin/log")
        took = time.monotonic() - started
        assert r.status_code == 200
        assert "More than 10,000 messages match" in r.text
        assert took < 10, f"the first page of a 10,000-row log took {took:.1f} s"
        older = re.search(r'href="/admin/log\?(before=[^"]+)"', r.text)
        assert older
        assert c.get("/admin/log?" + older.group(1).replace("&amp;", "&")).status_code == 200
        r = c.get("/admin/log?text=bulk+9999")
        assert "1 message(s) match" in r.text and "bulk 9999" in r.text
