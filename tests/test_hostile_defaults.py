"""Secure defaults on disk, and the dependency audit (issue 11, points 12 and 14).

Every kind of file Postroom writes is created by a real `postroom` subprocess started under
umask 000, the worst a service manager or a container can hand it: the data folder (and any
missing parent) must come out 0700; the database with its -wal, -shm and lock files, the
configuration it writes, the secret key, the TLS key and certificate, and every export 0600.
Where the test runs as root, a process running as ``nobody`` also tries to read what it must
not (the refusal), and each test checks that the owner is still served: mail is accepted,
stored and exported.

The audit test drives scripts/audit_deps.py (what scripts/test.sh runs) against a fake OSV
advisory service on 127.0.0.1: a known vulnerability fails, a clean report passes, an
unreachable service warns (or fails under POSTROOM_AUDIT_STRICT=1).
"""

from __future__ import annotations

import contextlib
import csv
import http.server
import io
import json
import os
import shutil
import smtplib
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, free_port

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
TIMEOUT = 60.0  # every subprocess in this module
SENDER = "app@example.org"
RCPT = "someone@example.test"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The test process's umask while it starts a child (children inherit it)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def nobody_can_read(path: Path) -> bool | None:
    """Whether uid ``nobody`` can read ``path``; None when the test cannot switch user."""
    if os.geteuid() != 0:
        return None
    probe = ("import sys\ntry:\n    open(sys.argv[1], 'rb').close()\nexcept PermissionError:\n"
             "    print('DENIED')\nelse:\n    print('READ')\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], user=NOBODY, group=NOBODY,
                         extra_groups=[], capture_output=True, text=True, timeout=TIMEOUT,
                         cwd="/")
    answer = out.stdout.strip()
    assert answer in ("READ", "DENIED"), f"probe as nobody failed: {out.stderr!r}"
    return answer == "READ"


def assert_private_tree(top: Path) -> list[Path]:
    """Every folder under ``top`` (itself included) is 0700 and every file 0600."""
    seen = [top]
    assert mode(top) == 0o700, f"{top}: {mode(top):o}"
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            d = Path(dirpath) / name
            assert mode(d) == 0o700, f"{d}: {mode(d):o}"
            seen.append(d)
        for name in filenames:
            f = Path(dirpath) / name
            assert mode(f) == 0o600, f"{f}: {mode(f):o}"
            seen.append(f)
    return seen


@pytest.fixture(scope="module")
def open_root() -> Iterator[Path]:
    """A folder everyone may enter (0755, as /srv or a home often is), so that only the modes
    Postroom gives its own files keep other users out. pytest's tmp_path is 0700 already,
    which would hide a world-readable file from the nobody probe."""
    root = Path(tempfile.mkdtemp(prefix="postroom-defaults-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh(open_root: Path, name: str, **kw: Any) -> Postroom:
    """A Postroom in an everyone-may-enter folder whose config ``postroom serve`` writes
    itself from the template: the ports and the data folder come from the environment."""
    folder = open_root / name
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    p = Postroom(folder, **kw)
    p.config.unlink()  # the helper wrote one; serve must create it from the template
    p.env.update({
        "POSTROOM_SERVER__SMTP_LISTEN": f"127.0.0.1:{p.smtp_port}",
        "POSTROOM_SERVER__HTTP_LISTEN": f"127.0.0.1:{p.http_port}",
        "POSTROOM_SERVER__HOSTNAME": "postroom.test",
        # Missing parents too: each folder Postroom makes is 0700.
        "POSTROOM_SERVER__DATA_DIR": "deep/er/data",
    })
    return p


def data_dir(p: Postroom) -> Path:
    return p.root / "deep" / "er" / "data"


def send_one(p: Postroom, subject: str) -> None:
    """A legitimate client (127.0.0.1 is trusted) hands in one message: accepted."""
    msg = f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", p.smtp_port, timeout=15) as s:
        assert s.sendmail(SENDER, [RCPT], msg) == {}


def stored_subjects(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return [r[0] for r in conn.execute("SELECT subject FROM messages")]


@pytest.fixture(scope="module")
def served(open_root: Path) -> Iterator[Postroom]:
    """`postroom serve` started under umask 000 on nothing (no config, no data folder),
    one message accepted; left running for the checks."""
    p = fresh(open_root, "served")
    with umask(0):
        p.start()
    try:
        send_one(p, "first under umask 000")
        yield p
    finally:
        p.stop()


def test_first_serve_under_umask_000_creates_everything_private(served: Postroom) -> None:
    p = served
    data = data_dir(p)
    db = data / "postroom.db"
    expected = [p.config, db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.lock"),
                data / "secret.key", data / "tls" / "key.pem", data / "tls" / "cert.pem"]
    for f in expected:
        assert f.is_file(), f"{f} was not created"
    # (a) the refusal: exact modes, whatever the umask...
    assert mode(p.config) == 0o600
    assert mode(p.root / "deep") == 0o700 and mode(p.root / "deep" / "er") == 0o700
    seen = assert_private_tree(data)
    assert set(expected[1:]) <= set(seen)
    # ...and what they mean to another local user: the config is closed by its own mode, the
    # database by the folder's.
    for f in (p.config, db, data / "tls" / "key.pem"):
        assert nobody_can_read(f) in (False, None), f"nobody can read {f}"
    # (b) the owner is served: the message is stored, the server takes another.
    send_one(p, "second")
    assert sorted(stored_subjects(db)) == ["first under umask 000", "second"]
    assert "open to other users" not in p.log.read_text()


def test_exports_under_umask_000_are_private(served: Postroom, open_root: Path) -> None:
    p = served
    out = open_root / "exports"  # everyone may enter; the export's own modes must protect it
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    csv_file = out / "log.csv"
    eml_dir = out / "new" / "eml"  # missing parents: made 0700 too
    zip_file = out / "mail.zip"
    with umask(0):
        runs = [p.cli("log", "--export", "csv", "--out", str(csv_file)),
                p.cli("log", "--export", "eml", "--out", str(eml_dir)),
                p.cli("log", "--export", "eml", "--out", str(zip_file))]
    for r in runs:
        assert r.returncode == 0, r.stderr.decode()
    # (a) the refusal
    assert mode(csv_file) == 0o600 and mode(zip_file) == 0o600
    assert mode(out / "new") == 0o700
    emls = [f for f in assert_private_tree(eml_dir) if f.is_file()]
    assert len(emls) >= 1
    assert nobody_can_read(csv_file) in (False, None)
    assert nobody_can_read(zip_file) in (False, None)
    assert not list(out.rglob("*.part")), "a temporary file was left behind"
    # (b) the owner gets the mail
    rows = list(csv.DictReader(io.StringIO(csv_file.read_text(encoding="utf-8"))))
    assert "first under umask 000" in {r["subject"] for r in rows}
    assert any(b"first under umask 000" in f.read_bytes() for f in emls)
    with zipfile.ZipFile(zip_file) as zf:
        assert any(b"first under umask 000" in zf.read(n) for n in zf.namelist())


def test_cli_on_a_fresh_instance_under_umask_000_is_private(open_root: Path) -> None:
    """`postroom app add` is often the first command run: it creates the store itself."""
    p = fresh(open_root, "cli-first")
    p.config.write_text("")  # an empty file is a valid configuration
    p.config.chmod(0o600)
    with umask(0):
        r = p.cli("app", "add", "shop")
    assert r.returncode == 0, r.stderr.decode()
    # (a) the refusal
    data = data_dir(p)
    seen = assert_private_tree(data)
    assert data / "postroom.db" in seen
    assert mode(p.root / "deep") == 0o700
    # (b) the owner: the app exists and the listing works
    listing = p.cli("app", "list")
    assert listing.returncode == 0 and b"shop" in listing.stdout


def test_an_open_data_folder_is_reported_not_changed(open_root: Path) -> None:
    """Postroom never changes the mode of what it did not create (a group may share the
    folder with postroom-sendmail on purpose); `serve` says what is open and how to close
    it."""
    p = fresh(open_root, "preexisting")
    data = data_dir(p)
    data.mkdir(parents=True)
    data.chmod(0o755)
    db = data / "postroom.db"
    db.touch()
    db.chmod(0o644)  # as SQLite itself makes it under umask 022
    with umask(0o022):
        p.start()
    try:
        send_one(p, "still served")  # (b)
        log = p.log.read_text()
        # (a) the warnings, each with its fix
        assert f"data folder {data} is open to other users (mode 755)" in log, log
        assert f"chmod 700 {data}" in log
        assert f"database file {db} is open to other users (mode 644)" in log
        assert f"chmod 600 {db}" in log
        assert mode(data) == 0o755 and mode(db) == 0o644  # left as they were
        # New files it makes there are still private.
        assert mode(data / "secret.key") == 0o600
        assert mode(data / "tls" / "key.pem") == 0o600
        assert stored_subjects(db) == ["still served"]
    finally:
        p.stop()


def test_config_edits_under_umask_000_stay_private(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a connection (the wizard's path) writes the template and a whole-file
    temporary copy for validation: both 0600 under umask 000."""
    from postroom import settings as settings_mod
    from postroom.configedit import append_connection

    seen: dict[str, int] = {}
    real_load = settings_mod.load

    def spy(path: Any, **kw: Any) -> Any:
        seen[Path(path).name] = mode(Path(path))
        return real_load(path, **kw)

    monkeypatch.setattr(settings_mod, "load", spy)
    cfg = tmp_path / "new" / "postroom.toml"
    entry = {"name": "primary", "transport": "smtp", "host": "smtp.example.com", "port": 587,
             "security": "starttls"}
    with umask(0):
        append_connection(cfg, entry)
    # (a) the refusal: the template, its folder and the temporary copy
    assert mode(cfg) == 0o600 and mode(cfg.parent) == 0o700
    assert len(seen) == 1 and next(iter(seen.values())) == 0o600, seen
    assert [f.name for f in cfg.parent.iterdir()] == ["postroom.toml"]  # temp copy removed
    # (b) the owner: the file loads with the new connection
    assert real_load(cfg, environ={}).connection("primary").name == "primary"


# -- point 14: the dependency audit of scripts/test.sh ---------------------------------------
AUDIT_PYTHON = os.environ.get("POSTROOM_AUDIT_PYTHON", "")
needs_pip_audit = pytest.mark.skipif(
    not (AUDIT_PYTHON and Path(AUDIT_PYTHON).exists()),
    reason="POSTROOM_AUDIT_PYTHON (set by scripts/test.sh) names no venv with pip-audit")


class FakeOsv(http.server.BaseHTTPRequestHandler):
    """OSV's /v1/query: one advisory for h11 when ``vulnerable`` is set, none otherwise."""

    vulnerable = False
    queries = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).queries += 1
        answer: dict[str, Any] = {}
        if type(self).vulnerable and body["package"]["name"] == "h11":
            answer = {"vulns": [{
                "id": "GHSA-test-0000-h11x", "aliases": ["CVE-2099-0001"],
                "summary": "request smuggling (test advisory)",
                "affected": [{"package": {"name": "h11", "ecosystem": "PyPI"},
                              "ranges": [{"type": "ECOSYSTEM",
                                          "events": [{"introduced": "0"}, {"fixed": "99.0"}]}]}],
            }]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_osv() -> Iterator[tuple[str, type[FakeOsv]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOsv)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/query", FakeOsv
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def audit(url: str, cache: Path, strict: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "POSTROOM_AUDIT_STRICT"}
    if strict:
        env["POSTROOM_AUDIT_STRICT"] = "1"
    return subprocess.run(
        [AUDIT_PYTHON, str(ROOT / "scripts" / "audit_deps.py"), sys.executable,
         "--vulnerability-service", "osv", "--osv-url", url, "--cache-dir", str(cache),
         "--timeout", "10"],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)


@needs_pip_audit
def test_audit_fails_on_a_known_vulnerability(fake_osv: tuple[str, type[FakeOsv]],
                                              tmp_path: Path) -> None:
    url, handler = fake_osv
    handler.vulnerable, handler.queries = True, 0
    r = audit(url, tmp_path / "c1")
    # (a) the refusal, naming the package, the advisory, the fix and what to do
    assert r.returncode == 1, r.stderr
    assert "h11" in r.stderr and "GHSA-test-0000-h11x" in r.stderr and "CVE-2099-0001" in r.stderr
    assert "fixed in: 99.0" in r.stderr and "pyproject.toml" in r.stderr
    assert handler.queries > 10  # every installed package was asked about
    # (b) the same venv with no advisory passes
    handler.vulnerable = False
    r = audit(url, tmp_path / "c2")
    assert r.returncode == 0, r.stderr
    assert "no known vulnerability in" in r.stderr and "WARNING" not in r.stderr


@needs_pip_audit
def test_audit_warns_when_no_advisory_service_answers(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/query"  # nothing listens there
    r = audit(url, tmp_path / "c1")
    assert r.returncode == 0, r.stderr
    assert "WARNING: no vulnerability audit this time" in r.stderr
    strict = audit(url, tmp_path / "c2", strict=True)
    assert strict.returncode == 2, strict.stderr
    assert "POSTROOM_AUDIT_STRICT=1" in strict.stderr
