"""The HTTP listener of `postroom serve` (ingress.http_server, ingress.http_conn, parsed by
llhttp in postroom.http11; no uvicorn) against real clients: raw sockets, http.client and curl
(Debian's), plain and TLS.

The listener runs in a thread of this process with a small ASGI application of its own
(echo, streamed and chunked answers, a failure, a gate), so that what is checked is the
connection handling alone: pipelining in order, ``Expect: 100-continue``, chunked bodies both
ways, HEAD, ``Connection: close``, backpressure both ways, TLS ciphers, errors without a
traceback, graceful shutdown. The front's own checks (keys, caps on requests, body limits,
header deadline through a real server) are tests/test_hostile_http.py's and
tests/test_http_api.py's. Hostile clients connect from 127.0.0.2 (not trusted).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest

from postroom.bootstrap import ensure_certificate
from postroom.exceptions import ConfigError
from postroom.http11 import Data, Malformed, Responses
from postroom.ingress.guard import SessionCaps
from postroom.ingress.http_conn import INBOX_LIMIT, MAX_HEAD, Connection
from postroom.ingress.http_front import Message, Receive, Scope, Send
from postroom.ingress.http_server import GRACE, Limits, Listener, bind

TIMEOUT = 10.0  # every socket and wait in this module
WRITE_TIMEOUT = 1.0  # how long the listener waits for a client that stopped reading
BIG = 32 * 1024 * 1024  # /big's answer, streamed in CHUNK parts
CHUNK = 64 * 1024
T = TypeVar("T")


class Toy:
    """The ASGI application under the listener."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.streamed = 0  # bytes of /big handed to send so far
        self.started = threading.Event()  # /slow has begun

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/boom":
            raise RuntimeError("secret detail of a failure")
        if path == "/nothing":
            return
        if path == "/wait":
            assert self.gate is not None
            await self.gate.wait()
        if path == "/slow":
            self.started.set()
            await asyncio.sleep(0.5)
        if path == "/big":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(BIG).encode())]})
            part = b"x" * CHUNK
            while self.streamed < BIG:
                self.streamed += CHUNK
                await send({"type": "http.response.body", "body": part,
                            "more_body": self.streamed < BIG})
            return
        if path == "/split":  # a header value that would split the response
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"x-name", b"a\r\nset-cookie: evil=1")]})
            await send({"type": "http.response.body", "body": b"no"})
            return
        if path == "/chunked":  # no length: framed chunked (postroom.http11)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for word in (b"one ", b"two ", b"three"):
                await send({"type": "http.response.body", "body": word, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            msg: Message = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        data = json.dumps({"method": scope["method"], "query": scope["query_string"].decode(),
                           "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                           "scheme": scope["scheme"], "client": scope["client"][0]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


class Served:
    """A Listener with ``app`` on 127.0.0.1, its event loop in a thread."""

    def __init__(self, app: Toy, tls: tuple[Path, Path] | None = None) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sock = bind("127.0.0.1", 0)
        self.port: int = self.sock.getsockname()[1]
        self.caps = SessionCaps(per_peer=4, total=100, reserve=10)
        limits = Limits(self.caps, lambda ip: ip == "127.0.0.1", header_timeout=2.0,
                        write_timeout=WRITE_TIMEOUT)
        self.listener = Listener(app, self.sock, limits, tls)

        async def begin() -> None:
            app.gate = asyncio.Event()
            self.listener.start()

        self.call(begin())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.call(run())

    def stop(self) -> None:
        try:
            self.call(self.listener.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)
            self.loop.close()


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True, timeout=TIMEOUT)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(Toy())
    try:
        yield s
    finally:
        s.stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.settimeout(TIMEOUT)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_response(f: BinaryIO, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response off a buffered socket file (several may follow: nothing read past it)."""
    line = f.readline()
    if not line:
        raise EOFError("the server closed the connection")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head or status in (100, 204, 304):
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().split(b";")[0], 16):
            body += f.read(size)
            f.readline()
        f.readline()
        return status, headers, body
    return status, headers, f.read()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


# -- HTTP/1.1 -----------------------------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    with connect(served.port) as s, s.makefile("rb") as f:
        s.sendall(get("/echo?i=1") + b"POST /echo?i=2 HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 5\r\n\r\nhello" + get("/echo?i=3") + get("/chunked")
                  + b"HEAD /echo?i=5 HTTP/1.1\r\nHost: x\r\n\r\n" + get("/echo?i=6"))
        answers = [read_response(f) for _ in range(4)]
        headed = read_response(f, head=True)
        last = read_response(f)
    assert [json.loads(b)["query"] for _, _, b in answers[:3]] == ["i=1", "i=2", "i=3"]
    assert json.loads(answers[1][2])["size"] == 5
    assert answers[3][1]["transfer-encoding"] == "chunked" and answers[3][2] == b"one two three"
    assert headed[0] == 200 and int(headed[1]["content-length"]) > 0 and "date" in headed[1]
    assert json.loads(last[2])["query"] == "i=6"  # nothing of HEAD's body was sent


def test_expect_100_continue_and_chunked_bodies(served: Served, tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    with connect(served.port) as s, s.makefile("rb") as f:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert read_response(f)[0] == 100  # asked for before a byte of the body is sent
        s.sendall(body)
        status, _, answer = read_response(f)
        assert status == 200 and json.loads(answer)["sha256"] == hashlib.sha256(body).hexdigest()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert json.loads(read_response(f)[2])["size"] == 11
    upload = tmp_path / "up.bin"
    upload.write_bytes(body)
    base = f"http://127.0.0.1:{served.port}/echo"
    for header in ("Expect: 100-continue", "Transfer-Encoding: chunked"):
        out = subprocess.run(
            ["curl", "-sS", "--http1.1", "-m", str(TIMEOUT), "-H", header,
             "--data-binary", f"@{upload}", base],
            capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
        assert json.loads(out)["sha256"] == hashlib.sha256(body).hexdigest(), header


def test_connection_close_and_http_client(served: Served) -> None:
    c = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT)
    try:
        c.request("GET", "/chunked")
        assert c.getresponse().read() == b"one two three"
        c.request("GET", "/echo", headers={"Connection": "close"})
        r = c.getresponse()
        assert r.getheader("connection") == "close" and json.loads(r.read())["method"] == "GET"
        assert r.will_close
    finally:
        c.close()
    with connect(served.port) as s, s.makefile("rb") as f:  # a half-closed client
        s.sendall(get("/echo?half"))
        s.shutdown(socket.SHUT_WR)
        assert json.loads(read_response(f)[2])["query"] == "half"
        assert f.read() == b""


def test_errors_never_show_a_traceback(served: Served) -> None:
    for path in ("/boom", "/nothing"):
        with connect(served.port) as s, s.makefile("rb") as f:
            s.sendall(get(path))
            status, headers, body = read_response(f)
            assert status == 500 and headers["connection"] == "close"
            assert json.loads(body)["error"]["code"] == "internal"
            assert b"secret" not in body and b"Traceback" not in body
            assert f.read() == b""
    for request, status in ((b"GARBAGE\r\n\r\n", 400),
                            (get("/echo", f"X-Big: {'a' * MAX_HEAD}\r\n"), 431)):
        with connect(served.port, "127.0.0.2") as s, s.makefile("rb") as f:
            s.sendall(request)
            got, _, body = read_response(f)
            assert got == status and json.loads(body)["error"]["code"].startswith("request.")


def test_what_the_parser_leaves_to_the_listener(served: Served) -> None:
    """llhttp (postroom.http11) counts no head size, needs no Host and speaks any version:
    the listener's own rules, each from a hostile client on 127.0.0.2."""
    def answer(request: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
        with connect(served.port, "127.0.0.2") as s, s.makefile("rb") as f:
            s.sendall(request)
            status, headers, body = read_response(f)
            return status, headers, body, f.read()  # and then the connection is closed

    # A head that never ends, sent in pieces: refused once past twice the limit, long before
    # it would be complete (httptools would buffer an unfinished header without end).
    with connect(served.port, "127.0.0.2") as s, s.makefile("rb") as f:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Long: ")
        sent = 0
        with pytest.raises(OSError):  # reset or broken pipe once the server closed
            while sent < 64 * MAX_HEAD:
                s.sendall(b"a" * 4096)
                sent += 4096
                time.sleep(0.001)
        assert sent <= 4 * MAX_HEAD
        with pytest.raises((OSError, EOFError)):
            assert read_response(f)[0] == 431
            raise EOFError
    for request, status in ((b"GET /echo HTTP/1.1\r\n\r\n", 400),  # no Host
                            (b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", 400),
                            (b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)):
        got, headers, body, rest = answer(request)
        assert got == status and headers["connection"] == "close" and rest == b"", request
    # HTTP/1.0: answered, and no keep-alive (the connection ends after the answer).
    got, headers, body, rest = answer(b"GET /echo?old HTTP/1.0\r\n\r\n" + get("/echo?next"))
    assert got == 200 and headers["connection"] == "close"
    assert json.loads(body)["query"] == "old" and rest == b""
    # An Upgrade is answered as a plain request, then the connection closes.
    got, headers, body, rest = answer(get("/echo?ws", "Upgrade: websocket\r\n"
                                          "Connection: Upgrade\r\n") + get("/echo?after"))
    assert got == 200 and json.loads(body)["query"] == "ws" and rest == b""
    # An Upgrade with a body (curl --http2 on http:// asks for h2c): the body is read as
    # the request's, answered, and the connection closed; a chunked one is refused.
    post = (b"POST /echo?h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n")
    got, headers, body, rest = answer(post + b"Content-Length: 11\r\n\r\nhello world")
    assert got == 200 and json.loads(body)["size"] == 11 and rest == b""
    with connect(served.port, "127.0.0.2") as s, s.makefile("rb") as f:  # the body later
        s.sendall(post + b"Content-Length: 11\r\n\r\nhello")
        time.sleep(0.2)
        s.sendall(b" world")
        got, _, body = read_response(f)
        assert got == 200 and json.loads(body)["size"] == 11 and f.read() == b""
    got, headers, body, rest = answer(post + b"Transfer-Encoding: chunked\r\n\r\n"
                                      b"5\r\nhello\r\n0\r\n\r\n")
    assert got == 400 and rest == b""
    # A header value holding CR LF is never written: a 500, no second header.
    got, headers, body, rest = answer(get("/split"))
    assert got == 500 and "set-cookie" not in headers and b"evil" not in body + rest


def test_answers_read_by_the_admin_proxy() -> None:
    """http11.Responses, as the front reads the web admin's process: Content-Length, chunked,
    a HEAD answer and a close-delimited body ended by the close, a cut one refused."""
    def read(chunks: list[bytes], head: bool = False) -> tuple[int, bytes]:
        r = Responses(head)
        for c in chunks:
            r.feed(c)
        body = b"".join(e.data for e in r.events if isinstance(e, Data))
        return r.status, body

    assert read([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo"]) == (200, b"hello")
    assert read([b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n0\r\n\r\n"]) == (404, b"abc")
    assert read([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", b""], head=True) == (200, b"")
    assert read([b"HTTP/1.1 200 OK\r\n\r\nall of it", b""]) == (200, b"all of it")
    with pytest.raises(Malformed):
        read([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\ncut", b""])
    with pytest.raises(Malformed):
        read([b"HTTP/1.1 200 OK\r\nX: " + b"a" * (2 * MAX_HEAD)])
    with pytest.raises(Malformed):
        read([b"NOT HTTP\r\n\r\n"])


# -- backpressure -------------------------------------------------------------------------

def test_reading_pauses_while_the_app_is_behind(served: Served) -> None:
    """A client pipelining 2 MB behind a request the app holds: the server buffers at most
    about INBOX_LIMIT of it, then answers every request in order once the app goes on."""
    n = 1000
    pad = f"X-Pad: {'p' * 2000}\r\n"
    data = get("/wait") + b"".join(get(f"/echo?i={i}", pad) for i in range(n))
    with connect(served.port) as s, s.makefile("rb") as f:
        sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
        sender.start()

        def paused() -> list[Connection]:
            return [c for c in served.listener.live if c.paused]

        until(lambda: bool(served.on_loop(paused)), "the server to pause reading")
        held = served.on_loop(lambda: max(len(c.inbox) for c in paused()))
        assert held <= INBOX_LIMIT + 512 * 1024
        assert served.app.gate is not None
        served.loop.call_soon_threadsafe(served.app.gate.set)
        assert read_response(f)[0] == 200
        queries = [json.loads(read_response(f)[2])["query"] for _ in range(n)]
        sender.join(TIMEOUT)
    assert queries == [f"i={i}" for i in range(n)]


def test_a_client_that_stops_reading_is_cut_off(served: Served) -> None:
    """GET /big (32 MB) from 127.0.0.2, nothing read: the app's send waits (a few MB at
    most are produced), then after the write deadline the connection is cut and its place
    given back; 127.0.0.1 is served meanwhile."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.bind(("127.0.0.2", 0))
    s.settimeout(TIMEOUT)
    try:
        s.connect(("127.0.0.1", served.port))
        s.sendall(get("/big"))

        def stalled() -> bool:
            return any(c.peer is not None and c.peer[0] == "127.0.0.2"
                       and not c.writable.is_set() for c in served.listener.live)

        until(lambda: served.on_loop(stalled), "the server to wait for the client")
        assert served.app.streamed < BIG // 2  # the app waits with it
        with connect(served.port) as legit, legit.makefile("rb") as f:
            legit.sendall(get("/echo"))
            assert read_response(f)[0] == 200
        until(lambda: served.on_loop(lambda: served.caps.count("127.0.0.2")) == 0,
              "the stalled connection to be cut")
        got = 0
        try:
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        except ConnectionResetError:
            pass
        assert got < BIG
    finally:
        s.close()


# -- TLS, shutdown ------------------------------------------------------------------------

def test_tls_with_strong_ciphers_only(cert: tuple[Path, Path]) -> None:
    tls = Served(Toy(), tls=cert)
    try:
        ctx = ssl.create_default_context(cafile=str(cert[0]))
        c = http.client.HTTPSConnection("127.0.0.1", tls.port, timeout=TIMEOUT, context=ctx)
        c.request("POST", "/echo", body=b"secret")
        answer = json.loads(c.getresponse().read())
        assert answer["scheme"] == "https" and answer["size"] == 6
        c.close()
        old = ssl.create_default_context(cafile=str(cert[0]))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        old.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")  # CBC, SHA-1
        with pytest.raises(ssl.SSLError), socket.create_connection(
                ("127.0.0.1", tls.port), timeout=TIMEOUT) as raw:
            old.wrap_socket(raw, server_hostname="127.0.0.1")
        out = subprocess.run(["curl", "-sS", "-m", str(TIMEOUT), "--cacert", str(cert[0]),
                              f"https://127.0.0.1:{tls.port}/chunked"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
        assert out.stdout == "one two three"
        with connect(tls.port) as plain:  # plain HTTP on the TLS port gets no answer
            plain.sendall(get("/echo"))
            assert not plain.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        tls.stop()


def _served_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_tls_files_read_again_on_reload(tmp_path: Path) -> None:
    """A certificate renewed in place (a SIGHUP reload, postroom.hup): new connections get
    it, an open one keeps the old; a pair that no longer loads is refused, nothing changed."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_certificate(cert, key, "first.test")
    served = Served(Toy(), tls=(cert, key))
    try:
        first = _served_cert(served.port)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as raw, \
                ctx.wrap_socket(raw) as open_before:
            cert.unlink()
            key.unlink()
            ensure_certificate(cert, key, "renewed.test")
            served.on_loop(served.listener.check_tls_files)
            served.on_loop(served.listener.reload_tls)
            renewed = _served_cert(served.port)
            assert renewed != first
            assert open_before.getpeercert(binary_form=True) == first
            open_before.sendall(get("/echo", "Connection: close\r\n"))
            assert open_before.recv(4096).startswith(b"HTTP/1.1 200")
        key.write_text("not a key\n")
        with pytest.raises(ConfigError):
            served.on_loop(served.listener.check_tls_files)
        assert _served_cert(served.port) == renewed
    finally:
        served.stop()


def test_shutdown_lets_requests_in_flight_finish() -> None:
    app = Toy()
    srv = Served(app)
    stopped = False
    try:
        idle = connect(srv.port)
        busy = connect(srv.port)
        with idle, busy, busy.makefile("rb") as f, idle.makefile("rb") as fi:
            idle.sendall(get("/echo"))
            assert read_response(fi)[0] == 200  # then kept alive, idle
            busy.sendall(get("/slow"))
            assert app.started.wait(TIMEOUT)
            begun = time.monotonic()
            srv.stop()
            stopped = True
            assert time.monotonic() - begun < GRACE + 2
            status, headers, _ = read_response(f)
            assert status == 200 and headers["connection"] == "close"
            assert fi.read() == b""  # the idle one was closed
        with pytest.raises(OSError):
            connect(srv.port)
    finally:
        if not stopped:
            srv.stop()
