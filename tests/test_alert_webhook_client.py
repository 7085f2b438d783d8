"""The webhook channel keeps its HTTP client between alerts (issue 15): an alert and its
recovery, sent by one dispatcher in two ticks, reach a keep-alive receiver over one TCP
connection, which the dispatcher closes when it stops; a reload makes a new channel; a proxy
set in the environment is used."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import FakeClock
from sqlalchemy import Engine

from postroom import events
from postroom.alerts.dispatcher import Dispatcher
from postroom.events import Event, Kind
from postroom.settings import Settings, load
from postroom.store.db import write_transaction

WAIT = 30.0


class KeepAlive:
    """HTTP/1.1 on 127.0.0.1 that keeps connections open; counts connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections += 1

            def finish(self) -> None:
                super().finish()
                outer.closed += 1

            def do_POST(self) -> None:
                outer.requests.append(self.rfile.read(int(self.headers["Content-Length"])))
                outer.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[KeepAlive]:
    r = KeepAlive()
    yield r
    r.close()


def settings(tmp_path: Path, port: int, url: str = "") -> Settings:
    """One rule whose channel is the receiver's /hook (or ``url``)."""
    path = tmp_path / "postroom.toml"
    url = url or f"webhook+http://127.0.0.1:{port}/hook"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[[alerts]]\n'
                    f'name = "ops"\nchannels = ["{url}"]\n'
                    'webhook_secret = "a webhook secret"\n', encoding="utf-8")
    return load(path, connections=False)


def record(engine: Engine, kind: Kind, at: float) -> None:
    with write_transaction(engine) as conn:
        events.record_all(conn, [Event(kind, at, None, "primary", kind.value)])


@pytest.mark.sqlite_only
def test_two_alerts_one_connection(engine: Engine, clock: FakeClock, tmp_path: Path,
                                   receiver: KeepAlive) -> None:
    conf = settings(tmp_path, receiver.port)
    d = Dispatcher(engine, lambda: conf, clock=clock)

    async def outage() -> None:
        await d.tick()  # first start: the cursor
        record(engine, Kind.CONNECTION_DOWN, clock())
        await d.tick()
        clock.advance(5)
        record(engine, Kind.CONNECTION_UP, clock())
        await d.tick()
        await d.aclose()

    asyncio.run(outage())
    assert len(receiver.requests) == 2
    assert b'"opened"' in receiver.requests[0] and b'"recovered"' in receiver.requests[1]
    assert receiver.connections == 1
    deadline = time.monotonic() + WAIT
    while receiver.closed < 1 and time.monotonic() < deadline:  # aclose closed it
        time.sleep(0.05)
    assert receiver.closed == 1


@pytest.mark.sqlite_only
def test_reload_makes_a_new_channel_and_closes_the_old(
        engine: Engine, clock: FakeClock, tmp_path: Path, receiver: KeepAlive) -> None:
    current = [settings(tmp_path, receiver.port)]
    d = Dispatcher(engine, lambda: current[0], clock=clock)

    async def outage() -> None:
        await d.tick()
        record(engine, Kind.CONNECTION_DOWN, clock())
        await d.tick()
        current[0] = settings(tmp_path, receiver.port)  # a reload: new settings
        clock.advance(5)
        record(engine, Kind.CONNECTION_UP, clock())
        await d.tick()
        await d.aclose()

    asyncio.run(outage())
    assert len(receiver.requests) == 2 and receiver.connections == 2
    deadline = time.monotonic() + WAIT
    while receiver.closed < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.closed == 2


@pytest.mark.sqlite_only
def test_a_proxy_in_the_environment_is_used(
        engine: Engine, clock: FakeClock, tmp_path: Path, receiver: KeepAlive,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY names the receiver: the alert for a host nobody resolves reaches it there,
    as a proxy request (absolute URL), through httpx."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    conf = settings(tmp_path, receiver.port, "webhook+http://alerts.example.invalid/hook")
    d = Dispatcher(engine, lambda: conf, clock=clock)

    async def one() -> None:
        await d.tick()
        record(engine, Kind.CONNECTION_DOWN, clock())
        await d.tick()
        await d.aclose()

    asyncio.run(one())
    assert receiver.paths == ["http://alerts.example.invalid/hook"]
