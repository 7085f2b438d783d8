"""What `postroom serve` keeps imported after each door was used once (issue 19, point 4).

RSS figures are noisy on a shared box, so they belong to bench/memory_bench.py; these tests
check the cause instead: the modules a server holds (POSTROOM_DEBUG_MODULES, written on
SIGUSR1), after a first start on an empty data folder and after one message through the
SMTP listener, one through the API (both delivered), and the dashboard, the log and a
message page of the web admin. Work needed once (migrating the database: alembic, mako,
pygments; making the self-signed certificate: cryptography's X.509) is done by a child
process (postroom.apart), never in the server; the web admin, the OAuth pages and the
OpenAPI document are served by a process of their own (postroom.ingress.admin_proxy), so
serve never holds Jinja2, the pages or the accounts (tests/test_admin_process.py: that
process's life).
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from real_servers import Sink
from serve_proc import Postroom, smtp_connection

from postroom import apart
from postroom.exceptions import StoreError
from postroom.store.direct import head_revision

ADMIN = ("admin", "tabby cat on the keyboard")
# Imported for one-time work only: never kept by a running server. And on SQLite, not
# SQLAlchemy's PostgreSQL dialect (store.schema.partial_index says why it could be).
ONCE = ("alembic", "mako", "pygments", "cryptography.x509", "sqlalchemy.dialects.postgresql")


def held(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def modules_of(server: Postroom, dump: Path, timeout: float = 20.0) -> set[str]:
    """The module names the server holds now (it writes them on SIGUSR1)."""
    assert server.proc is not None
    dump.unlink(missing_ok=True)
    os.kill(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not dump.exists():
        assert time.monotonic() < deadline, "no module list written after SIGUSR1"
        time.sleep(0.05)
    return set(dump.read_text(encoding="utf-8").split())


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sink: Sink
           ) -> Iterator[tuple[Postroom, Path]]:
    root = tmp_path_factory.mktemp("memory")
    dump = root / "modules.txt"
    server = Postroom(root, connections=smtp_connection(sink.port),
                      env={"POSTROOM_DEBUG_MODULES": str(dump)})
    with server:
        yield server, dump


def test_first_start_migrates_and_makes_the_certificate_in_a_child(
        served: tuple[Postroom, Path]) -> None:
    server, dump = served
    modules = modules_of(server, dump)
    for package in ONCE:
        assert held(modules, package) == [], f"serve keeps {package} after its first start"
    # ...and the work was done: the database is at the head revision, the pair exists.
    with sqlite3.connect(server.db) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)]
    assert server.cert.exists()
    assert "created a self-signed certificate" in server.log.read_text()


def test_every_door_used_once_keeps_nothing_needed_once(
        served: tuple[Postroom, Path], sink: Sink) -> None:
    server, dump = served
    out = server.cli("admin", "add", ADMIN[0], "--role", "admin", "--password-stdin",
                     input=f"{ADMIN[1]}\n".encode())
    assert out.returncode == 0, out.stderr
    _, key = server.add_app_keys("memory")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.sendmail("shop@example.org", ["alice@example.net"],
                   b"From: shop@example.org\r\nTo: alice@example.net\r\nSubject: smtp\r\n\r\n"
                   b"hello\r\n")
    with server.api(key) as c:
        r = c.post("/api/v1/messages", json={
            "from": "shop@example.org", "to": ["alice@example.net"], "subject": "api",
            "text": "hello"})
        assert r.status_code == 202, r.text
        msg_id = r.json()["id"]
    assert sink.wait_count(2, 30) >= 2, "both messages delivered"

    # The API alone: served from its route table, without FastAPI (the web admin's process
    # has it), and none of the web admin (its fence is the front's own).
    modules = modules_of(server, dump)
    # Nor uvicorn (and click under it): the listener is h11 and ingress.http_conn alone.
    for package in ("fastapi", "starlette", "anyio", "uvicorn", "click"):
        assert held(modules, package) == [], f"serve keeps {package} after the API"
    assert held(modules, "postroom.web") == ["postroom.web", "postroom.web.fence"]
    assert held(modules, "jinja2") == []
    assert held(modules, "postroom.diagnostics.advice") == []  # read for a message's page

    # The admin's pages, served by the admin's process: serve holds none of them.
    base = f"http://127.0.0.1:{server.http_port}"
    with httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/admin/login", data={"name": ADMIN[0], "password": ADMIN[1]})
        assert r.status_code == 303, r.text
        for path in ("/admin/", "/admin/log", f"/admin/messages/{msg_id}"):
            assert c.get(path).status_code == 200, path
    modules = modules_of(server, dump)
    assert "postroom.queue.worker" in modules
    assert held(modules, "postroom.web") == ["postroom.web", "postroom.web.fence"]
    for package in ("jinja2", "argon2", "babel", "postroom.diagnostics.advice"):
        assert held(modules, package) == [], f"serve keeps {package} after the pages"

    # /metrics with an admin API token: checked by the front, without the admin's modules.
    out = server.cli("admin", "token", ADMIN[0], "--label", "prometheus")
    assert out.returncode == 0, out.stderr
    found = re.search(r"Bearer (prt_\S+)", out.stdout.decode())
    assert found, out.stdout
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {found.group(1)}"},
                  timeout=60)
    assert r.status_code == 200 and "postroom_" in r.text, r.text[:300]
    assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer prt_x.y"},
                     timeout=60).status_code == 401
    modules = modules_of(server, dump)
    assert held(modules, "postroom.web") == ["postroom.web", "postroom.web.fence"]
    assert held(modules, "jinja2") == [] and held(modules, "argon2") == []

    # The OpenAPI document (from the admin's process) still describes the admin's JSON API.
    doc = httpx.get(f"{base}/api/v1/openapi.json", timeout=60).json()
    assert "/api/v1/messages" in doc["paths"]
    assert any(p.startswith("/api/v1/admin/") for p in doc["paths"])

    # Nothing any door needed once is held, nor the admin's JSON API, nor FastAPI.
    modules = modules_of(server, dump)
    assert held(modules, "postroom.web") == ["postroom.web", "postroom.web.fence"]
    for package in (*ONCE, "fastapi", "starlette", "anyio", "uvicorn"):
        assert held(modules, package) == [], f"serve keeps {package} after first use"


def test_migrate_apart_leaves_alembic_out_of_the_caller(tmp_path: Path) -> None:
    """In a fresh interpreter (this one may have imported alembic for other tests)."""
    db = tmp_path / "apart.db"
    code = (
        "import sys\n"
        "from postroom.store.db import make_engine, migrate\n"
        f"engine = make_engine('sqlite:///{db}')\n"
        "migrate(engine, apart=True)\n"
        "print('alembic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() == "False"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)]


def test_an_error_in_the_child_comes_back_as_the_same_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(StoreError) as caught:
        apart.run("migrate", {"url": f"sqlite:///{not_a_folder}/postroom.db"})
    assert caught.value.code == "store.create"
    assert "cannot create the database file" in str(caught.value)


def test_the_child_refuses_an_unknown_job() -> None:
    out = subprocess.run([sys.executable, "-m", "postroom.apart", "nonsense"],
                         capture_output=True, input=b"{}", timeout=60)
    assert out.returncode == 2
    assert re.search(rb"usage: python -m postroom.apart \{migrate\|certificate\}", out.stderr)
    with pytest.raises(ValueError):
        apart.run("nonsense", {})


def test_migrate_apart_on_postgresql(pg_server: Any) -> None:
    """The child gets the URL (driver and credentials) and migrates the same database."""
    from sqlalchemy import text

    from postroom.store.db import make_engine, migrate

    engine = make_engine(pg_server.new_database())
    try:
        migrate(engine, apart=True)
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
    assert version == head_revision()
