"""Admin accounts, sessions, API tokens, the setup link, the audit log, the [admin] section
and the `postroom admin` / `postroom audit` commands.

The store tests run on SQLite and PostgreSQL (the ``engine`` fixture, tests/queue_helpers.py);
the commands run as real subprocesses.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pyotp
import pytest
from queue_helpers import FakeClock
from serve_proc import Postroom
from sqlalchemy import Engine, select

from postroom.admin.accounts import (
    Accounts,
    LoginRefused,
    check_password_rules,
    generate_password,
)
from postroom.admin.config import AdminSettings
from postroom.admin.sessions import Sessions, csrf_ok
from postroom.admin.setup import setup_link, setup_pending, use_setup_token
from postroom.admin.tokens import AdminTokens
from postroom.audit import Action, Actor, Role, read, record
from postroom.exceptions import ConfigError, MessageError
from postroom.settings import load
from postroom.store.schema import admin_accounts, admin_tokens

KEY = b"dGhpcyBpcyBhIHRlc3Qga2V5IG9mIDMyIGJ5dGVzISE="  # 32 bytes, url-safe base64
PW = "correct horse battery"
CLI = Actor.cli()


def accounts(engine: Engine, clock: FakeClock, **admin: Any) -> Accounts:
    return Accounts(engine, KEY, settings=AdminSettings(**admin), clock=clock)


def refused(fn: Any) -> str:
    with pytest.raises(LoginRefused) as err:
        fn()
    return err.value.reason


# -- accounts ---------------------------------------------------------------------------------

def test_lockout_is_shared_by_two_nodes(engine: Engine, clock: FakeClock) -> None:
    """Failures counted on two nodes add up; the lock holds on both, ends after `lockout`,
    and a success resets the count."""
    node1 = accounts(engine, clock, login_failures=3, lockout=60)
    node2 = accounts(engine, clock, login_failures=3, lockout=60)
    node1.add("alice", PW, Role.ADMIN, actor=CLI)
    assert refused(lambda: node1.check("alice", "wrong password!", None, "192.0.2.1")) == "bad"
    assert refused(lambda: node2.check("alice", "wrong password!", None, "192.0.2.2")) == "bad"
    assert refused(lambda: node1.check("Alice", "wrong password!", None, "192.0.2.1")) == "bad"
    # locked now, on both nodes, even with the right password
    assert refused(lambda: node2.check("alice", PW, None, "192.0.2.2")) == "locked"
    assert refused(lambda: node1.check("alice", PW, None, "192.0.2.1")) == "locked"
    assert (node1.get("alice") or pytest.fail()).locked_until == clock.t + 60
    clock.advance(61)
    assert node2.check("alice", PW, None, "192.0.2.2").name == "alice"
    # the count restarted: two failures do not lock
    for _ in range(2):
        refused(lambda: node1.check("alice", "wrong password!", None, "192.0.2.1"))
    assert node2.check("alice", PW, None, "192.0.2.2").last_login_at == clock.t
    rows = read(engine, action="login")
    assert {r["action"] for r in rows} == {"login", "login.failed"}
    assert rows[0]["action"] == "login" and rows[0]["ip"] == "192.0.2.2"
    assert any(r["detail"].get("locked") for r in rows)


def test_unknown_names_and_bad_passwords_look_alike(engine: Engine, clock: FakeClock) -> None:
    accts = accounts(engine, clock)
    accts.add("alice", PW, Role.VIEWER, actor=CLI)
    errors = []
    for name, password in (("nobody", PW), ("alice", "not the password"), ("x" * 500, PW),
                           ("alice", "y" * 5000)):
        with pytest.raises(LoginRefused) as err:
            accts.check(name, password, None, "192.0.2.1")
        errors.append((err.value.reason, err.value.message, err.value.code))
    assert len(set(errors)) == 1, errors
    assert read(engine, action="login.failed", obj="account:nobody") == []  # no row per guess


@pytest.mark.parametrize("password,why", [
    ("short", "at least 12"),
    ("alice-is-the-best", "account name"),
    ("Password2024!", "common"),
    ("aaaaaaaaaaaaaaaa", "too few"),
    ("z" * 2000, "longer than"),
])
def test_password_rules(password: str, why: str) -> None:
    with pytest.raises(MessageError, match=why) as err:
        check_password_rules(password, name="alice")
    assert err.value.code == "admin.password" and "--generate" in err.value.message


def test_generated_passwords_pass_the_rules() -> None:
    made = {generate_password() for _ in range(50)}
    assert len(made) == 50
    for p in made:
        check_password_rules(p, name="alice")
        assert len(p) == 20 and p.isalnum()


def test_never_the_last_admin(engine: Engine, clock: FakeClock) -> None:
    accts = accounts(engine, clock)
    accts.add("alice", PW, Role.ADMIN, actor=CLI)
    accts.add("bob", PW, Role.VIEWER, actor=CLI)
    for change in (lambda: accts.remove("alice", actor=CLI),
                   lambda: accts.set_role("alice", Role.VIEWER, actor=CLI)):
        with pytest.raises(MessageError, match="last admin"):
            change()
    accts.set_role("bob", Role.ADMIN, actor=CLI)
    assert accts.remove("alice", actor=CLI)
    assert not accts.remove("alice", actor=CLI)
    with pytest.raises(MessageError, match="no admin account named 'zed'"):
        accts.set_password("zed", PW, actor=CLI)
    with pytest.raises(MessageError, match="exists"):
        accts.add("BOB", PW, Role.ADMIN, actor=CLI)
    with pytest.raises(MessageError, match="invalid account name"):
        accts.add("bob smith", PW, Role.ADMIN, actor=CLI)


def test_totp_codes_work_once(engine: Engine, clock: FakeClock) -> None:
    accts = accounts(engine, clock)
    accts.add("alice", PW, Role.ADMIN, actor=CLI)
    secret = accts.totp_begin("alice")
    assert accts.totp_uri("alice", secret).startswith("otpauth://totp/Postroom:alice?")
    otp = pyotp.TOTP(secret)
    with pytest.raises(MessageError, match="does not match"):
        accts.totp_confirm("alice", secret, otp.at(clock.t + 120), actor=CLI)
    assert not (accts.get("alice") or pytest.fail()).totp  # nothing stored before a good code
    accts.totp_confirm("alice", secret, otp.at(clock.t), actor=CLI)
    assert (accts.get("alice") or pytest.fail()).totp
    with engine.connect() as conn:  # encrypted at rest
        stored = conn.execute(select(admin_accounts.c.totp_secret)).scalar()
    assert stored and secret not in stored
    assert refused(lambda: accts.check("alice", PW, None, "192.0.2.1")) == "totp_needed"
    # the code used to confirm is spent
    assert refused(lambda: accts.check("alice", PW, otp.at(clock.t), "192.0.2.1")) == "totp_bad"
    clock.advance(30)
    assert accts.check("alice", PW, otp.at(clock.t), "192.0.2.1").totp
    assert refused(lambda: accts.check("alice", PW, otp.at(clock.t), "192.0.2.1")) == "totp_bad"
    clock.advance(60)
    # one step of drift is accepted (a phone a little behind), two are not
    assert accts.check("alice", PW, otp.at(clock.t - 30), "192.0.2.1")
    assert refused(lambda: accts.check("alice", PW, otp.at(clock.t + 60), "192.0.2.1")) \
        == "totp_bad"
    assert refused(lambda: accts.check("alice", PW, "12345", "192.0.2.1")) == "totp_bad"
    accts.totp_disable("alice", actor=CLI)
    assert accts.check("alice", PW, None, "192.0.2.1").totp is False


# -- sessions ---------------------------------------------------------------------------------

def test_session_ends_by_every_rule(engine: Engine, clock: FakeClock) -> None:
    accts = accounts(engine, clock)
    alice = accts.add("alice", PW, Role.ADMIN, actor=CLI)
    accts.add("bob", PW, Role.ADMIN, actor=CLI)
    sessions = Sessions(engine, AdminSettings(session_idle=600, session_max=3600), clock=clock)

    token, s = sessions.create(alice, "192.0.2.1")
    assert len(token) >= 43 and s.id_hash != token
    with engine.connect() as conn:
        assert token not in str(conn.exec_driver_sql("SELECT * FROM admin_sessions").all())
    assert csrf_ok(s, s.csrf) and not csrf_ok(s, None) and not csrf_ok(s, s.csrf[:-1] + "x")
    assert not csrf_ok(s, "é" * 43)
    assert sessions.lookup("no-such-token") is None and sessions.lookup("x" * 5000) is None

    # touched at most every 30 s
    clock.advance(10)
    assert (sessions.lookup(token) or pytest.fail()).last_seen_at == s.created_at
    clock.advance(25)
    assert (sessions.lookup(token) or pytest.fail()).last_seen_at == clock.t
    # idle past session_idle
    clock.advance(601)
    assert sessions.lookup(token) is None
    # past session_max, though never idle
    token, _ = sessions.create(alice, "192.0.2.1")
    for _ in range(7):
        clock.advance(500)
        assert sessions.lookup(token) is not None
    clock.advance(500)
    assert sessions.lookup(token) is None
    # the role is the account's now, not the session's at login
    token, _ = sessions.create(alice, "192.0.2.1")
    accts.set_role("alice", Role.VIEWER, actor=CLI)
    assert (sessions.lookup(token) or pytest.fail()).role is Role.VIEWER
    # a password change ends it
    clock.advance(1)
    accts.set_password("alice", "another good passphrase", actor=CLI)
    assert sessions.lookup(token) is None
    # so does removing the account, and revoking
    token, _ = sessions.create(alice, "192.0.2.1")
    token2, _ = sessions.create(alice, "192.0.2.1")
    sessions.revoke(token2)
    assert sessions.lookup(token2) is None and sessions.lookup(token) is not None
    accts.remove("alice", actor=CLI)
    assert sessions.lookup(token) is None
    bob = accts.get("bob") or pytest.fail()
    tokens = [sessions.create(bob, "192.0.2.1")[0] for _ in range(3)]
    assert sessions.revoke_account("bob") == 3
    assert all(sessions.lookup(t) is None for t in tokens)


# -- API tokens -------------------------------------------------------------------------------

def test_api_tokens(engine: Engine, clock: FakeClock) -> None:
    accts = accounts(engine, clock)
    accts.add("alice", PW, Role.ADMIN, actor=CLI)
    accts.add("bob", PW, Role.ADMIN, actor=CLI)
    tokens = AdminTokens(engine, KEY, clock=clock)
    value = tokens.create("alice", "ci deploys", actor=CLI)
    assert value.startswith("prt_")
    with engine.connect() as conn:
        assert value.split("_", 2)[2] not in str(conn.execute(select(admin_tokens)).all())
    actor = tokens.check(value, ip="192.0.2.9") or pytest.fail()
    assert (actor.kind, actor.name, actor.role, actor.label) == (
        "token", "alice", Role.ADMIN, "token:alice")
    for bad in (value[:-1] + ("A" if value[-1] != "A" else "B"), "prt_", "prt_x", "Bearer",
                value + "x" * 300, AdminTokens(engine, b"another key").create(
                    "bob", "", actor=CLI)):
        assert tokens.check(bad) is None
    # last_used_at: written once a minute at most
    (row,) = tokens.list("alice")
    assert row["last_used_at"] == clock.t and row["label"] == "ci deploys"
    clock.advance(30)
    tokens.check(value)
    assert tokens.list("alice")[0]["last_used_at"] == clock.t - 30
    clock.advance(31)
    tokens.check(value)
    assert tokens.list("alice")[0]["last_used_at"] == clock.t
    # the account's role, now
    accts.set_role("alice", Role.VIEWER, actor=CLI)
    assert (tokens.check(value) or pytest.fail()).role is Role.VIEWER
    assert tokens.revoke(row["id"], actor=CLI) and not tokens.revoke(row["id"], actor=CLI)
    assert tokens.check(value) is None
    other = tokens.create("bob", "", actor=CLI)
    accts.set_role("alice", Role.ADMIN, actor=CLI)
    accts.remove("bob", actor=CLI)
    assert tokens.check(other) is None
    with pytest.raises(MessageError, match="no admin account"):
        tokens.create("bob", "", actor=CLI)
    assert [r["action"] for r in read(engine, action="token")] == [
        "token.add", "token.remove", "token.add", "token.add"]


# -- the setup link ---------------------------------------------------------------------------

def test_setup_link_is_single_use_under_a_race(engine: Engine) -> None:
    old = setup_link(engine, KEY, "https://postroom.example:8025/") or pytest.fail()
    link = setup_link(engine, KEY, "https://postroom.example:8025/") or pytest.fail()
    assert link.startswith("https://postroom.example:8025/admin/setup?token=")
    token, old_token = link.rpartition("=")[2], old.rpartition("=")[2]
    assert not setup_pending(engine, old_token) and setup_pending(engine, token)  # replaced
    with pytest.raises(MessageError, match="password refused"):
        use_setup_token(engine, token, "alice", "weak", ip="192.0.2.1")
    assert setup_pending(engine, token)  # a refused password does not spend the link

    results: list[Any] = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait(10)
        try:
            results.append(use_setup_token(engine, token, f"admin{i}", PW, ip="192.0.2.1"))
        except MessageError as err:
            results.append(err)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [r for r in results if not isinstance(r, MessageError)]
    assert len(results) == 6 and len(winners) == 1, results
    with engine.connect() as conn:
        assert [r.name for r in conn.execute(select(admin_accounts.c.name))] == [winners[0].name]
    assert all("setup link" in r.message or "exists" in r.message
               for r in results if isinstance(r, MessageError))
    (row,) = read(engine, action="setup")
    assert row["actor"] == f"setup:{winners[0].name}" and row["ip"] == "192.0.2.1"
    assert setup_link(engine, KEY, "http://127.0.0.1:8025") is None  # an account exists


def test_setup_link_expires(engine: Engine) -> None:
    link = setup_link(engine, KEY, "http://127.0.0.1:8025", now=1000.0) or pytest.fail()
    token = link.rpartition("=")[2]
    with pytest.raises(MessageError, match="expired"):
        use_setup_token(engine, token, "alice", PW, ip="127.0.0.1", now=1000.0 + 86401)
    with pytest.raises(MessageError, match="not valid"):
        use_setup_token(engine, "guess", "alice", PW, ip="127.0.0.1", now=1001.0)
    assert use_setup_token(engine, token, "alice", PW, ip="127.0.0.1", now=1001.0).role \
        is Role.ADMIN
    with pytest.raises(MessageError, match="used"):
        use_setup_token(engine, token, "bob", PW, ip="127.0.0.1", now=1002.0)


# -- the audit log ----------------------------------------------------------------------------

def test_audit_redacts_secrets_at_any_depth(engine: Engine) -> None:
    actor = Actor(kind="admin", name="alice", role=Role.ADMIN, ip="192.0.2.7")
    record(engine, actor, Action.CONNECTION_EDIT, "connection:primary", {
        "before": {"host": "a.example", "password": "hunter2hunter2", "password_env": "PW",
                   "oauth": {"client_secret": "s3cret", "refreshToken": "rt", "scopes": ["x"]},
                   "headers": [{"name": "X-A", "api_key": "k1"}]},
        "after": {"host": "b.example", "password": "n3w", "secret_key_file": "/run/key",
                  "passphrase": "pp", "token": None},
    })
    (row,) = read(engine)
    d = row["detail"]
    assert "hunter2" not in str(row) and "s3cret" not in str(row) and "k1" not in str(row)
    assert d["before"]["password"] == "********" and d["after"]["password"] == "********"
    assert d["before"]["oauth"] == {"client_secret": "********", "refreshToken": "********",
                                    "scopes": ["x"]}
    assert d["before"]["headers"] == [{"name": "X-A", "api_key": "********"}]
    assert d["before"]["password_env"] == "PW" and d["after"]["secret_key_file"] == "/run/key"
    assert d["after"]["passphrase"] == "********" and d["after"]["token"] is None
    assert (row["actor"], row["action"], row["object"], row["ip"]) == (
        "admin:alice", "connection.edit", "connection:primary", "192.0.2.7")
    record(engine, actor, Action.MESSAGE_VIEW_BODY, "x" * 500, {"note": "y" * 10_000})
    (row,) = read(engine, limit=1)
    assert len(row["object"]) == 200 and len(row["detail"]["note"]) < 2100


def test_audit_read_filters_and_pages(engine: Engine) -> None:
    alice = Actor(kind="admin", name="alice", role=Role.ADMIN)
    for i in range(5):
        record(engine, alice, Action.ACCOUNT_ADD, f"account:u{i}")
    record(engine, CLI, Action.TOKEN_ADD, "token:1")
    page = read(engine, limit=4)
    assert [r["action"] for r in page][:2] == ["token.add", "account.add"]
    rest = read(engine, limit=4, before=page[-1]["id"])
    assert len(rest) == 2 and rest[0]["id"] < page[-1]["id"]
    assert len(read(engine, actor="alice")) == 5 and len(read(engine, actor="admin:alice")) == 5
    assert len(read(engine, actor="cli")) == 1 and read(engine, actor="ali") == []
    assert len(read(engine, action="account")) == 5 and read(engine, action="acc") == []
    assert len(read(engine, obj="account:u3")) == 1
    assert read(engine, since=9e12) == [] and read(engine, actor="%") == []
    with pytest.raises(ValueError):
        record(engine, alice, "made.up", "x")  # type: ignore[arg-type]


def test_actor_roles() -> None:
    viewer = Actor(kind="admin", name="v", role=Role.VIEWER)
    assert viewer.may(Role.VIEWER) and not viewer.may(Role.ADMIN)
    assert CLI.may(Role.ADMIN) and CLI.label.startswith("cli:") and CLI.role is Role.ADMIN


# -- the [admin] section ----------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(text)
    return cfg


def test_admin_section_defaults_and_values(tmp_path: Path) -> None:
    s = load(write(tmp_path, ""), environ={})
    assert s.section(AdminSettings) == AdminSettings.model_validate({})
    assert s.section(AdminSettings).bodies is Role.ADMIN
    s = load(write(tmp_path, '[admin]\nbodies = "viewer"\nsession_idle = 600\n'
                   'sso_header = "X-Forwarded-User"\nsso_proxies = ["10.0.0.0/8"]\n'
                   'language = "fr"\n'), environ={"POSTROOM_ADMIN__LOCKOUT": "60"})
    adm = s.section(AdminSettings)
    assert (adm.bodies, adm.session_idle, adm.lockout, adm.language) == (
        Role.VIEWER, 600, 60, "fr")


@pytest.mark.parametrize("text,expect", [
    ('bodies = "root"', "admin.bodies = 'root': expected one of admin, viewer"),
    ('sesion_idle = 5', "admin.sesion_idle: unknown key; did you mean 'session_idle'?"),
    ('session_idle = 9000\nsession_max = 3600', "session_idle is longer than session_max"),
    ('sso_header = "X-User"', "also set sso_proxies"),
    ('sso_header = "X User"\nsso_proxies = ["10.0.0.1"]', "not a header name"),
    ('sso_header = "X-User"\nsso_proxies = ["proxy.local"]', "is not an address or network"),
    ('secure_cookies = "sometimes"', "admin.secure_cookies = 'sometimes'"),
    ('language = "xx"', "not a shipped language; use one of en"),
    ('login_failures = 0', "admin.login_failures = 0"),
])
def test_admin_section_errors(tmp_path: Path, text: str, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, f"[admin]\n{text}\n"), environ={})
    assert expect in err.value.message and err.value.code == "config.invalid"


def test_unknown_sections_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section\(s\) admn; known: .*admin"):
        load(write(tmp_path, "[admn]\nenabled = true\n"), environ={})
    with pytest.raises(ConfigError, match="POSTROOM_ADMN__X is not understood"):
        load(write(tmp_path, ""), environ={"POSTROOM_ADMN__X": "1"})


def test_admin_section_costs_other_commands_nothing(tmp_path: Path) -> None:
    """A file without [admin] (postroom-sendmail's) imports no feature module."""
    cfg = write(tmp_path, '[server]\ndata_dir = "d"\n')
    code = ("import sys; from postroom.settings import load; load(sys.argv[1], environ={}); "
            "print(sorted(m for m in sys.modules if m.startswith('postroom.admin') "
            "or m == 'postroom.audit'))")
    out = subprocess.run([sys_executable(), "-c", code, str(cfg)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def sys_executable() -> str:
    import sys

    return sys.executable


# -- the schema -------------------------------------------------------------------------------

def test_migration_builds_the_declared_admin_tables(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from postroom.store.schema import metadata

    mine = {"admin_accounts", "admin_sessions", "admin_tokens", "audit"}
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert [d for d in diff if mine & set(str(d).split("'"))] == []


# -- the commands -----------------------------------------------------------------------------

def run(pr: Postroom, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    res = pr.cli(*args, input=None if stdin is None else stdin.encode())
    out, err = res.stdout.decode(), res.stderr.decode()
    assert "Traceback" not in err, err
    return res.returncode, out, err


def test_admin_commands(tmp_path: Path) -> None:
    pr = Postroom(tmp_path)  # its configuration and data folder; no server needed
    assert run(pr, "admin", "add", "alice", "--password-stdin", stdin=PW + "\n")[0] == 0
    rc, out, _ = run(pr, "admin", "add", "bob", "--generate", "--role", "viewer")
    assert rc == 0 and "shown only now" in out
    bob_pw = out.rsplit(":", 1)[1].strip()
    assert len(bob_pw) == 20

    refusals = [
        (("admin", "add", "carol", "--password-stdin"), "tooshort\n", "at least 12"),
        (("admin", "add", "carol", "--password-stdin"), "carol-carol-carol\n", "account name"),
        (("admin", "add", "carol", "--role", "boss", "--generate"), None, "unknown role 'boss'"),
        (("admin", "add", "carol"), None, "--password-stdin"),  # no terminal to ask on
        (("admin", "add", "alice", "--generate"), None, "exists"),
        (("admin", "remove", "alice"), None, "last admin"),
        (("admin", "role", "alice", "viewer"), None, "last admin"),
        (("admin", "role", "bob", "superuser"), None, "unknown role"),
        (("admin", "remove", "zed"), None, "no admin account named 'zed'"),
        (("admin", "passwd", "zed", "--generate"), None, "no admin account named 'zed'"),
        (("admin", "token", "zed"), None, "no admin account named 'zed'"),
        (("admin", "token-revoke", "nope"), None, "no admin API token"),
        (("admin", "totp", "alice"), None, "only --disable"),
        (("audit", "--since", "yesterday"), None, "give an age like"),
    ]
    for args, stdin, expect in refusals:
        rc, _, err = run(pr, *args, stdin=stdin)
        assert rc != 0 and expect in " ".join(err.split()), (args, err)

    rc, out, _ = run(pr, "admin", "list", "--json")
    import json

    listed = {a["name"]: a for a in json.loads(out)}
    assert {n: a["role"] for n, a in listed.items()} == {"alice": "admin", "bob": "viewer"}
    assert run(pr, "admin", "passwd", "bob", "--password-stdin",
               stdin="a brand new passphrase\n")[0] == 0
    assert run(pr, "admin", "role", "bob", "admin")[0] == 0
    assert run(pr, "admin", "totp", "bob", "--disable")[0] == 0
    rc, out, _ = run(pr, "admin", "token", "bob", "--label", "deploy bot")
    assert rc == 0 and "Bearer prt_" in out
    token = out.split("Bearer ", 1)[1].split()[0]
    rc, out, _ = run(pr, "admin", "token-list", "--json")
    (tok,) = json.loads(out)
    assert tok["account"] == "bob" and tok["label"] == "deploy bot" and "hash" not in str(tok)
    assert token.split("_")[1] == tok["id"]
    assert run(pr, "admin", "token-revoke", tok["id"])[0] == 0
    assert run(pr, "admin", "remove", "alice")[0] == 0

    rc, out, _ = run(pr, "audit", "--json", "--limit", "100")
    rows = json.loads(out)
    assert [r["action"] for r in reversed(rows)] == [
        "account.add", "account.add", "account.password", "account.role", "account.totp",
        "token.add", "token.remove", "account.remove"]
    assert all(r["actor"] == CLI.label for r in rows)
    assert PW not in out and token not in out
    rc, out, _ = run(pr, "audit", "--action", "token", "--since", "1h")
    assert rc == 0 and "token.add" in out and "account.add" not in out
    rc, out, _ = run(pr, "admin", "list")
    assert rc == 0 and "bob" in out and "alice" not in out
