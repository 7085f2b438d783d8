"""Shared pytest fixtures for Postroom's tests.

``peers``: the real third-party servers from ``tests/peers`` (see ``tests/peers/README.md``):
Postfix + Dovecot as the upstream SMTP server (ports 10025/10587/10465/10588) and the
django-oauth-toolkit OAuth2 server (port 9000) that Dovecot asks to validate XOAUTH2 and
OAUTHBEARER tokens. State lives in ``$PEERS`` (default ``/tmp/peers``).

If the servers are already running for that state directory (``scripts/test.sh`` starts them),
the fixture reuses them. Otherwise it configures and starts them with the recipe scripts and
stops, at the end of the session, only what it started. It never skips: when the servers cannot
be started (packages missing, port taken, ...) every test that uses it fails with a message that
says to run ``scripts/test.sh``, which installs the Debian packages.

Every wait here is bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import errno
import fcntl
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

# The store/queue fixtures (engine, queue, clock...) run each test on SQLite and PostgreSQL.
pytest_plugins = ["queue_helpers", "admin_browser"]  # fixtures shared by test modules

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
RECIPES_DIR = TESTS_DIR / "peers"

HOST = "127.0.0.1"
PLAIN_PORT = 10025
SUBMISSION_PORT = 10587
SMTPS_PORT = 10465
LEGACY_PORT = 10588
MAIL_PORTS = (PLAIN_PORT, SUBMISSION_PORT, SMTPS_PORT, LEGACY_PORT)

# Dovecot's passwd-file (tests/peers/mailserver.sh). utf8user's password is UTF-8.
USERS: dict[str, str] = {
    "testuser@example.test": "testpass",
    "alice@example.test": "alicepass",
    "utf8user@example.test": "pässwörd€",
}
# Users the OAuth server knows (tests/peers/oauth/oauthsrv.py USERS).
OAUTH_USERS: tuple[str, ...] = ("testuser@example.test", "alice@example.test")
OAUTH_CLIENT_ID = "gateway"
OAUTH_CLIENT_SECRET = "gateway-secret"
# Any port is accepted for a 127.0.0.1 redirect URI (RFC 8252); nothing needs to listen there.
OAUTH_REDIRECT_URI = "http://127.0.0.1:8025/oauth/callback"
OAUTH_SCOPE = "smtp offline_access"

# Used when $PEERS/mailserver/postfix/vmailbox is not there yet (same content as mailserver.sh).
DEFAULT_VMAILBOX: dict[str, str] = {
    "testuser@example.test": "example.test/testuser/",
    "alice@example.test": "example.test/alice/",
    "bob@example.test": "example.test/bob/",
    "utf8user@example.test": "example.test/utf8user/",
    "δοκιμή@example.test": "example.test/δοκιμή/",
    "@example.test": "example.test/_catchall/",
    "@example.org": "example.org/_catchall/",
    "@example.com": "example.com/_catchall/",
}
OTHER_FOLDER = "_other/"

SCRIPT_TIMEOUT = 180.0  # configure/start/stop of one recipe (they take 0.1 to 5 s)
LOCK_TIMEOUT = 300.0  # another session starting the same peers
HELP = "Run `bash scripts/test.sh` (as root on Debian 12) to install and start the real peers."


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peers: uses the real peer servers from tests/peers (Postfix+Dovecot, OAuth2 server)",
    )
    config.addinivalue_line(
        "markers", "sqlite_only: a store test that looks inside SQLite itself (not run on "
        "PostgreSQL)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that request the ``peers`` fixture get the ``peers`` marker automatically."""
    for item in items:
        if "peers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.peers)


# -- small helpers -----------------------------------------------------------------------------
def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pidfile: Path) -> bool:
    from postroom.queue.workers import pid_alive

    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    return pid_alive(pid)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "\n".join(data[-lines:])


class StoredMessage(EmailMessage):
    """A message read from a Maildir: the parsed message plus ``raw`` bytes and ``path``."""

    raw: bytes = b""
    path: Path | None = None


def read_message(path: Path) -> StoredMessage:
    raw = path.read_bytes()
    msg = email.message_from_bytes(raw, _class=StoredMessage, policy=email.policy.default)
    assert isinstance(msg, StoredMessage)
    msg.raw = raw
    msg.path = path
    return msg


# -- the peers object ------------------------------------------------------------------------
@dataclass
class Peers:
    state_dir: Path
    host: str = HOST
    plain_port: int = PLAIN_PORT
    submission_port: int = SUBMISSION_PORT
    smtps_port: int = SMTPS_PORT
    legacy_port: int = LEGACY_PORT
    oauth_port: int = 9000
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))
    oauth_users: tuple[str, ...] = OAUTH_USERS
    oauth_client_id: str = OAUTH_CLIENT_ID
    oauth_client_secret: str = OAUTH_CLIENT_SECRET
    oauth_redirect_uri: str = OAUTH_REDIRECT_URI
    started: list[str] = field(default_factory=list)  # recipes this session started

    # ---- paths
    @property
    def ca_file(self) -> str:
        return str(self.state_dir / "certs" / "ca.crt")

    @property
    def maildir_root(self) -> Path:
        return self.state_dir / "mailserver" / "mail"

    @property
    def maillog(self) -> Path:
        return self.state_dir / "mailserver" / "log" / "maillog"

    @property
    def dovecot_log(self) -> Path:
        return self.state_dir / "mailserver" / "log" / "dovecot.log"

    @property
    def oauth_base(self) -> str:
        return f"http://{self.host}:{self.oauth_port}"

    # ---- mail
    def _vmailbox(self) -> dict[str, str]:
        table = self.state_dir / "mailserver" / "postfix" / "vmailbox"
        try:
            text = table.read_text(encoding="utf-8")
        except OSError:
            return dict(DEFAULT_VMAILBOX)
        result: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("\t") if "\t" in line else line.partition(" ")
            result[key.strip().lower()] = value.strip()
        return result

    def maildirs(self, address: str) -> tuple[list[Path], bool]:
        """(Maildirs where mail for ``address`` can land, whether they are shared).

        A known user has its own folder. Any other address goes to its domain's catch-all
        folder or to ``_other/``: Postfix queries the full address in every table of
        virtual_mailbox_maps before ``@domain``, so mailserver.sh's ``regexp: /./ _other/``
        wins over the texthash ``@domain`` catch-alls (as of this writing everything unknown
        lands in ``_other/``, whatever tests/peers/README.md says). Both are searched.
        """
        addr = address.strip().strip("<>").lower()
        table = self._vmailbox()
        if addr in table:
            return [self.maildir_root / table[addr]], False
        domain = addr.rpartition("@")[2]
        folders = [self.maildir_root / table[f"@{domain}"]] if f"@{domain}" in table else []
        return [*folders, self.maildir_root / OTHER_FOLDER], True

    def messages(self, address: str) -> list[StoredMessage]:
        """Every message delivered to ``address`` (new/ and cur/), oldest first.

        In shared folders (catch-all, ``_other/``) only messages whose X-Original-To or
        Delivered-To is ``address`` are returned. Each result has ``.raw`` and ``.path``.
        """
        return self._scan(address, {})

    def _scan(self, address: str, cache: dict[Path, StoredMessage]) -> list[StoredMessage]:
        folders, shared = self.maildirs(address)
        want = address.strip().strip("<>").lower()
        found: list[tuple[float, str, StoredMessage]] = []
        for folder, sub in ((f, sub) for f in folders for sub in ("new", "cur")):
            try:
                entries = list(os.scandir(folder / sub))
            except FileNotFoundError:
                continue
            except PermissionError as e:
                raise AssertionError(
                    f"cannot read {folder / sub}: {e}. Maildirs belong to VMAIL_USER (peersmail); "
                    "run the tests as root or configure the peers with VMAIL_USER=$(id -un)."
                ) from e
            for entry in entries:
                if not entry.is_file() or entry.name.startswith("."):
                    continue
                path = Path(entry.path)
                try:
                    mtime = entry.stat().st_mtime
                    msg = cache.get(path) or read_message(path)
                except FileNotFoundError:  # moved new/ -> cur/ meanwhile; the next scan sees it
                    continue
                cache[path] = msg
                if shared:
                    rcpts = {str(msg.get(h, "")).strip().strip("<>").lower()
                             for h in ("X-Original-To", "Delivered-To")}
                    if want not in rcpts:
                        continue
                found.append((mtime, entry.name, msg))
        found.sort(key=lambda t: (t[0], t[1]))
        return [m for _, _, m in found]

    def wait_for(
        self,
        address: str,
        predicate_or_subject: str | Callable[[StoredMessage], bool],
        timeout: float = 15,
    ) -> StoredMessage:
        """Poll ``address``'s Maildir (every 0.1 s, at most ``timeout`` s) for a message whose
        Subject equals the given string, or for which the predicate is true. Returns the newest
        match; raises AssertionError on timeout."""
        pred: Callable[[StoredMessage], bool]
        if isinstance(predicate_or_subject, str):
            subject = predicate_or_subject
            pred = lambda m: str(m.get("Subject", "")) == subject  # noqa: E731
            what = f"Subject {subject!r}"
        else:
            pred = predicate_or_subject
            what = f"predicate {getattr(pred, '__name__', pred)!r}"
        cache: dict[Path, StoredMessage] = {}
        deadline = time.monotonic() + timeout
        msgs: list[StoredMessage] = []
        while True:
            msgs = self._scan(address, cache)
            hits = [m for m in msgs if pred(m)]
            if hits:
                return hits[-1]
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        folders, _ = self.maildirs(address)
        recent = [str(m.get("Subject", "")) for m in msgs[-5:]]
        log = [line for line in _tail(self.maillog, 400).splitlines() if address.lower() in line]
        raise AssertionError(
            f"no message with {what} for {address} in {[str(f) for f in folders]} after {timeout}s "
            f"({len(msgs)} messages there; last subjects {recent}).\n"
            f"maillog lines for {address}:\n" + "\n".join(log[-10:])
        )

    # ---- OAuth
    def oauth_tokens(self, user_email: str, scope: str = OAUTH_SCOPE) -> dict[str, Any]:
        """A fresh token response (access_token, refresh_token, expires_in, ...) for
        ``user_email``, via the authorization-code grant of the confidential client
        ``gateway`` (no consent page). The user "logs in" through the recipe's test-only
        ``X-Test-User`` header, exactly like ``oauth.sh check``. (The server has no password
        grant.) Only ``OAUTH_USERS`` are set up there; Django's RemoteUserBackend creates any
        other name on the fly, so do not rely on unknown users being refused here."""
        state = uuid.uuid4().hex
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.oauth_client_id,
            "redirect_uri": self.oauth_redirect_uri, "scope": scope, "state": state,
        })
        req = urllib.request.Request(f"{self.oauth_base}/o/authorize/?{query}",
                                     headers={"X-Test-User": user_email})
        opener = urllib.request.build_opener(_NoRedirect)
        location = ""
        try:
            with opener.open(req, timeout=10) as resp:
                body = resp.read(2000).decode(errors="replace")
                raise AssertionError(f"authorize did not redirect (HTTP {resp.status}): {body}")
        except urllib.error.HTTPError as e:
            if e.code not in (301, 302, 303, 307):
                raise AssertionError(f"authorize failed: HTTP {e.code} "
                                     f"{e.read(2000).decode(errors='replace')}") from e
            location = e.headers.get("Location", "")
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
        if params.get("state") != [state] or "code" not in params:
            raise AssertionError(f"authorize redirect without code/state: {location}")
        return self._token_request({
            "grant_type": "authorization_code", "code": params["code"][0],
            "redirect_uri": self.oauth_redirect_uri,
        })

    def oauth_token(self, user_email: str) -> str:
        """A fresh access token for ``user_email`` that Dovecot accepts for XOAUTH2 and
        OAUTHBEARER with ``user=user_email`` (valid 1 h unless OAUTH_ACCESS_TTL says else)."""
        return str(self.oauth_tokens(user_email)["access_token"])

    def oauth_refresh(self, refresh_token: str) -> dict[str, Any]:
        """Refresh grant. DOT rotates: the old refresh AND access token die immediately."""
        return self._token_request({"grant_type": "refresh_token",
                                    "refresh_token": refresh_token})

    def _token_request(self, form: dict[str, str]) -> dict[str, Any]:
        basic = base64.b64encode(
            f"{self.oauth_client_id}:{self.oauth_client_secret}".encode()).decode()
        req = urllib.request.Request(
            f"{self.oauth_base}/o/token/", data=urllib.parse.urlencode(form).encode(),
            headers={"Authorization": f"Basic {basic}",
                     "Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                data: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"token endpoint: HTTP {e.code} "
                                 f"{e.read(2000).decode(errors='replace')}") from e
        if "access_token" not in data:
            raise AssertionError(f"token endpoint returned no access_token: {data}")
        return data

    # ---- state checks
    def mailserver_running(self) -> bool:
        m = self.state_dir / "mailserver"
        return (
            _pid_alive(m / "queue" / "pid" / "master.pid")
            and _pid_alive(m / "run" / "dovecot" / "master.pid")
            and all(port_open(p, self.host) for p in MAIL_PORTS)
        )

    def oauth_running(self) -> bool:
        if not _pid_alive(self.state_dir / "oauth" / "server.pid"):
            return False
        try:
            with urllib.request.urlopen(f"{self.oauth_base}/healthz", timeout=3) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# -- starting and stopping ------------------------------------------------------------------------
def _script_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PEERS"] = str(state_dir)
    env["HERE"] = str(RECIPES_DIR)  # common.sh honours HERE; never let a stale one leak in
    env["DEBIAN_FRONTEND"] = "noninteractive"
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" + env.get(
        "PATH", "")
    return env


def _run_recipe(state_dir: Path, recipe: str, action: str) -> None:
    """Run ``tests/peers/<recipe>.sh <action>``; output goes to $PEERS/harness.log.

    Output must go to a file, not a pipe: dovecot daemonizes and keeps the inherited stdout
    and stderr open, so a reader of a pipe would wait for EOF as long as dovecot runs.
    """
    log = state_dir / "harness.log"
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%H:%M:%S')} {recipe}.sh {action}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                ["bash", str(RECIPES_DIR / f"{recipe}.sh"), action],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=_script_env(state_dir), timeout=SCRIPT_TIMEOUT, check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"tests/peers/{recipe}.sh {action} took more than {SCRIPT_TIMEOUT:.0f}s."
                        f"\n{_tail(log)}\n{HELP}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"tests/peers/{recipe}.sh {action} failed (exit {proc.returncode}); "
                    f"last lines of {log}:\n{_tail(log)}\n{HELP}", pytrace=False)


def _missing_prerequisites(state_dir: Path, need_mail: bool, need_oauth: bool) -> list[str]:
    missing = []
    path = _script_env(state_dir)["PATH"]
    if need_mail:
        for tool in ("postfix", "dovecot", "doveconf", "openssl"):
            if shutil.which(tool, path=path) is None:
                missing.append(f"`{tool}` not installed")
        try:
            pwd.getpwnam(os.environ.get("VMAIL_USER", "peersmail"))
        except KeyError:
            missing.append("system user peersmail missing (created by mailserver.sh install)")
    if need_oauth:
        venv_py = Path(os.environ.get("PEERS_VENV", state_dir / "venv")) / "bin" / "python"
        if not venv_py.exists():
            missing.append(f"OAuth server venv missing ({venv_py}; created by oauth.sh install)")
        if shutil.which("curl", path=path) is None:
            missing.append("`curl` not installed")
    return missing


@contextlib.contextmanager
def _lock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive flock, waited for at most ``timeout`` seconds."""
    with path.open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    pytest.fail(f"{path} stayed locked for {timeout:.0f}s (another test session "
                                "starting the peers?)", pytrace=False)
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _ensure_running(p: Peers) -> None:
    need_mail = not p.mailserver_running()
    need_oauth = not p.oauth_running()
    if not (need_mail or need_oauth):
        return
    missing = _missing_prerequisites(p.state_dir, need_mail, need_oauth)
    if missing:
        pytest.fail("real peers are not running and cannot be started here: "
                    + "; ".join(missing) + f".\n{HELP}", pytrace=False)
    if need_mail:
        busy = [port for port in MAIL_PORTS if port_open(port, p.host)]
        if busy and not (p.state_dir / "mailserver" / "queue" / "pid" / "master.pid").exists():
            pytest.fail(f"ports {busy} are in use, but not by the peers of PEERS={p.state_dir} "
                        f"(another PEERS directory?). Stop that instance or set PEERS.\n{HELP}",
                        pytrace=False)
        if not (p.state_dir / "mailserver" / "postfix" / "main.cf").is_file():
            _run_recipe(p.state_dir, "mailserver", "configure")
        _run_recipe(p.state_dir, "mailserver", "start")
        p.started.append("mailserver")
    if need_oauth:
        if not (p.state_dir / "oauth" / "db.sqlite3").is_file():
            _run_recipe(p.state_dir, "oauth", "configure")
        _run_recipe(p.state_dir, "oauth", "start")
        p.started.append("oauth")
    deadline = time.monotonic() + 20
    while not (p.mailserver_running() and p.oauth_running()):
        if time.monotonic() >= deadline:
            pytest.fail(
                f"peers did not come up within 20 s (mailserver running: "
                f"{p.mailserver_running()}, oauth running: {p.oauth_running()}).\n"
                f"{_tail(p.state_dir / 'harness.log')}\n{_tail(p.maillog, 10)}\n"
                f"{_tail(p.dovecot_log, 10)}\n{_tail(p.state_dir / 'oauth' / 'server.log', 10)}"
                f"\n{HELP}", pytrace=False)
        time.sleep(0.2)


@pytest.fixture(scope="session")
def peers() -> Iterator[Peers]:
    """The real peers (Postfix+Dovecot upstream, OAuth2 server), running for this session."""
    state_dir = Path(os.environ.get("PEERS", "/tmp/peers"))
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir.resolve()
    p = Peers(state_dir=state_dir, oauth_port=int(os.environ.get("OAUTH_PORT", "9000")))
    with _lock(state_dir / ".harness.lock"):
        _ensure_running(p)
    try:
        yield p
    finally:
        errors = []
        for recipe in reversed(p.started):  # stop only what this session started
            try:
                _run_recipe(state_dir, recipe, "stop")
            except BaseException as e:  # pytest.fail raises an OutcomeException
                errors.append(str(e))
        if errors:
            pytest.fail("stopping the peers failed:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A throw-away PostgreSQL cluster for this session (tests/pgserver.py); each test asks
    it for a database of its own with ``pg_server.new_database()``."""
    from pgserver import PgServer

    try:
        server = PgServer().start()
    except RuntimeError as err:
        pytest.fail(f"cannot start PostgreSQL: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    """An empty, private (0700) data directory for one test."""
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def unique_subject(request: pytest.FixtureRequest) -> str:
    """A Subject no other test (or run) uses: ``<test name>-<random>``."""
    name = request.node.name.replace("[", "-").replace("]", "")
    return f"{name}-{uuid.uuid4().hex[:12]}"
