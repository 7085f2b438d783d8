"""Run a real `postroom serve` (or `worker`, or any CLI command) in a subprocess for tests.

Ports are picked free on 127.0.0.1; every wait is bounded; stop() always reaps the process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def smtp_connection(port: int, name: str = "up", extra: str = "") -> str:
    """A `[[connections]]` entry for a plain SMTP upstream on 127.0.0.1:PORT."""
    return (
        f'[[connections]]\nname = "{name}"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
        f'port = {port}\nsecurity = "none"\nconnect_timeout = 5\n{extra}\n'
    )


def serve_in_process(config: Path, work: Callable[[], T]) -> T:
    """Run `postroom serve` on ``config`` in this process (its event loop in this thread,
    so that a test may register a transport kind of its own first) while ``work()`` runs
    in another thread; its result, after the server stopped."""
    import asyncio

    from postroom import server, settings

    conf = settings.load(config)

    async def scenario() -> T:
        stop, up = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(server.serve(conf, stop=stop, ready=lambda _: up.set()))
        try:
            await asyncio.wait_for(up.wait(), 60)
            return await asyncio.to_thread(work)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)

    return asyncio.run(scenario())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class Postroom:
    """A temporary Postroom instance: its own config file, data folder and ports."""

    def __init__(
        self,
        root: Path,
        *,
        connections: str = "",
        server: str = "",
        delivery: str = "min_backoff = 1\nmax_backoff = 2\npoll_interval = 0.2\n",
        env: dict[str, str] | None = None,
        smtps: bool = False,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.smtp_port = free_port()
        self.smtps_port = free_port() if smtps else None
        self.http_port = free_port()
        self.config = root / "postroom.toml"
        smtps_line = f'smtps_listen = "127.0.0.1:{self.smtps_port}"\n' if smtps else ""
        self.config.write_text(
            "[server]\n"
            f'data_dir = "data"\nsmtp_listen = "127.0.0.1:{self.smtp_port}"\n{smtps_line}'
            f'http_listen = "127.0.0.1:{self.http_port}"\n'
            f'hostname = "postroom.test"\nauth_failure_delay = 0.2\n{server}\n'
            f"[delivery]\n{delivery}\n{connections}\n"
        )
        self.env = {**os.environ, **(env or {})}
        self.env.pop("POSTROOM_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "serve.log"

    @property
    def cert(self) -> Path:
        return self.root / "data" / "tls" / "cert.pem"

    @property
    def db(self) -> Path:
        return self.root / "data" / "postroom.db"

    def start(self, command: str = "serve", timeout: float = 30.0) -> Postroom:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postroom.cli", command, "--config", str(self.config)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        if command == "serve":
            try:
                wait_port(self.smtp_port, timeout=timeout)
            except TimeoutError as err:
                self.stop()
                raise RuntimeError(
                    f"postroom serve did not start:\n{self.log.read_text()}"
                ) from err
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(10)

    def kill9(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 60) -> Any:
        """Run `postroom ARGS --config ...`; returns the CompletedProcess (text output)."""
        return subprocess.run(
            [sys.executable, "-m", "postroom.cli", *args, "--config", str(self.config)],
            input=input,
            capture_output=True,
            env={**self.env, "COLUMNS": "200"},
            timeout=timeout,
        )

    def api(self, key: str | None = None, *, source: str | None = None,
            timeout: float = 15.0) -> Any:
        """An httpx.Client on this instance's HTTP listener (from ``source``, e.g.
        "127.0.0.2" for a remote client), with the app's API key when given."""
        import httpx

        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}", timeout=timeout,
            headers={"Authorization": f"Bearer {key}"} if key else None,
            transport=httpx.HTTPTransport(local_address=source) if source else None)

    @contextlib.contextmanager
    def warm_api(self, key: str, message: dict[str, Any], timeout: float = 15.0
                 ) -> Iterator[Any]:
        """The legitimate client of hostile tests: this host, ``key``, one kept-alive
        connection, after one accepted ``message`` (which loads FastAPI in the server)."""
        with self.api(key, timeout=timeout) as c:
            first = c.post("/api/v1/messages", json=message)
            assert first.status_code == 202, first.text
            yield c

    def add_app(self, name: str) -> str:
        """`postroom app add NAME`; returns the SMTP secret it prints once."""
        return self.add_app_keys(name)[0]

    def add_app_keys(self, name: str) -> tuple[str, str]:
        """`postroom app add NAME`; returns (SMTP AUTH password, HTTP API key)."""
        out = self.cli("app", "add", name)
        if out.returncode != 0:
            raise AssertionError(f"`app add {name}` failed: {out.stderr!r}")
        text = out.stdout.decode()
        password = re.search(r"SMTP AUTH: username \S+ password (\S+)", text)
        key = re.search(r"Authorization: Bearer (\S+)", text)
        if not password or not key:
            raise AssertionError(f"no credentials in `app add` output: {text!r}")
        return password.group(1), key.group(1)

    def __enter__(self) -> Postroom:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
