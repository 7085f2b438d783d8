"""Hostile clients against the HTTP listener of a real `postroom serve`.

Each test checks the refusal (status, JSON error, and what the server did not spend: body
bytes read, memory, connections) and that a legitimate client on 127.0.0.1 is still served
while, or right after, the hostile one is at it. Hostile clients connect from 127.0.0.x
addresses outside the default trusted_networks and admin_networks (127.0.0.1/32, ::1/128),
one address per test: the server's per-address failure counts and caps must not carry over
from one test to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import httpx
import psutil
import pytest
from serve_proc import Postroom, wait_port

TIMEOUT = 15.0  # every socket and wait in this module
HEADER_TIMEOUT = 2.0  # [http] header_timeout and read_timeout of the instance
PER_IP = 20  # [http] max_connections_per_ip (the default)
MAX_DELAY = 2.0  # server.auth_failure_max_delay: the longest a bad key's 401 waits
BIG = 50 * 1024 * 1024
MESSAGE = {"from": "shop@example.org", "to": ["rcpt@example.test"], "subject": "hostile-http",
           "text": "hello"}


@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postroom]:
    with Postroom(
        tmp_path_factory.mktemp("hostile-http"),
        server=f"auth_failure_max_delay = {MAX_DELAY}\n",
        env={"POSTROOM_HTTP__HEADER_TIMEOUT": str(HEADER_TIMEOUT),
             "POSTROOM_HTTP__READ_TIMEOUT": str(HEADER_TIMEOUT)},
    ) as p:
        yield p


@pytest.fixture(scope="module")
def key(pr: Postroom) -> str:
    return pr.add_app_keys("shop")[1]


@pytest.fixture(scope="module")
def legit(pr: Postroom, key: str) -> Iterator[httpx.Client]:
    """The legitimate client: this host, a valid key, one kept-alive connection."""
    with pr.warm_api(key, MESSAGE, timeout=TIMEOUT) as c:
        yield c


def served(legit: httpx.Client) -> float:
    """One legitimate send and /healthz; returns the send's seconds."""
    start = time.perf_counter()
    resp = legit.post("/api/v1/messages", json=MESSAGE)
    took = time.perf_counter() - start
    assert resp.status_code == 202, resp.text
    health = legit.get("/healthz")
    assert health.status_code == 200 and health.json()["store"]["ok"], health.text
    return took


def rss(pr: Postroom) -> int:
    assert pr.proc is not None
    return int(psutil.Process(pr.proc.pid).memory_info().rss)


def connect(pr: Postroom, source: str, port: int | None = None) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port or pr.http_port), timeout=TIMEOUT,
                                    source_address=(source, 0))


def head(path: str, *, length: int | None = None, auth: str | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket) -> tuple[int, dict[str, Any], bytes]:
    """Read one whole response (status, JSON body, raw head) from a raw socket."""
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in data:
        assert time.monotonic() < deadline, data
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole answer: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in raw_head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        assert time.monotonic() < deadline, data
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return int(raw_head.split()[1]), json.loads(body[:length]), raw_head.lower()


def closed_by_server(sock: socket.socket) -> bool:
    try:
        rest = sock.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return False
    return rest == b""


# -- auth before the body -------------------------------------------------------------------
def test_unauthenticated_upload_gets_401_before_its_body(pr: Postroom, legit: httpx.Client) -> None:
    """A 50 MB upload without a valid key is answered from its headers alone: the client
    sends none of the body and still gets its 401, and the connection is closed."""
    cases = [(None, "auth.missing"), ("Basic c2hvcDp4", "auth.missing"),
             ("Bearer ghost.nope", "auth.invalid"), ("Bearer " + "x" * 5000, "auth.invalid")]
    for auth, code in cases:
        with connect(pr, "127.0.0.2") as sock:
            sock.sendall(head("/api/v1/messages", length=BIG, auth=auth))
            status, body, raw = answer(sock)  # no body byte was sent
            assert status == 401 and body["error"]["code"] == code, body
            assert body["error"]["message"] and body["error"]["fix"]
            assert b'www-authenticate: bearer realm="postroom"' in raw
            assert b"connection: close" in raw
            assert closed_by_server(sock)
    # The API's other routes are behind the same door; the docs are not.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                      timeout=TIMEOUT) as c:
        base = f"http://127.0.0.1:{pr.http_port}/api/v1"
        assert c.get(f"{base}/messages").status_code == 401
        assert c.delete(f"{base}/messages").status_code == 401
        assert c.get(f"{base}/openapi.json").status_code == 200
    served(legit)


def test_held_uploads_do_not_grow_memory(pr: Postroom, legit: httpx.Client) -> None:
    """Twelve 50 MB uploads with bad keys, each pushing as much body as the kernel takes:
    the server reads at most a flow-control window of each before its 401."""
    served(legit)
    baseline = rss(pr)
    socks = [connect(pr, "127.0.0.3") for _ in range(12)]
    pushed = 0
    try:
        chunk = b"x" * 65536
        for s in socks:
            s.sendall(head("/api/v1/messages", length=BIG, auth="Bearer ghost.nope"))
            s.setblocking(False)
        peak = baseline
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # push until the server stops reading
            for s in socks:
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    pushed += s.send(chunk)
            peak = max(peak, rss(pr))
            time.sleep(0.01)
        took = served(legit)
        statuses = []
        for s in socks:
            s.setblocking(True)
            s.settimeout(TIMEOUT)
            with contextlib.suppress(ConnectionError):
                statuses.append(answer(s)[0])
    finally:
        for s in socks:
            s.close()
    print(f"held uploads: baseline rss {baseline >> 20} MiB, peak {peak >> 20} MiB, "
          f"{pushed >> 20} MiB pushed by the clients, legit send {took * 1000:.0f} ms")
    assert pushed < 12 * BIG  # the clients were held back, not drained
    assert peak < baseline * 1.5, (baseline, peak)  # before: +1 GB for 10 uploads
    # 401, or 503 for those over [http] max_requests_per_ip: neither reads the body.
    assert 401 in statuses and set(statuses) <= {401, 503}, statuses


def test_bad_key_flood_leaves_legit_latency(pr: Postroom, legit: httpx.Client) -> None:
    """64 connections hammering bad keys from one address: they are capped and slowed
    down; a legitimate send stays within max(1 s, 20x) of its unloaded time."""
    unloaded = statistics.median(served(legit) for _ in range(10))
    stop = threading.Event()
    seen: dict[int, int] = {}

    async def hammer() -> None:
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.4")
        async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT,
                                     limits=httpx.Limits(max_connections=64)) as c:
            async def one() -> None:
                while not stop.is_set():
                    try:
                        r = await c.post(f"http://127.0.0.1:{pr.http_port}/api/v1/messages",
                                         json=MESSAGE,
                                         headers={"Authorization": "Bearer shop.wrong"})
                        seen[r.status_code] = seen.get(r.status_code, 0) + 1
                    except httpx.HTTPError:
                        seen[0] = seen.get(0, 0) + 1
                        await asyncio.sleep(0.01)

            await asyncio.gather(*(one() for _ in range(64)))

    flood = threading.Thread(target=asyncio.run, args=(hammer(),), daemon=True)
    flood.start()
    try:
        time.sleep(1.0)
        loaded = statistics.median(served(legit) for _ in range(10))
    finally:
        stop.set()
        flood.join(TIMEOUT + MAX_DELAY)
    assert not flood.is_alive()
    print(f"bad-key flood: legit send {unloaded * 1000:.1f} ms unloaded, "
          f"{loaded * 1000:.1f} ms under attack; attacker answers {seen}")
    assert seen.get(401, 0) > 0 and not any(200 <= s < 300 for s in seen), seen
    assert loaded < max(1.0, 20 * unloaded), (unloaded, loaded)


# -- connections --------------------------------------------------------------------------
def test_idle_and_half_sent_connections(pr: Postroom, key: str, legit: httpx.Client) -> None:
    """300 connections from one address, idle, with half a request head, or with headers
    (and a valid key) and half a body: all but PER_IP are refused at once with 503;
    /healthz and a send from 127.0.0.1 are served meanwhile; the held ones are closed
    after the deadlines, with 408 when they had started a request."""
    unloaded = served(legit)
    kinds = ["idle", "half-head", "half-body"]
    socks: list[tuple[str, socket.socket]] = []
    try:
        for i in range(300):
            kind = kinds[i % 3]
            s = connect(pr, "127.0.0.5")
            if kind == "half-head":
                s.sendall(b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            elif kind == "half-body":
                s.sendall(head("/api/v1/messages", length=1000, auth=f"Bearer {key}")
                          + b'{"from": ')
            socks.append((kind, s))
        # The first PER_IP were accepted (connections are taken in order) and are held,
        # unanswered; every other one got its 503 at once.
        for _kind, s in socks[:PER_IP]:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        for _kind, s in socks[PER_IP:]:
            status, body, _ = answer(s)
            assert status == 503 and body["error"]["code"] == "http.busy", body
        took = served(legit)  # while they are held
        # The held ones: gone after the deadlines, with 408 for a started request.
        time.sleep(HEADER_TIMEOUT + 1.0)
        outcomes: dict[str, set[int]] = {}
        for kind, s in socks[:PER_IP]:
            s.settimeout(TIMEOUT)
            try:
                status, body, _ = answer(s)
                assert closed_by_server(s)
            except AssertionError:
                status = 0  # closed without a word
            outcomes.setdefault(kind, set()).add(status)
    finally:
        for _kind, s in socks:
            s.close()
    print(f"300 idle/half-sent connections: {300 - PER_IP} refused at once; legit send "
          f"{unloaded * 1000:.1f} ms before, {took * 1000:.1f} ms during")
    assert outcomes == {"idle": {0}, "half-head": {408}, "half-body": {408}}, outcomes
    assert took < max(1.0, 20 * unloaded)
    served(legit)


# -- what the server tells strangers ---------------------------------------------------------
def test_healthz_is_minimal_for_strangers(pr: Postroom, legit: httpx.Client) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.6"),
                      timeout=TIMEOUT) as c:
        resp = c.get(f"http://127.0.0.1:{pr.http_port}/healthz")
        assert resp.status_code == 200 and resp.json() == {"status": "ok"}, resp.text
        assert c.head(f"http://127.0.0.1:{pr.http_port}/healthz").status_code == 200
    detailed = legit.get("/healthz").json()
    assert {"store", "worker", "queue"} <= set(detailed), detailed


def test_docs_page_loads_nothing_from_elsewhere(pr: Postroom) -> None:
    base = f"http://127.0.0.1:{pr.http_port}"
    page = httpx.get(f"{base}/api/v1/docs", timeout=TIMEOUT)
    assert page.status_code == 200, page.text
    assert "http://" not in page.text and "https://" not in page.text, page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self' 'sha256-" in csp, csp
    files = resources.files("postroom.ingress") / "static" / "swagger"
    for name, ctype in [("swagger-ui-bundle.js", "text/javascript"),
                        ("swagger-ui.css", "text/css"), ("favicon-32x32.png", "image/png")]:
        assert f'"/api/v1/docs/{name}"' in page.text
        resp = httpx.get(f"{base}/api/v1/docs/{name}", timeout=TIMEOUT)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith(ctype)
        assert resp.content == (files / name).read_bytes()
    assert httpx.get(f"{base}/api/v1/docs/../openapi.json", timeout=TIMEOUT).status_code \
        in (200, 404)  # normalised by the client or refused; never a file outside the list
    assert httpx.get(f"{base}/api/v1/docs/LICENSE", timeout=TIMEOUT).status_code == 404
    assert httpx.get(f"{base}/api/v1/openapi.json", timeout=TIMEOUT).status_code == 200


# -- HTTPS ---------------------------------------------------------------------------------
def test_https_on_http_listen(tmp_path: Any) -> None:
    """[http] tls = true serves HTTPS with the instance's (self-signed) certificate; plain
    HTTP on that port gets nowhere, and a wrong certificate path is a clear start-up error."""
    with Postroom(tmp_path / "tls", env={"POSTROOM_HTTP__TLS": "true"}) as p:
        wait_port(p.http_port, timeout=TIMEOUT)
        key = p.add_app_keys("shop")[1]
        ctx = ssl.create_default_context(cafile=str(p.cert))
        with httpx.Client(base_url=f"https://127.0.0.1:{p.http_port}", verify=ctx,
                          timeout=TIMEOUT, headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/healthz").status_code == 200
            resp = c.post("/api/v1/messages", json=MESSAGE)
            assert resp.status_code == 202, resp.text
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{p.http_port}/healthz", timeout=TIMEOUT)
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused
            httpx.get(f"https://127.0.0.1:{p.http_port}/healthz", timeout=TIMEOUT)
    bad = Postroom(tmp_path / "bad", env={"POSTROOM_HTTP__TLS": "true",
                                          "POSTROOM_HTTP__TLS_CERT": "missing.pem",
                                          "POSTROOM_HTTP__TLS_KEY": "missing.key"})
    with pytest.raises(RuntimeError):
        bad.start(timeout=10)
    text = bad.log.read_text()
    assert "cannot serve HTTPS" in text and "Traceback" not in text, text
