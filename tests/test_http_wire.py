"""postroom/httpwire.py, the lean HTTP/1.1 client of the delivery path, against a local TLS
server (private CA, port 0) that speaks HTTP/1.1 through h11 and misbehaves on cue (and a
plain-TCP one writing answers byte for byte: 1xx, chunked, until close, HTTP/1.0): kept-alive
connections reused, an idle connection the server closed replaced before the request is
written (and never a request sent twice), a read timeout or a cut after the body is an unknown
outcome (``after_data``), chunked and Content-Length answers, an answer over the cap refused;
and HttpTransport picks it only when no proxy is set."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
from diag_helpers import make_ca, make_cert, server_context

from postroom import httpwire as _wire
from postroom import transports
from postroom.exceptions import ConnectError, DeliveryError, TimeoutError_
from postroom.transports.base import TransportContext
from postroom.transports.postmark import PostmarkTransport

HOST = "127.0.0.1"

# What the server does with one request: (connection number, request number on it, body)
# -> the answer's events, or None to close without answering, or "hang" to never answer.
Script = Callable[[int, int, bytes], "list[h11.Event] | str | None"]


def ok(body: bytes = b'{"ok": true}', *, chunked: bool = False) -> list[h11.Event]:
    headers = [("Content-Type", "application/json")]
    headers.append(("Transfer-Encoding", "chunked") if chunked
                   else ("Content-Length", str(len(body))))
    step = 7 if len(body) < 1000 else 65536  # several chunks, however long the body
    parts = [body[i:i + step] for i in range(0, len(body), step)] if chunked else [body]
    return [h11.Response(status_code=200, headers=headers),
            *(h11.Data(data=p) for p in parts), h11.EndOfMessage()]


@dataclass
class Server:
    script: Script
    close_after_answer: bool = False  # as a server whose idle timeout ran out
    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n, i = self.connections, 0
        c = h11.Connection(h11.SERVER)
        try:
            while True:
                body = b""
                while True:
                    event = c.next_event()
                    if event is h11.NEED_DATA:
                        c.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
                if isinstance(event, h11.ConnectionClosed):
                    return
                self.requests.append(body)
                i += 1
                action = self.script(n, i, body)
                if action == "hang":
                    await asyncio.sleep(30)
                    return
                if action is None or isinstance(action, str):
                    return
                for ev in action:
                    writer.write(c.send(ev) or b"")
                await writer.drain()
                if self.close_after_answer:
                    return
                c.start_next_cycle()
        except (OSError, h11.ProtocolError):
            return
        finally:
            writer.close()


async def serving(tmp: Path, server: Server,
                  body: Callable[[_wire.WirePool], Awaitable[None]], **pool: float) -> None:
    ca = make_ca(tmp / "ca", "Wire test CA")
    cert, key = make_cert(ca, tmp / "ca", [HOST])
    srv = await asyncio.start_server(server.handle, HOST, 0, ssl=server_context(cert, key))
    server.port = int(srv.sockets[0].getsockname()[1])
    wire = _wire.WirePool(title="Test API", base=f"https://{HOST}:{server.port}",
                          ssl_context=ssl.create_default_context(cafile=str(ca.path)),
                          size=int(pool.get("size", 4)), connect_timeout=5,
                          timeout=pool.get("timeout", 10), user_agent="postroom/test")
    try:
        await body(wire)
    finally:
        await wire.aclose()
        srv.close()
        await srv.wait_closed()


def post(wire: _wire.WirePool, server: Server, body: bytes = b"{}") -> Awaitable[_wire.Answer]:
    return wire.request("POST", f"https://{HOST}:{server.port}/email?x=1",
                        {"Content-Type": "application/json"}, body)


def test_keep_alive_connections_are_reused(tmp_path: Path) -> None:
    server = Server(lambda n, i, body: ok(b'{"n": %d}' % i))

    async def go(wire: _wire.WirePool) -> None:
        for i in range(1, 6):
            answer = await post(wire, server, b'{"i": %d}' % i)
            assert (answer.status, answer.body) == (200, b'{"n": %d}' % i)
        # Concurrent requests take at most ``size`` connections, then reuse them.
        await asyncio.gather(*(post(wire, server) for _ in range(20)))

    asyncio.run(serving(tmp_path, server, go, size=2))
    assert server.connections <= 2 and len(server.requests) == 25
    assert server.requests[:2] == [b'{"i": 1}', b'{"i": 2}']


def test_an_idle_connection_the_server_closed_is_replaced_before_sending(tmp_path: Path) -> None:
    server = Server(lambda n, i, body: ok(), close_after_answer=True)

    async def go(wire: _wire.WirePool) -> None:
        await post(wire, server)
        idle = wire.hosts[("https", HOST, server.port)].idle
        for _ in range(500):  # until the loop has read the server's close (bounded)
            if idle[0].reader.at_eof():
                break
            await asyncio.sleep(0.01)
        assert (await post(wire, server, b"second")).status == 200

    asyncio.run(serving(tmp_path, server, go))
    # Two connections, and each request reached the server once.
    assert server.connections == 2 and server.requests == [b"{}", b"second"]


def test_a_connection_idle_too_long_is_not_reused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wire, "KEEPALIVE_EXPIRY", 0.0)
    server = Server(lambda n, i, body: ok())

    async def go(wire: _wire.WirePool) -> None:
        for _ in range(3):
            assert (await post(wire, server)).status == 200
        assert wire.opened == 3

    asyncio.run(serving(tmp_path, server, go))
    assert server.connections == 3 and len(server.requests) == 3


def test_a_cut_after_the_body_is_an_unknown_outcome_never_resent(tmp_path: Path) -> None:
    server = Server(lambda n, i, body: ok() if i == 1 else None)

    async def go(wire: _wire.WirePool) -> None:
        await post(wire, server)
        with pytest.raises(ConnectError) as info:
            await post(wire, server, b"second")
        assert info.value.after_data is True and info.value.code == "connect.lost"
        assert "Test API closed the connection" in str(info.value)

    asyncio.run(serving(tmp_path, server, go))
    assert server.connections == 1 and server.requests == [b"{}", b"second"]


def test_a_read_timeout_after_the_body_is_an_unknown_outcome(tmp_path: Path) -> None:
    server = Server(lambda n, i, body: "hang")

    async def go(wire: _wire.WirePool) -> None:
        with pytest.raises(TimeoutError_) as info:
            await post(wire, server, b"once")
        assert info.value.after_data is True and info.value.code == "timeout"
        assert not wire.hosts[("https", HOST, server.port)].idle  # that connection is closed

    asyncio.run(serving(tmp_path, server, go, timeout=0.5))
    assert server.requests == [b"once"]


def test_chunked_and_content_length_answers(tmp_path: Path) -> None:
    long = b'{"id": "' + b"x" * 100 + b'"}'
    server = Server(lambda n, i, body: ok(long, chunked=i % 2 == 1))

    async def go(wire: _wire.WirePool) -> None:
        for _ in range(4):
            answer = await post(wire, server)
            assert answer.body == long
            named = {k.lower() for k, _ in answer.headers}
            assert b"transfer-encoding" in named or b"content-length" in named

    asyncio.run(serving(tmp_path, server, go))
    assert server.connections == 1


def test_an_answer_over_the_cap_is_refused(tmp_path: Path) -> None:
    cap = _wire.MAX_ANSWER
    server = Server(lambda n, i, body: ok(b"a" * (cap if i == 1 else cap + 1), chunked=i == 2))

    async def go(wire: _wire.WirePool) -> None:
        assert len((await post(wire, server)).body) == cap  # up to the cap: read whole
        with pytest.raises(ConnectError) as info:
            await post(wire, server)
        assert info.value.code == "connect.answer_too_big" and info.value.after_data

    asyncio.run(serving(tmp_path, server, go))


def test_nothing_listening_is_a_connect_failure(tmp_path: Path) -> None:
    server = Server(lambda n, i, body: ok())

    async def go(wire: _wire.WirePool) -> None:
        port = server.port
        with pytest.raises(ConnectError) as info:
            await wire.request("POST", f"https://{HOST}:1/email", {}, b"")
        assert info.value.code == "connect.failed" and not info.value.after_data
        assert f"cannot reach Test API at https://{HOST}:{port}" in str(info.value)

    asyncio.run(serving(tmp_path, server, go))


@pytest.mark.parametrize("proxy", [None, "HTTPS_PROXY", "ALL_PROXY"])
def test_the_lean_client_is_used_unless_a_proxy_is_set(
        proxy: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    settings = transports.settings_model("postmark", "test").model_validate(
        {"name": "pm", "transport": "postmark", "api_key": "k"})
    t = transports.create(settings, TransportContext(ehlo_name="postroom.test"))
    assert isinstance(t, PostmarkTransport)
    assert (t.wire is None) == (proxy is not None)
    asyncio.run(t.aclose())


def test_a_transport_error_carries_the_transcript(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Through PostmarkTransport: the lean client's unknown outcome keeps the transcript."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = Server(lambda n, i, body: None)
    ca = make_ca(tmp_path / "ca2", "Wire test CA 2")
    cert, key = make_cert(ca, tmp_path / "ca2", [HOST])

    async def go() -> DeliveryError:
        srv = await asyncio.start_server(server.handle, HOST, 0,
                                         ssl=server_context(cert, key))
        port = int(srv.sockets[0].getsockname()[1])
        settings = transports.settings_model("postmark", "test").model_validate(
            {"name": "pm", "transport": "postmark", "api_key": "secret-key",
             "api_base": f"https://{HOST}:{port}", "ca_file": str(ca.path)})
        t = transports.create(settings, TransportContext(ehlo_name="postroom.test"))
        from postroom.envelope import Envelope

        raw = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhi\r\n"
        try:
            with pytest.raises(DeliveryError) as info:
                await t.send(Envelope("a@example.com", ["b@example.org"], raw))
            return info.value
        finally:
            await t.aclose()
            srv.close()
            await srv.wait_closed()

    err = asyncio.run(go())
    assert err.after_data is True and err.code == "connect.lost"
    assert err.transcript.startswith(f"C: POST https://{HOST}:")
    assert "secret-key" not in err.transcript and len(server.requests) == 1


# Answers as servers write them, byte for byte, from a plain-TCP server: (answer, closes
# after it) -> (status, body, header names, connection kept for the next request).
_RAW = {
    "/continue": (b"HTTP/1.1 100 Continue\r\n\r\n"
                  b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    "/chunked": (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n", False),
    "/no-content": (b"HTTP/1.1 204 No Content\r\nX-Id:  7 \r\n\r\n", False),
    "/close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", True),
    "/until-close": (b"HTTP/1.1 200 OK\r\n\r\nthe rest", True),
    "/http10": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    "/two": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
             b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
}


@pytest.mark.parametrize(("path", "expected"), [
    ("/continue", (200, b"ok", [b"content-length"], True)),
    ("/chunked", (201, b"ok!!!", [b"transfer-encoding"], True)),
    ("/no-content", (204, b"", [b"x-id"], True)),
    ("/close", (200, b"ok", [b"connection", b"content-length"], False)),
    ("/until-close", (200, b"the rest", [], False)),
    ("/http10", (200, b"ok", [b"content-length"], False)),
    ("/two", (200, b"ok", [b"content-length"], False)),  # a second answer: not reused
])
def test_answers_as_servers_write_them(path: str, expected: tuple[object, ...]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        answer, closes = _RAW[head.split(b" ")[1].decode()]
        writer.write(answer)
        await writer.drain()
        if closes:
            writer.close()
        else:
            await reader.read()  # until the client closes

    async def go() -> tuple[object, ...]:
        srv = await asyncio.start_server(handle, HOST, 0)
        port = int(srv.sockets[0].getsockname()[1])
        wire = _wire.WirePool(title="Test API", base="x", ssl_context=ssl.create_default_context(),
                              size=1, connect_timeout=5, timeout=5, user_agent="t")
        try:
            a = await wire.request("POST", f"http://{HOST}:{port}{path}", {}, b"{}")
            kept = bool(wire.hosts[("http", HOST, port)].idle)
            return a.status, a.body, [k for k, _ in a.headers], kept
        finally:
            await wire.aclose()
            srv.close()

    assert asyncio.run(go()) == expected


_ZIPPED = gzip.compress(b'{"id": "z"}')


@pytest.mark.parametrize("path", [*_RAW, "/charset", "/gzip"])
def test_the_answer_reads_as_the_httpx_response_it_stands_for(path: str) -> None:
    """HttpTransport hands the providers' parsers a WireResponse: the same status, headers,
    body, text and JSON as httpx.Response(content=...) with the request, made lazily; a
    content-coded body decoded as httpx decodes it."""
    from postroom.transports._http import Request, WireResponse, answer_text

    raws = {**_RAW, "/charset": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=latin-1"
                                 b"\r\nContent-Length: 3\r\n\r\n\xe9t\xe9", False),
            "/gzip": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(_ZIPPED), _ZIPPED), False)}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(raws[head.split(b" ")[1].decode()][0])
        await writer.drain()
        writer.close()

    async def go() -> _wire.Answer:
        srv = await asyncio.start_server(handle, HOST, 0)
        port = int(srv.sockets[0].getsockname()[1])
        wire = _wire.WirePool(title="Test API", base="x", ssl_context=ssl.create_default_context(),
                              size=1, connect_timeout=5, timeout=5, user_agent="t")
        try:
            return await wire.request("POST", f"http://{HOST}:{port}{path}", {}, b'{"a": 1}')
        finally:
            await wire.aclose()
            srv.close()

    import httpx

    answer = asyncio.run(go())
    req = Request("POST", "https://api.example.com/v1/send", {}, b'{"a": 1}', "JSON")
    got = WireResponse(answer, req)
    want = httpx.Response(answer.status, headers=answer.headers, content=answer.body,
                          request=httpx.Request("POST", req.url, content=req.content))
    assert (got.status_code, got.headers.raw, got.content, got.text, answer_text(got),
            got.reason_phrase, got.is_success) == (
        want.status_code, want.headers.raw, want.content, want.text, want.text,
        want.reason_phrase, want.is_success)
    assert (got.is_closed, got.is_stream_consumed) == (True, True)
    if path == "/gzip":
        assert got.json() == {"id": "z"}
    assert (got.request.method, got.request.url, got.request.content, got.url) == (
        want.request.method, want.request.url, want.request.content, want.url)
    got.raise_for_status()  # the request it reads is there


@pytest.mark.parametrize("headers", [{"X-Bad": "a\r\nInjected: 1"}, {"X Bad": "v"},
                                     {"X-Bad": " lead"}, {"X-Bad": "é"}])
def test_a_header_http_cannot_carry_is_refused_before_connecting(
        headers: dict[str, str]) -> None:
    wire = _wire.WirePool(title="Test API", base="x", ssl_context=ssl.create_default_context(),
                          size=1, connect_timeout=5, timeout=5, user_agent="t")
    with pytest.raises(ConnectError) as info:  # port 9: nothing is ever dialled
        asyncio.run(wire.request("POST", f"http://{HOST}:9/x", headers, b""))
    assert info.value.code == "connect.failed" and "cannot be sent" in str(info.value)
    assert wire.opened == 0
