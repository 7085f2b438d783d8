"""The WordPress must-use plugin (`postroom wordpress-plugin`) in Debian's WordPress on MariaDB
(tests/wordpress_site.py), handing wp_mail() to a real `postroom serve`, which delivers to the
real Postfix + Dovecot peer through a forwarder the test can take down (the upstream going
away). The plugin is the generated file, dropped into wp-content/mu-plugins as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, smtp_connection
from wordpress_site import Forwarder, MariaDB, WordPressSite

pytestmark = [pytest.mark.peers]

USER, CC, BCC = "testuser@example.test", "alice@example.test", "bob@example.test"
TIMEOUT = 30.0


@dataclass
class Stack:
    server: Postroom
    site: WordPressSite
    upstream: Forwarder
    smtp_password: str
    title: str


def plugin(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "postroom.cli", "wordpress-plugin", *args],
                         capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Stack]:
    missing = [p for p in ("php", "mariadb-install-db") if shutil.which(p) is None]
    if missing or not Path("/usr/share/wordpress/wp-settings.php").exists():
        pytest.fail(f"WordPress/MariaDB/PHP not installed ({missing}): run "
                    "`bash tests/peers/wordpress.sh install` (scripts/test.sh does)",
                    pytrace=False)
    root = tmp_path_factory.mktemp("wordpress")
    upstream = Forwarder(peers.plain_port).start()
    db = MariaDB()
    server = Postroom(root / "postroom", connections=smtp_connection(upstream.port))
    site: WordPressSite | None = None
    try:
        db.start()
        server.start()
        password, key = server.add_app_keys("wordpress")
        title = f"WP {uuid.uuid4().hex[:8]}"
        site = WordPressSite(root, db, {
            "POSTROOM_API_KEY": key, "POSTROOM_WRONG_KEY": "wordpress.not-the-key",
            "POSTROOM_SMTP_PASSWORD": password})
        site.start(title, USER)
        yield Stack(server, site, upstream, password, title)
    finally:
        if site is not None:
            site.stop()
        server.stop()
        db.stop()
        upstream.stop()


def api_plugin(server: Postroom, *extra: str) -> str:
    return plugin("--api", f"http://127.0.0.1:{server.http_port}", *extra)


def wait_status(server: Postroom, subject: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        out = server.cli("log", "--text", subject, "--json")
        assert out.returncode == 0, out.stderr.decode()
        rows = [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]
        if rows and rows[0]["status"] == status:
            return rows[0]
        time.sleep(0.3)
    raise AssertionError(f"{subject!r} not {status} in `postroom log` after {TIMEOUT}s: {rows}")


def source_of(server: Postroom, subject: str) -> str:
    con = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        [(source,)] = con.execute("SELECT source FROM messages WHERE subject = ?",
                                  (subject,)).fetchall()
    finally:
        con.close()
    return str(source)


def body(msg: EmailMessage, kind: str) -> str:
    part = msg.get_body((kind,))
    assert part is not None, f"no text/{kind} part"
    return str(part.get_content())


def test_password_reset_mail_reaches_the_maildir_through_the_api(
        stack: Stack, peers: Any) -> None:
    stack.site.install_plugin(api_plugin(stack.server))
    before = {m["Message-ID"] for m in peers.messages(USER)}
    status, location, page = stack.site.lost_password("admin")
    assert status == 302 and "checkemail=confirm" in location, page[-2000:]

    def reset(m: EmailMessage) -> bool:
        return m["Message-ID"] not in before and "Password Reset" in str(m["Subject"])
    msg = peers.wait_for(USER, reset, timeout=TIMEOUT)
    assert stack.title in str(msg["Subject"])
    assert "action=rp" in body(msg, "plain") and "login=admin" in body(msg, "plain")
    assert source_of(stack.server, str(msg["Subject"])) == "api:wordpress"


def test_from_reply_to_cc_bcc_html_and_attachments_stay_intact(
        stack: Stack, peers: Any, tmp_path: Path) -> None:
    stack.site.install_plugin(api_plugin(stack.server))
    subject = f"wp html {uuid.uuid4().hex[:8]} ✓"
    pdf = tmp_path / "Rechnung März.pdf"
    pdf.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 40)
    out = stack.site.send(
        to=USER, subject=subject, message="<p>Grüße <b>aus</b> WordPress</p>", html=True,
        headers=["From: Shöp <shop@example.org>", "Reply-To: help@example.org",
                 f"Cc: {CC}", f"Bcc: {BCC}"],
        attachments=[str(pdf)])
    assert out == {"ok": True, "errors": []}
    msg = peers.wait_for(USER, subject, timeout=TIMEOUT)
    assert msg["From"] == "Shöp <shop@example.org>" and msg["Reply-To"] == "help@example.org"
    assert msg["Cc"] == CC and msg["Bcc"] is None
    assert body(msg, "html").strip() == "<p>Grüße <b>aus</b> WordPress</p>"
    files = {p.get_filename(): p.get_content() for p in msg.iter_attachments()}
    assert files == {"Rechnung März.pdf": pdf.read_bytes()}
    for other in (CC, BCC):  # the envelope carried Cc and Bcc
        peers.wait_for(other, subject, timeout=TIMEOUT)


def test_mail_sent_while_the_upstream_is_down_is_delivered_when_it_returns(
        stack: Stack, peers: Any) -> None:
    stack.site.install_plugin(api_plugin(stack.server))
    subject = f"wp down {uuid.uuid4().hex[:8]}"
    stack.upstream.stop()
    try:
        assert stack.site.send(to=USER, subject=subject, message="kept safe") == {
            "ok": True, "errors": []}
        row = wait_status(stack.server, subject, "deferred")
        assert row["id"]
    finally:
        stack.upstream.start()
    peers.wait_for(USER, subject, timeout=TIMEOUT)
    wait_status(stack.server, subject, "sent")


def test_a_refusal_reaches_wp_mail_and_wp_mail_failed(stack: Stack) -> None:
    stack.site.install_plugin(api_plugin(stack.server, "--key-env", "POSTROOM_WRONG_KEY"))
    out = stack.site.send(to=USER, subject="never sent", message="x")
    assert out["ok"] is False
    [error] = out["errors"]
    assert error.startswith("Postroom: refused (HTTP 401, ") and "Fix: " in error, error
    # The password-reset page says it could not send, and the site's hook got the reason.
    before = len(stack.site.failures())
    status, _, page = stack.site.lost_password("admin")
    assert status == 200 and "could not be sent" in page
    assert stack.site.failures()[before:] == [stack.site.failures()[-1]]
    assert "HTTP 401" in stack.site.failures()[-1]


def test_smtp_mode_with_the_app_credential(stack: Stack, peers: Any) -> None:
    stack.site.install_plugin(plugin("--smtp", f"127.0.0.1:{stack.server.smtp_port}",
                                     "--username", "wordpress"))
    subject = f"wp smtp {uuid.uuid4().hex[:8]}"
    out = stack.site.send(to=USER, subject=subject, message="<p>over SMTP</p>", html=True,
                          headers=[f"Bcc: {BCC}", "Reply-To: help@example.org"])
    assert out == {"ok": True, "errors": []}
    msg = peers.wait_for(USER, subject, timeout=TIMEOUT)
    assert msg["Reply-To"] == "help@example.org" and msg["Bcc"] is None
    peers.wait_for(BCC, subject, timeout=TIMEOUT)
    assert source_of(stack.server, subject) == "smtp:wordpress"
    # STARTTLS, Postroom's self-signed certificate verified with --cafile.
    stack.site.install_plugin(plugin("--smtp", f"127.0.0.1:{stack.server.smtp_port}",
                                     "--security", "starttls", "--cafile",
                                     str(stack.server.cert), "--username", "wordpress"))
    subject = f"wp starttls {uuid.uuid4().hex[:8]}"
    assert stack.site.send(to=USER, subject=subject, message="over TLS") == {
        "ok": True, "errors": []}
    peers.wait_for(USER, subject, timeout=TIMEOUT)
    # A wrong password: refused at AUTH, reported back to the caller.
    stack.site.install_plugin(plugin("--smtp", f"127.0.0.1:{stack.server.smtp_port}",
                                     "--username", "wordpress", "--key-env",
                                     "POSTROOM_WRONG_KEY"))
    out = stack.site.send(to=USER, subject="never sent either", message="x")
    assert out["ok"] is False and "authenticate" in out["errors"][0], out


# -- the generator alone (no site) ----------------------------------------------------------
SETTINGS_OF = r"""
define('ABSPATH', '/');
function add_filter(...$a) {}
function add_action(...$a) {}
include $argv[1];
echo json_encode(POSTROOM_WP_SETTINGS);
"""


def settings_of(php: str, tmp_path: Path) -> dict[str, Any]:
    """The settings array as PHP reads it from the generated file."""
    path = tmp_path / "postroom.php"
    path.write_text(php)
    out = subprocess.run(["php", "-r", SETTINGS_OF, str(path)], capture_output=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr.decode() + out.stdout.decode()
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_what_the_user_types_stays_data(tmp_path: Path) -> None:
    odd = "wp'); system('id'); //\\"
    php = plugin("--smtp", "[::1]:2525", "--username", odd, "--timeout", "7")
    assert settings_of(php, tmp_path) == {
        "mode": "smtp", "api_url": "", "smtp_host": "::1", "smtp_port": 2525,
        "security": "none", "username": odd, "secret_name": "POSTROOM_SMTP_PASSWORD",
        "secret": "", "cafile": "", "timeout": 7}
    assert "No secret in this file" in php


def test_a_secret_is_written_only_when_asked(tmp_path: Path) -> None:
    base = ("--api", "https://mail.example.org", "--key-env", "WP_POSTROOM_KEY")
    env = {"WP_POSTROOM_KEY": "wordpress.s3cr'et"}
    php = plugin(*base)
    assert settings_of(php, tmp_path)["secret"] == "" and "s3cr" not in php
    out = subprocess.run([sys.executable, "-m", "postroom.cli", "wordpress-plugin", *base,
                          "--embed-secret"], capture_output=True, timeout=60,
                         env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr.decode()
    php = out.stdout.decode()
    assert settings_of(php, tmp_path)["secret"] == env["WP_POSTROOM_KEY"]
    assert "THIS FILE CONTAINS A SECRET" in php and "keep the file private" in out.stderr.decode()


@pytest.mark.parametrize(("args", "code"), [
    ((), "wordpress.mode"),
    (("--api", "http://mail.example.org:8025"), "wordpress.api"),
    (("--api", "ftp://127.0.0.1"), "wordpress.api"),
    (("--smtp", "mail.example.org"), "wordpress.smtp"),
    (("--smtp", "mail.example.org:587", "--security", "none", "--username", "wp"),
     "wordpress.security"),
    (("--api", "http://127.0.0.1:8025", "--key-env", "key; rm"), "wordpress.secret_name"),
    (("--api", "http://127.0.0.1:8025", "--embed-secret", "--key-env", "UNSET_FOR_SURE_X"),
     "wordpress.embed"),
])
def test_bad_choices_are_refused_with_the_fix(args: tuple[str, ...], code: str) -> None:
    out = subprocess.run([sys.executable, "-m", "postroom.cli", "wordpress-plugin", *args],
                         capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and out.stdout == b""
    assert f"({code})" in out.stderr.decode() and "Traceback" not in out.stderr.decode()
