"""A throw-away PostgreSQL server for the tests: ``initdb`` in a temporary folder, a free
loopback port, a fresh database per test, stopped at the end of the session.

The binaries come from Debian's ``postgresql`` package (``tests/peers/postgres.sh install``,
run by ``scripts/test.sh``). PostgreSQL refuses to run as root, so as root the cluster
belongs to the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HELP = "Run `bash scripts/test.sh` (as root on Debian 12): it installs postgresql."


def _bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError(f"PostgreSQL server binaries not found in /usr/lib/postgresql. {HELP}")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One cluster; :meth:`new_database` hands each test its own empty database."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._seq = itertools.count(1)
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError as err:
                raise RuntimeError(f"no 'postgres' system user to run the server as. {HELP}") \
                    from err
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)

    def _as_owner(self) -> None:  # preexec_fn: drop root for initdb/postgres
        if self._user is not None:
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)

    def start(self, timeout: float = 60.0) -> PgServer:
        log = self.root / "initdb.log"
        with log.open("wb") as out:
            rc = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postroom",
                 "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=self._as_owner,
                timeout=timeout, check=False,
            ).returncode
        if rc != 0:
            raise RuntimeError(f"initdb failed (rc={rc}): {log.read_text()[-2000:]}")
        # fsync stays on: the queue's durability is what the tests check. Loopback only.
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            stdout=(self.root / "server.log").open("wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=self._as_owner, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited at start: "
                                   + (self.root / "server.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                self._psql("SELECT 1")
                return self
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not answer within {timeout:.0f}s") from None
                time.sleep(0.1)

    def _psql(self, sql: str, db: str = "postgres") -> None:
        out = subprocess.run(
            [str(self.bindir.parent / "bin" / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", "postroom", "-d", db, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
            capture_output=True, timeout=60, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {out.stderr.decode(errors='replace')}")

    def url(self, db: str) -> str:
        return f"postgresql://postroom@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """An empty database of its own; returns its URL."""
        name = f"t{os.getpid()}_{next(self._seq)}"
        self._psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
