"""The web admin in a process of its own, seen from `postroom serve`: started on the first
request that needs it, stopped after ``[admin] process_idle`` seconds without one, and
every such request passed to it over a Unix socket.

Why: FastAPI with the admin's pages, Jinja2 and its compiled templates, the accounts and
the admin's JSON API are over 20 MB that a Python process never gives back once imported.
A server whose admin is opened once a day would carry them for months; the child
(postroom.ingress.admin_child, whose module header states what it trusts) carries them
while someone uses the admin, then exits.

What goes there: the web admin (``/``, ``/admin...``, ``/api/v1/admin...``), the OAuth
sign-in pages (``/oauth/...``) and the API's OpenAPI document and docs page. The front
(postroom.ingress.http_front) applies its fence, caps and body limits first, so a client
outside server.admin_networks never starts the child; the request, its body already read
and bounded, goes over a fresh socket connection with HTTP/1.1 (postroom.http11), the
answer streams back. The socket is in a 0700 folder of the data folder (or of the temporary
folder, when that path is too long for a socket), the socket itself 0600.

The child's stdin is a pipe only this process holds: when `postroom serve` exits, however
it dies (kill -9 too), the pipe ends and so does the child. A message the admin queues (a
resend) is announced on the child's stdout, and this process wakes its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from postroom.exceptions import PostroomError
from postroom.ingress import admin_child
from postroom.ingress.guard import FAILURE_WINDOW
from postroom.ingress.http_front import Message, Scope, Send
from postroom.settings import Settings
from postroom.web import fence

log = logging.getLogger(__name__)
START_TIMEOUT = 120.0  # a loaded two-core box takes seconds to import FastAPI and the pages
READ_PAUSE = 300.0  # a page may probe a provider (the wizard): its own timeouts are shorter
MAX_HEAD = 64 * 1024  # the answer's status line and headers
STOP_TIMEOUT = 10.0
# Not passed on in either direction: they describe one connection, not the request.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
                        b"proxy-connection", b"expect", b"content-length", b"trailer"})
SOCKET_NAME = "admin.sock"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # change nothing (web.auth's CSRF too)
SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes on Linux, 104 on the BSDs


def _unreachable(message: str) -> PostroomError:
    return PostroomError(message, code="admin.process", permanent=False)


def socket_path(settings: Settings) -> Path:
    """Where the child listens: the data folder (0700), else a new 0700 temporary folder."""
    path = settings.data_dir / SOCKET_NAME
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="postroom-admin-")) / SOCKET_NAME  # removed by close


class AdminProcess:
    """The child: started on demand, stopped when idle, requests forwarded to it."""

    def __init__(self, settings: Settings, idle: float, *,
                 on_enqueued: Callable[[str], None] | None = None,
                 worker_owner: str | None = None,
                 refresh_config: Callable[[], Callable[[], Awaitable[object]] | None] = (
                     lambda: None)) -> None:
        self.settings = settings
        self.idle = idle
        self.on_enqueued = on_enqueued
        self.worker_owner = worker_owner
        self.refresh_config = refresh_config  # -> Context.refresh_config, when set
        self.socket: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._busy = 0
        self._last = time.monotonic()
        # Until then the child is kept however idle: it remembers an address's failed
        # sign-ins (web.auth's FailureLimiter) for FAILURE_WINDOW after the last one, and a
        # new child would forget them sooner.
        self._keep_until = 0.0

    # -- the process -----------------------------------------------------------------------
    async def _running(self) -> Path:
        """The socket of a running child, started (or restarted) first if needed."""
        async with self._lock:
            proc = self._proc
            if proc is not None and proc.returncode is None and self.socket is not None:
                return self.socket
            return await self._start()

    async def _start(self) -> Path:
        if self.socket is None:
            self.socket = socket_path(self.settings)
        began = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postroom.ingress.admin_child",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        except OSError as err:
            raise _unreachable(f"cannot start the web admin's process: {err}; check "
                               f"that {sys.executable} can be run") from err
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._spawn(self._follow(proc, ready))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                proc.stdin.write(admin_child.write_args(admin_child.ChildArgs(
                    self.settings, self.socket, self.worker_owner)))
                await proc.stdin.drain()
                ok = await ready
        except (TimeoutError, OSError):  # OSError: it died before reading its arguments
            ok = False
        if not ok:
            await self._end(proc)
            raise _unreachable(
                "the web admin's process did not start (its error is in this server's "
                "log); fix it and open the page again")
        self._last = time.monotonic()
        self._spawn(self._stop_when_idle(proc))
        log.info("web admin process %d started in %.2f s", proc.pid, time.monotonic() - began)
        return self.socket

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, proc: asyncio.subprocess.Process,
                      ready: asyncio.Future[bool]) -> None:
        """The child's lines: ``ready``, then ``wake`` per message it queued; EOF: gone."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            word = line.strip()
            if word == b"ready" and not ready.done():
                ready.set_result(True)
            elif word == b"wake" and self.on_enqueued is not None:
                self.on_enqueued("")
        if not ready.done():
            ready.set_result(False)
        await proc.wait()

    async def _stop_when_idle(self, proc: asyncio.subprocess.Process) -> None:
        while proc.returncode is None:
            now = time.monotonic()
            left = max(self.idle - (now - self._last), self._keep_until - now)
            if left <= 0 and self._busy == 0:
                async with self._lock:
                    now = time.monotonic()
                    if self._proc is proc and self._busy == 0 and \
                            now - self._last >= self.idle and now >= self._keep_until:
                        log.info("web admin process %d stopped: idle %g s", proc.pid,
                                 self.idle)
                        await self._end(proc)
                        return
            if left <= 0:  # busy: a request's end sets _last again
                left = self.idle
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(left, 0.05)):
                    await proc.wait()

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        """Stop ``proc``: its stdin closed (it finishes its requests and exits), else
        SIGTERM, else SIGKILL."""
        if proc.stdin is not None:
            proc.stdin.close()
        for then in (proc.terminate, proc.kill, None):
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
                break
            except TimeoutError:
                if then is None:
                    log.error("web admin process %d did not stop", proc.pid)
                    break
                with contextlib.suppress(ProcessLookupError):
                    then()
        if self._proc is proc:
            self._proc = None

    async def close(self) -> None:
        """At shutdown: stop the child, and the tasks that follow it."""
        async with self._lock:
            if self._proc is not None:
                await self._end(self._proc)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.socket is not None and self.socket.parent != self.settings.data_dir:
            with contextlib.suppress(OSError):  # the temporary folder socket_path made
                self.socket.unlink(missing_ok=True)
                self.socket.parent.rmdir()

    # -- requests --------------------------------------------------------------------------
    async def forward(self, scope: Scope, body: bytes, send: Send, ip: str, *,
                      check: bool = False) -> None:
        """Pass the request to the child and stream its answer to ``send``; a child that
        died meanwhile is started again once. A failed login's delay comes back in the
        scope's state (fence.DELAY_STATE), as when the page ran here. ``check``: only ask
        whether the request is signed in (204 or 403, see :meth:`signed_in`)."""
        self._busy += 1
        try:
            await self._forward(scope, body, send, ip, check)
        finally:
            self._busy -= 1
            self._last = time.monotonic()

    async def _forward(self, scope: Scope, body: bytes, send: Send, ip: str,
                       check: bool) -> None:
        try:
            conn = await self._connect()
        except PostroomError as err:
            await _unavailable(scope, send, err.message)
            return
        from postroom import http11

        reader, writer = conn
        started = False
        try:
            writer.write(_request(scope, len(body), ip, check) + body)
            await writer.drain()
            answer = http11.Responses(scope["method"] == "HEAD", MAX_HEAD)
            while True:
                if answer.headers is not None and not started:
                    started = True
                    headers = _answer_headers(scope, answer.headers)
                    if scope.get("state", {}).get(fence.DELAY_STATE):  # a failed sign-in
                        self._keep_until = time.monotonic() + FAILURE_WINDOW
                    await send({"type": "http.response.start", "status": answer.status,
                                "headers": headers})
                if answer.events:
                    event = answer.events.popleft()
                    if isinstance(event, http11.Data):
                        await send({"type": "http.response.body", "body": event.data,
                                    "more_body": True})
                        continue
                    if scope["method"] not in SAFE_METHODS:
                        await self._refresh()  # before the client reads the end
                    await send({"type": "http.response.body", "body": b""})
                    return
                async with asyncio.timeout(READ_PAUSE):
                    answer.feed(await reader.read(65536))
        except (OSError, TimeoutError, http11.Malformed) as err:
            log.error("web admin process: %s %s: %s", scope["method"], scope["path"],
                      err or type(err).__name__)
            if not started:
                await _unavailable(scope, send, "the web admin's process did not answer")
        finally:
            writer.close()

    async def _refresh(self) -> None:
        """The request may have changed the stored configuration: apply it here now, so
        that a connection just saved is known to this process's worker before the admin's
        next request sends a test through it."""
        refresh = self.refresh_config()
        if refresh is None:
            return
        try:
            await refresh()
        except Exception:  # as postroom.reload's own loop: logged, never raised
            log.exception("reading the stored configuration after an admin change failed")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for retry in (True, False):
            path = await self._running()
            try:
                return await asyncio.open_unix_connection(str(path))
            except OSError as err:  # it died since it was started: once more
                if not retry:
                    raise _unreachable(
                        f"cannot reach the web admin's process: {err}") from err
                async with self._lock:
                    if self._proc is not None:
                        await self._end(self._proc)
        raise AssertionError("unreachable")

    async def signed_in(self, scope: Scope, ip: str) -> bool:
        """Whether the request (its headers) is signed in, asked of the child, which holds
        the accounts: the front then reads a body over 64 KB (fence.ANONYMOUS_BODY)."""
        answer: list[int] = []

        async def status(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.append(int(message["status"]))

        await self.forward({**scope, "method": "GET"}, b"", status, ip, check=True)
        return answer == [204]


def _request(scope: Scope, size: int, ip: str, check: bool) -> bytes:
    # The child trusts the x-postroom-front-* headers: a client's own are dropped here.
    headers = [(n, v) for n, v in scope["headers"]
               if n not in HOP_BY_HOP and not n.startswith(admin_child.HEADER_PREFIX)]
    if not any(n == b"host" for n, _ in headers):
        headers.append((b"host", b""))
    if check:
        headers.append((admin_child.CHECK, b"signed-in"))
    headers += [(b"content-length", str(size).encode()), (b"connection", b"close"),
                (admin_child.CLIENT, ip.encode("latin-1")),
                (admin_child.SCHEME, str(scope.get("scheme", "http")).encode())]
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    from postroom.http11 import request_head

    return request_head(str(scope["method"]).encode("ascii"), target, headers)


def _answer_headers(scope: Scope, headers: Any) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        if name == admin_child.DELAY:
            with contextlib.suppress(ValueError):
                scope.setdefault("state", {})[fence.DELAY_STATE] = float(value)
        elif name not in HOP_BY_HOP or name == b"content-length":
            out.append((bytes(name), bytes(value)))
    return out


async def _unavailable(scope: Scope, send: Send, why: str) -> None:
    if scope["path"].startswith("/api/"):
        body = json.dumps({"error": {"code": "admin.process", "message": why,
                                     "fix": "retry; the server's log says what failed",
                                     "field": None}}).encode()
        ctype = b"application/json"
    else:
        body = (f"<!doctype html><html lang=en><meta charset=utf-8><title>Unavailable</title>"
                f"<main><h1>The web admin is unavailable</h1><p>{html.escape(why)}.</p></main>"
                "</html>"
                ).encode()
        ctype = b"text/html; charset=utf-8"
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", ctype), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"5")]})
    await send({"type": "http.response.body", "body": body})
