"""Upstreams the real-process tests control, and helpers to run several Postroom processes.

- :class:`Sink`: an aiosmtpd server (in a thread, on a free 127.0.0.1 port) that accepts
  everything at once and records each message's Message-ID and arrival time, to count
  deliveries exactly (no loss, no duplicate) and measure send rates.
- :class:`ScriptedServer`: a raw socket server whose every connection runs a small script,
  for what no well-behaved server does: accept and close, 421 at the greeting, read the
  message data and never answer the final dot.
- :func:`enqueue_many`: put many messages in a queue quickly (group commit), as the doors do.
- :func:`start_workers`: ``postroom worker`` processes sharing one database.

Every wait is bounded; every server and process is stopped by its owner (fixtures).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from serve_proc import Postroom, free_port

from postroom.envelope import Envelope
from postroom.queue.sql import Queue
from postroom.store.db import make_engine, migrate

HOST = "127.0.0.1"
_MSGID = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


def message_id_of(raw: bytes) -> str:
    m = _MSGID.search(raw)
    return m.group(1).decode("ascii", "replace") if m else ""


# -- a counting sink ------------------------------------------------------------------------------
@dataclass
class Arrival:
    message_id: str
    at: float
    recipients: tuple[str, ...]


@dataclass
class _SinkHandler:
    rcpt_reply: dict[str, str]
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcpt_reply.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.time()
        mid = message_id_of(envelope.content)
        with self.lock:
            self.arrivals.append(Arrival(mid, now, tuple(envelope.rcpt_tos)))
        return "250 2.0.0 Ok: kept"


class Sink:
    """A counting SMTP upstream; ``rcpt_reply`` maps addresses to a refusal (e.g. 550)."""

    def __init__(self, rcpt_reply: dict[str, str] | None = None) -> None:
        self.handler = _SinkHandler(dict(rcpt_reply or {}))
        self.port = free_port()
        self._ctl = Controller(self.handler, hostname=HOST, port=self.port, ready_timeout=10)

    def start(self) -> Sink:
        self._ctl.start()
        return self

    def stop(self) -> None:
        self._ctl.stop()

    @property
    def arrivals(self) -> list[Arrival]:
        with self.handler.lock:
            return list(self.handler.arrivals)

    def count(self) -> int:
        with self.handler.lock:
            return len(self.handler.arrivals)

    def per_message_id(self) -> Counter[str]:
        return Counter(a.message_id for a in self.arrivals)

    def wait_count(self, n: int, timeout: float) -> int:
        """Wait until at least ``n`` messages arrived (or ``timeout`` s); returns the count."""
        deadline = time.monotonic() + timeout
        while (c := self.count()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return c


# -- a scripted raw server -----------------------------------------------------------------------
Script = Callable[[socket.socket, int], None]  # (client socket, 1-based connection number)


class ScriptedServer:
    """Each accepted connection runs ``script(sock, n)`` in its own thread; the socket is
    closed when the script returns. Scripts must bound their own waits (socket timeouts)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = free_port()
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, self.port))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> ScriptedServer:
        self._accept.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(20)  # no script waits longer than this for the client
        try:
            self.script(conn, n)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accept.join(5)
        for t in self._threads:
            t.join(25)


def read_line(sock: socket.socket, buf: bytearray) -> bytes | None:
    """One CRLF-terminated line from ``sock``; None at EOF."""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


def smtp_session(sock: socket.socket, on_dot: Callable[[bytes], bytes | None]) -> None:
    """Play a minimal SMTP server for one session. After each message's final dot,
    ``on_dot(data)`` gives the reply line, or None: never answer it (the client times out;
    we keep reading until it closes)."""
    buf = bytearray()
    sock.sendall(b"220 scripted.test ESMTP\r\n")
    while (line := read_line(sock, buf)) is not None:
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            sock.sendall(b"250-scripted.test\r\n250 8BITMIME\r\n")
        elif verb == b"DATA":
            sock.sendall(b"354 go ahead\r\n")
            lines = []
            while (data := read_line(sock, buf)) != b".":
                if data is None:
                    return
                lines.append(data)
            reply = on_dot(b"\r\n".join(lines) + b"\r\n")
            if reply is None:
                while sock.recv(65536):  # silent until the client gives up and closes
                    pass
                return
            sock.sendall(reply + b"\r\n")
        elif verb == b"QUIT":
            sock.sendall(b"221 bye\r\n")
            return
        else:  # MAIL, RCPT, RSET, NOOP
            sock.sendall(b"250 ok\r\n")


# -- messages and workers -----------------------------------------------------------------------
def raw_message(sender: str, rcpt: str, subject: str, message_id: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + "A test message from a real-process test.\r\n" * 20
    ).encode()


def envelopes(n: int, recipient: Callable[[int], str], sender: str = "app@example.org",
              prefix: str = "m") -> list[Envelope]:
    """``n`` small messages with Message-IDs <PREFIX-I-RANDOM@postroom.test>."""
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        rcpt = recipient(i)
        raw = raw_message(sender, rcpt, f"{prefix} {i}", f"<{prefix}-{i}-{run}@postroom.test>")
        out.append(Envelope(sender, [rcpt], raw, source="test:load"))
    return out


def enqueue_many(url: str, envs: Iterable[Envelope], chunk: int = 1000) -> list[str]:
    """Store the messages (the doors' own path: group-committed enqueue); returns their ids."""
    engine = make_engine(url)
    migrate(engine)
    queue = Queue(engine)
    items = list(envs)

    async def go() -> list[str]:
        ids: list[str] = []
        try:
            for i in range(0, len(items), chunk):
                ids += await asyncio.gather(*(queue.enqueue(e) for e in items[i:i + chunk]))
        finally:
            await queue.writer.aclose()
        return ids

    try:
        return asyncio.run(go())
    finally:
        engine.dispose()


def worker_pid_prefix(pid: int) -> str:
    """The start of the lease owner of every message a worker process claims (see
    postroom.queue.sql.worker_id)."""
    return f"{socket.gethostname()[:40]}:{pid}:"


def start_workers(root: Path, n: int, *, database: str, connections: str, delivery: str,
                  extra_server: str = "") -> list[Postroom]:
    """``n`` `postroom worker` processes, each with its own config file and data folder (as
    on separate nodes), all on ``database``. Returns once every one said it is delivering."""
    workers = []
    for i in range(n):
        pr = Postroom(root / f"worker{i}", connections=connections, delivery=delivery,
                      server=f'database = "{database}"\nworker = true\n{extra_server}')
        workers.append(pr.start("worker"))
    for pr in workers:
        wait_log(pr, "delivering from", timeout=60)
    return workers


def wait_log(pr: Postroom, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = pr.log.read_text(errors="replace") if pr.log.exists() else ""
        if text in log:
            return
        if pr.proc is not None and pr.proc.poll() is not None:
            raise AssertionError(f"{pr.root.name} exited (rc={pr.proc.returncode}):\n{log}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {pr.log} after {timeout}s:\n"
                         + (pr.log.read_text(errors="replace")[-3000:] if pr.log.exists() else ""))


def status_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        return Queue(engine).log.counts()
    finally:
        engine.dispose()


def wait_statuses(url: str, done: Callable[[dict[str, int]], bool], timeout: float,
                  every: float = 0.5) -> dict[str, int]:
    """Poll the message counts by status until ``done(counts)`` (or ``timeout`` s)."""
    engine = make_engine(url)
    queue = Queue(engine)
    deadline = time.monotonic() + timeout
    try:
        while True:
            counts = queue.log.counts()
            if done(counts) or time.monotonic() >= deadline:
                return counts
            time.sleep(every)
    finally:
        engine.dispose()
