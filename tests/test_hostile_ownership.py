"""Who owns a message, and what an app may do (issue 11, points 1, 2 and 5's keyed hash).

Against a real `postroom serve` with the real Postfix upstream: apps authenticate over SMTP
(from 127.0.0.2, a remote client, after STARTTLS) and over the HTTP API. Each test checks
the refusal and that a legitimate client is still served.
"""

from __future__ import annotations

import smtplib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from serve_proc import Postroom, smtp_connection
from smtp_raw import TIMEOUT, Raw, auth_plain

from postroom.apps import Apps
from postroom.exceptions import MessageError
from postroom.store.db import make_engine, migrate

pytestmark = [pytest.mark.peers]

RCPT = "testuser@example.test"
REMOTE = "127.0.0.2"


@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    with Postroom(tmp_path_factory.mktemp("ownership"),
                 connections=smtp_connection(peers.plain_port)
                 + smtp_connection(peers.plain_port, name="other")) as p:
        yield p


def send_json(pr: Postroom, key: str, frm: str = "shop@example.com", **extra: Any
              ) -> httpx.Response:
    with pr.api() as c:
        return c.post("/api/v1/messages", headers={"Authorization": f"Bearer {key}"},
                      json={"from": frm, "to": [RCPT], "subject": f"t {uuid.uuid4().hex}",
                            "text": "hello", **extra})


def trusted_send(pr: Postroom) -> str:
    """An unauthenticated message from this machine (source "smtp:trusted"); its id."""
    with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=TIMEOUT) as s:
        s.ehlo()
        s.mail("root@example.org")
        s.rcpt(RCPT)
        code, reply = s.data(b"From: root@example.org\r\nSubject: reset link\r\n\r\n"
                             b"https://example.org/reset?token=secret\r\n")
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def remote_login(pr: Postroom, name: str, secret: str) -> Raw:
    c = Raw(pr.smtp_port, REMOTE)
    c.ehlo()
    c.starttls(pr.cert)
    c.ehlo()
    code, text = c.cmd(auth_plain(name, secret))
    assert code == 235, text
    return c


def smtp_send(c: Raw, frm: str, header_from: str | None = None) -> tuple[int, str]:
    code, text = c.cmd(f"MAIL FROM:<{frm}>")
    if code != 250:
        return code, text
    assert c.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
    return c.data(f"From: {header_from or frm}\r\nSubject: x\r\n\r\nbody\r\n.\r\n".encode())


def column(pr: Postroom, msg_id: str, name: str) -> Any:
    con = sqlite3.connect(f"file:{pr.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        return con.execute(f"SELECT {name} FROM messages WHERE id = ?", (msg_id,)).fetchone()[0]
    finally:
        con.close()


# -- 1. ownership ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trusted", "embedded", "test", "wizard", "resend", "root",
                                  "sendmail", "Trusted"])
def test_door_names_are_reserved(pr: Postroom, name: str) -> None:
    out = pr.cli("app", "add", name)
    assert out.returncode == 1 and b"reserved" in out.stderr, out
    assert b"Traceback" not in out.stderr


def test_an_app_sees_only_what_it_handed_in(pr: Postroom) -> None:
    _, key = pr.add_app_keys("reader")
    secret, other_key = pr.add_app_keys("writer")
    foreign = trusted_send(pr)  # nobody's: "smtp:trusted"
    mine = send_json(pr, key, frm="reader@example.com")
    assert mine.status_code == 202, mine.text
    mine_id = mine.json()["id"]
    with remote_login(pr, "writer", secret) as c:
        code, text = smtp_send(c, "writer@example.com")
    assert code == 250, text
    writer_id = text.rsplit(" ", 1)[1]
    assert column(pr, mine_id, "app") == "reader"
    assert column(pr, writer_id, "app") == "writer"
    assert column(pr, foreign, "app") is None
    auth = {"Authorization": f"Bearer {key}"}
    with pr.api() as c:
        listed = {m["id"] for m in c.get("/api/v1/messages", headers=auth).json()["messages"]}
        assert listed == {mine_id}
        for other in (foreign, writer_id):
            assert c.get(f"/api/v1/messages/{other}", headers=auth).status_code == 404
            assert c.post(f"/api/v1/messages/{other}/resend", headers=auth).status_code == 404
        assert c.get(f"/api/v1/messages/{mine_id}", headers=auth).status_code == 200
        # The other app: its SMTP message, not the API one nor the trusted one.
        other = {"Authorization": f"Bearer {other_key}"}
        listed = {m["id"] for m in c.get("/api/v1/messages", headers=other).json()["messages"]}
        assert listed == {writer_id}


def test_migration_sets_the_owner_only_where_an_app_authenticated(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from postroom.store.direct import MIGRATIONS

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")  # the schema before the owner column
    now = time.time()
    rows = {"a1": "api:shop", "a2": "smtp:crm", "a3": "smtp:trusted", "a4": "python:embedded",
            "a5": "sendmail:www-data", "a6": "cli", "a7": "resend:abc", "a8": "cli:test"}
    with engine.begin() as conn:
        for mid, source in rows.items():
            conn.execute(sa.text(
                "INSERT INTO messages (id, created_at, updated_at, status, next_attempt_at, "
                "expires_at, attempt_count, sender, recipients, rcpt_status, source, "
                "message_id, subject, from_header, to_header, size, priority) VALUES "
                "(:id, :t, :t, 'sent', :t, :t, 0, '', '[]', '{}', :s, '', '', '', '', 0, 0)"),
                {"id": mid, "t": now, "s": source})
    migrate(engine)
    with engine.connect() as conn:
        owners = dict(conn.execute(sa.text("SELECT id, app FROM messages")).all())
    assert owners == {"a1": "shop", "a2": "crm", "a3": None, "a4": None, "a5": None,
                      "a6": None, "a7": None, "a8": None}
    engine.dispose()


# -- 2. app limits, rotation, removal ----------------------------------------------------------
def test_app_limits_on_both_doors(pr: Postroom) -> None:
    out = pr.cli("app", "add", "shop", "--sender", "shop@example.com", "--sender",
                 "mail.example.com", "--connection", "up", "--rate", "4/minute")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    secret = text.split("password ", 1)[1].split()[0]
    key = text.split("Bearer ", 1)[1].split()[0]
    listed = pr.cli("app", "list").stdout.decode()
    assert "shop@example.com" in listed and "4/minute" in listed
    # HTTP: another From, an unallowed connection -> 403 with the fix; allowed -> 202.
    bad = send_json(pr, key, frm="ceo@example.com")
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "app.sender_not_allowed"
    assert "postroom app set shop --sender" in bad.json()["error"]["fix"]
    bad = send_json(pr, key, connection="other")
    assert bad.status_code == 403, bad.text
    assert bad.json()["error"]["code"] == "app.connection_not_allowed"
    assert send_json(pr, key, frm="news@mail.example.com", connection="up").status_code == 202
    with pr.api() as c:
        report = c.get("/api/v1/connections", headers={"Authorization": f"Bearer {key}"}).json()
    assert [x["name"] for x in report["connections"]] == ["up"]
    # SMTP: envelope sender refused at MAIL, a forged From at DATA.
    with remote_login(pr, "shop", secret) as c:
        code, text = smtp_send(c, "ceo@example.com")
        assert code == 550 and "5.7.1" in text, text
        assert c.cmd("RSET")[0] == 250
        code, text = smtp_send(c, "shop@example.com", header_from="CEO <ceo@example.com>")
        assert code == 550 and "ceo@example.com" in text, text
        code, text = smtp_send(c, "shop@example.com")
        assert code == 250, text
        # Rate: 4 per minute, refusals do not count: two used above -> two more, then 451
        # with a time to wait.
        for _ in range(2):
            assert smtp_send(c, "shop@example.com")[0] == 250
        code, text = smtp_send(c, "shop@example.com")
        assert code == 451 and "rate limit" in text, text
    limited = send_json(pr, key)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # Lifting the limits works at once.
    assert pr.cli("app", "set", "shop", "--any-sender", "--no-rate").returncode == 0
    time.sleep(1.1)  # apps.POLICY_TTL
    assert send_json(pr, key, frm="ceo@example.com").status_code == 202


@pytest.mark.parametrize("how", ["rotate", "remove"])
def test_rotated_or_removed_app_stops_an_open_session(pr: Postroom, how: str) -> None:
    name = f"gone-{how}"
    secret, key = pr.add_app_keys(name)
    with remote_login(pr, name, secret) as c:
        assert smtp_send(c, f"{name}@example.com")[0] == 250
        out = pr.cli("app", how, name)
        assert out.returncode == 0, out.stderr
        time.sleep(1.1)  # apps.POLICY_TTL: the server's cached view of the app
        code, text = c.cmd(f"MAIL FROM:<{name}@example.com>")
        assert code == 530 and "removed or rotated" in text, text
        code, text = c.cmd(f"MAIL FROM:<{name}@example.com>")  # no longer logged in
        assert code == 530, text
    assert send_json(pr, key, frm=f"{name}@example.com").status_code == 401
    if how == "rotate":
        new_secret = out.stdout.decode().split("password ", 1)[1].split()[0]
        new_key = out.stdout.decode().split("Bearer ", 1)[1].split()[0]
        assert new_secret != secret
        assert send_json(pr, new_key, frm=f"{name}@example.com").status_code == 202
        with remote_login(pr, name, new_secret) as c:
            assert smtp_send(c, f"{name}@example.com")[0] == 250
    else:
        assert pr.cli("app", "rotate", name).returncode == 1


# -- 5. app secrets: a keyed hash, old argon2 rows still work ----------------------------------
def test_secrets_are_a_keyed_hash_and_old_argon2_rows_are_upgraded(tmp_path: Path) -> None:
    from argon2 import PasswordHasher

    engine = make_engine(f"sqlite:///{tmp_path / 'apps.db'}")
    migrate(engine)
    apps = Apps(engine, b"k" * 32)
    secret = apps.add("fresh")
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT secret_hash FROM apps")).scalar_one()
    assert stored.startswith("hmac-sha256$") and secret not in stored
    assert apps.verify("fresh", secret) and not apps.verify("fresh", secret + "x")
    # Another instance key: the same secret does not verify (a stolen database alone is not
    # enough to check guesses offline).
    assert not Apps(engine, b"j" * 32).verify("fresh", secret)
    # A row from before the change: argon2, upgraded on its first good check.
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO apps (name, secret_hash, created_at) VALUES "
                             "('legacy', :h, 0)"), {"h": PasswordHasher().hash("old-secret")})
    assert not apps.verify("legacy", "wrong")
    assert apps.verify("legacy", "old-secret")
    with engine.connect() as conn:
        upgraded = conn.execute(sa.text(
            "SELECT secret_hash FROM apps WHERE name = 'legacy'")).scalar_one()
    assert upgraded.startswith("hmac-sha256$")
    assert apps.verify("legacy", "old-secret") and not apps.verify("legacy", "wrong")
    with pytest.raises(MessageError, match="reserved"):
        apps.add("embedded")
    engine.dispose()
