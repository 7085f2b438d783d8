"""The sendmail command (`postroom-sendmail`, `postroom sendmail`) driven by real sendmail users:
PHP's mail() and PHPMailer's isSendmail() (php-cli), GNU mailutils' `mail`, `git send-email`.
Their messages go into the store of a real `postroom serve` (or, with `[sendmail] server`, to
its SMTP listener), whose worker delivers them to the real Postfix + Dovecot upstream
(tests/peers); each one is read back from the Maildir by its unique Subject.

Hostile input runs against a store without a server: every error must exit with its sysexits.h
status and one line on stderr, never a traceback; a command-line error stops before the
message is read (as Postfix), any later error keeps the message in a dead.letter mbox.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import mailbox
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, free_port, smtp_connection

RCPT = "testuser@example.test"
CC = "alice@example.test"
BCC = "bob@example.test"
USER = pwd.getpwuid(os.getuid()).pw_name
HOSTNAME = "postroom.test"  # serve_proc's [server] hostname: the default sender's domain
TIMEOUT = 20.0  # every subprocess and wait in this module
SENDMAIL = Path(sys.executable).parent / "postroom-sendmail"
NOBODY = 65534
PHPMAILER = Path("/usr/share/php/libphp-phpmailer/autoload.php")


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run `bash tests/peers/clients.sh install`",
                    pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _console_script() -> None:
    if not SENDMAIL.exists():
        pytest.fail(f"{SENDMAIL} is missing: `pip install -e .` installs the console script",
                    pytrace=False)


def _subject(tag: str) -> str:
    return f"postroom-sendmail {tag} {uuid.uuid4().hex}"


def _run(args: list[str], input: bytes = b"", env: dict[str, str] | None = None,
         cwd: Path | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*prefix, *args], input=input, capture_output=True, timeout=TIMEOUT,
                         env={**os.environ, **(env or {})}, cwd=cwd)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(),
                                       out.stderr.decode("utf-8", "replace"))


def _sendmail(config: Path, *args: str, input: bytes = b"",
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _run([str(SENDMAIL), "-C", str(config), *args], input=input, env=env)


def _rows(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        c.row_factory = sqlite3.Row
        rows = [dict(r) for r in c.execute(
            "SELECT id, status, sender, recipients, source, subject, raw FROM messages")]
    for r in rows:
        r["recipients"] = json.loads(r["recipients"])
    return rows


def _row(db: Path, subject: str, *, final: bool = False) -> dict[str, Any]:
    """The stored row for ``subject``; with ``final``, once its delivery is over."""
    deadline = time.monotonic() + TIMEOUT
    row = None
    while time.monotonic() < deadline:
        found = [r for r in _rows(db) if r["subject"] == subject]
        assert len(found) <= 1, found
        if found:
            row = found[0]
            if not final or row["status"] not in ("queued", "sending", "deferred"):
                return row
        time.sleep(0.1)
    raise AssertionError(f"no {'final ' if final else ''}row for {subject!r}: {row}")


def _delivered(peers: Any, address: str, subject: str) -> email.message.EmailMessage:
    found = peers.wait_for(address, subject, timeout=TIMEOUT)
    msg = email.message_from_bytes(found.raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def _body(msg: email.message.EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(x.startswith("postroom-sendmail: ") for x in lines), r.stderr


# -- through a running `postroom serve` to the real upstream ------------------------------------
@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    with Postroom(tmp_path_factory.mktemp("sendmail-serve"),
                 connections=smtp_connection(peers.plain_port)) as p:
        yield p


def test_php_mail_function(pr: Postroom, peers: Any) -> None:
    """PHP's own mail() with sendmail_path = "postroom-sendmail -t -i": To from the argument,
    Cc and Bcc from the extra headers; no From given, so Postroom adds one."""
    _need("php")
    subject = _subject("php-mail")
    code = ('$ok = mail("' + RCPT + '", $argv[1], "Hello from mail()\\n.\\nafter a lone dot\\n",'
            ' "Cc: ' + CC + '\\r\\nBcc: ' + BCC + '\\r\\nX-Test: php"); exit($ok ? 0 : 3);')
    r = _run(["php", "-d", f"sendmail_path={SENDMAIL} -t -i -C {pr.config}", "-r", code, "--",
              subject])
    assert r.returncode == 0, r.stdout + r.stderr
    msg = _delivered(peers, RCPT, subject)
    # -i: the lone dot stays (PHP adds a line end of its own)
    assert _body(msg).rstrip("\n") == "Hello from mail()\n.\nafter a lone dot"
    assert msg["Bcc"] is None  # removed, yet delivered to bob (below)
    assert msg["X-Test"] == "php"
    assert msg["From"].addresses[0].addr_spec == f"{USER}@{HOSTNAME}"
    assert msg["Date"] and msg["Message-ID"]
    assert _delivered(peers, BCC, subject)["Bcc"] is None
    _delivered(peers, CC, subject)
    row = _row(pr.db, subject, final=True)
    assert row["status"] == "sent", row
    assert row["source"] == f"sendmail:{USER}"
    assert row["sender"] == f"{USER}@{HOSTNAME}"  # Postfix's default: login name @ origin
    assert row["recipients"] == [RCPT, CC, BCC]


def test_php_mail_with_envelope_sender(pr: Postroom, peers: Any) -> None:
    """mail()'s fifth argument "-fADDRESS" is appended to sendmail_path: the envelope sender;
    the From given by the script stays as written."""
    _need("php")
    subject = _subject("php-mail-f")
    code = ('$ok = mail("' + RCPT + '", $argv[1], "body", "From: Shop <shop@example.org>", '
            '"-fbounces@example.org"); exit($ok ? 0 : 3);')
    r = _run(["php", "-d", f"sendmail_path={SENDMAIL} -t -i -C {pr.config}", "-r", code, "--",
              subject])
    assert r.returncode == 0, r.stdout + r.stderr
    msg = _delivered(peers, RCPT, subject)
    assert str(msg["From"]) == "Shop <shop@example.org>"
    assert msg["Return-Path"] == "<bounces@example.org>"  # added by the upstream's delivery
    assert _row(pr.db, subject, final=True)["sender"] == "bounces@example.org"


PHPMAILER_SCRIPT = """<?php
require '/usr/share/php/libphp-phpmailer/autoload.php';
use PHPMailer\\PHPMailer\\PHPMailer;
$m = new PHPMailer(true);
$m->isSendmail();
$m->CharSet = PHPMailer::CHARSET_UTF8;
$m->setFrom('shop@example.org', 'Shöp Ünïcode');   // also the envelope sender: -f
$m->addAddress('%(to)s');
$m->addBCC('%(bcc)s');
$m->Subject = $argv[1];
$m->Body = "PHPMailer through sendmail\\n.\\nafter the dot\\n";
$m->send();
echo $m->getLastMessageID(), "\\n";
"""


def test_phpmailer_is_sendmail(pr: Postroom, peers: Any, tmp_path: Path) -> None:
    """PHPMailer's isSendmail() runs sendmail_path with "-oi -fSENDER -t" added."""
    _need("php")
    if not PHPMAILER.exists():
        pytest.fail("libphp-phpmailer is not installed: run `bash tests/peers/clients.sh "
                    "install`", pytrace=False)
    script = tmp_path / "send.php"
    script.write_text(PHPMAILER_SCRIPT % {"to": RCPT, "bcc": BCC})
    subject = _subject("phpmailer")
    r = _run(["php", "-d", f"sendmail_path={SENDMAIL} -C {pr.config}", str(script), subject])
    assert r.returncode == 0, r.stdout + r.stderr
    msg = _delivered(peers, RCPT, subject)
    assert msg["From"].addresses[0].display_name == "Shöp Ünïcode"
    assert str(msg["Message-ID"]) == r.stdout.strip()  # PHPMailer's, kept
    assert _body(msg) == "PHPMailer through sendmail\n.\nafter the dot\n"
    assert _delivered(peers, BCC, subject)["Bcc"] is None
    row = _row(pr.db, subject, final=True)
    assert row["status"] == "sent" and row["sender"] == "shop@example.org", row
    assert row["recipients"] == [RCPT, BCC]


def test_mailutils_mail(pr: Postroom, peers: Any, tmp_path: Path) -> None:
    """GNU mailutils' `mail` (it runs "-oi -f ADDR -t"), configured through ~/.mailrc; the
    configuration is found through $POSTROOM_CONFIG."""
    _need("mail")
    (tmp_path / ".mailrc").write_text(f"set sendmail=sendmail://{SENDMAIL}\n")
    subject = _subject("mailutils")
    r = _run(["mail", "-s", subject, "-a", "From: Mail User <mailx@example.org>", RCPT],
             input=b"mailutils body\nsecond line\n",
             env={"HOME": str(tmp_path), "POSTROOM_CONFIG": str(pr.config)})
    assert r.returncode == 0, r.stdout + r.stderr
    msg = _delivered(peers, RCPT, subject)
    assert _body(msg) == "mailutils body\nsecond line\n"
    assert "GNU Mailutils" in str(msg["User-Agent"])
    row = _row(pr.db, subject, final=True)
    assert row["status"] == "sent" and row["source"] == f"sendmail:{USER}", row
    assert row["sender"] == "mailx@example.org"


def test_git_send_email(pr: Postroom, peers: Any, tmp_path: Path) -> None:
    """`git send-email --sendmail-cmd` runs "CMD -i RECIPIENTS..." with the patch on stdin."""
    _need("git")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Dev",
           "GIT_AUTHOR_EMAIL": "dev@example.org", "GIT_COMMITTER_NAME": "Dev",
           "GIT_COMMITTER_EMAIL": "dev@example.org"}
    title = uuid.uuid4().hex
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "base"]):
        assert _run(["git", "-C", str(repo), *args], env=env).returncode == 0
    (repo / "file.txt").write_text("a line\n.\n")
    for args in (["add", "file.txt"], ["commit", "-q", "-m", title]):
        assert _run(["git", "-C", str(repo), *args], env=env).returncode == 0
    r = _run(["git", "-C", str(repo), "send-email", f"--sendmail-cmd={SENDMAIL} -C {pr.config}",
              f"--to={RCPT}", f"--cc={CC}", "--from=Dev <dev@example.org>", "--confirm=never",
              "--suppress-cc=all", "-1"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    subject = f"[PATCH] {title}"
    msg = _delivered(peers, RCPT, subject)
    assert "+." in _body(msg)  # the patch's "+." line, untouched (-i)
    _delivered(peers, CC, subject)
    row = _row(pr.db, subject, final=True)
    assert row["status"] == "sent" and row["recipients"] == [RCPT, CC], row
    assert row["sender"] == f"{USER}@{HOSTNAME}"


def test_cron_style_bare_user_names(pr: Postroom, peers: Any, tmp_path: Path) -> None:
    """cron runs "sendmail -i -FCronDaemon -B8BITMIME -oem USER" with "From: root (Cron Daemon)"
    and "To: USER": bare names get [sendmail] domain, in the envelope and in the fields."""
    config = tmp_path / "postroom.toml"
    config.write_text(f'[server]\ndata_dir = "{pr.root / "data"}"\nhostname = "{HOSTNAME}"\n'
                      '[sendmail]\ndomain = "example.test"\n')
    subject = _subject("cron")
    message = (f"From: root (Cron Daemon)\nTo: testuser\nSubject: {subject}\n"
               "Content-Type: text/plain; charset=UTF-8\n\ncron output ✓\n").encode()
    r = _sendmail(config, "-i", "-FCronDaemon", "-B8BITMIME", "-oem", "testuser",
                  input=message)
    assert r.returncode == 0, r.stderr
    msg = _delivered(peers, RCPT, subject)
    assert str(msg["From"]) == "Cron Daemon <root@example.test>"
    assert str(msg["To"]) == RCPT
    row = _row(pr.db, subject, final=True)
    assert row["recipients"] == [RCPT] and row["sender"] == f"{USER}@example.test", row


# -- [sendmail] server: hand-off to the running server over SMTP --------------------------------
def _handoff_config(tmp_path: Path, sendmail: str) -> Path:
    config = tmp_path / "handoff.toml"
    # The data folder cannot exist: hand-off mode must never touch a store.
    config.write_text('[server]\ndata_dir = "/nonexistent/postroom-data"\n'
                      f'hostname = "web.example"\n[sendmail]\n{sendmail}\n')
    return config


def test_smtp_handoff_trusted(pr: Postroom, peers: Any, tmp_path: Path) -> None:
    config = _handoff_config(tmp_path, f'server = "smtp://127.0.0.1:{pr.smtp_port}"')
    subject = _subject("handoff")
    r = _sendmail(config, "-t", "-i", "-v", input=f"To: {RCPT}\nSubject: {subject}\n\nvia "
                  "SMTP\n".encode())
    assert r.returncode == 0, r.stderr
    assert "queued as" in r.stderr  # -v: the listener's reply
    assert _body(_delivered(peers, RCPT, subject)) == "via SMTP\n"
    row = _row(pr.db, subject, final=True)
    assert row["source"] == "smtp:trusted" and row["sender"] == f"{USER}@web.example", row
    assert not Path("/nonexistent/postroom-data").exists()


def test_smtp_handoff_starttls_auth(pr: Postroom, peers: Any, tmp_path: Path) -> None:
    """STARTTLS verified against the instance's certificate, AUTH as an app whose secret comes
    from the environment; a wrong secret is EX_NOPERM and the message is kept."""
    secret = pr.add_app("webshop")
    config = _handoff_config(tmp_path, f'server = "smtp://127.0.0.1:{pr.smtp_port}"\n'
                             f'starttls = true\nca_file = "{pr.cert}"\nusername = "webshop"\n'
                             'password_env = "SHOP_SENDMAIL_SECRET"')
    subject = _subject("handoff-auth")
    message = f"To: {RCPT}\nSubject: {subject}\n\nauthenticated\n".encode()
    r = _sendmail(config, "-t", input=message, env={"SHOP_SENDMAIL_SECRET": secret})
    assert r.returncode == 0, r.stderr
    _delivered(peers, RCPT, subject)
    assert _row(pr.db, subject, final=True)["source"] == "smtp:webshop"

    home = tmp_path / "home"
    home.mkdir()
    r = _sendmail(config, "-t", input=message,
                  env={"SHOP_SENDMAIL_SECRET": "wrong", "HOME": str(home)})
    assert r.returncode == 77, r.stderr
    _no_traceback(r)
    assert "refused the credentials" in r.stderr
    assert subject in (home / "dead.letter").read_text()


def test_smtp_handoff_server_down_keeps_message(tmp_path: Path) -> None:
    config = _handoff_config(tmp_path, f'server = "smtp://127.0.0.1:{free_port()}"\ntimeout = 5')
    subject = _subject("handoff-down")
    r = _sendmail(config, RCPT, input=f"Subject: {subject}\n\nkeep me\n".encode(),
                  env={"HOME": str(tmp_path)})
    assert r.returncode == 75, r.stderr
    _no_traceback(r)
    assert "cannot reach" in r.stderr and str(tmp_path / "dead.letter") in r.stderr
    [kept] = mailbox.mbox(str(tmp_path / "dead.letter"))
    assert kept["Subject"] == subject
    assert kept["X-Postroom-Envelope-To"] == RCPT
    assert kept.get_payload() == "keep me\n"


# -- a store without a server: behaviour and hostile input ---------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A configuration whose store is in tmp_path (the db is tmp_path/data/postroom.db)."""
    config = tmp_path / "postroom.toml"
    config.write_text(f'[server]\ndata_dir = "data"\nhostname = "{HOSTNAME}"\n')
    return config


def _db(config: Path) -> Path:
    return config.parent / "data" / "postroom.db"


def _stored(config: Path, subject: str) -> tuple[dict[str, Any], email.message.EmailMessage]:
    row = _row(_db(config), subject)
    lf = row["raw"].replace(b"\r\n", b"\n")  # the parser keeps CRs in content
    msg = email.message_from_bytes(lf, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return row, msg


def test_dot_line_ends_input_without_i(store: Path) -> None:
    subject = _subject("dot")
    r = _sendmail(store, RCPT, input=f"Subject: {subject}\n\nbefore\n.\nafter\n".encode())
    assert r.returncode == 0, r.stderr
    row, msg = _stored(store, subject)
    assert msg.get_content() == "before\n"
    assert row["raw"].endswith(b"\r\n\r\nbefore\r\n")


def test_stored_mail_gets_its_accepted_line_in_the_system_log(store: Path) -> None:
    """Store mode: no server saw the message arrive, so postroom-sendmail writes the
    "accepted" line to the system log ([sendmail] syslog, facility mail), with its id."""
    log_sock = store.parent / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(log_sock))
        listener.settimeout(TIMEOUT)
        store.write_text(store.read_text() + f'[sendmail]\nsyslog = "{log_sock}"\n')
        subject = _subject("syslog")
        r = _sendmail(store, RCPT, input=f"Subject: {subject}\n\nhello\n".encode())
        assert r.returncode == 0, r.stderr
        line = listener.recv(4096).decode()
    row, _ = _stored(store, subject)
    assert line.startswith("<22>")  # facility mail, severity info
    assert "postroom-sendmail[" in line and f"{row['id']}: accepted from=<" in line
    # a system log that is not there loses the line, never the message
    store.write_text(store.read_text().replace(str(log_sock), str(store.parent / "none")))
    r = _sendmail(store, RCPT, input=f"Subject: {subject} 2\n\nhello\n".encode())
    assert r.returncode == 0 and not r.stderr, r.stderr
    _stored(store, f"{subject} 2")


def test_headers_completed_and_cleaned(store: Path) -> None:
    """Mixed LF/CRLF input with a leading mbox From_ line: CRLF throughout, From_ skipped,
    Bcc/Return-Path/Content-Length removed, From (with -F, RFC 2047), Date, Message-ID added."""
    subject = _subject("complete")
    raw = (f"From someone@example.org Thu Nov 20 10:00:00 2026\nTo: {RCPT}\r\n"
           f"Bcc: {BCC}\nReturn-Path: <x@example.org>\nContent-Length: 3\n"
           f"Subject: {subject}\r\n\r\nline one\nline two\r\n").encode()
    r = _sendmail(store, "-t", "-F", "Jörg Müller", "-f", "me@example.org", input=raw)
    assert r.returncode == 0, r.stderr
    row, msg = _stored(store, subject)
    stored = row["raw"]
    assert b"\n" not in stored.replace(b"\r\n", b"")
    assert not stored.startswith(b"From ")
    for gone in ("Bcc", "Return-Path", "Content-Length"):
        assert msg[gone] is None, gone
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["From"].addresses[0].addr_spec == "me@example.org"
    assert b"=?utf-8?" in stored.split(b"\r\n\r\n")[0]  # encoded, not raw UTF-8
    assert msg["Date"].datetime is not None
    assert str(msg["Message-ID"]).endswith("@example.org>")
    assert msg.get_content() == "line one\nline two\n"
    assert row["recipients"] == [RCPT, BCC] and row["sender"] == "me@example.org"


def test_t_adds_to_argv_recipients_and_resent_wins(store: Path) -> None:
    """As Postfix: -t adds the header recipients to the command line's (duplicates once);
    when Resent-To/Cc/Bcc exist, only they are read."""
    subject = _subject("t-union")
    r = _sendmail(store, "-t", "a@example.org", RCPT,
                  input=f"To: {RCPT}, b@example.org\nSubject: {subject}\n\nx\n".encode())
    assert r.returncode == 0, r.stderr
    assert _stored(store, subject)[0]["recipients"] == ["a@example.org", RCPT, "b@example.org"]
    subject = _subject("resent")
    r = _sendmail(store, "-t", input=(f"To: old@example.org\nResent-To: new@example.org\n"
                                      f"Resent-Bcc: hidden@example.org\nSubject: {subject}\n\n"
                                      "x\n").encode())
    assert r.returncode == 0, r.stderr
    row, msg = _stored(store, subject)
    assert row["recipients"] == ["new@example.org", "hidden@example.org"]
    assert msg["Resent-Bcc"] is None and msg["To"] == "old@example.org"


def test_ignored_flags_and_subcommand(store: Path) -> None:
    """Flags that sendmail users pass are accepted; `postroom sendmail` passes its arguments
    untouched, `--` included."""
    subject = _subject("flags")
    r = _sendmail(store, "-oem", "-odi", "-odb", "-oQ/var/spool", "-om", "-v", "-N", "never",
                  "-B", "8BITMIME", "-X", "/tmp/log", "-U", "-L", "label", "-R", "hdrs", "-V",
                  "envid", "-Am", "-G", "-h", "10", "-bm", "-q30m", "-ti", "--", RCPT,
                  input=f"Subject: {subject}\n\nflags\n".encode())
    assert r.returncode == 0, r.stderr
    assert _stored(store, subject)[0]["recipients"] == [RCPT]
    subject = _subject("subcommand")
    r = _run([sys.executable, "-m", "postroom.cli", "sendmail", "-i", "-C", str(store), "--",
              RCPT], input=f"Subject: {subject}\n\n.\n".encode())
    assert r.returncode == 0, r.stderr
    row, msg = _stored(store, subject)
    assert row["source"] == f"sendmail:{USER}" and msg.get_content() == ".\n"
    for done in (["-bi"], ["-I"], ["--help"]):
        assert _sendmail(store, *done).returncode == 0


@pytest.mark.parametrize(("args", "status", "says"), [
    (["-Z", RCPT], 64, "unknown option -Z"),
    (["--weird", RCPT], 64, "unknown option --weird"),
    (["-bs"], 64, "-bs"),
    (["-bp"], 64, "postroom log"),
    (["-q"], 64, "deliver queued mail"),
    (["-B", "9BIT", RCPT], 64, "7BIT or 8BITMIME"),
    (["-f"], 64, "needs a value"),
    ([], 64, "no recipients"),
    (["-F", "Evil\r\nBcc: victim@example.org", RCPT], 64, "line break"),
    (["-f", "a@example.org\nBcc: victim@example.org", RCPT], 64, "line break"),
    (["-f", "one@example.org, two@example.org", RCPT], 64, "one address"),
    (["-f", "not an address", RCPT], 64, "one address"),
    (["-f", "bad@@example.org", RCPT], 64, "one address"),
    (["-f", "me@-bad-.example.org", RCPT], 64, "envelope sender: invalid domain"),
    (["John Smith"], 67, "not an address list"),
    ([f"{RCPT}\r\nBcc: victim@example.org"], 67, "line break"),
    (["bad@@example.org"], 67, "not an address list"),
    (["me@-bad-.example.org"], 67, "invalid domain"),
    (["Just A Name <>"], 67, "holds no address"),
], ids=lambda v: v if isinstance(v, int) else None)
def test_command_line_errors_stop_before_reading(store: Path, args: list[str], status: int,
                                                 says: str) -> None:
    r = _sendmail(store, *args, input=b"Subject: never\n\nnot read\n",
                  env={"HOME": str(store.parent)})
    assert r.returncode == status, r.stderr
    _no_traceback(r)
    assert says in r.stderr
    assert not (store.parent / "dead.letter").exists()
    assert _rows(_db(store)) == []


def test_name_environment_variable_cannot_inject(store: Path) -> None:
    r = _sendmail(store, RCPT, input=b"x\n", env={"NAME": "Evil\nBcc: victim@example.org"})
    assert r.returncode == 64 and "NAME environment variable" in r.stderr, r.stderr


@pytest.mark.parametrize(("message", "status", "says"), [
    (b"Subject: no recipients\n\nbody\n", 64, "no recipient addresses"),
    (b"To: bad@@example.org\nSubject: bad\n\nbody\n", 65, "To: field"),
    (b"To: John Smith\nSubject: bad\n\nbody\n", 65, "To: field"),
    (b"To: caf\xe9@example.org\nSubject: latin-1\n\nbody\n", 65, "neither ASCII nor UTF-8"),
], ids=["no-recipients", "bad-address", "not-an-address", "not-utf8"])
def test_bad_message_is_refused_and_kept(store: Path, message: bytes, status: int,
                                         says: str) -> None:
    r = _sendmail(store, "-t", input=message, env={"HOME": str(store.parent)})
    assert r.returncode == status, r.stderr
    _no_traceback(r)
    assert says in r.stderr
    [kept] = mailbox.mbox(str(store.parent / "dead.letter"))
    assert kept["X-Postroom-Error"] and says.split()[0] in kept["X-Postroom-Error"]
    assert kept.get_payload() == "body\n"
    assert _rows(_db(store)) == []


def test_message_over_the_size_limit(tmp_path: Path) -> None:
    config = tmp_path / "postroom.toml"
    config.write_text('[server]\ndata_dir = "data"\nmax_message_size = 2048\n')
    r = _sendmail(config, "-i", RCPT, input=b"Subject: big\n\n" + b"x" * 5000 + b"\n",
                  env={"HOME": str(tmp_path)})
    assert r.returncode == 65 and "max_message_size" in r.stderr, r.stderr
    _no_traceback(r)


def test_no_configuration_found(tmp_path: Path) -> None:
    """Without a configuration it never makes a store in whatever folder it runs in."""
    if Path("/etc/postroom/postroom.toml").exists():
        pytest.fail("/etc/postroom/postroom.toml exists on this machine: the test needs none")
    env = {k: v for k, v in os.environ.items() if k != "POSTROOM_CONFIG"}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    out = subprocess.run([str(SENDMAIL), RCPT], input=b"Subject: s\n\nb\n", capture_output=True,
                         timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert out.returncode == 78, out.stderr
    assert b"no Postroom configuration found" in out.stderr
    assert not (tmp_path / "postroom-data").exists()
    assert (tmp_path / "dead.letter").exists()


# -- another user: unreadable configuration, store not writable ----------------------------------
@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A folder another user can enter (pytest's own tmp folders are 0700), with a store
    configuration as in ``store``."""
    root = Path(tempfile.mkdtemp(prefix="postroom-sendmail-"))
    try:
        root.chmod(0o755)
        config = root / "postroom.toml"
        config.write_text(f'[server]\ndata_dir = "data"\nhostname = "{HOSTNAME}"\n')
        config.chmod(0o644)
        yield config
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_other_user(config: Path) -> tuple[tuple[str, ...], Path]:
    """(command prefix, writable HOME) to run as a user who does not own ``config``'s files:
    nobody when the tests run as root, else this user (the files are then chmod'ed)."""
    home = config.parent / "other-home"
    home.mkdir()
    if os.geteuid() != 0:
        return (), home
    _need("setpriv")
    os.chown(home, NOBODY, NOBODY)
    return ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"), home


def test_unreadable_configuration(shared: Path) -> None:
    prefix, home = _as_other_user(shared)
    shared.chmod(0o600 if prefix else 0o000)
    subject = _subject("unreadable")
    # Named in the environment: another user's -C file is refused (test_hostile_sendmail).
    r = _run([str(SENDMAIL), RCPT], prefix=prefix,
             env={"HOME": str(home), "POSTROOM_CONFIG": str(shared)},
             input=f"Subject: {subject}\n\nkept\n".encode())
    assert r.returncode == 78, r.stderr
    _no_traceback(r)
    assert f"cannot read {shared}" in r.stderr
    [kept] = mailbox.mbox(str(home / "dead.letter"))
    assert kept["Subject"] == subject
    assert (home / "dead.letter").stat().st_mode & 0o777 == 0o600


def test_store_not_writable_keeps_message(shared: Path) -> None:
    first = _subject("first")
    assert _sendmail(shared, RCPT, input=f"Subject: {first}\n\nx\n".encode()).returncode == 0
    prefix, home = _as_other_user(shared)
    data = shared.parent / "data"
    if not prefix:
        data.chmod(0o500)
    try:
        subject = _subject("not-writable")
        r = _run([str(SENDMAIL), RCPT], prefix=prefix,
                 env={"HOME": str(home), "POSTROOM_CONFIG": str(shared)},
                 input=f"Subject: {subject}\n\nkept too\n".encode())
    finally:
        data.chmod(0o700)
    assert r.returncode == 75, r.stderr
    _no_traceback(r)
    assert "[sendmail] server" in r.stderr  # says how to fix it
    [kept] = mailbox.mbox(str(home / "dead.letter"))
    assert kept["Subject"] == subject and kept.get_payload() == "kept too\n"
    assert [r["subject"] for r in _rows(_db(shared))] == [first]


def test_dead_letter_setting_and_planted_symlink(tmp_path: Path) -> None:
    """[sendmail] dead_letter is used first; a symlink planted there is never followed (the
    next place, ~/dead.letter, takes the message). The file must be inside the data folder
    (test_hostile_sendmail checks the refusals)."""
    target = tmp_path / "victim"
    target.write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "planted").symlink_to(target)
    config = tmp_path / "postroom.toml"
    config.write_text('[server]\ndata_dir = "data"\n[sendmail]\ndead_letter = "data/planted"\n')
    home = tmp_path / "home"
    home.mkdir()
    r = _sendmail(config, "-t", input=b"Subject: nobody\n\nbody\n", env={"HOME": str(home)})
    assert r.returncode == 64, r.stderr
    assert target.read_text() == ""
    assert f"kept in {home / 'dead.letter'}" in r.stderr
    (tmp_path / "data" / "planted").unlink()
    r = _sendmail(config, "-t", input=b"Subject: nobody\n\nbody\n", env={"HOME": str(home)})
    assert f"kept in {tmp_path / 'data' / 'planted'}" in r.stderr
    assert len(mailbox.mbox(str(tmp_path / "data" / "planted"))) == 1


# -- start-up cost: PHP runs the command once per message ----------------------------------------
# What the store path must not import (each cost it milliseconds to tens of ms, or belongs to
# another door): pydantic and the settings models (a configuration the light loader vouches
# for, ingress/sendmail_settings.py), the ORM and migrations, crypto, HTTP and OAuth stacks,
# DKIM signing, the event loop and TLS (the transports'), logging, uuid, entry points, and
# Postroom's delivery side.
_NOT_ON_THE_STORE_PATH = ("pydantic", "pydantic_core", "typing_extensions", "annotated_types",
                          "sqlalchemy", "alembic", "cryptography", "argon2", "authlib",
                          "fastapi", "starlette", "uvicorn", "httpx", "dkim", "asyncio", "ssl",
                          "smtplib", "psycopg", "idna", "logging", "uuid",
                          "importlib.metadata", "zipfile")
_NOT_FROM_POSTROOM = ("postroom.transports", "postroom.queue", "postroom.runtime",
                      "postroom.store.db", "postroom.store.schema", "postroom.secrets",
                      "postroom.policy", "postroom.apps", "postroom.connection_settings",
                      "postroom.dkim", "postroom.oauth", "postroom.routing", "postroom.settings",
                      "postroom.config_load", "postroom.maillog", "postroom.logformat")
# Modules one store-mode run may hold in all, the interpreter's own included (about 140 on
# CPython 3.11): room for a few more, not for another library.
_STORE_PATH_MODULES = 160


def _imported(stderr: str) -> set[str]:
    """The modules a `python -X importtime` run reported importing."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


def test_store_mode_imports_only_what_it_needs(tmp_path: Path) -> None:
    """The common path (a store whose schema is current) reads the configuration without
    pydantic and writes the row with the standard library's sqlite3: connections (with DKIM
    and OAuth tables) and routes are present here and still import nothing of theirs, nor
    does an environment override. Guarded by the modules one real run imports, never by its
    timing (bench/sendmail_bench.py times it)."""
    config = tmp_path / "postroom.toml"
    config.write_text(
        f'[server]\ndata_dir = "data"\nhostname = "{HOSTNAME}"\n'
        '[[connections]]\nname = "primary"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
        'dkim = { domain = "example.org", selector = "s1" }\n'
        '[[connections]]\nname = "google"\ntransport = "gmail"\nuser = "me@example.org"\n'
        'oauth = { provider = "google", client_id = "id", client_secret_env = "SECRET" }\n'
        '[[routes]]\nchain = ["primary", "google"]\n')
    # The first run creates and migrates the store (the full path, SQLAlchemy and Alembic).
    assert _sendmail(config, RCPT, input=b"Subject: first\n\nx\n").returncode == 0
    subject = _subject("imports")
    r = _run([sys.executable, "-X", "importtime", str(SENDMAIL), "-C", str(config), "-t", "-i"],
             input=f"To: {RCPT}\nSubject: {subject}\n\nx\n".encode(),
             env={"POSTROOM_DELIVERY__MAX_LIFETIME": "86400"})
    assert r.returncode == 0, r.stderr
    loaded = _imported(r.stderr)
    assert {"sqlite3", "postroom.ingress.sendmail_settings", "postroom.store.direct"} <= loaded
    heavy = sorted(m for m in loaded if m in _NOT_ON_THE_STORE_PATH
                   or m.split(".")[0] in _NOT_ON_THE_STORE_PATH
                   or m.startswith(_NOT_FROM_POSTROOM))
    assert heavy == [], heavy
    assert len(loaded) <= _STORE_PATH_MODULES, sorted(loaded)
    row, _ = _stored(config, subject)
    assert row["recipients"] == [RCPT] and row["status"] == "queued"


def test_smtp_handoff_imports_no_store(tmp_path: Path) -> None:
    config = tmp_path / "postroom.toml"
    config.write_text(f'[server]\nhostname = "h.test"\n[sendmail]\n'
                      f'server = "smtp://127.0.0.1:{free_port()}"\n')
    r = _run([sys.executable, "-X", "importtime", str(SENDMAIL), "-C", str(config), RCPT],
             input=b"Subject: s\n\nx\n", env={"HOME": str(tmp_path)})
    assert r.returncode == 75, r.stderr  # nothing listens there: kept in dead.letter
    loaded = _imported(r.stderr)
    assert "smtplib" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("sqlalchemy", "alembic", "asyncio",
                                                         "pydantic", "logging")
                or m.startswith(_NOT_FROM_POSTROOM)]


def test_store_row_is_the_queues_row(tmp_path: Path) -> None:
    """store/direct.py writes, without SQLAlchemy, the very row Queue.enqueue_sync writes
    (column values and SQLite types); it writes nothing and leaves the work to the full path
    when there is no database yet, the schema is not the newest, or it is not SQLite."""
    import dataclasses

    from postroom.envelope import Envelope, new_id
    from postroom.queue.sql import Queue
    from postroom.store import direct
    from postroom.store.db import make_engine, migrate

    raw = (b"From: A <a@example.org>\r\nTo: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\n"
           b"Subject: row\r\nMessage-ID: <1@example.org>\r\n\r\nbody\r\n")
    later = time.time() + 3600
    envs = [Envelope("a@example.org", [RCPT], raw, source="sendmail:x"),
            Envelope("", ["jörg@example.org", RCPT], raw, source="s" * 100, connection="c",
                     tags=["t1", "t2"], metadata={"k": "välue"}, not_before=later,
                     expires_at=later + 60, priority=1)]
    db = tmp_path / "data" / "postroom.db"
    url = f"sqlite:///{db}"
    assert direct.enqueue(envs[0], database_url=url) is None
    assert not db.exists()
    engine = make_engine(url)
    try:
        migrate(engine)
        queue = Queue(engine)
        pairs = []
        for env in envs:
            by_queue = dataclasses.replace(env, id=new_id())
            by_direct = dataclasses.replace(env, id=new_id())
            queue.enqueue_sync(by_queue)
            assert direct.enqueue(by_direct, database_url=url) == by_direct.id
            pairs.append((by_queue.id, by_direct.id))
            assert queue.log.get(by_direct.id) is not None
        with contextlib.closing(sqlite3.connect(db)) as c:
            columns = [r[1] for r in c.execute("PRAGMA table_info(messages)")]
            clocked = {"id", "created_at", "updated_at", "next_attempt_at", "expires_at"}
            select = ", ".join(f"{col}, typeof({col})" for col in columns if col not in clocked)
            for a, b in pairs:
                got = [c.execute(f"SELECT {select} FROM messages WHERE id = ?", (i,)).fetchone()
                       for i in (a, b)]
                assert got[0] == got[1]
            # An older schema: the full path migrates it; this one writes nothing.
            c.execute("UPDATE alembic_version SET version_num = '0001'")
            c.commit()
            before = c.execute("SELECT count(*) FROM messages").fetchone()
            assert direct.enqueue(envs[0], database_url=url) is None
            assert c.execute("SELECT count(*) FROM messages").fetchone() == before
    finally:
        engine.dispose()
    assert direct.enqueue(envs[0], database_url="postgresql://u@127.0.0.1:9/db") is None
    assert direct.enqueue(envs[0], database_url="sqlite:///:memory:") is None


def test_configuration_errors_of_what_it_uses(tmp_path: Path) -> None:
    """A bad value the command uses is still refused with its configuration status (78), the
    message kept; a bad [[connections]] entry, which only the worker uses, no longer turns mail
    away (a running `postroom serve` delivers it; `postroom serve` and `doctor` report it)."""
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "postroom.toml"
    for bad in ('max_message_size = 10\n', 'unknown_key = 1\n',
                '[sendmail]\nserver = "http://x"\n', '[sendmail]\nusername = "app"\n',
                '[delivery]\nmax_lifetime = -1\n', '[nonsense]\n'):
        config.write_text(f'[server]\ndata_dir = "data"\n{bad}')
        r = _sendmail(config, RCPT, input=b"Subject: kept\n\nx\n", env={"HOME": str(home)})
        assert r.returncode == 78, (bad, r.stderr)
        _no_traceback(r)
        assert "invalid configuration" in r.stderr or "unknown section" in r.stderr, r.stderr
    assert len(mailbox.mbox(str(home / "dead.letter"))) == 6
    config.write_text('[server]\ndata_dir = "data"\n[[connections]]\nname = "x"\n'
                      'transport = "smtp"\nport = "not a port"\n')
    subject = _subject("bad-connection")
    r = _sendmail(config, RCPT, input=f"Subject: {subject}\n\nx\n".encode())
    assert r.returncode == 0, r.stderr
    assert _stored(config, subject)[0]["status"] == "queued"
