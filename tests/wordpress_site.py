"""A throw-away WordPress site for tests: Debian's ``wordpress`` package served by PHP's
built-in web server on a free loopback port, on a private MariaDB (its own datadir and unix
socket, no TCP), as tests/peers/wordpress.sh installs them.

Debian's /usr/share/wordpress/wp-config.php reads /etc/wordpress/config-HOST.php; nothing is
written to /etc here: the site's document root is a folder of its own with copies of
WordPress's top-level scripts (so that ABSPATH, and the wp-config.php beside them, are that
folder's) and links to wp-includes and wp-admin; wp-content (mu-plugins) is the test's too.
Every wait is bounded; stop() ends only the processes started here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from serve_proc import free_port, wait_port

WORDPRESS = Path("/usr/share/wordpress")
MARIADBD = "/usr/sbin/mariadbd"
START_TIMEOUT = 60.0

# Test-only scripts in the document root, beside WordPress's own.
SEND_PHP = r"""<?php
// POST a JSON {to, subject, message, headers, attachments, html}: wp_mail() it and answer
// {"ok": what wp_mail returned, "errors": what wp_mail_failed got}.
require __DIR__ . '/wp-load.php';
$in = json_decode(file_get_contents('php://input'), true);
$errors = [];
add_action('wp_mail_failed', function ($e) use (&$errors) {
    $errors[] = $e->get_error_message();
});
if (!empty($in['html'])) {
    add_filter('wp_mail_content_type', function () { return 'text/html'; });
}
$ok = wp_mail($in['to'], $in['subject'], $in['message'], $in['headers'] ?? [],
              $in['attachments'] ?? []);
header('Content-Type: application/json');
echo json_encode(['ok' => $ok, 'errors' => $errors]);
"""
INSTALL_PHP = r"""<?php
// php install.php TITLE USER EMAIL PASSWORD: wp_install() without the web form.
define('WP_INSTALLING', true);
require __DIR__ . '/wp-load.php';
require_once ABSPATH . 'wp-admin/includes/upgrade.php';
add_filter('pre_wp_mail', '__return_true');  // no "new site" mail from the installer
$r = wp_install($argv[1], $argv[2], $argv[3], true, '', wp_slash($argv[4]));
echo json_encode(['user_id' => $r['user_id']]), "\n";
"""
# Every wp_mail_failed of every request (the password-reset page shows no detail). And the
# site's default From, wordpress@<host of the site's URL>, is wordpress@127.0.0.1 here, which
# no mail server takes: a real site's is its domain's.
RECORDER_PHP = r"""<?php
add_filter('wp_mail_from', function ($from) {
    return $from === 'wordpress@127.0.0.1' ? 'wordpress@example.org' : $from;
});
add_action('wp_mail_failed', function ($e) {
    file_put_contents(WP_CONTENT_DIR . '/mail-failed.jsonl',
        json_encode(['message' => $e->get_error_message()]) . "\n", FILE_APPEND | LOCK_EX);
});
"""


def _wait(predicate: Any, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} after {timeout}s\n{tail}")
        time.sleep(0.1)


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaped either way."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class MariaDB:
    """A private MariaDB server: datadir and socket in a temporary folder, no networking."""

    def __init__(self) -> None:
        # A short path: a unix socket's path is limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="wpdb-"))
        self.socket = self.root / "sock"
        self.log = self.root / "mariadb.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MariaDB:
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.root / 'data'}",
             "--auth-root-authentication-method=socket", "--skip-test-db", *user],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            check=True, timeout=START_TIMEOUT)
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.root / 'data'}",
             f"--socket={self.socket}", "--skip-networking", f"--log-error={self.log}",
             f"--pid-file={self.root / 'pid'}", "--innodb-buffer-pool-size=16M",
             "--skip-log-bin", *user],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        _wait(lambda: self.socket.exists() or self.proc is None or self.proc.poll() is not None,
              START_TIMEOUT, "mariadbd did not start", self.log)
        if not self.socket.exists():
            raise RuntimeError(f"mariadbd exited:\n{self.log.read_text()[-3000:]}")
        return self

    def sql(self, statements: str) -> None:
        subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                        "-e", statements], check=True, timeout=30, capture_output=True,
                       stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _terminate(proc, 30)
        shutil.rmtree(self.root, ignore_errors=True)


class WordPressSite:
    """Debian's WordPress on PHP's built-in server, installed, with an admin user."""

    def __init__(self, root: Path, db: MariaDB, constants: dict[str, str]) -> None:
        self.root = root
        self.docroot = root / "wp"
        self.content = self.docroot / "wp-content"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "php-server.log"
        self.db = db
        self.constants = constants
        self.proc: subprocess.Popen[bytes] | None = None

    def _layout(self) -> None:
        (self.content / "mu-plugins").mkdir(parents=True)
        for entry in WORDPRESS.iterdir():
            if entry.suffix == ".php" and entry.name != "wp-config.php":
                shutil.copy(entry, self.docroot / entry.name)
        for folder in ("wp-includes", "wp-admin"):
            (self.docroot / folder).symlink_to(WORDPRESS / folder)
        (self.content / "themes").symlink_to(WORDPRESS / "wp-content" / "themes")
        lines = ["<?php", "// A test site's configuration (tests/wordpress_site.py)."]
        defines = {
            "DB_NAME": "wp", "DB_USER": "wp", "DB_PASSWORD": "wp",
            "DB_HOST": f"localhost:{self.db.socket}", "DB_CHARSET": "utf8mb4",
            "WP_HOME": self.url, "WP_SITEURL": self.url,
            "WP_CONTENT_URL": f"{self.url}/wp-content",
            **{k: secrets.token_hex(16) for k in (
                "AUTH_KEY", "SECURE_AUTH_KEY", "LOGGED_IN_KEY", "NONCE_KEY", "AUTH_SALT",
                "SECURE_AUTH_SALT", "LOGGED_IN_SALT", "NONCE_SALT")},
            **self.constants,
        }
        lines += [f"define({json.dumps(k)}, {json.dumps(v)});" for k, v in defines.items()]
        lines += [
            "define('WP_CONTENT_DIR', __DIR__ . '/wp-content');",
            "define('DISABLE_WP_CRON', true);",
            "define('AUTOMATIC_UPDATER_DISABLED', true);",
            "define('WP_HTTP_BLOCK_EXTERNAL', true);  // loopback only",
            "$table_prefix = 'wp_';",
            "defined('ABSPATH') || define('ABSPATH', __DIR__ . '/');",
            "require_once ABSPATH . 'wp-settings.php';",
        ]
        (self.docroot / "wp-config.php").write_text("\n".join(lines) + "\n")
        (self.docroot / "test-send.php").write_text(SEND_PHP)
        (self.docroot / "test-install.php").write_text(INSTALL_PHP)

    def start(self, title: str, admin_email: str) -> WordPressSite:
        self.docroot.mkdir(parents=True)
        self._layout()
        self.db.sql("CREATE DATABASE wp; CREATE USER 'wp'@'localhost' IDENTIFIED BY 'wp'; "
                    "GRANT ALL ON wp.* TO 'wp'@'localhost';")
        out = subprocess.run(
            ["php", "test-install.php", title, "admin", admin_email, secrets.token_hex(12)],
            cwd=self.docroot, capture_output=True, timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL)
        if out.returncode != 0 or b"user_id" not in out.stdout:
            raise RuntimeError(f"wp_install failed: {out.stdout[-2000:]!r} {out.stderr[-2000:]!r}")
        (self.content / "mu-plugins" / "zz-test-recorder.php").write_text(RECORDER_PHP)
        self.proc = subprocess.Popen(
            ["php", "-S", f"127.0.0.1:{self.port}", "-t", str(self.docroot)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_port(self.port, timeout=START_TIMEOUT)
        return self

    def install_plugin(self, php: str) -> None:
        """The must-use plugin as `postroom wordpress-plugin > .../postroom.php` writes it
        (PHP's built-in server has no opcache: the next request reads the new file)."""
        (self.content / "mu-plugins" / "postroom.php").write_text(php)

    def failures(self) -> list[str]:
        path = self.content / "mail-failed.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["message"] for line in path.read_text().splitlines()]

    def send(self, **mail: Any) -> dict[str, Any]:
        """wp_mail() in a request of the site; {"ok": bool, "errors": [...]}."""
        req = urllib.request.Request(f"{self.url}/test-send.php", json.dumps(mail).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def lost_password(self, user_login: str) -> tuple[int, str, str]:
        """POST the "Lost your password?" form: (status, Location, page)."""
        form = urllib.parse.urlencode({"user_login": user_login, "redirect_to": "",
                                       "wp-submit": "Get New Password"}).encode()
        req = urllib.request.Request(f"{self.url}/wp-login.php?action=lostpassword", form)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=60) as resp:
                return resp.status, resp.headers.get("Location", ""), resp.read().decode()
        except urllib.error.HTTPError as err:  # the 302 (not followed) or an error page
            return err.code, err.headers.get("Location", ""), err.read().decode()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _terminate(proc, 10)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Forwarder:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target that can be taken down and brought
    back on the same port: the upstream "goes away" for Postroom without touching the shared
    Postfix."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> Forwarder:
        self._stop.clear()
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        srv.settimeout(0.2)
        self._socks = [srv]
        self._spawn(self._accept, srv)
        return self

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, srv: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close the port and every connection through it."""
        self._stop.set()
        for t in self._threads:
            t.join(5)
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks, self._threads = [], []
