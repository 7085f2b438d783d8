"""Postroom as a system service (postroom.system): `postroom install-service` into a
throw-away root (--prefix; the real /etc, /var/lib and /etc/passwd are never touched), the
units checked by `systemd-analyze verify`, `install-sendmail` and its --undo through the real
update-alternatives and dpkg-divert on the prefix's own databases, and the sd_notify messages
a real `postroom serve` sends to a NOTIFY_SOCKET (READY, WATCHDOG, STOPPING).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from serve_proc import Postroom

from postroom import settings as settings_mod
from postroom.exceptions import InstallError
from postroom.system import alternatives, install, notify
from postroom.system.alternatives import Tools, install_sendmail, uninstall_sendmail
from postroom.system.steps import Steps, require_root
from postroom.system.unit import exec_word

TIMEOUT = 60.0  # every subprocess and wait here (a loaded machine)
BIN = Path(sys.executable).parent  # the venv's: postroom and postroom-sendmail are there
UNITS = "etc/systemd/system"


def need(*tools: str) -> None:
    """Fail, never skip: scripts/test.sh installs these (systemd, dpkg), and a test the
    suite leaves out silently shows nothing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run the suite with scripts/test.sh, which "
                    "installs the systemd package", pytrace=False)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postroom.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, "COLUMNS": "200",
                                                           **(env or {})})


def steps(prefix: Path, *, dry_run: bool = False) -> tuple[Steps, list[str]]:
    lines: list[str] = []
    return Steps(lines.append, prefix=prefix, dry_run=dry_run), lines


def tree(root: Path) -> dict[str, tuple[int, float]]:
    """Every path under ``root`` with its mode and modification time."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_mtime)
            for p in root.rglob("*")}


def verify(unit: Path) -> None:
    """`systemd-analyze verify` exits 0 even for unknown keys or bad values (it only
    warns): the unit is good when it says nothing at all."""
    done = subprocess.run(["systemd-analyze", "verify", unit.name], cwd=unit.parent,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real `postroom install-service --prefix` run: the root and what it printed."""
    root = tmp_path_factory.mktemp("root")
    done = cli("install-service", "--prefix", str(root))
    assert done.returncode == 0, done.stderr
    return root, done.stdout


def test_units_pass_systemd_analyze_verify(staged: tuple[Path, str],
                                           tmp_path: Path) -> None:
    need("systemd-analyze")
    root, _ = staged
    service = root / UNITS / "postroom.service"
    verify(service)  # also checks that ExecStart (the venv's postroom) is executable
    # a template is verified as one of its instances
    shutil.copy(root / UNITS / "postroom-worker@.service", tmp_path)
    verify(tmp_path / "postroom-worker@1.service")
    text = service.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60", "Restart=on-failure",
                 f"ExecStart={BIN / 'postroom'} serve --config /etc/postroom/postroom.toml",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=postroom", "Group=postroom",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/postroom",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectHome=yes",
                 "CapabilityBoundingSet=", "LimitNOFILE=65536", "TimeoutStopSec=60"):
        assert line in text.splitlines(), line
    assert "AmbientCapabilities" not in text  # 127.0.0.1:2525 needs no capability


def test_layout_in_the_prefix(staged: tuple[Path, str]) -> None:
    root, out = staged
    config = root / "etc/postroom/postroom.toml"
    assert (config.stat().st_mode & 0o777, (root / "etc/postroom").stat().st_mode & 0o777) \
        == (0o640, 0o750)
    assert (root / "var/lib/postroom").stat().st_mode & 0o777 == 0o700
    assert settings_mod.load(config, environ={}).data_dir == Path("/var/lib/postroom")
    # the user and the owners are recorded for the target, not made here
    assert 'u postroom - "Postroom mail gateway" /var/lib/postroom' in \
        (root / "usr/lib/sysusers.d/postroom.conf").read_text()
    assert "d /var/lib/postroom 0700 postroom postroom -" in \
        (root / "usr/lib/tmpfiles.d/postroom.conf").read_text()
    assert not (root / "etc/passwd").exists()
    assert all(line.startswith(("create ", "staged in ")) for line in out.splitlines()), out
    if shutil.which("systemd-sysusers"):  # systemd reads the record as meant
        done = subprocess.run(["systemd-sysusers", "--dry-run", f"--root={root}"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0 and "postroom" in done.stdout + done.stderr, done.stderr
        assert not (root / "etc/passwd").exists()


def test_second_run_changes_nothing(staged: tuple[Path, str]) -> None:
    root, _ = staged
    before = tree(root)
    s, lines = steps(root)
    install.install_service(s)
    assert lines and all(line.startswith("already there: ") for line in lines), lines
    assert tree(root) == before


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = cli("install-service", "--dry-run", "--prefix", str(root), "--user", "mailer")
    assert done.returncode == 0, done.stderr
    assert not root.exists()
    assert f"would create {root}/etc/postroom/postroom.toml" in done.stdout
    assert f"would create {root}/{UNITS}/postroom.service" in done.stdout
    assert "\nUser=mailer\n" in done.stdout and "\n[Service]\n" in done.stdout  # the units


def test_low_port_gets_the_capability_and_config_is_kept(tmp_path: Path) -> None:
    need("systemd-analyze")
    config = tmp_path / "etc/postroom/postroom.toml"
    config.parent.mkdir(parents=True)
    mine = ('[server]\ndata_dir = "/srv/mail"\nsmtp_listen = "0.0.0.0:25"\n'
            "smtp_max_sessions = 90000\n[delivery]\nshutdown_grace = 100\n")
    config.write_text(mine)
    s, _ = steps(tmp_path)
    install.install_service(s)
    assert config.read_text() == mine  # never rewritten
    unit = tmp_path / UNITS / "postroom.service"
    text = unit.read_text().splitlines()
    for line in ("AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ReadWritePaths=/srv/mail",
                 "LimitNOFILE=90200", "TimeoutStopSec=130"):
        assert line in text, line
    assert (tmp_path / "srv/mail").is_dir()
    verify(unit)
    # a unit changed by hand is replaced, and kept beside
    unit.write_text(unit.read_text() + "# mine\n")
    s, lines = steps(tmp_path)
    install.install_service(s)
    assert f"update {unit} (the previous one kept as postroom.service.bak)" in lines
    assert (unit.parent / "postroom.service.bak").read_text().endswith("# mine\n")


def test_refusals_are_clear(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="must run as root: `sudo postroom"):
        require_root(Steps(print), "install-service", euid=1000)
    require_root(Steps(print, dry_run=True), "install-service", euid=1000)  # allowed
    s, _ = steps(tmp_path)
    with pytest.raises(InstallError, match="--user 'Bad User'"):
        install.install_service(s, user="Bad User")
    with pytest.raises(InstallError, match="no `postroom` command next to this Python"):
        install.install_service(s, bin_dir=tmp_path)
    done = cli("install-service", "--prefix", str(tmp_path), "--config", "relative.toml")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "give the absolute path" in done.stderr


def test_exec_words_reach_the_program_as_typed() -> None:
    assert exec_word("/opt/postroom/bin/postroom") == "/opt/postroom/bin/postroom"
    assert exec_word('/opt/my "mail"/100%') == '"/opt/my \\"mail\\"/100%%"'
    assert exec_word("$HOME") == '"$$HOME"'


# -- install-sendmail ---------------------------------------------------------------------
MTA = b"#!/bin/sh\necho the MTA's sendmail\n"


@pytest.fixture
def mta_root(tmp_path: Path) -> Iterator[Path]:
    """A root whose /usr/sbin/sendmail is a plain file, as Debian's MTAs install it."""
    link = tmp_path / "usr/sbin/sendmail"
    link.parent.mkdir(parents=True)
    link.write_bytes(MTA)
    link.chmod(0o755)
    yield tmp_path


def test_sendmail_through_alternatives_and_undo(mta_root: Path) -> None:
    need("update-alternatives", "dpkg-divert")
    link, program = mta_root / "usr/sbin/sendmail", BIN / "postroom-sendmail"
    s, lines = steps(mta_root, dry_run=True)
    install_sendmail(s, bin_dir=BIN)
    assert link.read_bytes() == MTA and not (mta_root / "etc").exists(), lines
    s, _ = steps(mta_root)
    install_sendmail(s, bin_dir=BIN)
    assert os.path.realpath(link) == os.path.realpath(program)
    original = mta_root / "usr/sbin/sendmail.postroom-orig"
    assert original.read_bytes() == MTA
    tools = Tools.find(s)
    assert tools.alternatives is not None and tools.divert is not None
    shown = subprocess.run([*tools.alternatives, "--display", "sendmail"], capture_output=True,
                           text=True, timeout=TIMEOUT, check=True).stdout
    assert f"{original} - priority 10" in shown and f"{program} - priority 100" in shown
    diverted = subprocess.run([*tools.divert, "--list"], capture_output=True, text=True,
                              timeout=TIMEOUT, check=True).stdout
    assert "diversion of /usr/sbin/sendmail to /usr/sbin/sendmail.postroom-orig by postroom" \
        in diverted
    s, lines = steps(mta_root)
    install_sendmail(s, bin_dir=BIN)  # again: nothing to do
    assert lines == [f"already there: {link} is postroom-sendmail ({program})"]
    s, lines = steps(mta_root, dry_run=True)
    uninstall_sendmail(s, bin_dir=BIN)
    assert [line.split()[:2] for line in lines] == [["would", "run"]] * 3, lines
    assert os.path.realpath(link) == os.path.realpath(program)  # the dry run changed nothing
    s, lines = steps(mta_root)
    uninstall_sendmail(s, bin_dir=BIN)
    assert not link.is_symlink() and link.read_bytes() == MTA, lines
    assert not original.exists()
    assert subprocess.run([*tools.alternatives, "--query", "sendmail"], capture_output=True,
                          timeout=TIMEOUT).returncode == 2  # no group left
    assert "postroom" not in subprocess.run([*tools.divert, "--list"], capture_output=True,
                                            text=True, timeout=TIMEOUT).stdout


def test_sendmail_without_alternatives_is_a_symlink(mta_root: Path) -> None:
    link, program = mta_root / "usr/sbin/sendmail", BIN / "postroom-sendmail"
    s, _ = steps(mta_root)
    bare = Tools(alternatives=None, divert=None, altdir=mta_root / "etc/alternatives")
    install_sendmail(s, tools=bare, bin_dir=BIN)
    assert os.readlink(link) == str(program)
    assert (mta_root / "usr/sbin/sendmail.postroom-orig").read_bytes() == MTA
    s, lines = steps(mta_root, dry_run=True)
    uninstall_sendmail(s, tools=bare, bin_dir=BIN)
    assert lines == [f"would remove the link {link}",
                     f"would move {link}.postroom-orig back to {link}"]
    s, lines = steps(mta_root)
    uninstall_sendmail(s, tools=bare, bin_dir=BIN)
    assert link.read_bytes() == MTA and not link.is_symlink(), lines
    s, lines = steps(mta_root)
    uninstall_sendmail(s, tools=bare, bin_dir=BIN)  # twice: nothing more to do
    assert lines == [f"nothing to undo: {link} is not postroom-sendmail"]


def test_sendmail_refuses_an_original_in_the_way(mta_root: Path) -> None:
    (mta_root / "usr/sbin/sendmail.postroom-orig").write_text("someone's")
    s, _ = steps(mta_root)
    with pytest.raises(InstallError, match="is in the way"):
        install_sendmail(s, bin_dir=BIN)
    assert (mta_root / "usr/sbin/sendmail").read_bytes() == MTA
    assert alternatives.ORIGINAL.name == "sendmail.postroom-orig"


# -- sd_notify ------------------------------------------------------------------------------
def test_notify_abstract_socket_and_watchdog_pid() -> None:
    name = f"postroom-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        assert notify.notify("STATUS=a\nb", "X=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STATUS=a b\nX=1"
    assert not notify.notify("READY=1", environ={})  # not under systemd: nothing, no error
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000"}
    assert notify.watchdog_interval(env) == 1.5
    assert notify.watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None


def test_real_serve_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(TIMEOUT)
        # WatchdogSec=0.4: a ping every 0.2 s
        p = Postroom(tmp_path / "pr", env={"NOTIFY_SOCKET": str(path),
                                           "WATCHDOG_USEC": "400000"})
        p.proc = subprocess.Popen(
            [sys.executable, "-m", "postroom.cli", "serve", "--config", str(p.config)],
            stdout=p.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=p.env, start_new_session=True)
        try:
            first = sock.recv(4096).decode()
            assert first.startswith("READY=1\nSTATUS=accepting mail on 127.0.0.1:"), first
            with socket.create_connection(("127.0.0.1", p.smtp_port), timeout=TIMEOUT) as c:
                assert c.makefile("rb").readline().startswith(b"220 ")  # already answering
            pings = [sock.recv(4096) for _ in range(3)]
            assert pings == [b"WATCHDOG=1"] * 3
            p.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            said = b""
            while not said.startswith(b"STOPPING=1") and time.monotonic() < deadline:
                said = sock.recv(4096)
            assert said.startswith(b"STOPPING=1\nSTATUS=shutting down"), said
            assert p.proc.wait(TIMEOUT) == 0
        finally:
            p.stop()


def test_version() -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == (f"postroom {version('postroom')} "
                                   f"(Python {sys.version.split()[0]})")
    assert cli("-V").stdout == done.stdout
