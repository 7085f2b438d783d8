"""The `postroom` command and its configuration, run as real subprocesses.

First run, configuration errors (exit 2, the key named, no traceback), environment overrides,
apps, stored connection passwords, and send / log / show / resend / test against the real
upstream Postfix (tests/peers/README.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, free_port, smtp_connection, wait_port

TIMEOUT = 60.0


Result = subprocess.CompletedProcess[str]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            input: bytes | None = None, timeout: float = TIMEOUT) -> Result:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    res = subprocess.run([sys.executable, "-m", "postroom.cli", *args], cwd=cwd, env=full_env,
                         input=input, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(),
                                       res.stderr.decode())


def cli(pr: Postroom, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    res = pr.cli(*args, input=input, timeout=TIMEOUT)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(),
                                       res.stderr.decode())


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, (
        f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    assert "Traceback" not in res.stderr, res.stderr
    return res.stdout


def queued_id(output: str) -> str:
    m = re.search(r"^queued ([0-9a-f]{32})", output, re.M)
    assert m, output
    return m.group(1)


def db_query(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    con = sqlite3.connect(db, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def unique_addr(tag: str, domain: str = "example.test") -> str:
    return f"cli-{tag}-{uuid.uuid4().hex[:10]}@{domain}"  # lands in the domain's catch-all


def plain_conn(name: str, port: int, extra: str = "") -> str:
    return smtp_connection(port, name, extra)


# -- first run ------------------------------------------------------------------------------------
def test_first_run_creates_config_data_key_and_certificate(tmp_path: Path) -> None:
    from cryptography import x509

    cfg = tmp_path / "fresh" / "postroom.toml"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update({"POSTROOM_SERVER__SMTP_LISTEN": f"127.0.0.1:{port}", "COLUMNS": "300"})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "postroom.cli", "serve", "--config",
                                 str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            wait_port(port, timeout=30)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                code, banner = s.ehlo("client.test")
                assert code == 250
                assert b"STARTTLS" in banner
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(10)
    output = log.read_text()
    assert rc == 0, output
    assert "Traceback" not in output
    assert f"created {cfg}" in output

    text = cfg.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("#") or ln in ("[server]", "[delivery]") for ln in lines)
    assert "# [[connections]]" in text and "password_env" in text
    parsed = tomllib.loads(text)
    assert parsed == {"server": {}, "delivery": {}}  # everything is a commented default

    data = cfg.parent / "postroom-data"
    assert (data / "postroom.db").is_file()
    key = data / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(key.read_bytes().strip()) == 44  # a Fernet key
    cert = data / "tls" / "cert.pem"
    assert (data / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)

    # A second run keeps the file (and the key) as they are, and says nothing about creating.
    cfg.write_text(text + "\n# edited\n")
    key_before = key.read_bytes()
    res = run_cli("log", "--config", str(cfg))
    ok(res)
    assert cfg.read_text().endswith("# edited\n")
    assert key.read_bytes() == key_before
    assert "created" not in res.stderr


# -- invalid configuration -----------------------------------------------------------------------
CONN_HEAD = '[[connections]]\nname = "p"\n'
BAD_CONFIGS = {
    "listen": ('[server]\nsmtp_listen = "nope"\n',
               ["server.smtp_listen", "'nope'", "HOST:PORT"]),
    "typo": (CONN_HEAD + 'transport = "smtp"\nhots = "smtp.example.com"\n',
             ["connections[0].hots", "did you mean 'host'"]),
    "transport": (CONN_HEAD + 'transport = "carrier-pigeon"\nhost = "x"\n',
                  ["connections[0].transport", "carrier-pigeon", "not a known transport",
                   "smtp"]),
    "missing_host": (CONN_HEAD + 'transport = "smtp"\n',
                     ["connections[0].host", "required"]),
    "toml": ('[server]\nsmtp_listen = "127.0.0.1:2525\n', ["not valid TOML", "line 2"]),
    "section": ('[sever]\nhostname = "x"\n', ["unknown section", "sever"]),
    "backoff": ("[delivery]\nmin_backoff = 600\nmax_backoff = 60\n",
                ["max_backoff must be at least min_backoff"]),
    "type": ('[delivery]\nconcurrency = "lots"\n', ["delivery.concurrency", "'lots'"]),
    "server_not_table": ("server = 3\n", ["[server] must be a table"]),
    "connections_not_array": ("connections = 3\n", ["[[connections]]"]),
    "dupe": (CONN_HEAD + 'transport = "memory"\n' + CONN_HEAD + 'transport = "memory"\n',
             ["unique", "p"]),
    "smtp_auth_without_user": (CONN_HEAD + 'transport = "smtp"\nhost = "x"\nauth = "plain"\n',
                               ["connections[0]", "needs a username"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["serve", "log"])
def test_invalid_config_is_a_clear_error(tmp_path: Path, case: str, command: str) -> None:
    content, expected = BAD_CONFIGS[case]
    cfg = tmp_path / "postroom.toml"
    cfg.write_text(content)
    res = run_cli(command, "--config", str(cfg), timeout=30)
    assert res.returncode == 2, f"exit {res.returncode}: {res.stdout}{res.stderr}"
    assert "Traceback" not in res.stderr
    err = " ".join(res.stderr.split())  # Rich may wrap long lines
    assert err.startswith("error (config"), err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert not (tmp_path / "postroom-data").exists()  # nothing made from a bad config


@pytest.mark.parametrize(("var", "expected"), [
    ("POSTROOM_SERVER__SMTP_LISTN", "server.smtp_listn: unknown key; did you mean 'smtp_listen'"),
    ("POSTROOM_BOGUS__KEY", "POSTROOM_BOGUS__KEY is not understood"),
    ("POSTROOM_SERVER__SMTP_LISTEN", "server.smtp_listen = 'nope'"),
])
def test_invalid_environment_override_is_a_clear_error(tmp_path: Path, var: str,
                                                       expected: str) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n')
    res = run_cli("log", "--config", str(cfg), env={var: "nope"})
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert expected in " ".join(res.stderr.split())


def test_other_postroom_variables_are_left_alone(tmp_path: Path) -> None:
    """Only POSTROOM_<SECTION>__<KEY> overrides; POSTROOM_SMTP_PASSWORD may be the user's
    own secret for password_env."""
    from postroom.settings import load

    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n')
    s = load(cfg, environ={"POSTROOM_SMTP_PASSWORD": "secret", "POSTROOM_SERVER__WORKER": "false"})
    assert s.server.worker is False


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    res = run_cli("log", "--config", str(tmp_path / "nothere.toml"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "does not exist" in res.stderr and "postroom serve --config" in res.stderr


def test_unknown_connection_in_send_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n' + plain_conn("up", 25))
    res = run_cli("send", "--from", "a@example.org", "--to", "b@example.test", "--text", "x",
                  "--connection", "nope", "--config", str(cfg))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "no connection named 'nope' (known: up)" in res.stderr
    assert "[[connections]]" in res.stderr


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    pr = Postroom(tmp_path / "pr")
    file_port = pr.smtp_port
    env_port = free_port()
    pr.env["POSTROOM_SERVER__SMTP_LISTEN"] = f"127.0.0.1:{env_port}"
    pr.env["POSTROOM_DELIVERY__CONCURRENCY"] = "3"
    pr.smtp_port = env_port  # what start() waits for
    with pr:
        with smtplib.SMTP("127.0.0.1", env_port, timeout=10) as s:
            assert s.noop()[0] == 250
        with pytest.raises(OSError):
            smtplib.SMTP("127.0.0.1", file_port, timeout=3).close()
    assert f"accepting mail on 127.0.0.1:{env_port}" in pr.log.read_text()
    # The loaded settings agree (same loader the server uses).
    from postroom import settings

    loaded = settings.load(pr.config, environ={**pr.env})
    assert loaded.smtp_listen == ("127.0.0.1", env_port)
    assert loaded.delivery.concurrency == 3
    assert loaded.delivery.min_backoff == 1  # untouched keys still come from the file


# -- apps ----------------------------------------------------------------------------------------
def test_app_add_list_remove(tmp_path: Path) -> None:
    with Postroom(tmp_path / "pr") as pr:
        out = ok(cli(pr, "app", "add", "billing"))
        m = re.search(r"password (\S+)", out)
        assert m, out
        secret = m.group(1)
        assert len(secret) >= 24
        [row] = db_query(pr.db, "SELECT name, secret_hash FROM apps")
        assert row["name"] == "billing"
        assert row["secret_hash"].startswith("hmac-sha256$")  # keyed hash: see postroom.apps
        assert secret not in row["secret_hash"]
        for f in pr.db.parent.glob("postroom.db*"):  # database, WAL, shm
            assert secret.encode() not in f.read_bytes(), f

        listed = ok(cli(pr, "app", "list"))
        assert "billing" in listed and secret not in listed

        again = cli(pr, "app", "add", "billing")
        assert again.returncode == 1 and "exists" in again.stderr

        def login(password: str) -> int:
            with smtplib.SMTP("127.0.0.1", pr.smtp_port, timeout=10) as s:
                s.ehlo("client.test")
                try:
                    return s.login("billing", password)[0]
                except smtplib.SMTPAuthenticationError as err:
                    return err.smtp_code

        assert login(secret) == 235
        assert login(secret + "x") == 535
        assert login(secret) == 235  # cached now
        assert "removed" in ok(cli(pr, "app", "remove", "billing"))
        # "its credentials stop working at once", also in the running server
        assert login(secret) == 535
        assert "billing" not in ok(cli(pr, "app", "list"))
        gone = cli(pr, "app", "remove", "billing")
        assert gone.returncode == 1 and "no app named 'billing'" in gone.stderr
        bad = cli(pr, "app", "add", "no spaces")
        assert bad.returncode == 1 and "invalid app name" in bad.stderr
        assert "Traceback" not in bad.stderr + gone.stderr + again.stderr


# -- with the real upstream ----------------------------------------------------------------------
@pytest.fixture
def served(tmp_path: Path, peers: Any) -> Iterator[Postroom]:
    """A running instance delivering to the upstream's plain port (connection "up", the
    default), plus "sub" (submission: STARTTLS + AUTH PLAIN as testuser, password stored with
    the CLI) and "norelay" (submission with STARTTLS but no AUTH: Postfix refuses every
    recipient, 554 5.7.1 relay access denied, a permanent failure of the message)."""
    conns = (
        plain_conn("up", peers.plain_port)
        + '[[connections]]\nname = "sub"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
          f'port = {peers.submission_port}\nsecurity = "starttls"\nca_file = "{peers.ca_file}"\n'
          'auth = "plain"\nusername = "testuser@example.test"\n\n'
        + '[[connections]]\nname = "norelay"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
          f'port = {peers.submission_port}\nsecurity = "starttls"\nca_file = "{peers.ca_file}"\n'
          'auth = "none"\n\n'
    )
    pr = Postroom(tmp_path / "pr", connections=conns)
    pr.start()
    try:
        yield pr
    finally:
        pr.stop()


def test_send_log_show_raw_resend(served: Postroom, peers: Any) -> None:
    pr = served
    rcpt, other = unique_addr("send"), unique_addr("resend")
    subject = f"cli send {uuid.uuid4().hex[:8]} [tagged]"
    out = ok(cli(pr, "send", "--from", "cli@example.org", "--to", rcpt, "--subject", subject,
                 "--text", "hello from the cli\n"))
    msg_id = queued_id(out)
    got = peers.wait_for(rcpt, subject, timeout=20)
    assert "hello from the cli" in got.get_content()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [row] = db_query(pr.db, "SELECT status FROM messages WHERE id = ?", msg_id)
        if row["status"] == "sent":
            break
        time.sleep(0.1)
    listed = ok(cli(pr, "log"))
    assert msg_id[:12] in listed and subject in listed and "sent" in listed

    shown = ok(cli(pr, "show", msg_id))
    assert msg_id in shown and "sent" in shown
    assert f"Subject: {subject}" in shown
    assert f"<cli@example.org> → {rcpt}" in shown
    assert "attempt via up" in shown
    assert "transcript:" in shown and "S: 220" in shown and "C: DATA" in shown
    assert re.search(r"S: 250 2\.0\.0 Ok: queued as \w+", shown)
    assert ok(cli(pr, "show", msg_id[:10])) == shown  # a unique prefix works too

    raw = pr.cli("show", msg_id, "--raw").stdout
    assert b"\r\nFrom: cli@example.org\r\n" in b"\r\n" + raw
    assert f"Subject: {subject}".encode() in raw
    # What the upstream stored is exactly what we sent, after the headers it adds in front.
    assert got.raw.endswith(raw.replace(b"\r\n", b"\n"))

    details = json.loads(ok(cli(pr, "show", msg_id, "--json")))
    assert details["status"] == "sent" and len(details["attempts"]) == 1
    assert details["attempts"][0]["transcript"].startswith("*  connecting to")

    out = ok(cli(pr, "resend", msg_id, "--to", other))
    new_id = re.search(r"queued ([0-9a-f]{32}) \(copy of", out)
    assert new_id and new_id.group(1) != msg_id
    copy = peers.wait_for(other, subject, timeout=20)
    assert copy.raw.endswith(raw.replace(b"\r\n", b"\n"))
    entries = [json.loads(line) for line in ok(cli(pr, "log", "--json")).splitlines()]
    by_id = {e["id"]: e for e in entries}
    assert by_id[new_id.group(1)]["recipients"] == [other]
    assert by_id[new_id.group(1)]["source"] == f"resend:{msg_id}"
    assert by_id[msg_id]["recipients"] == [rcpt]

    missing = cli(pr, "show", "f" * 32)
    assert missing.returncode == 1 and "no message" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_send_now_and_test_print_the_transcript(tmp_path: Path, peers: Any) -> None:
    # No server running: the CLI delivers by itself.
    pr = Postroom(tmp_path / "pr", connections=plain_conn("up", peers.plain_port))
    rcpt = unique_addr("now")
    subject = f"send --now {uuid.uuid4().hex[:8]}"
    res = cli(pr, "send", "--now", "--from", "cli@example.org", "--to", rcpt, "--subject",
              subject, "--text", "now\n")
    out = ok(res)
    queued_id(out)
    assert "attempt via up" in out and ": sent" in out
    assert "S: 220" in out and "C: mail FROM:<cli@example.org>" in out
    assert f"C: rcpt TO:<{rcpt}>" in out
    assert "<message data," in out and "Ok: queued as" in out
    peers.wait_for(rcpt, subject, timeout=20)

    to = unique_addr("test")
    out = ok(cli(pr, "test", "up", "--to", to))
    assert "attempt via up" in out and ": sent" in out and "S: 220" in out
    assert f"{to}: 250" in out
    peers.wait_for(to, "Postroom test via up", timeout=20)

    down = Postroom(tmp_path / "down", connections=plain_conn("down", free_port()))
    res = cli(down, "test", "down", "--to", to)
    assert res.returncode == 1
    # Tried once, never left queued for a later worker (issue 12).
    assert "failed" in res.stdout and "connect.refused" in res.stdout
    assert "a test send is not retried" in res.stdout
    assert "Traceback" not in res.stderr


def test_send_now_while_a_server_polls_the_queue(tmp_path: Path, peers: Any) -> None:
    """A running worker must not take a `send --now` / `test` message from under the CLI."""
    pr = Postroom(tmp_path / "pr", connections=plain_conn("up", peers.plain_port),
                  delivery="min_backoff = 1\nmax_backoff = 2\npoll_interval = 0.01\n")
    with pr:
        for i in range(4):
            rcpt = unique_addr(f"race{i}")
            out = ok(cli(pr, "send", "--now", "--from", "cli@example.org", "--to", rcpt,
                         "--subject", f"race {i}", "--text", "x"))
            assert "S: 220" in out and ": sent" in out
            assert "S: 220" in ok(cli(pr, "test", "up", "--to", rcpt))


def test_stored_password_is_encrypted_and_used(served: Postroom, peers: Any) -> None:
    from cryptography.fernet import Fernet

    pr = served
    rcpt = "testuser@example.test"
    # Without a password: deferred (transient), and the error says how to fix it.
    res = cli(pr, "send", "--now", "--connection", "sub", "--from", "testuser@example.test",
              "--to", rcpt, "--subject", "no password yet", "--text", "x")
    assert res.returncode == 1
    assert "deferred" in res.stdout and "postroom connection set-password sub" in res.stdout

    ok(cli(pr, "connection", "set-password", "sub", "--stdin", input=b"testpass\n"))
    [row] = db_query(pr.db, "SELECT name, ciphertext FROM secrets")
    assert row["name"] == "connection:sub:password"
    assert "testpass" not in row["ciphertext"]
    key = (pr.db.parent / "secret.key").read_bytes().strip()
    assert Fernet(key).decrypt(row["ciphertext"].encode()) == b"testpass"
    for f in pr.db.parent.glob("postroom.db*"):
        assert b"testpass" not in f.read_bytes(), f

    subject = f"stored password {uuid.uuid4().hex[:8]}"
    res = cli(pr, "send", "--now", "--connection", "sub", "--from", "testuser@example.test",
              "--to", rcpt, "--subject", subject, "--text", "authenticated\n")
    out = ok(res)
    assert "AUTH PLAIN ********" in out and "S: 235" in out
    assert "testpass" not in out
    got = peers.wait_for(rcpt, subject, timeout=20)
    assert "Authenticated sender: testuser@example.test" in str(got["Received"])
    shown = ok(cli(pr, "show", queued_id(res.stdout)))
    assert "testpass" not in shown and "AUTH PLAIN ********" in shown

    # A wrong password: the upstream's 535 is permanent.
    ok(cli(pr, "connection", "set-password", "sub", "--stdin", input=b"wrong\n"))
    res = cli(pr, "send", "--now", "--connection", "sub", "--from", "testuser@example.test",
              "--to", rcpt, "--subject", "wrong password", "--text", "x")
    assert res.returncode == 1
    assert "failed" in res.stdout and "auth.rejected" in res.stdout and "535" in res.stdout
    assert "wrong" not in res.stdout.replace("wrong password", "")

    empty = cli(pr, "connection", "set-password", "sub", "--stdin", input=b"\n")
    assert empty.returncode == 1 and "empty password" in empty.stderr
    unknown = cli(pr, "connection", "set-password", "nope", "--stdin", input=b"x\n")
    assert unknown.returncode == 2 and "no connection named 'nope'" in unknown.stderr


def test_log_filters(served: Postroom, peers: Any) -> None:
    pr = served
    good, bad = unique_addr("good"), unique_addr("bad")
    sent_id = queued_id(ok(cli(pr, "send", "--now", "--from", "alpha@example.org", "--to", good,
                               "--subject", "good one", "--text", "x")))
    res = cli(pr, "send", "--now", "--connection", "norelay", "--from", "beta@example.org",
              "--to", bad, "--subject", "bad one", "--text", "x")
    assert res.returncode == 1, res.stdout
    failed_id = queued_id(res.stdout)
    assert "failed" in res.stdout and "554" in res.stdout  # Relay access denied
    old_id = queued_id(ok(cli(pr, "send", "--from", "gamma@example.org", "--to", good,
                              "--subject", "old one", "--text", "x")))
    two_hours_ago = time.time() - 7200
    con = sqlite3.connect(pr.db, timeout=10)
    try:
        with con:
            con.execute("UPDATE messages SET created_at = ? WHERE id = ?", (two_hours_ago, old_id))
    finally:
        con.close()

    def ids(*args: str) -> list[str]:
        out = ok(cli(pr, "log", "--json", *args))
        return [json.loads(line)["id"] for line in out.splitlines()]

    assert ids("--status", "failed") == [failed_id]
    table = ok(cli(pr, "log", "--status", "failed"))
    assert failed_id[:12] in table and "bad one" in table and sent_id[:12] not in table
    assert set(ids("--since", "1h")) == {sent_id, failed_id}
    assert set(ids("--since", "3h")) == {sent_id, failed_id, old_id}
    assert ids("--to", bad) == [failed_id]
    assert set(ids("--to", good)) == {sent_id, old_id}
    assert ids("--from", "beta@") == [failed_id]
    assert ids("--from", "alpha", "--status", "sent") == [sent_id]
    assert ids("--limit", "1") == [failed_id]  # newest first
    entry = json.loads(ok(cli(pr, "log", "--json", "--status", "failed")))
    assert entry["status"] == "failed" and entry["subject"] == "bad one"
    assert entry["last_error"].endswith("Client host rejected: Access denied")  # RCPT: 554
    assert "raw" not in entry

    for bad_args, text in ((("--since", "yesterday"), "--since 'yesterday'"),
                           (("--status", "lost"), "--status 'lost'")):
        res = cli(pr, "log", *bad_args)
        assert res.returncode == 1 and text in res.stderr
        assert "Traceback" not in res.stderr


def test_log_survives_markup_in_mail(tmp_path: Path) -> None:
    """Subjects and addresses come from mail: Rich markup in them is shown, not parsed."""
    pr = Postroom(tmp_path / "pr")
    subject = "[URGENT] pay now [/] [bold]x"
    ok(cli(pr, "send", "--from", "a@example.org", "--to", "b@example.test", "--subject",
           subject, "--text", "x"))
    out = ok(cli(pr, "log"))
    assert subject in out


def test_send_composes_cc_bcc_html_and_attachments(served: Postroom, peers: Any,
                                                    tmp_path: Path) -> None:
    """`send` from flags: every recipient gets it, Bcc is envelope-only, the text part is
    kept beside the HTML one, and the attachment arrives intact."""
    pr = served
    to, cc, bcc = unique_addr("to"), unique_addr("cc"), unique_addr("bcc")
    subject = f"compose {uuid.uuid4().hex[:8]}"
    attachment = tmp_path / "report.csv"
    attachment.write_bytes(b"a,b\r\n1,2\r\n")
    ok(cli(pr, "send", "--from", "cli@example.org", "--to", to, "--cc", cc, "--bcc", bcc,
           "--subject", subject, "--text", "plain part\n", "--html", "<p>html part</p>",
           "--attach", str(attachment)))
    for rcpt in (to, cc, bcc):
        got = peers.wait_for(rcpt, subject, timeout=20)
        assert got["To"] == to and got["Cc"] == cc
        assert got["Bcc"] is None and bcc.encode() not in got.raw.split(b"\n\n", 1)[1]
        body = got.get_body(("plain",))
        html = got.get_body(("html",))
        assert body is not None and "plain part" in body.get_content()
        assert html is not None and "<p>html part</p>" in html.get_content()
        [att] = list(got.iter_attachments())
        assert att.get_filename() == "report.csv"
        assert att.get_payload(decode=True) == b"a,b\r\n1,2\r\n"


def test_config_is_found_in_the_user_then_system_folder(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Programs that run `postroom-sendmail` elsewhere (PHP, cron) must find the config."""
    from postroom.config_load import config_path_from, search_path

    monkeypatch.chdir(tmp_path)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert config_path_from(None, env) == Path("postroom.toml")  # nothing anywhere: the default
    user = tmp_path / "xdg" / "postroom" / "postroom.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[server]\n")
    assert config_path_from(None, env) == user
    Path("postroom.toml").write_text("[server]\n")
    assert config_path_from(None, env) == Path("postroom.toml")  # the current folder first
    assert config_path_from(None, {**env, "POSTROOM_CONFIG": "x.toml"}) == Path("x.toml")
    assert search_path(env)[-1] == Path("/etc/postroom/postroom.toml")


def test_sections_left_out_are_their_defaults(tmp_path: Path) -> None:
    """load() constructs a section the file leaves out instead of validating an empty table
    (start-up time); the two must be the same, for every section."""
    from postroom.settings import SECTIONS, load

    for model in SECTIONS.values():
        assert model.model_construct() == model.model_validate({}), model
    config = tmp_path / "postroom.toml"
    config.write_text("[server]\nhostname = \"h.test\"\n")
    loaded = load(config, environ={"POSTROOM_DELIVERY__CONCURRENCY": "5"})
    for name, model in SECTIONS.items():
        if name not in ("server", "delivery"):
            assert getattr(loaded, name) == model.model_validate({}), name
    assert loaded.delivery.concurrency == 5  # an override makes the section present


def test_load_without_connections(tmp_path: Path) -> None:
    """connections=False (postroom-sendmail) neither reads nor checks [[connections]] and
    [[routes]]; every other section is checked as always."""
    from postroom.exceptions import ConfigError
    from postroom.settings import load

    config = tmp_path / "postroom.toml"
    good = '[[connections]]\nname = "a"\ntransport = "smtp"\nhost = "h"\n'
    config.write_text(good + '[[routes]]\nchain = ["a"]\n')
    assert [c.name for c in load(config, environ={}).connections] == ["a"]
    skipped = load(config, environ={}, connections=False)
    assert skipped.connections == () and skipped.routes == ()
    config.write_text('[[connections]]\nname = "a"\ntransport = "nope"\n'
                      '[[routes]]\nchain = ["b"]\n')
    with pytest.raises(ConfigError):
        load(config, environ={})
    assert load(config, environ={}, connections=False).connections == ()
    config.write_text('[sendmail]\nserver = "http://x"\n' + good)
    with pytest.raises(ConfigError, match=r"sendmail\.server"):
        load(config, environ={}, connections=False)
