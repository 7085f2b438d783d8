"""The Django backend, used by a small Django project (tests/django_project) run as a
subprocess, as a site would run it: EMAIL_BACKEND = "postroom.django.EmailBackend".

Messages go into a real `postroom serve` (embedded mode: straight into its store; remote
mode: through its HTTP API), which delivers them to the real Postfix + Dovecot peer; the
test compares what arrived in the Maildir with what Django composed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, smtp_connection

pytestmark = [pytest.mark.peers]

PROJECT = Path(__file__).resolve().parent / "django_project"
TO, CC, BCC = "testuser@example.test", "alice@example.test", "bob@example.test"
TIMEOUT = 30.0


def manage(*args: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT, capture_output=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **env}, timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    with Postroom(tmp_path_factory.mktemp("django"),
                  connections=smtp_connection(peers.plain_port)) as pr:
        yield pr


def modes(server: Postroom, mode: str) -> dict[str, str]:
    if mode == "embedded":
        return {"TEST_POSTROOM_CONFIG": str(server.config)}
    key = server.add_app_keys(f"django-{uuid.uuid4().hex[:6]}")[1]
    return {"TEST_POSTROOM_URL": f"http://127.0.0.1:{server.http_port}",
            "TEST_POSTROOM_API_KEY": key}


def body(msg: EmailMessage, kind: str = "plain") -> str:
    part = msg.get_body((kind,))
    assert part is not None, f"no text/{kind} part"
    return str(part.get_content())


@pytest.mark.parametrize("mode", ["embedded", "remote"])
def test_django_project_sends_through_postroom(
    server: Postroom, peers: Any, tmp_path: Path, mode: str
) -> None:
    tag = uuid.uuid4().hex[:10]
    pdf = tmp_path / "Rechnung März.pdf"
    pdf.write_bytes(b"%PDF-1.4\n" + os.urandom(20_000))
    out = manage("send_samples", "--to", TO, "--cc", CC, "--bcc", BCC, "--tag", tag,
                 "--attach", str(pdf), *(["--metadata"] if mode == "embedded" else []),
                 env=modes(server, mode))
    assert out == {"plain": 1, "alternative": 1, "attachments": 1, "mass": 2, "reused": 3,
                   "async": 1, "bad_silent": 0, "bad_error": "address.malformed"}

    plain = peers.wait_for(TO, f"plain {tag}", timeout=TIMEOUT)
    assert plain["From"] == "Shöp <shop@example.org>"
    assert body(plain) == "Grüße aus Django\nZeile 2\n"

    alt = peers.wait_for(TO, f"alternative {tag} ✓", timeout=TIMEOUT)
    assert alt.get_content_type() == "multipart/alternative"
    assert body(alt) == "Text part" and body(alt, "html") == "<p>HTML <b>part</b> ✓</p>"
    assert alt["Cc"] == CC and alt["Bcc"] is None and alt["X-Shop-Order"] == "42"
    for other in (CC, BCC):  # Cc and Bcc got it too: the envelope is message.recipients()
        peers.wait_for(other, f"alternative {tag} ✓", timeout=TIMEOUT)

    att = peers.wait_for(TO, f"attachments {tag}", timeout=TIMEOUT)
    assert body(att) == "See the files."
    files = {p.get_filename(): p.get_content() for p in att.iter_attachments()}
    assert files == {"résumé.txt": "Lebenslauf: café ☕\n", "blob.bin": bytes(range(256)) * 4,
                     "Rechnung März.pdf": pdf.read_bytes()}

    for subject in (f"mass 1 {tag}", f"mass 2 {tag}", f"reused 1 {tag}", f"reused 2 {tag}",
                    f"reused 3 {tag}", f"from async {tag}"):
        peers.wait_for(TO, subject, timeout=TIMEOUT)

    # The log knows where they came from, with the backend's and the message's tags.
    con = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True, timeout=TIMEOUT)
    try:
        rows = con.execute("SELECT source, tags, meta FROM messages WHERE subject = ?",
                           (f"alternative {tag} ✓",)).fetchall()
    finally:
        con.close()
    [(source, tags, meta)] = rows
    assert source == "python:djangoshop" if mode == "embedded" else source.startswith(
        "api:django-")
    assert json.loads(tags) == ["django", "alt"]
    assert json.loads(meta) == ({"order": "42"} if mode == "embedded" else None)


def test_fail_silently_with_a_broken_configuration(tmp_path: Path) -> None:
    out = manage("send_broken", "--to", TO,
                 env={"TEST_POSTROOM_CONFIG": str(tmp_path / "missing.toml")})
    assert out["silent"] == 0
    assert out["error"]["type"] == "ConfigError" and out["error"]["code"] == "config.missing"
    assert "missing.toml" in out["error"]["message"]
