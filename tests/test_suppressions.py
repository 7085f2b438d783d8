"""The suppression list (issue 14 part 3): what delivery events add to it, the delivery-time
check and the ``suppressed`` status (on SQLite and PostgreSQL), the administrator's actions
and their role checks, `postroom suppressions ...` in a subprocess, and
``/api/v1/admin/suppressions`` on a real `postroom serve` with admin and viewer tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
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
    login,
    signed_in,
)
from queue_helpers import FakeClock, envelope, run
from sqlalchemy import Engine, select

from postroom import audit
from postroom.audit import Actor, ActorKind, Role
from postroom.exceptions import ConfigError, MessageError, PermissionDenied
from postroom.ops import suppressions as ops
from postroom.queue.lease import Claimed
from postroom.queue.sql import Queue
from postroom.queue.worker import decide
from postroom.settings import DeliverySettings, load
from postroom.store.db import write_transaction
from postroom.store.log import LogFilter
from postroom.store.schema import PARTIAL, SUPPRESSED, messages
from postroom.suppression import (
    CHECK_CHUNK,
    GLOBAL,
    Source,
    Suppressions,
    SuppressionSettings,
    all_suppressed,
    decode_cursor,
    encode_cursor,
    normalise,
    note_event,
    summary,
)

ADMIN_ACTOR = Actor(kind=ActorKind.CLI.value, name="tester", role=Role.ADMIN)
VIEWER_ACTOR = Actor(kind=ActorKind.TOKEN.value, name="watcher", role=Role.VIEWER)


@dataclass(frozen=True)
class Event:
    """The fields of postroom.webhooks.DeliveryEvent that the list reads."""

    kind: str
    recipient: str | None
    detail: str = ""
    permanent: bool | None = None


# -- addresses ---------------------------------------------------------------------------------
def test_addresses_are_kept_lower_cased_with_an_a_label_domain() -> None:
    assert normalise(" Bob@Example.COM ") == "bob@example.com"
    assert normalise("Anna@Bücher.de") == "anna@xn--bcher-kva.de"
    assert normalise("anna@xn--bcher-kva.de") == "anna@xn--bcher-kva.de"
    for bad in ("", "no-at-sign", "a@", "@b.example", "a b@c.example", "x@-bad-.example"):
        with pytest.raises(MessageError) as err:
            normalise(bad)
        assert err.value.code == "suppression.address"
        assert "user@example.com" in err.value.message


def test_a_cursor_round_trips_and_garbage_is_refused() -> None:
    cur = (1_800_000_000.5, "a@b.example", "*")
    assert decode_cursor(encode_cursor(cur)) == cur
    for junk in ("", "!!!", encode_cursor((1.0, "a", "b"))[:-3] + "zz", "e30"):
        with pytest.raises(MessageError):
            decode_cursor(junk)


# -- the list in the database (SQLite and PostgreSQL) -----------------------------------------
def test_add_check_remove_with_scopes(engine: Engine) -> None:
    sup = Suppressions(engine)
    assert sup.add("Dead@Example.net", GLOBAL, "hard bounce", Source.BOUNCE) is not None
    assert sup.add("dead@example.net", "*", "again") is None  # listed already: kept as it was
    assert sup.add("spam@example.net", "Shop.Example.com", "complaint", Source.COMPLAINT)
    assert sup.add("anna@bücher.de", "shop.example.com", "manual") is not None

    got = sup.check("app@shop.example.com",
                    ["DEAD@example.net", "spam@example.net", "anna@xn--bcher-kva.de", "ok@x.io"])
    assert got == {"DEAD@example.net": "hard bounce",
                   "spam@example.net": "complaint [shop.example.com]",
                   "anna@xn--bcher-kva.de": "manual [shop.example.com]"}
    # Another sender domain: only the global entry holds; the null sender likewise.
    assert sup.check("app@news.example.com", ["dead@example.net", "spam@example.net"]) == {
        "dead@example.net": "hard bounce"}
    assert sup.check("", ["spam@example.net", "dead@example.net"]) == {
        "dead@example.net": "hard bounce"}
    # Both scopes listed: the global entry's reason is the one given.
    sup.add("dead@example.net", "shop.example.com", "domain reason")
    assert sup.check("a@shop.example.com", ["dead@example.net"]) == {
        "dead@example.net": "hard bounce"}

    assert sup.remove("dead@example.net", "other.example") == 0
    assert sup.remove("DEAD@example.net", GLOBAL) == 1
    assert sup.check("a@shop.example.com", ["dead@example.net"]) == {
        "dead@example.net": "domain reason [shop.example.com]"}
    assert sup.remove("spam@example.net", None) == 1
    assert sup.count() == 2
    disabled = Suppressions(engine, SuppressionSettings(enabled=False))
    assert disabled.check("a@shop.example.com", ["dead@example.net"]) == {}


def test_check_many_recipients_and_list_pages(engine: Engine) -> None:
    sup = Suppressions(engine)
    every = [f"user{i}@example.org" for i in range(CHECK_CHUNK * 2 + 7)]
    listed = every[::3]
    assert sup.add_many([(a, GLOBAL) for a in listed], reason="import") == len(listed)
    assert sup.add_many([(a, GLOBAL) for a in listed[:5]], reason="again") == 0
    found = sup.check("a@b.example", every)
    assert sorted(found) == sorted(listed)
    # One import shares its created_at: the cursor still walks every row once.
    seen: list[str] = []
    after = None
    for _ in range(100):
        page = sup.list(limit=97, after=after)
        if not page:
            break
        seen += [e.address for e in page]
        after = page[-1].cursor
    assert sorted(seen) == sorted(listed)
    assert [e.address for e in sup.list(contains="USER3", limit=5)] == [
        e.address for e in sup.list(limit=1000) if "user3" in e.address][:5]
    assert sup.list(contains="50%_") == []  # LIKE wildcards are taken literally
    assert sup.list(source="manual") == []


def test_check_queries_only_for_listed_addresses_and_sees_other_processes(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker asks before every delivery: an address on no list costs no query; an
    entry another process adds is seen once the stamp is read again (REFRESH seconds)."""
    from sqlalchemy import event

    import postroom.suppression as module

    worker, other = Suppressions(engine), Suppressions(engine)
    other.add("dead@example.org", reason="5.1.1")
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert worker.check("shop@example.com", ["dead@example.org", "bob@example.org"]) == {
            "dead@example.org": "5.1.1"}
        statements.clear()
        for _ in range(20):  # within REFRESH: nothing listed among them, no query at all
            assert worker.check("shop@example.com", ["bob@example.org"]) == {}
        assert statements == []
        # The worker's shortcut (no thread hop) answers from memory only.
        assert worker.clear_now(["bob@example.org"]) and not worker.clear_now(
            ["DEAD@example.org"]) and statements == []
        other.add("late@example.org", reason="complaint")
        monkeypatch.setattr(module, "REFRESH", 0.0)
        assert worker.check("shop@example.com", ["late@example.org"]) == {
            "late@example.org": "complaint"}
        other.remove("late@example.org")
        assert worker.check("shop@example.com", ["late@example.org"]) == {}
        # Over MEMORY_MAX the list is not held: every check asks the database.
        monkeypatch.setattr(module, "MEMORY_MAX", 0)
        worker._forget()
        assert worker.check("shop@example.com", ["dead@example.org"]) == {
            "dead@example.org": "5.1.1"}
    finally:
        event.remove(engine, "before_cursor_execute", seen)


# -- delivery events ---------------------------------------------------------------------------
def test_which_events_suppress(engine: Engine) -> None:
    sup = Suppressions(engine)
    sender = "news@Shop.Example.com"

    def note(ev: Event) -> Any:
        return sup.note_event("postmark", ev, sender, "m1")

    hard = note(Event("bounced", "Gone@Example.net", "550 5.1.1 no such user", True))
    assert hard is not None and (hard.address, hard.scope, hard.source) == (
        "gone@example.net", "shop.example.com", "bounce")
    assert "postmark" in hard.reason and hard.message_id == "m1"
    assert note(Event("bounced", "gone@example.net", "again", True)) is None  # listed already
    assert note(Event("bounced", "soft@example.net", "452 4.2.2 mailbox full", False)) is None
    assert note(Event("deferred", "later@example.net", "451 4.7.1 greylisted")) is None
    # The provider did not say: the enhanced status code decides (RFC 3463 class 5 only).
    assert note(Event("bounced", "unsaid@example.net", "smtp; 550 5.1.1 unknown")) is not None
    assert note(Event("bounced", "unsaid4@example.net", "smtp; 450 4.1.1 try later")) is None
    assert note(Event("bounced", "ip@example.net", "host 10.5.1.1 timed out")) is None
    assert note(Event("rejected", "bad@example.net", "invalid address", True)) is not None
    assert note(Event("rejected", "policy@example.net", "sending paused", False)) is None
    spam = note(Event("complained", "angry@example.net", "abuse report"))
    assert spam is not None and spam.source == "complaint"
    assert note(Event("unsubscribed", "bye@example.net")) is None  # not unless configured
    for kind in ("delivered", "opened", "clicked", "queued", "unknown"):
        assert note(Event(kind, "fine@example.net", "", True)) is None
    assert note(Event("bounced", None, "no recipient", True)) is None
    assert note(Event("bounced", "not an address", "x", True)) is None
    assert set(sup.check("a@shop.example.com", [
        "gone@example.net", "unsaid@example.net", "bad@example.net", "angry@example.net",
        "soft@example.net", "bye@example.net", "fine@example.net"])) == {
        "gone@example.net", "unsaid@example.net", "bad@example.net", "angry@example.net"}
    assert sup.check("a@other.example", ["gone@example.net"]) == {}  # scoped to the sender


def test_event_settings_global_scope_unsubscribes_and_the_intake_transaction(
        engine: Engine) -> None:
    cfg = SuppressionSettings(scope="global", suppress=["complained", "unsubscribed"])
    with write_transaction(engine) as conn:  # as the webhook intake calls it
        added = note_event(conn, Event("unsubscribed", "Bye@Example.net"), "a@shop.example",
                           connection="mailgun", config=cfg)
        assert added is not None and added.scope == GLOBAL and added.source == "unsubscribe"
        assert note_event(conn, Event("bounced", "x@example.net", "5.1.1", True), None,
                          config=cfg) is None  # bounces not listed in this configuration
    assert Suppressions(engine).check("z@any.example", ["bye@example.net"])
    off = SuppressionSettings(enabled=False)
    assert note_event(engine, Event("complained", "c@example.net"), None, config=off) is None
    with pytest.raises(ValueError):
        SuppressionSettings.model_validate({"scope": "tenant"})
    with pytest.raises(ValueError):
        SuppressionSettings.model_validate({"suppress": ["opened"]})


def test_the_section_is_read_from_postroom_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[suppression]\nscope = "global"\nsuppress = ["complained"]\n')
    s = load(cfg, environ={})
    assert s.section(SuppressionSettings).scope == "global"
    assert s.section(SuppressionSettings).suppress == ["complained"]
    cfg.write_text('[suppression]\nscope = "everyone"\n')
    with pytest.raises(ConfigError) as err:
        load(cfg, environ={})
    assert "scope" in err.value.message
    cfg.write_text("")
    assert load(cfg, environ={}).section(SuppressionSettings).scope == "sender_domain"


# -- before each delivery: the worker's part ---------------------------------------------------
def deliver(queue: Queue, sup: Suppressions, msg: Claimed, sent: set[str], now: float) -> str:
    """What Worker._deliver does with the list (the lines the report gives the lead): the
    suppressed recipients leave RCPT TO; the others get ``sent``'s results here."""
    from postroom.transports.base import RecipientResult

    to_send, blocked = sup.apply(msg.sender, msg.pending, msg.rcpt_status)
    results = {r: RecipientResult(250 if r in sent else 550, "ok" if r in sent else "no")
               for r in to_send}
    d = decide(msg, results, now, DeliverySettings())
    if blocked:
        if all_suppressed(msg.rcpt_status, msg.recipients):
            d.status = d.outcome = SUPPRESSED
        d.last_error = "; ".join(x for x in (d.last_error, summary(blocked)) if x)
    assert run(queue, lambda: queue.finish(msg, status=d.status,
                                           next_attempt_at=d.next_attempt_at,
                                           last_error=d.last_error, attempts=[]))
    return d.status


def test_a_message_to_suppressed_recipients_only_is_never_sent(
        engine: Engine, queue: Queue, clock: FakeClock) -> None:
    sup = Suppressions(engine)
    sup.add("gone@example.net", GLOBAL, "hard bounce (postmark): 550 5.1.1", Source.BOUNCE)
    sup.add("angry@example.net", "example.org", "complaint", Source.COMPLAINT)
    whole = run(queue, lambda: queue.enqueue(envelope("Gone@example.net", "angry@example.net")))
    part = run(queue, lambda: queue.enqueue(envelope("gone@example.net", "ok@example.net")))
    claimed = {m.id: m for m in run(queue, lambda: queue.claim("w", 10, 60))}

    msg = claimed[whole]
    assert deliver(queue, sup, msg, set(), clock()) == SUPPRESSED
    assert msg.rcpt_status["Gone@example.net"]["state"] == "suppressed"
    assert "hard bounce" in msg.rcpt_status["Gone@example.net"]["reply"]
    assert deliver(queue, sup, claimed[part], {"ok@example.net"}, clock()) == PARTIAL

    log = queue.log
    rows = log.page(LogFilter(status=SUPPRESSED))
    assert [r["id"] for r in rows] == [whole]
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == whole)).one()
    assert row.attempt_count == 0 and "suppressed (hard bounce" in row.last_error
    assert row.rcpt_status["angry@example.net"]["state"] == "suppressed"
    # The rollups count it (migration 0014's triggers), like any finished message.
    assert log.counts().get(SUPPRESSED) == 1
    assert log.summary(clock() - 3600)[SUPPRESSED] == 1
    assert not all_suppressed({}, [])


def test_migration_0014_down_and_up(engine: Engine, queue: Queue) -> None:
    """Down to 0013 (the table goes, the rollups forget the status, their triggers watch
    the three older statuses again) and up again (the messages left with the status are
    counted again, and the triggers watch it once more)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect, update

    from postroom.store.direct import MIGRATIONS

    def to(revision: str, down: bool) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)

    Suppressions(engine).add("a@example.net")
    made = [run(queue, lambda: queue.enqueue(envelope("a@example.net"))) for _ in range(2)]

    def finish(msg_id: str) -> None:
        with engine.begin() as conn:
            conn.execute(update(messages).where(messages.c.id == msg_id)
                         .values(status=SUPPRESSED))

    finish(made[0])
    assert queue.log.counts().get(SUPPRESSED) == 1
    to("0013", down=True)
    assert not inspect(engine).has_table("suppressions")
    assert queue.log.counts().get(SUPPRESSED) is None
    finish(made[1])  # the older triggers do not count it
    assert queue.log.counts().get(SUPPRESSED) is None
    to("head", down=False)
    assert Suppressions(engine).count() == 0
    assert queue.log.counts().get(SUPPRESSED) == 2  # counted again by the upgrade
    with engine.begin() as conn:
        conn.execute(update(messages).where(messages.c.id == made[1]).values(status="failed"))
    assert queue.log.counts() == {SUPPRESSED: 1, "failed": 1}


# -- the administrator's actions ---------------------------------------------------------------
@pytest.fixture
def inst(tmp_path: Path) -> Any:
    from postroom.runtime import Instance

    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n')
    made = Instance(load(cfg, environ={}))
    yield made
    made.close()


def test_roles_audit_and_refusals(inst: Any) -> None:
    added = ops.add_entry(inst, ADMIN_ACTOR, "Someone@Example.com", "*", "asked to stop")
    assert added.address == "someone@example.com" and added.source == "manual"
    with pytest.raises(MessageError) as err:
        ops.add_entry(inst, ADMIN_ACTOR, "someone@example.com")
    assert err.value.code == "suppression.exists" and "remove it first" in err.value.message
    assert [e.address for e in ops.list_entries(inst, VIEWER_ACTOR)] == ["someone@example.com"]
    for action in (lambda: ops.add_entry(inst, VIEWER_ACTOR, "x@example.com"),
                   lambda: ops.remove_entry(inst, VIEWER_ACTOR, "someone@example.com"),
                   lambda: ops.import_entries(inst, VIEWER_ACTOR, b"x@example.com\n")):
        with pytest.raises(PermissionDenied) as denied:
            action()
        assert "admin role" in denied.value.message
    with pytest.raises(MessageError) as err:
        ops.remove_entry(inst, ADMIN_ACTOR, "nobody@example.com")
    assert err.value.code == "suppression.unknown"
    with pytest.raises(MessageError):
        ops.list_entries(inst, VIEWER_ACTOR, source="rumour")
    assert ops.remove_entry(inst, ADMIN_ACTOR, "someone@example.com", None) == 1
    actions = [r["action"] for r in audit.read(inst.engine, action="suppression")]
    assert actions == ["suppression.remove", "suppression.add"]


def test_import_reads_csv_and_plain_lines_and_names_bad_lines(inst: Any) -> None:
    data = ("\ufeffemail,scope,reason\n"
            "one@example.com\n"
            "Two@Example.com,shop.example.com,old complaint\n"
            "# a comment\n"
            "\n"
            "not an address\n"
            "three@example.com,not a domain!\n"
            "one@example.com\n"
            "four@bücher.de,,from the old system\n").encode()
    done = ops.import_entries(inst, ADMIN_ACTOR, data, reason="legacy list")
    assert (done.added, done.existing, done.bad_lines) == (3, 0, 2)
    assert [n for n, _ in done.errors] == [6, 7]
    assert "not a domain" in done.errors[1][1]
    entries = {e.address: e for e in ops.list_entries(inst, ADMIN_ACTOR)}
    assert entries["two@example.com"].scope == "shop.example.com"
    assert entries["two@example.com"].reason == "old complaint"
    assert entries["one@example.com"].reason == "legacy list"
    assert entries["four@xn--bcher-kva.de"].source == "import"
    again = ops.import_entries(inst, ADMIN_ACTOR, b"one@example.com\nfive@example.com\n")
    assert (again.added, again.existing) == (1, 1)
    bad = b"".join(f"bad line {i}\n".encode() for i in range(ops.MAX_ERRORS + 20))
    many = ops.import_entries(inst, ADMIN_ACTOR, bad)
    assert many.bad_lines == ops.MAX_ERRORS + 20 and len(many.errors) == ops.MAX_ERRORS


def test_import_refuses_a_huge_file_and_one_not_in_utf8(inst: Any) -> None:
    huge = b"a@example.com\n" * (ops.MAX_IMPORT_BYTES // 14 + 1)
    with pytest.raises(MessageError) as err:
        ops.import_entries(inst, ADMIN_ACTOR, huge)
    assert err.value.code == "suppression.import_size"
    assert "split it" in err.value.message
    with pytest.raises(MessageError) as err:
        ops.import_entries(inst, ADMIN_ACTOR, "caf\xe9@example.com\n".encode("latin-1"))
    assert err.value.code == "suppression.import_encoding" and "UTF-8" in err.value.message
    assert ops.list_entries(inst, ADMIN_ACTOR) == []


# -- the command -------------------------------------------------------------------------------
def cli(cfg: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postroom.cli", "suppressions", *args,
                           "--config", str(cfg)], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_the_command(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n[suppression]\nscope = "global"\n')
    out = cli(cfg, "add", "Dead@Example.com", "--reason", "told us")
    assert out.returncode == 0, out.stderr
    assert "dead@example.com suppressed for *" in out.stdout
    out = cli(cfg, "add", "dead@example.com")
    assert out.returncode == 1 and "suppression.exists" in out.stderr
    listing = tmp_path / "list.csv"
    listing.write_text("address,scope\nx@example.com,shop.example.com\nnope\ny@example.com\n")
    out = cli(cfg, "import", str(listing))
    assert out.returncode == 1  # a bad line: the rest is added, the exit status says so
    assert "2 added, 0 listed already, 1 bad line" in out.stdout
    assert "line 3:" in out.stderr
    out = cli(cfg, "import", "-", "--scope", "news.example.com", stdin=b"z@example.com\n")
    assert out.returncode == 0 and "1 added" in out.stdout
    out = cli(cfg, "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["address"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"dead@example.com", "x@example.com", "y@example.com", "z@example.com"}
    assert rows["z@example.com"]["scope"] == "news.example.com"
    out = cli(cfg, "list", "--contains", "dead")
    assert "dead@example.com" in out.stdout and "told us" in out.stdout
    assert "x@example.com" not in out.stdout
    out = cli(cfg, "remove", "x@example.com")
    assert out.returncode == 1 and "suppression.unknown" in out.stderr  # its scope is a domain
    out = cli(cfg, "remove", "x@example.com", "--all-scopes")
    assert out.returncode == 0 and "1 entry" in out.stdout
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as f:
        f.truncate(ops.MAX_IMPORT_BYTES + 1)
    out = cli(cfg, "import", str(huge))
    assert out.returncode == 1 and "suppression.import_size" in out.stderr
    assert "split it" in out.stderr
    out = cli(cfg, "import", str(tmp_path / "missing.csv"))
    assert out.returncode == 1 and "cannot read" in out.stderr
    audit_out = subprocess.run([sys.executable, "-m", "postroom.cli", "audit", "--config",
                                str(cfg), "--action", "suppression"], capture_output=True,
                               text=True, timeout=120, env={"COLUMNS": "200"})
    assert audit_out.stdout.count("suppression.") >= 4, audit_out.stdout + audit_out.stderr


# -- the admin API -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def admin_config() -> str:
    return '[[connections]]\nname = "cap"\ntransport = "capture"\n'


def test_the_admin_api(admin_server: AdminServer) -> None:
    h = {"Authorization": f"Bearer {admin_token(admin_server)}"}
    viewer = {"Authorization": f"Bearer {admin_token(admin_server, VIEWER[0])}"}
    base = admin_server.base + "/api/v1/admin/suppressions"
    with httpx.Client(timeout=30) as c:
        r = c.post(base, json={"address": "Api@Example.com", "reason": "asked"}, headers=h)
        assert r.status_code == 201, r.text
        assert r.json()["address"] == "api@example.com" and r.json()["scope"] == "*"
        r = c.post(base, json={"address": "api@example.com"}, headers=h)
        assert r.status_code == 409 and r.json()["error"]["code"] == "suppression.exists"
        r = c.post(base, json={"address": "not an address"}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "suppression.address"
        r = c.post(base + "/import", params={"scope": "shop.example.com"}, headers={
            **h, "Content-Type": "text/csv"}, content=b"a1@example.com\nbad\na2@example.com\n")
        assert r.status_code == 200, r.text
        assert r.json() == {"added": 2, "existing": 0, "bad_lines": 1, "errors": [
            {"line": 2, "error": r.json()["errors"][0]["error"]}]}
        r = c.post(base + "/import", headers=h,
                   content=b"x@example.com\n" * (ops.MAX_IMPORT_BYTES // 14 + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "suppression.import_size"

        page1 = c.get(base, params={"limit": 2}, headers=viewer)
        assert page1.status_code == 200, page1.text
        assert len(page1.json()["rows"]) == 2 and page1.json()["next_after"]
        page2 = c.get(base, params={"limit": 2, "after": page1.json()["next_after"]},
                      headers=viewer).json()
        addresses = {x["address"] for x in page1.json()["rows"] + page2["rows"]}
        assert addresses == {"api@example.com", "a1@example.com", "a2@example.com"}
        assert page2["next_after"] is None
        assert c.get(base, params={"after": "garbage"}, headers=viewer).status_code == 400
        assert c.get(base, params={"source": "import"}, headers=viewer).json()["rows"][0][
            "source"] == "import"

        # A viewer reads; every change is refused, and nothing changed.
        for method, url, kw in (
                ("POST", base, {"json": {"address": "v@example.com"}}),
                ("DELETE", base + "/api@example.com", {}),
                ("POST", base + "/import", {"content": b"v@example.com\n"})):
            r = c.request(method, url, headers=viewer, **kw)
            assert r.status_code == 403, (method, url, r.text)
            assert r.json()["error"]["code"] == "admin.role"
        assert c.get(base, params={"contains": "v@"}, headers=viewer).json()["rows"] == []
        assert c.get(base).status_code == 401

        r = c.delete(base + "/a1@example.com", headers=h)
        assert r.status_code == 404  # its scope is shop.example.com
        r = c.delete(base + "/a1@example.com", params={"scope": "shop.example.com"}, headers=h)
        assert r.status_code == 204
        assert c.delete(base + "/API@example.com", headers=h).status_code == 204
    # A signed-in session: its changes need the CSRF token, as on every admin endpoint.
    s, csrf = signed_in(admin_server, *VIEWER)
    with closing(s):
        assert s.get("/api/v1/admin/suppressions").status_code == 200
        r = s.post("/api/v1/admin/suppressions", json={"address": "v@example.com"},
                   headers={"X-CSRF-Token": csrf})
        assert r.status_code == 403
    listed = admin_server.proc.cli("suppressions", "list", "--json")
    assert [x["address"] for x in json.loads(listed.stdout)] == ["a2@example.com"]


def test_the_admin_page(page: Any, admin_server: AdminServer) -> None:
    page.on("dialog", lambda d: d.accept())  # the remove button's confirmation
    login(page, *ADMIN)
    page.goto("/admin/suppressions")
    page.get_by_label("Address", exact=True).fill("Page@Example.com")
    page.get_by_label("For", exact=True).fill("shop.example.com")
    page.get_by_label("Reason", exact=True).fill("asked by phone")
    page.get_by_role("button", name="Suppress the address").click()
    assert "page@example.com was added" in page.locator("[role=status]").inner_text()
    row = page.locator("#suppressions-table tr", has_text="page@example.com").inner_text()
    assert "shop.example.com" in row and "asked by phone" in row and "by hand" in row
    admin_server.proc.cli("suppressions", "add", "global@example.com")
    page.goto("/admin/suppressions")
    assert_clean(page, "suppressions-list")
    assert (ARTIFACTS / "suppressions-list-desktop.png").exists()
    # Listed already: the page says so and keeps what was typed.
    page.get_by_label("Address", exact=True).fill("page@example.com")
    page.get_by_label("For", exact=True).fill("shop.example.com")
    page.get_by_role("button", name="Suppress the address").click()
    assert "already" in page.locator("#suppressions-error").inner_text()
    assert page.get_by_label("Address", exact=True).input_value() == "page@example.com"
    page.goto("/admin/suppressions?contains=page%40")
    assert page.locator("#suppressions-table tbody tr").count() == 1
    page.get_by_role("button", name="Remove page@example.com").click()
    assert "was removed" in page.locator("[role=status]").inner_text()
    assert "page@example.com" not in page.locator("main").inner_text().split("was removed")[1]
    # A viewer sees the list, and no form to change it; a forged POST is refused.
    page.context.clear_cookies()
    login(page, *VIEWER)
    page.goto("/admin/suppressions")
    assert "global@example.com" in page.locator("#suppressions-table").inner_text()
    assert page.locator("main form[method=post]").count() == 0
    c, csrf = signed_in(admin_server, *VIEWER)
    with closing(c):
        for url in ("/admin/suppressions", "/admin/suppressions/remove"):
            r = c.post(url, data={"csrf": csrf, "address": "global@example.com", "scope": "*"})
            assert r.status_code == 403, url
    assert "global@example.com" in admin_server.proc.cli("suppressions", "list").stdout.decode()


def test_suppressed_is_a_status_everywhere_statuses_are_listed() -> None:
    from postroom.web.labels import LABELS, Vocabulary

    assert SUPPRESSED in LABELS[Vocabulary.STATUS]
    from postroom.commands._common import STATUS_STYLE
    from postroom.queue.maintenance import FINAL
    from postroom.store.schema import ROLLUP_STATUSES, STATUSES

    assert {SUPPRESSED} <= set(STATUSES) & set(ROLLUP_STATUSES) & set(FINAL) & set(STATUS_STYLE)
