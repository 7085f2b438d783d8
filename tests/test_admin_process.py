"""The web admin in a process of its own (postroom.ingress.admin_proxy, admin_child),
against a real `postroom serve`: no process until an admin request passes the front's
fence; started by the first, answering pages and the admin's JSON API; stopped after
``[admin] process_idle`` seconds without a request and started again by the next (the
session, kept in the database, still signed in); the socket private to the server's
user; serve's own modules free of the admin's; no orphan after kill -9 of serve.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_proc import Postroom

ADMIN = ("keeper", "tabby cat on the keyboard")
IDLE = 3  # [admin] process_idle for these tests, seconds
WAIT = 60.0  # bound of every wait below (a loaded box starts Python slowly)


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still alive."""
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.exists() else []:
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def admin_children(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"postroom.ingress.admin_child" in cmdline:
            out.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def modules_of(server: Postroom, dump: Path) -> set[str]:
    assert server.proc is not None
    dump.unlink(missing_ok=True)
    os.kill(server.proc.pid, signal.SIGUSR1)
    wait_for(dump.exists, "the module list")
    return set(dump.read_text(encoding="utf-8").split())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postroom, Path]]:
    root = tmp_path_factory.mktemp("adminproc")
    dump = root / "modules.txt"
    server = Postroom(root, server='admin_networks = ["127.0.0.1/32"]\n',
                      connections=f"[admin]\nprocess_idle = {IDLE}\n",
                      env={"POSTROOM_DEBUG_MODULES": str(dump)})
    out = server.cli("admin", "add", ADMIN[0], "--role", "admin", "--password-stdin",
                     input=f"{ADMIN[1]}\n".encode())
    assert out.returncode == 0, out.stderr
    with server:
        yield server, dump


def client(server: Postroom, source: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=WAIT,
                        transport=httpx.HTTPTransport(local_address=source) if source
                        else None)


def test_the_fence_answers_without_starting_the_process(
        served: tuple[Postroom, Path]) -> None:
    server, _ = served
    assert server.proc is not None
    starts = server.log.read_text().count(" started in ")
    with client(server, source="127.0.0.2") as c:
        r = c.get("/admin/login")
        assert r.status_code == 403 and "server.admin_networks" in r.text
        r = c.post("/api/v1/admin/me", content=b"x" * 2_000_000)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin.network"
        # the Web Push doors: the service worker and a 2 MB "subscription" get the same
        for r in (c.get("/admin/push-worker.js"),
                  c.post("/admin/account/push", content=b"{" * 2_000_000)):
            assert r.status_code == 403 and "server.admin_networks" in r.text
    with client(server) as c:  # a foreign Host: refused by the front too
        assert c.get("/admin/login", headers={"Host": "evil.example"}).status_code == 421
    assert server.log.read_text().count(" started in ") == starts  # none started


def test_started_on_demand_stopped_when_idle_started_again(
        served: tuple[Postroom, Path]) -> None:
    server, dump = served
    assert server.proc is not None
    with client(server) as c:
        r = c.post("/admin/login", data={"name": ADMIN[0], "password": ADMIN[1]})
        assert r.status_code == 303, r.text
        [first] = admin_children(server.proc.pid)
        page = c.get("/admin/")
        assert page.status_code == 200 and ADMIN[0] in page.text
        assert page.headers["x-frame-options"] == "DENY"  # the front's headers still
        assert c.get("/api/v1/admin/me").json()["name"] == ADMIN[0]
        # The headers the process trusts come from the front only: a client's are dropped.
        forged = c.get("/admin/", headers={"X-Postroom-Front-Check": "signed-in",
                                           "X-Postroom-Front-Scheme": "https"})
        assert forged.status_code == 200 and ADMIN[0] in forged.text

        # The socket: in the 0700 data folder, 0600 itself.
        sock = server.root / "data" / "admin.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

        # serve itself holds none of the admin's libraries or pages.
        modules = modules_of(server, dump)
        for held in ("jinja2", "postroom.web.dashboard", "postroom.web.auth",
                     "postroom.web.api_log", "argon2"):
            assert held not in modules, held

        # Idle: the process ends; the next request starts another, still signed in.
        wait_for(lambda: not alive(first), "the idle admin process to stop")
        assert admin_children(server.proc.pid) == []
        again = c.get("/admin/log")
        assert again.status_code == 200, again.text
        [second] = admin_children(server.proc.pid)
        assert second != first
    assert "web admin process" in server.log.read_text()


def test_openapi_document_from_the_process_describes_both(
        served: tuple[Postroom, Path]) -> None:
    server, _ = served
    with client(server) as c:
        doc = c.get("/api/v1/openapi.json")
        assert doc.status_code == 200
        paths = doc.json()["paths"]
    assert "/api/v1/messages" in paths
    assert any(p.startswith("/api/v1/admin/") for p in paths)


def test_no_orphan_after_kill_9_of_serve(tmp_path: Path) -> None:
    server = Postroom(tmp_path, connections=f"[admin]\nprocess_idle = {IDLE * 100}\n")
    with server:
        assert server.proc is not None
        with client(server) as c:
            assert c.get("/admin/login").status_code in (200, 303)  # 303: to the setup
        [child] = admin_children(server.proc.pid)
        server.kill9()
    wait_for(lambda: not alive(child), "the admin process to exit after its parent")
