"""Safe upgrades (postroom.store.upgrade, postroom.store.db.migrate): a database made by the
first release of the schema (revision 0001), with mail in every state that schema had,
migrated by today's code — a copy kept before, every message there in its state, the
queued one delivered through the real Postfix; a database of a newer Postroom refused with
both revisions and the fix; two processes migrating at once."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from migration_helpers import migrate_to
from serve_proc import Postroom, smtp_connection

from postroom.store.db import make_engine
from postroom.store.direct import head_revision

# 0001's message states (postroom.store.states then: no "suppressed" yet) and what each
# row's recipients looked like in it.
STATES = {
    "queued": "pending",
    "sending": "pending",
    "deferred": "pending",
    "sent": "sent",
    "partial": None,  # one sent, one failed
    "failed": "failed",
}
INSERT = ("INSERT INTO messages (id, created_at, updated_at, status, next_attempt_at, "
          "expires_at, lease_owner, lease_until, attempt_count, sender, recipients, "
          "rcpt_status, source, connection, message_id, subject, from_header, to_header, "
          "size, raw, last_error) VALUES (:id, :now, :now, :status, :due, :expires, :owner, "
          ":lease, :count, :sender, :recipients, :rcpt_status, 'smtp', NULL, :mid, :subject, "
          ":sender, :to, :size, :raw, :error)")
ATTEMPT = ("INSERT INTO attempts (message_id, connection, started_at, ended_at, outcome, "
           "reply_code, reply_text, error_code, permanent, recipients, transcript) VALUES "
           "(?, 'up', ?, ?, ?, ?, ?, NULL, ?, ?, 'S: 220 ready')")


def database_0001(path: Path, rcpt: str) -> dict[str, str]:
    """A database at revision 0001 with one message in each state; state -> its id. Rows
    are written with that revision's columns only, as its Postroom wrote them."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(f"sqlite:///{path}")
    migrate_to(engine, "0001", up=True)
    engine.dispose()
    now, ids = time.time(), {}
    with sqlite3.connect(path) as con:
        for state, rcpt_state in STATES.items():
            msg_id, subject = uuid.uuid4().hex, f"from 0001 {state} {uuid.uuid4().hex[:8]}"
            other = f"second-{rcpt}"
            recipients = [rcpt] if rcpt_state else [rcpt, other]
            status = ({rcpt: {"state": rcpt_state}} if rcpt_state else
                      {rcpt: {"state": "sent", "code": 250}, other: {"state": "failed",
                                                                     "code": 550}})
            raw = (f"From: app@example.org\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{msg_id}@example.org>\r\n\r\nold mail, {state}\r\n").encode()
            attempted = state not in ("queued", "sending")
            con.execute(INSERT, {
                "id": msg_id, "now": now - 600, "status": state,
                # deferred: due in an hour, so it waits; the others as their state left them
                "due": now + 3600 if state == "deferred" else now - 600,
                "expires": now + 86400, "owner": "old-worker:1" if state == "sending" else None,
                "lease": now + 3600 if state == "sending" else None,
                "count": 1 if attempted else 0, "sender": "app@example.org",
                "recipients": json.dumps(recipients), "rcpt_status": json.dumps(status),
                "mid": f"<{msg_id}@example.org>", "subject": subject, "to": rcpt,
                "size": len(raw), "raw": raw,
                "error": "451 try later" if state == "deferred" else None})
            if attempted:  # 0001's worker wrote the recipients' results as a mapping
                code = 250 if state in ("sent", "partial") else 451 if (
                    state == "deferred") else 550
                results = {r: {"code": v.get("code", code), "reply": "ok" if code == 250
                               else "no", "state": v["state"]} for r, v in status.items()}
                con.execute(ATTEMPT, (msg_id, now - 500, now - 499, state, code,
                                      results[rcpt]["reply"], state == "failed",
                                      json.dumps(results)))
            ids[state] = msg_id
    return ids


def status_of(db: Path, msg_id: str) -> str:
    with sqlite3.connect(db, timeout=30) as con:
        return str(con.execute("SELECT status FROM messages WHERE id = ?", (msg_id,))
                   .fetchone()[0])


def revision(path: Path) -> str:
    with sqlite3.connect(path) as con:
        return str(con.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def test_upgrade_from_0001_keeps_every_message_and_delivers_the_queued_one(
        peers: Any, tmp_path: Path) -> None:
    rcpt = f"upgrade-{uuid.uuid4().hex[:10]}@example.com"
    pr = Postroom(tmp_path / "old", connections=smtp_connection(peers.plain_port))
    ids = database_0001(pr.db, rcpt)

    # The first command of the new version migrates it (in-process; `serve` in a child).
    out = pr.cli("log", "--json", "--limit", "20")
    assert out.returncode == 0, out.stderr.decode()
    assert revision(pr.db) == head_revision()
    copies = list(pr.db.parent.glob("postroom.db.before-0001-*"))
    assert len(copies) == 1 and copies[0].stat().st_mode & 0o777 == 0o600
    assert revision(copies[0]) == "0001"
    logged = {m["id"]: m["status"] for m in map(json.loads, out.stdout.decode().splitlines())}
    assert logged == {msg_id: state for state, msg_id in ids.items()}

    from postroom.store.log import Log

    engine = make_engine(f"sqlite:///{pr.db}")
    try:
        log = Log(engine)
        for state, msg_id in ids.items():
            m = log.get(msg_id)
            assert m is not None and m["status"] == state and m["raw"], state
    finally:
        engine.dispose()
    shown = pr.cli("show", ids["partial"])
    assert shown.returncode == 0 and "partial" in shown.stdout.decode()
    waiting = pr.cli("queue", "list", "--json")
    assert waiting.returncode == 0, waiting.stderr.decode()
    queued = {m["id"]: m["status"] for m in map(json.loads, waiting.stdout.decode().splitlines())}
    assert queued == {ids[s]: s for s in ("queued", "sending", "deferred")}

    with pr:  # a worker delivers the queued one through the real Postfix
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and status_of(pr.db, ids["queued"]) != "sent":
            time.sleep(0.2)
    assert [m for m in peers.messages(rcpt) if "from 0001 queued" in str(m["Subject"])]
    with sqlite3.connect(pr.db) as con:
        states = dict(con.execute("SELECT id, status FROM messages"))
    assert states[ids["queued"]] == "sent"
    assert {states[ids[s]] for s in ("sent", "partial", "failed", "deferred")} == {
        "sent", "partial", "failed", "deferred"}


def test_a_database_of_a_newer_postroom_is_refused(tmp_path: Path) -> None:
    from postroom.store.db import migrate

    pr = Postroom(tmp_path / "newer")
    pr.db.parent.mkdir(mode=0o700)
    engine = make_engine(f"sqlite:///{pr.db}")
    migrate(engine)  # a new database: today's revision, and no copy made
    engine.dispose()
    with sqlite3.connect(pr.db) as con:
        con.execute("UPDATE alembic_version SET version_num = '9001'")
    for command in ("log", "serve"):
        out = pr.cli(command, timeout=120)
        text = out.stderr.decode() + out.stdout.decode()
        assert out.returncode == 1, text
        assert "store.newer" in text and "9001" in text and head_revision() in text, text
        assert "postroom restore" in text and "Traceback" not in text
    assert revision(pr.db) == "9001"  # untouched
    assert not list(pr.db.parent.glob("postroom.db.before-*"))


def test_two_processes_migrating_at_once_end_with_one_schema(tmp_path: Path) -> None:
    db = tmp_path / "data" / "postroom.db"
    ids = database_0001(db, "two@example.com")
    code = ("import sys; from postroom.store.db import make_engine, migrate; "
            "migrate(make_engine(sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}"],
                              stderr=subprocess.PIPE) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert revision(db) == head_revision()
    assert len(list(db.parent.glob("postroom.db.before-0001-*"))) == 1  # one migrated
    with sqlite3.connect(db) as con:
        assert {r[0] for r in con.execute("SELECT id FROM messages")} == set(ids.values())
        assert [r[0] for r in con.execute("PRAGMA integrity_check")] == ["ok"]


def test_only_the_newest_copies_are_kept(tmp_path: Path) -> None:
    from postroom.store import upgrade

    db = tmp_path / "postroom.db"
    for n in range(upgrade.KEEP + 2):
        copy = tmp_path / f"postroom.db.before-000{n}-2026120{n}T000000Z"
        copy.write_bytes(b"")
        os.utime(copy, (1_000_000 + n, 1_000_000 + n))
    upgrade.prune(db)
    assert [p.name[19:23] for p in upgrade.copies(db)] == [
        f"000{n}" for n in range(2, upgrade.KEEP + 2)]
