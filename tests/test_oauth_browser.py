"""The authorization-code flow driven end to end in a real browser (issue 5): headless
Chromium (the Debian package) opens the link `postroom oauth login` prints, signs in at the
local django-oauth-toolkit server (its login form, then its consent page), comes back to
Postroom's /oauth/callback; the tokens are stored encrypted; mail is delivered with them
through the Postfix + Dovecot peer.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TESTS_DIR
from real_servers import raw_message
from serve_proc import Postroom
from sqlalchemy import select

from postroom import settings as settings_mod
from postroom.queue.sql import Queue
from postroom.runtime import Instance
from postroom.store.schema import oauth_grants

USER, PASSWORD = "testuser@example.test", "testpass"


@pytest.fixture
def serve(peers: Any, tmp_path: Path) -> Iterator[Postroom]:
    base = peers.oauth_base
    conn = (
        '[[connections]]\nname = "consent"\ntransport = "smtp"\nhost = "127.0.0.1"\n'
        f'port = {peers.submission_port}\nsecurity = "starttls"\nca_file = "{peers.ca_file}"\n'
        f'auth = "xoauth2"\nusername = "{USER}"\nconnect_timeout = 5\ntimeout = 20\n'
        # gateway-consent: the client for which the provider shows a consent page.
        'oauth = { provider = "generic", client_id = "gateway-consent", '
        'client_secret = "gateway-secret", '
        f'authorize_url = "{base}/o/authorize/", token_url = "{base}/o/token/", '
        f'revoke_url = "{base}/o/revoke_token/", scopes = ["smtp", "offline_access"] }}\n')
    pr = Postroom(tmp_path, connections=conn).start()
    try:
        yield pr
    finally:
        pr.stop()


def test_browser_sign_in_stores_tokens_encrypted_and_mail_goes(
        serve: Postroom, peers: Any, tmp_path: Path, unique_subject: str) -> None:
    out = serve.cli("oauth", "login", "consent")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    redirect = f"http://127.0.0.1:{serve.http_port}/oauth/callback"
    assert redirect in text  # the exact redirect URI to register
    link = re.search(r"(http://\S+/oauth/start/consent\?ticket=\S+)", text)
    assert link, text
    python = Path(os.environ.get("PEERS_VENV", peers.state_dir / "venv")) / "bin" / "python"
    shot = tmp_path / "consent.png"
    run = subprocess.run(
        [str(python), str(TESTS_DIR / "oauth_browser_signin.py"), link.group(1), USER,
         PASSWORD, str(shot)], capture_output=True, text=True, timeout=180,
        env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    page = json.loads(run.stdout.strip().splitlines()[-1])
    assert page["url"].startswith(redirect + "?") and page["title"] == "Signed in", page
    assert USER in page["text"] and "smtp offline_access" in page["text"]
    assert shot.stat().st_size > 0  # the provider's consent page was shown and clicked
    # Stored encrypted: ciphertext in the table, the plain token only through the key.
    inst = Instance(settings_mod.load(serve.config))
    try:
        grant = inst.oauth.store.get("consent")
        assert grant is not None and grant.refresh_token and grant.access_token
        with inst.engine.connect() as c:
            row = c.execute(select(oauth_grants)).one()
        assert row.access_token.startswith("gAAAA") and grant.access_token not in row.access_token
        assert grant.refresh_token not in row.refresh_token
        # Mail goes with it.
        raw = raw_message("app@app.test", USER, unique_subject, f"<{uuid.uuid4().hex}@a.test>")
        with smtplib.SMTP("127.0.0.1", serve.smtp_port, timeout=30) as s:
            s.ehlo("app.test")
            s.mail("app@app.test")
            s.rcpt(USER)
            code, reply = s.data(raw)
        assert code == 250
        msg_id = re.search(rb"queued as (\S+)", reply)
        assert msg_id
        peers.wait_for(USER, unique_subject, timeout=30)
        queue = Queue(inst.engine)
        deadline = time.monotonic() + 20
        while (m := queue.log.get(msg_id.group(1).decode())) and m["status"] != "sent":
            assert time.monotonic() < deadline, m
            time.sleep(0.1)
    finally:
        inst.close()
